"""The OpenAPI document tells the truth, and /docs needs nothing from off this host.

Every test runs the admin API with Hypercorn on 127.0.0.1, port 0
(:func:`admin.serve_admin`), and talks HTTP to it with urllib from a
worker thread.  The document is walked for what each operation declares;
then the live API is made to answer each of those statuses (an unknown
server, a busy port, a malformed body, a bad query, an empty 204) and every
answer is checked against what the document lists for its operation.
"""

from __future__ import annotations

import functools
import json
import re
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import trio
from pop3d.admin import create_app, serve_admin

import pop3d

TOKEN = "openapi-token-77b0"


@dataclass
class Answer:
    """One HTTP response."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def fetch(url: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None) -> Answer:
    """One request with urllib; error statuses are answers too."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return Answer(response.status, {k.lower(): v for k, v in response.headers.items()}, response.read())
    except urllib.error.HTTPError as error:
        return Answer(error.code, {k.lower(): v for k, v in error.headers.items()}, error.read())


class Api:
    """A live admin API: ``await api.call(...)`` runs a request off the Trio loop."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url = url
        self.token = token

    async def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        auth: bool = True,
    ) -> Answer:
        headers = dict(headers or {})
        if auth and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return await trio.to_thread.run_sync(functools.partial(fetch, self.url + path, method, body, headers))

    async def spec(self) -> dict[str, Any]:
        answer = await self.call("GET", "/openapi.json", auth=False)
        assert answer.status == 200
        spec: dict[str, Any] = answer.json()
        return spec


Serve = Callable[..., Awaitable[Api]]


@pytest.fixture
async def serve(nursery: trio.Nursery) -> AsyncIterator[Serve]:
    """Starts admin APIs with Hypercorn on 127.0.0.1:0; stops them after the test."""
    stops: list[trio.Event] = []

    async def start(token: str | None = None) -> Api:
        stop = trio.Event()
        stops.append(stop)
        app = create_app(token=token)
        url = await nursery.start(functools.partial(serve_admin, app, "127.0.0.1:0", shutdown_trigger=stop.wait))
        return Api(url, token)

    yield start
    for stop in stops:
        stop.set()


@pytest.fixture
def server(listening_server: pop3d.Server) -> pop3d.Server:
    """A running, listening POP3 server with a unique name."""
    return listening_server


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(METHOD, path, operation) for every operation of the document."""
    return [(method.upper(), path, op) for path, item in spec["paths"].items() for method, op in item.items()]


