"""Events: listeners by type, unsubscribe, failing listeners, per-run subscriptions."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Any

import pytest
from helpers import wait_event, wait_until
from pydantic import BaseModel

from durably_web import ErrorInfo, Event, NotFoundError, Progress, StepContext, ValidationError, define_job
from durably_web.events import EVENT_TYPES

pytestmark = pytest.mark.all_backends


class Out(BaseModel):
    value: int


@define_job("chatty", output=Out)
async def chatty(step: StepContext, payload: Any) -> Out:
    value = await step.run("compute", lambda: 41)
    step.progress(1, 1, "half")
    step.log.info("computed", {"value": value})
    return Out(value=value + 1)


@define_job("fails")
async def fails(step: StepContext, payload: Any) -> None:
    def broken() -> None:
        raise RuntimeError("broken step")

    await step.run("broken", broken)


def gated(gate: asyncio.Event, started: asyncio.Event):
    @define_job("gated")
    async def job(step: StepContext, payload: Any) -> None:
        async def wait() -> None:
            started.set()
            await gate.wait()

        await step.run("wait", wait)

    return job


async def test_every_event_type_is_emitted_with_its_data(make_durably):
    gate, started = asyncio.Event(), asyncio.Event()
    gated_job = gated(gate, started)
    durably = await make_durably(chatty, fails, gated_job)
    events: list[Event] = []
    durably.on("*", events.append)

    def bad_listener(event: Event) -> None:
        raise RuntimeError("listener bug")

    durably.on("run:trigger", bad_listener)  # produces worker:error events

    done = await durably.trigger_and_wait(chatty, None, labels={"k": "v"}, timeout=30)
    failed = await durably.trigger_and_wait(fails, None, timeout=30)
    running = await durably.trigger(gated_job, None, concurrency_key="key")
    await wait_event(started)
    queued = await durably.trigger(gated_job, None, concurrency_key="key")
    coalesced = await durably.trigger(gated_job, None, concurrency_key="key", coalesce="skip")
    assert coalesced.id == queued.id
    await durably.cancel(queued.id)
    await durably.delete_run(queued.id)
    gate.set()
    await durably.wait_for_run(running.id, timeout=30)

    # Durable waiting's events are covered where their features are: run:waiting and step:retry
    # in test_retries.py / test_sleep.py, run:resume in test_resume.py, signal:received in test_signals.py.
    waiting_events = {"run:waiting", "run:resume", "step:retry", "signal:received"}
    assert {event.type for event in events} == EVENT_TYPES - waiting_events
    by_run = lambda run_id: [e for e in events if e.run_id == run_id and e.type != "worker:error"]  # noqa: E731
    assert [e.type for e in by_run(done.id)] == [
        "run:trigger",
        "run:leased",
        "step:start",
        "step:complete",
        "run:progress",
        "log:write",
        "run:complete",
    ]
    trigger, leased, start, complete, progress, log, finished = by_run(done.id)
    assert trigger.data == {"input": None, "labels": {"k": "v"}}
    assert leased.data["attempt"] == 1
    assert start.data == {"step_name": "compute", "step_index": 0, "attempt": 1}
    assert complete.data["step_name"] == "compute" and complete.data["output"] == 41
    assert complete.data["duration_ms"] >= 0
    assert progress.data == {"progress": Progress(1, 1, "half")}
    assert log.data == {"level": "info", "message": "computed", "data": {"value": 41}, "step_name": None}
    assert finished.data == {"output": Out(value=42)}
    assert all(e.job_name == "chatty" and isinstance(e.timestamp, datetime) for e in by_run(done.id))

    fail = [e for e in by_run(failed.id) if e.type in ("step:fail", "run:fail")]
    assert [e.type for e in fail] == ["step:fail", "run:fail"]
    assert fail[0].data["step_name"] == "broken"
    assert fail[1].data["error"] == ErrorInfo("RuntimeError", "broken step", fail[1].data["error"].traceback)
    assert fail[1].data["step_name"] == "broken"

    assert [e.type for e in by_run(queued.id)] == ["run:trigger", "run:coalesced", "run:cancel", "run:delete"]
    assert [e.data for e in by_run(queued.id)][1] == {"concurrency_key": "key"}

    worker_errors = [e for e in events if e.type == "worker:error"]
    assert len(worker_errors) == 4  # one per run:trigger
    assert all(
        e.data["source"] == "listener" and e.data["error"].message == "listener bug" for e in worker_errors
    )
    # Every event can be turned into JSON.
    for event in events:
        json.dumps(event.to_dict())


async def test_listeners_get_only_their_type_and_unsubscribe_stops_delivery(make_durably):
    durably = await make_durably(chatty)
    completes: list[Event] = []
    starts: list[Event] = []
    unsubscribe = durably.on("run:complete", completes.append)
    durably.on("step:start", starts.append)
    first = await durably.trigger_and_wait(chatty, None, timeout=30)
    assert [e.type for e in completes] == ["run:complete"]
    assert [e.run_id for e in completes] == [first.id]
    unsubscribe()
    unsubscribe()  # harmless twice
    second = await durably.trigger_and_wait(chatty, None, timeout=30)
    assert [e.run_id for e in completes] == [first.id]
    assert [e.run_id for e in starts] == [first.id, second.id]


async def test_on_rejects_unknown_types_and_non_callables(make_durably):
    durably = await make_durably()
    with pytest.raises(ValidationError, match="unknown event type"):
        durably.on("run:exploded", print)
    with pytest.raises(ValidationError):
        durably.on("run:complete", "not callable")  # type: ignore[arg-type]


async def test_a_raising_listener_does_not_break_the_worker(make_durably):
    durably = await make_durably(chatty)
    errors: list[Event] = []
    later_listener: list[str] = []

    def raising(event: Event) -> None:
        raise ValueError(f"listener failed on {event.type}")

    async def raising_async(event: Event) -> None:
        raise KeyError("async listener failed")

    for event_type in (
        "run:leased",
        "step:start",
        "step:complete",
        "run:progress",
        "log:write",
        "run:complete",
    ):
        durably.on(event_type, raising)
    durably.on("run:complete", raising_async)
    durably.on("run:complete", lambda event: later_listener.append(event.run_id))  # after the raising one
    durably.on("worker:error", errors.append)
    durably.on("worker:error", raising)  # must not recurse

    done = await durably.trigger_and_wait(chatty, None, timeout=30)
    assert done.status == "completed"
    assert done.output == Out(value=42)
    assert later_listener == [done.id]
    await wait_until(lambda: any(e.data["error"].type == "KeyError" for e in errors))
    sync_errors = [e for e in errors if e.data["error"].type == "ValueError"]
    assert len(sync_errors) == 6
    assert all(e.data["source"] == "listener" for e in errors)
    # The worker is still healthy afterwards.
    assert (await durably.trigger_and_wait(chatty, None, timeout=30)).status == "completed"


# --- progress on resume -----------------------------------------------------------------


def _progress_job(name: str, holding: asyncio.Event, *, hold_at_end: bool = False) -> Any:
    @define_job(name)
    async def job(step: StepContext, payload: Any) -> None:
        for i in (1, 2, 3):
            await step.run(f"s{i}", lambda i=i: i)
            step.progress(i, 5, f"step {i}")
        if hold_at_end:
            if step.attempt == 1:  # stopped here: every step is recorded, nothing new runs
                holding.set()
                await asyncio.Event().wait()
            return

        async def hold() -> None:
            if step.attempt == 1:
                holding.set()
                await asyncio.Event().wait()

        await step.run("s4", hold)
        step.progress(4, 5, "step 4")
        await step.run("s5", lambda: 5)
        step.progress(5, 5, "done")

    return job


@pytest.mark.parametrize("stored_behind", [False, True])
async def test_a_resumed_run_neither_repeats_nor_rewinds_progress(make_durably, sql, stored_behind):
    holding = asyncio.Event()
    job = _progress_job("progress-resume", holding)
    seen: list[tuple[int, int]] = []  # (instance, progress.current), one listener list for both

    first = await make_durably(job, shutdown_timeout=0.2)
    first.on("run:progress", lambda e: seen.append((1, e.data["progress"].current)))
    run = await first.trigger(job, None)
    await wait_event(holding)
    await first.stop()  # stuck in s4: cancelled and released
    assert seen == [(1, 1), (1, 2), (1, 3)]
    if stored_behind:  # as if it was killed between committing s3 and storing its progress
        sql("UPDATE durably_runs SET progress_current = 2, progress_message = 'step 2'")

    second = await make_durably(job)
    second.on("run:progress", lambda e: seen.append((2, e.data["progress"].current)))
    done = await second.wait_for_run(run.id, timeout=30)
    assert done.status == "completed", done.error
    assert done.attempt == 2
    resumed = [current for instance, current in seen if instance == 2]
    # Replaying s1-s3 emits nothing; the progress reported meanwhile is recorded once
    # if the stored value lagged behind it.
    assert resumed == ([3, 4, 5] if stored_behind else [4, 5])
    assert done.progress == Progress(5, 5, "done")


async def test_a_run_resumed_after_its_last_step_records_only_missing_progress(make_durably, sql):
    holding = asyncio.Event()
    job = _progress_job("progress-at-end", holding, hold_at_end=True)
    first = await make_durably(job, shutdown_timeout=0.2)
    run = await first.trigger(job, None)
    await wait_event(holding)
    await first.stop()
    sql("UPDATE durably_runs SET progress_current = 2, progress_message = 'step 2'")

    second = await make_durably(job)
    seen: list[Progress] = []
    second.on("run:progress", lambda e: seen.append(e.data["progress"]))
    done = await second.wait_for_run(run.id, timeout=30)
    assert done.status == "completed", done.error
    assert seen == [Progress(3, 5, "step 3")]  # recorded when the handler returned
    assert done.progress == Progress(3, 5, "step 3")


# --- subscribe -----------------------------------------------------------------


async def test_subscribe_yields_the_runs_events_and_ends_at_the_terminal_event(make_durably):
    durably = await make_durably(chatty)
    run = await durably.trigger(chatty, None)
    subscription = durably.subscribe(run.id)  # before the worker gets to run it
    other = await durably.trigger(chatty, None)
    received = [event async for event in subscription]
    assert [e.type for e in received] == [
        "run:leased",
        "step:start",
        "step:complete",
        "run:progress",
        "log:write",
        "run:complete",
    ]
    assert {e.run_id for e in received} == {run.id}
    assert received[-1].data["output"] == Out(value=42)
    assert (await durably.wait_for_run(other.id, timeout=30)).status == "completed"
    # An ended subscription stays ended.
    with pytest.raises(StopAsyncIteration):
        await subscription.__anext__()


async def test_subscribe_ends_on_failure(make_durably):
    durably = await make_durably(fails)
    run = await durably.trigger(fails, None)
    received = [event.type async for event in durably.subscribe(run.id)]
    assert received[-1] == "run:fail"
    assert "step:fail" in received


async def test_subscribe_to_a_finished_run_yields_its_terminal_event(make_durably):
    durably = await make_durably(chatty, fails)
    done = await durably.trigger_and_wait(chatty, None, timeout=30)
    failed = await durably.trigger_and_wait(fails, None, timeout=30)
    received = [event async for event in durably.subscribe(done.id)]
    assert [(e.type, e.run_id) for e in received] == [("run:complete", done.id)]
    assert received[0].data == {"output": Out(value=42)}
    received = [event async for event in durably.subscribe(failed.id)]
    assert [e.type for e in received] == ["run:fail"]
    assert received[0].data["error"].message == "broken step"


async def test_subscribe_to_a_cancelled_or_deleted_run(make_durably):
    durably = await make_durably(worker=False)
    durably.register(chatty)
    run = await durably.trigger(chatty, None)
    subscription = durably.subscribe(run.id)
    await durably.cancel(run.id)
    assert [e.type async for e in subscription] == ["run:cancel"]

    second = await durably.trigger(chatty, None)
    subscription = durably.subscribe(second.id)
    await durably.delete_run(second.id)
    assert [e.type async for e in subscription] == ["run:delete"]
    with pytest.raises(NotFoundError):
        # SQLite answers at once; over a network database the first step looks the run up.
        await anext(durably.subscribe(second.id))


async def test_subscribe_notices_a_run_finished_by_another_instance(make_durably, backend):
    client = await make_durably(worker=False)
    client.register(chatty)
    run = await client.trigger(chatty, None)
    subscription = client.subscribe(run.id)
    await make_durably(chatty)  # a worker elsewhere (its own event bus)
    received = [event async for event in subscription]
    types = [e.type for e in received]
    # SQLite's client finds the end by polling; PostgreSQL's is notified of the other
    # worker's lease too, unless the run had already finished when it looked.
    assert types in (
        (["run:complete"], ["run:leased", "run:complete"]) if backend == "postgres" else (["run:complete"],)
    )
    received = received[-1:]
    assert received[0].data == {"output": Out(value=42)}
