"""The POP3 protocol engine (RFC 1939, RFC 2449): bytes in, events out.

:class:`POP3Connection` does no I/O and knows no callbacks.  The caller feeds
it the client's bytes with :meth:`~POP3Connection.receive_data`, takes events
with :meth:`~POP3Connection.next_event`, and sends whatever
:meth:`~POP3Connection.data_to_send` returns.

Commands the engine can answer from what it knows (STAT, LIST, DELE, RSET,
NOOP, USER, CAPA, QUIT before login, the steps of a SASL exchange, and every
command that is malformed or illegal in the current state) are answered by
the engine itself and produce no event.  Commands that need the mailbox, the
user database or the TLS layer produce an event, and the caller answers
through the matching method:

========================  ==================================================
event                     the caller answers with
========================  ==================================================
:class:`StartTLS`         the TLS handshake, then
                          :meth:`~POP3Connection.tls_started`
:class:`Authenticate`     :meth:`~POP3Connection.login_succeeded` or
                          :meth:`~POP3Connection.login_failed`
:class:`LoginRejected`    :meth:`~POP3Connection.login_failed`, after the
                          same delay as for a wrong password
:class:`Retrieve`         :meth:`~POP3Connection.start_message`, the
                          message's chunks with
                          :meth:`~POP3Connection.message_data`, then
                          :meth:`~POP3Connection.end_message`
:class:`ListUids`         :meth:`~POP3Connection.send_uids`
:class:`Update`           :meth:`~POP3Connection.update_finished`
:class:`Closed`           nothing: flush, then close the connection
========================  ==================================================

Any of the answers may instead be :meth:`~POP3Connection.command_failed`,
which sends ``-ERR [SYS/TEMP]`` and leaves the state as it was (a failed
handshake has no answer: the caller closes the connection).

The engine also knows what the client can still be told.  Once a message
has started (its ``+OK`` is out), or once the caller says that a send was
cut short (:meth:`~POP3Connection.output_interrupted`), no ``-ERR`` line
could be read as one: :meth:`~POP3Connection.close` then ends the session
without a reply, and the caller just hangs up.

Logins that send a password as it is (USER/PASS, APOP, and SASL mechanisms
such as PLAIN) are refused on an unencrypted connection unless the caller
says the client may use them (``cleartext_allowed``, for trusted networks).
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from . import replies
from .credentials import ApopDigest, Credentials, Password, apop_digest
from .message import MessageWriter
from .sasl import MECHANISMS, Challenge, Mechanism, SaslError

__all__ = [
    "NEED_DATA",
    "OUTGOING_LIMIT",
    "PAUSED",
    "Authenticate",
    "Closed",
    "Event",
    "ListUids",
    "LoginFailure",
    "LoginRejected",
    "POP3Connection",
    "Retrieve",
    "StartTLS",
    "State",
    "Update",
    "apop_digest",
    "commands_in",
    "valid_uid",
]

DEFAULT_MAX_LINE = 1024
DEFAULT_MAX_AUTH_FAILURES = 3
MAX_NUMBER_DIGITS = 10
# RFC 5034 puts no limit on an AUTH response line; this one holds any PLAIN
# message with a long user name and password, whatever the command-line limit.
MAX_SASL_LINE = 8192
# Commands that carry a password, or lead to one (USER): refused before TLS
# unless the client may send a password in clear.
_SENDS_PASSWORD = frozenset({"USER", "PASS", "APOP"})


class State(enum.Enum):
    """The session states of RFC 1939 section 3, plus the end of the session."""

    AUTHORIZATION = "auth"
    TRANSACTION = "trans"
    UPDATE = "update"
    CLOSED = "closed"


class Trigger(enum.Enum):
    """What moves a session from one :class:`State` to another."""

    LOGIN = "login accepted"
    QUIT = "QUIT"
    TOO_MANY_FAILURES = "too many failed logins"
    UPDATE_DONE = "deletions applied or failed"
    CLOSE = "timeout, kick, hang-up or error"


#: The engine's state machine: every move it can make, and the only place
#: that says where a move leads (the documentation's diagram is drawn from it).
TRANSITIONS: Mapping[tuple[State, Trigger], State] = {
    (State.AUTHORIZATION, Trigger.LOGIN): State.TRANSACTION,
    (State.AUTHORIZATION, Trigger.QUIT): State.CLOSED,
    (State.AUTHORIZATION, Trigger.TOO_MANY_FAILURES): State.CLOSED,
    (State.AUTHORIZATION, Trigger.CLOSE): State.CLOSED,
    (State.TRANSACTION, Trigger.QUIT): State.UPDATE,
    (State.TRANSACTION, Trigger.CLOSE): State.CLOSED,
    (State.UPDATE, Trigger.UPDATE_DONE): State.CLOSED,
    (State.UPDATE, Trigger.CLOSE): State.CLOSED,
}


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
"""Returned by :meth:`POP3Connection.next_event` when it needs more input."""


class _Paused:
    def __repr__(self) -> str:
        return "PAUSED"


PAUSED = _Paused()
"""Returned by :meth:`POP3Connection.next_event` when replies must be sent first."""

OUTGOING_LIMIT = 65536


class _Skipped:
    pass


_SKIPPED = _Skipped()  # a line too long to take, already answered


@dataclass(frozen=True, kw_only=True)
class Event:
    """Base class of the events that need the caller's action."""


