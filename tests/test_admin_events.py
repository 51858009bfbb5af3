"""GET /events: snapshots pushed as things change, over a real Hypercorn; and the change feed under it."""

from __future__ import annotations

import functools
import json
import os
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from pop3d.admin import create_app, serve_admin
from pop3d.admin.events import COALESCE, MAX_STREAMS

import pop3d
from pop3d.changes import ChangeFeed
from pop3d.memory import MemoryStorage, MemoryUsers

TOKEN = "events-token-77d1"
# Pushed within COALESCE (0.2 s) of a change; well under the 5 s refresh, so only a push passes.
LIVE = 1.5
UI_DOC = Path(__file__).resolve().parent.parent / "docs" / "ui.md"


@pytest.fixture
async def server(nursery: trio.Nursery) -> AsyncIterator[pop3d.Server]:
    server = pop3d.new(f"events-{uuid.uuid4().hex[:8]}")
    storage = MemoryStorage({"alice": [b"Subject: hi\r\n\r\nhello\r\n"]})
    server.configure(
        host="127.0.0.1",
        port=0,
        auth=MemoryUsers({"alice": ("secret", "alice")}),
        storage=storage,
        cleartext_auth_from=["127.0.0.0/8"],
        login_failure_delay=0,
    )
    await nursery.start(server.run)
    await server.up()
    yield server
    with trio.fail_after(5):
        await server.destroy("kill")


class EventReader:
    """Reads server-sent events from a blocking HTTP response, one at a time, in a worker thread."""

    def __init__(self, response: Any) -> None:
        self.response = response

    def _next(self) -> dict[str, Any] | None:
        fields: dict[str, str] = {}
        while True:
            line = self.response.readline()
            if not line:
                return None  # the stream ended
            line = line.decode().rstrip("\n")
            if not line:
                if fields:
                    return {"event": fields.get("event"), "id": fields.get("id"), **json.loads(fields["data"])}
                continue
            name, _, value = line.partition(":")
            fields[name] = value.lstrip(" ")

    async def next(self, within: float = 10) -> dict[str, Any] | None:
        with trio.fail_after(within):
            return await trio.to_thread.run_sync(self._next, abandon_on_cancel=True)

    async def until(self, predicate: Any, within: float = 10) -> dict[str, Any]:
        with trio.fail_after(within):
            while True:
                event = await self.next(within)
                assert event is not None, "the stream ended"
                if predicate(event):
                    return event


async def admin(nursery: trio.Nursery, token: str | None = None) -> tuple[str, trio.Event]:
    stop = trio.Event()
    serve = functools.partial(serve_admin, create_app(token=token), "127.0.0.1:0", shutdown_trigger=stop.wait)
    url: str = await nursery.start(serve)
    return url, stop


def open_stream(url: str, token: str | None = None) -> Any:
    request = urllib.request.Request(url + "/events")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    return urllib.request.urlopen(request, timeout=20)


def mine(server: pop3d.Server) -> Any:
    return lambda event: next(s for s in event["servers"] if s["name"] == server.name)


async def test_a_session_shows_in_the_stream_as_it_comes_and_goes(nursery: trio.Nursery, server: pop3d.Server) -> None:
    url, stop = await admin(nursery)
    response = await trio.to_thread.run_sync(open_stream, url)
    assert response.headers["Content-Type"].startswith("text/event-stream")
    reader = EventReader(response)
    of = mine(server)
    first = await reader.next()
    assert first is not None and first["event"] == "snapshot" and first["type"] == "snapshot"
    assert of(first)["state"] == "up" and of(first)["sessions"] == []

    stream = await trio.open_tcp_stream("127.0.0.1", server.cget("port"))
    await stream.receive_some()
    await stream.send_all(b"USER alice\r\nPASS secret\r\nDELE 1\r\n")
    seen = await reader.until(
        lambda e: any(s["state"] == "trans" and s["marked"] == 1 for s in of(e)["sessions"]), within=LIVE
    )
    [session] = of(seen)["sessions"]
    assert session["user"] == "alice" and session["messages"] == 1 and session["tls"] is False
    assert of(seen)["logins_ok"] == 1

    await stream.send_all(b"RSET\r\nQUIT\r\n")
    await stream.aclose()
    gone = await reader.until(lambda e: of(e)["sessions"] == [], within=LIVE)
    assert of(gone)["sessions_total"] == 1

    await server.down()
    down = await reader.until(lambda e: of(e)["state"] == "down", within=LIVE)
    assert of(down)["addresses"] == []
    response.close()
    stop.set()


