"""The Maildir index: what a login needs of each message, kept next to ``cur/``.

A :class:`Listing` is a Maildir's messages in delivery order, column by
column (a list per field rather than an object per message: a mailbox of
100,000 messages loads, checks and compares in a few list operations).

The index file ``pop3d-index`` holds a listing and the modification times
of ``new/`` and ``cur/`` when it was taken.  While both directories keep
those times, nothing was added, removed or renamed in them, so a login uses
the listing as it is, without listing or stating a single file.  Times that
were less than :data:`TRUST_AFTER_NS` old when the listing was taken are not
stored: a change in the same clock tick could otherwise go unseen.  Message
files themselves are never rewritten in a Maildir (RFC-less but universal:
deliveries and flag changes are renames), which is what makes this safe.

The file belongs to whoever owns the Maildir, so it is checked before any of
it is used: every name a plain file name, every size an exact integer, every
UIDL valid (RFC 1939) and unique.  Anything else and it is rebuilt.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import stat
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FORMAT", "INDEX_NAME", "MAX_INDEX_SIZE", "TRUST_AFTER_NS", "DirTimes", "Listing", "load", "write"]

log = logging.getLogger("pop3d.maildir")

INDEX_NAME = "pop3d-index"
"""The index file in each Maildir."""
FORMAT = 2
# About 150 bytes a message: room for millions of messages, not for a hostile file.
MAX_INDEX_SIZE = 512 * 1024 * 1024
TRUST_AFTER_NS = 2_000_000_000
"""A directory time this recent (ns) when a listing is taken is not stored."""
# Sizes: integers that any JSON reader keeps exact; no file is near that big.
_SIZE_LIMIT = 2**53
_MTIME_LIMIT = 2**63
# Every UIDL at once, joined by LF: 1 to 70 characters from 0x21 to 0x7E each.
_UIDS = re.compile(r"[\x21-\x7e]{1,70}(?:\n[\x21-\x7e]{1,70})*")
_SUBDIR_CODES = {"new": "n", "cur": "c"}
_SUBDIRS = {"n": "new", "c": "cur"}

DirTimes = dict[str, int]
"""``{"new": mtime_ns, "cur": mtime_ns}``: the directories' times a listing is good for."""


@dataclass(slots=True)
class Listing:
    """A Maildir's messages in delivery order, one list per field."""

    subdirs: list[str] = field(default_factory=list)  # "new" or "cur", where the file was seen
    names: list[str] = field(default_factory=list)  # file names, flags included
    file_sizes: list[int] = field(default_factory=list)
    mtimes: list[int] = field(default_factory=list)  # ns
    sizes: list[int] = field(default_factory=list)  # canonical octets (CRLF line ends)
    uids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)

    def append(self, subdir: str, name: str, file_size: int, mtime: int, size: int, uid: str) -> None:
        """Add one message at the end."""
        self.subdirs.append(subdir)
        self.names.append(name)
        self.file_sizes.append(file_size)
        self.mtimes.append(mtime)
        self.sizes.append(size)
        self.uids.append(uid)

    def without(self, positions: set[int]) -> Listing:
        """A copy without the messages at ``positions`` (0-based)."""

        def keep(column: list[Any]) -> list[Any]:
            return [value for i, value in enumerate(column) if i not in positions]

        return Listing(*(keep(column) for column in self._columns()))

    def _columns(self) -> tuple[list[Any], ...]:
        return (self.subdirs, self.names, self.file_sizes, self.mtimes, self.sizes, self.uids)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Listing) and self._columns() == other._columns()


