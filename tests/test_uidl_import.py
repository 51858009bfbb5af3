"""``pop3d uidl import``: the digest, the credentials file, the matching rules, the POP3 client.

The old server is a real pop3d (in this process, on ``127.0.0.1:0``, over
a Maildir tree) or Debian's real Dovecot (``tests/dovecot_server.py``); the
new tree is a copy with other file names and other line ends.  Every wait
is bounded: the client's own timeouts, and ``trio.fail_after``.
"""

from __future__ import annotations

import functools
import os
import poplib
import shutil
import socket
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import pop3d
from pop3d import uidl_pins
from pop3d.uidl_import import (
    ContentDigest,
    CredentialsError,
    LocalMessage,
    RemoteError,
    RemoteMessage,
    Source,
    UidlImportError,
    client_context,
    content_digest,
    fetch_remote,
    import_user,
    local_messages,
    match,
    parse_address,
    read_credentials,
    run_import,
)

from .certs import Certs
from .serve_process import ServeProcess

# -- messages and trees --------------------------------------------------------------

WELCOME = b"From: a@example.org\nSubject: first\n\nHello,\n.dot line\n..two dots\n.\nbye\n"
SECOND = b"From: b@example.org\nSubject: second\n\nSecond message.\n"
NO_FINAL_NEWLINE = b"From: c@example.org\nSubject: third\n\nno final newline"
LONG_LINE = b"Subject: long\n\n" + b"x" * 200_000 + b"\n.y\n"
MESSAGES = [WELCOME, SECOND, NO_FINAL_NEWLINE, LONG_LINE]


def old_name(i: int) -> str:
    return f"17000000{i:02d}.M{i}P1.old"


def new_name(i: int) -> str:
    # Another host, other unique names, flags: nothing of the old names is left.
    return f"17100000{i:02d}.M{i}P9.new,S=1:2,S"


def maildir(root: Path, user: str, files: dict[str, bytes] | None = None, subdir: str = "cur") -> Path:
    box = root / user
    for sub in ("cur", "new", "tmp"):
        (box / sub).mkdir(parents=True, exist_ok=True)
    for name, data in (files or {}).items():
        (box / subdir / name).write_bytes(data)
    return box


def crlf(data: bytes) -> bytes:
    return data.replace(b"\n", b"\r\n")


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every path below ``root`` with its mode and (for files) its bytes."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            out[str(path.relative_to(root))] = (st.st_mode, path.read_bytes() if stat.S_ISREG(st.st_mode) else b"")
    return out


