"""A PostgreSQL server of a test's own: Debian's server binaries, a temporary directory.

``initdb`` into a temporary directory as an unprivileged user (``postgres``,
else ``nobody``, when the tests run as root), listening on a free port of the
addresses the test names (127.0.0.1 by default) and on a socket in that
directory, which the test's own statements use.  :meth:`Postgres.remove`
stops it and deletes the directory.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg

from .ports import free_port

BINDIRS = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda path: int(path.split("/")[-2]))
BINDIR = Path(BINDIRS[-1]) if BINDIRS and Path(BINDIRS[-1], "postgres").exists() else None
SKIP_REASON = "PostgreSQL's server binaries are not installed (apt-get install postgresql)"
IS_ROOT = os.geteuid() == 0


class Postgres:
    """A PostgreSQL server of the test's own, run by an unprivileged user."""

    def __init__(self, bindir: Path, hosts: Sequence[str] = ("127.0.0.1",)) -> None:
        self.bindir = bindir
        self.hosts = list(hosts)
        self.port = free_port("0.0.0.0")  # free on every address, so on each of hosts
        self.user = None if not IS_ROOT else ("postgres" if _user_exists("postgres") else "nobody")
        self.dir = Path(tempfile.mkdtemp(prefix="pop3d-pg-"))
        self.proc: subprocess.Popen[bytes] | None = None
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self.log = self.dir / "postgres.log"

    def _as_user(self) -> dict[str, Any]:
        if self.user is None:
            return {}
        entry = pwd.getpwnam(self.user)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def initdb(self) -> None:
        pwfile = self.dir / "superuser-password"
        pwfile.write_text("not-used-by-the-tests\n")
        if self.user is not None:
            shutil.chown(pwfile, self.user)
        subprocess.run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.dir / "data"),
                "-U",
                "admin",
                "--pwfile",
                str(pwfile),
                "--auth-local=trust",  # the test sets up over the socket in its own directory
                "--auth-host=scram-sha-256",  # pop3d logs in over TCP with a password
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
            check=True,
            capture_output=True,
            timeout=60,
            cwd=self.dir,
            **self._as_user(),
        )

    def allow_network(self, network: str) -> None:
        """Let clients from ``network`` (CIDR) log in with a password (initdb allows only loopback)."""
        with (self.dir / "data" / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {network} scram-sha-256\n")

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(self.bindir / "postgres"),
                    "-D",
                    str(self.dir / "data"),
                    "-k",
                    str(self.dir),
                    "-h",
                    ",".join(self.hosts),
                    "-p",
                    str(self.port),
                    "-c",
                    "fsync=off",
                    "-c",
                    "max_connections=30",
                    "-c",
                    "shared_buffers=16MB",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.dir,
                **self._as_user(),
            )
        deadline = time.monotonic() + 20
        while True:
            try:
                psycopg.connect(self.admin_dsn("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("postgres did not start:\n" + self.log.read_text()) from None
                time.sleep(0.05)

    def stop(self) -> None:
        """A fast shutdown: open sessions are ended, as when the database goes down."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def admin_dsn(self, dbname: str) -> str:
        return f"host={self.dir} port={self.port} user=admin dbname={dbname}"

    def dsn(self) -> str:
        """What pop3d is given: TCP to the first address, the reader's name, no password."""
        return f"postgresql://reader@{self.hosts[0]}:{self.port}/mail"

    def sql(self, *statements: str, params: tuple[Any, ...] | None = None, dbname: str = "mail") -> None:
        with psycopg.connect(self.admin_dsn(dbname), autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement.encode(), params)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
