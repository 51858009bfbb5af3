"""End to end: the ``pop3d`` command as a subprocess, with real clients.

``pop3d serve`` runs on ``127.0.0.1:0`` with a real passwd-file and real
Maildirs in a temporary directory; poplib and curl fetch and delete mail.
"""

from __future__ import annotations

import os
import poplib
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .serve_process import SECOND, WELCOME, ServeProcess, mail_files, pop3d_cli, serve_args

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed (.ci/run installs it)")


@pytest.fixture
def server(site: Path) -> Iterator[ServeProcess]:
    with ServeProcess(*serve_args(site, "--no-admin", "--grace-period", "10")) as proc:
        yield proc.wait_ready()


def test_poplib_retrieves_and_deletes(server: ServeProcess, site: Path) -> None:
    pop = poplib.POP3("127.0.0.1", server.port, timeout=10)
    pop.user("alice")
    pop.pass_("wonderland")
    assert pop.stat() == (2, len(WELCOME) + WELCOME.count(b"\n") + len(SECOND) + SECOND.count(b"\n"))
    assert pop.retr(1)[1] == WELCOME.split(b"\n")[:-1]
    first, second = (line.split()[1] for line in pop.uidl()[1])
    assert first != second
    pop.dele(1)
    pop.quit()
    assert len(mail_files(site)) == 1
    # The UIDL of what is left is the same in the next session.
    pop = poplib.POP3("127.0.0.1", server.port, timeout=10)
    pop.user("alice")
    pop.pass_("wonderland")
    assert [line.split()[1] for line in pop.uidl()[1]] == [second]
    pop.quit()


def test_bad_password_and_no_apop_by_default(server: ServeProcess) -> None:
    pop = poplib.POP3("127.0.0.1", server.port, timeout=10)
    assert b"<" not in pop.getwelcome()  # no challenge: clients use USER/PASS, as with Dovecot
    pop.user("alice")
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        pop.pass_("wrong")
    pop.quit()


def test_apop_when_enabled(site: Path) -> None:
    with ServeProcess(*serve_args(site, "--no-admin", "--apop")) as proc:
        proc.wait_ready()
        pop = poplib.POP3("127.0.0.1", proc.port, timeout=10)
        assert pop.apop("bob", "builder").startswith(b"+OK")  # APOP works for {PLAIN}
        pop.quit()
        pop = poplib.POP3("127.0.0.1", proc.port, timeout=10)
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            pop.apop("alice", "wonderland")  # a hashed password cannot check a digest
        pop.quit()


@needs_curl
def test_curl_retrieves_and_deletes(server: ServeProcess, site: Path) -> None:
    url = f"pop3://alice:wonderland@127.0.0.1:{server.port}"
    listing = subprocess.run([CURL, "-sS", "--max-time", "10", url + "/"], capture_output=True, timeout=30)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.splitlines() == [b"1 %d" % (len(WELCOME) + 6), b"2 %d" % (len(SECOND) + 4)]
    fetched = subprocess.run([CURL, "-sS", "--max-time", "10", url + "/1"], capture_output=True, timeout=30)
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout == WELCOME.replace(b"\n", b"\r\n")
    deleted = subprocess.run(
        [CURL, "-sS", "--max-time", "10", "-X", "DELE", "-I", url + "/1"], capture_output=True, timeout=30
    )
    assert deleted.returncode == 0, deleted.stderr
    assert len(mail_files(site)) == 1


def test_second_process_on_the_same_mail_root_gets_in_use(server: ServeProcess, site: Path) -> None:
    with ServeProcess(*serve_args(site, "--no-admin")) as other:
        other.wait_ready()
        first = poplib.POP3("127.0.0.1", server.port, timeout=10)
        first.user("alice")
        first.pass_("wonderland")
        second = poplib.POP3("127.0.0.1", other.port, timeout=10)
        second.user("alice")
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            second.pass_("wonderland")
        first.quit()
        second.user("alice")
        assert second.pass_("wonderland").startswith(b"+OK")
        second.quit()


