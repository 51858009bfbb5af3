"""The engine's STLS (RFC 2595), its cleartext rule and AUTH (RFC 5034): no I/O.

Like ``test_protocol``, each case is a client transcript and the exact bytes
the server must send, fed whole and one byte at a time.  The driver answers
STLS as if the handshake succeeded.  What only makes sense for bytes that
arrive in one packet (the injection after STLS) has tests of its own.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest

from pop3d import replies
from pop3d.credentials import Password
from pop3d.protocol import MAX_SASL_LINE, NEED_DATA, Authenticate, Closed, LoginFailure, LoginRejected, StartTLS, State
from pop3d.sasl import Login, Plain, SaslError

from .test_protocol import CAPABILITIES, LOGGED_IN, LOGIN, PASSWORD, SIZES, bad_args, err, new_conn, ok, run

WELCOME = ok(replies.LOGGED_IN.format(count=3, octets=sum(SIZES)))  # +OK logged in, without USER's reply
STLS_OK = ok(replies.STLS_BEGIN)
USE_STLS = err(replies.CLEARTEXT_USE_STLS)
NO_TLS = err(replies.CLEARTEXT_NO_TLS)

# Where a client stands: TLS on offer or not, trusted with cleartext or not.
UNTRUSTED_STLS = {"tls_available": True, "cleartext_allowed": False}
UNTRUSTED_NO_TLS = {"tls_available": False, "cleartext_allowed": False}
TRUSTED_STLS = {"tls_available": True, "cleartext_allowed": True}
POP3S = {"tls_available": True, "encrypted": True, "cleartext_allowed": False}


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def plain(authzid: str, user: str, password: str) -> bytes:
    return b64(f"{authzid}\0{user}\0{password}".encode())


PLAIN_IR = b"AUTH PLAIN " + plain("", "alice", PASSWORD) + b"\r\n"
EMPTY_CHALLENGE = replies.challenge("")
USERNAME = replies.challenge(base64.b64encode(replies.SASL_LOGIN_USER.encode()).decode())
PASSWORD_PROMPT = replies.challenge(base64.b64encode(replies.SASL_LOGIN_PASSWORD.encode()).decode())


def capa(*lines: str) -> bytes:
    return ok(replies.CAPA) + b"".join(line.encode() + b"\r\n" for line in lines) + b".\r\n"


TAIL = ["RESP-CODES", "PIPELINING", "AUTH-RESP-CODE", "EXPIRE NEVER", "IMPLEMENTATION pop3d-test"]


def rejected(reason: str) -> bytes:
    return err(replies.AUTH_REJECTED.format(reason=reason))


# A list of packets: the client sends the next one once the last is answered
# (after STLS: once the handshake is done).
CASES: list[tuple[str, dict[str, Any], bytes | list[bytes], bytes]] = [
    # --- CAPA follows TLS and the cleartext rule ---
    (
        "CAPA, trusted, STLS on offer",
        TRUSTED_STLS,
        b"CAPA\r\n",
        capa("TOP", "UIDL", "STLS", "USER", "SASL PLAIN LOGIN", *TAIL),
    ),
    ("CAPA, untrusted, before STLS", UNTRUSTED_STLS, b"CAPA\r\n", capa("TOP", "UIDL", "STLS", *TAIL)),
    ("CAPA, untrusted, no TLS at all", UNTRUSTED_NO_TLS, b"CAPA\r\n", capa("TOP", "UIDL", *TAIL)),
    (
        "CAPA, untrusted, after STLS",
        UNTRUSTED_STLS,
        [b"STLS\r\n", b"CAPA\r\n"],
        STLS_OK + capa("TOP", "UIDL", "USER", "SASL PLAIN LOGIN", *TAIL),
    ),
    ("CAPA on POP3S", POP3S, b"CAPA\r\n", capa("TOP", "UIDL", "USER", "SASL PLAIN LOGIN", *TAIL)),
    (
        "CAPA after login still lists what AUTHORIZATION had (RFC 2449)",
        {},
        LOGIN + b"CAPA\r\n",
        LOGGED_IN + capa(*CAPABILITIES),
    ),
    # --- STLS ---
    ("STLS, then USER/PASS", UNTRUSTED_STLS, [b"STLS\r\n", LOGIN], STLS_OK + LOGGED_IN),
    ("STLS twice", UNTRUSTED_STLS, [b"STLS\r\n", b"STLS\r\n"], STLS_OK + err(replies.STLS_ACTIVE)),
    ("STLS on POP3S", POP3S, b"STLS\r\n", err(replies.STLS_ACTIVE)),
    ("STLS without a certificate", {}, b"STLS\r\n", err(replies.STLS_UNAVAILABLE)),
    ("STLS with an argument", UNTRUSTED_STLS, b"STLS now\r\n", bad_args("STLS")),
    ("STLS after login", TRUSTED_STLS, LOGIN + b"STLS\r\n", LOGGED_IN + err(replies.ALREADY_AUTHENTICATED)),
    (
        "STLS forgets the USER given before it",
        TRUSTED_STLS,
        [b"USER alice\r\nSTLS\r\n", b"PASS " + PASSWORD.encode() + b"\r\n"],
        ok(replies.USER_ACCEPTED) + STLS_OK + err(replies.PASS_WITHOUT_USER),
    ),
    (
        "STLS forgets the mechanism chosen before it",
        TRUSTED_STLS,
        [b"USER alice\r\nSTLS\r\n", b"APOP alice " + b"0" * 32 + b"\r\n"],
        ok(replies.USER_ACCEPTED) + STLS_OK + err(replies.AUTH_FAILED),
    ),
    # --- no password before TLS, unless trusted ---
    *[
        (f"{command!r} refused before STLS", UNTRUSTED_STLS, command + b"\r\n", USE_STLS)
        for command in (
            b"USER alice",
            b"PASS " + PASSWORD.encode(),
            b"APOP alice " + b"0" * 32,
            b"AUTH PLAIN",
            b"AUTH PLAIN " + plain("", "alice", PASSWORD),
            b"AUTH PLAIN not-even-base64!",  # refused before the response is decoded
            b"auth login",
            b"AUTH LOGIN " + b64(b"alice"),
        )
    ],
    ("USER refused with no TLS to offer", UNTRUSTED_NO_TLS, b"USER alice\r\n", NO_TLS),
    ("AUTH PLAIN refused with no TLS to offer", UNTRUSTED_NO_TLS, b"AUTH PLAIN\r\n", NO_TLS),
    ("bare AUTH lists no password mechanism", UNTRUSTED_STLS, b"AUTH\r\n", ok(replies.AUTH_MECHANISMS) + b".\r\n"),
    ("trusted network: USER/PASS in clear", {"cleartext_allowed": True}, LOGIN, LOGGED_IN),
    ("POP3S: USER/PASS", POP3S, LOGIN, LOGGED_IN),
    (
        "unknown mechanism is unknown, trusted or not",
        UNTRUSTED_STLS,
        b"AUTH CRAM-MD5\r\n",
        err(replies.AUTH_UNKNOWN_MECHANISM.format(mechanism="CRAM-MD5")),
    ),
    # --- AUTH (RFC 5034) ---
    ("bare AUTH lists the mechanisms", {}, b"AUTH\r\n", ok(replies.AUTH_MECHANISMS) + b"PLAIN\r\nLOGIN\r\n.\r\n"),
    ("AUTH PLAIN with an initial response", {}, PLAIN_IR, WELCOME),
    ("AUTH PLAIN after STLS", UNTRUSTED_STLS, [b"STLS\r\n", PLAIN_IR], STLS_OK + WELCOME),
    ("mechanism names in any case", {}, b"auth plain " + plain("", "alice", PASSWORD) + b"\r\n", WELCOME),
    (
        "AUTH PLAIN with the user as authzid too",
        {},
        b"AUTH PLAIN " + plain("alice", "alice", PASSWORD) + b"\r\n",
        WELCOME,
    ),
    (
        "AUTH PLAIN after an empty challenge",
        {},
        b"AUTH PLAIN\r\n" + plain("", "alice", PASSWORD) + b"\r\n",
        EMPTY_CHALLENGE + WELCOME,
    ),
    (
        "AUTH PLAIN cancelled with *, then USER/PASS",
        {},
        b"AUTH PLAIN\r\n*\r\n" + LOGIN,
        EMPTY_CHALLENGE + err(replies.AUTH_CANCELLED) + LOGGED_IN,
    ),
    (
        "AUTH PLAIN, wrong password",
        {},
        b"AUTH PLAIN " + plain("", "alice", "nope") + b"\r\n",
        err(replies.AUTH_FAILED),
    ),
    (
        "AUTH PLAIN as another user",
        {},
        b"AUTH PLAIN " + plain("bob", "alice", PASSWORD) + b"\r\n",
        rejected(replies.SASL_OTHER_USER),
    ),
    ("AUTH PLAIN, not base64", {}, b"AUTH PLAIN @@@\r\n", err(replies.AUTH_BAD_BASE64)),
    (
        "AUTH PLAIN, continuation not base64",
        {},
        b"AUTH PLAIN\r\nnot base64!\r\n",
        EMPTY_CHALLENGE + err(replies.AUTH_BAD_BASE64),
    ),
    ("AUTH PLAIN, = is an empty response", {}, b"AUTH PLAIN =\r\n", rejected(replies.SASL_PLAIN_FORM)),
    ("AUTH PLAIN, no NULs", {}, b"AUTH PLAIN " + b64(b"alice") + b"\r\n", rejected(replies.SASL_PLAIN_FORM)),
    (
        "AUTH PLAIN, empty password",
        {},
        b"AUTH PLAIN " + b64(b"\0alice\0") + b"\r\n",
        rejected(replies.SASL_EMPTY.format(what="password")),
    ),
    (
        "AUTH PLAIN, user name not UTF-8",
        {},
        b"AUTH PLAIN " + b64(b"\0\xff\0pw") + b"\r\n",
        rejected(replies.SASL_NOT_UTF8.format(what="user name")),
    ),
    ("AUTH with too many arguments", {}, b"AUTH PLAIN a b\r\n", bad_args("AUTH")),
    (
        "AUTH LOGIN",
        {},
        b"AUTH LOGIN\r\n" + b64(b"alice") + b"\r\n" + b64(PASSWORD.encode()) + b"\r\n",
        USERNAME + PASSWORD_PROMPT + WELCOME,
    ),
    (
        "AUTH LOGIN with the user name as initial response",
        {},
        b"AUTH LOGIN " + b64(b"alice") + b"\r\n" + b64(PASSWORD.encode()) + b"\r\n",
        PASSWORD_PROMPT + WELCOME,
    ),
    (
        "AUTH LOGIN, empty user name",
        {},
        b"AUTH LOGIN\r\n\r\n",
        USERNAME + rejected(replies.SASL_EMPTY.format(what="user name")),
    ),
    (
        "AUTH LOGIN cancelled at the password",
        {},
        b"AUTH LOGIN\r\n" + b64(b"alice") + b"\r\n*\r\nNOOP\r\n",
        USERNAME + PASSWORD_PROMPT + err(replies.AUTH_CANCELLED) + err(replies.NOT_AUTHENTICATED),
    ),
    ("AUTH after login", {}, PLAIN_IR + PLAIN_IR, WELCOME + err(replies.ALREADY_AUTHENTICATED)),
    (
        "AUTH abandons a USER without PASS",
        {},
        b"USER alice\r\nAUTH PLAIN\r\n*\r\nPASS " + PASSWORD.encode() + b"\r\n",
        ok(replies.USER_ACCEPTED) + EMPTY_CHALLENGE + err(replies.AUTH_CANCELLED) + err(replies.PASS_WITHOUT_USER),
    ),
    (
        "pipelined AUTH exchange and commands",
        {},
        b"AUTH PLAIN\r\n" + plain("", "alice", PASSWORD) + b"\r\nSTAT\r\n",
        EMPTY_CHALLENGE + WELCOME + ok(replies.STAT.format(count=3, octets=sum(SIZES))),
    ),
    (
        "three broken AUTH exchanges close the session",
        {},
        b"AUTH PLAIN @\r\nAUTH PLAIN =\r\nAUTH PLAIN " + plain("", "alice", "x") + b"\r\nCAPA\r\n",
        err(replies.AUTH_BAD_BASE64) + rejected(replies.SASL_PLAIN_FORM) + err(replies.AUTH_TOO_MANY),
    ),
    (
        "a too long response ends the exchange",
        {},
        b"AUTH PLAIN\r\n" + b"QUFB" * 2100 + b"\r\nNOOP\r\n",
        EMPTY_CHALLENGE + err(replies.LINE_TOO_LONG.format(limit=MAX_SASL_LINE)) + err(replies.NOT_AUTHENTICATED),
    ),
    (
        "a response may be longer than a command line",
        {"max_line": 255},
        b"AUTH PLAIN\r\n" + plain("", "alice", "x" * 300) + b"\r\n",
        EMPTY_CHALLENGE + err(replies.AUTH_FAILED),
    ),
    (
        "a broken AUTH abandons a USER without PASS",
        {},
        b"USER alice\r\nAUTH PLAIN @@\r\nPASS " + PASSWORD.encode() + b"\r\n",
        ok(replies.USER_ACCEPTED) + err(replies.AUTH_BAD_BASE64) + err(replies.PASS_WITHOUT_USER),
    ),
    (
        "a cancelled AUTH keeps APOP's rule against USER",
        {},
        b"APOP alice " + b"0" * 32 + b"\r\nAUTH PLAIN\r\n*\r\nUSER alice\r\n",
        err(replies.AUTH_FAILED) + EMPTY_CHALLENGE + err(replies.AUTH_CANCELLED) + err(replies.MECHANISM_APOP_CHOSEN),
    ),
    (
        "= as a continuation is an empty response",
        {},
        b"AUTH PLAIN\r\n=\r\n",
        EMPTY_CHALLENGE + rejected(replies.SASL_PLAIN_FORM),
    ),
]


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize(("conn_args", "data", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_case(conn_args: dict[str, Any], data: bytes | list[bytes], expected: bytes, bytewise: bool) -> None:
    out, _ = run(data, bytewise=bytewise, conn_args=conn_args)
    assert out == expected


# -- the plaintext injection after STLS (CVE-2011-0411) -----------------------


def test_commands_in_the_stls_packet_are_discarded() -> None:
    conn = new_conn(**UNTRUSTED_STLS)
    conn.receive_data(b"STLS\r\nCAPA\r\nUSER alice\r\nPASS " + PASSWORD.encode() + b"\r\nRETR 1\r\nQU")
    assert isinstance(conn.next_event(), StartTLS)
    assert conn.data_to_send() == STLS_OK
    conn.tls_started()
    # Nothing of what came in clear after STLS is executed, not even the partial line.
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == b""
    assert conn.state is State.AUTHORIZATION and conn.user == ""
    conn.receive_data(b"IT\r\n")
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == err(replies.UNKNOWN_COMMAND.format(command="IT"))


def test_stls_must_be_answered_before_anything_else() -> None:
    conn = new_conn(**UNTRUSTED_STLS)
    conn.receive_data(b"STLS\r\n")
    assert isinstance(conn.next_event(), StartTLS)
    with pytest.raises(RuntimeError):
        conn.next_event()
    # A caller that reads on before the handshake is stopped: those bytes came in clear.
    with pytest.raises(RuntimeError, match="before the TLS handshake"):
        conn.receive_data(b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\n")
    conn.tls_started()
    assert conn.encrypted
    with pytest.raises(RuntimeError):
        conn.tls_started()  # nothing pending any more


def test_failed_logins_before_stls_still_count_after_it() -> None:
    out, driver = run(
        [b"USER alice\r\nPASS x\r\nUSER alice\r\nPASS x\r\nSTLS\r\n", b"USER alice\r\nPASS x\r\nCAPA\r\n"],
        bytewise=False,
        conn_args=TRUSTED_STLS,
    )
    assert out.endswith(err(replies.AUTH_TOO_MANY))
    assert driver.closed


# -- the event a finished exchange produces -----------------------------------


@pytest.mark.parametrize(
    ("data", "mechanism"),
    [
        (PLAIN_IR, "plain"),
        (b"AUTH LOGIN " + b64(b"alice") + b"\r\n" + b64(PASSWORD.encode()) + b"\r\n", "login"),
        (LOGIN, "user"),
    ],
)
def test_authenticate_event(data: bytes, mechanism: str) -> None:
    conn = new_conn()
    conn.receive_data(data)
    event = conn.next_event()
    while not isinstance(event, Authenticate):
        assert event is NEED_DATA
        conn.data_to_send()
        event = conn.next_event()
    assert event == Authenticate(mechanism=mechanism, credentials=Password(user="alice", secret=PASSWORD))
    assert conn.mechanism == mechanism and conn.user == "alice"
    assert PASSWORD not in repr(event)
    conn.login_succeeded([])
    assert conn.state is State.TRANSACTION


def test_every_failed_auth_goes_to_the_caller() -> None:
    # A wrong password through AUTH is an Authenticate event like PASS, and a
    # broken exchange a LoginRejected: the caller counts, logs and delays both
    # as it does a wrong password, and answers both with login_failed().
    commands = b"AUTH PLAIN " + plain("", "alice", "wrong") + b"\r\nAUTH PLAIN @@\r\n"
    out, driver = run(commands, bytewise=False)
    assert driver.events == [
        Authenticate(mechanism="plain", credentials=Password(user="alice", secret="wrong")),
        LoginRejected(mechanism="plain", reason=replies.AUTH_BAD_BASE64),
    ]
    assert out == err(replies.AUTH_FAILED) + err(replies.AUTH_BAD_BASE64)
    assert driver.conn.auth_failures == 2


def test_login_rejected_cannot_succeed() -> None:
    conn = new_conn()
    conn.receive_data(b"AUTH PLAIN =\r\n")
    assert isinstance(conn.next_event(), LoginRejected)
    with pytest.raises(RuntimeError):
        conn.login_succeeded([])
    conn.login_failed(LoginFailure.BAD_CREDENTIALS)
    assert conn.data_to_send() == rejected(replies.SASL_PLAIN_FORM)


def test_cleartext_refusals_produce_no_event_and_count_nothing() -> None:
    commands = b"USER a\r\nPASS b\r\nAPOP a " + b"0" * 32 + b"\r\nAUTH PLAIN " + plain("", "a", "b") + b"\r\n"
    out, driver = run(commands * 3, bytewise=False, conn_args=UNTRUSTED_STLS)
    assert out == USE_STLS * 12
    assert driver.events == []
    assert driver.conn.auth_failures == 0 and not driver.closed


def test_close_ends_an_exchange() -> None:
    conn = new_conn()
    conn.receive_data(b"AUTH PLAIN\r\n")
    assert conn.next_event() is NEED_DATA
    conn.close()
    conn.receive_data(plain("", "alice", PASSWORD) + b"\r\n")
    assert isinstance(conn.next_event(), Closed)


# -- the mechanisms on their own ----------------------------------------------


def test_plain_mechanism() -> None:
    mechanism = Plain()
    assert mechanism.step(None).data == b""  # type: ignore[union-attr]
    assert mechanism.step(b"\0bob\0pw") == Password(user="bob", secret="pw")
    with pytest.raises(SaslError):
        Plain().step(b"bob\0pw")


def test_login_mechanism() -> None:
    mechanism = Login()
    assert mechanism.step(None).data == b"Username:"  # type: ignore[union-attr]
    assert mechanism.step(b"bob").data == b"Password:"  # type: ignore[union-attr]
    assert mechanism.step("pässword".encode()) == Password(user="bob", secret="pässword")
    with pytest.raises(SaslError):
        Login().step(b"")