@dataclass(frozen=True, kw_only=True)
class StartTLS(Event):
    """STLS was accepted (``+OK`` is queued): send it, then do the TLS handshake."""


@dataclass(frozen=True, kw_only=True)
class Authenticate(Event):
    """PASS, APOP or a finished AUTH: check the credentials, then lock the maildrop.

    ``mechanism`` is ``user``, ``apop`` or a SASL mechanism in lower case
    (``plain``, ``login``).  Check with ``credentials.matches(password)``
    against a plain stored password, or a hash against
    ``credentials.password`` (``None`` for challenge-response mechanisms).
    """

    mechanism: str
    credentials: Credentials  # its repr shows the user, never the secret

    @property
    def user(self) -> str:
        """The user the client claims to be."""
        return self.credentials.user


@dataclass(frozen=True, kw_only=True)
class LoginRejected(Event):
    """An AUTH exchange the engine rejected itself (not base64, a malformed message).

    A failed login like a wrong password: the caller counts and logs it,
    waits as it would for a wrong password, then calls
    :meth:`POP3Connection.login_failed` (which sends ``reason``).
    """

    mechanism: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class Retrieve(Event):
    """RETR (``body_lines is None``) or TOP of a message that exists and is not deleted."""

    msg: int
    body_lines: int | None = None


@dataclass(frozen=True, kw_only=True)
class ListUids(Event):
    """UIDL: the caller fetches the unique ids of ``msgs``."""

    msgs: tuple[int, ...]
    single: bool


@dataclass(frozen=True, kw_only=True)
class Update(Event):
    """QUIT in TRANSACTION: delete ``deleted`` (may be empty), then answer."""

    deleted: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class Closed(Event):
    """The session is over: send what is left, then close the connection."""


class LoginFailure(enum.Enum):
    """Why a login failed, which decides the reply and its response code."""

    BAD_CREDENTIALS = replies.AUTH_FAILED
    IN_USE = replies.MAILDROP_LOCKED
    USER_CONNECTIONS = replies.TOO_MANY_USER_SESSIONS
    SYS_TEMP = replies.SYS_TEMP
    SYS_PERM = replies.SYS_PERM


def valid_uid(uid: str) -> bool:
    """RFC 1939 section 7: 1 to 70 characters in the range 0x21 to 0x7E."""
    # isascii + isprintable is 0x20 to 0x7E, in C: it runs for every entry of a mailbox's index.
    return 1 <= len(uid) <= 70 and uid.isascii() and uid.isprintable() and " " not in uid


class _BadArguments(Exception):
    pass


def _number(text: str, *, minimum: int) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > MAX_NUMBER_DIGITS:
        raise _BadArguments
    value = int(text)
    if value < minimum:
        raise _BadArguments
    return value


def _base64(text: str) -> bytes:
    """A SASL response decoded; ``=`` (and an empty line) is the empty response (RFC 5034)."""
    text = text.strip()
    if text == "=":
        return b""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except UnicodeEncodeError:
        raise binascii.Error("not ASCII") from None


def _printable(text: str, limit: int = 40) -> str:
    """A client's word made safe to echo back in a reply."""
    cleaned = "".join(c if "\x21" <= c <= "\x7e" else "?" for c in text[:limit])
    return cleaned + ("..." if len(text) > limit else "")


