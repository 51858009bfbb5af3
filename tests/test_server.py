"""The server object: sessions over memory streams, lifetimes, callbacks, failures."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence

import pytest
import trio
import trio.testing

import pop3d
from pop3d import replies
from pop3d.callbacks import MessageData

from .conftest import MESSAGES, SIZES, TEST_NET, TOTAL, connect, logged_in, wait_until
from .popclient import PopClient

# -- sessions ---------------------------------------------------------------


async def test_full_session(server: pop3d.Server, storage: pop3d.MemoryStorage) -> None:
    client = connect(server)
    greeting = await client.read_line()
    assert greeting.startswith(b"+OK ") and b"@test.example>" in greeting
    assert await client.login("alice", "wonderland") == replies.ok(replies.LOGGED_IN.format(count=3, octets=TOTAL))
    assert storage.is_locked("alice")
    assert await client.command("STAT") == b"+OK 3 %d\r\n" % TOTAL
    assert await client.command("LIST") == replies.ok(replies.LIST_ALL.format(count=3, octets=TOTAL))
    assert await client.read_multiline() == b"1 %d\r\n2 %d\r\n3 %d\r\n.\r\n" % tuple(SIZES)
    assert await client.command("RETR 2") == b"+OK %d octets\r\n" % SIZES[1]
    body = await client.read_multiline()
    assert body == b"From: carol@example.org\r\nSubject: two\r\n\r\n..starts with a dot\r\nsecond\r\n.\r\n"
    assert await client.command("DELE 1") == replies.ok(replies.DELE.format(msg=1))
    assert await client.command("QUIT") == replies.ok(replies.QUIT_UPDATE.format(count=2))
    assert await client.at_eof()
    assert storage.messages("alice") == MESSAGES[1:]
    await wait_until(lambda: not storage.is_locked("alice"))


async def test_sizes_are_exact_octets_received(server: pop3d.Server) -> None:
    client = await logged_in(server)
    for n in (1, 2, 3):
        size = int((await client.command(f"LIST {n}")).split()[2])
        retr = await client.command(f"RETR {n}")
        assert retr == f"+OK {size} octets\r\n".encode()
        wire = (await client.read_multiline())[:-3]
        unstuffed = b"".join(line[1:] if line.startswith(b".") else line for line in wire.splitlines(keepends=True))
        assert len(unstuffed) == size


async def test_pipelined_commands(server: pop3d.Server) -> None:
    client = connect(server)
    await client.read_line()
    await client.send(b"USER alice\r\nPASS wonderland\r\nSTAT\r\nUIDL 1\r\nNOOP\r\nQUIT\r\nSTAT\r\n")
    lines = [await client.read_line() for _ in range(6)]
    assert [line[:3] for line in lines] == [b"+OK"] * 6
    assert lines[2] == b"+OK 3 %d\r\n" % TOTAL
    assert lines[3].startswith(b"+OK 1 ")
    assert await client.at_eof()


async def test_uidl_stable_between_sessions(server: pop3d.Server) -> None:
    listings = []
    for _ in range(2):
        client = await logged_in(server)
        assert (await client.command("UIDL")).startswith(b"+OK")
        listings.append(await client.read_multiline())
        await client.command("QUIT")
    assert listings[0] == listings[1]
    assert len(listings[0].splitlines()) == 4


async def test_apop_login(server: pop3d.Server) -> None:
    client = connect(server)
    greeting = await client.read_line()
    challenge = greeting[greeting.index(b"<") : greeting.index(b">") + 1].decode()
    digest = pop3d.protocol.apop_digest(challenge, "wonderland")
    assert (await client.command(f"APOP alice {digest}")).startswith(b"+OK logged in")


async def test_second_session_gets_in_use(server: pop3d.Server) -> None:
    first = connect(server)
    await first.read_line()
    await first.login("alice", "wonderland")
    second = connect(server)
    await second.read_line()
    assert await second.login("alice", "wonderland") == replies.err(replies.MAILDROP_LOCKED)
    assert await second.command("STAT") == replies.err(replies.NOT_AUTHENTICATED)
    await first.command("QUIT")
    await first.at_eof()
    assert (await second.login("alice", "wonderland")).startswith(b"+OK")


async def test_no_auth_callback_refuses_everyone(server: pop3d.Server) -> None:
    server.configure(auth=None)
    client = connect(server)
    await client.read_line()
    assert await client.login("alice", "wonderland") == replies.err(replies.AUTH_FAILED)


async def test_no_storage_callback_means_empty_mailboxes(server: pop3d.Server) -> None:
    server.configure(storage=None)
    client = connect(server)
    await client.read_line()
    assert (await client.login("alice", "wonderland")).startswith(b"+OK")
    assert await client.command("STAT") == b"+OK 0 0\r\n"
    assert await client.command("RETR 1") == replies.err(replies.NO_SUCH_MESSAGE)
    assert await client.command("UIDL") == replies.ok(replies.UIDL_ALL)
    assert await client.read_multiline() == b".\r\n"
    assert await client.command("QUIT") == replies.ok(replies.QUIT_UPDATE.format(count=0))


async def test_idle_timeout(server: pop3d.Server, storage: pop3d.MemoryStorage, autojump_clock: object) -> None:
    client = await logged_in(server)
    await client.command("DELE 1")
    with trio.fail_after(601):
        assert await client.read_line() == replies.err(replies.IDLE_TIMEOUT)
        assert await client.at_eof()
    assert len(storage.messages("alice")) == 3
    await wait_until(lambda: not storage.is_locked("alice"))


async def test_idle_timeout_is_configurable(server: pop3d.Server, autojump_clock: object) -> None:
    server.configure(idle_timeout=30)
    client = connect(server)
    await client.read_line()
    start = trio.current_time()
    assert await client.read_line() == replies.err(replies.IDLE_TIMEOUT)
    assert 30 <= trio.current_time() - start < 31


# -- conn list / conn state -------------------------------------------------


async def test_conn_list_and_state(server: pop3d.Server) -> None:
    assert server.conn_list() == []
    client = connect(server, ("192.0.2.4", 51000))
    greeting = await client.read_line()
    [conn_id] = server.conn_list()
    state = server.conn_state(conn_id)
    assert state["state"] == "auth" and state["logon"] == "" and state["name"] == ""
    await client.login("alice", "wonderland")
    await client.command("DELE 3")
    await client.command("DELE 1")
    state = server.conn_state(conn_id)
    for key in ("remotehost", "remoteport", "server", "id", "state", "name", "logon", "storage", "deleted", "msg"):
        assert key in state
    assert state["remotehost"] == "192.0.2.4" and state["remoteport"] == 51000
    assert state["server"] == server.name
    assert state["id"].encode() in greeting
    assert (state["state"], state["name"], state["logon"], state["storage"]) == ("trans", "alice", "user", "alice")
    assert state["deleted"] == [1, 3]
    assert (state["msg"], state["size"]) == (3, TOTAL)
    assert state["started"] <= state["last_activity"]
    await client.command("QUIT")
    await client.at_eof()
    await wait_until(lambda: server.conn_list() == [])
    with pytest.raises(pop3d.UnknownConnection):
        server.conn_state(conn_id)


async def test_close_connection_applies_no_deletions(server: pop3d.Server, storage: pop3d.MemoryStorage) -> None:
    client = await logged_in(server)
    await client.command("DELE 1")
    [conn_id] = server.conn_list()
    server.close_connection(conn_id)
    assert await client.at_eof()
    await wait_until(lambda: not storage.is_locked("alice"))
    assert len(storage.messages("alice")) == 3


# -- failures inside one connection -----------------------------------------


class FailingStorage(pop3d.MemoryStorage):
    """Memory storage whose methods fail on demand."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.fail: set[str] = set()

    def _maybe_fail(self, name: str) -> None:
        if name in self.fail:
            raise OSError(f"{name} exploded")

    async def stat(self, mbox: str) -> int:
        self._maybe_fail("stat")
        return await super().stat(mbox)

    async def get(self, mbox: str, msg: int) -> MessageData:
        self._maybe_fail("get")
        data = await super().get(mbox, msg)
        if "get-midway" not in self.fail:
            return data
        assert isinstance(data, bytes)

        async def chunks() -> AsyncIterator[bytes]:
            yield data[:10]
            raise OSError("disk gone")

        return chunks()

    async def uidl(self, mbox: str, msg: int) -> str:
        self._maybe_fail("uidl")
        return await super().uidl(mbox, msg)

    async def dele(self, mbox: str, msgs: Sequence[int]) -> None:
        self._maybe_fail("dele")
        await super().dele(mbox, msgs)


