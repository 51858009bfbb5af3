"""Who may use the admin API: the bearer token, where the API may listen, and which web pages may call it.

The admin API can stop servers and kick users, so it is either protected
by a token or reachable from this host only.  :func:`check_bind` enforces
that at start-up; :class:`BearerToken` checks every request.
:class:`CorsOrigins` names the web origins whose pages may call the API
from a browser (CORS); the token is still required of them.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from quart import Quart, Response, request

from pop3d.errors import Pop3dError
from pop3d.networks import is_loopback

from .docs import DOCS_ENDPOINTS
from .errors import error_response
from .ui import UI_ENDPOINTS

__all__ = [
    "CORS_EXTENSION",
    "CORS_HEADERS",
    "CORS_MAX_AGE",
    "CORS_METHODS",
    "PUBLIC_ENDPOINTS",
    "AdminAccessError",
    "BearerToken",
    "CorsOrigins",
    "check_bind",
    "cors_of",
    "install_access",
    "install_browser_guard",
    "install_cors",
    "is_loopback",
    "parse_origin",
    "refuse_unprotected",
    "split_bind",
]

# Open without a token: /healthz, so that a supervisor can tell the process is
# alive; the OpenAPI document and the page that shows it (with its assets),
# which hold nothing secret, so that the page loads and takes the token itself.
PUBLIC_ENDPOINTS = frozenset({"admin.healthz", "openapi", *DOCS_ENDPOINTS, *UI_ENDPOINTS})

log = logging.getLogger("pop3d.admin")


class AdminAccessError(Pop3dError):
    """The admin API may not listen where it was asked to (or cannot parse where)."""


class BearerToken:
    """The secret that requests present as ``Authorization: Bearer <token>``."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the admin token must not be empty")
        self._secret = token.encode()

    def accepts(self, authorization: str | None) -> bool:
        """Whether the ``Authorization`` header value carries this token."""
        if authorization is None:
            return False
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return False
        # Constant time, so that response timing does not leak the token a byte at a time.
        return hmac.compare_digest(given.strip().encode(), self._secret)

    def __repr__(self) -> str:
        return "BearerToken(***)"  # never the secret, even in a traceback


def split_bind(bind: str) -> tuple[str, int]:
    """``("127.0.0.1", 8110)`` from ``"127.0.0.1:8110"``; IPv6 hosts in brackets: ``"[::1]:8110"``.

    ``*`` as the host (``*:8110``, as ``pop3d serve`` writes it) means every
    IPv4 address and comes back as ``0.0.0.0``.  Raises
    :class:`AdminAccessError` if ``bind`` is not ``HOST:PORT``.
    """
    host, sep, port_text = bind.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        sep = ""  # a bare IPv6 address: its last group would pass for the port
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise AdminAccessError(f"admin bind must be HOST:PORT (IPv6 as [ADDR]:PORT), not {bind!r}")
    return ("0.0.0.0" if host == "*" else host), int(port_text)


def check_bind(bind: str, *, token: str | None) -> None:
    """Decide at start-up whether the admin API may listen on ``bind``.

    With a token, any address is allowed.  Without one, only loopback is,
    and a warning is logged; any other address raises
    :class:`AdminAccessError` with a one-line message.
    """
    refuse_unprotected(bind, protected=bool(token))
    if not token:
        log.warning("admin API on %s has no token: anyone on this host can use it", bind)


def refuse_unprotected(bind: str, *, protected: bool) -> None:
    """Raise :class:`AdminAccessError` if ``bind`` is unusable, or not loopback while not ``protected``."""
    host, _port = split_bind(bind)
    if not protected and not is_loopback(host):
        raise AdminAccessError(
            f"refusing to serve the admin API on {bind} without a token: "
            "listen on loopback (127.0.0.1, ::1, localhost) or set a token"
        )


def install_access(app: Quart, token: BearerToken | None) -> None:
    """Make every endpoint of ``app`` but :data:`PUBLIC_ENDPOINTS` require ``token`` (if there is one).

    The check runs before routing errors are raised, so an unknown path
    without the token is a 401 too: a stranger learns no more by probing
    than the open OpenAPI document says.
    """
    if token is None:
        return

    async def require_token() -> Response | None:
        if request.endpoint in PUBLIC_ENDPOINTS or token.accepts(request.headers.get("Authorization")):
            return None
        return error_response(
            401, "missing or wrong bearer token", headers={"WWW-Authenticate": 'Bearer realm="pop3d admin"'}
        )

    app.before_request(require_token)


_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def install_browser_guard(app: Quart, cors: CorsOrigins, token: BearerToken | None) -> None:
    """Refuse what a web page elsewhere could make a browser on this host send.

    - A request that changes something (POST, PATCH, DELETE) with an
      ``Origin`` that is neither the API's own nor allowed by ``cors``: a
      403.  Without a token, a page from any site could otherwise take a
      server down with a "simple" cross-site POST.
    - Without a token, a ``Host`` that is not a loopback address or
      ``localhost``: a 403.  That is DNS rebinding, a page whose own name was
      pointed at 127.0.0.1 to read the API as if from its own origin.
    """

    async def guard() -> Response | None:
        if token is None and not _loopback_host(request.host):
            return error_response(403, f"host {request.host!r} is not served without a token (use 127.0.0.1)")
        origin = request.headers.get("Origin")
        if request.method in _SAFE_METHODS or origin is None:
            return None
        if urlsplit(origin).netloc.lower() == request.host.lower() or cors.allows(origin):
            return None
        return error_response(403, f"cross-site request from {origin!r} refused (see --admin-cors-origin)")

    app.before_request(guard)


