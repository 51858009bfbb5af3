"""``pop3d check-config``: the settings of ``serve``, checked and printed, nothing served.

Runs the real command as a subprocess, with settings from flags, the
environment and a TOML file, and checks its output, its exit status and
that secrets stay hidden.  The examples of docs/serve.md run as printed.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from .certs import Certs
from .serve_process import AS_ROOT

DOC = Path(__file__).resolve().parent.parent / "docs" / "serve.md"
SECRET = "tok-7f3e9a1c-do-not-print"


def clean_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment without the test runner's ``POP3D_*`` variables, plus ``env``."""
    out = {key: value for key, value in os.environ.items() if not key.upper().startswith("POP3D_")}
    return {**out, **(env or {})}


def check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``pop3d check-config`` as a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "pop3d", "check-config", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(env),
        stdin=subprocess.DEVNULL,
    )


def printed(result: subprocess.CompletedProcess[str]) -> dict[str, object]:
    """The output as TOML, without what running the tests as root adds."""
    assert result.returncode == 0, result.stderr
    values = tomllib.loads(result.stdout)
    if AS_ROOT:
        assert values.pop("allow-root") is True
    return values


def test_prints_what_differs_from_the_defaults_from_every_source(site: Path) -> None:
    config = site / "pop3d.toml"
    config.write_text(f'users = "{site / "users"}"\nmax-connections = 50\nidle-timeout = 900\n')
    result = check(
        "--config",
        str(config),
        "--idle-timeout",
        "1200",
        "--no-admin",
        env={**AS_ROOT, "POP3D_MAIL_ROOT": str(site / "mail"), "POP3D_LOG_LEVEL": "DEBUG"},
    )
    # The flag beats the file; defaults are not shown.
    assert printed(result) == {
        "users": str(site / "users"),
        "mail-root": str(site / "mail"),
        "idle-timeout": 1200.0,
        "max-connections": 50,
        "no-admin": True,
        "log-level": "debug",
    }
    # What it prints is a settings file: read back, it gives the same.
    again = site / "again.toml"
    again.write_text(result.stdout)
    assert check("--config", str(again), env=AS_ROOT).stdout == result.stdout


def test_all_prints_every_setting(site: Path) -> None:
    values = printed(check("--all", "--no-admin", env=AS_ROOT))
    assert values["listen"] == ["127.0.0.1:1110"] and values["max-connections"] == 1000
    assert values["log-format"] == "text" and values["cleartext-auth-from"] == "127.0.0.0/8,::1/128"
    result = check("--all", "--no-admin", env=AS_ROOT)
    assert "# users =" in result.stdout.splitlines()  # no value: commented out


def test_secrets_are_hidden(site: Path, tmp_path: Path) -> None:
    config = tmp_path / "pop3d.toml"
    config.write_text(f'admin-token = "{SECRET}"\n')
    for args, env in (
        (["--config", str(config)], AS_ROOT),
        ([], {**AS_ROOT, "POP3D_ADMIN_TOKEN": SECRET}),
        (["--all"], {**AS_ROOT, "POP3D_ADMIN_TOKEN": SECRET}),
    ):
        result = check(*args, env=env)
        assert result.returncode == 0, result.stderr
        assert SECRET not in result.stdout + result.stderr
        assert 'admin-token = "<hidden>"' in result.stdout.splitlines()


def test_does_not_bind(site: Path) -> None:
    # A port in use stops serve, not check-config: it only checks.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        result = check("--listen", address, "--admin", address, env=AS_ROOT)
    assert printed(result)["listen"] == [address]


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ([], {"POP3D_MAX_CONECTIONS": "10"}, "POP3D_MAX_CONECTIONS: unknown setting"),
        (["--max-connections", "0"], {}, "max-connections: Input should be greater than or equal to 1"),
        ([], {"POP3D_IDLE_TIMEOUT": "soon"}, "idle-timeout: Input should be a valid number"),
        ([], {"POP3D_LOG_FORMAT": "xml"}, "log-format: "),
        (["--users", "/nonexistent/users"], {}, "users: no such file: /nonexistent/users"),
        (["--config", "/nonexistent.toml"], {}, "config: no such file: /nonexistent.toml"),
        (["--admin", "0.0.0.0:8110"], {}, "refusing to serve the admin API on 0.0.0.0:8110 without a token"),
        ([], {"POP3D_ADMIN_TOKEN": " "}, "admin-token: empty"),
        (["--group", "wheel"], {}, "group: give user too"),
    ],
)
def test_bad_settings_exit_2_with_one_line(args: list[str], env: dict[str, str], message: str) -> None:
    result = check(*args, env={**AS_ROOT, **env})
    assert result.returncode == 2, result
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if " WARNING " not in line]
    assert errors == [errors[0]] and errors[0].startswith("pop3d: error: ") and message in errors[0], result.stderr


