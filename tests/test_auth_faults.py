"""Auth faults: hash costs above the caps, a passwd-file that cannot be read, ``pop3d user`` on odd
lines and at end of input, cancels that must not wait for a hash or a lookup.

Real files in ``tmp_path``; the prompt test runs ``python -m pop3d`` on a pseudo-terminal, bounded by
a deadline.
"""

from __future__ import annotations

import getpass
import io
import logging
import os
import pty
import select
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import argon2
import bcrypt
import pytest
import trio

import pop3d
from pop3d import cli
from pop3d import passwords as passwords_module
from pop3d.callbacks import sync_auth
from pop3d.passwd import PasswdFile, PasswdFileError, set_password
from pop3d.passwords import StoredPassword, parse_password, sha512_crypt

from .test_storage_faults import PROMPT, Hang, eventually

FAST_ARGON2 = argon2.PasswordHasher(time_cost=2, memory_cost=16, parallelism=2)
HASH_86 = "a" * 86
BCRYPT_53 = "b" * 53


@pytest.fixture
def hang() -> Iterator[Hang]:
    h = Hang()
    yield h
    h.release()


# -- 7. hash costs above the caps ---------------------------------------------------------------


def argon2_with(m: int, t: int, p: int) -> str:
    return f"{{ARGON2ID}}$argon2id$v=19$m={m},t={t},p={p}$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (f"{{SHA512-CRYPT}}$6$rounds=1000000$salt${HASH_86}", None),
        (f"{{SHA512-CRYPT}}$6$rounds=1000001$salt${HASH_86}", "SHA512-CRYPT rounds above 1000000"),
        (f"$6$rounds=999999999$salt${HASH_86}", "SHA512-CRYPT rounds above 1000000"),  # about 10 minutes a check
        (f"{{BLF-CRYPT}}$2y$15${BCRYPT_53}", None),
        (f"{{BLF-CRYPT}}$2y$16${BCRYPT_53}", "BLF-CRYPT cost above 15"),
        (f"$2b$31${BCRYPT_53}", "BLF-CRYPT cost above 15"),  # about a day a check
        (argon2_with(1024 * 1024, 4, 4), None),
        (argon2_with(1024 * 1024 + 1, 1, 4), "ARGON2ID cost above the limits"),
        (argon2_with(1024 * 1024, 5, 4), "ARGON2ID cost above the limits"),
        (argon2_with(65536, 64, 4), None),
        (argon2_with(65536, 65, 4), "ARGON2ID cost above the limits"),
        (argon2_with(8, 2**32 - 1, 1), "ARGON2ID cost above the limits"),
        (argon2_with(65536, 1, 16), None),
        (argon2_with(65536, 1, 17), "ARGON2ID cost above the limits"),
    ],
)
def test_costs_above_the_caps_are_problems(value: str, problem: str | None) -> None:
    stored = parse_password(value)
    if problem is None:
        assert stored.problem is None
    else:
        assert stored.problem is not None
        assert stored.problem.startswith(problem)
        assert "\n" not in stored.problem
        assert "aaaa" not in stored.problem and "bbbb" not in stored.problem  # no secret
        assert not stored.check("anything")  # no hash is computed: it returns at once


def sha512_entry(password: str) -> str:
    return "{SHA512-CRYPT}" + sha512_crypt(password, "$6$rounds=2000$somesalt")


def bcrypt_entry(password: str) -> str:
    return "{BLF-CRYPT}" + bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()


def argon2_entry(password: str) -> str:
    return "{ARGON2ID}" + FAST_ARGON2.hash(password)


@pytest.mark.parametrize(
    ("entry", "cap", "lowered"),
    [
        (sha512_entry, "SHA512_MAX_ROUNDS", 1999),
        (bcrypt_entry, "BCRYPT_MAX_COST", 4),
        (argon2_entry, "ARGON2_MAX_MEMORY_KIB", 15),
        (argon2_entry, "ARGON2_MAX_WORK_KIB", 31),
        (argon2_entry, "ARGON2_MAX_PARALLELISM", 1),
    ],
)
async def test_an_entry_above_a_cap_never_matches_even_the_right_password(
    monkeypatch: pytest.MonkeyPatch, entry: object, cap: str, lowered: int
) -> None:
    assert callable(entry)
    value = entry("right")
    assert parse_password(value).check("right")  # under the real caps it is a good entry
    monkeypatch.setattr(passwords_module, cap, lowered)  # the entry's cost is now 1 above the cap
    stored = parse_password(value)
    assert stored.problem is not None
    assert not stored.check("right")
    assert not await stored.verify("right")