@pytest.fixture
def failing() -> FailingStorage:
    return FailingStorage({"alice": MESSAGES, "bob": [b"x\n"]})


async def test_storage_errors_answer_sys_temp_and_session_goes_on(
    server: pop3d.Server, failing: FailingStorage
) -> None:
    server.configure(storage=failing)
    client = connect(server)
    await client.read_line()
    failing.fail = {"stat"}
    assert await client.login("alice", "wonderland") == replies.err(replies.SYS_TEMP)
    assert not failing.is_locked("alice")  # released at once, not at the end
    failing.fail = {"get", "uidl"}
    assert (await client.login("alice", "wonderland")).startswith(b"+OK")
    assert await client.command("RETR 1") == replies.err(replies.SYS_TEMP)
    assert await client.command("UIDL") == replies.err(replies.SYS_TEMP)
    assert await client.command("STAT") == b"+OK 3 %d\r\n" % TOTAL
    assert server.stats.errors == 3


async def test_failing_dele_at_quit(server: pop3d.Server, failing: FailingStorage) -> None:
    server.configure(storage=failing)
    failing.fail = {"dele"}
    client = await logged_in(server)
    await client.command("DELE 1")
    assert await client.command("QUIT") == replies.err(replies.SYS_TEMP_UPDATE)
    assert await client.at_eof()
    await wait_until(lambda: not failing.is_locked("alice"))
    assert len(failing.messages("alice")) == 3


