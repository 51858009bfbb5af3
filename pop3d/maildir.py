"""Maildir storage: each mailbox is a Maildir, ``<root>/<mbox>/{cur,new,tmp}``.

The Maildirs are the ones any MTA or Dovecot writes.  Messages in ``new/``
and ``cur/`` are both served, oldest delivery first; files are never moved
or changed, only deleted (at QUIT).

Next to ``cur/`` and ``new/`` the storage keeps two files of its own:

``pop3d.lock``
    Locked with ``flock(LOCK_EX | LOCK_NB)`` for the whole session, so two
    processes never serve one mailbox; the kernel drops the lock when its
    holder dies, so a crash leaves nothing behind.
``pop3d-index``
    A JSON cache of what a login needs for each message: file size and
    mtime (to notice a changed file), canonical size and UIDL, keyed by the
    Maildir unique name.  Only files that are new or changed since the last
    session are read; the index is rewritten (temp file, fsync, rename) when
    it differs from the directory, and rebuilt when missing or damaged.

A mailbox whose Maildir does not exist is empty.  Nothing is created for it:
a directory made by this server (often running as root) could have the
wrong owner for the MTA that later delivers there.  Such a session holds
only the in-process lock, which is enough as it has nothing to delete.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from .callbacks import MessageData

__all__ = ["CHUNK_SIZE", "INDEX_NAME", "LOCK_NAME", "MaildirStorage"]

log = logging.getLogger("pop3d.maildir")

CHUNK_SIZE = 262144
"""Bytes per chunk that :meth:`MaildirStorage.get` yields."""
INDEX_NAME = "pop3d-index"
"""The index file in each Maildir."""
# About 100 bytes a message: room for millions of messages, not for a hostile file.
MAX_INDEX_SIZE = 512 * 1024 * 1024
LOCK_NAME = "pop3d.lock"
"""The lock file in each Maildir."""

_INDEX_FORMAT = 1
_MEASURE_CHUNK = 1 << 20
_SUBDIRS = ("new", "cur")
_UID_MAX = 70  # RFC 1939 section 7
_OPEN_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# Maildirs locked by any MaildirStorage of this process (absolute paths).  The
# flock would refuse a second session too, but a missing Maildir has no lock
# file, and the explicit set does not depend on flock semantics.
_held: set[str] = set()
_held_guard = threading.Lock()


def _check_name(mbox: str) -> None:
    # The name becomes one path component under the root, never more.
    if not isinstance(mbox, str) or not mbox:
        raise ValueError("mailbox name must be a non-empty string")
    if mbox.startswith(".") or "/" in mbox or "\0" in mbox:
        raise ValueError(f"mailbox name not allowed: {mbox!r}")


def _uid_ok(uid: str) -> bool:
    # Printable ASCII without space is exactly 0x21..0x7E.
    return 0 < len(uid) <= _UID_MAX and uid.isascii() and uid.isprintable() and " " not in uid


def _uid_for(key: str) -> str:
    """The UIDL of the message with index key ``key``: the key, or its hash."""
    if _uid_ok(key):
        return key
    return "sha1-" + hashlib.sha1(os.fsencode(key)).hexdigest()


def _unique(name: str) -> str:
    """The Maildir unique name: what does not change when flags do."""
    return name.partition(":")[0]


def _delivery_seconds(unique: str, mtime_ns: int) -> int:
    head = unique.partition(".")[0]
    if head.isascii() and head.isdigit():
        return int(head)
    return mtime_ns // 1_000_000_000


@dataclass(slots=True)
class _Dirs:
    """A Maildir opened as directories, never through a symlink.

    The mailbox's owner controls everything below the mail root: a symlinked
    ``cur/`` would otherwise make a root server read and delete any file.
    So the Maildir and its ``new/`` and ``cur/`` are opened once with
    ``O_NOFOLLOW``, and every file is reached relative to those descriptors.
    """

    path: str  # for messages only
    fd: int
    subdirs: dict[str, int]  # "new"/"cur" -> descriptor; a missing one is absent

    def close(self) -> None:
        for fd in (*self.subdirs.values(), self.fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.subdirs = {}


def _open_dirs(path: str) -> _Dirs | None:
    """Open the Maildir at ``path``; ``None`` if it does not exist."""
    try:
        fd = os.open(path, _OPEN_DIR)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ValueError(f"{path} is not a directory (symlinks are not followed)") from None
        raise
    dirs = _Dirs(path, fd, {})
    try:
        for subdir in _SUBDIRS:
            try:
                dirs.subdirs[subdir] = os.open(subdir, _OPEN_DIR, dir_fd=fd)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise ValueError(f"{path}/{subdir} is not a directory (symlinks are not followed)") from None
                raise
    except BaseException:
        dirs.close()
        raise
    return dirs


def _measure(dirs: _Dirs, subdir: str, name: str) -> tuple[int, int, int]:
    """Read a message file: ``(file size, mtime_ns, canonical size)``.

    The canonical size follows :func:`pop3d.message.canonical_size`, counted
    chunk by chunk so that a big message does not sit in memory.
    """
    fd = os.open(name, _OPEN_READ, dir_fd=dirs.subdirs[subdir])
    try:
        st = os.fstat(fd)
        length = lf = crlf = 0
        prev_cr = False
        last = 0
        while chunk := os.read(fd, _MEASURE_CHUNK):
            length += len(chunk)
            lf += chunk.count(b"\n")
            crlf += chunk.count(b"\r\n")
            if prev_cr and chunk[0] == 0x0A:
                crlf += 1  # a CRLF split across two chunks
            prev_cr = chunk[-1] == 0x0D
            last = chunk[-1]
    finally:
        os.close(fd)
    size = length + lf - crlf
    if length and last != 0x0A:
        size += 2
    return st.st_size, st.st_mtime_ns, size


@dataclass(slots=True)
class _Message:
    subdir: str  # "new" or "cur", where the file was at login
    name: str
    key: str  # the index key: the unique name (or subdir/name for a duplicate)
    uid: str
    size: int  # canonical
    file_size: int
    mtime_ns: int


@dataclass(slots=True)
class _Maildrop:
    """One locked mailbox: the snapshot its session works on."""

    dirs: _Dirs | None  # None: the Maildir does not exist
    lock_fd: int | None
    messages: list[_Message] = field(default_factory=list)
    index: dict[str, list[Any]] = field(default_factory=dict)
    total: int = 0


def _read_index_file(dirs: _Dirs) -> bytes:
    # The mailbox's owner controls this directory: no symlinks (to /dev/zero,
    # say), no FIFOs (which would block a worker thread forever), no giants.
    fd = os.open(INDEX_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dirs.fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size > MAX_INDEX_SIZE:
            raise ValueError(f"larger than {MAX_INDEX_SIZE} bytes")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _load_index(dirs: _Dirs) -> dict[str, Any]:
    try:
        data = json.loads(_read_index_file(dirs))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("maildir %s: unreadable index, rebuilding: %s", dirs.path, exc)
        return {}
    files = data.get("files") if isinstance(data, dict) and data.get("format") == _INDEX_FORMAT else None
    if not isinstance(files, dict):
        log.warning("maildir %s: index of unknown format, rebuilding", dirs.path)
        return {}
    return files


def _write_index(dirs: _Dirs, files: dict[str, list[Any]]) -> None:
    """Replace the index atomically; a failure only costs a rebuild later."""
    tmp = INDEX_NAME + ".tmp"
    data = json.dumps({"format": _INDEX_FORMAT, "files": files}, separators=(",", ":")).encode()
    try:
        # We hold the lock, so a leftover temp file is from a crash: reuse its name.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dirs.fd)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600, dir_fd=dirs.fd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, INDEX_NAME, src_dir_fd=dirs.fd, dst_dir_fd=dirs.fd)
    except OSError as exc:
        log.warning("maildir %s: cannot write index: %s", dirs.path, exc)
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dirs.fd)


def _message_files(dirs: _Dirs) -> Iterator[tuple[str, str, os.stat_result]]:
    """(subdir, name, stat) of each message file in ``new/`` and ``cur/``."""
    for subdir, dir_fd in dirs.subdirs.items():
        entries = os.scandir(dir_fd)
        with entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue  # Maildir readers ignore dot files
                try:
                    # No symlinks: one could point at any file the server can read.
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted meanwhile
                yield subdir, entry.name, st


def _scan(dirs: _Dirs) -> tuple[list[_Message], dict[str, list[Any]]]:
    """List ``new/`` and ``cur/`` in delivery order, using and refreshing the index."""
    found: list[tuple[int, str, str, str, int, int]] = []
    for subdir, name, st in _message_files(dirs):
        unique = _unique(name)
        mtime = st.st_mtime_ns
        found.append((_delivery_seconds(unique, mtime), unique, subdir, name, st.st_size, mtime))
    found.sort()

    old = _load_index(dirs)
    index: dict[str, list[Any]] = {}
    messages: list[_Message] = []
    changed = False
    for _, unique, subdir, name, file_size, mtime in found:
        # The same unique name twice (a copy, not a rename): give the second
        # its own key so that UIDLs stay unique.
        key = unique if unique not in index else f"{subdir}/{name}"
        uid = _uid_for(key)
        cached = old.get(key)
        if (
            type(cached) is list
            and len(cached) == 4
            and cached[0] == file_size
            and cached[1] == mtime
            and type(cached[2]) is int
            and cached[2] >= 0
            and cached[3] == uid
        ):
            size: int = cached[2]
            index[key] = cached
        else:
            try:
                file_size, mtime, size = _measure(dirs, subdir, name)
            except FileNotFoundError:
                continue  # deleted by someone else since the scandir
            changed = True
            index[key] = [file_size, mtime, size, uid]
        messages.append(_Message(subdir, name, key, uid, size, file_size, mtime))
    # No misses means every key was in the old index; equal lengths then mean equal sets.
    if changed or len(index) != len(old):
        _write_index(dirs, index)
    return messages, index


def _open_maildrop(path: str) -> _Maildrop | None:
    """Lock the Maildir at ``path`` and take its snapshot; ``None`` if locked elsewhere."""
    dirs = _open_dirs(path)
    if dirs is None:
        return _Maildrop(None, None)  # no Maildir (or no root): an empty mailbox
    fd = -1
    try:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(LOCK_NAME, flags, 0o600, dir_fd=dirs.fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            dirs.close()
            return None
        messages, index = _scan(dirs)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        dirs.close()
        raise
    return _Maildrop(dirs, fd, messages, index, sum(m.size for m in messages))


def _find_moved(dirs: _Dirs, msgs: Sequence[_Message]) -> dict[str, tuple[str, str]]:
    """Where the files of ``msgs`` are now, if another program renamed them.

    An IMAP server may change flags or move ``new/`` to ``cur/`` while we
    hold our lock (it does not know it); the unique name stays, and so do
    the size and mtime.  Returns key -> (subdir, name).
    """
    wanted = {(_unique(m.name), m.file_size, m.mtime_ns): m.key for m in msgs}
    moved: dict[str, tuple[str, str]] = {}
    for subdir, name, st in _message_files(dirs):
        key = wanted.get((_unique(name), st.st_size, st.st_mtime_ns))
        if key is not None and key not in moved:
            moved[key] = (subdir, name)
    return moved


def _open_message(dirs: _Dirs, msg: _Message) -> int:
    try:
        return os.open(msg.name, _OPEN_READ, dir_fd=dirs.subdirs[msg.subdir])
    except FileNotFoundError:
        pass
    where = _find_moved(dirs, [msg]).get(msg.key)
    if where is None:
        raise FileNotFoundError(errno.ENOENT, "message file vanished", os.path.join(dirs.path, msg.subdir, msg.name))
    msg.subdir, msg.name = where
    return os.open(msg.name, _OPEN_READ, dir_fd=dirs.subdirs[msg.subdir])


def _delete(drop: _Maildrop, doomed: Sequence[_Message]) -> None:
    # Each unlink is atomic, so a crash leaves every message whole or gone;
    # the index is fixed afterwards, or by the next login if we die first.
    dirs = drop.dirs
    if dirs is None:
        return
    missing: list[_Message] = []
    touched: set[str] = set()
    for msg in doomed:
        try:
            os.unlink(msg.name, dir_fd=dirs.subdirs[msg.subdir])
            touched.add(msg.subdir)
        except FileNotFoundError:
            missing.append(msg)
    if missing:
        for subdir, name in _find_moved(dirs, missing).values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dirs.subdirs[subdir])
                touched.add(subdir)
    for subdir in touched:
        # Make the deletions durable: a message that came back after a power
        # loss would be downloaded again.
        with contextlib.suppress(OSError):
            os.fsync(dirs.subdirs[subdir])
    for msg in doomed:
        drop.index.pop(msg.key, None)
    _write_index(dirs, drop.index)


class _FileChunks:
    """The bytes of an open message file, chunk by chunk; reads run in a worker thread."""

    def __init__(self, fd: int, chunk_size: int) -> None:
        self._fd = fd
        self._chunk_size = chunk_size

    def __aiter__(self) -> _FileChunks:
        return self

    async def __anext__(self) -> bytes:
        if self._fd < 0:
            raise StopAsyncIteration
        chunk = await trio.to_thread.run_sync(os.read, self._fd, self._chunk_size)
        if not chunk:
            self._close()
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        """Close the file before the end (TOP stops early)."""
        self._close()

    def _close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __del__(self) -> None:
        # Whoever iterates may drop us without aclose(); do not leak the descriptor.
        self._close()


class MaildirStorage:
    """Serves the Maildirs under ``root``: mailbox ``mbox`` is ``<root>/<mbox>/``.

    Implements :class:`pop3d.callbacks.Storage`.  :meth:`lock` takes the
    mailbox's lock and its snapshot: the messages of ``new/`` and ``cur/``,
    numbered by delivery time (the leading seconds of the unique name, else
    the file's mtime; ties by name).  Every other call uses that snapshot
    until :meth:`unlock`, and needs the lock.  UIDLs are the unique names
    (the part before ``:``), or ``sha1-`` and their hash if those are not
    valid UIDLs.  A mailbox name that could leave ``root`` (empty, starting
    with ``.``, with ``/`` or NUL) raises :class:`ValueError`.

    Dovecot's ``,S=`` and ``,W=`` name fields are not used: ``W=`` does not
    count the CRLF added to a message without a final line end, and the
    index means each file is read once anyway.
    """

    def __init__(self, root: str | os.PathLike[str], *, chunk_size: int = CHUNK_SIZE) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self._root = os.path.abspath(os.fspath(root))
        self._chunk_size = chunk_size
        self._drops: dict[str, _Maildrop] = {}

    @property
    def root(self) -> str:
        """The mail root, as an absolute path."""
        return self._root

    def path(self, mbox: str) -> str:
        """The Maildir directory of ``mbox``; :class:`ValueError` for a bad name."""
        _check_name(mbox)
        return os.path.join(self._root, mbox)

    def describe(self) -> str:
        """``maildir:<root>``, as the admin API shows the storage."""
        return f"maildir:{self._root}"

    def __repr__(self) -> str:
        return self.describe()

    def is_locked(self, mbox: str) -> bool:
        """Whether a session of this storage holds the lock on ``mbox``."""
        _check_name(mbox)
        return mbox in self._drops

    def _drop(self, mbox: str) -> _Maildrop:
        _check_name(mbox)
        drop = self._drops.get(mbox)
        if drop is None:
            raise RuntimeError(f"mailbox {mbox!r} is not locked")
        return drop

    def _message(self, mbox: str, msg: int) -> _Message:
        messages = self._drop(mbox).messages
        if not 1 <= msg <= len(messages):
            raise IndexError(f"no message {msg} in mailbox {mbox!r}")
        return messages[msg - 1]

    async def lock(self, mbox: str) -> bool:
        """Lock ``mbox`` and number its messages; ``False`` if a session holds it.

        The lock holds against sessions of this process and, through
        ``flock`` on ``pop3d.lock``, of other processes.
        """
        path = self.path(mbox)
        with _held_guard:
            if path in _held:
                return False
            _held.add(path)
        try:
            drop = await trio.to_thread.run_sync(_open_maildrop, path)
        except BaseException:
            with _held_guard:
                _held.discard(path)
            raise
        if drop is None:
            with _held_guard:
                _held.discard(path)
            return False
        self._drops[mbox] = drop
        return True

    async def unlock(self, mbox: str) -> None:
        """Release the lock on ``mbox`` (nothing if this storage does not hold it)."""
        path = self.path(mbox)
        drop = self._drops.pop(mbox, None)
        if drop is None:
            return
        # Closed here rather than in a thread: a cancel must not leave the lock held.
        if drop.lock_fd is not None:
            os.close(drop.lock_fd)
        if drop.dirs is not None:
            drop.dirs.close()
        with _held_guard:
            _held.discard(path)

    async def stat(self, mbox: str) -> int:
        """The number of messages in the snapshot."""
        return len(self._drop(mbox).messages)

    async def size(self, mbox: str, msg: int | None = None) -> int:
        """Canonical octets of message ``msg``, or of all of them (no I/O)."""
        if msg is None:
            return self._drop(mbox).total
        return self._message(mbox, msg).size

    async def uidl(self, mbox: str, msg: int) -> str:
        """The unique id of message ``msg``: stable across sessions and flag changes."""
        return self._message(mbox, msg).uid

    async def get(self, mbox: str, msg: int) -> MessageData:
        """The message's bytes as stored, in chunks of ``chunk_size``.

        Raises :class:`FileNotFoundError` if the file is gone (deleted by
        another program since the snapshot).
        """
        dirs = self._drop(mbox).dirs
        message = self._message(mbox, msg)
        if dirs is None:
            raise RuntimeError(f"mailbox {mbox!r} has no Maildir")  # unreachable: it has no messages
        fd = await trio.to_thread.run_sync(_open_message, dirs, message)
        return _FileChunks(fd, self._chunk_size)

    async def dele(self, mbox: str, msgs: Sequence[int]) -> None:
        """Delete the files of messages ``msgs``; one already gone is no error."""
        drop = self._drop(mbox)
        doomed = [self._message(mbox, n) for n in sorted(set(msgs))]
        if doomed:
            await trio.to_thread.run_sync(_delete, drop, doomed)
