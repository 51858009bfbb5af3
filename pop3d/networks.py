"""Client addresses and the networks they belong to.

``cleartext_auth_from`` (and, later, other per-address rules) name networks
in CIDR form.  :func:`parse_networks` reads them from what a user writes;
:func:`address_in` decides whether a peer belongs to one of them.  An
IPv4 client seen through an IPv6 socket (``::ffff:192.0.2.7``) counts as
its IPv4 address.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from typing import Any

__all__ = ["LOOPBACK", "Network", "address_in", "format_networks", "is_loopback", "parse_networks"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

LOOPBACK: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
"""This host only: the default of ``cleartext_auth_from``."""


def parse_networks(value: Any) -> Any:
    """Networks from ``"10.0.0.0/8,::1/128"``, ``"none"`` or a list of such strings.

    Anything else is returned as it is, for pydantic to validate (or refuse).
    A bare address (``"192.0.2.7"``) is a network of one address.  A string
    that is no network raises ``ValueError`` saying why.
    """
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list | tuple):
        items: list[Any] = []
        for item in value:
            if isinstance(item, str):
                items += [part.strip() for part in item.split(",") if part.strip()]
            else:
                items.append(item)
        if len(items) == 1 and isinstance(items[0], str) and items[0].lower() == "none":
            return ()
        # ipaddress says what is wrong ("10.0.0.1/8 has host bits set").
        return tuple(ipaddress.ip_network(item) if isinstance(item, str) else item for item in items)
    return value


def format_networks(networks: Iterable[Network]) -> str:
    """``"127.0.0.0/8,::1/128"``, or ``"none"`` for no network."""
    return ",".join(str(network) for network in networks) or "none"


@functools.lru_cache(maxsize=4096)  # a session asks more than once; parsing is not free
def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address ``host`` is (an IPv4-mapped IPv6 address as IPv4), or None if not an address."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def address_in(host: str, networks: Iterable[Network]) -> bool:
    """Whether the client address ``host`` belongs to one of ``networks``.

    A host that is not an IP address (a memory stream's ``""``, a Unix
    socket's path) belongs to none: nothing is trusted by accident.
    """
    address = _ip(host)
    return address is not None and any(address.version == net.version and address in net for net in networks)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only: 127.0.0.0/8, ::1 or ``localhost``."""
    if host.lower() == "localhost":
        return True
    address = _ip(host)
    return address is not None and address.is_loopback  # any other name could resolve anywhere
