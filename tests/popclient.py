"""A minimal POP3 client over any Trio stream, for tests that watch the wire."""

from __future__ import annotations

import trio


class PopClient:
    """Sends command lines and reads replies, exactly as they arrive."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buffer = bytearray()

    async def read_line(self) -> bytes:
        """One reply line with its CRLF; b"" once the server has closed."""
        while b"\r\n" not in self._buffer:
            data = await self.stream.receive_some(65536)
            if not data:
                rest = bytes(self._buffer)
                self._buffer.clear()
                return rest
            self._buffer += data
        line, _, rest = bytes(self._buffer).partition(b"\r\n")
        self._buffer[:] = rest
        return line + b"\r\n"

    async def read_multiline(self) -> bytes:
        """The body of a multi-line reply up to and including the ``.\\r\\n`` line."""
        out = b""
        while True:
            line = await self.read_line()
            if not line:
                raise EOFError("server closed inside a multi-line reply")
            out += line
            if line == b".\r\n":
                return out

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def command(self, line: str | bytes) -> bytes:
        """Send one command and return its first reply line."""
        raw = line.encode() if isinstance(line, str) else line
        await self.stream.send_all(raw + b"\r\n")
        return await self.read_line()

    async def login(self, user: str, password: str) -> bytes:
        assert (await self.command(f"USER {user}")).startswith(b"+OK")
        return await self.command(f"PASS {password}")

    async def at_eof(self) -> bool:
        """Whether the server has closed the connection (reads what is left)."""
        while True:
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                return True
            if not data:
                return True
            self._buffer += data
