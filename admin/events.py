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

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Literal

import trio
from pydantic import BaseModel, Field
from quart import Blueprint, Quart, Response, current_app
from quart_schema import tag

import pop3d
from pop3d.changes import changes
from pop3d.penalties import distinct_boxes
from pop3d.server import Server

from .errors import ApiError
from .models import IsoDatetime, PenaltyView, ServerSummary
from .openapi import errors, text_content

__all__ = [
    "COALESCE",
    "LOAD_FACTOR",
    "MAX_SESSIONS_SHOWN",
    "MAX_STREAMS",
    "REFRESH",
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
#: A stream waits at least this many times the last snapshot's cost before the next.
LOAD_FACTOR = 4
#: Event streams open at once, at most (429 beyond).
MAX_STREAMS = 8
#: The newest open connections of each server a snapshot lists (all are counted).
MAX_SESSIONS_SHOWN = 500
#: Penalties a snapshot lists, worst first.
MAX_PENALTIES_SHOWN = 500
FEED_EXTENSION = "pop3d.admin.events"

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
    marked: int = Field(description="Messages marked for deletion.")
    started: IsoDatetime
    last_activity: IsoDatetime


class ServerView(ServerSummary):
    """A server, its totals so far (rates are their differences) and its newest open connections."""

    sessions_total: int = Field(description="Sessions begun since the server object was made.")
    logins_ok: int
    logins_failed: int
    sessions_count: int = Field(description="Open connections (all of them).")
    sessions_truncated: bool = Field(description=f"Whether sessions lists only the newest {MAX_SESSIONS_SHOWN}.")
    sessions: list[SessionView]

    @classmethod
    def of(cls, server: Server) -> ServerView:
        """The view of ``server`` now."""
        ids = server.conn_list()
        shown = ids[-MAX_SESSIONS_SHOWN:]  # ids are in the order the connections came
        sessions = [SessionView.model_construct(**server.session(conn_id).overview()) for conn_id in shown]
        stats = server.stats
        return cls.model_construct(
            **dict(ServerSummary.of(server)),
            sessions_total=stats.sessions,
            logins_ok=stats.logins_ok,
            logins_failed=stats.logins_failed,
            sessions_count=len(ids),
            sessions_truncated=len(ids) > len(shown),
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
        boxes = distinct_boxes(server.options.penalties for server in pop3d.servers().values())
        penalties = [PenaltyView.of(entry) for box in boxes for entry in box.entries()[:MAX_PENALTIES_SHOWN]]
        penalties.sort(key=lambda view: (-view.failures, view.kind, view.key))
        return cls.model_construct(at=datetime.now(UTC), servers=servers, penalties=penalties[:MAX_PENALTIES_SHOWN])


class _Feed:
    """The app's one snapshot, made once per change and sent to every stream, and who is streaming.

    Snapshots run on the event loop the POP3 sessions share, so they are
    bounded: one per change whatever the number of streams, at most
    :data:`MAX_STREAMS` streams, and each stream waits at least
    :data:`LOAD_FACTOR` times what the last snapshot cost before the next, so
    that a busy server spends at most a small share of its time on them.
    """

    def __init__(self) -> None:
        self.stopping = trio.Event()
        self.streams = 0
        self._made_at = -1  # the change count the bytes are of
        self._bytes = b""
        self.cost = 0.0  # seconds the last snapshot took

    def event(self) -> bytes:
        seen = changes.count
        if seen != self._made_at:
            began = time.perf_counter()
            snapshot = Snapshot.now().model_dump_json()
            self._bytes = f"event: snapshot\nid: {seen}\ndata: {snapshot}\n\n".encode()
            self._made_at = seen
            self.cost = time.perf_counter() - began
        return self._bytes


def _feed(app: Quart) -> _Feed:
    feed = app.extensions.get(FEED_EXTENSION)
    if feed is None:
        feed = app.extensions[FEED_EXTENSION] = _Feed()
    assert isinstance(feed, _Feed)
    return feed


def stopping(app: Quart) -> trio.Event:
    """Set (with :func:`stop_streams`) when the app stops serving: open event streams then end."""
    return _feed(app).stopping


def stop_streams(app: Quart) -> None:
    """End the app's open event streams (the admin API is shutting down)."""
    stopping(app).set()
    changes.notify()  # wakes them


async def _snapshots(feed: _Feed) -> AsyncIterator[bytes]:
    # Counted once it runs: a generator that never starts never runs its finally either.
    feed.streams += 1
    try:
        while not feed.stopping.is_set():
            seen = changes.count
            yield feed.event()
            with trio.move_on_after(REFRESH):
                await changes.wait_past(seen)  # the stop notifies too
                if not feed.stopping.is_set():
                    await trio.sleep(max(COALESCE, LOAD_FACTOR * feed.cost))
    finally:
        feed.streams -= 1


@blueprint.get("/events")
@tag(["monitoring"])
@errors(429)
@text_content(
    200,
    "Server-sent events: one `snapshot` event (a Snapshot as JSON in `data`) now, then one within "
    f"{COALESCE} s of each change (later when snapshots get costly) and every {REFRESH:.0f} s anyway.",
    ("text/event-stream",),
    event_data=Snapshot,
)
async def events() -> Response:
    """A live stream of snapshots of every server, connection and penalty (server-sent events)."""
    feed = _feed(current_app)
    if feed.streams >= MAX_STREAMS:
        raise ApiError(429, f"{MAX_STREAMS} event streams are open already: close one first")
    response = current_app.response_class(
        _snapshots(feed),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
    response.timeout = None  # an event stream stays open
    return response
