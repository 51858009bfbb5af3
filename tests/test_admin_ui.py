"""The control page at /ui in a real browser, against a live ``pop3d serve``.

Debian's Chromium, headless, driven by Playwright.  Every request the page
makes to anywhere but the admin API is aborted and recorded: the page must
work offline.  Real POP3 clients (poplib) come and go while the page is
watched; what the page shows and does is checked against the server.
Screenshots go to ``$POP3D_TEST_OUTPUT`` (default ``test-output/`` in the
repository) for a person to look at.
"""

from __future__ import annotations

import json
import os
import poplib
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .serve_process import ServeProcess, mail_files, make_site, serve_args

playwright_sync = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install -e .[test])"
)

expect = playwright_sync.expect

CHROMIUM = next((path for name in ("chromium", "chromium-browser") if (path := shutil.which(name))), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")

TOKEN = "ui-token-3f9a7c"
TIMEOUT_MS = 15_000
# The page is pushed a snapshot within 0.2 s of a change; this leaves room for a busy CI machine.
LIVE_MS = 3_000
OUTPUT = Path(os.environ.get("POP3D_TEST_OUTPUT") or Path(__file__).resolve().parent.parent / "test-output")


@dataclass
class Browser:
    """A page on /ui, and every request it made."""

    page: Any
    base: str
    requests: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    def row(self, table: str, key: str, value: str) -> Any:
        return self.page.locator(f"#{table} tr[data-{key}='{value}']")

    def screenshot(self, name: str) -> None:
        OUTPUT.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(OUTPUT / name), full_page=True)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_site(tmp_path_factory.mktemp("ui"))


@pytest.fixture
def proc(site: Path) -> Iterator[ServeProcess]:
    with ServeProcess(*serve_args(site), "--admin", "127.0.0.1:0", "--login-failure-delay", "0") as process:
        process.wait_ready()
        yield process


@pytest.fixture
def chromium() -> Iterator[Any]:
    assert CHROMIUM is not None
    with playwright_sync.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--no-proxy-server"],
        )
        try:
            yield browser
        finally:
            browser.close()


