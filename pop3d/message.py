"""How a stored message becomes the bytes of a RETR or TOP reply.

A message is sent in its *canonical form*: every line ends in CRLF (a bare LF
becomes CRLF; a lone CR is left alone) and the last line ends in CRLF too
(one is added when the stored message lacks it).  Octet counts (STAT, LIST,
``+OK N octets``) are the length of the canonical form, before dot-stuffing
(RFC 1939 section 11).  On the wire, every line that starts with ``.`` gets
one more ``.`` in front, and the reply ends with ``.\\r\\n``.

Nothing here does I/O: :class:`MessageWriter` takes chunks and returns bytes,
so a message of any size streams through in bounded memory.
"""

from __future__ import annotations

import re

__all__ = ["MessageWriter", "canonical_size", "encode_message"]

TERMINATOR = b".\r\n"
# A line that starts with a dot, after the first: faster with re than bytes.replace, whose
# search stumbles on every LF.
_DOT_AFTER_LF = re.compile(rb"\n\.")


def canonical_size(data: bytes) -> int:
    """The octet count of ``data`` in canonical form (CRLF line ends, final CRLF)."""
    size = len(data) + data.count(b"\n") - data.count(b"\r\n")
    if data and not data.endswith(b"\n"):
        size += 2
    return size


class MessageWriter:
    """Turns a message's chunks into the body of a RETR or TOP reply.

    ``body_lines=None`` sends the whole message (RETR); a number sends the
    headers, the blank line after them and that many body lines (TOP).
    Call :meth:`feed` for each chunk and send what it returns, then send what
    :meth:`finish` returns.  :attr:`done` turns true once TOP has all it
    needs, so the caller may stop reading.
    """

    def __init__(self, body_lines: int | None = None) -> None:
        self._body_lines = body_lines
        self._pending_cr = False  # a chunk ended in CR: its LF may come next
        self._at_line_start = True
        self._in_body = False
        self._sent_any = False
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        """Encode one chunk; returns the bytes to send (maybe empty)."""
        if self.done or not chunk:
            return b""
        if self._pending_cr:
            chunk = b"\r" + chunk
            self._pending_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._pending_cr = True
            if not chunk:
                return b""
        if self._body_lines is not None:
            # CRLF and LF both become CRLF; "\r\r\n" keeps its lone CR.
            text = chunk.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            return self._stuff(self._cut_for_top(text))
        # RETR, the bulk of the bytes: stuffed while the line ends are still
        # LF, then converted; three C passes, no Python loop per line.
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n")
        text = _DOT_AFTER_LF.sub(b"\n..", chunk)
        if self._at_line_start and text.startswith(b"."):
            text = b"." + text
        self._at_line_start = text.endswith(b"\n")
        self._sent_any = True
        return text.replace(b"\n", b"\r\n")

    def finish(self) -> bytes:
        """The bytes that end the reply: a missing final CRLF and ``.\\r\\n``."""
        tail = b""
        if self._pending_cr and not self.done:
            tail = self._stuff(b"\r")
            self._pending_cr = False
        if not self._at_line_start:
            tail += b"\r\n"
        self.done = True
        return tail + TERMINATOR

    def _stuff(self, text: bytes) -> bytes:
        if not text:
            return b""
        stuffed = text.replace(b"\n.", b"\n..")
        if self._at_line_start and stuffed.startswith(b"."):
            stuffed = b"." + stuffed
        self._at_line_start = stuffed.endswith(b"\n")
        self._sent_any = True
        return stuffed

    def _cut_for_top(self, text: bytes) -> bytes:
        """Keep the headers, the blank line and ``body_lines`` body lines."""
        assert self._body_lines is not None
        pos = 0
        at_start = self._at_line_start
        while pos < len(text):
            if self._in_body and self._body_lines == 0:
                self.done = True
                return text[:pos]
            end = text.find(b"\n", pos)
            if end < 0:
                break
            line_is_blank = at_start and end == pos + 1 and text[pos] == 0x0D
            if self._in_body:
                self._body_lines -= 1
            elif line_is_blank:
                self._in_body = True
            pos = end + 1
            at_start = True
        if self._in_body and self._body_lines == 0 and pos == len(text):
            self.done = True
        return text


def encode_message(data: bytes, body_lines: int | None = None) -> bytes:
    """The whole reply body for ``data`` at once (for tests and small messages)."""
    writer = MessageWriter(body_lines)
    return writer.feed(data) + writer.finish()
