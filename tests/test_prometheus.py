"""A real Prometheus scrapes a real ``pop3d serve``, and what happened reads back through its query API.

Debian's ``prometheus`` (``apt-get install prometheus``; skipped, with the
reason, where it is not installed) runs on 127.0.0.1 with a free port, a
temporary storage directory and a generated configuration: a 1 s scrape
of the admin API's ``/metrics`` with the bearer token, a second job with a
wrong token, and the alerting rules of ``deploy/prometheus``.  POP3
sessions with poplib (a good login and a RETR, a wrong password, a login
that waits out the penalty it earned) must show in ``/api/v1/query`` as
exactly those counts.  Every wait polls with a deadline; Prometheus and
pop3d are killed at the end whatever happens.
"""

from __future__ import annotations

import json
import os
import poplib
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from .serve_process import ServeProcess, make_site, serve_args

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "pop3d-alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "pop3d-dashboard.json"
PROMETHEUS = shutil.which("prometheus") or (
    "/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else None
)
TOKEN = "prom-token-2c7e"
DEADLINE = 30.0
MAX_CONNECTIONS = 40

pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (apt-get install prometheus)")

T = TypeVar("T")


def eventually(probe: Callable[[], T], done: Callable[[T], bool], what: str, timeout: float = DEADLINE) -> T:
    """Call ``probe`` until ``done`` accepts its value; fail with the last value after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: still {value!r} after {timeout:.0f} s")
        time.sleep(0.25)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Prometheus:
    """A running Prometheus and its HTTP API."""

    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> dict[tuple[tuple[str, str], ...], float]:
        """The instant vector of ``expr`` now: labels (without job and instance) -> value."""
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", data
        return {
            tuple(sorted((k, v) for k, v in item["metric"].items() if k not in ("job", "instance"))): float(
                item["value"][1]
            )
            for item in data["result"]
        }

    def value(self, expr: str) -> float | None:
        """The single value of ``expr``, or None while it has no sample."""
        result = self.query(expr)
        assert len(result) <= 1, result
        return next(iter(result.values()), None)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def start_prometheus(workdir: Path, admin: str, token_file: Path) -> Prometheus:
    """Prometheus scraping ``admin`` every second, with the deploy/ rules; ready to query."""
    target = admin.removeprefix("http://")
    bad_token = workdir / "wrong-token"
    bad_token.write_text("not-the-token\n")
    job: dict[str, Any] = {"metrics_path": "/metrics", "static_configs": [{"targets": [target]}]}
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "pop3d", **job, "authorization": {"type": "Bearer", "credentials_file": str(token_file)}},
            {"job_name": "pop3d-wrong-token", **job, "authorization": {"credentials_file": str(bad_token)}},
        ],
    }
    config_file = workdir / "prometheus.yml"
    config_file.write_text(json.dumps(config, indent=2))  # JSON is YAML
    assert PROMETHEUS is not None
    for _attempt in range(3):  # the free port may be taken before Prometheus binds it
        port = free_port()
        log = workdir / f"prometheus-{port}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        prometheus = Prometheus(f"http://127.0.0.1:{port}", proc, log)
        deadline = time.monotonic() + DEADLINE
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{prometheus.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return prometheus
            except OSError:
                time.sleep(0.2)
        prometheus.stop()
        text = log.read_text(errors="replace")
        if "address already in use" not in text:
            pytest.fail(f"prometheus did not start:\n{text[-3000:]}")
    pytest.fail("prometheus found no free port in three tries")


@dataclass
class Stack:
    """pop3d, the Prometheus scraping it, and what the sessions did."""

    pop3d: ServeProcess
    prometheus: Prometheus
    before: dict[str, float | None] = field(default_factory=dict)
    retr_size: int = 0


def run_sessions(port: int) -> int:
    """A good login with a RETR, a wrong password, then a login that waits out its penalty; the RETR's size."""
    pop = poplib.POP3("127.0.0.1", port, timeout=15)
    pop.user("alice")
    pop.pass_("wonderland")
    size = int(pop.list(1).split()[2])
    pop.retr(1)
    pop.quit()

    pop = poplib.POP3("127.0.0.1", port, timeout=15)
    pop.user("bob")
    with pytest.raises(poplib.error_proto):
        pop.pass_("not-builder")
    pop.quit()

    # The failure penalised this address and bob: alice's next login waits first (a delayed login).
    pop = poplib.POP3("127.0.0.1", port, timeout=15)
    pop.user("alice")
    pop.pass_("wonderland")
    pop.quit()
    return size


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("prometheus")
    site = make_site(tmp_path_factory.mktemp("site"))
    token_file = workdir / "admin-token"
    token_file.write_text(TOKEN + "\n")
    args = serve_args(site, "--admin", "127.0.0.1:0", "--admin-token-file", str(token_file))
    with ServeProcess(*args, "--max-connections", str(MAX_CONNECTIONS)) as pop3d:
        pop3d.wait_ready()
        assert pop3d.admin is not None
        prometheus = start_prometheus(workdir, pop3d.admin, token_file)
        try:
            stack = Stack(pop3d, prometheus)
            # Prometheus has scraped the server before any session: the counters start at 0 there.
            for expr in ('pop3d_sessions_total{server="pop3"}', 'pop3d_logins_total{server="pop3",result="ok"}'):
                stack.before[expr] = eventually(
                    lambda expr=expr: prometheus.value(f"sum({scoped(expr)})"),  # type: ignore[misc]
                    lambda value: value is not None,
                    f"{expr} in Prometheus",
                )
            stack.retr_size = run_sessions(pop3d.port)
            yield stack
        finally:
            prometheus.stop()


