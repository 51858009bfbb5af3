"""Abuse resistance: guessing penalties, floods, NAT, the PROXY protocol, kills.

Every attack here has a bounded regression test: clients are memory streams
(``connect``), counts are bounded, delays run on ``autojump_clock`` where
the test waits for them, and every wait has a ``fail_after``.
"""

from __future__ import annotations

import ipaddress
import logging
import struct
import threading

import pytest
import trio
import trio.testing

import pop3d
from pop3d import replies
from pop3d.penalties import Penalty, PenaltyBox, address_key

from .certs import Certs
from .conftest import TEST_NET, connect, wait_until
from .popclient import PopClient

ATTACKER = ("192.0.2.66", 40000)
OTHER = ("192.0.2.8", 40001)


# -- the penalty box on its own -------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_penalty_grows_2_4_8_then_caps() -> None:
    box = PenaltyBox(clock=FakeClock())
    delays = []
    for _ in range(6):
        delays.append(box.delay("198.51.100.66", ""))
        box.failed("198.51.100.66", "")
    assert delays == [0, 2, 4, 8, 15, 15]
    assert box.delay("198.51.100.67", "") == 0  # another address


def test_penalty_decays_after_a_quiet_hour_and_success_clears_it() -> None:
    clock = FakeClock()
    box = PenaltyBox(clock=clock)
    for _ in range(3):
        box.failed("198.51.100.66", "alice")
    clock.now += 3599
    assert box.delay("198.51.100.66", "") == 8
    clock.now += 1
    assert box.delay("198.51.100.66", "") == 0 and box.delay("", "alice") == 0
    box.failed("198.51.100.66", "alice")
    box.succeeded("198.51.100.66", "alice")
    assert box.delay("198.51.100.66", "alice") == 0 and len(box) == 0


def test_ipv6_clients_share_their_64() -> None:
    box = PenaltyBox(clock=FakeClock())
    box.failed("2001:db8:1:2::1", "")
    assert box.delay("2001:db8:1:2:ffff::9", "") == 2
    assert box.delay("2001:db8:1:3::1", "") == 0
    assert address_key("::ffff:198.51.100.66") == "198.51.100.66"
    assert address_key("") is None
    assert box.clear("address", "2001:db8:1:2::abcd") and len(box) == 0


def test_per_user_penalty_catches_a_distributed_guess() -> None:
    box = PenaltyBox(clock=FakeClock())
    for n in range(4):
        box.failed(f"198.51.100.{n}", "alice")
    assert box.delay("203.0.113.1", "alice") == 15
    assert box.delay("203.0.113.1", "bob") == 0


def test_penalty_table_is_bounded_and_listed_worst_first() -> None:
    box = PenaltyBox(clock=FakeClock(), max_entries=100)
    for n in range(1000):
        box.failed(str(ipaddress.IPv4Address("10.0.0.0") + n), "")
    assert len(box) == 100
    box.failed("10.0.3.231", "")
    worst = box.entries()[0]
    assert worst == Penalty(kind="address", key="10.0.3.231", failures=2, delay=4, last_failure=worst.last_failure)


# -- penalties in the server ---------------------------------------------------


async def try_login(client: PopClient, user: str, password: str) -> tuple[bytes, float]:
    started = trio.current_time()
    reply = await client.login(user, password)
    return reply, trio.current_time() - started


async def test_guessing_from_one_address_slows_down_and_others_get_in(
    server: pop3d.Server, autojump_clock: object
) -> None:
    server.configure(login_failure_delay=1, max_auth_failures=10)
    attacker = connect(server, ATTACKER)
    await attacker.read_line()
    waits = []
    for _ in range(5):
        reply, waited = await try_login(attacker, "alice", "guess")
        assert reply == replies.err(replies.AUTH_FAILED)
        waits.append(waited)
    assert waits == pytest.approx([1, 2, 4, 8, 15])  # the fourth wrong password waited 8 s
    # Right or wrong, the next answer waits: its speed must not give a right guess away.
    reply, waited = await try_login(attacker, "alice", "wonderland")
    assert reply.startswith(b"+OK") and waited == pytest.approx(15)
    penalties = server.cget("penalties")
    assert penalties.delay(ATTACKER[0], "alice") == 0  # a success clears both
    assert server.stats.logins_delayed == 5


