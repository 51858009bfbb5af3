"""The server object: the seed's ``::pop3d::new`` and its methods, on Trio.

A :class:`Server` runs inside a nursery its caller gives it::

    server = pop3d.new()
    server.configure(port=0, host="127.0.0.1", auth=users, storage=boxes)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        await server.up()
        ...
        await server.destroy()

``run`` owns one nursery; the listener and every connection are tasks in it.
``up``, ``down`` and ``destroy`` may be called from any task.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import ssl
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import trio

from . import proxy, replies
from ._version import __version__
from .changes import notify
from .connections import ConnectionTable, Verdict
from .errors import NameTaken, OptionError, StateError, UnknownConnection
from .login_slots import LoginSlots
from .mailbox_locks import MailboxLocks
from .networks import address_in
from .options import ServerOptions, validate_options
from .session import Session, SessionSettings
from .stats import ServerStats
from .tls import TLSError, server_context

__all__ = ["IMPLEMENTATION", "Server", "get", "new", "open_listeners", "reload_tls", "servers"]

log = logging.getLogger("pop3d.server")

#: CAPA's IMPLEMENTATION line (RFC 2449).
IMPLEMENTATION = f"pop3d-{__version__}"

# Options from which the server makes its TLS context.
_TLS_OPTIONS = ("tls_cert", "tls_key", "ssl_context")
# A kill waits this long for sessions to end (they unlock and close within it).
KILL_TIMEOUT = 2.0
# A trusted proxy sends its PROXY header at once; this long at most.
PROXY_HEADER_TIMEOUT = 10.0

ServerState = Literal["down", "up", "exiting"]

_servers: dict[str, Server] = {}


def new(name: str | None = None) -> Server:
    """Create a server object named ``name`` (``pop3d1``, ``pop3d2``, ... by default).

    Raises :class:`~pop3d.errors.NameTaken` if a server of that name exists.
    """
    if name is None:
        name = next(f"pop3d{n}" for n in itertools.count(1) if f"pop3d{n}" not in _servers)
    if name in _servers:
        raise NameTaken(f"a server named {name!r} exists already")
    server = Server(name)
    _servers[name] = server
    return server


def servers() -> dict[str, Server]:
    """Every server object that exists, by name."""
    return dict(_servers)


def get(name: str) -> Server:
    """The server named ``name``; ``KeyError`` if there is none."""
    return _servers[name]


def _peer_of(stream: trio.abc.Stream) -> tuple[str, int]:
    # Unwrap TLS and similar wrappers down to the socket, if there is one.
    while not isinstance(stream, trio.SocketStream):
        inner = getattr(stream, "transport_stream", None)
        if inner is None:
            return ("", 0)
        stream = inner
    try:
        address = stream.socket.getpeername()
    except OSError:
        return ("", 0)
    return (str(address[0]), int(address[1]))


class Server:
    """A POP3 server object.  Create it with :func:`new`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._options = ServerOptions()
        self._tls_context: ssl.SSLContext | None = None
        self._state: ServerState = "down"  # changed through _set_state, which tells watchers
        self._true_port: int | None = None
        self._nursery: trio.Nursery | None = None
        self._listener_scope: trio.CancelScope | None = None
        self._listener_done: trio.Event | None = None
        self._listeners: list[trio.SocketListener] = []
        self._table: ConnectionTable[Session] = ConnectionTable()
        self._login_slots = LoginSlots(self._options.max_logins_per_ip)
        self._settings_cache: tuple[ServerOptions, ssl.SSLContext | None, SessionSettings] | None = None
        self._ids = itertools.count(1)
        self._transition = trio.Lock()
        self._destroying = trio.Event()
        self._finished = trio.Event()
        self._destroyed = False
        self._ran = False
        #: What the server's sessions have done so far.
        self.stats = ServerStats()
        #: A lock service shared by the instances of a cluster (:mod:`pop3d.mailbox_locks`), taken by
        #: each session before the storage's own lock; None (the default): the storage's lock only.
        #: Not an option: it is a live object with a task of its own, set by whoever runs it.
        self.mailbox_locks: MailboxLocks | None = None

    def __repr__(self) -> str:
        return f"<pop3d.Server {self.name} {self._state}>"

    # -- options (configure / cget) -------------------------------------

    def configure(self, **options: Any) -> dict[str, Any] | None:
        """With no arguments, every option and its value; else set the options given.

        Setting is all or nothing: :class:`~pop3d.errors.OptionError` names
        every bad option and changes none.  A new ``port`` takes effect at
        the next ``up``.
        """
        if not options:
            return {name: self.cget(name) for name in (*ServerOptions.model_fields, "state")}
        self._check_alive()
        new = validate_options(self._options, options)
        context = self._tls_context
        if any(getattr(new, name) != getattr(self._options, name) for name in _TLS_OPTIONS):
            try:
                context = _tls_context_of(new)
            except TLSError as exc:
                raise OptionError([("tls_cert", str(exc))]) from None
        self._options, self._tls_context = new, context
        self._login_slots.per_address = new.max_logins_per_ip
        notify()
        return None

    def cget(self, option: str) -> Any:
        """The value of one option.  ``port`` is the bound port while up."""
        if option == "state":
            return self._state
        if option == "port" and self._true_port is not None:
            return self._true_port
        if option not in ServerOptions.model_fields:
            raise OptionError([(option, "unknown option")])
        return getattr(self._options, option)

    @property
    def options(self) -> ServerOptions:
        """The configured options (``port`` as configured, not as bound)."""
        return self._options

    @property
    def tls_context(self) -> ssl.SSLContext | None:
        """The context new connections get (from ``tls_cert``/``tls_key`` or ``ssl_context``)."""
        return self._tls_context

    def reload_tls(self) -> bool:
        """Read ``tls_cert`` and ``tls_key`` again, for connections from now on.

        Open sessions keep the context they started with.  Returns whether
        there was anything to reload (``False`` without ``tls_cert``).
        Raises :class:`~pop3d.tls.TLSError`, keeping the old context, if the
        files cannot be used.
        """
        self._check_alive()
        return bool(reload_tls([self]))

    @property
    def state(self) -> ServerState:
        """``down``, ``up`` or ``exiting`` (a deferred destroy is waiting)."""
        return self._state

    @property
    def destroyed(self) -> bool:
        """Whether :meth:`destroy` has completed."""
        return self._destroyed

    # -- lifetime -------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the listener and the connections until the server is destroyed.

        Start it with ``await nursery.start(server.run)``; it reports the
        server.  Cancelling it is the same as ``destroy("kill")``.
        """
        self._check_alive()
        if self._ran:
            raise StateError(f"server {self.name} is running already")
        self._ran = True
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started(self)
                await self._destroying.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self._set_state("down")
            self._true_port = None
            self._finish()

    def _set_state(self, state: ServerState) -> None:
        self._state = state
        notify()

    def _finish(self) -> None:
        self._destroyed = True
        notify()
        if _servers.get(self.name) is self:
            del _servers[self.name]
        self._finished.set()

    def _exiting(self) -> bool:
        # A method, not an inline test: the state changes across awaits.
        return self._state == "exiting"

    def _check_alive(self) -> None:
        if self._destroyed or self._destroying.is_set():
            raise StateError(f"server {self.name} is destroyed")

    def _require_running(self) -> trio.Nursery:
        self._check_alive()
        if self._nursery is None:
            raise StateError(f"server {self.name} is not running: start it with nursery.start(server.run)")
        return self._nursery

    async def up(self, *, listeners: Sequence[trio.SocketListener] | None = None) -> None:
        """Start listening on the configured host and port (nothing if up already).

        ``listeners`` replaces the bind: made by :func:`open_listeners`
        beforehand (as root, say), or a test's own.
        """
        async with self._transition:
            nursery = self._require_running()
            if self._state == "exiting":
                raise StateError(f"server {self.name} is exiting")
            if self._state == "up":
                return
            options = self._options
            if listeners is None:
                listeners = await open_listeners(options.host, options.port)
            self._listeners = list(listeners)
            self._listener_done = trio.Event()
            self._listener_scope = await nursery.start(self._listen, self._listeners, self._listener_done)
            self._true_port = self._bound_port(self._listeners, options.port)
            self._set_state("up")
            log.info("server %s listening on %s port %d", self.name, options.host or "*", self._true_port)

    @staticmethod
    def _bound_port(listeners: Sequence[Any], configured: int) -> int:
        for listener in listeners:
            sock = getattr(listener, "socket", None)
            if sock is not None:
                return int(sock.getsockname()[1])
        return configured

    def addresses(self) -> list[tuple[str, int]]:
        """The (host, port) of each listening socket; empty while down."""
        out = []
        for listener in self._listeners:
            sock = getattr(listener, "socket", None)
            if sock is not None and sock.fileno() >= 0:
                name = sock.getsockname()
                out.append((str(name[0]), int(name[1])))
        return out

    async def _listen(
        self,
        listeners: list[trio.SocketListener],
        done: trio.Event,
        *,
        task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            with trio.CancelScope() as scope:
                nursery = self._nursery
                assert nursery is not None
                await trio.serve_listeners(
                    self.serve_stream,  # called directly: one coroutine frame less per idle connection
                    listeners,
                    handler_nursery=nursery,
                    task_status=_Started(task_status, scope),
                )
        finally:
            for listener in listeners:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(listener)
            done.set()

    async def down(self) -> None:
        """Stop listening (nothing if down already); open connections carry on."""
        async with self._transition:
            await self._stop_listening()
            if self._state == "up":
                self._set_state("down")

    async def _stop_listening(self) -> None:
        if self._listener_scope is not None and self._listener_done is not None:
            self._listener_scope.cancel()
            await self._listener_done.wait()
            log.info("server %s stopped listening", self.name)
        self._listener_scope = None
        self._listener_done = None
        self._listeners = []
        self._true_port = None

    async def destroy(
        self,
        mode: Literal["kill", "defer"] = "kill",
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Destroy the server, returning once it is gone.

        ``kill`` closes every connection at once: locks are released and
        nothing is deleted.  ``defer`` stops listening and waits until the
        last connection has ended; a ``kill`` meanwhile still works.  With
        ``await nursery.start(server.destroy, "defer")``, the caller goes on
        as soon as the server has stopped listening and is ``exiting`` (or,
        with no connections open, is gone).
        """
        if mode not in ("kill", "defer"):
            raise ValueError(f"destroy mode must be 'kill' or 'defer', not {mode!r}")
        if self._destroyed:
            task_status.started()
            return
        deferring = False
        async with self._transition:
            await self._stop_listening()
            if mode == "defer" and len(self._table):
                self._set_state("exiting")
                deferring = True
                log.info("server %s exiting after %d connections", self.name, len(self._table))
            else:
                self._destroying.set()
        if deferring:
            task_status.started()
            await self._destroying.wait()  # the last connection has ended, or a kill came
        # One deadline for the whole kill: the sessions, then the nursery that held them.
        with trio.move_on_after(KILL_TIMEOUT):
            await self._kill_sessions()
            if self._ran:
                await self._finished.wait()
        self._report_stuck()
        self._finish()
        if not deferring:
            task_status.started()

    async def _kill_sessions(self) -> None:
        """Close every session, those served outside the nursery too, and wait for them."""
        sessions = list(self._table)
        for session in sessions:
            session.close()
        for session in sessions:
            await session.finished.wait()

    def _report_stuck(self) -> None:
        stuck = [session.conn_id for session in self._table if not session.finished.is_set()]
        if stuck:
            # A callback that ignores cancellation: the server is gone without waiting for it.
            log.error("server %s: sessions %s did not end within %.0f s", self.name, ", ".join(stuck), KILL_TIMEOUT)

    # -- connections ----------------------------------------------------

    def _settings(self) -> SessionSettings:
        # One for all the sessions started under the same options: each idle session would otherwise hold a copy.
        cached = self._settings_cache
        if (
            cached is not None
            and cached[0] is self._options
            and cached[1] is self._tls_context
            and cached[2].mailbox_locks is self.mailbox_locks
        ):
            return cached[2]
        options = self._options
        settings = SessionSettings(
            server=self.name,
            hostname=options.hostname,
            auth=options.auth,
            storage=options.storage,
            implementation=IMPLEMENTATION,
            idle_timeout=options.idle_timeout,
            max_line=options.max_line,
            max_auth_failures=options.max_auth_failures,
            login_failure_delay=options.login_failure_delay,
            apop=options.apop,
            stats=self.stats,
            tls_context=self._tls_context,
            implicit_tls=options.implicit_tls,
            cleartext_auth_from=options.cleartext_auth_from,
            login_timeout=options.login_timeout,
            penalties=options.penalties,
            max_userip_connections=options.max_userip_connections,
            sessions_of=self._table.sessions_of,
            on_login=self._table.logged_in,
            login_slots=self._login_slots,
            mailbox_locks=self.mailbox_locks,
        )
        self._settings_cache = (options, self._tls_context, settings)
        return settings

    async def serve_stream(self, stream: trio.abc.Stream, peer: tuple[str, int] | None = None) -> None:
        """Serve one POP3 session on ``stream`` (from a listener, or a memory stream).

        Returns when the session is over.  The listener calls this for each
        connection; tests call it with one end of
        :func:`trio.testing.memory_stream_pair`.  ``peer`` is the client's
        (host, port); by default the socket's peer, if there is a socket,
        else ``("", 0)``.  From an address in
        ``proxy_protocol_from``, a PROXY header comes first and says who the
        client really is.  Once the server is exiting or destroyed, new
        connections are closed at once.
        """
        if peer is None:
            peer = _peer_of(stream)
        options = self._options
        # On a POP3S port a plain-text -ERR would reach the client as garbage.
        answer = not options.implicit_tls
        if self._destroyed or self._destroying.is_set() or self._exiting():
            await _refuse(stream, peer, replies.SHUTTING_DOWN, answer=answer)
            return
        if address_in(peer[0], options.proxy_protocol_from):
            # The header is part of getting in: no longer than the login timeout either.
            wait = min(PROXY_HEADER_TIMEOUT, options.login_timeout or PROXY_HEADER_TIMEOUT)
            proxied = await _read_proxy_header(stream, peer, trio.current_time() + wait, answer=answer)
            if proxied is None:
                return
            stream, peer = proxied
            if self._destroyed or self._destroying.is_set() or self._exiting():  # while the header came
                await _refuse(stream, peer, replies.SHUTTING_DOWN, answer=answer)
                return
        admission = self._table.admit(
            peer[0], max_connections=options.max_connections, max_per_address=options.max_connections_per_ip
        )
        if admission.verdict is Verdict.REFUSE_FULL:
            self.stats.refused += 1
            await _refuse(stream, peer, replies.TOO_MANY_CONNECTIONS, answer=answer)
            return
        if admission.verdict is Verdict.REFUSE_ADDRESS:
            self.stats.refused += 1
            await _refuse(stream, peer, replies.TOO_MANY_FROM_ADDRESS, answer=answer)
            return
        if admission.evict is not None:
            # Full: the oldest connection that has not logged in makes room (as Dovecot does).
            victim = admission.evict
            log.info("server %s: closing %s from %s to make room", self.name, victim.conn_id, victim.address or "-")
            self.stats.evicted += 1
            victim.close(replies.TOO_MANY_CONNECTIONS)
        conn_id = f"conn{next(self._ids)}"
        session = Session(conn_id, stream, peer, self._settings())
        self._table.add(conn_id, session)
        try:
            await session.run()
        finally:
            self._table.remove(conn_id)
            if self._exiting() and not len(self._table):
                self._destroying.set()

    def connect(self, stream: trio.abc.Stream, peer: tuple[str, int] | None = None) -> None:
        """Start serving ``stream`` as a connection task of this server.

        Like an accepted connection, it is closed by ``destroy("kill")``.
        Raises :class:`~pop3d.errors.StateError` once the server is exiting.
        """
        nursery = self._require_running()
        if self._state == "exiting":
            raise StateError(f"server {self.name} is exiting")
        nursery.start_soon(self.serve_stream, stream, peer)

    def conn_list(self) -> list[str]:
        """The ids of the open connections."""
        return self._table.ids()

    def conn_state(self, conn_id: str) -> dict[str, Any]:
        """The state of connection ``conn_id`` (see :meth:`Session.state`)."""
        return self.session(conn_id).state()

    def session(self, conn_id: str) -> Session:
        """The :class:`~pop3d.session.Session` of connection ``conn_id``."""
        session = self._table.get(conn_id)
        if session is None:
            raise UnknownConnection(conn_id)
        return session

    def close_connection(self, conn_id: str, reason: str | None = None) -> None:
        """Close one connection: its deletions are not applied, its lock is released.

        ``reason`` (one line of printable text) is sent as ``-ERR reason``.
        """
        session = self.session(conn_id)
        session.close(reason)
        log.info(
            "server %s: closing %s from %s (user %s)%s",
            self.name,
            conn_id,
            session.address or "-",
            session.user or "-",
            f": {reason}" if reason else "",
        )


