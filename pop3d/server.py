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
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import trio

from . import replies
from ._version import __version__
from .errors import NameTaken, OptionError, StateError, UnknownConnection
from .options import ServerOptions, validate_options
from .session import Session, SessionSettings
from .stats import ServerStats
from .tls import TLSError, server_context

__all__ = ["IMPLEMENTATION", "Server", "get", "new", "reload_tls", "servers"]

log = logging.getLogger("pop3d.server")

#: CAPA's IMPLEMENTATION line (RFC 2449).
IMPLEMENTATION = f"pop3d-{__version__}"

# Options from which the server makes its TLS context.
_TLS_OPTIONS = ("tls_cert", "tls_key", "ssl_context")

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
        self._state: ServerState = "down"
        self._true_port: int | None = None
        self._nursery: trio.Nursery | None = None
        self._listener_scope: trio.CancelScope | None = None
        self._listener_done: trio.Event | None = None
        self._listeners: list[trio.SocketListener] = []
        self._sessions: dict[str, Session] = {}
        self._per_address: Counter[str] = Counter()
        self._ids = itertools.count(1)
        self._transition = trio.Lock()
        self._destroying = trio.Event()
        self._finished = trio.Event()
        self._destroyed = False
        self._ran = False
        #: What the server's sessions have done so far.
        self.stats = ServerStats()

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
            self._state = "down"
            self._true_port = None
            self._finish()

    def _finish(self) -> None:
        self._destroyed = True
        if _servers.get(self.name) is self:
            del _servers[self.name]
        self._finished.set()

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

        ``listeners`` replaces the bind, for tests that bring their own.
        """
        async with self._transition:
            nursery = self._require_running()
            if self._state == "exiting":
                raise StateError(f"server {self.name} is exiting")
            if self._state == "up":
                return
            options = self._options
            if listeners is None:
                try:
                    listeners = await trio.open_tcp_listeners(options.port, host=options.host)
                except OSError as exc:
                    raise StateError(f"cannot listen on {options.host or '*'}:{options.port}: {exc.strerror}") from exc
            self._listeners = list(listeners)
            self._listener_done = trio.Event()
            self._listener_scope = await nursery.start(self._listen, self._listeners, self._listener_done)
            self._true_port = self._bound_port(self._listeners, options.port)
            self._state = "up"
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
                    self._accept,
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
                self._state = "down"

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
            if mode == "defer" and self._sessions:
                self._state = "exiting"
                deferring = True
                log.info("server %s exiting after %d connections", self.name, len(self._sessions))
            else:
                self._destroying.set()
        if deferring:
            task_status.started()
        if self._ran:
            await self._finished.wait()
        else:
            self._destroying.set()
            self._finish()
        if not deferring:
            task_status.started()

    # -- connections ----------------------------------------------------

    def _settings(self) -> SessionSettings:
        options = self._options
        return SessionSettings(
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
        )

    async def _accept(self, stream: trio.abc.Stream) -> None:
        await self.serve_stream(stream, _peer_of(stream))

    async def serve_stream(self, stream: trio.abc.Stream, peer: tuple[str, int] = ("", 0)) -> None:
        """Serve one POP3 session on ``stream`` (from a listener, or a memory stream).

        Returns when the session is over.  The listener calls this for each
        connection; tests call it with one end of
        :func:`trio.testing.memory_stream_pair`.
        """
        options = self._options
        # On a POP3S port a plain-text -ERR would reach the client as garbage.
        answer = not options.implicit_tls
        if len(self._sessions) >= options.max_connections:
            await _refuse(stream, replies.TOO_MANY_CONNECTIONS, answer=answer)
            return
        if peer[0] and self._per_address[peer[0]] >= options.max_connections_per_ip:
            await _refuse(stream, replies.TOO_MANY_FROM_ADDRESS, answer=answer)
            return
        conn_id = f"conn{next(self._ids)}"
        session = Session(conn_id, stream, peer, self._settings())
        self._sessions[conn_id] = session
        self._per_address[peer[0]] += 1
        try:
            await session.run()
        finally:
            del self._sessions[conn_id]
            self._per_address[peer[0]] -= 1
            if not self._per_address[peer[0]]:
                del self._per_address[peer[0]]
            if self._state == "exiting" and not self._sessions:
                self._destroying.set()

    def connect(self, stream: trio.abc.Stream, peer: tuple[str, int] = ("", 0)) -> None:
        """Start serving ``stream`` as a connection task of this server.

        Like an accepted connection, it is closed by ``destroy("kill")``.
        """
        nursery = self._require_running()
        nursery.start_soon(self.serve_stream, stream, peer)

    def conn_list(self) -> list[str]:
        """The ids of the open connections."""
        return list(self._sessions)

    def conn_state(self, conn_id: str) -> dict[str, Any]:
        """The state of connection ``conn_id`` (see :meth:`Session.state`)."""
        try:
            return self._sessions[conn_id].state()
        except KeyError:
            raise UnknownConnection(conn_id) from None

    def session(self, conn_id: str) -> Session:
        """The :class:`~pop3d.session.Session` of connection ``conn_id``."""
        try:
            return self._sessions[conn_id]
        except KeyError:
            raise UnknownConnection(conn_id) from None

    def close_connection(self, conn_id: str, reason: str | None = None) -> None:
        """Close one connection: its deletions are not applied, its lock is released."""
        self.session(conn_id).close(reason)


async def _refuse(stream: trio.abc.Stream, text: str, *, answer: bool) -> None:
    """Close a connection over the limits, answering ``-ERR text`` first if ``answer``."""
    log.warning("refusing a connection: %s", text)
    if answer:
        with trio.move_on_after(5):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(replies.err(text))
    await trio.aclose_forcefully(stream)


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
