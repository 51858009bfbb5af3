"""The endpoints of the admin API, over the server objects of this process.

Every route finds its server through :func:`pop3d.get` at request time, so
servers created or destroyed by anyone else are seen at once.  The routes
only translate: the rules (what may be set, which transitions are legal)
stay in :class:`pop3d.Server`, whose exceptions become error responses in
:mod:`pop3d.admin.errors`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

import trio
from prometheus_client import CollectorRegistry
from pydantic import BaseModel
from quart import Blueprint, Quart, Response, current_app, request
from quart_schema import security_scheme, tag, validate_querystring, validate_request, validate_response
from quart_trio import QuartTrio

import pop3d
from pop3d.callbacks import MailboxUnavailable
from pop3d.errors import OptionError
from pop3d.penalties import PenaltyBox, distinct_boxes
from pop3d.server import Server

from .access import BearerToken
from .cluster import unreachable_lock_services
from .errors import ApiError
from .health import not_listening, serving
from .metrics import render
from .models import (
    Closing,
    ConfigPatch,
    ConfigView,
    ConnectionList,
    ConnectionState,
    ConnectionSummary,
    DestroyQuery,
    DestroyResult,
    Health,
    KickQuery,
    OptionValue,
    PenaltyList,
    PenaltyView,
    Readiness,
    ServerList,
    ServerSummary,
    UidlList,
    UidlView,
    describe,
)
from .openapi import body_required, errors, no_content, text_content

__all__ = ["EXTENSION", "AdminSettings", "blueprint", "settings_of"]

EXTENSION = "pop3d.admin"

# How long a request waits for a closing connection before it answers 202
# and lets the rest happen later.
SETTLE_TIMEOUT = 2.0

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

blueprint = Blueprint("admin", __name__)
log = logging.getLogger("pop3d.admin")


@dataclass(frozen=True)
class AdminSettings:
    """What the routes need from the factory, kept in ``app.extensions``."""

    token: BearerToken | None
    registry: CollectorRegistry


def settings_of(app: Quart) -> AdminSettings:
    """The :class:`AdminSettings` of an app made by :func:`admin.create_app`."""
    return cast(AdminSettings, app.extensions[EXTENSION])


def _utf8_json(func: F) -> F:
    """Refuse a body that claims to be JSON but is not UTF-8 (400), before quart-schema decodes it.

    Quart decodes the body as UTF-8 and lets a ``UnicodeDecodeError`` out,
    which would be a 500.  JSON is UTF-8 (RFC 8259), so such a body is
    simply not JSON.  Put it above ``validate_request``.
    """

    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        if request.is_json:
            body = await request.get_data(as_text=False)
            assert isinstance(body, bytes)
            try:
                body.decode()
            except UnicodeDecodeError:
                raise ApiError(400, "the request body is not UTF-8, so not JSON") from None
        return await func(*args, **kwargs)

    return cast(F, wrapper)


def _server(name: str) -> Server:
    try:
        return pop3d.get(name)
    except KeyError:
        raise ApiError(404, f"no server named {name!r}") from None


# -- servers ----------------------------------------------------------------


@blueprint.get("/servers")
@tag(["servers"])
@validate_response(ServerList)
async def list_servers() -> ServerList:
    """Every server object: name, state, true port and open connections."""
    return ServerList(servers=[ServerSummary.of(server) for _, server in sorted(pop3d.servers().items())])


@blueprint.get("/servers/<name>")
@tag(["servers"])
@errors(404)
@validate_response(ServerSummary)
async def get_server(name: str) -> ServerSummary:
    """One server at a glance."""
    return ServerSummary.of(_server(name))


@blueprint.post("/servers/<name>/up")
@tag(["servers"])
@errors(404, 409)
@validate_response(ServerSummary)
async def server_up(name: str) -> ServerSummary:
    """Start listening on the configured host and port (409 if that fails or the server is exiting)."""
    server = _server(name)
    await server.up()
    return ServerSummary.of(server)


@blueprint.post("/servers/<name>/down")
@tag(["servers"])
@errors(404)
@validate_response(ServerSummary)
async def server_down(name: str) -> ServerSummary:
    """Stop listening; open connections carry on."""
    server = _server(name)
    await server.down()
    return ServerSummary.of(server)


async def _destroy_deferred(server: Server, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    try:
        await server.destroy("defer", task_status=task_status)
    except Exception:
        log.exception("deferred destroy of %s failed", server.name)


@blueprint.delete("/servers/<name>")
@tag(["servers"])
@errors(404, 422)
@validate_querystring(DestroyQuery)
@validate_response(DestroyResult, 200)
@validate_response(DestroyResult, 202)
async def destroy_server(name: str, query_args: DestroyQuery) -> tuple[DestroyResult, int]:
    """Destroy the server: ``kill`` closes every connection now (200); ``defer`` stops
    listening and lets open connections finish (202, state ``exiting``; 200 if
    there were none)."""
    server = _server(name)
    if query_args.mode == "kill":
        # Finish what was asked even if the client hangs up; a kill is quick
        # (sessions get a bounded time to unlock their mailboxes).
        with trio.CancelScope(shield=True):
            await server.destroy("kill")
        return DestroyResult(name=name, state="destroyed"), 200
    # destroy("defer") returns only after the last connection has ended, which
    # may be hours away: it runs in the app's nursery, and the request waits
    # only until it has stopped listening.
    app = cast(QuartTrio, current_app)
    await app.nursery.start(_destroy_deferred, server)  # back once it has stopped listening
    if server.destroyed:
        return DestroyResult(name=name, state="destroyed"), 200
    return DestroyResult(name=name, state="exiting"), 202


# -- options ----------------------------------------------------------------


@blueprint.get("/servers/<name>/config")
@tag(["options"])
@errors(404)
@validate_response(ConfigView)
async def get_config(name: str) -> ConfigView:
    """Every option; ``auth`` and ``storage`` show what the callbacks are."""
    return ConfigView.of(_server(name))


@blueprint.patch("/servers/<name>/config")
@tag(["options"])
@errors(400, 404, 409, 422)
@body_required  # a JSON object; {} changes nothing
@_utf8_json
@validate_request(ConfigPatch)
@validate_response(ConfigView)
async def patch_config(name: str, data: BaseModel) -> ConfigView:
    """Set the options given, all or none (422 naming each bad field).  A new port applies at the next up.

    The body is required: a JSON object, ``{}`` to change nothing.  No body,
    or one that is not JSON, is a 422 (400 if it claims to be JSON).
    ``implicit_tls: true`` on a server without a certificate is a 409: the
    value is fine, the server lacks what only its own configuration can give.
    """
    server = _server(name)
    changes = data.model_dump(exclude_unset=True)
    if changes.get("implicit_tls") and server.tls_context is None:
        # The certificate cannot be set over the API (NOT_SETTABLE), so no body could make this valid.
        raise ApiError(
            409,
            "implicit_tls: the server has no TLS certificate (tls_cert and tls_key, or ssl_context)",
            fields=[("implicit_tls", "needs tls_cert and tls_key, or ssl_context")],
        )
    if changes:  # configure() with no arguments reads instead of writing
        server.configure(**changes)
    return ConfigView.of(server)


@blueprint.get("/servers/<name>/config/<option>")
@tag(["options"])
@errors(404)
@validate_response(OptionValue)
async def get_option(name: str, option: str) -> OptionValue:
    """One option (404 if there is no such option)."""
    server = _server(name)
    try:
        value = server.cget(option)
    except OptionError:
        raise ApiError(404, f"no option {option!r}") from None
    return OptionValue(option=option, value=describe(value))


# -- connections ------------------------------------------------------------


@blueprint.get("/servers/<name>/connections")
@tag(["connections"])
@errors(404)
@validate_response(ConnectionList)
async def list_connections(name: str) -> ConnectionList:
    """The open connections, each in short."""
    server = _server(name)
    return ConnectionList(connections=[ConnectionSummary.of(server.conn_state(conn)) for conn in server.conn_list()])


@blueprint.get("/servers/<name>/connections/<conn_id>")
@tag(["connections"])
@errors(404)
@validate_response(ConnectionState)
async def get_connection(name: str, conn_id: str) -> ConnectionState:
    """Everything ``conn_state`` says about one connection."""
    return ConnectionState.model_validate(_server(name).conn_state(conn_id))


@blueprint.delete("/servers/<name>/connections/<conn_id>")
@tag(["connections"])
@errors(404, 422)
@no_content(204, "The connection is closed.")
@validate_querystring(KickQuery)
@validate_response(Closing, 202)
async def close_connection(name: str, conn_id: str, query_args: KickQuery) -> Response | tuple[Closing, int]:
    """Close one connection: its deletions are not applied, its mailbox is unlocked.

    204 once it is closed; 202 if it is still closing (a slow unlock, say).
    """
    session = _server(name).session(conn_id)
    session.close(query_args.reason)
    with trio.move_on_after(SETTLE_TIMEOUT):
        await session.finished.wait()
    if not session.finished.is_set():
        return Closing(connection=conn_id), 202
    response = current_app.response_class(status=204)
    del response.headers["Content-Type"]  # no body, so no type (not text/html)
    return response


@blueprint.get("/servers/<name>/mailboxes/<mailbox>/uidls")
@tag(["connections"])
@errors(404, 409, 422)
@validate_response(UidlList)
async def mailbox_uidls(name: str, mailbox: str) -> UidlList:
    """A mailbox's UIDLs and where each comes from: Maildir name, Dovecot, imported (``pop3d uidl show``).

    404 if the server's storage cannot say (only the Maildir storage can);
    422 for a mailbox name the storage refuses.
    """
    storage = _server(name).options.storage
    report = getattr(storage, "uidl_report", None)
    if report is None:
        raise ApiError(404, f"server {name!r}'s storage does not report where UIDLs come from")
    try:
        entries = await report(mailbox)
    except ValueError as exc:
        raise ApiError(422, str(exc)) from None
    except MailboxUnavailable as exc:
        raise ApiError(409, str(exc)) from None
    return UidlList(
        mailbox=mailbox,
        messages=[UidlView(number=e.number, uidl=e.uidl, source=e.source, file=e.file, size=e.size) for e in entries],
    )


# -- monitoring -------------------------------------------------------------


@blueprint.get("/metrics")
@tag(["monitoring"])
@text_content(
    200,
    "Prometheus metrics: text format 0.0.4 by default, OpenMetrics or text 1.0.0 if Accept asks for it.",
    ("text/plain", "application/openmetrics-text"),
)
async def metrics() -> Response:
    """Prometheus metrics of every server (text format 0.0.4, or what ``Accept`` asks for)."""
    body, content_type = render(settings_of(current_app).registry, request.headers.get("Accept"))
    return current_app.response_class(body, content_type=content_type)


@blueprint.get("/healthz")
@tag(["monitoring"])
@security_scheme([])  # open even when a token is set
@validate_response(Health)
async def healthz() -> Health:
    """The process is alive (always 200, and open without a token)."""
    return Health()


@blueprint.get("/readyz")
@tag(["monitoring"])
@validate_response(Readiness, 200)
@validate_response(Readiness, 503)
async def readyz() -> tuple[Readiness, int]:
    """200 if some server listens, every one that is up does, and each reaches its lock service; else 503
    (naming those that do not)."""
    servers = pop3d.servers()
    missing, listening = not_listening(servers), serving(servers)
    unreachable = unreachable_lock_services(servers)
    ready = bool(listening) and not missing and not unreachable
    readiness = Readiness(ready=ready, serving=listening, not_listening=missing, lock_service_unreachable=unreachable)
    return readiness, 200 if ready else 503


# -- penalties ----------------------------------------------------------------


def _penalty_boxes() -> list[PenaltyBox]:
    return distinct_boxes(server.options.penalties for server in pop3d.servers().values())


@blueprint.get("/penalties")
@tag(["penalties"])
@validate_response(PenaltyList)
async def list_penalties() -> PenaltyList:
    """Every penalised client address and user name, worst first."""
    entries = [entry for box in _penalty_boxes() for entry in box.entries()]
    entries.sort(key=lambda entry: (-entry.failures, entry.kind, entry.key))
    return PenaltyList(penalties=[PenaltyView.of(entry) for entry in entries])


async def _clear_penalty(kind: Literal["address", "user"], key: str) -> Response:
    cleared = [box.clear(kind, key) for box in _penalty_boxes()]
    if not any(cleared):
        raise ApiError(404, f"no penalty for {kind} {key!r}")
    log.info("cleared the penalty of %s %s", kind, key)
    response = current_app.response_class(status=204)
    del response.headers["Content-Type"]
    return response


@blueprint.delete("/penalties/users/<path:name>")
@tag(["penalties"])
@errors(404)
@no_content(204, "The penalty is cleared.")
async def clear_user_penalty(name: str) -> Response:
    """Clear the penalty of a user name (204; 404 if it has none)."""
    return await _clear_penalty("user", name)


@blueprint.delete("/penalties/<path:address>")
@tag(["penalties"])
@errors(404)
@no_content(204, "The penalty is cleared.")
async def clear_address_penalty(address: str) -> Response:
    """Clear the penalty of an address (any address of a penalised IPv6 /64 will do; 204, or 404)."""
    return await _clear_penalty("address", address)