async def _refuse(stream: trio.abc.Stream, peer: tuple[str, int], text: str, *, answer: bool) -> None:
    """Close a connection that may not stay, answering ``-ERR text`` first if ``answer``."""
    log.warning("refusing a connection from %s: %s", peer[0] or "-", text)
    if answer:
        with trio.move_on_after(5):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(replies.err(text))
    await trio.aclose_forcefully(stream)


class _Prefixed(trio.abc.Stream):
    """A stream that first gives back bytes already read from it (after a PROXY header)."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self.transport_stream = stream
        self._prefix = prefix
        self._closed = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        if self._prefix:
            size = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            await trio.lowlevel.checkpoint()
            return data
        return await self.transport_stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        self._closed = True
        await self.transport_stream.aclose()


async def _read_proxy_header(
    stream: trio.abc.Stream, peer: tuple[str, int], deadline: float, *, answer: bool
) -> tuple[trio.abc.Stream, tuple[str, int]] | None:
    """The stream past a PROXY header, and the client it names; None (closed) if none came by ``deadline``."""
    buffer = b""
    problem = None
    with trio.move_on_at(deadline):
        try:
            while (header := proxy.parse_header(buffer)) is None:
                data = await stream.receive_some(proxy.MAX_HEADER)
                if not data:
                    break
                buffer += data
            else:
                rest = buffer[header.length :]
                # LOCAL is the proxy's own health check; a header that names no
                # client (UNKNOWN, a Unix socket) leaves it unknown: never the
                # proxy's address, which may be trusted (loopback).
                client = peer if header.local else (header.source or ("", 0))
                return (_Prefixed(stream, rest) if rest else stream), client
        except proxy.ProxyError as exc:
            problem = str(exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    if problem is not None:
        await _refuse(stream, peer, replies.PROXY_MALFORMED.format(problem=problem), answer=answer)
    else:
        log.warning("closing a connection from proxy %s: no PROXY header", peer[0])
        await trio.aclose_forcefully(stream)
    return None


async def open_listeners(host: str | None, port: int) -> list[trio.SocketListener]:
    """Sockets listening on ``host`` (every address if None) and ``port``, for :meth:`Server.up`.

    Raises :class:`~pop3d.errors.StateError` with a one-line reason.
    """
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise StateError(f"cannot listen on {host or '*'}:{port}: {reason}") from exc


def reload_tls(servers: Iterable[Server]) -> list[Server]:
    """Read the certificate and key files of ``servers`` again; the servers reloaded.

    Each pair of files is read once, and the servers that share it share the
    new context, so that they never show different certificates.  All or
    nothing: if a pair cannot be used, :class:`~pop3d.tls.TLSError` is
    raised and every server keeps its context.  Servers without
    ``tls_cert`` (or destroyed) are left alone.
    """
    targets = [srv for srv in servers if not srv.destroyed and srv.options.tls_cert is not None]
    contexts: dict[tuple[Path, Path], ssl.SSLContext] = {}
    for srv in targets:
        files = _tls_files(srv.options)
        if files not in contexts:
            contexts[files] = server_context(*files)
    for srv in targets:
        srv._tls_context = contexts[_tls_files(srv.options)]
        log.info("server %s loaded the certificate %s", srv.name, srv.options.tls_cert)
    return targets


def _tls_files(options: ServerOptions) -> tuple[Path, Path]:
    assert options.tls_cert is not None and options.tls_key is not None
    return (options.tls_cert, options.tls_key)


def _tls_context_of(options: ServerOptions) -> ssl.SSLContext | None:
    if options.ssl_context is not None:
        return options.ssl_context
    if options.tls_cert is not None and options.tls_key is not None:
        return server_context(options.tls_cert, options.tls_key)
    return None


class _Started:
    """Reports our cancel scope when ``serve_listeners`` reports it is accepting."""

    def __init__(self, outer: trio.TaskStatus[trio.CancelScope], scope: trio.CancelScope) -> None:
        self._outer = outer
        self._scope = scope

    def started(self, value: object = None) -> None:
        self._outer.started(self._scope)
