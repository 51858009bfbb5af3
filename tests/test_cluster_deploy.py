"""The files of ``deploy/cluster/``: HAProxy, Compose and Prometheus for a three-instance cluster.

Each file is checked by its own tool where that is installed (``haproxy
-c``, ``docker compose config`` or ``docker-compose config``, ``promtool
check config``; skipped, with the reason, where not), and against the others
and pop3d's settings: the ports HAProxy sends to are the ones the instances
listen on, every ``POP3D_*`` variable is a setting, Prometheus scrapes each
instance's admin API under its instance name, every image is built here
``FROM debian:bookworm-slim`` (none is pulled).  Then the real HAProxy, with
``haproxy.cfg`` as shipped but for its addresses (free ports of 127.0.0.1),
runs in front of three ``pop3d serve``: POP3 and POP3S go through, each with
the client's address in a PROXY v2 header, and the health check finds
``+OK``.  ``setup.sh`` runs on temporary directories.

``.ci/cluster-compose-test`` runs the Compose file itself, with Docker, and
the page's commands that start and remove it.
"""

from __future__ import annotations

import contextlib
import os
import poplib
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
import yaml

from pop3d.maildir import MaildirStorage
from pop3d.passwords import parse_password
from pop3d.settings import ServeSettings, env_variable

from .certs import issue
from .haproxy_server import HAPROXY, running_haproxy, shipped_config
from .ports import free_port
from .serve_process import ServeProcess, make_site, serve_args

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "deploy" / "cluster"
HAPROXY_CFG = CLUSTER / "haproxy.cfg"
COMPOSE = CLUSTER / "compose.yaml"
PROMETHEUS = CLUSTER / "prometheus.yml"
SETUP = CLUSTER / "setup.sh"
IMAGES = CLUSTER / "images"
CI_SCRIPT = ROOT / ".ci" / "cluster-compose-test"
DOC = ROOT / "docs" / "cluster.md"
DOC_SECTIONS = ("Behind HAProxy", "Users from PostgreSQL")

PROMTOOL = shutil.which("promtool")
IS_ROOT = os.geteuid() == 0
INSTANCES = ("pop3d-1", "pop3d-2", "pop3d-3")


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # type: ignore[no-any-return]


def instance_env(name: str) -> dict[str, str]:
    return {key: str(value) for key, value in compose()["services"][name]["environment"].items()}


def haproxy_sections() -> dict[str, list[str]]:
    """``{"frontend pop3": [its lines], ...}``, comments and blank lines left out."""
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for raw in HAPROXY_CFG.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():
            current = sections.setdefault(line.strip(), [])
        else:
            current.append(" ".join(line.split()))
    return sections


def compose_command() -> list[str] | None:
    """``docker compose`` (v2) or ``docker-compose`` (v1), whichever is installed."""
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy is not None else None


