"""Property-based fuzzing of the protocol engine (hypothesis), no I/O.

Command streams come from a grammar of POP3 commands (random case, hostile
arguments, odd line ends, AUTH exchanges, STLS, logins), from random bytes
and from mutated transcripts.  Each stream is fed one byte at a time (the
reference run), in random chunks and whole, to the ``Driver`` of
``test_protocol``, which answers the events from its fixed mailbox.  The
invariants checked on every run:

* the engine raises nothing when driven correctly;
* the output is a sequence of well-formed responses (the small checker
  below): CRLF line ends only, status lines of known form and at most 512
  octets (RFC 2449), multi-line responses dot-stuffed and ended by ``.``;
* one response per command line; RETR's octet count is what is sent;
* the input buffer stays within the line limit plus the last chunk, and
  each batch of replies within ``OUTGOING_LIMIT`` plus one reply;
* the same output and final state however the input is chunked (chunks
  always end right after an accepted STLS: what follows it in the same
  chunk is dropped by design, CVE-2011-0411, and checked for that too);
* nothing after QUIT is executed; no password in any reply; no login
  before TLS when cleartext is not allowed.

Runs are derandomized and use no example database, so CI is deterministic.
"""

from __future__ import annotations

import base64
import re
import string
from collections.abc import Callable, Iterable
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pop3d import replies
from pop3d.credentials import apop_digest
from pop3d.message import encode_message
from pop3d.protocol import (
    MAX_SASL_LINE,
    NEED_DATA,
    OUTGOING_LIMIT,
    PAUSED,
    Authenticate,
    Closed,
    Event,
    ListUids,
    LoginFailure,
    LoginRejected,
    POP3Connection,
    Retrieve,
    StartTLS,
    Update,
)
from pop3d.session import _challenge

from .test_protocol import CHALLENGE, MESSAGES, PASSWORD, SIZES, UIDS, Driver, new_conn

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)

MAX_STATUS_LINE = 512  # RFC 2449 section 4: the first line of a response, CRLF included

# -- the response checker ---------------------------------------------------

_NUMBER = r"\d+"
_ECHO = r"[\x21-\x7e]{0,40}(?:\.\.\.)?"  # a client's word, as _printable makes it
_ANY = r"[\x20-\x7e]+"
_FIELDS = {
    "count": _NUMBER,
    "octets": _NUMBER,
    "msg": _NUMBER,
    "limit": _NUMBER,
    "uid": r"[\x21-\x7e]{1,70}",
    "command": _ECHO,
    "mechanism": _ECHO,
    "what": r"[a-z ]+",
    "usage": "|".join(re.escape(usage) for usage in replies.USAGE.values()),
}


def _pattern(template: str) -> re.Pattern[str]:
    """A regular expression for a reply template of :mod:`pop3d.replies`."""
    parts = []
    for literal, name, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if name is not None:
            parts.append(f"(?:{_FIELDS.get(name, _ANY)})")
    return re.compile("".join(parts))


_TEMPLATES = {name: value for name, value in vars(replies).items() if name.isupper() and isinstance(value, str)}
_MULTILINE_NAMES = ("CAPA", "AUTH_MECHANISMS", "LIST_ALL", "UIDL_ALL", "RETR", "TOP")
MULTILINE = [_pattern(_TEMPLATES[name]) for name in _MULTILINE_NAMES]
SINGLE_LINE = [_pattern(text) for name, text in _TEMPLATES.items() if name not in _MULTILINE_NAMES]
RETR_OK = _pattern(replies.RETR)
CLOSING = {replies.QUIT_AUTHORIZATION, replies.AUTH_TOO_MANY, replies.SYS_TEMP_UPDATE}
QUIT_UPDATE = _pattern(replies.QUIT_UPDATE)
RETR_BODIES = {encode_message(m) for m in MESSAGES}


class Response:
    """One parsed response: ``+OK``, ``-ERR`` or ``+`` (a SASL challenge), and its body lines."""

    def __init__(self, kind: str, text: str, body: list[bytes] | None, size: int) -> None:
        self.kind = kind
        self.text = text
        self.body = body
        self.size = size

    def __repr__(self) -> str:
        return f"Response({self.kind} {self.text!r}, body={self.body!r})"


