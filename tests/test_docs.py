"""The curl commands of docs/admin-api.md work as printed.

Each command is taken from the document, pointed at a real ``pop3d serve``
(the document's 127.0.0.1:8110 becomes the test's free port) and run by
bash with ``POP3D_ADMIN_TOKEN`` set.  Commands that destroy things run in
the end-to-end tests instead.
"""

from __future__ import annotations

import json
import os
import poplib
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .serve_process import ServeProcess, serve_args

DOC = Path(__file__).resolve().parent.parent / "docs" / "admin-api.md"
TOKEN = "docs-token-81c2"
pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


def doc_commands() -> list[str]:
    """Every curl command with the token header, continuation lines joined."""
    blocks = re.findall(r"```sh\n(.*?)```", DOC.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for command in re.sub(r"\\\n\s*", "", block).splitlines():
            command = command.strip()
            if command.startswith("curl ") and "Bearer $POP3D_ADMIN_TOKEN" in command:
                commands.append(command)
    return commands


COMMANDS = doc_commands()
SAFE = [c for c in COMMANDS if "-X DELETE" not in c]


@pytest.fixture(scope="module")
def proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    from .serve_process import make_site

    site = make_site(tmp_path_factory.mktemp("docs"))
    with ServeProcess(*serve_args(site), "--admin", "127.0.0.1:0", env={"POP3D_ADMIN_TOKEN": TOKEN}) as process:
        process.wait_ready()
        # The document shows a session: conn1, the first connection.
        session = poplib.POP3("127.0.0.1", process.port, timeout=10)
        session.user("alice")
        session.pass_("wonderland")
        yield process
        session.quit()


def test_the_document_has_commands_for_every_endpoint() -> None:
    text = " ".join(COMMANDS)
    for path in ("/servers", "/config", "/connections", "/up", "/down", "/metrics", "/healthz", "/readyz"):
        assert path in text
    assert len(SAFE) >= 10


@pytest.mark.parametrize("command", SAFE)
def test_command_works_as_printed(proc: ServeProcess, command: str) -> None:
    assert proc.admin is not None
    pointed = command.replace("http://127.0.0.1:8110", proc.admin)
    result = subprocess.run(
        ["bash", "-c", pointed + ' -w "\\n%{http_code}"'],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "POP3D_ADMIN_TOKEN": TOKEN},
    )
    assert result.returncode == 0, result.stderr
    body, _, status = result.stdout.rpartition("\n")
    if "bogus" in command:  # the document's example of a bad request
        assert status == "422" and json.loads(body)["error"]
    else:
        assert status.startswith("2"), (status, body)
    if "/metrics" not in command and body:
        json.loads(body)
