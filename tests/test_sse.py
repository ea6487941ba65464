"""Server-Sent Events over a real uvicorn server (in this event loop, on a free port).

httpx's ASGI transport buffers a response until the app finishes it, so it can
neither read a stream while the test acts nor read an endless one; a real
server can.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from asgi_helpers import JSON_HEADERS, SseEvent, next_event, running_server, sse_events
from helpers import wait_until

from durably_web import Durably, StepContext, define_job
from durably_web.asgi import HTTPException, RunsFilter, create_app
from durably_web.models import Run

GATES: dict[str, asyncio.Event] = {}


def gate(name: str) -> asyncio.Event:
    return GATES.setdefault(name, asyncio.Event())


async def pass_gate(name: str) -> str:
    await gate(name).wait()
    return name


@define_job("sse-steps")
async def steps_job(step: StepContext, payload: Any) -> dict[str, int]:
    """first step, progress, then waits at the gate before the second step."""
    await step.run("first", lambda: 1, type=int)
    step.progress(1, 2, "first done")
    await step.run("wait", pass_gate, payload["gate"])
    await step.run("second", lambda: 2, type=int)
    step.log.info("second done", {"n": 2})
    step.progress(2, 2, "all done")
    return {"total": 3}


@define_job("sse-burst")
async def burst_job(step: StepContext, payload: Any) -> None:
    """Waits at the gate, then reports progress 1..n as fast as it can."""
    await step.run("wait", pass_gate, payload["gate"])
    for current in range(1, payload["n"] + 1):
        step.progress(current, payload["n"], f"item {current}")


@define_job("sse-quick")
async def quick_job(step: StepContext, payload: Any) -> int:
    return await step.run("only", lambda: 7, type=int)


JOBS = (steps_job, burst_job, quick_job)


@pytest.fixture(autouse=True)
def _open_gates() -> Any:
    yield
    for event in GATES.values():
        event.set()
    GATES.clear()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(20.0), headers=JSON_HEADERS) as client:
        yield client


async def _collect_until_end(events: AsyncIterator[SseEvent]) -> list[SseEvent]:
    """Every remaining event; the stream must end by itself (the server closes it)."""

    async def drain() -> list[SseEvent]:
        return [event async for event in events]

    return await asyncio.wait_for(drain(), 20)


async def test_run_stream_replays_state_then_live_events_and_closes(
    make_durably: Any, http: httpx.AsyncClient
) -> None:
    durably: Durably = await make_durably(*JOBS)
    run = await durably.trigger("sse-steps", {"gate": "replay"})
    # wait until the run is parked at the gate, having recorded "first" and its progress
    await wait_until(lambda: _progress_of(durably, run.id, 1), timeout=10)

    async with running_server(create_app(durably, sse_throttle=0)) as base:
        async with http.stream("GET", f"{base}/runs/{run.id}/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = sse_events(response)
            snapshot = await next_event(events)
            assert snapshot.event == "run:snapshot"
            assert snapshot.data["run"]["id"] == run.id and snapshot.data["run"]["status"] == "leased"
            replayed = await next_event(events)
            assert (replayed.event, replayed.data["step_name"], replayed.data["replayed"]) == (
                "step:complete", "first", True,
            )
            assert replayed.data["output"] == 1
            progress = await next_event(events)
            assert progress.event == "run:progress" and progress.data["replayed"] is True
            assert progress.data["progress"]["current"] == 1

            gate("replay").set()
            live = await _collect_until_end(events)

    kinds = [event.event for event in live]
    assert kinds[-1] == "run:complete"
    assert live[-1].data["output"] == {"total": 3}
    completed_steps = [e.data["step_name"] for e in live if e.event == "step:complete"]
    assert completed_steps[-1] == "second" and "first" not in completed_steps
    assert ("log:write", "second done") in [(e.event, e.data.get("message")) for e in live]
    assert [e.data["progress"]["current"] for e in live if e.event == "run:progress"][-1] == 2
    assert all(event.data["run_id"] == run.id for event in live)


async def _progress_of(durably: Durably, run_id: str, current: int) -> bool:
    found = await durably.get_run(run_id)
    return found.progress is not None and found.progress.current == current


async def test_stream_of_a_finished_run_replays_and_ends(make_durably: Any, http: httpx.AsyncClient) -> None:
    durably: Durably = await make_durably(*JOBS)
    run = await durably.trigger_and_wait("sse-quick", None, timeout=10)
    async with running_server(create_app(durably)) as base:
        async with http.stream("GET", f"{base}/runs/{run.id}/events") as response:
            events = await _collect_until_end(sse_events(response))
    assert [e.event for e in events] == ["run:snapshot", "step:complete", "run:complete"]
    assert events[0].data["run"]["status"] == "completed"
    assert events[2].data["output"] == 7


async def test_stream_ends_when_the_run_is_cancelled(make_durably: Any, http: httpx.AsyncClient) -> None:
    durably: Durably = await make_durably(*JOBS, worker=False)
    run = await durably.trigger("sse-quick")
    async with running_server(create_app(durably)) as base:
        async with http.stream("GET", f"{base}/runs/{run.id}/events") as response:
            events = sse_events(response)
            assert (await next_event(events)).event == "run:snapshot"
            cancelled = await http.post(f"{base}/runs/{run.id}/cancel")
            assert cancelled.status_code == 200
            rest = await _collect_until_end(events)
    assert [e.event for e in rest] == ["run:cancel"]


@pytest.mark.parametrize(("throttle", "expected"), [(3600.0, [1, 50]), (0.0, list(range(1, 51)))])
async def test_progress_is_throttled_and_the_last_one_always_arrives(
    make_durably: Any, http: httpx.AsyncClient, throttle: float, expected: list[int]
) -> None:
    durably: Durably = await make_durably(*JOBS)
    run = await durably.trigger("sse-burst", {"gate": f"burst-{throttle}", "n": 50})
    async with running_server(create_app(durably, sse_throttle=throttle)) as base:
        async with http.stream("GET", f"{base}/runs/{run.id}/events") as response:
            events = sse_events(response)
            assert (await next_event(events)).event == "run:snapshot"
            gate(f"burst-{throttle}").set()
            rest = await _collect_until_end(events)
    assert [e.data["progress"]["current"] for e in rest if e.event == "run:progress"] == expected
    assert rest[-1].event == "run:complete"


async def test_run_list_stream_carries_run_events_with_state(
    make_durably: Any, http: httpx.AsyncClient
) -> None:
    durably: Durably = await make_durably(*JOBS)
    async with running_server(create_app(durably)) as base:
        async with http.stream("GET", f"{base}/events?job=sse-quick") as response:
            assert response.status_code == 200
            events = sse_events(response, comments=True)
            assert (await next_event(events)).data == {"text": "ready"}
            other = await durably.trigger("sse-burst", {"gate": "other", "n": 1})
            run = await durably.trigger("sse-quick")
            seen: list[SseEvent] = []
            while not (seen and seen[-1].event == "run:complete"):
                event = await next_event(events)
                if event.event != ":":
                    seen.append(event)
    gate("other").set()
    assert [e.event for e in seen] == ["run:trigger", "run:leased", "run:complete"]
    assert all(e.data["run_id"] == run.id for e in seen)
    # list events carry run summaries: sizes instead of the input and output (GET /runs/{id} has them)
    summary = seen[-1].data["run"]
    assert summary["status"] == "completed" and summary["output_bytes"] == len("7")
    assert summary["input_bytes"] == len("null")
    assert all("input" not in e.data and "output" not in e.data for e in seen)
    assert all("input" not in e.data["run"] and "output" not in e.data["run"] for e in seen)
    assert other.id not in {e.data["run_id"] for e in seen}


async def test_closing_a_stream_removes_its_listeners(make_durably: Any, http: httpx.AsyncClient) -> None:
    durably: Durably = await make_durably(*JOBS, worker=False)
    run = await durably.trigger("sse-quick")
    assert not durably.bus.wants("run:progress")
    async with running_server(create_app(durably)) as base:
        for url in (f"{base}/events", f"{base}/runs/{run.id}/events"):
            async with http.stream("GET", url) as response:
                await next_event(sse_events(response, comments=True))
                assert durably.bus.wants("run:progress")
            await wait_until(lambda: not durably.bus.wants("run:progress"), timeout=10)


class TenantAuth:
    """Tenant from ``?tenant=`` (EventSource cannot send headers)."""

    def authenticate(self, request: Any) -> str:
        tenant = request.query_params.get("tenant") or request.headers.get("x-tenant")
        if not tenant:
            raise HTTPException(401, "who are you?")
        return str(tenant)

    def on_trigger(self, ctx: str, trigger: Any) -> Any:
        return trigger.model_copy(update={"labels": {"tenant": ctx}})

    async def on_run_access(self, ctx: str, run: Run, operation: str) -> None:
        if run.labels.get("tenant") != ctx:
            raise HTTPException(403, "not your run")

    async def scope_runs(self, ctx: str, runs_filter: RunsFilter) -> RunsFilter:
        return dataclasses.replace(runs_filter, labels={**runs_filter.labels, "tenant": ctx})


async def _read_until(events: AsyncIterator[SseEvent], run_id: str, kind: str) -> list[SseEvent]:
    seen: list[SseEvent] = []
    while True:
        event = await next_event(events)
        if event.event == ":":
            continue
        seen.append(event)
        if event.event == kind and event.data["run_id"] == run_id:
            return seen


async def test_run_list_stream_is_scoped_per_tenant(make_durably: Any, http: httpx.AsyncClient) -> None:
    durably: Durably = await make_durably(*JOBS)
    async with running_server(create_app(durably, auth=TenantAuth())) as base:
        refused = await http.get(f"{base}/events")
        assert refused.status_code == 401
        async with http.stream("GET", f"{base}/events?tenant=a") as stream_a, \
                http.stream("GET", f"{base}/events?tenant=b&label.tenant=a") as stream_b:
            events_a = sse_events(stream_a, comments=True)
            events_b = sse_events(stream_b, comments=True)
            assert (await next_event(events_a)).data == {"text": "ready"}
            assert (await next_event(events_b)).data == {"text": "ready"}

            created_a = await http.post(f"{base}/trigger?tenant=a", json={"job": "sse-quick"})
            run_a = created_a.json()["id"]
            await durably.wait_for_run(run_a, timeout=10)
            assert (await http.delete(f"{base}/runs/{run_a}?tenant=a")).status_code == 200
            created_b = await http.post(f"{base}/trigger?tenant=b", json={"job": "sse-quick"})
            run_b = created_b.json()["id"]

            seen_a = await _read_until(events_a, run_a, "run:delete")
            seen_b = await _read_until(events_b, run_b, "run:complete")

    assert {e.data["run_id"] for e in seen_a} == {run_a}
    assert [e.event for e in seen_a] == ["run:trigger", "run:leased", "run:complete", "run:delete"]
    assert {e.data["run_id"] for e in seen_b} == {run_b}
    assert [e.event for e in seen_b] == ["run:trigger", "run:leased", "run:complete"]


async def test_run_stream_of_another_tenant_is_refused(make_durably: Any, http: httpx.AsyncClient) -> None:
    durably: Durably = await make_durably(*JOBS, worker=False)
    async with running_server(create_app(durably, auth=TenantAuth())) as base:
        run_id = (await http.post(f"{base}/trigger?tenant=a", json={"job": "sse-quick"})).json()["id"]
        refused = await http.get(f"{base}/runs/{run_id}/events?tenant=b")
        assert refused.status_code == 404  # as for a missing run: ids cannot be probed
        async with http.stream("GET", f"{base}/runs/{run_id}/events?tenant=a") as allowed:
            assert allowed.status_code == 200
            assert (await next_event(sse_events(allowed))).event == "run:snapshot"
