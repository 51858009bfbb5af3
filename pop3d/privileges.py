"""Running as an unprivileged user after binding the ports, as Dovecot and gunicorn do.

``pop3d serve --user pop3d`` started as root binds 110 and 995, then gives up
root for good, before anything is served: the user's supplementary groups,
its group and the user, in that order (once the user is changed, the groups
no longer can be).  :func:`plan` checks the
request before anything listens, so that a typo is a one-line error and not
a server that quietly keeps root.
"""

from __future__ import annotations

import contextlib
import grp
import importlib
import logging
import os
import pwd
from dataclasses import dataclass

from .errors import Pop3dError

__all__ = ["Identity", "PrivilegeError", "drop", "plan"]

log = logging.getLogger("pop3d")


class PrivilegeError(Pop3dError):
    """The user or group cannot be used, or root was not asked for; one line."""


@dataclass(frozen=True)
class Identity:
    """The user and group to become."""

    user: str
    uid: int
    gid: int


def plan(user: str | None, group: str | None, *, allow_root: bool, serves_mail: bool) -> Identity | None:
    """The identity to drop to after binding, if any; raises :class:`PrivilegeError`.

    Serving real mail as root needs ``allow_root``: one bug in a mail
    parser should not own the machine.  The demo (``serves_mail`` false)
    runs as whoever starts it.
    """
    if user is None:
        if group is not None:
            raise PrivilegeError("group: give user too")
        if os.geteuid() == 0 and serves_mail and not allow_root:
            raise PrivilegeError(
                "refusing to serve mail as root: give user (e.g. --user pop3d) to run as it once the ports "
                "are bound, or allow-root"
            )
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"user: no such user {user!r}") from None
    gid = entry.pw_gid
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise PrivilegeError(f"group: no such group {group!r}") from None
    if entry.pw_uid == 0 and not allow_root:
        raise PrivilegeError(f"user: {user!r} is root; give allow-root to serve mail as root")
    if os.geteuid() != 0 and (os.geteuid(), os.getegid()) != (entry.pw_uid, gid):
        raise PrivilegeError(f"user: only root can become {user!r}")
    return Identity(user=user, uid=entry.pw_uid, gid=gid)


# Standard modules that Python or pop3d import only when first needed: a text
# file in ASCII, an IDNA host name, the demo's package data.  Imported before
# the drop, because the new user may not be able to read the standard library
# (a Python installed under root's home, as pyenv does).
_IMPORTED_BEFORE_DROP = (
    "encodings.ascii",
    "encodings.idna",
    "encodings.latin_1",
    "encodings.utf_8",
    "importlib.readers",
    "importlib.resources.readers",
    "stringprep",
    "unicodedata",
)


def drop(identity: Identity) -> None:
    """Become ``identity`` for good (nothing if already it)."""
    if (os.geteuid(), os.getegid()) == (identity.uid, identity.gid):
        return
    for name in _IMPORTED_BEFORE_DROP:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    # The user's own supplementary groups (ssl-cert, mail...) and no others of root's.
    os.initgroups(identity.user, identity.gid)
    os.setgid(identity.gid)
    os.setuid(identity.uid)
    log.info("running as user %s (uid %d, gid %d)", identity.user, identity.uid, identity.gid)
