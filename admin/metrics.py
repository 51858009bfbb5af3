"""Prometheus metrics of every server object, read at scrape time.

:class:`ServerCollector` keeps no counters of its own: each scrape reads
``server.stats`` and the open connections of whatever servers exist then,
so servers made or destroyed later need no registration.  Each app gets its
own :class:`~prometheus_client.CollectorRegistry` (see :func:`new_registry`)
rather than the global one, so that a process, or a test run, can build
many apps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from itertools import product

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

import pop3d
from pop3d.sasl import MECHANISMS
from pop3d.server import Server

__all__ = ["LOGIN_MECHANISMS", "ServerCollector", "new_registry", "render"]

#: The ``mechanism`` label's values: USER/PASS, APOP and each SASL mechanism.
LOGIN_MECHANISMS = ("user", "apop", *(mechanism.name.lower() for mechanism in MECHANISMS))


class ServerCollector:
    """A Prometheus collector over the servers that ``servers()`` returns (all, by default)."""

    def __init__(self, servers: Callable[[], Mapping[str, Server]] = pop3d.servers) -> None:
        self._servers = servers

    def describe(self) -> Iterable[Metric]:
        """The metric families, without samples (for the registry's name check)."""
        return self._families()

    def collect(self) -> Iterable[Metric]:
        """One sample per server in each family, read now."""
        families = self._families()
        up, conns, sessions, ended, tls_failures, logins, commands, retrieved, retrieved_bytes, deleted, errors = (
            families
        )
        for name, server in sorted(self._servers().items()):
            stats = server.stats
            up.add_metric([name], 1 if server.state == "up" else 0)
            conns.add_metric([name], len(server.conn_list()))
            sessions.add_metric([name], stats.sessions)
            for tls in (True, False):
                ended.add_metric([name, "true" if tls else "false"], stats.sessions_ended[tls])
            tls_failures.add_metric([name], stats.tls_failures)
            # Every known mechanism from the start, so that a dashboard sees 0, not no series.
            for mechanism, result in sorted({*product(LOGIN_MECHANISMS, ("ok", "failed")), *stats.logins}):
                logins.add_metric([name, mechanism, result], stats.logins[mechanism, result])
            for command, count in sorted(stats.commands.items()):
                commands.add_metric([name, command], count)
            retrieved.add_metric([name], stats.messages_retrieved)
            retrieved_bytes.add_metric([name], stats.bytes_retrieved)
            deleted.add_metric([name], stats.messages_deleted)
            errors.add_metric([name], stats.errors)
        return families

    @staticmethod
    def _families() -> list[GaugeMetricFamily | CounterMetricFamily]:
        server = ["server"]
        return [
            GaugeMetricFamily("pop3d_server_up", "Whether the server is listening (1) or not (0).", labels=server),
            GaugeMetricFamily("pop3d_connections_open", "Open POP3 connections.", labels=server),
            CounterMetricFamily("pop3d_sessions", "POP3 sessions begun.", labels=server),
            CounterMetricFamily(
                "pop3d_sessions_ended",
                "POP3 sessions ended, by whether they were encrypted (POP3S or STLS).",
                labels=[*server, "tls"],
            ),
            CounterMetricFamily(
                "pop3d_tls_handshake_failures", "TLS handshakes that failed or timed out.", labels=server
            ),
            CounterMetricFamily(
                "pop3d_logins",
                "Login attempts, by mechanism (user, apop, plain, login) and result (ok or failed).",
                labels=[*server, "mechanism", "result"],
            ),
            CounterMetricFamily("pop3d_commands", "POP3 commands received, by keyword.", labels=[*server, "command"]),
            CounterMetricFamily("pop3d_messages_retrieved", "Messages sent whole by RETR.", labels=server),
            CounterMetricFamily("pop3d_retrieved_bytes", "Octets of the messages sent by RETR.", labels=server),
            CounterMetricFamily("pop3d_messages_deleted", "Messages deleted at QUIT.", labels=server),
            CounterMetricFamily("pop3d_errors", "Callback failures answered with -ERR.", labels=server),
        ]


def new_registry(servers: Callable[[], Mapping[str, Server]] = pop3d.servers) -> CollectorRegistry:
    """A registry holding only a :class:`ServerCollector`."""
    registry = CollectorRegistry()
    registry.register(ServerCollector(servers))
    return registry


def render(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The scrape body and its content type.

    Plain text format 0.0.4 unless the scraper's ``Accept`` header asks for
    OpenMetrics or text 1.0.0 (as the Prometheus server does).
    """
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
