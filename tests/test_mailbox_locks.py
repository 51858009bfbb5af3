"""Mailbox locks of a lock service, as sessions use them, and the etcd backend's timing.

No etcd here (tests/test_etcd_locks.py has the real one): two servers with
their own storage stand for two hosts on one store and share a lock
service in memory; the etcd backend's lease logic runs against a fake
gateway on Trio's ``autojump_clock`` (asked for by each test: pytest-trio
takes the clock from the test's own arguments), so that seconds of TTL take none.
Rules as in conftest: memory streams, ``fail_after`` around every wait.
"""

from __future__ import annotations

import functools
import itertools
import json
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

import pop3d
from pop3d import etcd_locks, maildir, replies
from pop3d.etcd import EtcdGateway, EtcdUnavailable, b64, unb64
from pop3d.etcd_locks import GIVE_UP, RENEW, EtcdLocks
from pop3d.mailbox_locks import Holder, LocalLocks, LockServiceUnavailable, MailboxLock, MailboxLocks

from .conftest import MESSAGES, TEST_NET, connect, wait_until
from .popclient import PopClient
from .serve_process import mail_files

# -- two "hosts" sharing a lock service ----------------------------------------


async def _host(nursery: trio.Nursery, users: pop3d.MemoryUsers, locks: MailboxLocks | None) -> pop3d.Server:
    # Each host its own storage (its own in-process lock), as two machines on one store.
    srv = pop3d.new()
    srv.configure(
        auth=users,
        storage=pop3d.MemoryStorage({"alice": MESSAGES}),
        login_failure_delay=0,
        cleartext_auth_from=[TEST_NET],
        penalties=None,
    )
    srv.mailbox_locks = locks
    await nursery.start(srv.run)
    return srv


@pytest.fixture
async def hosts(
    nursery: trio.Nursery, users: pop3d.MemoryUsers
) -> AsyncIterator[tuple[pop3d.Server, pop3d.Server, LocalLocks]]:
    locks = LocalLocks("test")
    one, two = await _host(nursery, users, locks), await _host(nursery, users, locks)
    yield one, two, locks
    await one.destroy()
    await two.destroy()


async def _login(server: pop3d.Server) -> tuple[PopClient, bytes]:
    client = connect(server)
    await client.read_line()
    return client, await client.login("alice", "wonderland")


def _storage(server: pop3d.Server) -> pop3d.MemoryStorage:
    storage = server.options.storage
    assert isinstance(storage, pop3d.MemoryStorage)
    return storage


async def test_a_mailbox_held_on_one_host_is_in_use_on_the_other(
    hosts: tuple[pop3d.Server, pop3d.Server, LocalLocks],
) -> None:
    one, two, locks = hosts
    with trio.fail_after(5):
        first, reply = await _login(one)
        assert reply.startswith(b"+OK")
        _, reply = await _login(two)
        assert reply == b"-ERR " + replies.MAILDROP_LOCKED.encode() + b"\r\n"
        assert not _storage(two).is_locked("alice")  # refused by the lock service, before the storage
        [held] = await locks.held()
        assert (held.mailbox, held.instance, held.server, held.client) == ("alice", "test", one.name, "192.0.2.7")
        assert (await first.command("QUIT")).startswith(b"+OK")
        await wait_until(lambda: not one.conn_list())
        assert await locks.held() == []
        _, reply = await _login(two)
        assert reply.startswith(b"+OK")


async def test_a_lost_lock_ends_the_session_and_deletes_nothing(
    hosts: tuple[pop3d.Server, pop3d.Server, LocalLocks],
) -> None:
    one, _, locks = hosts
    with trio.fail_after(5):
        client, _ = await _login(one)
        assert (await client.command("DELE 1")).startswith(b"+OK")
        assert locks.revoke("alice")
        assert await client.read_line() == b"-ERR " + replies.LOCK_LOST.encode() + b"\r\n"
        assert await client.at_eof()
        await wait_until(lambda: not one.conn_list())
    assert _storage(one).messages("alice") == MESSAGES
    assert not _storage(one).is_locked("alice")


