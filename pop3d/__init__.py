"""pop3d: a POP3 server (RFC 1939, RFC 2449) for Python, on Trio.

The API follows tcllib's ``pop3d``: :func:`new` makes a server object with
``configure``, ``cget``, ``up``, ``down``, ``destroy``, ``conn_list`` and
``conn_state``; two callbacks, ``auth`` and ``storage``, supply users and
mailboxes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._version import __version__

if TYPE_CHECKING:
    from .callbacks import Auth, HashedPassword, MailboxUnavailable, MessageData, Storage, sync_auth, sync_storage
    from .errors import NameTaken, OptionError, Pop3dError, StateError, UnknownConnection
    from .maildir import MaildirStorage
    from .memory import MemoryStorage, MemoryUsers
    from .options import ServerOptions
    from .passwd import PasswdFile
    from .server import Server, get, new, servers

# The public names are imported when first used, so that ``import
# pop3d.protocol`` (the I/O-free engine) needs only the standard library.
_LAZY = {
    "Auth": "callbacks",
    "HashedPassword": "callbacks",
    "MailboxUnavailable": "callbacks",
    "MessageData": "callbacks",
    "Storage": "callbacks",
    "sync_auth": "callbacks",
    "sync_storage": "callbacks",
    "NameTaken": "errors",
    "OptionError": "errors",
    "Pop3dError": "errors",
    "StateError": "errors",
    "UnknownConnection": "errors",
    "MaildirStorage": "maildir",
    "MemoryStorage": "memory",
    "MemoryUsers": "memory",
    "ServerOptions": "options",
    "PasswdFile": "passwd",
    "Server": "server",
    "get": "server",
    "new": "server",
    "servers": "server",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pop3d' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Auth",
    "HashedPassword",
    "MailboxUnavailable",
    "MaildirStorage",
    "MemoryStorage",
    "MemoryUsers",
    "MessageData",
    "NameTaken",
    "OptionError",
    "PasswdFile",
    "Pop3dError",
    "Server",
    "ServerOptions",
    "StateError",
    "Storage",
    "UnknownConnection",
    "__version__",
    "get",
    "new",
    "servers",
    "sync_auth",
    "sync_storage",
]