def operation_for(spec: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    """The operation whose path template matches the concrete ``path``."""
    path = path.split("?")[0]
    matches = []
    for template, item in spec["paths"].items():
        pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
        if method.lower() in item and re.match(pattern, path):
            matches.append((template.count("{"), item[method.lower()]))
    assert matches, f"{method} {path} is not in the document"
    operation: dict[str, Any] = min(matches, key=lambda match: match[0])[1]  # the most literal template wins
    return operation


def assert_declared(spec: dict[str, Any], method: str, path: str, answer: Answer) -> None:
    """``answer`` is a response the document lists for its operation, with a declared body."""
    responses = operation_for(spec, method, path)["responses"]
    assert str(answer.status) in responses, f"{method} {path} answered {answer.status}; declared: {sorted(responses)}"
    declared = responses[str(answer.status)]
    if "content" not in declared:
        assert answer.body == b"", f"{method} {path} {answer.status} declares no body"
        return
    media = answer.headers.get("content-type", "").split(";")[0].strip()
    assert media in declared["content"], (method, path, answer.status, media, list(declared["content"]))
    if media == "application/json" and answer.status >= 400:
        assert declared["content"][media]["schema"] == {"$ref": "#/components/schemas/Error"}
        body = answer.json()
        assert set(body) <= {"error", "detail", "fields"} and body["error"] and body["detail"]


# -- the document -------------------------------------------------------------


async def test_every_operation_declares_what_it_can_answer(serve: Serve) -> None:
    spec = await (await serve()).spec()
    error = spec["components"]["schemas"]["Error"]
    assert set(error["required"]) == {"error", "detail"}
    assert "FieldError" in spec["components"]["schemas"]
    ops = operations(spec)
    assert len(ops) == 20
    for method, path, op in ops:
        responses = op["responses"]
        where = f"{method} {path}: {sorted(responses)}"
        assert "500" in responses, where
        assert "401" not in responses, where  # no token, no 401
        if path.startswith("/servers/{name}"):
            assert "404" in responses, where
        if any(parameter["in"] == "query" for parameter in op["parameters"]) or "requestBody" in op:
            assert "422" in responses, where
        if "requestBody" in op:
            assert "400" in responses, where
        for status, response in responses.items():
            assert response["description"], where
            if int(status) >= 400 and status != "503":
                assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    paths = spec["paths"]
    assert "409" in paths["/servers/{name}/up"]["post"]["responses"]
    assert "409" in paths["/servers/{name}/config"]["patch"]["responses"]
    kick = paths["/servers/{name}/connections/{conn_id}"]["delete"]["responses"]
    assert {"202", "204"} <= set(kick) and "content" not in kick["204"]
    for path in ("/penalties/{address}", "/penalties/users/{name}"):
        assert {"204", "404"} <= set(paths[path]["delete"]["responses"])
    assert {"200", "202"} <= set(paths["/servers/{name}"]["delete"]["responses"])
    metrics = paths["/metrics"]["get"]["responses"]["200"]["content"]
    assert {"text/plain", "application/openmetrics-text"} <= set(metrics)
    assert paths["/servers/{name}/config"]["patch"]["requestBody"]["required"] is True
    # An event stream is described event by event, as OpenAPI 3.1 does it.
    events = paths["/events"]["get"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    assert events["type"] == "object" and events["required"] == ["data"]


async def test_the_patch_body_says_what_the_api_takes(serve: Serve) -> None:
    spec = await (await serve()).spec()
    patch = spec["paths"]["/servers/{name}/config"]["patch"]["requestBody"]["content"]["application/json"]["schema"]
    fields = patch["properties"]
    assert patch["additionalProperties"] is False
    # A network is one address or CIDR per item, or "none"; real examples for those who generate them.
    networks = fields["cleartext_auth_from"]["anyOf"]
    assert networks[1] == {"type": "string", "const": "none"}
    assert "10.0.0.0/8" in networks[0]["items"]["examples"]
    assert all(re.match(networks[0]["items"]["pattern"], example) for example in networks[0]["items"]["examples"])
    host = fields["host"]["anyOf"]
    assert {"type": "string", "format": "ipv6"} in host and {"type": "null"} in host
    assert fields["max_line"]["type"] == "integer"


async def test_with_a_token_the_document_declares_401_and_bearer(serve: Serve) -> None:
    spec = await (await serve(TOKEN)).spec()
    assert spec["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert spec["security"] == [{"bearer": []}]
    for method, path, op in operations(spec):
        if path == "/healthz":
            assert op["security"] == [] and "401" not in op["responses"]
        else:
            assert "401" in op["responses"], f"{method} {path}"
            assert "WWW-Authenticate" in op["responses"]["401"]["headers"]


# -- the live API answers only what the document lists ----------------------------


async def test_live_answers_are_declared(serve: Serve, server: pop3d.Server) -> None:
    api = await serve(TOKEN)
    spec = await api.spec()
    name = server.name
    json_type = {"Content-Type": "application/json"}
    requests: list[tuple[str, str, bytes | None, dict[str, str], int]] = [
        ("GET", "/servers", None, {}, 200),
        ("GET", f"/servers/{name}/config/nope", None, {}, 404),
        ("PATCH", f"/servers/{name}/config", b"{not json", json_type, 400),
        ("PATCH", f"/servers/{name}/config", b'{"max_line": 1}', json_type, 422),
        ("PATCH", f"/servers/{name}/config", b"[1]", json_type, 422),
        ("DELETE", f"/servers/{name}/connections/conn999?reason=a%0Ab", None, {}, 422),
        ("DELETE", f"/servers/{name}/connections/conn999", None, {}, 404),
        ("DELETE", f"/servers/{name}?mode=later", None, {}, 422),
        ("DELETE", "/penalties/198.51.100.1", None, {}, 404),
        ("GET", "/metrics", None, {}, 200),
        ("GET", "/metrics", None, {"Accept": "application/openmetrics-text; version=1.0.0"}, 200),
        ("GET", "/readyz", None, {}, 200),
        ("GET", "/healthz", None, {}, 200),
    ]
    # Every operation on a server that does not exist is a declared 404.
    for method, path, op in operations(spec):
        if path.startswith("/servers/{name}"):
            concrete = (
                path.replace("{name}", "no-such-server").replace("{conn_id}", "conn1").replace("{option}", "port")
            )
            body = b"{}" if "requestBody" in op else None
            requests.append((method, concrete, body, json_type if body else {}, 404))
    for method, path, body, headers, status in requests:
        answer = await api.call(method, path, body, headers)
        assert answer.status == status, (method, path, answer.status, answer.body[:200])
        assert_declared(spec, method, path, answer)
    # Without the token, a declared 401.
    answer = await api.call("GET", "/servers", auth=False)
    assert answer.status == 401
    assert_declared(spec, "GET", "/servers", answer)


async def test_up_on_a_busy_port_is_a_declared_409(serve: Serve, server: pop3d.Server) -> None:
    api = await serve()
    spec = await api.spec()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        await server.down()
        server.configure(port=busy.getsockname()[1])
        answer = await api.call("POST", f"/servers/{server.name}/up")
    assert answer.status == 409
    assert "cannot listen" in answer.json()["detail"]
    assert_declared(spec, "POST", f"/servers/{server.name}/up", answer)


async def test_clearing_a_penalty_is_a_declared_204(serve: Serve, server: pop3d.Server) -> None:
    api = await serve()
    spec = await api.spec()
    server.cget("penalties").failed("192.0.2.9", "mallory")
    for path in ("/penalties/192.0.2.9", "/penalties/users/mallory"):
        answer = await api.call("DELETE", path)
        assert answer.status == 204 and answer.body == b""
        assert_declared(spec, "DELETE", path, answer)


async def test_down_and_destroy_answers_are_declared(serve: Serve, server: pop3d.Server) -> None:
    api = await serve()
    spec = await api.spec()
    for method, path, status in (
        ("POST", f"/servers/{server.name}/down", 200),
        ("POST", f"/servers/{server.name}/up", 200),
        ("DELETE", f"/servers/{server.name}?mode=defer", 200),  # no connection: gone at once
    ):
        answer = await api.call(method, path)
        assert answer.status == status, answer.body
        assert_declared(spec, method, path, answer)


async def read_response(stream: trio.SocketStream) -> bytes:
    """One whole HTTP/1.1 response with a Content-Length body, read off ``stream``."""
    data = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some()
        head, _, rest = data.partition(b"\r\n\r\n")
        match = re.search(rb"(?im)^content-length: *(\d+)", head)
        assert match, head
        length = int(match[1])
        while len(rest) < length:
            rest += await stream.receive_some()
    return head + b"\r\n\r\n" + rest


async def test_an_answer_before_the_body_leaves_the_connection_usable(serve: Serve, server: pop3d.Server) -> None:
    # Schemathesis found this: a 401 or a 405 sent before the request body had come in left
    # the keep-alive connection hanging, so the client's next request got no answer.
    api = await serve(TOKEN)
    host, port = api.url.removeprefix("http://").split(":")
    body = b'{"apop": false}'
    for method, path, auth in (
        ("PATCH", f"/servers/{server.name}/config", False),  # the token check: 401
        ("PUT", "/servers", True),  # no such method: 405
    ):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            head += f"Content-Length: {len(body)}\r\n"
            if auth:
                head += f"Authorization: Bearer {TOKEN}\r\n"
            await stream.send_all(head.encode() + b"\r\n")
            await trio.sleep(0.2)  # the app decides on the head alone meanwhile
            await stream.send_all(body)
            first = await read_response(stream)
            assert first.startswith((b"HTTP/1.1 401", b"HTTP/1.1 405")), first
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            second = await read_response(stream)
            assert second.startswith(b"HTTP/1.1 200"), second


# -- PATCH without a body ------------------------------------------------------------


async def test_patch_without_a_body_is_refused_as_the_document_says(serve: Serve, server: pop3d.Server) -> None:
    api = await serve()
    spec = await api.spec()
    path = f"/servers/{server.name}/config"
    assert spec["paths"]["/servers/{name}/config"]["patch"]["requestBody"]["required"] is True
    before = server.configure()
    for headers in ({}, {"Content-Type": "application/json"}):
        answer = await api.call("PATCH", path, None, headers)
        assert answer.status in (400, 422), answer.body
        assert_declared(spec, "PATCH", path, answer)
    answer = await api.call("PATCH", path)
    assert answer.status == 422
    assert answer.json()["fields"][0]["field"] == "body"
    assert server.configure() == before
    # {} is the way to change nothing: 200 and the whole configuration.
    answer = await api.call("PATCH", path, b"{}", {"Content-Type": "application/json"})
    assert answer.status == 200
    assert answer.json()["port"] == server.cget("port")
    assert server.configure() == before


# -- the page and the document are open; the rest is not --------------------------


async def test_docs_page_assets_and_document_are_open_without_the_token(serve: Serve) -> None:
    api = await serve(TOKEN)
    page = await api.call("GET", "/docs", auth=False)
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    html = page.body.decode()
    assert "SwaggerUIBundle" in html
    # Nothing on the page comes from elsewhere: every src and href is a path on this host.
    links = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert links and all(link.startswith("/docs/static/") for link in links), links
    assert "http://" not in html and "https://" not in html
    for link in links:
        asset = await api.call("GET", link, auth=False)
        assert asset.status == 200 and len(asset.body) > 100, link
        etag = asset.headers["etag"]
        again = await api.call("GET", link, headers={"If-None-Match": etag}, auth=False)
        assert again.status == 304
    script = await api.call("GET", "/docs/static/swagger-ui-bundle.js", auth=False)
    assert script.headers["content-type"].split(";")[0] in ("text/javascript", "application/javascript")
    assert (
        (await api.call("GET", "/docs/static/swagger-ui.css", auth=False))
        .headers["content-type"]
        .startswith("text/css")
    )
    # Only the page's own files are served, whatever else the package holds.
    for name in ("swagger-editor.js", "index.html", "swagger-ui.css.map"):
        assert (await api.call("GET", f"/docs/static/{name}", auth=False)).status == 404
    # A path out of the folder is no asset at all: an unknown path, so the token is asked for.
    assert (await api.call("GET", "/docs/static/..%2F__init__.py", auth=False)).status == 401
    assert (await api.call("GET", "/openapi.json", auth=False)).status == 200
    # The API itself still wants the token.
    for path in ("/servers", "/metrics", "/readyz", "/docs/nope", "/openapi.yaml"):
        assert (await api.call("GET", path, auth=False)).status == 401, path
