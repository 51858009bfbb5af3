"""Shared fixtures.

Rules for every test here: servers bind 127.0.0.1 on port 0, waits are
bounded with ``trio.fail_after``, and timeouts run on ``autojump_clock``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme

import pop3d
from pop3d.message import canonical_size

from .certs import Certs, issue
from .popclient import PopClient
from .serve_process import make_site

MESSAGES = [
    b"From: bob@example.org\nSubject: one\n\nfirst\n",
    b"From: carol@example.org\nSubject: two\n\n.starts with a dot\nsecond\n",
    b"From: dave@example.org\nSubject: three\n\nthird, no final newline",
]
SIZES = [canonical_size(m) for m in MESSAGES]
TEST_NET = "192.0.2.0/24"  # RFC 5737: where connect()'s memory-stream clients come from
TOTAL = sum(SIZES)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A passwd-file and Maildirs on disk, for ``pop3d serve`` (see ``serve_process.make_site``)."""
    return make_site(tmp_path)


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    """One throw-away certificate authority for the whole run."""
    return trustme.CA()


@pytest.fixture
def certs(tls_ca: trustme.CA, tmp_path: Path) -> Certs:
    """A server certificate and key in PEM files, signed by ``tls_ca``."""
    return issue(tls_ca, tmp_path)


@pytest.fixture
def users() -> pop3d.MemoryUsers:
    return pop3d.MemoryUsers({"alice": ("wonderland", "alice"), "bob": ("builder", "bob")})


@pytest.fixture
def storage() -> pop3d.MemoryStorage:
    return pop3d.MemoryStorage({"alice": MESSAGES, "bob": [b"Subject: hi\n\nbob\n"]})


@pytest.fixture
async def server(
    nursery: trio.Nursery, users: pop3d.MemoryUsers, storage: pop3d.MemoryStorage
) -> AsyncIterator[pop3d.Server]:
    """A running server (not listening) with alice and bob; destroyed afterwards."""
    srv = pop3d.new()
    srv.configure(
        host="127.0.0.1",
        port=0,
        hostname="test.example",
        auth=users,
        storage=storage,
        login_failure_delay=0,
        # Loopback, as by default, and connect()'s memory-stream clients in TEST-NET-1.
        cleartext_auth_from=["127.0.0.0/8", "::1/128", TEST_NET],
    )
    await nursery.start(srv.run)
    yield srv
    await srv.destroy()


@pytest.fixture
async def listening_server(nursery: trio.Nursery) -> AsyncIterator[pop3d.Server]:
    """A bare server object listening on 127.0.0.1 (a unique name, no callbacks), so that the API lists one."""
    srv = pop3d.new(f"listening-{uuid.uuid4().hex[:8]}")
    srv.configure(host="127.0.0.1", port=0)
    await nursery.start(srv.run)
    await srv.up()
    yield srv
    with trio.fail_after(5):
        await srv.destroy("kill")


def connect(server: pop3d.Server, peer: tuple[str, int] = ("192.0.2.7", 40110)) -> PopClient:
    """A client on a memory stream, served as a connection of ``server``."""
    client_end, server_end = trio.testing.memory_stream_pair()
    server.connect(server_end, peer)
    return PopClient(client_end)


async def logged_in(server: pop3d.Server, user: str = "alice", password: str = "wonderland") -> PopClient:
    """A client of ``server`` past the greeting and logged in (the login must succeed)."""
    client = connect(server)
    await client.read_line()
    reply = await client.login(user, password)
    assert reply.startswith(b"+OK"), reply
    return client


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Wait (at most 5 s) until ``predicate()`` holds: state another task changes."""
    with trio.fail_after(5):
        while not predicate():  # noqa: ASYNC110 - polling state that has no event of its own
            await trio.sleep(0.001)
