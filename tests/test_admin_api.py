"""The admin HTTP API, over real server objects and real POP3 sessions.

Rules here: every server is made by the ``make_server`` fixture with a
unique name, binds 127.0.0.1 on port 0, and is destroyed after the test
(``pop3d.servers()`` is process-wide, so no test assumes it is alone).
Requests go through Quart's test client inside the app's lifespan, except
one test that runs Hypercorn and curl.  Every wait is bounded.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import shutil
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import trio
from pop3d.admin import AdminAccessError, check_bind, create_app, not_listening, serve_admin
from prometheus_client.parser import text_string_to_metric_families
from quart.typing import TestClientProtocol as Client  # not Test*: pytest would collect it

import pop3d

from .certs import Certs
from .popclient import PopClient

MESSAGES = [b"Subject: one\n\nfirst\n", b"Subject: two\n\nsecond\n"]
PASSWORD = "wonderland-secret"
TOKEN = "s3cret-admin-token"

MakeServer = Callable[..., Awaitable[pop3d.Server]]


async def wait_until(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(5):
        while not predicate():  # noqa: ASYNC110 (what we wait for has no event)
            await trio.sleep(0.005)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DescribedUsers(pop3d.MemoryUsers):
    """Users whose description is chosen by the test (as passwd-file:... would be)."""

    def describe(self) -> str:
        return "test-users:/nowhere"


@pytest.fixture
def users() -> pop3d.MemoryUsers:
    return DescribedUsers({"alice": (PASSWORD, "alice")})


@pytest.fixture
def storage() -> pop3d.MemoryStorage:
    return pop3d.MemoryStorage({"alice": MESSAGES})


@pytest.fixture
async def make_server(
    nursery: trio.Nursery, users: pop3d.MemoryUsers, storage: pop3d.MemoryStorage
) -> AsyncIterator[MakeServer]:
    """Makes running, listening servers with unique names; destroys them afterwards."""
    made: list[pop3d.Server] = []

    async def make(*, run: bool = True, up: bool = True) -> pop3d.Server:
        server = pop3d.new(f"admin-test-{uuid.uuid4().hex[:8]}")
        made.append(server)
        server.configure(host="127.0.0.1", port=0, hostname="test.example", auth=users, storage=storage)
        if run:
            await nursery.start(server.run)
            if up:
                await server.up()
        return server

    yield make
    with trio.fail_after(5):
        for server in made:
            await server.destroy("kill")


@pytest.fixture
async def server(make_server: MakeServer) -> pop3d.Server:
    return await make_server()


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    """A test client of an app without a token, inside the app's lifespan."""
    async with create_app().test_app() as test_app:
        yield test_app.test_client()


@pytest.fixture
async def locked_client() -> AsyncIterator[Client]:
    """A test client of an app that requires ``TOKEN``."""
    async with create_app(token=TOKEN).test_app() as test_app:
        yield test_app.test_client()


async def pop_connect(server: pop3d.Server) -> PopClient:
    """A real POP3 client over loopback, greeting read."""
    stream = await trio.open_tcp_stream("127.0.0.1", server.cget("port"))
    pop = PopClient(stream)
    assert (await pop.read_line()).startswith(b"+OK")
    return pop


async def get_json(client: Client, path: str, status: int = 200, **kwargs: Any) -> Any:
    response = await client.get(path, **kwargs)
    assert response.status_code == status, await response.get_data(as_text=True)
    return await response.get_json()


async def assert_error(response: Any, status: int, error: str) -> dict[str, Any]:
    """The response is a JSON error body with ``status``."""
    assert response.status_code == status, await response.get_data(as_text=True)
    assert response.content_type == "application/json"
    body: dict[str, Any] = await response.get_json()
    assert body["error"] == error
    assert isinstance(body["detail"], str) and body["detail"]
    return body


def fields_of(body: dict[str, Any]) -> dict[str, str]:
    return {item["field"]: item["message"] for item in body["fields"]}


# -- servers ----------------------------------------------------------------


async def test_list_servers(client: Client, make_server: MakeServer) -> None:
    up = await make_server()
    down = await make_server(up=False)
    body = await get_json(client, "/servers")
    by_name = {entry["name"]: entry for entry in body["servers"]}
    assert by_name[up.name] == {
        "name": up.name,
        "state": "up",
        "port": up.cget("port"),
        "configured_port": 0,
        "host": "127.0.0.1",
        "addresses": [f"127.0.0.1:{up.cget('port')}"],
        "connections": 0,
    }
    assert up.cget("port") != 0
    assert by_name[down.name]["state"] == "down"
    assert by_name[down.name]["addresses"] == []
    assert await get_json(client, f"/servers/{up.name}") == by_name[up.name]


