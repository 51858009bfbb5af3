"""Every shell command in the docs is run, by a test or by CI, as printed.

:data:`CLAIMS` is the one registry: for each page, which runner runs which of
its ```` ```sh ```` commands.  :func:`test_every_command_is_claimed` fails,
listing them, for any command that no runner claims.  The runners are:

- other test modules that run a page's commands themselves, and expose
  them (``tests/test_docs.py``, ``tests/test_deploy_rules.py``,
  ``tests/test_admin_schemathesis.py``);
- CI scripts that hold the command as printed (``.ci/run``) or read the page
  and run its commands (``.ci/container-docs-commands``);
- the sandbox tests below: each page's commands in order, by bash, in a
  temporary directory.  What a sandbox changes in a command is what
  ``tests/test_docs.py`` changes: the place, not the command.  Paths under
  ``/etc/pop3d``, ``/var/lib/pop3d`` and ``/srv/pop3d`` move into the
  sandbox; addresses become free loopback ports (``pop3d serve`` listens
  on ``127.0.0.1:0`` and the commands after it are pointed at the ports it
  reports); ``sudo`` goes (CI runs as root); the system user ``pop3d``
  becomes a user made for the test and removed after it; the host
  ``mail.example.org`` is ``localhost``, with a certificate from a test CA.

A command is one line of a block, continuation lines joined.
"""

from __future__ import annotations

import os
import poplib
import pwd
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme

from .certs import issue
from .serve_process import WELCOME, ServeProcess

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent
CURL = shutil.which("curl")
IS_ROOT = os.geteuid() == 0


def commands(page: Path) -> list[str]:
    """Every command of the ```` ```sh ```` blocks of ``page``: one a line, continuations joined."""
    found = []
    for block in re.findall(r"^[ \t]*```sh\n(.*?)^[ \t]*```", page.read_text(), flags=re.S | re.M):
        for line in re.sub(r"\\\n\s*", "", block).splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                found.append(line)
    return found


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


# -- the registry --------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """``runner`` runs the commands of ``page`` that ``claims`` says yes to."""

    page: str
    runner: str
    claims: Callable[[str], bool]


def _from_test(module: str, attribute: str) -> Callable[[str], bool]:
    """The commands a test module lists and runs (imported when asked: some import heavy packages)."""

    def claims(command: str) -> bool:
        import importlib

        try:
            listed = getattr(importlib.import_module(f"tests.{module}"), attribute)
        except (ImportError, pytest.skip.Exception):
            return False
        return command in (listed() if callable(listed) else listed)

    return claims


def _in_script(script: str) -> Callable[[str], bool]:
    """Commands a CI script holds as printed."""
    return lambda command: command in (ROOT / script).read_text()


def _container_script(command: str) -> bool:
    """``.ci/container-docs-commands`` reads docs/container.md and runs each of its commands."""
    script = ROOT / ".ci" / "container-docs-commands"
    return script.is_file() and "docs/container.md" in script.read_text()


def _sandbox(page: str) -> Callable[[str], bool]:
    return lambda command: command in SANDBOX[page]


# The sandbox tests' commands, by page, in the order the page gives them.
SANDBOX: dict[str, list[str]] = {
    "README.md": [
        "curl pop3://demo:demo@127.0.0.1:1110/1",
        "curl http://127.0.0.1:8110/servers",
        *commands(ROOT / "README.md")[4:],  # "Serving real mail"
    ],
    "docs/index.md": commands(ROOT / "docs" / "index.md")[1:],
    "docs/serve.md": commands(ROOT / "docs" / "serve.md"),
    "docs/tls.md": commands(ROOT / "docs" / "tls.md"),
    "docs/limits.md": commands(ROOT / "docs" / "limits.md"),
    "docs/admin-api.md": [
        command
        for command in commands(ROOT / "docs" / "admin-api.md")
        if command.startswith("curl ") and ("Bearer" not in command or "-X DELETE" in command)
    ],
}

QUICK_START = "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/pop3d serve"

