"""Mailbox locks that hold across machines: the interface, and an in-process backend.

A storage's own ``lock`` (an ``flock`` in :class:`~pop3d.maildir.MaildirStorage`)
holds among the processes of one host.  Several hosts on one shared mail
store need a lock service besides: a :class:`MailboxLocks` backend, set as
:attr:`pop3d.Server.mailbox_locks`.  A session then takes the service's
lock before the storage's, releases it after the storage's, and:

- refuses the login with ``[IN-USE]`` when the service says the mailbox is
  held anywhere (``acquire`` returns ``None``);
- refuses it with ``[SYS/TEMP]`` when the service cannot be reached
  (:class:`LockServiceUnavailable`);
- ends, applying no deletions, when the service says the lock is lost
  (the ``on_lost`` callback);
- applies QUIT's deletions only if :meth:`MailboxLock.confirm` says, right
  before them, that the lock is still its own (the fencing token).

Without a backend (the default, ``pop3d serve --lock local``) none of this
runs: the storage's lock is the only one, as on one host it needs to be.
:class:`LocalLocks` keeps the same interface in one process (for embedding
and tests); :class:`pop3d.etcd_locks.EtcdLocks` is the cluster backend.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

from .callbacks import TemporarilyUnavailable
from .errors import Pop3dError

__all__ = ["Holder", "LocalLocks", "LockInfo", "LockServiceUnavailable", "MailboxLock", "MailboxLocks"]


class LockServiceUnavailable(Pop3dError, TemporarilyUnavailable):
    """The lock service cannot be reached: no lock can be taken now (the message is one line)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Holder:
    """Who asks for a lock: the session's server, connection id and client address."""

    server: str
    connection: str
    client: str


@dataclass(frozen=True, kw_only=True, slots=True)
class LockInfo:
    """One lock held somewhere in the cluster, as :meth:`MailboxLocks.held` lists it."""

    mailbox: str
    instance: str
    server: str
    connection: str
    client: str
    since: datetime | None
    #: The fencing token: the lock key's create revision in etcd, a counter in :class:`LocalLocks`.
    token: int


@runtime_checkable
class MailboxLock(Protocol):
    """A lock one session holds, from :meth:`MailboxLocks.acquire`."""

    @property
    def token(self) -> int:
        """The fencing token: larger for every later holder of the same mailbox."""
        ...

    def still_held(self) -> bool:
        """Whether the lock is held as far as this process knows, without asking the service."""
        ...

    async def confirm(self) -> bool:
        """Ask the service whether the lock is still this one (its token); ``False`` on any doubt.

        Called right before deletions are applied.
        """
        ...

    async def release(self) -> None:
        """Give the lock up (idempotent); never raises for an unreachable service."""
        ...


@runtime_checkable
class MailboxLocks(Protocol):
    """A lock service for mailboxes, shared by every instance of a cluster."""

    #: The backend's kind, as ``/cluster/locks`` shows it: ``local`` or ``etcd``.
    kind: str
    #: This instance's name in lock values.
    instance: str

    @property
    def reachable(self) -> bool:
        """Whether the service answered the last time it was asked (``/readyz`` fails when not)."""
        ...

    async def acquire(self, mailbox: str, holder: Holder, on_lost: Callable[[], None]) -> MailboxLock | None:
        """The lock on ``mailbox`` for ``holder``, or ``None`` if it is held anywhere else.

        ``on_lost`` is called (from another task, synchronously) if the lock
        is lost while held: the holder must stop at once.  Raises
        :class:`LockServiceUnavailable` if the service cannot be reached.
        """
        ...

    async def held(self) -> list[LockInfo]:
        """Every lock held in the cluster; :class:`LockServiceUnavailable` if the service cannot be reached."""
        ...


class _LocalLock:
    __slots__ = ("_locks", "_lost", "holder", "mailbox", "on_lost", "since", "token")

    def __init__(
        self, locks: LocalLocks, mailbox: str, holder: Holder, token: int, on_lost: Callable[[], None]
    ) -> None:
        self._locks = locks
        self._lost = False
        self.mailbox = mailbox
        self.holder = holder
        self.token = token
        self.on_lost = on_lost
        self.since = datetime.now(UTC)

    def still_held(self) -> bool:
        return not self._lost and self._locks._held.get(self.mailbox) is self

    async def confirm(self) -> bool:
        return self.still_held()

    async def release(self) -> None:
        if self._locks._held.get(self.mailbox) is self:
            del self._locks._held[self.mailbox]
        self._lost = True


class LocalLocks:
    """Mailbox locks within one process: the interface of a lock service, without one.

    For servers in one process over a storage that does not lock by itself,
    and for tests.  :meth:`revoke` takes a lock away as a lost lease would.
    """

    kind = "local"

    def __init__(self, instance: str | None = None) -> None:
        self.instance = instance or socket.gethostname()
        self._held: dict[str, _LocalLock] = {}
        self._tokens = itertools.count(1)

    @property
    def reachable(self) -> bool:
        return True

    async def acquire(self, mailbox: str, holder: Holder, on_lost: Callable[[], None]) -> MailboxLock | None:
        if mailbox in self._held:
            return None
        lock = self._held[mailbox] = _LocalLock(self, mailbox, holder, next(self._tokens), on_lost)
        return lock

    async def held(self) -> list[LockInfo]:
        return [
            LockInfo(
                mailbox=mailbox,
                instance=self.instance,
                server=lock.holder.server,
                connection=lock.holder.connection,
                client=lock.holder.client,
                since=lock.since,
                token=lock.token,
            )
            for mailbox, lock in sorted(self._held.items())
        ]

    def revoke(self, mailbox: str) -> bool:
        """Take ``mailbox``'s lock from its holder, who is told it is lost; whether there was one."""
        lock = self._held.pop(mailbox, None)
        if lock is None:
            return False
        lock._lost = True
        lock.on_lost()
        return True

    def __repr__(self) -> str:
        return f"local-locks:{self.instance}"
