"""What a login proves, and how it is checked against the user's stored secret.

Every way of logging in (USER/PASS, APOP, each SASL mechanism) ends in one
:class:`Credentials` object.  The session looks the user up and asks the
credentials whether they match the stored secret; it never needs to know
which mechanism made them.  No I/O here: a stored hash is checked by the
caller, with the cleartext :attr:`Credentials.password` when there is one.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

__all__ = ["ApopDigest", "Credentials", "Password", "apop_digest"]


def apop_digest(challenge: str, password: str) -> str:
    """The APOP digest of RFC 1939 section 7: hex MD5 of challenge + password."""
    data = (challenge + password).encode("utf-8", "surrogateescape")
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _same(a: str, b: str) -> bool:
    # Constant time, so that timing does not tell how much of a secret was right.
    return hmac.compare_digest(a.encode("utf-8", "surrogateescape"), b.encode("utf-8", "surrogateescape"))


@dataclass(frozen=True, kw_only=True)
class Credentials:
    """The user a client claims to be, and its proof."""

    user: str

    @property
    def password(self) -> str | None:
        """The cleartext password, when the client sent one (needed to check a hash)."""
        return None

    def matches(self, stored: str) -> bool:
        """Whether the proof is right for ``stored``, the user's plain password."""
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class Password(Credentials):
    """A cleartext password: PASS, SASL PLAIN and LOGIN."""

    secret: str = field(repr=False)  # never in a repr or log

    @property
    def password(self) -> str | None:
        return self.secret

    def matches(self, stored: str) -> bool:
        return _same(self.secret, stored)


@dataclass(frozen=True, kw_only=True)
class ApopDigest(Credentials):
    """APOP: an MD5 digest of the greeting's challenge and the password."""

    challenge: str
    digest: str = field(repr=False)  # lowercase hex

    def matches(self, stored: str) -> bool:
        return _same(apop_digest(self.challenge, stored), self.digest)
