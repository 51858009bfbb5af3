"""Every failure of the admin API as a JSON body ``{"error", "detail"}``, never an HTML page.

Routes raise :class:`ApiError` or let the server API's own exceptions
through; the handlers installed by :func:`install_error_handlers` map each
to its status:

- unknown server, connection, option or route: 404
- an illegal transition (:class:`pop3d.StateError`): 409
- a bad option value, an unknown option, a bad body: 422, naming the fields
- anything unexpected: 500, logged with its traceback
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from typing import Any

import pydantic
from quart import Quart, Response, jsonify, request
from quart_schema import RequestSchemaValidationError
from werkzeug.exceptions import HTTPException

from pop3d.errors import OptionError, StateError, UnknownConnection

from .models import NOT_SETTABLE, Error, FieldError

__all__ = ["ApiError", "error_response", "install_error_handlers"]

log = logging.getLogger("pop3d.admin")

# The short codes of the statuses the API answers with on purpose.
_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    415: "unsupported_media_type",
    422: "invalid",
    429: "too_many",
    403: "forbidden",
    500: "internal_error",
}


class ApiError(Exception):
    """An error response: ``status``, a sentence, and the bad fields if any."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        fields: Iterable[tuple[str, str]] = (),
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.fields = list(fields)
        self.headers = headers or {}


def error_response(
    status: int,
    detail: str,
    *,
    fields: Iterable[tuple[str, str]] = (),
    headers: dict[str, str] | None = None,
) -> Response:
    """The JSON error response for ``status``."""
    field_list = [FieldError(field=name, message=message) for name, message in fields]
    body = Error(error=_CODES.get(status, "error"), detail=detail, fields=field_list or None)
    response = jsonify(body.model_dump(exclude_none=True))
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _field_errors(errors: Iterable[Any]) -> list[tuple[str, str]]:
    """``(field, message)`` pairs from pydantic's error list."""
    out = []
    for error in errors:
        # An item of a list adds its index to the location; the field is what the client sent.
        field = str(error["loc"][0]) if error["loc"] else "body"
        cause = error.get("ctx", {}).get("error")
        if error["type"] == "extra_forbidden":
            message = "cannot be set over the admin API" if field in NOT_SETTABLE else "unknown option"
        elif isinstance(cause, ValueError):
            message = str(cause)  # our own validators' words, without pydantic's "Value error, "
        else:
            message = str(error["msg"])
        out.append((field, message))
    return out


async def _api_error(error: ApiError) -> Response:
    return error_response(error.status, error.detail, fields=error.fields, headers=error.headers)


async def _unknown_connection(error: UnknownConnection) -> Response:
    return error_response(404, str(error))


async def _state_error(error: StateError) -> Response:
    return error_response(409, str(error))


async def _option_error(error: OptionError) -> Response:
    fields = [(name, "cannot be set over the admin API" if name in NOT_SETTABLE else msg) for name, msg in error.errors]
    return error_response(422, str(error), fields=fields)


async def _schema_error(error: RequestSchemaValidationError) -> Response:
    # quart-schema would answer 400 with its own shape; a body that does not fit is a 422 here.
    cause = error.validation_error
    if isinstance(cause, pydantic.ValidationError):
        fields = _field_errors(cause.errors())
        detail = "; ".join(f"{name}: {message}" for name, message in fields)
    else:
        fields = [("body", str(cause))]
        detail = str(cause)
    return error_response(422, detail or "invalid request", fields=fields)


async def _http_error(error: HTTPException) -> Response:
    # Werkzeug's own errors (404 for an unknown route, 405, a body that is not JSON).
    status = error.code or 500
    headers = {name: value for name, value in error.get_headers() if name.lower() == "allow"}
    return error_response(status, error.description or error.name, headers=headers)


async def _too_deep(error: RecursionError) -> Response:
    # The JSON decoder recurses per level: a body of a thousand "[" is a bad request, not a 500.
    return error_response(400, "the request body is nested too deeply")


async def _unexpected(error: Exception) -> Response:
    log.error("admin API: unexpected error", exc_info=error)
    return error_response(500, "internal error; see the server log")


async def _whole_request_first(response: Response) -> Response:
    # Hypercorn reuses a keep-alive connection only once the whole request has
    # come in: an answer sent before the body arrived (the token check's 401, a
    # 405) would leave the client's next request on that connection unanswered.
    with contextlib.suppress(HTTPException):  # too large or too slow: the answer goes out as it is
        await request.get_data()
    return response


def install_error_handlers(app: Quart) -> None:
    """Make every error of ``app`` a JSON error response, sent once the request is in."""
    app.after_request(_whole_request_first)
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(UnknownConnection, _unknown_connection)
    app.register_error_handler(StateError, _state_error)
    app.register_error_handler(OptionError, _option_error)
    app.register_error_handler(RequestSchemaValidationError, _schema_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(RecursionError, _too_deep)
    app.register_error_handler(Exception, _unexpected)