async def test_an_entry_above_a_cap_is_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "passwd"
    path.write_text(f"alice:$6$rounds=999999999$salt${HASH_86}\nbob:{{PLAIN}}x\n")
    caplog.set_level(logging.WARNING, logger="pop3d.passwd")
    users = PasswdFile(path)
    for _ in range(3):
        entry = await users.lookup("alice")
        assert entry is not None
        assert isinstance(entry[0], StoredPassword)
        assert entry[0].problem is not None  # so no hash is computed: verify() answers False at once
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(logged) == 1
    assert "line 1" in logged[0]
    assert "rounds above" in logged[0]


# -- 8 and 10. pop3d user passwd / remove on odd lines -------------------------------------------


def run_cli(monkeypatch: pytest.MonkeyPatch, *argv: str, stdin: str = "") -> int:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))  # not a terminal: one line is the password
    return cli.main(list(argv))


def test_user_commands_work_beside_a_line_without_colon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "passwd"
    path.write_text("# users\ngarbage without colon\nbob:{PLAIN}old\ncarol\ndave:{PLAIN}d\n")
    users = str(path)
    assert run_cli(monkeypatch, "user", "passwd", "bob", "--users", users, stdin="new bob\n") == 0
    assert run_cli(monkeypatch, "user", "passwd", "carol", "--users", users, stdin="new carol\n") == 0
    assert run_cli(monkeypatch, "user", "remove", "dave", "--users", users) == 0
    lines = path.read_text().splitlines()
    assert lines[:3] == ["# users", "garbage without colon", "bob:{PLAIN}new bob"]  # kept as it was
    assert lines[3].startswith("carol:{ARGON2ID}$argon2id$")  # a user without a password: hashed
    assert len(lines) == 4
    assert parse_password(lines[3].partition(":")[2]).check("new carol")
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("line", ["bob:", "bob", "bob::1000:1000::/home/bob:/bin/sh", "bob:{PLAIN}"])
def test_passwd_of_a_user_without_password_hashes_it(tmp_path: Path, line: str) -> None:
    path = tmp_path / "passwd"
    path.write_text(f"alice:{{PLAIN}}a\n{line}\n")
    set_password(path, "bob", "new secret")
    alice, bob = path.read_text().splitlines()
    assert alice == "alice:{PLAIN}a"
    name, _, rest = bob.partition(":")
    assert name == "bob"
    assert rest.startswith("{ARGON2ID}$argon2id$")  # not {PLAIN}new secret
    assert rest.count(":") == max(line.count(":") - 1, 0)  # the other fields are kept
    assert parse_password(rest.split(":")[0]).check("new secret")
    set_password(path, "bob", "plain now", scheme="PLAIN")  # unless --scheme says otherwise
    assert path.read_text().splitlines()[1].startswith("bob:{PLAIN}plain now")
    set_password(path, "bob", "still plain")  # and a PLAIN user stays plain
    assert path.read_text().splitlines()[1].startswith("bob:{PLAIN}still plain")


def test_cli_passwd_of_an_empty_entry_uses_the_default_scheme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "passwd"
    path.write_text("bob:\n")
    assert run_cli(monkeypatch, "user", "passwd", "bob", "--users", str(path), stdin="s3cret\n") == 0
    assert path.read_text().startswith("bob:{ARGON2ID}$argon2id$")


# -- 9. end of input at the password prompt --------------------------------------------------


