"""Migrating from Dovecot: pop3d serves a Maildir tree that Dovecot served, with the same UIDLs.

Real Dovecot 2.3 (Debian's ``dovecot-pop3d``) serves the tree on loopback
first (:mod:`tests.dovecot_server`; skipped without Dovecot or root), and
poplib records what clients saw; deletions, flag changes and new mail
happen; then pop3d serves the same tree on 127.0.0.1:0.  Every wait is
bounded (``trio.fail_after``, socket timeouts).
"""

from __future__ import annotations

import poplib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

import pop3d
from pop3d.maildir import MaildirStorage
from pop3d.passwd import PasswdFile

from .dovecot_server import DovecotSite, doveadm, dovecot_site, running

USERS = {"alice": "wonder", "bob": "builder", "carol": "singer"}


def message(user: str, n: int, *, final_newline: bool = True) -> bytes:
    text = f"From: sender{n}@example.org\nTo: {user}@example.org\nSubject: {user} {n}\n\nBody of {user}'s {n}.\n"
    data = text.encode()
    return data if final_newline else data + b"no final line end"


def vsize(data: bytes) -> int:
    """Dovecot's virtual size (LF counted as CRLF), as in its ,W= field."""
    return len(data) + data.count(b"\n") - data.count(b"\r\n")


def populate(site: DovecotSite) -> None:
    """Three users, four messages each: plain, ,S=/,W= names, already in cur/ with flags, no final LF."""
    for number, (user, password) in enumerate(USERS.items()):
        site.add_user(user, password)
        base = 1700000000 + 100 * number
        for n in range(1, 5):
            data = message(user, n, final_newline=n != 4)
            unique = f"{base + n}.M{n}P{number}.mail.example"
            if n in (2, 4):
                unique += f",S={len(data)},W={vsize(data)}"
            if n == 3:
                site.deliver(user, data, unique + ":2,S", subdir="cur")
            else:
                site.deliver(user, data, unique)


def client_uidls(port: int, user: str, *, dele: tuple[int, ...] = (), exact: bool = False) -> dict[bytes, str]:
    """One POP3 session: each message's content -> its UIDL; then DELE ``dele`` and QUIT.

    ``exact``: check that each RETR sends what LIST said, to the octet (pop3d
    does; Dovecot's LIST is 2 short for a message without a final line end).
    """
    pop = poplib.POP3("127.0.0.1", port, timeout=10)
    try:
        pop.user(user)
        pop.pass_(USERS[user])
        listed = {int(n): int(size) for n, size in (line.split() for line in pop.list()[1])}
        seen: dict[bytes, str] = {}
        for line in pop.uidl()[1]:
            number, uidl = line.decode().split(" ", 1)
            _, lines, octets = pop.retr(int(number))
            # poplib counts the octets RETR sent (CRLF line ends, dot-stuffing undone, no terminator):
            # exactly what LIST said, ,S=/,W= names or not.
            assert not exact or octets == listed[int(number)], (user, number, octets, listed)
            seen[b"\n".join(lines)] = uidl
        for doomed in dele:
            pop.dele(doomed)
        pop.quit()
    finally:
        pop.close()
    return seen


def snapshot(site: DovecotSite) -> dict[str, bytes]:
    """Dovecot's own files in every Maildir: pop3d must leave them as they are."""
    return {
        str(path.relative_to(site.mail)): path.read_bytes()
        for path in sorted(site.mail.glob("*/dovecot*"))
        if path.is_file()
    }


