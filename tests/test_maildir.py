"""Tests of :mod:`pop3d.maildir` on real Maildirs in ``tmp_path``.

Message files are written straight into ``new/`` and ``cur/`` as an MTA
would; "another process" is played by plain file operations between
sessions.  The server test runs on loopback, port 0, with poplib in a
worker thread.
"""

from __future__ import annotations

import errno
import json
import os
import poplib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import pop3d
from pop3d import dovecot_uidlist, uidl_pins
from pop3d import maildir as maildir_module
from pop3d.callbacks import MailboxUnavailable, Storage, iterate_message
from pop3d.maildir import INDEX_NAME, LOCK_NAME, MaildirStorage
from pop3d.message import canonical_size, encode_message

BASE = 1_700_000_000


# -- helpers -------------------------------------------------------------


def make_maildir(root: Path, mbox: str = "alice") -> Path:
    path = root / mbox
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def deliver(maildir: Path, data: bytes, name: str, subdir: str = "new") -> Path:
    file = maildir / subdir / name
    file.write_bytes(data)
    return file


def unique_name(n: int, seconds: int | None = None) -> str:
    return f"{BASE + n if seconds is None else seconds}.M{n}P4242.mail.example"


async def read_all(storage: Storage, mbox: str, msg: int) -> bytes:
    return b"".join([chunk async for chunk in iterate_message(await storage.get(mbox, msg))])


async def session(storage: MaildirStorage, mbox: str = "alice") -> tuple[list[int], list[str]]:
    """Lock, list sizes and UIDLs as the server does at login, unlock."""
    assert await storage.lock(mbox)
    try:
        count = await storage.stat(mbox)
        sizes = [await storage.size(mbox, n) for n in range(1, count + 1)]
        uids = [await storage.uidl(mbox, n) for n in range(1, count + 1)]
    finally:
        await storage.unlock(mbox)
    return sizes, uids


