"""Mailbox locks in etcd v3: the cluster backend of :mod:`pop3d.mailbox_locks`.

One lease per instance
    :meth:`EtcdLocks.run` grants a lease of ``ttl`` seconds and renews it
    every ``ttl / 3`` while the instance lives; every lock of the instance is
    a key attached to it.  So the cost per session is two requests (take and
    give back the key), whatever the session's length, and one renewal
    every few seconds serves every session at once.  When the process dies,
    the lease expires and every key with it: a crashed instance's locks free
    themselves within ``ttl``.
The lock
    The key ``<prefix>/<mailbox>``, put in a transaction only if absent
    (its create revision is 0), with the holder (instance, server,
    connection, client address, since when) as a JSON value.  Its create
    revision is the fencing token: every later holder's is larger.
Giving up in time
    A renewal that is sent at ``t`` and answered keeps the lease until at
    least ``t + ttl`` on etcd's clock (etcd starts the TTL when the renewal
    arrives, after ``t``).  The instance counts the lease as lost at ``t +
    ttl * GIVE_UP``, a margin before it can expire, and then ends every
    session holding a lock, which applies no deletions.  A process paused
    past that point finds the lease lost as soon as it runs again, before
    it does anything else with it (a suspended machine too: the deadline is
    checked on ``CLOCK_BOOTTIME`` as well as Trio's monotonic clock).  Then
    a new lease is granted as soon as etcd answers.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import socket
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import trio

from .etcd import EtcdError, EtcdGateway, EtcdUnavailable, b64, unb64
from .mailbox_locks import Holder, LockInfo, LockServiceUnavailable, MailboxLock

__all__ = ["GIVE_UP", "RENEW", "EtcdLocks"]

log = logging.getLogger("pop3d.locks")

#: A renewal is sent this fraction of the TTL after the last one.
RENEW = 1 / 3
#: The lease counts as lost this fraction of the TTL after the last renewal that was answered.
GIVE_UP = 3 / 4
# After a failed renewal, the next try comes this fraction of the TTL later (several tries before giving up).
RETRY = 1 / 12
# Revoking the lease at shutdown, and other best-effort cleanups, wait this long at most.
CLEANUP_TIMEOUT = 1.0


def _boot_time() -> float:
    # CLOCK_MONOTONIC (Trio's clock) stops while the machine is suspended; etcd's clock does not.
    return time.clock_gettime(time.CLOCK_BOOTTIME) if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic()


class _Lease:
    """One granted lease, and the locks attached to it."""

    __slots__ = ("give_up_at", "give_up_boot", "id", "locks", "lost", "renew_at")

    def __init__(self, lease_id: int, sent: float, sent_boot: float, ttl: float, configured_ttl: float) -> None:
        self.id = lease_id
        self.lost = False
        self.locks: set[_EtcdLock] = set()
        self.renew_at = self.give_up_at = self.give_up_boot = 0.0
        self.renewed(sent, sent_boot, ttl, configured_ttl)

    def renewed(self, sent: float, sent_boot: float, ttl: float, configured_ttl: float) -> None:
        # etcd may grant another TTL than asked (its minimum): the shorter counts.  Two renewals
        # in flight at once (the loop's, confirm()'s) may be answered in either order: the later counts.
        ttl = min(ttl, configured_ttl)
        self.renew_at = max(self.renew_at, sent + ttl * RENEW)
        self.give_up_at = max(self.give_up_at, sent + ttl * GIVE_UP)
        self.give_up_boot = max(self.give_up_boot, sent_boot + ttl * GIVE_UP)

    def valid(self) -> bool:
        # Trio's clock drives the renewals (and tests' fake clocks); the boot clock also counts
        # time spent suspended, which etcd counts too.
        return not self.lost and trio.current_time() < self.give_up_at and _boot_time() < self.give_up_boot


class _EtcdLock:
    """A lock one session holds: a key on the instance's lease."""

    __slots__ = ("_locks", "_released", "key", "lease", "mailbox", "on_lost", "token")

    def __init__(
        self, locks: EtcdLocks, lease: _Lease, mailbox: str, key: str, token: int, on_lost: Callable[[], None]
    ) -> None:
        self._locks = locks
        self._released = False
        self.lease = lease
        self.mailbox = mailbox
        self.key = key
        self.token = token
        self.on_lost = on_lost

    def still_held(self) -> bool:
        return not self._released and self.lease.valid()

    async def confirm(self) -> bool:
        if not self.still_held():
            return False
        # Renewed first: a renewal sent now keeps the lease (and the key) until now + TTL at least,
        # so the deletions that follow have GIVE_UP of the TTL before the lease can be given up.
        if not await self._locks._renew(self.lease) or not self.still_held():
            return False
        try:
            # A linearizable read: a member cut off from the quorum cannot answer it.
            answer = await self._locks._call("/v3/kv/range", {"key": b64(self.key)}, deadline=self.lease.give_up_at)
        except (EtcdUnavailable, EtcdError) as exc:
            log.warning("lock of %s: cannot confirm it: %s", self.mailbox, exc)
            return False
        kvs = answer.get("kvs") or [{}]
        ours = int(kvs[0].get("create_revision", 0)) == self.token and int(kvs[0].get("lease", 0)) == self.lease.id
        if not ours:
            log.warning("lock of %s: the key is no longer this session's (fencing token %d)", self.mailbox, self.token)
        return ours and self.still_held()

    async def release(self) -> None:
        if self._released:
            return
        self._released = True
        self.lease.locks.discard(self)
        if self.lease.lost:
            return  # the key goes with the lease (revoked once etcd answers again)
        await self._locks._delete(self.key, "CREATE", self.token)

    def __repr__(self) -> str:
        return f"<etcd lock {self.key} token {self.token}>"


