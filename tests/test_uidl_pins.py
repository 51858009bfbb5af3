"""pop3d.uidl_pins, and the UIDLs MaildirStorage gives files new to its index: pin, Dovecot, own."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest
import trio

from pop3d import uidl_pins
from pop3d.callbacks import MailboxUnavailable
from pop3d.maildir import INDEX_NAME, LOCK_NAME, MaildirStorage

from .test_maildir import deliver, make_maildir, session, unique_name


def names(n: int) -> list[str]:
    return [unique_name(i) for i in range(1, n + 1)]


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    assert uidl_pins.load(box) == {}
    assert uidl_pins.load(tmp_path / "missing") == {}
    pins = {"a.b.c": "UID-1", "caf\udce9.host": "x" * 70}  # a name that is not UTF-8 on disk
    uidl_pins.save(box, pins)
    assert uidl_pins.load(box) == pins
    assert (box / uidl_pins.PINS_NAME).read_bytes().startswith(b"# pop3d-uidl-pins 1\n")
    assert not (box / (uidl_pins.PINS_NAME + ".tmp")).exists()
    uidl_pins.save(box, {})
    assert not (box / uidl_pins.PINS_NAME).exists()


@pytest.mark.parametrize(
    "pins",
    [
        {"a": "has space"},
        {"a": ""},
        {"a": "x" * 71},
        {"a": "caf\u00e9"},
        {"a": "same", "b": "same"},
        {"": "x"},
        {".hidden": "x"},
        {"a/b": "x"},
        {"a:2,S": "x"},
        {"a\nb": "x"},
    ],
)
def test_save_refuses_bad_pins(tmp_path: Path, pins: dict[str, str]) -> None:
    box = make_maildir(tmp_path)
    uidl_pins.save(box, {"kept": "K"})
    with pytest.raises(ValueError):
        uidl_pins.save(box, pins)
    assert uidl_pins.load(box) == {"kept": "K"}  # nothing written


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"UID a\n",  # no header
        b"# pop3d-uidl-pins 1\nUID\n",
        b"# pop3d-uidl-pins 1\nUID a",  # cut short
        b"# pop3d-uidl-pins 1\nU a\nU b\n",
        b"# pop3d-uidl-pins 1\nU a\nV a\n",
        b"# pop3d-uidl-pins 1\n\xff a\n",
        b"# pop3d-uidl-pins 1\nU ../x\n",
    ],
)
def test_damaged_files(tmp_path: Path, data: bytes) -> None:
    box = make_maildir(tmp_path)
    (box / uidl_pins.PINS_NAME).write_bytes(data)
    with pytest.raises(uidl_pins.PinsError):
        uidl_pins.load(box)


def test_save_needs_the_lock(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    fd = os.open(box / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(uidl_pins.MaildirLocked):
            uidl_pins.save(box, {"a": "b"})
    finally:
        os.close(fd)
    uidl_pins.save(box, {"a": "b"})
    with pytest.raises(FileNotFoundError):
        uidl_pins.save(tmp_path / "missing", {"a": "b"})


async def test_save_refused_while_a_session_holds_the_maildir(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    storage = MaildirStorage(tmp_path)
    assert await storage.lock("alice")
    try:
        with pytest.raises(uidl_pins.MaildirLocked):
            uidl_pins.save(box, {"a": "b"})
    finally:
        await storage.unlock("alice")


async def test_pins_win_for_new_files_and_save_reopens_changed_ones(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    first, second, third = names(3)
    for name in (first, second):
        deliver(box, b"Subject: x\n\nbody\n", name)
    uidl_pins.save(box, {first: "OLD-1"})
    storage = MaildirStorage(tmp_path)
    with trio.fail_after(10):
        assert (await session(storage))[1] == ["OLD-1", second]
        # A pin added later: save() drops that message from the index, so it gets the pin.
        uidl_pins.save(box, {first: "OLD-1", second: "OLD-2"})
        assert (await session(storage))[1] == ["OLD-1", "OLD-2"]
        deliver(box, b"Subject: y\n\nnew\n", third)
        assert (await session(storage))[1] == ["OLD-1", "OLD-2", third]
        # A pin removed: the message gets its own UIDL back.
        uidl_pins.save(box, {first: "OLD-1"})
        assert (await session(storage))[1] == ["OLD-1", second, third]
        report = await storage.uidl_report("alice")
    assert [(e.number, e.uidl, e.source) for e in report] == [
        (1, "OLD-1", "imported"),
        (2, second, "maildir"),
        (3, third, "maildir"),
    ]
    assert report[0].file == f"new/{first}" and report[0].size == len(b"Subject: x\r\n\r\nbody\r\n")


async def test_own_uidls_never_take_a_pinned_or_dovecot_one(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    a, b, c = names(3)
    for name in (a, b, c):
        deliver(box, b"x\n", name)
    # b's unique name is pinned as a's UIDL, and c's is Dovecot's UIDL of a message gone since.
    (box / "dovecot-uidlist").write_text(f"3 V7 N9\n1 P{c} :gone.host\n")
    uidl_pins.save(box, {a: b})
    with trio.fail_after(10):
        uids = (await session(MaildirStorage(tmp_path)))[1]
        report = await MaildirStorage(tmp_path).uidl_report("alice")
    assert uids[0] == b
    assert uids[1].startswith("sha1-") and uids[2].startswith("sha1-")
    assert len(set(uids)) == 3
    assert [e.source for e in report] == ["imported", "hashed", "hashed"]


async def test_a_pin_taken_by_a_served_message_is_not_used(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    a, b = names(2)
    deliver(box, b"x\n", a)
    storage = MaildirStorage(tmp_path)
    with trio.fail_after(10):
        assert (await session(storage))[1] == [a]  # served: a keeps its UIDL
        deliver(box, b"y\n", b)
        (box / uidl_pins.PINS_NAME).write_bytes(b"# pop3d-uidl-pins 1\n" + f"{a} {b}\n".encode())
        uids = (await session(storage))[1]
    assert uids == [a, b]  # b gets its own, with a warning


async def test_damaged_pins_refuse_the_mailbox_when_needed(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    deliver(box, b"x\n", unique_name(1))
    storage = MaildirStorage(tmp_path)
    with trio.fail_after(10):
        assert (await session(storage))[1] == [unique_name(1)]
        (box / uidl_pins.PINS_NAME).write_bytes(b"junk")
        assert (await session(storage))[1] == [unique_name(1)]  # nothing new: the pins are not read
        deliver(box, b"y\n", unique_name(2))
        with pytest.raises(MailboxUnavailable, match="pop3d-uidl-pins"):
            await storage.lock("alice")
        # save() replaces a damaged file and drops the whole index.
        uidl_pins.save(box, {unique_name(2): "P2"})
        assert not (box / INDEX_NAME).exists()
        assert (await session(storage))[1] == [unique_name(1), "P2"]


@pytest.mark.skipif(os.geteuid() != 0, reason="files made as root: root only (CI runs as root)")
async def test_files_made_as_root_belong_to_the_mails_owner(tmp_path: Path) -> None:
    # pop3d uidl import runs as root; pop3d serve then serves the Maildir as its owner (--user).
    box = make_maildir(tmp_path)
    [first] = names(1)
    deliver(box, b"Subject: x\n\nbody\n", first)
    nobody = 65534
    for path in (box, *box.iterdir(), *(box / "new").iterdir()):
        os.chown(path, nobody, nobody)
    uidl_pins.save(box, {first: "OLD-1"})
    with trio.fail_after(10):
        assert (await session(MaildirStorage(tmp_path)))[1] == ["OLD-1"]
    for name in (LOCK_NAME, uidl_pins.PINS_NAME, INDEX_NAME):
        st = (box / name).stat()
        assert (st.st_uid, st.st_gid) == (nobody, nobody), name
