"""Password schemes in Dovecot's ``{SCHEME}secret`` notation.

:func:`parse_password` turns a stored secret into a :class:`StoredPassword`,
which implements :class:`~pop3d.callbacks.HashedPassword`;
:func:`hash_password` makes the stored form of a new password.

Supported schemes (names are case-insensitive, as in Dovecot):

``PLAIN`` (aliases ``CLEAR``, ``CLEARTEXT``)
    The password itself.  The only scheme that allows APOP.
``ARGON2ID``, ``ARGON2I``
    ``$argon2id$v=19$m=...``, checked with argon2-cffi.
``BLF-CRYPT``
    bcrypt, ``$2y$``, ``$2b$`` or ``$2a$``.  Like every bcrypt, only the
    first 72 bytes of a password count.
``SHA512-CRYPT``
    glibc's ``$6$[rounds=N$]salt$hash`` (:func:`sha512_crypt`, pure Python,
    since the ``crypt`` module is gone from Python 3.13).
``CRYPT``
    Any of the crypt forms above, recognised by its ``$id$`` prefix.

A secret without a ``{SCHEME}`` prefix is recognised by its form:
``$6$`` is SHA512-CRYPT, ``$2y$``/``$2b$``/``$2a$`` BLF-CRYPT,
``$argon2id$``/``$argon2i$`` ARGON2ID/ARGON2I, any other ``$id$...`` crypt
form an unsupported hash; everything else is PLAIN.  (Dovecot itself assumes
CRYPT here.)  So a plain password that starts with ``$`` must be written as
``{PLAIN}$...``; :func:`hash_password` always writes the prefix.

An unknown scheme, a malformed hash, or one whose cost is above the caps
(:data:`SHA512_MAX_ROUNDS`, :data:`BCRYPT_MAX_COST`, :data:`ARGON2_MAX_MEMORY_KIB`,
:data:`ARGON2_MAX_WORK_KIB`, :data:`ARGON2_MAX_PARALLELISM`) never matches any
password; its :attr:`StoredPassword.problem` says why, without quoting the secret.
Secrets never appear in reprs or messages.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time

import argon2
import bcrypt
import trio

__all__ = [
    "DEFAULT_SCHEME",
    "HASH_SCHEMES",
    "StoredPassword",
    "hash_password",
    "parse_password",
    "sha512_crypt",
]

DEFAULT_SCHEME = "ARGON2ID"
"""The scheme :func:`hash_password` uses unless told otherwise."""

HASH_SCHEMES = ("ARGON2ID", "BLF-CRYPT", "SHA512-CRYPT", "PLAIN")
"""The schemes :func:`hash_password` can write, best first."""

# Caps on the cost a stored hash asks for.  An entry above them never
# matches and is logged once, like a malformed one: a passwd-file line must
# not make each login take minutes, nor take all memory.  Each cap is
# above what the usual tools write, and a check at the cap takes a few
# seconds at most on one core.

SHA512_MAX_ROUNDS = 1_000_000
"""Most SHA512-CRYPT ``rounds=`` accepted (glibc and Dovecot write 5000, passlib 656000).

This pure-Python SHA512-CRYPT does about 1.5 million rounds a second on one core."""

BCRYPT_MAX_COST = 15
"""Most BLF-CRYPT cost accepted (the default of bcrypt and Dovecot is 12 or less): 2**15 rounds, about 2 s."""

ARGON2_MAX_MEMORY_KIB = 1024 * 1024
"""Most ARGON2 memory (``m=``, KiB) accepted: 1 GiB (argon2-cffi writes 64 MiB, libsodium at most 1 GiB).

