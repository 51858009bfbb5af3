"""The bodies of the admin API's requests and responses, as pydantic models.

Each response model has a ``of(...)`` constructor that reads a live server
object, so the routes stay short and the mapping lives in one place.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from datetime import UTC, datetime
from pathlib import PurePath
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    PlainSerializer,
    Strict,
    WithJsonSchema,
    create_model,
)

from pop3d.options import READ_ONLY, ServerOptions
from pop3d.penalties import Penalty
from pop3d.server import Server

__all__ = [
    "NOT_SETTABLE",
    "Closing",
    "ConfigPatch",
    "ConfigView",
    "ConnectionList",
    "ConnectionState",
    "ConnectionSummary",
    "DestroyQuery",
    "DestroyResult",
    "Error",
    "FieldError",
    "Health",
    "KickQuery",
    "OptionValue",
    "PenaltyList",
    "PenaltyView",
    "Readiness",
    "ServerList",
    "ServerSummary",
    "describe",
]

# Callbacks hold credentials and file handles, a TLS context holds a key: the
# API shows them, never sets them.  Nor does it point the server at files
# (which would let it probe any file the server can read).
NOT_SETTABLE = ("auth", "storage", "ssl_context", "tls_cert", "tls_key", "penalties", *READ_ONLY)

# Flask's JSON encoder would write datetimes as RFC 822 dates; the API promises ISO 8601.
IsoDatetime = Annotated[
    datetime,
    PlainSerializer(lambda value: value.isoformat(), return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]


def describe(value: Any) -> Any:
    """``value`` as JSON can show it: plain values as they are, objects by description.

    An object's ``describe()`` if it has one, else its ``repr``: callbacks
    say what they are (``maildir:/var/mail``), never a password.  Paths and
    networks are strings, tuples are lists.
    """
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return [describe(item) for item in value]
    if isinstance(value, PurePath | ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    if isinstance(value, ssl.SSLContext):
        return "ssl.SSLContext"  # its certificate and key stay out of sight
    method = getattr(value, "describe", None)
    if callable(method):
        return str(method())
    return repr(value)


class FieldError(BaseModel):
    """One bad field of a request."""

    field: str = Field(description="The option or body field, dotted for nested ones.")
    message: str


class Error(BaseModel):
    """Every error response: a short code, a sentence, and for 422 the bad fields."""

    error: str = Field(description="not_found, conflict, invalid, unauthorized, bad_request, ...")
    detail: str
    fields: list[FieldError] | None = None


class ServerSummary(BaseModel):
    """A server at a glance."""

    name: str
    state: Literal["down", "up", "exiting"]
    port: int = Field(description="The bound port while up, else the configured one.")
    configured_port: int = Field(description="The port option; 0 means the OS chooses at each up.")
    host: str | None
    addresses: list[str] = Field(description="HOST:PORT of each listening socket; empty unless up.")
    connections: int = Field(description="Open POP3 connections.")

    @classmethod
    def of(cls, server: Server) -> ServerSummary:
        """The summary of ``server`` now."""
        return cls(
            name=server.name,
            state=server.state,
            port=server.cget("port"),
            configured_port=server.options.port,
            host=server.options.host,
            addresses=[f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in server.addresses()],
            connections=len(server.conn_list()),
        )


class ServerList(BaseModel):
    """Every server object of the process."""

    servers: list[ServerSummary]


class ConfigView(BaseModel):
    """Every option of a server, as ``configure()`` returns them.

    ``auth`` and ``storage`` are descriptions of the callbacks.  ``port`` is
    the bound port while the server is up.
    """

    # Options added to pop3d later still show, undocumented, until listed here.
    model_config = ConfigDict(extra="allow")

    port: int
    host: str | None
    auth: str | None = Field(description="What the auth callback is, e.g. passwd-file:/etc/pop3d/users.")
    storage: str | None = Field(description="What the storage callback is, e.g. maildir:/var/mail.")
    hostname: str
    idle_timeout: float
    max_line: int
    apop: bool
    login_failure_delay: float
    max_connections: int
    max_connections_per_ip: int
    max_auth_failures: int
    tls_cert: str | None = Field(description="PEM certificate chain file, if TLS is configured by files.")
    tls_key: str | None = Field(description="Its private key file (the path only).")
    ssl_context: str | None = Field(description="'ssl.SSLContext' when a context object was given instead.")
    implicit_tls: bool = Field(description="POP3S: TLS from the first byte.")
    cleartext_auth_from: list[str] = Field(description="Networks that may log in with a password before TLS.")
    max_userip_connections: int
    max_logins_per_ip: int
    login_timeout: float
    penalties: str | None = Field(description="The penalty box's description, or null if there are no penalties.")
    proxy_protocol_from: list[str] = Field(description="Proxies that send a PROXY header first.")
    state: Literal["down", "up", "exiting"]

    @classmethod
    def of(cls, server: Server) -> ConfigView:
        """The options of ``server`` now."""
        options = server.configure() or {}
        return cls.model_validate({name: describe(value) for name, value in options.items()})


class OptionValue(BaseModel):
    """One option and its value."""

    option: str
    value: Any


# One network per item: an address (a network of one) or CIDR.  The options
# also take "10.0.0.0/8,::1/128" in one string, and spaces, but over JSON a
# list is the way, and the document can then say exactly what an item is.
_NETWORK = re.compile(r"[0-9A-Fa-f.:]+(?:/[0-9]{1,3})?")


# Where to listen: an IPv6 address, or a host name in ASCII (which IPv4 addresses
# also are).  The options take any name that IDNA encodes; over JSON the
# document can then say exactly what is taken.
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*")
_MAX_HOST_NAME = 253

_HOST_SCHEMA = {
    "anyOf": [
        {"type": "string", "format": "ipv6"},
        {"type": "string", "pattern": f"^{_HOST_NAME.pattern}$", "maxLength": _MAX_HOST_NAME},
        {"type": "null"},
    ],
    "examples": ["127.0.0.1", "::1", "pop.example.org"],
}


def _bind_host(value: Any) -> Any:
    if not isinstance(value, str):
        return value  # None, or something pydantic refuses
    if "%" not in value:  # a scoped address (fe80::1%eth0) is not what JSON Schema's ipv6 means
        try:
            ipaddress.IPv6Address(value)
            return value
        except ValueError:
            pass
    if len(value) <= _MAX_HOST_NAME and _HOST_NAME.fullmatch(value):
        return value
    raise ValueError(f"{value!r} is not a host name or address")


def _integral(value: Any) -> Any:
    # JSON Schema counts 828.0 as an integer, so the API does too; 1.5 and true stay refused.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _network_list(value: Any) -> Any:
    """A list of network strings or ``"none"``, for ``parse_networks`` to read; nothing else."""
    if value == "none":
        return ()
    if not isinstance(value, list):
        raise ValueError('give a list of networks, such as ["10.0.0.0/8", "::1"], or "none"')
    for item in value:
        if not isinstance(item, str) or not _NETWORK.fullmatch(item):
            raise ValueError(f"{item!r} is not a network: give an address or CIDR, such as 10.0.0.0/8")
    return value


_NETWORKS_SCHEMA = {
    "anyOf": [
        {
            "type": "array",
            "items": {
                "type": "string",
                "format": "ipvanynetwork",
                "pattern": f"^{_NETWORK.pattern}$",
                "examples": ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"],
            },
        },
        {"type": "string", "const": "none"},
    ]
}


def _patch_model() -> type[BaseModel]:
    # Derived from ServerOptions so that a new option is settable here at once,
    # with the same types, limits and descriptions.  Every field is optional:
    # only those sent are changed.
    fields: dict[str, Any] = {}
    for name, info in ServerOptions.model_fields.items():
        if name in NOT_SETTABLE:
            continue
        annotation: Any = info.annotation
        extra: tuple[Any, ...] = ()
        # JSON's true is not 1, nor 1.5 an integer: plain values are taken as they are typed.
        if annotation in (int, float, bool, str):
            extra = (Strict(),)
        if annotation is int:
            extra += (BeforeValidator(_integral),)  # the last runs first
        elif name == "host":
            extra = (BeforeValidator(_bind_host), WithJsonSchema(_HOST_SCHEMA))
        elif annotation == tuple[IPvAnyNetwork, ...]:
            extra = (BeforeValidator(_network_list), WithJsonSchema(_NETWORKS_SCHEMA))
        if info.metadata or extra:
            annotation = Annotated[(annotation, *info.metadata, *extra)]
        fields[name] = (annotation, Field(None, description=info.description))
    return create_model(
        "ConfigPatch",
        __config__=ConfigDict(extra="forbid"),
        __doc__="Options to set; the others keep their values.  auth, storage and state cannot be set.",
        **fields,
    )


ConfigPatch = _patch_model()


class DestroyQuery(BaseModel):
    """How to destroy a server."""

    mode: Literal["kill", "defer"] = Field(
        "kill", description="kill: close every connection now; defer: wait for the last one to end."
    )


class DestroyResult(BaseModel):
    """What became of a destroyed server."""

    name: str
    state: Literal["destroyed", "exiting"]


class KickQuery(BaseModel):
    """How to close a connection."""

    reason: str | None = Field(
        None,
        max_length=200,
        pattern=r"^[^\r\n]*$",
        description="Sent to the client as -ERR reason before the connection closes.",
    )


class ConnectionSummary(BaseModel):
    """One open POP3 connection at a glance."""

    id: str = Field(description="The connection id, as in conn_list.")
    remote_host: str
    remote_port: int
    user: str | None = Field(description="The user, once given.")
    state: str = Field(description="auth, trans, update or closed.")
    tls: bool = Field(description="Whether the connection is encrypted.")
    started: IsoDatetime
    last_activity: IsoDatetime

    @classmethod
    def of(cls, state: dict[str, Any]) -> ConnectionSummary:
        """The summary of a connection from its ``conn_state``."""
        return cls(
            id=state["connection"],
            remote_host=state["remotehost"],
            remote_port=state["remoteport"],
            user=state["name"] or None,
            state=state["state"],
            tls=state["tls"],
            started=state["started"],
            last_activity=state["last_activity"],
        )


class Closing(BaseModel):
    """A connection told to close that has not finished closing yet."""

    connection: str
    state: Literal["closing"] = "closing"


class ConnectionList(BaseModel):
    """The open connections of a server."""

    connections: list[ConnectionSummary]


class ConnectionState(BaseModel):
    """Everything ``conn_state`` tells about a connection (the keys of tcllib's ``conn state``)."""

    model_config = ConfigDict(extra="allow")

    remotehost: str
    remoteport: int
    server: str
    id: str = Field(description="The APOP challenge sent in the greeting (not the connection id).")
    connection: str = Field(description="The connection id.")
    state: str
    name: str = Field(description="The user, once given; else empty.")
    logon: str = Field(description="How the user logs in (user, apop, plain or login); else empty.")
    storage: str = Field(description="The mailbox, once logged in.")
    deleted: list[int] = Field(description="Messages marked for deletion.")
    msg: int = Field(description="Messages in the maildrop.")
    size: int = Field(description="Octets in the maildrop.")
    started: IsoDatetime
    last_activity: IsoDatetime
    tls: bool = Field(description="Whether the connection is encrypted (POP3S, or after STLS).")
    tls_version: str | None = Field(description="TLSv1.2 or TLSv1.3 when encrypted, else null.")
    tls_cipher: str | None = Field(description="The cipher suite when encrypted, else null.")


class Health(BaseModel):
    """The process is alive."""

    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    """Whether the process takes POP3 clients: some server listens, and every one that should does."""

    ready: bool
    serving: list[str] = Field(description="Servers that are up and listening.")
    not_listening: list[str] = Field(description="Servers that are up but have no open listening socket.")
    lock_service_unreachable: list[str] = Field(
        default_factory=list, description="Servers that are up but cannot reach their lock service (etcd)."
    )


class PenaltyView(BaseModel):
    """One penalised client address (IPv6: its /64) or user name."""

    kind: Literal["address", "user"]
    key: str = Field(description="The address (or /64), or the user name.")
    failures: int = Field(description="Failed logins in a row, none of them an hour old.")
    delay: float = Field(description="Seconds the next login attempt waits for its answer.")
    last_failure: IsoDatetime

    @classmethod
    def of(cls, entry: Penalty) -> PenaltyView:
        """The view of one entry of a :class:`~pop3d.penalties.PenaltyBox`."""
        return cls(
            kind=entry.kind,
            key=entry.key,
            failures=entry.failures,
            delay=entry.delay,
            last_failure=datetime.fromtimestamp(entry.last_failure, UTC),
        )


class UidlView(BaseModel):
    """One message of a mailbox: its UIDL and where that comes from."""

    number: int = Field(description="Its message number in a POP3 session (1-based).")
    uidl: str
    source: Literal["maildir", "dovecot", "imported", "hashed"] = Field(
        description="maildir: the file's unique name; dovecot: dovecot-uidlist; imported: pop3d uidl import; "
        "hashed: pop3d's own, derived where the name could not serve."
    )
    file: str = Field(description="cur/NAME or new/NAME, relative to the Maildir.")
    size: int = Field(description="Octets as POP3 sends the message (CRLF line ends).")


class UidlList(BaseModel):
    """A mailbox's messages and their UIDLs, as the next login would see them."""

    mailbox: str
    messages: list[UidlView]


class PenaltyList(BaseModel):
    """Every live penalty, worst first."""

    penalties: list[PenaltyView]