def test_sigkill_mid_session_loses_nothing(site: Path) -> None:
    with ServeProcess(*serve_args(site, "--no-admin")) as proc:
        proc.wait_ready()
        pop = poplib.POP3("127.0.0.1", proc.port, timeout=10)
        pop.user("alice")
        pop.pass_("wonderland")
        pop.dele(1)
        pop.dele(2)
        proc.signal(signal.SIGKILL)
        proc.wait()
    assert len(mail_files(site)) == 2
    with ServeProcess(*serve_args(site, "--no-admin")) as proc:
        proc.wait_ready()
        pop = poplib.POP3("127.0.0.1", proc.port, timeout=10)
        pop.user("alice")
        assert pop.pass_("wonderland").startswith(b"+OK")  # the dead process's lock is gone
        assert pop.stat()[0] == 2
        pop.quit()


def test_sigterm_lets_an_open_session_finish(site: Path) -> None:
    with ServeProcess(*serve_args(site, "--no-admin", "--grace-period", "20")) as proc:
        proc.wait_ready()
        pop = poplib.POP3("127.0.0.1", proc.port, timeout=10)
        pop.user("alice")
        pop.pass_("wonderland")
        proc.signal(signal.SIGTERM)
        proc.wait_for("server pop3 stopped listening")
        # No new connections...
        with pytest.raises(OSError):
            poplib.POP3("127.0.0.1", proc.port, timeout=5)
        # ...but the open session finishes, deletions and all.
        pop.dele(2)
        assert pop.quit().startswith(b"+OK")
        assert proc.wait() == 0
    assert len(mail_files(site)) == 1


def test_sigterm_grace_period_ends_with_nothing_deleted(site: Path) -> None:
    with ServeProcess(*serve_args(site, "--no-admin", "--grace-period", "0.5")) as proc:
        proc.wait_ready()
        pop = poplib.POP3("127.0.0.1", proc.port, timeout=10)
        pop.user("alice")
        pop.pass_("wonderland")
        pop.dele(1)
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0
        assert any("did not finish" in line for line in proc.lines)
    assert len(mail_files(site)) == 2


def test_session_summary_logged_without_password(server: ServeProcess) -> None:
    pop = poplib.POP3("127.0.0.1", server.port, timeout=10)
    pop.user("alice")
    pop.pass_("wonderland")
    pop.retr(1)
    pop.quit()
    line = server.wait_for(r"session \S+ user=alice .*retrieved=1").string
    assert "remote=127.0.0.1:" in line and "bytes=" in line and "duration=" in line
    server.signal(signal.SIGTERM)
    server.wait()
    assert not any("wonderland" in text for text in server.lines)


