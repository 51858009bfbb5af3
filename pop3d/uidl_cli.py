"""``pop3d uidl import`` and ``pop3d uidl show``: the command-line face of UIDL migration.

:func:`add_uidl_parser` adds the ``uidl`` command to ``pop3d``'s parser and
:func:`run` runs it.  A bad argument or credentials file raises a
:class:`~pop3d.errors.Pop3dError` (``pop3d: error: ...``, exit status 2);
otherwise ``import`` exits with 0 when every user was imported (whatever
matched) and 1 when a user could not be (the old server refused the login,
say), after reporting every user.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

import trio

from . import uidl_import
from .uidl_import import DEFAULT_TIMEOUT, Source, UidlImportError, UserReport

__all__ = ["add_uidl_parser", "run"]


def add_uidl_parser(commands: Any) -> None:
    """Add ``uidl import`` and ``uidl show`` to ``commands`` (the ``add_subparsers()`` of ``pop3d``)."""
    uidl = commands.add_parser(
        "uidl",
        help="show a mailbox's UIDLs, or import them from another POP3 server",
        description="UIDLs are what POP3 clients that keep mail on the server remember each message by.",
    )
    actions = uidl.add_subparsers(dest="action", required=True, metavar="ACTION")
    imp = actions.add_parser(
        "import",
        help="keep the UIDLs of another POP3 server, matched by content",
        description="Log in to the old POP3 server as each user of the credentials file, fetch every "
        "message (nothing is deleted), find it in the user's Maildir by content, and pin its old UIDL "
        "there. Prints what matched and what did not. Exit status 0 if every user was imported, 1 if "
        "a user could not be, 2 for a bad argument.",
    )
    imp.add_argument("--from", dest="source", required=True, metavar="HOST[:PORT]", help="the old server")
    imp.add_argument(
        "--credentials",
        required=True,
        type=Path,
        metavar="FILE",
        help="user:password lines ({PLAIN} allowed), mode 0600 or stricter",
    )
    imp.add_argument("--mail-root", required=True, type=Path, metavar="DIR", help="directory with one Maildir per user")
    imp.add_argument(
        "--tls", action="store_true", help="POP3S, TLS from the first byte (port 995 by default); else STLS if offered"
    )
    imp.add_argument("--ca-file", type=Path, metavar="FILE", help="PEM CA certificates to verify the server with")
    imp.add_argument("--insecure", action="store_true", help="do not verify the server's certificate")
    imp.add_argument(
        "--allow-cleartext",
        action="store_true",
        help="send passwords without TLS to a server that offers none (loopback always may)",
    )
    imp.add_argument("--dry-run", action="store_true", help="report everything, change nothing")
    imp.add_argument("--replace", action="store_true", help="let the old server's UIDLs replace conflicting pins")
    imp.add_argument(
        "--user",
        dest="users",
        action="extend",
        nargs="+",
        metavar="NAME",
        help="only these users of the credentials file (repeatable)",
    )
    imp.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"longest wait for the old server at each step (default {DEFAULT_TIMEOUT:g})",
    )
    show = actions.add_parser(
        "show",
        help="list a mailbox's messages with their UIDLs and where each comes from",
        description="Each message's number, UIDL, where the UIDL comes from (maildir: the file's name; "
        "dovecot: Dovecot's dovecot-uidlist; imported: pinned by pop3d uidl import; hashed: a hash of a "
        "name that cannot be a UIDL) and its file, as a POP3 session would number them.",
    )
    show.add_argument("user", help="the user (mailbox) name")
    show.add_argument(
        "--mail-root", required=True, type=Path, metavar="DIR", help="directory with one Maildir per user"
    )
    show.add_argument(
        "--dovecot-uidl-format",
        metavar="FORMAT",
        help="Dovecot's pop3_uidl_format as pop3d serve has it (default %%08Xu%%08Xv); none: ignore Dovecot's files",
    )
    show.add_argument("--json", action="store_true", help="one JSON array of objects")


def run(args: argparse.Namespace) -> int:
    """Run ``pop3d uidl ...``; returns the exit status."""
    if args.action == "show":
        return _show(args)
    return _import(args)


def _source(args: argparse.Namespace) -> Source:
    if args.timeout <= 0:
        raise UidlImportError("--timeout: must be more than 0 seconds")
    try:
        host, port = uidl_import.parse_address(args.source, tls=args.tls)
    except ValueError as exc:
        raise UidlImportError(f"--from: {exc}") from None
    if args.insecure and args.ca_file is not None:
        raise UidlImportError("--insecure and --ca-file do not go together")
    try:
        context = uidl_import.client_context(args.ca_file, insecure=args.insecure)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise UidlImportError(f"--ca-file {args.ca_file}: {getattr(exc, 'strerror', None) or exc}") from None
    return Source(
        host=host,
        port=port,
        tls=args.tls,
        ssl_context=context,
        allow_cleartext=args.allow_cleartext,
        timeout=args.timeout,
    )


def _import(args: argparse.Namespace) -> int:
    source = _source(args)
    credentials = uidl_import.read_credentials(args.credentials)
    if not args.mail_root.is_dir():
        raise UidlImportError(f"--mail-root {args.mail_root}: not a directory")
    if args.insecure:
        print("pop3d: warning: --insecure: the old server's certificate is not checked", file=sys.stderr)

    def show(report: UserReport) -> None:
        for line in report.lines(dry_run=args.dry_run):
            print(line, flush=True)

    reports = trio.run(
        functools.partial(
            uidl_import.run_import,
            source,
            credentials,
            args.mail_root,
            users=args.users,
            dry_run=args.dry_run,
            replace=args.replace,
            progress=show,
        )
    )
    failed = [report.user for report in reports if report.error is not None]
    if args.dry_run:
        print("dry run: nothing was changed")
    if failed:
        print(f"pop3d: {len(failed)} of {len(reports)} users not imported: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _show(args: argparse.Namespace) -> int:
    from .callbacks import MailboxUnavailable
    from .maildir import MaildirStorage
    from .passwd import valid_user_name

    if not valid_user_name(args.user):
        raise UidlImportError(f"{args.user!r} cannot be a user (and mailbox) name")
    if not args.mail_root.is_dir():
        raise UidlImportError(f"--mail-root {args.mail_root}: not a directory")
    options: dict[str, Any] = {}
    if args.dovecot_uidl_format is not None:
        fmt = args.dovecot_uidl_format
        options["dovecot_uidl_format"] = None if fmt.lower() == "none" else fmt
    try:
        storage = MaildirStorage(args.mail_root, **options)
    except ValueError as exc:
        raise UidlImportError(f"--dovecot-uidl-format: {exc}") from None
    try:
        entries = trio.run(storage.uidl_report, args.user)
    except MailboxUnavailable as exc:  # a Maildir that cannot be served (a regular file, a symlink...)
        raise UidlImportError(str(exc)) from None
    rows = [{"number": e.number, "uidl": e.uidl, "source": e.source, "file": e.file, "size": e.size} for e in entries]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"{args.user}: no messages in {storage.path(args.user)}", file=sys.stderr)
        return 0
    number, uidl, source = (max(len(str(row[key])) for row in rows) for key in ("number", "uidl", "source"))
    for row in rows:
        print(f"{row['number']:>{number}}  {row['uidl']:<{uidl}}  {row['source']:<{source}}  {row['file']}")
    return 0