class EtcdLocks:
    """Mailbox locks in etcd at ``endpoints``, held on one lease per instance.

    Start it with ``await nursery.start(locks.run)`` (which raises
    :class:`~pop3d.mailbox_locks.LockServiceUnavailable` if no endpoint
    answers) and set it as the servers' ``mailbox_locks``.
    """

    kind = "etcd"

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        ttl: float = 5.0,
        prefix: str = "/pop3d/locks",
        instance: str | None = None,
    ) -> None:
        if ttl < 1:
            raise ValueError("the lock TTL is 1 s at least")
        self.instance = instance or socket.gethostname()
        self.ttl = ttl
        self.prefix = prefix.rstrip("/")
        self._gateway = EtcdGateway(endpoints)
        self._lease: _Lease | None = None
        self._reachable = False
        # Keys this instance may have left behind (a release or a take that did not get
        # through, or got through unseen): (key, compare target, value); deleted when etcd answers.
        self._orphans: set[tuple[str, str, str | int]] = set()
        self._cleaning = False
        self._takes = itertools.count(1)  # makes each take's value unique, for deleting an orphan by value
        self._odd_answer_logged = False
        self._stale_leases: set[int] = set()  # given up on, maybe not yet expired: revoked when etcd answers

    def __repr__(self) -> str:
        return f"etcd-locks:{','.join(self._gateway.endpoints)}{self.prefix}"

    @property
    def endpoints(self) -> list[str]:
        return list(self._gateway.endpoints)

    @property
    def reachable(self) -> bool:
        """Whether etcd answered the last request and the lease is held."""
        return self._reachable and self._lease is not None and self._lease.valid()

    # -- the lease ---------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[EtcdLocks] = trio.TASK_STATUS_IGNORED) -> None:
        """Grant the lease, report ready, and keep it until cancelled; then revoke it."""
        try:
            await self._grant()
        except EtcdUnavailable as exc:
            raise LockServiceUnavailable(f"lock: cannot reach etcd at {exc}") from None  # "URL: why; URL: why"
        except EtcdError as exc:
            raise LockServiceUnavailable(f"lock: etcd at {self._gateway.current} grants no lease: {exc}") from None
        log.info(
            "locks in etcd at %s under %s, lease %x of %g s, instance %s",
            ",".join(self.endpoints),
            self.prefix,
            self._lease.id if self._lease else 0,
            self.ttl,
            self.instance,
        )
        task_status.started(self)
        try:
            async with trio.open_nursery() as nursery:
                await self._keep(nursery)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
                lease, self._lease = self._lease, None
                if lease is not None:
                    # A lock not given back may cover a storage still at work (a thread a cancel
                    # abandoned): then the lease is left to expire, after the process (and its threads).
                    held = len(lease.locks)
                    self._lose(lease, "shutting down")
                    if held:
                        log.warning("lock service: %d locks held at shutdown: lease %x left to expire", held, lease.id)
                    else:
                        await self._revoke(lease.id)
                await self._gateway.aclose()

    async def _call(
        self,
        path: str,
        body: dict[str, Any],
        *,
        deadline: float | None = None,
        failed_tries: list[str] | None = None,
    ) -> dict[str, Any]:
        """One request, each endpoint bounded by a third of the TTL; ``deadline`` bounds the whole."""
        timeout = self.ttl * RENEW
        try:
            with trio.fail_at(deadline if deadline is not None else trio.current_time() + 3 * timeout):
                answer = await self._gateway.call(path, body, per_try=timeout, failed_tries=failed_tries)
        except trio.TooSlowError:
            self._reachable = False
            raise EtcdUnavailable(f"no answer from {self._gateway.current} in time") from None
        except EtcdUnavailable:
            self._reachable = False
            raise
        self._reachable = True
        return answer

    async def _grant(self) -> None:
        sent, sent_boot = trio.current_time(), _boot_time()
        answer = await self._call("/v3/lease/grant", {"TTL": max(1, round(self.ttl))})
        try:
            ttl = float(answer.get("TTL", 0))
            lease_id = int(answer["ID"])
        except (KeyError, TypeError, ValueError):
            ttl = lease_id = 0
        if ttl <= 0 or lease_id == 0:
            raise EtcdError(2, f"lease not granted: {answer}")
        self._lease = _Lease(lease_id, sent, sent_boot, ttl, self.ttl)

    def _unexpected(self, what: str, exc: Exception) -> None:
        # An answer etcd should not give, or a bug: the lock service goes on, and the log is not flooded.
        if not self._odd_answer_logged:
            self._odd_answer_logged = True
            log.error("lock service: %s failed unexpectedly", what, exc_info=exc)
        else:
            log.warning("lock service: %s failed unexpectedly: %r", what, exc)

    async def _keep(self, nursery: trio.Nursery) -> None:
        # Only the lease's own requests run here: anything else (cleanups) in a task of its own,
        # so that nothing delays a renewal or the giving up.
        while True:
            lease = self._lease
            if lease is None:
                try:
                    await self._grant()
                except (EtcdUnavailable, EtcdError) as exc:
                    log.debug("lock service: no new lease yet: %s", exc)
                    await trio.sleep(self.ttl * RETRY)
                    continue
                except Exception as exc:
                    self._unexpected("granting a lease", exc)
                    await trio.sleep(self.ttl * RETRY)
                    continue
                log.info("lock service: etcd answers again, new lease %x", self._lease.id if self._lease else 0)
                self._start_clean_up(nursery)
                continue
            await trio.sleep_until(lease.renew_at)
            with trio.move_on_at(lease.give_up_at) as scope:
                while True:
                    if await self._renew(lease):
                        break
                    await trio.sleep(self.ttl * RETRY)
            if lease.lost or (scope.cancelled_caught and not lease.valid()):
                self._reachable = False
                if not lease.lost:
                    self._lose(lease, f"no renewal answered for {self.ttl * GIVE_UP:g} s")
                continue
            self._start_clean_up(nursery)

    async def _renew(self, lease: _Lease) -> bool:
        """Renew ``lease``; whether that was settled (renewed, or found gone)."""
        sent, sent_boot = trio.current_time(), _boot_time()
        try:
            answer = await self._call("/v3/lease/keepalive", {"ID": str(lease.id)}, deadline=lease.give_up_at)
            ttl = float(answer.get("TTL", 0))
        except (EtcdUnavailable, EtcdError) as exc:
            log.warning("lock service: renewing lease %x failed: %s", lease.id, exc)
            return False
        except Exception as exc:  # counted as a renewal that failed
            self._unexpected(f"renewing lease {lease.id:x}", exc)
            return False
        if ttl <= 0:
            self._lose(lease, "etcd says it expired")
            return True
        lease.renewed(sent, sent_boot, ttl, self.ttl)
        return True

    def _lose(self, lease: _Lease, why: str) -> None:
        """The lease is gone or given up: every session holding a lock on it ends."""
        lease.lost = True
        if self._lease is lease:
            self._lease = None
        self._stale_leases.add(lease.id)
        if lease.locks:
            log.warning("lock service: lease %x lost (%s): ending %d sessions", lease.id, why, len(lease.locks))
        for lock in list(lease.locks):
            try:
                lock.on_lost()
            except Exception:
                log.exception("lock of %s: telling the holder it is lost failed", lock.mailbox)
        lease.locks.clear()

    async def _revoke(self, lease_id: int) -> None:
        with contextlib.suppress(EtcdError):  # not found: expired already
            await self._call("/v3/lease/revoke", {"ID": str(lease_id)})
        self._stale_leases.discard(lease_id)

    def _start_clean_up(self, nursery: trio.Nursery) -> None:
        if (self._stale_leases or self._orphans) and not self._cleaning:
            self._cleaning = True
            nursery.start_soon(self._clean_up)

    async def _clean_up(self) -> None:
        """Revoke leases given up on and delete keys left behind, now that etcd answers."""
        try:
            for lease_id in list(self._stale_leases):
                await self._revoke(lease_id)
            for orphan in list(self._orphans):
                self._orphans.discard(orphan)  # back in if this delete does not get through either
                if not await self._delete(*orphan):
                    break
        except EtcdUnavailable as exc:
            log.debug("lock service: cleanup postponed: %s", exc)
        except Exception as exc:
            self._unexpected("cleaning up", exc)
        finally:
            self._cleaning = False

    async def _delete(self, key: str, target: str, value: str | int) -> bool:
        """Delete ``key`` if its ``target`` (CREATE revision or VALUE) is ``value``; remembered if etcd is away.

        Whether etcd answered.
        """
        compare: dict[str, Any] = {"key": b64(key), "target": target, "result": "EQUAL"}
        if target == "CREATE":
            compare["create_revision"] = str(value)
        else:
            compare["value"] = b64(str(value))
        try:
            await self._call(
                "/v3/kv/txn", {"compare": [compare], "success": [{"request_delete_range": {"key": b64(key)}}]}
            )
        except (EtcdUnavailable, EtcdError, trio.Cancelled) as exc:
            self._orphans.add((key, target, value))
            if isinstance(exc, trio.Cancelled):
                raise
            return False
        return True

    # -- the locks ---------------------------------------------------------

    def key_of(self, mailbox: str) -> str:
        """The key of ``mailbox``'s lock."""
        return f"{self.prefix}/{mailbox}"

    async def acquire(self, mailbox: str, holder: Holder, on_lost: Callable[[], None]) -> MailboxLock | None:
        lease = self._lease
        if lease is None or not lease.valid():
            raise LockServiceUnavailable("the lock service (etcd) is unreachable")
        key = self.key_of(mailbox)
        value = json.dumps(
            {
                "instance": self.instance,
                "server": holder.server,
                "connection": holder.connection,
                "client": holder.client,
                "since": datetime.now(UTC).isoformat(timespec="seconds"),
                "lease": f"{lease.id:x}",
                "take": next(self._takes),
            },
            separators=(",", ":"),
        )
        request = {
            "compare": [{"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
            "success": [{"request_put": {"key": b64(key), "value": b64(value), "lease": str(lease.id)}}],
            # If the key is there, it may be this very put, applied by a try whose answer was lost.
            "failure": [{"request_range": {"key": b64(key)}}],
        }
        failed_tries: list[str] = []
        try:
            answer = await self._call("/v3/kv/txn", request, deadline=lease.give_up_at, failed_tries=failed_tries)
            token = _taken(answer, lease.id, value)
        except (EtcdUnavailable, EtcdError, trio.Cancelled, KeyError, TypeError, ValueError, IndexError) as exc:
            # The put may have gone through: the key is deleted once etcd answers, if it still holds our value.
            self._orphans.add((key, "VALUE", value))
            if isinstance(exc, trio.Cancelled):
                raise
            if not isinstance(exc, EtcdUnavailable | EtcdError):
                self._unexpected(f"taking the lock of {mailbox}", exc)
            raise LockServiceUnavailable(f"the lock service (etcd) is unreachable: {exc!r}") from None
        if token is None:
            if failed_tries:
                # A try that failed may yet be applied (once the holder lets go): deleted then, by its value.
                self._orphans.add((key, "VALUE", value))
            return None
        if not lease.valid():
            self._orphans.add((key, "CREATE", token))
            raise LockServiceUnavailable("the lock service (etcd) is unreachable: the lease was lost")
        lock = _EtcdLock(self, lease, mailbox, key, token, on_lost)
        lease.locks.add(lock)
        return lock

    async def held(self) -> list[LockInfo]:
        start = self.prefix + "/"
        end = start[:-1] + chr(ord(start[-1]) + 1)
        try:
            answer = await self._call("/v3/kv/range", {"key": b64(start), "range_end": b64(end)})
        except (EtcdUnavailable, EtcdError) as exc:
            raise LockServiceUnavailable(f"the lock service (etcd) is unreachable: {exc}") from None
        out = []
        for kv in answer.get("kvs", []):
            mailbox = unb64(kv["key"]).decode(errors="replace")[len(start) :]
            try:
                value = json.loads(unb64(kv.get("value", "")))
                since = datetime.fromisoformat(value["since"]) if value.get("since") else None
            except (ValueError, TypeError, AttributeError):
                value, since = {}, None
            if not isinstance(value, dict):
                value = {}
            out.append(
                LockInfo(
                    mailbox=mailbox,
                    instance=str(value.get("instance", "?")),
                    server=str(value.get("server", "")),
                    connection=str(value.get("connection", "")),
                    client=str(value.get("client", "")),
                    since=since,
                    token=int(kv.get("create_revision", 0)),
                )
            )
        return out


def _taken(answer: dict[str, Any], lease_id: int, value: str) -> int | None:
    """The fencing token if the take transaction's ``answer`` says the key is ours, else ``None``."""
    if answer.get("succeeded"):
        return int(answer["header"]["revision"])  # the revision that created the key
    for response in answer.get("responses") or []:
        for kv in response.get("response_range", {}).get("kvs") or []:
            # Our lease and our value: an earlier try of this same put got through.
            if int(kv.get("lease", 0)) == lease_id and unb64(kv.get("value", "")) == value.encode():
                return int(kv["create_revision"])
    return None