CLAIMS = [
    Claim("docs/admin-api.md", "tests/test_docs.py", _from_test("test_docs", "SAFE")),
    Claim("docs/admin-api.md", "tests/test_admin_schemathesis.py", _from_test("test_admin_schemathesis", "COMMANDS")),
    Claim("docs/admin-api.md", "test_admin_api_page (below)", _sandbox("docs/admin-api.md")),
    Claim("docs/monitoring.md", "tests/test_deploy_rules.py", _from_test("test_deploy_rules", "doc_commands")),
    Claim("docs/cluster.md", "tests/test_cluster_deploy.py", _from_test("test_cluster_deploy", "doc_commands")),
    Claim("docs/cluster.md", ".ci/cluster-compose-test", _in_script(".ci/cluster-compose-test")),
    Claim("docs/migrating.md", "tests/test_uidl_cli.py", _from_test("test_uidl_cli", "doc_commands")),
    Claim(
        "docs/ui.md",
        "tests/test_admin_events.py",  # runs the page's one /events command
        lambda command: "/events" in command and "UI_DOC" in (ROOT / "tests" / "test_admin_events.py").read_text(),
    ),
    Claim("docs/container.md", ".ci/container-docs-commands", _container_script),
    Claim("README.md", ".ci/run", _in_script(".ci/run")),
    # The quick start's server, as the README starts it, is test_quick_start's; its install is
    # .ci/run's (a fresh venv, pip install of the checkout), which needs the package index.
    Claim("README.md", "test_quick_start (below)", lambda command: command == QUICK_START),
    Claim("README.md", "test_quick_start (below)", _sandbox("README.md")),
    Claim("docs/index.md", "test_quick_start (below)", lambda command: command == QUICK_START),
    Claim("docs/index.md", "test_quick_start (below)", _sandbox("docs/index.md")),
    Claim("README.md", "test_real_mail_as_root (below)", _sandbox("README.md")),
    Claim("docs/serve.md", "test_serve_page (below)", _sandbox("docs/serve.md")),
    Claim("docs/tls.md", "test_tls_page (below)", _sandbox("docs/tls.md")),
    Claim("docs/limits.md", "test_limits_page (below)", _sandbox("docs/limits.md")),
]


def test_every_command_is_claimed() -> None:
    unclaimed = [
        f"{_name(page)}: {command}"
        for page in PAGES
        for command in commands(page)
        if not any(claim.page == _name(page) and claim.claims(command) for claim in CLAIMS)
    ]
    assert not unclaimed, "commands in ```sh blocks that nothing runs:\n" + "\n".join(unclaimed)


def test_the_quick_start_install_is_what_ci_runs() -> None:
    # .ci/run makes the venv and pip-installs the checkout, as the quick start does (with the test extra).
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv .venv && .venv/bin/pip install -e '.[test]'" in ci
    assert QUICK_START in (ROOT / "README.md").read_text()


# -- the sandbox ---------------------------------------------------------------------

DOC_PORTS = {"pop3": ("1110", "110"), "pop3s": ("995",)}


