"""Debian's etcd (``/usr/bin/etcd``, package ``etcd-server``), run by a test on ports of its own.

One member, a temporary data directory, client URLs on the addresses the test
names (loopback by default), killed at the end whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .ports import free_port

ETCD = shutil.which("etcd") or ("/usr/bin/etcd" if os.path.exists("/usr/bin/etcd") else None)
SKIP_REASON = "etcd is not installed (Debian: apt-get install etcd-server)"


@dataclass
class Etcd:
    """A running etcd: its client URLs, one per listening address, and its process."""

    urls: list[str]
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return self.urls[0]

    def stop(self) -> None:
        """Pause etcd: it neither answers nor expires leases until :meth:`cont`.

        Returns once every thread is stopped: SIGSTOP is delivered to a Go
        process's threads one by one, and one still running can answer.
        """
        self.proc.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while not _all_threads_stopped(self.proc.pid):
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd (pid {self.proc.pid}) did not stop within 5 s")
            time.sleep(0.001)

    def cont(self) -> None:
        self.proc.send_signal(signal.SIGCONT)


def _all_threads_stopped(pid: int) -> bool:
    """Whether every thread of ``pid`` is in state T (stopped), as /proc shows it."""
    tasks = Path(f"/proc/{pid}/task")
    states = []
    for task in tasks.iterdir():
        try:
            stat = (task / "stat").read_text()
        except FileNotFoundError:
            continue  # a thread that just ended
        states.append(stat.rsplit(")", 1)[1].split()[0])  # the field after "(comm)"
    return bool(states) and all(state == "T" for state in states)


@contextlib.contextmanager
def running_etcd(data: Path, hosts: Sequence[str] = ("127.0.0.1",)) -> Iterator[Etcd]:
    """etcd listening for clients on one free port on each of ``hosts``; killed on exit."""
    assert ETCD is not None, SKIP_REASON
    client = free_port("0.0.0.0")  # free on every address, so on each of hosts
    peer = free_port()
    urls = [f"http://{host}:{client}" for host in hosts]
    log = data / "etcd.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [
                ETCD,
                "--name=test",
                f"--data-dir={data / 'data'}",
                f"--listen-client-urls={','.join(urls)}",
                f"--advertise-client-urls={','.join(urls)}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=test=http://127.0.0.1:{peer}",
                "--log-level=error",
            ],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection((hosts[0], client), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("etcd did not start: " + log.read_text()[-2000:]) from None
                time.sleep(0.05)
        yield Etcd(urls, proc)
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait(10)
