"""Message encoding: canonical form, dot-stuffing, TOP, exact sizes, any chunking."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3d.message import MessageWriter, canonical_size, encode_message

CASES: list[tuple[str, bytes, bytes]] = [
    ("empty", b"", b".\r\n"),
    ("LF", b"a\nb\n", b"a\r\nb\r\n.\r\n"),
    ("CRLF", b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
    ("mixed", b"a\r\nb\nc\r\n", b"a\r\nb\r\nc\r\n.\r\n"),
    ("no final newline", b"a\nb", b"a\r\nb\r\n.\r\n"),
    ("first line dot", b".hidden\nx\n", b"..hidden\r\nx\r\n.\r\n"),
    ("lone dot line", b"a\n.\nb\n", b"a\r\n..\r\nb\r\n.\r\n"),
    ("dot after CRLF", b"a\r\n..x\r\n", b"a\r\n...x\r\n.\r\n"),
    ("lone CR kept", b"a\rb\n", b"a\rb\r\n.\r\n"),
    ("CR before CRLF kept", b"a\r\r\nb\n", b"a\r\r\nb\r\n.\r\n"),
    ("trailing lone CR", b"a\r", b"a\r\r\n.\r\n"),
    ("8-bit", b"caf\xe9\n\xff\xfe\n", b"caf\xe9\r\n\xff\xfe\r\n.\r\n"),
    ("blank lines", b"\n\n", b"\r\n\r\n.\r\n"),
]


def unstuff(wire: bytes) -> bytes:
    """What a client gets back: the reply body without stuffing and terminator."""
    assert wire.endswith(b".\r\n")
    body = wire[:-3]
    lines = body.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


@pytest.mark.parametrize(("data", "wire"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_encoding(data: bytes, wire: bytes) -> None:
    assert encode_message(data) == wire


@pytest.mark.parametrize(("data", "wire"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_encoding_one_byte_at_a_time(data: bytes, wire: bytes) -> None:
    writer = MessageWriter()
    out = b"".join(writer.feed(data[i : i + 1]) for i in range(len(data))) + writer.finish()
    assert out == wire


@pytest.mark.parametrize(("data", "wire"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_size_is_what_the_client_receives(data: bytes, wire: bytes) -> None:
    assert canonical_size(data) == len(unstuff(wire))


def test_random_messages_any_chunking() -> None:
    rng = random.Random(1939)
    alphabet = b"ab.\r\n\n\xff"
    for _ in range(300):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 60)))
        whole = encode_message(data)
        writer = MessageWriter()
        out = b""
        pos = 0
        while pos < len(data):
            step = rng.randrange(1, 8)
            out += writer.feed(data[pos : pos + step])
            pos += step
        out += writer.finish()
        assert out == whole, data
        assert len(unstuff(whole)) == canonical_size(data), data
        # No line of the body is a lone "." (it would end the reply early).
        assert b"\r\n.\r\n" not in b"\r\n" + whole[:-3]


TOP_MESSAGE = b"From: a\nSubject: b\n\nline1\n.line2\nline3\n"


@pytest.mark.parametrize(
    ("lines", "wire"),
    [
        (0, b"From: a\r\nSubject: b\r\n\r\n.\r\n"),
        (1, b"From: a\r\nSubject: b\r\n\r\nline1\r\n.\r\n"),
        (2, b"From: a\r\nSubject: b\r\n\r\nline1\r\n..line2\r\n.\r\n"),
        (3, b"From: a\r\nSubject: b\r\n\r\nline1\r\n..line2\r\nline3\r\n.\r\n"),
        (99, b"From: a\r\nSubject: b\r\n\r\nline1\r\n..line2\r\nline3\r\n.\r\n"),
    ],
)
def test_top(lines: int, wire: bytes) -> None:
    assert encode_message(TOP_MESSAGE, lines) == wire
    writer = MessageWriter(lines)
    out = b"".join(writer.feed(TOP_MESSAGE[i : i + 1]) for i in range(len(TOP_MESSAGE))) + writer.finish()
    assert out == wire


def test_top_without_body_separator_sends_the_headers() -> None:
    assert encode_message(b"From: a\nSubject: b", 0) == b"From: a\r\nSubject: b\r\n.\r\n"


def test_top_stops_reading_when_done() -> None:
    writer = MessageWriter(1)
    writer.feed(b"H: v\n\nbody1\n")
    assert writer.done
    assert writer.feed(b"more\n") == b""
    assert writer.finish() == b".\r\n"


def test_blank_line_split_across_chunks_with_crlf() -> None:
    writer = MessageWriter(0)
    out = writer.feed(b"H: v\r") + writer.feed(b"\n\r") + writer.feed(b"\nbody\r\n") + writer.finish()
    assert out == b"H: v\r\n\r\n.\r\n"


def reference_encoding(data: bytes) -> bytes:
    """RFC 1939 by the letter, line by line: CRLF line ends, a final CRLF, dot-stuffing, the end."""
    text = data.replace(b"\r\n", b"\n")
    lines = text.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the message ended with a line end
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines) + b".\r\n"


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.sampled_from([b"a", b".", b"\n", b"\r", b"\r\n", b"..", b"\n.", b"x" * 5]), max_size=60),
    st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=10),
)
def test_any_chunking_gives_the_reference_encoding(parts: list[bytes], cuts: list[int]) -> None:
    data = b"".join(parts)
    writer = MessageWriter()
    out, pos, n = b"", 0, 0
    while pos < len(data):
        step = cuts[n % len(cuts)]
        out += writer.feed(data[pos : pos + step])
        pos, n = pos + step, n + 1
    out += writer.finish()
    assert out == reference_encoding(data)
    assert out == encode_message(data)
    # What a client reads back (the end line removed, each stuffed dot dropped) is canonical_size long.
    body = out[: -len(b".\r\n")]
    unstuffed = sum(len(line) - line.startswith(b".") for line in body.split(b"\r\n")) + 2 * body.count(b"\r\n")
    assert unstuffed == canonical_size(data)
