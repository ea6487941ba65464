"""Run deadlines (``timeout=``): persisted with the run, enforced on any worker, waits included."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers import FakeClock, finish_process, start_process, timed_lines, wait_until

from durably_web import (
    Durably,
    Event,
    RunTimeoutError,
    StepContext,
    TriggerItem,
    ValidationError,
    define_job,
)

pytestmark = pytest.mark.all_backends


def timed_out(run: Any) -> bool:
    return run.status == "failed" and run.error is not None and run.error.type == "RunTimeoutError"


# --- options ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, "soon", float("nan"), True, [1]])
def test_define_job_refuses_a_timeout_that_is_not_a_positive_duration(bad):
    with pytest.raises(ValidationError, match="timeout"):

        @define_job("bad-timeout", timeout=bad)
        async def job(step: StepContext, payload: Any) -> None: ...


def test_define_job_takes_seconds_durations_and_timedeltas():
    async def handler(step: StepContext, payload: Any) -> None: ...

    assert define_job("a", timeout=90)(handler).timeout == 90
    assert define_job("b", timeout="10m")(handler).timeout == 600
    assert define_job("c", timeout=timedelta(hours=1))(handler).timeout == 3600
    assert define_job("d")(handler).timeout is None


async def test_the_deadline_is_persisted_and_a_trigger_overrides_the_jobs_timeout(make_durably):
    clock = FakeClock()

    @define_job("report", timeout=600)
    async def report(step: StepContext, payload: Any) -> str:
        return "ok"

    durably = await make_durably(report, clock=clock, worker=False)
    default = await durably.trigger(report, None)
    shorter = await durably.trigger(report, None, timeout=5)
    [batched] = await durably.batch_trigger(report, [TriggerItem(None, timeout="2m")])
    start = datetime.fromtimestamp(clock.now, UTC)
    assert default.deadline_at == start + timedelta(seconds=600)
    assert shorter.deadline_at == start + timedelta(seconds=5)
    assert batched.deadline_at == start + timedelta(seconds=120)
    # As stored, not only as returned.
    assert (await durably.get_run(shorter.id)).deadline_at == start + timedelta(seconds=5)
    assert (await durably.get_run(default.id)).to_dict()["deadline_at"] == (
        (start + timedelta(seconds=600)).isoformat().replace("+00:00", "Z")
    )
    with pytest.raises(ValidationError, match="timeout"):
        await durably.trigger(report, None, timeout=-3)
    assert len(await durably.get_runs()) == 3  # the refused trigger wrote nothing


async def test_a_job_without_timeout_has_no_deadline_and_runs_to_its_end(make_durably):
    @define_job("plain")
    async def plain(step: StepContext, payload: Any) -> str:
        return await step.run("one", lambda: "done")

    durably = await make_durably(plain)
    done = await durably.trigger_and_wait(plain, None, timeout=30)
    assert done.status == "completed" and done.deadline_at is None


# --- enforcement ------------------------------------------------------------------------------------


async def test_a_deadline_during_an_async_step_stops_it_and_fails_the_run(make_durably):
    started = asyncio.Event()
    cancelled: list[bool] = []
    after: list[int] = []

    async def forever() -> str:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return "never"

    @define_job("stuck", timeout=0.3)
    async def stuck(step: StepContext, payload: Any) -> str:
        await step.run("quick", lambda: 1)
        await step.run("forever", forever)
        await step.run("after", lambda: after.append(1))
        return "unreachable"

    durably = await make_durably(stuck)
    events: list[Event] = []
    durably.on("run:fail", events.append)
    run = await durably.trigger(stuck, None)
    done = await durably.wait_for_run(run.id, timeout=30)
    assert started.is_set() and cancelled == [True] and not after
    assert timed_out(done), done.error
    assert "deadline" in done.error.message
    # The step in flight is not recorded; the one before it is kept.
    assert [(s.name, s.status) for s in await durably.get_steps(run.id)] == [("quick", "completed")]
    assert [e["error"].type for e in events] == ["RunTimeoutError"]


async def test_the_deadline_follows_the_injected_clock_during_a_step(make_durably):
    clock = FakeClock()
    started = asyncio.Event()

    async def waits() -> str:
        started.set()
        await asyncio.sleep(3600)
        return "never"

    # Jumps shorter than the lease (2 s), as real time would pass while leases are renewed.
    @define_job("clocked", timeout=1.5)
    async def clocked(step: StepContext, payload: Any) -> str:
        return await step.run("waits", waits)

    durably = await make_durably(clocked, clock=clock)
    run = await durably.trigger(clocked, None)
    await asyncio.wait_for(started.wait(), 30)
    clock.now += 1
    await asyncio.sleep(0.3)  # a few lease renewals: not yet
    assert (await durably.get_run(run.id)).status == "leased"
    clock.now += 1
    done = await durably.wait_for_run(run.id, timeout=30)
    assert timed_out(done)


async def test_a_handler_that_swallows_the_timeout_still_fails(make_durably):
    clock = FakeClock()
    seen: list[str] = []

    @define_job("stubborn", timeout=60)
    async def stubborn(step: StepContext, payload: Any) -> str:
        await step.run("first", lambda: 1)
        clock.now += 120  # the deadline passes during the handler's own code
        try:
            await step.run("second", lambda: 2)
        except RunTimeoutError as exc:
            seen.append(type(exc).__name__)
        return "pretends all is well"

    durably = await make_durably(stubborn, clock=clock)
    done = await durably.trigger_and_wait(stubborn, None, timeout=30)
    assert seen == ["RunTimeoutError"] and timed_out(done) and done.output is None
    assert [s.name for s in await durably.get_steps(done.id)] == ["first"]


async def test_a_sync_step_past_the_deadline_ends_but_its_result_is_not_recorded(make_durably):
    # A thread cannot be interrupted: the run holds its lease until the step returns, then
    # fails at that boundary. (In Pyodide, sync steps run on the loop: see NEEDS_CPYTHON.)
    clock = FakeClock()
    inside = threading.Event()
    release = threading.Event()

    def blocking() -> str:
        inside.set()
        release.wait(30)
        return "late"

    @define_job("blocking", timeout=1)
    async def blocking_job(step: StepContext, payload: Any) -> str:
        return await step.run("blocking", blocking)

    durably = await make_durably(blocking_job, clock=clock)
    run = await durably.trigger(blocking_job, None)
    await asyncio.to_thread(inside.wait, 30)
    clock.now += 1.5  # past the deadline, not past the lease (2 s)
    await asyncio.sleep(0.3)  # renewals see the deadline; the thread is still in the step
    assert (await durably.get_run(run.id)).status == "leased"
    release.set()
    done = await durably.wait_for_run(run.id, timeout=30)
    assert timed_out(done)
    assert await durably.get_steps(run.id) == []


async def test_a_deadline_during_a_sleep_fails_the_run_on_time_without_the_handler(make_durably):
    clock = FakeClock()
    calls: list[str] = []

    @define_job("sleeper", timeout=600)
    async def sleeper(step: StepContext, payload: Any) -> str:
        calls.append("handler")
        await step.sleep("long-nap", timedelta(hours=1))
        return "rested"

    durably = await make_durably(sleeper, clock=clock)
    run = await durably.trigger(sleeper, None)
    await wait_until(lambda: durably.get_runs(status="waiting"))
    clock.now += 601
    done = await durably.wait_for_run(run.id, timeout=30)
    assert timed_out(done) and calls == ["handler"]  # failed while waiting, not by resuming it


async def test_a_deadline_during_a_signal_wait_fails_the_run(make_durably):
    clock = FakeClock()

    @define_job("waiter", timeout=60)
    async def waiter(step: StepContext, payload: Any) -> str:
        return await step.wait_for_signal("go", type=str)

    durably = await make_durably(waiter, clock=clock)
    run = await durably.trigger(waiter, None)
    await wait_until(lambda: durably.get_runs(status="waiting"))
    clock.now += 61
    done = await durably.wait_for_run(run.id, timeout=30)
    assert timed_out(done)


async def test_a_deadline_during_a_retry_back_off_fails_the_run(make_durably):
    from durably_web import RetryPolicy

    clock = FakeClock()

    def fails() -> None:
        raise OSError("down")

    @define_job("retrying", timeout=60, retry=RetryPolicy(max_attempts=5, initial_delay=3600))
    async def retrying(step: StepContext, payload: Any) -> None:
        await step.run("fails", fails)

    durably = await make_durably(retrying, clock=clock)
    run = await durably.trigger(retrying, None)
    [waiting] = await wait_until(lambda: durably.get_runs(status="waiting"))
    assert waiting.wait_reason == "retry"
    clock.now += 61
    assert timed_out(await durably.wait_for_run(run.id, timeout=30))


async def test_a_deadline_that_passed_while_no_worker_was_alive_fails_the_run_when_one_starts(
    make_durably, db_url
):
    clock = FakeClock()
    ran: list[str] = []

    @define_job("late", timeout=30)
    async def late(step: StepContext, payload: Any) -> None:
        ran.append("handler")

    client = await make_durably(late, clock=clock, worker=False)
    overdue = await client.trigger(late, None)
    in_time = await client.trigger(late, None, timeout=3600)
    clock.now += 31
    assert (await client.get_run(overdue.id)).status == "pending"  # nobody looked yet
    worker = await make_durably(late, clock=clock)
    done = await worker.wait_for_run(overdue.id, timeout=30)
    assert timed_out(done)
    assert (await worker.wait_for_run(in_time.id, timeout=30)).status == "completed"
    assert ran == ["handler"]  # only the run still in time


async def test_a_worker_fails_overdue_runs_of_jobs_it_does_not_know(make_durably):
    clock = FakeClock()

    @define_job("elsewhere", timeout=10)
    async def elsewhere(step: StepContext, payload: Any) -> None: ...

    @define_job("here")
    async def here(step: StepContext, payload: Any) -> None: ...

    client = await make_durably(elsewhere, clock=clock, worker=False)
    run = await client.trigger(elsewhere, None)
    clock.now += 11
    worker = await make_durably(here, clock=clock)
    assert timed_out(await worker.wait_for_run(run.id, timeout=30))


async def test_retrigger_and_fork_keep_the_timeout_counted_from_their_own_trigger(make_durably):
    clock = FakeClock()

    @define_job("again", timeout=100)
    async def again(step: StepContext, payload: Any) -> str:
        return await step.run("one", lambda: "x")

    durably = await make_durably(again, clock=clock)
    first = await durably.trigger_and_wait(again, None, timeout=30, run_timeout=40)
    assert first.status == "completed"
    clock.now += 1000
    now = datetime.fromtimestamp(clock.now, UTC)
    retriggered = await durably.retrigger(first.id)
    forked = await durably.fork_run(first.id, from_step="one")
    assert retriggered.deadline_at == now + timedelta(seconds=40)
    assert forked.deadline_at == now + timedelta(seconds=40)


async def test_trigger_and_wait_keeps_timeout_as_the_callers_wait_and_run_timeout_as_the_deadline(
    make_durably,
):
    from durably_web import WaitTimeoutError

    gate = asyncio.Event()

    async def held() -> str:
        await gate.wait()
        return "done"

    @define_job("held")
    async def held_job(step: StepContext, payload: Any) -> str:
        return await step.run("held", held)

    durably = await make_durably(held_job)
    with pytest.raises(WaitTimeoutError):
        await durably.trigger_and_wait(held_job, None, timeout=0.2)
    [still] = await durably.get_runs()
    assert still.status == "leased" and still.deadline_at is None  # the caller gave up, not the run
    gate.set()
    done = await durably.trigger_and_wait(held_job, None, timeout=30, run_timeout=0.2)
    assert done.deadline_at is not None


# --- storage -------------------------------------------------------------------------------------------


@pytest.mark.sqlite_only
async def test_finding_overdue_runs_uses_the_deadline_index(tmp_path: Path):
    from durably_web.storage.sqlite.store import Q

    async with Durably(f"sqlite:///{tmp_path / 'plan.db'}", worker=False):
        pass
    conn = sqlite3.connect(tmp_path / "plan.db")
    try:
        rows = conn.execute("EXPLAIN QUERY PLAN " + Q["find_overdue_runs"], {"now": 5}).fetchall()
    finally:
        conn.close()
    plan = " ".join(row[-1] for row in rows)
    assert "durably_runs_deadline" in plan, plan


# --- a kill --------------------------------------------------------------------------------------------


@pytest.mark.sqlite_only
async def test_a_worker_killed_in_a_step_leaves_the_deadline_to_the_next_worker(
    db_path: Path, tmp_path: Path
):
    db_url = f"sqlite:///{db_path}"
    side_effects = tmp_path / "effects.txt"
    first = start_process("deadline", db_url, str(side_effects), "--timeout", "3")
    try:
        await wait_until(lambda: timed_lines(side_effects), timeout=30)
        first.send_signal(signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate()
    conn = sqlite3.connect(db_path)
    try:
        status, deadline_at = conn.execute("SELECT status, deadline_at FROM durably_runs").fetchone()
    finally:
        conn.close()
    assert status == "leased" and deadline_at is not None  # persisted before the step began
    await wait_until(lambda: time.time() * 1000 > deadline_at + 10, timeout=30)  # no worker alive
    second = start_process("deadline", db_url, str(side_effects), "--timeout", "3")
    result = finish_process(second)
    assert result["disposition"] == "idempotent"
    assert result["status"] == "failed" and result["error"]["type"] == "RunTimeoutError", result
    # The handler did not run again: the deadline had passed when the second worker found it.
    assert [name for name, _, _ in timed_lines(side_effects)] == ["long"]
    assert json.loads(json.dumps(result["deadline_at"])) is not None
