"""Dovecot's ``dovecot-uidlist``: the UIDLs that Dovecot gave a Maildir's messages.

A storage format beside :mod:`pop3d.maildir`, which reads it so that a
Maildir tree that Dovecot served keeps its POP3 UIDLs under pop3d.  This
module parses the file and forms the UIDLs as Dovecot 2.3 does; it never
writes anything, so switching back to Dovecot stays possible.

The file (``src/lib-storage/index/maildir/maildir-uidlist.c``)::

    3 V<uidvalidity> N<next uid> G<mailbox guid>
    <uid> [<key><value> ...] :<file name>

Version 1 (Dovecot 1.0, Courier's ``courierimapuiddb``) has the header
``1 <uidvalidity> <next uid>`` and lines ``<uid> <file name>``.  The
fields of a version 3 line are one capital letter and a value each: ``S``
and ``W`` sizes, ``G`` the message GUID, ``P`` the POP3 UIDL Dovecot stored
(``pop3_save_uidl``; an empty ``P`` means the base file name), ``O`` the POP3
order; unknown ones are ignored.  UIDs rise strictly.  The file names are
base names (the part before ``:``), so a record is found by the Maildir
unique name; a name listed twice belongs to its later UID, as in Dovecot.

How Dovecot forms a message's UIDL (``src/pop3/pop3-commands.c``,
``pop3_get_uid``): the stored ``P`` field if there is one, else
``pop3_uidl_format`` (default ``%08Xu%08Xv``) expanded by
``src/lib/var-expand.c`` with

=======  ===============  ==================================================
``%u``   ``%{uid}``       the IMAP UID
``%v``   ``%{uidvalidity}``  the mailbox's UIDVALIDITY (the ``V`` header)
``%f``   ``%{filename}``  the base file name (before ``:``, ``,S=`` included)
``%g``   ``%{guid}``      the ``G`` field, else the base file name
``%m``   ``%{md5}``       the header MD5: for Maildir, Dovecot 2.3 has none
=======  ===============  ==================================================

``%m`` on Maildir: Dovecot 2.3.19 answers UIDL with ``UIDL: Header MD5 not
found (pop3_uidl_format=%m not supported by storage?)`` and ends the
session, so a client only ever saw stored (``P``) UIDLs there; messages
without one get no Dovecot UIDL here either.  Dovecot 2.3 refuses the
long names (``%{uid}``) in ``pop3_uidl_format`` itself; they are accepted
here all the same.

Each ``%`` takes ``[-][0]<width>`` or ``[-]<offset>.[0][-]<width>`` and
modifiers before the variable: ``L`` lower case, ``U`` upper case, ``X``
decimal to lower-case hex (0 for anything else), ``R`` reversed, ``M`` MD5
in hex, ``N`` Dovecot's "new hash", ``T`` trailing white space trimmed,
``E`` backslash-escaped, ``D`` dots to ``,dc=``.  A width truncates; a width
with a leading ``0`` pads with zeros and never truncates; an offset skips
characters (from the end if negative).  ``H`` (Dovecot's ``str_hash``) and
variables other than the five are refused, as is a format without any of
the five: :class:`FormatError`, at configuration time.

Duplicates: two messages with the same Dovecot UIDL (equal ``P`` fields, a
truncating width) get it once; the later UIDs get ``-2``, ``-3``... appended,
as Dovecot does with ``pop3_uidl_duplicates = rename``.  A UIDL that RFC 1939
does not allow (longer than 70 characters, a space or a non-ASCII
character, possible with ``%f``) is left out, so that message gets pop3d's
own UIDL; :func:`read_uidls` logs how many.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .maildir_files import RefusedFile, read_small
from .protocol import valid_uid

__all__ = [
    "DEFAULT_FORMAT",
    "MAX_UIDLIST_SIZE",
    "UIDLIST_NAME",
    "FormatError",
    "Record",
    "UidlFormat",
    "Uidlist",
    "UidlistError",
    "load",
    "parse",
    "read_uidls",
    "uidls",
]

log = logging.getLogger("pop3d.maildir")

UIDLIST_NAME = "dovecot-uidlist"
"""Dovecot's file in each Maildir."""
DEFAULT_FORMAT = "%08Xu%08Xv"
"""Dovecot's default ``pop3_uidl_format``."""
MAX_UIDLIST_SIZE = 256 * 1024 * 1024
"""A bigger ``dovecot-uidlist`` is refused (about 100 bytes a message: millions of messages)."""

