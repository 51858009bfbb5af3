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

import contextlib
import functools
import threading
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import trio

__all__ = [
    "Auth",
    "HashedPassword",
    "Listing",
    "MailboxUnavailable",
    "MessageData",
    "Storage",
    "iterate_message",
    "read_listing",
    "sync_auth",
    "sync_storage",
]


class TemporarilyUnavailable(Exception):
    """A service a callback needs is down for now (a database, a lock service).

    Raised by an auth or storage callback; the client gets ``-ERR
    [SYS/TEMP]`` and the log one line with the message (no traceback: the
    outage is the news, not the stack).
    """


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


@runtime_checkable
class Listing(Protocol):
    """An optional storage call: a maildrop's whole listing at once.

    A storage that has it is asked once per login, instead of ``stat`` and
    then ``size`` for every message (one call, and for a storage in another
    thread or process, one round trip, rather than one per message).
    """

    async def listing(self, mbox: str) -> tuple[Sequence[int], Sequence[str] | None]:
        """``(sizes, uids)`` of every message in ``mbox``, in message order.

        ``uids`` may be ``None``: UIDL then asks :meth:`Storage.uidl` per message.
        """
        ...


async def read_listing(storage: Storage, mbox: str) -> tuple[Sequence[int], Sequence[str] | None]:
    """The sizes (and UIDLs, if known) of ``mbox``'s messages, in one call where the storage allows."""
    if isinstance(storage, Listing):
        sizes, uids = await storage.listing(mbox)
        if uids is not None and len(uids) != len(sizes):
            raise ValueError(f"listing of {mbox!r}: {len(sizes)} sizes but {len(uids)} unique ids")
        return sizes, uids
    count = await storage.stat(mbox)
    return [await storage.size(mbox, n) for n in range(1, count + 1)], None


async def iterate_message(data: MessageData) -> AsyncGenerator[bytes, None]:
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
        # A lookup holds nothing: a cancel may leave its thread to finish alone.
        result = await trio.to_thread.run_sync(self._target.lookup, name, abandon_on_cancel=True)
        return None if result is None else (result[0], result[1])

    def __repr__(self) -> str:
        return f"sync_auth({self._target!r})"


