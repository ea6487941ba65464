"""resume_run (a failed or cancelled run continues after its last completed step) and fork_run."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter as Tally
from typing import Any

import crash_jobs
import pytest
from helpers import finish_process, read_lines, start_process, wait_for_lines, wait_until
from pydantic import BaseModel

from durably_web import (
    ConflictError,
    Durably,
    Event,
    NotFoundError,
    RetryPolicy,
    StepContext,
    ValidationError,
    define_job,
)

pytestmark = pytest.mark.all_backends


class Counter:
    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.fail: set[str] = set()

    def step(self, name: str):
        def fn() -> str:
            self.calls[name] = self.calls.get(name, 0) + 1
            if name in self.fail:
                raise OSError(f"{name} failed")
            return f"{name}-value"

        return fn


def three_step_job(counter: Counter, name: str = "three", retry: RetryPolicy | None = None):
    @define_job(name, retry=retry)
    async def job(step: StepContext, payload: Any) -> list[str]:
        return [await step.run(n, counter.step(n)) for n in ("fetch", "save-to-db", "notify")]

    return job


async def test_resume_continues_a_failed_run_after_its_last_completed_step(make_durably):
    counter = Counter()
    counter.fail = {"save-to-db"}
    job = three_step_job(counter)
    events: list[Event] = []
    durably = await make_durably(job)
    durably.on("*", events.append)
    failed = await durably.trigger_and_wait(job, None, timeout=30)
    assert failed.status == "failed" and failed.attempt == 1

    counter.fail.clear()
    resumed = await durably.resume_run(failed.id)
    assert resumed.status == "pending" and resumed.attempt == 1 and resumed.error is None
    done = await durably.wait_for_run(failed.id, timeout=30)
    assert done.status == "completed" and done.attempt == 2
    assert done.output == ["fetch-value", "save-to-db-value", "notify-value"]
    assert counter.calls == {"fetch": 1, "save-to-db": 2, "notify": 1}
    attempts = await durably.get_step_attempts(done.id)
    assert [(a.name, a.attempt, a.status) for a in attempts] == [
        ("fetch", 1, "completed"),
        ("save-to-db", 1, "failed"),
        ("save-to-db", 2, "completed"),
        ("notify", 1, "completed"),
    ]
    assert [s.status for s in await durably.get_steps(done.id)] == ["completed"] * 3
    [resume] = [e for e in events if e.type == "run:resume"]
    assert resume.run_id == done.id and resume["previous_status"] == "failed" and resume["attempt"] == 1


async def test_resume_gives_the_failed_step_a_fresh_retry_budget(make_durably):
    counter = Counter()
    counter.fail = {"save-to-db"}
    job = three_step_job(counter, "budget", RetryPolicy(max_attempts=2, initial_delay=0.01))
    durably = await make_durably(job)
    failed = await durably.trigger_and_wait(job, None, timeout=30)
    assert failed.status == "failed" and counter.calls["save-to-db"] == 2
    await durably.resume_run(failed.id)
    again = await durably.wait_for_run(failed.id, timeout=30)
    assert again.status == "failed" and counter.calls["save-to-db"] == 4
    assert [a.attempt for a in await durably.get_step_attempts(failed.id) if a.name == "save-to-db"] == [
        1,
        2,
        3,
        4,
    ]


async def test_resume_continues_a_cancelled_waiting_run(make_durably):
    @define_job("cancel-then-resume")
    async def job(step: StepContext, payload: Any) -> str:
        await step.run("a", lambda: "a")
        await step.sleep("nap", 0.2)
        return "after-nap"

    durably = await make_durably(job)
    run = await durably.trigger(job, None)
    await wait_until(lambda: durably.get_runs(status="waiting"))
    await durably.cancel(run.id)
    await durably.resume_run(run.id)
    done = await durably.wait_for_run(run.id, timeout=30)
    assert done.status == "completed" and done.output == "after-nap"


async def test_resume_refuses_runs_that_are_not_failed_or_cancelled(make_durably):
    counter = Counter()
    job = three_step_job(counter, "refuse")
    durably = await make_durably(job)
    done = await durably.trigger_and_wait(job, None, timeout=30)
    with pytest.raises(ConflictError):
        await durably.resume_run(done.id)
    with pytest.raises(NotFoundError):
        await durably.resume_run("no-such-run")


async def test_resume_refuses_a_pending_run(make_durably):
    job = three_step_job(Counter(), "pending-refuse")
    client = await make_durably(job, worker=False)
    run = await client.trigger(job, None)
    with pytest.raises(ConflictError):
        await client.resume_run(run.id)


class In(BaseModel):
    n: int


async def test_fork_copies_the_steps_before_from_step_and_runs_the_rest_again(make_durably):
    counter = Counter()

    @define_job("forkable", input=In)
    async def job(step: StepContext, payload: In) -> list[str]:
        return [await step.run(n, counter.step(n)) for n in ("fetch", "save-to-db", "notify")]

    durably = await make_durably(job)
    source = await durably.trigger_and_wait(job, In(n=1), timeout=30, labels={"team": "a"})
    assert source.status == "completed"
    forked = await durably.fork_run(source.id, from_step="save-to-db")
    assert forked.id != source.id and forked.forked_from == source.id and forked.disposition == "created"
    assert forked.labels == {"team": "a"} and forked.input == In(n=1)
    done = await durably.wait_for_run(forked.id, timeout=30)
    assert done.status == "completed" and done.forked_from == source.id
    assert counter.calls == {"fetch": 1, "save-to-db": 2, "notify": 2}
    assert [s.name for s in await durably.get_steps(forked.id)] == ["fetch", "save-to-db", "notify"]
    assert (await durably.get_run(source.id)).forked_from is None

    from_start = await durably.fork_run(source.id, from_step="fetch")
    assert (await durably.wait_for_run(from_start.id, timeout=30)).status == "completed"
    assert counter.calls["fetch"] == 2


async def test_fork_needs_a_recorded_step(make_durably):
    job = three_step_job(Counter(), "fork-missing")
    durably = await make_durably(job)
    source = await durably.trigger_and_wait(job, None, timeout=30)
    with pytest.raises(NotFoundError):
        await durably.fork_run(source.id, from_step="no-such-step")
    with pytest.raises(ValidationError):
        await durably.fork_run(source.id, from_step="")
    with pytest.raises(NotFoundError):
        await durably.fork_run("no-such-run", from_step="fetch")
    assert len(await durably.get_runs()) == 1  # nothing was created


async def test_a_resumed_run_survives_sigkill_and_never_repeats_its_completed_steps(
    db_url, db_path, tmp_path
):
    side_effects = tmp_path / "side-effects.txt"
    steps = [f"step-{i}" for i in range(crash_jobs.STEP_COUNT)]
    failing = start_process(
        "steps", db_url, str(side_effects), "--delay", "0.01", env={"CRASH_FAIL_STEP": "step-2"}
    )
    failed = finish_process(failing)
    assert failed["status"] == "failed" and "step-2 fails" in failed["error"]["message"]
    assert [name for name, _ in read_lines(side_effects)] == steps[:3]

    async with Durably(db_url, worker=False) as client:
        resumed = await client.resume_run(failed["id"])
        assert resumed.status == "pending" and resumed.attempt == 1
        with pytest.raises(ConflictError):
            await client.resume_run(failed["id"])  # pending now

    second = start_process("steps", db_url, str(side_effects), "--delay", "0.3", "--lease", "1.0")
    try:
        await wait_for_lines(side_effects, 5, second)  # the resumed run is inside step-3
        second.send_signal(signal.SIGKILL)
        assert second.wait(10) == -signal.SIGKILL
    finally:
        if second.poll() is None:
            second.kill()
        second.communicate()

    third = start_process("steps", db_url, str(side_effects), "--delay", "0.01", "--lease", "1.0")
    done = finish_process(third)
    assert done["status"] == "completed" and done["output"] == {"total": crash_jobs.EXPECTED_TOTAL}
    assert done["id"] == failed["id"]
    counts = Tally(name for name, _ in read_lines(side_effects))
    assert counts["step-0"] == counts["step-1"] == 1  # completed before the failure: never again
    assert counts["step-2"] >= 2  # the failed step executed again after resume_run
    assert set(counts) == set(steps)
    async with Durably(db_url, worker=False) as client:
        attempts = [(a.name, a.attempt, a.status) for a in await client.get_step_attempts(failed["id"])]
    assert attempts[:4] == [
        ("step-0", 1, "completed"),
        ("step-1", 1, "completed"),
        ("step-2", 1, "failed"),
        ("step-2", 2, "completed"),
    ]


async def test_resume_refuses_a_running_or_waiting_run(make_durably):
    gate = asyncio.Event()

    @define_job("busy")
    async def busy(step: StepContext, payload: Any) -> None:
        if payload == "run":
            async def hold() -> None:
                await asyncio.wait_for(gate.wait(), 10)

            await step.run("hold", hold)
        else:
            await step.sleep("nap", 3600)

    durably = await make_durably(busy)
    running = await durably.trigger(busy, "run")
    await wait_until(lambda: durably.get_runs(status="leased"))
    with pytest.raises(ConflictError):
        await durably.resume_run(running.id)
    gate.set()
    sleeping = await durably.trigger(busy, "sleep")
    [waiting] = await wait_until(lambda: durably.get_runs(status="waiting"))
    assert waiting.to_dict()["wake_at"] is not None and waiting.to_dict()["wait_reason"] == "sleep"
    with pytest.raises(ConflictError):
        await durably.resume_run(sleeping.id)
