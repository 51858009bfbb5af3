"""The container's HEALTHCHECK: is pop3d ready, on the addresses it was really given?

It reads the command line and POP3D_* variables the entrypoint resolved
(/run/pop3d/serve.json; or resolves them again as the entrypoint does), has
pop3d's own settings loader work out the effective settings from them (flags,
environment, TOML file), then:

- with the admin API on: GET /readyz there (with the bearer token, when there is one);
- with the admin API off: reads the POP3 greeting of the first POP3 (or POP3S) address.

Exit status 0 when ready, 1 otherwise, with one line saying why.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

STATE = Path("/run/pop3d/serve.json")
TIMEOUT = 4.0


def settings() -> Any:
    try:
        state = json.loads(STATE.read_text(encoding="utf-8"))
        args, env = list(state["args"]), dict(state["env"])
    except (OSError, ValueError, KeyError):
        # Not started by the entrypoint as root: work its defaults out the same way.
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from entrypoint import resolve

        args, env, _ = resolve([], dict(os.environ))
    for name in [k for k in os.environ if k.startswith("POP3D_")]:
        del os.environ[name]
    os.environ.update({k: v for k, v in env.items() if k.startswith("POP3D_")})
    from pop3d.cli import serve_settings  # what `pop3d serve` itself makes of them

    return serve_settings(args)


def connect_host(host: str | None) -> str:
    """Where to reach a listener from inside the container."""
    if host in (None, "", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def check_admin(s: Any) -> str:
    host = connect_host(s.admin.host)
    url = f"http://{f'[{host}]' if ':' in host else host}:{s.admin.port}/readyz"
    request = urllib.request.Request(url)
    token = s.token()
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return f"{url}: {response.status} {response.read().decode(errors='replace').strip()}"
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"unhealthy: {url}: {exc.code} {exc.read().decode(errors='replace').strip()}") from None


def check_greeting(s: Any) -> str:
    tls = not s.listen
    address = (s.listen or s.listen_tls)[0]
    host = connect_host(address.host)
    with socket.create_connection((host, address.port), timeout=TIMEOUT) as sock:
        stream: socket.socket = sock
        if tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            stream = context.wrap_socket(sock)
        greeting = stream.recv(512).decode(errors="replace").strip()
    if not greeting.startswith("+OK"):
        raise SystemExit(f"unhealthy: {address}: {greeting!r}")
    return f"{'pop3s' if tls else 'pop3'} {host}:{address.port}: {greeting}"


def main() -> None:
    try:
        s = settings()
        print("healthy:", check_greeting(s) if s.no_admin or s.admin is None else check_admin(s))
    except SystemExit:
        raise
    except Exception as exc:
        raise SystemExit(f"unhealthy: {type(exc).__name__}: {exc}") from None


if __name__ == "__main__":
    sys.exit(main())
