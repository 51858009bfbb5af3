"""Serve the admin API with Hypercorn's Trio worker, inside the caller's nursery.

The ``pop3d serve`` command starts it next to its POP3 servers with the
same shutdown trigger, so one signal stops both::

    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        url = await nursery.start(
            functools.partial(serve_admin, create_app(token=token), "127.0.0.1:8110", shutdown_trigger=stop.wait)
        )
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, cast

import trio
from hypercorn.config import Config
from hypercorn.logging import Logger
from hypercorn.trio import serve
from hypercorn.typing import Framework, ResponseSummary, WWWScope
from quart_trio import QuartTrio

from .access import refuse_unprotected, split_bind
from .events import stop_streams
from .routes import settings_of

__all__ = ["ACCESS_LOG_FORMAT", "hypercorn_config", "serve_admin"]

log = logging.getLogger("pop3d.admin")

#: One line per request: client, method, path and query, status, body bytes, duration.
ACCESS_LOG_FORMAT = "%(h)s %(m)s %(Uq)s %(s)s %(b)s %(D)sus"


class _AccessLog(Logger):
    """Hypercorn's logger, with one access line per request.

    Hypercorn also logs a line without a status when the client closes its
    end before the response is marked complete, which curl does as soon as
    it has read Content-Length bytes: that line comes before the real one.
    Such lines go to DEBUG, where a request the client really abandoned
    still shows.
    """

    async def access(self, request: WWWScope, response: ResponseSummary | None, request_time: float) -> None:
        if response is not None:
            await super().access(request, response, request_time)
        elif self.access_logger is not None:
            self.access_logger.debug(
                self.access_log_format + " (client closed first)", self.atoms(request, response, request_time)
            )


def hypercorn_config(bind: str) -> Config:
    """Hypercorn's configuration for the admin API on ``bind`` (``HOST:PORT``)."""
    host, port = split_bind(bind)
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    # Hypercorn's own loggers write to stdout and stderr; the admin API logs
    # where the rest of pop3d does, and the application decides the handlers.
    config.accesslog = log
    config.errorlog = log
    config.access_log_format = ACCESS_LOG_FORMAT
    config.logger_class = _AccessLog
    config.include_server_header = False
    return config


async def serve_admin(
    app: QuartTrio,
    bind: str,
    *,
    shutdown_trigger: Callable[..., Awaitable[Any]],
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``bind`` (``HOST:PORT``, port 0 allowed) until ``shutdown_trigger`` returns.

    Start it with ``await nursery.start(...)``: it reports the URL it
    listens on (``"http://127.0.0.1:8110"``), with the real port.  Like
    :func:`admin.check_bind`, it refuses a non-loopback address unless the
    app has a token (:class:`admin.AdminAccessError`), before binding.  An
    address in use raises :class:`OSError`.
    """
    protected = settings_of(app).token is not None
    refuse_unprotected(bind, protected=protected)

    async def trigger() -> None:
        await shutdown_trigger()
        # Event streams never end by themselves; Hypercorn would wait for them.
        stop_streams(app)

    # QuartTrio is an ASGI app; Hypercorn's Framework type does not see it as one.
    hypercorn = partial(serve, cast(Framework, app), hypercorn_config(bind), shutdown_trigger=trigger)
    async with trio.open_nursery() as nursery:
        urls: list[str] = await nursery.start(hypercorn)
        # One bind is one socket, so one URL.
        url = urls[0]
        log.info("admin API listening on %s (%s)", url, "token required" if protected else "no token")
        task_status.started(url)
    log.info("admin API stopped")
