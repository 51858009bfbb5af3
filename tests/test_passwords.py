"""Password schemes: SHA512-CRYPT against the specification, each scheme right and wrong, bad entries."""

from __future__ import annotations

import importlib
import random
import threading
import warnings
from pathlib import Path
from types import ModuleType

import argon2
import bcrypt
import pytest

from pop3d import passwords
from pop3d.callbacks import HashedPassword
from pop3d.passwd import PasswdFile, add_user, set_password
from pop3d.passwords import HASH_SCHEMES, StoredPassword, hash_password, parse_password, sha512_crypt

# Ulrich Drepper, "Unix crypt using SHA-256 and SHA-512", the SHA-512 test vectors.
SPEC_VECTORS = [
    (
        "$6$saltstring",
        "Hello world!",
        "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1",
    ),
    (
        "$6$rounds=10000$saltstringsaltstring",
        "Hello world!",
        "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0Dp8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v.",
    ),
    (
        "$6$rounds=5000$toolongsaltstring",
        "This is just a test",
        "$6$rounds=5000$toolongsaltstrin$lQ8jolhgVRVhY4b5pZKaysCLi0QBxGoNeKQzQ3glMhwllF7oGDZxUhx1yxdYcz/e1JSbq3y6JMxxl8audkUEm0",
    ),
    (
        "$6$rounds=1400$anotherlongsaltstring",
        "a very much longer text to encrypt.  This one even stretches over morethan one line.",
        "$6$rounds=1400$anotherlongsalts$POfYwTEok97VWcjxIiSOjiykti.o/pQs.wPvMxQ6Fm7I6IoYN3CmLs66x9t0oSwbtEW7o7UmJEiDwGqd8p4ur1",
    ),
    (
        "$6$rounds=77777$short",
        "we have a short salt string but not a short password",
        "$6$rounds=77777$short$WuQyW2YR.hBNpjjRhpYD/ifIw05xdfeEyQoMxIXbkvr0gge1a1x3yRULJ5CCaUeOxFmtlcGZelFl5CxtgfiAc0",
    ),
    (
        "$6$rounds=123456$asaltof16chars..",
        "a short string",
        "$6$rounds=123456$asaltof16chars..$BtCwjqMJGx5hrJhZywWvt0RLE8uZ4oPwcelCjmw2kSYu.Ec6ycULevoBK25fs2xXgMNrCzIMVcgEJAstJeonj1",
    ),
    (
        "$6$rounds=10$roundstoolow",
        "the minimum number is still observed",
        "$6$rounds=1000$roundstoolow$kUMsbe306n21p9R.FRkW3IGn.S9NPN0x50YhH1xhLsPuWGsUSklZt58jaTfF4ZEQpyUNGc0dqbpBYYBaHHrsX.",
    ),
]

CRYPT_ALPHABET = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

FAST_ARGON2 = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


def crypt_module() -> ModuleType | None:
    """Python's ``crypt`` (3.12 and older), without its DeprecationWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return importlib.import_module("crypt")
        except ImportError:
            return None


@pytest.fixture
def fast_bcrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    """hash_password's BLF-CRYPT with the lowest cost, for speed."""
    gensalt = bcrypt.gensalt
    monkeypatch.setattr(bcrypt, "gensalt", lambda: gensalt(rounds=4))


def bcrypt_hash(password: str, prefix: str = "$2b$") -> str:
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    return prefix + hashed[4:]


# -- SHA512-CRYPT -----------------------------------------------------------


@pytest.mark.parametrize(("setting", "password", "expected"), SPEC_VECTORS)
def test_sha512_crypt_specification_vectors(setting: str, password: str, expected: str) -> None:
    assert sha512_crypt(password, setting) == expected
    # A whole hash is a valid setting too: that is how it is checked.
    assert sha512_crypt(password, expected) == expected


def test_sha512_crypt_matches_the_crypt_module() -> None:
    crypt = crypt_module()
    if crypt is None:
        pytest.skip("no crypt module in this Python")
    rng = random.Random(1939)
    for length in (0, 1, 15, 63, 64, 65, 127, 200):
        password = "".join(rng.choice(CRYPT_ALPHABET + " !é€") for _ in range(length))
        salt = "".join(rng.choice(CRYPT_ALPHABET) for _ in range(rng.randint(0, 16)))
        rounds = rng.choice(["", "rounds=1000$", "rounds=5000$", "rounds=1234$"])
        setting = f"$6${rounds}{salt}"
        expected = crypt.crypt(password, setting)
        assert expected.startswith("$6$")
        assert sha512_crypt(password, setting) == expected


