"""Mailbox locks in a real etcd: two instances on one Maildir tree, leases that stop, a holder killed.

The test starts Debian's etcd itself (``/usr/bin/etcd``, package
``etcd-server``; skipped with a reason where it is missing) on free
loopback ports with a temporary data directory, and kills it at the end.
Each test uses a key prefix of its own.  TTLs are 2-3 s, so that each test
takes a few seconds; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import poplib
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

import pop3d
from pop3d import replies
from pop3d.etcd import EtcdGateway, b64
from pop3d.etcd_locks import GIVE_UP, EtcdLocks
from pop3d.mailbox_locks import Holder, LockServiceUnavailable

from .etcd_server import ETCD, SKIP_REASON, Etcd, running_etcd
from .popclient import PopClient
from .ports import free_port
from .serve_process import ServeProcess, mail_files, pop3d_cli, serve_args

pytestmark = pytest.mark.skipif(ETCD is None, reason=SKIP_REASON)

TTL = 2.0
_prefixes = itertools.count(1)


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etcd]:
    with running_etcd(tmp_path_factory.mktemp("etcd")) as server:
        yield server


def _prefix() -> str:
    return f"/pop3d-test/{os.getpid()}/{next(_prefixes)}"


@pytest.fixture
async def locks(etcd: Etcd, nursery: trio.Nursery) -> AsyncIterator[EtcdLocks]:
    service = EtcdLocks([etcd.url], ttl=TTL, prefix=_prefix(), instance="one")
    await nursery.start(service.run)
    yield service
    etcd.cont()


async def _maildir_server(nursery: trio.Nursery, site: Path, locks: EtcdLocks) -> pop3d.Server:
    srv = pop3d.new()
    srv.configure(
        host="127.0.0.1",
        port=0,
        auth=pop3d.PasswdFile(site / "users"),
        storage=pop3d.MaildirStorage(site / "mail"),
        login_failure_delay=0,
        penalties=None,
    )
    srv.mailbox_locks = locks
    await nursery.start(srv.run)
    await srv.up()
    return srv


async def _client(srv: pop3d.Server) -> PopClient:
    stream = await trio.open_tcp_stream("127.0.0.1", srv.cget("port"))
    client = PopClient(stream)
    assert (await client.read_line()).startswith(b"+OK")
    return client


def _err(text: str) -> bytes:
    return b"-ERR " + text.encode() + b"\r\n"


# -- two instances -------------------------------------------------------------


def _pop(port: int) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", port, timeout=10)
    client.user("alice")
    return client


def test_two_instances_on_one_maildir_tree_lock_each_other_out(etcd: Etcd, site: Path) -> None:
    prefix = _prefix()
    flags = ("--no-admin", "--lock", "etcd", "--etcd", etcd.url, "--lock-ttl", "3", "--lock-prefix", prefix)
    with (
        ServeProcess(*serve_args(site, *flags, "--instance-name", "one")) as one,
        ServeProcess(*serve_args(site, *flags, "--instance-name", "two")) as two,
    ):
        one.wait_ready()
        two.wait_ready()
        first = _pop(one.port)
        assert first.pass_("wonderland").startswith(b"+OK")
        second = _pop(two.port)
        with pytest.raises(poplib.error_proto) as refused:
            second.pass_("wonderland")
        assert refused.value.args[0] == _err(replies.MAILDROP_LOCKED)[:-2]
        second.close()
        first.dele(1)
        assert first.quit().startswith(b"+OK")
        assert len(mail_files(site)) == 1
        third = _pop(two.port)
        assert third.pass_("wonderland").startswith(b"+OK")
        assert third.stat()[0] == 1
        assert third.quit().startswith(b"+OK")
    one.wait_for(r"locks in etcd at .* instance one")


def test_a_holder_killed_frees_its_lock_within_the_ttl_and_loses_no_mail(etcd: Etcd, site: Path) -> None:
    prefix = _prefix()
    flags = ("--no-admin", "--lock", "etcd", "--etcd", etcd.url, "--lock-ttl", "3", "--lock-prefix", prefix)
    before = mail_files(site)
    with (
        ServeProcess(*serve_args(site, *flags, "--instance-name", "one")) as one,
        ServeProcess(*serve_args(site, *flags, "--instance-name", "two")) as two,
    ):
        one.wait_ready()
        two.wait_ready()
        holder = _pop(one.port)
        assert holder.pass_("wonderland").startswith(b"+OK")
        holder.dele(1)
        holder.dele(2)
        one.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        one.proc.wait(10)
        holder.close()
        while True:
            client = _pop(two.port)
            try:
                client.pass_("wonderland")
                break
            except poplib.error_proto as exc:
                assert b"[IN-USE]" in exc.args[0]
                client.close()
                assert time.monotonic() - killed < 3 + 1, "the lock outlived its lease"
                time.sleep(0.1)
        assert time.monotonic() - killed > 0.5  # it was held by the dead instance's lease until then
        assert client.stat()[0] == 2
        assert client.quit().startswith(b"+OK")
    assert mail_files(site) == before


def test_an_unreachable_etcd_is_a_one_line_error_at_start(site: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    result = pop3d_cli("serve", *serve_args(site, "--no-admin", "--lock", "etcd", "--etcd", dead))
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()[-1:]
    assert line == f"pop3d: error: lock: cannot reach etcd at {dead}: connection refused"


# -- leases that cannot be renewed, and keys taken over -------------------------


async def test_a_session_whose_lease_cannot_be_renewed_ends_before_the_ttl(
    etcd: Etcd, locks: EtcdLocks, site: Path, nursery: trio.Nursery
) -> None:
    srv = await _maildir_server(nursery, site, locks)
    before = mail_files(site)
    with trio.fail_after(10):
        client = await _client(srv)
        assert (await client.login("alice", "wonderland")).startswith(b"+OK")
        assert (await client.command("DELE 1")).startswith(b"+OK")
        assert locks.reachable
        etcd.stop()
        stopped = trio.current_time()
        assert await client.read_line() == _err(replies.LOCK_LOST)
        # At most GIVE_UP of the TTL after the last renewal, which came before etcd stopped.
        assert trio.current_time() - stopped <= TTL * GIVE_UP + 0.2 < TTL
        assert await client.at_eof()
        assert not locks.reachable
        # Meanwhile logins are refused with [SYS/TEMP], not let in without a lock.
        late = await _client(srv)
        assert await late.login("alice", "wonderland") == _err(replies.SYS_TEMP)
        etcd.cont()
        while not locks.reachable:  # noqa: ASYNC110 - the lease is granted again by the service's own task
            await trio.sleep(0.05)
        assert (await late.login("alice", "wonderland")).startswith(b"+OK")
        assert (await late.command("QUIT")).startswith(b"+OK")
    assert mail_files(site) == before
    await srv.destroy()


async def test_deletions_are_fenced_off_once_another_holder_took_the_key(
    etcd: Etcd, locks: EtcdLocks, site: Path, nursery: trio.Nursery
) -> None:
    srv = await _maildir_server(nursery, site, locks)
    before = mail_files(site)
    with trio.fail_after(10):
        client = await _client(srv)
        assert (await client.login("alice", "wonderland")).startswith(b"+OK")
        assert (await client.command("DELE 1")).startswith(b"+OK")
        # Someone deletes the key (an operator, a bug) and another instance takes the mailbox.
        gateway = EtcdGateway([etcd.url])
        await gateway.call("/v3/kv/deleterange", {"key": b64(locks.key_of("alice"))}, per_try=2)
        await gateway.aclose()
        intruder = EtcdLocks([etcd.url], ttl=TTL, prefix=locks.prefix, instance="two")
        async with trio.open_nursery() as inner:
            await inner.start(intruder.run)
            taken = await intruder.acquire("alice", Holder(server="pop3", connection="conn9", client="::1"), print)
            assert taken is not None
            assert await client.command("QUIT") == _err(replies.LOCK_LOST)
            assert await client.at_eof()
            [held] = await locks.held()
            assert (held.instance, held.token) == ("two", taken.token)
            await taken.release()
            inner.cancel_scope.cancel()
    assert mail_files(site) == before
    assert await locks.held() == []
    await srv.destroy()


async def test_the_locks_are_listed_by_instance_and_the_service_fails_over(
    etcd: Etcd, site: Path, nursery: trio.Nursery
) -> None:
    # The first endpoint is dead: every call goes on to the second.
    dead = f"http://127.0.0.1:{free_port()}"
    service = EtcdLocks([dead, etcd.url], ttl=TTL, prefix=_prefix(), instance="one")
    await nursery.start(service.run)
    srv = await _maildir_server(nursery, site, service)
    with trio.fail_after(10):
        client = await _client(srv)
        assert (await client.login("alice", "wonderland")).startswith(b"+OK")
        [held] = await service.held()
        assert (held.mailbox, held.instance, held.server, held.client) == ("alice", "one", srv.name, "127.0.0.1")
        assert held.token > 0
        assert (await client.command("QUIT")).startswith(b"+OK")
        while await service.held():  # noqa: ASYNC110 - released by the session as it ends
            await trio.sleep(0.02)
    await srv.destroy()


async def test_the_admin_api_lists_cluster_locks_and_says_when_etcd_is_away(
    etcd: Etcd, locks: EtcdLocks, site: Path, nursery: trio.Nursery
) -> None:
    pytest.importorskip("quart_trio")
    from pop3d.admin import cluster
    from pop3d.admin.app import create_app

    app = create_app()
    srv = await _maildir_server(nursery, site, locks)
    with trio.fail_after(10):
        client = await _client(srv)
        assert (await client.login("alice", "wonderland")).startswith(b"+OK")
        async with app.test_app() as test_app:
            http = test_app.test_client()
            response = await http.get("/cluster/locks")
            assert response.status_code == 200
            body = await response.get_json()
            assert body["backend"] == "etcd" and body["reachable"] is True
            [instance] = body["instances"]
            assert instance["instance"] == "one"
            [lock] = instance["locks"]
            assert (lock["mailbox"], lock["server"], lock["client"]) == ("alice", srv.name, "127.0.0.1")
            assert cluster.unreachable_lock_services(pop3d.servers()) == []
            assert (await http.get("/readyz")).status_code == 200
            etcd.stop()
            response = await http.get("/cluster/locks")
            assert response.status_code == 503
            assert (await response.get_json())["reachable"] is False
            assert cluster.unreachable_lock_services(pop3d.servers()) == [srv.name]
            # Not ready while the lock service is away: a load balancer sends logins elsewhere.
            ready = await http.get("/readyz")
            assert ready.status_code == 503
            assert (await ready.get_json())["lock_service_unreachable"] == [srv.name]
            etcd.cont()
    await srv.destroy()


async def _slow_proxy(nursery: trio.Nursery, target: str, delay: float) -> str:
    """A TCP proxy to ``target`` (http://host:port) whose first connection's answers come ``delay`` late."""
    host, port = target.removeprefix("http://").rsplit(":", 1)
    connections = itertools.count()

    async def forward(source: trio.abc.Stream, sink: trio.abc.Stream, late: float) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async for data in source:
                await trio.sleep(late)
                await sink.send_all(data)

    async def serve(client: trio.SocketStream) -> None:
        late = delay if next(connections) == 0 else 0
        async with client, await trio.open_tcp_stream(host, int(port)) as upstream, trio.open_nursery() as inner:
            inner.start_soon(forward, client, upstream, 0)
            await forward(upstream, client, late)
            inner.cancel_scope.cancel()

    [listener] = await nursery.start(functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    assert isinstance(listener, trio.SocketListener)
    return f"http://127.0.0.1:{listener.socket.getsockname()[1]}"


async def test_a_take_applied_by_a_try_that_timed_out_is_taken(etcd: Etcd, nursery: trio.Nursery) -> None:
    service = EtcdLocks([etcd.url], ttl=6, prefix=_prefix(), instance="one")
    await nursery.start(service.run)
    # Takes go first through a proxy that answers 3 s late (the TTL's third is 2 s): applied, and tried again.
    await service._gateway.aclose()
    service._gateway = EtcdGateway([await _slow_proxy(nursery, etcd.url, 3), etcd.url])
    with trio.fail_after(10):
        lock = await service.acquire("alice", Holder(server="s", connection="c", client="a"), print)
        assert lock is not None  # not [IN-USE] by itself
        [held] = await service.held()
        assert held.token == lock.token
        await lock.release()
        assert await service.held() == []


async def test_a_lock_cannot_be_taken_without_a_lease(etcd: Etcd) -> None:
    service = EtcdLocks([etcd.url], ttl=TTL, prefix=_prefix(), instance="one")
    with pytest.raises(LockServiceUnavailable):  # not started: no lease yet
        await service.acquire("alice", Holder(server="s", connection="c", client="a"), print)
