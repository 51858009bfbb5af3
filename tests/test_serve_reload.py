"""SIGHUP reloads the settings of a running ``pop3d serve`` without dropping sessions.

A real process reads a TOML file; the test edits it, sends SIGHUP, and
checks the ``reload:`` log line, the admin API's view of the server and
what clients see.
"""

from __future__ import annotations

import json
import poplib
import re
import signal
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from .serve_process import ServeProcess

TOKEN = "reload-token-5d1e"


def admin_get(proc: ServeProcess, path: str) -> Any:
    assert proc.admin is not None
    request = urllib.request.Request(proc.admin + path, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def can_log_in(port: int, user: str, password: str) -> bool:
    pop = poplib.POP3("127.0.0.1", port, timeout=10)
    try:
        pop.user(user)
        pop.pass_(password)
    except poplib.error_proto:
        return False
    finally:
        pop.quit()
    return True


def write_config(path: Path, users: Path, **more: str) -> None:
    more.setdefault("mail-root", f'"{path.parent / "mail"}"')
    lines = [f'users = "{users}"', *(f"{key} = {value}" for key, value in more.items())]
    path.write_text("\n".join(lines) + "\n")


def test_sighup_applies_new_settings_and_keeps_sessions(site: Path) -> None:
    config = site / "pop3d.toml"
    write_config(config, site / "users", **{"max-connections": "50", "log-level": '"info"'})
    carol = site / "users2"
    carol.write_text("carol:{PLAIN}sesame\n")
    args = ["--config", str(config), "--listen", "127.0.0.1:0"]
    with ServeProcess(*args, "--admin", "127.0.0.1:0", env={"POP3D_ADMIN_TOKEN": TOKEN}) as proc:
        proc.wait_ready()
        assert admin_get(proc, "/servers/pop3/config")["max_connections"] == 50
        session = poplib.POP3("127.0.0.1", proc.port, timeout=10)
        session.user("alice")
        session.pass_("wonderland")

        # New limits, a new passwd-file, a new log level; the mail root cannot change.
        write_config(
            config,
            carol,
            **{"max-connections": "70", "penalty-max": "5", "log-level": '"debug"', "mail-root": f'"{site}"'},
        )
        proc.signal(signal.SIGHUP)
        line = proc.wait_for(r"reload: (users .*)").group(1)
        assert "max_connections 50 -> 70" in line and "log_level info -> debug" in line
        assert f"users {site / 'users'} -> {carol}" in line and "penalty_max 15.0 -> 5.0" in line
        mail, other = re.escape(str(site / "mail")), re.escape(str(site))
        proc.wait_for(rf"reload: mail_root {mail} -> {other} needs a restart; keeping {mail}$")
        config_now = admin_get(proc, "/servers/pop3/config")  # the admin API still answers where it was
        assert config_now["max_connections"] == 70
        assert config_now["auth"] == f"passwd-file:{carol}"
        assert config_now["penalties"].startswith("penalties: up to 5 s")
        assert can_log_in(proc.port, "carol", "sesame")
        assert not can_log_in(proc.port, "alice", "wonderland")
        assert session.stat()[0] == 2  # the open session goes on
        session.quit()
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("max-connections = \n", r"reload: keeping the old settings: config .*: not valid TOML"),
        ("max-connections = 0\n", r"reload: keeping the old settings: max-connections: .*greater than or equal to 1"),
        ("max-conections = 10\n", r"reload: keeping the old settings: max-conections: unknown setting"),
        ('users = "/nonexistent/users"\n', r"reload: keeping the old settings: users: no such file"),
    ],
)
def test_a_bad_file_keeps_the_old_settings(site: Path, content: str, error: str) -> None:
    config = site / "pop3d.toml"
    write_config(config, site / "users", **{"max-connections": "50"})
    args = ["--config", str(config), "--listen", "127.0.0.1:0"]
    with ServeProcess(*args, "--admin", "127.0.0.1:0", env={"POP3D_ADMIN_TOKEN": TOKEN}) as proc:
        proc.wait_ready()
        config.write_text(content)
        proc.signal(signal.SIGHUP)
        proc.wait_for(error)
        assert admin_get(proc, "/servers/pop3/config")["max_connections"] == 50
        assert can_log_in(proc.port, "alice", "wonderland")
        # Fixed again, unchanged: said so.
        write_config(config, site / "users", **{"max-connections": "50"})
        proc.signal(signal.SIGHUP)
        proc.wait_for(r"reload: nothing changed")
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0
        assert not [line for line in proc.lines if "Traceback" in line]