def credentials(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


# -- the digest ------------------------------------------------------------------------

SAME_CONTENT = [
    (b"a\nb\n", b"a\r\nb\r\n"),
    (b"a\nb\n", b"a\nb"),
    (b"a\nb", b"a\r\nb\r\n\r\n\n"),
    (b"a\r\n", b"a"),
    (b"\ra\rb\r\n", b"\ra\rb\n"),
]
OTHER_CONTENT = [
    (b"a\nb\n", b"a\n\nb\n"),
    (b"a\n", b"a\r"),
    (b"a", b" a"),
    (b"a\nb", b"a b"),
    (b".a\n", b"a\n"),
    (b"a\r\r\n", b"a\r\n"),  # a lone CR is content, as pop3d sends it
]


def digest_by_bytes(data: bytes) -> str:
    digest = ContentDigest()
    for i in range(len(data)):
        digest.update(data[i : i + 1])
    return digest.hexdigest()


@pytest.mark.parametrize(("one", "other"), SAME_CONTENT)
def test_digest_ignores_line_ends_and_trailing_newlines(one: bytes, other: bytes) -> None:
    assert content_digest(one) == content_digest(other) == digest_by_bytes(one) == digest_by_bytes(other)


@pytest.mark.parametrize(("one", "other"), OTHER_CONTENT)
def test_digest_tells_contents_apart(one: bytes, other: bytes) -> None:
    assert content_digest(one) != content_digest(other)
    assert digest_by_bytes(one) == content_digest(one) and digest_by_bytes(other) == content_digest(other)


# -- the credentials file --------------------------------------------------------------


def test_credentials_format(tmp_path: Path) -> None:
    path = credentials(
        tmp_path / "creds",
        "# old server\n\nalice:wonder:land\nbob:{PLAIN}builder:1000:1000::/home/bob::\r\ncarol:{plain}x y \n",
    )
    assert read_credentials(path) == {"alice": "wonder:land", "bob": "builder", "carol": "x y "}


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("alice\n", "not user:password"),
        ("alice:\n", "no password"),
        ("alice:{PLAIN}\n", "no password"),
        ("alice:{ARGON2ID}$argon2id$v=19$x\n", "cannot log in to the old server"),
        ("../x:pw\n", "cannot be a user"),
        ("alice:a\nalice:b\n", "appears twice"),
        (":pw\n", "cannot be a user"),
    ],
)
def test_credentials_refused(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(CredentialsError, match=error):
        read_credentials(credentials(tmp_path / "creds", text))


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_credentials_others_may_read(tmp_path: Path, mode: int) -> None:
    path = credentials(tmp_path / "creds", "alice:pw\n", mode)
    with pytest.raises(CredentialsError, match=rf"others may read it \(mode {mode:04o}\).*chmod 600"):
        read_credentials(path)
    path.chmod(0o400)
    assert read_credentials(path) == {"alice": "pw"}


def test_credentials_missing(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="No such file"):
        read_credentials(tmp_path / "nothing")


# -- addresses -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tls", "expected"),
    [
        ("mail.example.org", False, ("mail.example.org", 110)),
        ("mail.example.org", True, ("mail.example.org", 995)),
        ("mail.example.org:1110", True, ("mail.example.org", 1110)),
        ("127.0.0.1:8110", False, ("127.0.0.1", 8110)),
        ("[::1]:995", False, ("::1", 995)),
        ("[::1]", True, ("::1", 995)),
        ("::1", False, ("::1", 110)),
    ],
)
def test_parse_address(text: str, tls: bool, expected: tuple[str, int]) -> None:
    assert parse_address(text, tls=tls) == expected


@pytest.mark.parametrize("text", ["", ":110", "host:", "host:x", "host:0", "host:70000", "[::1", "[::1]x", "h:123456"])
def test_parse_address_refused(text: str) -> None:
    with pytest.raises(UidlImportError):
        parse_address(text)


# -- matching (no I/O) -----------------------------------------------------------------


def remote(number: int, uidl: str, content: bytes) -> RemoteMessage:
    return RemoteMessage(number, uidl, content_digest(content), len(content))


def local(file: str, content: bytes) -> LocalMessage:
    return LocalMessage(file, content_digest(content))


def test_match_one_to_one_and_unmatched() -> None:
    result = match(
        [remote(1, "U1", b"one"), remote(2, "U2", b"two"), remote(3, "U3", b"gone")],
        [local("cur/b:2,S", b"two\n"), local("new/a", b"one"), local("new/extra", b"extra")],
        {},
    )
    assert [(m.remote.uidl, m.local.file, m.status) for m in result.matches] == [
        ("U1", "new/a", "new"),
        ("U2", "cur/b:2,S", "new"),
    ]
    assert result.pins == {"a": "U1", "b": "U2"}
    assert [m.uidl for m in result.remote_unmatched] == ["U3"]
    assert [m.file for m in result.local_unmatched] == ["new/extra"]
    assert result.changed == 2 and not result.ambiguous and not result.refused


def test_match_is_idempotent() -> None:
    messages = [remote(1, "U1", b"one"), remote(2, "U2", b"two")]
    files = [local("new/a", b"one"), local("new/b", b"two")]
    first = match(messages, files, {"other": "X"})
    assert first.pins == {"other": "X", "a": "U1", "b": "U2"}
    again = match(messages, files, first.pins)
    assert again.pins == first.pins and again.changed == 0
    assert [m.status for m in again.matches] == ["pinned", "pinned"]


def test_equal_copies_pair_in_order_and_keep_their_pairs() -> None:
    messages = [remote(1, "U1", b"dup"), remote(2, "U2", b"dup")]
    files = [local("new/b", b"dup"), local("new/a", b"dup")]
    result = match(messages, files, {})
    assert result.pins == {"a": "U1", "b": "U2"}
    # A pair already pinned the other way round is kept, not undone.
    kept = match(messages, files, {"b": "U1"})
    assert kept.pins == {"b": "U1", "a": "U2"}
    assert [m.status for m in kept.matches] == ["pinned", "new"]