def parse_responses(out: bytes) -> list[Response]:
    """Split the server's output into responses; fails on anything malformed."""
    assert not out or out.endswith(b"\r\n"), f"output ends mid-line: {out[-80:]!r}"
    lines = out.split(b"\r\n")[:-1]
    for line in lines:
        assert b"\r" not in line and b"\n" not in line, f"bare CR or LF in {line!r}"
    responses = []
    i = 0
    while i < len(lines):
        status = lines[i]
        i += 1
        assert len(status) + 2 <= MAX_STATUS_LINE, f"status line of {len(status) + 2} octets: {status[:80]!r}"
        assert status.isascii(), status
        text = status.decode("ascii")
        multiline = False
        if status == b"+OK" or status.startswith(b"+OK "):
            kind, text = "+OK", text[4:]
            assert status == b"+OK" or text, "'+OK ' with nothing after it"
            multiline = any(p.fullmatch(text) for p in MULTILINE)
            assert multiline or any(p.fullmatch(text) for p in SINGLE_LINE), f"unknown reply {status!r}"
        elif status.startswith(b"-ERR "):
            kind, text = "-ERR", text[5:]
            assert any(p.fullmatch(text) for p in SINGLE_LINE), f"unknown reply {status!r}"
        elif status.startswith(b"+ "):
            kind, text = "+", text[2:]
            base64.b64decode(text, validate=True)
        else:
            raise AssertionError(f"not a response: {status!r}")
        size = len(status) + 2
        body = None
        if multiline:
            body, raw = [], b""
            while True:
                assert i < len(lines), f"multi-line response {status!r} without its final '.'"
                line = lines[i]
                i += 1
                size += len(line) + 2
                raw += line + b"\r\n"
                if line == b".":
                    break
                assert not line.startswith(b".") or line.startswith(b".."), f"not dot-stuffed: {line!r}"
                body.append(line[1:] if line.startswith(b".") else line)
            if RETR_OK.fullmatch(text):
                # One of the mailbox's messages, and its octet count before dot-stuffing (RFC 1939).
                assert raw in RETR_BODIES, raw
                assert int(text.split()[0]) == sum(len(line) + 2 for line in body)
        responses.append(Response(kind, text, body, size))
    return responses


# -- running the engine -----------------------------------------------------


class RecordingConnection(POP3Connection):
    """An engine that records the size of each batch of replies it hands out."""

    __slots__ = ("batches",)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.batches: list[int] = []

    def data_to_send(self) -> bytes:
        batch = super().data_to_send()
        self.batches.append(len(batch))
        return batch


class Run:
    """Feeds chunks to a ``Driver`` and checks the buffer bounds after every step."""

    def __init__(self, conn_args: dict[str, Any], driver_args: dict[str, bool]) -> None:
        self.conn = new_conn(connection_class=RecordingConnection, **conn_args)
        assert isinstance(self.conn, RecordingConnection)
        self.driver = Driver(self.conn, **driver_args)
        self.out = bytearray()
        self.batches = self.conn.batches
        self.stls_offsets: list[int] = []  # input offsets right after each chunk that started TLS
        self.received = 0
        self._limit = self.conn._line_limit()  # the line limit when the engine last needed data

    def send(self, chunk: bytes) -> None:
        conn, driver = self.conn, self.driver
        self.received += len(chunk)
        conn.receive_data(chunk)
        assert len(conn._buffer) <= self._limit + len(chunk)
        if driver.closed:
            assert isinstance(conn.next_event(), Closed)
            assert conn.data_to_send() == b"", "output after the session closed"
            return
        seen = len(driver.events)
        self.out += driver.pump()
        if any(isinstance(event, StartTLS) for event in driver.events[seen:]):
            self.stls_offsets.append(self.received)
        assert len(conn._buffer) <= self._limit + len(chunk)
        if not driver.closed:
            assert len(conn._buffer) - conn._start <= conn._line_limit()
            assert conn._rejection is None and conn._awaiting is None
            self._limit = conn._line_limit()

    def feed(self, chunks: Iterable[bytes]) -> Run:
        for chunk in chunks:
            self.send(chunk)
        return self

    def snapshot(self) -> dict[str, object]:
        conn, driver = self.conn, self.driver
        return {
            "out": bytes(self.out),
            "events": driver.events,
            "closed": driver.closed,
            "deleted": driver.deleted,
            "locked": driver.locked,
            "state": conn.state,
            "user": conn.user,
            "mechanism": conn.mechanism,
            "failures": conn.auth_failures,
            "marked": sorted(conn.deleted),
            "encrypted": conn.encrypted,
            "sasl": None if conn._sasl is None else (type(conn._sasl).__name__, vars(conn._sasl)),
            "discarding": conn._discarding,
            # After the end, the bytes left unread depend on the chunks: not part of the state.
            "pending": None if driver.closed else bytes(conn._buffer[conn._start :]),
        }