@pytest.fixture
def measured(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The paths of every message file the storage reads to size it."""
    calls: list[str] = []
    real = maildir_module._measure

    def counting(dirs: Any, subdir: str, name: str) -> tuple[int, int, int]:
        calls.append(os.path.join(dirs.path, subdir, name))
        return real(dirs, subdir, name)

    monkeypatch.setattr(maildir_module, "_measure", counting)
    yield calls


def index_uids(box: Path) -> list[str]:
    """The UIDLs in the Maildir's index file (null there: the file's unique name)."""
    messages = json.loads((box / INDEX_NAME).read_bytes())["messages"]
    return [uid or name.partition(":")[0] for name, uid in zip(messages["name"], messages["uid"], strict=True)]


def uid_valid(uid: str) -> bool:
    return 1 <= len(uid) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in uid)


def unstuffed_reply(data: bytes) -> bytes:
    """What MessageWriter sends for ``data``, without the terminator and the dot-stuffing."""
    body = encode_message(data)
    assert body.endswith(b".\r\n")
    return re.sub(rb"(?m)^\.", b"", body[:-3])


SAMPLES = {
    "lf": b"From: a@example.org\nSubject: lf\n\nline one\nline two\n",
    "crlf": b"From: a@example.org\r\nSubject: crlf\r\n\r\nline one\r\nline two\r\n",
    "dots": b"Subject: dots\n\n.\n..two\n.three\nend\n",
    "no-final-newline": b"Subject: cut\n\nno newline at the end",
    "8bit": "Subject: 8bit\n\nGrüße, ½ €, 日本語\n".encode() + bytes(range(128, 256)) + b"\n",
    "lone-cr": b"Subject: cr\n\na\rb\r\r\nc\n",
    "mixed": b"Subject: mixed\r\n\nx\r\ny\n",
    "empty": b"",
}


# -- content and sizes ------------------------------------------------------


async def test_sizes_are_canonical_and_get_returns_the_file(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    for n, data in enumerate(SAMPLES.values()):
        deliver(box, data, unique_name(n))
    storage = MaildirStorage(tmp_path)
    assert await storage.lock("alice")
    assert await storage.stat("alice") == len(SAMPLES)
    for n, data in enumerate(SAMPLES.values(), start=1):
        size = await storage.size("alice", n)
        assert size == canonical_size(data)
        assert size == len(unstuffed_reply(data))
        # No line-end conversion in the storage: the server's writer does it.
        assert await read_all(storage, "alice", n) == data
    assert await storage.size("alice") == sum(canonical_size(d) for d in SAMPLES.values())
    await storage.unlock("alice")


@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
def test_measure_across_chunk_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    # A CRLF split between two reads must count once.
    monkeypatch.setattr(maildir_module, "_MEASURE_CHUNK", chunk)
    (tmp_path / "new").mkdir()
    dirs = maildir_module._open_dirs(str(tmp_path))
    assert dirs is not None
    for n, data in enumerate([*SAMPLES.values(), b"\r\n\r\n", b"\r", b"a\r", b"\n", b"\r\r\n\n\r"]):
        (tmp_path / "new" / f"m{n}").write_bytes(data)
        file_size, _, size = maildir_module._measure(dirs, "new", f"m{n}")
        assert (file_size, size) == (len(data), canonical_size(data)), data
    dirs.close()


async def test_dovecot_size_hints_are_not_trusted(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    data = b"Subject: hint\n\nno final newline"
    # W= is what Dovecot counts (LF -> CRLF, nothing added at the end); make S= wrong too.
    deliver(box, data, f"{unique_name(1)},S=5,W={len(data) + 2}:2,S", "cur")
    sizes, _ = await session(MaildirStorage(tmp_path))
    assert sizes == [canonical_size(data)] == [len(data) + 4]


# -- order and numbering ----------------------------------------------------


async def test_new_and_cur_are_served_oldest_first(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    deliver(box, b"third\n", unique_name(3), "new")
    deliver(box, b"first\n", unique_name(1) + ":2,S", "cur")
    deliver(box, b"second\n", unique_name(2) + ":2,", "cur")
    # Same second: the name decides.
    deliver(box, b"fourth-b\n", f"{BASE + 4}.M2P1.host", "new")
    deliver(box, b"fourth-a\n", f"{BASE + 4}.M1P1.host:2,RS", "cur")
    # No time in the name: the mtime places it.
    odd = deliver(box, b"by-mtime\n", "courier-style-name", "new")
    os.utime(odd, (BASE + 2.5, BASE + 2.5))
    # Not messages: dot files, directories, symlinks, tmp/.
    deliver(box, b"hidden\n", ".hidden", "new")
    (box / "cur" / "subdir").mkdir()
    (box / "new" / f"{BASE}.link.host").symlink_to(tmp_path / "outside")
    (tmp_path / "outside").write_bytes(b"secret\n")
    deliver(box, b"in delivery\n", unique_name(0), "tmp")

    storage = MaildirStorage(tmp_path)
    assert await storage.lock("alice")
    got = [await read_all(storage, "alice", n) for n in range(1, await storage.stat("alice") + 1)]
    assert got == [b"first\n", b"second\n", b"by-mtime\n", b"third\n", b"fourth-a\n", b"fourth-b\n"]
    await storage.unlock("alice")


async def test_numbering_is_fixed_while_locked(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    deliver(box, b"one\n", unique_name(1))
    storage = MaildirStorage(tmp_path)
    assert await storage.lock("alice")
    deliver(box, b"second\n", unique_name(0))  # older name, arrives mid-session
    assert await storage.stat("alice") == 1
    assert await read_all(storage, "alice", 1) == b"one\n"
    await storage.unlock("alice")
    sizes, _ = await session(storage)
    assert sizes == [8, 5]


async def test_calls_need_the_lock_and_valid_numbers(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    deliver(box, b"one\n", unique_name(1))
    storage = MaildirStorage(tmp_path)
    with pytest.raises(RuntimeError):
        await storage.stat("alice")
    assert await storage.lock("alice")
    for bad in (0, -1, 2):
        with pytest.raises(IndexError):
            await storage.size("alice", bad)
        with pytest.raises(IndexError):
            await storage.dele("alice", [1, bad])
    assert (box / "new" / unique_name(1)).exists()  # nothing deleted by the failed dele
    await storage.unlock("alice")
    await storage.unlock("alice")  # twice is harmless


# -- mailbox names ----------------------------------------------------------


async def test_missing_mailbox_is_empty(tmp_path: Path) -> None:
    storage = MaildirStorage(tmp_path / "no-root")
    assert await storage.lock("bob")
    assert not await storage.lock("bob")  # still exclusive in the process
    assert await storage.stat("bob") == 0
    assert await storage.size("bob") == 0
    await storage.dele("bob", [])
    await storage.unlock("bob")
    assert not (tmp_path / "no-root").exists()  # nothing created

    (tmp_path / "root").mkdir()
    assert await session(MaildirStorage(tmp_path / "root"), "bob") == ([], [])
    assert os.listdir(tmp_path / "root") == []


@pytest.mark.parametrize("name", ["", ".", "..", "../etc", "a/b", "/abs", ".hidden", "nul\0byte", "x/"])
async def test_escaping_names_are_refused(tmp_path: Path, name: str) -> None:
    make_maildir(tmp_path, "alice")
    storage = MaildirStorage(tmp_path / "alice")
    calls = [
        storage.lock(name),
        storage.unlock(name),
        storage.stat(name),
        storage.size(name),
        storage.size(name, 1),
        storage.get(name, 1),
        storage.uidl(name, 1),
        storage.dele(name, [1]),
    ]
    for call in calls:
        with pytest.raises(ValueError):
            await call
    with pytest.raises(ValueError):
        storage.path(name)
    assert sorted(os.listdir(tmp_path / "alice")) == ["cur", "new", "tmp"]


async def test_describe(tmp_path: Path) -> None:
    storage = MaildirStorage(tmp_path)
    assert storage.describe() == repr(storage) == f"maildir:{tmp_path}"
    assert MaildirStorage(".").root == os.getcwd()
    assert isinstance(storage, Storage)


# -- UIDLs ------------------------------------------------------------------


async def test_uidl_is_stable_across_flags_moves_and_instances(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    deliver(box, b"one\n", unique_name(1))
    deliver(box, b"two\n", unique_name(2) + ":2,", "cur")
    _, before = await session(MaildirStorage(tmp_path))
    assert before == [unique_name(1), unique_name(2)]

    # An IMAP client reads both: new/ -> cur/, flags change.
    os.rename(box / "new" / unique_name(1), box / "cur" / (unique_name(1) + ":2,S"))
    os.rename(box / "cur" / (unique_name(2) + ":2,"), box / "cur" / (unique_name(2) + ":2,FRS"))
    _, after = await session(MaildirStorage(tmp_path))
    assert after == before

    (box / INDEX_NAME).unlink()  # and with no index at all
    _, rebuilt = await session(MaildirStorage(tmp_path))
    assert rebuilt == before


async def test_odd_unique_names_get_hashed_uids(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    names = [
        f"{BASE}." + "x" * 80,  # too long
        f"{BASE + 1}.with space",
        f"{BASE + 2}.tab\there",
        f"{BASE + 3}.ünïcode",
        f"{BASE + 4}.del\x7f",
        f"{BASE + 5}.ok-{'y' * 56}",  # exactly 70: kept
    ]
    for name in names:
        deliver(box, b"m\n", name)
    (box / "new" / os.fsdecode(b"1700000006.bad\xff")).write_bytes(b"m\n")
    _, uids = await session(MaildirStorage(tmp_path))
    assert len(uids) == len(set(uids)) == 7
    assert all(uid_valid(uid) for uid in uids)
    assert uids[5] == names[5] and len(names[5]) == 70
    assert all(uid.startswith("sha1-") for uid in uids[:5] + uids[6:])
    # Deterministic, also without the index.
    (box / INDEX_NAME).unlink()
    assert (await session(MaildirStorage(tmp_path)))[1] == uids


async def test_duplicate_unique_names_get_distinct_uids(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    deliver(box, b"copy one\n", unique_name(1), "new")
    deliver(box, b"copy two\n", unique_name(1) + ":2,S", "cur")
    _, uids = await session(MaildirStorage(tmp_path))
    assert len(uids) == len(set(uids)) == 2
    assert all(uid_valid(uid) for uid in uids)
    assert (await session(MaildirStorage(tmp_path)))[1] == uids


# -- the index -------------------------------------------------------------


async def test_second_session_reads_no_message_files(tmp_path: Path, measured: list[str]) -> None:
    box = make_maildir(tmp_path)
    for n in range(5):
        deliver(box, b"msg %d\n" % n, unique_name(n))
    first = await session(MaildirStorage(tmp_path))
    assert len(measured) == 5
    index = json.loads((box / INDEX_NAME).read_bytes())
    assert index["format"] == 2
    assert index["messages"]["name"][0] == unique_name(0)
    assert index["messages"]["size"][0] == canonical_size(b"msg 0\n")
    assert index["messages"]["uid"][0] is None  # the unique name is the UIDL: not stored twice
    mtime = (box / INDEX_NAME).stat().st_mtime_ns
    measured.clear()
    assert await session(MaildirStorage(tmp_path)) == first
    assert measured == []
    assert (box / INDEX_NAME).stat().st_mtime_ns == mtime  # unchanged, not rewritten


def age(box: Path, seconds: float = 3600) -> None:
    """Date ``new/`` and ``cur/`` back, as for a Maildir untouched for a while."""
    past = time.time() - seconds
    for sub in ("new", "cur"):
        os.utime(box / sub, (past, past))


@pytest.fixture
def listed(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The Maildirs whose directories the storage lists."""
    calls: list[str] = []
    real = maildir_module._message_files

    def counting(dirs: Any) -> Any:
        calls.append(dirs.path)
        return real(dirs)

    monkeypatch.setattr(maildir_module, "_message_files", counting)
    yield calls


