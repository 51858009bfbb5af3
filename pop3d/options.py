"""The options of a server object, validated by pydantic.

:class:`ServerOptions` holds every settable option; a server keeps one
immutable instance and swaps it whole on ``configure``, so a bad value
changes nothing.  ``state`` is read-only and lives on the server itself.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Annotated, Any

import pydantic
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, IPvAnyNetwork, field_validator, model_validator

from .callbacks import Auth, Storage
from .errors import OptionError
from .networks import LOOPBACK, parse_networks
from .penalties import PenaltyBox
from .tls import check_context

__all__ = ["HOSTNAME_PATTERN", "MAX_HOSTNAME", "READ_ONLY", "Networks", "ServerOptions", "validate_options"]

READ_ONLY = ("state",)

HOSTNAME_PATTERN = r"^[A-Za-z0-9.\-_\[\]:]+$"
# Twice in the greeting (the host and the APOP challenge): within RFC 2449's 512 octets.
MAX_HOSTNAME = 200


class _Conflict(ValueError):
    """Options that do not go together; ``option`` is the one the message names."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


# A tuple of networks, from a list or from "10.0.0.0/8,::1/128" or "none" (the
# validator travels with the type, so the admin API's PATCH model has it too).
Networks = Annotated[tuple[IPvAnyNetwork, ...], BeforeValidator(parse_networks)]


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
        max_length=MAX_HOSTNAME,
        pattern=HOSTNAME_PATTERN,
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
    max_connections: int = Field(
        1000,
        ge=1,
        description="Open connections at most; then the oldest not logged in makes room, or newcomers are refused.",
    )
    max_connections_per_ip: int = Field(
        300, ge=1, description="Connections from one address that have not logged in, at most."
    )
    max_userip_connections: int = Field(
        10, ge=0, description="Logged-in sessions of one user from one address at most; 0: no limit."
    )
    max_logins_per_ip: int = Field(
        3, ge=0, description="Login attempts in progress from one address at once (more wait); 0: no limit."
    )
    login_timeout: float = Field(
        60.0, ge=0, allow_inf_nan=False, description="Seconds from connecting to logging in; 0: no limit."
    )
    max_auth_failures: int = Field(3, ge=1, le=100, description="Failed logins before the session is closed.")
    penalties: PenaltyBox | None = Field(
        default_factory=PenaltyBox,
        description="Failed-login penalties by address and user (share one among servers); None: none.",
    )
    proxy_protocol_from: Networks = Field(
        (), description="Proxies whose connections start with a PROXY header (v1 or v2); none by default."
    )
    tls_cert: Path | None = Field(None, description="PEM certificate chain: offers STLS, or serves POP3S.")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert (may be the same file).")
    ssl_context: ssl.SSLContext | None = Field(None, description="A ready server context, instead of tls_cert/key.")
    implicit_tls: bool = Field(False, description="POP3S (RFC 8314): TLS from the first byte, no STLS.")
    cleartext_auth_from: Networks = Field(
        LOOPBACK,
        description="Client networks that may send a password before TLS; others must use STLS or POP3S.",
    )

    @field_validator("host")
    @classmethod
    def _host_name(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                value.encode("idna")  # what binding will do; "a..b" fails here, not at up()
            except UnicodeError:
                raise ValueError(f"{value!r} is not a host name or address") from None
        return value

    @field_validator("ssl_context")
    @classmethod
    def _secure_context(cls, value: ssl.SSLContext | None) -> ssl.SSLContext | None:
        if value is not None:
            check_context(value)
        return value

    @model_validator(mode="after")
    def _tls_complete(self) -> ServerOptions:
        if (self.tls_cert is None) != (self.tls_key is None):
            missing = "tls_key" if self.tls_key is None else "tls_cert"
            raise _Conflict(missing, "tls_cert and tls_key go together")
        if self.tls_cert is not None and self.ssl_context is not None:
            raise _Conflict("ssl_context", "give tls_cert and tls_key, or ssl_context, not both")
        if self.implicit_tls and self.tls_cert is None and self.ssl_context is None:
            raise _Conflict("implicit_tls", "needs tls_cert and tls_key, or ssl_context")
        return self


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
        raise OptionError([(_option(error), _message(error)) for error in exc.errors()]) from None


def _option(error: Any) -> str:
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, _Conflict):
        return cause.option
    # A tuple's items add their index to the location: the option is the first part.
    return str(error["loc"][0]) if error["loc"] else "options"


def _message(error: Any) -> str:
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, ValueError):
        return str(cause)
    if error["type"] == "extra_forbidden":
        return "unknown option"
    if error["type"] == "is_instance_of":
        return "does not implement the callback interface"
    return str(error["msg"])
