"""``python -m pop3d``: the same as the ``pop3d`` command."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
