"""One client connection: a thin Trio layer over the protocol engine.

:class:`Session` moves bytes between a Trio stream and a
:class:`~pop3d.protocol.POP3Connection`, and answers the engine's events by
calling the server's ``auth`` and ``storage`` callbacks.  Every POP3 rule
lives in the engine; what lives here is I/O (the TLS handshake among it),
timeouts, and making sure that a failure ends with the lock released and
nothing deleted.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import trio

from . import proxy, replies
from .callbacks import (
    Auth,
    HashedPassword,
    MailboxUnavailable,
    MessageData,
    Storage,
    TemporarilyUnavailable,
    iterate_message,
    read_listing,
)
from .changes import notify
from .credentials import Credentials
from .login_slots import LoginSlots
from .mailbox_locks import Holder, LockServiceUnavailable, MailboxLock, MailboxLocks
from .networks import Network, address_in
from .penalties import PenaltyBox
from .protocol import (
    NEED_DATA,
    PAUSED,
    Authenticate,
    Closed,
    Event,
    ListUids,
    LoginFailure,
    LoginRejected,
    POP3Connection,
    Retrieve,
    StartTLS,
    State,
    Update,
)
from .stats import ServerStats

__all__ = ["Session", "SessionSettings"]

log = logging.getLogger("pop3d.session")

RECEIVE_SIZE = 65536
SEND_BATCH = 65536
# Unlocking and closing must finish even while the session is being cancelled,
# but not hang: a kill of the server waits for them.
UNLOCK_TIMEOUT = 0.5
# How long a last "-ERR ..." or a TLS close_notify may take: the client may not be reading.
CLOSING_SEND_TIMEOUT = 1.0
# A reason sent as "-ERR reason" stays one short line.
MAX_REASON = 200
# A TLS handshake is a few round trips; a client that stalls in it holds a connection.
HANDSHAKE_TIMEOUT = 30.0


@dataclass(frozen=True, kw_only=True)
class SessionSettings:
    """What a session takes from its server's options when it starts."""

    server: str
    hostname: str
    auth: Auth | None
    storage: Storage | None
    implementation: str
    idle_timeout: float
    max_line: int
    max_auth_failures: int
    login_failure_delay: float
    apop: bool
    stats: ServerStats
    #: The server's TLS context when the session starts (a later reload does not change it).
    tls_context: ssl.SSLContext | None = None
    #: TLS from the first byte (POP3S) rather than STLS.
    implicit_tls: bool = False
    #: Client networks where a password may cross an unencrypted connection.
    cleartext_auth_from: tuple[Network, ...] = ()
    #: Seconds from connecting to logging in; 0: no limit but the idle timeout.
    login_timeout: float = 0.0
    #: Failed-login penalties, shared with other sessions (None: no penalties).
    penalties: PenaltyBox | None = None
    #: Logged-in sessions per user and address at most (0: no limit), counted by ``sessions_of``.
    max_userip_connections: int = 0
    sessions_of: Callable[[str, str], int] | None = None
    #: Told the connection id of each session that logs in (the server's connection table).
    on_login: Callable[[str], None] | None = None
    #: Login attempts in progress per address (shared by the server's sessions).
    login_slots: LoginSlots = field(default_factory=lambda: LoginSlots(0))
    #: A cluster-wide lock service, taken before the storage's lock (None: the storage's lock only).
    mailbox_locks: MailboxLocks | None = None

    def __post_init__(self) -> None:
        if self.implicit_tls and self.tls_context is None:
            raise ValueError("implicit_tls needs a tls_context")  # never fall back to plain text


class _ConnectionLost(Exception):
    """The client went away, or the session cannot go on."""


def _challenge(hostname: str) -> str:
    # Unpredictable, so that an APOP digest cannot be replayed (RFC 1939 section 7).
    return f"<{os.getpid()}.{secrets.token_hex(8)}.{int(time.time())}@{hostname}>"


def _printable(text: str) -> str:
    """A client's word made safe for a log line (no control characters)."""
    return "".join(c if c.isprintable() and not c.isspace() else "?" for c in text[:64])


async def _secret_matches(credentials: Credentials, secret: str | HashedPassword) -> bool:
    """Whether ``credentials`` prove the user's stored ``secret``, whatever the mechanism."""
    if isinstance(secret, str):
        return credentials.matches(secret)
    if credentials.password is None:
        return False  # a challenge-response (APOP) needs the plain password, which a hash cannot give
    return await secret.verify(credentials.password)


