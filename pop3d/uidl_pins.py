"""Pinned UIDLs: ``pop3d-uidl-pins``, the UIDLs a Maildir's messages must keep, by unique name.

``pop3d uidl import`` writes this file after matching the messages that
another POP3 server served to the Maildir's files: each pinned message then
gets the UIDL its clients already know.  :class:`~pop3d.maildir.MaildirStorage`
reads it when it meets files new to its index; a pin wins over Dovecot's
UIDL and over pop3d's own.

The file sits next to ``cur/``, one pin a line after a header line::

    # pop3d-uidl-pins 1
    <UIDL> <unique name>

The UIDL comes first because it never holds a space (RFC 1939); the unique
name (the Maildir file name before ``:``) is the rest of the line, in the
file system's bytes.  The file is written only by :func:`save`: a temporary
file, fsync, rename.

Pins are meant to be set before clients use pop3d on the Maildir: a
message whose UIDL pop3d already served keeps it in ``pop3d-index`` unless
its pin changes, so :func:`save` drops the messages whose pins it adds,
changes or removes from the index, and the next login forms their UIDLs
again (pins first).  A client that already saw pop3d's UIDL for such a
message would then see a new one.

Faults: :func:`load` raises :class:`PinsError` for a damaged file (the
storage then refuses the mailbox rather than give its messages UIDLs that
would stick); :func:`save` raises :class:`ValueError` for bad pins and
:class:`MaildirLocked` while a session holds the Maildir.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator, Mapping

from . import maildir_index
from .maildir_files import RefusedFile, give_to_mail_owner, read_small, replace
from .maildir_index import LOCK_NAME
from .protocol import valid_uid

__all__ = ["MAX_PINS_SIZE", "PINS_NAME", "MaildirLocked", "PinsError", "load", "read", "save"]

PINS_NAME = "pop3d-uidl-pins"
"""The pins file in each Maildir."""
MAX_PINS_SIZE = 256 * 1024 * 1024
"""A bigger pins file is refused as damaged."""
_HEADER = b"# pop3d-uidl-pins 1\n"
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class PinsError(ValueError):
    """A ``pop3d-uidl-pins`` file that is not one pop3d wrote."""


class MaildirLocked(RuntimeError):
    """A session (of this or another process) holds the Maildir: pins cannot be saved now."""


def _check_name(unique: object) -> str | None:
    """Why ``unique`` cannot be a Maildir unique name, or ``None``."""
    if not isinstance(unique, str) or not unique:
        return "not a non-empty string"
    if unique.startswith("."):
        return "starts with a dot"
    if any(c in unique for c in "/:\n\0"):
        return "holds '/', ':', a line end or NUL"
    return None


def _parse(data: bytes) -> dict[str, str]:
    if not data.startswith(_HEADER):
        raise PinsError("no '# pop3d-uidl-pins 1' header")
    pins: dict[str, str] = {}
    seen: set[str] = set()
    body = data[len(_HEADER) :]
    if body and not body.endswith(b"\n"):
        raise PinsError("cut short (no line end at the end)")
    for lineno, line in enumerate(body.splitlines(), start=2):
        raw_uid, space, raw_name = line.partition(b" ")
        try:
            uid = raw_uid.decode("ascii")
        except UnicodeDecodeError:
            raise PinsError(f"line {lineno}: UIDL not ASCII") from None
        unique = os.fsdecode(raw_name)
        if not space or not valid_uid(uid):
            raise PinsError(f"line {lineno}: not '<UIDL> <unique name>'")
        if (why := _check_name(unique)) is not None:
            raise PinsError(f"line {lineno}: unique name {why}")
        if unique in pins or uid in seen:
            raise PinsError(f"line {lineno}: {unique!r} or {uid!r} pinned twice")
        pins[unique] = uid
        seen.add(uid)
    return pins


def read(dir_fd: int) -> dict[str, str]:
    """The pins of the Maildir open at ``dir_fd``: ``{}`` without a file; :class:`PinsError` if damaged.

    Other :class:`OSError` (no permission...) are raised as they are.
    """
    try:
        data = read_small(dir_fd, PINS_NAME, MAX_PINS_SIZE)
    except FileNotFoundError:
        return {}
    except RefusedFile as exc:
        raise PinsError(str(exc)) from None
    return _parse(data)


def load(maildir_path: str | os.PathLike[str]) -> dict[str, str]:
    """The pins of the Maildir at ``maildir_path``: unique name -> UIDL.

    ``{}`` if it has no pins file (or does not exist); :class:`PinsError`
    (a :class:`ValueError`) if the file is damaged.  Takes no lock: the
    file is only ever replaced whole.
    """
    try:
        dir_fd = os.open(maildir_path, _OPEN_DIR)
    except FileNotFoundError:
        return {}
    try:
        return read(dir_fd)
    finally:
        os.close(dir_fd)


def _validate(pins: Mapping[str, str]) -> dict[str, str]:
    checked: dict[str, str] = {}
    owners: dict[str, str] = {}
    for unique, uid in pins.items():
        if (why := _check_name(unique)) is not None:
            raise ValueError(f"pin for {unique!r}: the unique name {why}")
        if not isinstance(uid, str) or not valid_uid(uid):
            raise ValueError(f"pin for {unique!r}: {uid!r} is not a valid UIDL (RFC 1939: 1-70 of 0x21-0x7E)")
        if uid in owners:
            raise ValueError(f"UIDL {uid!r} pinned for both {owners[uid]!r} and {unique!r}")
        owners[uid] = unique
        checked[unique] = uid
    return checked


@contextlib.contextmanager
def _locked(dir_fd: int, where: str) -> Iterator[None]:
    """Hold the Maildir's session lock, or raise :class:`MaildirLocked`."""
    fd = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        give_to_mail_owner(fd, dir_fd)  # run as root, the import must not lock pop3d out
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MaildirLocked(f"maildir {where} is in use by a POP3 session; try again later") from None
        yield
    finally:
        os.close(fd)


