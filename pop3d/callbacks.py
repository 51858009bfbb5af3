"""The two callback interfaces of a server: ``auth`` and ``storage``.

They are the seed's ``authCmd`` and ``storageCmd`` in Python form: typed
Protocols with async methods.  A mailbox is named by the string that
:meth:`Auth.lookup` returns; the server passes it to the storage unchanged.
Message numbers are 1-based and fixed for the whole session (they are the
numbers the storage reported at login).

Plain synchronous objects plug in through :func:`sync_auth` and
:func:`sync_storage`, which run every call in a worker thread so that a slow
disk or database never blocks the event loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import trio

__all__ = [
    "Auth",
    "HashedPassword",
    "MailboxUnavailable",
    "MessageData",
    "Storage",
    "iterate_message",
    "sync_auth",
    "sync_storage",
]


class MailboxUnavailable(Exception):
    """A storage fault that trying again will not mend (a Maildir that is a file, say).

    Raised by a storage callback; the client gets ``-ERR [SYS/PERM]`` and the
    log one line with the message (no traceback).  Any other exception is
    taken for a passing fault: ``-ERR [SYS/TEMP]`` and a traceback.
    """


MessageData = bytes | AsyncIterable[bytes]
"""What :meth:`Storage.get` returns: the whole message, or its chunks in order."""


@runtime_checkable
class HashedPassword(Protocol):
    """A stored password that can be checked but not read back (no APOP)."""

    async def verify(self, password: str) -> bool:
        """Whether ``password`` is the one stored; must compare in constant time."""
        ...


@runtime_checkable
class Auth(Protocol):
    """Looks up users (the seed's ``authCmd lookup name``)."""

    async def lookup(self, name: str) -> tuple[str | HashedPassword, str] | None:
        """``(password, mailbox)`` for user ``name``, or ``None`` if there is none.

        The password is the plain text (APOP needs it) or a
        :class:`HashedPassword`.
        """
        ...


@runtime_checkable
class Storage(Protocol):
    """Serves mailboxes (the seed's ``storageCmd``).

    Sizes are octets of the message in canonical form: CRLF line ends and a
    final CRLF (see :func:`pop3d.message.canonical_size`).
    """

    async def lock(self, mbox: str) -> bool:
        """Lock ``mbox`` for one session; ``False`` if it is already locked."""
        ...

    async def unlock(self, mbox: str) -> None:
        """Release the lock taken by :meth:`lock`."""
        ...

    async def stat(self, mbox: str) -> int:
        """The number of messages in ``mbox``."""
        ...

    async def size(self, mbox: str, msg: int | None = None) -> int:
        """Octets of message ``msg``, or of the whole maildrop without ``msg``."""
        ...

    async def get(self, mbox: str, msg: int) -> MessageData:
        """The message's bytes, or an async iterable of its chunks."""
        ...

    async def dele(self, mbox: str, msgs: Sequence[int]) -> None:
        """Delete messages ``msgs`` for good (called once, at QUIT)."""
        ...

    async def uidl(self, mbox: str, msg: int) -> str:
        """The unique id of message ``msg``: stable across sessions (RFC 1939)."""
        ...


async def iterate_message(data: MessageData) -> AsyncIterator[bytes]:
    """Chunks of what :meth:`Storage.get` returned, whichever form it took."""
    if isinstance(data, bytes | bytearray | memoryview):
        yield bytes(data)
        return
    try:
        async for chunk in data:
            yield chunk
    finally:
        # TOP stops early: let the storage close its file now, not at garbage collection.
        aclose = getattr(data, "aclose", None)
        if aclose is not None:
            await aclose()


class _SyncAuth:
    def __init__(self, target: Any) -> None:
        self._target = target

    async def lookup(self, name: str) -> tuple[str | HashedPassword, str] | None:
        result = await trio.to_thread.run_sync(self._target.lookup, name)
        return None if result is None else (result[0], result[1])

    def __repr__(self) -> str:
        return f"sync_auth({self._target!r})"


class _SyncStorage:
    def __init__(self, target: Any) -> None:
        self._target = target

    async def lock(self, mbox: str) -> bool:
        return bool(await trio.to_thread.run_sync(self._target.lock, mbox))

    async def unlock(self, mbox: str) -> None:
        await trio.to_thread.run_sync(self._target.unlock, mbox)

    async def stat(self, mbox: str) -> int:
        return int(await trio.to_thread.run_sync(self._target.stat, mbox))

    async def size(self, mbox: str, msg: int | None = None) -> int:
        return int(await trio.to_thread.run_sync(self._target.size, mbox, msg))

    async def get(self, mbox: str, msg: int) -> MessageData:
        data = await trio.to_thread.run_sync(self._target.get, mbox, msg)
        if isinstance(data, bytes | bytearray | memoryview):
            return bytes(data)
        return _chunks_in_thread(iter(data))

    async def dele(self, mbox: str, msgs: Sequence[int]) -> None:
        await trio.to_thread.run_sync(self._target.dele, mbox, list(msgs))

    async def uidl(self, mbox: str, msg: int) -> str:
        return str(await trio.to_thread.run_sync(self._target.uidl, mbox, msg))

    def __repr__(self) -> str:
        return f"sync_storage({self._target!r})"


async def _chunks_in_thread(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    iterator = iter(chunks)
    done = object()
    while True:
        chunk = await trio.to_thread.run_sync(next, iterator, done)
        if chunk is done:
            return
        assert isinstance(chunk, bytes)
        yield chunk


def sync_auth(target: Any) -> Auth:
    """Wrap an object with a plain ``lookup(name)`` method as an :class:`Auth`."""
    return _SyncAuth(target)


def sync_storage(target: Any) -> Storage:
    """Wrap an object with plain storage methods as a :class:`Storage`.

    ``get`` may return bytes or an iterable of byte chunks (a generator
    reading a file, say); each chunk is read in a worker thread.
    """
    return _SyncStorage(target)
