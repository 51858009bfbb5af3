"""Log output of ``pop3d serve``: plain text lines or one JSON object per line.

:func:`setup` installs one handler on the root logger, writing to stderr,
with :class:`JsonFormatter` for ``--log-format json`` or the classic text
format otherwise; :func:`set_level` and :func:`set_format` change them in
place (SIGHUP).

A JSON line holds ``time`` (ISO 8601, UTC), ``level``, ``logger`` and
``message``; a line about one session adds ``session`` (its id, ``conn7``)
and ``remote`` (the client's IP address, and ``remote_port`` when the line
names it); an exception adds ``traceback``.  Every character outside
printable ASCII is escaped, so a user name with a newline or an escape
sequence cannot forge or garble a line.

The session modules log with ``%``-style format strings
(``"session %s from %s: ..."``) and no ``extra=`` fields, so
:func:`session_fields` finds the session id and the address by reading the
format string: the argument after ``session ``, after ``from `` and after
``remote=`` (``%s:%s``, address and port).  A message worded otherwise
simply has no such fields.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, Literal

__all__ = ["TEXT_FORMAT", "JsonFormatter", "LogFormat", "session_fields", "set_format", "set_level", "setup"]

LogFormat = Literal["text", "json"]

#: The ``text`` format.
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Loggers that say too much at info: held at warning unless the level is higher.
_NOISY = ("hypercorn.access", "hypercorn.error")

# One %-placeholder, as the logging module's %-formatting reads them (and %%, which takes no argument).
_PLACEHOLDER = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[hlL]?[diouxXeEfFgGcrsa%]")
# What precedes a placeholder that holds a session id: "session %s" and the server's "closing %s from".
_SESSION_BEFORE = re.compile(r"(?:^session |^server %s: closing )$")


def session_fields(record: logging.LogRecord) -> dict[str, Any]:
    """``session``, ``remote`` and ``remote_port`` of a log record, as far as its format string tells.

    Reads ``record.msg`` and ``record.args`` (see the module's docstring);
    ``{}`` for a record that names no session or client, or whose
    arguments do not match its format.
    """
    msg, args = record.msg, record.args
    if not isinstance(msg, str) or not isinstance(args, tuple) or "%" not in msg:
        return {}
    fields: dict[str, Any] = {}
    index = 0
    for match in _PLACEHOLDER.finditer(msg):
        spec = match.group()
        if spec == "%%":
            continue
        if index >= len(args):
            return {}
        before = msg[: match.start()]
        value = args[index]
        if _SESSION_BEFORE.search(before) and "session" not in fields:
            fields["session"] = str(value)
        elif before.endswith("remote=") and "remote" not in fields:
            fields["remote"] = str(value)
            # "remote=%s:%s": the next argument is the port.
            if msg[match.end() : match.end() + 1] == ":" and index + 1 < len(args):
                port = args[index + 1]
                if isinstance(port, int) and not isinstance(port, bool) and port > 0:
                    fields["remote_port"] = port
        elif before.endswith("from ") and "remote" not in fields:
            fields["remote"] = str(value)
        index += 1 + spec.count("*")  # a "*" width or precision takes an argument of its own
    if fields.get("remote") in ("", "-"):  # the session modules' "no address" (a memory stream)
        del fields["remote"]
        fields.pop("remote_port", None)
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line, ASCII only."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON object (see the module's docstring for its fields)."""
        try:
            message = record.getMessage()
        except Exception:  # a bad call must not lose the line: log what was given
            message = f"{record.msg!r} % {record.args!r}"
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
            **session_fields(record),
        }
        trace = []
        if record.exc_info:
            trace.append(self.formatException(record.exc_info))
        elif record.exc_text:
            trace.append(record.exc_text)
        if record.stack_info:
            trace.append(self.formatStack(record.stack_info))
        if trace:
            entry["traceback"] = "\n".join(trace)
        # ensure_ascii escapes control characters, non-ASCII and lone surrogates alike.
        return json.dumps(entry, ensure_ascii=True, default=str)


def _formatter(log_format: LogFormat) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


_handler: logging.Handler | None = None


def setup(level: str, log_format: LogFormat = "text") -> None:
    """Log to stderr at ``level`` (``debug``... ``error``) in ``log_format``, replacing earlier handlers."""
    global _handler
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(_formatter(log_format))
    root.addHandler(_handler)
    set_level(level)


def set_level(level: str) -> None:
    """Change the level of every pop3d log line (and of the admin API's web server's)."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def set_format(log_format: LogFormat) -> None:
    """Change the format of the handler :func:`setup` installed (nothing without one)."""
    if _handler is not None:
        _handler.setFormatter(_formatter(log_format))
