"""Users from a real PostgreSQL: :class:`pop3d.sql_passdb.SqlPassdb` and ``pop3d serve`` with passdb-sql.

The module starts its own PostgreSQL (Debian's server binaries; skipped,
with the reason, where they are missing): ``initdb`` into a temporary
directory as an unprivileged user (``postgres``, else ``nobody``, when the
tests run as root), listening on a free port of 127.0.0.1 and a socket in
that directory.  It is stopped at the end whatever happens.  Clients are
``poplib`` in worker threads against servers on 127.0.0.1, port 0; every
test is bounded by ``fail_after`` or subprocess timeouts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import poplib
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import trio

import pop3d
from pop3d import replies
from pop3d.passwords import StoredPassword, hash_password

from .serve_process import AS_ROOT, ServeProcess, pop3d_cli

psycopg = pytest.importorskip("psycopg")

from pop3d.sql_passdb import DEFAULT_QUERY, PassdbUnavailable, SqlPassdb, SqlPassdbError  # noqa: E402

from .ports import free_port  # noqa: E402
from .postgres_server import BINDIR, SKIP_REASON, Postgres  # noqa: E402

READER_PASSWORD = "r3ad-only pa$$ 'quoted'"  # spaces and quotes: passed as a parameter, never pasted

MAIL = {
    "alice": [b"Subject: one\n\nfirst\n", b"Subject: two\n\nsecond\n"],
    "bob": [b"Subject: hi bob\n\nhello\n"],
    "carol": [],
    "dave": [b"Subject: d\n\nd\n"],
    "erin": [],
}


def blf_crypt(password: str) -> str:
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    return "{BLF-CRYPT}$2y$" + hashed[4:]  # as Dovecot writes it


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    if BINDIR is None:
        pytest.skip(SKIP_REASON)
    server = Postgres(BINDIR)
    try:
        server.initdb()
        server.start()
        server.sql("CREATE DATABASE mail", dbname="postgres")
        server.sql("CREATE TABLE users (username text PRIMARY KEY, password text, mailbox text)")
        # CREATE ROLE takes no bound parameter: quote the literal on the server side.
        with psycopg.connect(server.admin_dsn("mail"), autocommit=True) as conn:
            quoted = conn.execute("SELECT quote_literal(%s)", (READER_PASSWORD,)).fetchone()
            assert quoted is not None
            conn.execute(f"CREATE ROLE reader LOGIN PASSWORD {quoted[0]}".encode())
            conn.execute("GRANT SELECT ON users TO reader")
            for name, password, mailbox in [
                ("alice", hash_password("wonderland", "ARGON2ID"), "alice"),
                ("bob", "{PLAIN}builder", "bob"),
                ("carol", blf_crypt("blowfish"), "carol"),
                ("dave", hash_password("sha-sha", "SHA512-CRYPT"), "dave"),
                ("erin", "{PLAIN}no-mailbox-column", None),  # NULL: the mailbox is the user name
                ("alice@example.org", "{PLAIN}alias", "alice"),  # another login to alice's mailbox
                ("escaper", "{PLAIN}escape", "../etc"),
                ("nopass", None, "bob"),
            ]:
                conn.execute(
                    "INSERT INTO users (username, password, mailbox) VALUES (%s, %s, %s)", (name, password, mailbox)
                )
        yield server
    finally:
        server.remove()


@pytest.fixture
def maildirs(tmp_path: Path) -> Path:
    root = tmp_path / "mail"
    for user, messages in MAIL.items():
        for sub in ("cur", "new", "tmp"):
            (root / user / sub).mkdir(parents=True)
        for number, data in enumerate(messages):
            (root / user / "new" / f"17000000{number:02d}.M{number}P1.test").write_bytes(data)
    return root


def passdb(postgres: Postgres, **kwargs: Any) -> SqlPassdb:
    return SqlPassdb(postgres.dsn(), password=READER_PASSWORD, timeout=kwargs.pop("timeout", 2.0), **kwargs)


def pop_login(port: int, user: str, password: str) -> poplib.POP3:
    pop = poplib.POP3("127.0.0.1", port, timeout=10)
    pop.user(user)
    pop.pass_(password)
    return pop


def login_error(port: int, user: str, password: str) -> str:
    pop = poplib.POP3("127.0.0.1", port, timeout=10)
    try:
        pop.user(user)
        with pytest.raises(poplib.error_proto) as caught:
            pop.pass_(password)
        return caught.value.args[0].decode()
    finally:
        pop.close()


@contextlib.asynccontextmanager
async def running_server(auth: SqlPassdb, mail_root: Path) -> Any:
    server = pop3d.new()
    server.configure(
        host="127.0.0.1",
        port=0,
        apop=True,
        login_failure_delay=0,
        penalties=None,  # many failures from one address on purpose
        auth=auth,
        storage=pop3d.MaildirStorage(mail_root),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        try:
            await server.up()
            yield server
        finally:
            await server.destroy()


# -- a real server over the database ---------------------------------------------


async def test_logins_with_each_scheme(postgres: Postgres, maildirs: Path, caplog: pytest.LogCaptureFixture) -> None:
    def clients(port: int) -> None:
        for user, password in [
            ("alice", "wonderland"),  # ARGON2ID
            ("bob", "builder"),  # PLAIN
            ("carol", "blowfish"),  # BLF-CRYPT
            ("dave", "sha-sha"),  # SHA512-CRYPT
            ("erin", "no-mailbox-column"),
        ]:
            pop = pop_login(port, user, password)
            assert pop.stat()[0] == len(MAIL[user]), user
            if MAIL[user]:
                assert pop.retr(1)[1][-1] == MAIL[user][0].splitlines()[-1]
            pop.quit()
        # The mailbox column: another name for alice's mailbox.
        pop = pop_login(port, "alice@example.org", "alias")
        assert pop.stat()[0] == 2
        pop.quit()
        # APOP needs the plain password, which a {PLAIN} row gives.
        pop = poplib.POP3("127.0.0.1", port, timeout=10)
        assert pop.apop("bob", "builder").startswith(b"+OK")
        pop.quit()
        for user, password in [
            ("alice", "Wonderland"),  # wrong password
            ("mallory", "anything"),  # unknown user
            ("x'OR'1'='1", "builder"),  # the name is a bound parameter, never SQL
            ("escaper", "escape"),  # a mailbox that would leave the mail root
            ("nopass", "x"),  # NULL password: nothing matches
        ]:
            assert login_error(port, user, password).startswith("-ERR [AUTH]"), user

    with trio.fail_after(30):
        with passdb(postgres) as auth:
            async with running_server(auth, maildirs) as server:
                await trio.to_thread.run_sync(clients, server.cget("port"))
    assert "user 'escaper': mailbox '../etc' is not a valid mailbox name" in caplog.text
    assert READER_PASSWORD not in caplog.text


async def test_database_down_mid_run(postgres: Postgres, maildirs: Path) -> None:
    def scenario(port: int) -> None:
        before = pop_login(port, "alice", "wonderland")  # logged in while the database is up
        postgres.stop()
        try:
            started = time.monotonic()
            assert login_error(port, "bob", "builder") == f"-ERR {replies.SYS_TEMP}"
            assert time.monotonic() - started < 8  # the pool's timeout (2 s) and a retry, not the login timeout
            # The session logged in before goes on: its mail is not in the database.
            assert before.stat()[0] == 2
            assert before.retr(2)[1][-1] == b"second"
            before.dele(1)
            assert before.quit().startswith(b"+OK")
        finally:
            postgres.start()
        # Back: logins work again, without a restart of pop3d.
        deadline = time.monotonic() + 15
        while True:
            try:
                after = pop_login(port, "alice", "wonderland")
                break
            except poplib.error_proto as exc:
                assert b"[SYS/TEMP]" in exc.args[0] and time.monotonic() < deadline
        assert after.stat()[0] == 1  # the deletion before was applied
        after.quit()

    with trio.fail_after(45):
        with passdb(postgres, timeout=2.0) as auth:
            async with running_server(auth, maildirs) as server:
                await trio.to_thread.run_sync(scenario, server.cget("port"))


async def test_while_the_database_is_down_every_lookup_fails_within_the_timeout(postgres: Postgres) -> None:
    # Twelve at once through a pool of two: without a bound on the queue, the
    # last ones would wait for three rounds of the pool's timeout.
    postgres.stop()
    try:
        with trio.fail_after(30), passdb(postgres, timeout=1.0, pool_size=2) as auth:
            waited: list[float] = []

            async def one(name: str) -> None:
                started = trio.current_time()
                with pytest.raises(PassdbUnavailable):
                    await auth.lookup(name)
                waited.append(trio.current_time() - started)

            async with trio.open_nursery() as nursery:
                for number in range(12):
                    nursery.start_soon(one, f"user{number}")
            assert len(waited) == 12
            assert max(waited) < 1.0 + 0.5, waited
    finally:
        postgres.start()


# -- lookups ---------------------------------------------------------------------


async def test_lookups(postgres: Postgres, caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(20):
        with passdb(postgres) as auth:
            assert await auth.lookup("bob") == ("builder", "bob")  # PLAIN comes as the text (APOP)
            assert await auth.lookup("mallory") is None
            assert await auth.lookup("../bob") is None  # never asked: not a user name
            first = await auth.lookup("alice")
            assert first is not None and isinstance(first[0], StoredPassword) and first[1] == "alice"
            assert await first[0].verify("wonderland")
            # The same object while the hash is unchanged: the verified cache lasts across logins.
            again = await auth.lookup("alice")
            assert again is not None and again[0] is first[0]
            postgres.sql(
                "UPDATE users SET password = %s WHERE username = 'alice'", params=(hash_password("new", "PLAIN"),)
            )
            try:
                changed = await auth.lookup("alice")
                assert changed == ("new", "alice")
            finally:
                postgres.sql(
                    "UPDATE users SET password = %s WHERE username = 'alice'",
                    params=(hash_password("wonderland", "ARGON2ID"),),
                )
        # More than one row: nobody logs in (as Dovecot).
        with passdb(postgres, query="SELECT password, mailbox FROM users WHERE %(user)s <> ''") as everyone:
            with caplog.at_level(logging.WARNING):
                assert await everyone.lookup("bob") is None
            assert "more than one row for user 'bob'" in caplog.text
        # Columns by name, anywhere in the row; no mailbox column: the user name.
        query = "SELECT 1 AS other, upper('x') AS junk, password FROM users WHERE username = %(user)s"
        with passdb(postgres, query=query) as named:
            assert await named.lookup("bob") == ("builder", "bob")


async def test_a_closed_passdb_is_unavailable(postgres: Postgres) -> None:
    auth = passdb(postgres)
    auth.close()
    with trio.fail_after(10), pytest.raises(PassdbUnavailable):
        await auth.lookup("bob")


def test_describe_shows_no_password(postgres: Postgres) -> None:
    auth = SqlPassdb(f"postgresql://reader:{'s3cret'}@127.0.0.1:{postgres.port}/mail?sslmode=disable")
    assert auth.describe() == f"passdb-sql:user=reader dbname=mail host=127.0.0.1 port={postgres.port} sslmode=disable"
    assert "s3cret" not in repr(auth)
    with_key_values = SqlPassdb("host=db.example.org dbname=mail user=pop3d password=s3cret")
    assert with_key_values.describe() == "passdb-sql:user=pop3d dbname=mail host=db.example.org"


# -- one line at start -----------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("SELECT password, mailbox FROM nosuch WHERE username = %(user)s", 'relation "nosuch" does not exist'),
        ("SELECT password, mailbox FROM users WHERE username = %(user)s AND %(other)s", "other"),
        ("SELECT mailbox FROM users WHERE username = %(user)s", "no password column (it returns: mailbox)"),
        ("SELEC password FROM users WHERE username = %(user)s", 'syntax error at or near "SELEC"'),
    ],
)
def test_a_bad_query_is_one_line_at_check(postgres: Postgres, query: str, message: str) -> None:
    with pytest.raises(SqlPassdbError) as caught, passdb(postgres, query=query) as auth:
        auth.check()
    text = str(caught.value)
    assert message in text and "\n" not in text and READER_PASSWORD not in text


def test_start_errors_are_one_line(postgres: Postgres) -> None:
    with pytest.raises(SqlPassdbError, match=r"must contain %\(user\)s"):
        SqlPassdb(postgres.dsn(), query="SELECT password FROM users WHERE username = 'bob'")
    with pytest.raises(SqlPassdbError, match="not a valid connection string") as caught:
        SqlPassdb("host=x password s3cret")
    assert "s3cret" not in str(caught.value)
    with pytest.raises(SqlPassdbError, match="password authentication failed") as caught:
        SqlPassdb(postgres.dsn(), password="wrong-s3cret").check()
    assert "wrong-s3cret" not in str(caught.value) and "\n" not in str(caught.value)
    started = time.monotonic()
    with pytest.raises(SqlPassdbError, match="Connection refused") as caught:
        SqlPassdb(f"postgresql://reader@127.0.0.1:{free_port()}/mail", password=READER_PASSWORD).check()
    assert time.monotonic() - started < 5 and "\n" not in str(caught.value)


def test_default_query_works_as_documented(postgres: Postgres) -> None:
    assert DEFAULT_QUERY == "SELECT password, mailbox FROM users WHERE username = %(user)s"
    passdb(postgres).check()


# -- pop3d serve -----------------------------------------------------------------


def sql_settings(postgres: Postgres, tmp_path: Path, *, query: str | None = None) -> tuple[list[str], dict[str, str]]:
    """Flags (where ``pop3d serve`` has them) or ``POP3D_*`` variables for passdb-sql."""
    from pop3d.cli import setting_flags

    password_file = tmp_path / "pg-password"
    password_file.write_text(READER_PASSWORD + "\n")
    values = {"passdb_sql": postgres.dsn(), "passdb_sql_password_file": str(password_file)}
    if query is not None:
        values["passdb_sql_query"] = query
    flags = setting_flags()
    args = [item for name, value in values.items() if name in flags for item in (flags[name], value)]
    env = {f"POP3D_{name.upper()}": value for name, value in values.items() if name not in flags}
    return args, env


def test_serve_with_passdb_sql(postgres: Postgres, maildirs: Path, tmp_path: Path) -> None:
    args, env = sql_settings(postgres, tmp_path)
    base = ["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--mail-root", str(maildirs)]
    with ServeProcess(*base, *args, env=env) as proc:
        proc.wait_ready()
        pop = pop_login(proc.port, "dave", "sha-sha")
        assert pop.stat()[0] == 1
        pop.quit()
        # The admin API shows the callback, without the password.
        with urllib.request.urlopen(f"{proc.admin}/servers/pop3/config/auth", timeout=10) as response:
            shown = json.load(response)
        assert shown["value"] == f"passdb-sql:user=reader dbname=mail host=127.0.0.1 port={postgres.port}"
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0


def test_serve_refuses_a_bad_query_in_one_line(postgres: Postgres, maildirs: Path, tmp_path: Path) -> None:
    args, env = sql_settings(postgres, tmp_path, query="SELECT pw FROM accounts WHERE name = %(user)s")
    with ServeProcess("--listen", "127.0.0.1:0", "--mail-root", str(maildirs), "--no-admin", *args, env=env) as proc:
        assert proc.wait(30) == 2
    errors = [line for line in proc.lines if "error" in line]
    assert errors == [
        f"pop3d: error: passdb-sql user=reader dbname=mail host=127.0.0.1 port={postgres.port}: "
        'relation "accounts" does not exist'
    ]


def test_check_config_settings(postgres: Postgres, maildirs: Path, tmp_path: Path) -> None:
    args, env = sql_settings(postgres, tmp_path)
    result = pop3d_cli("check-config", "--mail-root", str(maildirs), *args, env=env)
    assert result.returncode == 0, result.stderr
    assert f'passdb-sql = "user=reader dbname=mail host=127.0.0.1 port={postgres.port}"' in result.stdout
    assert READER_PASSWORD not in result.stdout
    # Not both sources of users; not without a mail root.
    users = tmp_path / "users"
    users.write_text("bob:{PLAIN}builder\n")
    both = pop3d_cli("check-config", "--mail-root", str(maildirs), "--users", str(users), *args, env=env)
    assert both.returncode == 2
    assert both.stderr == "pop3d: error: users and passdb-sql: give one or the other\n"
    rootless = pop3d_cli("check-config", *args, env=env)
    assert rootless.stderr == "pop3d: error: passdb-sql: needs mail-root\n"
    # The database down at start: one line, at once.
    down = {**env, **AS_ROOT}
    unreachable = f"postgresql://reader@127.0.0.1:{free_port()}/mail"
    if "POP3D_PASSDB_SQL" in down:
        down["POP3D_PASSDB_SQL"] = unreachable
        result = pop3d_cli("check-config", "--no-admin", "--mail-root", str(maildirs), env=down)
    else:
        result = pop3d_cli(
            "check-config",
            "--no-admin",
            "--mail-root",
            str(maildirs),
            *[unreachable if a == postgres.dsn() else a for a in args],
            env=AS_ROOT,
        )
    assert result.returncode == 2
    assert result.stderr.startswith("pop3d: error: passdb-sql user=reader") and "Connection refused" in result.stderr
    assert result.stderr.count("\n") == 1


# -- deploy/cluster's database ---------------------------------------------------------


CLUSTER = Path(__file__).resolve().parent.parent / "deploy" / "cluster"


def run_cluster_init_sql(postgres: Postgres, tmp_path: Path) -> str:
    """``deploy/cluster/postgres/init.sql`` into a new database, as the postgres image runs it; its DSN."""
    secret = tmp_path / "pop3d-db-password"
    secret.write_text((CLUSTER / "secrets" / "pop3d-db-password").read_text())
    postgres.sql("CREATE DATABASE cluster", dbname="postgres")
    psql = [str(postgres.bindir / "psql"), "-v", "ON_ERROR_STOP=1", "--no-password", "-f", "-"]
    result = subprocess.run(
        [*psql, "-h", str(postgres.dir), "-p", str(postgres.port), "-U", "admin", "-d", "cluster"],
        input=(CLUSTER / "postgres" / "init.sql").read_text().replace("/run/secrets/pop3d-db-password", str(secret)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return f"postgresql://pop3d@127.0.0.1:{postgres.port}/cluster"


async def test_the_cluster_init_sql_gives_a_demo_user(postgres: Postgres, tmp_path: Path) -> None:
    dsn = run_cluster_init_sql(postgres, tmp_path)
    password = (tmp_path / "pop3d-db-password").read_text().strip()
    with trio.fail_after(20), SqlPassdb(dsn, password=password, timeout=2) as auth:
        await trio.to_thread.run_sync(auth.check)
        entry = await auth.lookup("demo")
        assert entry is not None and entry[1] == "demo"
        assert isinstance(entry[0], StoredPassword) and entry[0].scheme == "ARGON2ID"
        assert await entry[0].verify("demo")
