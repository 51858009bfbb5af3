"""The PROXY protocol (HAProxy's proxy-protocol.txt, versions 1 and 2): bytes in, header out.

A load balancer or TLS terminator in front of the server opens each connection
with one PROXY header saying whose connection it relays; without it the
server would see only the proxy's address.  :func:`parse_header` reads that
header from the first bytes of a connection and does no I/O: the caller reads
until it returns a :class:`ProxyHeader` (or raises :class:`ProxyError`), drops
:attr:`ProxyHeader.length` bytes and treats the rest as the client's own data.

Version 1 is one line of text, version 2 a binary block; both are accepted
wherever a header is expected.  The spec forbids guessing whether a header is
present: only a trusted proxy may send one, and on a listener that expects
none, :func:`starts_like_header` lets the server refuse a client that sends
one anyway (a proxy sent to the wrong port, or a client posing as one).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

__all__ = ["MAX_HEADER", "SIGNATURE_V2", "ProxyError", "ProxyHeader", "parse_header", "starts_like_header"]

SIGNATURE_V2 = b"\r\n\r\n\x00\r\nQUIT\n"
"""The 12 bytes that open a version 2 header."""

_V1_PREFIX = b"PROXY "
# The longest version 1 line, CRLF included: "PROXY UNKNOWN" followed by two
# full-length IPv6 addresses and two 5-digit ports (spec section 2.1).
_V1_MAX = 107
# Signature, version/command, family/protocol, 2-byte length.
_V2_FIXED = 16
# The most a version 2 header may announce after its fixed part.  The field
# allows 65535, but the addresses take at most 216 bytes (two Unix paths) and
# the TLVs real proxies send (HAProxy's SSL details, SNI, ALPN, a unique ID of
# up to 128 bytes, AWS and Azure endpoint IDs) a few hundred more.  2 KiB holds
# all of them with room to spare, and bounds what a connection may make the
# server buffer before it has proved to be a proxy at all.
_V2_MAX_LENGTH = 2048

MAX_HEADER = _V2_FIXED + _V2_MAX_LENGTH
"""The most bytes a PROXY header may take (a version 1 line takes at most 107).

A caller that buffers this much without a result has a bug: :func:`parse_header`
decides before then.
"""

_LOCAL, _PROXY = 0x0, 0x1
# Family/protocol byte: the size of its address block.  These are the only
# combinations the spec defines; it says to reject any other value.
_V2_ADDRESS_SIZE = {
    0x00: 0,  # UNSPEC
    0x11: 12,  # TCP over IPv4: 2 * 4 + 2 * 2
    0x12: 12,  # UDP over IPv4
    0x21: 36,  # TCP over IPv6: 2 * 16 + 2 * 2
    0x22: 36,  # UDP over IPv6
    0x31: 216,  # Unix stream: 2 * 108
    0x32: 216,  # Unix datagram
}

_V1_PROTOCOLS = (b"TCP4", b"TCP6", b"UNKNOWN")
# The spec forbids leading zeroes in ports (they could be read as octal).
_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
# What an unfinished field may hold so far, to refuse garbage before the CRLF.
# Both patterns also match every prefix of what they allow.
_PORT_SO_FAR = re.compile(rb"(?:0|[1-9][0-9]{0,4})?")
_ADDRESS_SO_FAR = {4: re.compile(rb"[0-9.]{0,15}"), 6: re.compile(rb"[0-9A-Fa-f:.]{0,45}")}


class ProxyError(ValueError):
    """The bytes are not a PROXY header (or a malformed one); the message is one line."""


@dataclass(frozen=True, kw_only=True)
class ProxyHeader:
    """A complete PROXY header.

    ``source`` and ``destination`` are None when the header carries no usable
    address (version 1 ``UNKNOWN``; version 2 ``LOCAL``, ``AF_UNSPEC`` or
    ``AF_UNIX``): the caller then uses the connection's own endpoints, as the
    spec asks.  Hosts are IP addresses in their compressed form; an IPv4-mapped
    IPv6 address stays IPv6 (written ``::ffff:192.0.2.7``).
    """

    version: int
    """1 (text) or 2 (binary)."""
    source: tuple[str, int] | None
    """The real client, as ``(host, port)``."""
    destination: tuple[str, int] | None
    """The address the client connected to, as ``(host, port)``."""
    length: int
    """Bytes the header takes, to skip before the client's own data."""
    local: bool = False
    """A version 2 ``LOCAL`` header: the proxy speaks for itself (a health check), not for a client."""