def split(data: bytes, points: Iterable[int]) -> list[bytes]:
    cuts = [0, *sorted({p for p in points if 0 < p < len(data)}), len(data)]
    return [data[a:b] for a, b in pairwise(cuts)]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def check_stream(
    data: bytes,
    points: list[int],
    conn_args: dict[str, Any],
    driver_args: dict[str, bool],
    extra: bytes = b"",
) -> Run:
    """Every invariant for one input; returns the reference (byte by byte) run."""
    ref = Run(conn_args, driver_args).feed(bytewise(data))
    responses = parse_responses(bytes(ref.out))
    out, events = bytes(ref.out), ref.driver.events

    # Batches of replies: PAUSED before OUTGOING_LIMIT is passed by more than one reply.
    longest = max((r.size for r in responses), default=0)
    assert max(ref.batches, default=0) < OUTGOING_LIMIT + longest

    # One response per command line, unless the session ended (nothing more is read).
    max_line = conn_args.get("max_line", 1024)
    lines = data.split(b"\n")
    short = all(len(line) + 1 <= max_line for line in lines[:-1]) and len(lines[-1]) <= max_line
    if ref.driver.closed:
        assert len(responses) <= data.count(b"\n")
        assert isinstance(events[-1], Closed) and sum(isinstance(e, Closed) for e in events) == 1
        closing = [r for r in responses if r.text in CLOSING or QUIT_UPDATE.fullmatch(r.text)]
        assert closing == responses[-1:], "the session ended, but not on its last reply"
    elif short:
        assert len(responses) == data.count(b"\n")

    # No secret in any reply or event repr.
    assert PASSWORD.encode() not in out
    assert PASSWORD not in repr(events)

    # No login before TLS when a password may not be sent in clear.
    assert sum(isinstance(e, StartTLS) for e in events) <= 1
    if not conn_args.get("cleartext_allowed", True) and not conn_args.get("encrypted", False):
        before_tls = events[: next((i for i, e in enumerate(events) if isinstance(e, StartTLS)), len(events))]
        assert not any(isinstance(e, Authenticate | LoginRejected) for e in before_tls), before_tls
        for response in responses:
            if response.text == replies.STLS_BEGIN:
                break
            assert response.kind != "+", "SASL exchange before TLS"
            assert response.text != replies.USER_ACCEPTED, "USER accepted before TLS"

    # The same output and state, whatever the chunks (each ends after an accepted STLS).
    expected = ref.snapshot()
    whole = Run(conn_args, driver_args).feed(split(data, ref.stls_offsets))
    assert whole.snapshot() == expected
    chunked = Run(conn_args, driver_args).feed(split(data, [*points, *ref.stls_offsets]))
    assert chunked.snapshot() == expected
    for run in (whole, chunked):
        assert max(run.batches, default=0) < OUTGOING_LIMIT + longest

    # STLS drops what came after it in the same chunk.
    single = Run(conn_args, driver_args).feed([data])
    if any(isinstance(e, StartTLS) for e in single.driver.events):
        assert isinstance(single.driver.events[-1], StartTLS)
        assert single.out.endswith(replies.ok(replies.STLS_BEGIN))
    else:
        assert single.snapshot() == expected

    # What the example reached (see pytest --hypothesis-show-statistics).
    event(f"state {ref.conn.state.name}")
    event("STLS accepted" if ref.stls_offsets else "no STLS")
    for kind in sorted({type(e).__name__ for e in events}):
        event(f"event {kind}")
    if any(r.text.startswith("line too long") for r in responses):
        event("line too long")

    # Nothing after QUIT (or the last failed login) is executed.
    if extra:
        if ref.driver.closed:
            for chunk in (extra, *bytewise(extra[:50])):
                ref.send(chunk)  # Run.send checks that there is no output
            longer = Run(conn_args, driver_args).feed(split(data + extra, ref.stls_offsets))
            assert longer.snapshot()["out"] == expected["out"]
            assert longer.driver.events == events
        else:
            ref.feed([extra])
            parse_responses(bytes(ref.out))
    return ref


