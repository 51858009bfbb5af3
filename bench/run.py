"""Benchmarks: pop3d, Dovecot and a Twisted POP3 server side by side, on the same data.

    python bench/run.py [--servers pop3d,dovecot,twisted] [--repeat 3] [--quick]
                        [--json out.json] [--only churn,bulk,...]

Makes one data set in a temporary directory under /dev/shm (a Dovecot-style
passwd-file and Maildirs, read by all three servers), compiles the load
generator ``bench/loadgen.c`` (C, epoll, one thread), then measures each
workload on each server over loopback, a fresh server process each time:

churn       USER/PASS/STAT/QUIT sessions, 32 at once, ``{PLAIN}`` users
argon2id    the same with ``{ARGON2ID}`` users, twice in one server process
blf-crypt   the same with ``{BLF-CRYPT}`` users, twice in one server process
bulk1       LIST and RETR of 2,000 messages of 15 to 25 KB, one user
bulk8       the same, 8 users at once
stat        STAT of a 100,000-message mailbox without any index, then again
idle        2,000 logged-in idle sessions: memory; login latency without and with them

(``--only bulk`` means bulk1,bulk8, ``--only hashed`` argon2id,blf-crypt.)
Server CPU is utime+stime(+cutime+cstime) of the server's whole process
tree from /proc; memory is the PSS (smaps_rollup) of that tree.  The load
generator's own CPU is shown beside the server's.  Servers run in turn, in
alternating order from one repetition to the next; the table shows medians
and ratios against pop3d; ``--json`` keeps every repetition's figures and
the machine.  ``--quick``: small counts and one repetition, about a minute.
It prints figures and asserts nothing.  Every wait is bounded; servers are
always stopped and the temporary directory is always removed.

Dovecot needs root (apt-get install dovecot-pop3d); the Twisted server
(bench/twisted_pop3.py) needs Twisted in this Python (pip install twisted).
A server that cannot run is skipped with a note.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import email.utils
import importlib.metadata
import importlib.util
import json
import os
import platform
import random
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

SERVERS = ("pop3d", "dovecot", "twisted")
WORKLOADS = ("churn", "argon2id", "blf-crypt", "bulk1", "bulk8", "stat", "idle")
WORKLOAD_GROUPS = {
    "bulk": ("bulk1", "bulk8"),
    "hashed": ("argon2id", "blf-crypt"),
    "argon2": ("argon2id",),
    "bcrypt": ("blf-crypt",),
    "blfcrypt": ("blf-crypt",),
    "big": ("stat",),
}

# The Maildir files belong to this user (Dovecot refuses to serve mail as
# root, while pop3d --allow-root and the Twisted server read them as root).
MAIL_USER = "nobody"
MAIL_HOST = "mx1.example.org"  # in Maildir file names
BCRYPT_COST = 5  # what `doveadm pw -s BLF-CRYPT` writes; bcrypt's own default, 12, takes 0.2 s a check
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SERVER_INDEX_FILES = ("pop3d-index", "dovecot")  # name prefixes of the servers' index and cache files


@dataclass(frozen=True)
class Counts:
    """How much of everything: the default run, or ``--quick``."""

    idle_sessions: int = 2000
    latency_sessions: int = 200  # with users other than the idle ones: they hold their mailboxes
    messages_per_user: int = 10
    # Hashed users log in once each per pass, so that the first pass is all cold and the second all warm.
    argon2id_users: int = 128
    blf_crypt_users: int = 1024
    bulk_messages: int = 2000
    bulk_users: int = 8
    big_messages: int = 100_000
    churn_sessions: int = 3000
    churn_concurrency: int = 32
    idle_setup_concurrency: int = 32  # logins at once while the idle sessions are set up
    loadgen_timeout: float = 600.0  # bounds each measured phase

    @property
    def churn_users(self) -> int:
        return self.idle_sessions + self.latency_sessions


QUICK = Counts(
    idle_sessions=200,
    latency_sessions=40,
    argon2id_users=32,
    blf_crypt_users=128,
    bulk_messages=200,
    big_messages=10_000,
    churn_sessions=400,
    loadgen_timeout=120.0,
)


# -- data --------------------------------------------------------------------

_WORD_TEXT = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will more about can up out what said "
    "mailbox server message delivery account invoice meeting agenda report quarterly attached please regards "
    "thanks tomorrow schedule update review project budget draft final notes minutes summary request approved"
)
WORDS = _WORD_TEXT.split()


def text_lines(rng: random.Random, count: int) -> list[str]:
    """Lines of words, 20 to 76 characters, as message bodies have."""
    lines = []
    for _ in range(count):
        width = rng.randint(20, 76)
        line = rng.choice(WORDS).capitalize()
        while len(line) < width:
            line += " " + rng.choice(WORDS)
        lines.append(line[:76])
    return lines


class MaildirNames:
    """Realistic Maildir unique names (``<secs>.M<usec>P<pid>.<host>``), in delivery order."""

    def __init__(self, rng: random.Random, start: int = 1_700_000_000) -> None:
        self.rng = rng
        self.secs = start

    def next(self, spacing: int = 900) -> tuple[str, int]:
        self.secs += self.rng.randint(1, spacing)
        usec = self.rng.randrange(1_000_000)
        pid = self.rng.randint(300, 99_999)
        return f"{self.secs}.M{usec}P{pid}.{MAIL_HOST}", self.secs


def headers(rng: random.Random, user: str, secs: int, subject: str) -> str:
    sender = f"{rng.choice(WORDS)}.{rng.choice(WORDS)}@example.net"
    return (
        f"Return-Path: <{sender}>\n"
        f"Delivered-To: {user}@example.org\n"
        f"Received: from mail.example.net (mail.example.net [192.0.2.{rng.randint(1, 254)}])\n"
        f"\tby {MAIL_HOST} with ESMTPS id {rng.getrandbits(48):012X}\n"
        f"\tfor <{user}@example.org>; {email.utils.formatdate(secs)}\n"
        f"From: <{sender}>\n"
        f"To: <{user}@example.org>\n"
        f"Subject: {subject}\n"
        f"Date: {email.utils.formatdate(secs)}\n"
        f"Message-ID: <{rng.getrandbits(64):016x}@example.net>\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=utf-8\n"
        "\n"
    )


def small_message(rng: random.Random, pool: list[str], user: str, secs: int) -> bytes:
    """About 1 to 3 KB."""
    body = rng.choices(pool, k=rng.randint(8, 40))
    return (headers(rng, user, secs, " ".join(rng.choices(WORDS, k=4))) + "\n".join(body) + "\n").encode()


def bulk_message(rng: random.Random, pool: list[str], user: str, secs: int) -> bytes:
    """15 to 25 KB, LF line ends, some lines starting with '.' (a few are only '.', which must be stuffed)."""
    target = rng.randint(15_000, 25_000)
    out = [headers(rng, user, secs, "report " + " ".join(rng.choices(WORDS, k=3)))]
    size = len(out[0])
    while size < target:
        roll = rng.random()
        line = rng.choice(pool)
        if roll < 0.03:
            line = "." + line
        elif roll < 0.035:
            line = "."
        elif roll < 0.04:
            line = ".."
        out.append(line + "\n")
        size += len(line) + 1
    return "".join(out).encode()


def crlf_size(data: bytes) -> int:
    """The message's size as POP3 counts it: with CRLF line ends (the files have bare LFs)."""
    return len(data) + data.count(b"\n")


