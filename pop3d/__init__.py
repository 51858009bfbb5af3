"""pop3d: a POP3 server (RFC 1939, RFC 2449) for Python, on Trio.

The API follows tcllib's ``pop3d``: :func:`new` makes a server object with
``configure``, ``cget``, ``up``, ``down``, ``destroy``, ``conn_list`` and
``conn_state``; two callbacks, ``auth`` and ``storage``, supply users and
mailboxes.
"""

from __future__ import annotations

from ._version import __version__
from .callbacks import Auth, HashedPassword, MailboxUnavailable, MessageData, Storage, sync_auth, sync_storage
from .errors import NameTaken, OptionError, Pop3dError, StateError, UnknownConnection
from .maildir import MaildirStorage
from .memory import MemoryStorage, MemoryUsers
from .options import ServerOptions
from .passwd import PasswdFile
from .server import Server, get, new, servers

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