async def test_unknown_server_route_and_method(client: Client) -> None:
    for path in ("/servers/nope", "/servers/nope/config", "/servers/nope/connections", "/servers/nope/config/port"):
        await assert_error(await client.get(path), 404, "not_found")
    await assert_error(await client.post("/servers/nope/up"), 404, "not_found")
    await assert_error(await client.delete("/servers/nope"), 404, "not_found")
    await assert_error(await client.get("/no/such/route"), 404, "not_found")
    response = await client.put("/servers")
    await assert_error(response, 405, "method_not_allowed")
    assert "GET" in response.headers["Allow"]


async def test_unexpected_error_is_json_500(
    client: Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> dict[str, pop3d.Server]:
        raise RuntimeError("boom")

    monkeypatch.setattr(pop3d, "servers", broken)
    with caplog.at_level(logging.ERROR, logger="pop3d.admin"):
        body = await assert_error(await client.get("/servers"), 500, "internal_error")
    assert "boom" not in body["detail"]  # the log has it, not the client
    assert "boom" in caplog.text


# -- options ----------------------------------------------------------------


async def test_get_config_describes_callbacks_without_secrets(client: Client, server: pop3d.Server) -> None:
    response = await client.get(f"/servers/{server.name}/config")
    text = await response.get_data(as_text=True)
    assert response.status_code == 200
    assert PASSWORD not in text
    config = json.loads(text)
    assert config == {
        "port": server.cget("port"),
        "host": "127.0.0.1",
        "auth": "test-users:/nowhere",  # describe() when there is one
        "storage": "memory-storage:1",  # else repr()
        "hostname": "test.example",
        "idle_timeout": 600.0,
        "max_line": 1024,
        "apop": True,
        "login_failure_delay": 1.0,
        "max_connections": 1000,
        "max_connections_per_ip": 300,
        "max_auth_failures": 3,
        "tls_cert": None,
        "tls_key": None,
        "ssl_context": None,
        "implicit_tls": False,
        "cleartext_auth_from": ["127.0.0.0/8", "::1/128"],
        "max_userip_connections": 10,
        "max_logins_per_ip": 3,
        "login_timeout": 60.0,
        "penalties": "penalties: up to 15 s, 0 entries",
        "proxy_protocol_from": [],
        "state": "up",
    }


async def test_get_config_null_callbacks(client: Client, server: pop3d.Server) -> None:
    server.configure(auth=None, storage=None)
    config = await get_json(client, f"/servers/{server.name}/config")
    assert config["auth"] is None and config["storage"] is None


async def test_patch_config(client: Client, server: pop3d.Server) -> None:
    response = await client.patch(
        f"/servers/{server.name}/config", json={"idle_timeout": 30, "max_auth_failures": 5, "hostname": "mail.test"}
    )
    assert response.status_code == 200
    config = await response.get_json()
    assert (config["idle_timeout"], config["max_auth_failures"], config["hostname"]) == (30.0, 5, "mail.test")
    assert server.cget("idle_timeout") == 30.0
    assert server.cget("max_auth_failures") == 5
    # An empty patch changes nothing and still answers the configuration.
    response = await client.patch(f"/servers/{server.name}/config", json={})
    assert response.status_code == 200
    assert (await response.get_json())["idle_timeout"] == 30.0


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"idle_timeout": 30, "max_line": 10}, "max_line", "greater than or equal to 255"),
        ({"idle_timeout": 30, "port": 70000}, "port", "less than or equal to 65535"),
        ({"idle_timeout": 30, "port": None}, "port", "integer"),
        ({"idle_timeout": 30, "hostname": "bad host"}, "hostname", "pattern"),
        ({"idle_timeout": 30, "bogus": 1}, "bogus", "unknown option"),
        ({"idle_timeout": 30, "auth": "x"}, "auth", "cannot be set over the admin API"),
        ({"idle_timeout": 30, "storage": None}, "storage", "cannot be set over the admin API"),
        ({"idle_timeout": 30, "state": "up"}, "state", "cannot be set over the admin API"),
        ({"idle_timeout": 30, "ssl_context": None}, "ssl_context", "cannot be set over the admin API"),
        ({"idle_timeout": 30, "penalties": None}, "penalties", "cannot be set over the admin API"),
        ({"idle_timeout": 30, "max_connections": True}, "max_connections", "valid integer"),
        ({"idle_timeout": 30, "max_line": 300.5}, "max_line", "valid integer"),
        ({"idle_timeout": 30, "apop": 1}, "apop", "valid boolean"),
        ({"idle_timeout": 30, "login_timeout": False}, "login_timeout", "valid number"),
        ({"idle_timeout": 30, "host": "a..b"}, "host", "not a host name or address"),
        ({"idle_timeout": 30, "proxy_protocol_from": ["10.0.0.1/8"]}, "proxy_protocol_from", "host bits set"),
        ({"idle_timeout": 30, "cleartext_auth_from": ["10.0.0.1/8"]}, "cleartext_auth_from", "has host bits set"),
        ({"idle_timeout": 30, "cleartext_auth_from": ["nowhere"]}, "cleartext_auth_from", "not a network"),
        ({"idle_timeout": 30, "cleartext_auth_from": "nowhere"}, "cleartext_auth_from", "list of networks"),
        ({"idle_timeout": 30, "cleartext_auth_from": "10.0.0.0/8"}, "cleartext_auth_from", "list of networks"),
        ({"idle_timeout": 30, "proxy_protocol_from": [None]}, "proxy_protocol_from", "None is not a network"),
        ({"idle_timeout": 30, "proxy_protocol_from": ["10.0.0.0/8,::1"]}, "proxy_protocol_from", "not a network"),
        ({"idle_timeout": 30, "proxy_protocol_from": [" ::1"]}, "proxy_protocol_from", "not a network"),
        ({"idle_timeout": 30, "tls_cert": "/etc/hostname"}, "tls_cert", "cannot be set over the admin API"),
        ({"idle_timeout": 30, "tls_key": "/etc/shadow"}, "tls_key", "cannot be set over the admin API"),
        ([1, 2], "body", "valid dictionary"),
    ],
)
async def test_patch_config_refused(client: Client, server: pop3d.Server, body: Any, field: str, message: str) -> None:
    before = server.configure()
    response = await client.patch(f"/servers/{server.name}/config", json=body)
    error = await assert_error(response, 422, "invalid")
    assert message in fields_of(error)[field]
    assert field in error["detail"]
    assert server.configure() == before  # nothing half-applied


