"""pop3d.dovecot_uidlist without Dovecot: parsing ``dovecot-uidlist`` and expanding ``pop3_uidl_format``.

The expected values follow Dovecot 2.3's ``var_expand``; tests/test_dovecot_uidls.py checks the
same formats against the real Dovecot.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pop3d import dovecot_uidlist
from pop3d.dovecot_uidlist import FormatError, UidlFormat, UidlistError, parse, uidls

V3 = b"""3 V1796258147 N5 G7a3d920c63b9106b475b000083ecc375
1 W56 :1700000001.M1P1.host
2 :1700000002.M2P1.host,S=39,W=40
3 W24 P000000036b10b963 :1700000003.M3P1.host
4 P G0123 zlower Qunknown :1700000004.M4P1.host:2,S
"""
VALUES = {"u": "1", "v": "1796258147", "f": "1700000001.M1P1.Host", "g": "1700000001.M1P1.Host", "m": ""}


def test_parse_version_3() -> None:
    uidlist = parse(V3)
    assert (uidlist.version, uidlist.uid_validity, uidlist.next_uid) == (3, 1796258147, 5)
    assert uidlist.guid == "7a3d920c63b9106b475b000083ecc375"
    assert [r.uid for r in uidlist.records] == [1, 2, 3, 4]
    assert uidlist.records[1].unique == "1700000002.M2P1.host,S=39,W=40"
    # Unknown capital fields are kept, others (lower-case keys) dropped as Dovecot does; ':2,S' is not the name.
    assert uidlist.records[3].fields == {"P": "", "G": "0123", "Q": "unknown"}
    assert uidlist.records[3].unique == "1700000004.M4P1.host"


def test_parse_version_1() -> None:
    uidlist = parse(b"1 1234 10\n3 1700000001.M1P1.host\n7 1700000002.M2P1.host:2,S\n")
    assert (uidlist.version, uidlist.uid_validity, uidlist.next_uid) == (1, 1234, 10)
    assert [(r.uid, r.unique) for r in uidlist.records] == [(3, "1700000001.M1P1.host"), (7, "1700000002.M2P1.host")]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\n",
        b"garbage\n",
        b"2 V1 N2\n",  # version 2: Dovecot refuses it too
        b"3 N5\n",  # no UIDVALIDITY
        b"3 V0 N5\n",
        b"3 V1 N5\n2 :a\n1 :b\n",  # UIDs not rising
        b"3 V1 N5\n1 :a\n1 :b\n",
        b"3 V1 N5\n0 :a\n",
        b"3 V1 N5\nx :a\n",
        b"3 V1 N5\n1 W5\n",  # no file name
        b"3 V1 N5\n1 :\n",
        b"3 V1 N5\n1 :../etc/passwd\n",
        b"3 V1 N5\n99999999999 :a\n",
        b"1 1 5\n7 a\n",  # version 1: a UID not below the next UID
        b"3 V1 N5\n1\n",
        b"\x00\xff" * 100,
    ],
)
def test_broken_files_are_refused(data: bytes) -> None:
    with pytest.raises(UidlistError):
        parse(data)


def test_a_name_listed_twice_belongs_to_the_later_uid() -> None:
    uidlist = parse(b"3 V1 N9\n1 :a\n5 :a:2,S\n")
    assert uidls(uidlist, UidlFormat("%u"))[0] == {"a": "5"}


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("%08Xu%08Xv", "000000016b10b963"),
        ("%u", "1"),
        ("%v.%u", "1796258147.1"),
        ("%f", "1700000001.M1P1.Host"),
        ("%Lg", "1700000001.m1p1.host"),
        ("%Ug", "1700000001.M1P1.HOST"),
        ("%8.4g", "01.M"),  # offset 8, width 4
        ("%-8g", "17000000"),  # a sign before a width alone is ignored: truncate to 8
        ("%.-4g", "1700000001.M1P1."),  # a negative width: all but the last 4
        ("%-4.g", "Host"),  # a negative offset: the last 4
        ("%0.08u", "00000001"),
        ("%3.02u", "00"),  # the offset empties it, then zeros pad it
        ("%Xg", "0"),  # X of something not a decimal number
        ("%Rf", "tsoH.1P1M.1000000071"),
        ("%Mu", "c4ca4238a0b923820dcc509a6f75849b"),
        ("%Nu", "a0b92382"),
        ("%%%u%%", "%1%"),
        ("%{uid}-%{uidvalidity}-%{guid}", "1-1796258147-1700000001.M1P1.Host"),
        ("%08X{uid}", "00000001"),
        ("%u%", "1"),  # a lone '%' at the end is dropped
        ("%Tf", "1700000001.M1P1.Host"),
        ("%Eu", "1"),
        ("%Du", "1"),
    ],
)
def test_format_expansion(fmt: str, expected: str) -> None:
    assert UidlFormat(fmt).expand(VALUES) == expected


@pytest.mark.parametrize(
    "fmt",
    ["", "no variables", "%%", "%q", "%{uid", "%{hostname}", "%H{uid}", "%{uid | hex(8)}%{uidvalidity | hex(8)}"],
)
def test_formats_that_cannot_be_expanded(fmt: str) -> None:
    with pytest.raises(FormatError):
        UidlFormat(fmt)


def test_stored_uidls_win_and_m_has_none() -> None:
    uidlist = parse(V3)
    found, invalid = uidls(uidlist, UidlFormat("%08Xu%08Xv"))
    assert found == {
        "1700000001.M1P1.host": "000000016b10b963",
        "1700000002.M2P1.host,S=39,W=40": "000000026b10b963",
        "1700000003.M3P1.host": "000000036b10b963",  # the P field, equal here
        "1700000004.M4P1.host": "1700000004.M4P1.host",  # an empty P: the base name
    }
    assert invalid == 0
    found, _ = uidls(uidlist, UidlFormat("%m"))
    assert found == {"1700000003.M3P1.host": "000000036b10b963", "1700000004.M4P1.host": "1700000004.M4P1.host"}
    found, _ = uidls(uidlist, UidlFormat("%g"))
    assert found["1700000001.M1P1.host"] == "1700000001.M1P1.host"


def test_guid_field_for_g() -> None:
    found, _ = uidls(parse(b"3 V1 N9\n1 Gabc :a\n2 :b\n"), UidlFormat("%g"))
    assert found == {"a": "abc", "b": "b"}


def test_duplicates_are_renamed_and_invalid_uidls_left_out() -> None:
    data = b"3 V1 N9\n1 Px :a\n2 Px :b\n3 Px-2 :c\n4 Px :d\n5 P" + b"y" * 71 + b" :e\n"
    found, invalid = uidls(parse(data), UidlFormat("%u"))
    assert found == {"a": "x", "b": "x-2", "c": "x-2-2", "d": "x-3"}
    assert invalid == 1
    long_name = "1700000001." + "M" * 70
    found, invalid = uidls(parse(f"3 V1 N9\n1 :{long_name}\n".encode()), UidlFormat("%f"))
    assert (found, invalid) == ({}, 1)


def test_a_damaged_file_is_an_error_not_an_empty_list(tmp_path: Path) -> None:
    # Taken for "no UIDLs", a damaged file would give Dovecot's messages new UIDLs that stick.
    fmt = UidlFormat("%u")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert dovecot_uidlist.read_uidls(fd, "box", fmt) == {}  # none at all: fine
        (tmp_path / "dovecot-uidlist").write_bytes(b"nonsense\n")
        with pytest.raises(UidlistError):
            dovecot_uidlist.read_uidls(fd, "box", fmt)
        (tmp_path / "dovecot-uidlist").write_bytes(b"3 V1 N3\n2 :a\n")
        assert dovecot_uidlist.read_uidls(fd, "box", fmt) == {"a": "2"}
        (tmp_path / "dovecot-uidlist").unlink()
        os.mkfifo(tmp_path / "dovecot-uidlist")  # must not block
        with pytest.raises(UidlistError, match="not a regular file"):
            dovecot_uidlist.read_uidls(fd, "box", fmt)
        (tmp_path / "dovecot-uidlist").unlink()
        (tmp_path / "dovecot-uidlist").symlink_to("/etc/passwd")
        with pytest.raises(UidlistError, match="symlink"):
            dovecot_uidlist.read_uidls(fd, "box", fmt)
    finally:
        os.close(fd)


def test_non_utf8_names_round_trip() -> None:
    uidlist = parse(b"3 V1 N3\n1 :caf\xe9.host\n")
    assert os.fsencode(uidlist.records[0].unique) == b"caf\xe9.host"