def _read_file(dir_fd: int) -> bytes:
    # No symlinks (to /dev/zero, say), no FIFOs (which would block a worker thread forever), no giants.
    fd = os.open(INDEX_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size > MAX_INDEX_SIZE:
            raise ValueError(f"larger than {MAX_INDEX_SIZE} bytes")
        chunks = []
        while chunk := os.read(fd, max(st.st_size + 1, 65536)):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _ints(column: object, low: int, high: int) -> bool:
    return (
        type(column) is list
        and all(type(value) is int for value in column)
        and (not column or (min(column) >= low and max(column) < high))
    )


def _names_ok(names: object) -> bool:
    if type(names) is not list or not all(type(name) is str for name in names):
        return False
    if not names:
        return True
    joined = "\n".join(names)
    # Plain names in the directory: never a path, never a dot file, never empty.
    return (
        "/" not in joined
        and "\0" not in joined
        and not joined.startswith((".", "\n"))
        and "\n." not in joined
        and "\n\n" not in joined
        and not joined.endswith("\n")
    )


def _uids_ok(uids: object) -> bool:
    if type(uids) is not list or not all(type(uid) is str for uid in uids):
        return False
    return not uids or (_UIDS.fullmatch("\n".join(uids)) is not None and len(set(uids)) == len(uids))


def _parse(data: bytes) -> tuple[Listing, DirTimes]:
    """The listing and directory times in ``data``; ``ValueError`` for anything amiss."""
    doc = json.loads(data)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError("unknown format")
    columns, dirs = doc.get("messages"), doc.get("dirs")
    if not isinstance(columns, dict) or not isinstance(dirs, dict):
        raise ValueError("unknown format")
    codes, names = columns.get("subdir"), columns.get("name")
    file_sizes, mtimes, sizes, uids = (columns.get(key) for key in ("file_size", "mtime", "size", "uid"))
    if not (
        isinstance(codes, str)
        and set(codes) <= set(_SUBDIRS)
        and _names_ok(names)
        and _ints(file_sizes, 0, _SIZE_LIMIT)
        and _ints(mtimes, -_MTIME_LIMIT, _MTIME_LIMIT)
        and _ints(sizes, 0, _SIZE_LIMIT)
        and _uids_ok(uids)
        and len({len(codes), len(names), len(file_sizes), len(mtimes), len(sizes), len(uids)}) == 1  # type: ignore[arg-type]
    ):
        raise ValueError("malformed entries")
    times = {subdir: value for subdir, value in dirs.items() if subdir in _SUBDIR_CODES and type(value) is int}
    subdirs = [_SUBDIRS[code] for code in codes]
    return Listing(subdirs, names, file_sizes, mtimes, sizes, uids), times  # type: ignore[arg-type]


def load(dir_fd: int, where: str) -> tuple[Listing, DirTimes] | None:
    """The index of the Maildir open at ``dir_fd``: empty if there is none, ``None`` if it is damaged.

    ``where`` names the Maildir in the warning logged for a damaged index.
    """
    try:
        return _parse(_read_file(dir_fd))
    except FileNotFoundError:
        return Listing(), {}
    except (OSError, ValueError, RecursionError) as exc:
        # RecursionError: "[[[[...", nested deeper than the parser goes.
        log.warning("maildir %s: unreadable index, rebuilding: %s", where, exc)
        return None


def trusted_times(times: DirTimes) -> DirTimes:
    """The directory times worth storing: those not too recent to be sure of."""
    now = time.time_ns()
    return {subdir: mtime for subdir, mtime in times.items() if now - mtime >= TRUST_AFTER_NS}


def write(dir_fd: int, where: str, listing: Listing, times: DirTimes) -> None:
    """Replace the index atomically; a failure only costs a rebuild later (logged)."""
    tmp = INDEX_NAME + ".tmp"
    doc = {
        "format": FORMAT,
        "dirs": times,
        "messages": {
            "subdir": "".join(_SUBDIR_CODES[subdir] for subdir in listing.subdirs),
            "name": listing.names,
            "file_size": listing.file_sizes,
            "mtime": listing.mtimes,
            "size": listing.sizes,
            "uid": listing.uids,
        },
    }
    data = json.dumps(doc, separators=(",", ":")).encode()
    try:
        # The caller holds the lock, so a leftover temp file is from a crash: reuse its name.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, INDEX_NAME, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as exc:
        log.warning("maildir %s: cannot write index: %s", where, exc)
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
