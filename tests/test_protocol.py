"""The protocol engine, with plain function calls: no I/O, no event loop.

Each case is a client transcript and the exact bytes the server must send.
Every case runs twice: the input fed whole, and fed one byte at a time.  A
tiny synchronous driver answers the engine's events from a fixed mailbox.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from pop3d import replies
from pop3d.credentials import Password
from pop3d.message import canonical_size
from pop3d.protocol import (
    NEED_DATA,
    OUTGOING_LIMIT,
    PAUSED,
    TRANSITIONS,
    Authenticate,
    Closed,
    ListUids,
    LoginFailure,
    LoginRejected,
    POP3Connection,
    Retrieve,
    StartTLS,
    State,
    Trigger,
    Update,
    apop_digest,
    valid_uid,
)

CHALLENGE = "<1234.5678@test>"
PASSWORD = "s3cret pass"  # a space, as RFC 1939 allows
MESSAGES = [
    b"Subject: one\n\nfirst body\n",
    b"Subject: two\r\n\r\n.dot line\r\nline 2\r\nline 3\r\n",
    b"Subject: three\n\nno final newline",
]
SIZES = [canonical_size(m) for m in MESSAGES]
UIDS = {1: "uid-one", 2: "uid-two", 3: "uid-three"}
IMPLEMENTATION = "pop3d-test"
# CAPA of a plain connection where passwords may be sent (the engine's defaults).
CAPABILITIES = [
    "TOP",
    "UIDL",
    "USER",
    "SASL PLAIN LOGIN",
    "RESP-CODES",
    "PIPELINING",
    "AUTH-RESP-CODE",
    "EXPIRE NEVER",
    f"IMPLEMENTATION {IMPLEMENTATION}",
]


@dataclass
class Driver:
    """Answers events like the Trio layer would, from MESSAGES, synchronously."""

    conn: POP3Connection
    locked: bool = False
    lock_free: bool = True
    storage_fails: bool = False
    deleted: list[int] = field(default_factory=list)
    events: list[object] = field(default_factory=list)
    closed: bool = False

    def pump(self) -> bytes:
        out = b""
        while True:
            event = self.conn.next_event()
            out += self.conn.data_to_send()
            if event is NEED_DATA:
                return out
            if event is PAUSED:
                continue
            self.events.append(event)
            if isinstance(event, Closed):
                self.closed = True
                return out
            if isinstance(event, StartTLS):
                self.conn.tls_started()  # as if the handshake succeeded
            elif self.storage_fails and not isinstance(event, Authenticate):
                self.conn.command_failed(event)
            elif isinstance(event, Authenticate):
                self._authenticate(event)
            elif isinstance(event, LoginRejected):
                self.conn.login_failed(LoginFailure.BAD_CREDENTIALS)
            elif isinstance(event, Retrieve):
                self.conn.start_message(event)
                self.conn.message_data(MESSAGES[event.msg - 1])
                self.conn.end_message()
                out += self.conn.data_to_send()
            elif isinstance(event, ListUids):
                self.conn.send_uids(event, UIDS)
            elif isinstance(event, Update):
                self.deleted = list(event.deleted)
                self.conn.update_finished(True)

    def _authenticate(self, event: Authenticate) -> None:
        if event.user != "alice" or not event.credentials.matches(PASSWORD):
            self.conn.login_failed(LoginFailure.BAD_CREDENTIALS)
        elif not self.lock_free:
            self.conn.login_failed(LoginFailure.IN_USE)
        else:
            self.locked = True
            self.conn.login_succeeded(SIZES)


def new_conn(connection_class: type[POP3Connection] = POP3Connection, **kwargs: Any) -> POP3Connection:
    """An engine; unless told otherwise, the client may send passwords (a trusted network)."""
    kwargs.setdefault("cleartext_allowed", True)
    return connection_class(challenge=CHALLENGE, implementation=IMPLEMENTATION, **kwargs)


def run(
    data: bytes | list[bytes], *, bytewise: bool, conn_args: dict[str, Any] | None = None, **driver_args: bool
) -> tuple[bytes, Driver]:
    """Feed ``data`` (or each of its packets in turn) whole or byte by byte; what was sent."""
    driver = Driver(new_conn(**(conn_args or {})), **driver_args)
    out = b""
    packets = [data] if isinstance(data, bytes) else data
    whole = b"".join(packets)
    chunks = [whole[i : i + 1] for i in range(len(whole))] if bytewise else packets
    for chunk in chunks:
        driver.conn.receive_data(chunk)
        out += driver.pump()
    return out, driver


def ok(text: str = "") -> bytes:
    return replies.ok(text)


def err(text: str) -> bytes:
    return replies.err(text)


LOGIN = b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\n"
LOGGED_IN = ok(replies.USER_ACCEPTED) + ok(replies.LOGGED_IN.format(count=3, octets=sum(SIZES)))
CAPA_REPLY = ok(replies.CAPA) + b"".join(c.encode() + b"\r\n" for c in CAPABILITIES) + b".\r\n"
LIST_ALL = (
    ok(replies.LIST_ALL.format(count=3, octets=sum(SIZES)))
    + b"".join(b"%d %d\r\n" % (n, s) for n, s in enumerate(SIZES, 1))
    + b".\r\n"
)


def bad_args(command: str) -> bytes:
    return err(replies.BAD_ARGUMENTS.format(usage=replies.USAGE[command]))


CASES: list[tuple[str, bytes, bytes]] = [
    # --- AUTHORIZATION ---
    ("user-pass", LOGIN, LOGGED_IN),
    ("lowercase keywords", b"user alice\r\npass " + PASSWORD.encode() + b"\r\n", LOGGED_IN),
    ("bare LF line ends", b"USER alice\nPASS " + PASSWORD.encode() + b"\n", LOGGED_IN),
    (
        "wrong password",
        b"USER alice\r\nPASS nope\r\n",
        ok(replies.USER_ACCEPTED) + err(replies.AUTH_FAILED),
    ),
    (
        "unknown user looks like a wrong password",
        b"USER bob\r\nPASS " + PASSWORD.encode() + b"\r\n",
        ok(replies.USER_ACCEPTED) + err(replies.AUTH_FAILED),
    ),
    ("PASS without USER", b"PASS x\r\n", err(replies.PASS_WITHOUT_USER)),
    (
        "PASS after failed PASS needs USER again",
        b"USER alice\r\nPASS x\r\nPASS " + PASSWORD.encode() + b"\r\n",
        ok(replies.USER_ACCEPTED) + err(replies.AUTH_FAILED) + err(replies.PASS_WITHOUT_USER),
    ),
    ("USER without name", b"USER\r\n", bad_args("USER")),
    ("USER with two names", b"USER a b\r\n", bad_args("USER")),
    ("PASS without password", b"USER alice\r\nPASS\r\n", ok(replies.USER_ACCEPTED) + bad_args("PASS")),
    (
        "APOP",
        b"APOP alice " + apop_digest(CHALLENGE, PASSWORD).encode() + b"\r\n",
        ok(replies.LOGGED_IN.format(count=3, octets=sum(SIZES))),
    ),
    (
        "APOP digest in upper case",
        b"APOP alice " + apop_digest(CHALLENGE, PASSWORD).upper().encode() + b"\r\n",
        ok(replies.LOGGED_IN.format(count=3, octets=sum(SIZES))),
    ),
    ("APOP wrong digest", b"APOP alice " + b"0" * 32 + b"\r\n", err(replies.AUTH_FAILED)),
    ("APOP missing digest", b"APOP alice\r\n", bad_args("APOP")),
    (
        "USER after APOP refused",
        b"APOP alice " + b"0" * 32 + b"\r\nUSER alice\r\n",
        err(replies.AUTH_FAILED) + err(replies.MECHANISM_APOP_CHOSEN),
    ),
    (
        "APOP after USER refused",
        b"USER alice\r\nAPOP alice " + b"0" * 32 + b"\r\n",
        ok(replies.USER_ACCEPTED) + err(replies.MECHANISM_USER_CHOSEN),
    ),
    ("CAPA before login", b"CAPA\r\n", CAPA_REPLY),
    ("CAPA with argument", b"CAPA x\r\n", bad_args("CAPA")),
    ("QUIT before login", b"QUIT\r\n", ok(replies.QUIT_AUTHORIZATION)),
    ("unknown command", b"HELO x\r\n", err(replies.UNKNOWN_COMMAND.format(command="HELO"))),
    ("empty line", b"\r\n", err(replies.UNKNOWN_COMMAND.format(command=""))),
    (
        "unknown command is echoed safely",
        b"H\x01\xffLO\r\n",
        err(replies.UNKNOWN_COMMAND.format(command="H??LO")),
    ),
    # Keywords are ASCII and arguments are separated by spaces only.
    (
        "a long s is not an s, a dotless i not an i",
        "\u017ftat\r\nqu\u0131t\r\n".encode(),
        err(replies.UNKNOWN_COMMAND.format(command="?tat")) + err(replies.UNKNOWN_COMMAND.format(command="qu?t")),
    ),
    ("a tab does not separate", b"USER\talice\r\n", err(replies.UNKNOWN_COMMAND.format(command="USER?ALICE"))),
    (
        "a no-break space is part of the argument",
        LOGIN + "LIST\u00a02\r\nLIST 2\u00a0\r\n".encode(),
        LOGGED_IN + err(replies.UNKNOWN_COMMAND.format(command="LIST?2")) + bad_args("LIST"),
    ),
    ("several spaces still separate", LOGIN + b"LIST  2\r\n", LOGGED_IN + ok(f"2 {SIZES[1]}")),
    *[
        (f"{cmd} before login", f"{cmd}\r\n".encode(), err(replies.NOT_AUTHENTICATED))
        for cmd in ("STAT", "LIST", "RETR 1", "DELE 1", "NOOP", "RSET", "TOP 1 1", "UIDL")
    ],
    # --- TRANSACTION ---
    *[
        (f"{cmd} after login", LOGIN + f"{cmd}\r\n".encode(), LOGGED_IN + err(replies.ALREADY_AUTHENTICATED))
        for cmd in ("USER alice", "PASS x", "APOP alice 0123")
    ],
    ("STAT", LOGIN + b"STAT\r\n", LOGGED_IN + ok(replies.STAT.format(count=3, octets=sum(SIZES)))),
    ("STAT with argument", LOGIN + b"STAT 1\r\n", LOGGED_IN + bad_args("STAT")),
    ("LIST", LOGIN + b"LIST\r\n", LOGGED_IN + LIST_ALL),
    ("LIST n", LOGIN + b"LIST 2\r\n", LOGGED_IN + ok(f"2 {SIZES[1]}")),
    ("LIST out of range", LOGIN + b"LIST 4\r\n", LOGGED_IN + err(replies.NO_SUCH_MESSAGE)),
    ("LIST 0", LOGIN + b"LIST 0\r\n", LOGGED_IN + bad_args("LIST")),
    ("LIST abc", LOGIN + b"LIST abc\r\n", LOGGED_IN + bad_args("LIST")),
    ("LIST -1", LOGIN + b"LIST -1\r\n", LOGGED_IN + bad_args("LIST")),
    ("LIST two args", LOGIN + b"LIST 1 2\r\n", LOGGED_IN + bad_args("LIST")),
    ("LIST huge number", LOGIN + b"LIST 99999999999999999999\r\n", LOGGED_IN + bad_args("LIST")),
    (
        "RETR",
        LOGIN + b"RETR 1\r\n",
        LOGGED_IN + ok(f"{SIZES[0]} octets") + b"Subject: one\r\n\r\nfirst body\r\n.\r\n",
    ),
    (
        "RETR dot-stuffs and keeps CRLF",
        LOGIN + b"RETR 2\r\n",
        LOGGED_IN + ok(f"{SIZES[1]} octets") + b"Subject: two\r\n\r\n..dot line\r\nline 2\r\nline 3\r\n.\r\n",
    ),
    (
        "RETR adds the missing final CRLF",
        LOGIN + b"RETR 3\r\n",
        LOGGED_IN + ok(f"{SIZES[2]} octets") + b"Subject: three\r\n\r\nno final newline\r\n.\r\n",
    ),
    ("RETR 0", LOGIN + b"RETR 0\r\n", LOGGED_IN + bad_args("RETR")),
    ("RETR -1", LOGIN + b"RETR -1\r\n", LOGGED_IN + bad_args("RETR")),
    ("bare RETR", LOGIN + b"RETR\r\n", LOGGED_IN + bad_args("RETR")),
    ("RETR out of range", LOGIN + b"RETR 9\r\n", LOGGED_IN + err(replies.NO_SUCH_MESSAGE)),
    (
        "TOP n 0: headers and blank line",
        LOGIN + b"TOP 2 0\r\n",
        LOGGED_IN + ok(replies.TOP) + b"Subject: two\r\n\r\n.\r\n",
    ),
    (
        "TOP n 2: exactly two body lines",
        LOGIN + b"TOP 2 2\r\n",
        LOGGED_IN + ok(replies.TOP) + b"Subject: two\r\n\r\n..dot line\r\nline 2\r\n.\r\n",
    ),
    (
        "TOP beyond the end",
        LOGIN + b"TOP 2 10\r\n",
        LOGGED_IN + ok(replies.TOP) + b"Subject: two\r\n\r\n..dot line\r\nline 2\r\nline 3\r\n.\r\n",
    ),
    ("TOP without lines", LOGIN + b"TOP 1\r\n", LOGGED_IN + bad_args("TOP")),
    ("TOP negative lines", LOGIN + b"TOP 1 -1\r\n", LOGGED_IN + bad_args("TOP")),
    (
        "DELE hides a message from STAT, LIST, RETR, TOP, UIDL",
        LOGIN + b"DELE 2\r\nSTAT\r\nLIST\r\nLIST 2\r\nRETR 2\r\nTOP 2 0\r\nUIDL\r\nUIDL 2\r\nDELE 2\r\n",
        LOGGED_IN
        + ok(replies.DELE.format(msg=2))
        + ok(replies.STAT.format(count=2, octets=SIZES[0] + SIZES[2]))
        + ok(replies.LIST_ALL.format(count=2, octets=SIZES[0] + SIZES[2]))
        + b"1 %d\r\n3 %d\r\n.\r\n" % (SIZES[0], SIZES[2])
        + err(replies.MESSAGE_DELETED.format(msg=2)) * 3
        + ok(replies.UIDL_ALL)
        + b"1 uid-one\r\n3 uid-three\r\n.\r\n"
        + err(replies.MESSAGE_DELETED.format(msg=2)) * 2,
    ),
    (
        "three DELEs",
        LOGIN + b"DELE 1\r\nDELE 2\r\nDELE 3\r\nSTAT\r\n",
        LOGGED_IN
        + b"".join(ok(replies.DELE.format(msg=n)) for n in (1, 2, 3))
        + ok(replies.STAT.format(count=0, octets=0)),
    ),
    (
        "RSET unmarks",
        LOGIN + b"DELE 1\r\nDELE 3\r\nRSET\r\nSTAT\r\n",
        LOGGED_IN
        + ok(replies.DELE.format(msg=1))
        + ok(replies.DELE.format(msg=3))
        + ok(replies.RSET.format(count=3, octets=sum(SIZES)))
        + ok(replies.STAT.format(count=3, octets=sum(SIZES))),
    ),
    ("NOOP", LOGIN + b"NOOP\r\n", LOGGED_IN + ok()),
    (
        "UIDL",
        LOGIN + b"UIDL\r\n",
        LOGGED_IN + ok(replies.UIDL_ALL) + b"1 uid-one\r\n2 uid-two\r\n3 uid-three\r\n.\r\n",
    ),
    ("UIDL n", LOGIN + b"UIDL 3\r\n", LOGGED_IN + ok("3 uid-three")),
    ("UIDL out of range", LOGIN + b"UIDL 4\r\n", LOGGED_IN + err(replies.NO_SUCH_MESSAGE)),
    ("CAPA after login", LOGIN + b"CAPA\r\n", LOGGED_IN + CAPA_REPLY),
    (
        "QUIT applies deletions",
        LOGIN + b"DELE 1\r\nQUIT\r\n",
        LOGGED_IN + ok(replies.DELE.format(msg=1)) + ok(replies.QUIT_UPDATE.format(count=2)),
    ),
    # --- pipelining and the end of the session ---
    (
        "pipelined commands answered in order",
        LOGIN + b"STAT\r\nLIST 1\r\nNOOP\r\nBOGUS\r\nUIDL 1\r\n",
        LOGGED_IN
        + ok(replies.STAT.format(count=3, octets=sum(SIZES)))
        + ok(f"1 {SIZES[0]}")
        + ok()
        + err(replies.UNKNOWN_COMMAND.format(command="BOGUS"))
        + ok("1 uid-one"),
    ),
    (
        "nothing after QUIT is executed",
        LOGIN + b"QUIT\r\nDELE 1\r\nSTAT\r\n",
        LOGGED_IN + ok(replies.QUIT_UPDATE.format(count=3)),
    ),
    ("nothing after QUIT before login", b"QUIT\r\nUSER alice\r\n", ok(replies.QUIT_AUTHORIZATION)),
    # --- long lines ---
    (
        "line too long, then resynchronised",
        b"USER " + b"x" * 5000 + b"\r\nNOOP\r\nCAPA\r\n",
        err(replies.LINE_TOO_LONG.format(limit=1024)) + err(replies.NOT_AUTHENTICATED) + CAPA_REPLY,
    ),
    (
        "line at the limit is accepted",
        b"USER " + b"x" * (1024 - 7) + b"\r\n",
        ok(replies.USER_ACCEPTED),
    ),
    (
        "line one over the limit is refused",
        b"USER " + b"x" * (1024 - 6) + b"\r\nQUIT\r\n",
        err(replies.LINE_TOO_LONG.format(limit=1024)) + ok(replies.QUIT_AUTHORIZATION),
    ),
]


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize(("data", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_transcript(data: bytes, expected: bytes, bytewise: bool) -> None:
    out, _ = run(data, bytewise=bytewise)
    assert out == expected


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_quit_reports_marked_messages_once(bytewise: bool) -> None:
    out, driver = run(LOGIN + b"DELE 3\r\nDELE 1\r\nRSET\r\nDELE 2\r\nDELE 1\r\nQUIT\r\n", bytewise=bytewise)
    assert driver.deleted == [1, 2]
    assert out.endswith(ok(replies.QUIT_UPDATE.format(count=1)))
    assert driver.closed
    assert driver.conn.state is State.CLOSED


def test_rset_then_quit_deletes_nothing() -> None:
    _, driver = run(LOGIN + b"DELE 1\r\nRSET\r\nQUIT\r\n", bytewise=False)
    updates = [e for e in driver.events if isinstance(e, Update)]
    assert updates == [Update(deleted=())]


def test_maildrop_locked_keeps_authorization() -> None:
    out, driver = run(LOGIN + b"STAT\r\n", bytewise=False, lock_free=False)
    assert out == ok(replies.USER_ACCEPTED) + err(replies.MAILDROP_LOCKED) + err(replies.NOT_AUTHENTICATED)
    assert driver.conn.state is State.AUTHORIZATION
    assert b"[IN-USE]" in out


def test_too_many_failed_logins_close_the_session() -> None:
    out, driver = run(b"USER a\r\nPASS x\r\n" * 3 + b"CAPA\r\n", bytewise=False)
    assert out.endswith(err(replies.AUTH_TOO_MANY))
    assert out.count(b"[AUTH]") == 3
    assert driver.closed and b"capability" not in out


def test_storage_failure_answers_sys_temp_and_goes_on() -> None:
    out, driver = run(LOGIN + b"RETR 1\r\nUIDL\r\nSTAT\r\n", bytewise=False, storage_fails=True)
    assert out == LOGGED_IN + err(replies.SYS_TEMP) * 2 + ok(replies.STAT.format(count=3, octets=sum(SIZES)))
    assert driver.conn.state is State.TRANSACTION


def test_update_failure_answers_sys_temp_and_ends() -> None:
    out, driver = run(LOGIN + b"DELE 1\r\nQUIT\r\n", bytewise=False, storage_fails=True)
    assert out.endswith(err(replies.SYS_TEMP_UPDATE))
    assert b"-ERR [SYS/TEMP]" in out
    assert driver.closed


def test_discarding_does_not_buffer_the_excess() -> None:
    conn = new_conn()
    for _ in range(100):
        conn.receive_data(b"x" * 10000)
        assert conn.next_event() is NEED_DATA
        assert len(conn._buffer) <= conn.max_line + 10000
    assert conn.data_to_send() == err(replies.LINE_TOO_LONG.format(limit=1024))  # said once
    conn.receive_data(b"tail\r\nQUIT\r\n")
    assert isinstance(conn.next_event(), Closed)
    assert conn.data_to_send() == ok(replies.QUIT_AUTHORIZATION)


def test_configurable_line_limit() -> None:
    conn = new_conn(max_line=300)
    conn.receive_data(b"USER " + b"y" * 300 + b"\r\n")
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == err(replies.LINE_TOO_LONG.format(limit=300))


def test_answering_the_wrong_event_is_an_error() -> None:
    conn = new_conn()
    conn.receive_data(b"USER alice\r\nPASS x\r\n")
    event = conn.next_event()
    assert isinstance(event, Authenticate)
    with pytest.raises(RuntimeError):
        conn.next_event()
    with pytest.raises(RuntimeError):
        conn.update_finished(True)
    conn.login_failed(LoginFailure.BAD_CREDENTIALS)
    assert conn.next_event() is NEED_DATA


def test_password_with_spaces_and_the_event_fields() -> None:
    conn = new_conn()
    conn.receive_data(b"USER alice\r\nPASS  two  spaces \r\n")
    event = conn.next_event()
    assert event == Authenticate(mechanism="user", credentials=Password(user="alice", secret=" two  spaces "))
    assert isinstance(event, Authenticate) and event.user == "alice"


def test_uids_are_checked() -> None:
    conn = new_conn()
    conn.receive_data(LOGIN + b"UIDL\r\n")
    event = conn.next_event()
    assert isinstance(event, Authenticate)
    conn.login_succeeded([1])
    event = conn.next_event()
    assert isinstance(event, ListUids)
    with pytest.raises(ValueError):
        conn.send_uids(event, {1: "has space"})
    conn.command_failed(event)  # the event is still pending, so this answers it
    assert conn.data_to_send().endswith(err(replies.SYS_TEMP))
    assert conn.next_event() is NEED_DATA


@pytest.mark.parametrize(
    ("uid", "valid"),
    [("a", True), ("x" * 70, True), ("x" * 71, False), ("", False), ("a b", False), ("\x7f", False), ("é", False)],
)
def test_valid_uid(uid: str, valid: bool) -> None:
    assert valid_uid(uid) is valid


def test_apop_digest_matches_rfc_1939_example() -> None:
    # RFC 1939 section 7: the example timestamp and secret.
    digest = apop_digest("<1896.697170952@dbc.mtview.ca.us>", "tanstaaf")
    assert digest == "c4c9334bac560ecc979e58001b3e22fb"


def test_greeting_carries_the_challenge() -> None:
    conn = new_conn()
    greeting = conn.greeting("mail.example")
    assert greeting.startswith(b"+OK ") and greeting.endswith(CHALLENGE.encode() + b"\r\n")


def test_server_close_sends_reply_and_stops() -> None:
    conn = new_conn()
    conn.close(replies.IDLE_TIMEOUT)
    assert conn.data_to_send() == err(replies.IDLE_TIMEOUT)
    conn.receive_data(b"CAPA\r\n")
    assert isinstance(conn.next_event(), Closed)
    assert conn.data_to_send() == b""


def retrieving(command: bytes) -> tuple[POP3Connection, Retrieve]:
    conn = new_conn()
    conn.receive_data(b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\n")
    assert isinstance(conn.next_event(), Authenticate)
    conn.login_succeeded([10, 20])
    conn.receive_data(command)
    event = conn.next_event()
    assert isinstance(event, Retrieve)
    conn.data_to_send()
    return conn, event


def test_message_in_progress_is_framed_by_the_engine() -> None:
    conn, event = retrieving(b"RETR 1\r\n")
    conn.start_message(event)
    assert conn.message_in_progress
    assert conn.message_data(b"a\n.b") is True
    assert conn.message_data(b"\n") is True
    conn.end_message()
    assert not conn.message_in_progress
    assert conn.data_to_send() == ok(replies.RETR.format(octets=10)) + b"a\r\n..b\r\n.\r\n"
    with pytest.raises(RuntimeError):
        conn.message_data(b"more")
    with pytest.raises(RuntimeError):
        conn.end_message()


def test_top_says_when_it_has_all_it_needs() -> None:
    conn, event = retrieving(b"TOP 1 0\r\n")
    conn.start_message(event)
    assert conn.message_data(b"Subject: x\n\nbody\n") is False
    conn.end_message()
    assert conn.data_to_send() == ok(replies.TOP) + b"Subject: x\r\n\r\n.\r\n"


def test_close_inside_a_message_sends_nothing() -> None:
    conn, event = retrieving(b"RETR 1\r\n")
    conn.start_message(event)
    conn.message_data(b"half of it")
    conn.close(replies.SYS_TEMP)  # a kick or a crash halfway: any -ERR would read as message text
    assert conn.data_to_send() == b""
    assert conn.state is State.CLOSED
    assert not conn.message_in_progress


def test_nothing_follows_an_interrupted_reply() -> None:
    conn = new_conn()
    conn.receive_data(b"CAPA\r\n")
    assert conn.next_event() is NEED_DATA
    assert conn.bytes_pending > 0
    conn.data_to_send()
    conn.output_interrupted()  # the caller sent only part of it
    conn.close(replies.IDLE_TIMEOUT)
    assert conn.data_to_send() == b""
    assert conn.bytes_pending == 0


def test_apop_disabled() -> None:
    conn = new_conn(apop=False)
    assert conn.greeting("mail.example") == ok(replies.GREETING_NO_APOP.format(host="mail.example"))
    conn.receive_data(b"APOP alice " + apop_digest(CHALLENGE, PASSWORD).encode() + b"\r\nUSER alice\r\n")
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == err(replies.APOP_DISABLED) + ok(replies.USER_ACCEPTED)


def test_pipelining_faster_than_reading_pauses_for_back_pressure() -> None:
    conn = new_conn()
    conn.receive_data(b"CAPA\r\n" * 5000)
    chunks = []
    while (event := conn.next_event()) is not NEED_DATA:
        assert event is PAUSED
        chunks.append(conn.data_to_send())
    chunks.append(conn.data_to_send())
    assert b"".join(chunks) == CAPA_REPLY * 5000
    assert len(chunks) > 2
    assert max(map(len, chunks)) < OUTGOING_LIMIT + len(CAPA_REPLY)


def test_passwords_stay_out_of_reprs() -> None:
    event = Authenticate(mechanism="user", credentials=Password(user="alice", secret="hunter2"))
    assert "hunter2" not in repr(event)
    assert "alice" in repr(event)


def test_transition_table_is_the_state_machine() -> None:
    # Every live state can be closed, CLOSED leads nowhere, and every state is reachable.
    for state in (State.AUTHORIZATION, State.TRANSACTION, State.UPDATE):
        assert TRANSITIONS[state, Trigger.CLOSE] is State.CLOSED
    assert not [key for key in TRANSITIONS if key[0] is State.CLOSED]
    reached = {State.AUTHORIZATION} | set(TRANSITIONS.values())
    assert reached == set(State)


@pytest.mark.parametrize(
    ("data", "states"),
    [
        (LOGIN + b"QUIT\r\n", [State.AUTHORIZATION, State.TRANSACTION, State.UPDATE, State.CLOSED]),
        (b"QUIT\r\n", [State.AUTHORIZATION, State.CLOSED]),
        (b"USER a\r\nPASS x\r\n" * 3, [State.AUTHORIZATION, State.CLOSED]),
    ],
)
def test_the_engine_moves_only_along_the_table(data: bytes, states: list[State]) -> None:
    seen: list[State] = []

    class Watched(POP3Connection):
        __slots__ = ()

        def _move(self, trigger: Trigger) -> None:
            before = self.state
            super()._move(trigger)
            assert TRANSITIONS[before, trigger] is self.state
            seen.append(self.state)

    _, driver = run(data, bytewise=False, conn_args={"connection_class": Watched})
    assert [State.AUTHORIZATION, *seen] == states
    assert driver.conn.state is states[-1]
