"""TLS contexts for POP3 over TLS (RFC 8314) and STLS (RFC 2595).

:func:`server_context` loads a certificate chain and its key into a fresh
context with the standard library's secure defaults and TLS 1.2 at least,
and says in one sentence what is wrong when it cannot.  :func:`check_context`
holds a caller's own context to the same floor.  The handshake itself is the
session's business (:class:`trio.SSLStream`).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from .errors import Pop3dError

__all__ = ["MINIMUM_VERSION", "TLSError", "check_context", "server_context"]

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class TLSError(Pop3dError, ValueError):
    """A certificate or key cannot be used; the message says why, in one line."""


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise TLSError(f"cannot read the {what} {path}: {exc.strerror}") from None


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context with the certificate chain in ``cert`` and the key in ``key``.

    Both are PEM files (they may be the same file).  The key must not be
    encrypted: a server cannot ask for a passphrase.  Raises
    :class:`TLSError`.
    """
    if "-----BEGIN CERTIFICATE-----" not in _read(cert, "certificate"):
        raise TLSError(f"{cert} holds no PEM certificate")
    key_text = _read(key, "key")
    if "PRIVATE KEY-----" not in key_text:
        raise TLSError(f"{key} holds no PEM private key")
    if "ENCRYPTED" in key_text:
        raise TLSError(f"the key in {key} is encrypted; pop3d needs it without a passphrase")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = MINIMUM_VERSION
    # Client-initiated renegotiation only costs the server CPU.
    context.options |= ssl.OP_NO_RENEGOTIATION
    try:
        # A callable password keeps OpenSSL from prompting on a terminal for an encrypted key.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise TLSError(f"the key in {key} does not match the certificate in {cert}") from None
        raise TLSError(f"cannot load the certificate {cert} with the key {key}: {exc.reason or exc}") from None
    except OSError as exc:
        raise TLSError(f"cannot load the certificate {cert} with the key {key}: {exc.strerror or exc}") from None
    return context


def check_context(context: ssl.SSLContext) -> None:
    """Refuse (``ValueError``) a context that cannot serve, or allows TLS older than 1.2."""
    if context.protocol is ssl.PROTOCOL_TLS_CLIENT:
        raise ValueError("is a client context; make it with ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)")
    if context.minimum_version < MINIMUM_VERSION:
        raise ValueError("allows TLS older than 1.2; set its minimum_version to ssl.TLSVersion.TLSv1_2")