# What is there is not a dovecot-uidlist (a symlink, a directory): like a damaged file.
_NOT_A_FILE = frozenset({errno.ELOOP, errno.EISDIR, errno.ENXIO})
_UID_MAX = 2**32 - 1  # Dovecot: a UID of (uint32_t)-1 or more is corrupt


class UidlistError(ValueError):
    """A ``dovecot-uidlist`` that Dovecot itself would call broken."""


class FormatError(ValueError):
    """A ``pop3_uidl_format`` that cannot be expanded as Dovecot does."""


def _fields(raw: str) -> dict[str, str]:
    """The ``<key><value>`` fields of a line; the first of a key counts.

    A field whose key is not a capital letter is dropped, as Dovecot drops
    it ("Invalid extension record").
    """
    fields: dict[str, str] = {}
    for token in raw.split(" "):
        if token and "A" <= token[0] <= "Z":
            fields.setdefault(token[0], token[1:])
    return fields


@dataclass(frozen=True, slots=True)
class Record:
    """One message of a ``dovecot-uidlist``."""

    uid: int
    filename: str  #: as written: normally the base name, without ``:2,...``
    fields: Mapping[str, str] = field(default_factory=dict)  #: ``{"P": "...", "G": "...", "W": "..."}``

    @property
    def unique(self) -> str:
        """The Maildir unique name: the file name before ``:``."""
        return self.filename.partition(":")[0]


@dataclass(frozen=True, slots=True)
class Uidlist:
    """A parsed ``dovecot-uidlist``: its header and its messages in UID order.

    Column by column (a uidlist may have 100,000 lines, read at each login
    that finds new mail): ``uids``, ``filenames`` and the raw field text of
    each line (``""`` for none); :attr:`records` builds objects.
    """

    version: int
    uid_validity: int
    next_uid: int
    guid: str | None
    uids: Sequence[int]
    filenames: Sequence[str]
    raw_fields: Sequence[str]

    @property
    def records(self) -> list[Record]:
        """Every message as a :class:`Record`."""
        return [
            Record(uid, name, _fields(raw))
            for uid, name, raw in zip(self.uids, self.filenames, self.raw_fields, strict=True)
        ]

    def by_unique(self) -> dict[str, Record]:
        """Unique name -> record; a name listed twice belongs to the later UID (Dovecot's rule)."""
        return {record.unique: record for record in self.records}


def _number(text: str, what: str, lineno: int) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 10:
        raise UidlistError(f"line {lineno}: bad {what}: {text[:40]!r}")
    return int(text)


def _header(line: str) -> tuple[int, int, int, str | None]:
    # Dovecot: a digit, a space, then the version's fields.
    if len(line) < 2 or not ("0" <= line[0] <= "9") or line[1] != " ":
        raise UidlistError("line 1: not a dovecot-uidlist header")
    version = int(line[0])
    rest = line[2:]
    guid: str | None = None
    if version == 1:
        parts = rest.split()
        if len(parts) < 2:
            raise UidlistError("line 1: version 1 header without UIDVALIDITY and next UID")
        uid_validity, next_uid = _number(parts[0], "UIDVALIDITY", 1), _number(parts[1], "next UID", 1)
    elif version == 3:
        uid_validity = next_uid = 0
        for token in rest.split(" "):
            if not token:
                continue
            key, value = token[0], token[1:]
            if key == "V":
                uid_validity = _number(value, "UIDVALIDITY", 1)
            elif key == "N":
                next_uid = _number(value, "next UID", 1)
            elif key == "G":
                guid = value
            # Other keys (such as P, a default POP3 UIDL format) are kept by Dovecot and unused.
    else:
        raise UidlistError(f"line 1: unsupported version {version}")
    if not 0 < uid_validity <= _UID_MAX or next_uid == 0:
        raise UidlistError(f"line 1: broken header (uidvalidity={uid_validity}, next_uid={next_uid})")
    return version, uid_validity, next_uid, guid


