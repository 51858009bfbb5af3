"""Benchmarks: report figures for ``pop3d serve`` under load on loopback.

    python bench/run.py [--sessions 2000] [--concurrency 50] [--big-mb 50]

Starts ``pop3d serve`` as a subprocess on 127.0.0.1 with a generated
passwd-file and Maildirs in a temporary directory, then measures from this
process (a Trio client):

- logins per second: USER/PASS/STAT/QUIT sessions, ``--concurrency`` at once;
- RETR throughput of one ``--big-mb`` MB message, and the server's peak RSS
  while streaming it (it must not hold the message in memory);
- a 100,000-message mailbox: time of the first and the second login.

With ``--dovecot`` it measures Dovecot (as Debian configures it, with the
same passwd-file and Maildirs) the same way, for comparison.

It prints figures; it asserts nothing.  Every loop is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

HERE = Path(__file__).resolve().parent


def peak_rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", text)
    return int(match.group(1)) / 1024 if match else float("nan")


def reset_peak_rss(pid: int) -> None:
    # Writing 5 to clear_refs resets VmHWM (Linux 4.0+), so the peak is this step's.
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(match.group(1)) / 1024 if match else float("nan")


class Client:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def line(self) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            data = await self.stream.receive_some(262144)
            if not data:
                raise EOFError
            self.buffer += data
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        return line

    async def command(self, text: str) -> bytes:
        await self.stream.send_all(text.encode() + b"\r\n")
        reply = await self.line()
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"{text!r}: {reply!r}")
        return reply

    async def drain_multiline(self) -> int:
        total = 0
        while True:
            end = self.buffer.find(b"\r\n.\r\n")
            if end >= 0:
                total += end + 5
                del self.buffer[: end + 5]
                return total
            keep = min(len(self.buffer), 4)
            total += len(self.buffer) - keep
            del self.buffer[: len(self.buffer) - keep]
            data = await self.stream.receive_some(262144)
            if not data:
                raise EOFError
            self.buffer += data


async def session(port: int, user: str) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        client = Client(stream)
        await client.line()
        await client.command(f"USER {user}")
        await client.command("PASS pw")
        await client.command("STAT")
        await client.command("QUIT")


async def logins(port: int, users: list[str], sessions: int, concurrency: int) -> float:
    limiter = trio.CapacityLimiter(concurrency)

    async def one(n: int) -> None:
        async with limiter:
            await session(port, users[n % len(users)])

    start = time.perf_counter()
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            for n in range(sessions):
                nursery.start_soon(one, n)
    return sessions / (time.perf_counter() - start)


async def retr_big(port: int, pid: int) -> tuple[float, float, float]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        client = Client(stream)
        await client.line()
        await client.command("USER big")
        await client.command("PASS pw")
        before = rss_mb(pid)
        reset_peak_rss(pid)
        start = time.perf_counter()
        await client.command("RETR 1")
        size = await client.drain_multiline()
        elapsed = time.perf_counter() - start
        await client.command("QUIT")
    return size / elapsed / 1e6, before, peak_rss_mb(pid)


async def login_time(port: int, user: str) -> float:
    start = time.perf_counter()
    await session(port, user)
    return time.perf_counter() - start


def make_site(root: Path, users: int, big_mb: int, many: int) -> None:
    lines = [f"u{n}:{{PLAIN}}pw" for n in range(users)] + ["big:{PLAIN}pw", "many:{PLAIN}pw"]
    (root / "users").write_text("\n".join(lines) + "\n")
    for n in range(users):
        box = root / "mail" / f"u{n}"
        for sub in ("cur", "new", "tmp"):
            (box / sub).mkdir(parents=True)
        for m in range(5):
            (box / "new" / f"1700000000.M{m}P{n}.bench").write_bytes(b"Subject: x\n\n" + b"hello\n" * 200)
    box = root / "mail" / "big"
    for sub in ("cur", "new", "tmp"):
        (box / sub).mkdir(parents=True)
    line = b"x" * 76 + b"\n"
    with (box / "new" / "1700000000.M1P1.big").open("wb") as file:
        file.write(b"Subject: big\n\n")
        for _ in range(big_mb * 1_000_000 // len(line)):
            file.write(line)
    box = root / "mail" / "many"
    for sub in ("cur", "new", "tmp"):
        (box / sub).mkdir(parents=True)
    for m in range(many):
        (box / "new" / f"{1700000000 + m}.M{m}P1.many").write_bytes(b"Subject: m\n\nbody\n")


DOVECOT_CONF = """\
base_dir = {root}/dovecot-run
state_dir = {root}/dovecot-run/state
log_path = {root}/dovecot.log
protocols = pop3
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {root}/users
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={root}/mail/%u
}}
mail_location = maildir:{root}/mail/%u
pop3_uidl_format = %f
service pop3-login {{
  inet_listener pop3 {{
    port = {port}
  }}
}}
"""


def start_pop3d(root: Path) -> tuple[subprocess.Popen[bytes], int, Callable[[], None]]:
    """``pop3d serve`` on a free port over the test data."""
    log_path = root / "serve.log"
    command = [sys.executable, "-m", "pop3d", "serve", "--listen", "127.0.0.1:0", "--no-admin"]
    command += ["--users", str(root / "users"), "--mail-root", str(root / "mail")]
    if os.geteuid() == 0:
        command.append("--allow-root")  # a benchmark's throw-away data
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(command, stderr=log_file)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if match := re.search(r"ready pop3=\S+:(\d+)", log_path.read_text()):
            port = int(match.group(1))

            def stop() -> None:
                proc.terminate()
                proc.wait(30)

            return proc, port, stop
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("pop3d did not start:\n" + log_path.read_text())


def start_dovecot(root: Path) -> tuple[subprocess.Popen[bytes], int, Callable[[], None]]:
    """Dovecot as Debian configures it by default, over the same data (needs root)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (root / "dovecot-run" / "state").mkdir(parents=True)
    conf = root / "dovecot.conf"
    conf.write_text(DOVECOT_CONF.format(root=root, port=port))
    subprocess.run(["chown", "-R", "nobody:nogroup", str(root / "mail")], check=True)
    # Dovecot's auth and mail processes run as other users: let them in.
    root.chmod(0o755)
    (root / "users").chmod(0o644)
    proc = subprocess.Popen(["dovecot", "-F", "-c", str(conf)], stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)

    def stop() -> None:
        subprocess.run(["dovecot", "-c", str(conf), "stop"], check=False)
        proc.wait(30)
        subprocess.run(["chown", "-R", "root:root", str(root / "mail")], check=False)

    return proc, port, stop


