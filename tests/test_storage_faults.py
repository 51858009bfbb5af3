"""Storage faults: bad message files, Maildirs that cannot be served, damaged indexes, cancels.

Real Maildirs in ``tmp_path``.  A "thread that hangs" is a helper patched
to wait on a :class:`threading.Event` (at most 10 s, so a test that fails
still ends); every wait is under ``trio.fail_after``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from pop3d import maildir as maildir_module
from pop3d.callbacks import MailboxUnavailable, iterate_message, sync_storage
from pop3d.maildir import INDEX_NAME, LOCK_NAME, MaildirStorage

from .test_maildir import deliver, index_uids, make_maildir, read_all, session, unique_name

PROMPT = 2.0  # seconds a cancelled call may take to return: far less than the 10 s a hung helper waits


class Hang:
    """Makes a function wait in its (worker) thread until :meth:`release`."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self._release = threading.Event()

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def hung(*args: Any, **kwargs: Any) -> Any:
            self.entered.set()
            self._release.wait(10)
            return fn(*args, **kwargs)

        return hung

    async def wait_entered(self) -> None:
        with trio.fail_after(5):
            while not self.entered.is_set():  # noqa: ASYNC110 - a thread's event, not a trio one
                await trio.sleep(0.005)

    def release(self) -> None:
        self._release.set()


@pytest.fixture
def hang() -> Iterator[Hang]:
    h = Hang()
    yield h
    h.release()  # never leave a thread waiting after the test


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def fd_target(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


async def eventually(predicate: Callable[[], bool]) -> None:
    """Wait (at most 5 s) until ``predicate()`` holds: what an abandoned thread does when released."""
    with trio.fail_after(5):
        while not predicate():  # noqa: ASYNC110 - polling what a worker thread changes
            await trio.sleep(0.005)


async def lock_when_free(storage: MaildirStorage, mbox: str = "alice") -> None:
    """Lock ``mbox`` as soon as nothing holds it any more (at most 5 s)."""
    with trio.fail_after(5):
        while not await storage.lock(mbox):  # noqa: ASYNC110 - the lock has no event to wait for
            await trio.sleep(0.005)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text
    return text


# -- 1. a message file that cannot be read ---------------------------------------------------


def make_regular(path: Path) -> None:
    if path.is_symlink() or path.is_fifo() or path.is_file():
        path.unlink()
    elif path.is_dir():
        path.rmdir()
    path.write_bytes(b"Subject: two\n\nbody\n")


def spoil(path: Path, how: str) -> None:
    """What another program may put in a message file's place."""
    path.unlink()
    if how == "directory":
        path.mkdir()
    elif how == "symlink":
        path.symlink_to("/etc/hostname")
    elif how == "fifo":
        os.mkfifo(path)
    else:
        raise AssertionError(how)


@pytest.fixture
def spoiled_after_listing(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """While ``plan["how"]`` is set, ``plan["path"]`` is a message file when the Maildir is listed, and
    something unreadable by the time it is read (the race a root server sees; a non-root one also sees
    plain permission errors)."""
    plan: dict[str, Any] = {"how": None, "path": None}
    real = maildir_module._message_files

    def listing(dirs: Any) -> Iterator[tuple[str, str, os.stat_result]]:
        if plan["how"] is not None:
            make_regular(plan["path"])
        entries = list(real(dirs))
        if plan["how"] is not None:
            spoil(plan["path"], plan["how"])
        return iter(entries)

    def unblock() -> None:
        # A reader blocked on the FIFO (the bug this guards against) is let go, so the test ends.
        path = plan["path"]
        if path is not None and path.is_fifo():
            with contextlib.suppress(OSError):  # ENXIO: no reader was blocked
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))

    monkeypatch.setattr(maildir_module, "_message_files", listing)
    watchdog = threading.Timer(8, unblock)
    watchdog.start()
    yield plan
    watchdog.cancel()
    unblock()