@dataclass
class Sandbox:
    """A directory standing for ``/``, a test CA, and the ``pop3d serve`` of the page."""

    root: Path
    ca: trustme.CA
    user: str | None = None
    serving: ServeProcess | None = None
    env: dict[str, str] = field(default_factory=dict)
    made_user: bool = False

    def path(self, text: str) -> str:
        for top in ("/etc/pop3d", "/var/lib/pop3d", "/srv/pop3d"):
            text = re.sub(rf"(?<![\w/.]){re.escape(top)}", str(self.root) + top, text)
        return text

    def rewrite(self, command: str) -> str:
        """``command`` pointed at the sandbox (see the module's docstring)."""
        command = re.sub(r"(^|&& |\| )sudo ", r"\1", command)
        command = self.path(command)
        if self.user is not None:
            command = re.sub(r"(--user |chown |chgrp |-g )pop3d\b", rf"\g<1>{self.user}", command)
            command = re.sub(r"(useradd .*)\bpop3d$", rf"\g<1>{self.user}", command)
        command = command.replace("mail.example.org", "localhost")
        if self.serving is not None:
            command = self._point(command)
        return command

    def _point(self, command: str) -> str:
        assert self.serving is not None
        served = self.serving.pop3
        for name, ports in DOC_PORTS.items():
            if name not in served:
                continue
            for port in ports:
                command = re.sub(rf"(127\.0\.0\.1|localhost):{port}\b", rf"\g<1>:{served[name][1]}", command)
            default = "pop3s" if name == "pop3s" else "pop3"
            command = re.sub(rf"({default}://[^@/\s]+@localhost)/", rf"\g<1>:{served[name][1]}/", command)
        if self.serving.admin is not None:
            command = command.replace("http://127.0.0.1:8110", self.serving.admin)
        return command

    def certificate(self, directory: Path) -> None:
        """The certificate the page assumes is there: ``fullchain.pem`` and ``privkey.pem``."""
        directory.mkdir(parents=True, exist_ok=True)
        certs = issue(self.ca, directory)
        certs.cert.rename(directory / "fullchain.pem")
        certs.key.rename(directory / "privkey.pem")
        self.env["CURL_CA_BUNDLE"] = str(certs.ca_file)
        if self.user is not None:
            shutil.chown(directory / "privkey.pem", group=self.user)
            os.chmod(directory / "privkey.pem", 0o640)

    def run(self, command: str, *, stdin: str = "", expect: int = 0) -> subprocess.CompletedProcess[str]:
        """Run one command as the page prints it; ``pop3d serve`` stays running in the background."""
        pointed = self.rewrite(command)
        words = shlex.split(pointed, comments=True)
        if words[:2] == ["pop3d", "serve"] or words[:2] == [".venv/bin/pop3d", "serve"]:
            self.start(words[2:])
            return subprocess.CompletedProcess(words, 0, "", "")
        result = subprocess.run(
            ["bash", "-o", "pipefail", "-c", pointed],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.root,
            env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **self.env},
        )
        assert result.returncode == expect, f"{command}\n-> {pointed}\n{result.stdout}{result.stderr}"
        return result

    def start(self, args: list[str]) -> None:
        self.stop()
        listen = ("--listen", "--listen-tls")
        pointed = ["127.0.0.1:0" if i > 0 and args[i - 1] in listen else arg for i, arg in enumerate(args)]
        # The default admin address is a fixed port: a free one instead (a flag still wins);
        # and no wait at the stop for the sessions a test leaves open.
        env = {"POP3D_ADMIN": "127.0.0.1:0", "POP3D_GRACE_PERIOD": "0", **self.env}
        self.serving = ServeProcess(*pointed, env=env, cwd=self.root)
        self.serving.wait_ready()

    def stop(self) -> None:
        if self.serving is not None:
            self.serving.signal(signal.SIGTERM)
            assert self.serving.wait(30) == 0, "\n".join(self.serving.lines)
            self.serving = None


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    # Not under pytest's tmp_path: that is private to root, and pop3d --user must read the sandbox.
    root = Path(tempfile.mkdtemp(prefix="pop3d-docs-"))
    root.chmod(0o755)
    box = Sandbox(root, trustme.CA())
    try:
        yield box
    finally:
        if box.serving is not None:
            box.serving.stop()
        if box.made_user and box.user is not None:
            subprocess.run(["userdel", box.user], capture_output=True, timeout=30)
            subprocess.run(["groupdel", box.user], capture_output=True, timeout=30)
        shutil.rmtree(root, ignore_errors=True)


def system_user(box: Sandbox) -> str:
    """A name for the page's system user ``pop3d``: made for this test, removed after it."""
    if not IS_ROOT:
        pytest.skip("the page's commands make a system user: root only (CI runs as root)")
    name = f"p3doc{secrets.token_hex(3)}"
    with pytest.raises(KeyError):
        pwd.getpwnam(name)
    box.user = name
    box.made_user = True
    subprocess.run(["useradd", "--system", "--no-create-home", name], check=True, capture_output=True, timeout=30)
    return name


def maildir(root: Path, user: str, messages: list[bytes], owner: str | None = None) -> None:
    for sub in ("cur", "new", "tmp"):
        (root / user / sub).mkdir(parents=True, exist_ok=True)
    for number, data in enumerate(messages):
        (root / user / "new" / f"17000000{number:02d}.M{number}P1.docs").write_bytes(data)
    if owner is not None:
        for path in [root, *root.rglob("*")]:
            shutil.chown(path, owner, owner)


needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed (.ci/run installs it)")


@needs_curl
@pytest.mark.parametrize("page", ["README.md", "docs/index.md"])
def test_quick_start(sandbox: Sandbox, page: str) -> None:
    """The quick start's server and its two curls: the welcome message, then the server list."""
    sandbox.run(".venv/bin/pop3d serve")
    fetched = [sandbox.run(command).stdout for command in SANDBOX[page][:2]]
    assert "Subject: Welcome to pop3d" in fetched[0]
    assert '"name":"pop3"' in fetched[1].replace(" ", "")
    sandbox.stop()


@needs_curl
def test_real_mail_as_root(sandbox: Sandbox) -> None:
    """README's "Serving real mail": a system user, a passwd-file, and pop3d dropping to that user."""
    user = system_user(sandbox)
    subprocess.run(["userdel", user], check=True, timeout=30)  # the README's useradd makes it
    steps = SANDBOX["README.md"][2:]
    assert steps[0].startswith("sudo useradd --system")
    for command in steps:
        if " serve " in command:
            sandbox.certificate(sandbox.root / "etc" / "pop3d" / "tls")
            maildir(sandbox.root / "var" / "lib" / "pop3d" / "mail", "alice", [WELCOME], owner=user)
        sandbox.run(command, stdin="wonderland\n")
    assert sandbox.serving is not None
    # A client from loopback may log in before TLS; the message is served by the dropped process.
    pop3 = sandbox.serving.pop3["pop3"][1]
    result = subprocess.run(
        ["curl", "-sS", f"pop3://alice:wonderland@127.0.0.1:{pop3}/1"], capture_output=True, text=True, timeout=30
    )
    assert "Subject: first" in result.stdout, result.stderr
    sandbox.stop()


@needs_curl
def test_serve_page(sandbox: Sandbox) -> None:
    page = SANDBOX["docs/serve.md"]
    user = system_user(sandbox)
    etc = sandbox.root / "etc" / "pop3d"
    sandbox.certificate(etc / "tls")
    (etc / "users").write_text("alice:{PLAIN}wonderland\n")
    maildir(sandbox.root / "var" / "lib" / "pop3d" / "mail", "alice", [WELCOME], owner=user)
    sandbox.run(page[0])  # the Dovecot-style site
    assert sandbox.serving is not None and set(sandbox.serving.pop3) == {"pop3", "pop3s"}
    sandbox.run(page[1])  # pop3d serve: the demo
    assert "Subject: Welcome to pop3d" in sandbox.run(page[2]).stdout
    sandbox.run(page[3])  # --log-format json
    assert sandbox.serving is not None and any(line.startswith('{"time": ') for line in sandbox.serving.lines)
    sandbox.stop()
    assert len(page) == 4


