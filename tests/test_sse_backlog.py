"""Slow SSE clients cost bounded memory: bounded event buffers, stream:reset, forgotten run ids.

The assertions are on the buffers themselves (their length, what they hold), not on
timing or process memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from asgi_helpers import JSON_HEADERS, SseEvent, next_event, running_server, sse_events

import durably_web.asgi.app as app_module
from durably_web import Durably, StepContext, define_job
from durably_web.asgi import create_app
from durably_web.errors import SubscriptionOverflowError, ValidationError
from durably_web.events import EventBuffer, RunSubscription
from durably_web.models import Event

GATES: dict[str, asyncio.Event] = {}


async def _pass(name: str) -> None:
    await GATES.setdefault(name, asyncio.Event()).wait()


@define_job("bl-flood")
async def flood_job(step: StepContext, payload: Any) -> str:
    """Waits at the gate, then writes many big log lines (non-progress events) and progress."""
    await step.run("wait", _pass, payload["gate"])
    for n in range(payload["logs"]):
        step.log.info(f"line {n}", {"blob": "x" * payload["size"]})
        step.progress(n + 1, payload["logs"])
    return "done"


@define_job("bl-quick")
async def quick_job(step: StepContext, payload: Any) -> int:
    return 1


@pytest.fixture(autouse=True)
def _open_gates() -> Any:
    yield
    for event in GATES.values():
        event.set()
    GATES.clear()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0), headers=JSON_HEADERS) as client:
        yield client


def _event(kind: str, run_id: str = "r", n: int = 0) -> Event:
    return Event(kind, run_id, "job", datetime.now(UTC), {"progress": {"current": n}})


# --- EventBuffer and RunSubscription -----------------------------------------------------------


async def test_a_full_buffer_coalesces_progress_and_overflows_on_anything_else() -> None:
    buffer = EventBuffer(10)
    for n in range(100_000):
        buffer.put(_event("run:progress", n=n))
    assert len(buffer) == 10  # the first nine, then the latest in the last slot
    taken = [await buffer.get(0) for _ in range(10)]
    assert [e.data["progress"]["current"] for e in taken if e] == [*range(9), 99_999]
    assert await buffer.get(0.01) is None

    for n in range(10):
        buffer.put(_event("log:write", n=n))
    buffer.put(_event("run:progress", "other-run"))  # another run's progress does not coalesce
    assert buffer.overflowed and len(buffer) == 0  # what it held is freed at once
    buffer.put(_event("log:write"))
    assert len(buffer) == 0
    with pytest.raises(SubscriptionOverflowError):
        await buffer.get(0)


async def test_a_byte_bounded_buffer_overflows_on_size_but_always_takes_one_event() -> None:
    def big(kind: str, size: int, run_id: str = "r") -> Event:
        return Event(kind, run_id, "job", datetime.now(UTC), {"blob": "x" * size})

    buffer = EventBuffer(1000, max_bytes=1_000_000)
    buffer.put(big("step:complete", 5_000_000))  # larger than the budget, but the buffer was empty
    assert len(buffer) == 1 and not buffer.overflowed
    assert (await buffer.get(0)) is not None and buffer.buffered_bytes == 0
    for _ in range(9):
        buffer.put(big("log:write", 100_000))
    assert len(buffer) == 9 and 900_000 < buffer.buffered_bytes <= 1_000_000
    buffer.put(big("log:write", 100_000))  # would pass the budget: overflow, all freed
    assert buffer.overflowed and len(buffer) == 0 and buffer.buffered_bytes == 0
    # once the bytes are used up, a run's progress replaces its last one (within budget)
    progress = EventBuffer(1000, max_bytes=1_000_000)
    for _ in range(9):
        progress.put(big("run:progress", 100_000))
    for _ in range(1000):
        progress.put(big("run:progress", 100_000))
    assert len(progress) == 9 and not progress.overflowed
    progress.put(big("run:progress", 300_000))  # the replacement itself no longer fits
    assert progress.overflowed


def test_buffer_limit_is_checked() -> None:
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValidationError):
            EventBuffer(bad)  # type: ignore[arg-type]
        with pytest.raises(ValidationError):
            EventBuffer(max_bytes=bad)  # type: ignore[arg-type]
    unbounded = EventBuffer()
    for n in range(5000):
        unbounded.put(_event("log:write", n=n))
    assert len(unbounded) == 5000 and not unbounded.overflowed


async def test_a_bounded_subscription_that_nobody_reads_stays_bounded(make_durably: Any) -> None:
    durably: Durably = await make_durably(quick_job, worker=False)
    run = await durably.trigger("bl-quick")
    subscription = durably.subscribe(run.id, max_buffered=5)
    for n in range(100_000):
        durably.emit("run:progress", run.id, "bl-quick", {"progress": {"current": n}})
    assert subscription.backlog == 5
    for n in range(5):
        durably.emit("log:write", run.id, "bl-quick", {"message": str(n)})
    assert subscription.backlog == 0  # overflowed: dropped, and no longer listening
    assert all(
        getattr(listener, "__self__", None) is not subscription for listener in durably.bus._listeners["*"]
    )
    with pytest.raises(SubscriptionOverflowError):
        await subscription.__anext__()
    with pytest.raises(StopAsyncIteration):
        await subscription.__anext__()
    # the default stays unbounded: an in-process consumer gets every event
    everything = durably.subscribe(run.id)
    for n in range(3000):
        durably.emit("log:write", run.id, "bl-quick", {"message": str(n)})
    assert everything.backlog == 3000
    everything.close()


# --- the HTTP streams -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("events", "max_bytes"),
    [(20, app_module.STREAM_BACKLOG_BYTES), (app_module.STREAM_BACKLOG, 1_000_000)],
    ids=["by-count", "by-bytes"],
)
async def test_a_run_stream_that_fell_behind_ends_with_stream_reset(
    make_durably: Any, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, events: int, max_bytes: int
) -> None:
    monkeypatch.setattr(app_module, "STREAM_BACKLOG", events)
    monkeypatch.setattr(app_module, "STREAM_BACKLOG_BYTES", max_bytes)
    durably: Durably = await make_durably(flood_job)
    subscriptions: list[RunSubscription] = []
    subscribe = durably.subscribe

    def recording_subscribe(run_id: str, **options: Any) -> RunSubscription:
        subscriptions.append(subscribe(run_id, **options))
        return subscriptions[-1]

    monkeypatch.setattr(durably, "subscribe", recording_subscribe)
    run = await durably.trigger("bl-flood", {"gate": "flood", "logs": 3000, "size": 20_000})
    async with running_server(create_app(durably, sse_throttle=0)) as base:
        async with http.stream("GET", f"{base}/runs/{run.id}/events") as response:
            # a client that does not read: 60 MB of log lines cannot all sit in socket buffers
            GATES.setdefault("flood", asyncio.Event()).set()
            await durably.wait_for_run(run.id, timeout=60)
            [subscription] = subscriptions
            assert subscription.backlog <= events
            assert 0 < subscription._buffer.peak_bytes <= max_bytes
            assert subscription._buffer.overflowed
            # now it reads: what was sent arrives, then stream:reset, then the stream ends
            seen: list[SseEvent] = [event async for event in sse_events(response)]
        assert seen[0].event == "run:snapshot"
        assert seen[-1].event == "stream:reset" and seen[-1].data["reconnect"] is True
        assert "run:complete" not in [event.event for event in seen]
        # reconnecting starts from the current state and ends with the run
        async with http.stream("GET", f"{base}/runs/{run.id}/events") as again:
            events = sse_events(again)
            snapshot = await next_event(events)
            assert snapshot.event == "run:snapshot" and snapshot.data["run"]["status"] == "completed"
            rest = [event async for event in events]
        assert rest[-1].event == "run:complete"


async def test_a_list_stream_that_fell_behind_ends_with_stream_reset(
    make_durably: Any, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_module, "STREAM_BACKLOG", 20)
    buffers: list[EventBuffer] = []

    class RecordingBuffer(EventBuffer):
        def __init__(self, limit: int | None = None, *, max_bytes: int | None = None) -> None:
            super().__init__(limit, max_bytes=max_bytes)
            buffers.append(self)

    monkeypatch.setattr(app_module, "EventBuffer", RecordingBuffer)
    durably: Durably = await make_durably(quick_job, worker=False)
    async with running_server(create_app(durably)) as base:
        async with http.stream("GET", f"{base}/events") as response:
            events = sse_events(response, comments=True)
            assert (await next_event(events)).data == {"text": "ready"}
            # one batch's events arrive at once: more than the stream may hold
            await durably.batch_trigger("bl-quick", [None] * 50)
            [buffer] = buffers
            assert buffer.overflowed and len(buffer) == 0
            rest = [event async for event in events if event.event != ":"]
        assert rest[-1].event == "stream:reset"
        assert len(rest) <= 21  # what was taken before the overflow, then the reset


async def test_list_stream_buffers_hold_no_inputs_and_forget_filtered_out_runs(
    make_durably: Any, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_module, "_VISIBLE_CACHE_SIZE", 10)
    buffers: list[EventBuffer] = []
    verdicts: list[dict[str, bool]] = []

    class RecordingBuffer(EventBuffer):
        def __init__(self, limit: int | None = None, *, max_bytes: int | None = None) -> None:
            super().__init__(limit, max_bytes=max_bytes)
            buffers.append(self)

    class RecordingVerdicts(app_module._Verdicts):
        def __init__(self, size: int) -> None:
            super().__init__(size)
            verdicts.append(self)

    monkeypatch.setattr(app_module, "EventBuffer", RecordingBuffer)
    monkeypatch.setattr(app_module, "_Verdicts", RecordingVerdicts)
    durably: Durably = await make_durably(quick_job, flood_job, worker=False)
    async with running_server(create_app(durably)) as base:
        async with http.stream("GET", f"{base}/events?job=bl-quick") as response:
            events = sse_events(response, comments=True)
            assert (await next_event(events)).data == {"text": "ready"}
            [buffer], [verdict] = buffers, verdicts
            # big inputs, emitted synchronously: they sit in the buffer before the stream runs
            for _ in range(5):
                await durably.trigger("bl-quick", {"blob": "y" * 1_000_000})
            assert len(buffer) >= 1
            assert all("input" not in event.data for event in buffer._events)
            # runs outside the filter are neither buffered nor remembered without bound
            for n in range(100):
                await durably.trigger("bl-flood", {"n": n})
            assert len(verdict) <= 10
            seen = []
            while len(seen) < 5:
                event = await next_event(events)
                if event.event != ":":
                    seen.append(event)
    assert [event.event for event in seen] == ["run:trigger"] * 5
    assert all("input" not in event.data and event.data["run"]["input_bytes"] > 1_000_000 for event in seen)