async def test_a_penalty_never_holds_up_another_address(server: pop3d.Server, autojump_clock: object) -> None:
    server.configure(login_failure_delay=0, max_auth_failures=10)
    attacker = connect(server, ATTACKER)
    await attacker.read_line()
    for _ in range(3):
        await attacker.login("alice", "guess")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(attacker.login, "alice", "guess")  # waits 8 s
        await trio.testing.wait_all_tasks_blocked()
        bob = connect(server, OTHER)
        await bob.read_line()
        reply, waited = await try_login(bob, "bob", "builder")
        assert reply.startswith(b"+OK") and waited < 0.1


async def test_broken_auth_exchanges_are_penalised_too(server: pop3d.Server, autojump_clock: object) -> None:
    server.configure(login_failure_delay=0, max_auth_failures=10)
    client = connect(server, ATTACKER)
    await client.read_line()
    for expected in (0, 2, 4):
        started = trio.current_time()
        assert await client.command("AUTH PLAIN !!!") == replies.err(replies.AUTH_BAD_BASE64)
        assert trio.current_time() - started == pytest.approx(expected)


# -- floods ----------------------------------------------------------------------


async def test_connections_that_never_log_in_time_out(server: pop3d.Server, autojump_clock: object) -> None:
    silent = connect(server, ATTACKER)
    await silent.read_line()
    started = trio.current_time()
    with trio.fail_after(61):
        assert await silent.read_line() == replies.err(replies.LOGIN_TIMEOUT)
        assert await silent.at_eof()
    assert trio.current_time() - started == pytest.approx(60)
    # Busy is not logged in: a client that only sends CAPA is closed at 60 s too.
    chatty = connect(server, ATTACKER)
    await chatty.read_line()
    started = trio.current_time()
    with trio.fail_after(61):
        while (line := await chatty.command("NOOP")) != replies.err(replies.LOGIN_TIMEOUT):
            assert line == replies.err(replies.NOT_AUTHENTICATED)
            await trio.sleep(10)
    assert trio.current_time() - started == pytest.approx(60)


async def test_a_logged_in_session_has_the_idle_timeout(server: pop3d.Server, autojump_clock: object) -> None:
    client = connect(server, OTHER)
    await client.read_line()
    await client.login("alice", "wonderland")
    await trio.sleep(120)
    assert await client.command("NOOP") == replies.ok(replies.NOOP)
    # And its QUIT is answered, long after the login timeout.
    assert (await client.command("QUIT")).startswith(b"+OK")


async def test_2000_silent_connections_do_not_lock_a_client_out(server: pop3d.Server, autojump_clock: object) -> None:
    with trio.fail_after(30):
        silent = [connect(server, (f"10.{n // 250}.{n % 250}.1", 1)) for n in range(2000)]
        await wait_until(lambda: server.stats.sessions >= 2000)
        await wait_until(lambda: len(server.conn_list()) <= 1000)  # the evicted have gone
        client = connect(server, OTHER)
        assert (await client.read_line()).startswith(b"+OK")
        assert (await client.login("alice", "wonderland")).startswith(b"+OK")
        assert await client.command("STAT") != b""
    assert server.stats.evicted == 1001 and server.stats.refused == 0
    # Each closed one was told why, if it had had its greeting (else it was closed without a word).
    closed = 0
    for stream in silent:
        with trio.move_on_after(0.01):
            if await stream.at_eof():
                said = bytes(stream._buffer)
                assert said == b"" or said.endswith(replies.err(replies.TOO_MANY_CONNECTIONS)), said
                closed += 1
    assert closed == 1001


