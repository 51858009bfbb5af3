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
    A JSON cache of what a login needs for each message (file name, size
    and mtime, canonical size, UIDL) and of the times of ``new/`` and
    ``cur/`` it is good for (:mod:`pop3d.maildir_index`).  While those times
    hold, a login reads the index and nothing else; otherwise it lists the
    directories and reads only the files with unique names it does not
    know (Maildir files are never rewritten in place).  The
    index is rewritten (temp file, fsync, rename) when it differs from the
    directory, and rebuilt when missing or damaged.

Two more files are read, never written, when a login meets message files
the index does not know, for their UIDLs: ``pop3d-uidl-pins``
(:mod:`pop3d.uidl_pins`, written by ``pop3d uidl import``) and Dovecot's
``dovecot-uidlist`` (:mod:`pop3d.dovecot_uidlist`); see
:class:`MaildirStorage`.

A mailbox whose Maildir does not exist is empty.  Nothing is created for it:
a directory made by this server (often running as root) could have the
wrong owner for the MTA that later delivers there.  Such a session holds
only the in-process lock, which is enough as it has nothing to delete.

Faults: a Maildir that cannot be one (a regular file such as an mbox, a
symlink, a name too long, no permission, a ``pop3d.lock`` that is a
directory) raises :class:`~pop3d.callbacks.MailboxUnavailable`; a message
file that cannot be read is left out of the session and logged; anything
else (too many open files, I/O errors on a directory) is an ordinary
exception, for a fault that may pass.

Every file operation runs in a worker thread that a cancel abandons, so a
stopping server never waits for a slow disk; whatever such a thread still
holds (the lock, an open file) is released when it finishes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import heapq
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import trio

from . import dovecot_uidlist, maildir_index, uidl_pins
from .callbacks import MailboxUnavailable, MessageData
from .dovecot_uidlist import DEFAULT_FORMAT, UidlFormat
from .maildir_files import give_to_mail_owner
from .maildir_index import INDEX_NAME, LOCK_NAME, DirTimes, Listing, unique_name
from .protocol import valid_uid

__all__ = ["CHUNK_SIZE", "INDEX_NAME", "LOCK_NAME", "READ_AHEAD", "MaildirStorage", "UidlEntry"]

log = logging.getLogger("pop3d.maildir")

CHUNK_SIZE = 262144
"""Bytes per chunk that :meth:`MaildirStorage.get` yields."""
READ_AHEAD = 262144
"""Bytes of the small messages after a RETR's one that are read with it, for the next RETRs."""

_MEASURE_CHUNK = 1 << 20
_SUBDIRS = ("new", "cur")
# O_NONBLOCK: a FIFO put in place of a message must not block a worker thread forever.
_OPEN_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# What a Maildir (or its lock file) that is not what it must be gives: trying again will not help.
_PERMANENT_ERRNOS = frozenset(
    {errno.ENOTDIR, errno.ELOOP, errno.EISDIR, errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.EROFS}
)
# Faults of the process or the machine rather than of one message file: they
# fail the login (for a retry) instead of hiding a message.
_PASSING_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS, errno.EAGAIN, errno.EINTR})
_SHOWN_PATH_MAX = 200  # a path in a one-line message is cut after this many characters

# Maildirs locked by any MaildirStorage of this process (absolute paths).  The
# flock would refuse a second session too, but a missing Maildir has no lock
# file, and the explicit set does not depend on flock semantics.
_held: set[str] = set()
_held_guard = threading.Lock()

_T = TypeVar("_T")


def _check_name(mbox: str) -> None:
    # The name becomes one path component under the root, never more.
    if not isinstance(mbox, str) or not mbox:
        raise ValueError("mailbox name must be a non-empty string")
    if mbox.startswith(".") or "/" in mbox or "\0" in mbox:
        raise ValueError(f"mailbox name not allowed: {mbox!r}")


def _uid_for(key: str) -> str:
    """The UIDL of the message with index key ``key``: the key, or its hash."""
    if valid_uid(key):
        return key
    return "sha1-" + hashlib.sha1(os.fsencode(key)).hexdigest()


def _delivery_seconds(unique: str, mtime_ns: int) -> int:
    head = unique.partition(".")[0]
    if head.isascii() and head.isdigit():
        return int(head)
    return mtime_ns // 1_000_000_000


def _shown(path: str) -> str:
    return path if len(path) <= _SHOWN_PATH_MAX else path[:_SHOWN_PATH_MAX] + "..."


def _kind(path: str) -> str:
    """What is at ``path``, for an error message: "a regular file", "a symlink"..."""
    try:
        mode = os.lstat(path).st_mode
    except OSError as exc:
        return (exc.strerror or "cannot stat it").lower()
    if stat.S_ISLNK(mode):
        return "a symlink (symlinks are not followed)"
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "a special file"


def _unavailable(path: str, exc: OSError, expected: str) -> MailboxUnavailable:
    """The one-line :class:`MailboxUnavailable` for ``exc``, raised where ``path`` should be ``expected``."""
    if exc.errno in (errno.ENOTDIR, errno.ELOOP, errno.EISDIR):
        return MailboxUnavailable(f"{_shown(path)} is not {expected}: it is {_kind(path)}")
    return MailboxUnavailable(f"{_shown(path)}: {exc.strerror or exc}")


