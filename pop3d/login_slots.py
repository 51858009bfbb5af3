"""Login attempts in progress, per client address: a few at a time.

A penalty makes each attempt from a guessing address wait, but a guesser
with many connections would wait in parallel.  So at most ``per_address``
attempts from one address (an IPv6 client's /64) are in progress at once;
the others wait their turn, still within their login timeout.  Many users
behind one address (a NAT) only queue for the moment their passwords take
to check.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from .penalties import address_key

__all__ = ["LoginSlots"]


class LoginSlots:
    """At most ``per_address`` login attempts in progress from one address; 0: no limit."""

    def __init__(self, per_address: int) -> None:
        self.per_address = per_address
        self._slots: dict[str, trio.Semaphore] = {}
        self._users: Counter[str] = Counter()  # attempts holding or waiting for a slot, per key

    @asynccontextmanager
    async def attempt(self, address: str) -> AsyncIterator[None]:
        """Hold one of ``address``'s slots for the length of the block (waiting for one first)."""
        key = address_key(address)
        if key is None or self.per_address <= 0:
            yield
            return
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = trio.Semaphore(self.per_address)
        self._users[key] += 1
        try:
            async with slot:
                yield
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                # Nobody holds or waits for it: forget it, so the table stays as small as the traffic.
                del self._users[key], self._slots[key]