def open_ui(chromium: Any, base: str, *, width: int = 1280) -> Browser:
    page = chromium.new_page(viewport={"width": width, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    seen = Browser(page, base)

    def route(route: Any) -> None:
        if route.request.url.startswith(base + "/"):
            seen.requests.append(route.request.method + " " + route.request.url.removeprefix(base))
            route.continue_()
        else:
            seen.refused.append(route.request.url)
            route.abort()

    page.route("**/*", route)
    page.goto(f"{base}/ui", wait_until="load")
    return seen


def login(proc: ServeProcess, user: str = "alice", password: str = "wonderland") -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", proc.port, timeout=10)
    client.user(user)
    client.pass_(password)
    return client


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


def test_page_loads_offline_and_lists_the_server(proc: ServeProcess, chromium: Any) -> None:
    assert proc.admin is not None
    ui = open_ui(chromium, proc.admin)
    row = ui.row("servers", "server", "pop3")
    row.wait_for()
    assert row.locator("td").nth(1).inner_text() == "up"
    assert f"127.0.0.1:{proc.port}" in row.locator("td").nth(2).inner_text()
    assert ui.page.locator("#live").inner_text() == "live"
    # Empty states say what to do.
    assert f"curl pop3://USER:PASSWORD@127.0.0.1:{proc.port}/1" in ui.page.locator("#connections-empty").inner_text()
    assert "No penalties" in ui.page.locator("#penalties-empty").inner_text()
    assert ui.refused == []
    ui.screenshot("ui-empty.png")


def test_a_session_appears_live_and_the_kick_button_closes_it(proc: ServeProcess, site: Path, chromium: Any) -> None:
    assert proc.admin is not None
    ui = open_ui(chromium, proc.admin)
    ui.row("servers", "server", "pop3").wait_for()
    before = mail_files(site)
    client = login(proc)
    client.dele(1)
    conn = ui.page.locator("#connections tbody tr").first
    conn.wait_for(timeout=LIVE_MS)
    cells = conn.locator("td")
    expect(cells.nth(5)).to_have_text("trans", timeout=LIVE_MS)
    assert cells.nth(2).inner_text() == "alice"
    assert cells.nth(3).inner_text().startswith("127.0.0.1:")
    assert cells.nth(4).inner_text() == "no"  # TLS
    assert cells.nth(6).inner_text() == "2"
    expect(cells.nth(8)).to_have_text("1", timeout=LIVE_MS)  # marked for deletion
    ui.screenshot("ui-connection.png")
    # Live: one event stream, and nothing fetched again to see the session.
    assert [r for r in ui.requests if r.startswith("GET /servers") and not r.endswith("/config")] == []
    assert ui.requests.count("GET /events") == 1

    conn.get_by_role("button", name="Close connection").click()
    ui.page.locator("#kick-reason").fill("maintenance, back soon")
    ui.page.get_by_role("button", name="Close it").click()
    ui.page.locator("#connections-empty").wait_for(timeout=LIVE_MS)
    with pytest.raises((poplib.error_proto, OSError)):
        client.stat()
    client.close()
    assert mail_files(site) == before  # the kicked session's DELE was not applied
    assert ui.refused == []


def test_down_then_up_refuses_then_serves_new_clients(proc: ServeProcess, chromium: Any) -> None:
    assert proc.admin is not None
    ui = open_ui(chromium, proc.admin)
    row = ui.row("servers", "server", "pop3")
    row.wait_for()
    row.get_by_role("button", name="Stop listening").click()
    expect(row.locator("td.state")).to_have_text("down")
    with pytest.raises(OSError):
        poplib.POP3("127.0.0.1", proc.port, timeout=5)
    row.get_by_role("button", name="Start listening").click()
    expect(row.locator("td.state")).to_have_text("up")
    address = row.locator("td").nth(2).inner_text()
    host, _, port = address.rpartition(":")
    client = poplib.POP3(host, int(port), timeout=5)
    assert client.getwelcome().startswith(b"+OK")
    client.quit()


def test_a_bad_option_value_shows_the_apis_message_beside_the_field(proc: ServeProcess, chromium: Any) -> None:
    assert proc.admin is not None
    status, body = api(proc.admin, "PATCH", "/servers/pop3/config", {"max_line": 10})
    assert status == 422
    [expected] = [f["message"] for f in body["fields"] if f["field"] == "max_line"]

    ui = open_ui(chromium, proc.admin)
    field_ = ui.page.locator("#config-fields [data-option='max_line']")
    field_.locator("input").fill("10")
    ui.page.get_by_role("button", name="Save changes").click()
    error = field_.locator(".field-error")
    error.wait_for()
    assert error.inner_text() == expected
    assert "Not saved" in ui.page.locator("#config-result").inner_text()
    ui.screenshot("ui-config-error.png")

    # A good value goes through the same PATCH.
    field_.locator("input").fill("2048")
    ui.page.get_by_role("button", name="Save changes").click()
    ui.page.locator("#config-result", has_text="Saved: max_line").wait_for()
    assert api(proc.admin, "GET", "/servers/pop3/config/max_line")[1]["value"] == 2048


def test_penalties_show_and_clear(proc: ServeProcess, chromium: Any) -> None:
    assert proc.admin is not None
    ui = open_ui(chromium, proc.admin)
    ui.row("servers", "server", "pop3").wait_for()
    client = poplib.POP3("127.0.0.1", proc.port, timeout=20)
    client.user("bob")
    with pytest.raises(poplib.error_proto):
        client.pass_("wrong")
    client.quit()
    row = ui.row("penalties", "penalty", "bob")
    row.wait_for(timeout=LIVE_MS)
    assert row.locator("td").nth(2).inner_text() == "1"
    row.get_by_role("button", name="Clear the penalty of user bob").click()
    row.wait_for(state="detached", timeout=LIVE_MS)
    assert all(p["key"] != "bob" for p in api(proc.admin, "GET", "/penalties")[1]["penalties"])


def test_with_a_token_the_page_asks_for_it_and_refuses_a_wrong_one(site: Path, chromium: Any) -> None:
    with ServeProcess(*serve_args(site), "--admin", "127.0.0.1:0", env={"POP3D_ADMIN_TOKEN": TOKEN}) as proc:
        proc.wait_ready()
        assert proc.admin is not None
        ui = open_ui(chromium, proc.admin)
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


def test_the_page_reads_at_phone_width(proc: ServeProcess, chromium: Any) -> None:
    assert proc.admin is not None
    client = login(proc)
    ui = open_ui(chromium, proc.admin, width=390)
    ui.page.locator("#connections tbody tr").first.wait_for()
    # Nothing wider than the screen: the tables become one card per row.
    assert ui.page.evaluate("document.documentElement.scrollWidth") <= 390
    label = ui.page.evaluate("getComputedStyle(document.querySelector('#connections tbody td'), '::before').content")
    assert label == '"Id"'
    ui.screenshot("ui-phone.png")
    client.quit()
