"""Prometheus metrics of every server object, read at scrape time.

:class:`ServerCollector` keeps no counters of its own: each scrape reads
``server.stats`` and the open connections of whatever servers exist then,
so servers made or destroyed later need no registration.  Each app gets its
own :class:`~prometheus_client.CollectorRegistry` (see :func:`new_registry`)
rather than the global one, so that a process, or a test run, can build
many apps.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from itertools import product

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

import pop3d
from pop3d.penalties import distinct_boxes
from pop3d.sasl import MECHANISMS
from pop3d.server import Server

__all__ = ["LOGIN_MECHANISMS", "ServerCollector", "new_registry", "render"]

#: The ``mechanism`` label's values: USER/PASS, APOP and each SASL mechanism.
LOGIN_MECHANISMS = ("user", "apop", *(mechanism.name.lower() for mechanism in MECHANISMS))


Family = GaugeMetricFamily | CounterMetricFamily

# Families with one sample per server, read off the server: (name, help, type, reader).
_PER_SERVER: tuple[tuple[str, str, type[Family], Callable[[Server], float]], ...] = (
    ("pop3d_server_up", "Whether the server is listening (1) or not (0).", GaugeMetricFamily,
     lambda server: 1 if server.state == "up" else 0),
    ("pop3d_connections_open", "Open POP3 connections.", GaugeMetricFamily, lambda server: len(server.conn_list())),
    # The limit beside the count, so that an alert can compare them (the limit changes on a reload).
    ("pop3d_connections_limit", "Open POP3 connections the server takes at most (max_connections).",
     GaugeMetricFamily, lambda server: server.options.max_connections),
    ("pop3d_sessions", "POP3 sessions begun.", CounterMetricFamily, lambda server: server.stats.sessions),
    ("pop3d_tls_handshake_failures", "TLS handshakes that failed or timed out.", CounterMetricFamily,
     lambda server: server.stats.tls_failures),
    ("pop3d_messages_retrieved", "Messages sent whole by RETR.", CounterMetricFamily,
     lambda server: server.stats.messages_retrieved),
    ("pop3d_retrieved_bytes", "Octets of the messages sent by RETR.", CounterMetricFamily,
     lambda server: server.stats.bytes_retrieved),
    ("pop3d_messages_deleted", "Messages deleted at QUIT.", CounterMetricFamily,
     lambda server: server.stats.messages_deleted),
    ("pop3d_errors", "Callback failures answered with -ERR.", CounterMetricFamily, lambda server: server.stats.errors),
    ("pop3d_logins_delayed", "Login attempts whose answer a guessing penalty held back.", CounterMetricFamily,
     lambda server: server.stats.logins_delayed),
    ("pop3d_connections_refused", "Connections refused at the limits.", CounterMetricFamily,
     lambda server: server.stats.refused),
    ("pop3d_connections_evicted", "Connections not logged in, closed to make room for newcomers at the limit.",
     CounterMetricFamily, lambda server: server.stats.evicted),
)  # fmt: skip


class ServerCollector:
    """A Prometheus collector over the servers that ``servers()`` returns (all, by default)."""

    def __init__(self, servers: Callable[[], Mapping[str, Server]] = pop3d.servers) -> None:
        self._servers = servers

    def describe(self) -> Iterable[Metric]:
        """The metric families, without samples (for the registry's name check)."""
        return self._collect({})

    def collect(self) -> Iterable[Metric]:
        """One sample per server in each family, read now."""
        return self._collect(self._servers())

    def _collect(self, servers: Mapping[str, Server]) -> list[Family]:
        simple = [kind(name, text, labels=["server"]) for name, text, kind, _ in _PER_SERVER]
        ended = CounterMetricFamily(
            "pop3d_sessions_ended",
            "POP3 sessions ended, by whether they were encrypted (POP3S or STLS).",
            labels=["server", "tls"],
        )
        logins = CounterMetricFamily(
            "pop3d_logins",
            "Login attempts, by mechanism (user, apop, plain, login) and result (ok or failed).",
            labels=["server", "mechanism", "result"],
        )
        commands = CounterMetricFamily(
            "pop3d_commands", "POP3 commands received, by keyword.", labels=["server", "command"]
        )
        penalties = GaugeMetricFamily("pop3d_penalties", "Penalised client addresses and user names.", labels=["kind"])
        for name, server in sorted(servers.items()):
            for family, (_, _, _, read) in zip(simple, _PER_SERVER, strict=True):
                family.add_metric([name], read(server))
            stats = server.stats
            for tls in (True, False):
                ended.add_metric([name, "true" if tls else "false"], stats.sessions_ended[tls])
            # Every known mechanism from the start, so that a dashboard sees 0, not no series.
            for mechanism, result in sorted({*product(LOGIN_MECHANISMS, ("ok", "failed")), *stats.logins}):
                logins.add_metric([name, mechanism, result], stats.logins[mechanism, result])
            for command, count in sorted(stats.commands.items()):
                commands.add_metric([name, command], count)
        # A box may serve several servers (pop3d serve shares one): each counts once.
        boxes = distinct_boxes(server.options.penalties for server in servers.values())
        kinds = Counter(entry.kind for box in boxes for entry in box.entries())
        for kind in ("address", "user"):
            penalties.add_metric([kind], kinds[kind])
        return [*simple, ended, logins, commands, penalties]


def new_registry(
    servers: Callable[[], Mapping[str, Server]] = pop3d.servers, *, instance: str | None = None
) -> CollectorRegistry:
    """A registry holding a :class:`ServerCollector`; with ``instance``, also ``pop3d_instance_info``.

    ``pop3d_instance_info{name="...",version="..."} 1`` names the process
    (``--instance-name``), so that dashboards over a cluster can tell its
    instances apart by name, whatever address Prometheus scrapes them at
    (its own ``instance`` label).
    """
    registry = CollectorRegistry()
    registry.register(ServerCollector(servers))
    if instance is not None:
        info = Gauge(
            "pop3d_instance_info",
            "This pop3d process: its instance name and version.",
            ["name", "version"],
            registry=registry,
        )
        info.labels(name=instance, version=pop3d.__version__).set(1)
    return registry


def render(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The scrape body and its content type.

    Plain text format 0.0.4 unless the scraper's ``Accept`` header asks for
    OpenMetrics or text 1.0.0 (as the Prometheus server does).
    """
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
