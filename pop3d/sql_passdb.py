"""Users from PostgreSQL, like Dovecot's ``passdb sql``.

:class:`SqlPassdb` is an ``auth`` callback that asks the database for each
login with one query, by default::

    SELECT password, mailbox FROM users WHERE username = %(user)s

The user name is always a bound parameter (``%(user)s``, psycopg's named
placeholder; a literal ``%`` in the query is written ``%%``), never pasted
into the text.  The query returns by name:

- ``password``: the stored password, in the passwd-file's notation
  (``{ARGON2ID}...``, ``{BLF-CRYPT}...``, ``{SHA512-CRYPT}...``,
  ``{PLAIN}...``, or a bare crypt hash; see :mod:`pop3d.passwords`).  NULL
  or a malformed hash never matches.
- ``mailbox`` (optional): the mailbox the storage serves, one directory name
  under the mail root.  Without the column, or NULL, it is the user name.

No row: no such user.  More than one row: no login, and a warning (as
Dovecot does).  Other columns are ignored.

Each lookup runs in a worker thread on a connection from a
:class:`psycopg_pool.ConnectionPool`, so the event loop never waits for the
database.  :meth:`SqlPassdb.check` connects once and runs the query, for a
one-line :class:`SqlPassdbError` at start (unreachable, wrong password, bad
query).  While the database cannot answer, a lookup raises
:class:`PassdbUnavailable`, which the session answers with ``-ERR
[SYS/TEMP]``; the pool reconnects by itself when the database is back.

A password checked against a slow hash is remembered as in
:class:`~pop3d.passwords.StoredPassword` (its verified cache) for as long as
the stored hash does not change.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any

import psycopg
import trio
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool

from .callbacks import HashedPassword, TemporarilyUnavailable
from .errors import Pop3dError
from .passwd import valid_user_name
from .passwords import StoredPassword, parse_password

__all__ = ["DEFAULT_QUERY", "PassdbUnavailable", "SqlPassdb", "SqlPassdbError", "public_conninfo"]

log = logging.getLogger("pop3d.passdb")

DEFAULT_QUERY = "SELECT password, mailbox FROM users WHERE username = %(user)s"
"""The query :class:`SqlPassdb` runs unless given another."""

PLACEHOLDER = "%(user)s"

# Stored passwords kept between lookups, so that their verified caches last.
_CACHE_SIZE = 10_000


class SqlPassdbError(Pop3dError):
    """The database or the query is not usable at start; the message is one line, with no password."""


class PassdbUnavailable(Pop3dError, TemporarilyUnavailable):
    """A lookup could not be answered because the database is down or failing: ``-ERR [SYS/TEMP]``."""


def public_conninfo(conninfo: str) -> str:
    """``conninfo`` (key=value or a ``postgresql://`` URL) as key=value, without any password.

    ``"<invalid>"`` if it cannot be parsed: the text itself may hold one.
    """
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.Error:
        return "<invalid>"
    return make_conninfo("", **{key: value for key, value in params.items() if "password" not in key})


def _one_line(exc: BaseException) -> str:
    """The server's own message if it sent one (not the query echoed back), else libpq's first line."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None)
    if primary:
        return " ".join(str(primary).split())
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[0].split()) if lines else type(exc).__name__