def _release_held(path: str) -> None:
    with _held_guard:
        _held.discard(path)


class _Handoff(Generic[_T]):
    """Passes a worker thread's result to a caller that a cancel may have made give up.

    With ``abandon_on_cancel`` the caller stops waiting at once while the
    thread goes on; what the thread then opens (a lock, a file) must not be
    lost.  Exactly one side gets the result: the caller, or else ``dispose``,
    called by whichever side learns last that the caller is gone.
    """

    def __init__(self, dispose: Callable[[_T], object]) -> None:
        self._dispose = dispose
        self._guard = threading.Lock()
        self._abandoned = False
        self._handed: list[_T] = []  # the result, once the thread has one and the caller may take it

    def deliver(self, fn: Callable[..., _T], *args: Any) -> _T:
        """In the worker thread: ``fn(*args)``, handed over, or disposed of if the caller is gone."""
        result = fn(*args)
        with self._guard:
            if not self._abandoned:
                self._handed.append(result)
                return result
        self._dispose(result)
        return result

    def abandon(self) -> None:
        """In the caller, as it gives up: dispose of a result the thread already handed over."""
        with self._guard:
            self._abandoned = True
            handed, self._handed = self._handed, []
        for result in handed:
            self._dispose(result)


async def _run_abandonable(dispose: Callable[[_T], object], fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)`` in a worker thread that a cancel abandons; ``dispose`` frees a result nobody took."""
    handoff = _Handoff(dispose)
    try:
        return await trio.to_thread.run_sync(handoff.deliver, fn, *args, abandon_on_cancel=True)
    except BaseException:
        handoff.abandon()
        raise


def _close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


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
    dovecot_format: UidlFormat | None = None  # for the UIDLs of files new to the index

    def close(self) -> None:
        for fd in (*self.subdirs.values(), self.fd):
            _close_fd(fd)
        self.subdirs = {}


def _open_dirs(path: str) -> _Dirs | None:
    """Open the Maildir at ``path``; ``None`` if it does not exist.

    Raises :class:`MailboxUnavailable` if it, ``new/`` or ``cur/`` is not a
    directory (a symlink, a regular file) or cannot be opened for good.
    """
    try:
        fd = os.open(path, _OPEN_DIR)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in _PERMANENT_ERRNOS:
            raise _unavailable(path, exc, "a Maildir") from None
        raise
    dirs = _Dirs(path, fd, {})
    try:
        for subdir in _SUBDIRS:
            try:
                dirs.subdirs[subdir] = os.open(subdir, _OPEN_DIR, dir_fd=fd)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno in _PERMANENT_ERRNOS:
                    raise _unavailable(os.path.join(path, subdir), exc, "a directory") from None
                raise
    except BaseException:
        dirs.close()
        raise
    return dirs


def _count(data: bytes, state: list[int]) -> None:
    """Add ``data`` to a running canonical-size count: ``[length, LF, CRLF, last byte]``."""
    if state[0] and state[3] == 0x0D and data[:1] == b"\n":
        state[2] += 1  # a CRLF split across two reads
    state[0] += len(data)
    state[1] += data.count(b"\n")
    state[2] += data.count(b"\r\n")
    state[3] = data[-1]


def _canonical(state: list[int]) -> int:
    length, lf, crlf, last = state
    return length + lf - crlf + (2 if length and last != 0x0A else 0)


def _name_sizes(name: str) -> tuple[int | None, int | None]:
    """The ``,S=<size>`` and ``,W=<size>`` of a Maildir file name (Dovecot's), where present."""
    base = unique_name(name)
    if "," not in base:
        return None, None
    sizes: dict[str, int] = {}
    for part in base.split(",")[1:]:
        key, eq, value = part.partition("=")
        if eq and key in ("S", "W") and value.isascii() and value.isdigit() and len(value) < 19:
            sizes.setdefault(key, int(value))
    return sizes.get("S"), sizes.get("W")


def _measure(dirs: _Dirs, subdir: str, name: str) -> tuple[int, int, int]:
    """Read a message file: ``(file size, mtime_ns, canonical size)``.

    The canonical size follows :func:`pop3d.message.canonical_size`, counted
    read by read so that a big message does not sit in memory.  A name
    with Dovecot's ``,S=`` (the file's size) and ``,W=`` (its size with CRLF
    line ends) saves the read: when ``S`` is the size the file really has,
    the canonical size is ``W``, plus the CRLF that a message without a
    final line end gets (one byte read to see).  A ``W`` that cannot be
    right (below ``S`` or above twice ``S``) or an ``S`` that is not the
    file's size means reading the file after all.  Raises
    :class:`OSError` if the file is not a regular file (any more).
    """
    fd = os.open(name, _OPEN_READ, dir_fd=dirs.subdirs[subdir])
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            # Replaced by a directory or a FIFO since the listing.
            raise OSError(errno.EINVAL, "not a regular file")
        named, virtual = _name_sizes(name)
        if named is not None and virtual is not None and named == st.st_size and named <= virtual <= 2 * named:
            if not named:
                return 0, st.st_mtime_ns, 0
            last = os.pread(fd, 1, named - 1)
            if len(last) == 1:  # else it shrank meanwhile: read it
                return named, st.st_mtime_ns, virtual + (0 if last == b"\n" else 2)
        state = [0, 0, 0, 0]
        # One read for a small file: a short read of a regular file is its end.
        want = min(st.st_size + 1, _MEASURE_CHUNK)
        while chunk := os.read(fd, want):
            _count(chunk, state)
            if len(chunk) < want:
                break
            want = _MEASURE_CHUNK
    finally:
        os.close(fd)
    return st.st_size, st.st_mtime_ns, _canonical(state)


@dataclass(slots=True, eq=False)
class _Maildrop:
    """One locked mailbox: the snapshot its session works on, and what holds the lock.

    Worker threads use ``dirs`` through :meth:`run`.  A cancel may abandon
    such a thread (a deletion, say) while it still works; :meth:`unlock`
    then leaves the release of the lock to the last thread out, so that
    nobody else gets the mailbox, or a closed descriptor, halfway through.
    """

    path: str  # the key in _held
    dirs: _Dirs | None  # None: the Maildir does not exist
    lock_fd: int | None
    listing: Listing = field(default_factory=Listing)
    total: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # unreadable message path -> why
    #: Messages read ahead with an earlier one (0-based position -> bytes), for the next RETR.
    read_ahead: dict[int, bytes] = field(default_factory=dict)
    #: The position a client reading in order asks for next: reading ahead starts at the second in a row.
    next_position: int = -1
    _guard: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _users: int = field(default=0, init=False)  # worker threads in run()
    _unlocked: bool = field(default=False, init=False)
    #: Called (from any thread) once the lock is really released.
    on_released: Callable[[], None] | None = field(default=None, init=False)

    def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """In a worker thread: ``fn(*args)``, keeping the lock and ``dirs`` open meanwhile."""
        with self._guard:
            if self._unlocked:
                # Abandoned before it started, and the session has ended since.
                raise RuntimeError(f"maildir {self.path} is not locked any more")
            self._users += 1
        try:
            return fn(*args)
        finally:
            with self._guard:
                self._users -= 1
                last = self._unlocked and not self._users
            if last:
                self._release()

    def unlock(self) -> None:
        """Release the lock now, or when the last worker thread is done."""
        with self._guard:
            if self._unlocked:
                return
            self._unlocked = True
            if self._users:
                return
        self._release()

    def _release(self) -> None:
        try:
            if self.lock_fd is not None:
                fd, self.lock_fd = self.lock_fd, None
                try:
                    os.close(fd)
                except OSError as exc:
                    # Linux frees the descriptor (and so the flock) even then.
                    log.warning("maildir %s: closing the lock file failed: %s", self.path, exc)
            if self.dirs is not None:
                self.dirs.close()
        finally:
            # Whatever closing did: a mailbox left in _held would be IN-USE until a restart.
            _release_held(self.path)
            if self.on_released is not None:
                with contextlib.suppress(trio.RunFinishedError):
                    self.on_released()


def _dispose_drop(drop: _Maildrop | None) -> None:
    if drop is not None:
        drop.unlock()


def _message_files(dirs: _Dirs) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """(subdir, directory entry) of each message file in ``new/`` and ``cur/``."""
    for subdir, dir_fd in dirs.subdirs.items():
        entries = os.scandir(dir_fd)
        with entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue  # Maildir readers ignore dot files
                try:
                    # No symlinks: one could point at any file the server can read.
                    if entry.is_file(follow_symlinks=False):
                        yield subdir, entry
                except FileNotFoundError:
                    continue  # deleted meanwhile


def _dir_times(dirs: _Dirs) -> DirTimes:
    return {subdir: os.fstat(fd).st_mtime_ns for subdir, fd in dirs.subdirs.items()}


_Entry = tuple[int, str, str, str, int, int, int, str | None]
"""(delivery seconds, unique name, subdir, name, file size, mtime, size, UIDL or None if new)."""


@dataclass(frozen=True, slots=True)
class _UidlSources:
    """Where UIDLs for files new to a listing come from, besides their names.

    ``pins``: :mod:`pop3d.uidl_pins`; ``dovecot``: :func:`pop3d.dovecot_uidlist.read_uidls`;
    both unique name -> UIDL.  ``reserved``: every UIDL of the two, which
    pop3d's own UIDL for another message must never be.
    """

    pins: Mapping[str, str]
    dovecot: Mapping[str, str]
    reserved: frozenset[str]

    @classmethod
    def read(cls, dirs: _Dirs) -> _UidlSources:
        """The pins and Dovecot's UIDLs of the open Maildir.

        :class:`MailboxUnavailable` for either file damaged or unreadable
        (no permission): serving without them would give the messages UIDLs
        that stick in the index.
        """
        try:
            pins = uidl_pins.read(dirs.fd)
        except uidl_pins.PinsError as exc:
            # Serving without them would give the pinned messages UIDLs that stick: refuse instead.
            raise MailboxUnavailable(f"{_shown(os.path.join(dirs.path, uidl_pins.PINS_NAME))}: {exc}") from None
        except OSError as exc:
            if exc.errno in _PASSING_ERRNOS:
                raise
            raise MailboxUnavailable(
                f"{_shown(os.path.join(dirs.path, uidl_pins.PINS_NAME))}: {exc.strerror or exc}"
            ) from None
        fmt = dirs.dovecot_format
        try:
            dovecot = {} if fmt is None else dovecot_uidlist.read_uidls(dirs.fd, dirs.path, fmt)
        except dovecot_uidlist.UidlistError as exc:
            where = os.path.join(dirs.path, dovecot_uidlist.UIDLIST_NAME)
            raise MailboxUnavailable(
                f"{_shown(where)}: damaged ({exc}): repair or remove it, or set dovecot-uidl-format to none"
            ) from None
        except OSError as exc:
            if exc.errno in _PASSING_ERRNOS:
                raise
            where = os.path.join(dirs.path, dovecot_uidlist.UIDLIST_NAME)
            raise MailboxUnavailable(f"{_shown(where)}: {exc.strerror or exc}") from None
        return cls(pins, dovecot, frozenset(pins.values()) | frozenset(dovecot.values()))


def _own_uid(key: str, taken: set[str], reserved: frozenset[str]) -> str:
    """pop3d's UIDL for index key ``key``, unlike any in ``taken`` and ``reserved``."""
    uid = _uid_for(key)
    if uid not in taken and uid not in reserved:
        return uid
    base = "sha1-" + hashlib.sha1(os.fsencode(key)).hexdigest()
    uid, n = base, 1
    while uid in taken or uid in reserved:
        n += 1
        uid = f"{base}-{n}"
    return uid


def _assign_uids(found: Iterable[_Entry], old_uids: Iterable[str], sources: _UidlSources | None, where: str) -> Listing:
    """The listing of ``found``: known files keep their UIDL, new ones get one (pin, Dovecot, own)."""
    taken = set(old_uids)
    listing = Listing()
    seen: set[str] = set()
    for _, unique, subdir, name, file_size, mtime, size, uid in found:
        # The same unique name twice (a copy, not a rename): the second is
        # keyed by its path, so that UIDLs stay unique.
        key = unique if unique not in seen else f"{subdir}/{name}"
        seen.add(key)
        if uid is None:
            assert sources is not None  # a new file means the sources were read
            wanted = sources.pins.get(key) or sources.dovecot.get(key)
            if wanted is not None and wanted not in taken:
                uid = wanted
            else:
                if wanted is not None:
                    log.warning(
                        "maildir %s: UIDL %s of %s belongs to another message already; pop3d gives it its own",
                        _shown(where),
                        wanted,
                        key,
                    )
                uid = _own_uid(key, taken, sources.reserved)
            taken.add(uid)
        listing.append(subdir, name, file_size, mtime, size, uid)
    return listing


def _scan(dirs: _Dirs, old: Listing | None) -> tuple[Listing, dict[str, str]]:
    """List ``new/`` and ``cur/`` in delivery order, reading only files ``old`` does not know.

    A file is known if ``old`` has its unique name (flags may differ: a
    flag change is a rename).  Maildir files are never rewritten in place,
    so a known file is not even stated, and known files keep their order
    and their UIDL: a mailbox of 100,000 messages with one new delivery
    costs a directory listing, one read and a merge.  Only when there are
    new files are the pins and ``dovecot-uidlist`` read, for their UIDLs
    (:class:`_UidlSources`).  Returns the listing and the message files
    left out because they cannot be read (path -> why).
    """
    exact: dict[tuple[str, str], int] = {}
    renamed: dict[str, int] = {}  # unique name -> position, for unique names the old listing has once
    if old is not None:
        exact = {(old.subdir(i), name): i for i, name in enumerate(old.names)}
        twice: set[str] = set()
        for i, name in enumerate(old.names):
            unique = unique_name(name)
            if unique in renamed:
                twice.add(unique)
            renamed[unique] = i
        for unique in twice:
            del renamed[unique]  # copies: matched by their exact names only
    seen_at: list[tuple[str, str] | None] = [None] * (
        len(old) if old is not None else 0
    )  # where each known file is now
    fresh: list[_Entry] = []
    skipped: dict[str, str] = {}
    for subdir, entry in _message_files(dirs):
        name = entry.name
        unique = unique_name(name)
        at = exact.get((subdir, name))
        if at is None:
            at = renamed.get(unique)  # a flag change or a move from new/ to cur/
        if at is not None and seen_at[at] is None:
            seen_at[at] = (subdir, name)
            continue
        try:
            file_size, mtime, size = _measure(dirs, subdir, name)
        except FileNotFoundError:
            continue
        except OSError as exc:
            if exc.errno in _PASSING_ERRNOS:
                raise
            # One bad file (unreadable, replaced by a directory, an I/O
            # error) must not make the whole mailbox fail: serve the rest.
            skipped[os.path.join(dirs.path, subdir, name)] = exc.strerror or str(exc)
            continue
        fresh.append((_delivery_seconds(unique, mtime), unique, subdir, name, file_size, mtime, size, None))
    if (
        old is not None
        and not fresh
        and all(where is not None and where == (old.subdir(i), old.names[i]) for i, where in enumerate(seen_at))
    ):
        return old, skipped  # the same files (a change came and went)
    fresh.sort()  # (subdir, name) is unique, so the sort never looks past it
    found: Iterable[_Entry] = fresh
    kept: list[_Entry] = []
    if old is not None:
        # The known files, in their old order, which is delivery order still (their unique names and
        # times have not changed); the sort only checks that, unless the index was edited by hand.
        for i, where in enumerate(seen_at):
            if where is not None:
                unique, mtime = unique_name(old.names[i]), old.mtimes[i]
                seconds = _delivery_seconds(unique, mtime)
                kept.append((seconds, unique, *where, old.file_sizes[i], mtime, old.sizes[i], old.uid(i)))
        kept.sort()
        found = heapq.merge(kept, fresh)
    sources = _UidlSources.read(dirs) if fresh else None
    listing = _assign_uids(found, [entry[7] for entry in kept if entry[7] is not None], sources, dirs.path)
    return listing, skipped


def _read_listing(dirs: _Dirs) -> tuple[Listing, dict[str, str]]:
    """The Maildir's listing: the index's if the directories did not change, else a new scan.

    The index is rewritten when the listing or the times it is good for differ.
    """
    # Taken before the scan: a change during it then shows as a newer time next time.
    taken = time.time_ns()
    times = _dir_times(dirs)
    index = maildir_index.load(dirs.fd, dirs.path)
    if index is not None:
        old, old_times = index
        if times.keys() == {"new", "cur"} and old_times == times:
            return old, {}
    listing, skipped = _scan(dirs, None if index is None else index[0])
    # With a file left out, each login must look again (a chmod does not change the directory).
    stored = maildir_index.trusted_times(times, taken) if not skipped else {}
    if index is None or listing != index[0] or stored != index[1]:
        maildir_index.write(dirs.fd, dirs.path, listing, stored)
    return listing, skipped


def _open_maildrop(path: str, dovecot_format: UidlFormat | None = None) -> _Maildrop | None:
    """Lock the Maildir at ``path`` and take its snapshot; ``None`` if locked elsewhere.

    The caller has put ``path`` in ``_held``; the drop's :meth:`~_Maildrop.unlock` takes it out.
    """
    dirs = _open_dirs(path)
    if dirs is None:
        return _Maildrop(path, None, None)  # no Maildir (or no root): an empty mailbox
    dirs.dovecot_format = dovecot_format
    fd = -1
    try:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(LOCK_NAME, flags, 0o600, dir_fd=dirs.fd)
        except OSError as exc:
            if exc.errno in _PERMANENT_ERRNOS:
                raise _unavailable(os.path.join(path, LOCK_NAME), exc, "a regular file") from None
            raise
        give_to_mail_owner(fd, dirs.fd)  # served as root now (--allow-root), as the mail's owner later
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            dirs.close()
            return None
        listing, skipped = _read_listing(dirs)
    except BaseException:
        if fd >= 0:
            _close_fd(fd)
        dirs.close()
        raise
    return _Maildrop(path, dirs, fd, listing, sum(listing.sizes), skipped)


def _lock_maildrop(path: str, dovecot_format: UidlFormat | None = None) -> _Maildrop | None:
    """In a worker thread: take the in-process lock on ``path``, then the maildrop; ``None`` if locked."""
    # Added here rather than by the caller: a call abandoned before its
    # thread started then leaves nothing to release.
    with _held_guard:
        if path in _held:
            return None
        _held.add(path)
    try:
        drop = _open_maildrop(path, dovecot_format)
    except BaseException:
        _release_held(path)
        raise
    if drop is None:
        _release_held(path)
    return drop


def _find_moved(dirs: _Dirs, listing: Listing, positions: Sequence[int]) -> dict[int, tuple[str, str]]:
    """Where the files at ``positions`` are now, if another program renamed them.

    An IMAP server may change flags or move ``new/`` to ``cur/`` while we
    hold our lock (it does not know it); the unique name stays, and so do
    the size and mtime.  Returns position -> (subdir, name).
    """
    wanted = {(unique_name(listing.names[i]), listing.file_sizes[i], listing.mtimes[i]): i for i in positions}
    moved: dict[int, tuple[str, str]] = {}
    for subdir, entry in _message_files(dirs):
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        i = wanted.get((unique_name(entry.name), st.st_size, st.st_mtime_ns))
        if i is not None and i not in moved:
            moved[i] = (subdir, entry.name)
    return moved


def _open_regular(dirs: _Dirs, subdir: str, name: str) -> int:
    fd = os.open(name, _OPEN_READ, dir_fd=dirs.subdirs[subdir])
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", os.path.join(dirs.path, subdir, name))
    return fd


def _open_message(dirs: _Dirs, listing: Listing, i: int) -> int:
    try:
        return _open_regular(dirs, listing.subdir(i), listing.names[i])
    except FileNotFoundError:
        pass
    where = _find_moved(dirs, listing, [i]).get(i)
    if where is None:
        path = os.path.join(dirs.path, listing.subdir(i), listing.names[i])
        raise FileNotFoundError(errno.ENOENT, "message file vanished", path)
    listing.moved(i, *where)
    return _open_regular(dirs, *where)


@dataclass(slots=True)
class _Read:
    """What one thread trip read: a message (whole, or its first chunk and the open file), and more."""

    data: bytes
    fd: int | None  # open at the end of ``data`` if the message is longer; else None
    ahead: dict[int, bytes]  # following messages read whole


def _dispose_read(read: _Read) -> None:
    if read.fd is not None:
        _close_fd(read.fd)


def _read_whole(fd: int, size: int, limit: int) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes of the file at ``fd`` (``size`` long, as far as we know); whether that was all."""
    want = min(size + 1, limit)  # one byte more: a short read then shows the end, without another call
    data = os.read(fd, want)
    return data, len(data) < want


def _read_message(dirs: _Dirs, listing: Listing, i: int, chunk_size: int, ahead_budget: int) -> _Read:
    """Read message ``i``, and the small ones after it while ``ahead_budget`` lasts (one thread trip)."""
    fd = _open_message(dirs, listing, i)
    try:
        data, whole = _read_whole(fd, listing.file_sizes[i], chunk_size)
    except BaseException:
        os.close(fd)
        raise
    if not whole:
        return _Read(data, fd, {})
    os.close(fd)
    ahead: dict[int, bytes] = {}
    budget = ahead_budget
    for j in range(i + 1, len(listing)):
        size = listing.file_sizes[j]
        if size >= budget:
            break
        try:
            fd = _open_regular(dirs, listing.subdir(j), listing.names[j])
        except OSError:
            break  # moved or gone: its own RETR will look for it
        try:
            more, whole = _read_whole(fd, size, budget)
        except OSError:
            break
        finally:
            os.close(fd)
        if not whole:
            break  # it grew: read it when asked
        ahead[j] = more
        budget -= len(more)
    return _Read(data, None, ahead)


def _delete(drop: _Maildrop, doomed: Sequence[int]) -> None:
    # Each unlink is atomic, so a crash leaves every message whole or gone;
    # the index is fixed afterwards, or by the next login if we die first.
    dirs = drop.dirs
    if dirs is None:
        return
    listing = drop.listing
    missing: list[int] = []
    touched: set[str] = set()
    for i in doomed:
        try:
            os.unlink(listing.names[i], dir_fd=dirs.subdirs[listing.subdir(i)])
            touched.add(listing.subdir(i))
        except FileNotFoundError:
            missing.append(i)
    if missing:
        for subdir, name in _find_moved(dirs, listing, missing).values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dirs.subdirs[subdir])
                touched.add(subdir)
    for subdir in touched:
        # Make the deletions durable: a message that came back after a power
        # loss would be downloaded again.
        with contextlib.suppress(OSError):
            os.fsync(dirs.subdirs[subdir])
    # The directories just changed: the next login lists them again (the times are too recent to store).
    maildir_index.write(dirs.fd, dirs.path, listing.without(set(doomed)), {})


class _FileChunks:
    """The bytes of an open message file, chunk by chunk; reads run in a worker thread.

    ``first`` is what was read already, in the trip that opened the file.
    A cancel abandons a read in progress.  The descriptor is then closed by
    that read's thread when it returns, never under it: a number closed
    early could be reused by another file, which the late read would consume.
    """

    def __init__(self, fd: int, chunk_size: int, first: bytes = b"") -> None:
        self._fd = fd
        self._chunk_size = chunk_size
        self._first = first
        self._guard = threading.Lock()
        self._reading = False  # a worker thread is (about to be) in os.read
        self._closed = False

    def __aiter__(self) -> _FileChunks:
        return self

    async def __anext__(self) -> bytes:
        if self._first:
            first, self._first = self._first, b""
            return first
        if self._closed:
            raise StopAsyncIteration
        try:
            chunk = await trio.to_thread.run_sync(self._read, abandon_on_cancel=True)
        except BaseException:
            self._close()  # a cancelled read leaves the stream at an unknown place
            raise
        if not chunk:
            self._close()
            raise StopAsyncIteration
        return chunk

    def _read(self) -> bytes:
        with self._guard:
            if self._closed:
                return b""
            self._reading = True
        try:
            return os.read(self._fd, self._chunk_size)
        finally:
            with self._guard:
                self._reading = False
                close = self._closed  # closed while we read: ours to close
            if close:
                _close_fd(self._fd)

    async def aclose(self) -> None:
        """Close the file before the end (TOP stops early)."""
        self._close()

    def _close(self) -> None:
        with self._guard:
            if self._closed:
                return
            self._closed = True
            if self._reading:
                return  # the reading thread closes it when its read returns
        os.close(self._fd)

    def __del__(self) -> None:
        # Whoever iterates may drop us without aclose(); do not leak the descriptor.
        self._close()


class MaildirStorage:
    """Serves the Maildirs under ``root``: mailbox ``mbox`` is ``<root>/<mbox>/``.

    Implements :class:`pop3d.callbacks.Storage`.  :meth:`lock` takes the
    mailbox's lock and its snapshot: the messages of ``new/`` and ``cur/``,
    numbered by delivery time (the leading seconds of the unique name, else
    the file's mtime; ties by name).  Every other call uses that snapshot
    until :meth:`unlock`, and needs the lock.  A mailbox name that could
    leave ``root`` (empty, starting with ``.``, with ``/`` or NUL) raises
    :class:`ValueError`; a Maildir that cannot be served (a regular file, a
    symlink...) raises :class:`~pop3d.callbacks.MailboxUnavailable`.  A
    message file that cannot be read is left out of the snapshot, with one
    warning while it stays so.

    UIDLs: a message keeps the UIDL that ``pop3d-index`` has for it (pop3d
    served it already).  A message new to the index gets, in this order:

    1. its pin from ``pop3d-uidl-pins`` (:mod:`pop3d.uidl_pins`, written by
       ``pop3d uidl import``);
    2. the UIDL Dovecot gave it, if the Maildir has a ``dovecot-uidlist``
       and ``dovecot_uidl_format`` is not ``None`` (Dovecot's
       ``pop3_uidl_format``; the UIDL Dovecot stored wins, see
       :mod:`pop3d.dovecot_uidlist`);
    3. pop3d's own: the unique name (the file name before ``:``), or
       ``sha1-`` and its hash if that is not a valid UIDL or is one that the
       pins or Dovecot give (to another message).

    UIDLs stay unique within a mailbox.  Dovecot's files are only read.
    A bad ``dovecot_uidl_format`` raises
    :class:`~pop3d.dovecot_uidlist.FormatError` (a :class:`ValueError`) here.

    Dovecot's ``,S=<size>`` and ``,W=<size>`` name fields save reading a new
    file for its size when ``S`` is right (see ``_measure``); the sizes
    stay exact.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        chunk_size: int = CHUNK_SIZE,
        read_ahead: int = READ_AHEAD,
        dovecot_uidl_format: str | None = DEFAULT_FORMAT,
    ) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        if read_ahead < 0:
            raise ValueError("read_ahead must not be negative")
        self._dovecot_format = None if dovecot_uidl_format is None else UidlFormat(dovecot_uidl_format)
        self._root = os.path.abspath(os.fspath(root))
        self._chunk_size = chunk_size
        self._read_ahead = read_ahead
        self._drops: dict[str, _Maildrop] = {}
        # Unreadable message files already logged, by mailbox: logged again only after they were fine.
        self._skipped: dict[str, set[str]] = {}

    @property
    def root(self) -> str:
        """The mail root, as an absolute path."""
        return self._root

    @property
    def dovecot_uidl_format(self) -> str | None:
        """Dovecot's ``pop3_uidl_format`` for Maildirs with a ``dovecot-uidlist``; ``None``: ignored."""
        return None if self._dovecot_format is None else self._dovecot_format.text

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

    def _position(self, mbox: str, msg: int) -> int:
        """The 0-based position of message ``msg`` in the locked snapshot of ``mbox``."""
        if not 1 <= msg <= len(self._drop(mbox).listing):
            raise IndexError(f"no message {msg} in mailbox {mbox!r}")
        return msg - 1

    async def lock(self, mbox: str) -> bool:
        """Lock ``mbox`` and number its messages; ``False`` if a session holds it.

        The lock holds against sessions of this process and, through
        ``flock`` on ``pop3d.lock``, of other processes.  If a cancel
        abandons the call, the lock is released when its thread is done.
        """
        path = self.path(mbox)
        with _held_guard:
            if path in _held:
                return False  # the common refusal, without a thread
        drop = await _run_abandonable(_dispose_drop, _lock_maildrop, path, self._dovecot_format)
        if drop is None:
            return False
        self._drops[mbox] = drop
        self._log_skipped(mbox, drop.skipped)
        return True

    def _log_skipped(self, mbox: str, skipped: dict[str, str]) -> None:
        logged = self._skipped.pop(mbox, set())
        for path, why in skipped.items():
            if path not in logged:
                log.warning("maildir: message file %s skipped: %s", _shown(path), why)
        if skipped:
            self._skipped[mbox] = set(skipped)

    async def unlock(self, mbox: str) -> None:
        """Release the lock on ``mbox`` (nothing if this storage does not hold it).

        Should a deletion abandoned by a cancel still run, the lock is
        released when it is done.
        """
        self.path(mbox)  # the name check
        drop = self._drops.pop(mbox, None)
        if drop is not None:
            # Here rather than in a thread: a cancel must not leave the lock held.
            drop.unlock()

    def on_unlocked(self, mbox: str, fn: Callable[[], None]) -> None:
        """Have ``fn`` called in Trio once the next :meth:`unlock` of ``mbox`` has really let go.

        At once, or when a worker thread that a cancel abandoned is done:
        a session gives the lock service's lock back only then.
        """
        drop = self._drops.get(mbox)
        if drop is None:
            fn()
            return
        token = trio.lowlevel.current_trio_token()
        drop.on_released = lambda: token.run_sync_soon(fn)

    async def stat(self, mbox: str) -> int:
        """The number of messages in the snapshot."""
        return len(self._drop(mbox).listing)

    async def size(self, mbox: str, msg: int | None = None) -> int:
        """Canonical octets of message ``msg``, or of all of them (no I/O)."""
        if msg is None:
            return self._drop(mbox).total
        return self._drop(mbox).listing.sizes[self._position(mbox, msg)]

    async def uidl(self, mbox: str, msg: int) -> str:
        """The unique id of message ``msg``: stable across sessions and flag changes."""
        return self._drop(mbox).listing.uid(self._position(mbox, msg))

    async def listing(self, mbox: str) -> tuple[Sequence[int], Sequence[str]]:
        """Every message's size and UIDL at once (:class:`~pop3d.callbacks.Listing`; no I/O)."""
        listing = self._drop(mbox).listing
        return listing.sizes, listing.uids

    async def get(self, mbox: str, msg: int) -> MessageData:
        """The message's bytes as stored: all of them, or chunks of ``chunk_size``.

        One worker-thread trip opens and reads the message; a message that
        fits in one chunk comes whole, together with the small messages
        after it (up to :data:`READ_AHEAD` bytes), which the next calls then
        return without any I/O: a client fetching everything in order costs
        a thread trip every few messages, not several per message.

        Raises :class:`FileNotFoundError` if the file is gone (deleted by
        another program since the snapshot).
        """
        drop = self._drop(mbox)
        i = self._position(mbox, msg)
        in_order, drop.next_position = i == drop.next_position, i + 1
        ahead = drop.read_ahead.pop(i, None)
        if ahead is not None:
            return ahead
        drop.read_ahead.clear()  # out of order: what was read ahead will not be asked for soon
        if drop.dirs is None:
            raise RuntimeError(f"mailbox {mbox!r} has no Maildir")  # unreachable: it has no messages
        # Only for a client that reads in order: one RETR, then silence, must not hold 256 KiB.
        budget = self._read_ahead if in_order else 0
        read: _Read = await _run_abandonable(
            _dispose_read, drop.run, _read_message, drop.dirs, drop.listing, i, self._chunk_size, budget
        )
        if read.fd is not None:
            return _FileChunks(read.fd, self._chunk_size, read.data)
        drop.read_ahead = read.ahead
        return read.data

    async def dele(self, mbox: str, msgs: Sequence[int]) -> None:
        """Delete the files of messages ``msgs``; one already gone is no error.

        A cancel abandons the call but not the deletion: its thread unlinks
        every file and writes the index, and the lock is held until then.
        """
        drop = self._drop(mbox)
        doomed = sorted({self._position(mbox, n) for n in msgs})
        if doomed:
            await trio.to_thread.run_sync(drop.run, _delete, drop, doomed, abandon_on_cancel=True)

    async def uidl_report(self, mbox: str) -> list[UidlEntry]:
        """Every message of ``mbox`` with its UIDL and where that comes from; no POP3 session needed.

        With a session of this storage on ``mbox``, its snapshot.  Otherwise
        the listing the next login would see, read without the lock and
        without writing anything (the index is not updated; a session of
        another process meanwhile may change the Maildir).  A Maildir that
        does not exist is empty.  Raises as :meth:`lock` does for a Maildir
        that cannot be served.
        """
        path = self.path(mbox)
        drop = self._drops.get(mbox)
        fmt = self._dovecot_format
        if drop is not None:
            listing = drop.listing
            return await trio.to_thread.run_sync(_report, path, listing, fmt, abandon_on_cancel=True)
        return await trio.to_thread.run_sync(_report_unlocked, path, fmt, abandon_on_cancel=True)


@dataclass(frozen=True, slots=True)
class UidlEntry:
    """One message of :meth:`MaildirStorage.uidl_report`."""

    number: int  #: its message number in a session (1-based)
    uidl: str
    #: ``"maildir"`` (the unique name), ``"dovecot"`` (``dovecot-uidlist``),
    #: ``"imported"`` (``pop3d-uidl-pins``) or ``"hashed"`` (pop3d's, derived: see MaildirStorage)
    source: str
    file: str  #: ``cur/<name>`` or ``new/<name>``, relative to the Maildir
    size: int  #: octets as POP3 sends it (CRLF line ends)


def _sources_of(dirs_fd: int, path: str, fmt: UidlFormat | None) -> tuple[Mapping[str, str], Mapping[str, str]]:
    try:
        pins = uidl_pins.read(dirs_fd)
    except (uidl_pins.PinsError, OSError) as exc:
        log.warning("maildir %s: pins not shown: %s", _shown(path), exc)
        pins = {}
    try:
        dovecot = {} if fmt is None else dovecot_uidlist.read_uidls(dirs_fd, path, fmt)
    except OSError as exc:
        log.warning("maildir %s: Dovecot UIDLs not shown: %s", _shown(path), exc)
        dovecot = {}
    return pins, dovecot


def _entries(listing: Listing, pins: Mapping[str, str], dovecot: Mapping[str, str]) -> list[UidlEntry]:
    entries = []
    for i in range(len(listing)):
        unique, uid = unique_name(listing.names[i]), listing.uid(i)
        if pins.get(unique) == uid:
            source = "imported"
        elif dovecot.get(unique) == uid:
            source = "dovecot"
        elif uid == unique:
            source = "maildir"
        else:
            source = "hashed"
        entries.append(UidlEntry(i + 1, uid, source, f"{listing.subdir(i)}/{listing.names[i]}", listing.sizes[i]))
    return entries


def _report(path: str, listing: Listing, fmt: UidlFormat | None) -> list[UidlEntry]:
    """In a worker thread: the entries of a session's snapshot."""
    try:
        fd = os.open(path, _OPEN_DIR)
    except OSError:
        return _entries(listing, {}, {})
    try:
        pins, dovecot = _sources_of(fd, path, fmt)
    finally:
        os.close(fd)
    return _entries(listing, pins, dovecot)


def _report_unlocked(path: str, fmt: UidlFormat | None) -> list[UidlEntry]:
    """In a worker thread: the listing the next login would see, changing nothing."""
    dirs = _open_dirs(path)
    if dirs is None:
        return []
    dirs.dovecot_format = fmt
    try:
        index = maildir_index.load(dirs.fd, dirs.path)
        times = _dir_times(dirs)
        if index is not None and times.keys() == {"new", "cur"} and index[1] == times:
            listing = index[0]
        else:
            listing, _ = _scan(dirs, None if index is None else index[0])
        pins, dovecot = _sources_of(dirs.fd, path, fmt)
    finally:
        dirs.close()
    return _entries(listing, pins, dovecot)
