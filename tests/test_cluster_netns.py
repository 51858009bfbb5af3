"""Issue 13's multi-host test: three pop3d hosts in network namespaces, etcd, PostgreSQL and HAProxy.

The test builds the network itself (it needs root and ``ip``; skipped, with
the reason, without them or without etcd, PostgreSQL's server binaries or
HAProxy):

- three network namespaces, one per pop3d instance (``pop3d-1`` to
  ``pop3d-3``), with two veth pairs each to the root namespace: ``front``
  carries HAProxy's connections to the instance, ``back`` its calls to etcd
  and PostgreSQL, so that cutting ``back`` cuts the instance off from etcd
  while its clients still hear it.  Each pair is a /30 of ``10.213.N.0/24``,
  with ``N`` picked so that no address of it exists yet; those addresses
  exist only on the pairs' two ends.
- the root namespace runs Debian's etcd and PostgreSQL, listening on the
  root ends of the ``back`` pairs only, and HAProxy with
  ``deploy/cluster/haproxy.cfg`` as shipped but for its addresses (and a
  health check every 250 ms instead of 2 s, so that a killed instance
  leaves the rotation, and a restarted one comes back, within the test's
  time), ``send-proxy-v2`` to the instances' ``front`` addresses.
- each instance runs ``pop3d serve`` (``ip netns exec``) with ``--lock
  etcd`` (TTL 3 s), users from PostgreSQL, one shared Maildir tree (a
  temporary directory: namespaces share the file system), PROXY headers
  accepted from HAProxy's end of its ``front`` pair only, and its admin API
  on its ``front`` address (with a token).
- clients connect to HAProxy on 127.0.0.1 from ``127.0.0.77``, an address
  the instances cannot see but through the PROXY v2 header.

Before each test every instance runs, every link is up, every instance is
ready (``/readyz``) and HAProxy has all three up and no connection open, so
that ``balance leastconn`` sends a second client to another instance than
the first.  At the end (whatever happens) every process is killed and the
namespaces and links deleted.  Every wait has a deadline; the file runs in
about 15 s.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import io
import json
import os
import poplib
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pop3d import replies

from .etcd_server import ETCD, Etcd, running_etcd
from .haproxy_server import HAPROXY, running_haproxy, shipped_config
from .ports import free_port
from .postgres_server import BINDIR, Postgres
from .serve_process import ServeProcess

psycopg = pytest.importorskip("psycopg")

IP = shutil.which("ip") or ("/usr/sbin/ip" if Path("/usr/sbin/ip").exists() else None)
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(IP is None, reason="ip (iproute2) is not installed"),
    pytest.mark.skipif(ETCD is None, reason="etcd is not installed (Debian: apt-get install etcd-server)"),
    pytest.mark.skipif(BINDIR is None, reason="PostgreSQL's server binaries are not installed"),
    pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (.ci/run installs it)"),
]

TTL = 3  # --lock-ttl
CLIENT = "127.0.0.77"  # where every client connects from
POP3_PORT, ADMIN_PORT = 1110, 8110  # inside each namespace: nothing else listens there
DB_PASSWORD = "netns reader's password"
LOAD_USERS, LOAD_MESSAGES = 50, 4  # two clients per user, each takes two messages
DEADLINE = 20.0  # the longest any one wait may take


def ip(*args: str) -> str:
    assert IP is not None
    result = subprocess.run([IP, *args], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, f"ip {' '.join(args)}: {result.stderr.strip()}"
    return result.stdout


def ip_quietly(*args: str) -> None:
    """``ip ARGS``, whatever comes of it: a cleanup of what may be gone already."""
    assert IP is not None
    subprocess.run([IP, *args], capture_output=True, timeout=10, check=False)


def unused_subnet() -> int:
    """An ``N`` such that no address or route of 10.213.N.0/24 exists in the root namespace."""
    taken = ip("-4", "-o", "address") + ip("-4", "route")
    free = [n for n in range(256) if f"10.213.{n}." not in taken]
    assert free, "every 10.213.N.0/24 is in use"
    return random.choice(free)


@dataclass(frozen=True)
class Host:
    """One instance's network namespace and the addresses of its two links."""

    name: str  # its --instance-name
    netns: str
    front: str  # in the namespace, on the link to HAProxy: the instance listens here
    proxy: str  # HAProxy's end of that link (in the root namespace)
    back: str  # in the namespace, on the link to etcd and PostgreSQL
    services: str  # the root end of that link: etcd and PostgreSQL listen here


