"""Counters of what a server has done, for logs, the admin API and metrics.

Sessions update a server's :class:`ServerStats` as they go; readers (the
Prometheus collector, say) take a look whenever they like.  Plain integers:
one Trio thread updates them, so no locking is needed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = ["ServerStats"]


@dataclass
class ServerStats:
    """Totals since the server object was created."""

    sessions: int = 0
    #: Sessions that have ended, by whether they were encrypted (True) or not.
    sessions_ended: Counter[bool] = field(default_factory=Counter)
    #: TLS handshakes that failed or timed out (POP3S or STLS).
    tls_failures: int = 0
    #: Login attempts by (mechanism, "ok" or "failed"); mechanism is user, apop, plain, login.
    logins: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: Login attempts whose answer a penalty held back.
    logins_delayed: int = 0
    #: Connections refused at the limits, and connections closed to make room (evicted).
    refused: int = 0
    evicted: int = 0
    messages_retrieved: int = 0
    bytes_retrieved: int = 0
    messages_deleted: int = 0
    errors: int = 0
    commands: Counter[str] = field(default_factory=Counter)

    @property
    def logins_ok(self) -> int:
        """Successful logins, every mechanism."""
        return sum(count for (_, result), count in self.logins.items() if result == "ok")

    @property
    def logins_failed(self) -> int:
        """Failed logins, every mechanism."""
        return sum(count for (_, result), count in self.logins.items() if result == "failed")
