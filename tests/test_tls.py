"""TLS in the server object: STLS and POP3S, the cleartext rule, AUTH, certificates.

Sessions run over memory streams with a real TLS handshake on top
(``trio.SSLStream`` on both ends); the last tests use ``poplib`` over real
loopback sockets.  Certificates come from ``trustme`` (see ``certs.py``).
"""

from __future__ import annotations

import base64
import logging
import poplib
import ssl
import warnings
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme

import pop3d
from pop3d import replies
from pop3d.tls import TLSError

from .certs import Certs, issue
from .conftest import TOTAL, wait_until
from .popclient import PopClient

PEER = ("198.51.100.20", 50000)  # off every trusted network


def plain_ir(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


@pytest.fixture
def tls_server(server: pop3d.Server, certs: Certs) -> pop3d.Server:
    """The conftest server with a certificate, trusting no network with cleartext."""
    server.configure(tls_cert=certs.cert, tls_key=certs.key, cleartext_auth_from="none")
    return server


def open_stream(server: pop3d.Server, peer: tuple[str, int] = PEER) -> trio.abc.Stream:
    client_end, server_end = trio.testing.memory_stream_pair()
    server.connect(server_end, peer)
    return client_end


async def starttls(stream: trio.abc.Stream, certs: Certs) -> trio.SSLStream[trio.abc.Stream]:
    tls = trio.SSLStream(stream, certs.client_context(), server_hostname="localhost")
    await tls.do_handshake()
    return tls


async def capa(client: PopClient) -> list[str]:
    assert (await client.command("CAPA")).startswith(b"+OK")
    return [line.decode().rstrip() for line in (await client.read_multiline()).splitlines()[:-1]]


async def stls_client(server: pop3d.Server, certs: Certs) -> tuple[PopClient, trio.SSLStream[trio.abc.Stream]]:
    stream = open_stream(server)
    plain = PopClient(stream)
    await plain.read_line()
    assert await plain.command("STLS") == replies.ok(replies.STLS_BEGIN)
    tls = await starttls(stream, certs)
    return PopClient(tls), tls


# -- STLS ---------------------------------------------------------------------


async def test_stls_session(tls_server: pop3d.Server, certs: Certs, storage: pop3d.MemoryStorage) -> None:
    stream = open_stream(tls_server)
    plain = PopClient(stream)
    assert (await plain.read_line()).startswith(b"+OK")
    before = await capa(plain)
    assert "STLS" in before and "USER" not in before and not any(c.startswith("SASL") for c in before)
    assert await plain.command("USER alice") == replies.err(replies.CLEARTEXT_USE_STLS)
    assert await plain.command(f"AUTH PLAIN {plain_ir('alice', 'wonderland')}") == replies.err(
        replies.CLEARTEXT_USE_STLS
    )
    assert await plain.command("STLS") == replies.ok(replies.STLS_BEGIN)
    tls = await starttls(stream, certs)
    client = PopClient(tls)
    after = await capa(client)
    assert "STLS" not in after and "USER" in after and "SASL PLAIN LOGIN" in after
    assert (await client.command(f"AUTH PLAIN {plain_ir('alice', 'wonderland')}")).startswith(b"+OK logged in")
    [conn_id] = tls_server.conn_list()
    state = tls_server.conn_state(conn_id)
    assert state["tls"] is True and state["tls_version"] in ("TLSv1.2", "TLSv1.3") and state["tls_cipher"]
    assert state["logon"] == "plain" and state["name"] == "alice"
    assert await client.command("DELE 1") == replies.ok(replies.DELE.format(msg=1))
    assert (await client.command("QUIT")).startswith(b"+OK")
    await wait_until(lambda: not tls_server.conn_list())
    assert len(storage.messages("alice")) == 2
    stats = tls_server.stats
    assert stats.sessions_ended[True] == 1 and stats.logins["plain", "ok"] == 1


async def test_plaintext_sent_with_stls_is_never_executed(tls_server: pop3d.Server, certs: Certs) -> None:
    stream = open_stream(tls_server)
    plain = PopClient(stream)
    await plain.read_line()
    # A man in the middle appends commands to the client's STLS, in the same packet.
    await plain.send(b"STLS\r\nUSER alice\r\nPASS wonderland\r\nDELE 1\r\n")
    assert await plain.read_line() == replies.ok(replies.STLS_BEGIN)
    client = PopClient(await starttls(stream, certs))
    # The first answer over TLS is to the first command sent over TLS.
    assert await client.command("NOOP") == replies.err(replies.NOT_AUTHENTICATED)
    [conn_id] = tls_server.conn_list()
    state = tls_server.conn_state(conn_id)
    assert state["state"] == "auth" and state["name"] == "" and state["tls"] is True


async def test_stls_not_offered_without_a_certificate(server: pop3d.Server) -> None:
    server.configure(cleartext_auth_from="none")
    client = PopClient(open_stream(server))
    await client.read_line()
    assert "STLS" not in await capa(client)
    assert await client.command("STLS") == replies.err(replies.STLS_UNAVAILABLE)
    assert await client.command("USER alice") == replies.err(replies.CLEARTEXT_NO_TLS)


async def test_trusted_network_may_log_in_before_tls(tls_server: pop3d.Server) -> None:
    tls_server.configure(cleartext_auth_from="198.51.100.0/24")
    client = PopClient(open_stream(tls_server))
    await client.read_line()
    assert {"STLS", "USER", "SASL PLAIN LOGIN"} <= set(await capa(client))
    assert (await client.login("alice", "wonderland")).startswith(b"+OK")
    [conn_id] = tls_server.conn_list()
    assert tls_server.conn_state(conn_id)["tls"] is False


async def test_ipv4_mapped_peer_counts_as_ipv4(tls_server: pop3d.Server) -> None:
    tls_server.configure(cleartext_auth_from="198.51.100.0/24")
    client = PopClient(open_stream(tls_server, ("::ffff:198.51.100.9", 1)))
    await client.read_line()
    assert (await client.login("alice", "wonderland")).startswith(b"+OK")


# -- POP3S (implicit TLS) -----------------------------------------------------


async def test_pop3s_session(tls_server: pop3d.Server, certs: Certs) -> None:
    tls_server.configure(implicit_tls=True)
    tls = await starttls(open_stream(tls_server), certs)
    client = PopClient(tls)
    assert (await client.read_line()).startswith(b"+OK POP3 server test.example ready")
    caps = await capa(client)
    assert "STLS" not in caps and "USER" in caps
    assert await client.command("STLS") == replies.err(replies.STLS_ACTIVE)
    assert (await client.login("alice", "wonderland")).startswith(b"+OK")
    assert await client.command("STAT") == b"+OK 3 %d\r\n" % TOTAL
    assert (await client.command("QUIT")).startswith(b"+OK")
    # The server ends TLS with close_notify: a clean end, not a cut (which would raise).
    assert await tls.receive_some(100) == b""


async def test_failed_handshake_ends_only_that_connection(
    tls_server: pop3d.Server, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pop3d")
    tls_server.configure(implicit_tls=True)
    bad = PopClient(open_stream(tls_server))
    await bad.send(b"USER alice\r\n")  # plain text on a TLS port
    assert await bad.at_eof()
    await wait_until(lambda: tls_server.stats.tls_failures == 1)
    assert "TLS handshake failed" in caplog.text
    good = PopClient(await starttls(open_stream(tls_server), certs))
    assert (await good.read_line()).startswith(b"+OK")


async def test_a_stalled_handshake_times_out(tls_server: pop3d.Server, autojump_clock: object) -> None:
    tls_server.configure(implicit_tls=True)
    silent = PopClient(open_stream(tls_server))
    with trio.fail_after(31):
        assert await silent.at_eof()
    await wait_until(lambda: not tls_server.conn_list())
    assert tls_server.stats.tls_failures == 1


async def test_a_stalled_stls_handshake_times_out(tls_server: pop3d.Server, autojump_clock: object) -> None:
    client = PopClient(open_stream(tls_server))
    await client.read_line()
    assert await client.command("STLS") == replies.ok(replies.STLS_BEGIN)
    with trio.fail_after(31):
        assert await client.at_eof()
    await wait_until(lambda: not tls_server.conn_list())
    assert tls_server.stats.tls_failures == 1


@pytest.mark.parametrize("how", ["pop3s", "stls"])
async def test_a_kick_during_the_handshake_sends_no_plain_text(tls_server: pop3d.Server, how: str) -> None:
    tls_server.configure(implicit_tls=how == "pop3s")
    client = PopClient(open_stream(tls_server))
    if how == "stls":
        await client.read_line()
        assert await client.command("STLS") == replies.ok(replies.STLS_BEGIN)
    await wait_until(lambda: bool(tls_server.conn_list()))
    [conn_id] = tls_server.conn_list()
    tls_server.close_connection(conn_id, "maintenance")
    assert await client.at_eof()
    assert client._buffer == b""  # not "-ERR maintenance" in clear: the client expects TLS


async def test_over_the_limit_on_pop3s_closes_without_plain_text(tls_server: pop3d.Server, certs: Certs) -> None:
    tls_server.configure(implicit_tls=True, max_connections=1)
    first = PopClient(await starttls(open_stream(tls_server), certs))
    await first.read_line()
    assert (await first.login("alice", "wonderland")).startswith(b"+OK")  # logged in: it keeps its place
    second = PopClient(open_stream(tls_server))
    assert await second.at_eof()
    assert second._buffer == b""  # no "-ERR" in clear on a TLS port
    assert tls_server.stats.refused == 1


async def test_tls_1_1_is_refused(tls_server: pop3d.Server, certs: Certs) -> None:
    tls_server.configure(implicit_tls=True)
    context = certs.client_context()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # as it should be
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("ALL:@SECLEVEL=0")  # so that it is the server that says no
    tls = trio.SSLStream(open_stream(tls_server), context, server_hostname="localhost")
    with pytest.raises(trio.BrokenResourceError):
        await tls.do_handshake()
    await wait_until(lambda: tls_server.stats.tls_failures == 1)  # the server refused it
    assert tls_server.tls_context is not None
    assert tls_server.tls_context.minimum_version == ssl.TLSVersion.TLSv1_2


# -- AUTH over the session ----------------------------------------------------


async def test_auth_login_and_the_failure_delay(tls_server: pop3d.Server, certs: Certs, autojump_clock: object) -> None:
    tls_server.configure(login_failure_delay=2)
    client, _ = await stls_client(tls_server, certs)
    assert await client.command("AUTH LOGIN") == replies.challenge("VXNlcm5hbWU6")
    assert await client.command(base64.b64encode(b"alice")) == replies.challenge("UGFzc3dvcmQ6")
    started = trio.current_time()
    assert await client.command(base64.b64encode(b"wrong")) == replies.err(replies.AUTH_FAILED)
    assert trio.current_time() - started >= 2
    assert (await client.command(f"AUTH PLAIN {plain_ir('alice', 'wonderland')}")).startswith(b"+OK")
    assert tls_server.stats.logins == {("login", "failed"): 1, ("plain", "ok"): 1}


async def test_failures_of_every_mechanism_add_up(
    tls_server: pop3d.Server, certs: Certs, autojump_clock: object
) -> None:
    client, _ = await stls_client(tls_server, certs)
    assert (await client.login("alice", "one")).startswith(b"-ERR [AUTH]")
    assert (await client.command(f"AUTH PLAIN {plain_ir('alice', 'two')}")).startswith(b"-ERR [AUTH]")
    assert await client.command(f"AUTH PLAIN {plain_ir('alice', 'three')}") == replies.err(replies.AUTH_TOO_MANY)
    assert await client.at_eof()


async def test_hashed_passwords_work_with_sasl(tls_server: pop3d.Server, certs: Certs, tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("")
    pop3d.passwd.add_user(users, "alice", "wonderland", scheme="BLF-CRYPT")
    tls_server.configure(auth=pop3d.PasswdFile(users))
    client, _ = await stls_client(tls_server, certs)
    assert (await client.command(f"AUTH PLAIN {plain_ir('alice', 'wonderland')}")).startswith(b"+OK")


async def test_logs_say_tls_and_never_hold_a_password(
    tls_server: pop3d.Server, certs: Certs, caplog: pytest.LogCaptureFixture, autojump_clock: object
) -> None:
    caplog.set_level(logging.DEBUG, logger="pop3d")
    client, tls = await stls_client(tls_server, certs)
    assert (await client.command(f"AUTH PLAIN {plain_ir('alice', 'guess-1')}")).startswith(b"-ERR [AUTH]")
    assert await client.command("AUTH LOGIN") == replies.challenge("VXNlcm5hbWU6")
    assert (await client.command(base64.b64encode(b"alice"))).startswith(b"+ ")
    assert (await client.command(base64.b64encode(b"guess-2"))).startswith(b"-ERR [AUTH]")
    assert (await client.command(f"AUTH PLAIN {plain_ir('alice', 'wonderland')}")).startswith(b"+OK")
    await client.command("QUIT")
    await wait_until(lambda: not tls_server.conn_list())
    assert f"tls={tls.version()}" in caplog.text
    assert "login failed for alice (plain)" in caplog.text and "login failed for alice (login)" in caplog.text
    for secret in ("guess-1", "guess-2", "wonderland"):
        assert secret not in caplog.text
        assert base64.b64encode(secret.encode()).decode()[:8] not in caplog.text
    assert plain_ir("alice", "wonderland") not in caplog.text


async def test_broken_auth_is_a_failed_login_like_any(
    tls_server: pop3d.Server, certs: Certs, caplog: pytest.LogCaptureFixture, autojump_clock: object
) -> None:
    caplog.set_level(logging.INFO, logger="pop3d")
    tls_server.configure(login_failure_delay=2)
    client, _ = await stls_client(tls_server, certs)
    started = trio.current_time()
    assert await client.command("AUTH PLAIN not-base64!") == replies.err(replies.AUTH_BAD_BASE64)
    assert trio.current_time() - started >= 2
    assert tls_server.stats.logins["plain", "failed"] == 1
    assert "from 198.51.100.20: login failed for - (plain): " + replies.AUTH_BAD_BASE64 in caplog.text


# -- certificates ---------------------------------------------------------------


async def peer_certificate(server: pop3d.Server, certs: Certs) -> bytes:
    _, tls = await stls_client(server, certs)
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


async def test_reload_swaps_the_certificate_for_new_connections(
    tls_server: pop3d.Server, certs: Certs, tls_ca: trustme.CA, tmp_path: Path
) -> None:
    assert await peer_certificate(tls_server, certs) == certs.der
    waiting = PopClient(open_stream(tls_server))  # connected before the reload, STLS after it
    await waiting.read_line()
    (tmp_path / "renewed").mkdir()
    renewed = issue(tls_ca, tmp_path / "renewed")
    for src, dst in ((renewed.cert, certs.cert), (renewed.key, certs.key)):
        dst.write_bytes(src.read_bytes())
    assert tls_server.reload_tls() is True
    assert await peer_certificate(tls_server, certs) == renewed.der
    # An open session keeps the certificate it started with.
    assert await waiting.command("STLS") == replies.ok(replies.STLS_BEGIN)
    old = await starttls(waiting.stream, certs)
    assert old.getpeercert(binary_form=True) == certs.der


async def test_a_bad_reload_keeps_the_old_certificate(tls_server: pop3d.Server, certs: Certs) -> None:
    certs.cert.write_text("not a certificate\n")
    with pytest.raises(TLSError, match="holds no PEM certificate"):
        tls_server.reload_tls()
    assert await peer_certificate(tls_server, certs) == certs.der


async def test_reload_without_files_does_nothing() -> None:
    server = pop3d.new()
    try:
        assert server.reload_tls() is False
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server.configure(ssl_context=context)
        assert server.reload_tls() is False and server.tls_context is context
    finally:
        await server.destroy()


def encrypted_key(certs: Certs, path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization  # trustme's own dependency

    key = serialization.load_pem_private_key(certs.key.read_bytes(), password=None)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    return path


@pytest.mark.parametrize(
    ("options", "option", "message"),
    [
        (lambda c, t: {"tls_cert": c.cert}, "tls_key", "tls_cert and tls_key go together"),
        (lambda c, t: {"tls_key": c.key}, "tls_cert", "tls_cert and tls_key go together"),
        (lambda c, t: {"implicit_tls": True}, "implicit_tls", "needs tls_cert and tls_key, or ssl_context"),
        (lambda c, t: {"tls_cert": c.key, "tls_key": c.key}, "tls_cert", "holds no PEM certificate"),
        (lambda c, t: {"tls_cert": c.cert, "tls_key": c.cert}, "tls_cert", "holds no PEM private key"),
        (lambda c, t: {"tls_cert": t / "missing.pem", "tls_key": c.key}, "tls_cert", "cannot read the certificate"),
        (lambda c, t: {"tls_cert": c.cert, "tls_key": t / "other.key"}, "tls_cert", "does not match the certificate"),
        (
            lambda c, t: {"tls_cert": c.cert, "tls_key": encrypted_key(c, t / "encrypted.key")},
            "tls_cert",
            "is encrypted",
        ),
        (
            lambda c, t: {"tls_cert": c.cert, "tls_key": c.key, "ssl_context": ssl.create_default_context()},
            "ssl_context",
            "client context",
        ),
        (
            lambda c, t: {"ssl_context": ssl.create_default_context(ssl.Purpose.CLIENT_AUTH), "tls_cert": c.cert},
            "tls_key",
            "go together",
        ),
    ],
)
async def test_bad_tls_options_change_nothing(
    server: pop3d.Server, certs: Certs, tls_ca: trustme.CA, tmp_path: Path, options: object, option: str, message: str
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (tmp_path / "other.key").write_bytes(issue(tls_ca, other).key.read_bytes())
    before = server.configure()
    with pytest.raises(pop3d.OptionError, match=message) as caught:
        server.configure(**options(certs, tmp_path))  # type: ignore[operator]
    assert [name for name, _ in caught.value.errors] == [option]
    assert server.configure() == before and server.tls_context is None


def test_an_old_tls_floor_is_refused() -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
    with pytest.raises(ValueError, match=r"older than 1\.2"):
        pop3d.tls.check_context(context)


# -- real sockets: poplib -----------------------------------------------------


def poplib_fetch(pop: poplib.POP3) -> tuple[list[bytes], bytes]:
    pop.user("alice")
    pop.pass_("wonderland")
    lines = pop.retr(1)[1]
    pop.dele(1)
    return lines, pop.quit()


async def test_poplib_stls(tls_server: pop3d.Server, certs: Certs, storage: pop3d.MemoryStorage) -> None:
    await tls_server.up()
    port = tls_server.cget("port")

    def session() -> tuple[list[bytes], bytes, str]:
        refused = poplib.POP3("localhost", port, timeout=10)
        with pytest.raises(poplib.error_proto) as caught:
            refused.user("alice")
        refused.quit()
        pop = poplib.POP3("localhost", port, timeout=10)
        assert "STLS" in pop.capa()
        pop.stls(certs.client_context())
        return (*poplib_fetch(pop), str(caught.value))

    with trio.fail_after(20):
        lines, quit_reply, refusal = await trio.to_thread.run_sync(session)
    assert "use STLS first" in refusal
    assert lines[-1] == b"first"
    assert quit_reply.startswith(b"+OK")
    await wait_until(lambda: not tls_server.conn_list())
    assert len(storage.messages("alice")) == 2


async def test_poplib_pop3_ssl(tls_server: pop3d.Server, certs: Certs) -> None:
    tls_server.configure(implicit_tls=True)
    await tls_server.up()
    port = tls_server.cget("port")

    def session() -> tuple[list[bytes], bytes]:
        return poplib_fetch(poplib.POP3_SSL("localhost", port, timeout=10, context=certs.client_context()))

    with trio.fail_after(20):
        lines, quit_reply = await trio.to_thread.run_sync(session)
    assert lines[-1] == b"first" and quit_reply.startswith(b"+OK")
