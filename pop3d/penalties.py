"""Penalties for failed logins, per client address and per user name.

Like Dovecot's anvil: each failed login adds to the penalty of the client's
address (an IPv6 client's whole /64, which one host can roam) and of the
user name it tried.  The next login attempt of either waits 2, 4, 8, then
at most ``max_delay`` seconds before it is even checked, right or wrong.
A penalty is forgotten after a quiet ``decay`` (an hour).  A successful
login clears its user's penalty, and takes back from its address's the
failures at that user name (a typo) but not those at others (a spray).

No I/O and no event loop: the session asks :meth:`PenaltyBox.delay`, sleeps
that long itself, and reports the outcome.  Entries are bounded in number,
the stalest going first, so a botnet cannot grow the table without end.
"""

from __future__ import annotations

import functools
import ipaddress
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from .changes import notify

__all__ = ["DEFAULT_MAX_DELAY", "Penalty", "PenaltyBox", "address_key", "distinct_boxes"]

DEFAULT_MAX_DELAY = 15.0
FIRST_DELAY = 2.0
DECAY = 3600.0
MAX_ENTRIES = 100_000  # of each kind
MAX_USER = 256
MAX_USERS_PER_ADDRESS = 32  # user names an address's failures are told apart by

Kind = Literal["address", "user"]


@functools.lru_cache(maxsize=4096)  # asked at every login attempt; parsing is not free
def address_key(host: str) -> str | None:
    """The key a client address is penalised under: IPv4 as it is, IPv6 as its /64.

    An IPv4-mapped IPv6 address counts as IPv4; a host that is not an IP
    address (a memory stream's ``""``) has no key.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass(frozen=True, kw_only=True)
class Penalty:
    """One penalised address or user, as the admin API lists them."""

    kind: Kind
    key: str
    failures: int
    delay: float  # seconds the next attempt waits
    last_failure: float  # wall-clock time.time() of the last failure


@dataclass
class _Entry:
    failures: int
    last: float  # the box's clock
    wall: float  # time.time(), for people
    # Of an address: its failures by the user name tried, so that a success
    # takes back only that user's (a typo), never a spray at other users.
    by_user: Counter[str] = field(default_factory=Counter)


class PenaltyBox:
    """Failed logins by address and by user, and the delays they earn.

    One box may serve several servers (``pop3d serve`` shares one between
    its POP3 and POP3S listeners), so that switching ports gains nothing.
    Addresses and user names are kept in tables of their own, each bounded,
    so that made-up user names cannot push guessing addresses out.
    ``clock`` is monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        *,
        max_delay: float = DEFAULT_MAX_DELAY,
        decay: float = DECAY,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_delay < 0 or decay <= 0 or max_entries < 1:
            raise ValueError("max_delay must be >= 0, decay > 0 and max_entries >= 1")
        self.max_delay = max_delay
        self.decay = decay
        self._max_entries = max_entries
        self._clock = clock
        self._tables: dict[Kind, OrderedDict[str, _Entry]] = {"address": OrderedDict(), "user": OrderedDict()}

    def describe(self) -> str:
        """What the admin API shows for this box."""
        return f"penalties: up to {self.max_delay:g} s, {len(self)} entries"

    def __repr__(self) -> str:
        return f"<PenaltyBox {self.describe()}>"

    def __len__(self) -> int:
        return sum(len(table) for table in self._tables.values())

    # -- what a session asks and tells --------------------------------------

    def delay(self, address: str, user: str) -> float:
        """Seconds a login attempt from ``address`` as ``user`` waits before it is even checked."""
        return max((self._delay_of(kind, key) for kind, key in self._keys(address, user)), default=0.0)

    def failed(self, address: str, user: str) -> None:
        """A login from ``address`` as ``user`` failed."""
        now, wall = self._clock(), time.time()
        for kind, key in self._keys(address, user):
            table = self._tables[kind]
            entry = table.get(key)
            if entry is None or now - entry.last >= self.decay:
                entry = _Entry(failures=0, last=now, wall=wall)
            entry.failures += 1
            entry.last, entry.wall = now, wall
            if kind == "address" and (user in entry.by_user or len(entry.by_user) < MAX_USERS_PER_ADDRESS):
                entry.by_user[user[:MAX_USER]] += 1
            table[key] = entry
            table.move_to_end(key)  # the stalest stay at the front
            while len(table) > self._max_entries:
                table.popitem(last=False)
        notify()

    def succeeded(self, address: str, user: str) -> None:
        """A login from ``address`` as ``user`` succeeded.

        The user's penalty is cleared, and from the address's only the
        failures at that user name: a mistyped password is forgiven, a
        guess at other users is not.
        """
        self._tables["user"].pop(user[:MAX_USER], None)
        key = address_key(address)
        entry = self._tables["address"].get(key) if key is not None else None
        if key is not None and entry is not None:
            entry.failures -= entry.by_user.pop(user[:MAX_USER], 0)
            if entry.failures <= 0:
                del self._tables["address"][key]
        notify()

    # -- what the admin sees and does -----------------------------------------

    def entries(self) -> list[Penalty]:
        """The live penalties, worst first."""
        self._expire()
        out = [
            Penalty(
                kind=kind,
                key=key,
                failures=entry.failures,
                delay=self._delay_for(entry.failures),
                last_failure=entry.wall,
            )
            for kind, table in self._tables.items()
            for key, entry in table.items()
        ]
        return sorted(out, key=lambda penalty: (-penalty.failures, penalty.kind, penalty.key))

    def clear(self, kind: Kind, key: str) -> bool:
        """Forget one penalty; ``key`` may be any address of a penalised /64.  Whether there was one."""
        key = (address_key(key) or key) if kind == "address" else key[:MAX_USER]
        cleared = self._tables[kind].pop(key, None) is not None
        notify()
        return cleared

    # -- inside ----------------------------------------------------------------

    def _keys(self, address: str, user: str) -> list[tuple[Kind, str]]:
        keys: list[tuple[Kind, str]] = []
        if (key := address_key(address)) is not None:
            keys.append(("address", key))
        if user:
            keys.append(("user", user[:MAX_USER]))  # a key, not a store of what clients send
        return keys

    def _delay_for(self, failures: int) -> float:
        if failures <= 0:
            return 0.0
        # 2, 4, 8, ... capped; the exponent is bounded so that the float never overflows.
        return min(FIRST_DELAY * 2.0 ** min(failures - 1, 64), self.max_delay)

    def _delay_of(self, kind: Kind, key: str) -> float:
        table = self._tables[kind]
        entry = table.get(key)
        if entry is None:
            return 0.0
        if self._clock() - entry.last >= self.decay:
            del table[key]
            return 0.0
        return self._delay_for(entry.failures)

    def _expire(self) -> None:
        now = self._clock()
        for table in self._tables.values():
            while table:
                key, entry = next(iter(table.items()))
                if now - entry.last < self.decay:
                    break
                del table[key]


def distinct_boxes(boxes: Iterable[PenaltyBox | None]) -> list[PenaltyBox]:
    """Each box once, in order: ``pop3d serve`` shares one box among its servers, and each counts once."""
    return list({id(box): box for box in boxes if box is not None}.values())
