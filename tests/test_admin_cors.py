"""CORS on the admin API: ``--admin-cors-origin`` lets pages of other web origins call it from a browser.

Over real HTTP: a ``pop3d serve`` process (flags, environment, SIGHUP) and
the app served by Hypercorn in this process.  What a browser needs:
preflights from an allowed origin answered without the token, the origin
echoed (never ``*``) with ``Vary: Origin``, the token still required of
real requests, and nothing for any other origin.  Then the setting itself:
flag, environment, TOML, normalisation and one-line errors.
"""

from __future__ import annotations

import functools
import http.client
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from pop3d.admin.access import CORS_MAX_AGE, CorsOrigins, cors_of, parse_origin
from pop3d.admin.app import create_app
from pop3d.admin.serve import serve_admin

from pop3d.settings import SettingsError, effective_settings, load_settings

from .serve_process import AS_ROOT, ServeProcess, make_site, serve_args

TOKEN = "cors-token-3b9d"
DASH = "https://dash.example.org"
LOCAL = "http://localhost:3000"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Reply:
    """An HTTP response: status, headers (case-insensitive) and body."""

    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.status = response.status
        self.headers = response.headers
        self.body = response.read()

    def cors(self) -> dict[str, str]:
        """The ``Access-Control-*`` headers, names lower-cased."""
        return {
            name.lower(): value for name, value in self.headers.items() if name.lower().startswith("access-control-")
        }

    def vary(self) -> set[str]:
        return {part.strip().lower() for value in self.headers.get_all("Vary") or [] for part in value.split(",")}


def call(base: str, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None) -> Reply:
    """One request to the admin API at ``base`` (``http://127.0.0.1:PORT``)."""
    host, _, port = base.removeprefix("http://").rpartition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        return Reply(connection.getresponse())
    finally:
        connection.close()


def preflight(base: str, path: str, origin: str, method: str = "GET", headers: str = "authorization") -> Reply:
    """What a browser sends before a cross-origin request with a token (no token in it)."""
    return call(
        base,
        "OPTIONS",
        path,
        {"Origin": origin, "Access-Control-Request-Method": method, "Access-Control-Request-Headers": headers},
    )