async def test_penalties_are_in_the_snapshot(nursery: trio.Nursery) -> None:
    from pop3d.penalties import PenaltyBox

    box = PenaltyBox()
    server = pop3d.new(f"events-p-{uuid.uuid4().hex[:8]}")
    server.configure(penalties=box)
    url, stop = await admin(nursery)
    reader = EventReader(await trio.to_thread.run_sync(open_stream, url))
    await reader.next()
    box.failed("192.0.2.7", "mallory")
    event = await reader.until(lambda e: e["penalties"], within=LIVE)
    keys = {(p["kind"], p["key"]) for p in event["penalties"]}
    assert ("user", "mallory") in keys and ("address", "192.0.2.7") in keys
    await server.destroy("kill")
    stop.set()


async def test_the_stream_needs_the_token(nursery: trio.Nursery) -> None:
    url, stop = await admin(nursery, token=TOKEN)

    def refused() -> tuple[int, Any]:
        try:
            open_stream(url)
        except urllib.error.HTTPError as exc:
            with exc:  # read before the response is let go
                return exc.code, json.loads(exc.read())
        raise AssertionError("the stream opened without the token")

    status, body = await trio.to_thread.run_sync(refused)
    assert status == 401 and body["error"] == "unauthorized"
    reader = EventReader(await trio.to_thread.run_sync(open_stream, url, TOKEN))
    first = await reader.next()
    assert first is not None and "servers" in first
    stop.set()


async def test_a_stop_ends_open_streams(nursery: trio.Nursery) -> None:
    url, stop = await admin(nursery)
    reader = EventReader(await trio.to_thread.run_sync(open_stream, url))
    assert await reader.next() is not None
    stop.set()
    # Hypercorn would wait for the open stream (3 s, then cut it); the stream ends at once instead.
    assert await reader.next(within=1.0) is None


async def test_the_change_feed_wakes_waiters_and_counts() -> None:
    feed = ChangeFeed()
    woke: list[int] = []

    async def wait(seen: int) -> None:
        woke.append(await feed.wait_past(seen))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait, 0)
        nursery.start_soon(wait, 0)
        await trio.testing.wait_all_tasks_blocked()
        assert woke == []
        feed.notify()
    assert woke == [1, 1] and feed.count == 1
    assert await feed.wait_past(0) == 1  # already past: no wait
    with trio.move_on_after(COALESCE) as waited:
        await feed.wait_past(1)
    assert waited.cancelled_caught  # nothing changed


def test_the_documented_curl_command_reads_the_stream(tmp_path: Path) -> None:
    import re
    import shutil
    import subprocess

    from .serve_process import ServeProcess, make_site, serve_args

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    [command] = [line for line in re.findall(r"```sh\n(.*?)```", UI_DOC.read_text(), flags=re.S) if "/events" in line]
    site = make_site(tmp_path)
    with ServeProcess(*serve_args(site), "--admin", "127.0.0.1:0", env={"POP3D_ADMIN_TOKEN": TOKEN}) as proc:
        proc.wait_ready()
        assert proc.admin is not None
        result = subprocess.run(
            ["bash", "-c", command.strip().replace("http://127.0.0.1:8110", proc.admin)],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "POP3D_ADMIN_TOKEN": TOKEN},
        )
    assert result.returncode == 28, result.stderr  # curl's --max-time: the stream itself never ends
    data = [line.removeprefix("data: ") for line in result.stdout.splitlines() if line.startswith("data: ")]
    assert data and json.loads(data[0])["servers"][0]["name"] == "pop3"
    assert result.stdout.startswith("event: snapshot\n")