def test_sha512_crypt_entries() -> None:
    _, password, hashed = SPEC_VECTORS[1]
    for stored in (
        parse_password("{SHA512-CRYPT}" + hashed),
        parse_password(hashed),
        parse_password("{CRYPT}" + hashed),
    ):
        assert stored.scheme == "SHA512-CRYPT"
        assert stored.problem is None
        assert stored.check(password)
        assert not stored.check(password + " ")
        assert not stored.check("")


# -- each scheme, right and wrong --------------------------------------------


@pytest.mark.parametrize("value", ["{PLAIN}s3cret:x", "{CLEAR}s3cret:x", "{CLEARTEXT}s3cret:x", "{plain}s3cret:x"])
async def test_plain(value: str) -> None:
    stored = parse_password(value)
    assert stored.scheme == "PLAIN"
    assert stored.plain == "s3cret:x"
    assert await stored.verify("s3cret:x")
    assert not await stored.verify("s3cret")
    assert not await stored.verify("S3CRET:X")


def test_bare_secret_is_plain() -> None:
    stored = parse_password("just-a-password")
    assert stored.scheme == "PLAIN"
    assert stored.plain == "just-a-password"


async def test_argon2id() -> None:
    hashed = FAST_ARGON2.hash("wonderland")
    for stored in (
        parse_password("{ARGON2ID}" + hashed),
        parse_password(hashed),
        parse_password("{argon2id}" + hashed),
    ):
        assert stored.scheme == "ARGON2ID"
        assert stored.problem is None
        assert stored.plain is None
        assert await stored.verify("wonderland")
        assert not await stored.verify("Wonderland")


async def test_argon2i() -> None:
    hashed = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1, type=argon2.Type.I).hash("x y")
    stored = parse_password("{ARGON2I}" + hashed)
    assert stored.problem is None
    assert await stored.verify("x y")
    assert not await stored.verify("x")


@pytest.mark.parametrize("prefix", ["$2y$", "$2b$", "$2a$"])
async def test_blf_crypt(prefix: str) -> None:
    hashed = bcrypt_hash("builder", prefix)
    for stored in (parse_password("{BLF-CRYPT}" + hashed), parse_password(hashed)):
        assert stored.scheme == "BLF-CRYPT"
        assert stored.problem is None
        assert await stored.verify("builder")
        assert not await stored.verify("Builder")


@pytest.mark.usefixtures("fast_bcrypt")
def test_blf_crypt_uses_the_first_72_bytes() -> None:
    long = "x" * 72
    stored = parse_password(hash_password(long + "ignored", "BLF-CRYPT"))
    assert stored.check(long)
    assert stored.check(long + "anything")
    assert not stored.check(long[:-1])


# -- entries that never match --------------------------------------------------

NEVER_MATCHING = [
    ("{MD5-CRYPT}$1$abc$def", "unknown password scheme"),
    ("{hunter2}", "unknown password scheme"),
    ("{SHA512-CRYPT}hunter2", "malformed SHA512-CRYPT hash"),
    ("{SHA512-CRYPT}$6$rounds=10$salt$" + "a" * 86, "SHA512-CRYPT rounds out of range"),
    ("{BLF-CRYPT}$2y$04$tooshort", "malformed BLF-CRYPT hash"),
    ("{BLF-CRYPT}$2y$99$" + "a" * 53, "malformed BLF-CRYPT hash"),
    ("{ARGON2ID}$argon2id$hunter2", "malformed ARGON2ID hash"),
    ("{ARGON2ID}" + FAST_ARGON2.hash("x").replace("argon2id", "argon2i"), "malformed ARGON2ID hash"),
    ("{CRYPT}hunter2", "unsupported CRYPT hash"),
    ("$1$abc$hunter2", "unsupported crypt hash"),
    ("$y$j9T$hunter2", "unsupported crypt hash"),
    ("$pbkdf2-sha256$29000$c2FsdA$aGFzaA", "unsupported crypt hash"),
    ("$P$Bhunter2hunter2hunter2hunter2", "unsupported crypt hash"),
    ("$2Y$05$" + "a" * 53, "unsupported crypt hash"),
    ("{PLAIN}", "empty password"),
    ("", "empty password"),
]


@pytest.mark.parametrize(("value", "problem"), NEVER_MATCHING)
async def test_bad_entries_never_match(value: str, problem: str) -> None:
    stored = parse_password(value)
    assert stored.problem == problem
    assert stored.plain is None
    secret = value.partition("}")[2] if value.startswith("{") else value
    for attempt in {secret, value, "", "hunter2", "x"}:
        assert not stored.check(attempt)
        assert not await stored.verify(attempt)


