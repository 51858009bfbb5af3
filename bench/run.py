"""Benchmarks: report figures for ``pop3d serve`` under load on loopback.

    python bench/run.py [--sessions 2000] [--concurrency 50] [--big-mb 50]

Starts ``pop3d serve`` as a subprocess on 127.0.0.1 with a generated
passwd-file and Maildirs in a temporary directory, then measures from this
process (a Trio client):

- logins per second: USER/PASS/STAT/QUIT sessions, ``--concurrency`` at once;
- RETR throughput of one ``--big-mb`` MB message, and the server's peak RSS
  while streaming it (it must not hold the message in memory);
- a 100,000-message mailbox: time of the first and the second login.

It prints figures; it asserts nothing.  Every loop is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--big-mb", type=int, default=50)
    parser.add_argument("--many", type=int, default=100_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp:
        root = Path(tmp)
        print(f"making test data in {root} ...", flush=True)
        make_site(root, users=100, big_mb=args.big_mb, many=args.many)
        log_path = root / "serve.log"
        with log_path.open("w") as log_file:
            command = [sys.executable, "-m", "pop3d", "serve", "--listen", "127.0.0.1:0", "--no-admin"]
            command += ["--users", str(root / "users"), "--mail-root", str(root / "mail")]
            proc = subprocess.Popen(
                command,
                stderr=log_file,
            )
        try:
            port = 0
            deadline = time.monotonic() + 60
            while not port and time.monotonic() < deadline and proc.poll() is None:
                if match := re.search(r"ready pop3=\S+:(\d+)", log_path.read_text()):
                    port = int(match.group(1))
                time.sleep(0.05)
            if not port:
                raise SystemExit("the server did not start:\n" + log_path.read_text())
            first = trio.run(login_time, port, "many")
            second = trio.run(login_time, port, "many")
            rate = trio.run(logins, port, [f"u{n}" for n in range(100)], args.sessions, args.concurrency)
            mbps, before, peak = trio.run(retr_big, port, proc.pid)
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"logins (USER/PASS/STAT/QUIT), {args.concurrency} at once: {rate:,.0f} sessions/s")
    print(f"RETR of a {args.big_mb} MB message: {mbps:,.1f} MB/s; server RSS {before:.0f} MB, peak {peak:.0f} MB")
    print(f"{args.many:,}-message mailbox: first login {first:.2f} s, second login {second:.2f} s")


if __name__ == "__main__":
    main()
