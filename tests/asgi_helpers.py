"""Helpers for the HTTP API tests: an in-process uvicorn server and a Server-Sent Events reader.

httpx's ``ASGITransport`` hands back a response only once the app has finished
it, so an endless stream (the run list) or a stream that must be read while
the test acts (a live run) needs a real server. uvicorn runs here as a task in
the test's own event loop, next to the ``Durably`` instance, on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn

#: Where the ASGI-transport clients pretend to be: a loopback name, which the app answers
#: by default (any other Host is refused as a DNS-rebinding defence).
API_BASE_URL = "http://localhost"
#: What every JSON API client sends: the app refuses a POST without this content type,
#: with or without a body (a cross-site form cannot send it).
JSON_HEADERS = {"Content-Type": "application/json"}


def api_client(app: Any, **options: Any) -> httpx.AsyncClient:
    """An httpx client driving ``app`` in-process, as a well-behaved JSON API client."""
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url=API_BASE_URL, headers=JSON_HEADERS, **options
    )


class _QuietServer(uvicorn.Server):
    """No signal handlers: the test process keeps its own Ctrl-C behaviour."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def running_server(app: Any) -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1 (a free port) for the block; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = _QuietServer(
        uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(1000):
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        if not server.started:
            raise AssertionError("uvicorn did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)
        sock.close()


@dataclass
class SseEvent:
    event: str
    data: dict[str, Any]


async def sse_events(response: httpx.Response, *, comments: bool = False) -> AsyncIterator[SseEvent]:
    """Parse a ``text/event-stream`` body; ``comments=True`` also yields ``SseEvent(":", {"text": ...})``."""
    kind = "message"
    data: list[str] = []
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield SseEvent(kind, json.loads("\n".join(data)))
            kind, data = "message", []
        elif line.startswith(":"):
            if comments:
                yield SseEvent(":", {"text": line[1:].strip()})
        elif line.startswith("event:"):
            kind = line[len("event:"):].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:"):].strip())


async def next_event(events: AsyncIterator[SseEvent], timeout: float = 15.0) -> SseEvent:
    """The stream's next event, failing (not hanging) if none comes."""
    return await asyncio.wait_for(events.__anext__(), timeout)