async def test_patch_implicit_tls_without_a_certificate_is_a_conflict(client: Client, server: pop3d.Server) -> None:
    # The value is fine; the server lacks a certificate, which only its own configuration can give.
    before = server.configure()
    response = await client.patch(f"/servers/{server.name}/config", json={"idle_timeout": 30, "implicit_tls": True})
    error = await assert_error(response, 409, "conflict")
    assert "needs tls_cert and tls_key" in fields_of(error)["implicit_tls"]
    assert server.configure() == before


async def test_patch_integers_may_be_written_as_whole_floats(client: Client, server: pop3d.Server) -> None:
    # JSON Schema's "integer" takes 828.0, so the API does too.
    response = await client.patch(f"/servers/{server.name}/config", json={"max_connections_per_ip": 828.0})
    assert response.status_code == 200, await response.get_data(as_text=True)
    assert server.cget("max_connections_per_ip") == 828 and isinstance(server.cget("max_connections_per_ip"), int)


async def test_patch_body_not_utf8_is_a_bad_request(client: Client, server: pop3d.Server) -> None:
    before = server.configure()
    response = await client.patch(
        f"/servers/{server.name}/config", data=b'{"hostname": "\xff"}', headers={"Content-Type": "application/json"}
    )
    await assert_error(response, 400, "bad_request")
    assert server.configure() == before


async def test_patch_cleartext_networks(client: Client, server: pop3d.Server) -> None:
    path = f"/servers/{server.name}/config"
    response = await client.patch(path, json={"cleartext_auth_from": ["10.0.0.0/8", "2001:db8::/32"]})
    assert response.status_code == 200, await response.get_data(as_text=True)
    assert (await response.get_json())["cleartext_auth_from"] == ["10.0.0.0/8", "2001:db8::/32"]
    response = await client.patch(path, json={"cleartext_auth_from": "none"})
    assert (await response.get_json())["cleartext_auth_from"] == []
    assert server.cget("cleartext_auth_from") == ()


async def test_patch_config_nested_too_deeply(client: Client, server: pop3d.Server) -> None:
    body = "[" * 100_000 + "]" * 100_000
    response = await client.patch(
        f"/servers/{server.name}/config", data=body, headers={"Content-Type": "application/json"}
    )
    await assert_error(response, 400, "bad_request")