class POP3Connection:
    """One POP3 session's protocol state, driven by its caller.

    ``challenge`` is the APOP timestamp sent in the greeting.
    ``implementation`` is CAPA's ``IMPLEMENTATION`` (none if ``None``).
    ``max_line`` bounds a command line (CRLF included); a longer one is
    answered with ``-ERR`` and skipped without being buffered.  After
    ``max_auth_failures`` failed logins the session is closed.
    ``on_command`` is called with the keyword of each known command (for
    statistics).  With ``apop=False`` the greeting carries no challenge and
    APOP is refused (for user databases that store password hashes).

    TLS: ``encrypted`` says the connection is encrypted from the start
    (POP3S); ``tls_available`` offers STLS until it is.  Until then, logins
    that send a password are refused unless ``cleartext_allowed`` (the
    client is on a trusted network).  ``mechanisms`` are the SASL
    mechanisms AUTH offers.
    """

    # Slots: thousands of idle sessions each hold one of these.
    __slots__ = (
        "_awaiting",
        "_buffer",
        "_discarding",
        "_mechanisms",
        "_on_command",
        "_outgoing",
        "_outgoing_size",
        "_output_broken",
        "_rejection",
        "_sasl",
        "_scanned",
        "_start",
        "_total",
        "_writer",
        "apop",
        "auth_failures",
        "challenge",
        "cleartext_allowed",
        "deleted",
        "encrypted",
        "implementation",
        "max_auth_failures",
        "max_line",
        "mechanism",
        "sizes",
        "state",
        "tls_available",
        "user",
    )

    def __init__(
        self,
        *,
        challenge: str,
        implementation: str | None = None,
        max_line: int = DEFAULT_MAX_LINE,
        max_auth_failures: int = DEFAULT_MAX_AUTH_FAILURES,
        on_command: Callable[[str], None] | None = None,
        apop: bool = True,
        encrypted: bool = False,
        tls_available: bool = False,
        cleartext_allowed: bool = False,
        mechanisms: Sequence[type[Mechanism]] = MECHANISMS,
    ) -> None:
        self.challenge = challenge
        self.implementation = implementation
        self.max_line = max_line
        self.max_auth_failures = max_auth_failures
        self._on_command = on_command
        self.apop = apop
        #: Whether the connection is encrypted (POP3S, or after STLS).
        self.encrypted = encrypted
        self.tls_available = tls_available
        self.cleartext_allowed = cleartext_allowed
        self._mechanisms = _mechanism_table(tuple(mechanisms))
        self._sasl: Mechanism | None = None  # the AUTH exchange in progress
        self._rejection: str | None = None  # the reply to a pending LoginRejected
        self.state = State.AUTHORIZATION
        #: The login mechanism the client chose: ``""``, ``"user"``, ``"apop"``
        #: or a SASL mechanism in lower case.
        self.mechanism = ""
        #: The user name given with USER or APOP.
        self.user = ""
        self.auth_failures = 0
        #: Octets of each message, taken at login; message n is ``sizes[n-1]``.
        self.sizes: tuple[int, ...] = ()
        self._total = 0  # sum(sizes), for STAT and LIST of a huge maildrop
        #: Message numbers marked for deletion.
        self.deleted: set[int] = set()
        self._buffer = bytearray()
        self._start = 0  # where the next line begins in _buffer
        self._scanned = 0  # _buffer before this was searched for LF already
        self._discarding = False  # skipping the rest of an over-long line
        # Replies waiting to be sent, kept as parts so that a message's chunks are not copied.
        self._outgoing: list[bytes] = []
        self._outgoing_size = 0
        self._output_broken = False  # part of a reply went out and the rest never will
        self._writer: MessageWriter | None = None  # the RETR or TOP body in progress
        self._awaiting: type[Event] | None = None

    # -- input ----------------------------------------------------------

    def greeting(self, host: str) -> bytes:
        """The greeting line, carrying the APOP challenge when APOP is enabled."""
        if not self.apop:
            return replies.ok(replies.GREETING_NO_APOP.format(host=host))
        return replies.ok(replies.GREETING.format(host=host, challenge=self.challenge))

    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed bytes received from the client (``b""`` is ignored).

        Not while a :class:`StartTLS` is pending: bytes from before the
        handshake must never be taken for commands (``RuntimeError``).
        """
        if self._awaiting is StartTLS:
            raise RuntimeError("bytes received before the TLS handshake are not commands: answer StartTLS first")
        if self.state is State.CLOSED:
            self._drop_partial_line()  # nothing after QUIT is executed, or kept
            return
        if self._start:
            # Drop the lines already handled once per read, not once per line.
            del self._buffer[: self._start]
            self._scanned -= self._start
            self._start = 0
        self._buffer += data

    def next_event(self) -> Event | _NeedData | _Paused:
        """Process buffered command lines until one needs the caller.

        Returns an :class:`Event`, :data:`NEED_DATA` when every complete
        line has been handled, or :data:`PAUSED` when the replies waiting in
        :meth:`data_to_send` have reached :data:`OUTGOING_LIMIT` (send them,
        then call again: a client that pipelines faster than it reads gets
        back-pressure instead of an ever-growing buffer).
        """
        if self._awaiting is not None:
            raise RuntimeError(f"answer the pending {self._awaiting.__name__} first")
        while self.state is not State.CLOSED:
            if self._outgoing_size >= OUTGOING_LIMIT:
                return PAUSED
            line = self._next_line()
            if line is None:
                return NEED_DATA
            if isinstance(line, _Skipped):
                continue  # answered "line too long"; the outgoing limit is checked again first
            event = self._dispatch(line)
            if event is not None:
                if not isinstance(event, Closed):
                    self._awaiting = type(event)
                return event
        self._drop_partial_line()  # what came after QUIT will never be read
        return Closed()

    def data_to_send(self) -> bytes:
        """Replies ready for the client; empties the outgoing buffer.

        Nothing after :meth:`output_interrupted`: the client could not tell
        it from the reply that was cut.
        """
        out = b"".join(self._outgoing)  # one part is returned as it is, not copied
        self._outgoing.clear()
        self._outgoing_size = 0
        return b"" if self._output_broken else out

    @property
    def bytes_pending(self) -> int:
        """How many bytes :meth:`data_to_send` would return now."""
        return self._outgoing_size

    def output_interrupted(self) -> None:
        """The caller could not send all it took from :meth:`data_to_send` (a cancel, a timeout).

        The client has part of a reply: nothing more is sent, and the
        session can only end (:meth:`close`).
        """
        self._output_broken = True

    def _next_line(self) -> str | _Skipped | None:
        """The next complete line; :data:`_SKIPPED` for one too long (answered); None for none yet."""
        while True:
            end = self._buffer.find(b"\n", max(self._scanned, self._start))
            if end < 0:
                if self._discarding:
                    self._drop_partial_line()
                elif len(self._buffer) - self._start > self._line_limit():
                    self._drop_partial_line()
                    self._discarding = True
                    self._line_too_long()
                else:
                    self._scanned = len(self._buffer)
                return None
            raw = bytes(self._buffer[self._start : end])
            length = end + 1 - self._start
            self._start = self._scanned = end + 1
            if self._discarding:
                self._discarding = False
                continue
            if length > self._line_limit():
                self._line_too_long()
                return _SKIPPED
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            return raw.decode("utf-8", "surrogateescape")

    def _drop_partial_line(self) -> None:
        self._buffer.clear()
        self._start = self._scanned = 0

    def _line_limit(self) -> int:
        return max(self.max_line, MAX_SASL_LINE) if self._sasl is not None else self.max_line

    def _line_too_long(self) -> None:
        limit = self._line_limit()
        self._sasl = None  # the -ERR ends an AUTH exchange, too
        self._reply(replies.err(replies.LINE_TOO_LONG.format(limit=limit)))

    def _dispatch(self, line: str) -> Event | None:
        if self._sasl is not None:
            return self._sasl_response(line)
        keyword, _, rest = line.partition(" ")
        # Keywords are ASCII (RFC 1939): str.upper() would turn a long s (U+017F) into an S.
        keyword = keyword.upper() if keyword.isascii() else keyword
        if self._on_command is not None and keyword in _KNOWN:
            self._on_command(keyword)
        handler = _COMMANDS.get(self.state, {}).get(keyword)
        if handler is None:
            if keyword not in _KNOWN:
                text = replies.UNKNOWN_COMMAND.format(command=_printable(keyword))
            elif self.state is State.AUTHORIZATION:
                text = replies.NOT_AUTHENTICATED
            else:
                text = replies.ALREADY_AUTHENTICATED
            self._reply(replies.err(text))
            return None
        if keyword in _SENDS_PASSWORD and self._refuse_cleartext():
            return None  # before the arguments are even looked at
        try:
            # Arguments are separated by spaces; other (Unicode) white space is part of them.
            return handler(self, [arg for arg in rest.split(" ") if arg], rest)
        except _BadArguments:
            self._reply(replies.err(replies.BAD_ARGUMENTS.format(usage=replies.USAGE[keyword])))
            return None

    def _reply(self, data: bytes) -> None:
        if data:
            self._outgoing.append(data)
            self._outgoing_size += len(data)

    def _answered(self, *event_types: type[Event]) -> None:
        if self._awaiting not in event_types:
            raise RuntimeError(f"no pending {' or '.join(t.__name__ for t in event_types)} to answer")
        self._awaiting = None

    # -- cleartext and TLS ------------------------------------------------

    @property
    def cleartext_ok(self) -> bool:
        """Whether a password may cross this connection now (encrypted, or a trusted client)."""
        return self.encrypted or self.cleartext_allowed

    def _refuse_cleartext(self) -> bool:
        """Refuse a login that sends a password, if it may not; True if refused."""
        if self.cleartext_ok:
            return False
        stls = self.tls_available and not self.encrypted
        self._reply(replies.err(replies.CLEARTEXT_USE_STLS if stls else replies.CLEARTEXT_NO_TLS))
        return True

    def _stls(self, args: list[str], rest: str) -> Event | None:
        if args:
            raise _BadArguments
        if self.encrypted:
            self._reply(replies.err(replies.STLS_ACTIVE))
            return None
        if not self.tls_available:
            self._reply(replies.err(replies.STLS_UNAVAILABLE))
            return None
        self._reply(replies.ok(replies.STLS_BEGIN))
        # Whatever came after STLS came in clear, before the handshake: a
        # man in the middle could have put it there (CVE-2011-0411).
        self._drop_partial_line()
        self._discarding = False
        return StartTLS()

    def tls_started(self) -> None:
        """The TLS handshake after STLS succeeded: the session starts afresh, encrypted.

        What the client said before (a USER name, the login mechanism) is
        forgotten (RFC 2595 section 4); failed logins still count.
        """
        self._answered(StartTLS)
        self._drop_partial_line()  # nothing from before the handshake, whoever fed it
        self._discarding = False
        self.encrypted = True
        self.user = ""
        self.mechanism = ""

    # -- AUTH (SASL) ----------------------------------------------------

    def _offered_mechanisms(self) -> list[str]:
        return [name for name, mech in self._mechanisms.items() if self.cleartext_ok or not mech.sends_password]

    def _auth(self, args: list[str], rest: str) -> Event | None:
        if not args:
            # Not in RFC 5034, but Outlook sends a bare AUTH to list the mechanisms.
            self._reply(replies.multiline(replies.AUTH_MECHANISMS, self._offered_mechanisms()))
            return None
        if len(args) > 2:
            raise _BadArguments
        mechanism = self._mechanisms.get(args[0].upper())
        if mechanism is None:
            self._reply(replies.err(replies.AUTH_UNKNOWN_MECHANISM.format(mechanism=_printable(args[0]))))
            return None
        if mechanism.sends_password and self._refuse_cleartext():
            return None  # before the initial response is even decoded
        if self.mechanism == "user":
            self.user = ""  # a USER without its PASS is abandoned
        self._sasl = mechanism()
        return self._sasl_step(args[1] if len(args) == 2 else None)

    def _sasl_response(self, line: str) -> Event | None:
        if line.strip() == "*":
            self._sasl = None
            self._reply(replies.err(replies.AUTH_CANCELLED))
            return None
        return self._sasl_step(line)

    def _sasl_step(self, text: str | None) -> Event | None:
        """Feed the client's response (base64; None: no initial response) to the exchange."""
        mechanism = self._sasl
        assert mechanism is not None
        try:
            result = mechanism.step(None if text is None else _base64(text))
        except binascii.Error:
            return self._reject(mechanism, replies.AUTH_BAD_BASE64)
        except SaslError as exc:
            return self._reject(mechanism, replies.AUTH_REJECTED.format(reason=exc))
        if isinstance(result, Challenge):
            self._reply(replies.challenge(base64.b64encode(result.data).decode("ascii")))
            return None
        self._sasl = None
        # The mechanism counts as chosen once it has credentials, so that a
        # cancelled AUTH does not lift the USER/APOP rule.
        self.mechanism = mechanism.name.lower()
        self.user = result.user
        return Authenticate(mechanism=self.mechanism, credentials=result)

    def _reject(self, mechanism: Mechanism, text: str) -> LoginRejected:
        self._sasl = None
        self._rejection = text
        return LoginRejected(mechanism=mechanism.name.lower(), reason=text)

    # -- USER, PASS, APOP -----------------------------------------------

    def _user(self, args: list[str], rest: str) -> None:
        if len(args) != 1:
            raise _BadArguments
        if self.mechanism == "apop":
            self._reply(replies.err(replies.MECHANISM_APOP_CHOSEN))
            return
        self.mechanism = "user"
        self.user = args[0]
        self._reply(replies.ok(replies.USER_ACCEPTED))

    def _pass(self, args: list[str], rest: str) -> Event | None:
        # The password is the rest of the line: it may hold spaces (RFC 1939 section 7).
        if not rest:
            raise _BadArguments
        if self.mechanism != "user" or not self.user:
            self._reply(replies.err(replies.PASS_WITHOUT_USER))
            return None
        return Authenticate(mechanism="user", credentials=Password(user=self.user, secret=rest))

    def _apop(self, args: list[str], rest: str) -> Event | None:
        if len(args) != 2:
            raise _BadArguments
        if not self.apop:
            self._reply(replies.err(replies.APOP_DISABLED))
            return None
        if self.mechanism == "user":
            self._reply(replies.err(replies.MECHANISM_USER_CHOSEN))
            return None
        self.mechanism = "apop"
        self.user = args[0]
        credentials = ApopDigest(user=args[0], challenge=self.challenge, digest=args[1].lower())
        return Authenticate(mechanism="apop", credentials=credentials)

    def login_succeeded(self, sizes: Sequence[int]) -> None:
        """The login was good and the maildrop is locked; ``sizes`` per message."""
        self._answered(Authenticate)
        self.sizes = tuple(sizes)
        self._total = sum(self.sizes)
        self.deleted = set()
        self._move(Trigger.LOGIN)
        self._reply(replies.ok(replies.LOGGED_IN.format(count=len(self.sizes), octets=self._total)))

    @property
    def maildrop_octets(self) -> int:
        """Octets in the maildrop as taken at login (deletions not subtracted)."""
        return self._total

    def login_failed(self, reason: LoginFailure) -> None:
        """The login failed; the session stays in AUTHORIZATION (or ends, after too many).

        Answers :class:`Authenticate` and :class:`LoginRejected` alike; a
        rejected exchange gets its own reason as the reply.
        """
        self._answered(Authenticate, LoginRejected)
        rejection, self._rejection = self._rejection, None
        self._forget_user()
        if reason is not LoginFailure.BAD_CREDENTIALS:
            self._reply(replies.err(reason.value))
            return
        self._auth_failure(rejection or reason.value)

    def _forget_user(self) -> None:
        if self.mechanism != "apop":
            self.user = ""  # a new USER (or AUTH) is needed (RFC 1939 section 7)

    def _auth_failure(self, text: str) -> None:
        """A failed login: ``-ERR text``, or the end of the session after too many."""
        self.auth_failures += 1
        if self.auth_failures >= self.max_auth_failures:
            self._reply(replies.err(replies.AUTH_TOO_MANY))
            self._move(Trigger.TOO_MANY_FAILURES)
        else:
            self._reply(replies.err(text))

    # -- TRANSACTION ----------------------------------------------------

    def _message(self, text: str) -> int | None:
        """A message number argument; replies and returns None if it is not usable."""
        msg = _number(text, minimum=1)
        if msg > len(self.sizes):
            self._reply(replies.err(replies.NO_SUCH_MESSAGE))
            return None
        if msg in self.deleted:
            self._reply(replies.err(replies.MESSAGE_DELETED.format(msg=msg)))
            return None
        return msg

    def _live(self) -> list[int]:
        return [n for n in range(1, len(self.sizes) + 1) if n not in self.deleted]

    def _live_octets(self) -> int:
        return self._total - sum(self.sizes[n - 1] for n in self.deleted)

    def _stat(self, args: list[str], rest: str) -> None:
        if args:
            raise _BadArguments
        count = len(self.sizes) - len(self.deleted)
        self._reply(replies.ok(replies.STAT.format(count=count, octets=self._live_octets())))

    def _list(self, args: list[str], rest: str) -> None:
        if len(args) > 1:
            raise _BadArguments
        if args:
            msg = self._message(args[0])
            if msg is not None:
                self._reply(replies.ok(replies.LIST_ONE.format(msg=msg, octets=self.sizes[msg - 1])))
            return
        live = self._live()
        lines = [replies.ok(replies.LIST_ALL.format(count=len(live), octets=self._live_octets()))]
        lines += [b"%d %d\r\n" % (n, self.sizes[n - 1]) for n in live]
        lines.append(b".\r\n")
        self._reply(b"".join(lines))

    def _retr(self, args: list[str], rest: str) -> Event | None:
        if len(args) != 1:
            raise _BadArguments
        msg = self._message(args[0])
        return None if msg is None else Retrieve(msg=msg)

    def _top(self, args: list[str], rest: str) -> Event | None:
        if len(args) != 2:
            raise _BadArguments
        lines = _number(args[1], minimum=0)
        msg = self._message(args[0])
        return None if msg is None else Retrieve(msg=msg, body_lines=lines)

    def start_message(self, event: Retrieve) -> None:
        """Queue the ``+OK`` line of a RETR or TOP: the message is now in progress.

        Give its stored bytes, chunk by chunk, to :meth:`message_data`, then
        call :meth:`end_message`; send :meth:`data_to_send` whenever
        :attr:`bytes_pending` is as much as you like to send at once.
        """
        self._answered(Retrieve)
        if event.body_lines is None:
            self._reply(replies.ok(replies.RETR.format(octets=self.sizes[event.msg - 1])))
        else:
            self._reply(replies.ok(replies.TOP))
        self._writer = MessageWriter(event.body_lines)

    def message_data(self, chunk: bytes) -> bool:
        """Add the next chunk of the message in progress (as stored: LF or CRLF line ends).

        Returns whether more is wanted: ``False`` once TOP has its lines,
        when the caller may stop reading.
        """
        if self._writer is None:
            raise RuntimeError("no message in progress: start_message() first")
        self._reply(self._writer.feed(chunk))
        return not self._writer.done

    def end_message(self) -> None:
        """The message in progress is complete: queue its end (``.``)."""
        if self._writer is None:
            raise RuntimeError("no message in progress: start_message() first")
        self._reply(self._writer.finish())
        self._writer = None

    @property
    def message_in_progress(self) -> bool:
        """Whether a RETR or TOP body has started and not ended."""
        return self._writer is not None

    def _dele(self, args: list[str], rest: str) -> None:
        if len(args) != 1:
            raise _BadArguments
        msg = self._message(args[0])
        if msg is not None:
            self.deleted.add(msg)
            self._reply(replies.ok(replies.DELE.format(msg=msg)))

    def _noop(self, args: list[str], rest: str) -> None:
        if args:
            raise _BadArguments
        self._reply(replies.ok(replies.NOOP))

    def _rset(self, args: list[str], rest: str) -> None:
        if args:
            raise _BadArguments
        self.deleted.clear()
        self._reply(replies.ok(replies.RSET.format(count=len(self.sizes), octets=self._total)))

    def _uidl(self, args: list[str], rest: str) -> Event | None:
        if len(args) > 1:
            raise _BadArguments
        if args:
            msg = self._message(args[0])
            return None if msg is None else ListUids(msgs=(msg,), single=True)
        return ListUids(msgs=tuple(self._live()), single=False)

    def send_uids(self, event: ListUids, uids: Mapping[int, str]) -> None:
        """Answer UIDL with the unique id of each message of ``event``.

        A missing or malformed id raises ``ValueError`` and leaves the event
        pending, so that the caller can still answer it with
        :meth:`command_failed`.
        """
        for msg in event.msgs:
            if not valid_uid(uids.get(msg, "")):
                raise ValueError(f"unique id of message {msg} breaks RFC 1939: {uids.get(msg)!r}")
        self._answered(ListUids)
        if event.single:
            msg = event.msgs[0]
            self._reply(replies.ok(replies.UIDL_ONE.format(msg=msg, uid=uids[msg])))
            return
        lines = [replies.ok(replies.UIDL_ALL)]
        lines += [f"{n} {uids[n]}\r\n".encode() for n in event.msgs]
        lines.append(b".\r\n")
        self._reply(b"".join(lines))

    # -- any state ------------------------------------------------------

    def _capa(self, args: list[str], rest: str) -> None:
        if args:
            raise _BadArguments
        self._reply(replies.multiline(replies.CAPA, self.capabilities()))

    def capabilities(self) -> list[str]:
        """The CAPA lines now (RFC 2449).  They change with TLS (RFC 2595 section 4).

        ``STLS`` while TLS can still start; ``USER`` and the SASL mechanisms
        that send a password only where a password may be sent now.
        """
        lines = ["TOP", "UIDL"]
        if self.tls_available and not self.encrypted:
            lines.append("STLS")
        if self.cleartext_ok:
            lines.append("USER")
        if mechanisms := self._offered_mechanisms():
            lines.append("SASL " + " ".join(mechanisms))
        lines += ["RESP-CODES", "PIPELINING", "AUTH-RESP-CODE", "EXPIRE NEVER"]
        if self.implementation:
            lines.append(f"IMPLEMENTATION {self.implementation}")
        return lines

    def _quit(self, args: list[str], rest: str) -> Event:
        if args:
            raise _BadArguments
        if self.state is State.TRANSACTION:
            self._move(Trigger.QUIT)
            return Update(deleted=tuple(sorted(self.deleted)))
        self._reply(replies.ok(replies.QUIT_AUTHORIZATION))
        self._move(Trigger.QUIT)
        return Closed()

    def update_finished(self, ok: bool) -> None:
        """The deletions of UPDATE were applied (``ok``) or failed; ends the session."""
        self._answered(Update)
        if ok:
            left = len(self.sizes) - len(self.deleted)
            self._reply(replies.ok(replies.QUIT_UPDATE.format(count=left)))
        else:
            self._reply(replies.err(replies.SYS_TEMP_UPDATE))
        self._move(Trigger.UPDATE_DONE)

    def command_failed(self, event: Event, *, permanent: bool = False) -> None:
        """The caller could not answer ``event`` (storage failed): ``-ERR [SYS/TEMP]``.

        ``permanent``: the fault will not mend by itself, ``-ERR [SYS/PERM]``
        (RFC 3206).  For :class:`Update` this ends the session like
        :meth:`update_finished` with ``ok=False``.
        """
        if isinstance(event, Update):
            self.update_finished(False)
            return
        self._answered(type(event))
        self._rejection = None
        if isinstance(event, Authenticate | LoginRejected):
            self._forget_user()
        self._reply(replies.err(replies.SYS_PERM if permanent else replies.SYS_TEMP))

    def close(self, reply: str | None = None) -> None:
        """End the session from the server's side, with an optional ``-ERR`` reply.

        In the middle of a message, or after :meth:`output_interrupted`, no
        reply is sent: the client would read it as part of the message.
        """
        if self._writer is not None:
            self._output_broken = True  # a message cut short can only be followed by the hang-up
            self._writer = None
        if reply is not None and self.state is not State.CLOSED:
            self._reply(replies.err(reply))
        self._awaiting = None
        self._sasl = None
        if self.state is not State.CLOSED:
            self._move(Trigger.CLOSE)

    def _move(self, trigger: Trigger) -> None:
        self.state = TRANSITIONS[self.state, trigger]