@pytest.mark.parametrize("how", ["directory", "symlink", "fifo"])
async def test_unreadable_message_is_skipped_and_logged_once(
    tmp_path: Path, spoiled_after_listing: dict[str, Any], caplog: pytest.LogCaptureFixture, how: str
) -> None:
    box = make_maildir(tmp_path)
    deliver(box, b"Subject: one\n\nbody\n", unique_name(1))
    deliver(box, b"Subject: three\n\nbody\n", unique_name(3))
    bad = box / "new" / unique_name(2)
    spoiled_after_listing.update(how=how, path=bad)
    storage = MaildirStorage(tmp_path)
    caplog.set_level(logging.WARNING, logger="pop3d.maildir")
    for _ in range(3):
        with trio.fail_after(5):
            assert await storage.lock("alice")
        assert await storage.stat("alice") == 2
        assert [await storage.uidl("alice", n) for n in (1, 2)] == [unique_name(1), unique_name(3)]
        assert await read_all(storage, "alice", 2) == b"Subject: three\n\nbody\n"
        await storage.unlock("alice")
    logged = warnings_of(caplog)
    assert len(logged) == 1, logged  # once while it stays unreadable, not at every login
    assert str(bad) in logged[0]
    assert "\n" not in logged[0]
    # Fine again: served.
    spoiled_after_listing["how"] = None
    make_regular(bad)
    assert (await session(storage))[1] == [unique_name(n) for n in (1, 2, 3)]
    # Spoiled once known (by name, from the index): still listed, but never read through.
    spoiled_after_listing["how"] = how
    with trio.fail_after(5):
        assert await storage.lock("alice")
        assert await storage.stat("alice") == 3
        with pytest.raises(OSError):
            await storage.get("alice", 2)
        await storage.unlock("alice")
    # Spoiled before a listing: no longer a file, no longer a message.
    spoiled_after_listing["how"] = None
    make_regular(bad)
    spoil(bad, how)
    assert (await session(storage))[1] == [unique_name(1), unique_name(3)]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file of mode 000")
async def test_message_without_read_permission_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    box = make_maildir(tmp_path)
    deliver(box, b"Subject: one\n\nbody\n", unique_name(1))
    deliver(box, b"Subject: two\n\nbody\n", unique_name(2)).chmod(0)
    caplog.set_level(logging.WARNING, logger="pop3d.maildir")
    assert (await session(MaildirStorage(tmp_path)))[1] == [unique_name(1)]
    assert any(unique_name(2) in text and "ermission" in text for text in warnings_of(caplog))