def test_unequal_copies_are_ambiguous() -> None:
    result = match(
        [remote(1, "U1", b"dup"), remote(2, "U2", b"dup"), remote(3, "U3", b"once")],
        [local("new/a", b"dup"), local("new/b", b"once"), local("new/c", b"once")],
        {},
    )
    assert not result.matches and result.pins == {}
    assert [([r.uidl for r in g.remote], [f.file for f in g.local]) for g in result.ambiguous] == [
        (["U1", "U2"], ["new/a"]),
        (["U3"], ["new/b", "new/c"]),
    ]


def test_bad_and_repeated_uidls_are_refused() -> None:
    result = match(
        [remote(1, "has space", b"a"), remote(2, "X", b"b"), remote(3, "X", b"c"), remote(4, "y" * 71, b"d")],
        [local("new/a", b"a"), local("new/b", b"b")],
        {},
    )
    assert [(r.remote.number, r.why.split(" ")[0]) for r in result.refused] == [
        (1, "not"),
        (2, "the"),
        (3, "the"),
        (4, "not"),
    ]
    assert not result.matches and result.pins == {}
    assert [m.file for m in result.local_unmatched] == ["new/a", "new/b"]


def test_a_shared_unique_name_is_not_pinned() -> None:
    result = match([remote(1, "U1", b"a")], [local("new/a", b"a"), local("cur/a:2,S", b"a")], {})
    assert not result.matches and result.pins == {}
    assert [m.file for m in result.local_unmatched] == ["cur/a:2,S", "new/a"]


def test_conflicts_are_kept_unless_replace() -> None:
    messages = [remote(1, "U1", b"one"), remote(2, "U2", b"two")]
    files = [local("new/a", b"one"), local("new/b", b"two"), local("new/c", b"three")]
    pins = {"a": "OLD", "c": "U2"}  # a is pinned to another UIDL; U2 is pinned to another file
    kept = match(messages, files, pins)
    assert kept.pins == pins and kept.changed == 0
    assert [(m.status, m.note) for m in kept.matches] == [
        ("conflict", "the file is pinned to OLD"),
        ("conflict", "U2 is pinned to the file c"),
    ]
    replaced = match(messages, files, pins, replace=True)
    assert replaced.pins == {"a": "U1", "b": "U2"}
    assert [m.status for m in replaced.matches] == ["replaced", "replaced"] and replaced.changed == 2


def test_a_pin_left_by_a_gone_file_moves() -> None:
    result = match([remote(1, "U1", b"one")], [local("new/a", b"one")], {"gone": "U1", "other": "U2"})
    assert result.pins == {"a": "U1", "other": "U2"}
    assert [(m.status, m.note) for m in result.matches] == [("new", "U1 was pinned to gone, which is not here")]


# -- the old server: pop3d in this process -------------------------------------------------


async def serve(nursery: trio.Nursery, root: Path, **options: Any) -> int:
    """A pop3d over the Maildirs under ``root`` on 127.0.0.1; returns its port (stopped with the nursery)."""
    server = pop3d.new()
    server.configure(
        host="127.0.0.1",
        port=0,
        auth=pop3d.MemoryUsers({"alice": ("wonderland", "alice"), "bob": ("builder", "bob")}),
        storage=pop3d.MaildirStorage(root),
        login_failure_delay=0,
        penalties=None,
        **options,
    )
    await nursery.start(server.run)
    await server.up()
    port: int = server.cget("port")
    return port


@pytest.fixture
def old(tmp_path: Path) -> Path:
    """The old server's tree: alice with :data:`MESSAGES` (LF line ends), bob with none."""
    root = tmp_path / "old"
    maildir(root, "alice", {old_name(i): data for i, data in enumerate(MESSAGES)}, subdir="new")
    maildir(root, "bob")
    return root


