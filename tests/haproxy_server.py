"""The real HAProxy with ``deploy/cluster/haproxy.cfg`` as shipped, but for its addresses.

:func:`shipped_config` points the two front ends and the three servers of
each back end at the test's own addresses; :func:`running_haproxy` starts
HAProxy on such a file, waits (bounded) until it accepts, and stops it on
exit whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

HAPROXY_CFG = Path(__file__).resolve().parent.parent / "deploy" / "cluster" / "haproxy.cfg"
HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
SKIP_REASON = "haproxy is not installed (.ci/run installs it)"


def shipped_config(front: str, front_tls: str, pop3: Sequence[str], pop3s: Sequence[str]) -> str:
    """``haproxy.cfg`` as shipped, with its front ends on ``front`` and ``front_tls`` (``HOST:PORT``).

    Server *n* of the POP3 back end goes to ``pop3[n]``, of the POP3S back end
    to ``pop3s[n]``, whose health check goes to ``pop3[n]``'s port.
    """
    text = HAPROXY_CFG.read_text()
    text = text.replace("bind :110\n", f"bind {front}\n").replace("bind :995\n", f"bind {front_tls}\n")
    for number, (plain, tls) in enumerate(zip(pop3, pop3s, strict=True), start=1):
        text = text.replace(f"127.0.0.1:110{number}\n", f"{plain}\n")
        text = text.replace(f"127.0.0.1:995{number} ", f"{tls} ")
        text = text.replace(f"port 110{number}\n", f"port {plain.rsplit(':', 1)[1]}\n")
    if os.geteuid() != 0:
        text = re.sub(r"^\s+(user|group) haproxy\n", "", text, flags=re.M)
    # Every shipped address replaced: the servers, their check ports, the front ends.
    servers = re.findall(r"^\s+server \S+ (\S+)", text, flags=re.M)
    checks = re.findall(r" port (\d+)$", text, flags=re.M)
    assert servers == [*pop3, *pop3s] and checks == [plain.rsplit(":", 1)[1] for plain in pop3], text
    assert "bind :" not in text, text
    return text


@contextlib.contextmanager
def running_haproxy(config: Path, front: tuple[str, int], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """HAProxy on ``config`` in the foreground, its log in ``log``, once ``front`` accepts."""
    assert HAPROXY is not None, SKIP_REASON
    with log.open("wb") as output:
        haproxy = subprocess.Popen([HAPROXY, "-f", str(config), "-db"], stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(front, timeout=1).close()
                break
            except OSError:
                if haproxy.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("haproxy did not start:\n" + log.read_text()[-2000:]) from None
                time.sleep(0.05)
        yield haproxy
    finally:
        haproxy.terminate()
        try:
            haproxy.wait(10)
        except subprocess.TimeoutExpired:
            haproxy.kill()
            haproxy.wait(10)
