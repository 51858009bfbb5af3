"""Integration: the standard library's poplib against a real listening server."""

from __future__ import annotations

import poplib

import trio

import pop3d

from .conftest import MESSAGES, SIZES


async def test_poplib_session(server: pop3d.Server, storage: pop3d.MemoryStorage) -> None:
    await server.up()
    port = server.cget("port")

    def session() -> dict[str, object]:
        pop = poplib.POP3("127.0.0.1", port, timeout=10)
        seen: dict[str, object] = {"welcome": pop.getwelcome()}
        seen["capa"] = pop.capa()
        pop.user("alice")
        pop.pass_("wonderland")
        seen["stat"] = pop.stat()
        seen["list"] = pop.list()[1]
        seen["uidl"] = pop.uidl()[1]
        seen["retr"] = pop.retr(2)[1]
        seen["top"] = pop.top(1, 0)[1]
        pop.dele(1)
        seen["quit"] = pop.quit()
        return seen

    with trio.fail_after(20):
        seen = await trio.to_thread.run_sync(session)
    assert isinstance(seen["welcome"], bytes) and b"<" in seen["welcome"]
    assert {"TOP", "UIDL", "USER", "PIPELINING", "RESP-CODES"} <= set(seen["capa"])  # type: ignore[arg-type]
    assert seen["stat"] == (3, sum(SIZES))
    assert seen["list"] == [b"%d %d" % (n, size) for n, size in enumerate(SIZES, 1)]
    assert len(seen["uidl"]) == 3  # type: ignore[arg-type]
    # poplib strips CRLF and undoes the dot-stuffing.
    assert seen["retr"] == MESSAGES[1].split(b"\n")[:-1]
    assert seen["top"] == [b"From: bob@example.org", b"Subject: one", b""]
    assert storage.messages("alice") == MESSAGES[1:]


async def test_poplib_apop_and_bad_password(server: pop3d.Server) -> None:
    await server.up()
    port = server.cget("port")

    def session() -> tuple[bytes, bytes]:
        pop = poplib.POP3("127.0.0.1", port, timeout=10)
        try:
            pop.user("alice")
            pop.pass_("wrong")
        except poplib.error_proto as exc:
            refused = exc.args[0]
        pop.quit()
        # APOP in a session of its own: a session keeps the mechanism it chose first.
        pop = poplib.POP3("127.0.0.1", port, timeout=10)
        ok = pop.apop("alice", "wonderland")
        pop.quit()
        return refused, ok

    with trio.fail_after(20):
        refused, ok = await trio.to_thread.run_sync(session)
    assert refused.startswith(b"-ERR [AUTH]")
    assert ok.startswith(b"+OK")
