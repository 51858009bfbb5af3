"""``pop3d uidl show``, and the ``pop3d uidl`` commands of docs/migrating.md as printed.

Every test here calls ``pop3d.cli.main`` (so ``uidl`` must be wired into
``pop3d/cli.py``).  The documented commands are run by bash as printed,
with the document's server (``pop.example.org``) and paths pointed at this
test's pop3d on ``127.0.0.1:0`` and its temporary directories.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pop3d import uidl_pins

from .serve_process import AS_ROOT, ServeProcess

DOC = Path(__file__).resolve().parent.parent / "docs" / "migrating.md"
SECTION = "## From any other POP3 server"


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from pop3d.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def maildir(root: Path, user: str, files: dict[str, bytes], subdir: str = "cur") -> Path:
    box = root / user
    for sub in ("cur", "new", "tmp"):
        (box / sub).mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (box / subdir / name).write_bytes(data)
    return box


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """alice: a pinned message, a Dovecot one, a plain one and one whose name cannot be a UIDL."""
    root = tmp_path / "mail"
    box = maildir(
        root,
        "alice",
        {
            "1700000001.M1P1.host:2,S": b"Subject: pinned\n\n1\n",
            "1700000002.M2P1.host:2,": b"Subject: dovecot\n\n2\n",
            "1700000003.M3P1.host": b"Subject: plain\n\n3\n",
            "1700000004.M4P1.h\u00f6st": b"Subject: hashed\n\n4\n",
        },
    )
    (box / "dovecot-uidlist").write_text(
        "3 V1700000000 N3 G0123456789abcdef0123456789abcdef\n2 :1700000002.M2P1.host\n"
    )
    uidl_pins.save(box, {"1700000001.M1P1.host": "old-server-uidl-1"})
    return root


def test_show(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "uidl", "show", "alice", "--mail-root", str(tree))
    assert code == 0 and err == ""
    rows = [line.split() for line in out.splitlines()]
    assert [(row[0], row[2], row[3]) for row in rows] == [
        ("1", "imported", "cur/1700000001.M1P1.host:2,S"),
        ("2", "dovecot", "cur/1700000002.M2P1.host:2,"),
        ("3", "maildir", "cur/1700000003.M3P1.host"),
        ("4", "hashed", "cur/1700000004.M4P1.h\u00f6st"),
    ]
    assert rows[0][1] == "old-server-uidl-1" and rows[2][1] == "1700000003.M3P1.host"
    assert re.fullmatch(r"0000000200000000|00000002[0-9a-fA-F]{8}", rows[1][1])
    assert rows[3][1].startswith("sha1-")
    # Columns line up.
    assert len({line.index(" cur/") for line in out.splitlines()}) == 1

    code, out, _ = run_cli(capsys, "uidl", "show", "alice", "--mail-root", str(tree), "--json")
    assert code == 0
    entries = json.loads(out)
    assert [(e["number"], e["uidl"], e["source"], e["file"]) for e in entries] == [
        (int(row[0]), row[1], row[2], row[3]) for row in rows
    ]
    assert entries[0]["size"] == len(b"Subject: pinned\r\n\r\n1\r\n")

    code, out, _ = run_cli(
        capsys, "uidl", "show", "alice", "--mail-root", str(tree), "--dovecot-uidl-format", "none", "--json"
    )
    assert code == 0 and json.loads(out)[1]["source"] == "maildir"


def test_show_nothing_changes(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = sorted((p, p.read_bytes()) for p in tree.rglob("*") if p.is_file())
    assert run_cli(capsys, "uidl", "show", "alice", "--mail-root", str(tree))[0] == 0
    assert sorted((p, p.read_bytes()) for p in tree.rglob("*") if p.is_file()) == before


def test_show_empty_and_errors(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tree / "carol").write_text("an mbox, say\n")
    assert run_cli(capsys, "uidl", "show", "bob", "--mail-root", str(tree)) == (
        0,
        "",
        f"bob: no messages in {tree / 'bob'}\n",
    )
    assert run_cli(capsys, "uidl", "show", "bob", "--mail-root", str(tree), "--json")[:2] == (0, "[]\n")
    for args, error in (
        (["../etc", "--mail-root", str(tree)], "'../etc' cannot be a user (and mailbox) name"),
        (["alice", "--mail-root", str(tmp_path / "none")], f"--mail-root {tmp_path / 'none'}: not a directory"),
        (["alice", "--mail-root", str(tree), "--dovecot-uidl-format", "%Q"], "--dovecot-uidl-format: "),
        (["carol", "--mail-root", str(tree)], f"{tree / 'carol'} is not a Maildir: it is a regular file"),
    ):
        code, out, err = run_cli(capsys, "uidl", "show", *args)
        assert code == 2 and out == "" and err.startswith(f"pop3d: error: {error}") and err.count("\n") == 1


# -- the document ---------------------------------------------------------------------------------


def section() -> str:
    text = DOC.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start : None if end < 0 else end]


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", section(), flags=re.S)


def doc_commands() -> list[str]:
    """Every command of the section's ``sh`` blocks, continuation lines joined."""
    commands = []
    for block in blocks("sh"):
        for line in re.sub(r"\\\n\s*", "", block).splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.strip())
    return commands


