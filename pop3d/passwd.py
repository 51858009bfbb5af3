"""Users from a Dovecot-style passwd-file.

Each line is ``user:{SCHEME}secret``, optionally followed by Dovecot's
further fields (``:uid:gid:gecos:home:shell:extra``), which are accepted
and ignored.  Lines starting with ``#`` and blank lines are comments.  The
secret's notation is described in :mod:`pop3d.passwords`; note that a secret
without ``{SCHEME}`` is taken by its form (``$6$...``, ``$2y$...``,
``$argon2id$...``) and otherwise as PLAIN, where Dovecot would assume CRYPT.

:class:`PasswdFile` is the ``auth`` callback: it re-reads the file whenever
it changes, so users can be added without a restart.  :func:`add_user`,
:func:`set_password`, :func:`remove_user` and :func:`list_users` edit the
file for ``pop3d user ...``; every write replaces the file atomically and
leaves comments and other lines as they were.  Two editors running at the
same moment do not tear the file, but the later one wins.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import tempfile
from typing import TypeAlias

import trio

from .callbacks import HashedPassword
from .errors import Pop3dError
from .passwords import DEFAULT_SCHEME, HASH_SCHEMES, StoredPassword, hash_password, parse_password

__all__ = [
    "PasswdFile",
    "PasswdFileError",
    "UserError",
    "add_user",
    "list_users",
    "remove_user",
    "set_password",
    "valid_user_name",
]

log = logging.getLogger("pop3d.passwd")

_Version: TypeAlias = tuple[int, ...]  # identifies one version of the file (or a failure to stat it)

# Characters that would break a line of the file or let a name leave the
# mail root (the storage uses the name as a directory).
_FORBIDDEN_IN_NAME = frozenset("/\\:\0")


class UserError(Pop3dError, ValueError):
    """An edit of the passwd-file is refused: the user exists, or does not, or a bad name or password."""


class PasswdFileError(Pop3dError):
    """The passwd-file cannot be read when :class:`PasswdFile` is made: a directory, say, or no permission."""


def valid_user_name(name: str) -> bool:
    """Whether ``name`` can be a user (and so a mailbox directory) name.

    Refused: empty, starting with ``.`` (so ``..`` too), containing ``/``,
    ``\\``, ``:``, NUL, whitespace or other control characters.
    """
    return (
        bool(name)
        and not name.startswith(".")
        and not any(c in _FORBIDDEN_IN_NAME or c.isspace() or not c.isprintable() for c in name)
    )


def _split_lines(text: str) -> list[str]:
    """The lines of ``text`` with their ends; only LF ends a line, as for Dovecot."""
    lines = [line + "\n" for line in text.split("\n")]
    lines[-1] = lines[-1][:-1]
    return lines if lines[-1] else lines[:-1]


def _user_line(line: str) -> tuple[str, list[str]] | None:
    """``(name, fields after the name)`` of a user line; ``None`` for a comment or blank line."""
    body = line.rstrip("\r\n")
    if not body.strip() or body.startswith("#"):
        return None
    name, *fields = body.split(":")
    return name, fields


def _parse(text: str, source: str) -> dict[str, StoredPassword]:
    """The users of a passwd-file's text; each bad line is logged (never its secret)."""
    users: dict[str, StoredPassword] = {}
    for number, line in enumerate(_split_lines(text), start=1):
        parsed = _user_line(line)
        if parsed is None:
            continue
        name, fields = parsed
        if not valid_user_name(name):
            log.warning("%s line %d: invalid user name, line ignored", source, number)
            continue
        if name in users:
            # As Dovecot does: the first entry counts.
            log.warning("%s line %d: user %r exists more than once, line ignored", source, number, name)
            continue
        stored = parse_password(fields[0] if fields else "")
        if stored.problem is not None:
            log.warning("%s line %d: user %r: %s, no password will match", source, number, name, stored.problem)
        users[name] = stored
    return users


def _version(path: str) -> _Version:
    try:
        st = os.stat(path)
    except OSError as exc:
        return (-1, exc.errno or 0)
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


class PasswdFile:
    """The ``auth`` callback for a passwd-file at ``path``.

    ``lookup(name)`` gives ``(password, name)``: the mailbox is the user
    name.  The password is a ``str`` for PLAIN entries (so APOP works) and
    a :class:`~pop3d.passwords.StoredPassword` otherwise.

    The file is read once here, so that a server stops at start rather
    than serving no one: :class:`PasswdFileError` (one line) if it exists
    but cannot be read or is not a regular file.  A missing file means no
    users yet (logged; ``pop3d user add`` creates it).  Then each lookup
    stats the file; when its mtime, size or inode changed, it is re-read in
    a worker thread.  A file that becomes missing or unreadable means no
    users (logged once).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._loading = trio.Lock()
        try:
            self._version, self._users = self._read()
        except FileNotFoundError as exc:
            self._version, self._users = self._unreadable(exc)
        except OSError as exc:
            raise PasswdFileError(f"passwd-file {self.path}: {exc.strerror or exc}") from None

    def describe(self) -> str:
        """``passwd-file:<path>``: what the admin API shows for this callback."""
        return f"passwd-file:{self.path}"

    def __repr__(self) -> str:
        return self.describe()

    async def lookup(self, name: str) -> tuple[str | HashedPassword, str] | None:
        """``(password, mailbox)`` of user ``name``, or ``None``."""
        if not valid_user_name(name):
            return None
        await self.refresh()
        stored = self._users.get(name)
        if stored is None:
            return None
        plain = stored.plain
        return (plain if plain is not None else stored, name)

    async def refresh(self) -> None:
        """Re-read the file if it changed since it was last read."""
        # One stat per login is cheap enough to do on the event loop.
        if _version(self.path) == self._version:
            return
        async with self._loading:
            if _version(self.path) == self._version:
                return  # another login re-read it while we waited
            # A cancel need not wait for the read: nothing is kept from an abandoned one.
            self._version, self._users = await trio.to_thread.run_sync(self._load, abandon_on_cancel=True)

    def _load(self) -> tuple[_Version, dict[str, StoredPassword]]:
        try:
            return self._read()
        except OSError as exc:
            return self._unreadable(exc)

    def _unreadable(self, exc: OSError) -> tuple[_Version, dict[str, StoredPassword]]:
        log.warning("passwd-file %s: %s; no users", self.path, exc.strerror or exc)
        return _version(self.path), {}

    def _read(self) -> tuple[_Version, dict[str, StoredPassword]]:
        """The file's version and users; :class:`OSError` if it cannot be read."""
        # O_NONBLOCK: a FIFO at the path must not block (the start, or a worker thread) forever.
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, encoding="utf-8", errors="surrogateescape", newline="") as file:
            # The version of the file actually read, even if it is replaced meanwhile.
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file", self.path)
            text = file.read()
        users = _parse(text, self.path)
        log.info("passwd-file %s: %d users", self.path, len(users))
        return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev), users


