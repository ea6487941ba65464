"""Durable sleeps: step.sleep / step.sleep_until as checkpoints, waiting without a slot, kills."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from helpers import (
    FakeClock,
    finish_process,
    kill_once_waiting,
    start_process,
    timed_lines,
    wait_until,
)

from durably_web import Durably, Event, NonDeterministicReplayError, StepContext, define_job

pytestmark = pytest.mark.all_backends


async def test_sleep_makes_the_run_wait_then_continue_and_is_recorded_as_a_checkpoint(make_durably, sql):
    clock = FakeClock()
    after: list[int] = []
    events: list[Event] = []

    @define_job("napper")
    async def napper(step: StepContext, payload: Any) -> str:
        await step.run("before", lambda: 1)
        await step.sleep("cool-down", timedelta(hours=1))
        await step.run("after", lambda: after.append(1))
        return "rested"

    durably = await make_durably(napper, clock=clock)
    durably.on("*", events.append)
    start = clock.now
    run = await durably.trigger(napper, None)
    [waiting] = await wait_until(lambda: durably.get_runs(status="waiting"))
    assert waiting.id == run.id and waiting.wait_reason == "sleep" and waiting.wait_step == "cool-down"
    assert waiting.wake_at == datetime.fromtimestamp(start + 3600, UTC)
    assert sql("SELECT name, kind, output FROM durably_steps ORDER BY seq") == [
        ("before", "run", "1"),
        ("cool-down", "sleep", str(int((start + 3600) * 1000))),
    ]
    await asyncio.sleep(0.2)
    assert not after
    clock.now += 3600
    done = await durably.wait_for_run(run.id, timeout=30)
    assert done.status == "completed" and done.output == "rested" and after == [1]
    waits = [e for e in events if e.type == "run:waiting"]
    assert [(e["reason"], e["step_name"], e["due_at"]) for e in waits] == [
        ("sleep", "cool-down", datetime.fromtimestamp(start + 3600, UTC))
    ]
    steps = await durably.get_steps(run.id)
    assert [s.name for s in steps] == ["before", "cool-down", "after"]
    # Sleeps are not step.run attempts.
    assert [a.name for a in await durably.get_step_attempts(run.id)] == ["before", "after"]


async def test_sleep_until_a_past_time_or_a_zero_sleep_continues_at_once(make_durably):
    @define_job("overdue")
    async def overdue(step: StepContext, payload: Any) -> str:
        await step.sleep_until("past", datetime(2000, 1, 1, tzinfo=UTC))
        await step.sleep("zero", 0)
        return "ok"

    durably = await make_durably(overdue)
    done = await durably.trigger_and_wait(overdue, None, timeout=30)
    assert done.status == "completed" and done.attempt == 1
    assert [s.name for s in await durably.get_steps(done.id)] == ["past", "zero"]


async def test_sleep_until_a_future_time_waits_for_it(make_durably):
    clock = FakeClock()
    when = datetime.fromtimestamp(clock.now + 7 * 86400, UTC)

    @define_job("monday")
    async def monday(step: StepContext, payload: Any) -> str:
        await step.sleep_until("monday", when)
        return "it is monday"

    durably = await make_durably(monday, clock=clock)
    run = await durably.trigger(monday, None)
    [waiting] = await wait_until(lambda: durably.get_runs(status="waiting"))
    assert waiting.wake_at == when
    clock.now += 7 * 86400
    assert (await durably.wait_for_run(run.id, timeout=30)).output == "it is monday"


@pytest.mark.parametrize(
    "call",
    [
        lambda step: step.sleep_until("naive", datetime(2030, 1, 1)),
        lambda step: step.sleep("negative", -1),
        lambda step: step.sleep("nan", float("nan")),
        lambda step: step.sleep("text", "10"),
    ],
)
async def test_bad_sleep_arguments_fail_the_run_with_step_error(make_durably, call):
    @define_job("bad-sleep")
    async def bad(step: StepContext, payload: Any) -> None:
        await call(step)

    durably = await make_durably(bad)
    done = await durably.trigger_and_wait(bad, None, timeout=30)
    assert done.status == "failed" and done.error is not None and done.error.type == "StepError"


async def test_names_are_unique_across_steps_and_sleeps(make_durably):
    @define_job("dup-sleep")
    async def dup(step: StepContext, payload: Any) -> None:
        await step.run("same", lambda: 1)
        await step.sleep("same", 0)

    durably = await make_durably(dup)
    done = await durably.trigger_and_wait(dup, None, timeout=30)
    assert done.status == "failed" and done.error is not None and "used twice" in done.error.message


async def test_a_changed_order_of_sleeps_and_steps_on_resume_is_non_deterministic(make_durably):
    clock = FakeClock()
    version = {"v": 1}

    @define_job("reordered")
    async def reordered(step: StepContext, payload: Any) -> None:
        if version["v"] == 1:
            await step.sleep("a", 10)
        else:
            await step.run("a", lambda: 1)

    durably = await make_durably(reordered, clock=clock)
    run = await durably.trigger(reordered, None)
    await wait_until(lambda: durably.get_runs(status="waiting"))
    version["v"] = 2
    clock.now += 10
    done = await durably.wait_for_run(run.id, timeout=30)
    assert done.status == "failed" and done.error is not None
    assert done.error.type == NonDeterministicReplayError.__name__


async def test_a_sleeping_run_does_not_stop_another_run_with_max_concurrent_runs_1(make_durably):
    @define_job("long-nap")
    async def long_nap(step: StepContext, payload: Any) -> str:
        await step.sleep("nap", 0.5)
        return "woke"

    @define_job("quick")
    async def quick(step: StepContext, payload: Any) -> str:
        return "quick"

    durably = await make_durably(long_nap, quick, max_concurrent_runs=1)
    napping = await durably.trigger(long_nap, None)
    await wait_until(lambda: durably.get_runs(status="waiting"))
    other = await durably.trigger(quick, None)
    done_other = await durably.wait_for_run(other.id, timeout=30)
    assert done_other.status == "completed"
    assert (await durably.get_run(napping.id)).status == "waiting"  # still asleep while the other ran
    assert (await durably.wait_for_run(napping.id, timeout=30)).output == "woke"


async def test_a_sleep_continues_on_another_worker_within_a_polling_interval(make_durably, db_url):
    @define_job("handover")
    async def handover(step: StepContext, payload: Any) -> str:
        await step.sleep("nap", 0.3)
        return "elsewhere"

    first = await make_durably(handover)
    run = await first.trigger(handover, None)
    await wait_until(lambda: first.get_runs(status="waiting"))
    await first.stop()  # the worker that started the sleep is gone; its timer with it
    second = await make_durably(handover, polling_interval=0.05)
    done = await second.wait_for_run(run.id, timeout=30)
    assert done.status == "completed" and done.output == "elsewhere"


async def test_sigkill_during_a_sleep_then_restart_continues_at_the_due_time_without_sleeping_again(
    db_url, db_path, tmp_path
):
    side_effects = tmp_path / "side-effects.txt"
    first, (run_id, _, due_ms) = await kill_once_waiting(
        db_url, db_path, side_effects, kind="sleep", seconds=3
    )
    assert time.time() < due_ms / 1000, "the sleep ended before the kill; nothing was tested"
    conn = sqlite3.connect(db_path)
    recorded_due = conn.execute("SELECT output FROM durably_steps WHERE name = 'nap'").fetchone()[0]
    conn.close()
    assert int(recorded_due) == due_ms

    second = start_process("wait", db_url, str(side_effects), "--kind", "sleep", "--seconds", "3")
    result = finish_process(second)
    assert result["disposition"] == "idempotent" and result["status"] == "completed"
    lines = timed_lines(side_effects)
    assert [(name, pid) for name, pid, _ in lines] == [("before", first.pid), ("after", result["pid"])]
    assert due_ms / 1000 - 0.01 <= lines[1][2] <= due_ms / 1000 + 5.0
    conn = sqlite3.connect(db_path)
    try:  # the due time was kept, not recomputed from the restart
        assert (
            int(conn.execute("SELECT output FROM durably_steps WHERE name = 'nap'").fetchone()[0]) == due_ms
        )
    finally:
        conn.close()
    async with Durably(db_url, worker=False) as client:
        assert (await client.get_run(run_id)).status == "completed"


async def test_subscribe_streams_the_waiting_transition(make_durably):
    @define_job("streamed-nap")
    async def job(step: StepContext, payload: Any) -> str:
        await step.sleep("nap", 0.1)
        return "done"

    durably = await make_durably(job)
    run = await durably.trigger(job, None)
    types = [event.type async for event in durably.subscribe(run.id)]
    assert types.count("run:waiting") == 1 and types.count("run:leased") == 2
    assert types[-1] == "run:complete"