async def test_a_passing_fault_while_measuring_fails_the_login(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Out of descriptors is the process's fault, not the message's: hiding the message would be wrong.
    box = make_maildir(tmp_path)
    deliver(box, b"x\n", unique_name(1))

    def out_of_fds(*args: object) -> None:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(maildir_module, "_measure", out_of_fds)
    storage = MaildirStorage(tmp_path)
    with pytest.raises(OSError) as caught:
        await storage.lock("alice")
    assert not isinstance(caught.value, MailboxUnavailable)
    assert caught.value.errno == errno.EMFILE
    monkeypatch.undo()
    assert await session(storage) == ([3], [unique_name(1)])  # nothing held


# -- 2 and 3. a Maildir that cannot be served ----------------------------------------------


async def test_a_regular_file_for_a_maildir_is_unavailable(tmp_path: Path) -> None:
    mbox = tmp_path / "alice"
    mbox.write_bytes(b"From bob@example.org Thu Jan  1 00:00:00 2026\nSubject: mbox\n\nhi\n")
    storage = MaildirStorage(tmp_path)
    for _ in range(2):  # and nothing held: the same answer again, not IN-USE
        with pytest.raises(MailboxUnavailable) as caught:
            await storage.lock("alice")
        text = one_line(caught.value)
        assert str(mbox) in text
        assert "not a Maildir" in text
        assert "regular file" in text
        assert not storage.is_locked("alice")
    assert mbox.read_bytes().startswith(b"From bob")
    assert sorted(os.listdir(tmp_path)) == ["alice"]


def lock_file_is_a_directory(root: Path) -> tuple[str, str]:
    box = make_maildir(root)
    (box / LOCK_NAME).mkdir()
    return "alice", f"{box / LOCK_NAME} is not a regular file: it is a directory"


def name_too_long(root: Path) -> tuple[str, str]:
    return "a" * 300, "File name too long"


def root_is_a_file(root: Path) -> tuple[str, str]:
    (root / "file").write_text("not a directory\n")
    return "alice", "is not a Maildir"


def maildir_is_a_symlink(root: Path) -> tuple[str, str]:
    (root / "elsewhere").mkdir()
    (root / "alice").symlink_to(root / "elsewhere")
    return "alice", "symlinks are not followed"


def new_is_a_file(root: Path) -> tuple[str, str]:
    box = make_maildir(root)
    (box / "new").rmdir()
    (box / "new").write_text("")
    return "alice", f"{box / 'new'} is not a directory: it is a regular file"


@pytest.mark.parametrize(
    "setup", [lock_file_is_a_directory, name_too_long, root_is_a_file, maildir_is_a_symlink, new_is_a_file]
)
async def test_permanent_faults_are_mailbox_unavailable(
    tmp_path: Path, setup: Callable[[Path], tuple[str, str]]
) -> None:
    mbox, expected = setup(tmp_path)
    root = tmp_path / "file" if setup is root_is_a_file else tmp_path
    storage = MaildirStorage(root)
    fds = open_fds()
    for _ in range(2):
        with pytest.raises(MailboxUnavailable) as caught:
            await storage.lock(mbox)
        assert expected in one_line(caught.value)
        assert len(str(caught.value)) < 400  # a 300-character name is cut short
    assert not storage.is_locked(mbox)
    assert open_fds() == fds


async def test_passing_faults_stay_ordinary_exceptions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = make_maildir(tmp_path)
    real_open = os.open

    def fail_for_the_maildir(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if path == str(box):
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fail_for_the_maildir)
    storage = MaildirStorage(tmp_path)
    with pytest.raises(OSError) as caught:
        await storage.lock("alice")
    assert not isinstance(caught.value, MailboxUnavailable)
    monkeypatch.undo()
    assert await storage.lock("alice")
    await storage.unlock("alice")


# -- 4. a damaged index ------------------------------------------------------------------------


def good_index(box: Path) -> dict[str, Any]:
    return json.loads((box / INDEX_NAME).read_bytes())  # type: ignore[no-any-return]


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def lie_about_a_size(index: dict[str, Any]) -> str:
    # Right file size, mtime and uid: only the canonical size is out of range.
    index["messages"]["size"][0] = 2**53
    return json.dumps(index)


def float_size(index: dict[str, Any]) -> str:
    index["messages"]["size"][0] = 7.0
    return json.dumps(index)


def bad_uid(index: dict[str, Any]) -> str:
    index["messages"]["uid"][0] = "has space"
    return json.dumps(index)


def same_uid_twice(index: dict[str, Any]) -> str:
    index["messages"]["uid"][1] = index["messages"]["name"][0].partition(":")[0]
    return json.dumps(index)


def uid_with_a_line_end(index: dict[str, Any]) -> str:
    # Two valid-looking lines in one UIDL: it would break the UIDL listing.
    index["messages"]["uid"][0] = "abc\ndef"
    return json.dumps(index)


def path_for_a_name(index: dict[str, Any]) -> str:
    # The index is the mailbox owner's file: a name must never lead out of new/ or cur/.
    index["messages"]["name"][0] = "../../../etc/passwd"
    return json.dumps(index)


def column_too_short(index: dict[str, Any]) -> str:
    index["messages"]["mtime"].pop()
    return json.dumps(index)


def entry_of_wrong_shape(index: dict[str, Any]) -> str:
    index["messages"]["name"] = {"size": 1}
    return json.dumps(index)


def deeply_nested_entry(index: dict[str, Any]) -> str:
    return json.dumps(index)[:-2] + ',"other":' + deep(100_000) + "}}"


@pytest.mark.parametrize(
    "damage",
    [
        lambda index: deep(100_000),
        lambda index: '{"format": 2, "dirs": {}, "messages": ' + deep(50_000) + "}",
        deeply_nested_entry,
        lie_about_a_size,
        float_size,
        bad_uid,
        same_uid_twice,
        uid_with_a_line_end,
        path_for_a_name,
        column_too_short,
        entry_of_wrong_shape,
    ],
    ids=[
        "deep",
        "deep-files",
        "deep-entry",
        "size-2**53",
        "float-size",
        "bad-uid",
        "same-uid",
        "uid-lf",
        "path-name",
        "short-column",
        "wrong-shape",
    ],
)
async def test_malformed_index_is_ignored_and_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: Callable[[dict[str, Any]], str]
) -> None:
    box = make_maildir(tmp_path)
    for n in range(3):
        deliver(box, b"msg %d\n" % n, unique_name(n))
    storage = MaildirStorage(tmp_path)
    first = await session(storage)
    (box / INDEX_NAME).write_text(damage(good_index(box)))
    caplog.set_level(logging.WARNING, logger="pop3d.maildir")
    with trio.fail_after(10):
        assert await session(storage) == first
        assert await session(storage) == first
    logged = warnings_of(caplog)
    assert len(logged) == 1, logged
    assert "index" in logged[0]
    assert "\n" not in logged[0]
    assert index_uids(box) == first[1]
    assert good_index(box)["messages"]["size"] == first[0]


