"""End to end: curl drives the admin API of a real ``pop3d serve`` process.

A poplib session stays open while curl, with the bearer token, takes the
server down and up, changes its config, lists and inspects connections,
kicks a session, destroys the server with ``defer``, and reads /metrics.
"""

from __future__ import annotations

import json
import poplib
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .serve_process import ServeProcess, mail_files, serve_args

CURL = shutil.which("curl")
pytestmark = pytest.mark.skipif(CURL is None, reason="curl is not installed (.ci/run installs it)")

TOKEN = "e2e-token-3f9a"


@pytest.fixture
def proc(site: Path) -> Iterator[ServeProcess]:
    with ServeProcess(*serve_args(site), "--admin", "127.0.0.1:0", env={"POP3D_ADMIN_TOKEN": TOKEN}) as process:
        yield process.wait_ready()


def curl(proc: ServeProcess, method: str, path: str, body: Any = None, token: str | None = TOKEN) -> tuple[int, Any]:
    assert CURL is not None and proc.admin is not None
    command = [CURL, "-sS", "--max-time", "10", "-X", method, "-w", "\n%{http_code}"]
    if token is not None:
        command += ["-H", f"Authorization: Bearer {token}"]
    if body is not None:
        command += ["-H", "Content-Type: application/json", "--data", json.dumps(body)]
    result = subprocess.run([*command, proc.admin + path], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    text, _, status = result.stdout.rpartition("\n")
    try:
        data = json.loads(text) if text else None
    except json.JSONDecodeError:
        data = text
    return int(status), data


def login(port: int) -> poplib.POP3:
    pop = poplib.POP3("127.0.0.1", port, timeout=10)
    pop.user("alice")
    pop.pass_("wonderland")
    return pop


def test_token_is_required(proc: ServeProcess) -> None:
    assert curl(proc, "GET", "/servers", token=None)[0] == 401
    assert curl(proc, "GET", "/servers", token="wrong")[0] == 401
    assert curl(proc, "GET", "/healthz", token=None)[0] == 200
    status, data = curl(proc, "GET", "/servers")
    assert status == 200
    assert [s["name"] for s in data["servers"]] == ["pop3"]


def test_down_up_config_and_connections_while_a_session_is_open(proc: ServeProcess, site: Path) -> None:
    port = proc.port
    pop = login(port)

    status, data = curl(proc, "POST", "/servers/pop3/down")
    assert (status, data["state"]) == (200, "down")
    with pytest.raises(OSError):
        poplib.POP3("127.0.0.1", port, timeout=5)
    assert pop.stat()[0] == 2  # the open session carries on

    status, data = curl(proc, "PATCH", "/servers/pop3/config", {"idle_timeout": 900, "port": 0})
    assert status == 200 and data["idle_timeout"] == 900
    status, data = curl(proc, "PATCH", "/servers/pop3/config", {"idle_timeout": -1, "max_line": 300})
    assert status == 422 and "idle_timeout" in json.dumps(data)
    assert curl(proc, "GET", "/servers/pop3/config/max_line")[1]["value"] == 1024  # nothing half-applied
    assert curl(proc, "GET", "/servers/pop3/config/auth")[1]["value"].startswith("passwd-file:")

    status, data = curl(proc, "POST", "/servers/pop3/up")
    assert status == 200 and data["state"] == "up"
    new_port = data["port"]
    assert new_port != 0
    other = poplib.POP3("127.0.0.1", new_port, timeout=10)
    other.quit()

    status, data = curl(proc, "GET", "/servers/pop3/connections")
    assert status == 200
    [conn] = data["connections"]
    status, state = curl(proc, "GET", f"/servers/pop3/connections/{conn['id']}")
    assert status == 200
    assert (state["name"], state["state"], state["msg"]) == ("alice", "trans", 2)
    assert "wonderland" not in json.dumps(state)
    assert curl(proc, "GET", "/servers/pop3/connections/conn999")[0] == 404
    assert curl(proc, "GET", "/servers/nope")[0] == 404
    pop.quit()


def test_kicking_a_session_closes_its_socket_and_deletes_nothing(proc: ServeProcess, site: Path) -> None:
    pop = login(proc.port)
    pop.dele(1)
    [conn] = curl(proc, "GET", "/servers/pop3/connections")[1]["connections"]
    status, _ = curl(proc, "DELETE", f"/servers/pop3/connections/{conn['id']}")
    assert status in (202, 204)
    with pytest.raises((poplib.error_proto, OSError, EOFError)):
        pop.stat()  # the server closed the socket
    assert len(mail_files(site)) == 2
    assert login(proc.port).quit().startswith(b"+OK")  # the lock was released


def test_destroy_defer_lets_the_session_finish(proc: ServeProcess, site: Path) -> None:
    pop = login(proc.port)
    status, data = curl(proc, "DELETE", "/servers/pop3?mode=defer")
    assert (status, data["state"]) == (202, "exiting")
    assert curl(proc, "GET", "/servers/pop3")[1]["state"] == "exiting"
    assert curl(proc, "POST", "/servers/pop3/up")[0] == 409
    pop.dele(1)
    assert pop.quit().startswith(b"+OK")
    assert len(mail_files(site)) == 1
    proc.wait_for("session \\S+ user=alice")
    for _ in range(100):
        if curl(proc, "GET", "/servers/pop3")[0] == 404:
            break
    assert curl(proc, "GET", "/servers")[1]["servers"] == []


def test_metrics_move_after_a_retrieval(proc: ServeProcess) -> None:
    def retrieved() -> float:
        status, text = curl(proc, "GET", "/metrics")
        assert status == 200
        for line in text.splitlines():
            if line.startswith("pop3d_messages_retrieved_total{") and 'server="pop3"' in line:
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError("no pop3d_messages_retrieved_total for pop3:\n" + text)

    before = retrieved()
    pop = login(proc.port)
    pop.retr(1)
    pop.quit()
    assert retrieved() == before + 1


def test_sigterm_stops_the_api_with_the_servers(proc: ServeProcess) -> None:
    assert curl(proc, "GET", "/healthz", token=None)[0] == 200
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0
    assert any("admin API stopped" in line for line in proc.lines)
    assert CURL is not None and proc.admin is not None
    after = subprocess.run([CURL, "-sS", "--max-time", "5", proc.admin + "/healthz"], capture_output=True, timeout=30)
    assert after.returncode != 0  # nothing listens any more
