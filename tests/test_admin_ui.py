"""The control page at /ui in a real browser, against a live ``pop3d serve``.

Debian's Chromium, headless, driven by Playwright.  Every request the page
makes to anywhere but the admin API is aborted and recorded: the page must
work offline.  Real POP3 clients (poplib) come and go while the page is
watched; what the page shows and does is checked against the server.  The
browser runs in another time zone than the machine (``ZONE``) and with its
clock off by a day, so that times must be the server's, shown in local time.
Screenshots go to ``$POP3D_TEST_OUTPUT`` (default ``test-output/`` in the
repository) for a person to look at.

Without Playwright or Chromium the tests are skipped, unless ``CI`` is set:
then they fail, so that a CI image that lost the browser does not pass.
"""

from __future__ import annotations

import json
import os
import poplib
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from .browser import MISSING, offline_chromium, playwright_sync
from .serve_process import ServeProcess, mail_files, make_site, serve_args

if MISSING is None:
    expect = playwright_sync.expect

TOKEN = "ui-token-3f9a7c"
TIMEOUT_MS = 15_000
# The server pushes a snapshot within 0.2 s of a change; "within a second", with room for a busy machine.
LIVE_S = 1.5
LIVE_MS = int(LIVE_S * 1000)
# Not the machine's zone (UTC in CI), and not a whole number of hours from it.
ZONE = "Asia/Kolkata"
# The browser's clock is this far off: what the page shows must come from the server's clock.
SKEW = timedelta(days=1)
REASON = "maintenance, back soon"
OUTPUT = Path(os.environ.get("POP3D_TEST_OUTPUT") or Path(__file__).resolve().parent.parent / "test-output")


@dataclass
class Browser:
    """A page on /ui, and every request it made."""

    page: Any
    base: str
    requests: list[str] = field(default_factory=list)
    bodies: list[Any] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    streams: set[Any] = field(default_factory=set)  # GET /events requests open
    blocked: set[str] = field(default_factory=set)

    def row(self, table: str, key: str, value: str) -> Any:
        return self.page.locator(f"#{table} tbody tr[data-{key}='{value}']")

    def screenshot(self, name: str) -> None:
        OUTPUT.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(OUTPUT / name), full_page=True)

    def snapshots(self, count: int = 2) -> None:
        """Wait until ``count`` more snapshots have been drawn."""
        for _ in range(count):
            at = self.page.locator("#main").get_attribute("data-at")
            self.page.wait_for_function(
                "at => document.querySelector('#main').dataset.at !== at", arg=at, timeout=LIVE_MS * 2
            )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_site(tmp_path_factory.mktemp("ui"))


@pytest.fixture
def proc(site: Path) -> Iterator[ServeProcess]:
    with ServeProcess(*serve_args(site), "--admin", "127.0.0.1:0", "--login-failure-delay", "0") as process:
        process.wait_ready()
        yield process


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    with offline_chromium() as browser:
        yield browser


@pytest.fixture
def open_ui(chromium: Any) -> Iterator[Callable[..., Browser]]:
    """Opens /ui of an admin API in a new browser context; closes them all afterwards."""
    contexts: list[Any] = []

    def open_(base: str, *, width: int = 1280, block: set[str] | None = None) -> Browser:
        context = chromium.new_context(viewport={"width": width, "height": 900}, timezone_id=ZONE, locale="en-US")
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.clock.set_system_time(datetime.now().astimezone() + SKEW)
        seen = Browser(page, base, blocked=block or set())

        def route(route: Any) -> None:
            request = route.request
            if not request.url.startswith(base + "/"):
                seen.refused.append(request.url)
                route.abort()
                return
            path = request.url.removeprefix(base)
            seen.requests.append(f"{request.method} {path}")
            if request.post_data:
                seen.bodies.append(json.loads(request.post_data))
            if path in seen.blocked:
                route.abort()
                return
            if path == "/events":
                seen.streams.add(request)
            route.continue_()

        page.route("**/*", route)
        for ended in ("requestfailed", "requestfinished"):
            page.on(ended, lambda request: seen.streams.discard(request))
        page.goto(f"{base}/ui", wait_until="load")
        return seen

    yield open_
    for context in contexts:
        context.close()