At most :data:`HASH_CONCURRENCY` checks run at once, so this times that is the most memory they take."""

ARGON2_MAX_WORK_KIB = 4 * 1024 * 1024
"""Most ARGON2 memory times passes (``m=`` * ``t=``, KiB) accepted: 4 GiB, e.g. 1 GiB * 4 (libsodium's
SENSITIVE), 64 MiB * 64.  The time a check takes grows with it: about 5 s at the cap on one core."""

ARGON2_MAX_PARALLELISM = 16
"""Most ARGON2 lanes (``p=``) accepted; each is a thread while the hash is checked."""

_ALIASES = {"CLEAR": "PLAIN", "CLEARTEXT": "PLAIN"}
_KNOWN = {"PLAIN", "ARGON2ID", "ARGON2I", "BLF-CRYPT", "SHA512-CRYPT"}

# PasswordHasher keeps no state between calls, so one serves every thread.
_ARGON2 = argon2.PasswordHasher()

_BCRYPT_MAX = 72  # bcrypt ignores the rest; bcrypt>=5 refuses longer input
_BCRYPT_FORM = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
_SHA512_FORM = re.compile(r"\$6\$(?:rounds=(\d{1,9})\$)?[^$:\n]{0,16}\$[./0-9A-Za-z]{86}")


def _encode(password: str) -> bytes:
    # The protocol decodes client bytes with surrogateescape; undo it the same way.
    return password.encode("utf-8", "surrogateescape")


# -- SHA512-CRYPT ---------------------------------------------------------

_CRYPT_ALPHABET = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_ROUNDS_DEFAULT = 5000
_ROUNDS_MIN = 1000
_ROUNDS_MAX = 999_999_999
_SALT_MAX = 16

# The order in which the 64 digest bytes go into the 22 base-64 groups
# (Drepper's specification, step 22).
_SHA512_ORDER = tuple(((i, i + 21, i + 42), (i + 21, i + 42, i), (i + 42, i, i + 21))[i % 3] for i in range(21))


def _b64_from_24bit(b2: int, b1: int, b0: int, count: int) -> bytes:
    word = (b2 << 16) | (b1 << 8) | b0
    out = bytearray()
    for _ in range(count):
        out.append(_CRYPT_ALPHABET[word & 0x3F])
        word >>= 6
    return bytes(out)


def _sha512_crypt_digest(key: bytes, salt: bytes, rounds: int) -> bytes:
    """Steps 1 to 21 of the specification: the final 64-byte digest."""
    sha512 = hashlib.sha512
    length = len(key)
    alternate = sha512(key + salt + key).digest()
    ctx = sha512(key + salt)
    ctx.update(alternate * (length // 64) + alternate[: length % 64])
    bits = length
    while bits:
        ctx.update(alternate if bits & 1 else key)
        bits >>= 1
    digest_a = ctx.digest()
    p_bytes = (sha512(key * length).digest() * (length // 64 + 1))[:length]
    s_bytes = sha512(salt * (16 + digest_a[0])).digest()[: len(salt)]
    # What goes around the previous digest depends only on the round number
    # modulo 2, 3 and 7, so the 42 combinations are built once.
    around: list[tuple[bytes, bytes]] = []
    for i in range(42):
        middle = (s_bytes if i % 3 else b"") + (p_bytes if i % 7 else b"")
        around.append((p_bytes + middle, b"") if i & 1 else (b"", middle + p_bytes))
    digest = digest_a
    for i in range(rounds):
        before, after = around[i % 42]
        digest = sha512(before + digest + after).digest()
    return digest


def sha512_crypt(password: str | bytes, setting: str) -> str:
    """glibc's ``crypt(password, setting)`` for SHA-512 (``$6$``).

    ``setting`` is ``$6$salt`` or ``$6$rounds=N$salt``, optionally followed
    by ``$`` and anything (so a whole stored hash will do), as in Ulrich
    Drepper's "Unix crypt using SHA-256 and SHA-512": the salt is cut to 16
    characters, rounds default to 5000 and are clamped to 1000..999999999.
    """
    key = password if isinstance(password, bytes) else _encode(password)
    raw = _encode(setting)
    if raw.startswith(b"$6$"):
        raw = raw[3:]
    rounds = _ROUNDS_DEFAULT
    custom_rounds = False
    if raw.startswith(b"rounds="):
        number, sep, rest = raw[7:].partition(b"$")
        # glibc reads the number with strtoul and uses it only if a '$' follows.
        if sep and (number.isdigit() or not number):
            rounds = min(max(int(number or b"0"), _ROUNDS_MIN), _ROUNDS_MAX)
            custom_rounds = True
            raw = rest
    salt = raw.split(b"$", 1)[0][:_SALT_MAX]
    final = _sha512_crypt_digest(key, salt, rounds)
    encoded = b"".join(_b64_from_24bit(final[a], final[b], final[c], 4) for a, b, c in _SHA512_ORDER)
    encoded += _b64_from_24bit(0, 0, final[63], 2)
    prefix = b"$6$" + (b"rounds=%d$" % rounds if custom_rounds else b"") + salt + b"$"
    return (prefix + encoded).decode("utf-8", "surrogateescape")


# -- checking each scheme ---------------------------------------------------


def _check_plain(stored: str, password: str) -> bool:
    return hmac.compare_digest(_encode(stored), _encode(password))


def _check_argon2(stored: str, password: str) -> bool:
    try:
        return _ARGON2.verify(stored, _encode(password))
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


def _bcrypt_form(stored: str) -> bytes:
    # bcrypt>=5 refuses $2y$, which is the same algorithm as $2b$ (and as
    # $2a$ for passwords shorter than 256 bytes, which truncation ensures).
    return b"$2b$" + stored[4:].encode("ascii")


def _check_bcrypt(stored: str, password: str) -> bool:
    expected = _bcrypt_form(stored)
    try:
        computed = bcrypt.hashpw(_encode(password)[:_BCRYPT_MAX], expected)
    except ValueError:
        return False
    return hmac.compare_digest(computed, expected)


def _check_sha512(stored: str, password: str) -> bool:
    return hmac.compare_digest(_encode(sha512_crypt(password, stored)), _encode(stored))


_CHECKERS = {
    "PLAIN": _check_plain,
    "ARGON2ID": _check_argon2,
    "ARGON2I": _check_argon2,
    "BLF-CRYPT": _check_bcrypt,
    "SHA512-CRYPT": _check_sha512,
}


def _malformed(scheme: str, secret: str) -> str | None:
    """Why ``secret`` is not a valid ``scheme`` hash, or ``None`` if it is."""
    if not secret:
        return "empty password"
    if scheme in ("ARGON2ID", "ARGON2I"):
        prefix = "$argon2id$" if scheme == "ARGON2ID" else "$argon2i$"
        try:
            params = argon2.extract_parameters(secret)
        except (argon2.exceptions.InvalidHashError, ValueError):
            return f"malformed {scheme} hash"
        if not secret.startswith(prefix):
            return f"malformed {scheme} hash"
        if (
            params.memory_cost > ARGON2_MAX_MEMORY_KIB
            or params.memory_cost * params.time_cost > ARGON2_MAX_WORK_KIB
            or params.parallelism > ARGON2_MAX_PARALLELISM
        ):
            return (
                f"{scheme} cost above the limits (m <= {ARGON2_MAX_MEMORY_KIB}, m*t <= {ARGON2_MAX_WORK_KIB}, "
                f"p <= {ARGON2_MAX_PARALLELISM})"
            )
        return None
    if scheme == "BLF-CRYPT":
        match = _BCRYPT_FORM.fullmatch(secret)
        if match is None or not 4 <= int(match[1]) <= 31:
            return "malformed BLF-CRYPT hash"
        if int(match[1]) > BCRYPT_MAX_COST:
            return f"BLF-CRYPT cost above {BCRYPT_MAX_COST}"
        return None
    if scheme == "SHA512-CRYPT":
        match = _SHA512_FORM.fullmatch(secret)
        if match is None:
            return "malformed SHA512-CRYPT hash"
        if match[1] is not None and not _ROUNDS_MIN <= int(match[1]) <= _ROUNDS_MAX:
            return "SHA512-CRYPT rounds out of range"  # glibc would never have written it
        if match[1] is not None and int(match[1]) > SHA512_MAX_ROUNDS:
            return f"SHA512-CRYPT rounds above {SHA512_MAX_ROUNDS}"
        return None
    return None


def _scheme_by_form(secret: str, *, crypt_only: bool) -> str | None:
    """The scheme of a secret without ``{SCHEME}``; ``None``: an unsupported hash."""
    if secret.startswith("$6$"):
        return "SHA512-CRYPT"
    if secret.startswith(("$2y$", "$2b$", "$2a$")):
        return "BLF-CRYPT"
    if secret.startswith("$argon2id$"):
        return "ARGON2ID"
    if secret.startswith("$argon2i$"):
        return "ARGON2I"
    if crypt_only or secret.startswith("$"):
        # $1$ (MD5), $5$ (SHA-256), $y$ (yescrypt), $pbkdf2-sha256$, $P$...:
        # taking such a hash as a plain password would let anyone who read it
        # log in with it.  A plain password starting with "$" needs {PLAIN}.
        return None
    return "PLAIN"


HASH_CONCURRENCY = 2
_HASH_LIMITER: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("pop3d_hash_limiter")


def _hash_limiter() -> trio.CapacityLimiter:
    try:
        return _HASH_LIMITER.get()
    except LookupError:
        limiter = trio.CapacityLimiter(HASH_CONCURRENCY)
        _HASH_LIMITER.set(limiter)
        return limiter


VERIFIED_TTL = 300.0
"""Seconds a password checked against a slow hash is taken as right without hashing again."""
# Keys the cache of verified passwords: what is kept is an HMAC, never the password.
_CACHE_KEY = secrets.token_bytes(32)


def _fingerprint(password: str) -> bytes:
    return hmac.new(_CACHE_KEY, _encode(password), hashlib.sha256).digest()


class StoredPassword:
    """A password as stored: a scheme and its secret.

    Implements :class:`~pop3d.callbacks.HashedPassword`.  ``scheme`` is the
    canonical scheme name, or ``None`` if it is unknown; ``problem`` says why
    the secret can never match (unknown scheme, malformed hash), else it is
    ``None``.  Neither ever contains the secret.

    Like Dovecot's auth cache, a password that :meth:`verify` found right
    is remembered for :data:`VERIFIED_TTL` seconds (as a keyed digest), so
    that a client that logs in every minute does not pay for ARGON2ID every
    time.  The cache lives in this object: a passwd-file that changes is
    parsed into new objects, which start with none.  Wrong passwords are
    never cached: each guess costs the full hash.
    """

    __slots__ = ("_secret", "_verified", "problem", "scheme")

    def __init__(self, scheme: str | None, secret: str, problem: str | None = None) -> None:
        self.scheme = scheme
        self._secret = secret
        self._verified: tuple[bytes, float] | None = None  # (fingerprint, until) of the last right password
        if problem is None:
            problem = "unknown password scheme" if scheme is None else _malformed(scheme, secret)
        self.problem = problem

    @property
    def plain(self) -> str | None:
        """The password itself for a valid PLAIN entry (APOP needs it), else ``None``."""
        return self._secret if self.scheme == "PLAIN" and self.problem is None else None

    def check(self, password: str) -> bool:
        """Whether ``password`` matches, in constant time; blocks for slow hashes."""
        if self.problem is not None or self.scheme is None:
            return False
        return _CHECKERS[self.scheme](self._secret, password)

    async def verify(self, password: str) -> bool:
        """Whether ``password`` matches; slow hashes are checked in a worker thread.

        At most :data:`HASH_CONCURRENCY` checks run at once per event loop:
        each ARGON2ID check takes about 64 MiB and a core for a tenth of a
        second, so logins must not be able to take every thread and all
        memory.
        """
        if self.problem is not None or self.scheme == "PLAIN":
            return self.check(password)
        fingerprint = _fingerprint(password)
        verified = self._verified
        if verified is not None and time.monotonic() < verified[1] and hmac.compare_digest(verified[0], fingerprint):
            return True
        # A cancel need not wait for the hash: the thread keeps its limiter
        # slot until it finishes, so abandoned checks still count.
        ok = await trio.to_thread.run_sync(self.check, password, limiter=_hash_limiter(), abandon_on_cancel=True)
        if ok:
            self._verified = (fingerprint, time.monotonic() + VERIFIED_TTL)
        return ok

    def __repr__(self) -> str:
        return f"<StoredPassword {self.scheme or 'unknown scheme'}{' (invalid)' if self.problem else ''}>"


def parse_password(value: str) -> StoredPassword:
    """Parse a stored secret: ``{SCHEME}secret``, or a bare secret (see the module)."""
    if value.startswith("{") and "}" in value:
        name, _, secret = value[1:].partition("}")
        scheme: str | None = _ALIASES.get(name.upper(), name.upper())
        if scheme == "CRYPT":
            scheme = _scheme_by_form(secret, crypt_only=True)
            if scheme is None:
                return StoredPassword(None, secret, "unsupported CRYPT hash")
        elif scheme not in _KNOWN:
            # The name is not logged: a mistyped line may have braces around the password.
            return StoredPassword(None, secret, "unknown password scheme")
        return StoredPassword(scheme, secret)
    scheme = _scheme_by_form(value, crypt_only=False)
    if scheme is None:
        return StoredPassword(None, value, "unsupported crypt hash")
    return StoredPassword(scheme, value)


def hash_password(password: str, scheme: str = DEFAULT_SCHEME) -> str:
    """The stored form (``{SCHEME}...``) of a new password.

    ``scheme`` is one of :data:`HASH_SCHEMES`: ARGON2ID (the default, with
    argon2-cffi's default parameters), BLF-CRYPT (written as ``$2y$``, as
    Dovecot does), SHA512-CRYPT (5000 rounds) or PLAIN (needed for APOP).
    Raises :class:`ValueError` for any other scheme.
    """
    name = _ALIASES.get(scheme.upper(), scheme.upper())
    key = _encode(password)
    if name == "ARGON2ID":
        return "{ARGON2ID}" + _ARGON2.hash(key)
    if name == "BLF-CRYPT":
        hashed = bcrypt.hashpw(key[:_BCRYPT_MAX], bcrypt.gensalt()).decode("ascii")
        return "{BLF-CRYPT}$2y$" + hashed[4:]
    if name == "SHA512-CRYPT":
        salt = "".join(secrets.choice(_CRYPT_ALPHABET.decode()) for _ in range(_SALT_MAX))
        return "{SHA512-CRYPT}" + sha512_crypt(key, "$6$" + salt)
    if name == "PLAIN":
        return "{PLAIN}" + password
    raise ValueError(f"cannot hash passwords with scheme {scheme!r}; use one of {', '.join(HASH_SCHEMES)}")
