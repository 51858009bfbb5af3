"""The documentation site builds with ``mkdocs build --strict``, and its generated pages tell the truth.

The build runs offline (no plugin fetches anything) into a temporary
directory.  The generated parts (docs/hooks/pop3d_docs.py) are checked
against the code they are drawn from: every setting, option, operation,
status and state move appears.
"""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from pop3d.cli import setting_flags
from pop3d.options import ServerOptions
from pop3d.protocol import TRANSITIONS, State, commands_in
from pop3d.settings import ServeSettings, env_variable, toml_key

ROOT = Path(__file__).resolve().parent.parent
HOOK = ROOT / "docs" / "hooks" / "pop3d_docs.py"
pytest.importorskip("mkdocs", reason="mkdocs-material is in the test extra")


def _load_hook() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("pop3d_docs", HOOK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


hook = _load_hook()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "WARNING" not in result.stderr, result.stderr[-4000:]
    return out


def page(site: Path, name: str) -> str:
    """The text of a built page's article (no navigation), tags stripped and entities undone."""
    raw = (site / name / "index.html").read_text() if name else (site / "index.html").read_text()
    article = re.search(r"<article.*?</article>", raw, flags=re.S)
    assert article, name
    return html.unescape(re.sub(r"<[^>]+>", "", article[0]))


def test_every_page_of_the_nav_is_built(site: Path) -> None:
    nav = re.findall(r":\s*([\w-]+)\.md\s*$", (ROOT / "mkdocs.yml").read_text(), flags=re.M)
    assert {"index", "library", "configuration", "api-reference", "states", "operations", "deployment"} <= set(nav)
    for name in nav:
        built = site / ("index.html" if name == "index" else f"{name}/index.html")
        assert built.is_file(), name
    home = page(site, "")
    assert "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/pop3d serve" in home
    assert "curl pop3://demo:demo@127.0.0.1:1110/1" in home


def test_configuration_reference_has_every_setting_and_option(site: Path) -> None:
    text = page(site, "configuration")
    flags = setting_flags()
    for name, field in ServeSettings.model_fields.items():
        assert env_variable(name) in text and toml_key(name) in text, name
        if name in flags:
            assert flags[name] in text
        assert field.description and " ".join(field.description.split()) in text, name
    assert "POP3D_MAIL_ROOT" in text and "--mail-root" in text
    for name, field in ServerOptions.model_fields.items():
        assert f"{name}" in text and field.description, name
        assert " ".join(field.description.split()) in text
    # Defaults drawn from the code, never from the machine that built the site.
    assert "socket.gethostname()" in text


def test_hand_written_option_table_names_every_option() -> None:
    embedding = (ROOT / "docs" / "embedding.md").read_text()
    for name in ServerOptions.model_fields:
        assert f"`{name}`" in embedding, name


def test_admin_reference_has_every_operation_and_status(site: Path) -> None:
    text = page(site, "api-reference")
    document = hook.openapi_document()
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            section = text.split(f"{method.upper()} {path}¶", 1)  # the heading, with its permalink
            assert len(section) == 2, (method, path)
            body = section[1][:6000]
            for status in operation["responses"]:
                assert status in body, (method, path, status)
            for parameter in operation.get("parameters", []):
                assert parameter["name"] in body
            assert "curl -s" in body
    assert "PATCH" in text and "Request body" in text


def test_state_diagram_and_table_come_from_the_transition_table(site: Path) -> None:
    raw = (site / "states" / "index.html").read_text()
    diagram = html.unescape(re.search(r'<pre class="mermaid"><code>(.*?)</code></pre>', raw, flags=re.S)[1])  # type: ignore[index]
    assert diagram.startswith("stateDiagram-v2")
    for (source, trigger), target in TRANSITIONS.items():
        assert f"{source.name} --> {target.name}: {trigger.value}" in diagram
    text = page(site, "states")
    for state in State:
        assert all(command in text for command in commands_in(state))
    assert "[*] --> AUTHORIZATION" in diagram and "CLOSED --> [*]" in diagram


def test_tls_page_quotes_the_reload_log_lines_pop3d_writes() -> None:
    # The wording of the SIGHUP lines, as pop3d/serve.py and pop3d/server.py log them.
    serve = (ROOT / "pop3d" / "serve.py").read_text()
    server = (ROOT / "pop3d" / "server.py").read_text()
    assert '"got SIGHUP: reloading %s"' in serve and "the settings and the TLS certificate" in serve
    assert '"reload: nothing changed"' in serve
    assert '"server %s loaded the certificate %s"' in server
    tls = (ROOT / "docs" / "tls.md").read_text()
    assert "INFO pop3d: got SIGHUP: reloading the settings and the TLS certificate" in tls
    assert "INFO pop3d.server: server pop3 loaded the certificate /etc/pop3d/tls/fullchain.pem" in tls


def test_links_out_of_docs_are_published(site: Path) -> None:
    assert (site / "repo" / "examples" / "sqlite_backend.py").read_bytes() == (
        ROOT / "examples" / "sqlite_backend.py"
    ).read_bytes()
    assert 'href="../repo/examples/sqlite_backend.py"' in (site / "library" / "index.html").read_text()


def test_an_unknown_marker_fails_the_build() -> None:
    with pytest.raises(KeyError, match="no-such-part"):
        hook.expand("<!-- generated: no-such-part -->\n")
