"""A server's open connections, and the limits that decide who gets in.

Like Dovecot's login processes: the limits bear hardest on connections that
have not logged in, which cost nothing to open.

- ``max_connections`` in all.  When it is reached, the oldest connection that
  has not logged in makes room for the newcomer; a logged-in session, or one
  in the middle of logging in, is never pushed out.  Only when every connection is logged in is the newcomer
  refused.
- ``max_connections_per_ip`` counts the connections from one address (an
  IPv6 client's whole /64) that have not logged in, so that one host cannot
  fill the table with silent connections, while many users behind one
  address (a NAT, a webmail front end) all get in.
- ``max_userip_connections`` counts the logged-in sessions of one user from
  one address (Dovecot's ``mail_max_userip_connections``).

No I/O here: :class:`ConnectionTable` only keeps count and answers; the
server closes and refuses.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from .penalties import address_key

__all__ = ["Admission", "ConnectionTable", "Tracked", "Verdict"]


class Tracked(Protocol):
    """What the table needs to know of a session."""

    @property
    def address(self) -> str:
        """The client's address (the real one, behind a PROXY header)."""
        ...

    @property
    def logged_in(self) -> bool:
        """Whether the session is past AUTHORIZATION."""
        ...

    @property
    def logging_in(self) -> bool:
        """Whether a login attempt of it is being checked (or waits its turn)."""
        ...

    @property
    def user(self) -> str:
        """The user it logged in as (empty before)."""
        ...

    @property
    def closing(self) -> bool:
        """Whether it was told to close and has not finished yet."""
        ...


T = TypeVar("T", bound=Tracked)


class Verdict(enum.Enum):
    """What to do with a newcomer."""

    ADMIT = "admit"
    ADMIT_AFTER_EVICTING = "evict"  # close ``Admission.evict`` first
    REFUSE_FULL = "full"  # every connection is logged in, or logging in
    REFUSE_ADDRESS = "address"  # too many from its address that have not logged in


@dataclass(frozen=True)
class Admission(Generic[T]):
    """The table's answer to a newcomer."""

    verdict: Verdict
    evict: T | None = None


class ConnectionTable(Generic[T]):
    """The open connections of one server, in the order they came."""

    def __init__(self) -> None:
        self._by_id: dict[str, T] = {}  # insertion order: oldest first
        # Kept apart so that a newcomer's checks look only at its peers that
        # matter, not at thousands of logged-in sessions from the same address:
        self._waiting: dict[str, dict[str, T]] = {}  # address key -> connections not logged in
        # (address key, user) -> its logged-in sessions: a list, as there are few (a dict each would cost 230 bytes).
        self._users: dict[tuple[str, str], list[T]] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._by_id.values()))

    def ids(self) -> list[str]:
        """The ids of the open connections, oldest first."""
        return list(self._by_id)

    def get(self, conn_id: str) -> T | None:
        """The connection ``conn_id``, if it is open."""
        return self._by_id.get(conn_id)

    def add(self, conn_id: str, session: T) -> None:
        """Count a new connection."""
        self._by_id[conn_id] = session
        self._waiting.setdefault(_key(session.address), {})[conn_id] = session

    def logged_in(self, conn_id: str) -> None:
        """Connection ``conn_id`` has logged in (as its ``user``)."""
        session = self._by_id.get(conn_id)
        if session is None:
            return
        key = _key(session.address)
        _discard(self._waiting, key, conn_id)
        self._users.setdefault((key, session.user), []).append(session)

    def remove(self, conn_id: str) -> None:
        """Forget a connection that has ended."""
        session = self._by_id.pop(conn_id, None)
        if session is None:
            return
        key = _key(session.address)
        _discard(self._waiting, key, conn_id)
        group = (key, session.user)
        sessions = self._users.get(group, [])
        for i, other in enumerate(sessions):
            if other is session:
                del sessions[i]
                if not sessions:
                    del self._users[group]
                break

    def admit(self, address: str, *, max_connections: int, max_per_address: int) -> Admission[T]:
        """Whether a newcomer from ``address`` gets in, and whom it displaces."""
        if address and self.waiting_from(address) >= max_per_address:
            return Admission(Verdict.REFUSE_ADDRESS)
        if len(self._by_id) < max_connections:
            return Admission(Verdict.ADMIT)
        # At the limit, connections already told to close are on their way out: they hold no place.
        staying = sum(1 for session in self._by_id.values() if not session.closing)
        if staying < max_connections:
            return Admission(Verdict.ADMIT)
        oldest = next((s for s in self._by_id.values() if not s.logged_in and not s.logging_in and not s.closing), None)
        if oldest is None:
            return Admission(Verdict.REFUSE_FULL)
        return Admission(Verdict.ADMIT_AFTER_EVICTING, oldest)

    def waiting_from(self, address: str) -> int:
        """Connections from ``address`` (its /64) that have not logged in (and are not closing)."""
        peers = self._waiting.get(_key(address), {})
        return sum(1 for session in peers.values() if not session.logged_in and not session.closing)

    def sessions_of(self, user: str, address: str) -> int:
        """Logged-in sessions of ``user`` from ``address`` (its /64)."""
        return sum(1 for session in self._users.get((_key(address), user), ()) if session.logged_in)


def _key(address: str) -> str:
    # One host can roam a whole IPv6 /64: it counts as one address, as for penalties.
    return address_key(address) or address


def _discard(groups: dict[str, dict[str, T]], group: str, conn_id: str) -> None:
    peers = groups.get(group)
    if peers is not None:
        peers.pop(conn_id, None)
        if not peers:
            del groups[group]