# -- strategies ---------------------------------------------------------------


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


PLAIN_OK = b"\0alice\0" + PASSWORD.encode()
APOP_OK = b"APOP alice " + apop_digest(CHALLENGE, PASSWORD).encode() + b"\r\n"
USER_LOGIN = b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\n"
LOGINS = [
    USER_LOGIN,
    APOP_OK,
    b"AUTH PLAIN " + b64(PLAIN_OK) + b"\r\n",
    b"AUTH PLAIN\r\n" + b64(b"alice" + PLAIN_OK) + b"\r\n",
    b"auth login\r\n" + b64(b"alice") + b"\r\n" + b64(PASSWORD.encode()) + b"\r\n",
    b"AUTH LOGIN " + b64(b"alice") + b"\r\n" + b64(PASSWORD.encode()) + b"\r\n",
]
MACROS = [
    *LOGINS,
    b"STLS\r\n",
    b"QUIT\r\n",
    b"CAPA\r\n",
    b"AUTH\r\n",
    b"AUTH PLAIN\r\n*\r\n",
    b"AUTH LOGIN\r\n=\r\n",
    b"AUTH LOGIN\r\n" + b64(b"alice") + b"\r\n*\r\n",
    b"AUTH PLAIN =\r\n",
    b"AUTH PLAIN\r\n\r\n",
    b"USER alice\r\nPASS wrong\r\n",
    b"STAT\r\n",
    b"LIST\r\n",
    b"LIST 2\r\n",
    b"RETR 1\r\n",
    b"RETR 2\r\n",
    b"RETR 3\r\n",
    b"TOP 2 1\r\n",
    b"TOP 1 0\r\n",
    b"UIDL\r\n",
    b"UIDL 3\r\n",
    b"DELE 1\r\n",
    b"DELE 2\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
]
SESSIONS = [
    USER_LOGIN + b"STAT\r\nLIST\r\nRETR 1\r\nTOP 2 1\r\nUIDL\r\nDELE 1\r\nRSET\r\nDELE 3\r\nNOOP\r\nQUIT\r\n",
    b"CAPA\r\nAUTH\r\nAUTH PLAIN " + b64(PLAIN_OK) + b"\r\nRETR 2\r\nLIST 2\r\nUIDL 2\r\nQUIT\r\n",
    b"STLS\r\nCAPA\r\nAUTH LOGIN\r\n" + b64(b"alice") + b"\r\n" + b64(PASSWORD.encode()) + b"\r\nDELE 2\r\nQUIT\r\n",
    APOP_OK + b"TOP 3 5\r\nDELE 3\r\nSTAT\r\nQUIT\r\n",
    b"USER bob\r\nPASS x\r\nAUTH PLAIN\r\n" + b64(PLAIN_OK) + b"\r\nLIST\r\nQUIT\r\n",
]

KEYWORDS = [
    "USER",
    "PASS",
    "APOP",
    "AUTH",
    "STLS",
    "QUIT",
    "CAPA",
    "STAT",
    "LIST",
    "RETR",
    "DELE",
    "NOOP",
    "RSET",
    "TOP",
    "UIDL",
    "HELO",
    "XTND",
    "",
    "*",
    "=",
]


def random_case(word: str) -> st.SearchStrategy[str]:
    return st.lists(st.booleans(), min_size=len(word), max_size=len(word)).map(
        lambda flips: "".join(c.swapcase() if flip else c for c, flip in zip(word, flips, strict=True))
    )