def save(maildir_path: str | os.PathLike[str], pins: Mapping[str, str]) -> None:
    """Replace the Maildir's pins with ``pins`` (unique name -> UIDL), atomically.

    Every UIDL must be valid (RFC 1939) and used once, every unique name a
    plain name without ``:``: else :class:`ValueError`, and nothing is
    written.  Holds the Maildir's lock meanwhile, so that no session is
    open on it (:class:`MaildirLocked` if one is).  Empty ``pins`` remove
    the file.  The messages whose pin was added, changed or removed are
    dropped from ``pop3d-index``, so the next login forms their UIDLs anew.
    Run as root, the file gets the Maildir's owner.  :class:`FileNotFoundError`
    if the Maildir does not exist.
    """
    checked = _validate(pins)
    where = os.fspath(maildir_path)
    dir_fd = os.open(maildir_path, _OPEN_DIR)
    try:
        with _locked(dir_fd, where):
            changed: set[str] | None
            try:
                old = read(dir_fd)
            except PinsError:
                changed = None  # which messages it pinned is unknown: the whole index goes
            else:
                changed = {u for u in old.keys() | checked.keys() if old.get(u) != checked.get(u)}
            if checked:
                _write(dir_fd, checked)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(PINS_NAME, dir_fd=dir_fd)
            with contextlib.suppress(OSError):
                os.fsync(dir_fd)
            if changed is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(maildir_index.INDEX_NAME, dir_fd=dir_fd)
            elif changed:
                maildir_index.forget(dir_fd, where, changed)
    finally:
        os.close(dir_fd)


def _write(dir_fd: int, pins: Mapping[str, str]) -> None:
    lines = [_HEADER]
    lines.extend(uid.encode("ascii") + b" " + os.fsencode(unique) + b"\n" for unique, uid in pins.items())
    data = b"".join(lines)
    # Given to the mail's owner: pop3d may serve the Maildir as that user later.
    replace(dir_fd, PINS_NAME, data, mode=0o644, owner_of_dir=True)