class _TakenOver:
    """A lock service whose locks are taken over silently (as a key deleted and put again in etcd)."""

    kind = "local"
    instance = "test"
    reachable = True

    def __init__(self) -> None:
        self.released: list[str] = []
        self.confirmed = 0
        self.down = False

    async def acquire(self, mailbox: str, holder: Holder, on_lost: Callable[[], None]) -> MailboxLock | None:
        if self.down:
            raise LockServiceUnavailable("the lock service is unreachable")
        service = self

        class Lock:
            token = 7

            def still_held(self) -> bool:
                return True

            async def confirm(self) -> bool:
                service.confirmed += 1
                return False  # another holder has the key now

            async def release(self) -> None:
                service.released.append(mailbox)

        return Lock()

    async def held(self) -> list[Any]:
        return []


async def test_deletions_are_refused_when_the_lock_was_taken_over(
    nursery: trio.Nursery, users: pop3d.MemoryUsers
) -> None:
    service = _TakenOver()
    srv = await _host(nursery, users, service)
    with trio.fail_after(5):
        client, _ = await _login(srv)
        assert (await client.command("DELE 1")).startswith(b"+OK")
        assert await client.command("QUIT") == b"-ERR " + replies.LOCK_LOST.encode() + b"\r\n"
        assert await client.at_eof()
        await wait_until(lambda: not srv.conn_list())
    assert service.confirmed == 1
    assert _storage(srv).messages("alice") == MESSAGES
    assert service.released == ["alice"]
    # Without deletions there is nothing to fence: QUIT is +OK.
    with trio.fail_after(5):
        client, _ = await _login(srv)
        assert (await client.command("QUIT")).startswith(b"+OK")
    assert service.confirmed == 1
    await srv.destroy()


async def test_an_unreachable_lock_service_refuses_logins_with_sys_temp(
    nursery: trio.Nursery, users: pop3d.MemoryUsers
) -> None:
    service = _TakenOver()
    service.down = True
    srv = await _host(nursery, users, service)
    with trio.fail_after(5):
        client, reply = await _login(srv)
        assert reply == b"-ERR " + replies.SYS_TEMP.encode() + b"\r\n"
        assert not _storage(srv).is_locked("alice")
        service.down = False
        assert (await client.login("alice", "wonderland")).startswith(b"+OK")  # the same session may try again
    await srv.destroy()


async def test_the_cluster_lock_is_taken_first_and_released_last(
    nursery: trio.Nursery, users: pop3d.MemoryUsers
) -> None:
    order: list[str] = []
    storage = pop3d.MemoryStorage({"alice": MESSAGES})
    locks = LocalLocks()

    class Recording:
        async def lock(self, mbox: str) -> bool:
            order.append(f"storage lock, cluster held={bool(await locks.held())}")
            return await storage.lock(mbox)

        async def unlock(self, mbox: str) -> None:
            order.append(f"storage unlock, cluster held={bool(await locks.held())}")
            await storage.unlock(mbox)

        def __getattr__(self, name: str) -> Any:
            return getattr(storage, name)

    srv = await _host(nursery, users, locks)
    srv.configure(storage=Recording())
    with trio.fail_after(5):
        client, reply = await _login(srv)
        assert reply.startswith(b"+OK")
        assert (await client.command("QUIT")).startswith(b"+OK")
        await wait_until(lambda: not srv.conn_list())
    assert order == ["storage lock, cluster held=True", "storage unlock, cluster held=True"]
    assert await locks.held() == []
    await srv.destroy()


async def test_a_storage_that_refuses_gives_the_cluster_lock_back(
    nursery: trio.Nursery, users: pop3d.MemoryUsers
) -> None:
    locks = LocalLocks()
    srv = await _host(nursery, users, locks)
    await _storage(srv).lock("alice")  # held by the storage alone (another process on this host, say)
    with trio.fail_after(5):
        _, reply = await _login(srv)
    assert reply == b"-ERR " + replies.MAILDROP_LOCKED.encode() + b"\r\n"
    assert await locks.held() == []
    await srv.destroy()