SASL_MESSAGES = st.one_of(
    st.sampled_from([PLAIN_OK, b"alice" + PLAIN_OK, b"bob" + PLAIN_OK, b"alice", PASSWORD.encode(), b"\0\0", b""]),
    st.binary(max_size=24),
)
BASE64ISH = st.one_of(
    SASL_MESSAGES.map(b64),
    SASL_MESSAGES.map(lambda m: b64(m).rstrip(b"=")),
    st.text(alphabet=string.ascii_letters + string.digits + "+/=", max_size=16).map(str.encode),
)
NUMBERS = st.one_of(
    st.integers(-3, 5),
    st.integers(-(10**30), 10**30),
    st.sampled_from([2**31, 2**32, 10**10 - 1, 10**10]),
).map(lambda n: str(n).encode())
ARGUMENTS = st.one_of(
    NUMBERS,
    NUMBERS,
    st.sampled_from(
        [
            *[b"", b"*", b"=", b"alice", b"bob", b"PLAIN", b"login", b"CRAM-MD5", b"0000000001", b"+1", b"1.0"],
            # Non-ASCII: an Arabic-Indic one, e acute, a long s, a no-break space, a line separator.
            *["\u0661".encode(), "\u00e9".encode(), "\u017f".encode(), "\u00a0".encode(), "\u2028".encode()],
            *[b"\x00", b"\x7f", b"\t", b"\xff\xfe", b"\x0b\x0c", b"\x1b[2J", PASSWORD.encode()],
        ]
    ),
    st.sampled_from([60, 250, 1000, 1017, 1018, 1100, 3000, 8185, 8200]).map(lambda n: b"x" * n),
    st.binary(max_size=12),
    st.text(max_size=8).map(lambda s: s.encode("utf-8", "surrogatepass")),
    BASE64ISH,
)
LINE_ENDS = st.sampled_from([b"\r\n"] * 8 + [b"\n", b"\n", b"\r", b"", b"\r\r\n", b"\n\r"])


@st.composite
def command_lines(draw: st.DrawFn) -> bytes:
    keyword = draw(st.sampled_from(KEYWORDS).flatmap(random_case)).encode()
    args = draw(st.lists(ARGUMENTS, max_size=3))
    separator = draw(st.sampled_from([b" "] * 4 + [b"  ", b"\t"]))
    trailing = draw(st.sampled_from([b""] * 4 + [b" ", b"\t"]))
    return separator.join([keyword, *args]) + trailing + draw(LINE_ENDS)


@st.composite
def command_streams(draw: st.DrawFn) -> bytes:
    items = draw(st.lists(st.one_of(command_lines(), st.sampled_from(MACROS)), max_size=16))
    where = draw(st.sampled_from(["first", "first", "anywhere", "none", "after STLS", "after STLS"]))
    if where != "none":
        login = draw(st.sampled_from(LOGINS))
        position = 0 if where == "first" else draw(st.integers(0, len(items)))
        items.insert(position, login)
        if where == "after STLS":
            items.insert(position, b"STLS\r\n")
    if draw(st.integers(0, 2)) == 0:
        items.insert(draw(st.integers(0, len(items))), draw(random_case("QUIT")).encode() + draw(LINE_ENDS))
    return b"".join(items)


@st.composite
def random_streams(draw: st.DrawFn) -> bytes:
    return draw(
        st.one_of(
            st.binary(max_size=400),
            st.lists(st.binary(max_size=30), max_size=20).map(b"\r\n".join),
            st.lists(st.binary(max_size=30), max_size=20).map(b"\n".join),
        )
    )


@st.composite
def mutated_streams(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.one_of(st.sampled_from(SESSIONS), command_streams())))
    for _ in range(draw(st.integers(1, 6))):
        operation = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "duplicate"]))
        pos = draw(st.integers(0, len(data)))
        if operation == "flip" and pos < len(data):
            data[pos] ^= draw(st.integers(1, 255))
        elif operation == "insert":
            data[pos:pos] = draw(
                st.one_of(
                    st.binary(min_size=1, max_size=8),
                    st.sampled_from([b"\r\n", b"\n", b"\r", b" ", b"\0", b"STLS\r\n", b"*\r\n", b"QUIT\r\n"]),
                )
            )
        elif operation == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif operation == "truncate":
            del data[pos:]
        elif operation == "duplicate":
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 40))]
    return bytes(data)