def parse(data: bytes) -> Uidlist:
    """Parse a whole ``dovecot-uidlist``; :class:`UidlistError` for a file Dovecot would call broken.

    File names are bytes in any encoding: they are decoded as the file
    system's names are (:func:`os.fsdecode`).
    """
    lines = os.fsdecode(data).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise UidlistError("empty file")
    version, uid_validity, next_uid, guid = _header(lines[0])
    uids: list[int] = []
    names: list[str] = []
    raws: list[str] = []
    previous = 0
    for lineno, line in enumerate(lines[1:], start=2):
        head, space, rest = line.partition(" ")
        if not space or not head.isdigit() or not head.isascii() or len(head) > 10:
            raise UidlistError(f"line {lineno}: invalid data: {line[:60]!r}")
        uid = int(head)
        if uid <= previous:
            raise UidlistError(f"line {lineno}: UIDs not ordered ({uid} after {previous})")
        if uid >= _UID_MAX:
            raise UidlistError(f"line {lineno}: UID too high ({uid})")
        if version == 1:
            if uid >= next_uid:
                raise UidlistError(f"line {lineno}: UID {uid} not below the next UID {next_uid}")
            raw, name = "", rest.lstrip(" ")
        else:
            # The fields, then the file name: the first token that starts with ':'.
            raw, colon, name = (" " + rest).partition(" :")
            if not colon:
                raise UidlistError(f"line {lineno}: no file name: {line[:60]!r}")
        if not name or "/" in name or "\0" in name:
            raise UidlistError(f"line {lineno}: broken file name: {name[:60]!r}")
        previous = uid
        uids.append(uid)
        names.append(name)
        raws.append(raw)
    return Uidlist(version, uid_validity, next_uid, guid, uids, names, raws)


# --- pop3_uidl_format ---------------------------------------------------------------------------

_LONG_NAMES = {"uid": "u", "uidvalidity": "v", "md5": "m", "filename": "f", "guid": "g"}
_VARIABLES = frozenset(_LONG_NAMES.values())


@dataclass(slots=True)
class _Context:
    offset: int = 0
    width: int = 0
    zero_padding: bool = False


def _hex(value: str) -> str:
    # Dovecot: str_to_ullong, 0 if that fails (not all digits, or too big for 64 bits).
    if value.isdigit() and value.isascii():
        number = int(value)
        if number < 2**64:
            return f"{number:x}"
    return "0"


def _newhash(value: str, ctx: _Context) -> str:
    """Dovecot's N modifier: it uses and then clears the width and offset."""
    number = int.from_bytes(hashlib.md5(os.fsencode(value)).digest()[:8], "big")
    if ctx.width != 0:
        number %= ctx.width
        ctx.width = 0
    text = format(number & 0xFFFFFFFF, "x")
    text = text.rjust(max(ctx.offset, 0), "0")
    ctx.offset = 0
    return text


def _escape(value: str) -> str:
    return "".join("\\" + c if c in "\\\"'" else c for c in value)


_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")

# Modifiers of the value alone; N (which also changes width and offset) is apart.
_MODIFIERS: dict[str, Callable[[str], str]] = {
    # Dovecot's case changes are ASCII-only.
    "L": lambda value: value.translate(_LOWER),
    "U": lambda value: value.translate(_UPPER),
    "E": _escape,
    "X": _hex,
    "R": lambda value: value[::-1],
    "M": lambda value: hashlib.md5(os.fsencode(value)).hexdigest(),
    "D": lambda value: value.replace(".", ",dc="),
    "T": lambda value: value.rstrip(" \t\n\v\f\r"),
}
_NEWHASH = "N"
_REFUSED_MODIFIERS = {"H": "Dovecot's str_hash"}
_MAX_MODIFIERS = 10


@dataclass(frozen=True, slots=True)
class _Item:
    """One ``%`` of a format: how to cut and pad, which modifiers, which variable."""

    variable: str  # u v m f g, or "%"
    modifiers: tuple[str, ...]  # their letters, in order
    offset: int
    width: int
    zero_padding: bool


