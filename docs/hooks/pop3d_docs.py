"""MkDocs hook: the pages that are drawn from the code, so that they cannot drift from it.

A page asks for a generated part with a marker on a line of its own::

    <!-- generated: serve-settings -->

and :func:`on_page_markdown` replaces the marker with Markdown made from

- ``serve-settings``: :class:`pop3d.settings.ServeSettings`, with each
  setting's flag (:func:`pop3d.cli.setting_flags`), TOML key and ``POP3D_*``
  variable (:func:`pop3d.settings.toml_key`, :func:`~pop3d.settings.env_variable`);
- ``server-options``: :class:`pop3d.options.ServerOptions`;
- ``state-diagram`` and ``state-table``: :data:`pop3d.protocol.TRANSITIONS`
  and :func:`pop3d.protocol.commands_in`;
- ``admin-api``: the OpenAPI document of :func:`pop3d.admin.create_app`.

An unknown marker fails the build.  Links from a page to a file of the
repository outside ``docs/`` (``../examples/embed.py``) are pointed at a copy
of that file published with the site, under ``repo/``.

Nothing here touches the network.  The functions are plain, so the tests
call them too (``tests/test_docs_site.py``, ``tests/test_docs_commands.py``).
"""

from __future__ import annotations

import enum
import json
import re
import shlex
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"^<!-- generated: (?P<name>[a-z-]+) -->$", re.M)
# A link out of docs/ to a file of the repository: [text](../examples/embed.py).
OUTSIDE_LINK = re.compile(r"\]\(\.\./(?P<path>[A-Za-z0-9_./-]+)\)")
REPO_PREFIX = "repo/"
#: Where the curl examples of the admin API reference point.
ADMIN_URL = "http://127.0.0.1:8110"


# -- helpers ---------------------------------------------------------------


def _cell(text: object) -> str:
    """``text`` fit for a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _rst(text: str) -> str:
    """reST's ``literal`` in docstrings as Markdown's `literal`."""
    return re.sub(r"``(.+?)``", r"`\1`", text)


def _table(header: Iterable[str], rows: Iterable[Iterable[object]]) -> str:
    head = list(header)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _type_name(annotation: Any) -> str:
    """A reader's name for a setting's or option's type."""
    from pydantic import SecretStr

    from pop3d.settings import Address

    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        named = [_type_name(arg) for arg in args if arg is not type(None)]
        text = " or ".join(named)
        return f"{text} or none" if type(None) in args else text
    if origin is typing.Literal:
        return " or ".join(f"`{arg}`" for arg in args)
    if origin in (list, tuple):
        item = next((arg for arg in args if arg is not Ellipsis), str)
        return f"list of {_type_name(item)}"
    if annotation is Address:
        return "HOST:PORT"
    if annotation is SecretStr:
        return "secret text"
    if annotation is Path:
        return "path"
    if annotation is bool:
        return "boolean"
    if annotation is int:
        return "integer"
    if annotation is float:
        return "number"
    if annotation is str:
        return "text"
    name = getattr(annotation, "__name__", str(annotation))
    if "Network" in name:
        return "CIDR"
    return f"`{name}`"


def _limits(field: FieldInfo) -> str:
    """``0 to 65535``, ``at least 1``... from a field's constraints."""
    low = high = None
    for item in field.metadata:
        low = getattr(item, "ge", low)
        high = getattr(item, "le", high)
    if low is not None and high is not None:
        return f"{low} to {high}"
    if low is not None:
        return f"at least {low}"
    if high is not None:
        return f"at most {high}"
    return ""


# -- pop3d serve's settings and the server object's options ----------------


def serve_settings() -> str:
    """Every setting of ``pop3d serve``: flag, TOML key, variable, type, default, meaning."""
    from pop3d.cli import setting_flags
    from pop3d.settings import ServeSettings, env_variable, format_value, toml_key

    flags = setting_flags()
    rows = []
    for name, field in ServeSettings.model_fields.items():
        default = format_value(name, field.get_default(call_default_factory=True))
        flag = flags.get(name)
        rows.append(
            (
                f"`{flag}`" if flag else "(none)",
                f"`{toml_key(name)}`",
                f"`{env_variable(name)}`",
                _type_name(field.annotation) + (f" ({limits})" if (limits := _limits(field)) else ""),
                f"`{default}`" if default else "none",
                field.description or "",
            )
        )
    return _table(("flag", "TOML key", "variable", "type", "default", "meaning"), rows)