async def test_damaged_index_of_an_empty_maildir_is_rewritten(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    box = make_maildir(tmp_path)
    (box / INDEX_NAME).write_text(deep(100_000))
    caplog.set_level(logging.WARNING, logger="pop3d.maildir")
    storage = MaildirStorage(tmp_path)
    assert await session(storage) == ([], [])
    assert await session(storage) == ([], [])
    assert len(warnings_of(caplog)) == 1
    assert good_index(box)["messages"]["name"] == []


# -- 5. unlock whatever closing does ----------------------------------------------------------


async def test_unlock_releases_even_if_closing_the_lock_file_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    box = make_maildir(tmp_path)
    storage = MaildirStorage(tmp_path)
    assert await storage.lock("alice")
    [lock_fd] = [int(fd) for fd in open_fds() if fd_target(fd) == str(box / LOCK_NAME)]
    real_close = os.close

    def failing_close(fd: int) -> None:
        real_close(fd)  # Linux frees the descriptor even when close() reports an error
        if fd == lock_fd:
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "close", failing_close)
    caplog.set_level(logging.WARNING, logger="pop3d.maildir")
    await storage.unlock("alice")
    monkeypatch.undo()
    assert not storage.is_locked("alice")
    assert not any(fd_target(fd) == str(box / LOCK_NAME) for fd in open_fds())
    checker = MaildirStorage(tmp_path)
    assert await checker.lock("alice")  # not IN-USE until a restart
    await checker.unlock("alice")
    logged = warnings_of(caplog)
    assert len(logged) == 1
    assert "Input/output error" in logged[0]


# -- 6. a cancel does not wait for a worker thread, and leaks nothing -------------------------


async def test_cancelled_lock_returns_at_once_and_releases_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hang: Hang
) -> None:
    box = make_maildir(tmp_path)
    deliver(box, b"x\n", unique_name(1))
    monkeypatch.setattr(maildir_module, "_read_listing", hang.wrap(maildir_module._read_listing))
    storage = MaildirStorage(tmp_path)
    fds = open_fds()
    with trio.fail_after(PROMPT):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(storage.lock, "alice")
                await hang.wait_entered()
                scope.cancel()
    assert scope.cancelled_caught
    assert not storage.is_locked("alice")
    other = MaildirStorage(tmp_path)
    assert not await other.lock("alice")  # the thread still holds it: nobody may serve it now
    hang.release()
    monkeypatch.undo()
    await lock_when_free(other)  # released once the thread is done
    await other.unlock("alice")
    assert open_fds() == fds  # the lock file and the directories are closed


