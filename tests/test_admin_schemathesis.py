"""Schemathesis against the live admin API: every answer is one the OpenAPI document lists.

The run is the one docs/admin-api.md prints: its ``schemathesis.toml`` and
its ``schemathesis run ... --checks all`` commands (all checks, a fixed seed,
a bounded number of examples per operation), pointed at an admin API that
Hypercorn serves on 127.0.0.1, port 0 (:func:`pop3d.admin.serve_admin`):
once without a token and once with one.  The API has something real to
show: the server ``pop3`` is up with one logged-in session (``conn1``) and
two penalties, and the server ``scratch``, with a session of its own, is
there to be destroyed (the document's configuration sends
``DELETE /servers/{name}`` to it only).

Rules: loopback only; one worker and the seed make a run repeat; every
wait is bounded.  The run PATCHes random hosts and ports, so in this test
each ``up`` binds 127.0.0.1 on a port the OS chooses, whatever the options
say: the run must neither listen beyond loopback nor take a port that
something else on this host uses.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import sys
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from pop3d.admin import create_app, serve_admin

import pop3d
import pop3d.server

from .popclient import PopClient

DOC = Path(__file__).resolve().parent.parent / "docs" / "admin-api.md"
DOC_URL = "http://127.0.0.1:8110"
TOKEN = "schemathesis-token-5d1e"
PASSWORD = "wonderland-secret"
# The schemathesis of the virtualenv that runs the tests.
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
RUN_TIMEOUT = 120

pytestmark = pytest.mark.skipif(not SCHEMATHESIS.exists(), reason="schemathesis is not installed")


def doc_config() -> str:
    """The ``schemathesis.toml`` that the document prints."""
    blocks = re.findall(r"```toml\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1, "docs/admin-api.md should print one schemathesis.toml"
    return str(blocks[0])


def doc_commands() -> list[str]:
    """Every ``schemathesis run`` command of the document, as printed."""
    blocks = re.findall(r"```sh\n(.*?)```", DOC.read_text(), flags=re.S)
    return [
        line.strip()
        for block in blocks
        for line in re.sub(r"\\\n\s*", "", block).splitlines()
        if line.strip().startswith("schemathesis run ")
    ]


COMMANDS = doc_commands()


@dataclass
class Live:
    """The admin API under test and the servers it shows."""

    url: str
    pop3: pop3d.Server
    scratch: pop3d.Server

    def document(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/openapi.json", timeout=10) as response:
            document: dict[str, Any] = json.load(response)
        return document


Start = Callable[[str | None], Awaitable[Live]]


async def loopback_listeners(host: str | None, port: int) -> list[trio.SocketListener]:
    # Stands in for pop3d.server.open_listeners: the run sets host and port at random.
    return await trio.open_tcp_listeners(0, host="127.0.0.1")


async def login(server: pop3d.Server) -> PopClient:
    stream = await trio.open_tcp_stream("127.0.0.1", server.cget("port"))
    pop = PopClient(stream)
    assert (await pop.read_line()).startswith(b"+OK")
    assert (await pop.login("alice", PASSWORD)).startswith(b"+OK")
    return pop


@pytest.fixture
async def start(nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[Start]:
    """Starts ``pop3`` and ``scratch``, each with a session, and the admin API; stops them after the test."""
    monkeypatch.setattr(pop3d.server, "open_listeners", loopback_listeners)
    made: list[pop3d.Server] = []
    clients: list[PopClient] = []
    stop = trio.Event()

    async def begin(token: str | None) -> Live:
        assert not {"pop3", "scratch"} & set(pop3d.servers()), "another test left its servers behind"
        users = pop3d.MemoryUsers({"alice": (PASSWORD, "alice")})
        for name in ("pop3", "scratch"):
            server = pop3d.new(name)
            made.append(server)
            # A mailbox each: one server's session would lock the other's out.  pop3's is a real
            # Maildir, so that its UIDL report has something to say; scratch's is in memory.
            storage: pop3d.Storage = pop3d.MemoryStorage({"alice": [b"Subject: one\n\nfirst\n"]})
            if name == "pop3":
                for sub in ("cur", "new", "tmp"):
                    (tmp_path / "alice" / sub).mkdir(parents=True)
                (tmp_path / "alice" / "new" / "1700000001.M1P1.test").write_bytes(b"Subject: one\n\nfirst\n")
                storage = pop3d.MaildirStorage(tmp_path)
            server.configure(host="127.0.0.1", port=0, hostname="test.example", auth=users, storage=storage)
            await nursery.start(server.run)
            await server.up()
            clients.append(await login(server))
        pop3, scratch = made
        assert pop3.conn_list() == ["conn1"]
        pop3.cget("penalties").failed("192.0.2.9", "mallory")
        app = create_app(token=token)
        url = await nursery.start(functools.partial(serve_admin, app, "127.0.0.1:0", shutdown_trigger=stop.wait))
        return Live(url, pop3, scratch)

    yield begin
    stop.set()
    with trio.fail_after(10):
        for client in clients:
            await client.stream.aclose()
        for server in made:
            await server.destroy("kill")


def test_the_document_prints_a_run_without_and_with_a_token() -> None:
    assert len(COMMANDS) == 2
    assert ["Bearer $POP3D_ADMIN_TOKEN" in command for command in COMMANDS] == [False, True]
    for command in COMMANDS:
        assert command.startswith(f"schemathesis run {DOC_URL}/openapi.json --checks all ")
        assert re.search(r"--max-examples \d+ --seed \d+", command)
    config = doc_config()
    assert "workers = 1" in config  # one request at a time: the seed repeats the run


@pytest.mark.parametrize("command", COMMANDS, ids=["no-token", "token"])
async def test_schemathesis_finds_nothing(start: Start, command: str, tmp_path: Path) -> None:
    live = await start(TOKEN if "Bearer" in command else None)
    document = await trio.to_thread.run_sync(live.document)
    operations = sum(len(item) for item in document["paths"].values())
    (tmp_path / "schemathesis.toml").write_text(doc_config())
    env = {
        **os.environ,
        "PATH": f"{SCHEMATHESIS.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "POP3D_ADMIN_TOKEN": TOKEN,
        "NO_COLOR": "1",
        "COLUMNS": "120",
    }
    with trio.fail_after(RUN_TIMEOUT):
        result = await trio.run_process(
            [shutil.which("bash") or "/bin/bash", "-c", command.replace(DOC_URL, live.url)],
            cwd=tmp_path,  # where it finds the schemathesis.toml; no example database is kept
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, output
    assert "No issues found" in output, output
    # Every operation was tried, and the run reached the real things rather than only 404s.
    assert f"{operations} selected / {operations} total" in output, output
    assert live.scratch.destroyed