CONN_ARGS = st.fixed_dictionaries(
    {
        "tls_available": st.booleans(),
        "encrypted": st.sampled_from([False, False, True]),
        "cleartext_allowed": st.sampled_from([True, True, False]),
        "apop": st.sampled_from([True, True, False]),
        "max_line": st.sampled_from([1024, 1024, 255, 64]),
        "max_auth_failures": st.sampled_from([3, 1, 2, 100]),
    }
)
DRIVER_ARGS = st.fixed_dictionaries(
    {"lock_free": st.sampled_from([True, True, False]), "storage_fails": st.sampled_from([False, False, False, True])}
)


def split_points(data: bytes) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, len(data)), max_size=12)


# -- the properties -----------------------------------------------------------


@settings(FUZZ, max_examples=500)
@given(st.data(), command_streams(), CONN_ARGS, DRIVER_ARGS, st.one_of(st.just(b""), command_streams()))
def test_grammar_streams(
    data: st.DataObject, stream: bytes, conn_args: dict[str, Any], driver_args: dict[str, bool], extra: bytes
) -> None:
    check_stream(stream, data.draw(split_points(stream)), conn_args, driver_args, extra)


@settings(FUZZ, max_examples=200)
@given(st.data(), command_streams(), DRIVER_ARGS)
def test_untrusted_client_logs_in_only_after_tls(
    data: st.DataObject, stream: bytes, driver_args: dict[str, bool]
) -> None:
    conn_args = {"tls_available": True, "cleartext_allowed": False}
    ref = check_stream(stream, data.draw(split_points(stream)), conn_args, driver_args)
    if not ref.stls_offsets:
        assert not ref.conn.encrypted and ref.driver.events == [e for e in ref.driver.events if isinstance(e, Closed)]


@settings(FUZZ, max_examples=300)
@given(st.data(), random_streams(), CONN_ARGS, DRIVER_ARGS)
def test_random_bytes(
    data: st.DataObject, stream: bytes, conn_args: dict[str, Any], driver_args: dict[str, bool]
) -> None:
    check_stream(stream, data.draw(split_points(stream)), conn_args, driver_args, b"QUIT\r\n")


@settings(FUZZ, max_examples=300)
@given(st.data(), mutated_streams(), CONN_ARGS, DRIVER_ARGS)
def test_mutated_transcripts(
    data: st.DataObject, stream: bytes, conn_args: dict[str, Any], driver_args: dict[str, bool]
) -> None:
    check_stream(stream, data.draw(split_points(stream)), conn_args, driver_args, b"CAPA\r\n")


@settings(FUZZ, max_examples=60)
@given(
    st.sampled_from(
        [b"", b"USER ", b"AUTH PLAIN\r\n", b"auth login\r\n", b"CAPA\r\nAUTH LOGIN\r\n" + b64(b"a") + b"\r\n"]
    ),
    st.lists(st.integers(1, 40000), min_size=1, max_size=30),
    st.sampled_from([64, 1024, 10000]),
    st.sampled_from([b"\r\n", b"\n"]),
)
def test_a_huge_line_is_skipped_in_bounded_memory(prefix: bytes, sizes: list[int], max_line: int, end: bytes) -> None:
    run = Run({"max_line": max_line}, {})
    run.feed([prefix, *(b"y" * n for n in sizes), end + b"QUIT\r\n"])  # Run.send checks the buffer each time
    responses = parse_responses(bytes(run.out))
    sasl = prefix.upper().startswith((b"AUTH", b"CAPA"))
    limit = max(max_line, MAX_SASL_LINE) if sasl else max_line
    length = len(prefix.rpartition(b"\n")[2]) + sum(sizes) + len(end)
    too_long = [r for r in responses if r.text.startswith("line too long")]
    assert [r.text for r in too_long] == ([replies.LINE_TOO_LONG.format(limit=limit)] if length > limit else [])
    assert responses[-1].text == replies.QUIT_AUTHORIZATION
    assert run.driver.closed


