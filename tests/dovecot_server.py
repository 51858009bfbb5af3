"""Debian's real Dovecot (``dovecot-pop3d``) on loopback, with a private configuration.

For tests that compare pop3d with Dovecot on the same Maildir tree (UIDL
migration).  Two parts:

:func:`dovecot_site`
    A throw-away directory under ``/tmp`` that an unprivileged user can
    reach (pytest's ``tmp_path`` is mode 0700, root's alone): a
    passwd-file, a mail root ``mail/<user>/`` and Dovecot's run directory.
    Mail belongs to ``nobody``: Dovecot refuses to serve mail as root.
:func:`running`
    Starts ``dovecot -F`` with a configuration of its own (pop3 only, on
    ``127.0.0.1`` and a free port, no SSL, plaintext logins,
    ``mail_location = maildir:<mail>/%u``, the ``pop3_uidl_format`` asked
    for) and yields the port; it always stops Dovecot, and its whole
    process group, on the way out.

Both skip the test (``pytest.skip``) when Dovecot is not installed or the
tests do not run as root.  Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = ["MAIL_USER", "DovecotSite", "doveadm", "dovecot_site", "running", "why_not_available"]

DOVECOT = "/usr/sbin/dovecot"
DOVEADM = "/usr/bin/doveadm"
MAIL_USER = "nobody"
"""The unprivileged user that owns the mail and as whom Dovecot serves it."""
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0

_CONF = """\
# Made by tests/dovecot_server.py: pop3 only, on 127.0.0.1, no SSL.
base_dir = {run}
state_dir = {run}/state
log_path = {log}
info_log_path = {log}
protocols = pop3
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
login_trusted_networks = 127.0.0.0/8
passdb {{
  driver = passwd-file
  args = {passwd}
}}
userdb {{
  driver = passwd-file
  args = {passwd}
}}
mail_location = maildir:{mail}/%u
mail_uid = {uid}
mail_gid = {gid}
first_valid_uid = {uid}
last_valid_uid = {uid}
first_valid_gid = {gid}
last_valid_gid = {gid}
pop3_uidl_format = {uidl_format}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
{extra}
"""


def why_not_available() -> str | None:
    """Why Dovecot cannot run here, or ``None``."""
    if not os.path.exists(DOVECOT):
        return "dovecot is not installed (apt-get install dovecot-pop3d)"
    if os.geteuid() != 0:
        return "Dovecot needs root to start (it then serves mail as nobody)"
    return None


def _skip_unless_available() -> None:
    why = why_not_available()
    if why is not None:
        pytest.skip(why)


@dataclass
class DovecotSite:
    """A mail tree that Dovecot and pop3d can both serve.

    ``mail/<user>/`` are the Maildirs; ``users`` is a passwd-file readable
    by both (``{PLAIN}`` passwords).
    """

    root: Path
    uid: int
    gid: int
    users: dict[str, str] = field(default_factory=dict)

    @property
    def mail(self) -> Path:
        return self.root / "mail"

    @property
    def passwd(self) -> Path:
        return self.root / "users"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def log(self) -> Path:
        return self.root / "dovecot.log"

    def maildir(self, user: str) -> Path:
        return self.mail / user

    def add_user(self, user: str, password: str) -> Path:
        """Add ``user`` to the passwd-file, with an empty Maildir; returns it."""
        self.users[user] = password
        lines = "".join(f"{name}:{{PLAIN}}{secret}:::{self.mail / name}::\n" for name, secret in self.users.items())
        self.passwd.write_text(lines)
        self.passwd.chmod(0o644)
        box = self.maildir(user)
        for sub in ("cur", "new", "tmp"):
            (box / sub).mkdir(parents=True, exist_ok=True)
        self.give_away(box)
        return box

    def deliver(self, user: str, data: bytes, name: str, subdir: str = "new") -> Path:
        """Put a message file ``subdir/name`` into ``user``'s Maildir (tmp/ first, then a rename)."""
        box = self.maildir(user)
        tmp = box / "tmp" / name.partition(":")[0]
        tmp.write_bytes(data)
        os.chown(tmp, self.uid, self.gid)
        target = box / subdir / name
        tmp.rename(target)
        return target

    def give_away(self, path: Path | None = None) -> None:
        """Make ``path`` (default: the whole mail tree) belong to the mail user."""
        top = path or self.mail
        os.chown(top, self.uid, self.gid)
        for dirpath, dirnames, filenames in os.walk(top):
            for name in (*dirnames, *filenames):
                os.chown(os.path.join(dirpath, name), self.uid, self.gid, follow_symlinks=False)

    def files(self, user: str) -> dict[str, str]:
        """``unique name -> subdir/file name`` of ``user``'s messages."""
        out: dict[str, str] = {}
        for sub in ("new", "cur"):
            for entry in sorted((self.maildir(user) / sub).iterdir()):
                out[entry.name.partition(":")[0]] = f"{sub}/{entry.name}"
        return out


