"""A process-wide count of the changes an observer would show, and a way to wait for the next.

Servers and sessions call :func:`notify` when something a live view shows
changes: a connection opens or closes, a command runs, a server goes up or
down, an option or a penalty changes.  A watcher (the admin API's event
stream) remembers :attr:`ChangeFeed.count` and awaits
:meth:`ChangeFeed.wait_past`, so it wakes on a change rather than polling.
A notify with nobody waiting is one integer increment: sessions call it on
every command.

The feed belongs to the Trio run that serves the process (``pop3d serve``
runs one): :meth:`ChangeFeed.notify` must be called from that run's thread,
never from a worker thread.  Runs one after another (tests) are fine: a
waiter cancelled at the end of one leaves an event nobody waits for.
"""

from __future__ import annotations

import trio

__all__ = ["ChangeFeed", "changes", "notify"]


class ChangeFeed:
    """A counter that moves on every change, and wakes whoever waits for it to move."""

    __slots__ = ("_count", "_moved")

    def __init__(self) -> None:
        self._count = 0
        self._moved: trio.Event | None = None  # made only while someone waits

    @property
    def count(self) -> int:
        """How many changes there have been so far."""
        return self._count

    def notify(self) -> None:
        """Something changed."""
        self._count += 1
        moved = self._moved
        if moved is not None:
            self._moved = None
            moved.set()

    async def wait_past(self, seen: int) -> int:
        """Wait until :attr:`count` is no longer ``seen``; the new count."""
        while self._count == seen:
            if self._moved is None:
                self._moved = trio.Event()
            await self._moved.wait()
        return self._count


#: The feed of this process: every server object and penalty box reports to it.
changes = ChangeFeed()
notify = changes.notify