def _option_default(field: FieldInfo) -> str:
    factory = field.default_factory
    if factory is not None:
        # Named factories (socket.gethostname, PenaltyBox) are shown, not called:
        # the machine that builds the docs is not the one that runs pop3d.
        module = factory.__module__.lstrip("_")  # socket.gethostname lives in _socket
        return f"`{module}.{factory.__qualname__}()`"
    default = field.default
    if isinstance(default, enum.Enum):
        default = default.value
    if isinstance(default, tuple):
        return ", ".join(f"`{item}`" for item in default) if default else "none"
    return f"`{default!r}`"


def server_options() -> str:
    """Every option of a server object: name, type, default, meaning."""
    from pop3d.options import READ_ONLY, ServerOptions

    rows: list[tuple[object, ...]] = [
        (
            f"`{name}`",
            _type_name(field.annotation) + (f" ({limits})" if (limits := _limits(field)) else ""),
            _option_default(field),
            field.description or "",
        )
        for name, field in ServerOptions.model_fields.items()
    ]
    rows += [(f"`{name}`", "read-only", "", "Read with `cget`; never set.") for name in READ_ONLY]
    return _table(("option", "type", "default", "meaning"), rows)


# -- the session states -----------------------------------------------------


def _states() -> tuple[Mapping[Any, Any], Any, list[Any], list[Any]]:
    from pop3d.protocol import TRANSITIONS, State

    targets = set(TRANSITIONS.values())
    sources = {state for state, _ in TRANSITIONS}
    initial = [state for state in State if state in sources and state not in targets]
    final = [state for state in State if state in targets and state not in sources]
    return TRANSITIONS, State, initial, final


def state_diagram() -> str:
    """A Mermaid ``stateDiagram-v2`` of the engine's transition table, with each state's commands."""
    from pop3d.protocol import commands_in

    transitions, states, initial, final = _states()
    lines = ["```mermaid", "stateDiagram-v2"]
    lines += [f"    [*] --> {state.name}" for state in initial]
    for (source, trigger), target in transitions.items():
        lines.append(f"    {source.name} --> {target.name}: {trigger.value}")
    lines += [f"    {state.name} --> [*]" for state in final]
    for state in states:
        commands = commands_in(state)
        if commands:
            lines += [f"    note right of {state.name}", "        " + " ".join(commands), "    end note"]
    lines.append("```")
    return "\n".join(lines)


def state_table() -> str:
    """The same table as text: every move, then the commands of each state."""
    from pop3d.protocol import commands_in

    transitions, states, initial, final = _states()
    moves = _table(
        ("from", "on", "to"),
        ((f"`{source.name}`", trigger.value, f"`{target.name}`") for (source, trigger), target in transitions.items()),
    )
    commands = _table(
        ("state", "`conn_state` name", "commands accepted"),
        (
            (
                f"`{state.name}`" + (" (first)" if state in initial else "") + (" (last)" if state in final else ""),
                f"`{state.value}`",
                ", ".join(f"`{command}`" for command in commands_in(state)) or "none",
            )
            for state in states
        ),
    )
    return f"{moves}\n\n{commands}"


# -- the admin API ------------------------------------------------------------

#: Values for the path parameters of the curl examples: those of a default ``pop3d serve``.
EXAMPLE_PARAMETERS = {
    "name": "pop3",
    "option": "port",
    "conn_id": "conn1",
    "address": "198.51.100.7",
}
# The penalties of a user take a user name where the servers take a server name.
_USER_PATH = "/penalties/users/{name}"
_EXAMPLE_USER = "alice"


