"""The installed package's boundary: where the admin API lives, and what the engine needs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

# Refuses every import that is not the standard library or pop3d itself, then
# imports the engine and drives one login through it.
_ENGINE_ONLY = textwrap.dedent(
    """
    import json
    import sys
    from importlib.abc import MetaPathFinder

    before = set(sys.modules)

    class StdlibOnly(MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            top = name.partition(".")[0]
            if top not in sys.stdlib_module_names and top != "pop3d":
                raise ImportError(f"engine imported {name}")
            return None

    sys.meta_path.insert(0, StdlibOnly())
    from pop3d import protocol, replies

    engine = protocol.POP3Connection(challenge="<1.2@example.org>")
    print(type(engine).__name__, replies.__name__)
    print(json.dumps(sorted(set(sys.modules) - before)))
    """
)


def test_engine_imports_only_the_standard_library() -> None:
    result = subprocess.run([sys.executable, "-c", _ENGINE_ONLY], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    first, modules = result.stdout.splitlines()
    assert first == "POP3Connection pop3d.replies"
    loaded = json.loads(modules)
    assert "pop3d.protocol" in loaded
    outside = [
        m for m in loaded if m.partition(".")[0] not in sys.stdlib_module_names and m.partition(".")[0] != "pop3d"
    ]
    assert outside == []
    assert "pop3d.server" not in loaded and "pop3d.admin" not in loaded


def test_admin_api_installs_inside_pop3d() -> None:
    code = (
        "import importlib.util, pop3d.admin\n"
        "print(pop3d.admin.create_app.__module__)\n"
        "print(importlib.util.find_spec('admin') is None)\n"
    )
    # Run from / so that the repository's own admin/ directory is not on sys.path.
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["pop3d.admin.app", "True"]


def test_public_names_resolve_lazily() -> None:
    import pop3d

    for name in pop3d.__all__:
        assert getattr(pop3d, name) is not None
    assert set(pop3d.__all__) <= set(dir(pop3d))