async def test_a_logged_in_session_is_never_pushed_out(server: pop3d.Server) -> None:
    server.configure(max_connections=2)
    first = connect(server, OTHER)
    await first.read_line()
    await first.login("alice", "wonderland")
    second = connect(server, OTHER)
    await second.read_line()
    await second.login("bob", "builder")
    newcomer = connect(server, ATTACKER)
    assert await newcomer.read_line() == replies.err(replies.TOO_MANY_CONNECTIONS)
    assert await first.command("NOOP") == replies.ok(replies.NOOP)


async def test_150_users_behind_one_address_all_get_in(nursery: trio.Nursery) -> None:
    names = [f"user{n}" for n in range(150)]
    server = pop3d.new()
    server.configure(
        auth=pop3d.MemoryUsers({name: (f"pw-{name}", name) for name in names}),
        storage=pop3d.MemoryStorage({name: [b"Subject: hi\n\nhello\n"] for name in names}),
        cleartext_auth_from=TEST_NET,
    )
    await nursery.start(server.run)
    nat = "192.0.2.200"
    clients = [connect(server, (nat, 10000 + n)) for n in range(150)]
    replies_seen: list[bytes] = []

    async def log_in(client: PopClient, name: str) -> None:
        await client.read_line()
        replies_seen.append(await client.login(name, f"pw-{name}"))

    with trio.fail_after(30):
        async with trio.open_nursery() as logins:
            for client, name in zip(clients, names, strict=True):
                logins.start_soon(log_in, client, name)
    assert len(replies_seen) == 150 and all(reply.startswith(b"+OK") for reply in replies_seen)
    assert len(server.conn_list()) == 150
    await server.destroy()


async def test_sessions_per_user_and_address(server: pop3d.Server) -> None:
    server.configure(max_userip_connections=2, storage=None)  # no mailbox lock in the way
    sessions = []
    for _ in range(2):
        client = connect(server, OTHER)
        await client.read_line()
        assert (await client.login("alice", "wonderland")).startswith(b"+OK")
        sessions.append(client)
    third = connect(server, OTHER)
    await third.read_line()
    assert await third.login("alice", "wonderland") == replies.err(replies.TOO_MANY_USER_SESSIONS)
    elsewhere = connect(server, ("192.0.2.9", 1))
    await elsewhere.read_line()
    assert (await elsewhere.login("alice", "wonderland")).startswith(b"+OK")


# -- the PROXY protocol ----------------------------------------------------------

PROXY = ("192.0.2.250", 50000)  # the load balancer


def v2_header(source: str, port: int) -> bytes:
    body = (
        ipaddress.IPv4Address(source).packed + ipaddress.IPv4Address("192.0.2.1").packed + struct.pack("!HH", port, 110)
    )
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


@pytest.mark.parametrize(
    "header",
    [b"PROXY TCP4 203.0.113.9 192.0.2.1 5555 110\r\n", v2_header("203.0.113.9", 5555)],
    ids=["v1", "v2"],
)
async def test_a_trusted_proxy_names_the_real_client(server: pop3d.Server, header: bytes) -> None:
    server.configure(proxy_protocol_from="192.0.2.250/32", cleartext_auth_from="203.0.113.0/24")
    client = connect(server, PROXY)
    await client.send(header + b"CAPA\r\n")  # the client's first bytes may come with the header
    assert (await client.read_line()).startswith(b"+OK POP3")
    assert (await client.read_line()).startswith(b"+OK")
    await client.read_multiline()
    [conn_id] = server.conn_list()
    state = server.conn_state(conn_id)
    assert (state["remotehost"], state["remoteport"]) == ("203.0.113.9", 5555)
    # The real client's network decides cleartext, and its address the penalties.
    assert await client.login("alice", "nope") == replies.err(replies.AUTH_FAILED)
    assert server.cget("penalties").delay("203.0.113.9", "") == 2


