"""``pop3d serve``: POP3 servers and the admin API in one Trio nursery.

:func:`serve` builds one server object per ``--listen`` address (the first
is named ``pop3``, the others ``pop3-2``, ``pop3-3``, ...), all sharing one
passwd-file and one Maildir root, and the admin API beside them.  One
shutdown trigger stops everything: the first SIGTERM or SIGINT stops
accepting, gives open sessions ``grace_period`` seconds to finish, then
closes the rest (their deletions are not applied, so no mail is lost); a
second signal closes them at once.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import trio

from . import server as server_module
from .maildir import MaildirStorage
from .passwd import PasswdFile
from .server import Server
from .settings import ServeSettings

__all__ = ["Running", "demo_data_dir", "serve"]

log = logging.getLogger("pop3d")


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
    token = settings.token()
    admin_bind = None if settings.no_admin or settings.admin is None else str(settings.admin)
    if admin_bind is not None:
        from admin.access import check_bind  # the admin API is optional at import time

        check_bind(admin_bind, token=token)  # refuse before anything listens
    users, mail_root = settings.users, settings.mail_root
    if users is None or mail_root is None:
        demo = demo_data_dir()
        users = users or demo / "users"
        mail_root = mail_root or demo / "mail"
        log.info("serving the demo data in %s (user demo, password demo)", demo)
    auth = PasswdFile(users)
    storage = MaildirStorage(mail_root)

    servers: list[Server] = []
    for number, address in enumerate(settings.listen, start=1):
        srv = server_module.new("pop3" if number == 1 else f"pop3-{number}")
        options: dict[str, object] = {
            "host": address.host,
            "port": address.port,
            "auth": auth,
            "storage": storage,
            "idle_timeout": settings.idle_timeout,
            "apop": settings.apop,
        }
        if settings.hostname:
            options["hostname"] = settings.hostname
        srv.configure(**options)
        servers.append(srv)

    shutdown = trio.Event()
    force = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            if handle_signals:
                nursery.start_soon(_watch_signals, shutdown.set, force.set)
            for srv in servers:
                await nursery.start(srv.run)
                await srv.up()
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
        for srv in servers:
            with trio.CancelScope(shield=True):
                await srv.destroy("kill")
    log.info("stopped")


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


async def _watch_signals(first: Callable[[], None], second: Callable[[], None]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        count = 0
        async for signum in signals:
            count += 1
            log.info("got %s%s", signal.Signals(signum).name, "" if count == 1 else ": closing sessions now")
            (first if count == 1 else second)()