def make_network(stack: contextlib.ExitStack, subnet: int) -> list[Host]:
    """Three namespaces with a ``front`` and a ``back`` veth pair each; deleted when ``stack`` closes."""
    tag = secrets.token_hex(3)
    hosts = []
    for number in (1, 2, 3):
        netns = f"pop3d-test-{tag}-{number}"
        ip("netns", "add", netns)
        stack.callback(ip_quietly, "netns", "delete", netns)
        ip("-n", netns, "link", "set", "lo", "up")
        base = f"10.213.{subnet}."
        for link, block in (("front", 8 * number), ("back", 8 * number + 4)):
            outside = f"p3{tag}{link[0]}{number}"  # 10 characters; interface names take 15
            ip("link", "add", outside, "type", "veth", "peer", "name", link, "netns", netns)
            # Gone with the namespace too; deleted first in case a process left in it keeps it alive.
            stack.callback(ip_quietly, "link", "delete", outside)
            ip("address", "add", f"{base}{block + 1}/30", "dev", outside)
            ip("link", "set", outside, "up")
            ip("-n", netns, "address", "add", f"{base}{block + 2}/30", "dev", link)
            ip("-n", netns, "link", "set", link, "up")
        hosts.append(
            Host(
                name=f"pop3d-{number}",
                netns=netns,
                front=f"{base}{8 * number + 2}",
                proxy=f"{base}{8 * number + 1}",
                back=f"{base}{8 * number + 6}",
                services=f"{base}{8 * number + 5}",
            )
        )
    return hosts


def netns_serve(netns: str, *args: str) -> ServeProcess:
    """``pop3d serve ARGS`` in a network namespace.

    ``ip netns exec`` execs the command (no fork), so the process is pop3d
    itself: SIGKILL kills the instance.
    """
    assert IP is not None
    return ServeProcess(*args, prefix=[IP, "netns", "exec", netns])


class Client(poplib.POP3):
    """A POP3 client that connects from :data:`CLIENT`."""

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, source_address=(CLIENT, 0))