class SqlPassdb:
    """The ``auth`` callback for users in PostgreSQL (see the module).

    ``conninfo`` is a libpq connection string (``host=db dbname=mail
    user=pop3d``) or a ``postgresql://`` URL; ``password``, if given,
    replaces any password in it (from a secret file, say).  ``query`` must
    contain ``%(user)s``.  At most ``pool_size`` connections are open, and
    as many lookups run at once; a lookup waits at most ``timeout`` seconds
    for a connection before it fails with :class:`PassdbUnavailable`.

    Nothing connects until :meth:`check` or the first lookup; :meth:`close`
    closes the pool.  Raises :class:`SqlPassdbError` for a connection string
    that does not parse or a query without the placeholder.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        query: str = DEFAULT_QUERY,
        password: str | None = None,
        pool_size: int = 4,
        timeout: float = 5.0,
    ) -> None:
        try:
            params = conninfo_to_dict(conninfo)
        except psycopg.Error:
            # libpq's message quotes the text, which may hold the password.
            raise SqlPassdbError("passdb-sql: not a valid connection string or postgresql:// URL") from None
        if PLACEHOLDER not in query:
            raise SqlPassdbError(f"passdb-sql-query: must contain {PLACEHOLDER} where the user name goes")
        if pool_size < 1 or not timeout > 0:
            raise ValueError("pool_size must be at least 1 and timeout above 0")
        self._public = public_conninfo(conninfo)
        extra: dict[str, Any] = {}
        if password is not None:
            extra["password"] = password
        # libpq waits for ever on an address that does not answer unless told otherwise (at least 2 s).
        params.setdefault("connect_timeout", str(max(2, round(timeout))))
        # Nor would a query on a connection whose path went silent (a partition) end
        # before TCP gives up, in minutes: drop it once sent data is unacknowledged this long.
        params.setdefault("tcp_user_timeout", str(round(timeout * 1000)))
        # And a query held up by a lock on the table would hold its pool slot for ever.
        options = str(params.get("options") or "")
        if "statement_timeout" not in options:
            params["options"] = f"{options} -c statement_timeout={round(timeout * 1000)}".strip()
        params.setdefault("application_name", "pop3d")
        self._conninfo = make_conninfo(**{**params, **extra})
        self.query = query
        # As bytes: psycopg's types take a query's text only as a literal; this one is the operator's.
        self._query = query.encode()
        self.pool_size = pool_size
        self.timeout = timeout
        self._pool: ConnectionPool | None = None
        self._pool_guard = threading.Lock()
        self._closed = False
        self._limiter = trio.CapacityLimiter(pool_size)
        self._stored: collections.OrderedDict[str, tuple[str, StoredPassword]] = collections.OrderedDict()
        self._stored_guard = threading.Lock()

    def describe(self) -> str:
        """``passdb-sql:<connection string without password>``: what the admin API shows."""
        return f"passdb-sql:{self._public}"

    def __repr__(self) -> str:
        return self.describe()

    # -- start and stop -------------------------------------------------------

    def check(self) -> None:
        """Connect once and run the query (for an empty user name); blocks.

        Raises :class:`SqlPassdbError` in one line if the database cannot be
        reached or refuses the login, or if the query fails or has no
        ``password`` column.
        """
        try:
            with psycopg.connect(self._conninfo, autocommit=True) as conn, conn.cursor() as cursor:
                cursor.execute(self._query, {"user": ""})
                self._columns(cursor)
        except psycopg.Error as exc:
            raise SqlPassdbError(f"passdb-sql {self._public}: {_one_line(exc)}") from None
        except PassdbUnavailable as exc:
            raise SqlPassdbError(f"passdb-sql-query: {exc}") from None

    def close(self) -> None:
        """Close the pool's connections; blocks briefly.  Later lookups fail."""
        with self._pool_guard:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close(timeout=self.timeout)

    def __enter__(self) -> SqlPassdb:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open_pool(self) -> ConnectionPool:
        with self._pool_guard:
            if self._closed:
                raise PassdbUnavailable("passdb-sql is closed")
            if self._pool is None:
                self._pool = ConnectionPool(
                    self._conninfo,
                    min_size=1,
                    max_size=self.pool_size,
                    kwargs={"autocommit": True},
                    # An idle connection the server dropped (a restart) is
                    # replaced before a lookup uses it, not failed on.
                    check=ConnectionPool.check_connection,
                    timeout=self.timeout,
                    # Background reconnection gives up soon, so that the
                    # next lookup after an outage tries at once rather than
                    # after a back-off grown over minutes.
                    reconnect_timeout=2 * self.timeout,
                    name="pop3d-passdb",
                    open=False,
                )
                self._pool.open(wait=False)
            return self._pool

    # -- lookups --------------------------------------------------------------

    async def lookup(self, name: str) -> tuple[str | HashedPassword, str] | None:
        """``(password, mailbox)`` of user ``name``, or ``None``; :class:`PassdbUnavailable` if the database fails."""
        if not valid_user_name(name):
            return None
        # A cancel need not wait for the database: the thread keeps its
        # limiter slot until the query or the pool's timeout ends it.  The
        # whole lookup, the wait for a slot included, is bounded: while the
        # database is down, logins queue behind pool_size slow ones, and each
        # must get its [SYS/TEMP] within timeout, not after the queue.
        with trio.move_on_after(self.timeout) as waited:
            row = await trio.to_thread.run_sync(self._fetch, name, limiter=self._limiter, abandon_on_cancel=True)
        if waited.cancelled_caught:
            raise PassdbUnavailable(f"passdb-sql {self._public}: no answer within {self.timeout:g} s")
        if row is None:
            return None
        secret, mailbox = row
        if not valid_user_name(mailbox):
            log.error("passdb-sql: user %r: mailbox %r is not a valid mailbox name; no login", name, mailbox)
            return None
        stored = self._stored_password(name, secret)
        plain = stored.plain
        return (plain if plain is not None else stored, mailbox)

    def _fetch(self, name: str) -> tuple[str, str] | None:
        """``(secret, mailbox)`` of ``name`` from the database, in a worker thread."""
        try:
            with self._open_pool().connection() as conn, conn.cursor() as cursor:
                cursor.execute(self._query, {"user": name})
                password_at, mailbox_at = self._columns(cursor)
                rows = cursor.fetchmany(2)
        except psycopg.Error as exc:  # the pool's PoolTimeout too
            raise PassdbUnavailable(f"passdb-sql {self._public}: {_one_line(exc)}") from None
        if not rows:
            return None
        if len(rows) > 1:
            log.warning("passdb-sql: the query returned more than one row for user %r; no login", name)
            return None
        row = rows[0]
        secret = _text(row[password_at])
        mailbox = name if mailbox_at is None or row[mailbox_at] is None else _text(row[mailbox_at])
        return secret, mailbox

    @staticmethod
    def _columns(cursor: psycopg.Cursor[Any]) -> tuple[int, int | None]:
        """The positions of the ``password`` and (optional) ``mailbox`` columns."""
        names = [column.name.lower() for column in cursor.description or ()]
        if "password" not in names:
            raise PassdbUnavailable(f"the query returns no password column (it returns: {', '.join(names) or 'none'})")
        return names.index("password"), names.index("mailbox") if "mailbox" in names else None

    def _stored_password(self, name: str, secret: str) -> StoredPassword:
        """The parsed ``secret`` of ``name``: the same object while it is unchanged, so its verified cache lasts."""
        with self._stored_guard:
            known = self._stored.get(name)
            if known is not None and known[0] == secret:
                self._stored.move_to_end(name)
                return known[1]
        stored = parse_password(secret)
        if stored.problem is not None:
            log.warning("passdb-sql: user %r: %s, no password will match", name, stored.problem)
        with self._stored_guard:
            self._stored[name] = (secret, stored)
            self._stored.move_to_end(name)
            while len(self._stored) > _CACHE_SIZE:
                self._stored.popitem(last=False)
        return stored


def _text(value: object) -> str:
    """A column's value as text: NULL is empty (which never matches), bytes are UTF-8."""
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "surrogateescape")
    return str(value)