async def test_the_cluster_lock_outlives_a_deletion_that_a_cancel_abandoned(
    nursery: trio.Nursery, users: pop3d.MemoryUsers, site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started, go_on = threading.Event(), threading.Event()
    delete = maildir._delete

    def slow_delete(*args: Any) -> None:
        started.set()
        go_on.wait(10)  # unlinking on a slow NFS server
        delete(*args)

    monkeypatch.setattr(maildir, "_delete", slow_delete)
    locks = LocalLocks()
    srv = await _host(nursery, users, locks)
    srv.configure(storage=pop3d.MaildirStorage(site / "mail"))
    with trio.fail_after(5):
        client, reply = await _login(srv)
        assert reply.startswith(b"+OK")
        assert (await client.command("DELE 1")).startswith(b"+OK")
        await client.send(b"QUIT\r\n")
        await trio.to_thread.run_sync(started.wait)
        [conn] = srv.conn_list()
        srv.close_connection(conn)  # the session ends; its deletion thread goes on
        await wait_until(lambda: not srv.conn_list())
        assert [held.mailbox for held in await locks.held()] == ["alice"]  # not another host's yet
        go_on.set()
        await wait_until(lambda: not locks._held)
    assert len(mail_files(site)) == 1
    await srv.destroy()


def test_without_a_lock_service_sessions_get_none() -> None:
    srv = pop3d.new()
    try:
        assert srv.mailbox_locks is None and srv._settings().mailbox_locks is None
        locks = LocalLocks()
        srv.mailbox_locks = locks
        assert srv._settings().mailbox_locks is locks  # a new lock service reaches new sessions
    finally:
        srv._finish()


# -- the etcd backend's lease, on a fake clock -------------------------------------


class FakeGateway:
    """Answers as etcd's gateway would, or not at all while ``down``."""

    current = "http://etcd.invalid:2379"

    def __init__(self, ttl: int) -> None:
        self.endpoints = [self.current]
        self.ttl = ttl
        self.down = False
        self.revision = 1
        self.keys: dict[str, tuple[int, int, str]] = {}  # key -> (create revision, lease, value)
        self.leases: set[int] = set()
        self.calls: list[tuple[float, str]] = []
        # Faults: the next take applied but its answer lost (the real gateway then tries the
        # next endpoint); etcd silent once it answered a renewal; answers by path, as given.
        self.lose_take_answer = False
        self.silent_after_renewal = False
        self.answers: dict[str, dict[str, Any]] = {}
        self.last_take: dict[str, Any] = {}
        self.last_answered = 0.0  # when the renewal answered before going silent was sent

    async def call(
        self, path: str, body: dict[str, Any], *, per_try: float, failed_tries: list[str] | None = None
    ) -> dict[str, Any]:
        self.calls.append((trio.current_time(), path))
        if self.down:
            await trio.sleep(per_try)
            raise EtcdUnavailable("no answer")
        await trio.sleep(0.01)
        if path in self.answers:
            return self.answers[path]
        if path == "/v3/kv/txn" and "request_put" in body["success"][0]:
            self.last_take = body
        if path == "/v3/kv/txn" and self.lose_take_answer:
            self.lose_take_answer = False
            await self._answer(path, body)  # applied; the answer never comes
            await trio.sleep(per_try)
            if failed_tries is not None:
                failed_tries.append(f"{self.current}: no answer within {per_try:g} s")
        answer = await self._answer(path, body)
        if path == "/v3/lease/keepalive" and self.silent_after_renewal:
            self.down, self.silent_after_renewal = True, False
            self.last_answered = self.calls[-1][0]
        return answer

    async def _answer(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        header = {"revision": str(self.revision)}
        if path == "/v3/lease/grant":
            lease = 100 + len(self.leases)
            self.leases.add(lease)
            return {"ID": str(lease), "TTL": str(self.ttl)}
        if path == "/v3/lease/keepalive":
            lease = int(body["ID"])
            return {"ID": str(lease), "TTL": str(self.ttl)} if lease in self.leases else {"ID": str(lease)}
        if path == "/v3/lease/revoke":
            lease = int(body["ID"])
            self.leases.discard(lease)
            self.keys = {k: v for k, v in self.keys.items() if v[1] != lease}
            return {"header": header}
        if path == "/v3/kv/range":
            key = unb64(body["key"]).decode()
            if key not in self.keys:
                return {"header": header}
            return {"header": header, "kvs": [self._kv(key)]}
        if path == "/v3/kv/txn":
            [compare] = body["compare"]
            key = unb64(compare["key"]).decode()
            current = self.keys.get(key)
            if compare["target"] == "CREATE":
                ok = (current[0] if current else 0) == int(compare["create_revision"])
            else:
                ok = current is not None and current[2] == unb64(compare["value"]).decode()
            if not ok:
                if "failure" in body and current is not None:
                    return {"header": header, "responses": [{"response_range": {"kvs": [self._kv(key)]}}]}
                return {"header": header}
            self.revision += 1
            for op in body["success"]:
                if "request_put" in op:
                    put = op["request_put"]
                    self.keys[key] = (self.revision, int(put["lease"]), unb64(put["value"]).decode())
                else:
                    self.keys.pop(key, None)
            return {"header": {"revision": str(self.revision)}, "succeeded": True}
        raise AssertionError(path)

    def _kv(self, key: str) -> dict[str, str]:
        create, lease, value = self.keys[key]
        return {"key": b64(key), "create_revision": str(create), "lease": str(lease), "value": b64(value)}

    async def aclose(self) -> None:
        pass


@pytest.fixture
async def fake_etcd(nursery: trio.Nursery) -> AsyncIterator[tuple[EtcdLocks, FakeGateway]]:
    locks = EtcdLocks(["http://etcd.invalid:2379"], ttl=6, instance="a")
    gateway = FakeGateway(6)
    locks._gateway = gateway  # type: ignore[assignment]
    await nursery.start(locks.run)
    yield locks, gateway


HOLDER = Holder(server="pop3", connection="conn1", client="192.0.2.7")


async def test_the_lease_is_renewed_every_third_of_the_ttl(
    fake_etcd: tuple[EtcdLocks, FakeGateway], autojump_clock: object
) -> None:
    locks, gateway = fake_etcd
    start = trio.current_time()
    await trio.sleep(20.5)
    renewals = [at - start for at, path in gateway.calls if path == "/v3/lease/keepalive"]
    assert len(renewals) == 10  # at 2, 4, ... 20 s
    assert all(abs(b - a - 6 * RENEW) < 0.1 for a, b in itertools.pairwise(renewals))
    assert locks.reachable


async def test_a_lease_not_renewed_is_given_up_before_it_can_expire(
    fake_etcd: tuple[EtcdLocks, FakeGateway], autojump_clock: object
) -> None:
    locks, gateway = fake_etcd
    lost: list[float] = []
    lock = await locks.acquire("alice", HOLDER, lambda: lost.append(trio.current_time()))
    assert lock is not None and lock.still_held() and await lock.confirm()
    value = json.loads(gateway.keys["/pop3d/locks/alice"][2])
    assert value["instance"] == "a" and value["connection"] == "conn1" and value["client"] == "192.0.2.7"
    last_renewal = max(at for at, path in gateway.calls if path == "/v3/lease/keepalive" or path.endswith("grant"))
    gateway.down = True
    await trio.sleep(6)
    assert len(lost) == 1
    # Given up GIVE_UP of the TTL after the last renewal was sent: before etcd could let the key go.
    assert lost[0] - last_renewal <= 6 * GIVE_UP + 0.01 < 6
    assert not lock.still_held() and not await lock.confirm()
    assert not locks.reachable
    with pytest.raises(LockServiceUnavailable):
        await locks.acquire("bob", HOLDER, lambda: None)
    # etcd is back: a new lease, the old one revoked (its key goes with it), new locks again.
    gateway.down = False
    await trio.sleep(2)
    assert locks.reachable
    assert "/pop3d/locks/alice" not in gateway.keys
    assert await locks.acquire("alice", HOLDER, lambda: None) is not None
    await lock.release()  # the old handle: nothing to do, and nothing taken from the new holder
    assert "/pop3d/locks/alice" in gateway.keys


async def test_a_release_etcd_did_not_get_is_done_once_it_answers(
    fake_etcd: tuple[EtcdLocks, FakeGateway], autojump_clock: object
) -> None:
    locks, gateway = fake_etcd
    lock = await locks.acquire("alice", HOLDER, lambda: None)
    assert lock is not None
    assert await locks.acquire("alice", HOLDER, lambda: None) is None  # held: [IN-USE]
    gateway.down = True
    await lock.release()
    gateway.down = False
    assert "/pop3d/locks/alice" in gateway.keys  # still there, on a lease that lives on
    await trio.sleep(6 * RENEW + 0.5)  # the next renewal cleans up
    assert "/pop3d/locks/alice" not in gateway.keys


async def test_etcd_saying_the_lease_is_gone_ends_its_sessions_at_once(
    fake_etcd: tuple[EtcdLocks, FakeGateway], autojump_clock: object
) -> None:
    locks, gateway = fake_etcd
    lost: list[float] = []
    lock = await locks.acquire("alice", HOLDER, lambda: lost.append(trio.current_time()))
    assert lock is not None
    gateway.leases.clear()  # revoked behind our back (etcdctl lease revoke)
    await trio.sleep(6 * RENEW + 0.1)
    assert lost and not lock.still_held()


ALICE = "/pop3d/locks/alice"


async def test_a_take_applied_by_a_try_whose_answer_was_lost_is_taken(
    fake_etcd: tuple[EtcdLocks, FakeGateway], autojump_clock: object
) -> None:
    locks, gateway = fake_etcd
    gateway.lose_take_answer = True  # applied by the first endpoint, sent again to the next
    lock = await locks.acquire("alice", HOLDER, lambda: None)
    assert lock is not None  # not [IN-USE] by itself
    assert lock.token == gateway.keys[ALICE][0] and await lock.confirm()
    await lock.release()
    assert ALICE not in gateway.keys


async def test_a_take_that_may_yet_be_applied_is_deleted_once_it_is(
    fake_etcd: tuple[EtcdLocks, FakeGateway], autojump_clock: object
) -> None:
    locks, gateway = fake_etcd
    gateway.keys[ALICE] = (1, 999, '{"instance":"b"}')  # held by another instance
    gateway.lose_take_answer = True
    assert await locks.acquire("alice", HOLDER, lambda: None) is None
    # The other instance lets go, and the first try, late, puts the key on our lease.
    del gateway.keys[ALICE]
    await gateway._answer("/v3/kv/txn", gateway.last_take)
    assert ALICE in gateway.keys
    await trio.sleep(6 * RENEW + 0.5)  # the next renewal cleans up
    assert ALICE not in gateway.keys


async def test_cleanups_do_not_hold_up_giving_the_lease_up(
    fake_etcd: tuple[EtcdLocks, FakeGateway], autojump_clock: object
) -> None:
    locks, gateway = fake_etcd
    lost: list[float] = []
    assert await locks.acquire("alice", HOLDER, lambda: lost.append(trio.current_time())) is not None
    others = [await locks.acquire(name, HOLDER, lambda: None) for name in ("bob", "carol", "dave")]
    gateway.down = True
    for lock in others:
        assert lock is not None
        with trio.move_on_after(0.1):
            await lock.release()  # etcd does not get them: deleted once it answers
    gateway.down = False
    gateway.silent_after_renewal = True  # the next renewal is answered, then nothing is
    await trio.sleep(12)
    assert len(lost) == 1
    assert lost[0] - gateway.last_answered <= 6 * GIVE_UP + 0.01


async def test_answers_that_make_no_sense_do_not_take_the_instance_down(
    fake_etcd: tuple[EtcdLocks, FakeGateway], autojump_clock: object
) -> None:
    locks, gateway = fake_etcd
    lost: list[float] = []
    assert await locks.acquire("alice", HOLDER, lambda: lost.append(trio.current_time())) is not None
    gateway.answers["/v3/kv/txn"] = {"succeeded": True}  # no header, no revision
    with pytest.raises(LockServiceUnavailable):
        await locks.acquire("bob", HOLDER, lambda: None)
    gateway.answers["/v3/lease/keepalive"] = {"TTL": "soon"}
    gateway.answers["/v3/lease/grant"] = {"TTL": "6"}  # no ID
    await trio.sleep(6)
    assert len(lost) == 1  # renewals that failed: given up in time
    assert not locks.reachable
    gateway.answers.clear()
    await trio.sleep(2)
    assert locks.reachable
    assert await locks.acquire("bob", HOLDER, lambda: None) is not None


async def test_a_gateway_answer_that_makes_no_sense_is_a_failed_try(nursery: trio.Nursery) -> None:
    async def answer(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        body = b'{"code":"soon","message":"?"}'
        await stream.send_all(b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await stream.aclose()

    [listener] = await nursery.start(functools.partial(trio.serve_tcp, answer, 0, host="127.0.0.1"))
    assert isinstance(listener, trio.SocketListener)
    gateway = EtcdGateway([f"http://127.0.0.1:{listener.socket.getsockname()[1]}"])
    with trio.fail_after(5), pytest.raises(EtcdUnavailable, match="bad answer"):
        await gateway.call("/v3/kv/range", {"key": b64("a")}, per_try=2)
    await gateway.aclose()


async def test_confirm_renews_the_lease_before_it_says_yes(
    fake_etcd: tuple[EtcdLocks, FakeGateway], autojump_clock: object
) -> None:
    locks, gateway = fake_etcd
    lock = await locks.acquire("alice", HOLDER, lambda: None)
    assert lock is not None
    await trio.sleep(1.5)
    renewals = sum(path == "/v3/lease/keepalive" for _, path in gateway.calls)
    asked = trio.current_time()
    assert await lock.confirm()
    assert sum(path == "/v3/lease/keepalive" for _, path in gateway.calls) == renewals + 1
    lease = locks._lease
    assert lease is not None and lease.give_up_at >= asked + 6 * GIVE_UP
    gateway.down = True
    assert not await lock.confirm()  # no renewal, no deletions


async def test_time_spent_suspended_counts_against_the_lease(
    fake_etcd: tuple[EtcdLocks, FakeGateway], autojump_clock: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    locks, _ = fake_etcd
    lock = await locks.acquire("alice", HOLDER, lambda: None)
    assert lock is not None and lock.still_held()
    # The machine slept 10 s: Trio's clock (CLOCK_MONOTONIC) did not move, the boot clock did.
    now = etcd_locks._boot_time()
    monkeypatch.setattr(etcd_locks, "_boot_time", lambda: now + 10)
    assert not lock.still_held()
    assert not locks.reachable


# -- /cluster/locks without a lock service -------------------------------------------


async def test_cluster_locks_lists_this_instances_sessions_without_a_lock_service(server: pop3d.Server) -> None:
    pytest.importorskip("quart_trio")
    from pop3d.admin import cluster
    from pop3d.admin.app import create_app

    app = create_app()
    with trio.fail_after(5):
        client = connect(server)
        await client.read_line()
        assert (await client.login("alice", "wonderland")).startswith(b"+OK")
        async with app.test_app() as test_app:
            response = await test_app.test_client().get("/cluster/locks")
            assert response.status_code == 200
            body = await response.get_json()
    assert body["backend"] == "local" and body["reachable"] is True
    [instance] = body["instances"]
    assert instance["instance"] == "test.example"  # the server's host name
    [lock] = instance["locks"]
    assert (lock["mailbox"], lock["server"], lock["client"], lock["token"]) == ("alice", server.name, "192.0.2.7", None)
    assert cluster.unreachable_lock_services(pop3d.servers()) == []