async def test_storage_failing_mid_message_hangs_up(server: pop3d.Server, failing: FailingStorage) -> None:
    server.configure(storage=failing)
    failing.fail = {"get-midway"}
    client = await logged_in(server)
    await client.command("DELE 2")
    await client.send(b"RETR 1\r\n")
    assert await client.at_eof()
    # Whatever arrived, it is not a complete reply the client could take for the message.
    assert not bytes(client._buffer).endswith(b"\r\n.\r\n")
    await wait_until(lambda: not failing.is_locked("alice"))
    assert len(failing.messages("alice")) == 3


async def test_auth_callback_raising(server: pop3d.Server) -> None:
    class BrokenAuth:
        async def lookup(self, name: str) -> tuple[str, str] | None:
            raise RuntimeError("database down")

    server.configure(auth=BrokenAuth())
    client = connect(server)
    await client.read_line()
    assert await client.login("alice", "wonderland") == replies.err(replies.SYS_TEMP)
    assert await client.command("NOOP") == replies.err(replies.NOT_AUTHENTICATED)
    # Others are still served.
    other = connect(server)
    assert (await other.read_line()).startswith(b"+OK")


async def test_client_vanishing_mid_retr(server: pop3d.Server, storage: pop3d.MemoryStorage) -> None:
    storage.add("carol", b"Subject: big\n\n" + b"x" * 100 + b"\n" * 50_000 + b"y" * 5_000_000)
    storage.add("carol", b"Subject: small\n\nsmall\n")
    server.configure(auth=pop3d.MemoryUsers({"carol": ("pw", "carol")}))
    client = await logged_in(server, "carol", "pw")
    await client.command("DELE 2")
    assert (await client.command("RETR 1")).startswith(b"+OK")
    await client.stream.receive_some(1000)
    await client.stream.aclose()
    await wait_until(lambda: not storage.is_locked("carol"))
    assert len(storage.messages("carol")) == 2
    await wait_until(lambda: server.conn_list() == [])


async def test_client_closing_without_quit(server: pop3d.Server, storage: pop3d.MemoryStorage) -> None:
    client = await logged_in(server)
    await client.command("DELE 1")
    await client.stream.aclose()
    await wait_until(lambda: not storage.is_locked("alice"))
    assert len(storage.messages("alice")) == 3


