"""In-memory users and mailboxes, like tcllib's ``udb`` and ``dbox``.

For embedding the server in a program and for tests.  Nothing is persisted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .callbacks import HashedPassword, MessageData
from .message import canonical_size

__all__ = ["MemoryStorage", "MemoryUsers"]


class MemoryUsers:
    """A user database in a dict: name -> (password, mailbox).

    ``MemoryUsers({"alice": ("secret", "alice")})``, or add users later.
    """

    def __init__(self, users: dict[str, tuple[str, str]] | None = None) -> None:
        self._users: dict[str, tuple[str, str]] = dict(users or {})

    def add(self, name: str, password: str, mailbox: str | None = None) -> None:
        """Add or replace a user; the mailbox defaults to the user's name."""
        self._users[name] = (password, mailbox if mailbox is not None else name)

    def remove(self, name: str) -> None:
        """Remove a user (no error if there is none)."""
        self._users.pop(name, None)

    def names(self) -> list[str]:
        """The user names, sorted."""
        return sorted(self._users)

    async def lookup(self, name: str) -> tuple[str | HashedPassword, str] | None:
        """``(password, mailbox)`` of ``name``, or ``None``."""
        return self._users.get(name)

    def __repr__(self) -> str:
        return f"memory-users:{len(self._users)}"


@dataclass
class _Message:
    data: bytes
    uid: str
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = canonical_size(self.data)


class MemoryStorage:
    """Mailboxes in a dict: mailbox name -> list of messages (bytes).

    A mailbox that was never filled is empty.  Unique ids are the SHA-1 of
    the mailbox name, a counter and the message, fixed when the message is
    added, so they stay stable while the message exists.
    """

    def __init__(self, mailboxes: dict[str, Iterable[bytes]] | None = None) -> None:
        self._boxes: dict[str, list[_Message]] = {}
        self._locked: set[str] = set()
        self._added = 0
        for mbox, messages in (mailboxes or {}).items():
            for data in messages:
                self.add(mbox, data)

    def add(self, mbox: str, data: bytes) -> None:
        """Deliver a message to ``mbox``.

        Messages delivered while a session holds the lock are seen by the
        next session, as numbers must not move during one (RFC 1939).
        """
        self._added += 1
        uid = hashlib.sha1(b"%s\0%d\0%s" % (mbox.encode(), self._added, data)).hexdigest()
        self._boxes.setdefault(mbox, []).append(_Message(data, uid))

    def messages(self, mbox: str) -> list[bytes]:
        """The messages of ``mbox`` as stored, oldest first."""
        return [m.data for m in self._boxes.get(mbox, [])]

    def is_locked(self, mbox: str) -> bool:
        """Whether a session holds the lock on ``mbox``."""
        return mbox in self._locked

    def _box(self, mbox: str) -> list[_Message]:
        return self._boxes.get(mbox, [])

    async def lock(self, mbox: str) -> bool:
        """Take the lock on ``mbox``; ``False`` if it is held."""
        if mbox in self._locked:
            return False
        self._locked.add(mbox)
        return True

    async def unlock(self, mbox: str) -> None:
        """Release the lock on ``mbox``."""
        self._locked.discard(mbox)

    async def stat(self, mbox: str) -> int:
        """The number of messages in ``mbox``."""
        return len(self._box(mbox))

    async def size(self, mbox: str, msg: int | None = None) -> int:
        """Canonical octets of message ``msg``, or of the whole mailbox."""
        box = self._box(mbox)
        if msg is None:
            return sum(m.size for m in box)
        return box[msg - 1].size

    async def get(self, mbox: str, msg: int) -> MessageData:
        """The bytes of message ``msg``."""
        return self._box(mbox)[msg - 1].data

    async def dele(self, mbox: str, msgs: Sequence[int]) -> None:
        """Remove messages ``msgs`` (numbers as at login)."""
        doomed = set(msgs)
        box = self._box(mbox)
        box[:] = [m for n, m in enumerate(box, start=1) if n not in doomed]

    async def uidl(self, mbox: str, msg: int) -> str:
        """The unique id of message ``msg``."""
        return self._box(mbox)[msg - 1].uid

    def __repr__(self) -> str:
        return f"memory-storage:{len(self._boxes)}"