@pytest.mark.parametrize("action", ["add", "passwd"])
def test_eof_at_the_prompt_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], action: str
) -> None:
    path = tmp_path / "passwd"
    path.write_text("bob:{PLAIN}x\n")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    def ctrl_d(prompt: str = "") -> str:
        raise EOFError

    monkeypatch.setattr(sys, "stdin", Terminal())
    monkeypatch.setattr(getpass, "getpass", ctrl_d)
    assert cli.main(["user", action, "bob" if action == "passwd" else "carol", "--users", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pop3d: error: password: ")
    assert err.count("\n") == 1
    assert path.read_text() == "bob:{PLAIN}x\n"


def wait_child(pid: int, deadline: float) -> int:
    """The child's wait status; it is killed at ``deadline``."""
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def test_ctrl_d_on_a_real_terminal(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    pid, fd = pty.fork()
    if pid == 0:  # the child: its terminal is the pty
        try:
            os.execv(sys.executable, [sys.executable, "-m", "pop3d", "user", "add", "bob", "--users", str(path)])
        finally:
            os._exit(127)
    output = b""
    deadline = time.monotonic() + 30
    sent = False
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                try:
                    data = os.read(fd, 4096)
                except OSError:  # EIO: the child is gone
                    break
                if not data:
                    break
                output += data
            if not sent and b"New password:" in output:
                os.write(fd, b"\x04")  # Ctrl-D: end of input
                sent = True
    finally:
        os.close(fd)
        status = wait_child(pid, deadline)
    assert sent, output
    text = output.decode(errors="replace")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 2, text
    assert "pop3d: error: password: " in text
    assert "Traceback" not in text
    assert not path.exists()


# -- 11. a passwd-file that cannot be read ---------------------------------------------------


def as_directory(path: Path) -> None:
    path.mkdir()


def as_fifo(path: Path) -> None:
    os.mkfifo(path)  # an open() without O_NONBLOCK would wait here for a writer forever


def under_a_file(path: Path) -> None:
    path.parent.joinpath("file").write_text("")


@pytest.mark.parametrize("make", [as_directory, as_fifo, under_a_file])
def test_unreadable_passwd_file_fails_at_construction(tmp_path: Path, make: object) -> None:
    assert callable(make)
    path = tmp_path / "users"
    make(path)
    if make is under_a_file:
        path = tmp_path / "file" / "users"
    started = time.monotonic()
    with pytest.raises(PasswdFileError) as caught:
        PasswdFile(path)
    assert time.monotonic() - started < PROMPT
    text = str(caught.value)
    assert "\n" not in text
    assert str(path) in text
    assert isinstance(caught.value, pop3d.Pop3dError)  # what the CLI prints as one line


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file of mode 000")
def test_passwd_file_without_read_permission_fails_at_construction(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("alice:{PLAIN}x\n")
    path.chmod(0)
    with pytest.raises(PasswdFileError, match="ermission"):
        PasswdFile(path)


async def test_passwd_file_is_read_at_construction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "users"
    path.write_bytes(b"alice:{PLAIN}x:1000:1000:Jos\xe9 (Latin-1):/home/alice:/bin/sh\n")  # not UTF-8: still fine
    users = PasswdFile(path)

    def no_thread(*args: object, **kwargs: object) -> None:
        raise AssertionError("read again")

    monkeypatch.setattr(trio.to_thread, "run_sync", no_thread)
    assert await users.lookup("alice") == ("x", "alice")


async def test_passwd_file_that_becomes_unreadable_means_no_users(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "users"
    path.write_text("alice:{PLAIN}x\n")
    users = PasswdFile(path)
    path.unlink()
    path.mkdir()
    caplog.set_level(logging.WARNING, logger="pop3d.passwd")
    assert await users.lookup("alice") is None
    assert await users.lookup("alice") is None
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


# -- 6. cancels do not wait for a lookup or a hash --------------------------------------------


async def test_sync_auth_lookup_abandoned_returns_at_once(hang: Hang) -> None:
    looked_up = threading.Event()

    class Users:
        def lookup(self, name: str) -> tuple[str, str]:
            hang.wrap(looked_up.set)()
            return ("x", name)

    auth = sync_auth(Users())
    with trio.fail_after(PROMPT), trio.move_on_after(0.05) as scope:
        await auth.lookup("alice")
    assert scope.cancelled_caught
    hang.release()
    await eventually(looked_up.is_set)
    assert await auth.lookup("alice") == ("x", "alice")


async def test_cancelled_hash_checks_return_at_once_and_still_count(
    monkeypatch: pytest.MonkeyPatch, hang: Hang
) -> None:
    entered: list[str] = []
    real_check = StoredPassword.check

    def slow_check(self: StoredPassword, password: str) -> bool:
        entered.append(password)
        return bool(hang.wrap(real_check)(self, password))

    monkeypatch.setattr(StoredPassword, "check", slow_check)
    stored = parse_password(argon2_entry("right"))
    for attempt in ("one", "two"):  # HASH_CONCURRENCY checks, both abandoned
        with trio.fail_after(PROMPT), trio.move_on_after(0.05) as scope:
            await stored.verify(attempt)
        assert scope.cancelled_caught
    assert entered == ["one", "two"]
    with trio.move_on_after(0.1):
        await stored.verify("three")
    assert entered == ["one", "two"]  # the abandoned checks still hold both slots
    hang.release()
    with trio.fail_after(5):
        assert await stored.verify("right")
    assert entered == ["one", "two", "right"]
