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
    logins_ok: int = 0
    logins_failed: int = 0
    messages_retrieved: int = 0
    bytes_retrieved: int = 0
    messages_deleted: int = 0
    errors: int = 0
    commands: Counter[str] = field(default_factory=Counter)