def openapi_document(token: str | None = "example-token") -> dict[str, Any]:
    """The admin API's OpenAPI document, as ``GET /openapi.json`` serves it (with a token: its security too)."""
    import trio
    from pop3d.admin import create_app

    app = create_app(token=token)
    document: dict[str, Any] = {}

    async def fetch() -> None:
        response = await app.test_client().get("/openapi.json")
        if response.status_code != 200:
            raise RuntimeError(f"GET /openapi.json: {response.status_code}")
        document.update(await response.get_json())

    trio.run(fetch)
    return document


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _schema_type(schema: Mapping[str, Any]) -> str:
    if "$ref" in schema:
        name = _ref_name(schema["$ref"])
        return f"[{name}](#schema-{name.lower()})"
    if "anyOf" in schema:
        kinds = [_schema_type(item) for item in schema["anyOf"]]
        return " or ".join("null" if kind == "null" else kind for kind in kinds)
    if "enum" in schema:
        return " or ".join(f"`{value}`" for value in schema["enum"])
    if "const" in schema:
        return f"`{schema['const']}`"
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {_schema_type(schema.get('items', {}))}"
    if kind == "object" and schema.get("title"):
        name = str(schema["title"])
        return f"[{name}](#schema-{name.lower()})"
    return str(kind)


def _constraints(schema: Mapping[str, Any]) -> str:
    words = []
    for key, text in (("minimum", "at least"), ("maximum", "at most"), ("maxLength", "length at most")):
        if key in schema:
            words.append(f"{text} {schema[key]}")
    for item in schema.get("anyOf", ()):
        words += [_constraints(item)] if _constraints(item) else []
    return ", ".join(words)


def curl_example(method: str, path: str, operation: Mapping[str, Any], *, secured: bool) -> str:
    """A curl command line for one operation of the document, as the guide writes them."""
    filled = path
    for name, value in EXAMPLE_PARAMETERS.items():
        if path == _USER_PATH and name == "name":
            value = _EXAMPLE_USER
        filled = filled.replace("{" + name + "}", value)
    words = ["curl", "-s"]
    if method != "get":
        words += ["-X", method.upper()]
    body = operation.get("requestBody")
    if body is not None:
        words += ["-H", "Content-Type: application/json"]
    header = '-H "Authorization: Bearer $POP3D_ADMIN_TOKEN"' if secured else ""
    data = ""
    if body is not None:
        data = "-d " + shlex.quote(json.dumps(_example_body(body)))
    parts = [shlex.join(words), header, data, ADMIN_URL + filled]
    return " ".join(part for part in parts if part)


def _example_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """A small body the schema accepts: its first boolean or number property at its lowest value."""
    schema = body["content"]["application/json"]["schema"]
    for name, prop in schema.get("properties", {}).items():
        kind = prop.get("type")
        if kind == "boolean":
            return {name: False}
        if kind in ("integer", "number") and "minimum" in prop and "maximum" in prop:
            return {name: prop["maximum"]}
    return {}


def _operations(document: Mapping[str, Any]) -> list[tuple[str, str, str, dict[str, Any]]]:
    """``(tag, method, path, operation)`` in the document's tag order, then path order."""
    tags = [tag["name"] for tag in document.get("tags", [])]
    found = []
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            tag = (operation.get("tags") or ["other"])[0]
            found.append((tag, method, path, operation))
    order = {tag: index for index, tag in enumerate(tags)}
    methods = ("get", "post", "patch", "put", "delete")
    found.sort(key=lambda item: (order.get(item[0], len(order)), item[0], item[2], methods.index(item[1])))
    return found