async def test_passwords_never_logged(
    server: pop3d.Server, caplog: pytest.LogCaptureFixture, autojump_clock: object
) -> None:
    caplog.set_level(logging.DEBUG, logger="pop3d")
    client = connect(server)
    await client.read_line()
    await client.login("alice", "not-the-password")
    await client.login("alice", "wonderland")
    await client.command("QUIT")
    await client.at_eof()
    await wait_until(lambda: server.conn_list() == [])
    text = caplog.text
    assert "login failed" in text and "alice" in text
    assert "not-the-password" not in text and "wonderland" not in text


# -- sync callbacks -----------------------------------------------------------


class SyncUsers:
    def lookup(self, name: str) -> tuple[str, str] | None:
        return ("pw", name) if name == "erin" else None


class SyncBoxes:
    """Plain methods; ``get`` is a generator of chunks."""

    def __init__(self) -> None:
        self.messages = [b"Subject: a\n\none\n", b"Subject: b\n\ntwo\n"]
        self.locked = False

    def lock(self, mbox: str) -> bool:
        self.locked = True
        return True

    def unlock(self, mbox: str) -> None:
        self.locked = False

    def stat(self, mbox: str) -> int:
        return len(self.messages)

    def size(self, mbox: str, msg: int | None = None) -> int:
        return sum(map(pop3d.message.canonical_size, self.messages if msg is None else [self.messages[msg - 1]]))

    def get(self, mbox: str, msg: int) -> object:
        data = self.messages[msg - 1]
        return (data[i : i + 3] for i in range(0, len(data), 3))

    def dele(self, mbox: str, msgs: list[int]) -> None:
        self.messages = [m for n, m in enumerate(self.messages, 1) if n not in msgs]

    def uidl(self, mbox: str, msg: int) -> str:
        return f"u{msg}"


async def test_sync_callbacks(server: pop3d.Server) -> None:
    boxes = SyncBoxes()
    server.configure(auth=pop3d.sync_auth(SyncUsers()), storage=pop3d.sync_storage(boxes))
    client = connect(server)
    await client.read_line()
    assert (await client.login("erin", "pw")).startswith(b"+OK logged in, 2 messages")
    assert await client.command("RETR 2") == b"+OK 19 octets\r\n"
    assert await client.read_multiline() == b"Subject: b\r\n\r\ntwo\r\n.\r\n"
    assert await client.command("UIDL 2") == b"+OK 2 u2\r\n"
    await client.command("DELE 1")
    await client.command("QUIT")
    await client.at_eof()
    await wait_until(lambda: not boxes.locked)
    assert boxes.messages == [b"Subject: b\n\ntwo\n"]


# -- the server object ----------------------------------------------------------


async def test_new_names() -> None:
    first, second = pop3d.new(), pop3d.new()
    try:
        assert first.name.startswith("pop3d") and second.name.startswith("pop3d")
        assert first.name != second.name
        assert pop3d.servers()[first.name] is first
        with pytest.raises(pop3d.NameTaken):
            pop3d.new(first.name)
        named = pop3d.new("mine")
        assert pop3d.get("mine") is named
        await named.destroy()
        assert "mine" not in pop3d.servers()
    finally:
        await first.destroy()
        await second.destroy()


async def test_configure_and_cget() -> None:
    server = pop3d.new()
    try:
        options = server.configure()
        assert options is not None
        assert options["port"] == 110 and options["state"] == "down" and options["auth"] is None
        assert options["idle_timeout"] == 600
        assert server.configure(port=2110, idle_timeout=60) is None
        assert server.cget("port") == 2110
        with pytest.raises(pop3d.OptionError) as info:
            server.configure(port=70000, idle_timeout=5, nonsense=1)
        assert {name for name, _ in info.value.errors} == {"port", "nonsense"}
        assert server.cget("idle_timeout") == 60  # nothing half-applied
        with pytest.raises(pop3d.OptionError):
            server.configure(state="up")
        with pytest.raises(pop3d.OptionError):
            server.configure(auth="not a callback")
        with pytest.raises(pop3d.OptionError):
            server.cget("nonsense")
    finally:
        await server.destroy()