@pytest.fixture
def new(tmp_path: Path) -> Path:
    """The new tree: the same messages under other names, with CRLF line ends, in cur/."""
    root = tmp_path / "new"
    maildir(root, "alice", {new_name(i): crlf(data) for i, data in enumerate(MESSAGES)})
    maildir(root, "bob")
    return root


@pytest.fixture
async def port(nursery: trio.Nursery, old: Path) -> AsyncIterator[int]:
    yield await serve(nursery, old)


async def test_fetch_gives_each_message_its_uidl_and_digest(port: int, old: Path) -> None:
    with trio.fail_after(10):
        messages = await fetch_remote(Source(host="127.0.0.1", port=port, timeout=5), "alice", "wonderland")
    assert [(m.number, m.uidl) for m in messages] == [(i + 1, old_name(i)) for i in range(len(MESSAGES))]
    # RETR's dot-stuffing is undone; CRLF, a missing final line end and a 200 kB line make no difference.
    assert [m.digest for m in messages] == [content_digest(data) for data in MESSAGES]
    assert [m.size for m in messages] == [len(crlf(data.rstrip(b"\n") + b"\n")) for data in MESSAGES]
    # Nothing was deleted or changed on the old server.
    assert sorted(p.name for p in (old / "alice" / "new").iterdir()) == [old_name(i) for i in range(len(MESSAGES))]


def test_local_digests(new: Path) -> None:
    box = new / "alice"
    (box / "cur" / ".hidden").write_bytes(b"not a message")
    (box / "new" / "link").symlink_to(box / "cur" / new_name(0))
    os.mkfifo(box / "new" / "fifo")
    found = local_messages(box)
    assert [(m.file, m.digest) for m in found] == [
        (f"cur/{new_name(i)}", content_digest(data)) for i, data in enumerate(MESSAGES)
    ]
    assert found[0].unique == new_name(0).partition(":")[0]


async def test_import_pins_old_uidls_and_is_idempotent(port: int, new: Path) -> None:
    source = Source(host="127.0.0.1", port=port, timeout=5)
    with trio.fail_after(10):
        report = await import_user(source, "alice", "wonderland", new, dry_run=True)
    assert report.error is None and report.result is not None and not report.saved
    assert uidl_pins.load(new / "alice") == {}
    with trio.fail_after(10):
        report = await import_user(source, "alice", "wonderland", new)
    expected = {new_name(i).partition(":")[0]: old_name(i) for i in range(len(MESSAGES))}
    assert report.saved and uidl_pins.load(new / "alice") == expected
    before = snapshot(new)
    with trio.fail_after(10):
        again = await import_user(source, "alice", "wonderland", new)
    assert again.result is not None and not again.saved
    assert {m.status for m in again.result.matches} == {"pinned"} and len(again.result.matches) == len(MESSAGES)
    assert snapshot(new) == before
    # pop3d on the new tree gives the old UIDLs.
    storage = pop3d.MaildirStorage(new)
    assert await storage.lock("alice")
    try:
        assert [await storage.uidl("alice", n) for n in range(1, len(MESSAGES) + 1)] == [
            old_name(i) for i in range(len(MESSAGES))
        ]
    finally:
        await storage.unlock("alice")


async def test_one_user_failing_does_not_stop_the_others(port: int, new: Path) -> None:
    creds = {"alice": "wrong", "bob": "builder", "carol": "x"}
    with trio.fail_after(20):
        reports = await run_import(Source(host="127.0.0.1", port=port, timeout=5), creds, new, dry_run=True)
    by_user = {r.user: r for r in reports}
    assert by_user["alice"].error is not None and by_user["alice"].error.startswith("login refused")
    assert by_user["bob"].error is None and by_user["bob"].result is not None
    assert by_user["carol"].error == f"no Maildir {new / 'carol'}"
    with trio.fail_after(20):
        only = await run_import(Source(host="127.0.0.1", port=port), creds, new, users=["dave"], dry_run=True)
    assert [(r.user, r.error) for r in only] == [("dave", "no credentials for this user")]


