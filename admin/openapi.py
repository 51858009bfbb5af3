"""What the OpenAPI document says beyond quart-schema's own decorators.

quart-schema declares a response only through ``validate_response``, always
as JSON.  The admin API also answers errors (one JSON shape, the
:class:`~pop3d.admin.models.Error` model), empty 204s and Prometheus text, and
takes a request body it requires.  The decorators here record that on a
view function, and :class:`AdminOpenAPIProvider` writes it into the
document, so that each operation lists every status it can really answer:

- :func:`errors` for the error statuses of an operation;
- :func:`no_content` for a response without a body;
- :func:`text_content` for a response that is not JSON (an event stream is
  described event by event);
- :func:`body_required` for a request body that may not be left out.

Every operation also gets 500 (the JSON error of a bug), and, when the app
has a token, every operation that requires it gets 401.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from pydantic import BaseModel
from quart_schema import OpenAPIProvider
from werkzeug.routing import Rule

from .models import Error

__all__ = [
    "ERROR_DESCRIPTIONS",
    "SSE_EVENT_SCHEMA",
    "AdminOpenAPIProvider",
    "body_required",
    "errors",
    "no_content",
    "text_content",
]

F = TypeVar("F", bound=Callable[..., Any])

_ATTRIBUTE = "_pop3d_openapi"
_COMPONENTS = "#/components/schemas/"
_ERROR_REF = _COMPONENTS + "Error"

#: What each error status means, as the document describes it.
ERROR_DESCRIPTIONS = {
    400: "The body claims to be JSON but is not (not UTF-8, or malformed), or is nested too deeply (bad_request).",
    401: "Missing or wrong bearer token (unauthorized).",
    403: (
        "Refused for a browser's sake (forbidden): a change asked from another web origin, "
        "or, without a token, a Host that is not loopback."
    ),
    404: "No such server, connection, option or penalty (not_found).",
    409: (
        "The server's state forbids it (conflict): exiting, destroyed, not running, its port is taken, "
        "implicit_tls without a certificate, or a mailbox the storage cannot serve."
    ),
    422: "A bad body or query parameter (invalid); fields names each bad one.",
    429: "Too many at once (too_many): as many event streams are open as the API serves.",
    500: "A bug (internal_error); the traceback is in the server log.",
}


@dataclass(frozen=True)
class _Extra:
    """What the decorators recorded about one view function."""

    errors: frozenset[int] = frozenset()
    # status -> (description, media types); no media types means no body
    bodies: dict[int, tuple[str, tuple[str, ...]]] = field(default_factory=dict)
    body_required: bool = False
    # status -> the model of each server-sent event's data (JSON in the data field)
    event_data: dict[int, type[BaseModel]] = field(default_factory=dict)


def _extra(func: Callable[..., Any]) -> _Extra:
    extra = getattr(func, _ATTRIBUTE, None)
    return extra if isinstance(extra, _Extra) else _Extra()


def _record(func: F, extra: _Extra) -> F:
    # A new object each time: functools.wraps shares __dict__ values between wrappers.
    setattr(func, _ATTRIBUTE, extra)
    return func


def errors(*statuses: int) -> Callable[[F], F]:
    """Declare the error statuses the operation can answer, each with the ``Error`` body."""
    unknown = set(statuses) - set(ERROR_DESCRIPTIONS)
    if unknown:
        raise ValueError(f"no description for error statuses {sorted(unknown)}")

    def decorator(func: F) -> F:
        extra = _extra(func)
        return _record(func, replace(extra, errors=extra.errors | frozenset(statuses)))

    return decorator


def no_content(status: int, description: str) -> Callable[[F], F]:
    """Declare a response without a body (a 204, say)."""

    def decorator(func: F) -> F:
        extra = _extra(func)
        return _record(func, replace(extra, bodies={**extra.bodies, status: (description, ())}))

    return decorator


def text_content(
    status: int, description: str, media_types: Iterable[str], *, event_data: type[BaseModel] | None = None
) -> Callable[[F], F]:
    """Declare a response whose body is text in one of ``media_types`` (not JSON).

    ``event_data``: for ``text/event-stream``, the model of each event's
    ``data`` (JSON), which the document then lists among its schemas.
    """

    def decorator(func: F) -> F:
        extra = _extra(func)
        data = {**extra.event_data, status: event_data} if event_data is not None else extra.event_data
        bodies = {**extra.bodies, status: (description, tuple(media_types))}
        return _record(func, replace(extra, bodies=bodies, event_data=data))

    return decorator


def body_required(func: F) -> F:
    """Mark the request body (declared by ``validate_request``) as required."""
    return _record(func, replace(_extra(func), body_required=True))


#: One server-sent event, as OpenAPI 3.1 describes an event stream: the ``schema``
#: of ``text/event-stream`` is that of each event (its fields), not of the whole text.
SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "event": {"type": "string"},
        "data": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer", "minimum": 0},
    },
    "required": ["data"],
}


def _text_schema(media_type: str, event_data: type[BaseModel] | None = None) -> dict[str, Any]:
    if media_type != "text/event-stream":
        return {"type": "string"}
    if event_data is None:
        return SSE_EVENT_SCHEMA
    # OpenAPI 3.1 (JSON Schema 2020-12): a string holding JSON, and what that JSON is.
    schema = copy.deepcopy(SSE_EVENT_SCHEMA)
    schema["properties"]["data"].update(
        contentMediaType="application/json", contentSchema={"$ref": _COMPONENTS + event_data.__name__}
    )
    return schema


def _error_response(status: int) -> dict[str, Any]:
    return {
        "description": ERROR_DESCRIPTIONS[status],
        "content": {"application/json": {"schema": {"$ref": _ERROR_REF}}},
    }


class AdminOpenAPIProvider(OpenAPIProvider):
    """quart-schema's document, with what :mod:`pop3d.admin.openapi`'s decorators recorded."""

    def schema(self) -> dict[str, Any]:
        """The whole document, with the ``Error`` model among the component schemas."""
        document = super().schema()
        error_schema = Error.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas = document["components"]["schemas"]
        schemas.update(error_schema.pop("$defs", {}))
        schemas["Error"] = error_schema
        return document

    def build_paths(self, rule: Rule) -> tuple[dict[str, Any], dict[str, Any]]:
        """quart-schema's path objects for ``rule``, completed with the recorded responses."""
        paths, components = super().build_paths(rule)
        func = self._app.view_functions[rule.endpoint]
        extra = _extra(func)
        protected = self._extension.security_schemes is not None
        for path_item in paths.values():
            for method, operation in list(path_item.items()):
                # quart-schema's operations of one rule share their inner dicts.
                operation = path_item[method] = copy.deepcopy(operation)
                responses: dict[Any, Any] = operation["responses"]
                for status, (description, media_types) in extra.bodies.items():
                    response: dict[str, Any] = {"description": description}
                    model = extra.event_data.get(status)
                    if media_types:
                        response["content"] = {media: {"schema": _text_schema(media, model)} for media in media_types}
                    if model is not None:
                        model_schema = model.model_json_schema(ref_template=_COMPONENTS + "{model}")
                        # build_paths' components are schemas by name (quart-schema adds them under "schemas").
                        components.update(model_schema.pop("$defs", {}))
                        components[model.__name__] = model_schema
                    responses[status] = response
                # The browser guard (access.install_browser_guard) can answer any operation with a 403.
                statuses = set(extra.errors) | {403, 500}
                if protected and operation.get("security") != []:
                    statuses.add(401)
                for status in sorted(statuses):
                    responses.setdefault(status, _error_response(status))
                if 401 in responses:
                    responses[401]["headers"] = {
                        "WWW-Authenticate": {"description": "Bearer realm", "schema": {"type": "string"}}
                    }
                if extra.body_required and "requestBody" in operation:
                    operation["requestBody"]["required"] = True
                # JSON object keys are strings; sorted, so that the document reads in order.
                operation["responses"] = {str(status): responses[status] for status in sorted(responses, key=int)}
        return paths, components