async def test_unchanged_directories_are_not_listed_again(tmp_path: Path, listed: list[str]) -> None:
    box = make_maildir(tmp_path)
    for n in range(3):
        deliver(box, b"msg %d\n" % n, unique_name(n))
    age(box)
    first = await session(MaildirStorage(tmp_path))
    assert listed == [str(box)]
    listed.clear()
    assert await session(MaildirStorage(tmp_path)) == first
    assert listed == []  # the index, and nothing else
    # A delivery changes new/'s time: the next login lists again and sees it.
    deliver(box, b"late\n", unique_name(7))
    _, uids = await session(MaildirStorage(tmp_path))
    assert listed == [str(box)]
    assert uids == [*first[1], unique_name(7)]
    # So does a flag change by an IMAP server (a rename into cur/).
    age(box)
    await session(MaildirStorage(tmp_path))
    os.rename(box / "new" / unique_name(0), box / "cur" / (unique_name(0) + ":2,S"))
    listed.clear()
    assert (await session(MaildirStorage(tmp_path)))[1] == uids
    assert listed == [str(box)]


async def test_a_late_delivery_of_old_mail_takes_its_place_in_delivery_order(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    for n in (1, 3, 5):
        deliver(box, b"msg %d\n" % n, unique_name(n))
    assert (await session(MaildirStorage(tmp_path)))[1] == [unique_name(n) for n in (1, 3, 5)]
    # A message stamped between them arrives late (a restored backup, a slow relay), and one is flagged.
    deliver(box, b"msg 2\n", unique_name(2))
    os.rename(box / "new" / unique_name(3), box / "cur" / (unique_name(3) + ":2,S"))
    sizes, uids = await session(MaildirStorage(tmp_path))
    assert uids == [unique_name(n) for n in (1, 2, 3, 5)]
    assert sizes == [7, 7, 7, 7]


async def test_directory_times_are_judged_when_they_were_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 1.5 s old when read, 2.5 s old after a slow scan: not old enough to be sure of.
    box = make_maildir(tmp_path)
    deliver(box, b"msg\n", unique_name(1))
    age(box, 1.5)
    real = maildir_module._scan

    def slow_scan(*args: Any) -> Any:
        time.sleep(1.0)
        return real(*args)

    monkeypatch.setattr(maildir_module, "_scan", slow_scan)
    await session(MaildirStorage(tmp_path))
    assert json.loads((box / INDEX_NAME).read_bytes())["dirs"] == {}


async def test_a_skipped_message_is_looked_for_at_every_login(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listed: list[str]
) -> None:
    # A chmod or a passing I/O error does not change the directory: its times must not be trusted.
    box = make_maildir(tmp_path)
    deliver(box, b"one\n", unique_name(1))
    deliver(box, b"two\n", unique_name(2))
    age(box)
    real = maildir_module._measure

    def refuse_two(dirs: Any, subdir: str, name: str) -> Any:
        if name == unique_name(2):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(dirs, subdir, name)

    monkeypatch.setattr(maildir_module, "_measure", refuse_two)
    assert (await session(MaildirStorage(tmp_path)))[1] == [unique_name(1)]
    assert json.loads((box / INDEX_NAME).read_bytes())["dirs"] == {}
    monkeypatch.setattr(maildir_module, "_measure", real)  # readable again
    assert (await session(MaildirStorage(tmp_path)))[1] == [unique_name(1), unique_name(2)]
    listed.clear()
    await session(MaildirStorage(tmp_path))
    assert listed == []  # all readable: the times are trusted again


async def test_recent_directory_times_are_not_trusted(tmp_path: Path, listed: list[str]) -> None:
    # Changed less than two seconds ago: a change in the same clock tick could go unseen.
    box = make_maildir(tmp_path)
    deliver(box, b"msg\n", unique_name(1))
    await session(MaildirStorage(tmp_path))
    assert json.loads((box / INDEX_NAME).read_bytes())["dirs"] == {}
    listed.clear()
    await session(MaildirStorage(tmp_path))
    assert listed == [str(box)]


@pytest.mark.parametrize(
    "damage",
    [
        None,  # missing
        b"",
        b"{not json",
        b"\xff\xfe garbage",
        b"[1, 2, 3]",
        b'{"format": 99, "files": {}}',
        b'{"format": 1, "files": {}}',  # the first format: rebuilt in the new one
        b'{"format": 2, "dirs": {}, "messages": []}',
        b'{"format": 2, "dirs": {}, "messages": {"subdir": "n", "name": ["%s"]}}' % unique_name(0).encode(),
    ],
)
async def test_index_is_rebuilt_when_missing_or_corrupt(
    tmp_path: Path, measured: list[str], damage: bytes | None
) -> None:
    box = make_maildir(tmp_path)
    for n in range(3):
        deliver(box, b"msg %d\n" % n, unique_name(n))
    first = await session(MaildirStorage(tmp_path))
    if damage is None:
        (box / INDEX_NAME).unlink()
    else:
        (box / INDEX_NAME).write_bytes(damage)
    measured.clear()
    assert await session(MaildirStorage(tmp_path)) == first
    assert measured  # it did reread
    json.loads((box / INDEX_NAME).read_bytes())  # and wrote a good index back
    measured.clear()
    assert await session(MaildirStorage(tmp_path)) == first
    assert measured == []


async def test_lying_index_entry_is_not_trusted(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    deliver(box, b"hello\n", unique_name(1))
    await session(MaildirStorage(tmp_path))
    index = json.loads((box / INDEX_NAME).read_bytes())
    index["messages"]["uid"][0] = "not the uid"
    (box / INDEX_NAME).write_text(json.dumps(index))
    assert await session(MaildirStorage(tmp_path)) == ([7], [unique_name(1)])


async def test_stale_index_after_changes_by_another_process(tmp_path: Path, measured: list[str]) -> None:
    box = make_maildir(tmp_path)
    for n in range(4):
        deliver(box, b"msg %d\n" % n, unique_name(n))
    await session(MaildirStorage(tmp_path))
    # Between sessions: one delivered, one deleted, one flagged (a rename into cur/).
    deliver(box, b"new one, longer\n", unique_name(9))
    (box / "new" / unique_name(0)).unlink()
    os.rename(box / "new" / unique_name(2), box / "cur" / (unique_name(2) + ":2,S"))
    measured.clear()
    sizes, uids = await session(MaildirStorage(tmp_path))
    assert [Path(p).name for p in measured] == [unique_name(9)]  # only the new file is read
    assert uids == [unique_name(n) for n in (1, 2, 3, 9)]
    assert sizes == [7, 7, 7, 17]
    assert index_uids(box) == uids


async def test_unwritable_index_is_only_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = make_maildir(tmp_path)
    deliver(box, b"x\n", unique_name(1))

    def fail(*args: object, **kwargs: object) -> None:
        raise PermissionError("read-only file system")

    monkeypatch.setattr(os, "replace", fail)
    assert await session(MaildirStorage(tmp_path)) == ([3], [unique_name(1)])
    assert sorted(os.listdir(box)) == sorted(["cur", LOCK_NAME, "new", "tmp"])  # no temp file left


# -- get ----------------------------------------------------------------------


async def test_get_streams_a_big_message_in_chunks(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    line = b"0123456789" * 7 + b"\n"
    data = b"Subject: big\n\n" + line * 50_000  # about 3.5 MB
    deliver(box, data, unique_name(1))
    storage = MaildirStorage(tmp_path)
    assert await storage.lock("alice")
    chunks = [chunk async for chunk in iterate_message(await storage.get("alice", 1))]
    assert len(chunks) > 10
    assert max(len(c) for c in chunks) <= maildir_module.CHUNK_SIZE
    assert b"".join(chunks) == data
    assert await storage.size("alice", 1) == canonical_size(data)
    await storage.unlock("alice")


async def test_get_stopped_early_closes_the_file(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    deliver(box, b"x" * 100_000, unique_name(1))
    storage = MaildirStorage(tmp_path, chunk_size=1000)
    assert await storage.lock("alice")
    fds = len(os.listdir("/proc/self/fd"))
    data = await storage.get("alice", 1)
    assert not isinstance(data, bytes)
    stream = aiter(data)
    assert await anext(stream) == b"x" * 1000
    await stream.aclose()  # type: ignore[attr-defined]
    assert len(os.listdir("/proc/self/fd")) == fds
    # As the server reads it (TOP): through iterate_message, which does not pass aclose on.
    wrapped = aiter(iterate_message(await storage.get("alice", 1)))
    assert await anext(wrapped) == b"x" * 1000
    await wrapped.aclose()  # type: ignore[attr-defined]
    del wrapped
    assert len(os.listdir("/proc/self/fd")) == fds
    await storage.unlock("alice")


async def test_get_of_a_vanished_file_raises(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    deliver(box, b"one\n", unique_name(1))
    deliver(box, b"two\n", unique_name(2))
    storage = MaildirStorage(tmp_path)
    assert await storage.lock("alice")
    (box / "new" / unique_name(1)).unlink()
    with pytest.raises(FileNotFoundError):
        await storage.get("alice", 1)
    # A file moved by an IMAP server meanwhile is still found.
    os.rename(box / "new" / unique_name(2), box / "cur" / (unique_name(2) + ":2,S"))
    assert await read_all(storage, "alice", 2) == b"two\n"
    await storage.unlock("alice")


async def test_small_messages_are_read_ahead_in_one_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = make_maildir(tmp_path)
    bodies = [b"Subject: %d\n\n%s\n" % (n, b"x" * n * 100) for n in range(1, 6)]
    for n, body in enumerate(bodies, 1):
        deliver(box, body, unique_name(n))
    trips: list[int] = []
    real = maildir_module._read_message

    def counting(dirs: Any, listing: Any, i: int, *args: Any) -> Any:
        trips.append(i + 1)
        return real(dirs, listing, i, *args)

    monkeypatch.setattr(maildir_module, "_read_message", counting)
    storage = MaildirStorage(tmp_path, read_ahead=len(bodies[1]) + len(bodies[2]) + 1)
    assert await storage.lock("alice")
    got = [await storage.get("alice", n) for n in range(1, 6)]
    assert got == bodies  # whole messages, as bytes
    # The first RETR reads only its message; from the second in a row on, the next ones come along.
    assert trips == [1, 2, 4]  # 3 came with 2; 5 with 4
    assert await storage.get("alice", 2) == bodies[1]  # out of order: read again, alone
    assert trips == [1, 2, 4, 2]
    assert storage._drops["alice"].read_ahead == {}
    sizes, uids = await storage.listing("alice")
    assert list(sizes) == [canonical_size(b) for b in bodies]
    assert list(uids) == [unique_name(n) for n in range(1, 6)]
    await storage.unlock("alice")


async def test_read_ahead_serves_what_the_file_held_when_read(tmp_path: Path) -> None:
    # Documented: a message read ahead and then deleted by another program is still sent once.
    box = make_maildir(tmp_path)
    for n in range(1, 4):
        deliver(box, b"msg %d\n" % n, unique_name(n))
    storage = MaildirStorage(tmp_path)
    assert await storage.lock("alice")
    assert await storage.get("alice", 1) == b"msg 1\n"
    assert await storage.get("alice", 2) == b"msg 2\n"  # reads 3 along with it
    (box / "new" / unique_name(3)).unlink()
    assert await storage.get("alice", 3) == b"msg 3\n"
    with pytest.raises(FileNotFoundError):
        await storage.get("alice", 3)  # asked again: read again, and gone
    await storage.unlock("alice")


async def test_copies_with_one_unique_name_keep_their_own_sizes(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    deliver(box, b"short\n", unique_name(1) + ":2,S", "cur")
    deliver(box, b"a longer copy\n", unique_name(1), "new")
    first = await session(MaildirStorage(tmp_path))
    assert sorted(first[0]) == [7, 15]
    for _ in range(2):  # rescans (the directory times are too recent to trust)
        deliver(box, b"x\n", unique_name(5))
        (box / "new" / unique_name(5)).unlink()
        assert await session(MaildirStorage(tmp_path)) == first
    storage = MaildirStorage(tmp_path)
    assert await storage.lock("alice")
    for n, size in enumerate(first[0], 1):
        assert canonical_size(await read_all(storage, "alice", n)) == size
    await storage.unlock("alice")


# -- dele ---------------------------------------------------------------------


async def test_dele_removes_exactly_the_given_messages(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    for n in range(1, 7):
        deliver(box, b"msg %d\n" % n, unique_name(n) + (":2,S" if n % 2 else ""), "cur" if n % 2 else "new")
    storage = MaildirStorage(tmp_path)
    assert await storage.lock("alice")
    uids = [await storage.uidl("alice", n) for n in range(1, 7)]
    # Meanwhile: message 3 deleted by someone else, message 5 renamed by an IMAP server.
    (box / "cur" / (unique_name(3) + ":2,S")).unlink()
    os.rename(box / "cur" / (unique_name(5) + ":2,S"), box / "cur" / (unique_name(5) + ":2,ST"))
    await storage.dele("alice", [2, 3, 5, 5])
    await storage.unlock("alice")
    left = sorted(os.listdir(box / "new") + os.listdir(box / "cur"))
    assert left == sorted([unique_name(1) + ":2,S", unique_name(4), unique_name(6)])
    assert index_uids(box) == [uids[0], uids[3], uids[5]]
    _, after = await session(storage)
    assert after == [uids[0], uids[3], uids[5]]


async def test_crash_before_index_update_is_repaired(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, measured: list[str]
) -> None:
    box = make_maildir(tmp_path)
    for n in range(3):
        deliver(box, b"msg %d\n" % n, unique_name(n))
    storage = MaildirStorage(tmp_path)
    await session(storage)
    assert await storage.lock("alice")
    with monkeypatch.context() as patch:
        # The process "dies" after the unlinks: the index still lists message 2.
        patch.setattr(maildir_module.maildir_index, "write", lambda *args: None)
        await storage.dele("alice", [2])
    await storage.unlock("alice")
    assert unique_name(1) in index_uids(box)
    measured.clear()
    assert await session(storage) == ([7, 7], [unique_name(0), unique_name(2)])
    assert measured == []
    assert unique_name(1) not in index_uids(box)


# -- the lock -----------------------------------------------------------------


async def test_lock_is_exclusive_within_the_process(tmp_path: Path) -> None:
    make_maildir(tmp_path)
    one, two = MaildirStorage(tmp_path), MaildirStorage(str(tmp_path) + "/")
    assert await one.lock("alice")
    assert one.is_locked("alice")
    assert not await one.lock("alice")
    assert not await two.lock("alice")
    assert await two.lock("bob")  # another mailbox is free
    await two.unlock("alice")  # not two's lock: no effect
    assert not await two.lock("alice")
    await one.unlock("alice")
    assert await two.lock("alice")
    await two.unlock("alice")
    await two.unlock("bob")


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


async def test_lock_holds_across_processes_and_dies_with_its_holder(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    storage = MaildirStorage(tmp_path)
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", HOLD_LOCK, str(box / LOCK_NAME)], stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        with trio.fail_after(10):
            assert (await proc.stdout.receive_some()).startswith(b"locked")
        assert not await storage.lock("alice")
        assert not storage.is_locked("alice")
    finally:
        proc.kill()  # SIGKILL: no cleanup in the holder
        await proc.wait()
    assert await storage.lock("alice")
    await storage.unlock("alice")


async def test_our_lock_is_seen_by_other_processes(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    storage = MaildirStorage(tmp_path)
    probe = "import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR)\ntry:\n"
    probe += "    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(3)\n"
    command = [sys.executable, "-c", probe, str(box / LOCK_NAME)]
    assert await storage.lock("alice")
    assert (await trio.run_process(command, check=False)).returncode == 3
    await storage.unlock("alice")
    assert (await trio.run_process(command, check=False)).returncode == 0


# -- a big mailbox ------------------------------------------------------------


def write_many(new: Path, count: int) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for n in range(count):
        fd = os.open(os.path.join(new, unique_name(n)), flags, 0o600)
        os.write(fd, b"Subject: %d\n\nbody\n" % n)
        os.close(fd)


@pytest.fixture
def fast_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory in RAM if there is /dev/shm: 100,000 files on a busy disk take long to write."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir=shm, prefix="pop3d-test-") as path:
        yield Path(path)


async def test_100k_messages_second_login_uses_the_index(fast_dir: Path, measured: list[str]) -> None:
    count = 100_000
    box = make_maildir(fast_dir)
    await trio.to_thread.run_sync(write_many, box / "new", count)
    storage = MaildirStorage(fast_dir)
    sizes, uids = await session(storage)
    assert len(sizes) == len(measured) == count
    assert sizes[12345] == canonical_size(b"Subject: 12345\n\nbody\n")
    assert uids[:2] == [unique_name(0), unique_name(1)]

    measured.clear()
    with trio.fail_after(10):
        assert await storage.lock("alice")
        assert await storage.stat("alice") == count
        again = [await storage.size("alice", n) for n in range(1, count + 1)]
        assert await storage.size("alice") == sum(sizes)
    assert measured == []
    assert again == sizes
    await storage.dele("alice", [1, count])
    await storage.unlock("alice")
    assert len(json.loads((box / INDEX_NAME).read_bytes())["messages"]["name"]) == count - 2
    # Clean up now rather than in a later pytest run's basetemp rotation.
    await trio.to_thread.run_sync(shutil.rmtree, box)


# -- through the server ------------------------------------------------------


def pop_session(port: int, vanishing: Path) -> tuple[list[bytes], list[bytes], bytes, str]:
    client = poplib.POP3("127.0.0.1", port, timeout=10)
    try:
        client.user("alice")
        client.pass_("pw")
        listing = client.list()[1]
        vanishing.unlink()  # another program deletes message 3 mid-session
        _, lines, _ = client.retr(1)
        uidl = client.uidl(1)
        with pytest.raises(poplib.error_proto) as gone:
            client.retr(3)
        client.dele(1)
    finally:
        client.quit()
    return listing, lines, uidl, str(gone.value)


async def test_end_to_end_with_poplib(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    first = b"From: b@example.org\nSubject: hi\n\n.leading dot\nGr\xc3\xbc\xc3\x9fe\nno final newline"
    second = b"Subject: two\r\n\r\nkept\r\n"
    deliver(box, first, unique_name(1))
    deliver(box, second, unique_name(2) + ":2,S", "cur")
    third = deliver(box, b"Subject: three\n\n", unique_name(3))
    server = pop3d.new()
    server.configure(
        host="127.0.0.1",
        port=0,
        auth=pop3d.MemoryUsers({"alice": ("pw", "alice")}),
        storage=MaildirStorage(tmp_path),
    )
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            await server.up()
            port = server.cget("port")
            listing, lines, uidl, gone = await trio.to_thread.run_sync(pop_session, port, third)
            await server.destroy()
    assert listing == [b"1 %d" % canonical_size(first), b"2 %d" % canonical_size(second), b"3 18"]
    assert "-ERR [SYS/TEMP]" in gone
    assert lines == first.split(b"\n")  # poplib strips line ends and the stuffed dot
    assert uidl.split()[-1] == unique_name(1).encode()
    assert not (box / "new" / unique_name(1)).exists()
    assert (box / "cur" / (unique_name(2) + ":2,S")).read_bytes() == second
    assert not MaildirStorage(tmp_path).is_locked("alice")
    after = MaildirStorage(tmp_path)
    assert await after.lock("alice")  # the session let go
    assert await after.stat("alice") == 1
    await after.unlock("alice")


async def test_index_that_is_not_a_regular_file_is_ignored(tmp_path: Path) -> None:
    box = tmp_path / "alice"
    for sub in ("cur", "new", "tmp"):
        (box / sub).mkdir(parents=True)
    (box / "new" / "1700000000.M1P1.host").write_bytes(b"Subject: x\n\nbody\n")
    os.mkfifo(box / maildir_module.INDEX_NAME)  # would block a plain open() forever
    storage = MaildirStorage(tmp_path)
    with trio.fail_after(10):
        assert await storage.lock("alice")
        assert await storage.stat("alice") == 1
        await storage.unlock("alice")
    (box / maildir_module.INDEX_NAME).unlink()
    (box / maildir_module.INDEX_NAME).symlink_to("/dev/zero")
    with trio.fail_after(10):
        assert await storage.lock("alice")
        assert await storage.size("alice", 1) == len(b"Subject: x\r\n\r\nbody\r\n")
        await storage.unlock("alice")


@pytest.mark.parametrize("link", ["cur", "new", "maildir"])
async def test_symlinked_maildir_parts_are_refused(tmp_path: Path, link: str) -> None:
    # A mailbox owner must not make a root server read or delete files elsewhere.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"root:x:0:0\n")
    root = tmp_path / "mail"
    root.mkdir()
    if link == "maildir":
        (root / "alice").symlink_to(outside)
    else:
        for sub in ("cur", "new", "tmp"):
            if sub != link:
                (root / "alice" / sub).mkdir(parents=True)
        (root / "alice" / link).symlink_to(outside)
    storage = MaildirStorage(root)
    with pytest.raises(MailboxUnavailable, match="symlinks are not followed"):
        await storage.lock("alice")
    assert not storage.is_locked("alice")
    assert (outside / "secret").exists()
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]  # no lock or index file made there


# -- Dovecot's ,S= and ,W= names, and where UIDLs of new files come from ----


def dovecot_vsize(data: bytes) -> int:
    """Dovecot's ,W= value: the size with every LF counted as CRLF (no CRLF added at the end)."""
    return len(data) + data.count(b"\n") - data.count(b"\r\n")


@pytest.fixture
def counted_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length of each chunk read to count a canonical size."""
    calls: list[int] = []
    real = maildir_module._count

    def counting(data: bytes, state: list[int]) -> None:
        calls.append(len(data))
        real(data, state)

    monkeypatch.setattr(maildir_module, "_count", counting)
    return calls


@pytest.mark.parametrize("sample", sorted(SAMPLES))
async def test_sizes_from_s_and_w_names_are_exact(tmp_path: Path, sample: str, counted_reads: list[int]) -> None:
    data = SAMPLES[sample]
    box = make_maildir(tmp_path)
    deliver(box, data, f"{unique_name(1)},S={len(data)},W={dovecot_vsize(data)}:2,S", subdir="cur")
    storage = MaildirStorage(tmp_path)
    with trio.fail_after(10):
        assert await storage.lock("alice")
        try:
            listed = await storage.size("alice", 1)
            sent = unstuffed_reply(await read_all(storage, "alice", 1))
        finally:
            await storage.unlock("alice")
    assert counted_reads == []  # sized from the name (and one byte), not read
    assert listed == canonical_size(data) == len(sent)


@pytest.mark.parametrize(
    "fields",
    ["S={wrong},W={w}", "S={s},W={small}", "S={s},W={big}", "W={w}", "S={s}", "S={s},W=x", "S=,W={w}"],
)
async def test_s_and_w_that_cannot_be_trusted_are_ignored(
    tmp_path: Path, fields: str, counted_reads: list[int]
) -> None:
    data = SAMPLES["no-final-newline"]
    values = {"s": len(data), "wrong": len(data) + 1, "w": dovecot_vsize(data), "small": len(data) - 1}
    values["big"] = 2 * len(data) + 1
    box = make_maildir(tmp_path)
    deliver(box, data, f"{unique_name(1)},{fields.format(**values)}")
    with trio.fail_after(10):
        sizes, _ = await session(MaildirStorage(tmp_path))
    assert sizes == [canonical_size(data)]
    assert counted_reads  # read, as without the fields


async def test_empty_file_with_s_and_w(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    deliver(box, b"", f"{unique_name(1)},S=0,W=0")
    with trio.fail_after(10):
        assert (await session(MaildirStorage(tmp_path)))[0] == [0]


async def test_pins_and_dovecot_read_only_for_new_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = make_maildir(tmp_path)
    deliver(box, b"x\n", unique_name(1))
    (box / "dovecot-uidlist").write_text(f"3 V7 N9\n3 :{unique_name(1)}\n")
    reads: list[str] = []
    real_pins, real_dovecot = uidl_pins.read, dovecot_uidlist.read_uidls

    def pins_read(fd: int) -> dict[str, str]:
        reads.append("pins")
        return real_pins(fd)

    def dovecot_read(*args: Any) -> dict[str, str]:
        reads.append("dovecot")
        return real_dovecot(*args)

    monkeypatch.setattr(uidl_pins, "read", pins_read)
    monkeypatch.setattr(dovecot_uidlist, "read_uidls", dovecot_read)
    storage = MaildirStorage(tmp_path)
    old = time.time() - 10
    with trio.fail_after(10):
        assert (await session(storage))[1] == ["0000000300000007"]
        assert reads == ["pins", "dovecot"]
        for sub in ("new", "cur"):
            os.utime(box / sub, (old, old))  # old enough for the index to trust the times
        await session(storage)  # writes the trusted times
        reads.clear()
        (box / "new" / unique_name(1)).rename(box / "cur" / f"{unique_name(1)}:2,S")  # no new file
        assert (await session(storage))[1] == ["0000000300000007"]
        for sub in ("new", "cur"):
            os.utime(box / sub, (old, old))
        await session(storage)
        await session(storage)  # the index fast path
        assert reads == []
        deliver(box, b"y\n", unique_name(2))
        assert (await session(storage))[1] == ["0000000300000007", unique_name(2)]
        assert reads == ["pins", "dovecot"]
    # Without a format, dovecot-uidlist is ignored.
    (box / INDEX_NAME).unlink()
    with trio.fail_after(10):
        assert (await session(MaildirStorage(tmp_path, dovecot_uidl_format=None)))[1] == [
            unique_name(1),
            unique_name(2),
        ]


def test_bad_dovecot_format_is_an_error_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pop3_uidl_format"):
        MaildirStorage(tmp_path, dovecot_uidl_format="%q")
    assert MaildirStorage(tmp_path).dovecot_uidl_format == "%08Xu%08Xv"
    assert MaildirStorage(tmp_path, dovecot_uidl_format=None).dovecot_uidl_format is None


async def test_existing_index_keeps_its_uidls_when_a_uidlist_appears(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    deliver(box, b"x\n", unique_name(1))
    storage = MaildirStorage(tmp_path)
    with trio.fail_after(10):
        assert (await session(storage))[1] == [unique_name(1)]
        (box / "dovecot-uidlist").write_text(f"3 V7 N9\n3 :{unique_name(1)}\n4 :{unique_name(2)}\n")
        deliver(box, b"y\n", unique_name(2))
        assert (await session(storage))[1] == [unique_name(1), "0000000400000007"]
        report = await storage.uidl_report("alice")
        missing = await storage.uidl_report("nobody-here")
    assert [e.source for e in report] == ["maildir", "dovecot"]
    assert missing == []


async def test_uidl_report_during_a_session_and_unlocked(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    deliver(box, b"x\n", unique_name(1))
    storage = MaildirStorage(tmp_path)
    with trio.fail_after(10):
        unlocked = await storage.uidl_report("alice")  # no index yet: a scan that writes nothing
        assert not (box / INDEX_NAME).exists()
        assert await storage.lock("alice")
        try:
            deliver(box, b"y\n", unique_name(2))
            during = await storage.uidl_report("alice")  # the session's snapshot
        finally:
            await storage.unlock("alice")
    assert [e.uidl for e in unlocked] == [e.uidl for e in during] == [unique_name(1)]