async def test_a_proxy_health_check_with_local(server: pop3d.Server) -> None:
    server.configure(proxy_protocol_from="192.0.2.250/32")
    client = connect(server, PROXY)
    await client.send(b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00")
    assert (await client.read_line()).startswith(b"+OK POP3")
    [conn_id] = server.conn_list()
    assert server.conn_state(conn_id)["remotehost"] == PROXY[0]


@pytest.mark.parametrize("header", [b"PROXY TCP4 203.0.113.9 192.0.2.1 5555 110\r\n", v2_header("203.0.113.9", 1)])
async def test_a_proxy_header_from_anyone_else_is_refused(server: pop3d.Server, header: bytes) -> None:
    server.configure(proxy_protocol_from="192.0.2.250/32")
    client = connect(server, ATTACKER)
    await client.read_line()  # not a proxy: it gets the greeting
    await client.send(header + b"USER alice\r\n")
    assert await client.read_line() == replies.err(replies.PROXY_REFUSED)
    assert await client.at_eof()


async def test_a_malformed_header_from_a_proxy_is_refused(server: pop3d.Server) -> None:
    server.configure(proxy_protocol_from="192.0.2.250/32")
    client = connect(server, PROXY)
    await client.send(b"PROXY TCP4 999.0.0.1 192.0.2.1 1 110\r\n")
    line = await client.read_line()
    assert line.startswith(b"-ERR bad PROXY protocol header: ")
    assert await client.at_eof()
    assert server.conn_list() == []


async def test_a_proxy_that_sends_no_header_is_closed(server: pop3d.Server, autojump_clock: object) -> None:
    server.configure(proxy_protocol_from="192.0.2.250/32")
    client = connect(server, PROXY)
    with trio.fail_after(11):
        assert await client.at_eof()
    assert client._buffer == b""


# -- kills, ownership, bad arguments ---------------------------------------------


async def test_sessions_served_outside_the_nursery_die_with_a_kill(
    users: pop3d.MemoryUsers, storage: pop3d.MemoryStorage
) -> None:
    server = pop3d.new()
    server.configure(auth=users, storage=storage, cleartext_auth_from=TEST_NET)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            client_end, server_end = trio.testing.memory_stream_pair()
            nursery.start_soon(server.serve_stream, server_end, OTHER)  # the caller's task, not the server's
            client = PopClient(client_end)
            await client.read_line()
            await client.login("alice", "wonderland")
            await server.destroy("kill")
            assert await client.at_eof()
            assert not storage.is_locked("alice")
    late_client, late_end = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        await server.serve_stream(late_end, OTHER)  # refused at once once destroyed
    assert await PopClient(late_client).at_eof()


async def test_no_new_session_once_exiting(server: pop3d.Server, nursery: trio.Nursery) -> None:
    client = connect(server, OTHER)
    await client.read_line()
    await nursery.start(server.destroy, "defer")
    with pytest.raises(pop3d.StateError):
        connect(server, OTHER)
    late_client, late_end = trio.testing.memory_stream_pair()
    await server.serve_stream(late_end, OTHER)
    assert await PopClient(late_client).read_line() == replies.err(replies.SHUTTING_DOWN)
    await client.command("QUIT")


@pytest.mark.parametrize("reason", ["two\r\nlines", "x" * 201, "bell\x07"])
async def test_a_kick_reason_is_one_printable_line(server: pop3d.Server, reason: str) -> None:
    client = connect(server, OTHER)
    await client.read_line()
    [conn_id] = server.conn_list()
    with pytest.raises(ValueError, match="one line of printable text"):
        server.close_connection(conn_id, reason)
    assert await client.command("NOOP") == replies.err(replies.NOT_AUTHENTICATED)  # still open


async def test_permanent_storage_faults_say_sys_perm_in_one_log_line(
    server: pop3d.Server, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(pop3d.MemoryStorage):
        async def lock(self, mbox: str) -> bool:
            raise pop3d.MailboxUnavailable(f"/var/mail/{mbox} is a file, not a Maildir")

    caplog.set_level(logging.INFO, logger="pop3d")
    server.configure(storage=Broken({}))
    client = connect(server, OTHER)
    await client.read_line()
    assert await client.login("alice", "wonderland") == replies.err(replies.SYS_PERM)
    assert "Traceback" not in caplog.text
    [line] = [record for record in caplog.records if "is a file" in record.getMessage()]
    assert OTHER[0] in line.getMessage() and line.exc_info is None


async def test_log_lines_carry_the_client_address(
    server: pop3d.Server, caplog: pytest.LogCaptureFixture, autojump_clock: object
) -> None:
    caplog.set_level(logging.INFO, logger="pop3d")
    server.configure(max_connections=1)
    client = connect(server, ATTACKER)
    await client.read_line()
    await client.login("alice", "wrong")
    await client.login("alice", "wonderland")
    refused = connect(server, ("192.0.2.77", 1))
    await refused.read_line()
    [conn_id] = server.conn_list()
    server.close_connection(conn_id, "maintenance")
    await client.at_eof()
    text = caplog.text
    assert f"from {ATTACKER[0]}: login failed for alice" in text
    assert "refusing a connection from 192.0.2.77" in text
    assert f"closing {conn_id} from {ATTACKER[0]} (user alice): maintenance" in text


async def test_a_kill_returns_within_the_bound_while_a_callback_hangs(users: pop3d.MemoryUsers) -> None:
    release = threading.Event()

    class Hanging:
        """A synchronous storage whose lock never returns (a dead NFS mount, say)."""

        def lock(self, mbox: str) -> bool:
            release.wait(30)
            return True

        def unlock(self, mbox: str) -> None:
            pass

    server = pop3d.new()
    server.configure(auth=users, storage=pop3d.sync_storage(Hanging()), cleartext_auth_from=TEST_NET)
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(server.run)
                client = connect(server, OTHER)
                await client.read_line()
                await client.send(b"USER alice\r\nPASS wonderland\r\n")
                await wait_until(lambda: server.stats.commands["PASS"] == 1)
                await trio.sleep(0.2)  # the session now waits in the worker thread
                started = trio.current_time()
                await server.destroy("kill")
                assert trio.current_time() - started < 2.5
                assert server.destroyed and await client.at_eof()
    finally:
        release.set()  # let the abandoned thread finish


# -- what the review of the first version found -----------------------------------


class CountingUsers(pop3d.MemoryUsers):
    """Users that note when each password check begins."""

    def __init__(self, users: dict[str, tuple[str, str]]) -> None:
        super().__init__(users)
        self.checked_at: list[float] = []

    async def lookup(self, name: str) -> tuple[str, str] | None:
        self.checked_at.append(trio.current_time())
        return await super().lookup(name)


async def test_parallel_guesses_from_one_address_wait_their_turn(server: pop3d.Server, autojump_clock: object) -> None:
    users = CountingUsers({"alice": ("wonderland", "alice")})
    server.configure(auth=users, login_failure_delay=0, max_auth_failures=10, login_timeout=600)
    penalties = server.cget("penalties")
    for _ in range(4):
        penalties.failed(ATTACKER[0], "")  # the address is at 15 s already
    clients = [connect(server, ATTACKER) for _ in range(9)]
    for client in clients:
        await client.read_line()
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        for client in clients:
            nursery.start_soon(client.login, "alice", "guess")
    # Three at a time, each after its penalty: no guess is even checked before its time.
    offsets = sorted(at - started for at in users.checked_at)
    assert offsets[:3] == pytest.approx([15] * 3)
    assert offsets[3] >= 30 and offsets[6] >= 45


async def test_a_success_forgives_only_its_own_user(server: pop3d.Server, autojump_clock: object) -> None:
    server.configure(login_failure_delay=0, max_auth_failures=10)
    client = connect(server, ATTACKER)
    await client.read_line()
    for user in ("bob", "carol", "dave"):
        await client.login(user, "123456")  # a spray at other users
    await client.login("alice", "wrong")  # and a typo
    penalties = server.cget("penalties")
    assert penalties.delay(ATTACKER[0], "") == 15
    assert (await client.login("alice", "wonderland")).startswith(b"+OK")
    # The typo is forgiven, the spray is not: three failures at the address remain.
    assert penalties.delay(ATTACKER[0], "") == 8


async def test_a_login_waiting_out_a_penalty_is_not_evicted(server: pop3d.Server, autojump_clock: object) -> None:
    server.configure(max_connections=1)
    server.cget("penalties").failed("", "alice")  # anyone can earn alice a penalty
    server.cget("penalties").failed("", "alice")
    alice = connect(server, OTHER)
    await alice.read_line()
    async with trio.open_nursery() as nursery:
        replies_seen: list[bytes] = []

        async def log_in() -> None:
            replies_seen.append(await alice.login("alice", "wonderland"))

        nursery.start_soon(log_in)
        await trio.sleep(1)  # alice waits her 4 s
        newcomer = connect(server, ATTACKER)
        assert await newcomer.read_line() == replies.err(replies.TOO_MANY_CONNECTIONS)
    assert replies_seen[0].startswith(b"+OK")


async def test_an_ipv6_64_counts_as_one_address(server: pop3d.Server) -> None:
    server.configure(max_connections_per_ip=2)
    clients = [connect(server, (f"2001:db8:1:2::{n}", 1)) for n in range(1, 4)]
    lines = [await client.read_line() for client in clients]
    assert [line.startswith(b"+OK") for line in lines].count(True) == 2
    assert replies.err(replies.TOO_MANY_FROM_ADDRESS) in lines
    other = connect(server, ("2001:db8:1:3::1", 1))
    assert (await other.read_line()).startswith(b"+OK")


async def test_a_header_naming_no_client_is_not_the_trusted_proxy(server: pop3d.Server) -> None:
    # The proxy is trusted with cleartext; a client it cannot name must not be.
    server.configure(proxy_protocol_from="192.0.2.250/32", cleartext_auth_from=TEST_NET)
    client = connect(server, PROXY)
    await client.send(b"PROXY UNKNOWN\r\n")
    await client.read_line()
    assert await client.command("USER alice") == replies.err(replies.CLEARTEXT_NO_TLS)
    [conn_id] = server.conn_list()
    assert server.conn_state(conn_id)["remotehost"] == ""


async def test_pop3s_behind_a_proxy_with_the_client_hello_in_the_same_packet(
    server: pop3d.Server, certs: Certs
) -> None:
    server.configure(proxy_protocol_from="192.0.2.250/32", tls_cert=certs.cert, tls_key=certs.key, implicit_tls=True)
    client_end, server_end = trio.testing.memory_stream_pair()
    server.connect(server_end, PROXY)
    header = v2_header("203.0.113.9", 4444)
    original_send = client_end.send_all
    first = True

    async def send_all(data: bytes | bytearray | memoryview) -> None:
        nonlocal first
        if first:  # the header and the TLS ClientHello go out as one packet
            first = False
            data = header + bytes(data)
        await original_send(data)

    client_end.send_all = send_all  # type: ignore[method-assign]
    tls = trio.SSLStream(client_end, certs.client_context(), server_hostname="localhost")
    await tls.do_handshake()
    client = PopClient(tls)
    assert (await client.read_line()).startswith(b"+OK POP3")
    assert (await client.login("alice", "wonderland")).startswith(b"+OK")
    [conn_id] = server.conn_list()
    state = server.conn_state(conn_id)
    assert (state["remotehost"], state["tls"]) == ("203.0.113.9", True)


async def test_a_kill_is_bounded_even_when_a_callback_ignores_cancellation(
    users: pop3d.MemoryUsers, autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    class Stubborn(pop3d.MemoryStorage):
        async def lock(self, mbox: str) -> bool:
            with trio.CancelScope(shield=True):  # a callback that cannot be cancelled
                await trio.sleep(30)
            return True

    server = pop3d.new()
    server.configure(auth=users, storage=Stubborn({}), cleartext_auth_from=TEST_NET)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        client = connect(server, OTHER)
        await client.read_line()
        await client.send(b"USER alice\r\nPASS wonderland\r\n")
        await wait_until(lambda: server.stats.commands["PASS"] == 1)
        started = trio.current_time()
        await server.destroy("kill")
        assert trio.current_time() - started == pytest.approx(2, abs=0.1)
        assert server.destroyed
    assert "did not end within 2 s" in caplog.text