async def test_up_before_run_is_an_error() -> None:
    server = pop3d.new()
    try:
        with pytest.raises(pop3d.StateError):
            await server.up()
    finally:
        await server.destroy()


async def test_port_zero_and_up_down_up(server: pop3d.Server) -> None:
    assert server.cget("port") == 0
    await server.up()
    port = server.cget("port")
    assert port != 0 and server.state == "up"
    await server.up()  # up while up: nothing
    assert server.cget("port") == port
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    client = PopClient(stream)
    assert (await client.read_line()).startswith(b"+OK")
    await server.down()
    assert server.cget("port") == 0 and server.state == "down"
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)
    # down closes only the listener: the open connection carries on.
    assert (await client.login("alice", "wonderland")).startswith(b"+OK")
    await server.down()  # down while down: nothing
    await server.up()
    assert server.cget("port") not in (0, None)
    again = PopClient(await trio.open_tcp_stream("127.0.0.1", server.cget("port")))
    assert (await again.read_line()).startswith(b"+OK")
    await client.command("QUIT")
    await again.command("QUIT")


async def test_port_change_while_up_waits_for_down_up(server: pop3d.Server) -> None:
    await server.up()
    bound = server.cget("port")
    server.configure(port=0, host="127.0.0.1")
    assert server.cget("port") == bound
    await server.down()
    await server.up()
    assert server.cget("port") != bound


async def test_up_on_a_taken_port(server: pop3d.Server) -> None:
    await server.up()
    other = pop3d.new()
    other.configure(host="127.0.0.1", port=server.cget("port"))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(other.run)
            with pytest.raises(pop3d.StateError, match="cannot listen"):
                await other.up()
            assert other.state == "down"
            await other.destroy()
    finally:
        await other.destroy()


async def test_destroy_kill_with_client_connected(users: pop3d.MemoryUsers, storage: pop3d.MemoryStorage) -> None:
    server = pop3d.new()
    server.configure(host="127.0.0.1", port=0, auth=users, storage=storage)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            await server.up()
            client = PopClient(await trio.open_tcp_stream("127.0.0.1", server.cget("port")))
            await client.read_line()
            await client.login("alice", "wonderland")
            await client.command("DELE 1")
            assert storage.is_locked("alice")
            await server.destroy("kill")
            assert await client.at_eof()
    assert not storage.is_locked("alice")
    assert len(storage.messages("alice")) == 3
    assert server.destroyed and server.name not in pop3d.servers()
    with pytest.raises(pop3d.StateError):
        server.configure(port=1)


async def test_destroy_defer_lets_the_client_finish(users: pop3d.MemoryUsers, storage: pop3d.MemoryStorage) -> None:
    server = pop3d.new()
    server.configure(host="127.0.0.1", port=0, auth=users, storage=storage)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            await server.up()
            port = server.cget("port")
            client = PopClient(await trio.open_tcp_stream("127.0.0.1", port))
            await client.read_line()
            await client.login("alice", "wonderland")
            done = trio.Event()

            async def destroy_deferred() -> None:
                await server.destroy("defer")
                done.set()

            nursery.start_soon(destroy_deferred)
            await wait_until(lambda: server.state == "exiting")
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", port)  # not listening any more
            with pytest.raises(pop3d.StateError):
                await server.up()
            assert not done.is_set()
            await client.command("DELE 1")
            assert await client.command("QUIT") == replies.ok(replies.QUIT_UPDATE.format(count=2))
            await done.wait()
    assert storage.messages("alice") == MESSAGES[1:]
    assert not storage.is_locked("alice")
    assert server.name not in pop3d.servers()


async def test_kill_during_deferred_destroy(users: pop3d.MemoryUsers, storage: pop3d.MemoryStorage) -> None:
    server = pop3d.new()
    server.configure(auth=users, storage=storage, cleartext_auth_from=TEST_NET)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            client = await logged_in(server)
            await client.command("DELE 1")
            nursery.start_soon(server.destroy, "defer")
            await wait_until(lambda: server.state == "exiting")
            await server.destroy("kill")
            assert await client.at_eof()
    assert not storage.is_locked("alice")
    assert len(storage.messages("alice")) == 3