def measure(name: str, root: Path, start: Callable[[Path], tuple[Any, int, Callable[[], None]]], args: Any) -> None:
    proc, port, stop = start(root)
    try:
        first = trio.run(login_time, port, "many")
        second = trio.run(login_time, port, "many")
        rate = trio.run(logins, port, [f"u{n}" for n in range(100)], args.sessions, args.concurrency)
        mbps, before, peak = trio.run(retr_big, port, proc.pid)
    finally:
        stop()
    memory = f"server RSS {before:.0f} MB, peak {peak:.0f} MB" if name == "pop3d" else "(RSS: one process a session)"
    print(f"{name}:")
    print(f"  logins (USER/PASS/STAT/QUIT), {args.concurrency} at once: {rate:,.0f} sessions/s")
    print(f"  RETR of a {args.big_mb} MB message: {mbps:,.1f} MB/s; {memory}")
    print(f"  {args.many:,}-message mailbox: first login {first:.2f} s, second login {second:.2f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--big-mb", type=int, default=50)
    parser.add_argument("--many", type=int, default=100_000)
    parser.add_argument("--dovecot", action="store_true", help="also measure Dovecot (installed, run as root)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp:
        root = Path(tmp)
        print(f"making test data in {root} ...", flush=True)
        make_site(root, users=100, big_mb=args.big_mb, many=args.many)
        measure("pop3d", root, start_pop3d, args)
        if args.dovecot:
            if shutil.which("dovecot") is None:
                raise SystemExit("dovecot is not installed (apt-get install dovecot-pop3d)")
            measure("dovecot", root, start_dovecot, args)


if __name__ == "__main__":
    main()