def login(proc: ServeProcess, user: str = "alice", password: str = "wonderland") -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", proc.port, timeout=10)
    client.user(user)
    client.pass_(password)
    return client


class Chatter(threading.Thread):
    """Sends NOOPs on a logged-in client until stopped or refused: each one makes a snapshot."""

    def __init__(self, client: poplib.POP3) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.stopped = threading.Event()
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            while not self.stopped.wait(0.05):
                self.client.noop()
        except (poplib.error_proto, OSError) as exc:
            self.error = exc

    def __enter__(self) -> Chatter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.join(10)


def api(base: str, method: str, path: str, body: object = None, token: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(base + path, method=method)
    if body is not None:
        request.data = json.dumps(body).encode()
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def is_focused(locator: Any) -> bool:
    return bool(locator.evaluate("element => element === document.activeElement"))


def test_page_loads_offline_and_lists_the_server(proc: ServeProcess, open_ui: Callable[..., Browser]) -> None:
    assert proc.admin is not None
    ui = open_ui(proc.admin)
    row = ui.row("servers", "server", "pop3")
    row.wait_for()
    assert row.locator("td").nth(1).inner_text() == "up"
    assert f"127.0.0.1:{proc.port}" in row.locator("td").nth(2).inner_text()
    assert ui.page.locator("#live").inner_text() == "live"
    # Accessible names start with the visible label (WCAG 2.5.3).
    expect(row.get_by_role("button", name="Up pop3", exact=True)).to_be_disabled()
    expect(row.get_by_role("button", name="Down pop3", exact=True)).to_be_enabled()
    expect(row.get_by_role("button", name="Destroy pop3", exact=True)).to_be_enabled()
    # Empty states say what to do; these users are not the demo's.
    ui.page.locator("#config-fields [data-option='auth']").wait_for()
    empty = ui.page.locator("#connections-empty")
    expect(empty).to_have_text(f"No connections — try curl pop3://USER:PASSWORD@127.0.0.1:{proc.port}/1.")
    assert "No penalties" in ui.page.locator("#penalties-empty").inner_text()
    assert ui.page.locator("#zone").inner_text() in {f"Times in {ZONE}", "Times in Asia/Calcutta"}  # ICU's name
    assert ui.refused == []
    ui.screenshot("ui-empty.png")


def test_a_session_appears_live_and_the_kick_button_closes_it(
    proc: ServeProcess, site: Path, open_ui: Callable[..., Browser]
) -> None:
    assert proc.admin is not None
    ui = open_ui(proc.admin)
    ui.row("servers", "server", "pop3").wait_for()
    before = mail_files(site)
    client = login(proc)
    logged_in = time.monotonic()
    ui.page.wait_for_function(
        "() => [...document.querySelectorAll('#connections tbody tr')].some(r => r.cells[5].textContent === 'trans')",
        polling=20,
    )
    assert time.monotonic() - logged_in <= LIVE_S
    conn = ui.page.locator("#connections tbody tr").first
    conn_id = conn.get_attribute("data-connection")
    cells = conn.locator("td")
    assert cells.nth(2).inner_text() == "alice"
    assert cells.nth(3).inner_text().startswith("127.0.0.1:")
    assert cells.nth(4).inner_text() == "no"  # TLS
    assert cells.nth(6).inner_text() == "2"
    client.dele(1)
    expect(cells.nth(8)).to_have_text("1", timeout=LIVE_MS)  # marked for deletion

    # Started is the server's time in the browser's zone; Idle is counted on the server's clock,
    # although the browser's is a day ahead.
    assert ui.page.evaluate("Date.now()") / 1000 - time.time() > SKEW.total_seconds() - 60
    [started] = [c["started"] for c in api(proc.admin, "GET", "/servers/pop3/connections")[1]["connections"]]
    local = datetime.fromisoformat(started).astimezone(ZoneInfo(ZONE))
    assert cells.nth(9).inner_text() == local.strftime("%Y-%m-%d %H:%M:%S")
    assert re.fullmatch(r"[0-9] s", cells.nth(10).inner_text())

    # Nothing is wider than a 1280-px window, and no table needs its scroll bar.
    assert ui.page.evaluate("document.documentElement.scrollWidth") <= 1280
    assert ui.page.evaluate("[...document.querySelectorAll('.scroll')].every(e => e.scrollWidth <= e.clientWidth)")
    ui.screenshot("ui-connection.png")
    # Live: one event stream, and nothing fetched again to see the session.
    assert [r for r in ui.requests if r.startswith("GET /servers") and not r.endswith("/config")] == []
    assert ui.requests.count("GET /events") == 1

    kick = conn.get_by_role("button", name=f"Kick {conn_id}", exact=True)
    dialog = ui.page.locator("#kick-dialog")
    with Chatter(client) as chatter:
        # The keyboard works while snapshots arrive: the focused button is kept, not redrawn.
        kick.focus()
        ui.snapshots()
        assert is_focused(kick)
        ui.page.keyboard.press("Enter")
        expect(dialog).to_be_visible()
        ui.page.keyboard.press("Escape")
        expect(dialog).to_be_hidden()
        expect(kick).to_be_focused()  # back where it was
        ui.snapshots()
        ui.page.keyboard.press("Enter")
        expect(ui.page.locator("#kick-reason")).to_be_focused()
        ui.page.keyboard.type(REASON)
        ui.page.keyboard.press("Enter")  # "Close it", the form's default button
        ui.page.locator("#connections-empty").wait_for(timeout=LIVE_MS)
        chatter.join(10)
    # The client got the reason, and the kicked session's DELE was not applied.
    assert isinstance(chatter.error, poplib.error_proto), chatter.error
    assert chatter.error.args[0] == f"-ERR {REASON}".encode()
    client.close()
    assert mail_files(site) == before
    expect(ui.page.locator("#connections-title")).to_be_focused()  # the row went with its button
    assert ui.refused == []


def test_down_then_up_by_keyboard_refuses_then_serves_new_clients(
    proc: ServeProcess, open_ui: Callable[..., Browser]
) -> None:
    assert proc.admin is not None
    ui = open_ui(proc.admin)
    row = ui.row("servers", "server", "pop3")
    row.wait_for()
    down = row.get_by_role("button", name="Down pop3", exact=True)
    up = row.get_by_role("button", name="Up pop3", exact=True)
    client = login(proc)
    with Chatter(client):
        down.focus()
        handle = down.element_handle()
        ui.snapshots(3)
        # The very same button keeps the focus across snapshots.
        assert ui.page.evaluate("button => button.isConnected && button === document.activeElement", handle)
        ui.page.keyboard.press("Enter")
        expect(row.locator("td.state")).to_have_text("down")
        expect(down).to_be_focused()  # now disabled, but still where the keyboard was
        with pytest.raises(OSError):
            poplib.POP3("127.0.0.1", proc.port, timeout=5)
        ui.page.keyboard.press("Shift+Tab")
        expect(up).to_be_focused()
        ui.page.keyboard.press("Enter")
        expect(row.locator("td.state")).to_have_text("up")
    client.quit()
    address = row.locator("td").nth(2).inner_text()
    host, _, port = address.rpartition(":")
    other = poplib.POP3(host, int(port), timeout=5)
    assert other.getwelcome().startswith(b"+OK")
    other.quit()


def test_a_bad_option_value_shows_the_apis_message_beside_the_field(
    proc: ServeProcess, open_ui: Callable[..., Browser]
) -> None:
    assert proc.admin is not None
    status, body = api(proc.admin, "PATCH", "/servers/pop3/config", {"max_line": 10})
    assert status == 422
    [expected] = [f["message"] for f in body["fields"] if f["field"] == "max_line"]

    ui = open_ui(proc.admin)
    field_ = ui.page.locator("#config-fields [data-option='max_line']")
    field_.locator("input").fill("10")
    ui.page.get_by_role("button", name="Save changes").click()
    error = field_.locator(".field-error")
    error.wait_for()
    assert error.inner_text() == expected
    expect(field_.locator("input")).to_have_attribute("aria-invalid", "true")
    assert "see the fields marked" in ui.page.locator("#config-result").inner_text()
    ui.screenshot("ui-config-error.png")

    # A good value goes through the same PATCH, and the mark goes.
    field_.locator("input").fill("2048")
    ui.page.get_by_role("button", name="Save changes").click()
    ui.page.locator("#config-result", has_text="Saved: max_line").wait_for()
    assert api(proc.admin, "GET", "/servers/pop3/config/max_line")[1]["value"] == 2048
    expect(field_.locator("input")).not_to_have_attribute("aria-invalid", "true")
    assert error.inner_text() == ""

    # "none" empties a list of networks: the API takes the string "none", not ["none"].
    networks = ui.page.locator("#config-fields [data-option='cleartext_auth_from'] input")
    networks.fill("none")
    ui.page.get_by_role("button", name="Save changes").click()
    ui.page.locator("#config-result", has_text="Saved: cleartext_auth_from").wait_for()
    assert ui.bodies[-1] == {"cleartext_auth_from": "none"}
    assert api(proc.admin, "GET", "/servers/pop3/config/cleartext_auth_from")[1]["value"] == []
    expect(networks).to_have_value("none")


def test_penalties_show_and_clear(proc: ServeProcess, open_ui: Callable[..., Browser]) -> None:
    assert proc.admin is not None
    ui = open_ui(proc.admin)
    ui.row("servers", "server", "pop3").wait_for()
    client = poplib.POP3("127.0.0.1", proc.port, timeout=20)
    client.user("bob")
    with pytest.raises(poplib.error_proto):
        client.pass_("wrong")
    client.quit()
    row = ui.row("penalties", "penalty", "bob")
    row.wait_for(timeout=LIVE_MS)
    assert row.locator("td").nth(2).inner_text() == "1"
    [penalty] = [p for p in api(proc.admin, "GET", "/penalties")[1]["penalties"] if p["key"] == "bob"]
    assert row.locator("td").nth(3).inner_text() == f"{penalty['delay']:.1f} s"
    row.get_by_role("button", name="Clear bob", exact=True).click()
    row.wait_for(state="detached", timeout=LIVE_MS)
    assert all(p["key"] != "bob" for p in api(proc.admin, "GET", "/penalties")[1]["penalties"])


def test_with_a_token_the_page_asks_for_it_and_refuses_a_wrong_one(site: Path, open_ui: Callable[..., Browser]) -> None:
    with ServeProcess(*serve_args(site), "--admin", "127.0.0.1:0", env={"POP3D_ADMIN_TOKEN": TOKEN}) as proc:
        proc.wait_ready()
        assert proc.admin is not None
        ui = open_ui(proc.admin)
        form = ui.page.locator("#token-section")
        form.wait_for()
        ui.page.get_by_role("textbox", name="Token").fill("not-the-token")
        ui.page.get_by_role("button", name="Use token").click()
        ui.page.locator("#token-why.refused").wait_for()
        assert "refused" in ui.page.locator("#token-why").inner_text()
        ui.screenshot("ui-token-refused.png")

        ui.page.get_by_role("textbox", name="Token").fill(TOKEN)
        ui.page.get_by_role("button", name="Use token").click()
        ui.row("servers", "server", "pop3").wait_for()
        assert form.is_hidden()
        # Kept for the tab only, and never in a URL.
        assert ui.page.evaluate("sessionStorage.getItem('pop3d-admin-token')") == TOKEN
        assert ui.page.evaluate("localStorage.length") == 0
        assert not [r for r in ui.requests if TOKEN in r]
        assert TOKEN not in "\n".join(proc.lines)
        assert ui.refused == []


def test_one_stream_however_often_the_page_starts_again(proc: ServeProcess, open_ui: Callable[..., Browser]) -> None:
    assert proc.admin is not None
    # The stream fails at first, so the page's loop sleeps in its back-off ...
    ui = open_ui(proc.admin, block={"/events"})
    expect(ui.page.locator("#live")).to_have_text("reconnecting…")
    # ... when it starts again, as entering a token does, twice.
    ui.blocked.clear()
    asked = len(ui.requests)
    ui.page.evaluate("() => { start(); start(); }")  # not awaited: each runs for ever
    ui.row("servers", "server", "pop3").wait_for()
    ui.page.wait_for_timeout(2_500)  # the old loop would have woken by now (at most 1 s of back-off)
    assert ui.requests[asked:].count("GET /events") in {1, 2}  # the first start()'s, closed by the second
    assert len(ui.streams) == 1


def test_the_demo_data_the_destroy_dialog_and_the_end_of_the_stream(
    tmp_path: Path, open_ui: Callable[..., Browser]
) -> None:
    with ServeProcess(
        "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", env={"XDG_DATA_HOME": str(tmp_path)}
    ) as proc:
        proc.wait_ready()
        assert proc.admin is not None
        ui = open_ui(proc.admin)
        # Serving the demo data: the empty state gives its user and password.
        expect(ui.page.locator("#connections-empty")).to_contain_text(
            "(the demo's user and password are demo and demo)."
        )
        row = ui.row("servers", "server", "pop3")
        row.get_by_role("button", name="Destroy pop3", exact=True).click()
        ui.page.get_by_role("button", name="Kill").click()
        empty = ui.page.locator("#servers-empty")
        expect(empty).to_be_visible()
        assert "pop3d serve" in empty.inner_text() and "pop3d.new()" in empty.inner_text()
        expect(ui.page.locator("#servers-title")).to_be_focused()  # the row went with its button
        # A stream that ends is not "live" any more.
        proc.signal()
        assert proc.wait() == 0
        expect(ui.page.locator("#live")).not_to_have_text("live")


def test_at_most_500_connections_are_listed_and_the_rest_counted(
    proc: ServeProcess, open_ui: Callable[..., Browser]
) -> None:
    assert proc.admin is not None
    assert api(proc.admin, "PATCH", "/servers/pop3/config", {"max_connections_per_ip": 1000})[0] == 200
    ui = open_ui(proc.admin)
    ui.row("servers", "server", "pop3").wait_for()
    sockets = [socket.create_connection(("127.0.0.1", proc.port), timeout=10) for _ in range(501)]
    try:
        note = ui.page.locator("#connections-truncated")
        expect(note).to_have_text("pop3: showing 500 of 501 open connections (the newest).")
        assert ui.page.locator("#connections tbody tr").count() == 500
        expect(ui.row("servers", "server", "pop3").locator("td").nth(3)).to_have_text("501")
    finally:
        for sock in sockets:
            sock.close()
    expect(note).to_be_hidden()


def test_the_page_reads_at_phone_width(proc: ServeProcess, open_ui: Callable[..., Browser]) -> None:
    assert proc.admin is not None
    client = login(proc)
    ui = open_ui(proc.admin, width=390)
    ui.page.locator("#connections tbody tr").first.wait_for()
    # Nothing wider than the screen: the tables become one card per row.
    assert ui.page.evaluate("document.documentElement.scrollWidth") <= 390
    label = ui.page.evaluate("getComputedStyle(document.querySelector('#connections tbody td'), '::before').content")
    assert label.startswith('"Id"')
    # The cards are still a table to a screen reader (display: block alone would drop that).
    cdp = ui.page.context.new_cdp_session(ui.page)
    nodes = cdp.send("Accessibility.getFullAXTree")["nodes"]
    roles = {(node["role"]["value"], node.get("name", {}).get("value")) for node in nodes if "role" in node}
    assert {("table", ""), ("columnheader", "Marked"), ("cell", "alice")} <= roles
    ui.screenshot("ui-phone.png")
    client.quit()
