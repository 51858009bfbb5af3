"""The ``pop3d`` command: ``serve``, ``check-config``, ``user add|passwd|remove|list`` and ``uidl import|show``.

Errors are one line on stderr (``pop3d: error: ...``) and exit status 2.
Passwords are read from a prompt, or from stdin when it is not a terminal;
never from the command line, where other users could see them.
"""

from __future__ import annotations

import argparse
import functools
import getpass
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from . import __version__, logs
from .errors import Pop3dError
from .settings import (
    DEFAULT_ADMIN,
    DEFAULT_LISTEN,
    ServeSettings,
    SettingsError,
    effective_settings,
    load_settings,
)

__all__ = ["main", "serve_settings", "setting_flags"]

# Kept for importers; the formats live in pop3d.logs.
LOG_FORMAT = logs.TEXT_FORMAT


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pop3d", description="A POP3 server (RFC 1939) on Trio.")
    parser.add_argument("--version", action="version", version=f"pop3d {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the server",
        description="Serve Maildirs to POP3 clients. Settings come from flags, POP3D_* variables, "
        "then the --config TOML file. With no --users/--mail-root, serves a demo data directory. "
        "SIGHUP reloads the settings and the TLS certificate.",
    )
    _serve_flags(serve)
    check = commands.add_parser(
        "check-config",
        help="check the settings of serve and print them",
        description="Check the settings serve would run with (flags, POP3D_* variables, the --config file) "
        "without binding or serving, and print those that differ from the defaults as TOML, secrets hidden. "
        "Exit status 0 if they are good, 2 with a one-line error if not.",
    )
    _serve_flags(check)
    check.add_argument("--all", action="store_true", help="print every setting, defaults too")
    _user_parser(commands)
    from .uidl_cli import add_uidl_parser

    add_uidl_parser(commands)
    return parser


