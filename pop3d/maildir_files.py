"""The small files kept beside a Maildir's messages: read without trusting them, replaced whole.

pop3d's index and UIDL pins, and Dovecot's ``dovecot-uidlist``, live in a
directory that belongs to whoever owns the mail.  So they are read through
no symlink (one could point at any file the server can read), never from a
FIFO (a worker thread would block on it forever), and never past a size
limit; and pop3d's own are written to a temporary file that replaces the old
one in one rename, so a reader sees the old file or the new, never half.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

__all__ = ["RefusedFile", "give_to_mail_owner", "read_small", "replace"]

_OPEN_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class RefusedFile(ValueError):
    """The file is there but is not one to read: not a regular file, or too large."""


def read_small(dir_fd: int, name: str, limit: int) -> bytes:
    """The whole of file ``name`` in the directory ``dir_fd``.

    Raises :class:`FileNotFoundError` if it is not there, :class:`RefusedFile`
    if it is a symlink, a FIFO, a directory or larger than ``limit`` bytes,
    and other :class:`OSError` as they come.
    """
    try:
        fd = os.open(name, _OPEN_READ, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RefusedFile(f"{name} is a symlink") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RefusedFile(f"{name} is not a regular file")
        if st.st_size > limit:
            raise RefusedFile(f"{name} is larger than {limit} bytes")
        chunks = []
        while chunk := os.read(fd, max(st.st_size + 1, 65536)):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def give_to_mail_owner(fd: int, dir_fd: int) -> None:
    """Running as root, make the file open at ``fd`` belong to the owner of the directory ``dir_fd``.

    Files pop3d makes beside the mail (lock, index, pins) must stay usable
    when pop3d later serves that Maildir as the mail's owner (``--user``),
    after a run as root (``pop3d uidl import``, ``--allow-root``).
    """
    if os.geteuid() == 0:
        st = os.fstat(dir_fd)
        os.fchown(fd, st.st_uid, st.st_gid)


def replace(dir_fd: int, name: str, data: bytes, *, mode: int, owner_of_dir: bool = True) -> None:
    """Make file ``name`` in the directory ``dir_fd`` hold ``data``, atomically.

    The caller holds the Maildir's lock, so a leftover ``name.tmp`` is from a
    crash and is reused.  ``owner_of_dir``: when running as root, give the
    file to the directory's owner (the mail's, see :func:`give_to_mail_owner`).  Raises
    :class:`OSError`; the temporary file is removed then.
    """
    tmp = name + ".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)
    fd = os.open(tmp, _OPEN_NEW, mode, dir_fd=dir_fd)
    try:
        try:
            if owner_of_dir:
                give_to_mail_owner(fd, dir_fd)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