class UidlFormat:
    """A compiled ``pop3_uidl_format``; :class:`FormatError` if it cannot be expanded.

    :meth:`expand` then gives what Dovecot 2.3's ``var_expand`` gives.
    """

    __slots__ = ("_parts", "text", "variables")

    def __init__(self, text: str) -> None:
        if not isinstance(text, str) or not text:
            raise FormatError("pop3_uidl_format must be a non-empty string")
        self.text = text
        self._parts: list[str | _Item] = []
        used: set[str] = set()
        i, n = 0, len(text)
        literal: list[str] = []
        while i < n:
            c = text[i]
            i += 1
            if c != "%":
                literal.append(c)
                continue
            item, i = self._item(text, i)
            if item is None:
                continue  # a lone '%' at the end: Dovecot drops it
            if item.variable == "%" and not item.modifiers:
                literal.append("%")
                continue
            if literal:
                self._parts.append("".join(literal))
                literal = []
            self._parts.append(item)
            used.add(item.variable)
        if literal:
            self._parts.append("".join(literal))
        self.variables = frozenset(used & _VARIABLES)
        if not self.variables:
            raise FormatError(f"pop3_uidl_format {text!r} has none of %u, %v, %m, %f, %g")

    def _item(self, text: str, i: int) -> tuple[_Item | None, int]:
        n = len(text)
        sign = 1
        offset, width, zero = 0, 0, False
        if i < n and text[i] == "-":
            sign = -1
            i += 1
        if i < n and text[i] == "0":
            zero = True
            i += 1
        start = i
        while i < n and text[i].isascii() and text[i].isdigit():
            i += 1
        width = int(text[start:i]) if i > start else 0
        if i < n and text[i] == ".":
            offset, sign, width = sign * width, 1, 0
            i += 1
            zero = False
            if i < n and text[i] == "0":
                zero = True
                i += 1
            if i < n and text[i] == "-":
                sign = -1
                i += 1
            start = i
            while i < n and text[i].isascii() and text[i].isdigit():
                i += 1
            width = sign * (int(text[start:i]) if i > start else 0)
        modifiers: list[str] = []
        while i < n and len(modifiers) < _MAX_MODIFIERS:
            if text[i] in _REFUSED_MODIFIERS:
                raise FormatError(
                    f"pop3_uidl_format {text!r}: modifier %{text[i]} ({_REFUSED_MODIFIERS[text[i]]}) is not supported"
                )
            if text[i] not in _MODIFIERS and text[i] != _NEWHASH:
                break
            modifiers.append(text[i])
            i += 1
        if i >= n:
            return None, i
        if text[i] == "{":
            end = text.find("}", i + 1)
            if end < 0:
                raise FormatError(f"pop3_uidl_format {text!r}: '%{{' without '}}'")
            name = text[i + 1 : end]
            variable = _LONG_NAMES.get(name)
            if variable is None:
                raise FormatError(f"pop3_uidl_format {text!r}: unknown variable %{{{name}}}")
            i = end + 1
        else:
            variable = text[i]
            i += 1
            if variable not in _VARIABLES and variable != "%":
                raise FormatError(f"pop3_uidl_format {text!r}: unknown variable %{variable}")
        return _Item(variable, tuple(modifiers), offset, width, zero), i

    def expand(self, values: Mapping[str, str]) -> str:
        """The format with ``values`` (``{"u": "17", "v": "...", ...}``) put in, as Dovecot expands it."""
        return "".join(
            part
            if isinstance(part, str)
            else _apply(part, "%" if part.variable == "%" else values.get(part.variable, ""))
            for part in self._parts
        )

    def bind(self, uid_validity: int) -> Callable[[str, str, str], str]:
        """``expand`` for one mailbox, as a function of ``(uid, filename, guid)``: what does not vary is done once."""
        parts: list[str | _Item] = []
        for part in self._parts:
            if isinstance(part, _Item) and part.variable in ("v", "%"):
                part = _apply(part, "%" if part.variable == "%" else str(uid_validity))
            if isinstance(part, str) and parts and isinstance(parts[-1], str):
                parts[-1] += part
            else:
                parts.append(part)

        def expand(uid: str, filename: str, guid: str) -> str:
            out = []
            for part in parts:
                if isinstance(part, str):
                    out.append(part)
                else:
                    variable = part.variable
                    out.append(_apply(part, uid if variable == "u" else filename if variable == "f" else guid))
            return "".join(out)

        return expand

    def __repr__(self) -> str:
        return f"UidlFormat({self.text!r})"


