"""Hostile clients on real loopback sockets, all at once, while a normal client is served.

Bounded: a handful of clients, a big message of 2 MB, an idle timeout of
2 s for the one that never reads, and a ``fail_after`` around everything.
"""

from __future__ import annotations

import contextlib
import socket

import trio

import pop3d
from pop3d import replies

from .popclient import PopClient

BIG = b"Subject: big\n\n" + b"x" * 998 + b"\n" * 1 + (b"y" * 998 + b"\n") * 2000


async def open_client(port: int) -> PopClient:
    client = PopClient(await trio.open_tcp_stream("127.0.0.1", port))
    assert (await client.read_line()).startswith(b"+OK")
    return client


async def slow_sender(port: int) -> None:
    client = await open_client(port)
    for byte in b"USER alice\r\n":
        await client.send(bytes([byte]))
        await trio.sleep(0.02)
    assert await client.read_line() == replies.ok(replies.USER_ACCEPTED)
    await client.stream.aclose()


async def huge_line(port: int) -> None:
    client = await open_client(port)
    for _ in range(16):
        await client.send(b"A" * 65536)  # a megabyte without a line end
    await client.send(b"\r\nNOOP\r\n")
    assert await client.read_line() == replies.err(replies.LINE_TOO_LONG.format(limit=1024))
    assert await client.read_line() == replies.err(replies.NOT_AUTHENTICATED)
    await client.stream.aclose()


async def half_closed(port: int) -> None:
    client = await open_client(port)
    await client.send(b"CAPA\r\n")
    stream = client.stream
    assert isinstance(stream, trio.SocketStream)
    await stream.send_eof()  # the client will say no more, but reads on
    assert (await client.read_line()).startswith(b"+OK")
    await client.read_multiline()
    assert await client.at_eof()


async def never_reads(port: int, server: pop3d.Server) -> None:
    client = await open_client(port)
    assert (await client.login("carol", "pw")).startswith(b"+OK")
    raw = client.stream
    assert isinstance(raw, trio.SocketStream)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    for _ in range(20):
        await client.send(b"RETR 1\r\n")
    # It never reads: the server's sends stall, and its idle timeout ends the session.
    await trio.sleep(0.5)
    assert "carol" in users_connected(server)
    with trio.fail_after(10):
        while "carol" in users_connected(server):  # noqa: ASYNC110 - the session has no event to wait on
            await trio.sleep(0.1)
    await raw.aclose()


def users_connected(server: pop3d.Server) -> set[str]:
    names = set()
    for conn_id in server.conn_list():
        with contextlib.suppress(pop3d.UnknownConnection):  # it ended between the two calls
            names.add(server.conn_state(conn_id)["name"])
    return names


async def normal_client(port: int, rounds: int) -> int:
    done = 0
    for _ in range(rounds):
        client = await open_client(port)
        assert (await client.login("alice", "wonderland")).startswith(b"+OK")
        assert (await client.command("RETR 1")).startswith(b"+OK")
        await client.read_multiline()
        assert (await client.command("QUIT")).startswith(b"+OK")
        await client.stream.aclose()
        done += 1
        await trio.sleep(0.1)
    return done


async def test_hostile_clients_do_not_stop_a_normal_one(
    server: pop3d.Server, users: pop3d.MemoryUsers, storage: pop3d.MemoryStorage
) -> None:
    storage.add("carol", BIG)
    users.add("carol", "pw", "carol")
    server.configure(idle_timeout=2, login_failure_delay=0)
    await server.up()
    port = server.cget("port")
    results: list[int] = []

    async def normal() -> None:
        results.append(await normal_client(port, rounds=20))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(normal)
            nursery.start_soon(slow_sender, port)
            nursery.start_soon(huge_line, port)
            nursery.start_soon(half_closed, port)
            nursery.start_soon(never_reads, port, server)
    assert results == [20]
    assert server.stats.errors == 0
