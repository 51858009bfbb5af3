"""The embedding example of the README and docs runs as printed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "embed.py"


def test_embed_example_runs() -> None:
    result = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "LIST: [b'1 29', b'2 31']"
    assert lines[1] == "RETR 1: [b'Subject: hello', b'', b'Hi Alice!']"
    assert lines[2] == "left in the mailbox: [b'Subject: again\\n\\nStill here.\\n']"