@pytest.fixture(scope="module")
def admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The admin URL of a ``pop3d serve`` with a token and two allowed origins (flag and environment)."""
    site = make_site(tmp_path_factory.mktemp("cors"))
    args = serve_args(site, "--admin", "127.0.0.1:0", "--admin-cors-origin", DASH)
    env = {"POP3D_ADMIN_TOKEN": TOKEN, "POP3D_ADMIN_CORS_ORIGIN": "http://other.example.org"}
    # The flag wins over the environment, as for every setting: only DASH and LOCAL are allowed.
    with ServeProcess(*args, "--admin-cors-origin", LOCAL, env=env) as proc:
        proc.wait_ready()
        assert proc.admin is not None
        yield proc.admin


# -- a browser's requests, against pop3d serve --------------------------------


@pytest.mark.parametrize("origin", [DASH, LOCAL])
def test_preflight_from_an_allowed_origin_is_answered_without_the_token(admin: str, origin: str) -> None:
    reply = preflight(admin, "/servers/pop3/config", origin, method="PATCH", headers="authorization,content-type")
    assert reply.status == 204 and reply.body == b""
    cors = reply.cors()
    assert cors["access-control-allow-origin"] == origin
    assert {m.strip() for m in cors["access-control-allow-methods"].split(",")} == {"GET", "POST", "PATCH", "DELETE"}
    assert {h.strip().lower() for h in cors["access-control-allow-headers"].split(",")} >= {
        "authorization",
        "content-type",
    }
    assert int(cors["access-control-max-age"]) == CORS_MAX_AGE
    assert "origin" in reply.vary()


def test_requests_from_an_allowed_origin_still_need_the_token(admin: str) -> None:
    without = call(admin, "GET", "/servers", {"Origin": DASH})
    assert without.status == 401
    # The page can read the 401 (and why), so it can ask for the token.
    assert without.cors()["access-control-allow-origin"] == DASH
    assert "www-authenticate" in without.cors()["access-control-expose-headers"].lower()
    wrong = call(admin, "GET", "/servers", {"Origin": DASH, "Authorization": "Bearer nope"})
    assert wrong.status == 401
    good = call(admin, "GET", "/servers", {"Origin": DASH, **AUTH})
    assert good.status == 200 and b'"pop3"' in good.body
    assert good.cors()["access-control-allow-origin"] == DASH  # the origin, never *
    assert "origin" in good.vary()


def test_a_write_from_an_allowed_origin(admin: str) -> None:
    headers = {"Origin": LOCAL, "Content-Type": "application/json", **AUTH}
    reply = call(admin, "PATCH", "/servers/pop3/config", headers, body=b'{"idle_timeout": 900}')
    assert reply.status == 200, reply.body
    assert reply.cors()["access-control-allow-origin"] == LOCAL
    assert call(admin, "GET", "/servers/pop3/config/idle_timeout", AUTH).body.count(b"900") == 1


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example.org",
        "http://other.example.org",  # from the environment, which the flags override
        "http://dash.example.org",  # another scheme is another origin
        "https://dash.example.org:8443",  # and so is another port
        "https://dash.example.org.evil.example",
        "null",  # a sandboxed page or a file://
    ],
)
def test_other_origins_get_no_cors_headers(admin: str, origin: str) -> None:
    assert preflight(admin, "/servers", origin).cors() == {}
    # Not answered as a preflight: the token check answers it, like any request without the token.
    assert preflight(admin, "/servers", origin).status == 401
    reply = call(admin, "GET", "/servers", {"Origin": origin, **AUTH})
    assert reply.status == 200 and reply.cors() == {}


def test_without_an_origin_nothing_changes_but_vary(admin: str) -> None:
    reply = call(admin, "GET", "/servers", AUTH)
    assert reply.status == 200 and reply.cors() == {}
    assert "origin" in reply.vary()  # a cache must not hand this answer to a page of an allowed origin
    # The public endpoints stay public, and say so to allowed pages.
    health = call(admin, "GET", "/healthz", {"Origin": DASH})
    assert health.status == 200 and health.cors()["access-control-allow-origin"] == DASH


# -- create_app, served by Hypercorn in this process ----------------------------


async def served(app: object, *requests: tuple[str, str, dict[str, str]]) -> list[Reply]:
    """Serve ``app`` on a free loopback port, make ``requests`` (method, path, headers), stop."""
    stop = trio.Event()
    replies: list[Reply] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(functools.partial(serve_admin, app, "127.0.0.1:0", shutdown_trigger=stop.wait))
            for method, path, headers in requests:
                replies.append(await trio.to_thread.run_sync(call, url, method, path, headers))
            stop.set()
    return replies


async def test_no_origins_by_default_means_no_cors() -> None:
    preflight_headers = {"Origin": DASH, "Access-Control-Request-Method": "GET"}
    answered, plain = await served(
        create_app(), ("OPTIONS", "/servers", preflight_headers), ("GET", "/servers", {"Origin": DASH})
    )
    assert answered.cors() == {} and plain.cors() == {}
    assert plain.status == 200 and "origin" not in plain.vary()


async def test_without_a_token_an_allowed_origin_may_call() -> None:
    app = create_app(cors_origins=["https://Dash.Example.org:443"])
    assert cors_of(app).allowed == {DASH}  # as browsers write it
    answered, plain = await served(
        app,
        ("OPTIONS", "/servers", {"Origin": DASH, "Access-Control-Request-Method": "DELETE"}),
        ("GET", "/servers", {"Origin": DASH}),
    )
    assert answered.status == 204 and answered.cors()["access-control-allow-origin"] == DASH
    assert plain.status == 200 and plain.cors()["access-control-allow-origin"] == DASH


async def test_origins_can_change_while_serving() -> None:
    app = create_app(token=TOKEN, cors_origins=[DASH])
    cors_of(app).replace([LOCAL])
    old, new = await served(app, ("GET", "/healthz", {"Origin": DASH}), ("GET", "/healthz", {"Origin": LOCAL}))
    assert old.cors() == {} and new.cors()["access-control-allow-origin"] == LOCAL
    with pytest.raises(ValueError, match="path"):
        cors_of(app).replace([DASH, "https://a.example.org/x"])
    assert cors_of(app).allowed == {LOCAL}  # a bad list changes nothing


def test_create_app_refuses_a_bad_origin() -> None:
    with pytest.raises(ValueError, match="not an origin"):
        create_app(cors_origins=["*"])


# -- the origin's form ----------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "origin"),
    [
        ("https://dash.example.org", "https://dash.example.org"),
        (" HTTPS://Dash.Example.ORG ", "https://dash.example.org"),
        ("https://dash.example.org:443", "https://dash.example.org"),
        ("http://dash.example.org:80", "http://dash.example.org"),
        ("http://dash.example.org:443", "http://dash.example.org:443"),
        ("http://127.0.0.1:3000", "http://127.0.0.1:3000"),
        ("http://[::1]:3000", "http://[::1]:3000"),
        ("http://[0:0::1]", "http://[::1]"),
        ("https://xn--bcher-kva.example", "https://xn--bcher-kva.example"),
    ],
)
def test_origins_are_written_as_browsers_send_them(given: str, origin: str) -> None:
    assert parse_origin(given) == origin
    assert CorsOrigins([given]).allows(origin)


@pytest.mark.parametrize(
    ("given", "why"),
    [
        ("*", "http:// or https://"),
        ("dash.example.org", "http:// or https://"),
        ("ftp://dash.example.org", "http:// or https://"),
        ("https:dash.example.org", "http:// or https://"),
        ("https://dash.example.org/", "no path"),
        ("https://dash.example.org/admin", "no path"),
        ("https://dash.example.org?x=1", "no path"),
        ("https://dash.example.org#top", "no path"),
        ("https://user@dash.example.org", "no user"),
        ("https://dash.example.org:99999", "scheme://host"),
        ("https://dash.example.org:http", "scheme://host"),
        ("https://", "bad host"),
        ("https://dash_example.org", "bad host"),
        ("https://bücher.example", "bad host"),
        ("https://[::g]", "scheme://host"),
    ],
)
def test_bad_origins_are_one_line_errors(given: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_origin(given)
    assert why in str(info.value) and "\n" not in str(info.value)


# -- the setting: flag, environment, TOML ------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No ``POP3D_*`` variable of the test runner's: each test sets its own."""
    for name in list(os.environ):
        if name.upper().startswith("POP3D_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_the_setting_from_flags_environment_and_toml(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert load_settings({}).admin_cors_origin == []
    # Flags (repeated): normalised, duplicates once.
    flags = load_settings({"admin_cors_origin": [DASH, LOCAL, "https://DASH.example.org:443"]})
    assert flags.admin_cors_origin == [DASH, LOCAL]
    config = tmp_path / "pop3d.toml"
    config.write_text(f'admin-cors-origin = ["{DASH}", "{LOCAL}"]\n')
    assert load_settings({}, config).admin_cors_origin == [DASH, LOCAL]
    config.write_text(f'admin_cors_origin = "{LOCAL}"\n')  # a string, as in the environment
    assert load_settings({}, config).admin_cors_origin == [LOCAL]
    # The environment: comma-separated, as listen and cleartext-auth-from; it beats the file.
    clean_env.setenv("POP3D_ADMIN_CORS_ORIGIN", f"{DASH}, http://[::1]:8080")
    assert load_settings({}, config).admin_cors_origin == [DASH, "http://[::1]:8080"]
    clean_env.setenv("POP3D_ADMIN_CORS_ORIGIN", "none")
    assert load_settings({}, config).admin_cors_origin == []
    # And the flag beats both.
    assert load_settings({"admin_cors_origin": [LOCAL]}, config).admin_cors_origin == [LOCAL]


@pytest.mark.parametrize("bad", ["https://dash.example.org/", "*", "dash.example.org"])
def test_a_bad_origin_is_a_one_line_settings_error(clean_env: pytest.MonkeyPatch, bad: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({"admin_cors_origin": [DASH, bad]})
    message = str(info.value)
    assert message.startswith(f"admin-cors-origin: {bad!r} is not an origin") and "\n" not in message
    clean_env.setenv("POP3D_ADMIN_CORS_ORIGIN", bad)
    with pytest.raises(SettingsError, match=r"^admin-cors-origin: "):
        load_settings({})


def test_check_config_shows_the_origins(clean_env: pytest.MonkeyPatch) -> None:
    settings = load_settings({"admin_cors_origin": [DASH, LOCAL]})
    assert ("admin-cors-origin", f'["{DASH}", "{LOCAL}"]') in effective_settings(settings)
    assert "admin-cors-origin" not in dict(effective_settings(load_settings({})))
    assert dict(effective_settings(load_settings({}), everything=True))["admin-cors-origin"] == "[]"


def run_pop3d(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The ``pop3d`` command as a subprocess, with only the ``POP3D_*`` variables of ``env``."""
    clean = {key: value for key, value in os.environ.items() if not key.upper().startswith("POP3D_")}
    return subprocess.run(
        [sys.executable, "-m", "pop3d", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **AS_ROOT, **env},
        stdin=subprocess.DEVNULL,
    )


def test_the_command_line(tmp_path: Path) -> None:
    result = run_pop3d(
        "check-config", "--admin-cors-origin", "https://Dash.example.org", "--admin-cors-origin", LOCAL, env={}
    )
    assert result.returncode == 0, result.stderr
    assert f'admin-cors-origin = ["{DASH}", "{LOCAL}"]\n' in result.stdout
    # Without a token, a warning: pages of those origins can use the API from this host's browsers.
    assert "no token: pages from https://dash.example.org, http://localhost:3000" in result.stderr
    env = {"POP3D_ADMIN_CORS_ORIGIN": "https://dash.example.org/app"}
    for command in ("check-config", "serve"):
        bad = run_pop3d(command, "--listen", "127.0.0.1:0", env=env)
        assert bad.returncode == 2
        assert bad.stderr.strip().splitlines() == [
            "pop3d: error: admin-cors-origin: 'https://dash.example.org/app' is not an origin: "
            "no path, give https://dash.example.org"
        ]


# -- SIGHUP --------------------------------------------------------------------------


def test_sighup_replaces_the_origins(site: Path) -> None:
    config = site / "pop3d.toml"
    config.write_text(f'admin-cors-origin = ["{DASH}"]\n')
    args = serve_args(site, "--config", str(config), "--admin", "127.0.0.1:0")
    with ServeProcess(*args, env={"POP3D_ADMIN_TOKEN": TOKEN}) as proc:
        proc.wait_ready()
        assert proc.admin is not None
        assert preflight(proc.admin, "/servers", DASH).status == 204
        assert preflight(proc.admin, "/servers", LOCAL).cors() == {}

        config.write_text(f'admin-cors-origin = ["{LOCAL}"]\n')
        proc.signal(signal.SIGHUP)
        proc.wait_for(rf'reload: admin_cors_origin \["{DASH}"\] -> \["{LOCAL}"\]$')
        assert preflight(proc.admin, "/servers", DASH).cors() == {}
        assert preflight(proc.admin, "/servers", LOCAL).cors()["access-control-allow-origin"] == LOCAL

        # A bad origin keeps the old ones.
        config.write_text('admin-cors-origin = ["https://*.example.org"]\n')
        proc.signal(signal.SIGHUP)
        proc.wait_for(r"reload: keeping the old settings: admin-cors-origin: 'https://\*\.example\.org' is not")
        assert preflight(proc.admin, "/servers", LOCAL).status == 204