def test_files_serve_would_refuse(site: Path, certs: Certs, tmp_path: Path) -> None:
    # Beyond "is there a file": checks that serve makes when it reads them.
    toml = tmp_path / "bad.toml"
    toml.write_text("max-connections = \n")
    (tmp_path / "users-dir").mkdir()
    for args, message in (
        (["--config", str(toml)], f"config {toml}: not valid TOML"),
        (
            ["--tls-cert", str(certs.key), "--tls-key", str(certs.key)],
            f"tls-cert: {certs.key} holds no PEM certificate",
        ),
        (["--tls-cert", str(certs.cert), "--tls-key", str(certs.ca_file)], "holds no PEM private key"),
        (["--listen-tls", "127.0.0.1:995"], "listen-tls: needs tls-cert and tls-key"),
        (["--users", str(tmp_path / "users-dir")], "users: no such file"),
    ):
        result = check("--no-admin", *args, env=AS_ROOT)
        assert result.returncode == 2, result
        assert result.stderr.strip().splitlines()[-1].startswith("pop3d: error: "), result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr
    good = check("--no-admin", "--tls-cert", str(certs.cert), "--tls-key", str(certs.key), env=AS_ROOT)
    assert printed(good)["tls-cert"] == str(certs.cert)


def doc_examples() -> list[tuple[str, list[str]]]:
    """Each ``$ ... pop3d check-config ...`` of docs/serve.md and the lines shown after it."""
    examples = []
    for block in re.findall(r"```console\n(.*?)```", DOC.read_text(), flags=re.S):
        command, *output = block.splitlines()
        if "pop3d check-config" in command:
            examples.append((command.removeprefix("$ "), output))
    return examples


@pytest.mark.parametrize(("command", "output"), doc_examples())
def test_docs_examples_run_as_printed(command: str, output: list[str], tmp_path: Path) -> None:
    env = clean_env(AS_ROOT)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the pop3d of this checkout
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    got = [line for line in (result.stdout + result.stderr).splitlines() if line != "allow-root = true"]
    got = [line for line in got if " WARNING " not in line]  # e.g. the admin API's "no token", when it applies
    assert got == output, shlex.quote(command)
    assert result.returncode == (0 if not output[-1].startswith("pop3d: error:") else 2)


def test_docs_have_examples() -> None:
    assert len(doc_examples()) >= 2


def test_pop3d_config_names_the_toml_file(site: Path) -> None:
    config = site / "from-env.toml"
    config.write_text("max-connections = 77\n")
    values = printed(check("--users", str(site / "users"), env={**AS_ROOT, "POP3D_CONFIG": str(config)}))
    assert values["max-connections"] == 77
    # --config still wins over the variable.
    other = site / "from-flag.toml"
    other.write_text("max-connections = 88\n")
    values = printed(
        check("--users", str(site / "users"), "--config", str(other), env={**AS_ROOT, "POP3D_CONFIG": str(config)})
    )
    assert values["max-connections"] == 88
    missing = check("--users", str(site / "users"), env={**AS_ROOT, "POP3D_CONFIG": str(site / "nope.toml")})
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"pop3d: error: config: no such file: {site / 'nope.toml'}"


def test_serve_settings_is_what_serve_would_run_with(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pop3d.cli import serve_settings

    for key in [k for k in os.environ if k.upper().startswith("POP3D_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("POP3D_ADMIN", "127.0.0.1:9911")
    settings = serve_settings(["--users", str(site / "users"), "--max-connections", "12"])
    assert settings.max_connections == 12
    assert str(settings.admin) == "127.0.0.1:9911"
    assert settings.users == site / "users"


@pytest.mark.parametrize(
    ("networks", "users", "said"),
    [
        ("none", True, "WARNING pop3d: no TLS certificate: on 0.0.0.0:1110, no client can log in"),
        ("10.0.0.0/8", True, "WARNING pop3d: no TLS certificate: on 0.0.0.0:1110, only clients from 10.0.0.0/8 can"),
        ("0.0.0.0/0,::/0", True, "WARNING pop3d: no TLS certificate: on 0.0.0.0:1110, every client sends its password"),
        ("0.0.0.0/0,::/0", False, None),  # the demo: its password is public, nothing to warn about
    ],
)
def test_the_cleartext_warning_says_what_happens(site: Path, networks: str, users: bool, said: str | None) -> None:
    args = ["--listen", "0.0.0.0:1110", "--no-admin"]
    if users:
        args += ["--users", str(site / "users"), "--mail-root", str(site / "mail")]
    result = check(*args, env={**AS_ROOT, "POP3D_CLEARTEXT_AUTH_FROM": networks})
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "TLS certificate" in line]
    assert [said in line for line in warnings] == ([True] if said else [])