def _apply(item: _Item, value: str) -> str:
    """``value`` through ``item``'s modifiers, offset and width (Dovecot's var_expand)."""
    offset, width, zero_padding = item.offset, item.width, item.zero_padding
    for letter in item.modifiers:
        if letter == _NEWHASH:
            ctx = _Context(offset, width, zero_padding)
            value = _newhash(value, ctx)
            offset, width = ctx.offset, ctx.width
        else:
            value = _MODIFIERS[letter](value)
    if offset < 0:
        if len(value) > -offset:
            value = value[len(value) + offset :]
    elif offset > 0:
        value = value[offset:]
    if width == 0:
        return value
    if not zero_padding:
        width = width if width > 0 else len(value) + width
        # A negative result is a huge size_t in C: the whole value.
        return value if width < 0 else value[:width]
    return value.rjust(width, "0") if width > 0 else value


def uidls(uidlist: Uidlist, fmt: UidlFormat) -> tuple[dict[str, str], int]:
    """Unique name -> the UIDL Dovecot gives it, and how many were left out as not valid (RFC 1939).

    The stored UIDL (``P``) first, else the format; with ``%m`` and no
    stored UIDL, none.  Duplicates are renamed in UID order as described
    in the module's docstring, so the values are unique.
    """
    names, raws, uids = uidlist.filenames, uidlist.raw_fields, uidlist.uids
    uniques = [name.partition(":")[0] for name in names]
    last = {unique: i for i, unique in enumerate(uniques)}  # a name listed twice belongs to the later UID
    expand = fmt.bind(uidlist.uid_validity)
    needs_md5 = "m" in fmt.variables
    out: dict[str, str] = {}
    taken: dict[str, int] = {}  # UIDL -> how many times it was seen (Dovecot's counter)
    invalid = 0
    for i, unique in enumerate(uniques):
        if last[unique] != i:
            continue
        raw = raws[i]
        fields = _fields(raw) if raw and ("P" in raw or "G" in raw) else {}
        stored = fields.get("P")
        if stored is not None:
            uidl = stored or unique  # an empty P: the base file name
        elif needs_md5:
            continue  # Dovecot 2.3 has no header MD5 for Maildir
        else:
            uidl = expand(str(uids[i]), unique, fields.get("G") or unique)
        while uidl in taken:
            taken[uidl] += 1
            uidl = f"{uidl}-{taken[uidl]}"
        taken[uidl] = 1
        if not valid_uid(uidl):
            invalid += 1
            continue
        out[unique] = uidl
    return out, invalid


def _read(dir_fd: int) -> bytes:
    try:
        return read_small(dir_fd, UIDLIST_NAME, MAX_UIDLIST_SIZE)
    except RefusedFile as exc:
        raise UidlistError(str(exc)) from None


def load(dir_fd: int, where: str) -> Uidlist | None:
    """The ``dovecot-uidlist`` of the Maildir open at ``dir_fd``; ``None`` if it has none.

    A file that is there but damaged (cannot be parsed, a symlink, a FIFO, a
    directory, too large) raises :class:`UidlistError`: serving without
    Dovecot's UIDLs would give its messages new ones, and those would stick
    in pop3d's index.  Other :class:`OSError` (no permission) are raised too.
    """
    try:
        return parse(_read(dir_fd))
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in _NOT_A_FILE:
            raise UidlistError(exc.strerror or str(exc)) from None
        raise


def read_uidls(dir_fd: int, where: str, fmt: UidlFormat) -> dict[str, str]:
    """Unique name -> Dovecot's UIDL for the Maildir open at ``dir_fd`` (empty without a uidlist)."""
    uidlist = load(dir_fd, where)
    if uidlist is None:
        return {}
    found, invalid = uidls(uidlist, fmt)
    if invalid:
        log.warning("maildir %s: %d Dovecot UIDLs are not valid POP3 UIDLs and are not used", where, invalid)
    return found