async def test_destroy_defer_without_connections_is_immediate() -> None:
    server = pop3d.new()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            await server.destroy("defer")
    assert server.destroyed


async def test_destroy_bad_mode(server: pop3d.Server) -> None:
    with pytest.raises(ValueError):
        await server.destroy("later")  # type: ignore[arg-type]


async def test_cancelling_run_is_a_kill(users: pop3d.MemoryUsers, storage: pop3d.MemoryStorage) -> None:
    server = pop3d.new()
    server.configure(auth=users, storage=storage, cleartext_auth_from=TEST_NET)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            await logged_in(server)
            assert storage.is_locked("alice")
            nursery.cancel_scope.cancel()
    assert not storage.is_locked("alice")
    assert server.destroyed and server.name not in pop3d.servers()


async def test_one_failing_connection_does_not_stop_the_others(
    server: pop3d.Server, storage: pop3d.MemoryStorage
) -> None:
    class Exploding(pop3d.MemoryUsers):
        async def lookup(self, name: str) -> tuple[str, str] | None:
            if name == "boom":
                raise MemoryError("out of something")  # not an OSError: still contained
            return await super().lookup(name)

    server.configure(auth=Exploding({"alice": ("wonderland", "alice")}))
    bad = connect(server)
    good = connect(server)
    await bad.read_line()
    await good.read_line()
    assert await bad.login("boom", "x") == replies.err(replies.SYS_TEMP)
    assert (await good.login("alice", "wonderland")).startswith(b"+OK")
    assert await good.command("STAT") == b"+OK 3 %d\r\n" % TOTAL


async def test_stats_count_what_happened(server: pop3d.Server, autojump_clock: object) -> None:
    client = connect(server)
    await client.read_line()
    assert (await client.login("alice", "nope")).startswith(b"-ERR")
    await client.login("alice", "wonderland")
    await client.command("RETR 1")
    await client.read_multiline()
    await client.command("DELE 1")
    await client.command("QUIT")
    await client.at_eof()
    stats = server.stats
    assert (stats.sessions, stats.logins_ok, stats.logins_failed) == (1, 1, 1)
    assert (stats.messages_retrieved, stats.bytes_retrieved, stats.messages_deleted) == (1, SIZES[0], 1)
    assert stats.commands["USER"] == 2 and stats.commands["RETR"] == 1 and stats.commands["QUIT"] == 1


async def test_start_destroy_defer_returns_once_exiting(users: pop3d.MemoryUsers, storage: pop3d.MemoryStorage) -> None:
    server = pop3d.new()
    server.configure(auth=users, storage=storage, cleartext_auth_from=TEST_NET)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            client = connect(server)
            await client.read_line()
            [conn_id] = server.conn_list()
            session = server.session(conn_id)
            await nursery.start(server.destroy, "defer")
            assert server.state == "exiting" and not server.destroyed
            await client.command("QUIT")
            await session.finished.wait()
    assert server.destroyed


# -- limits and hostile clients --------------------------------------------------


def connect_lockstep(server: pop3d.Server, peer: tuple[str, int] = ("192.0.2.9", 40111)) -> PopClient:
    """A client whose end does not buffer: the server's sends wait until it reads."""
    client_end, server_end = trio.testing.lockstep_stream_pair()
    server.connect(server_end, peer)
    return PopClient(client_end)


async def test_kick_with_reason_of_a_client_that_does_not_read(
    server: pop3d.Server, storage: pop3d.MemoryStorage, autojump_clock: object
) -> None:
    storage.add("carol", b"Subject: big\n\n" + b"line\n" * 200_000)
    server.configure(auth=pop3d.MemoryUsers({"carol": ("pw", "carol")}))
    client = connect_lockstep(server)
    await client.read_line()
    await client.login("carol", "pw")
    await client.send(b"RETR 1\r\n")  # and never read the reply
    [conn_id] = server.conn_list()
    session = server.session(conn_id)
    await trio.sleep(1)
    server.close_connection(conn_id, "maintenance")
    with trio.fail_after(60):
        await session.finished.wait()
    assert not storage.is_locked("carol")


