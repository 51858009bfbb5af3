"""The passwd-file: lookups, re-reading, editing, and a real server logging users in from one.

Real files in ``tmp_path``; the end-to-end test talks to a server on
127.0.0.1 (port 0) with ``poplib`` in a worker thread, under ``fail_after``.
"""

from __future__ import annotations

import logging
import os
import poplib
import stat
from pathlib import Path

import argon2
import bcrypt
import pytest
import trio

import pop3d
from pop3d.callbacks import HashedPassword
from pop3d.passwd import PasswdFile, UserError, add_user, list_users, remove_user, set_password, valid_user_name

FAST_ARGON2 = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
SHA512_HELLO = (  # "Hello world!", from Drepper's specification
    "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1"
)
BAD_NAMES = ["", ".", "..", ".hidden", "a/b", "../etc", "a\\b", "a\0b", "a:b", "a b", "a\nb", "a\tb"]


def write(path: Path, text: str) -> None:
    """Write a new version of the file; bump its mtime so the change is seen even on coarse clocks."""
    path.write_text(text)
    later = path.stat().st_mtime_ns + 5_000_000_000
    os.utime(path, ns=(later, later))


def blf_crypt(password: str) -> str:
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    return "$2y$" + hashed[4:]  # as Dovecot writes it


@pytest.fixture
def passwd(tmp_path: Path) -> Path:
    path = tmp_path / "passwd"
    write(
        path,
        "# users of the test\n"
        "\n"
        f"alice:{{ARGON2ID}}{FAST_ARGON2.hash('wonderland')}\n"
        f"bob:{{BLF-CRYPT}}{blf_crypt('builder')}::::::\n"
        f"carol:{{SHA512-CRYPT}}{SHA512_HELLO}:1000:1000:Carol:/home/carol:/bin/sh:userdb_quota_rule=*:storage=1G\n"
        "dave:{PLAIN}dave's secret\n"
        "   \n"
        "erin:bare plain\n"
        f"frank:{blf_crypt('bare hash')}\n"
        "  # not a comment for Dovecot either, but no valid user name\n",
    )
    return path


# -- lookups ----------------------------------------------------------------------------


async def test_hashed_users(passwd: Path) -> None:
    users = PasswdFile(passwd)
    for name, password in [
        ("alice", "wonderland"),
        ("bob", "builder"),
        ("carol", "Hello world!"),
        ("frank", "bare hash"),
    ]:
        entry = await users.lookup(name)
        assert entry is not None
        secret, mailbox = entry
        assert mailbox == name
        assert isinstance(secret, HashedPassword)
        assert await secret.verify(password)
        assert not await secret.verify(password + "!")
        assert not await secret.verify("")


async def test_plain_users_give_the_password_for_apop(passwd: Path) -> None:
    users = PasswdFile(passwd)
    assert await users.lookup("dave") == ("dave's secret", "dave")
    assert await users.lookup("erin") == ("bare plain", "erin")


async def test_unknown_and_invalid_names(passwd: Path) -> None:
    with passwd.open("a") as file:
        file.write("..:{PLAIN}x\n.hidden:{PLAIN}x\n")
    users = PasswdFile(passwd)
    assert await users.lookup("zoe") is None
    assert await users.lookup("Alice") is None
    for name in BAD_NAMES:
        assert not valid_user_name(name)
        assert await users.lookup(name) is None
    assert valid_user_name("alice@example.org")


