"""Liveness and readiness, for process supervisors and load balancers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

__all__ = ["Listening", "not_listening", "serving"]


class Listening(Protocol):
    """What readiness needs of a server: its state and its listening sockets."""

    @property
    def state(self) -> str:
        """``down``, ``up`` or ``exiting``."""
        ...

    def addresses(self) -> list[tuple[str, int]]:
        """The (host, port) of each open listening socket."""
        ...


def not_listening(servers: Mapping[str, Listening]) -> list[str]:
    """The names of the servers that are up but have no open listening socket.

    Servers that are down or exiting were stopped on purpose and do not
    count; with none up, everything is ready.
    """
    return sorted(name for name, server in servers.items() if server.state == "up" and not server.addresses())


def serving(servers: Mapping[str, Listening]) -> list[str]:
    """The names of the servers that are up and listening: those that take clients now."""
    return sorted(name for name, server in servers.items() if server.state == "up" and server.addresses())