def make_maildir(path: Path) -> None:
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)


def write_message(path: Path, data: bytes, secs: int) -> None:
    path.write_bytes(data)
    os.utime(path, (secs, secs))


@dataclass
class Site:
    """The data all servers share, under ``root``."""

    root: Path
    counts: Counts
    passwd: Path = field(init=False)
    mail: Path = field(init=False)
    lists: dict[str, Path] = field(default_factory=dict)  # loadgen --users files
    big_layout: dict[str, str] = field(default_factory=dict)  # unique name -> "cur/<file>" or "new/<file>"
    big_size: int = 0  # CRLF octets, as POP3 counts them
    big_file_size: int = 0  # the files' own sizes (LF line ends)
    bulk_size: int = 0  # one user's mailbox, CRLF octets
    argon2_params: str = ""

    def __post_init__(self) -> None:
        self.passwd = self.root / "users"
        self.mail = self.root / "mail"


def hash_argon2id(password: str) -> str:
    import argon2  # pop3d's own dependency

    return "{ARGON2ID}" + argon2.PasswordHasher().hash(password)


def hash_blf_crypt(password: str) -> str:
    import bcrypt  # pop3d's own dependency

    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(BCRYPT_COST)).decode("ascii")
    return "{BLF-CRYPT}$2y$" + hashed[4:]  # $2y$, as Dovecot writes it


def make_site(root: Path, counts: Counts, seed: int = 1939) -> Site:
    """The passwd-file, the Maildirs and the load generator's user lists."""
    rng = random.Random(seed)
    site = Site(root, counts)
    root.chmod(0o755)  # Dovecot's processes run as other users
    pool = text_lines(rng, 2000)
    try:
        import pwd

        entry = pwd.getpwnam(MAIL_USER)
        uid, gid = entry.pw_uid, entry.pw_gid
    except (ImportError, KeyError):
        uid = gid = 65534

    passwd_lines: list[str] = []
    lists: dict[str, list[str]] = {}

    def add_user(name: str, stored: str, password: str, *lists_: str) -> None:
        passwd_lines.append(f"{name}:{stored}:{uid}:{gid}::{site.mail / name}::")
        for key in lists_:
            lists.setdefault(key, []).append(f"{name} {password}")

    def small_box(name: str) -> None:
        box = site.mail / name
        make_maildir(box)
        names = MaildirNames(rng)
        for _ in range(counts.messages_per_user):
            unique, secs = names.next()
            # Messages a POP3 client left on the server: seen, in cur/.
            write_message(box / "cur" / f"{unique}:2,S", small_message(rng, pool, name, secs), secs)

    # churn users: {PLAIN}; the first idle_sessions double as the idle users.
    for n in range(counts.churn_users):
        name = f"user{n:04d}"
        password = f"pw{rng.getrandbits(40):010x}"
        role = "idle" if n < counts.idle_sessions else "latency"
        add_user(name, "{PLAIN}" + password, password, "plain", role)
        small_box(name)

    # hashed users: the hashes take a while, so they are made in threads (both libraries release the GIL).
    for scheme, prefix, hasher, count in (
        ("argon2id", "argon", hash_argon2id, counts.argon2id_users),
        ("blf-crypt", "blf", hash_blf_crypt, counts.blf_crypt_users),
    ):
        names_ = [f"{prefix}{n:04d}" for n in range(count)]
        passwords = [f"pw{rng.getrandbits(40):010x}" for _ in names_]
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool_:
            hashes = list(pool_.map(hasher, passwords))
        for name, password, stored in zip(names_, passwords, hashes, strict=True):
            add_user(name, stored, password, scheme)
            small_box(name)
        if scheme == "argon2id":
            site.argon2_params = hashes[0].split("$")[3]

    # bulk: one copy of the messages, hard-linked into every bulk user's Maildir.
    bulk_names = [f"bulk{n}" for n in range(counts.bulk_users)]
    for name in bulk_names:
        make_maildir(site.mail / name)
    names = MaildirNames(rng)
    for _ in range(counts.bulk_messages):
        unique, secs = names.next()
        data = bulk_message(rng, pool, bulk_names[0], secs)
        site.bulk_size += crlf_size(data)
        first = site.mail / bulk_names[0] / "cur" / f"{unique}:2,S"
        write_message(first, data, secs)
        for name in bulk_names[1:]:
            os.link(first, site.mail / name / "cur" / first.name)
    for name in bulk_names:
        password = f"pw{rng.getrandbits(40):010x}"
        add_user(name, "{PLAIN}" + password, password, "bulk")

    # big: one user with many small messages, the newest tenth not yet seen (in new/).
    box = site.mail / "big"
    make_maildir(box)
    names = MaildirNames(rng, start=1_600_000_000)
    first_new = counts.big_messages - counts.big_messages // 10
    for m in range(counts.big_messages):
        unique, secs = names.next(spacing=300)
        data = small_message(rng, pool, "big", secs)
        site.big_size += crlf_size(data)
        site.big_file_size += len(data)
        where = f"new/{unique}" if m >= first_new else f"cur/{unique}:2,S"
        site.big_layout[unique] = where
        write_message(box / where, data, secs)
    password = f"pw{rng.getrandbits(40):010x}"
    add_user("big", "{PLAIN}" + password, password, "big")

    site.passwd.write_text("".join(line + "\n" for line in passwd_lines))
    site.passwd.chmod(0o644)
    for key, lines in lists.items():
        path = root / f"loadgen-{key}.txt"
        path.write_text("".join(line + "\n" for line in lines))
        site.lists[key] = path
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", f"{uid}:{gid}", str(site.mail)], check=True, timeout=300)
    return site