async def test_cancel_as_the_lock_thread_finishes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The cancel lands while the thread hands its result over: whichever side
    # learns last that the caller is gone must release, and only one of them.
    box = make_maildir(tmp_path)
    deliver(box, b"x\n", unique_name(1))
    real_scan = maildir_module._read_listing
    scopes: list[trio.CancelScope] = []

    def scan_then_cancel(dirs: Any) -> Any:
        result = real_scan(dirs)
        trio.from_thread.run_sync(scopes[-1].cancel)
        return result

    monkeypatch.setattr(maildir_module, "_read_listing", scan_then_cancel)
    storage = MaildirStorage(tmp_path)
    fds = open_fds()
    for _ in range(20):
        with trio.fail_after(PROMPT):
            with trio.CancelScope() as scope:
                scopes.append(scope)
                await storage.lock("alice")
        assert scope.cancelled_caught
        assert not storage.is_locked("alice")
        checker = MaildirStorage(tmp_path)
        monkeypatch.setattr(maildir_module, "_read_listing", real_scan)
        await lock_when_free(checker)
        await checker.unlock("alice")
        monkeypatch.setattr(maildir_module, "_read_listing", scan_then_cancel)
    assert open_fds() == fds


async def test_cancelled_get_closes_the_file_when_its_thread_is_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hang: Hang
) -> None:
    box = make_maildir(tmp_path)
    deliver(box, b"x\n", unique_name(1))
    storage = MaildirStorage(tmp_path)
    fds = open_fds()
    assert await storage.lock("alice")
    monkeypatch.setattr(maildir_module, "_open_message", hang.wrap(maildir_module._open_message))
    with trio.fail_after(PROMPT), trio.move_on_after(0.05):
        await storage.get("alice", 1)
    assert hang.entered.is_set()
    await storage.unlock("alice")  # the session ends while the thread still opens the file
    assert not await MaildirStorage(tmp_path).lock("alice")  # held until that thread is done
    hang.release()
    checker = MaildirStorage(tmp_path)
    await lock_when_free(checker)
    await checker.unlock("alice")
    await eventually(lambda: open_fds() == fds)  # the file the abandoned thread opened is closed


async def test_cancelled_read_closes_the_file_after_the_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hang: Hang
) -> None:
    box = make_maildir(tmp_path)
    deliver(box, b"x" * 10_000, unique_name(1))
    storage = MaildirStorage(tmp_path, chunk_size=1000)
    assert await storage.lock("alice")
    data = await storage.get("alice", 1)
    assert not isinstance(data, bytes)
    [fd] = [int(fd) for fd in open_fds() if unique_name(1) in fd_target(fd)]
    real_read = os.read
    hung_read = hang.wrap(real_read)
    monkeypatch.setattr(os, "read", lambda f, n: hung_read(f, n) if f == fd else real_read(f, n))
    chunks = aiter(iterate_message(data))
    assert await anext(chunks) == b"x" * 1000  # read with the open, in the same thread trip
    with trio.fail_after(PROMPT), trio.move_on_after(0.05) as scope:
        await anext(chunks)
    assert scope.cancelled_caught
    await chunks.aclose()  # type: ignore[attr-defined]
    # Not closed under the read: the number could go to another file, which the late read would consume.
    assert unique_name(1) in fd_target(str(fd))
    hang.release()
    await eventually(lambda: unique_name(1) not in fd_target(str(fd)))
    monkeypatch.undo()
    await storage.unlock("alice")


async def test_cancelled_dele_finishes_in_the_background_holding_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hang: Hang
) -> None:
    box = make_maildir(tmp_path)
    for n in range(1, 5):
        deliver(box, b"msg %d\n" % n, unique_name(n))
    storage = MaildirStorage(tmp_path)
    fds = open_fds()
    assert await storage.lock("alice")
    # Halfway: the files are unlinked, the index not yet written.
    monkeypatch.setattr(maildir_module.maildir_index, "write", hang.wrap(maildir_module.maildir_index.write))
    with trio.fail_after(PROMPT), trio.move_on_after(0.05) as scope:
        await storage.dele("alice", [1, 3])
    assert scope.cancelled_caught
    await storage.unlock("alice")
    other = MaildirStorage(tmp_path)
    assert not await other.lock("alice")  # nobody sees the mailbox halfway
    hang.release()
    await lock_when_free(other)
    assert [await other.uidl("alice", n) for n in (1, 2)] == [unique_name(2), unique_name(4)]
    await other.unlock("alice")
    monkeypatch.undo()
    assert index_uids(box) == [unique_name(2), unique_name(4)]
    assert sorted(os.listdir(box / "new")) == [unique_name(2), unique_name(4)]
    assert open_fds() == fds


