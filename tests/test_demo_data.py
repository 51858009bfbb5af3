"""Where ``pop3d serve`` puts its demo data: the running user's home, else a private temporary directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pop3d import serve


@pytest.fixture(autouse=True)
def no_xdg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)


def test_the_demo_goes_to_xdg_data_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    demo = serve.demo_data_dir()
    assert demo == tmp_path / "pop3d" / "demo"
    assert "\ndemo:{PLAIN}demo\n" in (demo / "users").read_text()
    assert len(list((demo / "mail" / "demo" / "new").iterdir())) == 1


def test_a_home_that_is_not_the_users_is_passed_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As after --user drops root: $HOME is still root's, and the new user has no home of its own.
    theirs = tmp_path / "root-home"
    theirs.mkdir()
    monkeypatch.setenv("HOME", str(theirs))
    uid = os.geteuid() + 4242
    monkeypatch.setattr(os, "geteuid", lambda: uid)
    assert serve._data_home() is None
    demo = serve.demo_data_dir()
    assert not str(demo).startswith(str(theirs))
    assert demo.name == "demo" and demo.parent.name.startswith("pop3d-demo-")
    assert (demo / "users").is_file()
    assert not (theirs / ".local").exists()


def test_the_users_own_home_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert serve._data_home() == tmp_path / ".local" / "share"
    assert serve.demo_data_dir() == tmp_path / ".local" / "share" / "pop3d" / "demo"
