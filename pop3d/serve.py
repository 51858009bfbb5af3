"""``pop3d serve``: POP3 servers and the admin API in one Trio nursery.

:func:`serve` builds one server object per ``--listen`` address (the first
is named ``pop3``, the others ``pop3-2``, ``pop3-3``, ...) and per
``--listen-tls`` address (``pop3s``, ``pop3s-2``, ...), all sharing one
passwd-file, one Maildir root and one certificate, and the admin API beside
them.  One shutdown trigger stops everything: the first SIGTERM or SIGINT
stops accepting, gives open sessions ``grace_period`` seconds to finish,
then closes the rest (their deletions are not applied, so no mail is lost);
a second signal closes them at once.

SIGHUP reloads the certificate and, when :func:`serve` is given
``reload_settings`` (``pop3d serve`` gives it), the settings: what can
change under running servers (the passwd-file, limits, timeouts, the log
level...) is applied with each server's ``configure``; what cannot (the
listen addresses, the user) is logged as needing a restart.  :func:`check`
makes the checks :func:`serve` makes before it serves, for ``pop3d
check-config``.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pwd
import resource
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from . import logs
from . import server as server_module
from .errors import OptionError, Pop3dError
from .maildir import MaildirStorage
from .networks import format_networks, is_loopback
from .options import ServerOptions, validate_options
from .passwd import PasswdFile
from .penalties import PenaltyBox
from .privileges import Identity, drop, plan
from .server import Server
from .settings import ServeSettings, SettingsError, format_value
from .tls import TLSError, server_context

if TYPE_CHECKING:
    from .etcd_locks import EtcdLocks
    from .sql_passdb import SqlPassdb

__all__ = ["Running", "check", "demo_data_dir", "serve"]

log = logging.getLogger("pop3d")

# A Maildir session holds its socket, the Maildir, cur/, new/ and the lock file open.
FILES_PER_SESSION = 5


def demo_data_dir() -> Path:
    """A writable copy of the demo data (a user and a welcome message).

    Made on first use under ``$XDG_DATA_HOME/pop3d/demo`` (``~/.local/share``
    by default); deleting it brings the welcome message back next time.  The
    home is the running user's: after ``--user`` drops root, that is the new
    user's (root's ``$HOME`` is not theirs).  With no home of its own (as
    ``nobody``), the copy goes to a private temporary directory, removed at exit.
    """
    base = _data_home()
    if base is not None:
        try:
            return _copy_demo(base / "pop3d" / "demo")
        except PermissionError:
            pass
    staging = Path(tempfile.mkdtemp(prefix="pop3d-demo-"))
    atexit.register(shutil.rmtree, staging, True)
    target = _copy_demo(staging / "demo")
    log.info("no writable home for the demo data: using %s until pop3d stops", target)
    return target


def _data_home() -> Path | None:
    """``$XDG_DATA_HOME``, or ``.local/share`` in a home directory that belongs to the running user."""
    if xdg := os.environ.get("XDG_DATA_HOME"):
        return Path(xdg)
    homes = [os.environ.get("HOME")]
    with contextlib.suppress(KeyError):
        homes.append(pwd.getpwuid(os.geteuid()).pw_dir)
    for home in homes:
        with contextlib.suppress(OSError):
            if home and os.stat(home).st_uid == os.geteuid():
                return Path(home) / ".local" / "share"
    return None


def _copy_demo(target: Path) -> Path:
    if not target.exists():
        source = resources.files("pop3d") / "demo"
        with resources.as_file(source) as path:
            staging = target.with_name(f".demo-{os.getpid()}")
            shutil.copytree(path, staging, dirs_exist_ok=True)
            for sub in ("cur", "new", "tmp"):
                (staging / "mail" / "demo" / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
            os.replace(staging, target)
        log.info("made the demo data directory %s", target)
    return target


@dataclass
class Running:
    """What :func:`serve` reports once everything listens."""

    servers: list[Server]
    admin_url: str | None
    shutdown: trio.Event
    pop3_addresses: list[tuple[str, int]] = field(default_factory=list)


def check(settings: ServeSettings) -> None:
    """Check ``settings`` as :func:`serve` would, without binding a port or serving.

    The admin token and address, the user and group to run as, the
    passwd-file, the certificate and key, and every server option; raises
    :class:`~pop3d.errors.Pop3dError` (one line) for the first problem.
    Files are read as the calling user: run as root with ``user`` set,
    :func:`serve` reads them after dropping root, which may see less.
    """
    _check_startup(settings)
    if settings.users is not None:
        PasswdFile(settings.users)
    if settings.passdb_sql is not None:
        with _sql_passdb(settings) as passdb:
            passdb.check()
    _check_server_options(settings)
    if settings.tls_cert is not None and settings.tls_key is not None:
        try:
            server_context(settings.tls_cert, settings.tls_key)
        except TLSError as exc:
            raise SettingsError(f"tls-cert: {exc}") from None
    _warn_if_no_login_possible(settings)


def _check_startup(settings: ServeSettings) -> tuple[str | None, str | None, Identity | None]:
    """The checks before anything listens: ``(token, admin address or None, identity to drop to)``."""
    token = settings.token()
    admin_bind = None if settings.no_admin or settings.admin is None else str(settings.admin)
    if admin_bind is not None:
        from pop3d.admin.access import check_bind  # the admin API is optional at import time

        check_bind(admin_bind, token=token)  # refuse before anything listens
        if settings.admin_cors_origin and not token:
            log.warning(
                "admin API has no token: pages from %s can use it from a browser on this host",
                ", ".join(settings.admin_cors_origin),
            )
    identity = plan(
        settings.user,
        settings.group,
        allow_root=settings.allow_root,
        serves_mail=settings.users is not None or settings.mail_root is not None or settings.passdb_sql is not None,
    )
    return token, admin_bind, identity


def _check_server_options(settings: ServeSettings) -> None:
    """The server options of ``settings``, validated as ``configure`` will (TLS files aside)."""
    kinds = [False] * len(settings.listen) + [True] * len(settings.listen_tls)
    for implicit_tls in dict.fromkeys(kinds):
        try:
            validate_options(ServerOptions(), {**_options_of(settings), "implicit_tls": implicit_tls})
        except OptionError as exc:
            raise _setting_error(exc) from None


async def serve(
    settings: ServeSettings,
    *,
    handle_signals: bool = True,
    reload_settings: Callable[[], ServeSettings] | None = None,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run POP3 servers (and the admin API) until the shutdown trigger fires.

    With ``handle_signals``, SIGHUP reloads the certificate and, if
    ``reload_settings`` is given, calls it for new settings and applies
    what can change without a restart (see the module's docstring).
    """
    if handle_signals:
        # Until the signal watcher runs, a SIGHUP (a renewal hook, say) must not end the process.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    token, admin_bind, identity = _check_startup(settings)
    users, mail_root = settings.users, settings.mail_root
    _raise_file_limit(settings.max_connections * len([*settings.listen, *settings.listen_tls]))
    # Bind as root, then drop root before anything is served or read: the
    # passwd-file, the TLS key and the Maildirs are opened as the user that
    # will open them again (on SIGHUP, at each login).
    bound = [
        await server_module.open_listeners(address.host, address.port)
        for address in [*settings.listen, *settings.listen_tls]
    ]
    if identity is not None:
        drop(identity)
    passdb = None
    if settings.passdb_sql is not None:
        passdb = _sql_passdb(settings)
        # A one-line error now if the database cannot be reached, rather than SYS/TEMP at every login.
        await trio.to_thread.run_sync(passdb.check, abandon_on_cancel=True)
    elif users is None or mail_root is None:
        demo = demo_data_dir()
        users = users or demo / "users"
        mail_root = mail_root or demo / "mail"
        log.info("serving the demo data in %s (user demo, password demo)", demo)
    assert mail_root is not None  # passdb-sql requires mail-root (settings)
    auth: PasswdFile | SqlPassdb
    if passdb is not None:
        auth = passdb
    else:
        assert users is not None
        auth = PasswdFile(users)
    storage = MaildirStorage(mail_root, dovecot_uidl_format=settings.dovecot_uidl_format)
    # One box for every listener: moving from POP3 to POP3S gains a guesser nothing.
    penalties = PenaltyBox(max_delay=settings.penalty_max)
    common: dict[str, object] = {
        "auth": auth,
        "storage": storage,
        "penalties": penalties,
        **_options_of(settings),
    }

    servers: list[Server] = []
    shutdown = trio.Event()
    force = trio.Event()
    try:
        for kind, addresses in (("pop3", settings.listen), ("pop3s", settings.listen_tls)):
            for number, address in enumerate(addresses, start=1):
                srv = server_module.new(kind if number == 1 else f"{kind}-{number}")
                servers.append(srv)
                _configure(srv, host=address.host, port=address.port, implicit_tls=kind == "pop3s", **common)
        _warn_if_no_login_possible(settings)
        live = _Live(settings, servers, penalties, reload_settings)
        async with trio.open_nursery() as nursery:
            if handle_signals:
                nursery.start_soon(_watch_signals, shutdown.set, force.set, live.reload)
            locks = _mailbox_locks(settings)
            if locks is not None:
                await nursery.start(locks.run)  # a one-line error if the lock service cannot be reached
                for srv in servers:
                    srv.mailbox_locks = locks
            for srv, listeners in zip(servers, bound, strict=True):
                await nursery.start(srv.run)
                await srv.up(listeners=listeners)
            admin_url = None
            if admin_bind is not None:
                from pop3d.admin.access import cors_of
                from pop3d.admin.app import create_app
                from pop3d.admin.serve import serve_admin

                app = create_app(
                    token=token,
                    cors_origins=settings.admin_cors_origin,
                    instance=settings.instance_name or socket.gethostname(),
                )
                live.admin_cors = cors_of(app)
                admin_url = await nursery.start(_serve_admin, serve_admin, app, admin_bind, shutdown)
            running = Running(servers, admin_url, shutdown)
            for srv in servers:
                running.pop3_addresses += srv.addresses()
            pop3 = " ".join(f"{srv.name}={_fmt(host, port)}" for srv in servers for host, port in srv.addresses())
            log.info("ready %s admin=%s", pop3, admin_url or "off")
            task_status.started(running)
            await shutdown.wait()
            await _shut_down(servers, live.settings.grace_period, force)
            nursery.cancel_scope.cancel()  # the signal watcher
    finally:
        with trio.CancelScope(shield=True):
            for srv in servers:
                await srv.destroy("kill")
            for listeners in bound:  # those no server took up (a start that failed)
                for listener in listeners:
                    await trio.aclose_forcefully(listener)
            if passdb is not None:
                await trio.to_thread.run_sync(passdb.close)
    log.info("stopped")