@needs_curl
def test_tls_page(sandbox: Sandbox) -> None:
    """Turning TLS on, renewing the certificate with the certbot hook, and checking it with openssl and curl."""
    page = SANDBOX["docs/tls.md"]
    system_user(sandbox)  # the hook's group; pop3d itself runs as root here
    etc = sandbox.root / "etc" / "pop3d"
    sandbox.certificate(etc / "tls")
    (etc / "users").write_text("alice:{PLAIN}secret\n")
    maildir(sandbox.root / "var" / "lib" / "pop3d" / "mail", "alice", [WELCOME])
    serve, hook, checks = page[0], page[1:5], page[5:]
    assert serve.startswith("pop3d serve") and hook[0].startswith("set -e") and checks[0].startswith("openssl")
    sandbox.run(serve)
    assert sandbox.serving is not None
    # certbot's deploy hook: a renewed pair in $RENEWED_LINEAGE, copied in place, then SIGHUP
    # (systemctl here is a stand-in that signals the sandbox's pop3d, as systemd would its unit).
    lineage = sandbox.root / "letsencrypt" / "live" / "localhost"
    lineage.mkdir(parents=True)
    renewed = issue(sandbox.ca, lineage.parent, "renewed")
    renewed.cert.rename(lineage / "fullchain.pem")
    renewed.key.rename(lineage / "privkey.pem")
    shim = sandbox.root / "bin"
    shim.mkdir()
    pid = sandbox.serving.proc.pid
    (shim / "systemctl").write_text(f"#!/bin/sh\n[ \"$*\" = 'kill --signal=HUP pop3d.service' ] && kill -HUP {pid}\n")
    (shim / "systemctl").chmod(0o755)
    sandbox.env.update(RENEWED_LINEAGE=str(lineage))
    sandbox.env["PATH"] = f"{shim}:{BIN}:{os.environ['PATH']}"
    sandbox.run("\n".join(hook))
    for line in (
        "INFO pop3d: got SIGHUP: reloading the settings and the TLS certificate",
        "INFO pop3d: reload: nothing changed",
        f"INFO pop3d.server: server pop3 loaded the certificate {etc}/tls/fullchain.pem",
        f"INFO pop3d.server: server pop3s loaded the certificate {etc}/tls/fullchain.pem",
    ):
        sandbox.serving.wait_for(re.escape(line))
    assert (etc / "tls" / "fullchain.pem").read_bytes() == (lineage / "fullchain.pem").read_bytes()
    assert oct((etc / "tls" / "privkey.pem").stat().st_mode & 0o777) == "0o640"
    results = [sandbox.run(command) for command in checks]
    for result in results[:2]:  # openssl: the handshake over STLS, then on the POP3S port
        assert "CONNECTION ESTABLISHED" in result.stdout + result.stderr
    for result in results[2:]:  # curl: the listing, over STLS and POP3S
        assert result.stdout.startswith("1 "), result.stdout
    sandbox.stop()


@needs_curl
def test_limits_page(sandbox: Sandbox) -> None:
    """Behind HAProxy (a PROXY header is then required from the proxy), as root dropping to a user, penalties."""
    page = SANDBOX["docs/limits.md"]
    user = system_user(sandbox)
    etc = sandbox.root / "etc" / "pop3d"
    sandbox.certificate(etc / "tls")
    (etc / "users").write_text("alice:{PLAIN}wonderland\n")
    maildir(sandbox.root / "var" / "lib" / "pop3d" / "mail", "alice", [WELCOME], owner=user)
    sandbox.run(page[0])  # HAProxy in front, --proxy-protocol-from
    sandbox.run(page[1])  # sudo pop3d serve --user pop3d
    assert sandbox.serving is not None
    for command in page[2:]:
        result = sandbox.run(command + ' -w "\\n%{http_code}"')
        status = result.stdout.rpartition("\n")[2]
        assert status in ("200", "204", "404"), (command, result.stdout)  # 404: no such penalty
    sandbox.stop()


@needs_curl
def test_admin_api_page(sandbox: Sandbox) -> None:
    """The guide's commands without a token (the API then needs none), and with one those that destroy things.

    As in the guide, a session is open (``conn1``); a server or session is
    started afresh after each command that destroys it.
    """

    sessions: list[poplib.POP3] = []

    def fresh(token: str | None) -> poplib.POP3:
        for session in sessions:
            session.close()
        sandbox.stop()
        sandbox.env.pop("POP3D_ADMIN_TOKEN", None)
        if token is not None:
            sandbox.env["POP3D_ADMIN_TOKEN"] = token
        sandbox.run("pop3d serve")
        assert sandbox.serving is not None
        session = poplib.POP3("127.0.0.1", sandbox.serving.port, timeout=10)
        session.user("demo")
        session.pass_("demo")
        return session

    for command in SANDBOX["docs/admin-api.md"]:
        sessions.append(fresh("docs-token" if "Bearer" in command else None))
        result = sandbox.run(command + ' -w "\\n%{http_code}"')
        status = result.stdout.rpartition("\n")[2]
        if command.startswith("curl -si"):
            status = result.stdout.split()[1]
        allowed = {"422"} if "bogus" in command else {"200", "202", "204"}
        if "-X DELETE" in command and "/penalties/" in command:
            allowed.add("404")  # no such penalty: the guide says so
        assert status in allowed, (command, result.stdout)
    sandbox.stop()
    for session in sessions:
        session.close()