async def test_penalties(client: Client, server: pop3d.Server) -> None:
    assert await get_json(client, "/penalties") == {"penalties": []}
    box = server.cget("penalties")
    for address in ("192.0.2.7", "2001:db8:1:2::7", "2001:db8:1:2::8"):
        box.failed(address, "alice")
    penalties = (await get_json(client, "/penalties"))["penalties"]
    assert [(p["kind"], p["key"], p["failures"], p["delay"]) for p in penalties] == [
        ("user", "alice", 3, 8.0),
        ("address", "2001:db8:1:2::/64", 2, 4.0),
        ("address", "192.0.2.7", 1, 2.0),
    ]
    assert datetime.fromisoformat(penalties[0]["last_failure"]).tzinfo is not None
    text = await (await client.get("/metrics")).get_data(as_text=True)
    assert 'pop3d_penalties{kind="address"} 2.0' in text and 'pop3d_penalties{kind="user"} 1.0' in text
    # Any address of a penalised /64 clears it; a user by name; and what is not there is a 404.
    assert (await client.delete("/penalties/2001:db8:1:2::99")).status_code == 204
    assert (await client.delete("/penalties/users/alice")).status_code == 204
    await assert_error(await client.delete("/penalties/198.51.100.1"), 404, "not_found")
    assert [p["key"] for p in (await get_json(client, "/penalties"))["penalties"]] == ["192.0.2.7"]


async def test_patch_config_not_json(client: Client, server: pop3d.Server) -> None:
    response = await client.patch(
        f"/servers/{server.name}/config", data="{not json", headers={"Content-Type": "application/json"}
    )
    await assert_error(response, 400, "bad_request")
    await assert_error(await client.patch(f"/servers/{server.name}/config", data="port=1"), 422, "invalid")


async def test_cget(client: Client, server: pop3d.Server) -> None:
    base = f"/servers/{server.name}/config"
    assert await get_json(client, f"{base}/port") == {"option": "port", "value": server.cget("port")}
    assert await get_json(client, f"{base}/auth") == {"option": "auth", "value": "test-users:/nowhere"}
    assert await get_json(client, f"{base}/state") == {"option": "state", "value": "up"}
    assert await get_json(client, f"{base}/host") == {"option": "host", "value": "127.0.0.1"}
    await assert_error(await client.get(f"{base}/no_such_option"), 404, "not_found")


# -- lifetime ---------------------------------------------------------------


async def test_up_down_and_port_change(client: Client, server: pop3d.Server) -> None:
    base = f"/servers/{server.name}"
    bound = server.cget("port")
    new_port = free_port()
    response = await client.patch(f"{base}/config", json={"port": new_port})
    assert response.status_code == 200
    # Still listening on the old port: a new port applies at the next up.
    summary = await get_json(client, base)
    assert (summary["port"], summary["configured_port"]) == (bound, new_port)

    response = await client.post(f"{base}/down")
    assert response.status_code == 200
    summary = await response.get_json()
    assert summary["state"] == "down" and summary["addresses"] == []
    assert summary["port"] == new_port  # nothing bound: the configured port

    response = await client.post(f"{base}/up")
    assert response.status_code == 200
    summary = await response.get_json()
    assert summary["state"] == "up"
    assert summary["port"] == new_port and summary["addresses"] == [f"127.0.0.1:{new_port}"]
    # up and down are idempotent
    assert (await client.post(f"{base}/up")).status_code == 200
    assert (await client.post(f"{base}/down")).status_code == 200
    assert (await client.post(f"{base}/down")).status_code == 200


async def test_up_that_cannot_bind_is_409(client: Client, server: pop3d.Server) -> None:
    with trio.socket.socket() as squatter:
        await squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        await client.post(f"/servers/{server.name}/down")
        await client.patch(f"/servers/{server.name}/config", json={"port": taken})
        body = await assert_error(await client.post(f"/servers/{server.name}/up"), 409, "conflict")
        assert str(taken) in body["detail"]
    assert server.state == "down"


async def test_up_on_a_server_not_running_is_409(client: Client, make_server: MakeServer) -> None:
    idle = await make_server(run=False)
    await assert_error(await client.post(f"/servers/{idle.name}/up"), 409, "conflict")


