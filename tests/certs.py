"""Test certificates from a throw-away CA (``trustme``), written as PEM files.

The server certificate names ``localhost``, ``127.0.0.1`` and ``::1``, with
``localhost`` as its common name too (fetchmail checks that).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme

IDENTITIES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Certs:
    """A server certificate and key in files, and the CA that signed them."""

    ca: trustme.CA
    cert: Path
    key: Path
    ca_file: Path
    #: The server certificate in DER, as ``getpeercert(binary_form=True)`` returns it.
    der: bytes

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only the test CA, with the standard library's checks."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


def issue(ca: trustme.CA, directory: Path, name: str = "server") -> Certs:
    """A new certificate for :data:`IDENTITIES` from ``ca``, as ``name.pem`` and ``name.key`` in ``directory``."""
    leaf = ca.issue_cert(*IDENTITIES, common_name="localhost")
    cert, key, ca_file = directory / f"{name}.pem", directory / f"{name}.key", directory / "ca.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
    return Certs(ca, cert, key, ca_file, der)