class ChunkedStorage(pop3d.MemoryStorage):
    """Memory storage that hands out messages in 4 KiB chunks, like a file."""

    async def get(self, mbox: str, msg: int) -> MessageData:
        data = await super().get(mbox, msg)
        assert isinstance(data, bytes)

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(data), 4096):
                yield data[start : start + 4096]

        return chunks()


async def test_kick_inside_a_message_sends_no_error_line(server: pop3d.Server) -> None:
    storage = ChunkedStorage({"carol": [b"Subject: big\n\n" + b"line\n" * 200_000]})
    server.configure(auth=pop3d.MemoryUsers({"carol": ("pw", "carol")}), storage=storage)
    client = connect_lockstep(server)
    await client.read_line()
    await client.login("carol", "pw")
    await client.send(b"RETR 1\r\n")
    received = await client.stream.receive_some(1000)
    [conn_id] = server.conn_list()
    server.close_connection(conn_id, "maintenance")
    assert await client.at_eof()
    received += bytes(client._buffer)
    assert b"maintenance" not in received
    assert not received.endswith(b"\r\n.\r\n")


async def test_kick_between_replies_sends_the_reason(server: pop3d.Server) -> None:
    client = connect(server)
    await client.read_line()
    [conn_id] = server.conn_list()
    server.close_connection(conn_id, "maintenance")
    assert await client.read_line() == replies.err("maintenance")
    assert await client.at_eof()


async def test_connection_limits(server: pop3d.Server) -> None:
    server.configure(max_connections=2, max_connections_per_ip=1)
    first = connect(server, ("198.51.100.1", 1))
    assert (await first.read_line()).startswith(b"+OK")
    same_address = connect(server, ("198.51.100.1", 2))
    assert await same_address.read_line() == replies.err(replies.TOO_MANY_FROM_ADDRESS)
    assert await same_address.at_eof()
    second = connect(server, ("198.51.100.2", 1))
    assert (await second.read_line()).startswith(b"+OK")
    # Full: the oldest connection that has not logged in makes room.
    third = connect(server, ("198.51.100.3", 1))
    assert (await third.read_line()).startswith(b"+OK")
    assert await first.read_line() == replies.err(replies.TOO_MANY_CONNECTIONS)
    assert await first.at_eof()
    await wait_until(lambda: len(server.conn_list()) == 2)
    again = connect(server, ("198.51.100.1", 3))
    assert (await again.read_line()).startswith(b"+OK")
    assert server.stats.evicted == 2 and server.stats.refused == 1


async def test_failed_logins_take_the_same_time(server: pop3d.Server, autojump_clock: object) -> None:
    server.configure(login_failure_delay=2, penalties=None)  # penalties have tests of their own
    client = connect(server)
    await client.read_line()
    for user in ("alice", "nobody"):
        start = trio.current_time()
        assert await client.login(user, "wrong") == replies.err(replies.AUTH_FAILED)
        assert trio.current_time() - start == pytest.approx(2)
    start = trio.current_time()
    assert (await client.login("alice", "wonderland")).startswith(b"+OK")
    assert trio.current_time() - start < 0.1


async def test_flood_of_pipelined_commands_is_answered_in_bounded_batches(server: pop3d.Server) -> None:
    client = connect_lockstep(server)
    await client.read_line()
    await client.login("alice", "wonderland")
    session = server.session(server.conn_list()[0])
    flood = b"LIST\r\n" * 2000

    async def send_flood() -> None:
        await client.stream.send_all(flood)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_flood)
        replies_seen = 0
        while replies_seen < 2000:
            line = await client.read_line()
            assert line.startswith(b"+OK 3 messages")
            await client.read_multiline()
            replies_seen += 1
            # The engine never holds more than about one batch of replies.
            assert len(session.protocol._outgoing) <= pop3d.protocol.OUTGOING_LIMIT