def _collect_schemas(document: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every named object schema: the components, and titled ones written inline."""
    schemas: dict[str, dict[str, Any]] = dict(document.get("components", {}).get("schemas", {}))

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and node.get("title") and "properties" in node:
                schemas.setdefault(str(node["title"]), node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document["paths"])
    return dict(sorted(schemas.items()))


def _properties_table(schema: Mapping[str, Any]) -> str:
    required = set(schema.get("required", ()))
    rows = [
        (
            f"`{name}`",
            _schema_type(prop),
            "yes" if name in required else "no",
            "; ".join(part for part in (_rst(prop.get("description", "")), _constraints(prop)) if part),
        )
        for name, prop in schema.get("properties", {}).items()
    ]
    if not rows:
        return "Any JSON object." if schema.get("additionalProperties") else "No fields."
    return _table(("field", "type", "required", "meaning"), rows)


def admin_api(document: Mapping[str, Any] | None = None) -> str:
    """One section per operation of the admin API's OpenAPI document, then its schemas."""
    document = document or openapi_document()
    secured_by_default = bool(document.get("security"))
    out: list[str] = []
    current_tag = None
    for tag, method, path, operation in _operations(document):
        if tag != current_tag:
            out.append(f"## {tag.capitalize()}\n")
            current_tag = tag
        out.append(f"### `{method.upper()} {path}`\n")
        text = " ".join(_rst(part) for part in (operation.get("summary", ""), operation.get("description", "")))
        if text.strip():
            out.append(" ".join(text.split()) + "\n")
        secured = bool(operation.get("security", document.get("security")))
        if secured_by_default and not secured:
            out.append("Open without a token.\n")
        parameters = operation.get("parameters", [])
        if parameters:
            rows = [
                (
                    f"`{item['name']}`",
                    item["in"],
                    "yes" if item.get("required") else "no",
                    _schema_type(item.get("schema", {})),
                    "" if item.get("schema", {}).get("default") is None else f"`{item['schema']['default']}`",
                    _rst(item.get("description", "")),
                )
                for item in parameters
            ]
            out.append("**Parameters**\n\n" + _table(("name", "in", "required", "type", "default", "meaning"), rows))
            out.append("")
        body = operation.get("requestBody")
        if body is not None:
            kinds = ", ".join(f"`{kind}`" for kind in body.get("content", {}))
            need = "required" if body.get("required") else "optional"
            schema = body.get("content", {}).get("application/json", {}).get("schema", {})
            out.append(f"**Request body** ({need}, {kinds}): {_rst(schema.get('description', ''))}\n")
            out.append(_properties_table(schema) + "\n")
        statuses: list[tuple[str, str, str]] = []
        for status, response in operation.get("responses", {}).items():
            content = response.get("content", {})
            bodies = "; ".join(f"`{kind}`: {_schema_type(item.get('schema', {}))}" for kind, item in content.items())
            statuses.append((f"`{status}`", _rst(response.get("description", "")), bodies or "no body"))
        out.append("**Responses**\n\n" + _table(("status", "meaning", "body"), statuses) + "\n")
        out.append("```sh\n" + curl_example(method, path, operation, secured=secured) + "\n```\n")
    out.append("## Schemas\n")
    for name, schema in _collect_schemas(document).items():
        out.append(f"### {name} {{: #schema-{name.lower()} }}\n")
        if schema.get("description"):
            out.append(" ".join(_rst(schema["description"]).split()) + "\n")
        out.append(_properties_table(schema) + "\n")
    return "\n".join(out)


# -- MkDocs -------------------------------------------------------------------

GENERATORS: dict[str, Callable[[], str]] = {
    "serve-settings": serve_settings,
    "server-options": server_options,
    "state-diagram": state_diagram,
    "state-table": state_table,
    "admin-api": admin_api,
}


def expand(markdown: str) -> str:
    """``markdown`` with every marker replaced; ``KeyError`` names an unknown one."""

    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in GENERATORS:
            raise KeyError(f"unknown generated part {name!r}; known: {', '.join(GENERATORS)}")
        return GENERATORS[name]()

    return MARKER.sub(replace, markdown)


def outside_links(markdown: str) -> list[str]:
    """Repository files (outside ``docs/``) that ``markdown`` links to."""
    return [match["path"] for match in OUTSIDE_LINK.finditer(markdown) if (ROOT / match["path"]).is_file()]


def on_files(files: Any, config: Any) -> Any:
    """Publish the repository files that pages link to, under ``repo/``."""
    from mkdocs.structure.files import File

    wanted: set[str] = set()
    for file in files.documentation_pages():
        wanted.update(outside_links(Path(file.abs_src_path).read_text(encoding="utf-8")))
    for path in sorted(wanted):
        files.append(File.generated(config, REPO_PREFIX + path, abs_src_path=str(ROOT / path)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Expand the markers of a page and point its links out of ``docs/`` at the published copies."""
    markdown = expand(markdown)
    return OUTSIDE_LINK.sub(
        lambda match: f"]({REPO_PREFIX}{match['path']})" if (ROOT / match["path"]).is_file() else match.group(),
        markdown,
    )


__all__ = [
    "GENERATORS",
    "admin_api",
    "curl_example",
    "expand",
    "on_files",
    "on_page_markdown",
    "openapi_document",
    "serve_settings",
    "server_options",
    "state_diagram",
    "state_table",
]
