"""Run ``pop3d serve`` as a real subprocess for end-to-end tests.

The process listens on ``127.0.0.1:0``; the ports it got are read from its
``ready`` log line.  Everything is bounded in time, and the process is
killed if a test leaves it running.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

READY = re.compile(r"ready (?P<pop3>.*?) admin=(?P<admin>\S+)")

# Tests run as root in CI: pop3d serves mail as root only when told to.
AS_ROOT = {"POP3D_ALLOW_ROOT": "true"} if os.geteuid() == 0 else {}

WELCOME = b"From: a@example.org\nSubject: first\n\nHello,\n.dot line\nbye\n"
SECOND = b"From: b@example.org\nSubject: second\n\nSecond message.\n"


def pop3d_cli(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ``pop3d`` command to completion."""
    return subprocess.run(
        [sys.executable, "-m", "pop3d", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **AS_ROOT, **(env or {})},
    )


def make_site(root: Path) -> Path:
    """A passwd-file with alice (ARGON2ID, added by the CLI) and bob (PLAIN), and their Maildirs."""
    users = root / "users"
    users.write_text("# test users\nbob:{PLAIN}builder\n")
    result = pop3d_cli("user", "add", "alice", "--users", str(users), stdin="wonderland\n")
    assert result.returncode == 0, result.stderr
    for user, messages in (("alice", [WELCOME, SECOND]), ("bob", [])):
        for sub in ("cur", "new", "tmp"):
            (root / "mail" / user / sub).mkdir(parents=True)
        for number, data in enumerate(messages):
            (root / "mail" / user / "new" / f"17000000{number:02d}.M{number}P1.test").write_bytes(data)
    return root


def serve_args(site: Path, *extra: str) -> list[str]:
    """Flags for ``pop3d serve`` on a free loopback port over the site of :func:`make_site`."""
    return ["--listen", "127.0.0.1:0", "--users", str(site / "users"), "--mail-root", str(site / "mail"), *extra]


def mail_files(site: Path, user: str = "alice") -> list[str]:
    """The message files of ``user``'s Maildir."""
    box = site / "mail" / user
    return sorted(p.name for sub in ("new", "cur") for p in (box / sub).iterdir())


class ServeProcess:
    """A ``pop3d serve`` process and what it logged."""

    def __init__(
        self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, prefix: Sequence[str] = ()
    ) -> None:
        """Start ``pop3d serve ARGS``; ``prefix`` goes before the command (``ip netns exec NS``, say)."""
        full_env = dict(os.environ)
        full_env.pop("POP3D_ADMIN_TOKEN", None)
        full_env.update(AS_ROOT)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "pop3d", "serve", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=full_env,
            cwd=cwd,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.pop3: dict[str, tuple[str, int]] = {}
        self.admin: str | None = None

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        """The first logged line (old or new) matching ``pattern``."""
        regex = re.compile(pattern)
        for line in self.lines:
            if match := regex.search(line):
                return match
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no line matching {pattern!r}; got:\n" + "\n".join(self.lines))
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise EOFError(f"process ended before {pattern!r}; got:\n" + "\n".join(self.lines))
            self.lines.append(line)
            if match := regex.search(line):
                return match

    def wait_ready(self) -> ServeProcess:
        match = self.wait_for(READY.pattern)
        for item in match["pop3"].split():
            name, _, address = item.partition("=")
            host, _, port = address.rpartition(":")
            self.pop3[name] = (host.strip("[]"), int(port))
        self.admin = None if match["admin"] == "off" else match["admin"]
        return self

    @property
    def port(self) -> int:
        return self.pop3["pop3"][1]

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 30) -> int:
        code = self.proc.wait(timeout)
        # Collect what is left of the log.
        while True:
            try:
                line = self._queue.get(timeout=5)
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
