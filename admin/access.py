"""Who may use the admin API: the bearer token, and where the API may listen.

The admin API can stop servers and kick users, so it is either protected
by a token or reachable from this host only.  :func:`check_bind` enforces
that at start-up; :class:`BearerToken` checks every request.
"""

from __future__ import annotations

import hmac
import logging

from quart import Quart, Response, request

from pop3d.errors import Pop3dError
from pop3d.networks import is_loopback

from .docs import DOCS_ENDPOINTS
from .errors import error_response

__all__ = [
    "PUBLIC_ENDPOINTS",
    "AdminAccessError",
    "BearerToken",
    "check_bind",
    "install_access",
    "is_loopback",
    "refuse_unprotected",
    "split_bind",
]

# Open without a token: /healthz, so that a supervisor can tell the process is
# alive; the OpenAPI document and the page that shows it (with its assets),
# which hold nothing secret, so that the page loads and takes the token itself.
PUBLIC_ENDPOINTS = frozenset({"admin.healthz", "openapi", *DOCS_ENDPOINTS})

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
