"""Signals: wait_for_signal / send_signal, kept, idempotent, typed, with timeouts and replay."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime
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
from pydantic import BaseModel

from durably_web import (
    ConflictError,
    Durably,
    Event,
    NonDeterministicReplayError,
    NotFoundError,
    StepContext,
    ValidationError,
    WaitTimeoutError,
    define_job,
)

pytestmark = pytest.mark.all_backends


class Approval(BaseModel):
    by: str


def approval_job(name: str = "approve", timeout: float | None = None, after: list[str] | None = None):
    @define_job(name, signals={"approval": Approval})
    async def job(step: StepContext, payload: Any) -> str:
        await step.run("before", lambda: "b")
        try:
            approval = await step.wait_for_signal("approval", type=Approval, timeout=timeout)
        except WaitTimeoutError:
            return "timed out"
        assert isinstance(approval, Approval)
        if after is not None:
            await step.run("after", lambda: after.append(approval.by))
        return f"approved by {approval.by}"

    return job


async def test_a_signal_wakes_a_waiting_run_with_its_typed_payload(make_durably):
    after: list[str] = []
    job = approval_job(after=after)
    events: list[Event] = []
    durably = await make_durably(job)
    durably.on("*", events.append)
    run = await durably.trigger(job, None)
    [waiting] = await wait_until(lambda: durably.get_runs(status="waiting"))
    assert waiting.wait_reason == "signal" and waiting.wait_step == "approval" and waiting.wake_at is None
    assert await durably.send_signal(run.id, "approval", {"by": "ana"}, signal_id="mail-123") == "delivered"
    done = await durably.wait_for_run(run.id, timeout=30)
    assert done.status == "completed" and done.output == "approved by ana" and after == ["ana"]
    steps = await durably.get_steps(run.id)
    assert [(s.name, s.output) for s in steps] == [
        ("before", "b"),
        ("approval", {"payload": {"by": "ana"}}),
        ("after", None),
    ]
    received = [e for e in events if e.type == "signal:received"]
    assert [(e["name"], e["signal_id"], e["disposition"]) for e in received] == [
        ("approval", "mail-123", "delivered")
    ]
    waits = [e for e in events if e.type == "run:waiting"]
    assert [(e["reason"], e["due_at"]) for e in waits] == [("signal", None)]
    # Finished: no more signals.
    with pytest.raises(ConflictError):
        await durably.send_signal(run.id, "approval", {"by": "bo"})


async def test_a_signal_sent_before_the_wait_is_kept_for_it(make_durably):
    gate = asyncio.Event()

    @define_job("early")
    async def job(step: StepContext, payload: Any) -> Any:
        async def hold() -> None:
            await asyncio.wait_for(gate.wait(), 10)

        await step.run("hold", hold)
        return await step.wait_for_signal("go")

    durably = await make_durably(job)
    run = await durably.trigger(job, None)
    await wait_until(lambda: durably.get_runs(status="leased"))
    assert await durably.send_signal(run.id, "go", [1, 2]) == "stored"
    gate.set()
    done = await durably.wait_for_run(run.id, timeout=30)
    assert done.status == "completed" and done.output == [1, 2] and done.attempt == 1


async def test_the_same_signal_id_is_delivered_once(make_durably):
    @define_job("twice")
    async def job(step: StepContext, payload: Any) -> list[Any]:
        first = await step.wait_for_signal("tick")
        second = await step.wait_for_signal("tock", timeout=0.5)
        return [first, second]

    client = await make_durably(job, worker=False)
    run = await client.trigger(job, None)
    assert await client.send_signal(run.id, "tick", 1, signal_id="s-1") == "stored"
    assert await client.send_signal(run.id, "tick", 2, signal_id="s-1") == "duplicate"
    worker = await make_durably(job)
    done = await worker.wait_for_run(run.id, timeout=30)
    assert done.status == "failed" and done.error is not None and done.error.type == "WaitTimeoutError"
    assert [(s.name, s.output) for s in await worker.get_steps(run.id)] == [
        ("tick", {"payload": 1}),
        ("tock", {"timeout": True}),
    ]


async def test_a_payload_failing_the_wait_model_raises_validation_error_and_changes_nothing(
    make_durably, sql
):
    job = approval_job("validated")
    durably = await make_durably(job)
    run = await durably.trigger(job, None)
    await wait_until(lambda: durably.get_runs(status="waiting"))
    with pytest.raises(ValidationError) as info:
        await durably.send_signal(run.id, "approval", {"who": "nobody"})
    assert info.value.errors
    assert sql("SELECT COUNT(*) FROM durably_signals") == [(0,)]
    assert (await durably.get_run(run.id)).status == "waiting"


async def test_a_bad_payload_from_a_sender_without_the_type_is_rejected_by_the_wait(make_durably, sql):
    @define_job("untyped-sender")  # no signals=: a client without the job cannot validate
    async def job(step: StepContext, payload: Any) -> str:
        approval = await step.wait_for_signal("approval", type=Approval)
        return approval.by

    worker = await make_durably(job)
    client = await make_durably(worker=False)
    run = await worker.trigger(job, None)
    await wait_until(lambda: worker.get_runs(status="waiting"))
    assert await client.send_signal(run.id, "approval", {"who": "x"}, signal_id="bad") == "delivered"
    # The wait drops it with a warning in the run's log and keeps waiting; the run does not fail.
    async def warnings() -> list[Any]:
        return [log for log in await worker.get_logs(run.id) if log.level == "warning"]

    logs = await wait_until(warnings)
    assert "rejected" in logs[0].message and logs[0].data["signal"] == "approval"
    assert (await worker.get_run(run.id)).status == "waiting"
    assert sql("SELECT COUNT(*) FROM durably_signals") == [(0,)]
    # The same signal_id may be sent again, now with a payload that fits.
    assert await client.send_signal(run.id, "approval", {"by": "ana"}, signal_id="bad") == "delivered"
    done = await worker.wait_for_run(run.id, timeout=30)
    assert done.status == "completed" and done.output == "ana"


async def test_unknown_runs_and_bad_names_are_refused(make_durably):
    durably = await make_durably(approval_job("refusals"))
    with pytest.raises(NotFoundError):
        await durably.send_signal("no-such-run", "approval", {"by": "x"})
    run = await durably.trigger("refusals", None)
    with pytest.raises(ValidationError):
        await durably.send_signal(run.id, "", {})
    with pytest.raises(ValidationError):
        await durably.send_signal(run.id, "x", object())


async def test_a_signal_wait_times_out_at_its_deadline_and_replays_the_timeout(make_durably):
    clock = FakeClock()
    job = approval_job("deadline", timeout=86400)
    durably = await make_durably(job, clock=clock)
    run = await durably.trigger(job, None)
    [waiting] = await wait_until(lambda: durably.get_runs(status="waiting"))
    assert waiting.wake_at == datetime.fromtimestamp(clock.now + 86400, UTC)
    await asyncio.sleep(0.2)
    assert (await durably.get_run(run.id)).status == "waiting"
    clock.now += 86400
    done = await durably.wait_for_run(run.id, timeout=30)
    assert done.output == "timed out"
    # A fork from the wait itself waits again (the steps before it are copied).
    forked = await durably.fork_run(run.id, from_step="approval")
    assert (await wait_until(lambda: durably.get_runs(status="waiting")))[0].id == forked.id


async def test_a_signal_wait_keeps_its_deadline_across_executions(make_durably):
    clock = FakeClock()
    job = approval_job("kept-deadline", timeout=100)
    durably = await make_durably(job, clock=clock)
    run = await durably.trigger(job, None)
    await wait_until(lambda: durably.get_runs(status="waiting"))
    start_deadline = (await durably.get_run(run.id)).wake_at
    await durably.send_signal(run.id, "other-signal", 1)  # not what it waits for: stays waiting
    assert (await durably.get_run(run.id)).wake_at == start_deadline
    clock.now += 100
    assert (await durably.wait_for_run(run.id, timeout=30)).output == "timed out"


async def test_replayed_signal_wait_raises_for_a_changed_kind(make_durably):
    version = {"v": 1}

    @define_job("swap-after")
    async def job(step: StepContext, payload: Any) -> Any:
        if version["v"] == 1:
            await step.wait_for_signal("s")
        else:
            await step.sleep("s", 0)
        await step.run("boom", lambda: 1 / 0)

    durably = await make_durably(job)
    run = await durably.trigger(job, None)
    await durably.send_signal(run.id, "s", 1)
    failed = await durably.wait_for_run(run.id, timeout=30)
    assert failed.status == "failed" and failed.error is not None and failed.error.type == "ZeroDivisionError"
    version["v"] = 2
    await durably.resume_run(run.id)
    again = await durably.wait_for_run(run.id, timeout=30)
    assert again.error is not None and again.error.type == NonDeterministicReplayError.__name__


async def test_sigkill_while_waiting_for_a_signal_then_signal_and_restart(db_url, db_path, tmp_path):
    side_effects = tmp_path / "side-effects.txt"
    first, (run_id, _, _) = await kill_once_waiting(db_url, db_path, side_effects, kind="signal", seconds=600)
    async with Durably(db_url, worker=False) as client:
        # Sent while no worker is alive: kept, and the waiting run is due at once.
        assert await client.send_signal(run_id, "go", "ana", signal_id="mail-1") == "delivered"
        assert await client.send_signal(run_id, "go", "ana", signal_id="mail-1") == "duplicate"
    second = start_process("wait", db_url, str(side_effects), "--kind", "signal", "--seconds", "600")
    result = finish_process(second)
    assert result["disposition"] == "idempotent" and result["status"] == "completed"
    assert result["output"] == "go from ana"
    lines = timed_lines(side_effects)
    assert [(name, pid) for name, pid, _ in lines] == [("before", first.pid), ("after", result["pid"])]
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("SELECT COUNT(*), COUNT(consumed_at) FROM durably_signals").fetchone() == (1, 1)
    finally:
        conn.close()
