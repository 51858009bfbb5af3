"""A small POP3 server built with Twisted, for the comparison in ``bench/run.py``.

    python bench/twisted_pop3.py --port 0 --users FILE --mail-root DIR

It serves the same passwd-file and Maildirs as ``pop3d serve`` does, with
the parts Twisted provides and nothing tuned:

- the protocol is ``twisted.mail.pop3.POP3`` (USER/PASS; its ``APOP``
  needs plain passwords and is not used here);
- logins go through a ``twisted.cred`` portal whose checker reads the
  Dovecot-style passwd-file (``user:{SCHEME}secret:...``): ``{PLAIN}`` is
  compared in the reactor thread, ``{ARGON2ID}`` and ``{BLF-CRYPT}`` are
  checked with argon2-cffi and bcrypt in Twisted's thread pool
  (``deferToThread``);
- each mailbox is a ``twisted.mail.maildir.MaildirMailbox`` of
  ``<mail-root>/<user>``.

One change to Twisted, without which RETR cannot work at all on Python 3:
``MaildirMailbox.getMessage`` opens the file in text mode, and the protocol
then fails on ``str`` chunks, so the subclass here opens it in binary mode.
Known faults are left as they are: ``MaildirMailbox`` reports file sizes
(LF line ends), not the CRLF octets that RETR sends, and dot-stuffing is
done per 16 KiB chunk, so a line starting with ``.`` right at a chunk
boundary is not stuffed.

Prints ``ready <port>`` on stdout once it listens; SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import hmac
import os
import resource
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, cast

import argon2
import bcrypt
from twisted.cred import checkers, credentials, error, portal
from twisted.internet import defer, protocol, reactor, threads
from twisted.mail import maildir, pop3
from zope.interface import implementer

_ARGON2 = argon2.PasswordHasher()


def read_passwd_file(path: Path) -> dict[bytes, str]:
    """``user -> {SCHEME}secret`` from a Dovecot-style passwd-file."""
    users: dict[bytes, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(":")
        users[name.encode()] = rest.split(":", 1)[0]
    return users


def verify(stored: str, password: bytes) -> bool:
    """Whether ``password`` matches ``stored`` (``{PLAIN}``, ``{ARGON2ID}`` or ``{BLF-CRYPT}``)."""
    scheme, _, secret = stored[1:].partition("}") if stored.startswith("{") else ("PLAIN", "", stored)
    scheme = scheme.upper()
    if scheme in ("PLAIN", "CLEAR", "CLEARTEXT"):
        return hmac.compare_digest(secret.encode(), password)
    if scheme in ("ARGON2ID", "ARGON2I"):
        try:
            return _ARGON2.verify(secret, password)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False
    if scheme == "BLF-CRYPT":
        try:
            return bcrypt.checkpw(password[:72], secret.encode())
        except ValueError:
            return False
    return False


@implementer(checkers.ICredentialsChecker)
class PasswdFileChecker:
    """Checks USER/PASS against the passwd-file; hashes are verified in the thread pool."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, users: dict[bytes, str]) -> None:
        self.users = users

    def requestAvatarId(self, creds: Any) -> defer.Deferred[bytes]:
        stored = self.users.get(creds.username)
        if stored is None:
            return defer.fail(error.UnauthorizedLogin())
        username: bytes = creds.username
        password: bytes = creds.password

        def result(ok: bool) -> bytes:
            if not ok:
                raise error.UnauthorizedLogin()
            return username

        if stored.upper().startswith(("{PLAIN}", "{CLEAR}", "{CLEARTEXT}")):
            return defer.maybeDeferred(verify, stored, password).addCallback(result)
        return threads.deferToThread(verify, stored, password).addCallback(result)


class BinaryMaildirMailbox(maildir.MaildirMailbox):
    """Twisted's ``MaildirMailbox``, but its messages are read as bytes (see the module's docstring)."""

    def getMessage(self, i: int) -> IO[bytes]:  # type: ignore[override]
        path = self.list[i]
        if not isinstance(path, bytes):
            raise ValueError("message deleted")
        return open(path, "rb")  # the protocol closes it once sent


@implementer(portal.IRealm)
class MaildirRealm:
    """One ``MaildirMailbox`` per login: ``<mail-root>/<user>``."""

    def __init__(self, mail_root: Path) -> None:
        self.mail_root = os.fsencode(mail_root)

    def requestAvatar(self, avatar_id: bytes, mind: object, *interfaces: Any) -> tuple[Any, Any, Callable[[], None]]:
        if pop3.IMailbox not in interfaces:
            raise NotImplementedError("only POP3 mailboxes")
        mailbox = BinaryMaildirMailbox(os.path.join(self.mail_root, avatar_id))
        return pop3.IMailbox, mailbox, lambda: None


class POP3(pop3.POP3):
    """Twisted's protocol, with the factory's portal, and TCP_NODELAY unless --nagle."""

    timeOut = 600  # RFC 1939's minimum autologout timer (Twisted's default is 300 s)

    def connectionMade(self) -> None:
        factory = cast(POP3Factory, self.factory)
        self.portal = factory.portal  # type: ignore[assignment]  # Twisted declares it None
        if factory.nodelay and self.transport is not None:
            self.transport.setTcpNoDelay(True)
        super().connectionMade()  # type: ignore[no-untyped-call]


class POP3Factory(protocol.ServerFactory):
    protocol = POP3  # type: ignore[assignment]  # a TypeVar mypy cannot solve here
    noisy = False

    def __init__(self, the_portal: portal.Portal, nodelay: bool) -> None:
        self.portal = the_portal
        self.nodelay = nodelay


def raise_open_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--users", type=Path, required=True, help="Dovecot-style passwd-file")
    parser.add_argument("--mail-root", type=Path, required=True, help="one Maildir per user")
    parser.add_argument("--nagle", action="store_true", help="leave Nagle's algorithm on (Twisted's default)")
    args = parser.parse_args()

    raise_open_file_limit()
    realm = cast(portal.IRealm, MaildirRealm(args.mail_root))
    checker = cast(checkers.ICredentialsChecker, PasswdFileChecker(read_passwd_file(args.users)))
    factory = POP3Factory(portal.Portal(realm, [checker]), nodelay=not args.nagle)
    tcp: Any = reactor  # the global reactor provides IReactorTCP and IReactorCore
    port = tcp.listenTCP(args.port, factory, backlog=1024, interface=args.host)
    print(f"ready {port.getHost().port}", flush=True)
    tcp.run()
    sys.exit(0)


if __name__ == "__main__":
    main()
