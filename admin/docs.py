"""The browsable page of the admin API at ``/docs``: Swagger UI, served from this host.

quart-schema's own page loads Swagger UI from a CDN, which leaves a blank
page where the admin host has no way out.  Here the page's script and
style come from the Swagger UI distribution that the ``swagger-ui-py``
package ships, under ``/docs/static/``.  The page, its assets and the
OpenAPI document are open without the token (they hold nothing secret);
the token is entered in the page, with Swagger UI's *Authorize* button, to
try the operations.
"""

from __future__ import annotations

import hashlib
import importlib.util
import mimetypes
from functools import cache
from pathlib import Path

from quart import Blueprint, Response, current_app, render_template_string, request, url_for
from quart_schema import hide

from .errors import ApiError

__all__ = ["ASSETS", "DOCS_ENDPOINTS", "blueprint", "swagger_ui_dir"]

blueprint = Blueprint("docs", __name__)

#: The files of the Swagger UI distribution that the page uses; nothing else is served.
ASSETS = frozenset({"swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png", "favicon-16x16.png"})

#: The endpoints of the page and its assets (open without the token).
DOCS_ENDPOINTS = frozenset({"docs.page", "docs.asset"})

# The page itself: Swagger UI over /openapi.json, every URL on this host.
# validatorUrl null: Swagger UI would otherwise ask an online validator for a badge.
_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>{{ title }}</title>
  <link rel="stylesheet" href="{{ url_for('docs.asset', filename='swagger-ui.css') }}">
  <link rel="icon" type="image/png" href="{{ url_for('docs.asset', filename='favicon-32x32.png') }}">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{{ url_for('docs.asset', filename='swagger-ui-bundle.js') }}"></script>
  <script>
    window.ui = SwaggerUIBundle({
      url: {{ openapi_url | tojson }},
      dom_id: "#swagger-ui",
      deepLinking: true,
      presets: [SwaggerUIBundle.presets.apis],
      layout: "BaseLayout",
      validatorUrl: null,
      persistAuthorization: false
    });
  </script>
</body>
</html>
"""


def swagger_ui_dir() -> Path:
    """The folder of Swagger UI's dist files in the installed ``swagger-ui-py`` package.

    Found without importing the package (whose handlers would import
    frameworks and YAML that the admin API does not use).
    """
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the swagger-ui-py package is not installed: pip install swagger-ui-py")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


@cache
def _read_asset(filename: str) -> tuple[bytes, str]:
    # A few files, read once: Quart's file responses read through asyncio, which Trio does not run.
    data = (swagger_ui_dir() / filename).read_bytes()
    return data, hashlib.sha256(data).hexdigest()[:32]


@blueprint.get("/docs")
@hide
async def page() -> str:
    """The Swagger UI page."""
    title = str(current_app.extensions["QUART_SCHEMA"].info.title)
    return await render_template_string(_PAGE, title=title, openapi_url=url_for("openapi"))


@blueprint.get("/docs/static/<filename>")
@hide
async def asset(filename: str) -> Response:
    """One file of the Swagger UI distribution (404 for any other name)."""
    if filename not in ASSETS:
        raise ApiError(404, f"no asset {filename!r}")
    data, etag = _read_asset(filename)
    content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    if content_type.startswith("text/"):
        content_type += "; charset=utf-8"
    response = current_app.response_class(data, content_type=content_type)
    response.set_etag(etag)
    response.cache_control.public = True
    response.cache_control.max_age = 3600
    return await response.make_conditional(request)
