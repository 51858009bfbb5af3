"""``--log-format json``: one JSON object per line, with session fields.

A real ``pop3d serve --log-format json`` process serves poplib; every line
it writes must parse, and the session lines must name the session and the
client.  The formatter itself is checked for escaping and tracebacks.
"""

from __future__ import annotations

import io
import json
import logging
import poplib
import signal
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from pop3d.logs import JsonFormatter, session_fields

from .serve_process import ServeProcess, pop3d_cli, serve_args


def record(msg: str, *args: object, exc_info: bool = False) -> logging.LogRecord:
    import sys

    return logging.LogRecord(
        "pop3d.session", logging.INFO, __file__, 1, msg, args, sys.exc_info() if exc_info else None
    )


def test_serve_logs_json_lines_with_session_and_remote(site: Path) -> None:
    with ServeProcess(*serve_args(site, "--no-admin", "--log-format", "json")) as proc:
        proc.wait_for(r'"message": "ready ')
        port = int(proc.wait_for(r"ready pop3=127\.0\.0\.1:(\d+)").group(1))
        pop = poplib.POP3("127.0.0.1", port, timeout=10)
        pop.user("alice")
        pop.pass_("wonderland")
        pop.quit()
        # A user name with a control character and non-ASCII must not break the line.
        pop = poplib.POP3("127.0.0.1", port, timeout=10)
        with pytest.raises(poplib.error_proto):
            pop.user("\u00e9v\u00e8\x1b[31m")
            pop.pass_("wrong")
        pop.quit()
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0

    entries = [json.loads(line) for line in proc.lines]  # every line is one JSON object
    assert all(line.isascii() and "\x1b" not in line for line in proc.lines)
    assert any(entry["message"] == "stopped" for entry in entries)
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= entry.keys()
        when = datetime.fromisoformat(entry["time"])
        assert when.utcoffset() == timedelta(0)
    sessions = [entry for entry in entries if entry["message"].startswith("session ")]
    assert len(sessions) >= 4
    for entry in sessions:
        assert entry["session"] in ("conn1", "conn2"), entry
        assert entry["remote"] == "127.0.0.1", entry
    logged_in = next(entry for entry in sessions if "alice logged in" in entry["message"])
    assert logged_in["session"] == "conn1" and logged_in["level"] == "info"
    summary = next(entry for entry in sessions if "user=alice remote=" in entry["message"])
    assert summary["remote_port"] == int(summary["message"].split("remote=127.0.0.1:")[1].split()[0])
    failed = next(entry for entry in sessions if "login failed" in entry["message"])
    assert failed["session"] == "conn2"


def test_log_format_from_the_environment_and_toml(site: Path, tmp_path: Path) -> None:
    config = tmp_path / "pop3d.toml"
    config.write_text('log-format = "json"\n')
    with ServeProcess(*serve_args(site, "--no-admin", "--config", str(config))) as proc:
        proc.wait_for(r"ready pop3=")
        assert json.loads(proc.lines[-1])["logger"] == "pop3d"
    with ServeProcess(*serve_args(site, "--no-admin"), env={"POP3D_LOG_FORMAT": "JSON"}) as proc:
        proc.wait_for(r"ready pop3=")
        assert json.loads(proc.lines[-1])["logger"] == "pop3d"
    result = pop3d_cli("serve", *serve_args(site, "--no-admin"), env={"POP3D_LOG_FORMAT": "xml"})
    assert result.returncode == 2
    assert result.stderr.startswith("pop3d: error: log-format: ") and result.stderr.count("\n") == 1


def test_fields_from_the_format_string() -> None:
    assert session_fields(
        record("session %s from %s: %s logged in (%s), %d messages", "conn4", "::1", "a", "b", 1)
    ) == {
        "session": "conn4",
        "remote": "::1",
    }
    summary = "session %s user=%s remote=%s:%s tls=%s retrieved=%d deleted=%d bytes=%d duration=%.3fs"
    assert session_fields(record(summary, "conn5", "bob", "10.0.0.1", 4242, "no", 0, 0, 9, 0.5)) == {
        "session": "conn5",
        "remote": "10.0.0.1",
        "remote_port": 4242,
    }
    assert session_fields(record("server %s: closing %s from %s to make room", "pop3", "conn9", "192.0.2.1")) == {
        "session": "conn9",
        "remote": "192.0.2.1",
    }
    assert session_fields(record("refusing a connection from %s: %s", "192.0.2.7", "busy")) == {"remote": "192.0.2.7"}
    assert session_fields(record("session %s from %s: timed out", "conn1", "-")) == {"session": "conn1"}
    assert session_fields(record("ready %s admin=%s", "pop3=x", "off")) == {}
    assert session_fields(record("session %s from %s", "conn1")) == {}  # arguments missing: no guess
    assert session_fields(record("100%% of %s", "x")) == {}


def test_formatter_escapes_and_keeps_tracebacks() -> None:
    formatter = JsonFormatter()
    line = formatter.format(
        record("session %s from %s: login failed for %s", "conn1", "127.0.0.1", "\u00e9\n\x00\u2028")
    )
    assert line.isascii() and "\n" not in line
    assert json.loads(line)["message"].endswith("\u00e9\n\x00\u2028")
    try:
        raise ValueError("boom")
    except ValueError:
        entry = json.loads(formatter.format(record("session %s: internal error", "conn2", exc_info=True)))
    assert entry["session"] == "conn2" and entry["level"] == "info"
    assert entry["traceback"].startswith("Traceback") and "ValueError: boom" in entry["traceback"]
    # A call whose arguments do not fit its format still gives a line.
    assert "%d" in json.loads(formatter.format(record("%d messages", "x")))["message"]


def test_handler_output_is_one_line_per_record() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("pop3d.test-json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("a\nb")
        logger.error("c\r\nd")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert [json.loads(line)["message"] for line in lines] == ["a\nb", "c\r\nd"]