@functools.cache
def _mechanism_table(mechanisms: tuple[type[Mechanism], ...]) -> dict[str, type[Mechanism]]:
    # Shared by the connections of a server, never changed.
    return {mechanism.name.upper(): mechanism for mechanism in mechanisms}


# The commands of each state, shared by every connection (a table per
# connection would cost each idle session a few kB).
_Handler = Callable[[POP3Connection, list[str], str], Event | None]
_COMMANDS: dict[State, dict[str, _Handler]] = {
    State.AUTHORIZATION: {
        "USER": POP3Connection._user,
        "PASS": POP3Connection._pass,
        "APOP": POP3Connection._apop,
        "AUTH": POP3Connection._auth,
        "STLS": POP3Connection._stls,
        "QUIT": POP3Connection._quit,
        "CAPA": POP3Connection._capa,
    },
    State.TRANSACTION: {
        "STAT": POP3Connection._stat,
        "LIST": POP3Connection._list,
        "RETR": POP3Connection._retr,
        "DELE": POP3Connection._dele,
        "NOOP": POP3Connection._noop,
        "RSET": POP3Connection._rset,
        "QUIT": POP3Connection._quit,
        "TOP": POP3Connection._top,
        "UIDL": POP3Connection._uidl,
        "CAPA": POP3Connection._capa,
    },
}
_KNOWN = frozenset(name for table in _COMMANDS.values() for name in table)


def commands_in(state: State) -> tuple[str, ...]:
    """The commands the engine accepts in ``state``, in the order it lists them (none once closed)."""
    return tuple(_COMMANDS.get(state, {}))
