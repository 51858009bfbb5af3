"""Settings of ``pop3d serve``: command line, ``POP3D_*`` variables, a TOML file.

One pydantic model, :class:`ServeSettings`, validates them all.  A setting
given on the command line wins over the environment, which wins over the
TOML file, which wins over the default.  Every problem becomes one line:
:func:`load_settings` raises :class:`SettingsError` with a message that
names the setting.
"""

from __future__ import annotations

import contextvars
import ipaddress
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from .dovecot_uidlist import DEFAULT_FORMAT as DEFAULT_UIDL_FORMAT
from .dovecot_uidlist import UidlFormat
from .errors import Pop3dError
from .networks import LOOPBACK
from .options import HOSTNAME_PATTERN, MAX_HOSTNAME, Networks, ServerOptions
from .penalties import DEFAULT_MAX_DELAY

__all__ = [
    "DEFAULT_ADMIN",
    "DEFAULT_LISTEN",
    "HIDDEN",
    "Address",
    "ServeSettings",
    "SettingsError",
    "effective_settings",
    "env_variable",
    "format_value",
    "load_settings",
    "toml_key",
]

DEFAULT_LISTEN = "127.0.0.1:1110"
DEFAULT_ADMIN = "127.0.0.1:8110"


class SettingsError(Pop3dError):
    """A setting is missing, unknown or bad; the message is one line."""


