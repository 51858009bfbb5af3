"""``pop3d uidl import``: keep the UIDLs of another POP3 server, matched by content.

For each user, log in to the old server over POP3, fetch its UIDL listing
and every message (``RETR``; never ``DELE``), and find each message in the
user's local Maildir by a digest of its content.  The old UIDLs of the
messages found are pinned in the Maildir (:mod:`pop3d.uidl_pins`), so that
POP3 clients that keep mail on the server see the UIDLs they know.

The digest (:class:`ContentDigest`) is SHA-256 over the message with every
CRLF turned into LF and the trailing line ends removed: a Maildir file
stored with LF or CRLF line ends, with or without a final newline, and the
same message as a POP3 server sends it (CRLF, dot-stuffing undone) give the
same digest.

Matching (:func:`match`) groups the remote and local messages by digest:

- one remote and one local message: a match;
- the same number of each (one message delivered twice, say): paired in
  order, a pair that is pinned already being kept; any pairing gives the
  client the same bytes under the same UIDLs;
- other counts: ambiguous, and nothing of the group is pinned;
- no local or no remote message: unmatched.

A UIDL that is not valid for pop3d (RFC 1939: 1 to 70 characters from 0x21
to 0x7E) or that the old server gives to more than one message is refused.
A pin that exists already for the same file and UIDL is kept as it is; one
that says otherwise (the file pinned to another UIDL, or the UIDL pinned to
another file) is a conflict, reported and left alone unless ``replace``.
Nothing is written when nothing changes, so a second run changes nothing.

The local Maildir is read directly (``new/`` and ``cur/``, no symlinks, no
dot files, as pop3d serves them), without pop3d's lock or index: a dry run
writes nothing at all.

Credentials come from a file (:func:`read_credentials`) that only its owner
may read.  TLS: POP3S from the first byte with ``Source.tls``, else STLS
when the server offers it; a password goes in clear only to a loopback
address, or with ``Source.allow_cleartext``.  Certificates are verified
(the system's CAs, or a ``--ca-file``) unless the caller's context says not.
Every network wait is bounded by ``Source.timeout``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import os
import re
import ssl
import stat
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import trio

from . import uidl_pins
from .errors import Pop3dError
from .maildir_index import unique_name
from .passwd import valid_user_name
from .protocol import valid_uid

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_TIMEOUT",
    "DEFAULT_TLS_PORT",
    "Ambiguous",
    "ContentDigest",
    "CredentialsError",
    "LocalMessage",
    "Match",
    "MatchResult",
    "RemoteError",
    "RemoteMessage",
    "Source",
    "UidlImportError",
    "UserReport",
    "client_context",
    "content_digest",
    "fetch_remote",
    "import_user",
    "local_messages",
    "match",
    "parse_address",
    "read_credentials",
    "run_import",
]

DEFAULT_PORT = 110
DEFAULT_TLS_PORT = 995
DEFAULT_TIMEOUT = 60.0
"""Seconds for any one network step (connect, handshake, a read, a write)."""
MAX_REPLY_LINE = 8192
"""The longest status, CAPA or UIDL line accepted from the old server (RFC 2449 says 512)."""
_PIECE = 65536  # a message line longer than this is digested in pieces of this size
_READ_CHUNK = 1 << 20
_OPEN_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SCHEME = re.compile(r"\{([A-Za-z0-9._-]+)\}")


class UidlImportError(Pop3dError, ValueError):
    """The import cannot start: a bad argument or file; the message says why, in one line."""


class CredentialsError(UidlImportError):
    """The credentials file cannot be used."""


class RemoteError(Exception):
    """Talking to the old server failed for one user; the message says why, in one line."""


# -- credentials -----------------------------------------------------------------


def read_credentials(path: Path) -> dict[str, str]:
    """The users and passwords in ``path``, in file order.

    One ``user:password`` a line; the password is the rest of the line
    (colons included).  A leading ``{PLAIN}`` is removed, and then, as in a
    Dovecot passwd-file, the password ends at the next ``:`` (so such a
    file's lines work as they are).  Blank lines and lines starting with
    ``#`` are ignored.  Like ssh with a private key, the file is refused
    when its group or others may access it.  Raises
    :class:`CredentialsError`.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise CredentialsError(f"credentials {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CredentialsError(f"credentials {path}: not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise CredentialsError(
                f"credentials {path}: others may read it (mode {mode:04o}); it holds passwords: chmod 600 {path}"
            )
        with os.fdopen(os.dup(fd), "rb") as file:
            data = file.read()
    finally:
        os.close(fd)
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise CredentialsError(f"credentials {path}: not UTF-8") from None
    users: dict[str, str] = {}
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip() or line.startswith("#"):
            continue
        user, colon, password = line.partition(":")
        where = f"credentials {path} line {number}"
        if not colon:
            raise CredentialsError(f"{where}: not user:password")
        if not valid_user_name(user):
            raise CredentialsError(f"{where}: {user!r} cannot be a user (and mailbox) name")
        scheme = _SCHEME.match(password)
        if scheme is not None:
            if scheme[1].upper() != "PLAIN":
                raise CredentialsError(
                    f"{where}: a {{{scheme[1]}}} password cannot log in to the old server; give it in clear"
                )
            password = password[scheme.end() :].partition(":")[0]
        if not password:
            raise CredentialsError(f"{where}: no password for {user}")
        if "\r" in password or "\0" in password:
            raise CredentialsError(f"{where}: the password of {user} holds a CR or NUL")
        if user in users:
            raise CredentialsError(f"{where}: {user} appears twice")
        users[user] = password
    return users


# -- the digest ------------------------------------------------------------------


class ContentDigest:
    """SHA-256 of a message fed in pieces, CRLF read as LF and trailing line ends left out."""

    __slots__ = ("_cr", "_hash", "_lfs", "size")

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._cr = False  # the last piece ended in CR: a CRLF may straddle two pieces
        self._lfs = 0  # line ends held back: they count only if more text follows
        self.size = 0  # octets fed

    def update(self, data: bytes) -> None:
        """Add the next piece of the message."""
        self.size += len(data)
        if self._cr:
            data = b"\r" + data
            self._cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._cr = True
        data = data.replace(b"\r\n", b"\n")
        text = data.rstrip(b"\n")
        if text:
            self._hash.update(b"\n" * self._lfs + text)
            self._lfs = 0
        self._lfs += len(data) - len(text)

    def hexdigest(self) -> str:
        """The digest of everything fed (call once, at the end)."""
        if self._cr:  # a lone CR at the very end is content
            self._hash.update(b"\n" * self._lfs + b"\r")
            self._cr, self._lfs = False, 0
        return self._hash.hexdigest()


def content_digest(data: bytes) -> str:
    """The :class:`ContentDigest` of a whole message."""
    digest = ContentDigest()
    digest.update(data)
    return digest.hexdigest()


# -- the old server --------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Source:
    """The old POP3 server and how to reach it."""

    host: str
    port: int
    tls: bool = False
    """POP3S: TLS from the first byte.  Otherwise STLS when the server offers it."""
    ssl_context: ssl.SSLContext | None = None
    """For TLS; ``None``: the system's CAs, certificates verified (:func:`client_context`)."""
    allow_cleartext: bool = False
    """Send the password without TLS to an address that is not loopback."""
    timeout: float = DEFAULT_TIMEOUT

    def describe(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_address(text: str, *, tls: bool = False) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT``, ``[IPv6]`` or ``[IPv6]:PORT``; the port defaults to 110, or 995 for POP3S."""
    host, port = text, None
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise UidlImportError(f"{text!r} is not HOST[:PORT]")
        port = rest[1:] if rest else None
    elif text.count(":") == 1:  # more colons: an IPv6 address without a port
        host, _, port = text.partition(":")
    if not host or (port is not None and not (port.isascii() and port.isdigit() and len(port) <= 5)):
        raise UidlImportError(f"{text!r} is not HOST[:PORT]")
    number = int(port) if port is not None else DEFAULT_TLS_PORT if tls else DEFAULT_PORT
    if not 0 < number < 65536:
        raise UidlImportError(f"{text!r}: port {number} out of range")
    return host, number


def client_context(ca_file: Path | None = None, *, insecure: bool = False) -> ssl.SSLContext:
    """A TLS client context: certificates verified against ``ca_file`` or the system's CAs.

    ``insecure`` checks nothing (a self-signed test server): anyone in
    between could read the passwords.
    """
    context = ssl.create_default_context(cafile=None if ca_file is None else os.fspath(ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


@dataclass(frozen=True, slots=True)
class RemoteMessage:
    """One message of the old server: its number and UIDL there, and its content's digest."""

    number: int
    uidl: str
    digest: str
    size: int
    """Octets received, dot-stuffing undone."""
    error: str | None = None
    """Why the server did not send it (its ``-ERR`` to ``RETR``); the digest is then empty."""


class _Refused(Exception):
    """The server answered ``-ERR``."""


class _Connection:
    """A POP3 client over a Trio stream: bounded lines, bounded waits."""

    def __init__(self, stream: trio.abc.Stream, timeout: float) -> None:
        self.stream = stream
        self._timeout = timeout
        self._buffer = bytearray()
        self._pos = 0  # what was consumed of _buffer

    async def _fill(self) -> None:
        if self._pos:
            del self._buffer[: self._pos]
            self._pos = 0
        with trio.fail_after(self._timeout):
            data = await self.stream.receive_some(_PIECE)
        if not data:
            raise RemoteError("the server closed the connection")
        self._buffer += data

    def buffered(self) -> bool:
        return len(self._buffer) > self._pos

    async def piece(self) -> bytes:
        """The next line with its line end, or the next :data:`_PIECE` octets of a longer one."""
        start = self._pos
        while True:
            end = self._buffer.find(b"\n", start)
            if end >= 0 and end - self._pos < _PIECE:
                cut = end + 1
                break
            if len(self._buffer) - self._pos >= _PIECE:
                cut = self._pos + _PIECE
                break
            start = len(self._buffer) - self._pos
            await self._fill()
            start = self._pos + start
        piece = bytes(self._buffer[self._pos : cut])
        self._pos = cut
        return piece

    async def line(self) -> bytes:
        """A whole reply line, without its line end."""
        piece = await self.piece()
        if len(piece) > MAX_REPLY_LINE or not piece.endswith(b"\n"):
            raise RemoteError(f"a reply line longer than {MAX_REPLY_LINE} octets")
        return piece.rstrip(b"\r\n")

    async def send(self, line: str) -> None:
        with trio.fail_after(self._timeout):
            await self.stream.send_all(line.encode() + b"\r\n")

    async def reply(self) -> str:
        """The text of a ``+OK`` line; :class:`_Refused` for ``-ERR``."""
        line = (await self.line()).decode("utf-8", "replace")
        if line.startswith("+OK"):
            return line[3:].strip()
        if line.startswith("-ERR"):
            raise _Refused(line[4:].strip())
        raise RemoteError(f"not a POP3 reply: {_shown(line)}")

    async def command(self, line: str) -> str:
        await self.send(line)
        return await self.reply()

    async def lines(self) -> list[str]:
        """The lines of a multi-line reply (CAPA, UIDL), dot-stuffing undone."""
        out: list[str] = []
        while True:
            line = await self.line()
            if line == b".":
                return out
            out.append(line.removeprefix(b".").decode("utf-8", "replace"))

    async def retr(self, number: int) -> tuple[int, str]:
        """``RETR number``: the message's size (octets received) and digest."""
        await self.command(f"RETR {number}")
        digest = ContentDigest()
        at_line_start = True
        while True:
            piece = await self.piece()
            ends_line = piece.endswith(b"\n")
            if at_line_start:
                if piece in (b".\r\n", b".\n"):
                    return digest.size, digest.hexdigest()
                if piece.startswith(b"."):
                    piece = piece[1:]
            digest.update(piece)
            at_line_start = ends_line


def _shown(text: str, limit: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _is_loopback(stream: trio.abc.Stream) -> bool:
    sock = getattr(stream, "socket", None)
    try:
        address = sock.getpeername()[0] if sock is not None else ""
        return ipaddress.ip_address(address.partition("%")[0]).is_loopback
    except (OSError, ValueError):
        return False


async def _tls(stream: trio.abc.Stream, source: Source) -> trio.SSLStream[trio.abc.Stream]:
    context = source.ssl_context or client_context()
    tls = trio.SSLStream(stream, context, server_hostname=source.host)
    with trio.fail_after(source.timeout):
        await tls.do_handshake()
    return tls


async def _capabilities(conn: _Connection) -> list[str] | None:
    """The CAPA lines, upper-cased; ``None`` if the server has no CAPA."""
    try:
        await conn.command("CAPA")
    except _Refused:
        return None
    return [line.upper() for line in await conn.lines()]


def _offers_plain(capabilities: list[str]) -> bool:
    return any(line.split()[:1] == ["SASL"] and "PLAIN" in line.split()[1:] for line in capabilities)


async def _login(conn: _Connection, source: Source, user: str, password: str) -> _Connection:
    """Greeting, TLS, login; returns the connection to go on with (the TLS one after STLS)."""
    await conn.reply()  # the greeting
    secure = source.tls
    capabilities = await _capabilities(conn)
    if not secure and capabilities is not None and "STLS" in capabilities:
        await conn.command("STLS")
        if conn.buffered():
            # Bytes sent before the handshake would be read as if they came over TLS.
            raise RemoteError("the server sent data after its STLS reply, before TLS")
        conn = _Connection(await _tls(conn.stream, source), source.timeout)
        secure = True
        capabilities = await _capabilities(conn)  # RFC 2595: forget what was said in clear
    if not secure and not source.allow_cleartext and not _is_loopback(conn.stream):
        raise RemoteError(
            "the server offers no STLS: give --tls for POP3S, or --allow-cleartext to send the password unencrypted"
        )
    try:
        if capabilities is None or "USER" in capabilities or not _offers_plain(capabilities):
            await conn.command(f"USER {user}")
            await conn.command(f"PASS {password}")
        else:
            response = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            await conn.command(f"AUTH PLAIN {response}")
    except _Refused as exc:
        raise RemoteError(f"login refused: {_shown(str(exc))}") from None
    return conn


def _check_credential(text: str) -> None:
    if any(c in text for c in "\r\n\0"):
        raise RemoteError("a user name or password with CR, LF or NUL cannot be sent")


async def fetch_remote(source: Source, user: str, password: str) -> list[RemoteMessage]:
    """Log in to the old server as ``user``, and fetch the UIDL and digest of every message.

    Nothing is deleted.  Raises :class:`RemoteError`.
    """
    _check_credential(user)
    _check_credential(password)
    stream: trio.abc.Stream | None = None
    try:
        with trio.fail_after(source.timeout):
            stream = await trio.open_tcp_stream(source.host, source.port)
        if source.tls:
            stream = await _tls(stream, source)
        conn = await _login(_Connection(stream, source.timeout), source, user, password)
        stream = conn.stream
        try:
            await conn.command("UIDL")
        except _Refused as exc:
            raise RemoteError(f"the server has no UIDL command: {_shown(str(exc))}") from None
        listing: list[tuple[int, str]] = []
        for line in await conn.lines():
            digits, _, uidl = line.strip().partition(" ")
            if not (digits.isascii() and digits.isdigit()):
                raise RemoteError(f"not a UIDL line: {_shown(line)}")
            listing.append((int(digits), uidl.strip()))
        messages = []
        for number, uidl in listing:
            try:
                size, digest = await conn.retr(number)
            except _Refused as exc:  # one message gone (another session?) must not stop the others
                messages.append(RemoteMessage(number, uidl, "", 0, error=_shown(str(exc)) or "-ERR"))
                continue
            messages.append(RemoteMessage(number, uidl, digest, size))
        # QUIT without DELE deletes nothing; its answer does not matter.
        with contextlib.suppress(_Refused, RemoteError):
            await conn.command("QUIT")
        return messages
    except _Refused as exc:  # the greeting, STLS
        raise RemoteError(f"the server refused: {_shown(str(exc))}") from None
    except trio.TooSlowError:
        raise RemoteError(f"no answer from {source.describe()} within {source.timeout:g} seconds") from None
    except trio.BrokenResourceError as exc:
        raise RemoteError(_why(exc)) from None
    except (OSError, ssl.SSLError) as exc:
        raise RemoteError(_why(exc)) from None
    finally:
        if stream is not None:
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                await trio.aclose_forcefully(stream)


def _why(exc: BaseException) -> str:
    """One line for a network or TLS failure."""
    cause: BaseException | None = exc
    while isinstance(cause, trio.BrokenResourceError) and cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"TLS: the server's certificate: {cause.verify_message}"
    if isinstance(cause, ssl.SSLError):
        return f"TLS: {cause.reason or cause}"
    if isinstance(cause, OSError):
        text = cause.strerror or str(cause) or type(cause).__name__
        # Trio's "all attempts to connect ... failed" keeps the reasons in an exception group.
        group = cause.__cause__
        if isinstance(group, BaseExceptionGroup):
            reasons = dict.fromkeys(
                os.strerror(inner.errno) if isinstance(inner, OSError) and inner.errno else _why(inner)
                for inner in group.exceptions
            )
            text += ": " + "; ".join(reasons)
        return text
    return str(cause) or "the connection broke"


# -- the local Maildir -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalMessage:
    """One message file of the local Maildir."""

    file: str
    """``new/<name>`` or ``cur/<name>``."""
    digest: str

    @property
    def unique(self) -> str:
        """The Maildir unique name: what the pin is keyed by."""
        return unique_name(self.file.partition("/")[2])


def _read_digest(dir_fd: int, name: str, path: Path) -> str | None:
    try:
        fd = os.open(name, _OPEN_READ, dir_fd=dir_fd)
    except FileNotFoundError:
        return None  # gone meanwhile
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, os.fspath(path)) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        digest = ContentDigest()
        while chunk := os.read(fd, _READ_CHUNK):
            digest.update(chunk)
        return digest.hexdigest()
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, os.fspath(path)) from None
    finally:
        os.close(fd)


def local_messages(maildir: Path) -> list[LocalMessage]:
    """The message files of ``maildir`` (``new/`` and ``cur/``) with their digests, by file.

    Dot files, symlinks and other non-files are left out, as pop3d leaves
    them out.  Raises :class:`OSError` if ``maildir`` cannot be read.
    """
    out: list[LocalMessage] = []
    top = os.open(maildir, _OPEN_DIR)
    try:
        for subdir in ("new", "cur"):
            try:
                dir_fd = os.open(subdir, _OPEN_DIR, dir_fd=top)
            except FileNotFoundError:
                continue
            try:
                with os.scandir(dir_fd) as entries:
                    names = sorted(
                        e.name for e in entries if not e.name.startswith(".") and e.is_file(follow_symlinks=False)
                    )
                for name in names:
                    digest = _read_digest(dir_fd, name, maildir / subdir / name)
                    if digest is not None:
                        out.append(LocalMessage(f"{subdir}/{name}", digest))
            finally:
                os.close(dir_fd)
    finally:
        os.close(top)
    return out


# -- matching ----------------------------------------------------------------------

MatchStatus = Literal["new", "pinned", "replaced", "conflict"]


@dataclass(frozen=True, slots=True)
class Match:
    """An old message found in the Maildir, and what became of its pin."""

    remote: RemoteMessage
    local: LocalMessage
    status: MatchStatus
    """``new``: pinned now; ``pinned``: was already; ``replaced``: a conflicting pin gave way (``replace``);
    ``conflict``: another pin stands in the way, nothing changed."""
    note: str = ""
    """What the conflict is, or what was replaced."""


@dataclass(frozen=True, slots=True)
class Ambiguous:
    """Messages with one content that cannot be paired safely: nothing of them is pinned."""

    remote: tuple[RemoteMessage, ...]
    local: tuple[LocalMessage, ...]


@dataclass(frozen=True, slots=True)
class Refused:
    """An old UIDL that cannot be kept."""

    remote: RemoteMessage
    why: str


@dataclass
class MatchResult:
    """What :func:`match` found, and the pins it leads to."""

    matches: list[Match] = field(default_factory=list)
    ambiguous: list[Ambiguous] = field(default_factory=list)
    remote_unmatched: list[RemoteMessage] = field(default_factory=list)
    local_unmatched: list[LocalMessage] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    pins: dict[str, str] = field(default_factory=dict)
    """The pins after the import: the old ones merged with the new."""

    @property
    def changed(self) -> int:
        """How many pins this import adds or changes."""
        return sum(1 for m in self.matches if m.status in ("new", "replaced"))


def _refusals(remote: Sequence[RemoteMessage]) -> dict[int, str]:
    counts = Counter(message.uidl for message in remote)
    why: dict[int, str] = {}
    for message in remote:
        if message.error is not None:
            why[message.number] = f"the server would not send it: {message.error}"
        elif not valid_uid(message.uidl):
            why[message.number] = "not a valid UIDL (RFC 1939: 1 to 70 characters from 0x21 to 0x7E)"
        elif counts[message.uidl] > 1:
            why[message.number] = f"the server gives it to {counts[message.uidl]} messages"
    return why


def _pairs(remote: list[RemoteMessage], local: list[LocalMessage], pins: Mapping[str, str]) -> list[tuple[int, int]]:
    """Pair equal numbers of messages with one content: pinned pairs first, the others in order."""
    uidls = {message.uidl: i for i, message in enumerate(remote)}
    pairs: list[tuple[int, int]] = []
    for j, message in enumerate(local):
        i = uidls.pop(pins.get(message.unique, ""), None)
        if i is not None:
            pairs.append((i, j))
    paired_local = {j for _, j in pairs}
    rest_remote = sorted(uidls.values())
    rest_local = [j for j in range(len(local)) if j not in paired_local]
    pairs.extend(zip(rest_remote, rest_local, strict=True))
    return sorted(pairs)


def match(
    remote: Sequence[RemoteMessage],
    local: Sequence[LocalMessage],
    pins: Mapping[str, str],
    *,
    replace: bool = False,
) -> MatchResult:
    """Match the old server's messages to the Maildir's by digest, and merge their UIDLs into ``pins``.

    ``pins`` maps Maildir unique names to pinned UIDLs.  No I/O; the rules
    are in the module's docstring.
    """
    result = MatchResult(pins=dict(pins))
    refusals = _refusals(remote)
    result.refused = [Refused(m, refusals[m.number]) for m in remote if m.number in refusals]
    # A unique name held by two files (a copy) cannot carry a pin of its own, nor one with a line end.
    shared = {name for name, n in Counter(m.unique for m in local).items() if n > 1 or "\n" in name}
    by_digest: dict[str, tuple[list[RemoteMessage], list[LocalMessage]]] = defaultdict(lambda: ([], []))
    for message in sorted(remote, key=lambda m: m.number):
        if message.number not in refusals:
            by_digest[message.digest][0].append(message)
    for file in sorted(local, key=lambda m: m.file):
        if file.unique in shared:
            result.local_unmatched.append(file)
        else:
            by_digest[file.digest][1].append(file)
    pairs: list[tuple[RemoteMessage, LocalMessage]] = []
    for remote_group, local_group in by_digest.values():
        if not local_group:
            result.remote_unmatched.extend(remote_group)
        elif not remote_group:
            result.local_unmatched.extend(local_group)
        elif len(remote_group) != len(local_group):
            result.ambiguous.append(Ambiguous(tuple(remote_group), tuple(local_group)))
        else:
            pairs.extend((remote_group[i], local_group[j]) for i, j in _pairs(remote_group, local_group, pins))
    owners = {uidl: name for name, uidl in result.pins.items()}
    present = {file.unique for file in local}
    for old, file in sorted(pairs, key=lambda pair: pair[0].number):
        current = result.pins.get(file.unique)
        owner = owners.get(old.uidl)
        if current == old.uidl:
            result.matches.append(Match(old, file, "pinned"))
            continue
        clashes, notes = [], []
        if current is not None:
            clashes.append(f"the file is pinned to {current}")
        if owner is not None and owner in present:
            clashes.append(f"{old.uidl} is pinned to the file {owner}")
        elif owner is not None:
            # A pin left behind by a file that is gone (deleted by a client): it moves.
            notes.append(f"{old.uidl} was pinned to {owner}, which is not here")
        if clashes and not replace:
            result.matches.append(Match(old, file, "conflict", "; ".join(clashes)))
            continue
        if owner is not None:
            del result.pins[owner]
        if current is not None:
            del owners[current]
        result.pins[file.unique] = old.uidl
        owners[old.uidl] = file.unique
        result.matches.append(Match(old, file, "replaced" if clashes else "new", "; ".join(clashes + notes)))
    result.remote_unmatched.sort(key=lambda m: m.number)
    result.local_unmatched.sort(key=lambda m: m.file)
    return result


# -- one user, all users -----------------------------------------------------------------


@dataclass
class UserReport:
    """What the import did (or would do) for one user."""

    user: str
    result: MatchResult | None = None
    error: str | None = None
    saved: bool = False
    """Whether the pins were written (never in a dry run, nor when nothing changed)."""

    def lines(self, *, dry_run: bool = False) -> list[str]:
        """The report, one line a message, then a summary line."""
        if self.error is not None or self.result is None:
            return [f"{self.user}: error: {self.error}"]
        r = self.result
        out: list[str] = []
        labels = {"new": "pin", "pinned": "already pinned", "replaced": "replace", "conflict": "conflict"}
        for m in r.matches:
            text = f"{self.user}: {labels[m.status]}: {m.remote.number} {m.remote.uidl} -> {m.local.file}"
            if m.note:
                text += f" ({m.note}{'' if m.status != 'conflict' else '; --replace to change it'})"
            out.append(text)
        for group in r.ambiguous:
            remote = ", ".join(f"{m.number} {m.uidl}" for m in group.remote)
            local = ", ".join(m.file for m in group.local)
            out.append(
                f"{self.user}: ambiguous: {len(group.remote)} on the server ({remote}) "
                f"and {len(group.local)} here ({local}) have the same content"
            )
        for message in r.remote_unmatched:
            out.append(f"{self.user}: not here: {message.number} {message.uidl} ({message.size} octets on the server)")
        for file in r.local_unmatched:
            out.append(f"{self.user}: not on the server: {file.file}")
        for refused in r.refused:
            out.append(f"{self.user}: refused: {refused.remote.number} {refused.remote.uidl!r}: {refused.why}")
        counts = Counter(m.status for m in r.matches)
        verb = "would pin" if dry_run else "pinned"
        summary = (
            f"{self.user}: {verb} {counts['new'] + counts['replaced']}, already pinned {counts['pinned']}, "
            f"conflicts {counts['conflict']}, ambiguous {sum(len(g.remote) for g in r.ambiguous)}, "
            f"not here {len(r.remote_unmatched)}, not on the server {len(r.local_unmatched)}, "
            f"refused {len(r.refused)}"
        )
        out.append(summary)
        return out


async def import_user(
    source: Source,
    user: str,
    password: str,
    mail_root: Path,
    *,
    dry_run: bool = False,
    replace: bool = False,
) -> UserReport:
    """Import the UIDLs of ``user``'s messages on ``source`` into ``mail_root/user``; never raises for the user."""
    report = UserReport(user)
    maildir = mail_root / user
    if maildir.is_symlink() or not maildir.is_dir():
        report.error = f"no Maildir {maildir}"
        return report
    try:
        pins = await trio.to_thread.run_sync(uidl_pins.load, maildir)  # a damaged file stops us early
        remote = await fetch_remote(source, user, password)
        local = await trio.to_thread.run_sync(local_messages, maildir)
        report.result = match(remote, local, pins, replace=replace)
        if not dry_run and report.result.changed:
            await trio.to_thread.run_sync(uidl_pins.save, maildir, report.result.pins)
            report.saved = True
    except RemoteError as exc:
        report.error = str(exc)
    except (Pop3dError, OSError, ValueError, uidl_pins.MaildirLocked) as exc:
        report.error = _why(exc) if isinstance(exc, OSError) else " ".join(str(exc).split())
        if isinstance(exc, OSError) and exc.filename:
            report.error = f"{exc.filename}: {report.error}"
    return report


async def run_import(
    source: Source,
    credentials: Mapping[str, str],
    mail_root: Path,
    *,
    users: Iterable[str] | None = None,
    dry_run: bool = False,
    replace: bool = False,
    progress: Callable[[UserReport], object] | None = None,
) -> list[UserReport]:
    """:func:`import_user` for each user of ``credentials`` (or only ``users``), one after the other.

    ``progress`` is called with each report as it is done.  A user in
    ``users`` without credentials gets a report with an error.
    """
    names = list(credentials) if users is None else list(dict.fromkeys(users))
    reports = []
    for name in names:
        password = credentials.get(name)
        if password is None:
            report = UserReport(name, error="no credentials for this user")
        else:
            report = await import_user(source, name, password, mail_root, dry_run=dry_run, replace=replace)
        reports.append(report)
        if progress is not None:
            progress(report)
    return reports