async def test_a_session_on_the_maildir_blocks_the_pins(port: int, new: Path) -> None:
    storage = pop3d.MaildirStorage(new)
    assert await storage.lock("alice")
    try:
        with trio.fail_after(10):
            report = await import_user(Source(host="127.0.0.1", port=port), "alice", "wonderland", new)
    finally:
        await storage.unlock("alice")
    assert report.error is not None and "in use" in report.error and not report.saved
    assert uidl_pins.load(new / "alice") == {}


async def test_connection_refused_and_silent_servers(new: Path) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    silent_port = listeners[0].socket.getsockname()[1]
    accepted: list[trio.SocketStream] = []

    async def accept_and_say_nothing() -> None:
        while True:
            accepted.append(await listeners[0].accept())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept_and_say_nothing)
        with trio.fail_after(5):
            silent = await import_user(Source(host="127.0.0.1", port=silent_port, timeout=0.3), "alice", "pw", new)
        nursery.cancel_scope.cancel()
    assert silent.error == f"no answer from 127.0.0.1:{silent_port} within 0.3 seconds"
    for stream in accepted:
        await stream.aclose()
    await listeners[0].aclose()  # nobody listens there any more
    with trio.fail_after(5):
        refused = await import_user(Source(host="127.0.0.1", port=silent_port, timeout=2), "alice", "pw", new)
    assert refused.error is not None and "refused" in refused.error.lower(), refused.error


class FakeServer:
    """A scripted POP3 server on 127.0.0.1: what odd servers do, which pop3d never does."""

    def __init__(self, capa: list[str] | None, uidl: list[str], messages: dict[int, bytes]) -> None:
        self.capa, self.uidl, self.messages = capa, uidl, messages
        self.commands: list[str] = []

    async def handle(self, stream: trio.SocketStream) -> None:
        async def say(*lines: str | bytes) -> None:
            await stream.send_all(b"".join((x.encode() if isinstance(x, str) else x) + b"\r\n" for x in lines))

        await say("+OK fake ready")
        buffer = b""
        while True:
            while b"\r\n" not in buffer:
                data = await stream.receive_some(4096)
                if not data:
                    return
                buffer += data
            raw, _, buffer = buffer.partition(b"\r\n")
            line = raw.decode()
            self.commands.append(line)
            verb, _, arg = line.partition(" ")
            if verb == "CAPA" and self.capa is not None:
                await say("+OK", *self.capa, ".")
            elif verb in ("USER", "PASS", "AUTH"):
                await say("+OK")
            elif verb == "UIDL":
                await say("+OK", *self.uidl, ".")
            elif verb == "RETR" and int(arg) in self.messages:
                body = self.messages[int(arg)].replace(b"\n", b"\r\n").replace(b"\r\n.", b"\r\n..")
                await say(b"+OK", body.removesuffix(b"\r\n"), b".")
            elif verb == "QUIT":
                await say("+OK bye")
                await stream.aclose()
                return
            else:
                await say("-ERR no")


async def fake(nursery: trio.Nursery, server: FakeServer) -> int:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def test_odd_servers(nursery: trio.Nursery, tmp_path: Path) -> None:
    files = {"a": b"Subject: a\n\n.a\n", "b": b"Subject: b\n\nb\n", "c": b"Subject: c\n\nc\n"}
    maildir(tmp_path, "alice", files)
    # No CAPA (so USER/PASS), a bad UIDL, a message that RETR does not give.
    plain = FakeServer(None, ["1 U1", "2 bad\x7fuidl", "3 U3"], {1: files["a"], 2: files["b"]})
    with trio.fail_after(10):
        report = await import_user(Source(host="127.0.0.1", port=await fake(nursery, plain)), "alice", "pw", tmp_path)
    assert report.result is not None, report.error
    assert [m.remote.uidl for m in report.result.matches] == ["U1"]
    assert [(r.remote.number, r.why) for r in report.result.refused] == [
        (2, "not a valid UIDL (RFC 1939: 1 to 70 characters from 0x21 to 0x7E)"),
        (3, "the server would not send it: no"),
    ]
    assert [m.file for m in report.result.local_unmatched] == ["cur/b", "cur/c"]
    assert plain.commands == ["CAPA", "USER alice", "PASS pw", "UIDL", "RETR 1", "RETR 2", "RETR 3", "QUIT"]
    # SASL PLAIN and no USER: AUTH PLAIN.
    sasl = FakeServer(["SASL PLAIN LOGIN", "UIDL"], ["1 U1"], {1: files["c"]})
    with trio.fail_after(10):
        report = await import_user(Source(host="127.0.0.1", port=await fake(nursery, sasl)), "alice", "pw", tmp_path)
    assert report.result is not None and [m.local.file for m in report.result.matches] == ["cur/c"]
    assert sasl.commands[1] == "AUTH PLAIN AGFsaWNlAHB3"
    # A UIDL listing that is not one.
    garbled = FakeServer(["USER"], ["this is not a UIDL line"], {})
    with trio.fail_after(10):
        report = await import_user(Source(host="127.0.0.1", port=await fake(nursery, garbled)), "alice", "pw", tmp_path)
    assert report.error == "not a UIDL line: this is not a UIDL line"
    assert not any(c.startswith("DELE") for c in plain.commands + sasl.commands + garbled.commands)


