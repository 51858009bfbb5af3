"""The container's entrypoint: fill in container defaults, then exec ``pop3d serve``.

    docker run pop3d                       -> pop3d serve (with the defaults below)
    docker run pop3d serve --log-level debug
    docker run pop3d --log-level debug      (flags alone mean serve)
    docker run pop3d pop3d user list --users /etc/pop3d/users   (anything else runs as given)

Every default is a ``POP3D_*`` variable that pop3d itself reads, and is set only when the
setting is given nowhere else: not as a flag, not in the environment, not in the TOML file
(``--config``, else ``POP3D_CONFIG``, else ``/etc/pop3d/pop3d.toml`` when it exists).  So what you set always wins.

- listen        0.0.0.0:110
- tls-cert/key  /etc/pop3d/tls/cert.pem and key.pem, when both exist
- listen-tls    0.0.0.0:995, when there is a certificate (from any source)
- users         /etc/pop3d/users, when it exists; else the demo (user demo, password demo)
- mail-root     /var/lib/pop3d/mail, when there are users (not for the demo)
- cleartext-auth-from  0.0.0.0/0,::/0 for the demo only (its password is public anyway)
- admin-token-file     /etc/pop3d/admin-token, when it exists
- admin         0.0.0.0:8110 with a token (from any source), else pop3d's 127.0.0.1:8110
- grace-period  8 (seconds), so that a stop ends within docker stop's 10 s
- user          pop3d, when started as root: pop3d binds its ports, then becomes it

The resolved command line and POP3D_* variables go to /run/pop3d/serve.json (root only),
where the healthcheck finds them: it checks the admin address pop3d really uses.  Started
as another user (docker run --user), it cannot write there, and the healthcheck calls
resolve() itself, on the container's environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import sys
import tomllib
from pathlib import Path

ETC = Path("/etc/pop3d")
CONFIG = ETC / "pop3d.toml"
TLS_CERT = ETC / "tls" / "cert.pem"
TLS_KEY = ETC / "tls" / "key.pem"
USERS = ETC / "users"
TOKEN_FILE = ETC / "admin-token"
MAIL_ROOT = Path("/var/lib/pop3d/mail")
STATE = Path("/run/pop3d/serve.json")
RUN_AS = "pop3d"


def log(message: str) -> None:
    print(f"pop3d-container: {message}", file=sys.stderr, flush=True)


def flag_given(args: list[str], name: str) -> bool:
    flag = "--" + name
    return any(arg == flag or arg.startswith(flag + "=") for arg in args)


def flag_value(args: list[str], name: str) -> str | None:
    flag = "--" + name
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1 :]
    return None


def resolve(args: list[str], environ: dict[str, str]) -> tuple[list[str], dict[str, str], bool]:
    """``pop3d serve``'s arguments and environment with the container defaults; and whether it is the demo."""
    args, env = list(args), dict(environ)

    config = flag_value(args, "config") or env.get("POP3D_CONFIG") or None
    if config is None and CONFIG.is_file():
        config = str(CONFIG)
        args = ["--config", config, *args]
    toml: dict[str, object] = {}
    if config is not None:
        try:
            with open(config, "rb") as file:
                toml = {key.replace("_", "-"): value for key, value in tomllib.load(file).items()}
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
            pass  # pop3d reports it, in its own words

    def given(name: str) -> bool:
        return flag_given(args, name) or "POP3D_" + name.upper().replace("-", "_") in env or name in toml

    def default(name: str, value: str) -> None:
        if not given(name):
            env["POP3D_" + name.upper().replace("-", "_")] = value

    default("listen", "0.0.0.0:110")
    if not given("tls-cert") and not given("tls-key") and TLS_CERT.is_file() and TLS_KEY.is_file():
        env["POP3D_TLS_CERT"], env["POP3D_TLS_KEY"] = str(TLS_CERT), str(TLS_KEY)
    if given("tls-cert"):
        default("listen-tls", "0.0.0.0:995")
    if not given("users") and USERS.is_file():
        env["POP3D_USERS"] = str(USERS)
    demo = not given("users") and not given("mail-root")
    if demo:
        default("cleartext-auth-from", "0.0.0.0/0,::/0")
    elif given("users"):
        default("mail-root", str(MAIL_ROOT))
    if not given("admin-token") and TOKEN_FILE.is_file():
        default("admin-token-file", str(TOKEN_FILE))
    if given("admin-token") or given("admin-token-file"):
        default("admin", "0.0.0.0:8110")
    default("grace-period", "8")
    if os.geteuid() == 0 and not given("allow-root"):
        default("user", RUN_AS)
        name = flag_value(args, "user") or env.get("POP3D_USER") or str(toml.get("user") or RUN_AS)
        with contextlib.suppress(KeyError):  # pop3d says "user: no such user"
            # Where the demo data goes (~/.local/share/pop3d/demo) once pop3d is that user.
            env["HOME"] = pwd.getpwnam(name).pw_dir
    return args, env, demo


def main(argv: list[str]) -> None:
    if argv and argv[0] != "serve" and not argv[0].startswith("-"):
        os.execvp(argv[0], argv)  # another command: pop3d user ..., bash, ...
    args, env, demo = resolve(argv[1:] if argv and argv[0] == "serve" else argv, dict(os.environ))
    if demo:
        log("no /etc/pop3d/users: serving the demo (user demo, password demo)")
    command = ["pop3d", "serve", *args]
    try:
        STATE.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(STATE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump({"args": args, "env": {k: v for k, v in env.items() if k.startswith("POP3D_")}}, file)
    except OSError as exc:
        log(f"cannot write {STATE} ({exc.strerror}): the healthcheck works the settings out again")
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    main(sys.argv[1:])