# The example of the document: what the old server has, and the Maildirs here.
OLD_MESSAGES = {
    "alice": [
        ("000000016523c1a0", "1699000001.M1P1.oldhost:2,S", b"From: bob@example.org\nSubject: hello\n\nHi Alice!\n"),
        ("000000026523c1a0", "1699000002.M2P1.oldhost:2,S", b"From: carol@example.org\nSubject: lunch\n\nNoon?\n"),
        ("000000036523c1a0", "1699000003.M3P1.oldhost:2,S", b"From: dave@example.org\nSubject: deleted here\n\n.\n"),
    ],
    "bob": [
        ("000000016523c1b7", "1699000004.M4P1.oldhost:2,S", b"From: alice@example.org\nSubject: twice\n\n2x\n"),
        ("000000026523c1b7", "1699000005.M5P1.oldhost:2,S", b"From: alice@example.org\nSubject: twice\n\n2x\n"),
    ],
}
NEW_FILES = {
    "alice": {
        "cur/1700000000.M1P2.mail:2,S": OLD_MESSAGES["alice"][0][2].replace(b"\n", b"\r\n"),
        "cur/1700000100.M3P4.mail:2,S": OLD_MESSAGES["alice"][1][2],
        "new/1700000200.M5P6.mail": b"From: erin@example.org\nSubject: after the copy\n\nNew.\n",
    },
    "bob": {"cur/1700000300.M7P8.mail:2,S": OLD_MESSAGES["bob"][0][2]},
}


@pytest.fixture
def doc_site(tmp_path: Path) -> Iterator[tuple[ServeProcess, Path, Path]]:
    """The old server (pop3d serving pinned UIDLs that look like Dovecot's), credentials, the new tree."""
    old, new = tmp_path / "old", tmp_path / "new"
    for user, messages in OLD_MESSAGES.items():
        box = maildir(old, user, {name: data for _, name, data in messages})
        uidl_pins.save(box, {name.partition(":")[0]: uid for uid, name, _ in messages})
    for user, files in NEW_FILES.items():
        for path, data in files.items():
            subdir, _, name = path.partition("/")
            maildir(new, user, {name: data}, subdir=subdir)
    users = tmp_path / "old-users"
    users.write_text("alice:{PLAIN}wonderland\nbob:{PLAIN}builder\n")
    creds = tmp_path / "old-server.txt"
    creds.write_text("alice:wonderland\nbob:{PLAIN}builder\n")
    creds.chmod(0o600)
    args = ["--listen", "127.0.0.1:0", "--users", str(users), "--mail-root", str(old), "--no-admin"]
    with ServeProcess(*args) as proc:
        yield proc.wait_ready(), creds, new


def pointed(command: str, proc: ServeProcess, creds: Path, new: Path) -> str:
    return (
        command.replace("pop.example.org", f"127.0.0.1:{proc.port}")
        .replace("/etc/pop3d/old-server.txt", shlex.quote(str(creds)))
        .replace("/var/lib/pop3d/mail", shlex.quote(str(new)))
    )


def test_the_section_documents_import_and_show() -> None:
    commands = doc_commands()
    assert commands and all(c.startswith(("pop3d uidl ", "chmod 600 ")) for c in commands), commands
    assert any("--dry-run" in c for c in commands)
    assert any(c.startswith("pop3d uidl import") and "--dry-run" not in c for c in commands)
    assert any(c.startswith("pop3d uidl show") for c in commands)


def test_documented_commands_work_as_printed(doc_site: tuple[ServeProcess, Path, Path]) -> None:
    """Runs the section's commands in order; each ``text`` block after a command is what it prints."""
    proc, creds, new = doc_site
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, **AS_ROOT, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    outputs = {}
    for command in doc_commands():
        result = subprocess.run(
            ["bash", "-c", pointed(command, proc, creds, new)], capture_output=True, text=True, timeout=60, env=env
        )
        assert result.returncode == 0, (command, result.stdout, result.stderr)
        outputs[command] = result.stdout
    # The outputs shown in the document are what the commands print.
    shown = [block for block in blocks("text") if block.startswith(("alice: ", "1  "))]
    assert shown
    printed = "\n".join(outputs.values())
    for block in shown:
        assert block in printed, (block, printed)
    alice = uidl_pins.load(new / "alice")
    assert alice == {"1700000000.M1P2.mail": "000000016523c1a0", "1700000100.M3P4.mail": "000000026523c1a0"}
    assert uidl_pins.load(new / "bob") == {}