# -- TLS -----------------------------------------------------------------------------------


async def test_stls_with_a_ca_file(nursery: trio.Nursery, old: Path, new: Path, certs: Certs) -> None:
    # No cleartext logins at all: the import must have used STLS to get anywhere.
    port = await serve(nursery, old, tls_cert=certs.cert, tls_key=certs.key, cleartext_auth_from="none")
    trusted = Source(host="127.0.0.1", port=port, ssl_context=client_context(certs.ca_file), timeout=5)
    with trio.fail_after(10):
        report = await import_user(trusted, "alice", "wonderland", new, dry_run=True)
    assert report.error is None and report.result is not None and report.result.changed == len(MESSAGES)
    # The system's CAs do not know the test CA, and the name is checked.
    with trio.fail_after(10):
        failed = await import_user(Source(host="127.0.0.1", port=port, timeout=5), "alice", "wonderland", new)
    assert failed.error is not None and failed.error.startswith("TLS: the server's certificate"), failed.error
    insecure = Source(host="127.0.0.1", port=port, ssl_context=client_context(insecure=True), timeout=5)
    with trio.fail_after(10):
        assert (await import_user(insecure, "alice", "wonderland", new, dry_run=True)).error is None


async def test_pop3s(nursery: trio.Nursery, old: Path, new: Path, certs: Certs) -> None:
    port = await serve(nursery, old, tls_cert=certs.cert, tls_key=certs.key, implicit_tls=True)
    source = Source(host="localhost", port=port, tls=True, ssl_context=client_context(certs.ca_file), timeout=5)
    with trio.fail_after(10):
        report = await import_user(source, "alice", "wonderland", new, dry_run=True)
    assert report.error is None and report.result is not None and report.result.changed == len(MESSAGES)
    plain = Source(host="localhost", port=port, timeout=0.5)  # waits for a greeting that TLS never sends
    with trio.fail_after(10):
        assert (await import_user(plain, "alice", "wonderland", new, dry_run=True)).error is not None


async def test_no_password_in_clear_off_loopback(nursery: trio.Nursery, old: Path) -> None:
    from pop3d.uidl_import import _Connection, _login

    server = pop3d.new()
    server.configure(auth=pop3d.MemoryUsers({"alice": ("wonderland", "alice")}), cleartext_auth_from="0.0.0.0/0")
    await nursery.start(server.run)
    client_end, server_end = trio.testing.memory_stream_pair()
    server.connect(server_end, ("198.51.100.7", 40000))
    with trio.fail_after(5), pytest.raises(RemoteError, match="offers no STLS: give --tls"):
        await _login(_Connection(client_end, 5), Source(host="mail.example.org", port=110), "alice", "wonderland")
    client_end, server_end = trio.testing.memory_stream_pair()
    server.connect(server_end, ("198.51.100.7", 40001))
    source = Source(host="mail.example.org", port=110, allow_cleartext=True)
    with trio.fail_after(5):
        conn = await _login(_Connection(client_end, 5), source, "alice", "wonderland")
        assert (await conn.command("STAT")).startswith("0 ")
    await server.destroy()