@dataclass
class Cluster:
    """The three instances and what they run on; how the test asks them and connects to them."""

    hosts: list[Host]
    etcd: Etcd
    postgres: Postgres
    mail: Path  # the shared Maildir tree
    secret_dir: Path  # the admin token and the database password
    front: tuple[str, int]  # HAProxy's POP3 front end
    haproxy_stats: Path  # HAProxy's stats socket
    prefix: str = field(default_factory=lambda: f"/pop3d-netns/{secrets.token_hex(4)}")
    instances: list[ServeProcess] = field(default_factory=list)
    clients: list[Client] = field(default_factory=list)  # closed by restore(), if a test did not

    # -- the instances ---------------------------------------------------------

    def start(self, number: int) -> ServeProcess:
        host = self.hosts[number]
        return netns_serve(
            host.netns,
            *("--listen", f"{host.front}:{POP3_PORT}", "--hostname", host.name, "--grace-period", "1"),
            *("--admin", f"{host.front}:{ADMIN_PORT}", "--admin-token-file", str(self.secret_dir / "admin-token")),
            *("--passdb-sql", f"postgresql://reader@{host.services}:{self.postgres.port}/mail"),
            *("--passdb-sql-password-file", str(self.secret_dir / "db-password"), "--mail-root", str(self.mail)),
            *("--lock", "etcd", "--etcd", self.etcd.urls[number], "--lock-ttl", str(TTL)),
            *("--lock-prefix", self.prefix, "--instance-name", host.name),
            *("--proxy-protocol-from", f"{host.proxy}/32", "--cleartext-auth-from", f"{CLIENT}/32"),
        )

    def stop(self) -> None:
        for proc in self.instances:
            proc.stop()

    def restore(self) -> None:
        """Every instance running and ready, every link up, no lock held, HAProxy with all three up and idle."""
        for pop in self.clients:
            pop.close()
        self.clients.clear()
        for number, host in enumerate(self.hosts):
            ip("-n", host.netns, "link", "set", "back", "up")
            if self.instances[number].proc.poll() is not None:
                self.instances[number] = self.start(number)
        for proc in self.instances:
            if not proc.pop3:
                proc.wait_ready()
        deadline = time.monotonic() + DEADLINE
        while True:
            ready = all(self.admin_status(number, "/readyz") == 200 for number in range(len(self.hosts)))
            status, locks = self._admin(0, "/cluster/locks") if ready else (0, {})
            unlocked = status == 200 and locks.get("instances") == []
            servers = self.haproxy_servers()
            if unlocked and all(row["status"] == "UP" and row["scur"] == "0" for row in servers.values()):
                return
            assert time.monotonic() < deadline, f"the cluster did not settle: {ready=} {locks=} {servers=}"
            time.sleep(0.05)

    # -- what they say ---------------------------------------------------------

    def _admin(self, number: int, path: str) -> tuple[int, Any]:
        request = urllib.request.Request(
            f"http://{self.hosts[number].front}:{ADMIN_PORT}{path}",
            headers={"Authorization": f"Bearer {(self.secret_dir / 'admin-token').read_text().strip()}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                body = response.read().decode()
                status = response.status
        except urllib.error.HTTPError as exc:
            body, status = exc.read().decode(), exc.code
        is_json = body.startswith(("{", "["))
        return status, json.loads(body) if is_json else body

    def admin(self, number: int, path: str) -> Any:
        """``GET path`` on instance ``number``'s admin API, which must answer 200."""
        status, body = self._admin(number, path)
        assert status == 200, (path, status, body)
        return body

    def admin_status(self, number: int, path: str) -> int:
        try:
            return self._admin(number, path)[0]
        except OSError:  # not listening (yet)
            return 0

    def session_of(self, user: str) -> tuple[int, dict[str, Any]]:
        """The instance and connection summary of ``user``'s one open connection in the cluster."""
        found = []
        for number, proc in enumerate(self.instances):
            if proc.proc.poll() is None:
                listed = self.admin(number, "/servers/pop3/connections")["connections"]
                found += [(number, conn) for conn in listed if conn["user"] == user]
        assert len(found) == 1, found
        return found[0]

    def connection_of(self, pop: Client) -> tuple[int, dict[str, Any]]:
        """The instance and connection summary of the client ``pop``, known by its address and port."""
        found = []
        for number, proc in enumerate(self.instances):
            if proc.proc.poll() is None:
                listed = self.admin(number, "/servers/pop3/connections")["connections"]
                found += [
                    (number, conn)
                    for conn in listed
                    if (conn["remote_host"], conn["remote_port"]) == pop.sock.getsockname()
                ]
        assert len(found) == 1, found
        return found[0]

    def logins(self) -> list[int]:
        """Each instance's successful logins so far, from its ``/metrics``."""
        pattern = re.compile(r'^pop3d_logins_total\{[^}]*result="ok"[^}]*\} (\S+)$', re.M)
        return [
            int(sum(float(value) for value in pattern.findall(self.admin(number, "/metrics"))))
            for number in range(len(self.hosts))
        ]

    def wait_for_haproxy_connections(self, counts: list[int]) -> None:
        """Wait until HAProxy has ``counts[n]`` connections open to instance ``n``."""
        deadline = time.monotonic() + DEADLINE
        while True:
            servers = self.haproxy_servers()
            if [int(servers[host.name]["scur"]) for host in self.hosts] == counts:
                return
            assert time.monotonic() < deadline, f"HAProxy's connections are not {counts}: {servers}"
            time.sleep(0.02)

    def haproxy_servers(self) -> dict[str, dict[str, str]]:
        """``show stat`` of HAProxy's POP3 back end: server name -> its row (``status``, ``scur``...)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.haproxy_stats))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
        return {row["svname"]: row for row in rows if row["pxname"] == "pop3d" and row["svname"].startswith("pop3d-")}

    # -- clients ---------------------------------------------------------------

    def client(self) -> Client:
        pop = Client(*self.front, timeout=10)
        self.clients.append(pop)
        return pop

    def login(self, user: str) -> Client:
        pop = self.client()
        pop.user(user)
        assert pop.pass_(password(user)).startswith(b"+OK")
        return pop

    def login_when_free(self, user: str, deadline: float) -> tuple[Client, collections.Counter[str]]:
        """Log ``user`` in through HAProxy, trying again while refused; and the refusals seen.

        A refusal is ``[IN-USE]`` or ``[SYS/TEMP]``, or ``closed``: HAProxy closed the connection
        (its server was dead) before a greeting or a reply.
        """
        refusals: collections.Counter[str] = collections.Counter()
        while True:
            assert time.monotonic() < deadline, f"{user} could not log in: {refusals}"
            try:
                pop = self.client()
            except (OSError, poplib.error_proto):
                refusals["closed"] += 1
                time.sleep(0.05)
                continue
            try:
                pop.user(user)
                pop.pass_(password(user))
                return pop, refusals
            except poplib.error_proto as exc:
                reply = exc.args[0].decode()
                refusals["closed" if reply == "-ERR EOF" else reply.split()[1]] += 1
            except OSError:
                refusals["closed"] += 1
            pop.close()
            time.sleep(0.05)


def quit_until_closed(pop: Client) -> None:
    """QUIT, and wait for the server to close: it releases the mailbox's lock after its +OK, before that."""
    pop.sock.sendall(b"QUIT\r\n")
    assert pop.file.readline().startswith(b"+OK")
    assert pop.file.readline() == b""
    pop.close()


def password(user: str) -> str:
    return f"pw-{user}"


def deliver(mail: Path, user: str, count: int) -> list[str]:
    """``count`` messages for ``user``, each with a line ``token: USER-K``; their file names."""
    names = []
    for number in range(count):
        name = f"{1700000000 + number}.M{number}P{os.getpid()}.netns"
        body = f"From: sender@example.org\nSubject: {number}\n\ntoken: {user}-{number}\n"
        (mail / user / "new" / name).write_text(body)
        names.append(name)
    return names


def mail_files(mail: Path, user: str) -> list[str]:
    """The unique names of ``user``'s messages, wherever they are (``new/`` or ``cur/``, any flags)."""
    return sorted(p.name.split(":")[0] for sub in ("new", "cur") for p in (mail / user / sub).iterdir())


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("netns")
    users = ["carol", "dave", "erin", "frank", *(f"u{number:02d}" for number in range(LOAD_USERS))]
    with contextlib.ExitStack() as stack:
        hosts = make_network(stack, unused_subnet())
        etcd = stack.enter_context(running_etcd(base, [host.services for host in hosts]))
        assert BINDIR is not None
        postgres = Postgres(BINDIR, hosts=[host.services for host in hosts])
        stack.callback(postgres.remove)
        postgres.initdb()
        postgres.allow_network(f"{hosts[0].back.rsplit('.', 1)[0]}.0/24")
        postgres.start()
        postgres.sql("CREATE DATABASE mail", dbname="postgres")
        postgres.sql("CREATE TABLE users (username text PRIMARY KEY, password text, mailbox text)")
        with psycopg.connect(postgres.admin_dsn("mail"), autocommit=True) as conn:
            quoted = conn.execute("SELECT quote_literal(%s)", (DB_PASSWORD,)).fetchone()
            assert quoted is not None
            conn.execute(f"CREATE ROLE reader LOGIN PASSWORD {quoted[0]}".encode())
            conn.execute("GRANT SELECT ON users TO reader")
            for user in users:
                conn.execute(
                    "INSERT INTO users (username, password, mailbox) VALUES (%s, %s, %s)",
                    (user, "{PLAIN}" + password(user), user),
                )
        mail = base / "mail"
        for user in users:
            for sub in ("cur", "new", "tmp"):
                (mail / user / sub).mkdir(parents=True)
        (base / "secrets").mkdir()
        (base / "secrets" / "admin-token").write_text(secrets.token_urlsafe(24) + "\n")
        (base / "secrets" / "db-password").write_text(DB_PASSWORD + "\n")
        cluster = Cluster(
            hosts, etcd, postgres, mail, base / "secrets", ("127.0.0.1", free_port()), base / "haproxy.sock"
        )
        stack.callback(cluster.stop)  # the instances of the moment, restarted ones included
        cluster.instances = [cluster.start(number) for number in range(len(hosts))]
        for proc in cluster.instances:
            proc.wait_ready()
        config = shipped_config(
            f"{cluster.front[0]}:{cluster.front[1]}",
            f"127.0.0.1:{free_port()}",
            [f"{host.front}:{POP3_PORT}" for host in hosts],
            [f"{host.front}:995" for host in hosts],  # no POP3S here: only the POP3 back end is used
        )
        config = config.replace("global\n", f"global\n    stats socket {cluster.haproxy_stats} mode 600\n", 1)
        assert config.count(" inter 2s ") == 2
        config = config.replace(" inter 2s ", " inter 250ms ")
        (base / "haproxy.cfg").write_text(config)
        stack.enter_context(running_haproxy(base / "haproxy.cfg", cluster.front, base / "haproxy.log"))
        yield cluster


@pytest.fixture
def cluster(network: Cluster) -> Cluster:
    network.restore()
    return network


def test_the_instances_see_the_client_through_proxy_v2(cluster: Cluster) -> None:
    pop = cluster.login("dave")
    client = pop.sock.getsockname()
    assert client[0] == CLIENT
    number, summary = cluster.session_of("dave")
    # The instance's only peer is HAProxy's end of its link; the address comes from the header.
    assert (summary["remote_host"], summary["remote_port"]) == client
    state = cluster.admin(number, f"/servers/pop3/connections/{summary['id']}")
    assert (state["remotehost"], state["remoteport"]) == client
    assert (state["name"], state["state"], state["server"]) == ("dave", "trans", "pop3")
    cluster.instances[number].wait_for(rf"session {summary['id']} from {re.escape(CLIENT)}: dave logged in")
    # The lock in etcd names the client too.
    locks = cluster.admin(number, "/cluster/locks")
    [held] = [(entry["instance"], lock) for entry in locks["instances"] for lock in entry["locks"]]
    assert held[0] == cluster.hosts[number].name
    assert (held[1]["mailbox"], held[1]["client"], held[1]["connection"]) == ("dave", CLIENT, summary["id"])
    assert pop.quit().startswith(b"+OK")


def test_two_clients_of_one_user_through_two_instances_get_one_ok_and_one_in_use(cluster: Cluster) -> None:
    deliver(cluster.mail, "carol", 2)
    first = cluster.login("carol")
    first_instance, _ = cluster.session_of("carol")
    # leastconn: the second client goes to an instance without a connection, another one.
    second = cluster.client()
    second.user("carol")
    with pytest.raises(poplib.error_proto) as refused:
        second.pass_(password("carol"))
    assert refused.value.args[0] == f"-ERR {replies.MAILDROP_LOCKED}".encode()
    second_instance, summary = cluster.connection_of(second)
    assert second_instance != first_instance
    assert (summary["user"], summary["state"]) == (None, "auth")  # refused: still to log in
    # The second instance knows why: the lock in etcd is the first instance's.
    locks = cluster.admin(second_instance, "/cluster/locks")
    assert [(entry["instance"], [lock["mailbox"] for lock in entry["locks"]]) for entry in locks["instances"]] == [
        (cluster.hosts[first_instance].name, ["carol"])
    ]
    assert first.dele(1).startswith(b"+OK")
    quit_until_closed(first)
    # Once the first session is over, the second one gets in, on its own instance.
    second.user("carol")
    assert second.pass_(password("carol")).startswith(b"+OK")
    assert second.stat()[0] == 1
    assert cluster.session_of("carol")[0] == second_instance
    assert second.dele(1).startswith(b"+OK")
    assert second.quit().startswith(b"+OK")
    assert mail_files(cluster.mail, "carol") == []


def test_a_hundred_clients_fetch_every_message_exactly_once(cluster: Cluster) -> None:
    users = [f"u{number:02d}" for number in range(LOAD_USERS)]
    for user in users:
        deliver(cluster.mail, user, LOAD_MESSAGES)
    before = cluster.logins()
    clients = [user for user in users for _ in range(2)]  # two clients per user, at once
    connected = threading.Barrier(len(clients), timeout=DEADLINE)
    deadline = time.monotonic() + DEADLINE

    def fetch(user: str) -> list[str]:
        # All connect first, so that HAProxy spreads 100 open connections over the three.
        pop = cluster.client()
        connected.wait()
        pop.user(user)
        try:
            pop.pass_(password(user))
        except poplib.error_proto as exc:
            assert b"[IN-USE]" in exc.args[0]
            pop.close()
            pop, refusals = cluster.login_when_free(user, deadline)
            assert set(refusals) <= {"[IN-USE]"}, refusals
        count = pop.stat()[0]
        assert count == LOAD_MESSAGES or count == LOAD_MESSAGES // 2, (user, count)
        tokens = []
        for number in range(1, LOAD_MESSAGES // 2 + 1):
            lines = pop.retr(number)[1]
            tokens += [line.decode().split()[1] for line in lines if line.startswith(b"token: ")]
            assert pop.dele(number).startswith(b"+OK")
        assert pop.quit().startswith(b"+OK")
        return tokens

    with ThreadPoolExecutor(max_workers=len(clients)) as pool:
        fetched = [token for tokens in pool.map(fetch, clients, timeout=DEADLINE + 5) for token in tokens]
    expected = [f"{user}-{number}" for user in users for number in range(LOAD_MESSAGES)]
    counts = collections.Counter(fetched)
    assert sorted(counts) == sorted(expected)  # none lost
    assert set(counts.values()) == {1}  # none twice
    for user in users:
        assert mail_files(cluster.mail, user) == []  # all deleted
    served = [after - then for after, then in zip(cluster.logins(), before, strict=True)]
    assert sum(served) == len(clients)
    assert all(served), f"logins per instance: {served}"
    # Each instance's /metrics names it, for one Prometheus scraping them all.
    for number, host in enumerate(cluster.hosts):
        assert f'pop3d_instance_info{{name="{host.name}",' in cluster.admin(number, "/metrics")


def test_an_instance_killed_mid_session_loses_no_mail_and_its_lock_frees_within_the_ttl(cluster: Cluster) -> None:
    names = deliver(cluster.mail, "erin", 3)
    pop = cluster.login("erin")
    assert pop.retr(1)[1][-1] == b"token: erin-0"
    assert pop.dele(1).startswith(b"+OK") and pop.dele(2).startswith(b"+OK")
    victim, _ = cluster.session_of("erin")
    survivor = (victim + 1) % 3
    cluster.instances[victim].signal(signal.SIGKILL)
    killed = time.monotonic()
    assert cluster.instances[victim].wait(10) == -signal.SIGKILL
    pop.close()
    # The dead instance's lease keeps the lock until it expires, and no longer.
    locked = cluster.admin(survivor, "/cluster/locks")["instances"]
    assert [entry["instance"] for entry in locked] == [cluster.hosts[victim].name]
    while cluster.admin(survivor, "/cluster/locks")["instances"]:
        assert time.monotonic() - killed < TTL + 1, "the lock outlived its lease"
        time.sleep(0.05)
    freed = time.monotonic() - killed
    assert freed > 0.5  # held by the dead instance's lease until then
    # Another instance logs erin in: nothing was deleted.
    again, refusals = cluster.login_when_free("erin", killed + TTL + 5)
    assert set(refusals) <= {"[IN-USE]", "closed"}, refusals
    assert again.stat()[0] == 3
    assert cluster.session_of("erin")[0] != victim
    assert again.quit().startswith(b"+OK")
    assert mail_files(cluster.mail, "erin") == names


def test_an_instance_cut_off_from_etcd_ends_its_sessions_before_the_ttl_and_deletes_nothing(
    cluster: Cluster,
) -> None:
    names = deliver(cluster.mail, "frank", 3)
    pop = cluster.login("frank")
    assert pop.dele(1).startswith(b"+OK") and pop.dele(2).startswith(b"+OK")
    cut, _ = cluster.session_of("frank")
    # One idle client on each other instance (leastconn); they leave once the cut one has a client again.
    idle = [cluster.client() for _ in range(2)]
    assert sorted(cluster.connection_of(pop)[0] for pop in idle) == sorted({0, 1, 2} - {cut})
    host = cluster.hosts[cut]
    ip("-n", host.netns, "link", "set", "back", "down")
    cut_at = time.monotonic()
    try:
        # Nothing asked: the instance ends the session itself, before the lease can expire.
        assert pop.file.readline() == f"-ERR {replies.LOCK_LOST}\r\n".encode()
        ended = time.monotonic() - cut_at
        assert ended < TTL, ended
        assert pop.file.readline() == b""  # closed
        pop.close()
        assert mail_files(cluster.mail, "frank") == names
        cluster.instances[cut].wait_for(r"lock service: lease \w+ lost .*: ending 1 sessions")
        # Not ready while cut off; its admin API, on the other link, says so.
        assert cluster.admin_status(cut, "/readyz") == 503
        # A client that HAProxy sends there is told to come back later, once the database
        # lookup has failed: pop3d drops its pooled connection, gone silent, within 5 s.
        stranded = cluster.client()
        assert cluster.connection_of(stranded)[0] == cut
        stranded.user("frank")
        asked = time.monotonic()
        with pytest.raises(poplib.error_proto) as refused:
            stranded.pass_(password("frank"))
        assert refused.value.args[0] == f"-ERR {replies.SYS_TEMP}".encode()
        assert time.monotonic() - asked < 5 + 2
        for pop in idle:
            quit_until_closed(pop)
        # Only the stranded client is left: HAProxy sends the next ones to the two others.
        cluster.wait_for_haproxy_connections([int(number == cut) for number in range(3)])
        # Once the lease expired in etcd, another instance gives frank all three messages.
        again, refusals = cluster.login_when_free("frank", cut_at + TTL + 5)
        assert set(refusals) <= {"[IN-USE]"}, refusals
        assert cluster.session_of("frank")[0] != cut
        assert again.stat()[0] == 3
        assert again.quit().startswith(b"+OK")
        stranded.quit()
    finally:
        ip("-n", host.netns, "link", "set", "back", "up")
    assert mail_files(cluster.mail, "frank") == names
    # With the link back, the instance takes a new lease by itself.
    cluster.instances[cut].wait_for(r"lock service: etcd answers again, new lease")