async def test_destroy_kill(client: Client, server: pop3d.Server, storage: pop3d.MemoryStorage) -> None:
    pop = await pop_connect(server)
    assert (await pop.login("alice", PASSWORD)).startswith(b"+OK")
    assert (await pop.command("DELE 1")).startswith(b"+OK")
    response = await client.delete(f"/servers/{server.name}", query_string={"mode": "kill"})
    assert response.status_code == 200
    assert await response.get_json() == {"name": server.name, "state": "destroyed"}
    assert server.destroyed and server.name not in pop3d.servers()
    with trio.fail_after(5):
        assert await pop.at_eof()
    assert storage.messages("alice") == MESSAGES
    assert not storage.is_locked("alice")
    await assert_error(await client.get(f"/servers/{server.name}"), 404, "not_found")


async def test_destroy_defaults_to_kill(client: Client, server: pop3d.Server) -> None:
    response = await client.delete(f"/servers/{server.name}")
    assert response.status_code == 200
    assert server.destroyed


async def test_destroy_defer_waits_for_the_last_connection(client: Client, server: pop3d.Server) -> None:
    base = f"/servers/{server.name}"
    pop = await pop_connect(server)
    with trio.fail_after(5):
        response = await client.delete(base, query_string={"mode": "defer"})  # must not hang
    assert response.status_code == 202
    assert await response.get_json() == {"name": server.name, "state": "exiting"}
    summary = await get_json(client, base)
    assert summary["state"] == "exiting" and summary["connections"] == 1 and summary["addresses"] == []
    await assert_error(await client.post(f"{base}/up"), 409, "conflict")
    # The open session carries on, then ends: the server goes with it.
    assert (await pop.login("alice", PASSWORD)).startswith(b"+OK")
    assert (await pop.command("QUIT")).startswith(b"+OK")
    await wait_until(lambda: server.name not in pop3d.servers())
    assert server.destroyed
    await assert_error(await client.get(base), 404, "not_found")


async def test_destroy_defer_without_connections(client: Client, server: pop3d.Server) -> None:
    response = await client.delete(f"/servers/{server.name}", query_string={"mode": "defer"})
    assert response.status_code == 200
    assert await response.get_json() == {"name": server.name, "state": "destroyed"}
    assert server.destroyed


async def test_destroy_bad_mode(client: Client, server: pop3d.Server) -> None:
    body = await assert_error(await client.delete(f"/servers/{server.name}?mode=later"), 422, "invalid")
    assert "mode" in fields_of(body)
    assert not server.destroyed


# -- connections ------------------------------------------------------------


async def test_connections_list_and_state(client: Client, server: pop3d.Server) -> None:
    base = f"/servers/{server.name}/connections"
    assert await get_json(client, base) == {"connections": []}
    pop = await pop_connect(server)
    assert (await pop.login("alice", PASSWORD)).startswith(b"+OK")
    assert (await pop.command("DELE 2")).startswith(b"+OK")

    [conn] = (await get_json(client, base))["connections"]
    assert conn["id"] == server.conn_list()[0]
    assert conn["remote_host"] == "127.0.0.1" and conn["remote_port"] > 0
    assert (conn["user"], conn["state"]) == ("alice", "trans")
    assert datetime.fromisoformat(conn["started"]) <= datetime.fromisoformat(conn["last_activity"])

    state = await get_json(client, f"{base}/{conn['id']}")
    assert set(state) == set(server.conn_state(conn["id"]))  # every key of conn_state
    assert state["connection"] == conn["id"]
    assert (state["name"], state["logon"], state["storage"]) == ("alice", "user", "alice")
    assert (state["deleted"], state["msg"]) == ([2], 2)
    assert state["server"] == server.name
    assert datetime.fromisoformat(state["started"]).tzinfo is not None
    assert (conn["tls"], state["tls"], state["tls_version"], state["tls_cipher"]) == (False, False, None, None)
    assert PASSWORD not in json.dumps(state)

    await assert_error(await client.get(f"{base}/conn999"), 404, "not_found")
    await assert_error(await client.delete(f"{base}/conn999"), 404, "not_found")
    await pop.command("QUIT")