@settings(FUZZ, max_examples=20)
@given(
    st.lists(
        st.sampled_from([b"CAPA\r\n", b"LIST\r\n", b"UIDL\r\n", b"BOGUS\r\n", b"RETR 2\r\n", b"STAT\n"]),
        min_size=1,
        max_size=3,
    ),
    st.integers(300, 1500),
    st.lists(st.integers(0, 40000), max_size=5),
)
def test_pipelining_floods_get_back_pressure(lines: list[bytes], count: int, points: list[int]) -> None:
    stream = USER_LOGIN + b"".join(lines) * count
    chunked = Run({}, {}).feed(split(stream, [p * 10 for p in points]))
    whole = Run({}, {}).feed([stream])
    assert chunked.snapshot() == whole.snapshot()
    responses = parse_responses(bytes(whole.out))
    assert len(responses) == 2 + len(lines) * count
    longest = max(r.size for r in responses)
    for run in (chunked, whole):
        assert max(run.batches) < OUTGOING_LIMIT + longest


def test_over_long_lines_in_one_chunk_get_back_pressure() -> None:
    """Many over-long lines in one chunk: their ``-ERR`` replies must not pile up past ``OUTGOING_LIMIT``.

    Fails now: ``_next_line`` answers every over-long line of the buffer in a
    loop (``continue`` after ``_line_too_long``) without going back to the
    OUTGOING_LIMIT check of ``next_event``, so the replies grow with the chunk.
    """
    conn = new_conn(max_line=64)
    conn.receive_data((b"z" * 100 + b"\n") * 3000)
    batches = []
    while (event := conn.next_event()) is not NEED_DATA:
        assert event is PAUSED
        batches.append(conn.data_to_send())
    batches.append(conn.data_to_send())
    reply = replies.err(replies.LINE_TOO_LONG.format(limit=64))
    assert b"".join(batches) == reply * 3000
    assert max(map(len, batches)) < OUTGOING_LIMIT + len(reply)


# -- answering wrongly --------------------------------------------------------


def engine_state(conn: POP3Connection) -> tuple[object, ...]:
    return (
        conn.state,
        conn.user,
        conn.mechanism,
        conn.auth_failures,
        frozenset(conn.deleted),
        conn.sizes,
        conn.encrypted,
        conn._awaiting,
        conn._rejection,
        b"".join(conn._outgoing),
        bytes(conn._buffer),
        conn._start,
        conn._scanned,
        conn._discarding,
        conn._sasl,
    )


def _command_failed_wrongly(conn: POP3Connection, event: Event | None) -> None:
    conn.command_failed(Retrieve(msg=1) if isinstance(event, Update) else Update(deleted=()))


# name: (the call, the pending event types it answers)
ANSWERS: dict[str, tuple[Callable[[POP3Connection, Event | None], object], tuple[type[Event], ...]]] = {
    "login_succeeded": (lambda c, e: c.login_succeeded(SIZES), (Authenticate,)),
    "login_failed": (lambda c, e: c.login_failed(LoginFailure.BAD_CREDENTIALS), (Authenticate, LoginRejected)),
    "start_message": (lambda c, e: c.start_message(e if isinstance(e, Retrieve) else Retrieve(msg=1)), (Retrieve,)),
    "send_uids": (
        lambda c, e: c.send_uids(e if isinstance(e, ListUids) else ListUids(msgs=(1,), single=True), UIDS),
        (ListUids,),
    ),
    "update_finished": (lambda c, e: c.update_finished(True), (Update,)),
    "tls_started": (lambda c, e: c.tls_started(), (StartTLS,)),
    "command_failed with another event": (_command_failed_wrongly, ()),
    "next_event": (lambda c, e: c.next_event(), ()),
    "receive_data during STLS": (
        lambda c, e: c.receive_data(b"NOOP\r\n"),
        (Authenticate, LoginRejected, Retrieve, ListUids, Update),
    ),
}


