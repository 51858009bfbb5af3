"""The admin HTTP API of pop3d: inspect and steer the server objects of a process.

A Quart-Trio app (:func:`create_app`) with JSON bodies described by an
OpenAPI document, Prometheus metrics, health checks and bearer-token
access; :func:`serve_admin` runs it with Hypercorn in the caller's nursery.
See ``docs/admin-api.md``.
"""

from __future__ import annotations

from .access import AdminAccessError, BearerToken, check_bind, is_loopback
from .app import create_app
from .health import not_listening
from .metrics import ServerCollector, new_registry
from .serve import serve_admin

__all__ = [
    "AdminAccessError",
    "BearerToken",
    "ServerCollector",
    "check_bind",
    "create_app",
    "is_loopback",
    "new_registry",
    "not_listening",
    "serve_admin",
]