def _serve_flags(serve: argparse.ArgumentParser) -> None:
    """The flags of ``serve`` (and of ``check-config``, which must read them alike)."""
    serve.add_argument(
        "--config", type=Path, metavar="FILE", help="TOML file with settings (default: $POP3D_CONFIG, if set)"
    )
    serve.add_argument(
        "--listen",
        action="append",
        metavar="HOST:PORT",
        help=f"POP3 address, repeatable (default {DEFAULT_LISTEN}); none for no plain POP3",
    )
    serve.add_argument(
        "--listen-tls", action="append", metavar="HOST:PORT", help="POP3S address (TLS from the first byte), repeatable"
    )
    serve.add_argument("--tls-cert", type=Path, metavar="FILE", help="PEM certificate chain: offers STLS, allows POP3S")
    serve.add_argument("--tls-key", type=Path, metavar="FILE", help="PEM private key of --tls-cert")
    serve.add_argument(
        "--cleartext-auth-from",
        metavar="CIDRS",
        help="networks that may send a password before TLS, comma-separated, or none (default loopback)",
    )
    serve.add_argument("--users", type=Path, metavar="FILE", help="Dovecot-style passwd-file")
    serve.add_argument("--mail-root", type=Path, metavar="DIR", help="directory with one Maildir per user")
    serve.add_argument(
        "--dovecot-uidl-format",
        metavar="FORMAT",
        help="Dovecot's pop3_uidl_format, for Maildirs Dovecot served (default %%08Xu%%08Xv; none: ignore them)",
    )
    serve.add_argument(
        "--passdb-sql", metavar="DSN", help="users from PostgreSQL: a libpq connection string or postgresql:// URL"
    )
    serve.add_argument("--passdb-sql-password-file", type=Path, metavar="FILE", help="file with the database password")
    serve.add_argument("--passdb-sql-query", metavar="SQL", help="the passdb query, with %%(user)s for the user name")
    serve.add_argument("--hostname", metavar="NAME", help="host name in the greeting")
    serve.add_argument("--idle-timeout", type=float, metavar="SECONDS", help="idle session timeout (default 600)")
    serve.add_argument("--apop", action="store_true", default=None, help="offer APOP (only {PLAIN} users can use it)")
    serve.add_argument("--grace-period", type=float, metavar="SECONDS", help="time to finish at shutdown (default 30)")
    serve.add_argument("--admin", metavar="HOST:PORT", help=f"admin HTTP API address (default {DEFAULT_ADMIN})")
    serve.add_argument("--no-admin", action="store_true", default=None, help="do not start the admin API")
    serve.add_argument("--admin-token-file", type=Path, metavar="FILE", help="file with the admin API bearer token")
    serve.add_argument(
        "--admin-cors-origin",
        action="append",
        metavar="ORIGIN",
        help="web origin (scheme://host[:port]) whose pages may call the admin API from a browser, repeatable",
    )
    serve.add_argument(
        "--log-level", type=str.lower, choices=["debug", "info", "warning", "error"], help="default info"
    )
    serve.add_argument(
        "--log-format", type=str.lower, choices=["text", "json"], help="text (default), or one JSON object a line"
    )
    limits = serve.add_argument_group("limits (defaults in docs/serve.md)")
    for flag, kind, text in (
        ("--max-connections", int, "open connections at most (1000)"),
        ("--max-connections-per-ip", int, "connections not logged in from one address (300)"),
        ("--max-userip-connections", int, "sessions of one user from one address (10; 0: no limit)"),
        ("--max-logins-per-ip", int, "login attempts in progress from one address; more wait (3)"),
        ("--login-timeout", float, "seconds to log in after connecting (60)"),
        ("--login-failure-delay", float, "seconds before a failed login is answered (1)"),
        ("--max-auth-failures", int, "failed logins before a session is closed (3)"),
        ("--penalty-max", float, "longest penalty wait of a guessing address or user (15)"),
    ):
        limits.add_argument(flag, type=kind, metavar="N", help=text)
    limits.add_argument("--proxy-protocol-from", metavar="CIDRS", help="proxies that send a PROXY header (none)")
    limits.add_argument("--user", metavar="NAME", help="run as this user once the ports are bound")
    limits.add_argument("--group", metavar="NAME", help="run with this group (default: the user's)")
    limits.add_argument("--allow-root", action="store_true", default=None, help="serve mail as root")
    cluster = serve.add_argument_group("cluster (docs/cluster.md)")
    cluster.add_argument("--lock", choices=["local", "etcd"], help="mailbox locks: local flock (default), or etcd")
    cluster.add_argument("--etcd", metavar="URL[,URL...]", help="etcd endpoints for --lock etcd (http://HOST:PORT)")
    cluster.add_argument("--lock-ttl", type=float, metavar="SECONDS", help="lease of a lock in etcd (default 5)")
    cluster.add_argument("--lock-prefix", metavar="PREFIX", help="key prefix of the locks (default /pop3d/locks)")
    cluster.add_argument("--instance-name", metavar="NAME", help="this instance's name in locks (default: host name)")


def _user_parser(commands: Any) -> None:
    user = commands.add_parser("user", help="manage the users of a passwd-file")
    actions = user.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (
        ("add", "add a user (the password is stored as {ARGON2ID})"),
        ("passwd", "change a user's password"),
        ("remove", "remove a user"),
        ("list", "list the users"),
    ):
        action = actions.add_parser(name, help=text)
        if name != "list":
            action.add_argument("name", help="user name")
        if name in ("add", "passwd"):
            action.add_argument(
                "--scheme",
                type=str.upper,
                choices=["ARGON2ID", "BLF-CRYPT", "SHA512-CRYPT", "PLAIN"],
                default="ARGON2ID" if name == "add" else None,
                help="how to store the password (APOP needs PLAIN); default ARGON2ID"
                + ("" if name == "add" else ", or PLAIN for a PLAIN user"),
            )
        action.add_argument(
            "--users", type=Path, metavar="FILE", help="the passwd-file (default: $POP3D_USERS)", default=None
        )


def setting_flags() -> dict[str, str]:
    """The flag of each setting of ``serve`` that has one: ``{"mail_root": "--mail-root", ...}``.

    Read from the parser itself, so it names the flags ``serve`` really
    takes.  A setting with no flag (``admin_token``: a secret does not
    belong on a command line) is left out.
    """
    serve = _subparser(_parser(), "serve")
    return {
        action.dest: action.option_strings[0]
        for action in serve._actions
        if action.dest in ServeSettings.model_fields and action.option_strings
    }


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]  # type: ignore[no-any-return]
    raise LookupError(name)