def expected(stack: Stack) -> dict[str, float]:
    return {
        'pop3d_server_up{server="pop3"}': 1,
        'pop3d_connections_open{server="pop3"}': 0,
        'pop3d_connections_limit{server="pop3"}': MAX_CONNECTIONS,
        'pop3d_sessions_total{server="pop3"}': 3,
        'pop3d_sessions_ended_total{server="pop3",tls="false"}': 3,
        'pop3d_sessions_ended_total{server="pop3",tls="true"}': 0,
        'pop3d_logins_total{server="pop3",mechanism="user",result="ok"}': 2,
        'pop3d_logins_total{server="pop3",mechanism="user",result="failed"}': 1,
        'sum(pop3d_logins_total{server="pop3",mechanism!="user"})': 0,
        'pop3d_messages_retrieved_total{server="pop3"}': 1,
        'pop3d_retrieved_bytes_total{server="pop3"}': stack.retr_size,
        'pop3d_commands_total{server="pop3",command="RETR"}': 1,
        'pop3d_commands_total{server="pop3",command="PASS"}': 3,
        'pop3d_messages_deleted_total{server="pop3"}': 0,
        'pop3d_logins_delayed_total{server="pop3"}': 1,
        'pop3d_penalties{kind="address"}': 1,
        'pop3d_penalties{kind="user"}': 1,
        'pop3d_errors_total{server="pop3"}': 0,
        'pop3d_connections_refused_total{server="pop3"}': 0,
    }


def scoped(expr: str) -> str:
    """``expr`` (with one selector) restricted to the job with the right token."""
    assert expr.count("{") == 1, expr
    return expr.replace("{", '{job="pop3d",')


def test_counters_read_back_through_prometheus(stack: Stack) -> None:
    assert stack.before == dict.fromkeys(stack.before, 0.0)
    assert 0 < stack.retr_size < 1000
    want = expected(stack)

    def observed() -> dict[str, float | None]:
        return {expr: stack.prometheus.value(scoped(expr)) for expr in want}

    eventually(observed, lambda seen: seen == want, "the counters in Prometheus")


def test_a_wrong_token_is_a_failed_scrape(stack: Stack) -> None:
    def wrong_target() -> dict[str, Any]:
        targets = stack.prometheus.get("/api/v1/targets", state="active")["activeTargets"]
        return next(t for t in targets if t["labels"]["job"] == "pop3d-wrong-token")

    target = eventually(wrong_target, lambda t: t["health"] == "down", "the scrape with a wrong token")
    assert "401" in target["lastError"], target
    assert stack.prometheus.value('up{job="pop3d-wrong-token"}') == 0
    assert stack.prometheus.value('up{job="pop3d"}') == 1


def test_the_alert_rules_evaluate_on_real_metrics(stack: Stack) -> None:
    def rules() -> list[dict[str, Any]]:
        groups = stack.prometheus.get("/api/v1/rules")["groups"]
        return [rule for group in groups for rule in group["rules"]]

    evaluated = eventually(rules, lambda rs: bool(rs) and all(r["health"] == "ok" for r in rs), "rule evaluation")
    # Every alert of the file, each evaluated without an error.
    assert sorted(rule["name"] for rule in evaluated) == sorted(
        re.findall(r"^\s*- alert: (\w+)$", RULES.read_text(), re.M)
    )
    assert len(evaluated) >= 5 and all(rule.get("lastError", "") == "" for rule in evaluated)
    # Nothing is wrong with this server: no alert is pending or firing.
    assert stack.prometheus.get("/api/v1/alerts")["alerts"] == []


def test_every_dashboard_query_runs(stack: Stack) -> None:
    board = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in board["panels"] for target in panel["targets"]]
    for expr in exprs:
        # What Grafana does with the variables: "All" is .*, and the intervals are durations.
        promql = re.sub(r"\$(job|instance|server)\b", ".*", expr)
        promql = promql.replace("$__rate_interval", "1m").replace("$__range", "5m")
        assert "$" not in promql, promql

        def has_data(promql: str = promql) -> dict[tuple[tuple[str, str], ...], float]:
            return stack.prometheus.query(promql)

        # Valid PromQL (a bad one is a 400, which fails the query) with a result: each panel shows something.
        eventually(has_data, bool, f"a result for {promql}")


def test_a_server_taken_down_raises_its_alert(stack: Stack) -> None:
    admin = stack.pop3d.admin
    assert admin is not None

    def post(path: str) -> None:
        request = urllib.request.Request(admin + path, method="POST", headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200

    def alerts() -> list[dict[str, Any]]:
        return list(stack.prometheus.get("/api/v1/alerts")["alerts"])

    post("/servers/pop3/down")
    try:
        pending = eventually(alerts, lambda found: len(found) > 0, "an alert for the server taken down")
        (alert,) = pending
        # Pending: it fires only after 2 minutes down, longer than a test should wait.
        assert alert["state"] == "pending"
        assert alert["labels"] == {
            "alertname": "Pop3dServerDown",
            "severity": "critical",
            "job": "pop3d",
            "instance": admin.removeprefix("http://"),
            "server": "pop3",
        }
        assert (
            alert["annotations"]["summary"] == f"pop3d server pop3 on {admin.removeprefix('http://')} is not listening"
        )
    finally:
        post("/servers/pop3/up")
    eventually(alerts, lambda found: found == [], "the alert gone once the server is up again")