@pytest.mark.parametrize("scheme", HASH_SCHEMES)
def test_repr_shows_no_secret(scheme: str) -> None:
    value = {
        "ARGON2ID": "{ARGON2ID}" + FAST_ARGON2.hash("hunter2"),
        "BLF-CRYPT": "{BLF-CRYPT}" + bcrypt_hash("hunter2"),
    }.get(scheme) or hash_password("hunter2", scheme)
    stored = parse_password(value)
    text = repr(stored)
    assert scheme in text
    assert "hunter2" not in text
    assert value.partition("}")[2] not in text
    assert "hunter2" not in repr(parse_password("{hunter2}x"))


def test_implements_hashed_password() -> None:
    assert isinstance(parse_password("{PLAIN}x"), HashedPassword)
    assert isinstance(parse_password("{NOPE}x"), StoredPassword)


# -- hashing new passwords -------------------------------------------------------


def test_hash_password_default_is_argon2id_with_library_defaults() -> None:
    value = hash_password("new password")
    assert value.startswith("{ARGON2ID}$argon2id$v=19$")
    defaults = argon2.PasswordHasher()
    params = argon2.extract_parameters(value.removeprefix("{ARGON2ID}"))
    assert (params.time_cost, params.memory_cost, params.parallelism) == (
        defaults.time_cost,
        defaults.memory_cost,
        defaults.parallelism,
    )
    stored = parse_password(value)
    assert stored.check("new password")
    assert not stored.check("old password")


@pytest.mark.usefixtures("fast_bcrypt")
@pytest.mark.parametrize("scheme", ["BLF-CRYPT", "SHA512-CRYPT", "PLAIN", "plain", "CLEARTEXT"])
def test_hash_password_other_schemes(scheme: str) -> None:
    value = hash_password("pässword", scheme)
    stored = parse_password(value)
    assert stored.problem is None
    assert stored.check("pässword")
    assert not stored.check("password")
    if stored.scheme == "BLF-CRYPT":
        assert value.startswith("{BLF-CRYPT}$2y$")  # as Dovecot writes it
    if stored.scheme == "SHA512-CRYPT":
        assert value.startswith("{SHA512-CRYPT}$6$")
        assert hash_password("pässword", scheme) != value  # a fresh salt each time


def test_hash_password_unknown_scheme() -> None:
    with pytest.raises(ValueError, match="MD5"):
        hash_password("x", "MD5")


# -- off the event loop ---------------------------------------------------------


async def test_hash_check_runs_in_a_worker_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[threading.Thread] = []
    check = StoredPassword.check

    def recording_check(self: StoredPassword, password: str) -> bool:
        threads.append(threading.current_thread())
        return check(self, password)

    monkeypatch.setattr(StoredPassword, "check", recording_check)
    stored = parse_password("{SHA512-CRYPT}" + SPEC_VECTORS[0][2])
    assert await stored.verify("Hello world!")
    assert not await stored.verify("Hello world")
    assert len(threads) == 2
    assert all(thread is not threading.main_thread() for thread in threads)
    # PLAIN is a quick comparison: no thread needed.
    assert await parse_password("{PLAIN}x").verify("x")
    assert threads[-1] is threading.main_thread()


# -- the cache of verified passwords ----------------------------------------------


async def test_a_verified_password_is_not_hashed_again_for_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    checks: list[str] = []
    check = StoredPassword.check

    def counting_check(self: StoredPassword, password: str) -> bool:
        checks.append(password)
        return check(self, password)

    monkeypatch.setattr(StoredPassword, "check", counting_check)
    stored = parse_password(hash_password("right", "BLF-CRYPT"))
    assert await stored.verify("right")
    assert await stored.verify("right")
    assert checks == ["right"]  # the second login did not pay for bcrypt
    # Wrong passwords are never cached: every guess costs a full hash.
    assert not await stored.verify("wrong")
    assert not await stored.verify("wrong")
    assert checks == ["right", "wrong", "wrong"]
    assert await stored.verify("right")
    assert len(checks) == 3
    # Expired: hashed again.
    monkeypatch.setattr(passwords, "VERIFIED_TTL", 0.0)
    stored = parse_password(hash_password("right", "BLF-CRYPT"))
    assert await stored.verify("right")
    assert await stored.verify("right")
    assert checks[-2:] == ["right", "right"]
    # What is kept is a keyed digest, not the password.
    assert "right" not in repr(stored._verified)


async def test_a_changed_passwd_file_starts_with_an_empty_cache(tmp_path: Path) -> None:
    path = tmp_path / "users"
    add_user(path, "alice", "first", scheme="BLF-CRYPT")
    users = PasswdFile(path)
    entry = await users.lookup("alice")
    assert entry is not None and isinstance(entry[0], HashedPassword)
    assert await entry[0].verify("first")
    set_password(path, "alice", "second", scheme="BLF-CRYPT")
    entry = await users.lookup("alice")
    assert entry is not None and isinstance(entry[0], HashedPassword)
    assert not await entry[0].verify("first")  # the old password's cached check is gone with the old entry
    assert await entry[0].verify("second")
