"""Headless Chromium for the page tests: Debian's, driven by Playwright, reaching nothing but loopback.

Without Playwright or Chromium the tests skip, except where ``CI`` is set:
there they fail, since CI installs both.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

try:
    from playwright import sync_api as playwright_sync
except ImportError:  # pragma: no cover - depends on the machine
    playwright_sync = None  # type: ignore[assignment]

CHROMIUM = next((path for name in ("chromium", "chromium-browser") if (path := shutil.which(name))), None)
if playwright_sync is None:
    MISSING: str | None = "playwright is not installed (pip install -e .[test])"
elif CHROMIUM is None:
    MISSING = "Chromium is not installed (Debian: apt-get install chromium)"
else:
    MISSING = None

# Belt and braces: no name resolves but loopback, and no proxy is looked for.
_OFFLINE_ARGS = ["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--no-proxy-server"]


def require_browser() -> None:
    """Skip the test without a browser, or fail it when ``CI`` is set."""
    if MISSING is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{MISSING}; CI is set, so the browser tests must run")
        pytest.skip(MISSING)


@contextlib.contextmanager
def offline_chromium() -> Iterator[Any]:
    """A headless Chromium browser (Playwright's ``Browser``), closed at the end."""
    require_browser()
    assert playwright_sync is not None and CHROMIUM is not None
    with playwright_sync.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=_OFFLINE_ARGS)
        try:
            yield browser
        finally:
            browser.close()