def reset_big_mailbox(site: Site) -> None:
    """Before a first STAT: no server's index or cache, and every file where it was made.

    (Dovecot moves new/ files to cur/ when it opens the mailbox.)
    """
    box = site.mail / "big"
    for entry in os.scandir(box):
        if entry.is_file() and entry.name.startswith(SERVER_INDEX_FILES):
            os.unlink(entry.path)
    for sub in ("cur", "new"):
        for entry in os.scandir(box / sub):
            unique = entry.name.split(":", 1)[0]
            want = site.big_layout.get(unique)
            if want is not None and want != f"{sub}/{entry.name}":
                os.rename(entry.path, box / want)


def check_hashes_with_doveadm(site: Site) -> list[str]:
    """One hash of each scheme, checked by ``doveadm pw -t`` (that Dovecot reads what we wrote)."""
    notes = []
    stored: dict[str, tuple[str, str]] = {}
    for line in site.passwd.read_text().splitlines():
        name, secret = line.split(":")[:2]
        if secret.startswith(("{ARGON2ID}", "{BLF-CRYPT}")):
            stored.setdefault(secret.split("}")[0], (name, secret))
    passwords = {}
    for key in ("argon2id", "blf-crypt"):
        for line in site.lists[key].read_text().splitlines():
            name, password = line.split(" ", 1)
            passwords[name] = password
    for name, secret in stored.values():
        try:
            result = subprocess.run(
                ["doveadm", "pw", "-t", secret, "-p", passwords[name]], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            notes.append(f"doveadm pw -t could not run: {exc}")
            continue
        if result.returncode != 0 or "(verified)" not in result.stdout:
            notes.append(f"doveadm pw -t refused the {secret.split('}')[0]}}} hash: {result.stderr.strip()}")
    return notes


# -- processes ---------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    ppid: int
    start: int  # start time in clock ticks since boot: tells a reused pid apart
    cpu_ticks: int  # utime + stime + cutime + cstime


def process_table() -> dict[int, Proc]:
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as file:
                text = file.read()
        except OSError:
            continue
        fields = text[text.rfind(b")") + 2 :].split()
        # fields[0] is field 3 of proc(5): state; ppid is 4, utime..cstime 14..17, starttime 22.
        table[int(entry.name)] = Proc(int(fields[1]), int(fields[19]), sum(int(x) for x in fields[11:15]))
    return table


def process_tree(root: int, table: dict[int, Proc] | None = None) -> dict[int, Proc]:
    """``root`` and its live descendants."""
    table = process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, proc in table.items():
        children.setdefault(proc.ppid, []).append(pid)
    tree = {}
    todo = [root] if root in table else []
    while todo:
        pid = todo.pop()
        tree[pid] = table[pid]
        todo.extend(children.get(pid, ()))
    return tree


def tree_cpu_seconds(root: int) -> float:
    """CPU time of the process tree: utime+stime of the live processes, and cutime+cstime of those
    they reaped (Dovecot's many short-lived processes, and threads' time is in their process's)."""
    return sum(proc.cpu_ticks for proc in process_tree(root).values()) / CLOCK_TICKS


def tree_memory_kb(root: int) -> tuple[int, int, str]:
    """(memory in kB, processes, "PSS" or "RSS") of the process tree: PSS from smaps_rollup shares
    the pages of Dovecot's many processes fairly; RSS where the kernel has no smaps_rollup."""
    total, count, kind = 0, 0, "PSS"
    for pid in process_tree(root):
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
            match = re.search(r"^Pss:\s+(\d+) kB", text, re.MULTILINE)
        except OSError:
            match = None
        if match is None:
            try:
                match = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
            except OSError:
                continue
            kind = "RSS" if match else kind
        if match:
            total += int(match.group(1))
            count += 1
    return total, count, kind


def kill_leftovers(pids: dict[int, Proc]) -> None:
    """SIGKILL those of ``pids`` (a snapshot of a server's tree) that still run: only our processes."""
    now = process_table()
    for pid, proc in pids.items():
        if pid in now and now[pid].start == proc.start:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def raise_open_file_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class StartError(Exception):
    pass


def greeting_ok(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.settimeout(5)
            if sock.recv(512).startswith(b"+OK"):
                sock.sendall(b"QUIT\r\n")
                with contextlib.suppress(OSError):
                    sock.recv(512)
                return True
    except OSError:
        pass
    return False


def pop3_session(port: int, user: str, password: str) -> bool:
    """One USER/PASS/STAT/QUIT session (a warm-up before a measurement)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.settimeout(30)
            file = sock.makefile("rwb")
            ok = file.readline().startswith(b"+OK")
            for command in (f"USER {user}", f"PASS {password}", "STAT", "QUIT"):
                file.write(command.encode() + b"\r\n")
                file.flush()
                ok = ok and file.readline().startswith(b"+OK")
            return ok
    except OSError:
        return False


@dataclass
class Running:
    """A started server: its root process and port; ``stop()`` ends its whole process tree."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    graceful: Callable[[], None]
    stop_wait: float = 20.0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        snapshot = process_tree(self.proc.pid) if self.alive() else {}
        if self.alive():
            with contextlib.suppress(OSError):
                self.graceful()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(self.stop_wait)
        # Whatever is left of its process group (started in a session of its own), and of its tree.
        with contextlib.suppress(OSError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        kill_leftovers(snapshot)


def wait_until_serving(running: Running, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not running.alive():
            running.stop()
            raise StartError(f"{running.name} exited with status {running.proc.returncode}:\n{log_tail(running.log)}")
        if greeting_ok(running.port):
            return
        time.sleep(0.05)
    running.stop()
    raise StartError(
        f"{running.name} did not answer on port {running.port} in {timeout:.0f} s:\n" + log_tail(running.log)
    )


def log_tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


def popen(command: Sequence[str], log: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
    with log.open("ab") as log_file:
        return subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stderr=log_file,
            start_new_session=True,  # its own process group, so that it can be killed as a whole
            preexec_fn=raise_open_file_limit,
            **kwargs,
        )


def start_pop3d(site: Site, log: Path) -> Running:
    port = free_port()
    command = [sys.executable, "-m", "pop3d", "serve", "--listen", f"127.0.0.1:{port}", "--no-admin"]
    command += ["--users", str(site.passwd), "--mail-root", str(site.mail), "--log-level", "warning"]
    # Limits raised so that 2,000+ sessions from 127.0.0.1 get in and no penalty or delay interferes.
    command += ["--max-connections", "3000", "--max-connections-per-ip", "3000", "--max-userip-connections", "0"]
    command += ["--max-logins-per-ip", "0", "--login-timeout", "0", "--idle-timeout", "3600"]
    command += ["--login-failure-delay", "0", "--penalty-max", "0", "--grace-period", "2"]
    if os.geteuid() == 0:
        command.append("--allow-root")  # a benchmark's throw-away data
    proc = popen(command, log, stdout=subprocess.DEVNULL, cwd=REPO)
    running = Running("pop3d", proc, port, log, lambda: proc.send_signal(signal.SIGTERM))
    wait_until_serving(running)
    return running


DOVECOT_CONF = """\
# Made by bench/run.py: Debian's stock settings (one login process per
# connection), pop3 only on 127.0.0.1, no SSL, limits raised for 2,000+
# sessions from one address.
base_dir = {run}
state_dir = {run}/state
log_path = {log}
info_log_path = /dev/null
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
mail_max_userip_connections = 10000
default_process_limit = 5000
default_client_limit = 10000
service pop3-login {{
  inet_listener pop3 {{
    port = {port}
  }}
  process_limit = 4096
}}
service pop3 {{
  process_limit = 4096
}}
service auth {{
  client_limit = 10000
}}
service anvil {{
  client_limit = 10000
}}
"""


def dovecot_conf(site: Site, port: int, log: Path) -> Path:
    run = site.root / "dovecot-run"
    (run / "state").mkdir(parents=True, exist_ok=True)
    conf = site.root / "dovecot.conf"
    conf.write_text(DOVECOT_CONF.format(run=run, log=log, passwd=site.passwd, mail=site.mail, port=port))
    return conf


def start_dovecot(site: Site, log: Path) -> Running:
    port = free_port()
    conf = dovecot_conf(site, port, log)
    proc = popen(["dovecot", "-F", "-c", str(conf)], log, stdout=subprocess.DEVNULL)
    running = Running("dovecot", proc, port, log, lambda: proc.send_signal(signal.SIGTERM), stop_wait=30)
    wait_until_serving(running)
    return running


def start_twisted(site: Site, log: Path) -> Running:
    command = [sys.executable, str(HERE / "twisted_pop3.py"), "--port", "0"]
    command += ["--users", str(site.passwd), "--mail-root", str(site.mail)]
    proc = popen(command, log, stdout=subprocess.PIPE)
    running = Running("twisted", proc, 0, log, lambda: proc.send_signal(signal.SIGTERM))
    assert proc.stdout is not None
    line = read_line(proc.stdout, time.monotonic() + 60)
    match = re.match(r"ready (\d+)", line or "")
    if not match:
        running.stop()
        raise StartError(f"the Twisted server did not start ({line!r}):\n{log_tail(log)}")
    running.port = int(match.group(1))
    wait_until_serving(running)
    return running


STARTERS: dict[str, Callable[[Site, Path], Running]] = {
    "pop3d": start_pop3d,
    "dovecot": start_dovecot,
    "twisted": start_twisted,
}


def why_not_available(server: str) -> str | None:
    """Why ``server`` cannot run here, or None."""
    if server == "pop3d" and importlib.util.find_spec("pop3d") is None:
        return "pop3d is not importable from this Python (pip install -e .)"
    if server == "dovecot":
        if shutil.which("dovecot") is None:
            return "dovecot is not installed (apt-get install dovecot-pop3d)"
        if os.geteuid() != 0:
            return "Dovecot needs root"
    if server == "twisted" and importlib.util.find_spec("twisted") is None:
        return "Twisted is not installed in this Python (pip install twisted)"
    return None


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("pop3d", "twisted", "trio", "argon2-cffi", "bcrypt"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    found["dovecot"] = command_output(["dovecot", "--version"])
    found["cc"] = (command_output(["cc", "--version"]) or "").split("\n")[0] or None
    found["pop3d_git_commit"] = command_output(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    return found


def command_output(command: Sequence[str]) -> str | None:
    try:
        result = subprocess.run(list(command), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def machine() -> dict[str, Any]:
    model = None
    with contextlib.suppress(OSError):
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        model = match.group(1).strip() if match else None
    memory = None
    with contextlib.suppress(OSError):
        match = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        memory = int(match.group(1)) // 1024 if match else None
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "memory_mb": memory,
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
    }


# -- the load generator --------------------------------------------------------


def build_loadgen(out: Path) -> Path:
    source = HERE / "loadgen.c"
    if not source.exists():
        raise SystemExit(f"{source} is missing (or give --loadgen PATH)")
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise SystemExit("no C compiler (cc) to build bench/loadgen.c: apt-get install gcc")
    binary = out / "loadgen"
    errors = ""
    for extra in ([], ["-lm", "-pthread"]):
        result = subprocess.run(
            [compiler, "-O2", "-o", str(binary), str(source), *extra], capture_output=True, text=True, timeout=300
        )
        if result.returncode == 0:
            return binary
        errors = result.stderr
    raise SystemExit(f"cannot compile {source}:\n{errors}")


def read_line(stream: Any, deadline: float) -> str | None:
    """One line from a pipe, or None at EOF or at ``deadline``."""
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while b"\n" not in buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                return None
            chunk = os.read(stream.fileno(), 1)  # one byte at a time: nothing past the line is taken
            if not chunk:
                return buffer.decode(errors="replace") or None
            buffer += chunk
    return buffer.decode(errors="replace").strip()


class Loadgen:
    def __init__(self, binary: Path, counts: Counts) -> None:
        self.binary = binary
        self.counts = counts

    def command(self, port: int, mode: str, users: Path, concurrency: int | None, sessions: int | None) -> list[str]:
        command = [str(self.binary), "--host", "127.0.0.1", "--port", str(port), "--mode", mode]
        command += ["--users", str(users), "--timeout", str(int(self.counts.loadgen_timeout))]
        if concurrency is not None:
            command += ["--concurrency", str(concurrency)]
        if sessions is not None:
            command += ["--sessions", str(sessions)]
        return command

    def run(
        self, port: int, mode: str, users: Path, concurrency: int | None = None, sessions: int | None = None
    ) -> dict[str, Any]:
        """Its JSON result, with ``exit``; on a failure ``{"failure": ...}`` instead of figures."""
        command = self.command(port, mode, users, concurrency, sessions)
        try:
            result = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=self.counts.loadgen_timeout + 60,
                preexec_fn=raise_open_file_limit,
            )
        except subprocess.TimeoutExpired:
            return {"mode": mode, "failure": "the load generator did not finish in time"}
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        if not lines:
            return {"mode": mode, "failure": f"no result (exit {result.returncode}): {result.stderr.strip()[-500:]}"}
        data: dict[str, Any] = json.loads(lines[-1])
        data["exit"] = result.returncode
        if result.stderr.strip():
            data["stderr"] = result.stderr.strip()[-800:]
        return data

    def cores(self, result: dict[str, Any]) -> float | None:
        seconds, cpu = result.get("seconds"), result.get("cpu_seconds")
        return cpu / seconds if seconds and cpu is not None else None


# -- workloads ---------------------------------------------------------------


@dataclass
class Context:
    site: Site
    counts: Counts
    loadgen: Loadgen
    running: Running


def measured(ctx: Context, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``run()``'s load generator result, with the server's CPU time and share over it."""
    pid = ctx.running.proc.pid
    cpu_before, start = tree_cpu_seconds(pid), time.monotonic()
    result = run()
    wall, cpu = time.monotonic() - start, tree_cpu_seconds(pid) - cpu_before
    return {
        "loadgen": result,
        "server_cpu_seconds": round(cpu, 4),
        "wall_seconds": round(wall, 4),
        "server_cores": round(cpu / wall, 3) if wall > 0 else None,
        "loadgen_cores": ctx.loadgen.cores(result),
    }


def per(value: float | None, count: float | None, scale: float = 1.0) -> float | None:
    return value * scale / count if value is not None and count else None


def churn_pass(ctx: Context, users: str, sessions: int) -> dict[str, Any]:
    c = ctx.counts
    out = measured(
        ctx,
        lambda: ctx.loadgen.run(ctx.running.port, "churn", ctx.site.lists[users], c.churn_concurrency, sessions),
    )
    out["server_cpu_ms_per_session"] = per(out["server_cpu_seconds"], out["loadgen"].get("sessions"), 1000)
    return out


def workload_churn(ctx: Context) -> dict[str, Any]:
    return churn_pass(ctx, "plain", ctx.counts.churn_sessions)


def workload_argon2id(ctx: Context) -> dict[str, Any]:
    sessions = ctx.counts.argon2id_users
    return {"cold": churn_pass(ctx, "argon2id", sessions), "warm": churn_pass(ctx, "argon2id", sessions)}


def workload_blf_crypt(ctx: Context) -> dict[str, Any]:
    sessions = ctx.counts.blf_crypt_users
    return {"cold": churn_pass(ctx, "blf-crypt", sessions), "warm": churn_pass(ctx, "blf-crypt", sessions)}


def bulk(ctx: Context, concurrency: int) -> dict[str, Any]:
    out = measured(ctx, lambda: ctx.loadgen.run(ctx.running.port, "bulk", ctx.site.lists["bulk"], concurrency))
    megabytes = (out["loadgen"].get("bytes") or 0) / 1e6
    out["server_cpu_ms_per_mb"] = per(out["server_cpu_seconds"], megabytes, 1000)
    out["expected_bytes_per_user"] = ctx.site.bulk_size
    return out


def workload_bulk1(ctx: Context) -> dict[str, Any]:
    return bulk(ctx, 1)


def workload_bulk8(ctx: Context) -> dict[str, Any]:
    return bulk(ctx, ctx.counts.bulk_users)


def warm_up(ctx: Context) -> None:
    """One session of a user no measurement uses, so that lazily started parts run first."""
    user, password = ctx.site.lists["latency"].read_text().splitlines()[-1].split(" ", 1)
    pop3_session(ctx.running.port, user, password)


def workload_stat(ctx: Context) -> dict[str, Any]:
    # The mailbox was reset before this server started; the warm-up uses another user.
    warm_up(ctx)
    users = ctx.site.lists["big"]
    first = measured(ctx, lambda: ctx.loadgen.run(ctx.running.port, "stat", users))
    second = measured(ctx, lambda: ctx.loadgen.run(ctx.running.port, "stat", users))
    return {
        "first": first,
        "second": second,
        "expected_count": ctx.counts.big_messages,
        "expected_size": ctx.site.big_size,
    }


def workload_idle(ctx: Context) -> dict[str, Any]:
    c, port = ctx.counts, ctx.running.port
    latency_users = ctx.site.lists["latency"]
    warm_up(ctx)
    out: dict[str, Any] = {}
    out["latency_without"] = measured(
        ctx, lambda: ctx.loadgen.run(port, "latency", latency_users, 1, c.latency_sessions)
    )
    pid = ctx.running.proc.pid
    time.sleep(0.5)
    out["memory_before_kb"], out["processes_before"], out["memory_kind"] = tree_memory_kb(pid)
    command = ctx.loadgen.command(port, "idle", ctx.site.lists["idle"], c.idle_setup_concurrency, c.idle_sessions)
    cpu_before = tree_cpu_seconds(pid)
    idle = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=raise_open_file_limit,
    )
    try:
        assert idle.stdout is not None and idle.stdin is not None
        line = read_line(idle.stdout, time.monotonic() + c.loadgen_timeout + 30)
        ready: dict[str, Any] = (
            json.loads(line) if line and line.startswith("{") else {"failure": f"no ready line: {line!r}"}
        )
        ready["server_cpu_ms_per_session"] = per(tree_cpu_seconds(pid) - cpu_before, ready.get("sessions"), 1000)
        ready["loadgen_cores"] = ctx.loadgen.cores(ready)
        out["idle_ready"] = ready
        time.sleep(1.0)  # let the last sessions settle
        out["memory_with_kb"], out["processes_with"], _ = tree_memory_kb(pid)
        sessions = ready.get("sessions") or 0
        out["memory_kb_per_session"] = per(out["memory_with_kb"] - out["memory_before_kb"], sessions)
        out["latency_with"] = measured(
            ctx, lambda: ctx.loadgen.run(port, "latency", latency_users, 1, c.latency_sessions)
        )
        idle.stdin.close()
        line = read_line(idle.stdout, time.monotonic() + 60)
        out["idle_closed"] = json.loads(line) if line and line.startswith("{") else {"failure": f"{line!r}"}
        idle.wait(30)
    finally:
        if idle.poll() is None:
            idle.kill()
            idle.wait(10)
        if idle.stderr is not None:
            text = idle.stderr.read().decode(errors="replace").strip()
            if text:
                out["idle_stderr"] = text[-800:]
            idle.stderr.close()
        for stream in (idle.stdin, idle.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
    return out


RUNNERS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "churn": workload_churn,
    "argon2id": workload_argon2id,
    "blf-crypt": workload_blf_crypt,
    "bulk1": workload_bulk1,
    "bulk8": workload_bulk8,
    "stat": workload_stat,
    "idle": workload_idle,
}


# -- results ---------------------------------------------------------------


def dig(record: dict[str, Any], path: str) -> Any:
    value: Any = record
    for key in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


@dataclass(frozen=True)
class Row:
    label: str
    workload: str
    path: str
    digits: int = 0
    better: str = "higher"  # or "lower", or "" (no ratio)


def rows(counts: Counts, argon2_params: str) -> list[Row]:
    c = counts
    return [
        Row(f"churn {{PLAIN}}, {c.churn_concurrency} at once: sessions/s", "churn", "loadgen.sessions_per_second"),
        Row("  server CPU ms per session", "churn", "server_cpu_ms_per_session", 2, "lower"),
        Row("  latency p99 ms", "churn", "loadgen.latency_ms_p99", 1, "lower"),
        Row(
            f"{{ARGON2ID}} {argon2_params}, {c.argon2id_users} users once: sessions/s",
            "argon2id",
            "cold.loadgen.sessions_per_second",
            1,
        ),
        Row("  server CPU ms per session", "argon2id", "cold.server_cpu_ms_per_session", 1, "lower"),
        Row("  again (warm): sessions/s", "argon2id", "warm.loadgen.sessions_per_second", 1),
        Row("  again (warm): server CPU ms per session", "argon2id", "warm.server_cpu_ms_per_session", 1, "lower"),
        Row(
            f"{{BLF-CRYPT}} cost {BCRYPT_COST}, {c.blf_crypt_users:,} users once: sessions/s",
            "blf-crypt",
            "cold.loadgen.sessions_per_second",
        ),
        Row("  server CPU ms per session", "blf-crypt", "cold.server_cpu_ms_per_session", 2, "lower"),
        Row("  again (warm): sessions/s", "blf-crypt", "warm.loadgen.sessions_per_second"),
        Row("  again (warm): server CPU ms per session", "blf-crypt", "warm.server_cpu_ms_per_session", 2, "lower"),
        Row(f"RETR {c.bulk_messages:,} x 15-25 KB, 1 user: MB/s", "bulk1", "loadgen.mb_per_second", 1),
        Row("  server CPU ms per MB", "bulk1", "server_cpu_ms_per_mb", 2, "lower"),
        Row("  size mismatches (LIST vs RETR)", "bulk1", "loadgen.mismatches", 0, ""),
        Row(f"RETR, {c.bulk_users} users at once: MB/s", "bulk8", "loadgen.mb_per_second", 1),
        Row("  server CPU ms per MB", "bulk8", "server_cpu_ms_per_mb", 2, "lower"),
        Row("  size mismatches (LIST vs RETR)", "bulk8", "loadgen.mismatches", 0, ""),
        Row(f"{c.big_messages:,}-message mailbox, first STAT: s", "stat", "first.loadgen.seconds", 3, "lower"),
        Row("  second STAT (new session): s", "stat", "second.loadgen.seconds", 3, "lower"),
        Row(f"{c.idle_sessions:,} idle sessions: kB per session", "idle", "memory_kb_per_session", 1, "lower"),
        Row("  their logins: server CPU ms per session", "idle", "idle_ready.server_cpu_ms_per_session", 2, "lower"),
        Row(
            f"login latency median ms, {c.latency_sessions} in a row",
            "idle",
            "latency_without.loadgen.latency_ms_median",
            2,
            "lower",
        ),
        Row(
            f"  with {c.idle_sessions:,} idle sessions open",
            "idle",
            "latency_with.loadgen.latency_ms_median",
            2,
            "lower",
        ),
    ]


SHARES = [
    ("churn", "churn", ""),
    ("argon2id", "argon2id", "cold."),
    ("argon2id warm", "argon2id", "warm."),
    ("blf-crypt", "blf-crypt", "cold."),
    ("blf-crypt warm", "blf-crypt", "warm."),
    ("bulk1", "bulk1", ""),
    ("bulk8", "bulk8", ""),
    ("latency", "idle", "latency_without."),
    ("latency, idle open", "idle", "latency_with."),
]


def median(values: Sequence[Any]) -> float | None:
    numbers = [v for v in values if isinstance(v, int | float)]
    return statistics.median(numbers) if numbers else None


def fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = []
    for n, row in enumerate([header, *body]):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def summarize(
    records: list[dict[str, Any]], servers: list[str], counts: Counts, site: Site
) -> tuple[str, dict[str, Any]]:
    """The printed report, and the medians for the JSON file."""

    def values(server: str, workload: str, path: str) -> list[Any]:
        return [
            dig(r["result"], path)
            for r in records
            if r["server"] == server and r["workload"] == workload and "result" in r
        ]

    workloads = {r["workload"] for r in records}
    others = [s for s in servers if s != "pop3d"] if "pop3d" in servers else []
    header = ["median of the repetitions", *servers, *(f"pop3d/{s}" for s in others), "better"]
    body = []
    medians: dict[str, Any] = {}
    for row in rows(counts, site.argon2_params):
        if row.workload not in workloads:
            continue
        found = {s: median(values(s, row.workload, row.path)) for s in servers}
        medians[f"{row.workload}:{row.path}"] = found
        line = [row.label, *(fmt(found[s], row.digits) for s in servers)]
        for other in others:
            a, b = found["pop3d"], found[other]
            line.append(f"{a / b:.2f}" if row.better and a is not None and b else "")
        line.append(row.better)
        body.append(line)
    out = [table(header, body)]
    if others:
        out.append("ratios: pop3d's figure divided by the other server's; 'better' says which way is good.")

    share_body = []
    for name, workload, prefix in SHARES:
        if workload not in workloads:
            continue
        cells = []
        for s in servers:
            server = median(values(s, workload, prefix + "server_cores"))
            loadgen = median(values(s, workload, prefix + "loadgen_cores"))
            cells.append(f"{fmt(server, 2)} / {fmt(loadgen, 2)}")
        share_body.append([name, *cells])
    if share_body:
        out.append("")
        out.append(table(["CPU cores used: server / load generator", *servers], share_body))

    if "stat" in workloads:
        out.append("")
        out.append(
            f"{counts.big_messages:,}-message mailbox, STAT should say {counts.big_messages} {site.big_size} "
            "(sizes with CRLF line ends):"
        )
        for s in servers:
            seen = sorted(
                {
                    (dig(r["result"], f"{which}.loadgen.count"), dig(r["result"], f"{which}.loadgen.size"))
                    for r in records
                    if r["server"] == s and r["workload"] == "stat" and "result" in r
                    for which in ("first", "second")
                },
                key=str,
            )
            if seen == [(counts.big_messages, site.big_size)]:
                verdict = "right"
            elif seen == [(counts.big_messages, site.big_file_size)]:
                verdict = "WRONG: the files' sizes (LF line ends), not the CRLF octets RETR sends"
            else:
                verdict = "WRONG"
            out.append(f"  {s:8} {', '.join(f'{n} {size}' for n, size in seen)}: {verdict}")
    return "\n".join(out), medians


def short(workload: str, result: dict[str, Any]) -> str:
    """One progress line."""

    def lg(path: str, digits: int = 0) -> str:
        return fmt(dig(result, path), digits)

    if workload == "churn":
        return f"{lg('loadgen.sessions_per_second')} sessions/s, {lg('server_cpu_ms_per_session', 2)} ms CPU each"
    if workload in ("argon2id", "blf-crypt"):
        return (
            f"{lg('cold.loadgen.sessions_per_second', 1)} then {lg('warm.loadgen.sessions_per_second', 1)} sessions/s"
        )
    if workload in ("bulk1", "bulk8"):
        return f"{lg('loadgen.mb_per_second', 1)} MB/s, {lg('loadgen.mismatches')} mismatches"
    if workload == "stat":
        return (
            f"first {lg('first.loadgen.seconds', 3)} s, second {lg('second.loadgen.seconds', 3)} s, "
            f"{lg('first.loadgen.count')} messages {lg('first.loadgen.size')} octets"
        )
    if workload == "idle":
        return (
            f"{lg('idle_ready.sessions')} idle: {lg('memory_kb_per_session', 1)} kB each; latency "
            f"{lg('latency_without.loadgen.latency_ms_median', 2)} ms -> "
            f"{lg('latency_with.loadgen.latency_ms_median', 2)} ms"
        )
    return ""


def problems(value: Any, where: str) -> list[str]:
    """Load generator failures, errors and timeouts in a result (mismatches are figures, not problems)."""
    found = []
    if isinstance(value, dict):
        if "failure" in value:
            found.append(f"{where}: {value['failure']}")
        if value.get("errors"):
            found.append(f"{where}: {value['errors']} errors: {str(value.get('stderr', ''))[:300]}")
        if value.get("timed_out"):
            found.append(f"{where}: timed out")
        for key, item in value.items():
            found += problems(item, where if key == "loadgen" else f"{where}.{key}")
    return found


LOG_PROBLEM = re.compile(r"error|fatal|warning|traceback|panic", re.IGNORECASE)
LOG_EXPECTED = re.compile(r"Killed with signal 15 \(by pid=\d+ ")  # Dovecot's master, stopped by us


# -- main --------------------------------------------------------------------


def parse_list(text: str, allowed: Sequence[str], groups: dict[str, tuple[str, ...]], what: str) -> list[str]:
    chosen: list[str] = []
    for item in (part.strip().lower() for part in text.split(",")):
        if not item:
            continue
        expanded = groups.get(item, (item,))
        for name in expanded:
            if name not in allowed:
                raise SystemExit(f"unknown {what} {item!r}: choose from {', '.join(allowed)}")
            if name not in chosen:
                chosen.append(name)
    return [name for name in allowed if name in chosen]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated (default: all three)")
    parser.add_argument("--repeat", type=int, default=None, help="repetitions (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run in about a minute")
    parser.add_argument("--json", type=Path, help="write every repetition's figures and the machine here")
    parser.add_argument("--only", default="", help=f"comma-separated workloads: {', '.join(WORKLOADS)}, bulk, hashed")
    parser.add_argument(
        "--loadgen", type=Path, help="a built load generator to use instead of compiling bench/loadgen.c"
    )
    args = parser.parse_args()

    counts = QUICK if args.quick else Counts()
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    if repeat < 1:
        parser.error("--repeat must be at least 1")
    workloads = parse_list(args.only, WORKLOADS, WORKLOAD_GROUPS, "workload") if args.only else list(WORKLOADS)
    servers = []
    notes: list[str] = []
    for server in parse_list(args.servers, SERVERS, {}, "server"):
        reason = why_not_available(server)
        if reason:
            notes.append(f"{server} skipped: {reason}")
            print(f"note: {server} skipped: {reason}", flush=True)
        else:
            servers.append(server)
    if not servers:
        raise SystemExit("no server to measure")

    # SIGTERM ends the run like ^C does: servers stopped, directory removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "machine": machine(),
        "versions": versions(),
        "servers": servers,
        "workloads": workloads,
        "repeat": repeat,
        "counts": asdict(counts),
        "complete": False,
    }
    records: list[dict[str, Any]] = []
    log_notes: dict[str, list[str]] = {}
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    root = Path(tempfile.mkdtemp(prefix="pop3-bench-", dir=shm))
    try:
        loadgen_binary = args.loadgen.resolve() if args.loadgen else build_loadgen(root)
        loadgen = Loadgen(loadgen_binary, counts)
        print(f"making the data in {root} ...", flush=True)
        t0 = time.monotonic()
        site = make_site(root, counts)
        print(
            f"  {counts.churn_users:,} {{PLAIN}} users, {counts.argon2id_users} {{ARGON2ID}} and "
            f"{counts.blf_crypt_users:,} "
            f"{{BLF-CRYPT}} users ({counts.messages_per_user} messages each), {counts.bulk_users} users with "
            f"{counts.bulk_messages:,} messages of 15-25 KB, one with {counts.big_messages:,}: "
            f"{time.monotonic() - t0:.1f} s",
            flush=True,
        )
        report["data"] = {
            "argon2_parameters": site.argon2_params,
            "bcrypt_cost": BCRYPT_COST,
            "bulk_octets_per_user": site.bulk_size,
            "big_octets": site.big_size,
            "big_file_octets": site.big_file_size,
        }
        if "dovecot" in servers:
            for note in check_hashes_with_doveadm(site):
                notes.append(note)
                print(f"note: {note}", flush=True)
        logs = root / "logs"
        logs.mkdir()
        for rep in range(repeat):
            order = servers if rep % 2 == 0 else servers[::-1]
            for workload in workloads:
                for server in order:
                    record: dict[str, Any] = {"rep": rep + 1, "server": server, "workload": workload}
                    records.append(record)
                    log = logs / f"{server}-{rep + 1}-{workload}.log"
                    if workload == "stat":
                        reset_big_mailbox(site)
                    try:
                        running = STARTERS[server](site, log)
                    except StartError as exc:
                        record["failure"] = str(exc)
                        print(f"[{rep + 1}/{repeat}] {workload:9} {server:8} did not start: {exc}", flush=True)
                        continue
                    result: dict[str, Any] = {}
                    try:
                        result = RUNNERS[workload](Context(site, counts, loadgen, running))
                        record["result"] = result
                        if not running.alive():
                            record["failure"] = f"the server exited (status {running.proc.returncode})"
                    except (OSError, ValueError, subprocess.SubprocessError) as exc:
                        record["failure"] = f"{type(exc).__name__}: {exc}"
                    finally:
                        running.stop()
                    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
                        if LOG_PROBLEM.search(line) and not LOG_EXPECTED.search(line):
                            seen = log_notes.setdefault(server, [])
                            text = re.sub(r"^\S+ \S+ ", "", line)[:300]  # without the date, to count repeats
                            if text not in seen and len(seen) < 20:
                                seen.append(text)
                    trouble = problems(result, workload) + ([record["failure"]] if "failure" in record else [])
                    record["problems"] = trouble
                    print(f"[{rep + 1}/{repeat}] {workload:9} {server:8} {short(workload, result)}", flush=True)
                    for item in trouble:
                        print(f"    problem: {item}", flush=True)

        commit = command_output(["git", "-C", str(REPO), "rev-parse", "HEAD"])
        report["pop3d_git_commit_at_end"] = commit
        if commit != report["versions"]["pop3d_git_commit"]:
            notes.append(
                f"the checkout's commit changed during the run ({report['versions']['pop3d_git_commit']} -> "
                f"{commit}): the repetitions may have measured different versions of pop3d"
            )
        text, medians = summarize(records, servers, counts, site)
        elapsed = time.monotonic() - started
        print()
        box, have = report["machine"], report["versions"]
        print(
            f"{box['cpu_model']}, {box['cores']} cores, Linux {box['kernel']}, Python {box['python']}; "
            f"pop3d {have['pop3d']}, Dovecot {have['dovecot']}, Twisted {have['twisted']}; "
            f"{repeat} repetitions; {elapsed / 60:.1f} minutes"
        )
        print(text)
        for server, lines in log_notes.items():
            print(f"\n{server}'s log had warnings or errors (first {len(lines)} distinct):")
            for line in lines:
                print(f"  {line}")
        for note in notes:
            print(f"note: {note}")
        report["medians"] = medians
        report["complete"] = True
        report["seconds"] = round(elapsed, 1)
    finally:
        report["runs"] = records
        report["notes"] = notes
        report["server_log_lines"] = log_notes
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
            print(f"\nfigures written to {args.json}")
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