# Settings that are server options of the same name.
_SERVER_OPTIONS = (
    "idle_timeout",
    "login_timeout",
    "cleartext_auth_from",
    "proxy_protocol_from",
    "max_connections",
    "max_connections_per_ip",
    "max_userip_connections",
    "max_logins_per_ip",
    "max_auth_failures",
    "login_failure_delay",
)


def _raise_file_limit(connections: int) -> None:
    """Let the process open as many files as it may: each session holds about five (socket, Maildir, lock)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    needed = connections * FILES_PER_SESSION + 100
    if soft < needed:
        log.warning(
            "the open-file limit is %d, but %d connections may need %d: raise it (ulimit -n, or LimitNOFILE= "
            "in a systemd unit) or lower max-connections",
            soft,
            connections,
            needed,
        )


def _options_of(settings: ServeSettings) -> dict[str, object]:
    """The server options ``settings`` set (all but ``auth``, ``storage``, ``penalties`` and the address)."""
    return {
        "apop": settings.apop,
        "tls_cert": settings.tls_cert,
        "tls_key": settings.tls_key,
        # The server's own default when none is given, so that a reload can go back to it.
        "hostname": settings.hostname or socket.gethostname(),
        **{name: getattr(settings, name) for name in _SERVER_OPTIONS},
    }


def _sql_passdb(settings: ServeSettings) -> SqlPassdb:
    """The PostgreSQL users of ``settings.passdb_sql`` (not connected yet)."""
    from .sql_passdb import DEFAULT_QUERY, SqlPassdb  # psycopg only where users are in PostgreSQL

    assert settings.passdb_sql is not None
    password = None
    if settings.passdb_sql_password_file is not None:
        path = settings.passdb_sql_password_file
        try:
            password = path.read_text(encoding="utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise SettingsError(f"passdb-sql-password-file: {path} is not UTF-8 text") from None
        if not password:
            raise SettingsError(f"passdb-sql-password-file: {path} is empty")
    return SqlPassdb(
        settings.passdb_sql.get_secret_value(), query=settings.passdb_sql_query or DEFAULT_QUERY, password=password
    )


def _mailbox_locks(settings: ServeSettings) -> EtcdLocks | None:
    """The cluster's lock service (``lock = etcd``), or None: each storage's own lock (``local``)."""
    if settings.lock != "etcd":
        return None
    from .etcd_locks import EtcdLocks

    return EtcdLocks(
        settings.etcd,
        ttl=settings.lock_ttl,
        prefix=settings.lock_prefix,
        instance=settings.instance_name or socket.gethostname(),
    )


def _setting_error(exc: OptionError) -> SettingsError:
    return SettingsError("; ".join(f"{name.replace('_', '-')}: {message}" for name, message in exc.errors))


def _configure(srv: Server, **options: object) -> None:
    """Configure ``srv``; a bad option is a one-line error named as ``pop3d serve`` names it."""
    try:
        srv.configure(**options)
    except OptionError as exc:
        raise _setting_error(exc) from None


def _warn_if_no_login_possible(settings: ServeSettings) -> None:
    if settings.tls_cert is not None:
        return
    exposed = [str(address) for address in settings.listen if address.host is None or not is_loopback(address.host)]
    if not exposed:
        return
    where = ", ".join(exposed)
    networks = settings.cleartext_auth_from
    if not networks:
        log.warning("no TLS certificate: on %s, no client can log in (give tls-cert and tls-key)", where)
    elif any(network.prefixlen == 0 for network in networks):
        if settings.users is None and settings.passdb_sql is None:  # the demo: its password and mail are public
            log.info("serving the demo without TLS on %s: its password is public, so it may go in clear", where)
        else:
            log.warning(
                "no TLS certificate: on %s, every client sends its password in clear (give tls-cert and tls-key)",
                where,
            )
    else:
        log.warning(
            "no TLS certificate: on %s, only clients from %s can log in (give tls-cert and tls-key)",
            where,
            format_networks(networks),
        )


# Settings a reload applies to running servers; any other change needs a restart.
_RELOADABLE = frozenset(
    {
        *_SERVER_OPTIONS,
        "users",
        "hostname",
        "apop",
        "tls_cert",
        "tls_key",
        "penalty_max",
        "grace_period",
        "log_level",
        "log_format",
        "admin_cors_origin",
    }
)


class _Live:
    """The settings in effect, and SIGHUP's reload of them."""

    def __init__(
        self,
        settings: ServeSettings,
        servers: list[Server],
        penalties: PenaltyBox,
        load: Callable[[], ServeSettings] | None,
    ) -> None:
        self.settings = settings
        self._servers = servers
        self._penalties = penalties
        self._load = load
        # The admin API's CorsOrigins (pop3d.admin.access), once it runs: a reload replaces its origins.
        self.admin_cors: Any = None

    def reload(self) -> None:
        """SIGHUP: new settings where they can change, then the certificate read again."""
        log.info(
            "got SIGHUP: reloading %s",
            "the TLS certificate" if self._load is None else "the settings and the TLS certificate",
        )
        if self._load is not None:
            try:
                self._apply(self._load())
            except (Pop3dError, OSError) as exc:
                log.error("reload: keeping the old settings: %s", _one_line(exc))
            except Exception:  # a reload must never take the server down
                log.exception("reload: keeping the old settings")
        # Even after a bad settings file: a renewed certificate must not wait for it to be fixed.
        _reload_tls(self._servers)

    def _apply(self, new: ServeSettings) -> None:
        old = self.settings
        changed = [
            (name, _shown(name, getattr(old, name)), _shown(name, getattr(new, name)))
            for name in ServeSettings.model_fields
            if _shown(name, getattr(old, name)) != _shown(name, getattr(new, name))
        ]
        # To or from the demo data (no users given) changes the mail root too: a restart.
        demo = old.users is None or new.users is None
        fixed = [item for item in changed if item[0] not in _RELOADABLE or (item[0] == "users" and demo)]
        applied = [item for item in changed if item not in fixed]
        for name, before, after in fixed:
            log.warning(
                "reload: %s %s -> %s needs a restart; keeping %s",
                name,
                before or "none",
                after or "none",
                before or "none",
            )
        # The new settings, but with what needs a restart as it is.
        effective = new.model_copy(update={name: getattr(old, name) for name, _, _ in fixed})
        names = {name for name, _, _ in applied}
        options: dict[str, object] = {}
        if names & {*_SERVER_OPTIONS, "hostname", "apop", "tls_cert", "tls_key"}:
            _check_server_options(effective)
            options.update(_options_of(effective))
        if "users" in names:
            assert effective.users is not None
            options["auth"] = PasswdFile(effective.users)  # an unreadable file fails here, before any change
        if options:
            self._configure_all(options)
        if "penalty_max" in names:
            self._penalties.max_delay = effective.penalty_max
        if "log_format" in names:
            logs.set_format(effective.log_format)
        if "log_level" in names:
            logs.set_level(effective.log_level)
        if "max_connections" in names:
            _raise_file_limit(effective.max_connections * len(self._servers))
        if "admin_cors_origin" in names and self.admin_cors is not None:
            # One attribute swapped between requests: a request sees the old set or the new, never half.
            self.admin_cors.replace(effective.admin_cors_origin)
        self.settings = effective
        if applied:
            log.info(
                "reload: %s",
                ", ".join(f"{name} {before or 'none'} -> {after or 'none'}" for name, before, after in applied),
            )
        else:
            log.info("reload: nothing changed")

    def _configure_all(self, options: dict[str, object]) -> None:
        """``configure`` every live server with ``options``: all of them, or (on an error) none."""
        servers = [srv for srv in self._servers if not srv.destroyed]
        cert, key = options.get("tls_cert"), options.get("tls_key")
        if isinstance(cert, Path) and isinstance(key, Path):
            try:  # before any server changes: configure would fail at the second server, not the first
                server_context(cert, key)
            except TLSError as exc:
                raise SettingsError(f"tls-cert: {exc}") from None
        for srv in servers:
            try:  # all or nothing across servers, not only within one
                validate_options(srv.options, options)
            except OptionError as exc:
                raise _setting_error(exc) from None
        for srv in servers:
            _configure(srv, **options)


