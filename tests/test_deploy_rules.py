"""The files of ``deploy/``: Prometheus rules and configuration, the Grafana dashboard, docs/monitoring.md.

``promtool`` checks the rules and the example configuration and runs the
rules' unit tests (skipped, with the reason, where promtool is not
installed).  Every metric name and label the rules and the dashboard use
must be served by a live ``pop3d serve``'s ``/metrics``, so that neither
can drift from the code.  The shell commands of docs/monitoring.md run as
printed.
"""

from __future__ import annotations

import json
import os
import poplib
import re
import shutil
import subprocess
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from .serve_process import ServeProcess, make_site, serve_args

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "pop3d-alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "pop3d-alerts.test.yml"
CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "pop3d-dashboard.json"
DOC = ROOT / "docs" / "monitoring.md"

TOKEN = "deploy-token-6a0f"
DOC_ORIGIN = "https://dash.example.org"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)")

# Labels that Prometheus adds to every scraped series: not in /metrics.
TARGET_LABELS = {"job", "instance"}
# PromQL and Grafana words that look like metric names in an expression.
NOT_METRICS = {
    "sum",
    "min",
    "max",
    "avg",
    "by",
    "without",
    "rate",
    "increase",
    "and",
    "or",
    "unless",
    "up",
    "bool",
    "on",
    "ignoring",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """``promtool ARGS`` from the repository's top directory."""
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def dashboard_expressions() -> list[str]:
    """Every PromQL expression of the dashboard, and the queries of its variables."""
    board = dashboard()
    exprs = [target["expr"] for panel in board["panels"] for target in panel["targets"]]
    exprs += [var["query"]["query"] for var in board["templating"]["list"] if var["type"] == "query"]
    return exprs


# -- promtool -------------------------------------------------------------------


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    result = promtool("check", "rules", str(RULES.relative_to(ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


@needs_promtool
def test_the_rules_unit_tests_pass_and_cover_every_alert() -> None:
    result = promtool("test", "rules", str(RULE_TESTS.relative_to(ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    # Every alert is shown firing by some test, and the tests show alerts staying quiet too.
    fired, quiet = set(), set()
    for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            (fired if case["exp_alerts"] else quiet).add(case["alertname"])
    assert fired == {rule["alert"] for rule in alert_rules()}
    assert len(quiet) >= 2, quiet


@needs_promtool
def test_promtool_fails_a_broken_rule_test(tmp_path: Path) -> None:
    # The unit tests can fail: a threshold that fires at 40% of the connection limit is caught.
    broken = RULES.read_text().replace("pop3d_connections_open / pop3d_connections_limit > 0.8", "x > 0.4")
    assert broken != RULES.read_text()
    (tmp_path / RULES.name).write_text(
        broken.replace("x > 0.4", "pop3d_connections_open / pop3d_connections_limit > 0.4")
    )
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    result = promtool("test", "rules", str(tmp_path / RULE_TESTS.name))
    assert result.returncode != 0 and "Pop3dConnectionsNearLimit" in result.stdout + result.stderr


@needs_promtool
def test_promtool_accepts_the_example_config(tmp_path: Path) -> None:
    # In full (files too), as installed: the token file where the config names it, the rules beside it.
    config = yaml.safe_load(CONFIG.read_text())
    assert config["rule_files"] == [RULES.name]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "pop3d"  # what Pop3dTargetDown selects
    assert job["metrics_path"] == "/metrics"
    token_file = job["authorization"]["credentials_file"]
    installed = tmp_path / CONFIG.name
    installed.write_text(CONFIG.read_text().replace(token_file, str(tmp_path / "pop3d-admin-token")))
    (tmp_path / "pop3d-admin-token").write_text(TOKEN + "\n")
    shutil.copy(RULES, tmp_path / RULES.name)
    result = promtool("check", "config", str(installed))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout
    # A missing rule file is an error, so the check above did read it.
    (tmp_path / RULES.name).unlink()
    assert promtool("check", "config", str(installed)).returncode != 0


# -- the names the rules and the dashboard use ------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """A ``pop3d serve`` with a token and the origin of docs/monitoring.md's CORS example."""
    site = make_site(tmp_path_factory.mktemp("deploy"))
    args = serve_args(site, "--admin", "127.0.0.1:0", "--admin-cors-origin", DOC_ORIGIN)
    with ServeProcess(*args, env={"POP3D_ADMIN_TOKEN": TOKEN}) as proc:
        proc.wait_ready()
        yield proc


@pytest.fixture(scope="module")
def live_labels(served: ServeProcess) -> dict[str, dict[str, set[str]]]:
    """Sample name -> label name -> the values seen, from the live ``/metrics`` after one session."""
    assert served.admin is not None
    pop = poplib.POP3("127.0.0.1", served.port, timeout=10)  # so that pop3d_commands_total has samples
    pop.user("alice")
    pop.pass_("wonderland")
    pop.quit()
    request = urllib.request.Request(served.admin + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    labels: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for family in text_string_to_metric_families(text):
        # A family without samples yet (pop3d_commands_total before any command) still exists.
        labels[family.name + ("_total" if family.type == "counter" else "")]
        for sample in family.samples:
            for name, value in sample.labels.items():
                labels[sample.name][name].add(value)
            labels[sample.name].setdefault("__name__", set())
    return labels


def metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression (or a Grafana ``label_values`` query)."""
    expr = re.sub(r"label_values\((.*),\s*\w+\)", r"\1", expr)  # not the label a variable lists
    expr = re.sub(r'"[^"]*"', '""', expr)  # nor inside strings
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # nor ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # nor grouping labels
    expr = re.sub(r"\{[^}]*\}", "", expr)  # nor matchers
    words = set(re.findall(r"(?<![\w$.])[a-zA-Z_:][\w:]*\b(?!\s*\()", expr))  # not function names
    return words - NOT_METRICS


def matchers(expr: str) -> list[tuple[str, str, str, str]]:
    """``(metric, label, operator, value)`` of each label matcher on a pop3d metric."""
    found = []
    for metric, inside in re.findall(r"\b(pop3d_\w+)\{([^}]*)\}", expr):
        for label, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', inside):
            found.append((metric, label, op, value))
    return found


def test_the_name_finder_finds_names() -> None:
    # So that an empty set below means no drift, not a finder that finds nothing.
    expr = 'sum by (instance) (rate(pop3d_logins_total{result="failed", job=~"$job"}[5m])) / on() up > 0'
    assert metric_names(expr) == {"pop3d_logins_total"}
    assert matchers(expr) == [
        ("pop3d_logins_total", "result", "=", "failed"),
        ("pop3d_logins_total", "job", "=~", "$job"),
    ]
    assert metric_names('label_values(pop3d_server_up{job=~"$job"}, instance)') == {"pop3d_server_up"}


@pytest.mark.parametrize("source", ["rules", "dashboard"], ids=["pop3d-alerts.yml", "pop3d-dashboard.json"])
def test_every_metric_and_label_used_exists(source: str, live_labels: dict[str, dict[str, set[str]]]) -> None:
    exprs = [rule["expr"] for rule in alert_rules()] if source == "rules" else dashboard_expressions()
    used = set().union(*(metric_names(expr) for expr in exprs))
    assert len(used) >= 5, used
    assert {name for name in used if name != "up"} <= set(live_labels), sorted(used - set(live_labels))
    for expr in exprs:
        for metric, label, op, value in matchers(expr):
            if label in TARGET_LABELS:
                continue
            assert label in live_labels[metric], f"{metric} has no label {label!r} (in {expr})"
            if op == "=":
                assert value in live_labels[metric][label], f"{metric}{{{label}={value!r}}} is never served"


def test_the_dashboard_is_importable() -> None:
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41 and board["uid"] == "pop3d"
    variables = {var["name"]: var for var in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"job", "instance", "server"} <= set(variables)
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        # Every query goes to the chosen data source, none to one that exists only where the file was made.
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"] and all(t["datasource"] == panel["datasource"] for t in panel["targets"])
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
    titles = {panel["title"] for panel in board["panels"]}
    wanted = {"Server up", "Connections open", "Sessions/s", "Logins by result", "RETR bytes/s", "Errors", "Penalties"}
    assert wanted | {"TLS share"} <= titles
    # The panels the brief asks for use the metrics they are named after.
    by_title: dict[str, str] = defaultdict(str)
    for panel in board["panels"]:
        by_title[panel["title"]] += " ".join(t["expr"] for t in panel["targets"])
    for title, metric in [
        ("Server up", "pop3d_server_up"),
        ("Connections open", "pop3d_connections_open"),
        ("Sessions/s", "pop3d_sessions_total"),
        ("Logins by result", "pop3d_logins_total"),
        ("RETR bytes/s", "pop3d_retrieved_bytes_total"),
        ("Errors", "pop3d_errors_total"),
        ("Penalties", "pop3d_penalties"),
        ("TLS share", 'pop3d_sessions_ended_total{job=~"$job", instance=~"$instance", server=~"$server", tls="true"}'),
    ]:
        assert metric in by_title[title], title


# -- docs/monitoring.md ------------------------------------------------------------


def doc_commands() -> list[str]:
    """Every command of the ``sh`` blocks of docs/monitoring.md."""
    blocks = re.findall(r"```sh\n(.*?)```", DOC.read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in re.sub(r"\\\n\s*", "", block).splitlines() if line.strip()]


def test_the_document_shows_the_checks_and_the_cors_requests() -> None:
    commands = doc_commands()
    assert sum(command.startswith("promtool ") for command in commands) == 3
    assert sum(DOC_ORIGIN in command for command in commands) == 2
    for path in (RULES, RULE_TESTS, CONFIG, DASHBOARD):
        assert str(path.relative_to(ROOT)) in DOC.read_text()


@pytest.mark.parametrize("command", doc_commands())
def test_document_command_works_as_printed(command: str, served: ServeProcess) -> None:
    if command.startswith("promtool ") and PROMTOOL is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    if command.startswith("curl ") and shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    assert served.admin is not None
    assert command.startswith(("promtool ", "curl ")), f"a command no test knows how to run: {command}"
    pointed = command.replace("http://127.0.0.1:8110", served.admin)
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", pointed],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,  # "from the repository's top directory"
        env={**os.environ, "POP3D_ADMIN_TOKEN": TOKEN},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    if command.startswith("promtool "):
        assert "SUCCESS" in out
    elif "-X OPTIONS" in command:
        assert out.startswith("HTTP/1.1 204") and f"access-control-allow-origin: {DOC_ORIGIN}" in out.lower()
    elif "Origin:" in command:
        assert out.startswith("HTTP/1.1 200") and f"access-control-allow-origin: {DOC_ORIGIN}" in out.lower()
        assert '"name":"pop3"' in out
    else:
        assert out.strip() == 'pop3d_server_up{server="pop3"} 1.0'