class Session:
    """A POP3 session on ``stream`` with the client at ``peer`` (host, port)."""

    # Slots: thousands of idle sessions each hold one of these.
    __slots__ = (
        "_cancel_scope",
        "_close_reason",
        "_done",
        "_finished",
        "_first_data",
        "_kicked",
        "_last_activity",
        "_lock",
        "_login_deadline",
        "_started",
        "_stats",
        "_timeout_reply",
        "_tls_pending",
        "_uids",
        "bytes_sent",
        "commands",
        "conn_id",
        "deleted_count",
        "logging_in",
        "mailbox",
        "peer",
        "protocol",
        "retrieved",
        "settings",
        "storage",
        "stream",
    )

    def __init__(
        self,
        conn_id: str,
        stream: trio.abc.Stream,
        peer: tuple[str, int],
        settings: SessionSettings,
    ) -> None:
        self.conn_id = conn_id
        self.stream = stream
        self.peer = peer
        self.settings = settings
        self.protocol = POP3Connection(
            challenge=_challenge(settings.hostname),
            implementation=settings.implementation,
            max_line=settings.max_line,
            max_auth_failures=settings.max_auth_failures,
            on_command=self._count_command,
            apop=settings.apop,
            # Implicit TLS: encrypted before the greeting, so before any command.
            encrypted=settings.implicit_tls,
            tls_available=settings.tls_context is not None,
            cleartext_allowed=address_in(peer[0], settings.cleartext_auth_from),
        )
        self.mailbox: str | None = None
        self.storage: Storage | None = None  # the storage holding our lock
        self._first_data = True
        #: Whether a login attempt is being checked (or waits its turn): such a session is not evicted.
        self.logging_in = False
        self._login_deadline = trio.current_time() + settings.login_timeout if settings.login_timeout > 0 else math.inf
        self._started = self._last_activity = time.time()
        self.retrieved = 0
        self.bytes_sent = 0
        self.deleted_count = 0
        self.commands = 0
        self._close_reason: str | None = None
        self._kicked = False  # close() was called
        self._lock: MailboxLock | None = None  # the lock service's lock, while held (not the storage's)
        self._timeout_reply = replies.IDLE_TIMEOUT  # what a passed deadline in _receive means
        self._uids: Sequence[str] | None = None  # every message's UIDL, when the storage lists them at login
        # TLS is due (POP3S, or STLS accepted) and not done: a plain "-ERR" (a
        # kick, an error) would reach the client as garbage, so none is sent.
        self._tls_pending = settings.implicit_tls
        self._cancel_scope = trio.CancelScope()
        self._done = False  # the session is over: socket closed, lock released
        self._finished: trio.Event | None = None  # made when first asked for (an empty Event is 400 bytes)
        self._stats = settings.stats
        self._stats.sessions += 1
        notify()

    # -- what the server's connection table sees --------------------------

    @property
    def address(self) -> str:
        """The client's address (the real one, behind a PROXY header)."""
        return self.peer[0]

    @property
    def logged_in(self) -> bool:
        """Whether the session is past AUTHORIZATION (and not over)."""
        return self.protocol.state in (State.TRANSACTION, State.UPDATE)

    @property
    def user(self) -> str:
        """The user name the client gave (USER, APOP or AUTH), or empty."""
        return self.protocol.user

    @property
    def started(self) -> datetime:
        """When the connection came."""
        return datetime.fromtimestamp(self._started, UTC)

    @property
    def last_activity(self) -> datetime:
        """When the client last sent something."""
        return datetime.fromtimestamp(self._last_activity, UTC)

    @property
    def finished(self) -> trio.Event:
        """Set when the session is over: socket closed, lock released."""
        if self._finished is None:
            self._finished = trio.Event()
            if self._done:
                self._finished.set()
        return self._finished

    @property
    def closing(self) -> bool:
        """Whether :meth:`close` was called and the session has not ended yet."""
        return self._cancel_scope.cancel_called and not self._done

    # -- what conn_state shows ------------------------------------------

    @property
    def tls(self) -> trio.SSLStream[trio.abc.Stream] | None:
        """The TLS layer, once the handshake is done; ``None`` on a plain connection."""
        return self.stream if isinstance(self.stream, trio.SSLStream) else None

    def tls_summary(self) -> str:
        """``TLSv1.3`` (the version), or ``no``: for log lines."""
        tls = self.tls
        return str(tls.version()) if tls is not None else "no"

    def state(self) -> dict[str, Any]:
        """The connection's state, with the keys of the original's ``conn state``.

        Beyond those: ``tls`` and, when encrypted, ``tls_version`` and
        ``tls_cipher``.
        """
        proto = self.protocol
        tls = self.tls
        cipher = tls.cipher() if tls is not None else None
        return {
            "remotehost": self.peer[0],
            "remoteport": self.peer[1],
            "server": self.settings.server,
            "id": proto.challenge,
            "connection": self.conn_id,
            "state": proto.state.value,
            "name": proto.user,
            "logon": proto.mechanism,
            "storage": self.mailbox or "",
            "deleted": sorted(proto.deleted),
            "msg": len(proto.sizes),
            "size": proto.maildrop_octets,
            "started": self.started,
            "last_activity": self.last_activity,
            "tls": tls is not None,
            "tls_version": tls.version() if tls is not None else None,
            "tls_cipher": cipher[0] if cipher else None,
        }

    def overview(self) -> dict[str, Any]:
        """What a live view shows of the connection: :meth:`state`'s gist, cheap enough for thousands a second.

        ``marked`` counts the messages marked for deletion (``state`` lists them).
        """
        proto = self.protocol
        tls = self.tls
        return {
            "id": self.conn_id,
            "user": proto.user or None,
            "remote_host": self.peer[0],
            "remote_port": self.peer[1],
            "tls": tls is not None,
            "tls_version": tls.version() if tls is not None else None,
            "state": proto.state.value,
            "messages": len(proto.sizes),
            "octets": proto.maildrop_octets,
            "marked": len(proto.deleted),
            "started": self.started,
            "last_activity": self.last_activity,
        }

    def close(self, reason: str | None = None) -> None:
        """End the session from outside: no deletions, lock released.

        ``reason``, if given, is sent to the client as ``-ERR reason``: one
        line of printable text, at most 200 characters (``ValueError``).
        """
        if reason is not None and (len(reason) > MAX_REASON or not reason.isprintable()):
            raise ValueError(f"a reason is one line of printable text, at most {MAX_REASON} characters")
        self._close_reason = reason
        self._kicked = True
        self._cancel_scope.cancel()

    # -- the driver -----------------------------------------------------

    async def run(self) -> None:
        """Serve the session until QUIT, a timeout, an error or a cancel."""
        began = time.monotonic()
        try:
            with self._cancel_scope:
                await self._serve()
            if self._cancel_scope.cancelled_caught:
                if not self._kicked:
                    # The deadline of a wait for the client (see _receive).
                    log.info("session %s from %s: %s", self.conn_id, self.address or "-", self._timeout_reply)
                    self.protocol.close(self._timeout_reply)
                else:
                    self.protocol.close(self._close_reason)  # None: no reply, but the engine knows it is over
                await self._send_last()
        except _ConnectionLost:
            pass
        except Exception:
            # Never let one connection take the server down.
            log.exception("session %s: internal error", self.conn_id)
            self.protocol.close(replies.SYS_TEMP)
            await self._send_last()
        finally:
            with trio.CancelScope(shield=True):
                await self._release_lock()
                try:
                    await self._close_stream()
                except Exception:
                    log.exception("session %s: closing the stream failed", self.conn_id)
            self._done = True
            if self._finished is not None:
                self._finished.set()
            self._stats.sessions_ended[self.tls is not None] += 1
            notify()
            log.info(
                "session %s user=%s remote=%s:%s tls=%s retrieved=%d deleted=%d bytes=%d duration=%.3fs",
                self.conn_id,
                _printable(self.protocol.user) or "-",
                self.peer[0],
                self.peer[1],
                self.tls_summary(),
                self.retrieved,
                self.deleted_count,
                self.bytes_sent,
                time.monotonic() - began,
            )

    async def _close_stream(self) -> None:
        # Over TLS, aclose() sends close_notify, so that the client can tell the
        # end of the session from a cut connection; it does not wait for an answer.
        if self.tls is not None:
            with trio.move_on_after(CLOSING_SEND_TIMEOUT):
                try:
                    await self.stream.aclose()
                    return
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        await trio.aclose_forcefully(self.stream)

    async def _serve(self) -> None:
        if self.protocol.encrypted:
            await self._start_tls()  # POP3S: the handshake comes before the greeting
        await self._send(self.protocol.greeting(self.settings.hostname))
        proto = self.protocol
        while True:
            event = proto.next_event()
            out = proto.data_to_send()
            if out:
                await self._send(out)
            if event is NEED_DATA:
                await self._receive()
                continue
            if event is PAUSED:
                continue  # the replies went out above; go on with the buffered lines
            assert isinstance(event, Event)
            if isinstance(event, Closed):
                return
            self.commands += 1
            await self._answer(event)

    def _is_proxy_header(self, data: bytes | bytearray) -> bool:
        # The client's first bytes; a trusted proxy's header was taken off before the session.
        # Six bytes tell a header from a command ("PROXY " or the start of v2's signature).
        if len(data) < 6 or not proxy.starts_like_header(bytes(data[:16])):
            return False
        log.warning("session %s from %s: a PROXY header from an untrusted address", self.conn_id, self.address or "-")
        return True

    def _deadline(self) -> tuple[float, str]:
        """When the client's time is up if nothing comes, and what it is told then."""
        idle = trio.current_time() + self._idle_timeout()
        # Only until the login: not for a QUIT's reply, say, long after it.
        if self.protocol.state is State.AUTHORIZATION and self._login_deadline < idle:
            return self._login_deadline, replies.LOGIN_TIMEOUT
        return idle, replies.IDLE_TIMEOUT

    async def _receive(self) -> None:
        # The wait is timed by the session's own scope, not a scope of its
        # own: an idle session then holds one cancel scope, not two.  If the
        # deadline passes, run() answers with _timeout_reply.
        scope = self._cancel_scope
        scope.deadline, self._timeout_reply = self._deadline()
        stream = self.stream
        try:
            data = await stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _ConnectionLost from exc
        finally:
            scope.deadline = math.inf
        if scope.cancel_called:
            # The deadline passed (or a kick came) as the data did: it still
            # counts, and is answered by run(), before any command runs.
            await trio.lowlevel.checkpoint()
        if not data:
            raise _ConnectionLost  # the client closed its end
        if self._first_data and self._is_proxy_header(data):
            self.protocol.close(replies.PROXY_REFUSED)
            await self._send_last()
            raise _ConnectionLost
        self._first_data = False
        self._last_activity = time.time()
        self.protocol.receive_data(data)

    def _idle_timeout(self) -> float:
        return self.settings.idle_timeout if self.settings.idle_timeout > 0 else math.inf

    async def _send(self, data: bytes) -> None:
        # A client that stops reading counts as idle, too.
        with trio.move_on_at(self._deadline()[0]) as scope:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.protocol.output_interrupted()
                raise _ConnectionLost from exc
            except BaseException:
                self.protocol.output_interrupted()  # a cancel (a kick) may cut a reply
                raise
        if scope.cancelled_caught:
            self.protocol.output_interrupted()
            raise _ConnectionLost
        self.bytes_sent += len(data)

    async def _send_last(self) -> None:
        """Send what the engine has left to say (a last ``-ERR``); never raises, never hangs.

        The engine says nothing where its words would be garbage (inside a
        message, after a cut reply); nor is anything sent while TLS is due.
        """
        data = self.protocol.data_to_send()
        if not data or self._tls_pending:
            return
        # The shield goes outside the deadline: inside, it would block the deadline too.
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSING_SEND_TIMEOUT):
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
                pass
            except Exception:
                log.exception("session %s: sending the last reply failed", self.conn_id)

    async def _start_tls(self) -> None:
        """Wrap the stream in TLS and do the handshake; a failure ends the session."""
        context = self.settings.tls_context
        assert context is not None
        stream = trio.SSLStream(self.stream, context, server_side=True)
        with trio.move_on_at(min(trio.current_time() + HANDSHAKE_TIMEOUT, self._deadline()[0])) as scope:
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError as exc:
                self._stats.tls_failures += 1
                reason = exc.__cause__ if isinstance(exc.__cause__, ssl.SSLError) else exc
                log.info("session %s from %s: TLS handshake failed: %s", self.conn_id, self.address or "-", reason)
                raise _ConnectionLost from exc
        if scope.cancelled_caught:
            self._stats.tls_failures += 1
            log.info("session %s from %s: TLS handshake timed out", self.conn_id, self.address or "-")
            raise _ConnectionLost
        self.stream = stream
        self._tls_pending = False
        cipher = stream.cipher()
        log.debug("session %s: TLS %s %s", self.conn_id, stream.version(), cipher[0] if cipher else "")

    async def _answer(self, event: Event) -> None:
        if isinstance(event, StartTLS):
            # After "+OK begin TLS" there is no plain-text answer left to give:
            # a failed handshake ends the session.
            self._tls_pending = True
            await self._start_tls()
            self.protocol.tls_started()
            notify()  # now encrypted: a live view shows it
            return
        try:
            if isinstance(event, Authenticate | LoginRejected):
                await self._login_attempt(event)
            elif isinstance(event, Retrieve):
                await self._retrieve(event)
            elif isinstance(event, ListUids):
                await self._list_uids(event)
            elif isinstance(event, Update):
                await self._update(event)
        except (_ConnectionLost, trio.Cancelled):
            raise
        except MailboxUnavailable as exc:
            # Permanent, and said in the message: one line, no traceback.
            log.error("session %s from %s: %s failed: %s", self.conn_id, self.address or "-", type(event).__name__, exc)
            self._stats.errors += 1
            self.protocol.command_failed(event, permanent=True)
        except TemporarilyUnavailable as exc:
            name = type(event).__name__
            log.warning("session %s from %s: %s failed: %s", self.conn_id, self.address or "-", name, exc)
            self._stats.errors += 1
            self.protocol.command_failed(event)
        except Exception:
            log.exception("session %s from %s: %s failed", self.conn_id, self.address or "-", type(event).__name__)
            self._stats.errors += 1
            self.protocol.command_failed(event)

    # -- the events -----------------------------------------------------

    async def _login_attempt(self, event: Authenticate | LoginRejected) -> None:
        """Answer a login attempt in turn, after its penalty, within the login timeout."""
        self.logging_in = True
        started = trio.current_time()
        try:
            with trio.move_on_at(self._login_deadline) as scope:
                # A few attempts per address at a time, so that a guesser's
                # many connections wait their penalties one after another.
                async with self.settings.login_slots.attempt(self.address):
                    # Waited before the check, right or wrong: a guess is not
                    # even tried before its time.
                    penalty = self._penalty(event.user if isinstance(event, Authenticate) else "")
                    if penalty:
                        await trio.sleep(penalty)
                    if isinstance(event, LoginRejected):
                        await self._login_failed(event.mechanism, "", started, why=event.reason)
                        return
                    mailbox = await self._check_credentials(event, started)
                # The slot is for checking passwords: the mailbox opens outside it.
                if mailbox is not None:
                    await self._open_maildrop(event, mailbox)
        finally:
            self.logging_in = False
        if scope.cancelled_caught:
            log.info("session %s from %s: %s", self.conn_id, self.address or "-", replies.LOGIN_TIMEOUT)
            self.protocol.close(replies.LOGIN_TIMEOUT)
            await self._send_last()
            raise _ConnectionLost

    async def _check_credentials(self, event: Authenticate, started: float) -> str | None:
        """The user's mailbox if the credentials are right; else the failure is answered and None."""
        auth = self.settings.auth
        entry = await auth.lookup(event.user) if auth is not None else None
        if entry is None or not await _secret_matches(event.credentials, entry[0]):
            await self._login_failed(event.mechanism, event.user, started)
            return None
        if self.settings.penalties is not None:
            self.settings.penalties.succeeded(self.address, event.user)
        return entry[1]

    async def _open_maildrop(self, event: Authenticate, mailbox: str) -> None:
        """Lock and count the mailbox of a user whose credentials were right, and answer the login."""
        proto = self.protocol
        settings = self.settings
        if self._over_userip_limit(event.user):
            self._refuse_login(event, LoginFailure.USER_CONNECTIONS)
            return
        storage = settings.storage
        if storage is None:
            sizes: Sequence[int] = ()  # no storage: every mailbox is empty
        else:
            # The cluster's lock first, then the storage's; released in the other order.
            if settings.mailbox_locks is not None and not await self._lock_in_cluster(event, mailbox):
                return
            locked = False
            try:
                locked = await storage.lock(mailbox)
            finally:
                if not locked and self._lock is not None:
                    with trio.CancelScope(shield=True):
                        await self._release_cluster_lock(mailbox)
            if not locked:
                self._refuse_login(event, LoginFailure.IN_USE)
                return
            self.mailbox, self.storage = mailbox, storage
            try:
                sizes, self._uids = await read_listing(storage, mailbox)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self._release_lock()
                self.mailbox = None
                raise
        self.mailbox = mailbox
        self._stats.logins[event.mechanism, "ok"] += 1
        log.info(
            "session %s from %s: %s logged in (%s), %d messages",
            self.conn_id,
            self.address or "-",
            _printable(event.user),
            event.mechanism,
            len(sizes),
        )
        proto.login_succeeded(sizes)
        notify()  # logged in, after the checks and the maildrop: a live view shows it now
        if settings.on_login is not None:
            settings.on_login(self.conn_id)

    async def _lock_in_cluster(self, event: Authenticate, mailbox: str) -> bool:
        """Take the lock service's lock on ``mailbox``; if it cannot be had, the login is refused."""
        locks = self.settings.mailbox_locks
        assert locks is not None
        holder = Holder(server=self.settings.server, connection=self.conn_id, client=self.address)
        try:
            self._lock = await locks.acquire(mailbox, holder, self._lock_lost)
        except LockServiceUnavailable as exc:
            log.warning("session %s from %s: cannot lock %s: %s", self.conn_id, self.address or "-", mailbox, exc)
            self._refuse_login(event, LoginFailure.SYS_TEMP)
            return False
        if self._lock is None:
            self._refuse_login(event, LoginFailure.IN_USE)
            return False
        return True

    def _lock_lost(self) -> None:
        # Called by the lock service's task: end now, before the lock can pass to another session.
        if not self._done:
            log.warning("session %s from %s: %s", self.conn_id, self.address or "-", replies.LOCK_LOST)
            self.close(replies.LOCK_LOST)

    def _penalty(self, user: str) -> float:
        penalties = self.settings.penalties
        delay = penalties.delay(self.address, user) if penalties is not None else 0.0
        if delay:
            self._stats.logins_delayed += 1
        return delay

    def _over_userip_limit(self, user: str) -> bool:
        limit, count = self.settings.max_userip_connections, self.settings.sessions_of
        return bool(limit) and count is not None and count(user, self.address) >= limit

    def _refuse_login(self, event: Authenticate, reason: LoginFailure) -> None:
        log.info(
            "session %s from %s: login of %s refused: %s",
            self.conn_id,
            self.address or "-",
            _printable(event.user),
            reason.value,
        )
        self._stats.logins[event.mechanism, "failed"] += 1
        self.protocol.login_failed(reason)

    async def _login_failed(self, mechanism: str, user: str, started: float, *, why: str = "") -> None:
        """Count, log and penalise a failed login; answer it ``login_failure_delay`` after it came."""
        log.info(
            "session %s from %s: login failed for %s (%s)%s",
            self.conn_id,
            self.address or "-",
            _printable(user) or "-",
            mechanism,
            f": {why}" if why else "",
        )
        self._stats.logins[mechanism, "failed"] += 1
        if self.settings.penalties is not None:
            self.settings.penalties.failed(self.address, user)
        # Every failure is answered at the same time after the command, so the
        # time does not tell an unknown user (no hash checked) from a wrong
        # password or a broken AUTH exchange, and guessing is slow.
        await trio.sleep_until(started + self.settings.login_failure_delay)
        self.protocol.login_failed(LoginFailure.BAD_CREDENTIALS)

    async def _retrieve(self, event: Retrieve) -> None:
        proto = self.protocol
        if self.storage is None or self.mailbox is None:
            raise RuntimeError("message exists but there is no storage")
        data = await self.storage.get(self.mailbox, event.msg)
        if isinstance(data, bytes):
            # The whole message at once (a small one): one send, no iterator.
            proto.start_message(event)
            proto.message_data(data)
            proto.end_message()
        else:
            await self._stream_message(event, data)
        await self._send(proto.data_to_send())
        if event.body_lines is None:
            self.retrieved += 1
            self._stats.messages_retrieved += 1
            self._stats.bytes_retrieved += proto.sizes[event.msg - 1]

    async def _stream_message(self, event: Retrieve, data: MessageData) -> None:
        """Send a message that comes in chunks; what is left ends up in the engine's buffer."""
        proto = self.protocol
        chunks = iterate_message(data)
        try:
            # Read the first chunk before +OK, so that a failing storage still gets -ERR.
            first = await anext(chunks, b"")
            proto.start_message(event)
            more = proto.message_data(first)
            try:
                # Small chunks are gathered into sends of SEND_BATCH; big ones go as they are.
                while more:
                    if proto.bytes_pending >= SEND_BATCH:
                        await self._send(proto.data_to_send())
                    chunk = await anext(chunks, None)
                    if chunk is None:
                        break
                    more = proto.message_data(chunk)
            except (_ConnectionLost, trio.Cancelled):
                raise
            except Exception as exc:
                # The +OK is out: the only honest thing left is to hang up (the engine sends nothing more).
                log.exception("session %s: reading message %d failed", self.conn_id, event.msg)
                proto.close()
                raise _ConnectionLost from exc
            proto.end_message()
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await chunks.aclose()
                except Exception:
                    log.exception("session %s: closing message %d failed", self.conn_id, event.msg)

    async def _list_uids(self, event: ListUids) -> None:
        uids: dict[int, str] = {}
        if self._uids is not None:
            uids = {msg: self._uids[msg - 1] for msg in event.msgs}
        elif self.storage is not None and self.mailbox is not None:
            for msg in event.msgs:
                uids[msg] = await self.storage.uidl(self.mailbox, msg)
        self.protocol.send_uids(event, uids)

    async def _update(self, event: Update) -> None:
        if event.deleted and self.storage is not None and self.mailbox is not None:
            # The fencing check, right before the deletions: is the lock still this session's?
            if self._lock is not None and not await self._lock.confirm():
                log.warning("session %s from %s: %s", self.conn_id, self.address or "-", replies.LOCK_LOST)
                self.protocol.close(replies.LOCK_LOST)
                return
            await self.storage.dele(self.mailbox, list(event.deleted))
            self.deleted_count = len(event.deleted)
            self._stats.messages_deleted += len(event.deleted)
        self.protocol.update_finished(True)

    # -- cleanup --------------------------------------------------------

    async def _release_lock(self) -> None:
        storage, mailbox = self.storage, self.mailbox
        self.storage = None
        # The cluster's lock goes back once the storage has really let go: a worker thread that
        # a cancel abandoned (a deletion) may hold the storage's lock on after unlock().
        unlocked = trio.Event()
        handed_off = False

        def let_go() -> None:
            unlocked.set()
            if handed_off:
                trio.lowlevel.spawn_system_task(self._release_cluster_lock, mailbox)

        on_unlocked = getattr(storage, "on_unlocked", None)
        if self._lock is None or on_unlocked is None or mailbox is None:
            unlocked.set()
        if storage is not None and mailbox is not None:
            with trio.move_on_after(UNLOCK_TIMEOUT):
                try:
                    if on_unlocked is not None and not unlocked.is_set():
                        on_unlocked(mailbox, let_go)
                    await storage.unlock(mailbox)
                    await unlocked.wait()
                except Exception:
                    log.exception("session %s: unlock of %s failed", self.conn_id, mailbox)
                    unlocked.set()
        if self._lock is None:
            return
        if not unlocked.is_set():
            log.warning("session %s: %s is still in use: its cluster lock goes back after", self.conn_id, mailbox)
            handed_off = True
            return
        await self._release_cluster_lock(mailbox)

    async def _release_cluster_lock(self, mailbox: str | None) -> None:
        # After the storage's unlock: no other session may get the mailbox while this one has it open.
        lock, self._lock = self._lock, None
        if lock is None:
            return
        with trio.move_on_after(UNLOCK_TIMEOUT):
            try:
                await lock.release()
            except Exception:
                log.exception("session %s: releasing the cluster lock of %s failed", self.conn_id, mailbox)

    def _count_command(self, keyword: str) -> None:
        self._stats.commands[keyword] += 1
        notify()  # a live view shows state, messages and idle time per session

    @property
    def ended(self) -> bool:
        """Whether the protocol reached its end (QUIT answered, or closed)."""
        return self.protocol.state is State.CLOSED