@settings(FUZZ, max_examples=150)
@given(
    command_streams(),
    CONN_ARGS,
    st.lists(st.sampled_from(sorted(ANSWERS)), min_size=1, max_size=20),
    st.lists(st.booleans(), min_size=1, max_size=20),
)
def test_wrong_answers_raise_runtime_error_and_change_nothing(
    stream: bytes, conn_args: dict[str, Any], wrong: list[str], fail: list[bool]
) -> None:
    conn = new_conn(**conn_args)
    conn.receive_data(stream)
    out = bytearray()
    for step in range(10000):
        event = conn.next_event()
        out += conn.data_to_send()
        if event is PAUSED:
            continue
        if event is NEED_DATA or isinstance(event, Closed):
            break
        assert isinstance(event, Event)
        call, answers = ANSWERS[wrong[step % len(wrong)]]
        if not isinstance(event, answers):
            before = engine_state(conn)
            with pytest.raises(RuntimeError):
                call(conn, event)
            assert engine_state(conn) == before
        # Then the right answer: the storage fails now and then.
        if isinstance(event, StartTLS):
            conn.tls_started()
        elif fail[step % len(fail)]:
            conn.command_failed(event)
        elif isinstance(event, Authenticate):
            conn.login_succeeded(SIZES)
        elif isinstance(event, LoginRejected):
            conn.login_failed(LoginFailure.BAD_CREDENTIALS)
        elif isinstance(event, Retrieve):
            conn.start_message(event)
            conn.message_data(MESSAGES[event.msg - 1])
            conn.end_message()
            out += conn.data_to_send()
        elif isinstance(event, ListUids):
            if event.msgs:
                before = engine_state(conn)
                with pytest.raises(ValueError):
                    conn.send_uids(event, {})
                assert engine_state(conn) == before
            conn.send_uids(event, UIDS)
        elif isinstance(event, Update):
            conn.update_finished(True)
    # Nothing pending: every answer is wrong.
    for name, (call, _) in ANSWERS.items():
        if not name.startswith(("next_event", "receive_data")):
            before = engine_state(conn)
            with pytest.raises(RuntimeError):
                call(conn, None)
            assert engine_state(conn) == before
    parse_responses(bytes(out + conn.data_to_send()))


@pytest.mark.parametrize(
    "out",
    [
        b"+OK\r\n+OK",  # ends mid-line
        b"+OK\n",  # bare LF
        b"-ERR " + b"x" * 507 + b"\r\n",  # 513 octets
        b"+OK capability list follows\r\nTOP\r\n",  # no final "."
        b"+OK top of message follows\r\n.dot\r\n.\r\n",  # not dot-stuffed
        b"+OK 5 octets\r\nab\r\n.\r\n",  # wrong octet count
        b"+OK hello\r\n",  # not a reply of the engine
        b"+OK \r\n",
        b"-ERR\r\n",
        b"+ not base64!\r\n",
        b"* 1\r\n",
    ],
)
def test_the_checker_finds_malformed_output(out: bytes) -> None:
    with pytest.raises((AssertionError, ValueError)):
        parse_responses(out)


def test_the_checker_knows_the_replies() -> None:
    capa = replies.multiline(replies.CAPA, ["TOP", "USER"])
    retr = replies.ok(replies.RETR.format(octets=SIZES[1])) + encode_message(MESSAGES[1])
    out = replies.ok() + capa + replies.err(replies.AUTH_FAILED) + replies.challenge("") + retr
    assert [(r.kind, r.body) for r in parse_responses(out)] == [
        ("+OK", None),
        ("+OK", [b"TOP", b"USER"]),
        ("-ERR", None),
        ("+", None),
        ("+OK", [b"Subject: two", b"", b".dot line", b"line 2", b"line 3"]),
    ]


# -- the greeting ---------------------------------------------------------------


def test_greeting_with_the_longest_hostname_fits_512_octets() -> None:
    host = "h" * 200  # the longest ServerOptions.hostname
    worst = f"<{2**22}.{'f' * 16}.{10**11 - 1}@{host}>"  # the largest Linux pid, a time in the year 5138
    for challenge in (_challenge(host), worst):
        conn = new_conn()
        conn.challenge = challenge
        greeting = conn.greeting(host)
        assert re.fullmatch(rb"\+OK POP3 server h{200} ready <\d+\.[0-9a-f]{16}\.\d+@h{200}>\r\n", greeting)
        assert len(greeting) <= MAX_STATUS_LINE
        assert parse_responses(greeting)[0].kind == "+OK"
    assert len(new_conn(apop=False).greeting(host)) <= MAX_STATUS_LINE
