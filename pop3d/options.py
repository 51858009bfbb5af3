"""The options of a server object, validated by pydantic.

:class:`ServerOptions` holds every settable option; a server keeps one
immutable instance and swaps it whole on ``configure``, so a bad value
changes nothing.  ``state`` is read-only and lives on the server itself.
"""

from __future__ import annotations

import socket
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from .callbacks import Auth, Storage
from .errors import OptionError

__all__ = ["READ_ONLY", "ServerOptions", "validate_options"]

READ_ONLY = ("state",)


class ServerOptions(BaseModel):
    """Every settable option of a server, with its default."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True, strict=False)

    port: int = Field(110, ge=0, le=65535, description="TCP port to listen on; 0 lets the OS choose.")
    host: str | None = Field(None, description="Address to bind; None binds every address.")
    auth: Auth | None = Field(None, description="The auth callback; None refuses every login.")
    storage: Storage | None = Field(None, description="The storage callback; None: every mailbox is empty.")
    hostname: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        pattern=r"^[A-Za-z0-9.\-_\[\]:]+$",
        description="Host name in the greeting and the APOP challenge.",
    )
    idle_timeout: float = Field(
        600.0,
        ge=0,
        allow_inf_nan=False,
        description="Seconds a session may stay idle (RFC 1939: at least 600); 0: forever.",
    )
    max_line: int = Field(1024, ge=255, le=65536, description="Longest command line accepted, CRLF included.")
    apop: bool = Field(True, description="Offer APOP: a challenge in the greeting (needs plain passwords).")
    login_failure_delay: float = Field(
        1.0, ge=0, le=60, allow_inf_nan=False, description="Seconds after a login command before a failure is answered."
    )
    max_connections: int = Field(1000, ge=1, description="Open connections at most; more are refused.")
    max_connections_per_ip: int = Field(100, ge=1, description="Open connections from one address at most.")
    max_auth_failures: int = Field(3, ge=1, le=100, description="Failed logins before the session is closed.")


def validate_options(current: ServerOptions, changes: dict[str, Any]) -> ServerOptions:
    """``current`` with ``changes`` applied, or :class:`OptionError` naming each problem."""
    problems = [(name, "option is read-only") for name in changes if name in READ_ONLY]
    if problems:
        raise OptionError(problems)
    merged = {name: getattr(current, name) for name in ServerOptions.model_fields}
    merged.update(changes)
    try:
        return ServerOptions.model_validate(merged)
    except pydantic.ValidationError as exc:
        raise OptionError(
            [(".".join(str(part) for part in error["loc"]) or "options", _message(error)) for error in exc.errors()]
        ) from None


def _message(error: Any) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown option"
    if error["type"] == "is_instance_of":
        return "does not implement the callback interface"
    return str(error["msg"])
