"""A small client of etcd v3's JSON gateway, on Trio: HTTP/1.1 by h11 over Trio streams.

etcd serves its gRPC API as JSON too (``POST /v3/kv/txn``, ``/v3/lease/grant``...;
keys and values base64, 64-bit numbers as strings).  :class:`EtcdGateway`
posts one JSON body and returns the JSON answer, without blocking the event
loop and without a dependency beyond h11 (already there, under Hypercorn).

Several endpoints (the members of a cluster) are tried in turn: a call
goes to the one that answered last, and on a failure that another member
may not share (refused, timed out, "no leader", "unavailable") to the next.
Idle connections are kept for the next call.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import h11
import trio

__all__ = ["EtcdError", "EtcdGateway", "EtcdUnavailable", "b64", "parse_endpoint", "unb64"]

log = logging.getLogger("pop3d.etcd")

# The largest answer read (a range over many locks is a few hundred bytes a lock).
MAX_BODY = 64 * 1024 * 1024
RECEIVE_SIZE = 65536
# Idle connections kept per endpoint.
MAX_IDLE = 8
# gRPC codes after which another member may well answer: deadline exceeded, unavailable.
_TRY_ANOTHER = {4, 14}


class EtcdUnavailable(Exception):
    """No endpoint answered (the message says why, for the last one tried)."""


class EtcdError(Exception):
    """etcd answered with an error (``code`` is the gRPC status code)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def b64(data: str | bytes) -> str:
    """``data`` as the gateway takes keys and values."""
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode("ascii")


def unb64(text: str) -> bytes:
    """A key or value from the gateway's answer."""
    return base64.b64decode(text)


def parse_endpoint(url: str) -> tuple[str, int]:
    """``(host, port)`` of ``http://host:port``; ``ValueError`` for anything else."""
    parts = urlsplit(url.strip())
    if parts.scheme != "http":
        raise ValueError(f"{url!r}: an etcd endpoint is http://HOST:PORT")
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.username:
        raise ValueError(f"{url!r}: an etcd endpoint is http://HOST:PORT")
    try:
        port = parts.port or 2379
    except ValueError:
        raise ValueError(f"{url!r}: bad port") from None
    return parts.hostname, port


class _Connection:
    __slots__ = ("h11", "stream")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)