async def test_event_streams_are_capped_and_share_one_snapshot(nursery: trio.Nursery) -> None:
    url, stop = await admin(nursery)
    responses = [await trio.to_thread.run_sync(open_stream, url) for _ in range(MAX_STREAMS)]
    firsts = [await EventReader(response).next() for response in responses]
    assert len({first["id"] for first in firsts if first}) == 1  # one snapshot, sent to all

    def one_more() -> tuple[int, Any]:
        try:
            open_stream(url).close()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, json.loads(exc.read())
        raise AssertionError("a stream beyond the cap was opened")

    status, body = await trio.to_thread.run_sync(one_more)
    assert status == 429 and body["error"] == "too_many"
    responses.pop().close()
    with trio.fail_after(5):
        while True:  # the closed stream's place comes free once the server sees it gone
            try:
                reopened = await trio.to_thread.run_sync(open_stream, url)
                break
            except urllib.error.HTTPError as exc:
                exc.close()
                await trio.sleep(0.1)
    for response in [*responses, reopened]:
        response.close()
    stop.set()


async def test_a_snapshot_lists_the_newest_sessions_and_counts_them_all(
    nursery: trio.Nursery, server: pop3d.Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pop3d.admin import events

    monkeypatch.setattr(events, "MAX_SESSIONS_SHOWN", 2)
    streams = [await trio.open_tcp_stream("127.0.0.1", server.cget("port")) for _ in range(3)]
    for stream in streams:
        await stream.receive_some()
    view = events.Snapshot.now().model_dump(mode="json")
    [mine_] = [s for s in view["servers"] if s["name"] == server.name]
    assert mine_["sessions_count"] == 3 and mine_["sessions_truncated"] is True
    assert [s["id"] for s in mine_["sessions"]] == server.conn_list()[-2:]
    for stream in streams:
        await stream.aclose()


async def test_pages_elsewhere_cannot_drive_the_api(nursery: trio.Nursery, server: pop3d.Server) -> None:
    from pop3d.admin import create_app as make

    stop = trio.Event()
    app = make(cors_origins=["https://dash.example.org"])
    url = await nursery.start(functools.partial(serve_admin, app, "127.0.0.1:0", shutdown_trigger=stop.wait))

    def post(path: str, headers: dict[str, str]) -> tuple[int, Any]:
        request = urllib.request.Request(url + path, method="POST", headers=headers, data=b"")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, json.loads(exc.read())

    down = f"/servers/{server.name}/down"
    # A "simple" cross-site form post from any page: refused, and the server stays up.
    status, body = await trio.to_thread.run_sync(post, down, {"Origin": "https://evil.example"})
    assert (status, body["error"]) == (403, "forbidden") and server.state == "up"
    # DNS rebinding: the page's own name pointed at 127.0.0.1.
    status, body = await trio.to_thread.run_sync(post, down, {"Host": "evil.example"})
    assert status == 403 and "without a token" in body["detail"] and server.state == "up"
    # The API's own page, and an allowed dashboard, may.
    host = url.removeprefix("http://")
    status, _ = await trio.to_thread.run_sync(post, down, {"Origin": url})
    assert status == 200 and server.state == "down"
    status, _ = await trio.to_thread.run_sync(
        post, f"/servers/{server.name}/up", {"Origin": "https://dash.example.org"}
    )
    assert status == 200 and server.state == "up"
    assert host.startswith("127.0.0.1:")
    stop.set()


async def test_the_openapi_document_describes_each_event() -> None:
    app = create_app()
    async with app.test_app() as test_app:
        document = await (await test_app.test_client().get("/openapi.json")).get_json()
    content = document["paths"]["/events"]["get"]["responses"]["200"]["content"]["text/event-stream"]
    data = content["schema"]["properties"]["data"]
    assert data["contentMediaType"] == "application/json"
    assert data["contentSchema"] == {"$ref": "#/components/schemas/Snapshot"}
    snapshot = document["components"]["schemas"]["Snapshot"]
    assert {"at", "servers", "penalties"} <= set(snapshot["properties"])
    assert "marked" in document["components"]["schemas"]["SessionView"]["properties"]
    assert "429" in document["paths"]["/events"]["get"]["responses"]
