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

import json
import logging
import re
from array import array
from collections.abc import Sequence
from typing import overload

from .maildir_files import read_small, replace

__all__ = [
    "FORMAT",
    "INDEX_NAME",
    "LOCK_NAME",
    "MAX_INDEX_SIZE",
    "TRUST_AFTER_NS",
    "DirTimes",
    "Listing",
    "forget",
    "load",
    "trusted_times",
    "unique_name",
    "write",
]

log = logging.getLogger("pop3d.maildir")

INDEX_NAME = "pop3d-index"
"""The index file in each Maildir."""
LOCK_NAME = "pop3d.lock"
"""The lock file in each Maildir (``flock``; see :mod:`pop3d.maildir`)."""
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
_CODES = {"new": ord("n"), "cur": ord("c")}
_SUBDIRS = {code: subdir for subdir, code in _CODES.items()}

DirTimes = dict[str, int]
"""``{"new": mtime_ns, "cur": mtime_ns}``: the directories' times a listing is good for."""


def unique_name(name: str) -> str:
    """The Maildir unique name of file ``name``: what does not change when flags do."""
    return name.partition(":")[0]


class Listing:
    """A Maildir's messages in delivery order, one compact column per field.

    Sizes and times are machine integers (``array``), and a UIDL that is
    the file's unique name (the usual case) is not stored at all: an idle
    session holds its maildrop's listing, and thousands of them add up.
    """

    __slots__ = ("_codes", "_uids", "file_sizes", "mtimes", "names", "sizes")

    def __init__(self) -> None:
        self._codes = bytearray()  # b"n" (new/) or b"c" (cur/) per message
        self.names: list[str] = []  # file names, flags included
        self.file_sizes = array("q")
        self.mtimes = array("q")  # ns
        self.sizes = array("q")  # canonical octets (CRLF line ends)
        self._uids: list[str | None] = []  # None: the unique name is the UIDL

    def __len__(self) -> int:
        return len(self.names)

    def append(self, subdir: str, name: str, file_size: int, mtime: int, size: int, uid: str) -> None:
        """Add one message at the end."""
        self._codes.append(_CODES[subdir])
        self.names.append(name)
        self.file_sizes.append(file_size)
        self.mtimes.append(mtime)
        self.sizes.append(size)
        self._uids.append(None if uid == unique_name(name) else uid)

    def subdir(self, i: int) -> str:
        """``"new"`` or ``"cur"``: where message ``i`` (0-based) was seen."""
        return _SUBDIRS[self._codes[i]]

    def uid(self, i: int) -> str:
        """The UIDL of message ``i`` (0-based)."""
        uid = self._uids[i]
        return unique_name(self.names[i]) if uid is None else uid

    @property
    def uids(self) -> Sequence[str]:
        """Every UIDL, in order (a view, computed as it is read)."""
        return _Uids(self)

    def moved(self, i: int, subdir: str, name: str) -> None:
        """Message ``i``'s file is now ``subdir/name`` (renamed by another program); its UIDL stays."""
        uid = self.uid(i)
        self._codes[i] = _CODES[subdir]
        self.names[i] = name
        self._uids[i] = None if uid == unique_name(name) else uid

    def without(self, positions: set[int]) -> Listing:
        """A copy without the messages at ``positions`` (0-based)."""
        copy = Listing()
        for i in range(len(self)):
            if i not in positions:
                copy.append(
                    self.subdir(i), self.names[i], self.file_sizes[i], self.mtimes[i], self.sizes[i], self.uid(i)
                )
        return copy

    def _columns(self) -> tuple[object, ...]:
        return (self._codes, self.names, self.file_sizes, self.mtimes, self.sizes, self._uids)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Listing) and self._columns() == other._columns()

    __hash__ = None  # type: ignore[assignment]


