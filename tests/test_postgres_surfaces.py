"""The CLI and the HTTP API against PostgreSQL: unchanged, and they see other processes' runs.

A real throwaway cluster (``postgres_url``); the CLI runs as ``python -m durably_web``
subprocesses, the HTTP API on a real uvicorn server in this event loop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from asgi_helpers import JSON_HEADERS, SseEvent, next_event, running_server, sse_events
from helpers import FAST

from durably_web import Durably, StepContext, define_job
from durably_web.asgi import create_app

pytestmark = pytest.mark.postgres


@define_job("pg-surface")
async def surface_job(step: StepContext, payload: Any) -> int:
    return await step.run("only", lambda: 7, type=int)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "durably_web", *args], capture_output=True, text=True, timeout=90, env=env
    )


async def test_the_cli_lists_shows_and_cancels_runs_on_postgresql(postgres_url: str) -> None:
    async with Durably(postgres_url, jobs=[surface_job], **FAST) as durably:
        done = await durably.trigger_and_wait(surface_job, None, timeout=30)
    async with Durably(postgres_url, jobs=[surface_job], worker=False) as client:
        pending = await client.trigger(surface_job, None, labels={"team": "pg"})

    listed = _cli("runs", postgres_url, "--json")
    assert listed.returncode == 0, listed.stderr
    by_id = {run["id"]: run for run in json.loads(listed.stdout)}
    assert by_id[done.id]["status"] == "completed" and by_id[pending.id]["status"] == "pending"

    shown = _cli("show", postgres_url, done.id)
    assert shown.returncode == 0, shown.stderr
    assert "completed" in shown.stdout and "only" in shown.stdout

    cancelled = _cli("cancel", postgres_url, pending.id)
    assert cancelled.returncode == 0, cancelled.stderr
    async with Durably(postgres_url, worker=False) as reader:
        assert (await reader.get_run(pending.id)).status == "cancelled"


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(20.0), headers=JSON_HEADERS) as client:
        yield client


async def test_the_run_list_stream_sees_runs_that_another_process_triggers_and_executes(
    postgres_url: str, http: httpx.AsyncClient
) -> None:
    # The server has no worker; another Durably (its own store, bus and connections: what
    # another process on another host has) triggers the run and executes it.
    server = Durably(postgres_url, jobs=[surface_job], worker=False, polling_interval=60)
    await server.init()
    elsewhere = Durably(postgres_url, jobs=[surface_job], **FAST)
    try:
        async with running_server(create_app(server)) as base:
            async with http.stream("GET", f"{base}/events?job=pg-surface") as response:
                assert response.status_code == 200
                events = sse_events(response, comments=True)
                assert (await next_event(events)).data == {"text": "ready"}
                await elsewhere.init()
                run = await elsewhere.trigger(surface_job, None)
                seen: list[SseEvent] = []
                # Well within the server's polling interval (60 s): only a notification is this fast.
                while not (seen and seen[-1].event == "run:complete"):
                    event = await next_event(events, timeout=10)
                    if event.event != ":":
                        seen.append(event)
        assert all(e.data["run_id"] == run.id for e in seen)
        assert seen[-1].data["run"]["status"] == "completed"
        # The trigger and the lease are reported too unless the run had moved on by the time the
        # server read it (each event carries the state the server read).
        assert {e.event for e in seen} <= {"run:trigger", "run:leased", "run:complete"}
    finally:
        await elsewhere.stop()
        await server.stop()


async def test_wait_for_run_returns_as_soon_as_another_process_finishes_the_run(postgres_url: str) -> None:
    client = Durably(postgres_url, jobs=[surface_job], worker=False, polling_interval=60)
    worker = Durably(postgres_url, jobs=[surface_job], **FAST)
    await client.init()
    try:
        run = await client.trigger(surface_job, None)
        await worker.init()
        # Its own poll would come after 60 s, past the timeout: only the notification wakes it.
        done = await client.wait_for_run(run.id, timeout=30)
        assert done.status == "completed" and done.output == 7
    finally:
        await worker.stop()
        await client.stop()