class Address(pydantic.BaseModel):
    """A ``HOST:PORT`` to listen on (``[::1]:110`` for IPv6; ``*`` for every address)."""

    model_config = pydantic.ConfigDict(frozen=True)

    host: str | None
    port: int = Field(ge=0, le=65535)

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse ``HOST:PORT``; raises ``ValueError`` with a readable message."""
        host, sep, port = text.strip().rpartition(":")
        if not sep or not host or not port:
            raise ValueError(f"{text!r} is not HOST:PORT")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"bad port {port!r} in {text!r} (0 to 65535)")
        try:
            host.encode("idna")  # what binding will do: "a..b" fails here, not as a traceback later
        except UnicodeError:
            raise ValueError(f"{host!r} in {text!r} is not a host name or address") from None
        return cls(host=None if host in ("*", "") else host, port=int(port))

    def __str__(self) -> str:
        host = "*" if self.host is None else (f"[{self.host}]" if ":" in self.host else self.host)
        return f"{host}:{self.port}"


def _address(value: Any) -> Any:
    if isinstance(value, str):
        return Address.parse(value)
    return value


def _addresses(value: Any) -> Any:
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if isinstance(value, list | tuple):
        if [str(item).strip().lower() for item in value] == ["none"]:
            return []  # no plain POP3 listener (POP3S only)
        return [_address(item) for item in value]
    return value


def _origins(value: Any) -> Any:
    # As listen: a list in TOML, repeated flags, comma-separated in the environment; none for none.
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if isinstance(value, list | tuple):
        if not value or [str(item).strip().lower() for item in value] == ["none"]:
            return []
        # The admin API's own check, so that the two cannot disagree; it is
        # imported only when there are origins (Quart is slow to import).
        from pop3d.admin.access import parse_origin

        return list(dict.fromkeys(parse_origin(str(item)) for item in value))
    return value


_toml_path: contextvars.ContextVar[Path | None] = contextvars.ContextVar("_toml_path", default=None)


def _option(name: str) -> Any:
    # The server object's own field: one default, one set of limits, one description.
    return ServerOptions.model_fields[name]


class ServeSettings(BaseSettings):
    """Everything ``pop3d serve`` can be told."""

    model_config = SettingsConfigDict(env_prefix="POP3D_", extra="forbid", validate_default=True)

    listen: Annotated[list[Address], NoDecode] = Field(
        default_factory=lambda: [Address.parse(DEFAULT_LISTEN)],
        description="Addresses for POP3 (HOST:PORT, comma-separated in the environment; none for no plain POP3).",
    )
    listen_tls: Annotated[list[Address], NoDecode] = Field(
        default_factory=list, description="Addresses for POP3S, TLS from the first byte (RFC 8314)."
    )
    tls_cert: Path | None = Field(None, description="PEM certificate chain, for STLS and POP3S.")
    tls_key: Path | None = Field(None, description="PEM private key of the certificate (may be the same file).")
    cleartext_auth_from: Annotated[Networks, NoDecode] = Field(
        LOOPBACK, description="Networks that may send a password before TLS (CIDRs, comma-separated, or none)."
    )
    users: Path | None = Field(None, description="Dovecot-style passwd-file; default: the demo data.")
    mail_root: Path | None = Field(None, description="Directory of Maildirs, one per user; default: the demo data.")
    passdb_sql: SecretStr | None = Field(
        None,
        description="Users from PostgreSQL instead of a passwd-file: a libpq connection string or postgresql:// URL.",
    )
    passdb_sql_password_file: Path | None = Field(
        None, description="File holding the PostgreSQL password of passdb-sql (instead of one in it)."
    )
    passdb_sql_query: str | None = Field(
        None,
        description="passdb-sql's query, with %(user)s for the user name; returns the columns password and mailbox.",
    )
    dovecot_uidl_format: str | None = Field(
        DEFAULT_UIDL_FORMAT,
        description="Dovecot's pop3_uidl_format, for Maildirs Dovecot served (their dovecot-uidlist); none: ignore it.",
    )
    hostname: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_HOSTNAME,
        pattern=HOSTNAME_PATTERN,
        description="Host name in the greeting; default: the machine's.",
    )
    idle_timeout: float = _option("idle_timeout")
    login_timeout: float = _option("login_timeout")
    max_connections: int = _option("max_connections")
    max_connections_per_ip: int = _option("max_connections_per_ip")
    max_userip_connections: int = _option("max_userip_connections")
    max_logins_per_ip: int = _option("max_logins_per_ip")
    max_auth_failures: int = _option("max_auth_failures")
    login_failure_delay: float = _option("login_failure_delay")
    penalty_max: float = Field(
        DEFAULT_MAX_DELAY,
        ge=0,
        le=300,
        allow_inf_nan=False,
        description="Longest wait a guessing address or user earns (the penalty goes 2, 4, 8 s... up to this).",
    )
    proxy_protocol_from: Annotated[Networks, NoDecode] = _option("proxy_protocol_from")
    user: str | None = Field(None, description="Run as this user once the ports are bound (when started as root).")
    group: str | None = Field(None, description="Run with this group (default: the user's).")
    allow_root: bool = Field(False, description="Serve mail as root (not recommended).")
    apop: bool = Field(False, description="Offer APOP (users with {PLAIN} passwords only), as Dovecot can.")
    grace_period: float = Field(
        30.0, ge=0, allow_inf_nan=False, description="Seconds open sessions get to finish at shutdown."
    )
    admin: Address | None = Field(
        default_factory=lambda: Address.parse(DEFAULT_ADMIN), description="Address of the admin HTTP API."
    )
    no_admin: bool = Field(False, description="Do not start the admin HTTP API.")
    admin_token: SecretStr | None = Field(None, description="Bearer token the admin API requires.")
    admin_token_file: Path | None = Field(None, description="File holding the admin API's bearer token.")
    admin_cors_origin: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Web origins (scheme://host[:port]) whose pages may call the admin API from a browser (CORS).",
    )
    log_level: str = Field("info", pattern="^(?i:debug|info|warning|error)$", description="Log level.")
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text, or one JSON object per line (for log collectors)."
    )
    # Mailbox locks across a cluster (docs/cluster.md).
    lock: Literal["local", "etcd"] = Field(
        "local", description="Mailbox locks: local (this host's flock) or etcd (across a cluster of instances)."
    )
    etcd: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="etcd endpoints for lock = etcd (http://HOST:PORT, comma-separated)."
    )
    lock_ttl: float = Field(
        5.0,
        ge=2,
        le=300,
        allow_inf_nan=False,
        description="Seconds a lock outlives its instance (the etcd lease); sessions end before it can pass.",
    )
    lock_prefix: str = Field("/pop3d/locks", description="Key prefix of the mailbox locks in etcd.")
    instance_name: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_HOSTNAME,
        pattern=HOSTNAME_PATTERN,
        description="This instance's name in lock values and /cluster/locks; default: the machine's host name.",
    )

    @field_validator("etcd", mode="before")
    @classmethod
    def _etcd_endpoints(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list | tuple):
            from .etcd import parse_endpoint

            for url in value:
                parse_endpoint(str(url))  # ValueError: "'...': an etcd endpoint is http://HOST:PORT"
        return value

    @field_validator("lock_prefix")
    @classmethod
    def _key_prefix(cls, value: str) -> str:
        if not value.startswith("/") or value.endswith("/") or not value.isprintable() or " " in value:
            raise ValueError(f"{value!r}: a key prefix starts with / and has no trailing /, nor spaces")
        return value

    @model_validator(mode="after")
    def _lock_complete(self) -> ServeSettings:
        if self.lock == "etcd" and not self.etcd:
            raise ValueError("lock: etcd needs etcd (http://HOST:PORT, comma-separated)")
        return self

    _listen_parse = field_validator("listen", "listen_tls", mode="before")(lambda cls, v: _addresses(v))
    _admin_parse = field_validator("admin", mode="before")(lambda cls, v: _address(v))
    _origins_parse = field_validator("admin_cors_origin", mode="before")(lambda cls, v: _origins(v))
    _format_lower = field_validator("log_level", "log_format", mode="before")(
        lambda cls, v: v.lower() if isinstance(v, str) else v
    )

    @field_validator("users", "admin_token_file", "tls_cert", "tls_key", "passdb_sql_password_file")
    @classmethod
    def _file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @field_validator("dovecot_uidl_format", mode="before")
    @classmethod
    def _uidl_format(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
            return None
        if isinstance(value, str):
            UidlFormat(value)  # a FormatError says what is wrong with it
        return value

    @field_validator("mail_root")
    @classmethod
    def _dir_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"no such directory: {value}")
        return value

    @model_validator(mode="after")
    def _complete(self) -> ServeSettings:
        # Errors about two settings: the message names them (see load_settings).
        if not self.listen and not self.listen_tls:
            raise ValueError("listen: give at least one HOST:PORT in listen or listen-tls")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls-cert and tls-key go together")
        if self.listen_tls and self.tls_cert is None:
            raise ValueError("listen-tls: needs tls-cert and tls-key")
        if self.users is not None and self.passdb_sql is not None:
            raise ValueError("users and passdb-sql: give one or the other")
        for name in ("passdb_sql_query", "passdb_sql_password_file"):
            if self.passdb_sql is None and getattr(self, name) is not None:
                raise ValueError(f"{name.replace('_', '-')}: needs passdb-sql")
        if self.passdb_sql is not None and self.mail_root is None:
            raise ValueError("passdb-sql: needs mail-root")
        return self

    def token(self) -> str | None:
        """The admin token, from the setting or the token file (stripped).

        A token that was asked for but is empty is an error, not "no token":
        a failed secret provisioning must not leave the API open.
        """
        if self.admin_token is not None:
            token = self.admin_token.get_secret_value().strip()
            if not token:
                raise SettingsError("admin-token: empty")
            return token
        if self.admin_token_file is not None:
            try:
                token = self.admin_token_file.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                raise SettingsError(f"admin-token-file: {self.admin_token_file} is not UTF-8 text") from None
            if not token:
                raise SettingsError(f"admin-token-file: {self.admin_token_file} is empty")
            return token
        return None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Command line (init) > environment > TOML file > defaults.
        return (init_settings, env_settings, _TomlSource(settings_cls))


class _TomlSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        path = _toml_path.get()
        self._data: dict[str, Any] = {}
        if path is not None:
            with path.open("rb") as file:
                raw = tomllib.load(file)
            # TOML keys may use dashes, like the command-line flags.
            self._data = {key.replace("-", "_"): value for key, value in raw.items()}

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


def env_variable(name: str) -> str:
    """The environment variable of setting ``name``: ``POP3D_MAIL_ROOT`` for ``mail_root``."""
    return f"{ServeSettings.model_config['env_prefix']}{name.upper()}"


def toml_key(name: str) -> str:
    """The TOML key of setting ``name``, as ``check-config`` prints it: ``mail-root`` for ``mail_root``.

    (A TOML file may also spell it ``mail_root``.)
    """
    return name.replace("_", "-")


#: The variable that names the TOML file when ``--config`` is not given.
CONFIG_VARIABLE = "POP3D_CONFIG"


def _refuse_unknown_variables() -> None:
    """A misspelled ``POP3D_*`` variable is an error, as an unknown TOML key is."""
    known = {env_variable(name) for name in ServeSettings.model_fields} | {CONFIG_VARIABLE}
    for variable in sorted(os.environ):
        if variable.upper().startswith("POP3D_") and variable.upper() not in known:
            raise SettingsError(f"{variable}: unknown setting")


def load_settings(cli: dict[str, Any], config: Path | None = None) -> ServeSettings:
    """Settings from the command line's values, the environment and ``config``.

    ``cli`` holds only what was given on the command line.  Without
    ``config``, the TOML file named by ``POP3D_CONFIG`` (if set) is read.
    """
    if config is None and os.environ.get(CONFIG_VARIABLE):
        config = Path(os.environ[CONFIG_VARIABLE])
    if config is not None and not config.is_file():
        raise SettingsError(f"config: no such file: {config}")
    _refuse_unknown_variables()
    token = _toml_path.set(config)
    try:
        return ServeSettings(**cli)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(f"config {config}: not valid TOML: {exc}") from None
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        name = ".".join(str(part) for part in first["loc"] if not isinstance(part, int))
        message = "unknown setting" if first["type"] == "extra_forbidden" else first["msg"]
        message = message.removeprefix("Value error, ")
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        # A check across settings has no single name; its message names them.
        prefix = f"{name.replace('_', '-')}: " if name else ""
        raise SettingsError(f"{prefix}{message}{more}") from None
    finally:
        _toml_path.reset(token)


#: What :func:`format_value` shows instead of a secret.
HIDDEN = "<hidden>"

# Names of settings whose value is a secret (a file *path* such as admin-token-file is not).
_SECRET_NAME = re.compile(r"(?:^|_)(?:token|password|passwd|secret|credentials?)$")


def _is_secret(name: str, value: Any) -> bool:
    return isinstance(value, SecretStr) or bool(_SECRET_NAME.search(name))


def _toml(value: Any) -> str:
    """``value`` as a TOML value (a JSON string is a valid TOML basic string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        if value and all(isinstance(item, ipaddress.IPv4Network | ipaddress.IPv6Network) for item in value):
            return json.dumps(",".join(str(item) for item in value))
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return json.dumps(str(value), ensure_ascii=True)


def format_value(name: str, value: Any) -> str:
    """One setting's value as in a TOML file, or ``"<hidden>"`` for a secret; ``""`` for none."""
    if value is None:
        return ""
    if name == "passdb_sql" and isinstance(value, SecretStr):
        from .sql_passdb import public_conninfo  # psycopg only where users are in PostgreSQL

        return json.dumps(public_conninfo(value.get_secret_value()))  # all but its password
    if _is_secret(name, value):
        return json.dumps(HIDDEN)
    if name in ("cleartext_auth_from", "proxy_protocol_from", "dovecot_uidl_format") and not value:
        return json.dumps("none")
    return _toml(value)


def _default(name: str) -> Any:
    return ServeSettings.model_fields[name].get_default(call_default_factory=True)


def effective_settings(settings: ServeSettings, *, everything: bool = False) -> list[tuple[str, str]]:
    """``(TOML key, value)`` of each setting that differs from its default (or of all, with ``everything``).

    Values are formatted by :func:`format_value`, so secrets are hidden and
    the output of ``pop3d check-config`` can be pasted into a TOML file.
    Compared as formatted, so that a default given explicitly is not shown.
    """
    out = []
    for name in ServeSettings.model_fields:
        value = format_value(name, getattr(settings, name))
        if everything or value != format_value(name, _default(name)):
            out.append((toml_key(name), value))
    return out