async def test_connection_over_tls(client: Client, server: pop3d.Server, certs: Certs) -> None:
    server.configure(tls_cert=certs.cert, tls_key=certs.key, implicit_tls=True)
    stream = trio.SSLStream(
        await trio.open_tcp_stream("127.0.0.1", server.cget("port")),
        certs.client_context(),
        server_hostname="localhost",
    )
    pop = PopClient(stream)
    assert (await pop.read_line()).startswith(b"+OK")
    response = base64.b64encode(b"\0alice\0" + PASSWORD.encode()).decode()
    assert (await pop.command(f"AUTH PLAIN {response}")).startswith(b"+OK")
    base = f"/servers/{server.name}/connections"
    [conn] = (await get_json(client, base))["connections"]
    assert conn["tls"] is True
    state = await get_json(client, f"{base}/{conn['id']}")
    assert state["tls"] is True and state["tls_version"] == stream.version()
    assert state["tls_cipher"] == stream.cipher()[0]  # type: ignore[index]
    assert state["logon"] == "plain"
    config = await get_json(client, f"/servers/{server.name}/config")
    assert (config["tls_cert"], config["tls_key"], config["implicit_tls"]) == (str(certs.cert), str(certs.key), True)
    await pop.command("QUIT")
    await wait_until(lambda: not server.conn_list())
    text = await (await client.get("/metrics")).get_data(as_text=True)
    assert samples(text, server.name)[("pop3d_sessions_ended_total", (("tls", "true"),))] == 1
    assert samples(text, server.name)[("pop3d_logins_total", (("mechanism", "plain"), ("result", "ok")))] == 1


async def test_kick_connection(client: Client, server: pop3d.Server, storage: pop3d.MemoryStorage) -> None:
    pop = await pop_connect(server)
    assert (await pop.login("alice", PASSWORD)).startswith(b"+OK")
    assert (await pop.command("DELE 1")).startswith(b"+OK")
    assert storage.is_locked("alice")
    [conn_id] = server.conn_list()

    response = await client.delete(f"/servers/{server.name}/connections/{conn_id}")
    assert response.status_code == 204
    with trio.fail_after(5):
        assert await pop.at_eof()  # the client's socket is closed
    assert server.conn_list() == []
    assert storage.messages("alice") == MESSAGES  # the DELE was not applied
    assert not storage.is_locked("alice")


async def test_kick_connection_with_reason(client: Client, server: pop3d.Server) -> None:
    pop = await pop_connect(server)
    [conn_id] = server.conn_list()
    path = f"/servers/{server.name}/connections/{conn_id}"
    body = await assert_error(await client.delete(path, query_string={"reason": "bad\r\nline"}), 422, "invalid")
    assert "reason" in fields_of(body)
    response = await client.delete(path, query_string={"reason": "maintenance"})
    assert response.status_code == 204
    with trio.fail_after(5):
        assert await pop.read_line() == b"-ERR maintenance\r\n"
        assert await pop.at_eof()


# -- monitoring -------------------------------------------------------------