# -- editing ---------------------------------------------------------------


def _read_lines(path: str) -> list[str]:
    """The file's lines with their line ends; none if there is no file."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as file:
            return _split_lines(file.read())
    except FileNotFoundError:
        return []


def _write_lines(path: str, lines: list[str]) -> None:
    """Replace the file atomically, keeping its mode and owner (0600 if new)."""
    target = os.path.realpath(path)  # replace a symlink's target, not the link
    directory = os.path.dirname(target)
    try:
        old: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        old = None
    fd, temp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape", newline="") as file:
            os.fchmod(file.fileno(), stat.S_IMODE(old.st_mode) if old is not None else 0o600)
            if old is not None and (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
                # root editing the server's file must leave it readable by the server.
                with contextlib.suppress(PermissionError):
                    os.fchown(file.fileno(), old.st_uid, old.st_gid)
            file.writelines(lines)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    # Make the rename itself durable.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _check_name(name: str) -> None:
    if not valid_user_name(name):
        raise UserError(f"invalid user name {name!r}")


def _stored_form(password: str, scheme: str) -> str:
    if scheme.upper() not in HASH_SCHEMES:
        raise UserError(f"unknown password scheme {scheme!r}; use one of {', '.join(HASH_SCHEMES)}")
    if not password:
        raise UserError("the password is empty")
    if any(c in password for c in "\r\n\0"):
        raise UserError("the password contains a line break or NUL")
    if scheme.upper() == "PLAIN" and ":" in password:
        raise UserError("a PLAIN password cannot contain ':' (it separates the fields)")
    return hash_password(password, scheme)


def _find(lines: list[str], name: str) -> int | None:
    for index, line in enumerate(lines):
        parsed = _user_line(line)
        if parsed is not None and parsed[0] == name:
            return index
    return None


def add_user(path: str | os.PathLike[str], name: str, password: str, *, scheme: str = DEFAULT_SCHEME) -> None:
    """Add user ``name`` with ``password`` hashed by ``scheme`` (the file is created if needed).

    Raises :class:`UserError` if the user exists or the name or password is
    bad.  ``scheme="PLAIN"`` stores the password as it is, which APOP needs.
    """
    path = os.fspath(path)
    _check_name(name)
    secret = _stored_form(password, scheme)
    lines = _read_lines(path)
    if _find(lines, name) is not None:
        raise UserError(f"user {name!r} exists already")
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    lines.append(f"{name}:{secret}\n")
    _write_lines(path, lines)


def set_password(path: str | os.PathLike[str], name: str, password: str, *, scheme: str | None = None) -> None:
    """Change the password of user ``name``, keeping the line's other fields.

    Without ``scheme``, a user with a PLAIN password stays PLAIN (so APOP
    keeps working) and any other user, one without a password too (a line
    ``name:`` or just ``name``), gets :data:`DEFAULT_SCHEME`.  Raises
    :class:`UserError` if there is no such user or the password is bad.
    """
    path = os.fspath(path)
    _check_name(name)
    lines = _read_lines(path)
    index = _find(lines, name)
    if index is None:
        raise UserError(f"no user {name!r}")
    line = lines[index]
    body = line.rstrip("\r\n")
    fields = body.split(":")
    if len(fields) == 1:
        fields.append("")  # a line without a colon: a user without a password
    if scheme is None:
        # An empty secret parses as an (invalid) PLAIN one: it must not make the new password plain.
        scheme = "PLAIN" if parse_password(fields[1]).plain is not None else DEFAULT_SCHEME
    secret = _stored_form(password, scheme)
    fields[1:2] = [secret]
    lines[index] = ":".join(fields) + line[len(body) :]
    _write_lines(path, lines)


def remove_user(path: str | os.PathLike[str], name: str) -> None:
    """Remove user ``name`` (every line of it); :class:`UserError` if there is none."""
    path = os.fspath(path)
    _check_name(name)
    lines = _read_lines(path)
    kept = [line for line in lines if (parsed := _user_line(line)) is None or parsed[0] != name]
    if len(kept) == len(lines):
        raise UserError(f"no user {name!r}")
    _write_lines(path, kept)


def list_users(path: str | os.PathLike[str]) -> list[str]:
    """The names of the file's users, sorted; none if there is no file.

    Lines with an invalid user name are left out, as the server ignores them.
    """
    names = {parsed[0] for line in _read_lines(os.fspath(path)) if (parsed := _user_line(line)) is not None}
    return sorted(name for name in names if valid_user_name(name))