@needs_curl
def test_demo_data_with_no_flags(tmp_path: Path) -> None:
    env = {"XDG_DATA_HOME": str(tmp_path), "POP3D_LISTEN": "127.0.0.1:0"}
    with ServeProcess("--no-admin", env=env) as proc:
        proc.wait_ready()
        fetched = subprocess.run(
            [CURL, "-sS", "--max-time", "10", f"pop3://demo:demo@127.0.0.1:{proc.port}/1"],
            capture_output=True,
            timeout=30,
        )
        assert fetched.returncode == 0, fetched.stderr
        assert b"Subject: Welcome to pop3d" in fetched.stdout
    assert (tmp_path / "pop3d" / "demo" / "users").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "127.0.0.1:99999"], "listen: bad port '99999'"),
        (["--listen", "a..b:110"], "listen: 'a..b' in 'a..b:110' is not a host name or address"),
        (["--hostname", "h" * 300], "hostname: String should have at most 200 characters"),
        (["--users", "/nonexistent/users"], "users: no such file: /nonexistent/users"),
        (["--mail-root", "/nonexistent"], "mail-root: no such directory"),
        (["--config", "/nonexistent.toml"], "config: no such file"),
        (["--admin", "0.0.0.0:0"], "admin"),
    ],
)
def test_bad_settings_are_one_line_errors(args: list[str], message: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pop3d", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "XDG_DATA_HOME": str(tmp_path)},
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pop3d: error: ") and message in lines[0], result.stderr


def test_unknown_key_in_config_file(tmp_path: Path) -> None:
    config = tmp_path / "pop3d.toml"
    config.write_text('listen = ["127.0.0.1:0"]\nmailroot = "/var/mail"\n')
    result = pop3d_cli("serve", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.strip() == "pop3d: error: mailroot: unknown setting"


def test_config_file_and_environment(site: Path) -> None:
    config = site / "pop3d.toml"
    config.write_text(
        f'listen = ["127.0.0.1:0"]\nusers = "{site / "users"}"\nmail-root = "{site / "mail"}"\n'
        'no-admin = true\nhostname = "from-toml.example"\n'
    )
    with ServeProcess("--config", str(config), env={"POP3D_HOSTNAME": "from-env.example"}) as proc:
        proc.wait_ready()
        pop = poplib.POP3("127.0.0.1", proc.port, timeout=10)
        assert pop.getwelcome() == b"+OK POP3 server from-env.example ready"
        pop.quit()


def test_user_commands(tmp_path: Path) -> None:
    users = tmp_path / "users"
    assert pop3d_cli("user", "add", "carol", "--users", str(users), stdin="pw1\n").returncode == 0
    assert pop3d_cli("user", "add", "dave", env={"POP3D_USERS": str(users)}, stdin="pw2\n").returncode == 0
    assert pop3d_cli("user", "list", "--users", str(users)).stdout.split() == ["carol", "dave"]
    text = users.read_text()
    assert "carol:{ARGON2ID}$argon2id$" in text and "pw1" not in text
    assert pop3d_cli("user", "passwd", "carol", "--users", str(users), stdin="pw3\n").returncode == 0
    assert users.read_text() != text
    again = pop3d_cli("user", "add", "carol", "--users", str(users), stdin="x\n")
    assert again.returncode == 2 and again.stderr.startswith("pop3d: error: ") and len(again.stderr.splitlines()) == 1
    assert pop3d_cli("user", "remove", "dave", "--users", str(users)).returncode == 0
    assert pop3d_cli("user", "list", "--users", str(users)).stdout.split() == ["carol"]
    missing = pop3d_cli("user", "remove", "nobody", "--users", str(users))
    assert missing.returncode == 2 and "nobody" in missing.stderr
    plain = pop3d_cli("user", "add", "erin", "--scheme", "PLAIN", "--users", str(users), stdin="apop-pw\n")
    assert plain.returncode == 0 and "erin:{PLAIN}apop-pw\n" in users.read_text()
    no_file = pop3d_cli("user", "list", env={"POP3D_USERS": ""})
    assert no_file.returncode == 2 and "--users" in no_file.stderr


def test_busy_port_is_a_one_line_error(site: Path) -> None:
    with ServeProcess(*serve_args(site, "--no-admin")) as first:
        first.wait_ready()
        result = pop3d_cli("serve", *serve_args(site, "--no-admin")[2:], "--listen", f"127.0.0.1:{first.port}")
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("pop3d: error: cannot listen on 127.0.0.1") and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"POP3D_ADMIN_TOKEN": ""}, "admin-token: empty"),
        ({"POP3D_IDLE_TIMEOUT": "inf"}, "idle-timeout"),
    ],
)
def test_more_bad_settings(site: Path, setting: dict[str, str], message: str) -> None:
    result = pop3d_cli("serve", *serve_args(site), env=setting)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"pop3d: error: {message}"), result.stderr


def test_passwd_keeps_a_plain_user_plain(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("erin:{PLAIN}old\n")
    assert pop3d_cli("user", "passwd", "erin", "--users", str(users), stdin="new\n").returncode == 0
    assert users.read_text() == "erin:{PLAIN}new\n"