async def test_bad_lines_are_logged_once_without_secrets(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "passwd"
    write(
        path,
        "# comment\n"
        "alice:{hunter2}x\n"
        "bob:{SHA512-CRYPT}hunter2\n"
        "carol\n"
        "../x:{PLAIN}hunter2\n"
        "dave:{PLAIN}first\n"
        "dave:{PLAIN}hunter2\n",
    )
    users = PasswdFile(path)
    caplog.set_level(logging.INFO, logger="pop3d.passwd")
    for _ in range(3):
        for name in ("alice", "bob", "carol"):
            entry = await users.lookup(name)
            assert entry is not None
            assert isinstance(entry[0], HashedPassword)
            for attempt in ("hunter2", "x", "{hunter2}x", ""):
                assert not await entry[0].verify(attempt)
    assert await users.lookup("dave") == ("first", "dave")  # the first entry counts, as in Dovecot
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 5
    for line, text in zip((2, 3, 4, 5, 7), warnings, strict=True):
        assert f"line {line}:" in text
        assert "hunter2" not in text
    assert "unknown password scheme" in warnings[0]
    assert "malformed SHA512-CRYPT hash" in warnings[1]
    assert "exists more than once" in warnings[4]


async def test_rereads_the_file_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    write(path, "alice:{PLAIN}one\n")
    users = PasswdFile(path)
    assert await users.lookup("alice") == ("one", "alice")
    write(path, "bob:{PLAIN}two\n")
    assert await users.lookup("alice") is None
    assert await users.lookup("bob") == ("two", "bob")
    write(path, "bob:{PLAIN}three\n")  # same size: mtime and inode tell
    assert await users.lookup("bob") == ("three", "bob")


async def test_reads_only_when_changed(passwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loads = 0
    load = PasswdFile._load

    def counting_load(self: PasswdFile) -> object:
        nonlocal loads
        loads += 1
        return load(self)

    monkeypatch.setattr(PasswdFile, "_load", counting_load)
    users = PasswdFile(passwd)  # read at once, not through _load
    await users.lookup("dave")
    assert loads == 0
    add_user(passwd, "grace", "hopper", scheme="PLAIN")  # no utime: the new inode shows
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(users.lookup, "dave")
    assert loads == 1  # concurrent logins share one read
    await users.lookup("erin")
    assert loads == 1
    remove_user(passwd, "grace")
    assert await users.lookup("grace") is None
    assert loads == 2


async def test_missing_file_means_no_users(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "passwd"
    users = PasswdFile(path)
    caplog.set_level(logging.WARNING, logger="pop3d.passwd")
    assert await users.lookup("alice") is None
    assert await users.lookup("alice") is None
    assert len(caplog.records) == 1
    write(path, "alice:{PLAIN}back\n")
    assert await users.lookup("alice") == ("back", "alice")
    path.unlink()
    assert await users.lookup("alice") is None


def test_describe_and_repr(passwd: Path) -> None:
    users = PasswdFile(passwd)
    assert users.describe() == f"passwd-file:{passwd}"
    assert repr(users) == f"passwd-file:{passwd}"
    assert isinstance(users, pop3d.Auth)


# -- editing ----------------------------------------------------------------------------


def test_add_creates_the_file_0600(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    add_user(path, "alice", "wonderland", scheme="SHA512-CRYPT")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert list_users(path) == ["alice"]
    assert path.read_text().startswith("alice:{SHA512-CRYPT}$6$")


async def test_add_hashes_with_argon2id_by_default(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    add_user(path, "alice", "wonderland")
    assert path.read_text().startswith("alice:{ARGON2ID}$argon2id$")
    entry = await PasswdFile(path).lookup("alice")
    assert entry is not None
    assert isinstance(entry[0], HashedPassword)
    assert await entry[0].verify("wonderland")


def test_edits_keep_other_lines_and_the_mode(passwd: Path) -> None:
    passwd.chmod(0o640)
    before = passwd.read_text().splitlines(keepends=True)
    add_user(passwd, "grace", "hopper:with colon", scheme="SHA512-CRYPT")
    set_password(passwd, "carol", "new carol", scheme="PLAIN")
    remove_user(passwd, "bob")
    after = passwd.read_text().splitlines(keepends=True)
    assert stat.S_IMODE(passwd.stat().st_mode) == 0o640
    carol = "carol:{PLAIN}new carol:1000:1000:Carol:/home/carol:/bin/sh:userdb_quota_rule=*:storage=1G\n"
    expected = [carol if line.startswith("carol:") else line for line in before if not line.startswith("bob:")]
    assert after[:-1] == expected
    assert after[-1].startswith("grace:{SHA512-CRYPT}$6$")
    assert list_users(passwd) == ["alice", "carol", "dave", "erin", "frank", "grace"]
    assert sorted(os.listdir(passwd.parent)) == ["passwd"]  # no temporary file left


async def test_lookup_sees_edits(passwd: Path) -> None:
    users = PasswdFile(passwd)
    assert await users.lookup("bob") is not None
    remove_user(passwd, "bob")
    assert await users.lookup("bob") is None
    set_password(passwd, "carol", "new carol", scheme="PLAIN")
    assert await users.lookup("carol") == ("new carol", "carol")
    add_user(passwd, "grace", "hopper:with colon", scheme="SHA512-CRYPT")
    grace = await users.lookup("grace")
    assert grace is not None
    assert isinstance(grace[0], HashedPassword)
    assert await grace[0].verify("hopper:with colon")
    assert not await grace[0].verify("hopper")


def test_add_after_a_last_line_without_newline(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    path.write_text("# header\nalice:{PLAIN}x")
    add_user(path, "bob", "y", scheme="PLAIN")
    assert path.read_text() == "# header\nalice:{PLAIN}x\nbob:{PLAIN}y\n"


def test_set_password_of_a_line_without_password(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    path.write_text("alice\n")
    set_password(path, "alice", "x", scheme="PLAIN")
    assert path.read_text() == "alice:{PLAIN}x\n"


def test_remove_every_line_of_a_user(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    path.write_text("alice:{PLAIN}1\nbob:{PLAIN}2\nalice:{PLAIN}3\n")
    remove_user(path, "alice")
    assert path.read_text() == "bob:{PLAIN}2\n"


def test_edit_errors(passwd: Path, tmp_path: Path) -> None:
    original = passwd.read_bytes()
    with pytest.raises(UserError, match="exists"):
        add_user(passwd, "alice", "again", scheme="PLAIN")
    with pytest.raises(UserError, match="no user 'zoe'"):
        set_password(passwd, "zoe", "x", scheme="PLAIN")
    with pytest.raises(UserError, match="no user 'zoe'"):
        remove_user(passwd, "zoe")
    for name in BAD_NAMES:
        with pytest.raises(UserError, match="invalid user name"):
            add_user(passwd, name, "x", scheme="PLAIN")
        with pytest.raises(UserError, match="invalid user name"):
            set_password(passwd, name, "x", scheme="PLAIN")
        with pytest.raises(UserError, match="invalid user name"):
            remove_user(passwd, name)
    for password in ("two\nlines", "cr\rhere", "nul\0", ""):
        with pytest.raises(UserError, match="password"):
            add_user(passwd, "zoe", password, scheme="SHA512-CRYPT")
        with pytest.raises(UserError, match="password"):
            set_password(passwd, "dave", password, scheme="PLAIN")
    with pytest.raises(UserError, match="':'"):
        add_user(passwd, "zoe", "a:b", scheme="PLAIN")
    with pytest.raises(UserError, match="scheme"):
        add_user(passwd, "zoe", "x", scheme="MD5")
    assert passwd.read_bytes() == original
    assert issubclass(UserError, pop3d.Pop3dError)
    missing = tmp_path / "missing"
    with pytest.raises(UserError):
        remove_user(missing, "alice")
    assert list_users(missing) == []
    assert not missing.exists()


# -- a real server ----------------------------------------------------------------------


async def test_end_to_end_over_loopback(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    write(path, f"alice:{{ARGON2ID}}{FAST_ARGON2.hash('wonderland')}\nbob:{{PLAIN}}builder\n")
    server = pop3d.new()
    server.configure(
        apop=True,
        host="127.0.0.1",
        port=0,
        auth=PasswdFile(path),
        storage=pop3d.MemoryStorage({"alice": [b"Subject: x\n\nhi\n"]}),
    )

    def client(port: int) -> None:
        pop = poplib.POP3("127.0.0.1", port, timeout=5)
        try:
            pop.user("alice")
            with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
                pop.pass_("wrong")
            pop.user("alice")
            assert pop.pass_("wonderland").startswith(b"+OK")
            assert pop.stat()[0] == 1
            assert b"hi" in pop.retr(1)[1]
        finally:
            pop.quit()
        pop = poplib.POP3("127.0.0.1", port, timeout=5)
        try:
            assert pop.apop("bob", "builder").startswith(b"+OK")  # PLAIN: APOP works
        finally:
            pop.quit()
        pop = poplib.POP3("127.0.0.1", port, timeout=5)
        try:
            with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
                pop.apop("alice", "wonderland")  # hashed: APOP cannot work
        finally:
            pop.quit()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            try:
                await server.up()
                await trio.to_thread.run_sync(client, server.cget("port"))
            finally:
                await server.destroy()