@asynccontextmanager
async def pop3d_server(site: DovecotSite, storage: MaildirStorage) -> AsyncIterator[int]:
    """A real pop3d over ``site`` on 127.0.0.1:0; yields the port."""
    srv = pop3d.new()
    srv.configure(
        host="127.0.0.1",
        port=0,
        hostname="test.example",
        auth=PasswdFile(site.passwd),
        storage=storage,
        login_failure_delay=0,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        await srv.up()
        try:
            yield srv.cget("port")
        finally:
            await srv.destroy()
            nursery.cancel_scope.cancel()


async def pop3d_uidls(site: DovecotSite, fmt: str | None, users: list[str]) -> dict[str, dict[bytes, str]]:
    """What poplib sees of ``users`` from a pop3d over ``site`` with ``dovecot_uidl_format=fmt``."""
    storage = MaildirStorage(site.mail, dovecot_uidl_format=fmt)
    seen: dict[str, dict[bytes, str]] = {}
    with trio.fail_after(30):
        async with pop3d_server(site, storage) as port:
            for user in users:
                seen[user] = await trio.to_thread.run_sync(partial(client_uidls, port, user, exact=True))
                again = await trio.to_thread.run_sync(partial(client_uidls, port, user, exact=True))
                assert again == seen[user]  # the second login (from pop3d-index) agrees
    return seen


def check_migration(
    before: dict[str, dict[bytes, str]], after: dict[str, dict[bytes, str]], new_mail: dict[str, list[bytes]]
) -> None:
    """Same UIDLs for the same messages; new mail gets fresh ones, never an old one."""
    old_uidls = {uidl for seen in before.values() for uidl in seen.values()}
    for user, seen in after.items():
        for content, uidl in seen.items():
            if content in before[user]:
                assert uidl == before[user][content], (user, content)
            else:
                assert content.rstrip(b"\n") in {m.rstrip(b"\n") for m in new_mail.get(user, [])}, (user, content)
                assert uidl not in old_uidls, (user, uidl)
        assert len(set(seen.values())) == len(seen)
        assert set(before[user]) <= set(seen)  # every message Dovecot showed last is still there


def run_dovecot_phase(
    site: DovecotSite, fmt: str, settings: dict[str, str] | None = None
) -> tuple[dict[str, dict[bytes, str]], list[bytes]]:
    """Dovecot serves; clients record UIDLs; alice deletes her first message, bob's flags change.

    Returns what clients saw last (the deleted message left out) and the deleted message.
    """
    with running(site, pop3_uidl_format=fmt, settings=settings) as port:
        first = {user: client_uidls(port, user) for user in USERS}
        deleted = [content for content in first["alice"] if b"Subject: alice 1" in content]
        numbered = list(first["alice"])
        client_uidls(port, "alice", dele=(numbered.index(deleted[0]) + 1,))
        # A flag change by an IMAP client or MUA while Dovecot runs: a rename in cur/.
        name = sorted((site.maildir("bob") / "cur").iterdir())[0]
        name.rename(name.with_name(name.name.partition(":")[0] + ":2,RS"))
        last = {user: client_uidls(port, user) for user in USERS}
    for user in USERS:
        for content, uidl in last[user].items():
            assert first[user][content] == uidl  # Dovecot itself kept them
    return last, deleted


def after_dovecot(site: DovecotSite) -> dict[str, list[bytes]]:
    """A flag change after Dovecot stopped, and new mail for alice and bob."""
    name = sorted((site.maildir("carol") / "cur").iterdir())[-1]
    name.rename(name.with_name(name.name.partition(":")[0] + ":2,T"))
    new_mail: dict[str, list[bytes]] = {}
    for number, user in enumerate(("alice", "bob")):
        data = message(user, 9)
        site.deliver(user, data, f"1800000000.M9P{number}.mail.example")
        new_mail[user] = [data]
    return new_mail


@pytest.mark.parametrize("fmt", ["%08Xu%08Xv", "%g"])
async def test_pop3d_keeps_dovecots_uidls(fmt: str) -> None:
    with dovecot_site() as site:
        populate(site)
        before, deleted = run_dovecot_phase(site, fmt)
        assert all(len(seen) == (3 if user == "alice" else 4) for user, seen in before.items())
        if fmt == "%g":
            # Without G fields, %g is the base file name: the Maildir unique name.
            assert before["bob"][next(iter(before["bob"]))].endswith(".mail.example")
        else:
            assert all(len(uidl) == 16 for seen in before.values() for uidl in seen.values())
        dovecot_files = snapshot(site)
        new_mail = after_dovecot(site)
        after = await pop3d_uidls(site, fmt, list(USERS))
        check_migration(before, after, new_mail)
        assert deleted[0] not in after["alice"]
        assert snapshot(site) == dovecot_files  # read, never written
        report = await MaildirStorage(site.mail, dovecot_uidl_format=fmt).uidl_report("bob")
        assert [entry.source for entry in report] == ["dovecot"] * 4 + ["maildir"]
        assert [entry.uidl for entry in report][:4] == [after["bob"][c] for c in before["bob"]]


async def test_without_the_dovecot_format_pop3d_uses_its_own() -> None:
    with dovecot_site() as site:
        populate(site)
        before, _ = run_dovecot_phase(site, "%08Xu%08Xv")
        after = await pop3d_uidls(site, None, ["bob"])
        assert not set(after["bob"].values()) & set(before["bob"].values())


async def test_stored_uidls_win_and_m_has_none_on_maildir() -> None:
    """P fields (``pop3_save_uidl``) are what Dovecot serves whatever the format; %m has nothing else."""
    with dovecot_site() as site:
        populate(site)
        with running(site, settings={"pop3_save_uidl": "yes"}) as port:
            saved = {user: client_uidls(port, user) for user in USERS}
        uidlist = (site.maildir("alice") / "dovecot-uidlist").read_text()
        assert all(f" P{uidl} " in uidlist for uidl in saved["alice"].values())
        with running(site, pop3_uidl_format="%m") as port:
            again = {user: client_uidls(port, user) for user in USERS}
            assert again == saved  # the stored UIDLs, not %m
            site.deliver("carol", message("carol", 7), "1800000001.M7P2.mail.example")
            # A message without a stored UIDL: Dovecot 2.3 has no header MD5 for Maildir.
            with pytest.raises((poplib.error_proto, EOFError, OSError)):
                client_uidls(port, "carol")
        assert "Header MD5 not found" in site.log.read_text()
        after = await pop3d_uidls(site, "%m", list(USERS))
        check_migration(saved, after, {"carol": [message("carol", 7)]})
        report = await MaildirStorage(site.mail, dovecot_uidl_format="%m").uidl_report("carol")
        assert sorted(entry.source for entry in report) == ["dovecot"] * 4 + ["maildir"]


async def test_a_uidlist_with_guids_and_stored_uidls() -> None:
    """A dovecot-uidlist written beforehand (as a migration tool would): G and P fields, unknown fields."""
    with dovecot_site() as site:
        site.add_user("alice", USERS["alice"])
        names = []
        for n in range(1, 5):
            names.append(f"170000000{n}.M{n}P7.mail.example")
            site.deliver("alice", message("alice", n), names[-1])
        guid = "ab" * 16
        lines = [
            "3 V1234567890 N10 G" + "cd" * 16,
            f"3 G{guid} :{names[0]}",
            f"5 Pold-uidl-5 :{names[1]}",
            f"7 P Zunknown :{names[2]}",
            f"8 W99 :{names[3]}",
        ]
        uidlist = site.maildir("alice") / "dovecot-uidlist"
        uidlist.write_text("\n".join(lines) + "\n")
        site.give_away()
        with running(site, pop3_uidl_format="%g") as port:
            before = {"alice": client_uidls(port, "alice")}
        assert sorted(before["alice"].values()) == sorted([guid, "old-uidl-5", names[2], names[3]])
        after = await pop3d_uidls(site, "%g", ["alice"])
        check_migration(before, after, {})


FORMATS = [
    "%08Xu%08Xv",
    "%u.%v",
    "%f",
    "%Lf-%u",
    "%8.4g%u",
    "%-4.f%u",
    "%.-4g%u",
    "%Uf",
    "%Mu",
    "%Rf",
    "%Xv%Xu",
    "%06u%%%v",
    "x%3.02u-%u",
    "%Nu",
]


@pytest.mark.parametrize(
    ("fmt", "settings"),
    [(fmt, {}) for fmt in FORMATS] + [("x%3.02u", {"pop3_uidl_duplicates": "rename"})],
)
async def test_format_as_dovecot_expands_it(fmt: str, settings: dict[str, str]) -> None:
    """pop3d's expansion of pop3_uidl_format agrees with Dovecot's own, character for character.

    Duplicates get -2, -3... as with Dovecot's ``pop3_uidl_duplicates = rename``.
    """
    with dovecot_site() as site:
        site.add_user("alice", USERS["alice"])
        for n in range(1, 4):
            site.deliver("alice", message("alice", n), f"17000000{n:02d}.M{n}P7.Mail.Example")
        with running(site, pop3_uidl_format=fmt, settings=settings) as port:
            before = {"alice": client_uidls(port, "alice")}
        storage = MaildirStorage(site.mail, dovecot_uidl_format=fmt)
        with trio.fail_after(10):
            assert await storage.lock("alice")
            try:
                _, uids = await storage.listing("alice")
                contents = []
                for n in range(1, 4):
                    data = await storage.get("alice", n)
                    assert isinstance(data, bytes)
                    contents.append(data.removesuffix(b"\n"))
            finally:
                await storage.unlock("alice")
        assert dict(zip(contents, uids, strict=True)) == before["alice"]


def test_doveadm_agrees_on_the_default_format() -> None:
    """A cross-check with Dovecot's own view: doveadm fetch uid and the mailbox's UIDVALIDITY."""
    with dovecot_site() as site:
        site.add_user("alice", USERS["alice"])
        site.deliver("alice", message("alice", 1), "1700000001.M1P1.mail.example")
        with running(site) as port:
            seen = client_uidls(port, "alice")
            status = doveadm(site, "mailbox", "status", "-u", "alice", "uidvalidity", "INBOX")
        validity = int(status.split("=")[1])
        assert list(seen.values()) == [f"{1:08x}{validity:08x}"]