# -- each file by its own tool ---------------------------------------------------


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (.ci/run installs it)")
def test_haproxy_accepts_the_configuration() -> None:
    assert HAPROXY is not None
    result = subprocess.run([HAPROXY, "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Configuration file is valid" in result.stdout


def test_compose_accepts_the_file() -> None:
    command = compose_command()
    if command is None:
        pytest.skip("neither docker compose nor docker-compose is installed")
    result = subprocess.run(
        [*command, "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert set(resolved["services"]) == {*INSTANCES, "haproxy", "etcd", "postgres", "setup", "prometheus"}
    for name in INSTANCES:
        assert resolved["services"][name]["environment"]["POP3D_INSTANCE_NAME"] == name


def dockerfile_froms(dockerfile: Path) -> list[str]:
    """The image each ``FROM`` of ``dockerfile`` names, in order (``AS`` names left out)."""
    return [line.split()[1] for line in dockerfile.read_text().splitlines() if line.upper().startswith("FROM ")]


def test_every_image_is_built_from_debian_bookworm_slim() -> None:
    # No registry but Debian's: each service builds its image, FROM the base image that
    # ../shared/ci/container-env.sh makes where Docker Hub is out of reach.
    services = compose()["services"]
    contexts = set()
    for name, service in services.items():
        assert "build" in service, f"{name} would pull {service.get('image')}"
        assert service["build"].get("network") == "host", name  # where there is no bridge network
        context = (CLUSTER / service["build"]["context"]).resolve()
        dockerfile = context / "Dockerfile"
        froms = dockerfile_froms(dockerfile)
        assert froms and froms[0] == "debian:bookworm-slim", (name, froms)
        # A later stage may build FROM an earlier one, by its name; anything else is Debian's base too.
        stages = {line.split()[3] for line in dockerfile.read_text().splitlines() if " AS " in line.upper()}
        assert all(image == "debian:bookworm-slim" or image in stages for image in froms), (name, froms)
        contexts.add(context)
    assert {path.name for path in contexts} == {ROOT.name, "haproxy", "etcd", "postgres", "prometheus"}
    # Each image directory is used by a service.
    assert {path.parent for path in IMAGES.glob("*/Dockerfile")} <= contexts
    # One image per build: the setup service reuses PostgreSQL's (for its openssl).
    assert services["setup"]["build"] == services["postgres"]["build"]
    assert services["setup"]["image"] == services["postgres"]["image"]


def test_the_images_read_the_files_compose_mounts() -> None:
    services = compose()["services"]
    haproxy = (IMAGES / "haproxy" / "Dockerfile").read_text()
    assert "./haproxy.cfg:/etc/haproxy/haproxy.cfg:ro" in services["haproxy"]["volumes"]
    assert '"-f", "/etc/haproxy/haproxy.cfg"' in haproxy
    prometheus = services["prometheus"]["command"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    etcd = services["etcd"]
    assert "etcd:/var/lib/etcd" in etcd["volumes"] and "--data-dir=/var/lib/etcd/default" in etcd["command"]
    postgres = services["postgres"]
    assert "pgdata:/var/lib/postgresql/data" in postgres["volumes"]
    assert (
        "ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data/pgdata"
        in (IMAGES / "postgres" / "Dockerfile").read_text()
    )
    assert postgres["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres-password"
    assert "postgres-password" in postgres["secrets"]
    assert postgres["command"][0] == "postgres" and "listen_addresses=127.0.0.1" in postgres["command"]


@pytest.mark.skipif(shutil.which("sh") is None, reason="no sh")
def test_the_postgres_entrypoint_is_valid_sh() -> None:
    script = IMAGES / "postgres" / "entrypoint.sh"
    assert os.access(script, os.X_OK)  # COPY keeps the mode: the image runs it as it is
    result = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)")
def test_promtool_accepts_the_prometheus_configuration() -> None:
    assert PROMTOOL is not None
    result = subprocess.run([PROMTOOL, "check", "config", str(PROMETHEUS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout


# -- the files agree with each other and with pop3d ---------------------------------


def test_haproxy_is_tcp_with_proxy_v2_and_a_pop3_check() -> None:
    sections = haproxy_sections()
    assert "mode tcp" in sections["defaults"]
    assert "bind :110" in sections["frontend pop3"] and "bind :995" in sections["frontend pop3s"]
    for backend in ("backend pop3d", "backend pop3d-tls"):
        lines = sections[backend]
        assert "option tcp-check" in lines
        assert lines.index("tcp-check expect string +OK") < lines.index("tcp-check send QUIT\\r\\n")
        defaults = next(line for line in lines if line.startswith("default-server "))
        assert {"send-proxy-v2", "check", "check-send-proxy"} <= set(defaults.split())
        assert [line.split()[1] for line in lines if line.startswith("server ")] == list(INSTANCES)


def test_haproxy_sends_to_the_ports_the_instances_listen_on() -> None:
    sections = haproxy_sections()
    servers = {
        backend: {line.split()[1]: line.split()[2:] for line in sections[backend] if line.startswith("server ")}
        for backend in ("backend pop3d", "backend pop3d-tls")
    }
    for name in INSTANCES:
        env = instance_env(name)
        assert servers["backend pop3d"][name] == [env["POP3D_LISTEN"]]
        pop3_port = env["POP3D_LISTEN"].rsplit(":", 1)[1]
        # POP3S as TCP to the POP3S port; its check speaks POP3 to the POP3 port.
        assert servers["backend pop3d-tls"][name] == [env["POP3D_LISTEN_TLS"], "port", pop3_port]


def test_instances_share_everything_but_their_names_and_ports() -> None:
    services = compose()["services"]
    known = {env_variable(name) for name in ServeSettings.model_fields}
    ports: list[str] = []
    for name in INSTANCES:
        service, env = services[name], instance_env(name)
        assert set(env) <= known, set(env) - known  # pop3d refuses an unknown POP3D_* variable
        assert env["POP3D_INSTANCE_NAME"] == name
        assert env["POP3D_LOCK"] == "etcd" and env["POP3D_ETCD"] == "http://127.0.0.1:2379"
        assert (
            env["POP3D_PASSDB_SQL"].startswith("postgresql://")
            and ":" not in env["POP3D_PASSDB_SQL"][13:].split("@")[0]
        )  # no password in the URL: it comes from the secret
        assert env["POP3D_PASSDB_SQL_PASSWORD_FILE"] == "/run/secrets/pop3d-db-password"
        assert env["POP3D_PROXY_PROTOCOL_FROM"] == "127.0.0.1/32"  # HAProxy, on the host's network
        assert "mail:/var/lib/pop3d/mail" in service["volumes"]
        assert service["network_mode"] == "host" and service["build"]["context"] == "../.."
        ports += [env[key].rsplit(":", 1)[1] for key in ("POP3D_LISTEN", "POP3D_LISTEN_TLS", "POP3D_ADMIN")]
    # One host network: no two listeners on one port, and none on HAProxy's, etcd's, PostgreSQL's or Prometheus'.
    assert len(set(ports)) == len(ports) == 9
    assert not set(ports) & {"110", "995", "2379", "2380", "5432", "9090"}
    for name, service in services.items():
        assert service["network_mode"] in ("host", "none"), name


def test_the_database_password_is_one_secret_for_both_sides() -> None:
    services = compose()["services"]
    assert "pop3d-db-password" in services["postgres"]["secrets"]
    init = (CLUSTER / "postgres" / "init.sql").read_text()
    assert "\\set pop3d_password `cat /run/secrets/pop3d-db-password`" in init
    assert "./postgres/init.sql:/docker-entrypoint-initdb.d/init.sql:ro" in services["postgres"]["volumes"]
    assert (CLUSTER / "secrets" / "pop3d-db-password").read_text().strip()


def test_prometheus_scrapes_each_instance_under_its_name() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "pop3d" and job["metrics_path"] == "/metrics"
    targets = {group["labels"]["instance"]: group["targets"] for group in job["static_configs"]}
    assert targets == {name: [instance_env(name)["POP3D_ADMIN"]] for name in INSTANCES}
    # The rule file's relative path holds in the repository and in the container.
    mounts = compose()["services"]["prometheus"]["volumes"]
    assert "../prometheus/pop3d-alerts.yml:/etc/prometheus/pop3d-alerts.yml:ro" in mounts
    assert (
        PROMETHEUS.parent / config["rule_files"][0]
    ).resolve() == ROOT / "deploy" / "prometheus" / "pop3d-alerts.yml"


@pytest.mark.skipif(not IS_ROOT or shutil.which("openssl") is None, reason="needs root (chown) and openssl")
def test_setup_makes_a_certificate_and_the_demo_maildir(tmp_path: Path) -> None:
    tls, mail = tmp_path / "tls", tmp_path / "mail"
    tls.mkdir()
    mail.mkdir()
    env = {**os.environ, "TLS_DIR": str(tls), "MAIL_DIR": str(mail)}
    for run in range(2):  # the second run changes nothing
        result = subprocess.run(["sh", str(SETUP)], capture_output=True, text=True, timeout=60, env=env)
        assert result.returncode == 0, result.stderr
        assert ("made" in result.stdout) == (run == 0)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls / "cert.pem", tls / "key.pem")
    assert (tls / "key.pem").stat().st_uid == 110 and (tls / "key.pem").stat().st_mode & 0o777 == 0o600
    assert (mail / "demo" / "new").stat().st_uid == 110

    async def count() -> int:
        storage = MaildirStorage(mail)
        assert await storage.lock("demo")
        try:
            return await storage.stat("demo")
        finally:
            await storage.unlock("demo")

    assert trio.run(count) == 1


# -- the real HAProxy in front of three pop3d serve --------------------------------


@pytest.fixture
def cluster(tmp_path: Path, tls_ca: trustme.CA) -> Iterator[tuple[list[ServeProcess], int, int, trustme.CA]]:
    if HAPROXY is None:
        pytest.skip("haproxy is not installed (.ci/run installs it)")
    site = make_site(tmp_path)
    certs = issue(tls_ca, tmp_path)
    with contextlib.ExitStack() as stack:
        instances = []
        for name in INSTANCES:
            args = serve_args(
                site,
                "--listen-tls",
                "127.0.0.1:0",
                "--tls-cert",
                str(certs.cert),
                "--tls-key",
                str(certs.key),
                "--proxy-protocol-from",
                "127.0.0.1/32",
                "--hostname",
                name,
                "--no-admin",
            )
            instances.append(stack.enter_context(ServeProcess(*args)))
        for proc in instances:
            proc.wait_ready()
        front, front_tls = free_port(), free_port()
        config = tmp_path / "haproxy.cfg"
        config.write_text(
            shipped_config(
                f"127.0.0.1:{front}",
                f"127.0.0.1:{front_tls}",
                [f"127.0.0.1:{proc.pop3['pop3'][1]}" for proc in instances],
                [f"127.0.0.1:{proc.pop3['pop3s'][1]}" for proc in instances],
            )
        )
        with running_haproxy(config, ("127.0.0.1", front), tmp_path / "haproxy.log"):
            yield instances, front, front_tls, tls_ca


def logged_somewhere(instances: list[ServeProcess], pattern: str, timeout: float = 10) -> None:
    """Wait until one of ``instances`` logs a line matching ``pattern``."""
    deadline = time.monotonic() + timeout
    while True:
        for proc in instances:
            with contextlib.suppress(TimeoutError):
                proc.wait_for(pattern, timeout=0.05)
                return
        assert time.monotonic() < deadline, f"no instance logged {pattern!r}"


def test_pop3_and_pop3s_through_the_shipped_haproxy_cfg(
    cluster: tuple[list[ServeProcess], int, int, trustme.CA],
) -> None:
    instances, front, front_tls, ca = cluster
    # Plain POP3 from another loopback address: each instance sees that address (PROXY v2).
    for _ in range(6):
        sock = socket.create_connection(("127.0.0.1", front), timeout=10, source_address=("127.0.0.2", 0))
        with sock, sock.makefile("rb") as reader:
            greeting = reader.readline()
            assert greeting.startswith(b"+OK"), greeting
            sock.sendall(b"USER bob\r\nPASS builder\r\nSTAT\r\nQUIT\r\n")
            assert reader.readline().startswith(b"+OK")
            assert reader.readline().startswith(b"+OK")  # logged in: cleartext from loopback, as the client
            assert reader.readline() == b"+OK 0 0\r\n"
            assert reader.readline().startswith(b"+OK")  # QUIT
            assert reader.readline() == b""  # closed: the mailbox is free for the next one
    for proc in instances:
        proc.wait_for(r"from 127\.0\.0\.2: bob logged in")
    # POP3S passes through as TCP: the instance's own certificate, the client's address.
    context = ssl.create_default_context()
    ca.configure_trust(context)
    pop = poplib.POP3_SSL("127.0.0.1", front_tls, context=context, timeout=10)
    try:
        assert pop.getwelcome().startswith(b"+OK")
        assert pop.user("alice").startswith(b"+OK")
        assert pop.pass_("wonderland").startswith(b"+OK")
        assert pop.stat()[0] == 2
    finally:
        pop.quit()
    logged_somewhere(instances, r"from 127\.0\.0\.1: alice logged in")
    # HAProxy's health checks: LOCAL headers, a greeting, QUIT.
    for proc in instances:
        proc.wait_for(r"user=- remote=127\.0\.0\.1:\d+ ")


# -- docs/cluster.md: "Behind HAProxy" and "Users from PostgreSQL" --------------------


def section_commands() -> list[str]:
    """Every command of the ``sh`` blocks of those two sections of docs/cluster.md, as printed."""
    if not DOC.exists():
        return []
    found = []
    for title in DOC_SECTIONS:
        section = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", DOC.read_text(), flags=re.S | re.M)
        assert section, title
        for block in re.findall(r"^```sh\n(.*?)^```", section[1], flags=re.S | re.M):
            found += [line.strip() for line in re.sub(r"\\\n\s*", "", block).splitlines() if line.strip()]
    return found


def run_by_ci(command: str) -> bool:
    """The commands that start, use and remove the cluster: .ci/cluster-compose-test runs them, as printed."""
    return command in CI_SCRIPT.read_text()


def doc_commands() -> list[str]:
    """The commands of those sections that the tests below run (the others are CI's)."""
    return [command for command in section_commands() if not run_by_ci(command)]


def test_the_sections_show_the_checks_and_the_hash() -> None:
    commands = doc_commands()
    assert {command.split()[0] for command in commands} == {"haproxy", "promtool", "docker", "printf"}
    # The compose commands that start and remove the cluster, and the fetches from it, are CI's.
    assert [command.split()[0] for command in section_commands() if run_by_ci(command)] == [
        "docker",
        "curl",
        "curl",
        "docker",
    ]
    text = DOC.read_text()
    for path in (HAPROXY_CFG, COMPOSE, PROMETHEUS, SETUP, CLUSTER / "postgres" / "init.sql", IMAGES):
        assert str(path.relative_to(ROOT)) in text


@pytest.mark.parametrize("command", doc_commands())
def test_document_command_works_as_printed(command: str, tmp_path: Path) -> None:
    tool = command.split()[0]
    if tool == "haproxy" and HAPROXY is None:
        pytest.skip("haproxy is not installed (.ci/run installs it)")
    if tool == "promtool" and PROMTOOL is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    if tool == "docker" and (compose_command() or [""])[-1] != "compose":
        pytest.skip("docker compose (v2) is not installed")
    bindir = str(Path(sys.executable).parent)
    # From the repository's top directory, with the venv's pop3d and /usr/sbin's haproxy on the PATH.
    env = {**os.environ, "PATH": f"{bindir}:{os.environ.get('PATH', '')}:/usr/sbin"}
    cwd = tmp_path if tool == "printf" else ROOT
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=60, cwd=cwd, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    if tool == "printf":
        stored = parse_password(result.stdout.strip())
        assert stored.scheme == "ARGON2ID" and stored.problem is None and stored.check("new password")
