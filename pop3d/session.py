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
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import trio

from . import replies
from .callbacks import Auth, HashedPassword, Storage, iterate_message
from .credentials import Credentials
from .networks import Network, address_in
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
# Unlocking must finish even while the session is being cancelled, but not hang.
UNLOCK_TIMEOUT = 10.0
# How long a last "-ERR ..." before closing may take: the client may not be reading.
CLOSING_SEND_TIMEOUT = 5.0
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


def _now() -> datetime:
    return datetime.now(UTC)


async def _secret_matches(credentials: Credentials, secret: str | HashedPassword) -> bool:
    """Whether ``credentials`` prove the user's stored ``secret``, whatever the mechanism."""
    if isinstance(secret, str):
        return credentials.matches(secret)
    if credentials.password is None:
        return False  # a challenge-response (APOP) needs the plain password, which a hash cannot give
    return await secret.verify(credentials.password)


class Session:
    """A POP3 session on ``stream`` with the client at ``peer`` (host, port)."""

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
        self.started = _now()
        self.last_activity = self.started
        self.retrieved = 0
        self.bytes_sent = 0
        self.deleted_count = 0
        self.commands = 0
        self._close_reason: str | None = None
        self._replying = False  # a reply has started going out and is not complete
        self._in_message = False  # between the +OK of RETR/TOP and its final "."
        # TLS is due (POP3S, or STLS accepted) and not done: a plain "-ERR" (a
        # kick, an error) would reach the client as garbage, so none is sent.
        self._tls_pending = settings.implicit_tls
        self._cancel_scope = trio.CancelScope()
        #: Set when the session is over: socket closed, lock released.
        self.finished = trio.Event()
        self._stats = settings.stats
        self._stats.sessions += 1

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
            "size": sum(proto.sizes),
            "started": self.started,
            "last_activity": self.last_activity,
            "tls": tls is not None,
            "tls_version": tls.version() if tls is not None else None,
            "tls_cipher": cipher[0] if cipher else None,
        }

    def close(self, reason: str | None = None) -> None:
        """End the session from outside: no deletions, lock released.

        ``reason``, if given, is sent to the client as ``-ERR reason``.
        """
        self._close_reason = reason
        self._cancel_scope.cancel()

    # -- the driver -----------------------------------------------------

    async def run(self) -> None:
        """Serve the session until QUIT, a timeout, an error or a cancel."""
        began = time.monotonic()
        try:
            with self._cancel_scope:
                await self._serve()
            if self._cancel_scope.cancelled_caught and self._close_reason:
                await self._try_send(replies.err(self._close_reason))
        except _ConnectionLost:
            pass
        except Exception:
            # Never let one connection take the server down.
            log.exception("session %s: internal error", self.conn_id)
            await self._try_send(replies.err(replies.SYS_TEMP))
        finally:
            with trio.CancelScope(shield=True):
                await self._release_lock()
                try:
                    await self._close_stream()
                except Exception:
                    log.exception("session %s: closing the stream failed", self.conn_id)
            self.finished.set()
            self._stats.sessions_ended[self.tls is not None] += 1
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

    async def _receive(self) -> None:
        data: bytes | bytearray = b""
        with trio.move_on_after(self._idle_timeout()):
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _ConnectionLost from exc
            if not data:
                raise _ConnectionLost  # the client closed its end
            self.last_activity = _now()
            self.protocol.receive_data(data)
            return
        self.protocol.close(replies.IDLE_TIMEOUT)
        await self._try_send(self.protocol.data_to_send())
        raise _ConnectionLost

    def _idle_timeout(self) -> float:
        return self.settings.idle_timeout if self.settings.idle_timeout > 0 else math.inf

    async def _send(self, data: bytes) -> None:
        # A client that stops reading counts as idle, too.
        self._replying = True
        with trio.move_on_after(self._idle_timeout()) as scope:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _ConnectionLost from exc
        if scope.cancelled_caught:
            raise _ConnectionLost
        self.bytes_sent += len(data)
        if not self._in_message:
            self._replying = False

    async def _try_send(self, data: bytes) -> None:
        """Send a last line, if the client is between replies; never raises, never hangs."""
        if not data or self._replying or self._tls_pending:
            return  # inside a reply, a -ERR line would read as part of it
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
        with trio.move_on_after(min(HANDSHAKE_TIMEOUT, self._idle_timeout())) as scope:
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError as exc:
                self._stats.tls_failures += 1
                reason = exc.__cause__ if isinstance(exc.__cause__, ssl.SSLError) else exc
                log.info("session %s: TLS handshake failed: %s", self.conn_id, reason)
                raise _ConnectionLost from exc
        if scope.cancelled_caught:
            self._stats.tls_failures += 1
            log.info("session %s: TLS handshake timed out", self.conn_id)
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
            return
        try:
            if isinstance(event, Authenticate):
                await self._authenticate(event)
            elif isinstance(event, LoginRejected):
                await self._login_failed(event.mechanism, "-", trio.current_time(), why=event.reason)
            elif isinstance(event, Retrieve):
                await self._retrieve(event)
            elif isinstance(event, ListUids):
                await self._list_uids(event)
            elif isinstance(event, Update):
                await self._update(event)
        except (_ConnectionLost, trio.Cancelled):
            raise
        except Exception:
            log.exception("session %s: %s failed", self.conn_id, type(event).__name__)
            self._stats.errors += 1
            self.protocol.command_failed(event)

    # -- the events -----------------------------------------------------

    async def _authenticate(self, event: Authenticate) -> None:
        proto = self.protocol
        auth = self.settings.auth
        started = trio.current_time()
        entry = await auth.lookup(event.user) if auth is not None else None
        if entry is None or not await _secret_matches(event.credentials, entry[0]):
            await self._login_failed(event.mechanism, event.user, started)
            return
        mailbox = entry[1]
        storage = self.settings.storage
        if storage is None:
            sizes: list[int] = []  # no storage: every mailbox is empty
        else:
            if not await storage.lock(mailbox):
                self._stats.logins[event.mechanism, "failed"] += 1
                proto.login_failed(LoginFailure.IN_USE)
                return
            self.mailbox, self.storage = mailbox, storage
            try:
                count = await storage.stat(mailbox)
                sizes = [await storage.size(mailbox, n) for n in range(1, count + 1)]
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self._release_lock()
                self.mailbox = None
                raise
        self.mailbox = mailbox
        self._stats.logins[event.mechanism, "ok"] += 1
        log.info("session %s: %s logged in (%s), %d messages", self.conn_id, event.user, event.mechanism, len(sizes))
        proto.login_succeeded(sizes)

    async def _login_failed(self, mechanism: str, user: str, started: float, *, why: str = "") -> None:
        """Count and log a failed login, then answer it at ``started`` + the failure delay."""
        log.info("session %s: login failed for %r (%s)%s", self.conn_id, user, mechanism, f": {why}" if why else "")
        self._stats.logins[mechanism, "failed"] += 1
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
        chunks = aiter(iterate_message(data))
        # Read the first chunk before +OK, so that a failing storage still gets -ERR.
        first = await anext(chunks, b"")
        writer = proto.start_message(event)
        # Small chunks are gathered into sends of SEND_BATCH; big ones go as they are.
        parts = [proto.data_to_send(), writer.feed(first)]
        batched = len(parts[0]) + len(parts[1])
        self._in_message = self._replying = True
        try:
            async for chunk in chunks:
                if writer.done:
                    break
                out = writer.feed(chunk)
                parts.append(out)
                batched += len(out)
                if batched >= SEND_BATCH:
                    await self._send(b"".join(parts))
                    parts.clear()
                    batched = 0
        except (_ConnectionLost, trio.Cancelled):
            raise
        except Exception as exc:
            # The +OK may be out already; the only honest thing left is to hang up.
            log.exception("session %s: reading message %d failed", self.conn_id, event.msg)
            raise _ConnectionLost from exc
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                with trio.CancelScope(shield=True):
                    try:
                        await aclose()
                    except Exception:
                        log.exception("session %s: closing message %d failed", self.conn_id, event.msg)
        parts.append(writer.finish())
        self._in_message = False
        await self._send(b"".join(parts))
        if event.body_lines is None:
            self.retrieved += 1
            self._stats.messages_retrieved += 1
            self._stats.bytes_retrieved += proto.sizes[event.msg - 1]

    async def _list_uids(self, event: ListUids) -> None:
        uids: dict[int, str] = {}
        if self.storage is not None and self.mailbox is not None:
            for msg in event.msgs:
                uids[msg] = await self.storage.uidl(self.mailbox, msg)
        self.protocol.send_uids(event, uids)

    async def _update(self, event: Update) -> None:
        if event.deleted and self.storage is not None and self.mailbox is not None:
            await self.storage.dele(self.mailbox, list(event.deleted))
            self.deleted_count = len(event.deleted)
            self._stats.messages_deleted += len(event.deleted)
        self.protocol.update_finished(True)

    # -- cleanup --------------------------------------------------------

    async def _release_lock(self) -> None:
        storage, mailbox = self.storage, self.mailbox
        self.storage = None
        if storage is None or mailbox is None:
            return
        with trio.move_on_after(UNLOCK_TIMEOUT):
            try:
                await storage.unlock(mailbox)
            except Exception:
                log.exception("session %s: unlock of %s failed", self.conn_id, mailbox)

    def _count_command(self, keyword: str) -> None:
        self._stats.commands[keyword] += 1

    @property
    def ended(self) -> bool:
        """Whether the protocol reached its end (QUIT answered, or closed)."""
        return self.protocol.state is State.CLOSED
