"""Every reply text the server sends, in one place.

The protocol engine builds its replies from these, and the tests import them
so that a changed wording is changed once.  Texts that take values are
``str.format`` templates.  Extended response codes (RFC 2449 section 8,
RFC 3206) are part of the text, in square brackets right after ``-ERR``.
"""

from __future__ import annotations

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
MECHANISM_USER_CHOSEN = "login mechanism USER/PASS was chosen, APOP not allowed"
APOP_DISABLED = "APOP is not enabled on this server, use USER and PASS"
MECHANISM_APOP_CHOSEN = "login mechanism APOP was chosen, USER not allowed"
NOT_AUTHENTICATED = "client not authenticated"
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

# Connections over the server's limits, answered instead of the greeting.
TOO_MANY_CONNECTIONS = "[SYS/TEMP] too many connections, try again later"
TOO_MANY_FROM_ADDRESS = "[SYS/TEMP] too many connections from your address"

# Storage failures (RFC 3206).
SYS_TEMP = "[SYS/TEMP] mailbox temporarily unavailable, try again later"
SYS_TEMP_UPDATE = "[SYS/TEMP] some deleted messages were not removed"
SYS_PERM = "[SYS/PERM] mailbox unavailable"

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
}


def ok(text: str = "") -> bytes:
    """A single-line positive reply, ready for the wire."""
    return b"+OK " + text.encode() + b"\r\n" if text else b"+OK\r\n"


def err(text: str) -> bytes:
    """A single-line negative reply, ready for the wire."""
    return b"-ERR " + text.encode() + b"\r\n"
