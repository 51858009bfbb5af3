"""The PROXY protocol parser, with plain function calls.

Every valid header is fed whole, followed by the client's first bytes, and cut
short at every byte (which must ask for more).  Version 2 headers are built by
a small encoder here, from the spec's layout and socket.inet_pton, so that the
parser's own constants are not what checks them.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pop3d.proxy import MAX_HEADER, SIGNATURE_V2, ProxyError, ProxyHeader, parse_header, starts_like_header

# Written out from the spec, not taken from the module.
SIGNATURE = bytes.fromhex("0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A")
LOCAL, PROXY = 0x0, 0x1
UNSPEC, TCP4, UDP4, TCP6, UDP6, UNIX_STREAM, UNIX_DGRAM = 0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32
V2_CAP = 2048  # the address-and-TLV length the module promises to accept

FFFF6 = ":".join(["ffff"] * 8)
V1_TCP6_MAX = f"PROXY TCP6 {FFFF6} {FFFF6} 65535 65535\r\n".encode()
V1_UNKNOWN_MAX = f"PROXY UNKNOWN {FFFF6} {FFFF6} 65535 65535\r\n".encode()


def v2(command: int, family: int, body: bytes = b"", *, length: int | None = None, version: int = 2) -> bytes:
    """A version 2 header: signature, version/command, family, big-endian length, body."""
    size = len(body) if length is None else length
    return SIGNATURE + struct.pack("!BBH", version << 4 | command, family, size) + body


def inet(source: str, destination: str, sport: int, dport: int) -> bytes:
    """The address block for TCP/UDP over IPv4 or IPv6."""
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    return socket.inet_pton(family, source) + socket.inet_pton(family, destination) + struct.pack("!HH", sport, dport)


def unix(source: bytes, destination: bytes) -> bytes:
    """The address block for AF_UNIX: two paths, NUL-padded to 108 bytes."""
    return source.ljust(108, b"\0") + destination.ljust(108, b"\0")


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


TLVS = (
    tlv(0x01, b"pop3")  # ALPN
    + tlv(0x02, b"mail.example.com")  # AUTHORITY (SNI)
    + tlv(0x20, struct.pack("!BI", 0x01, 0) + tlv(0x21, b"TLSv1.3") + tlv(0x23, b"TLS_AES_128_GCM_SHA256"))  # SSL
    + tlv(0x05, bytes(range(128)))  # UNIQUE_ID
    + tlv(0x04, b"")  # NOOP
)


def h(
    version: int,
    length: int,
    source: tuple[str, int] | None = None,
    destination: tuple[str, int] | None = None,
    *,
    local: bool = False,
) -> ProxyHeader:
    return ProxyHeader(version=version, source=source, destination=destination, length=length, local=local)


VALID: dict[str, tuple[bytes, ProxyHeader]] = {
    # Version 1, from the spec's examples and limits.
    "v1 spec example": (
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        h(1, 47, ("192.168.0.1", 56324), ("192.168.0.11", 443)),
    ),
    "v1 TCP4 longest": (
        b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
        h(1, 56, ("255.255.255.255", 65535), ("255.255.255.255", 65535)),
    ),
    "v1 TCP4 zero ports": (b"PROXY TCP4 0.0.0.0 10.0.0.1 0 0\r\n", h(1, 33, ("0.0.0.0", 0), ("10.0.0.1", 0))),
    "v1 TCP6 longest": (
        V1_TCP6_MAX,
        h(1, 104, ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535), (FFFF6, 65535)),
    ),
    "v1 TCP6 compressed": (
        b"PROXY TCP6 2001:DB8::1 ::1 50000 110\r\n",
        h(1, 38, ("2001:db8::1", 50000), ("::1", 110)),
    ),
    "v1 TCP6 IPv4-mapped": (
        b"PROXY TCP6 ::ffff:192.0.2.7 ::ffff:c000:201 1234 995\r\n",
        h(1, 54, ("::ffff:192.0.2.7", 1234), ("::ffff:192.0.2.1", 995)),
    ),
    "v1 UNKNOWN short": (b"PROXY UNKNOWN\r\n", h(1, 15)),
    "v1 UNKNOWN longest": (V1_UNKNOWN_MAX, h(1, 107)),
    "v1 UNKNOWN anything": (b"PROXY UNKNOWN  whatever \x00\xff junk\r\n", h(1, 33)),
    # Version 2.  A header HAProxy sent to netcat (github.com/seriousben/experiment-proxy-protocol).
    "v2 captured": (
        bytes.fromhex("0d0a0d0a000d0a515549540a2111000cac130001ac130003a6520050"),
        h(2, 28, ("172.19.0.1", 42578), ("172.19.0.3", 80)),
    ),
    "v2 TCP4": (
        v2(PROXY, TCP4, inet("192.0.2.7", "198.51.100.1", 40000, 110)),
        h(2, 28, ("192.0.2.7", 40000), ("198.51.100.1", 110)),
    ),
    "v2 UDP4": (
        v2(PROXY, UDP4, inet("192.0.2.7", "198.51.100.1", 53, 5353)),
        h(2, 28, ("192.0.2.7", 53), ("198.51.100.1", 5353)),
    ),
    "v2 TCP6": (
        v2(PROXY, TCP6, inet("2001:db8::7", "2001:db8::1:0:0:1", 65535, 995)),
        h(2, 52, ("2001:db8::7", 65535), ("2001:db8::1:0:0:1", 995)),
    ),
    "v2 UDP6": (v2(PROXY, UDP6, inet("::1", "::2", 1, 2)), h(2, 52, ("::1", 1), ("::2", 2))),
    "v2 TCP6 IPv4-mapped": (
        v2(PROXY, TCP6, inet("::ffff:192.0.2.7", "::ffff:192.0.2.1", 1234, 110)),
        h(2, 52, ("::ffff:192.0.2.7", 1234), ("::ffff:192.0.2.1", 110)),
    ),
    "v2 TCP4 with TLVs": (
        v2(PROXY, TCP4, inet("203.0.113.9", "10.0.0.1", 1, 995) + TLVS),
        h(2, 28 + len(TLVS), ("203.0.113.9", 1), ("10.0.0.1", 995)),
    ),
    "v2 TCP4 at the length cap": (
        v2(PROXY, TCP4, inet("203.0.113.9", "10.0.0.1", 1, 995) + tlv(0x04, bytes(V2_CAP - 12 - 3))),
        h(2, 16 + V2_CAP, ("203.0.113.9", 1), ("10.0.0.1", 995)),
    ),
    "v2 LOCAL": (v2(LOCAL, UNSPEC), h(2, 16, local=True)),
    "v2 LOCAL ignores TCP4 addresses": (v2(LOCAL, TCP4, inet("192.0.2.7", "192.0.2.1", 1, 2)), h(2, 28, local=True)),
    "v2 LOCAL with a family and no addresses": (v2(LOCAL, TCP6), h(2, 16, local=True)),
    "v2 LOCAL with TLVs": (v2(LOCAL, UNSPEC, TLVS), h(2, 16 + len(TLVS), local=True)),
    "v2 PROXY UNSPEC": (v2(PROXY, UNSPEC), h(2, 16)),
    "v2 PROXY UNSPEC with bytes": (v2(PROXY, UNSPEC, b"\x01\x02\x03"), h(2, 19)),
    "v2 UNIX stream": (v2(PROXY, UNIX_STREAM, unix(b"/run/client", b"/run/pop3.sock")), h(2, 232)),
    "v2 UNIX datagram with TLVs": (v2(PROXY, UNIX_DGRAM, unix(b"/a", b"/b") + TLVS), h(2, 232 + len(TLVS))),
}

# The client's first bytes after the header: a POP3 command, a TLS ClientHello, another header.
TRAILERS = [b"CAPA\r\n", bytes.fromhex("16030102000100"), b"PROXY UNKNOWN\r\n", SIGNATURE]


@pytest.mark.parametrize(("data", "expected"), VALID.values(), ids=VALID.keys())
def test_valid_whole(data: bytes, expected: ProxyHeader) -> None:
    assert parse_header(data) == expected
    assert expected.length == len(data)


@pytest.mark.parametrize(("data", "expected"), VALID.values(), ids=VALID.keys())
@pytest.mark.parametrize("trailer", TRAILERS, ids=["capa", "tls", "v1", "v2"])
def test_valid_leaves_trailing_bytes(data: bytes, expected: ProxyHeader, trailer: bytes) -> None:
    assert parse_header(data + trailer) == expected


@pytest.mark.parametrize(("data", "expected"), VALID.values(), ids=VALID.keys())
def test_valid_every_prefix_needs_more(data: bytes, expected: ProxyHeader) -> None:
    for end in range(len(data)):
        assert parse_header(data[:end]) is None, data[:end]


@pytest.mark.parametrize(("data", "expected"), VALID.values(), ids=VALID.keys())
def test_valid_starts_like_header(data: bytes, expected: ProxyHeader) -> None:
    assert starts_like_header(data)
    assert all(starts_like_header(data[:end]) for end in range(len(data)))


def v1_with(src: str = "192.168.0.1", dst: str = "192.168.0.11", sport: str = "56324", dport: str = "443") -> bytes:
    return f"PROXY TCP4 {src} {dst} {sport} {dport}\r\n".encode()


TCP4_BLOCK = inet("192.0.2.7", "192.0.2.1", 1, 2)
INVALID: dict[str, bytes] = {
    # Not a header at all.
    "POP3 command": b"CAPA\r\n",
    "USER": b"USER x\r\n",
    "TLS ClientHello": bytes.fromhex("1603010200010001fc0303"),
    "empty line": b"\r\n\r\nCAPA\r\n",
    # Version 1.
    "lowercase proxy": b"proxy TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
    "lowercase protocol": b"PROXY tcp4 192.168.0.1 192.168.0.11 56324 443\r\n",
    "PROXY alone": b"PROXY\r\n",
    "no protocol": b"PROXY \r\n",
    "protocol cut short": b"PROXY TCP\r\n",
    "protocol UDP4": b"PROXY UDP4 192.168.0.1 192.168.0.11 56324 443\r\n",
    "UNKNOWN run on": b"PROXY UNKNOWNX\r\n",
    "port 65536": v1_with(dport="65536"),
    "port 99999": v1_with(sport="99999"),
    "port +443": v1_with(dport="+443"),
    "port -1": v1_with(sport="-1"),
    "port leading zero": v1_with(dport="0443"),
    "port hex": v1_with(dport="0x1bb"),
    "port six digits": v1_with(dport="100000"),
    "address 1.2.3": v1_with(src="1.2.3"),
    "address 256": v1_with(dst="192.168.0.256"),
    "address leading zero": v1_with(src="192.168.000.1"),
    "address hostname": v1_with(src="localhost"),
    "TCP4 with IPv6": v1_with(src="::1"),
    "TCP6 with IPv4": b"PROXY TCP6 192.168.0.1 ::1 56324 443\r\n",
    "TCP6 scope id": b"PROXY TCP6 fe80::1%eth0 ::1 56324 443\r\n",
    "TCP6 too many groups": b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 56324 443\r\n",
    "double space": b"PROXY TCP4 192.168.0.1  192.168.0.11 56324 443\r\n",
    "double space after PROXY": b"PROXY  TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
    "trailing space": b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443 \r\n",
    "tab": b"PROXY TCP4 192.168.0.1\t192.168.0.11 56324 443\r\n",
    "missing port": b"PROXY TCP4 192.168.0.1 192.168.0.11 56324\r\n",
    "extra field": b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443 1\r\n",
    "LF without CR": b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\n",
    "CR without LF": b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\rCAPA\r\n",
    "LF inside UNKNOWN": b"PROXY UNKNOWN a\nb\r\n",
    "UNKNOWN 108 bytes": V1_UNKNOWN_MAX[:-2] + b"5\r\n",
    "no CRLF within 107 bytes": b"PROXY UNKNOWN " + b"x" * 200 + b"\r\n",
    # Version 2.
    "bad signature byte": SIGNATURE[:7] + b"q" + SIGNATURE[8:] + b"\x21\x11\x00\x0c" + TCP4_BLOCK,
    "signature without NUL": SIGNATURE.replace(b"\0", b" ") + b"\x21\x11\x00\x0c" + TCP4_BLOCK,
    "version 1 nibble": v2(PROXY, TCP4, TCP4_BLOCK, version=1),
    "version 3 nibble": v2(PROXY, TCP4, TCP4_BLOCK, version=3),
    "command 2": v2(0x2, TCP4, TCP4_BLOCK),
    "command 0xf": v2(0xF, TCP4, TCP4_BLOCK),
    "family 4": v2(PROXY, 0x41, TCP4_BLOCK),
    "protocol 3": v2(PROXY, 0x13, TCP4_BLOCK),
    "UNSPEC family with STREAM": v2(PROXY, 0x01),
    "TCP4 length 11": v2(PROXY, TCP4, TCP4_BLOCK[:11]),
    "TCP4 length 0": v2(PROXY, TCP4),
    "TCP6 with IPv4 block": v2(PROXY, TCP6, TCP4_BLOCK),
    "UNIX with IPv6 block": v2(PROXY, UNIX_STREAM, inet("::1", "::2", 1, 2)),
    "length over the cap": v2(PROXY, TCP4, TCP4_BLOCK + tlv(0x04, bytes(V2_CAP - 12 - 2))),
    "length 65535": v2(PROXY, UNSPEC, bytes(0xFFFF)),
}


@pytest.mark.parametrize("data", INVALID.values(), ids=INVALID.keys())
def test_invalid(data: bytes) -> None:
    with pytest.raises(ProxyError) as info:
        parse_header(data)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("data", INVALID.values(), ids=INVALID.keys())
def test_invalid_never_accepted_with_more_bytes(data: bytes) -> None:
    """Once refused, always refused: no prefix of a refused input is a complete header."""
    for end in range(len(data) + 1):
        try:
            result = parse_header(data[:end])
        except ProxyError:
            break
        assert result is None, data[:end]
    else:
        pytest.fail("never refused")


# Garbage is refused as soon as it cannot start a header, before any CRLF or length.
EARLY: dict[str, bytes] = {
    "lowercase": b"proxy",
    "not P": b"X",
    "doubled space": b"PROXY  ",
    "bad protocol": b"PROXY TCP5",
    "bad address character": b"PROXY TCP4 192.168.0.1x",
    "bad complete address": b"PROXY TCP4 1.2.3 ",
    "IPv6 in TCP4": b"PROXY TCP4 ::1",
    "bad port character": b"PROXY TCP4 1.2.3.4 5.6.7.8 +",
    "leading zero port": b"PROXY TCP4 1.2.3.4 5.6.7.8 01",
    "port too large": b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 ",
    "bad line ending": b"PROXY TCP4 1.2.3.4\r",
    "no room for CRLF": b"PROXY UNKNOWN " + b"x" * 92,
    "signature": b"\r\n\r\n\x01",
    "version nibble": SIGNATURE + b"\x11",
    "command": SIGNATURE + b"\x22",
    "family": SIGNATURE + b"\x21\x14",
    "length over the cap": SIGNATURE + b"\x21\x11" + struct.pack("!H", V2_CAP + 1),
    "length short": SIGNATURE + b"\x21\x21\x00\x0c",
}


@pytest.mark.parametrize("data", EARLY.values(), ids=EARLY.keys())
def test_refused_early(data: bytes) -> None:
    with pytest.raises(ProxyError):
        parse_header(data)


def test_no_room_for_crlf_boundary() -> None:
    # A 105-byte unfinished line may still end in a CRLF within 107 bytes; a 106-byte one may not.
    line = b"PROXY UNKNOWN " + b"x" * 91
    assert len(line) == 105
    assert parse_header(line) is None
    assert parse_header(line + b"\r\n") == h(1, 107)
    with pytest.raises(ProxyError, match="107"):
        parse_header(line + b"x")
    with pytest.raises(ProxyError, match="107"):
        parse_header(line + b"x\r\n")


def test_constants() -> None:
    assert SIGNATURE_V2 == SIGNATURE == b"\r\n\r\n\x00\r\nQUIT\n"
    assert MAX_HEADER == 16 + V2_CAP
    assert len(V1_UNKNOWN_MAX) == 107 < MAX_HEADER
    assert issubclass(ProxyError, ValueError)


def test_v2_max_header() -> None:
    body = TCP4_BLOCK + tlv(0x04, bytes(MAX_HEADER - 16 - 12 - 3))
    header = parse_header(v2(PROXY, TCP4, body))
    assert header is not None and header.length == MAX_HEADER
    # One byte short of a header that would be too long: already refused.
    with pytest.raises(ProxyError):
        parse_header(v2(PROXY, TCP4, body + b"\0")[:MAX_HEADER])


def test_header_is_frozen() -> None:
    header = parse_header(b"PROXY UNKNOWN\r\n")
    assert header is not None
    with pytest.raises(AttributeError):
        header.length = 0  # type: ignore[misc]


def test_ipv4_mapped_source_stays_ipv6() -> None:
    for data in (VALID["v1 TCP6 IPv4-mapped"][0], VALID["v2 TCP6 IPv4-mapped"][0]):
        header = parse_header(data)
        assert header is not None and header.source is not None
        address = ipaddress.ip_address(header.source[0])
        assert isinstance(address, ipaddress.IPv6Address)
        assert address.ipv4_mapped == ipaddress.IPv4Address("192.0.2.7")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n", True),
        (SIGNATURE_V2 + b"\x21\x11\x00\x0c", True),
        (SIGNATURE_V2, True),
        (b"", True),
        (b"P", True),
        (b"PRO", True),
        (b"PROXY", True),
        (b"PROXY ", True),
        (b"\r", True),
        (b"\r\n\r\n", True),
        (b"\r\n\r\n\x00\r\nQU", True),
        (b"CAPA\r\n", False),
        (b"USER x\r\n", False),
        (b"PROXYX", False),
        (b"proxy ", False),
        (b"PR0XY ", False),
        (b"\r\n\r\nCAPA\r\n", False),
        (b"\n", False),
        (bytes.fromhex("160301"), False),
    ],
)
def test_starts_like_header(data: bytes, expected: bool) -> None:
    assert starts_like_header(data) is expected


# Properties: generated headers round-trip, and no input raises anything but ProxyError.

ports = st.integers(0, 0xFFFF)


@given(st.ip_addresses(v=4), st.ip_addresses(v=4), ports, ports, st.binary(max_size=20))
def test_v1_tcp4_round_trip(
    src: ipaddress.IPv4Address, dst: ipaddress.IPv4Address, sport: int, dport: int, rest: bytes
) -> None:
    line = f"PROXY TCP4 {src} {dst} {sport} {dport}\r\n".encode()
    assert parse_header(line + rest) == h(1, len(line), (str(src), sport), (str(dst), dport))


@given(st.ip_addresses(v=6), st.ip_addresses(v=6), ports, ports, st.booleans())
def test_v1_tcp6_round_trip(
    src: ipaddress.IPv6Address, dst: ipaddress.IPv6Address, sport: int, dport: int, exploded: bool
) -> None:
    def text(address: ipaddress.IPv6Address) -> str:
        return address.exploded if exploded else address.compressed

    line = f"PROXY TCP6 {text(src)} {text(dst)} {sport} {dport}\r\n".encode()
    header = parse_header(line)
    assert header is not None and header.source is not None and header.destination is not None
    assert (ipaddress.ip_address(header.source[0]), header.source[1]) == (src, sport)
    assert (ipaddress.ip_address(header.destination[0]), header.destination[1]) == (dst, dport)
    assert header.length == len(line)


@given(
    st.sampled_from([4, 6]).flatmap(lambda v: st.tuples(st.ip_addresses(v=v), st.ip_addresses(v=v))),
    ports,
    ports,
    st.booleans(),
    st.binary(max_size=300),
)
def test_v2_round_trip(
    addresses: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...],
    sport: int,
    dport: int,
    udp: bool,
    tlvs: bytes,
) -> None:
    src, dst = addresses
    family = (0x10 if src.version == 4 else 0x20) | (0x2 if udp else 0x1)
    data = v2(PROXY, family, inet(str(src), str(dst), sport, dport) + tlvs)
    header = parse_header(data + b"CAPA\r\n")
    assert header is not None and header.source is not None and header.destination is not None
    assert (ipaddress.ip_address(header.source[0]), header.source[1]) == (src, sport)
    assert (ipaddress.ip_address(header.destination[0]), header.destination[1]) == (dst, dport)
    assert header.length == len(data)


@given(st.sampled_from([b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN", SIGNATURE]), st.binary())
def test_any_bytes(prefix: bytes, rest: bytes) -> None:
    data = prefix + rest
    try:
        header = parse_header(data)
    except ProxyError as error:
        assert "\n" not in str(error)
        return
    if header is not None:
        assert header.length <= min(len(data), MAX_HEADER)
        assert parse_header(data[: header.length]) == header
        assert all(parse_header(data[:end]) is None for end in range(header.length))