def parse_header(data: bytes) -> ProxyHeader | None:
    """Parse a PROXY header at the start of ``data``.

    Returns None if more bytes are needed: ``data`` is a prefix of a possible
    header, shorter than :data:`MAX_HEADER`.  Bytes after the header are left
    alone.  Raises :class:`ProxyError` if ``data`` cannot start a header or the
    header is malformed or too long; garbage is refused as soon as it is seen,
    not only once the header should have ended.
    """
    if not data:
        return None
    if _could_start(data, SIGNATURE_V2):
        return _parse_v2(data)
    if _could_start(data, _V1_PREFIX):
        return _parse_v1(data)
    raise ProxyError("data does not start with a PROXY header")


def starts_like_header(data: bytes) -> bool:
    """Whether ``data`` begins, or if short could begin, like a PROXY header of either version.

    That is ``b"PROXY "`` or :data:`SIGNATURE_V2`, or a prefix of one of them
    (so empty ``data`` is True).  For refusing a header from an untrusted
    client: no POP3 command starts this way.
    """
    return _could_start(data, _V1_PREFIX) or _could_start(data, SIGNATURE_V2)


def _could_start(data: bytes, prefix: bytes) -> bool:
    """Whether ``data`` starts with ``prefix``, or is a prefix of it."""
    return data[: len(prefix)] == prefix[: len(data)]


def _parse_v1(data: bytes) -> ProxyHeader | None:
    """A version 1 header at the start of ``data``, which could start one; None if unfinished."""
    head = data[:_V1_MAX]
    cr = head.find(b"\r")
    lf = head.find(b"\n")
    # The spec: a lone CR or LF must not be taken for the end of the line.
    if lf != -1 and (cr == -1 or lf < cr):
        raise ProxyError("PROXY v1 line has LF without CR")
    if cr == -1 or cr > _V1_MAX - 2:
        if len(data) >= _V1_MAX - 1:  # no room left for the CRLF
            raise ProxyError(f"PROXY v1 line has no CRLF within {_V1_MAX} bytes")
        _v1_addresses(data, complete=False)
        return None
    addresses = _v1_addresses(data[:cr], complete=True)
    if len(data) == cr + 1:
        return None
    if data[cr + 1] != ord("\n"):
        raise ProxyError("PROXY v1 line has CR without LF")
    source, destination = addresses or (None, None)
    return ProxyHeader(version=1, source=source, destination=destination, length=cr + 2)


def _v1_addresses(line: bytes, *, complete: bool) -> tuple[tuple[str, int], tuple[str, int]] | None:
    """Source and destination from a version 1 line without its CRLF.

    None for UNKNOWN, or for an unfinished line (``complete`` false) that is
    valid so far.  Raises :class:`ProxyError` for anything else.
    """
    if not line.startswith(_V1_PREFIX):
        if complete or not _V1_PREFIX.startswith(line):
            raise ProxyError("PROXY v1 line does not start with 'PROXY '")
        return None
    # Splitting on single spaces makes any doubled, leading or trailing space an
    # empty field, which no check below accepts.
    fields = line[len(_V1_PREFIX) :].split(b" ")
    protocol = fields[0]
    if len(fields) == 1 and not complete:
        if not any(known.startswith(protocol) for known in _V1_PROTOCOLS):
            raise ProxyError(f"PROXY v1 protocol {protocol!r} is not TCP4, TCP6 or UNKNOWN")
        return None
    if protocol == b"UNKNOWN":
        return None  # the spec: ignore whatever follows, up to the CRLF
    if protocol not in _V1_PROTOCOLS:
        raise ProxyError(f"PROXY v1 protocol {protocol!r} is not TCP4, TCP6 or UNKNOWN")
    if len(fields) > 5 or (complete and len(fields) < 5):
        raise ProxyError(f"PROXY v1 {protocol.decode()} line needs 4 fields separated by single spaces")
    version = 4 if protocol == b"TCP4" else 6
    done = fields[1:] if complete else fields[1:-1]
    hosts = [_v1_host(field, version) for field in done[:2]]
    ports = [_v1_port(field) for field in done[2:]]
    if not complete:
        slot = len(fields) - 2  # 0, 1: an address; 2, 3: a port
        pattern = _ADDRESS_SO_FAR[version] if slot < 2 else _PORT_SO_FAR
        if not pattern.fullmatch(fields[-1]):
            what = "address" if slot < 2 else "port"
            raise ProxyError(f"PROXY v1 {what} {fields[-1]!r} is malformed")
        return None
    return (hosts[0], ports[0]), (hosts[1], ports[1])


