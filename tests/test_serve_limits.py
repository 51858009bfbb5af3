"""End to end: the limits and the privileges of ``pop3d serve``, and HAProxy in front.

``pop3d serve`` runs as a subprocess on ``127.0.0.1:0``; HAProxy (Debian's,
installed by ``.ci/run``) runs in front of it with ``send-proxy-v2``.  Raw
sockets bound to 127.0.0.2 play a client at another address.
"""

from __future__ import annotations

import os
import poplib
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .serve_process import WELCOME, ServeProcess, make_site, pop3d_cli, serve_args

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
ROOT = os.geteuid() == 0


class LineClient:
    """A blocking POP3 client over a socket from a chosen source address."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        self.file = self.sock.makefile("rb")

    def line(self) -> bytes:
        return self.file.readline()

    def command(self, text: str) -> bytes:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.line()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def test_limits_from_flags(site: Path) -> None:
    args = serve_args(site, "--no-admin", "--max-connections-per-ip", "1", "--login-timeout", "1")
    with ServeProcess(*args) as proc:
        proc.wait_ready()
        first = LineClient(proc.port)
        assert first.line().startswith(b"+OK")
        second = LineClient(proc.port)
        assert second.line() == b"-ERR [SYS/TEMP] too many connections from your address\r\n"
        started = time.monotonic()
        assert first.line() == b"-ERR took too long to log in, closing connection\r\n"
        assert time.monotonic() - started < 5
        first.close()
        second.close()


def test_limits_from_the_environment_and_toml(site: Path) -> None:
    config = site / "pop3d.toml"
    config.write_text("penalty-max = 1\nlogin-failure-delay = 0\nmax-auth-failures = 10\n")
    env = {"POP3D_MAX_USERIP_CONNECTIONS": "1"}
    with ServeProcess(*serve_args(site, "--no-admin", "--config", str(config)), env=env) as proc:
        proc.wait_ready()
        pop = poplib.POP3("127.0.0.1", proc.port, timeout=20)
        waits = []
        for _ in range(3):
            started = time.monotonic()
            pop.user("alice")
            with pytest.raises(poplib.error_proto):
                pop.pass_("wrong")
            waits.append(time.monotonic() - started)
        # 0, then 1 and 1: uncapped they would be 2 and 4 (a hash check adds a little to each).
        assert waits[0] < 0.8 and 0.9 < waits[1] < 1.9 and 0.9 < waits[2] < 1.9
        pop.user("alice")
        pop.pass_("wonderland")
        second = poplib.POP3("127.0.0.1", proc.port, timeout=20)
        second.user("alice")
        with pytest.raises(poplib.error_proto, match="IN-USE"):
            second.pass_("wonderland")
        second.quit()
        pop.quit()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"POP3D_MAIL_ROT": "/var/mail"}, "POP3D_MAIL_ROT: unknown setting"),
        ({"POP3D_MAX_CONNECTIONS": "0"}, "max-connections: Input should be greater than or equal to 1"),
        ({"POP3D_PROXY_PROTOCOL_FROM": "10.0.0.1/8"}, "proxy-protocol-from: 10.0.0.1/8 has host bits set"),
        ({"POP3D_USER": "no-such-user-here"}, "user: no such user 'no-such-user-here'"),
    ],
)
def test_bad_limits_are_one_line_errors(site: Path, env: dict[str, str], message: str) -> None:
    result = pop3d_cli("serve", *serve_args(site, "--no-admin"), env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"pop3d: error: {message}", result.stderr


@pytest.mark.skipif(not ROOT, reason="only root can be refused as root, or drop privileges")
def test_root_is_refused_unless_told(site: Path) -> None:
    result = pop3d_cli("serve", *serve_args(site, "--no-admin"), env={"POP3D_ALLOW_ROOT": "false"})
    assert result.returncode == 2
    assert result.stderr.strip().startswith("pop3d: error: refusing to serve mail as root")


@pytest.mark.skipif(not ROOT, reason="dropping privileges needs root")
def test_binds_as_root_then_runs_as_the_user() -> None:
    nobody = pwd.getpwnam("nobody")
    # Not under pytest's tmp_path, whose parents only root may enter.
    with tempfile.TemporaryDirectory(prefix="pop3d-nobody-") as top:
        os.chmod(top, 0o755)
        site = make_site(Path(top))
        for path in [site, *site.rglob("*")]:
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        run_as_nobody(site, nobody.pw_uid, nobody.pw_gid)


def run_as_nobody(site: Path, uid: int, gid: int) -> None:
    with ServeProcess(*serve_args(site, "--no-admin", "--user", "nobody"), env={"POP3D_ALLOW_ROOT": "false"}) as proc:
        proc.wait_ready()
        status = Path(f"/proc/{proc.proc.pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1:] == [str(uid)] * 4
        groups = next(line for line in status.splitlines() if line.startswith("Groups:"))
        # The user's own groups (as initgroups gives them), none of root's.
        assert {int(g) for g in groups.split()[1:]} == set(os.getgrouplist("nobody", gid))
        pop = poplib.POP3("127.0.0.1", proc.port, timeout=10)
        pop.user("alice")
        pop.pass_("wonderland")
        assert pop.retr(1)[1] == WELCOME.split(b"\n")[:-1]
        pop.quit()


# -- behind HAProxy ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def behind_haproxy(site: Path, tmp_path: Path) -> Iterator[tuple[ServeProcess, int]]:
    if HAPROXY is None:
        pytest.skip("haproxy is not installed (.ci/run installs it)")
    args = serve_args(site, "--no-admin", "--proxy-protocol-from", "127.0.0.1/32", "--login-timeout", "2")
    with ServeProcess(*args) as proc:
        proc.wait_ready()
        front = free_port()
        config = tmp_path / "haproxy.cfg"
        config.write_text(
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n"
            f"frontend pop3\n  bind 127.0.0.1:{front}\n  default_backend pop3d\n"
            "backend pop3d\n  option tcp-check\n  tcp-check expect string +OK\n"
            f"  server pop3d 127.0.0.1:{proc.port} send-proxy-v2 check check-send-proxy inter 1s\n"
        )
        haproxy = subprocess.Popen(
            [HAPROXY, "-f", str(config), "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    socket.create_connection(("127.0.0.1", front), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline and haproxy.poll() is None, "haproxy did not start"
                    time.sleep(0.05)
            yield proc, front
        finally:
            haproxy.terminate()
            haproxy.wait(10)


def test_haproxy_passes_the_real_client(behind_haproxy: tuple[ServeProcess, int]) -> None:
    proc, front = behind_haproxy
    client = LineClient(front, source="127.0.0.2")
    assert client.line().startswith(b"+OK POP3")
    assert client.command("USER alice").startswith(b"+OK")
    assert client.command("PASS wrong").startswith(b"-ERR [AUTH]")
    client.close()
    proc.wait_for(r"from 127\.0\.0\.2: login failed for alice")
    # HAProxy's health checks send a LOCAL header: sessions of the proxy's own address, which find +OK.
    proc.wait_for(r"user=- remote=127\.0\.0\.1:\d+ ")


def test_without_haproxy_no_header_no_service(behind_haproxy: tuple[ServeProcess, int]) -> None:
    proc, _ = behind_haproxy
    # From the trusted address but with no header: closed without a word.
    direct = LineClient(proc.port)
    direct.sock.settimeout(20)
    assert direct.line() == b""
    direct.close()
    # From anywhere else, a PROXY header of its own is refused.
    forger = LineClient(proc.port, source="127.0.0.2")
    assert forger.line().startswith(b"+OK")
    forger.sock.sendall(b"PROXY TCP4 203.0.113.1 127.0.0.1 1 110\r\n")
    assert forger.line() == b"-ERR PROXY protocol header not accepted from your address\r\n"
    forger.close()