class _Uids(Sequence[str]):
    __slots__ = ("_listing",)

    def __init__(self, listing: Listing) -> None:
        self._listing = listing

    def __len__(self) -> int:
        return len(self._listing)

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self._listing.uid(n) for n in range(len(self._listing))[i]]
        if i < 0:
            i += len(self._listing)
        if not 0 <= i < len(self._listing):
            raise IndexError(i)
        return self._listing.uid(i)


def _read_file(dir_fd: int) -> bytes:
    return read_small(dir_fd, INDEX_NAME, MAX_INDEX_SIZE)


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


def _uids_ok(names: list[str], uids: list[object]) -> bool:
    if not all(uid is None or type(uid) is str for uid in uids):
        return False
    full = [unique_name(name) if uid is None else uid for name, uid in zip(names, uids, strict=True)]
    if not full:
        return True
    joined = "\n".join(full)  # type: ignore[arg-type]
    # As many lines as UIDLs (none holds a LF), each one valid, none twice.
    return joined.count("\n") == len(full) - 1 and _UIDS.fullmatch(joined) is not None and len(set(full)) == len(full)


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
        and codes.isascii()
        and set(codes.encode()) <= set(_SUBDIRS)
        and _names_ok(names)
        and _ints(file_sizes, 0, _SIZE_LIMIT)
        and _ints(mtimes, -_MTIME_LIMIT, _MTIME_LIMIT)
        and _ints(sizes, 0, _SIZE_LIMIT)
        and type(uids) is list
        and len({len(codes), len(names), len(file_sizes), len(mtimes), len(sizes), len(uids)}) == 1  # type: ignore[arg-type]
        and _uids_ok(names, uids)  # type: ignore[arg-type]
    ):
        raise ValueError("malformed entries")
    times = {subdir: value for subdir, value in dirs.items() if subdir in _CODES and type(value) is int}
    listing = Listing()
    listing._codes = bytearray(codes.encode())
    listing.names = names  # type: ignore[assignment]
    listing.file_sizes = array("q", file_sizes)  # type: ignore[arg-type]
    listing.mtimes = array("q", mtimes)  # type: ignore[arg-type]
    listing.sizes = array("q", sizes)  # type: ignore[arg-type]
    listing._uids = uids
    return listing, times


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


def trusted_times(times: DirTimes, taken: int) -> DirTimes:
    """The directory times worth storing: those not too recent, when they were read (``taken``, ns), to be sure of."""
    return {subdir: mtime for subdir, mtime in times.items() if taken - mtime >= TRUST_AFTER_NS}


def write(dir_fd: int, where: str, listing: Listing, times: DirTimes) -> None:
    """Replace the index atomically; a failure only costs a rebuild later (logged)."""
    doc = {
        "format": FORMAT,
        "dirs": times,
        "messages": {
            "subdir": listing._codes.decode(),
            "name": listing.names,
            "file_size": listing.file_sizes.tolist(),
            "mtime": listing.mtimes.tolist(),
            "size": listing.sizes.tolist(),
            "uid": listing._uids,  # null: the unique name
        },
    }
    data = json.dumps(doc, separators=(",", ":")).encode()
    try:
        replace(dir_fd, INDEX_NAME, data, mode=0o600)
    except OSError as exc:
        log.warning("maildir %s: cannot write index: %s", where, exc)


def forget(dir_fd: int, where: str, uniques: set[str]) -> bool:
    """Drop the messages with these unique names from the index, so that the next login looks at them afresh.

    The directory times go too: the next login lists the directories, and
    the files dropped are new to it, so their UIDLs are formed again (the
    others keep theirs).  The caller holds the lock.  Returns whether the
    index changed; a missing or damaged index needs nothing (the next
    login rebuilds it).
    """
    index = load(dir_fd, where)
    if index is None:
        return False
    listing, _ = index
    doomed = {i for i, name in enumerate(listing.names) if unique_name(name) in uniques}
    if not doomed:
        return False
    write(dir_fd, where, listing.without(doomed), {})
    return True
