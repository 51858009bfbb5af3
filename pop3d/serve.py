"""``pop3d serve``: POP3 servers and the admin API in one Trio nursery.

:func:`serve` builds one server object per ``--listen`` address (the first
is named ``pop3``, the others ``pop3-2``, ``pop3-3``, ...) and per
``--listen-tls`` address (``pop3s``, ``pop3s-2``, ...), all sharing one
passwd-file, one Maildir root and one certificate, and the admin API beside
them.  One shutdown trigger stops everything: the first SIGTERM or SIGINT
stops accepting, gives open sessions ``grace_period`` seconds to finish,
then closes the rest (their deletions are not applied, so no mail is lost);
a second signal closes them at once.  SIGHUP reloads the certificate.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import trio

from . import server as server_module
from .errors import OptionError
from .maildir import MaildirStorage
from .networks import format_networks, is_loopback
from .passwd import PasswdFile
from .penalties import PenaltyBox
from .privileges import drop, plan
from .server import Server
from .settings import ServeSettings, SettingsError
from .tls import TLSError

__all__ = ["Running", "demo_data_dir", "serve"]

log = logging.getLogger("pop3d")

# A Maildir session holds its socket, the Maildir, cur/, new/ and the lock file open.
FILES_PER_SESSION = 5


def demo_data_dir() -> Path:
    """A writable copy of the demo data (a user and a welcome message).

    Made on first use under ``$XDG_DATA_HOME/pop3d/demo`` (``~/.local/share``
    by default); deleting it brings the welcome message back next time.
    """
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    target = base / "pop3d" / "demo"
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


async def serve(
    settings: ServeSettings,
    *,
    handle_signals: bool = True,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run POP3 servers (and the admin API) until the shutdown trigger fires."""
    if handle_signals:
        # Until the signal watcher runs, a SIGHUP (a renewal hook, say) must not end the process.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    token = settings.token()
    admin_bind = None if settings.no_admin or settings.admin is None else str(settings.admin)
    if admin_bind is not None:
        from admin.access import check_bind  # the admin API is optional at import time

        check_bind(admin_bind, token=token)  # refuse before anything listens
    users, mail_root = settings.users, settings.mail_root
    identity = plan(
        settings.user,
        settings.group,
        allow_root=settings.allow_root,
        serves_mail=users is not None or mail_root is not None,
    )
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
    if users is None or mail_root is None:
        demo = demo_data_dir()
        users = users or demo / "users"
        mail_root = mail_root or demo / "mail"
        log.info("serving the demo data in %s (user demo, password demo)", demo)
    auth = PasswdFile(users)
    storage = MaildirStorage(mail_root)
    common: dict[str, object] = {
        "auth": auth,
        "storage": storage,
        "apop": settings.apop,
        "tls_cert": settings.tls_cert,
        "tls_key": settings.tls_key,
        # One box for every listener: moving from POP3 to POP3S gains a guesser nothing.
        "penalties": PenaltyBox(max_delay=settings.penalty_max),
        **{name: getattr(settings, name) for name in _SERVER_OPTIONS},
    }
    if settings.hostname:
        common["hostname"] = settings.hostname

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
        async with trio.open_nursery() as nursery:
            if handle_signals:
                nursery.start_soon(_watch_signals, shutdown.set, force.set, lambda: _reload_tls(servers))
            for srv, listeners in zip(servers, bound, strict=True):
                await nursery.start(srv.run)
                await srv.up(listeners=listeners)
            admin_url = None
            if admin_bind is not None:
                from admin.app import create_app
                from admin.serve import serve_admin

                app = create_app(token=token)
                admin_url = await nursery.start(_serve_admin, serve_admin, app, admin_bind, shutdown)
            running = Running(servers, admin_url, shutdown)
            for srv in servers:
                running.pop3_addresses += srv.addresses()
            pop3 = " ".join(f"{srv.name}={_fmt(host, port)}" for srv in servers for host, port in srv.addresses())
            log.info("ready %s admin=%s", pop3, admin_url or "off")
            task_status.started(running)
            await shutdown.wait()
            await _shut_down(servers, settings.grace_period, force)
            nursery.cancel_scope.cancel()  # the signal watcher
    finally:
        with trio.CancelScope(shield=True):
            for srv in servers:
                await srv.destroy("kill")
            for listeners in bound:  # those no server took up (a start that failed)
                for listener in listeners:
                    await trio.aclose_forcefully(listener)
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


def _configure(srv: Server, **options: object) -> None:
    """Configure ``srv``; a bad option is a one-line error named as ``pop3d serve`` names it."""
    try:
        srv.configure(**options)
    except OptionError as exc:
        raise SettingsError("; ".join(f"{name.replace('_', '-')}: {message}" for name, message in exc.errors)) from None


def _warn_if_no_login_possible(settings: ServeSettings) -> None:
    if settings.tls_cert is not None:
        return
    exposed = [str(address) for address in settings.listen if address.host is None or not is_loopback(address.host)]
    if exposed:
        log.warning(
            "no TLS certificate: on %s, only clients from %s can log in (give tls-cert and tls-key)",
            ", ".join(exposed),
            format_networks(settings.cleartext_auth_from),
        )


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
                log.info("got SIGHUP: reloading the TLS certificate")
                reload()
                continue
            count += 1
            log.info("got %s%s", signal.Signals(signum).name, "" if count == 1 else ": closing sessions now")
            (first if count == 1 else second)()
