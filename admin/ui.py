"""The live control page at ``/ui``: servers, connections, options and penalties, with buttons.

Three static files from this package (``admin/ui/``), no framework and no
CDN.  The page and its files are open without the token, as ``/docs`` is:
they hold nothing secret.  The page asks for the token when the API
answers 401, keeps it in the tab's ``sessionStorage`` only, and sends it
as a header on every call (never in a URL).  It lives on ``GET /events``
(:mod:`pop3d.admin.events`) and acts through the same endpoints as curl.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

from quart import Blueprint, Response, current_app, request
from quart_schema import hide

from .errors import ApiError

__all__ = ["FILES", "TYPES", "UI_DIR", "UI_ENDPOINTS", "blueprint"]

blueprint = Blueprint("ui", __name__)

UI_DIR = Path(__file__).resolve().parent / "ui"
#: The page's files and their types (not the host's MIME table: with nosniff, a wrong type breaks the page).
TYPES = {
    "index.html": "text/html; charset=utf-8",
    "ui.js": "text/javascript; charset=utf-8",
    "ui.css": "text/css; charset=utf-8",
}
#: The page's files; nothing else is served.
FILES = frozenset(TYPES)
#: The endpoints of the page and its files (open without the token).
UI_ENDPOINTS = frozenset({"ui.page", "ui.asset"})

# Everything from this host; no inline script or style, no framing.
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


@cache
def _read(filename: str) -> tuple[bytes, str]:
    # Read once: Quart's file responses read through asyncio, which Trio does not run.
    data = (UI_DIR / filename).read_bytes()
    return data, hashlib.sha256(data).hexdigest()[:32]


async def _file(filename: str) -> Response:
    data, etag = _read(filename)
    response = current_app.response_class(data, content_type=TYPES[filename])
    response.headers.update(_SECURITY_HEADERS)
    response.set_etag(etag)
    response.cache_control.no_cache = True  # revalidate: an upgrade must not leave an old script
    return await response.make_conditional(request)


@blueprint.get("/ui")
@hide
async def page() -> Response:
    """The control page."""
    return await _file("index.html")


@blueprint.get("/ui/static/<filename>")
@hide
async def asset(filename: str) -> Response:
    """The page's script or style sheet (404 for any other name)."""
    if filename not in FILES - {"index.html"}:
        raise ApiError(404, f"no file {filename!r}")
    return await _file(filename)