class _SyncStorage:
    """Runs each call in a worker thread that a cancel abandons: a stop never waits for a slow disk.

    Calls for one mailbox run one at a time, so a call abandoned while it
    still works (a dele, say) finishes before the mailbox's ``unlock`` or
    next ``lock`` runs.  A ``lock`` that succeeds after its caller gave up
    is undone with ``unlock``; a ``get`` result nobody takes is closed.
    """

    def __init__(self, target: Any) -> None:
        self._target = target
        self._gates: dict[str, tuple[threading.Lock, int]] = {}  # mailbox -> (its lock, threads using it)
        self._gates_guard = threading.Lock()

    @contextlib.contextmanager
    def _gate(self, mbox: str) -> Iterator[None]:
        with self._gates_guard:
            gate, users = self._gates.get(mbox) or (threading.Lock(), 0)
            self._gates[mbox] = (gate, users + 1)
        try:
            with gate:
                yield
        finally:
            with self._gates_guard:
                gate, users = self._gates[mbox]
                if users == 1:
                    del self._gates[mbox]
                else:
                    self._gates[mbox] = (gate, users - 1)

    async def _call(
        self, mbox: str, fn: Callable[..., Any], *args: Any, undo: Callable[[Any], object] | None = None
    ) -> Any:
        """``fn(mbox, *args)`` in an abandonable thread; ``undo(result)`` if nobody takes the result."""
        guard = threading.Lock()
        abandoned = False
        handed: list[Any] = []  # the result, once the caller may take it

        def gated_undo(result: Any) -> None:
            assert undo is not None
            with self._gate(mbox):
                undo(result)

        def work() -> Any:
            with self._gate(mbox):
                result = fn(mbox, *args)
                if undo is None:
                    return result
                with guard:
                    if not abandoned:
                        handed.append(result)
                        return result
                undo(result)  # the caller is gone: still under the gate, before any later call
                return result

        try:
            return await trio.to_thread.run_sync(work, abandon_on_cancel=True)
        except BaseException:
            with guard:
                abandoned = True
                orphans = handed[:]
            for result in orphans:
                # The thread finished but its result came too late.  Undone in
                # a thread of its own: no await is possible while cancelled.
                trio.lowlevel.start_thread_soon(functools.partial(gated_undo, result), lambda outcome: None)
            raise

    async def lock(self, mbox: str) -> bool:
        return bool(await self._call(mbox, self._target.lock, undo=lambda ok: ok and self._target.unlock(mbox)))

    async def unlock(self, mbox: str) -> None:
        await self._call(mbox, self._target.unlock)

    async def stat(self, mbox: str) -> int:
        return int(await self._call(mbox, self._target.stat))

    async def size(self, mbox: str, msg: int | None = None) -> int:
        return int(await self._call(mbox, self._target.size, msg))

    async def get(self, mbox: str, msg: int) -> MessageData:
        data = await self._call(mbox, self._target.get, msg, undo=_close_quietly)
        if isinstance(data, bytes | bytearray | memoryview):
            return bytes(data)
        return _chunks_in_thread(iter(data))

    async def dele(self, mbox: str, msgs: Sequence[int]) -> None:
        await self._call(mbox, self._target.dele, list(msgs))

    async def listing(self, mbox: str) -> tuple[Sequence[int], Sequence[str] | None]:
        # One thread trip for the whole maildrop, whether or not the target lists at once.
        return await self._call(mbox, self._listing_in_thread)  # type: ignore[no-any-return]

    def _listing_in_thread(self, mbox: str) -> tuple[Sequence[int], Sequence[str] | None]:
        listing = getattr(self._target, "listing", None)
        if listing is not None:
            sizes, uids = listing(mbox)
            return list(sizes), None if uids is None else list(uids)
        count = int(self._target.stat(mbox))
        return [int(self._target.size(mbox, n)) for n in range(1, count + 1)], None

    async def uidl(self, mbox: str, msg: int) -> str:
        return str(await self._call(mbox, self._target.uidl, msg))

    def __repr__(self) -> str:
        return f"sync_storage({self._target!r})"


def _close_quietly(data: Any) -> None:
    # What a sync get() returned, a generator or a file maybe, that nobody will read.
    close = getattr(data, "close", None)
    if close is not None:
        with contextlib.suppress(Exception):
            close()


async def _chunks_in_thread(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    # Each next() runs in a thread that a cancel abandons; the iterator is
    # closed (in a thread) when we are done, but never while a next() runs.
    iterator = iter(chunks)
    done = object()
    guard = threading.Lock()
    busy = finished = False

    def step() -> object:
        nonlocal busy
        with guard:
            if finished:
                return done  # abandoned before it started
            busy = True
        try:
            return next(iterator, done)
        finally:
            with guard:
                busy = False
                close = finished
            if close:
                _close_quietly(iterator)

    try:
        while True:
            chunk = await trio.to_thread.run_sync(step, abandon_on_cancel=True)
            if chunk is done:
                return
            assert isinstance(chunk, bytes)
            yield chunk
    finally:
        with guard:
            finished = True
            close = not busy
        if close:
            trio.lowlevel.start_thread_soon(functools.partial(_close_quietly, iterator), lambda outcome: None)


def sync_auth(target: Any) -> Auth:
    """Wrap an object with a plain ``lookup(name)`` method as an :class:`Auth`."""
    return _SyncAuth(target)


def sync_storage(target: Any) -> Storage:
    """Wrap an object with plain storage methods as a :class:`Storage`.

    ``get`` may return bytes or an iterable of byte chunks (a generator
    reading a file, say); each chunk is read in a worker thread.
    """
    return _SyncStorage(target)
