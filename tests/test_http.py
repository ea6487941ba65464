"""durably_web.http under CPython, against a real local HTTP server."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from durably_web import Durably, StepContext, define_job
from durably_web.http import HttpError, get_json, post_json


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/users":
            self._reply(200, {"users": ["ada", "grace"], "accept": self.headers["Accept"]})
        else:
            self._reply(404, {"error": "no such page"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self._reply(201, {"echo": body, "type": self.headers["Content-Type"]})

    def _reply(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def base_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def test_get_json_decodes_the_body_and_asks_for_json(base_url: str) -> None:
    assert await get_json(f"{base_url}/users") == {"users": ["ada", "grace"], "accept": "application/json"}


async def test_post_json_sends_json(base_url: str) -> None:
    reply = await post_json(f"{base_url}/anything", {"n": 1})
    assert reply == {"echo": {"n": 1}, "type": "application/json"}


async def test_a_non_2xx_status_raises_http_error_with_status_and_body(base_url: str) -> None:
    with pytest.raises(HttpError) as caught:
        await get_json(f"{base_url}/missing")
    assert caught.value.status == 404
    assert json.loads(caught.value.body or "") == {"error": "no such page"}


async def test_an_unreachable_host_raises_http_error_without_status() -> None:
    with pytest.raises(HttpError) as caught:
        await get_json("http://127.0.0.1:9/nothing-listens-here", timeout=5)
    assert caught.value.status is None


async def test_a_step_calling_get_json_records_the_response(base_url: str, db_url: str) -> None:
    @define_job("fetch-users")
    async def fetch_users(step: StepContext, payload: Any) -> list[str]:
        data = await step.run("fetch", get_json, f"{base_url}/users")
        return data["users"]

    async with Durably(db_url, jobs=[fetch_users]) as durably:
        done = await durably.trigger_and_wait(fetch_users, None, timeout=10)
        assert done.status == "completed"
        assert done.output == ["ada", "grace"]
        [step] = await durably.get_steps(done.id)
        assert step.output == {"users": ["ada", "grace"], "accept": "application/json"}
