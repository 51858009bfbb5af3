"""The cluster view: ``GET /cluster/locks``, and what readiness needs to know of the lock service.

With a lock service (``pop3d serve --lock etcd``), the locks come from it:
every instance's, by instance.  Without one (``--lock local``), each
storage locks for itself and this instance can only tell its own sessions'
mailboxes.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field
from quart import Blueprint
from quart_schema import tag, validate_response

import pop3d
from pop3d.mailbox_locks import LockInfo, LockServiceUnavailable, MailboxLocks
from pop3d.server import Server

from .models import IsoDatetime

__all__ = ["ClusterLock", "ClusterLocks", "InstanceLocks", "blueprint", "lock_services", "unreachable_lock_services"]

blueprint = Blueprint("cluster", __name__)


class ClusterLock(BaseModel):
    """One mailbox lock and its holder."""

    mailbox: str
    server: str = Field(description="The holder's server object (pop3, pop3s...).")
    connection: str = Field(description="The holder's connection id on that server.")
    client: str = Field(description="The client's address.")
    since: IsoDatetime | None = Field(description="When the lock was taken.")
    token: int | None = Field(
        description="The fencing token (the etcd key's create revision); null without a lock service."
    )


class InstanceLocks(BaseModel):
    """The locks one instance holds."""

    instance: str
    locks: list[ClusterLock]


class ClusterLocks(BaseModel):
    """Every mailbox lock held across the cluster, by instance."""

    backend: Literal["local", "etcd"] = Field(
        description="etcd: the cluster's locks, from etcd; local: only this instance's sessions (no lock service)."
    )
    reachable: bool = Field(description="Whether the lock service answered (always true for local).")
    detail: str | None = Field(None, description="Why the lock service could not be read (with 503).")
    instances: list[InstanceLocks]


def lock_services(servers: Mapping[str, Server]) -> list[MailboxLocks]:
    """The lock services of ``servers``, each once."""
    found: dict[int, MailboxLocks] = {}
    for server in servers.values():
        locks = server.mailbox_locks
        if locks is not None:
            found.setdefault(id(locks), locks)
    return list(found.values())


def unreachable_lock_services(servers: Mapping[str, Server]) -> list[str]:
    """The names of the servers that are up but whose lock service cannot be reached now.

    Such a server refuses every login with ``[SYS/TEMP]``: it is not ready.
    """
    return sorted(
        name
        for name, server in servers.items()
        if server.state == "up" and server.mailbox_locks is not None and not server.mailbox_locks.reachable
    )


def _local_locks(servers: Mapping[str, Server]) -> list[LockInfo]:
    """The mailboxes this instance's sessions hold, when there is no lock service to ask."""
    out = []
    for name, server in servers.items():
        for conn_id in server.conn_list():
            try:
                session = server.session(conn_id)
            except pop3d.UnknownConnection:
                continue  # ended meanwhile
            if session.logged_in and session.mailbox:
                out.append(
                    LockInfo(
                        mailbox=session.mailbox,
                        instance=server.options.hostname,
                        server=name,
                        connection=conn_id,
                        client=session.address,
                        since=session.started,
                        token=0,
                    )
                )
    return out


def _by_instance(locks: list[LockInfo], *, tokens: bool) -> list[InstanceLocks]:
    instances: dict[str, list[ClusterLock]] = {}
    for lock in sorted(locks, key=lambda lock: (lock.instance, lock.mailbox)):
        instances.setdefault(lock.instance, []).append(
            ClusterLock(
                mailbox=lock.mailbox,
                server=lock.server,
                connection=lock.connection,
                client=lock.client,
                since=lock.since if isinstance(lock.since, datetime) else None,
                token=lock.token if tokens else None,
            )
        )
    return [InstanceLocks(instance=name, locks=held) for name, held in instances.items()]


@blueprint.get("/cluster/locks")
@tag(["cluster"])
@validate_response(ClusterLocks, 200)
@validate_response(ClusterLocks, 503)
async def cluster_locks() -> tuple[ClusterLocks, int]:
    """Every mailbox lock held across the cluster, by instance (503 if the lock service cannot be read)."""
    servers = pop3d.servers()
    services = lock_services(servers)
    if not services:
        return ClusterLocks(
            backend="local", reachable=True, instances=_by_instance(_local_locks(servers), tokens=False)
        ), 200
    backend: Literal["local", "etcd"] = "etcd" if any(service.kind == "etcd" for service in services) else "local"
    held: list[LockInfo] = []
    for service in services:
        try:
            held += await service.held()
        except LockServiceUnavailable as exc:
            return ClusterLocks(backend=backend, reachable=False, detail=str(exc), instances=[]), 503
    # Two services that share etcd and prefix see the same keys: each lock once.
    unique = {(lock.mailbox, lock.token, lock.instance): lock for lock in held}
    return ClusterLocks(
        backend=backend, reachable=True, instances=_by_instance(list(unique.values()), tokens=True)
    ), 200