# -- pop3d serve as the old server, the CLI, and clients afterwards ------------------------------
# These call pop3d.cli.main, so they need the uidl command wired into pop3d/cli.py.


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``pop3d ARGS`` in this process: exit status, stdout, stderr."""
    from pop3d.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def headers(message: bytes) -> str:
    """The digest of a message's header."""
    return content_digest(message.partition(b"\n\n")[0])


def uidls(port: int, user: str, password: str) -> dict[str, str]:
    """UIDL -> the digest of the message's header, as poplib sees them.

    ``TOP n 0``, not ``RETR``: poplib refuses lines over 2048 octets, and the
    headers of the test messages tell them apart.
    """
    pop = poplib.POP3("127.0.0.1", port, timeout=10)
    try:
        pop.user(user)
        pop.pass_(password)
        out = {}
        for line in pop.uidl()[1]:
            number, uid = line.decode().split()
            out[uid] = content_digest(b"\n".join(pop.top(int(number), 0)[1]))
        return out
    finally:
        pop.quit()


@pytest.fixture
def old_users(old: Path, tmp_path: Path) -> Path:
    users = tmp_path / "old-users"
    users.write_text("alice:{PLAIN}wonderland\nbob:{PLAIN}builder\n")
    return users


@pytest.fixture
def creds(tmp_path: Path) -> Path:
    return credentials(tmp_path / "credentials", "alice:wonderland\nbob:{PLAIN}builder\n")


@pytest.fixture
def old_proc(old: Path, old_users: Path, certs: Certs) -> Iterator[ServeProcess]:
    """``pop3d serve`` over the old tree; logins only after STLS."""
    args = ["--listen", "127.0.0.1:0", "--users", str(old_users), "--mail-root", str(old), "--no-admin"]
    args += ["--tls-cert", str(certs.cert), "--tls-key", str(certs.key), "--cleartext-auth-from", "none"]
    with ServeProcess(*args) as proc:
        yield proc.wait_ready()


def test_import_from_pop3d_serve(
    old_proc: ServeProcess, new: Path, creds: Path, certs: Certs, capsys: pytest.CaptureFixture[str]
) -> None:
    """Dry run, import, import again; then poplib against pop3d on the new tree sees the old UIDLs."""
    base = ["uidl", "import", "--from", f"127.0.0.1:{old_proc.port}", "--credentials", str(creds)]
    base += ["--mail-root", str(new), "--ca-file", str(certs.ca_file), "--timeout", "10"]
    before = snapshot(new)
    code, out, _ = run_cli(capsys, *base, "--dry-run")
    assert code == 0
    for i in range(len(MESSAGES)):
        assert f"alice: pin: {i + 1} {old_name(i)} -> cur/{new_name(i)}\n" in out
    assert "alice: would pin 4, already pinned 0," in out and "bob: would pin 0" in out
    assert out.endswith("dry run: nothing was changed\n")
    assert snapshot(new) == before
    code, out, _ = run_cli(capsys, *base, "--dry-run", "--user", "bob")
    assert code == 0 and "alice" not in out and out.startswith("bob: would pin 0, already pinned 0")

    code, out, _ = run_cli(capsys, *base)
    assert code == 0 and "alice: pinned 4, already pinned 0, conflicts 0" in out
    once = snapshot(new)
    code, out, _ = run_cli(capsys, *base)
    assert code == 0 and "alice: pinned 0, already pinned 4, conflicts 0" in out
    assert snapshot(new) == once

    site_users = new.parent / "new-users"
    site_users.write_text("alice:{PLAIN}wonderland\n")
    with ServeProcess(
        "--listen", "127.0.0.1:0", "--users", str(site_users), "--mail-root", str(new), "--no-admin"
    ) as proc:
        seen = uidls(proc.wait_ready().port, "alice", "wonderland")
    assert seen == {old_name(i): headers(data) for i, data in enumerate(MESSAGES)}