class EtcdGateway:
    """Posts JSON to etcd's gateway at ``endpoints`` (``http://host:port`` each)."""

    def __init__(self, endpoints: Sequence[str]) -> None:
        if not endpoints:
            raise ValueError("give at least one etcd endpoint")
        self.endpoints = [url.strip().rstrip("/") for url in endpoints]
        self._addresses = [parse_endpoint(url) for url in self.endpoints]
        self._current = 0  # the endpoint that answered last
        self._idle: list[list[_Connection]] = [[] for _ in self.endpoints]

    @property
    def current(self) -> str:
        """The endpoint tried first."""
        return self.endpoints[self._current]

    async def call(
        self, path: str, body: dict[str, Any], *, per_try: float, failed_tries: list[str] | None = None
    ) -> dict[str, Any]:
        """POST ``body`` to ``path`` and return the answer; each endpoint gets ``per_try`` seconds.

        Raises :class:`EtcdError` for etcd's own errors (a lease not found...)
        and :class:`EtcdUnavailable` when no endpoint answered.  An answer that
        is not what etcd sends (not JSON, a code that is not a number) is the
        endpoint's failure, as if it had not answered.

        ``failed_tries``, if given, gets a line for each try that failed before
        the one that answered: such a try may still have been applied (sent,
        and the answer lost or late), so a request that is not idempotent
        has an outcome the answer alone does not tell.
        """
        payload = json.dumps(body).encode()
        problems = failed_tries if failed_tries is not None else []
        count = len(self.endpoints)
        for step in range(count):
            index = (self._current + step) % count
            with trio.move_on_after(per_try) as scope:
                try:
                    status, answer = await self._post(index, path, payload, problems)
                except (OSError, h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    problems.append(f"{self.endpoints[index]}: {_reason(exc)}")
                    continue
                except ValueError as exc:  # not JSON
                    problems.append(f"{self.endpoints[index]}: bad answer: {exc}")
                    continue
            if scope.cancelled_caught:
                problems.append(f"{self.endpoints[index]}: no answer within {per_try:g} s")
                continue
            error = answer.get("error")
            if status == 200 and not isinstance(error, dict | str):
                self._current = index
                result = answer.get("result", answer) if path.endswith("/keepalive") else answer
                return result if isinstance(result, dict) else {}
            details = error if isinstance(error, dict) else {}
            try:
                code = int(answer.get("code") or details.get("grpc_code") or 2)
            except (TypeError, ValueError):
                problems.append(f"{self.endpoints[index]}: bad answer: HTTP {status}, code {answer.get('code')!r}")
                continue
            message = str(answer.get("message") or details.get("message") or error or "")
            if code in _TRY_ANOTHER or (status >= 500 and code not in (5, 9)):
                problems.append(f"{self.endpoints[index]}: {message or f'HTTP {status}'}")
                continue
            self._current = index
            raise EtcdError(code, message or f"HTTP {status}")
        raise EtcdUnavailable("; ".join(problems))

    async def _post(self, index: int, path: str, payload: bytes, problems: list[str]) -> tuple[int, dict[str, Any]]:
        host, port = self._addresses[index]
        idle = self._idle[index]
        conn = idle.pop() if idle else None
        if conn is not None:
            try:
                return await self._exchange(index, conn, host, port, path, payload)
            except (OSError, h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                # The server closed an idle connection: once more on a new one (the request may have got there).
                problems.append(f"{self.endpoints[index]}: idle connection failed: {_reason(exc)}")
        stream = await trio.open_tcp_stream(host, port)
        return await self._exchange(index, _Connection(stream), host, port, path, payload)

    async def _exchange(
        self, index: int, conn: _Connection, host: str, port: int, path: str, payload: bytes
    ) -> tuple[int, dict[str, Any]]:
        done = False
        try:
            request = h11.Request(
                method="POST",
                target=path,
                headers=[
                    ("Host", f"{host}:{port}"),
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(payload))),
                ],
            )
            await conn.stream.send_all(conn.h11.send(request) + conn.h11.send(h11.Data(data=payload)))
            await conn.stream.send_all(conn.h11.send(h11.EndOfMessage()) or b"")
            status = 0
            body = bytearray()
            while True:
                event = conn.h11.next_event()
                if event is h11.NEED_DATA:
                    data = await conn.stream.receive_some(RECEIVE_SIZE)
                    conn.h11.receive_data(bytes(data))  # b"" is the end of the stream
                    continue
                if isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > MAX_BODY:
                        raise h11.RemoteProtocolError("answer too large")
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise h11.RemoteProtocolError("connection closed in the answer")
            answer = json.loads(_first_object(bytes(body))) if body.strip() else {}
            if not isinstance(answer, dict):
                raise ValueError("not a JSON object")
            if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
                conn.h11.start_next_cycle()
                if len(self._idle[index]) < MAX_IDLE:
                    self._idle[index].append(conn)
                    done = True
            return status, answer
        finally:
            if not done:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(conn.stream)

    async def aclose(self) -> None:
        """Close the idle connections."""
        for idle in self._idle:
            while idle:
                await trio.aclose_forcefully(idle.pop().stream)


def _first_object(body: bytes) -> bytes:
    # A streaming call (lease keepalive) answers one JSON object a line.
    return body.strip().split(b"\n", 1)[0]


def _reason(exc: BaseException) -> str:
    # The OS's words ("connection refused"), found under Trio's wrappers where it has them.
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno and seen.errno > 0:  # not a resolver's negative code
            return os.strerror(seen.errno).lower()
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror.lower()
        if isinstance(seen, BaseExceptionGroup) and seen.exceptions:
            seen = seen.exceptions[-1]  # the last address tried
            continue
        seen = seen.__cause__ or seen.__context__
    return str(exc) or type(exc).__name__