@contextlib.contextmanager
def dovecot_site() -> Iterator[DovecotSite]:
    """A fresh :class:`DovecotSite` under ``/tmp``; removed afterwards.  Skips without Dovecot or root."""
    _skip_unless_available()
    entry = pwd.getpwnam(MAIL_USER)
    root = Path(tempfile.mkdtemp(prefix="pop3d-dovecot-", dir="/tmp"))
    try:
        root.chmod(0o755)  # nobody must reach mail/ below it
        (root / "mail").mkdir()
        site = DovecotSite(root, entry.pw_uid, entry.pw_gid)
        os.chown(site.mail, site.uid, site.gid)
        yield site
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _greets(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.settimeout(2)
            ok = sock.recv(512).startswith(b"+OK")
            sock.sendall(b"QUIT\r\n")
            with contextlib.suppress(OSError):
                sock.recv(512)
            return ok
    except OSError:
        return False


def _log_tail(site: DovecotSite, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(site.log.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


def write_conf(site: DovecotSite, port: int, pop3_uidl_format: str, settings: Mapping[str, str]) -> Path:
    """Dovecot's configuration file for ``site``; ``settings`` are more ``name = value`` lines."""
    (site.run / "state").mkdir(parents=True, exist_ok=True)
    conf = site.root / "dovecot.conf"
    extra = "".join(f"{name} = {value}\n" for name, value in settings.items())
    conf.write_text(
        _CONF.format(
            run=site.run,
            log=site.log,
            passwd=site.passwd,
            mail=site.mail,
            uid=site.uid,
            gid=site.gid,
            uidl_format=pop3_uidl_format,
            port=port,
            extra=extra,
        )
    )
    return conf


@contextlib.contextmanager
def running(
    site: DovecotSite, *, pop3_uidl_format: str = "%08Xu%08Xv", settings: Mapping[str, str] | None = None
) -> Iterator[int]:
    """Dovecot serving ``site`` over POP3 on 127.0.0.1; yields its port and stops it afterwards.

    ``settings`` adds top-level settings, such as ``{"pop3_save_uidl": "yes"}``.
    """
    _skip_unless_available()
    port = _free_port()
    conf = write_conf(site, port, pop3_uidl_format, settings or {})
    with site.log.open("ab") as log:
        proc = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # a process group of its own, to be killed as a whole
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _greets(port):
            if proc.poll() is not None:
                raise RuntimeError(f"dovecot exited with status {proc.returncode}:\n{_log_tail(site)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"dovecot did not answer on port {port}:\n{_log_tail(site)}")
            time.sleep(0.05)
        yield port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_TIMEOUT)
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of its children
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_TIMEOUT)


def doveadm(site: DovecotSite, *args: str) -> str:
    """Run ``doveadm`` with the configuration of the last :func:`running` (Dovecot need not run)."""
    result = subprocess.run(
        [DOVEADM, "-c", str(site.root / "dovecot.conf"), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if result.returncode != 0:
        raise RuntimeError(f"doveadm {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result.stdout