def serve_settings(argv: Sequence[str] = ()) -> ServeSettings:
    """The settings ``pop3d serve ARGV`` would run with: its flags, the ``POP3D_*`` variables, the TOML file.

    For tools that must agree with the server, such as the container's
    healthcheck.  Raises :class:`~pop3d.settings.SettingsError` (or
    :class:`SystemExit` for a flag argparse refuses).
    """
    args = _parser().parse_args(["serve", *argv])
    return _settings(args)[0]


def _settings(args: argparse.Namespace) -> tuple[ServeSettings, Any]:
    """The settings of ``serve`` or ``check-config``, and how to read them again (SIGHUP)."""
    # Every flag is named after its setting (see setting_flags); only those
    # given go in, so the environment and the TOML file still count for the others.
    flags = setting_flags()
    cli: dict[str, Any] = {key: value for key, value in vars(args).items() if key in flags and value is not None}

    def load() -> ServeSettings:
        return load_settings(cli, args.config)

    return load(), load


def _serve(args: argparse.Namespace) -> None:
    settings, load = _settings(args)
    logs.setup(settings.log_level, settings.log_format)
    from .serve import serve

    trio.run(functools.partial(serve, settings, reload_settings=load))


def _check_config(args: argparse.Namespace) -> None:
    settings, _ = _settings(args)
    # Warnings (no token, no certificate on a public address) go to stderr, as serve would log them.
    logs.setup("warning", settings.log_format)
    from .serve import check

    check(settings)
    for key, value in effective_settings(settings, everything=args.all):
        # TOML has no null: a setting without a value is shown commented out.
        print(f"{key} = {value}" if value else f"# {key} =")


def _users_file(args: argparse.Namespace) -> Path:
    path = args.users or (Path(os.environ["POP3D_USERS"]) if os.environ.get("POP3D_USERS") else None)
    if path is None:
        raise SettingsError("users: give --users FILE or set POP3D_USERS")
    return Path(path)


def _read_password() -> str:
    if sys.stdin.isatty():
        try:
            first = getpass.getpass("New password: ")
            again = getpass.getpass("Again: ")
        except EOFError:  # Ctrl-D at the prompt
            raise SettingsError("password: none given (end of input); nothing changed") from None
        if again != first:
            raise SettingsError("password: the two passwords differ")
        password = first
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise SettingsError("password: empty")
    return password


def _user(args: argparse.Namespace) -> None:
    from . import passwd

    path = _users_file(args)
    if args.action == "list":
        for name in passwd.list_users(path):
            print(name)
    elif args.action == "add":
        passwd.add_user(path, args.name, _read_password(), scheme=args.scheme)
        print(f"added {args.name} to {path}", file=sys.stderr)
    elif args.action == "passwd":
        passwd.set_password(path, args.name, _read_password(), scheme=args.scheme)
        print(f"changed the password of {args.name}", file=sys.stderr)
    elif args.action == "remove":
        passwd.remove_user(path, args.name)
        print(f"removed {args.name} from {path}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            _serve(args)
        elif args.command == "uidl":
            from .uidl_cli import run as run_uidl

            return run_uidl(args)
        elif args.command == "check-config":
            _check_config(args)
        else:
            _user(args)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        # A failure inside the server's nursery arrives wrapped in an exception group.
        expected = _expected_failure(exc)
        if expected is None:
            raise
        print(f"pop3d: error: {_one_line(expected)}", file=sys.stderr)
        return 2
    return 0


def _expected_failure(exc: BaseException) -> BaseException | None:
    """The user-facing error in ``exc`` (a bad setting, a busy port...), if that is all it is."""
    if isinstance(exc, Pop3dError | OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        leaves = [_expected_failure(inner) for inner in exc.exceptions]
        if leaves and all(leaf is not None for leaf in leaves):
            return leaves[0]
    return None


def _one_line(exc: BaseException) -> str:
    text = str(exc) if not isinstance(exc, OSError) or not exc.filename else f"{exc.filename}: {exc.strerror}"
    return " ".join(text.split())