def test_cli_errors(new: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loose = credentials(tmp_path / "loose", "alice:pw\n", 0o644)
    base = ["uidl", "import", "--mail-root", str(new)]
    code, _, err = run_cli(capsys, *base, "--from", "127.0.0.1:1", "--credentials", str(loose))
    assert code == 2 and err.startswith("pop3d: error: credentials ") and "chmod 600" in err
    assert err.count("\n") == 1
    good = credentials(tmp_path / "good", "alice:pw\n")
    code, _, err = run_cli(capsys, *base, "--from", "host:x", "--credentials", str(good))
    assert (code, err) == (2, "pop3d: error: --from: 'host:x' is not HOST[:PORT]\n")
    # A port nobody listens on: reported per user, exit status 1.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    code, out, err = run_cli(capsys, *base, "--from", f"127.0.0.1:{free}", "--credentials", str(good))
    assert code == 1 and out.startswith("alice: error: ") and "1 of 1 users not imported: alice" in err


# -- Dovecot as the old server -------------------------------------------------------------------


def test_import_from_dovecot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Dovecot's UIDLs (%08Xu%08Xv) pinned by content; unmatched and ambiguous messages reported."""
    from .dovecot_server import dovecot_site, running

    with dovecot_site() as site:
        site.add_user("alice", "wonderland")
        site.add_user("bob", "builder")
        for i, data in enumerate(MESSAGES):
            site.deliver("alice", data, old_name(i), subdir="new" if i % 2 else "cur")
        site.deliver("alice", b"Subject: only on dovecot\n\nx\n", "1700000099.M99P1.old")
        site.deliver("bob", SECOND, "1700000001.M1P1.old:2,S", subdir="cur")
        site.deliver("bob", SECOND, "1700000002.M2P1.old:2,S", subdir="cur")
        new = tmp_path / "new"
        maildir(new, "alice", {new_name(i): crlf(data) for i, data in enumerate(MESSAGES)})
        maildir(new, "alice", {"1710000098.M98P9.new": b"Subject: only here\n\ny\n"}, subdir="new")
        maildir(new, "bob", {"1710000001.M1P9.new": SECOND})  # one copy of two: ambiguous
        # Dovecot's own passwd-file, {PLAIN} and all, made private.
        creds = tmp_path / "credentials"
        shutil.copyfile(site.passwd, creds)
        creds.chmod(0o600)
        with running(site) as port:
            dovecot = uidls(port, "alice", "wonderland")
            base = ["uidl", "import", "--from", f"127.0.0.1:{port}", "--credentials", str(creds)]
            code, out, _ = run_cli(capsys, *base, "--mail-root", str(new), "--timeout", "10")
            again_code, again, _ = run_cli(capsys, *base, "--mail-root", str(new), "--timeout", "10")
    assert code == 0, out
    assert len(dovecot) == len(MESSAGES) + 1 and all(len(uid) == 16 for uid in dovecot)  # %08Xu%08Xv
    by_header = {digest: uid for uid, digest in dovecot.items()}
    expected = {new_name(i).partition(":")[0]: by_header[headers(data)] for i, data in enumerate(MESSAGES)}
    assert uidl_pins.load(new / "alice") == expected
    only_there = by_header[headers(b"Subject: only on dovecot\n\nx\n")]
    assert f"alice: not here: 5 {only_there} " in out
    assert "alice: not on the server: new/1710000098.M98P9.new\n" in out
    assert "bob: ambiguous: 2 on the server (1 " in out and "and 1 here (cur/1710000001.M1P9.new)" in out
    assert "alice: pinned 4, already pinned 0, conflicts 0, ambiguous 0, not here 1, not on the server 1" in out
    assert "bob: pinned 0, already pinned 0, conflicts 0, ambiguous 2" in out
    assert uidl_pins.load(new / "bob") == {}
    assert again_code == 0 and "alice: pinned 0, already pinned 4" in again
    # pop3d on the new tree: the old UIDLs for the old messages, its own for the one Dovecot never had.
    users = tmp_path / "users"
    users.write_text("alice:{PLAIN}wonderland\n")
    with ServeProcess("--listen", "127.0.0.1:0", "--users", str(users), "--mail-root", str(new), "--no-admin") as proc:
        seen = uidls(proc.wait_ready().port, "alice", "wonderland")
    assert {uid: digest for uid, digest in seen.items() if uid in dovecot} == {
        uid: digest for uid, digest in dovecot.items() if uid != only_there
    }
    assert seen["1710000098.M98P9.new"] == headers(b"Subject: only here\n\ny\n")
