"""examples/sqlite_backend.py, the custom backend of docs/library.md, works as the page says.

The server listens on 127.0.0.1, port 0; poplib logs in, lists, fetches and
deletes, and the database shows the deletion.  The page's copy of the
example is the file itself.
"""

from __future__ import annotations

import importlib.util
import poplib
import re
import signal
import sqlite3
import subprocess
import sys
import types
from pathlib import Path

import pytest
import trio

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "sqlite_backend.py"
PAGE = ROOT / "docs" / "library.md"
FIRST = b"From: bob@example.org\nSubject: one\n\nfirst\n.dot line\n"
SECOND = b"Subject: two\n\nsecond\n"


def _load() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("sqlite_backend", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


backend = _load()


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "mail.db"
    backend.create(path)
    backend.add_user(path, "alice", "wonderland")
    backend.add_user(path, "bob", "builder")
    backend.deliver(path, "alice", FIRST)
    backend.deliver(path, "alice", SECOND)
    return path


def _uids(path: Path) -> list[str]:
    with sqlite3.connect(path) as db:
        return [row[0] for row in db.execute("SELECT uid FROM messages WHERE user = 'alice' ORDER BY id")]


async def test_poplib_fetches_and_deletes(database: Path) -> None:
    uids = _uids(database)
    server = backend.new_server(database, port=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        await server.up()
        port = server.cget("port")

        def session() -> dict[str, object]:
            seen: dict[str, object] = {}
            pop = poplib.POP3("127.0.0.1", port, timeout=10)
            with pytest.raises(poplib.error_proto, match="-ERR"):
                pop.user("alice")
                pop.pass_("not the password")
            pop.user("alice")
            pop.pass_("wonderland")
            seen["stat"] = pop.stat()
            seen["list"] = pop.list()[1]
            seen["uidl"] = pop.uidl()[1]
            seen["retr"] = pop.retr(1)[1]
            seen["top"] = pop.top(2, 0)[1]
            # While alice's session holds the mailbox, a second one is refused.
            other = poplib.POP3("127.0.0.1", port, timeout=10)
            other.user("alice")
            with pytest.raises(poplib.error_proto, match=r"IN-USE"):
                other.pass_("wonderland")
            other.quit()
            pop.dele(1)
            seen["quit"] = pop.quit()
            # bob has no mail.
            pop = poplib.POP3("127.0.0.1", port, timeout=10)
            pop.user("bob")
            pop.pass_("builder")
            seen["bob"] = pop.stat()
            pop.quit()
            return seen

        with trio.fail_after(30):
            seen = await trio.to_thread.run_sync(session)
        await server.destroy()
    sizes = [len(FIRST.replace(b"\n", b"\r\n")), len(SECOND.replace(b"\n", b"\r\n"))]
    assert seen["stat"] == (2, sum(sizes))
    assert seen["list"] == [b"1 %d" % sizes[0], b"2 %d" % sizes[1]]
    assert seen["uidl"] == [f"1 {uids[0]}".encode(), f"2 {uids[1]}".encode()]
    assert seen["retr"] == [b"From: bob@example.org", b"Subject: one", b"", b"first", b".dot line"]
    assert seen["top"] == [b"Subject: two", b""]
    assert seen["bob"] == (0, 0)
    # The deletion reached the database at QUIT; the other message keeps its UIDL.
    assert _uids(database) == [uids[1]]


def test_script_serves_until_sigterm(tmp_path: Path) -> None:
    """``python examples/sqlite_backend.py mail.db`` makes a demo database and serves it."""
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE), str(tmp_path / "mail.db"), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.fullmatch(r"listening on 127\.0\.0\.1:(\d+)\n", line)
        assert match, (line, proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        pop = poplib.POP3("127.0.0.1", int(match[1]), timeout=10)
        pop.user("alice")
        pop.pass_("wonderland")
        assert pop.retr(1)[1] == [b"Subject: hello", b"", b"Hi Alice!"]
        pop.quit()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_the_page_shows_the_example_as_it_is() -> None:
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert EXAMPLE.read_text() in blocks