# -- 6. the sync adapters --------------------------------------------------------------------


class SyncBox:
    """A plain synchronous storage recording its calls; ``hang`` makes one method wait."""

    def __init__(self, hang: Hang, slow: str) -> None:
        self.calls: list[str] = []
        self.locked: set[str] = set()
        self.closed = threading.Event()
        self._slow = slow
        self._hang = hang

    def _call(self, name: str) -> None:
        if name == self._slow:
            self._hang.wrap(lambda: None)()
        self.calls.append(name)

    def lock(self, mbox: str) -> bool:
        self._call("lock")
        if mbox in self.locked:
            return False
        self.locked.add(mbox)
        return True

    def unlock(self, mbox: str) -> None:
        self._call("unlock")
        self.locked.discard(mbox)

    def stat(self, mbox: str) -> int:
        self._call("stat")
        return 1

    def dele(self, mbox: str, msgs: list[int]) -> None:
        self._call("dele")

    def get(self, mbox: str, msg: int) -> Chunks:
        self._call("get")
        return Chunks(self)


class Chunks:
    """A message as a sync get() may return it: an iterator with a close(), a file say."""

    def __init__(self, box: SyncBox) -> None:
        self._box = box
        self._left = [b"one", b"two"]

    def __iter__(self) -> Chunks:
        return self

    def __next__(self) -> bytes:
        if not self._left:
            raise StopIteration
        if len(self._left) == 1 and self._box._slow == "next":
            self._box._hang.wrap(lambda: None)()
        return self._left.pop(0)

    def close(self) -> None:
        self._box.closed.set()


async def test_sync_lock_abandoned_is_undone(hang: Hang) -> None:
    target = SyncBox(hang, "lock")
    storage = sync_storage(target)
    with trio.fail_after(PROMPT), trio.move_on_after(0.05) as scope:
        await storage.lock("alice")
    assert scope.cancelled_caught
    hang.release()
    await eventually(lambda: target.calls == ["lock", "unlock"])
    assert target.locked == set()
    assert await storage.lock("alice")


async def test_sync_dele_abandoned_finishes_before_unlock(hang: Hang) -> None:
    target = SyncBox(hang, "dele")
    storage = sync_storage(target)
    assert await storage.lock("alice")
    with trio.fail_after(PROMPT), trio.move_on_after(0.05) as scope:
        await storage.dele("alice", [1])
    assert scope.cancelled_caught
    with trio.fail_after(PROMPT), trio.move_on_after(0.05):
        await storage.unlock("alice")  # waits behind the dele, in its thread
    assert target.calls == ["lock"]
    hang.release()
    await eventually(lambda: target.calls == ["lock", "dele", "unlock"])
    assert await storage.lock("alice")


async def test_sync_chunks_abandoned_close_the_iterator_after_next(hang: Hang) -> None:
    target = SyncBox(hang, "next")
    storage = sync_storage(target)
    data = await storage.get("alice", 1)
    chunks = aiter(iterate_message(data))
    assert await anext(chunks) == b"one"
    with trio.fail_after(PROMPT), trio.move_on_after(0.05) as scope:
        await anext(chunks)
    assert scope.cancelled_caught
    await chunks.aclose()  # type: ignore[attr-defined]
    assert not target.closed.is_set()  # not closed under a running next()
    hang.release()
    await eventually(target.closed.is_set)


async def test_sync_get_abandoned_closes_its_result(hang: Hang) -> None:
    target = SyncBox(hang, "get")
    storage = sync_storage(target)
    with trio.fail_after(PROMPT), trio.move_on_after(0.05) as scope:
        await storage.get("alice", 1)
    assert scope.cancelled_caught
    assert not target.closed.is_set()
    hang.release()
    await eventually(target.closed.is_set)  # what nobody will read is closed, not left to the garbage collector


async def test_sync_stat_abandoned_returns_at_once(hang: Hang) -> None:
    target = SyncBox(hang, "stat")
    storage = sync_storage(target)
    with trio.fail_after(PROMPT), trio.move_on_after(0.05) as scope:
        await storage.stat("alice")
    assert scope.cancelled_caught
    hang.release()
    await eventually(lambda: target.calls == ["stat"])