def samples(text: str, server: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``server`` as {(name, other labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            if labels.pop("server", None) == server:
                out[(sample.name, tuple(sorted(labels.items())))] = sample.value
    return out


async def test_metrics(client: Client, server: pop3d.Server) -> None:
    server.configure(penalties=None)  # a real socket: no autojump clock to skip the penalty's wait
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    before = samples(await response.get_data(as_text=True), server.name)
    assert before[("pop3d_messages_retrieved_total", ())] == 0
    assert before[("pop3d_server_up", ())] == 1

    pop = await pop_connect(server)
    assert (await pop.login("alice", "wrong")).startswith(b"-ERR")
    assert (await pop.login("alice", PASSWORD)).startswith(b"+OK")
    assert (await pop.command("RETR 1")).startswith(b"+OK")
    await pop.read_multiline()
    assert (await pop.command("DELE 1")).startswith(b"+OK")

    during = samples(await (await client.get("/metrics")).get_data(as_text=True), server.name)
    assert during[("pop3d_connections_open", ())] == 1
    assert during[("pop3d_sessions_total", ())] == 1
    assert during[("pop3d_logins_total", (("mechanism", "user"), ("result", "ok")))] == 1
    assert during[("pop3d_logins_total", (("mechanism", "user"), ("result", "failed")))] == 1
    assert during[("pop3d_sessions_ended_total", (("tls", "false"),))] == 0
    assert during[("pop3d_commands_total", (("command", "RETR"),))] == 1
    assert during[("pop3d_commands_total", (("command", "USER"),))] == 2
    assert during[("pop3d_messages_retrieved_total", ())] == 1
    assert during[("pop3d_retrieved_bytes_total", ())] == server.stats.bytes_retrieved > 0
    assert during[("pop3d_messages_deleted_total", ())] == 0  # only at QUIT
    assert during[("pop3d_errors_total", ())] == 0

    assert (await pop.command("QUIT")).startswith(b"+OK")
    await wait_until(lambda: not server.conn_list())
    after = samples(await (await client.get("/metrics")).get_data(as_text=True), server.name)
    assert after[("pop3d_messages_deleted_total", ())] == 1
    assert after[("pop3d_sessions_ended_total", (("tls", "false"),))] == 1
    assert after[("pop3d_sessions_ended_total", (("tls", "true"),))] == 0
    assert after[("pop3d_connections_open", ())] == 0


async def test_metrics_of_a_destroyed_server_vanish(client: Client, server: pop3d.Server) -> None:
    await server.destroy()
    text = await (await client.get("/metrics")).get_data(as_text=True)
    assert samples(text, server.name) == {}


async def test_two_apps_do_not_collide() -> None:
    # Each app has its own registry; a second app must not raise "duplicated timeseries".
    create_app()
    create_app(token=TOKEN)


async def test_healthz_and_readyz(client: Client, make_server: MakeServer) -> None:
    up = await make_server()
    await make_server(up=False)
    assert await get_json(client, "/healthz") == {"status": "ok"}
    ready = await get_json(client, "/readyz")
    assert ready["ready"] is True and up.name in ready["serving"] and ready["not_listening"] == []


async def test_not_ready_without_a_listening_server(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every server destroyed (or all taken down): nothing takes clients, so not ready.
    monkeypatch.setattr(pop3d, "servers", dict)
    assert await get_json(client, "/readyz", 503) == {
        "ready": False,
        "serving": [],
        "not_listening": [],
        "lock_service_unreachable": [],
    }
    monkeypatch.setattr(pop3d, "servers", lambda: {"stopped": FakeServer("down", [])})
    assert (await get_json(client, "/readyz", 503))["ready"] is False


class FakeServer:
    def __init__(self, state: str, addresses: list[tuple[str, int]]) -> None:
        self.state = state
        self._addresses = addresses
        self.mailbox_locks = None  # no lock service: readiness does not depend on one

    def addresses(self) -> list[tuple[str, int]]:
        return self._addresses


async def test_readiness() -> None:
    servers = {
        "listening": FakeServer("up", [("127.0.0.1", 110)]),
        "lost-its-socket": FakeServer("up", []),
        "stopped": FakeServer("down", []),
        "leaving": FakeServer("exiting", []),
    }
    assert not_listening(servers) == ["lost-its-socket"]
    assert not_listening({}) == []


async def test_readyz_503(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    # A listening socket cannot be made to vanish under a real server, so readyz sees fakes.
    monkeypatch.setattr(
        pop3d, "servers", lambda: {"broken": FakeServer("up", []), "ok": FakeServer("up", [("::1", 1)])}
    )
    assert await get_json(client, "/readyz", 503) == {
        "ready": False,
        "serving": ["ok"],
        "not_listening": ["broken"],
        "lock_service_unreachable": [],
    }


async def test_openapi_and_docs(client: Client) -> None:
    spec = await get_json(client, "/openapi.json")
    assert spec["info"]["title"] == "pop3d admin API"
    paths = spec["paths"]
    assert {"patch", "get"} <= set(paths["/servers/{name}/config"])
    assert "requestBody" in paths["/servers/{name}/config"]["patch"]
    assert {"/servers", "/metrics", "/healthz", "/readyz", "/servers/{name}/connections/{conn_id}"} <= set(paths)
    response = await client.get("/docs")
    assert response.status_code == 200 and "swagger" in (await response.get_data(as_text=True)).lower()


# -- access -----------------------------------------------------------------


async def test_token_required(locked_client: Client, server: pop3d.Server) -> None:
    client = locked_client
    for path in ("/servers", "/metrics", "/readyz", f"/servers/{server.name}/config", "/nope"):
        response = await client.get(path)
        await assert_error(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        for wrong in (f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN, "Bearer "):
            await assert_error(await client.get(path, headers={"Authorization": wrong}), 401, "unauthorized")
    await assert_error(await client.post(f"/servers/{server.name}/down"), 401, "unauthorized")
    assert server.state == "up"  # refused before anything happened

    good = {"Authorization": f"Bearer {TOKEN}"}
    assert (await client.get("/servers", headers=good)).status_code == 200
    assert (await client.get("/metrics", headers=good)).status_code == 200
    assert (await client.post(f"/servers/{server.name}/down", headers=good)).status_code == 200
    assert server.cget("state") == "down"
    # healthz is open, so that a supervisor needs no secret; the OpenAPI
    # document and its page too, so that the page loads and takes the token.
    assert (await client.get("/healthz")).status_code == 200
    spec = await get_json(client, "/openapi.json")
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert (await client.get("/docs")).status_code == 200


@pytest.mark.parametrize("bind", ["127.0.0.1:8110", "127.1.2.3:0", "[::1]:8110", "localhost:8110"])
async def test_bind_loopback_without_token(bind: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pop3d.admin"):
        check_bind(bind, token=None)
    assert "no token" in caplog.text


@pytest.mark.parametrize("bind", ["0.0.0.0:8110", "*:8110", "[::]:8110", "192.0.2.1:8110", "example.org:8110"])
async def test_bind_elsewhere_needs_a_token(bind: str) -> None:
    with pytest.raises(AdminAccessError) as info:
        check_bind(bind, token=None)
    assert isinstance(info.value, pop3d.Pop3dError)
    assert "\n" not in str(info.value) and "token" in str(info.value)
    check_bind(bind, token=TOKEN)


@pytest.mark.parametrize("bind", ["8110", "127.0.0.1", "127.0.0.1:http", "::1:8110", "127.0.0.1:99999", ":8110"])
async def test_bind_must_be_host_and_port(bind: str) -> None:
    with pytest.raises(AdminAccessError):
        check_bind(bind, token=TOKEN)


async def test_serve_admin_refuses_before_binding() -> None:
    with trio.fail_after(5), pytest.raises(AdminAccessError):
        await serve_admin(create_app(), "0.0.0.0:0", shutdown_trigger=trio.sleep_forever)


# -- over real HTTP ---------------------------------------------------------


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
async def test_serve_admin_with_hypercorn(server: pop3d.Server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pop3d.admin")
    stop = trio.Event()

    async def curl(url: str, *headers: str) -> str:
        args = ["curl", "--silent", "--show-error", "--fail", "--max-time", "5"]
        for header in headers:
            args += ["-H", header]
        result = await trio.run_process([*args, url], capture_stdout=True)
        return result.stdout.decode()

    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            app = create_app(token=TOKEN)
            serve = functools.partial(serve_admin, app, "127.0.0.1:0", shutdown_trigger=stop.wait)
            url = await nursery.start(serve)
            assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")
            auth = f"Authorization: Bearer {TOKEN}"
            listed = json.loads(await curl(f"{url}/servers", auth))
            assert server.name in {entry["name"] for entry in listed["servers"]}
            assert f'pop3d_server_up{{server="{server.name}"}} 1.0' in await curl(f"{url}/metrics", auth)
            assert json.loads(await curl(f"{url}/healthz")) == {"status": "ok"}
            stop.set()  # serve_admin returns, and the nursery closes
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", int(url.rsplit(":", 1)[1]))
    # Hypercorn's access log: one line per request, on pop3d's logger.
    access = [r.getMessage() for r in caplog.records if r.name == "pop3d.admin" and " GET /" in r.getMessage()]
    assert len(access) == 3, access
    assert access[0].startswith("127.0.0.1:") and " GET /servers 200 " in access[0]


async def test_a_mailboxs_uidls_and_where_they_come_from(client: Client, server: pop3d.Server, tmp_path: Path) -> None:
    from pop3d import uidl_pins

    box = tmp_path / "alice"
    for sub in ("cur", "new", "tmp"):
        (box / sub).mkdir(parents=True)
    (box / "new" / "1700000001.M1P1.test").write_bytes(b"Subject: one\n\nbody\n")
    (box / "new" / "1700000002.M2P1.test").write_bytes(b"Subject: two\n\nbody\n")
    uidl_pins.save(box, {"1700000001.M1P1.test": "OLD-SERVER-1"})
    # The in-memory storage cannot say: a 404 that says so.
    body = await assert_error(await client.get(f"/servers/{server.name}/mailboxes/alice/uidls"), 404, "not_found")
    assert "does not report" in body["detail"]
    server.configure(storage=pop3d.MaildirStorage(tmp_path))
    listing = await get_json(client, f"/servers/{server.name}/mailboxes/alice/uidls")
    assert listing == {
        "mailbox": "alice",
        "messages": [
            {"number": 1, "uidl": "OLD-SERVER-1", "source": "imported", "file": "new/1700000001.M1P1.test", "size": 22},
            {
                "number": 2,
                "uidl": "1700000002.M2P1.test",
                "source": "maildir",
                "file": "new/1700000002.M2P1.test",
                "size": 22,
            },
        ],
    }
    await assert_error(await client.get(f"/servers/{server.name}/mailboxes/.hidden/uidls"), 422, "invalid")
    await assert_error(await client.get("/servers/nope/mailboxes/alice/uidls"), 404, "not_found")
