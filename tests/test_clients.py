"""Real mail clients against ``pop3d serve``: fetchmail, mpop and getmail.

Each client fetches alice's two messages and deletes them, as a user's
nightly job would.  A client that is not installed skips its test
(``.ci/run`` installs them).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .serve_process import SECOND, WELCOME, ServeProcess, mail_files, serve_args


@pytest.fixture
def proc(site: Path) -> Iterator[ServeProcess]:
    with ServeProcess(*serve_args(site, "--no-admin")) as process:
        yield process.wait_ready()


def delivered(folder: Path) -> list[bytes]:
    return sorted(path.read_bytes() for path in folder.rglob("*") if path.is_file())


def assert_fetched(messages: list[bytes]) -> None:
    assert len(messages) == 2
    bodies = sorted(message.replace(b"\r\n", b"\n") for message in messages)
    assert any(body.endswith(WELCOME.split(b"\n\n", 1)[1]) for body in bodies), bodies
    assert any(body.endswith(SECOND.split(b"\n\n", 1)[1]) for body in bodies), bodies


def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, **kwargs)  # type: ignore[call-overload]
    assert result.returncode == 0, result.stdout + result.stderr
    return result  # type: ignore[no-any-return]


@pytest.mark.skipif(shutil.which("fetchmail") is None, reason="fetchmail is not installed")
def test_fetchmail(proc: ServeProcess, site: Path, tmp_path: Path) -> None:
    out = tmp_path / "fetchmail-out"
    out.mkdir()
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        "set no syslog\n"
        f"poll 127.0.0.1 service {proc.port} protocol pop3 auth password:\n"
        "  user 'alice' there with password 'wonderland' is 'root' here\n"
        "  no keep\n"
        "  sslproto ''\n"
        f"  mda \"/bin/sh -c 'cat > {out}/msg-$$'\"\n"
    )
    rc.chmod(0o600)
    run(["fetchmail", "-f", str(rc), "-N", "--nosyslog"], env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert_fetched(delivered(out))
    assert mail_files(site) == []


def fetch_with_mpop(tmp_path: Path, host: str, port: int, *options: str) -> list[bytes]:
    """Run mpop to fetch and delete alice's mail with ``options``; the messages it delivered."""
    out = tmp_path / "mpop-out"
    for sub in ("cur", "new", "tmp"):
        (out / sub).mkdir(parents=True)
    run(
        [
            "mpop",
            f"--host={host}",
            f"--port={port}",
            "--user=alice",
            "--passwordeval=echo wonderland",
            *options,
            f"--delivery=maildir,{out}",
            "--keep=off",
            f"--uidls-file={tmp_path / 'uidls'}",
        ],
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    return delivered(out)


@pytest.mark.skipif(shutil.which("mpop") is None, reason="mpop is not installed")
def test_mpop(proc: ServeProcess, site: Path, tmp_path: Path) -> None:
    # In clear, from loopback (trusted by default): mpop must be told to allow it.
    assert_fetched(fetch_with_mpop(tmp_path, "127.0.0.1", proc.port, "--tls=off", "--auth=user"))
    assert mail_files(site) == []


@pytest.mark.skipif(shutil.which("getmail") is None, reason="getmail is not installed")
def test_getmail(proc: ServeProcess, site: Path, tmp_path: Path) -> None:
    out = tmp_path / "getmail-out"
    out.mkdir()
    config = tmp_path / "getmail"
    config.mkdir()
    (config / "getmailrc").write_text(
        "[retriever]\n"
        "type = SimplePOP3Retriever\n"
        "server = 127.0.0.1\n"
        f"port = {proc.port}\n"
        "username = alice\n"
        "password = wonderland\n"
        "\n[destination]\n"
        "type = MDA_external\n"
        "path = /bin/sh\n"
        f'arguments = ("-c", "cat > {out}/msg-$$")\n'
        "allow_root_commands = true\n"
        "\n[options]\n"
        "delete = true\n"
        "read_all = true\n"
    )
    run(["getmail", "--getmaildir", str(config), "--rcfile", "getmailrc"], env={"HOME": str(tmp_path)})
    assert_fetched(delivered(out))
    assert mail_files(site) == []
