"""Every reply text the server sends, in one place.

The protocol engine builds its replies from these, and the tests import them
so that a changed wording is changed once.  Texts that take values are
``str.format`` templates.  Extended response codes (RFC 2449 section 8,
RFC 3206) are part of the text, in square brackets right after ``-ERR``.
"""

from __future__ import annotations

from collections.abc import Iterable

# Greeting; ``challenge`` is the APOP timestamp ``<...@host>`` (RFC 1939 section 7).
GREETING = "POP3 server {host} ready {challenge}"
GREETING_NO_APOP = "POP3 server {host} ready"

# AUTHORIZATION state.
USER_ACCEPTED = "send PASS"
PASS_WITHOUT_USER = "send USER first"
LOGGED_IN = "logged in, {count} messages ({octets} octets)"
AUTH_FAILED = "[AUTH] invalid user name or password"
AUTH_TOO_MANY = "[AUTH] too many failed logins, closing connection"
MAILDROP_LOCKED = "[IN-USE] maildrop is locked by another session"
TOO_MANY_USER_SESSIONS = "[IN-USE] too many sessions of this user from your address"
MECHANISM_USER_CHOSEN = "login mechanism USER/PASS was chosen, APOP not allowed"
APOP_DISABLED = "APOP is not enabled on this server, use USER and PASS"
MECHANISM_APOP_CHOSEN = "login mechanism APOP was chosen, USER not allowed"
NOT_AUTHENTICATED = "client not authenticated"

# Cleartext logins on an unencrypted connection from outside the trusted networks.
CLEARTEXT_USE_STLS = "[AUTH] cleartext logins are not allowed on an unencrypted connection (use STLS first)"
CLEARTEXT_NO_TLS = "[AUTH] cleartext logins are not allowed on an unencrypted connection, and this server offers no TLS"

# STLS (RFC 2595).
STLS_BEGIN = "begin TLS negotiation"
STLS_ACTIVE = "command not permitted when TLS active"
STLS_UNAVAILABLE = "TLS is not available on this server"

# AUTH (RFC 5034).  A challenge is "+ " and base64, not a reply of its own here.
AUTH_MECHANISMS = "SASL mechanisms follow"
AUTH_UNKNOWN_MECHANISM = "unsupported authentication mechanism '{mechanism}'"
AUTH_CANCELLED = "authentication cancelled"
AUTH_BAD_BASE64 = "[AUTH] the response is not valid base64"
AUTH_REJECTED = "[AUTH] {reason}"
# The reasons of AUTH_REJECTED: what was wrong with the client's SASL messages.
SASL_PLAIN_FORM = "a PLAIN message is authzid NUL authcid NUL password"
SASL_OTHER_USER = "logging in as another user is not supported"
SASL_NOT_UTF8 = "the {what} is not UTF-8"
SASL_EMPTY = "the {what} is empty"
SASL_ONE_MESSAGE = "{mechanism} takes one message"
# LOGIN's challenges (before base64).
SASL_LOGIN_USER = "Username:"
SASL_LOGIN_PASSWORD = "Password:"
ALREADY_AUTHENTICATED = "client already authenticated"

# TRANSACTION state.
STAT = "{count} {octets}"
LIST_ALL = "{count} messages ({octets} octets)"
LIST_ONE = "{msg} {octets}"
UIDL_ALL = "unique-id listing follows"
UIDL_ONE = "{msg} {uid}"
RETR = "{octets} octets"
TOP = "top of message follows"
DELE = "message {msg} deleted"
NOOP = ""
RSET = "maildrop has {count} messages ({octets} octets)"
NO_SUCH_MESSAGE = "no such message"
MESSAGE_DELETED = "message {msg} already deleted"

# Any state.
CAPA = "capability list follows"
QUIT_AUTHORIZATION = "pop3d signing off"
QUIT_UPDATE = "pop3d signing off ({count} messages left)"
UNKNOWN_COMMAND = "unknown command '{command}'"
BAD_ARGUMENTS = "bad arguments: usage {usage}"
LINE_TOO_LONG = "line too long, at most {limit} octets"
IDLE_TIMEOUT = "idle for too long, closing connection"
LOGIN_TIMEOUT = "took too long to log in, closing connection"

# Connections over the server's limits, answered instead of the greeting.
TOO_MANY_CONNECTIONS = "[SYS/TEMP] too many connections, try again later"
TOO_MANY_FROM_ADDRESS = "[SYS/TEMP] too many connections from your address"
SHUTTING_DOWN = "[SYS/TEMP] server shutting down, try again later"

# The PROXY protocol (HAProxy's): only from trusted proxies, and well-formed.
PROXY_REFUSED = "PROXY protocol header not accepted from your address"
PROXY_MALFORMED = "bad PROXY protocol header: {problem}"

# Storage failures (RFC 3206).
SYS_TEMP = "[SYS/TEMP] mailbox temporarily unavailable, try again later"
SYS_TEMP_UPDATE = "[SYS/TEMP] some deleted messages were not removed"
SYS_PERM = "[SYS/PERM] mailbox unavailable"
# The cluster's lock on the mailbox was lost (its lease could not be renewed, or another took it).
LOCK_LOST = "[SYS/TEMP] lost the lock on the mailbox, no messages were deleted; try again later"

# How each command is used, for BAD_ARGUMENTS.
USAGE = {
    "USER": "USER name",
    "PASS": "PASS password",
    "APOP": "APOP name digest",
    "STAT": "STAT",
    "LIST": "LIST [msg]",
    "RETR": "RETR msg",
    "DELE": "DELE msg",
    "NOOP": "NOOP",
    "RSET": "RSET",
    "QUIT": "QUIT",
    "TOP": "TOP msg lines",
    "UIDL": "UIDL [msg]",
    "CAPA": "CAPA",
    "STLS": "STLS",
    "AUTH": "AUTH [mechanism [initial-response]]",
}


def ok(text: str = "") -> bytes:
    """A single-line positive reply, ready for the wire."""
    return b"+OK " + text.encode() + b"\r\n" if text else b"+OK\r\n"


def multiline(text: str, lines: Iterable[str]) -> bytes:
    """A positive reply with ``lines`` after it and the final ``.`` (lines must not start with ".")."""
    return ok(text) + "".join(line + "\r\n" for line in lines).encode() + b".\r\n"


def challenge(data: str) -> bytes:
    """A SASL server challenge line: ``+``, a space and base64 (maybe empty)."""
    return b"+ " + data.encode() + b"\r\n"


def err(text: str) -> bytes:
    """A single-line negative reply, ready for the wire."""
    return b"-ERR " + text.encode() + b"\r\n"
