"""A pop3d backend on SQLite: users and their messages in one database file.

The two callbacks of a server object, written as plain synchronous classes
and plugged in with :func:`pop3d.sync_auth` and :func:`pop3d.sync_storage`
(every call then runs in a worker thread, so a slow query never blocks the
server).  Passwords are stored as scrypt hashes, so the auth callback hands
the server a :class:`pop3d.HashedPassword` rather than the password.

Run it with ``python examples/sqlite_backend.py mail.db``: it makes the
database if needed (with the user ``alice``, password ``wonderland``, and two
messages), serves it on 127.0.0.1:1110 (``--port`` to change; 0 lets the OS
choose) and prints ``listening on 127.0.0.1:PORT``.  Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import os
import signal
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

import pop3d
from pop3d.message import canonical_size

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    salt BLOB NOT NULL,
    hash BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id   INTEGER PRIMARY KEY,              -- delivery order
    user TEXT NOT NULL REFERENCES users(name),
    uid  TEXT NOT NULL UNIQUE,             -- the UIDL: never reused
    size INTEGER NOT NULL,                 -- octets as sent: CRLF line ends
    data BLOB NOT NULL
);
"""


def _scrypt(password: str, salt: bytes) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1)


@contextlib.contextmanager
def connect(path: Path) -> Iterator[sqlite3.Connection]:
    """One connection per call: each callback runs in a worker thread of its own."""
    db = sqlite3.connect(path, timeout=10)
    try:
        with db:  # commit, or roll back on an exception
            yield db
    finally:
        db.close()


def create(path: Path) -> None:
    """Make the tables, if they are not there yet."""
    with connect(path) as db:
        db.executescript(SCHEMA)


def add_user(path: Path, name: str, password: str) -> None:
    """Add a user, with an scrypt hash of the password."""
    salt = os.urandom(16)
    with connect(path) as db:
        db.execute("INSERT INTO users (name, salt, hash) VALUES (?, ?, ?)", (name, salt, _scrypt(password, salt)))


def deliver(path: Path, user: str, message: bytes) -> str:
    """Store a message for ``user``; returns its UIDL."""
    uid = os.urandom(8).hex()
    with connect(path) as db:
        db.execute(
            "INSERT INTO messages (user, uid, size, data) VALUES (?, ?, ?, ?)",
            (user, uid, canonical_size(message), message),
        )
    return uid


@dataclass(frozen=True)
class ScryptPassword:
    """A stored password that can be checked, not read: a :class:`pop3d.HashedPassword`."""

    salt: bytes
    hash: bytes

    async def verify(self, password: str) -> bool:
        # scrypt takes tens of milliseconds of CPU: off the event loop.
        candidate = await trio.to_thread.run_sync(_scrypt, password, self.salt)
        return hmac.compare_digest(candidate, self.hash)


class SqliteAuth:
    """The auth callback: ``lookup(name)`` gives the password and the mailbox (here, the user name)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lookup(self, name: str) -> tuple[ScryptPassword, str] | None:
        with connect(self.path) as db:
            row = db.execute("SELECT salt, hash FROM users WHERE name = ?", (name,)).fetchone()
        return None if row is None else (ScryptPassword(row[0], row[1]), name)


class SqliteStorage:
    """The storage callback.

    Message numbers must stay fixed for a session, so ``lock`` takes a
    snapshot of the mailbox's message ids, and the other calls number
    messages by it.  The lock is held in this process: two pop3d processes
    on one database would need a lock in the database too.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._guard = threading.Lock()
        self._views: dict[str, list[int]] = {}  # locked mailbox -> its message ids at login

    def lock(self, mbox: str) -> bool:
        with connect(self.path) as db:
            ids = [row[0] for row in db.execute("SELECT id FROM messages WHERE user = ? ORDER BY id", (mbox,))]
        with self._guard:
            if mbox in self._views:
                return False  # another session has it: the client gets -ERR [IN-USE]
            self._views[mbox] = ids
            return True

    def unlock(self, mbox: str) -> None:
        with self._guard:
            self._views.pop(mbox, None)

    def _id(self, mbox: str, msg: int) -> int:
        return self._views[mbox][msg - 1]

    def _column(self, column: str, mbox: str, msg: int) -> Any:
        with connect(self.path) as db:
            row = db.execute(f"SELECT {column} FROM messages WHERE id = ?", (self._id(mbox, msg),)).fetchone()
        if row is None:
            raise KeyError(f"message {msg} of {mbox} is gone")  # the client gets -ERR [SYS/TEMP]
        return row[0]

    def stat(self, mbox: str) -> int:
        return len(self._views[mbox])

    def size(self, mbox: str, msg: int | None = None) -> int:
        if msg is None:
            return sum(self.size(mbox, n) for n in range(1, self.stat(mbox) + 1))
        return int(self._column("size", mbox, msg))

    def listing(self, mbox: str) -> tuple[list[int], list[str]]:
        """Optional: every size and UIDL in one query, instead of a ``size`` call per message."""
        ids = self._views[mbox]
        with connect(self.path) as db:
            rows = {
                row[0]: (row[1], row[2])
                for row in db.execute("SELECT id, size, uid FROM messages WHERE user = ?", (mbox,))
            }
        return [rows[i][0] for i in ids], [rows[i][1] for i in ids]

    def get(self, mbox: str, msg: int) -> bytes:
        return bytes(self._column("data", mbox, msg))

    def uidl(self, mbox: str, msg: int) -> str:
        return str(self._column("uid", mbox, msg))

    def dele(self, mbox: str, msgs: Sequence[int]) -> None:
        # Called once, at QUIT, with every message marked: one transaction.
        with connect(self.path) as db:
            db.executemany("DELETE FROM messages WHERE id = ?", [(self._id(mbox, n),) for n in msgs])


def new_server(path: Path, port: int = 1110) -> pop3d.Server:
    """A server object over the database at ``path``, on 127.0.0.1."""
    server = pop3d.new()
    server.configure(
        host="127.0.0.1",
        port=port,
        auth=pop3d.sync_auth(SqliteAuth(path)),
        storage=pop3d.sync_storage(SqliteStorage(path)),
    )
    return server


async def serve(path: Path, port: int) -> None:
    """Serve until SIGINT (Ctrl-C) or SIGTERM."""
    server = new_server(path, port)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            await server.up()
            print(f"listening on 127.0.0.1:{server.cget('port')}", flush=True)
            async for _ in signals:
                break
            await server.destroy()  # open sessions are closed; their deletions are not applied


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve users and mail from a SQLite database.")
    parser.add_argument("database", type=Path)
    parser.add_argument("--port", type=int, default=1110)
    args = parser.parse_args()
    fresh = not args.database.exists()
    create(args.database)
    if fresh:
        add_user(args.database, "alice", "wonderland")
        deliver(args.database, "alice", b"Subject: hello\n\nHi Alice!\n")
        deliver(args.database, "alice", b"Subject: again\n\nStill here.\n")
    trio.run(serve, args.database, args.port)


if __name__ == "__main__":
    main()
