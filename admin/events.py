"""``GET /events``: the whole picture, pushed as it changes (server-sent events).

Each event is a :class:`Snapshot`: every server with its counters and open
connections, and every penalty.  A new one follows within
:data:`COALESCE` seconds of a change that :mod:`pop3d.changes` reports (a
connection opening or closing, a command, a server going up or down, an
option or a penalty changing), and every :data:`REFRESH` seconds anyway,
so that idle times and a dropped proxy connection show.  The control page
at ``/ui`` lives on it, and a dashboard can too::

    curl -N -H "Authorization: Bearer $POP3D_ADMIN_TOKEN" http://127.0.0.1:8110/events

The stream ends when the admin API shuts down (:func:`stopping`), so an open
page never holds up a stop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Literal

import trio
from pydantic import BaseModel, Field
from quart import Blueprint, Quart, Response, current_app
from quart_schema import tag

import pop3d
from pop3d.changes import changes
from pop3d.penalties import PenaltyBox
from pop3d.server import Server

from .models import IsoDatetime, PenaltyView, ServerSummary
from .openapi import text_content

__all__ = [
    "COALESCE",
    "REFRESH",
    "STOPPING_EXTENSION",
    "ServerView",
    "SessionView",
    "Snapshot",
    "blueprint",
    "stop_streams",
    "stopping",
]

#: A burst of changes (a client's pipelined commands, say) makes one event.
COALESCE = 0.2
#: With no change, a new snapshot this often (seconds).
REFRESH = 5.0
STOPPING_EXTENSION = "pop3d.admin.stopping"

blueprint = Blueprint("events", __name__)


class SessionView(BaseModel):
    """One open connection, with what its session is doing."""

    id: str = Field(description="The connection id, as in conn_list.")
    user: str | None = Field(description="The user, once given.")
    remote_host: str
    remote_port: int
    tls: bool
    tls_version: str | None
    state: str = Field(description="auth, trans, update or closed.")
    messages: int = Field(description="Messages in the maildrop (0 before login).")
    octets: int = Field(description="Octets in the maildrop.")
    deleted: list[int] = Field(description="Messages marked for deletion.")
    started: IsoDatetime
    last_activity: IsoDatetime

    @classmethod
    def of(cls, state: dict[str, Any]) -> SessionView:
        """The view of a connection from its ``conn_state``."""
        return cls(
            id=state["connection"],
            user=state["name"] or None,
            remote_host=state["remotehost"],
            remote_port=state["remoteport"],
            tls=state["tls"],
            tls_version=state["tls_version"],
            state=state["state"],
            messages=state["msg"],
            octets=state["size"],
            deleted=state["deleted"],
            started=state["started"],
            last_activity=state["last_activity"],
        )


class ServerView(ServerSummary):
    """A server, its totals so far (rates are their differences) and its open connections."""

    sessions_total: int = Field(description="Sessions begun since the server object was made.")
    logins_ok: int
    logins_failed: int
    sessions: list[SessionView]

    @classmethod
    def of(cls, server: Server) -> ServerView:
        """The view of ``server`` now."""
        sessions = []
        for conn_id in server.conn_list():
            try:
                sessions.append(SessionView.of(server.conn_state(conn_id)))
            except pop3d.UnknownConnection:
                continue  # ended while the list was read
        stats = server.stats
        return cls(
            **ServerSummary.of(server).model_dump(),
            sessions_total=stats.sessions,
            logins_ok=stats.logins_ok,
            logins_failed=stats.logins_failed,
            sessions=sessions,
        )


class Snapshot(BaseModel):
    """Everything the control page shows, at one moment."""

    type: Literal["snapshot"] = "snapshot"
    at: IsoDatetime
    servers: list[ServerView]
    penalties: list[PenaltyView]

    @classmethod
    def now(cls) -> Snapshot:
        """The snapshot of this process's servers and penalties now."""
        servers = [ServerView.of(server) for _, server in sorted(pop3d.servers().items())]
        boxes: dict[int, PenaltyBox] = {}  # pop3d serve shares one box among its servers
        for server in pop3d.servers().values():
            if (box := server.options.penalties) is not None:
                boxes[id(box)] = box
        penalties = [
            PenaltyView(
                kind=entry.kind,
                key=entry.key,
                failures=entry.failures,
                delay=entry.delay,
                last_failure=datetime.fromtimestamp(entry.last_failure, UTC),
            )
            for box in boxes.values()
            for entry in box.entries()
        ]
        penalties.sort(key=lambda view: (-view.failures, view.kind, view.key))
        return cls(at=datetime.now(UTC), servers=servers, penalties=penalties)


def stopping(app: Quart) -> trio.Event:
    """Set (with :func:`stop_streams`) when the app stops serving: open event streams then end."""
    event = app.extensions.get(STOPPING_EXTENSION)
    if event is None:
        event = app.extensions[STOPPING_EXTENSION] = trio.Event()
    return event


def stop_streams(app: Quart) -> None:
    """End the app's open event streams (the admin API is shutting down)."""
    stopping(app).set()
    changes.notify()  # wakes them


async def _snapshots(stop: trio.Event) -> AsyncIterator[bytes]:
    while not stop.is_set():
        seen = changes.count
        snapshot = Snapshot.now()
        yield f"event: snapshot\nid: {seen}\ndata: {snapshot.model_dump_json()}\n\n".encode()
        with trio.move_on_after(REFRESH):
            await changes.wait_past(seen)  # the stop notifies too
            if not stop.is_set():
                await trio.sleep(COALESCE)


@blueprint.get("/events")
@tag(["monitoring"])
@text_content(
    200,
    "Server-sent events: one `snapshot` event (a Snapshot as JSON in `data`) now, then one within "
    f"{COALESCE} s of each change and every {REFRESH:.0f} s anyway.",
    ("text/event-stream",),
)
async def events() -> Response:
    """A live stream of snapshots of every server, connection and penalty (server-sent events)."""
    response = current_app.response_class(
        _snapshots(stopping(current_app)),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
    response.timeout = None  # an event stream stays open
    return response