def _loopback_host(host: str) -> bool:
    """Whether a ``Host`` header (``name[:port]``, ``[v6]:port``) names this host by a loopback name."""
    name = urlsplit(f"//{host}").hostname or ""
    return name == "localhost" or name.endswith(".localhost") or is_loopback(name)


# -- CORS: browser pages from other origins ----------------------------------

#: Where :func:`install_cors` keeps an app's :class:`CorsOrigins` in ``app.extensions``.
CORS_EXTENSION = "pop3d.admin.cors"
#: The methods the API's endpoints answer to: what a preflight allows.
CORS_METHODS = ("GET", "POST", "PATCH", "DELETE")
#: The request headers a page may send beyond the safelisted ones: the token and JSON bodies.
CORS_HEADERS = ("Authorization", "Content-Type")
#: Seconds a browser may reuse a preflight's answer (browsers cap it: Chromium at 7200).
CORS_MAX_AGE = 600

_DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*$")


def parse_origin(text: str) -> str:
    """``text`` as a browser writes it in the ``Origin`` header: ``scheme://host[:port]``.

    The scheme is ``http`` or ``https``; scheme and host are lower-cased and
    a default port (80, 443) is dropped, so that ``https://Dash.example.org:443``
    matches what the browser sends, ``https://dash.example.org``.  Raises
    :class:`ValueError` with a one-line message for anything else (a path,
    a ``*``, a user name...).
    """
    given = text.strip()
    try:
        parts = urlsplit(given)
        port = parts.port
    except ValueError:
        raise ValueError(f"{text!r} is not an origin (scheme://host[:port])") from None
    scheme, host = parts.scheme.lower(), parts.hostname or ""
    if scheme not in _DEFAULT_PORTS or not given.lower().startswith(f"{scheme}://"):
        raise ValueError(f"{text!r} is not an origin: it starts with http:// or https://")
    if parts.path or parts.query or parts.fragment or given.endswith(("?", "#")):
        raise ValueError(f"{text!r} is not an origin: no path, give {scheme}://{parts.netloc.lower()}")
    if parts.username is not None or "@" in parts.netloc:
        raise ValueError(f"{text!r} is not an origin: no user name or password")
    if parts.netloc.startswith("["):
        try:
            host = f"[{ipaddress.IPv6Address(host).compressed}]"
        except ValueError:
            raise ValueError(f"{text!r} is not an origin: bad IPv6 address {host!r}") from None
    elif not _HOST_NAME.match(host):
        # Browsers send international names in their ASCII (xn--) form.
        raise ValueError(f"{text!r} is not an origin: bad host {host!r}")
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}:{port}"
    return f"{scheme}://{host}"


class CorsOrigins:
    """The web origins whose pages may call the admin API from a browser; none by default.

    A page's requests still need the bearer token (when the API has one);
    only the preflight ``OPTIONS`` requests, which a browser sends without
    it, are answered without it.  :meth:`replace` changes the set while the
    API serves (``pop3d serve`` does so on SIGHUP).
    """

    def __init__(self, origins: Iterable[str] = ()) -> None:
        self.allowed: frozenset[str] = frozenset()
        self.replace(origins)

    def replace(self, origins: Iterable[str]) -> None:
        """Allow exactly ``origins`` from now on; a bad one raises :class:`ValueError` and changes nothing."""
        self.allowed = frozenset(parse_origin(origin) for origin in origins)

    def allows(self, origin: str | None) -> bool:
        """Whether ``origin`` (an ``Origin`` header's value, or None) is one of the allowed."""
        return origin is not None and origin in self.allowed

    def __repr__(self) -> str:
        return f"CorsOrigins({sorted(self.allowed)!r})"


def cors_of(app: Quart) -> CorsOrigins:
    """The :class:`CorsOrigins` that :func:`install_cors` gave ``app``."""
    cors = app.extensions[CORS_EXTENSION]
    assert isinstance(cors, CorsOrigins)
    return cors


def install_cors(app: Quart, cors: CorsOrigins) -> None:
    """Answer the CORS of ``app`` from ``cors``; install it before :func:`install_access`.

    For an allowed ``Origin``, every response carries
    ``Access-Control-Allow-Origin`` (that origin, never ``*``), and a
    preflight (``OPTIONS`` with ``Access-Control-Request-Method``) is
    answered 204 here, before the token check: browsers send preflights
    without the ``Authorization`` header.  Other origins get no
    ``Access-Control-*`` header, so their pages cannot read any answer.
    """
    app.extensions[CORS_EXTENSION] = cors

    async def answer_preflight() -> Response | None:
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return None
        if not cors.allows(request.headers.get("Origin")):
            return None  # an ordinary request then: the token check, routing, no CORS headers
        response = Response("", status=204)
        del response.headers["Content-Type"]  # no body, so no type
        response.headers["Access-Control-Allow-Methods"] = ", ".join(CORS_METHODS)
        response.headers["Access-Control-Allow-Headers"] = ", ".join(CORS_HEADERS)
        response.headers["Access-Control-Max-Age"] = str(CORS_MAX_AGE)
        return response

    async def allow_origin(response: Response) -> Response:
        if not cors.allowed:
            return response
        # The answer depends on Origin: a cache must not hand one origin's answer to another.
        response.vary.add("Origin")
        origin = request.headers.get("Origin")
        if cors.allows(origin):
            assert origin is not None
            response.headers["Access-Control-Allow-Origin"] = origin
            # So that a page can tell a missing token from a bad one.
            response.headers["Access-Control-Expose-Headers"] = "WWW-Authenticate"
        return response

    app.before_request(answer_preflight)
    app.after_request(allow_origin)