def _v1_host(field: bytes, version: int) -> str:
    """The IPv4 or IPv6 address ``field`` is, formatted as the module says."""
    # ipaddress alone would take a scope ID ("fe80::1%eth0") or non-ASCII digits.
    if _ADDRESS_SO_FAR[version].fullmatch(field):
        try:
            address: ipaddress.IPv4Address | ipaddress.IPv6Address
            if version == 4:
                address = ipaddress.IPv4Address(field.decode("ascii"))
            else:
                address = ipaddress.IPv6Address(field.decode("ascii"))
        except ValueError:
            pass  # ipaddress refuses leading zeroes ("010.0.0.1") too, as the spec asks
        else:
            return _format(address)
    raise ProxyError(f"PROXY v1 address {field!r} is not an IPv{version} address")


def _v1_port(field: bytes) -> int:
    """The port ``field`` is: decimal, no sign, no leading zero, at most 65535."""
    if _PORT.fullmatch(field) and int(field) <= 0xFFFF:
        return int(field)
    raise ProxyError(f"PROXY v1 port {field!r} is not a port number")


def _parse_v2(data: bytes) -> ProxyHeader | None:
    """A version 2 header at the start of ``data``, which could start one; None if unfinished.

    Each byte of the fixed part is checked as soon as it is there.
    """
    if len(data) <= len(SIGNATURE_V2):
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        raise ProxyError(f"PROXY v2 header has version {version}, not 2")
    if command not in (_LOCAL, _PROXY):
        raise ProxyError(f"PROXY v2 header has unknown command {command:#x}")
    if len(data) < 14:
        return None
    family = data[13]
    if family not in _V2_ADDRESS_SIZE:
        raise ProxyError(f"PROXY v2 header has unknown address family and protocol {family:#04x}")
    if len(data) < _V2_FIXED:
        return None
    length = int.from_bytes(data[14:16], "big")
    if length > _V2_MAX_LENGTH:
        raise ProxyError(f"PROXY v2 header announces {length} bytes, more than {_V2_MAX_LENGTH}")
    # LOCAL (a health check from the proxy itself) carries no address whatever
    # the family says: the spec tells the receiver to ignore the family then.
    if command == _PROXY and length < _V2_ADDRESS_SIZE[family]:
        raise ProxyError(f"PROXY v2 header announces {length} bytes, too few for family {family:#04x}")
    if len(data) < _V2_FIXED + length:
        return None
    source = destination = None
    # UDP families give their addresses as TCP ones do: the block has the same
    # layout and its source is still the client the proxy relays.  Refusing
    # would turn a valid if odd header into lost connections; the spec asks a
    # receiver that does not support a protocol to fall back to UNSPEC instead.
    if command == _PROXY and family >> 4 in (1, 2):
        size = 4 if family >> 4 == 1 else 16
        block = data[_V2_FIXED : _V2_FIXED + 2 * size + 4]
        hosts = [_format(ipaddress.ip_address(block[i * size : (i + 1) * size])) for i in (0, 1)]
        ports = [int.from_bytes(block[2 * size + i * 2 : 2 * size + i * 2 + 2], "big") for i in (0, 1)]
        source, destination = (hosts[0], ports[0]), (hosts[1], ports[1])
    # Whatever follows the addresses is TLVs (SSL details, SNI, ...), which the
    # spec lets a receiver skip: length already covers them.
    return ProxyHeader(
        version=2, source=source, destination=destination, length=_V2_FIXED + length, local=command == _LOCAL
    )


def _format(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """``address`` compressed; an IPv4-mapped one as ``::ffff:192.0.2.7`` on every Python version."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return f"::ffff:{address.ipv4_mapped}"
    return str(address)
