"""The /docs page in a real browser: headless Chromium over a real Hypercorn, with no network.

The admin API runs in this test's Trio loop (``serve_admin`` on 127.0.0.1,
port 0); Playwright's synchronous API drives Debian's Chromium from a
worker thread.  Every request the page makes to anywhere but the API is
aborted and recorded, so the page must load with nothing from a CDN: the
test fails if it even tried.  Skipped when Chromium or Playwright is
missing (CI installs the ``chromium`` Debian package).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
from pop3d.admin import create_app, serve_admin

import pop3d

from .browser import MISSING, offline_chromium

# Where CI is set, offline_chromium fails the test instead.
pytestmark = pytest.mark.skipif(MISSING is not None and not os.environ.get("CI"), reason=str(MISSING))

TOKEN = "docs-page-token-5e1d"
TIMEOUT_MS = 20_000


@dataclass
class Visit:
    """What the browser saw of /docs."""

    operations: list[str]
    title: str
    authorize_button: bool
    refused: list[str] = field(default_factory=list)  # requests that would have left the host
    failed: list[str] = field(default_factory=list)  # requests to the API that failed
    statuses: dict[str, int] = field(default_factory=dict)  # path -> status, for the page's own loads
    tried: dict[str, Any] = field(default_factory=dict)  # what "Try it out" showed, if it ran


@pytest.fixture
def server(listening_server: pop3d.Server) -> pop3d.Server:
    """A running, listening POP3 server object, so that /servers lists something."""
    return listening_server


async def serving(token: str | None, browse: Callable[[str], Visit]) -> Visit:
    """Serve a new app with Hypercorn on 127.0.0.1:0, run ``browse(url)`` in a thread, stop."""
    stop = trio.Event()
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            serve = functools.partial(serve_admin, create_app(token=token), "127.0.0.1:0", shutdown_trigger=stop.wait)
            url: str = await nursery.start(serve)
            try:
                return await trio.to_thread.run_sync(browse, url)
            finally:
                stop.set()


def visit(url: str, *, token: str | None = None) -> Visit:
    """Open ``url``/docs in headless Chromium, offline but for ``url``; with ``token``, use it in the page."""
    refused: list[str] = []
    failed: list[str] = []
    statuses: dict[str, int] = {}
    with offline_chromium() as browser:
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)

        def route(route: Any) -> None:
            if route.request.url.startswith(url + "/"):
                route.continue_()
            else:
                refused.append(route.request.url)
                route.abort()

        page.route("**/*", route)
        page.on("requestfailed", lambda request: failed.append(request.url))
        page.on("response", lambda response: statuses.__setitem__(response.url.removeprefix(url), response.status))
        page.goto(f"{url}/docs", wait_until="load")
        page.wait_for_selector(".opblock-summary-path", state="attached")
        operations = [
            " ".join(text.split())
            for text in page.locator(".opblock-summary-method, .opblock-summary-path").all_inner_texts()
        ]
        pairs = [f"{method} {path}" for method, path in zip(operations[::2], operations[1::2], strict=True)]
        title = page.locator(".info .title").inner_text()
        authorize = page.locator("button.authorize").count() > 0
        seen = Visit(pairs, title, authorize, refused, failed, statuses)
        if token is not None:
            seen.tried = try_list_servers(page, token)
        return seen


def try_list_servers(page: Any, token: str) -> dict[str, Any]:
    """Authorize with ``token`` in the page, then run GET /servers with "Try it out"."""
    sent: list[str | None] = []
    page.on(
        "request",
        lambda request: sent.append(request.headers.get("authorization")) if request.url.endswith("/servers") else None,
    )
    page.locator(".auth-wrapper button.authorize").click()
    page.locator(".auth-container input").first.fill(token)
    page.locator(".auth-container button.authorize").click()
    page.locator(".auth-container button.btn-done").click()
    operation = page.locator("#operations-servers-get_list_servers")
    operation.locator(".opblock-summary").click()
    operation.locator("button.try-out__btn").click()
    operation.locator("button.execute").click()
    status = operation.locator(".live-responses-table .response .response-col_status").first
    status.wait_for()
    body = operation.locator(".live-responses-table .response-col_description pre").first.inner_text()
    return {"status": status.inner_text().strip(), "body": body, "authorization": sent}


async def test_docs_page_lists_the_operations_offline(server: pop3d.Server) -> None:
    seen = await serving(None, visit)
    assert seen.refused == [], "the page tried to load something from off this host"
    assert seen.failed == []
    assert seen.title.startswith("pop3d admin API")
    for operation in (
        "GET /servers",
        "POST /servers/{name}/up",
        "POST /servers/{name}/down",
        "PATCH /servers/{name}/config",
        "DELETE /servers/{name}/connections/{conn_id}",
        "GET /metrics",
        "GET /healthz",
    ):
        assert operation in seen.operations, seen.operations
    assert seen.statuses["/docs/static/swagger-ui-bundle.js"] == 200
    assert seen.statuses["/docs/static/swagger-ui.css"] == 200
    assert seen.statuses["/openapi.json"] == 200
    assert not seen.authorize_button  # no token, nothing to authorize


async def test_docs_page_loads_without_the_token_and_takes_it(server: pop3d.Server) -> None:
    seen = await serving(TOKEN, functools.partial(visit, token=TOKEN))
    assert seen.refused == [] and seen.failed == []
    assert "POST /servers/{name}/up" in seen.operations
    assert seen.statuses["/openapi.json"] == 200  # loaded before any token was given
    assert seen.authorize_button
    # The token typed into Authorize goes with "Try it out", and the API answers.
    assert seen.tried["status"] == "200", seen.tried
    assert server.name in seen.tried["body"]
    assert seen.tried["authorization"] == [f"Bearer {TOKEN}"]