def _shown(name: str, value: object) -> str:
    """A setting's value for the reload log line: as in TOML, but a string without its quotes."""
    text = format_value(name, value)
    return text[1:-1] if text.startswith('"') else text


def _one_line(exc: BaseException) -> str:
    text = f"{exc.filename}: {exc.strerror}" if isinstance(exc, OSError) and exc.filename else str(exc)
    return " ".join(text.split())


def _reload_tls(servers: list[Server]) -> None:
    """SIGHUP: the servers read their certificate again; a bad one leaves the old in use."""
    try:
        if not server_module.reload_tls(servers):
            log.info("no TLS certificate to reload")
    except TLSError as exc:
        log.error("keeping the old certificate: %s", exc)


async def _serve_admin(
    serve_admin: Callable[..., object],
    app: object,
    bind: str,
    shutdown: trio.Event,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve_admin(app, bind, shutdown_trigger=shutdown.wait, task_status=task_status)  # type: ignore[misc]


def _fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _shut_down(servers: list[Server], grace: float, force: trio.Event) -> None:
    alive = [srv for srv in servers if not srv.destroyed]
    open_sessions = sum(len(srv.conn_list()) for srv in alive)
    log.info("shutting down: %d open sessions get %.0f s to finish", open_sessions, grace)
    async with trio.open_nursery() as nursery:
        for srv in alive:
            nursery.start_soon(srv.down)
    with trio.move_on_after(grace):
        async with trio.open_nursery() as nursery:

            async def forced() -> None:
                await force.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(forced)
            async with trio.open_nursery() as destroys:
                for srv in alive:
                    destroys.start_soon(srv.destroy, "defer")
            nursery.cancel_scope.cancel()  # all drained: stop watching for force
    left = sum(len(srv.conn_list()) for srv in alive if not srv.destroyed)
    if left:
        log.warning("closing %d sessions that did not finish; their deletions are not applied", left)
    for srv in alive:
        await srv.destroy("kill")


async def _watch_signals(first: Callable[[], None], second: Callable[[], None], reload: Callable[[], None]) -> None:
    # SIGHUP is caught too: its default would end the process.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        count = 0
        async for signum in signals:
            if signum == signal.SIGHUP:
                reload()
                continue
            count += 1
            log.info("got %s%s", signal.Signals(signum).name, "" if count == 1 else ": closing sessions now")
            (first if count == 1 else second)()
