"""Step retries with a persisted backoff: the 'waiting' status, attempts, events, kills."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import crash_jobs
import pytest
from helpers import (
    FakeClock,
    finish_process,
    kill_once_waiting,
    start_process,
    timed_lines,
    wait_until,
)

from durably_web import (
    Durably,
    Event,
    NonRetryableError,
    RetryPolicy,
    StepContext,
    ValidationError,
    define_job,
)
from durably_web.retry import NO_RETRY
from durably_web.storage import StepRecord
from durably_web.storage.sqlite import SCHEMA_VERSION  # every migration applied

pytestmark = pytest.mark.all_backends


def failing(times: int, exc: type[Exception] = OSError):
    """A step callable that raises ``exc`` on its first ``times`` calls, then returns the call count."""
    calls = {"n": 0}

    def fn() -> int:
        calls["n"] += 1
        if calls["n"] <= times:
            raise exc(f"failure {calls['n']}")
        return calls["n"]

    fn.calls = calls  # type: ignore[attr-defined]
    return fn


# --- the policy itself -----------------------------------------------------------------------------


def test_policy_delays_grow_by_backoff_up_to_max_delay_with_bounded_jitter():
    policy = RetryPolicy(max_attempts=10, initial_delay=1.0, backoff=2.0, max_delay=5.0)
    assert [policy.delay_before(n) for n in range(2, 7)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    jittered = RetryPolicy(max_attempts=3, initial_delay=10.0, jitter=0.1)
    assert all(9.0 <= jittered.delay_before(2) <= 11.0 for _ in range(200))
    assert (
        RetryPolicy(max_attempts=2, initial_delay=1.0, max_delay=1e6, backoff=10).delay_before(10_000) == 1e6
    )


def test_policy_decides_what_is_retried():
    policy = RetryPolicy(max_attempts=3, retry_on=(OSError,), no_retry_on=(FileNotFoundError,))
    assert policy.should_retry(OSError(), 1) and policy.should_retry(OSError(), 2)
    assert not policy.should_retry(OSError(), 3)  # attempts exhausted
    assert not policy.should_retry(ValueError(), 1)
    assert not policy.should_retry(FileNotFoundError(), 1)
    assert not RetryPolicy().should_retry(NonRetryableError("no"), 1)
    assert not NO_RETRY.should_retry(RuntimeError(), 1)


@pytest.mark.parametrize(
    "options",
    [
        {"max_attempts": 0},
        {"max_attempts": True},
        {"initial_delay": -1},
        {"backoff": 0.5},
        {"jitter": 2},
        {"retry_on": (int,)},
        {"max_delay": float("nan")},
    ],
)
def test_invalid_policies_are_refused(options: dict[str, Any]):
    with pytest.raises(ValidationError):
        RetryPolicy(**options)


def test_define_job_refuses_a_retry_that_is_not_a_policy():
    with pytest.raises(ValidationError):
        define_job("bad-retry", retry={"max_attempts": 3})  # type: ignore[arg-type]


# --- retries in the engine ------------------------------------------------------------------------------


async def test_without_a_policy_a_failing_step_fails_the_run_at_once(make_durably):
    fn = failing(1)

    @define_job("no-policy")
    async def job(step: StepContext, payload: Any) -> int:
        return await step.run("flaky", fn)

    durably = await make_durably(job)
    done = await durably.trigger_and_wait(job, None, timeout=30)
    assert done.status == "failed" and fn.calls["n"] == 1
    assert [(a.attempt, a.status) for a in await durably.get_step_attempts(done.id)] == [(1, "failed")]


async def test_a_job_policy_retries_a_step_through_the_waiting_status(make_durably):
    fn = failing(2)
    events: list[Event] = []

    @define_job("retried", retry=RetryPolicy(max_attempts=5, initial_delay=0.05, backoff=2.0))
    async def job(step: StepContext, payload: Any) -> int:
        await step.run("first", lambda: 1)
        return await step.run("flaky", fn)

    durably = await make_durably(job)
    durably.on("*", events.append)
    done = await durably.trigger_and_wait(job, None, timeout=30)
    assert done.status == "completed" and done.output == 3
    assert done.attempt == 3  # one execution per attempt; "first" replayed each time
    attempts = await durably.get_step_attempts(done.id)
    assert [(a.name, a.attempt, a.status) for a in attempts] == [
        ("first", 1, "completed"),
        ("flaky", 1, "failed"),
        ("flaky", 2, "failed"),
        ("flaky", 3, "completed"),
    ]
    assert attempts[1].error is not None and attempts[1].error.message == "failure 1"
    assert attempts[2].error is not None and attempts[2].error.message == "failure 2"
    assert all(a.completed_at >= a.started_at for a in attempts)
    steps = await durably.get_steps(done.id)
    assert [(s.name, s.status) for s in steps] == [("first", "completed"), ("flaky", "completed")]

    mine = [e for e in events if e.run_id == done.id]
    retries = [e for e in mine if e.type == "step:retry"]
    assert [(e["attempt"], e["next_attempt"]) for e in retries] == [(1, 2), (2, 3)]
    assert [e["delay"] for e in retries] == [pytest.approx(0.05), pytest.approx(0.1)]
    waits = [e for e in mine if e.type == "run:waiting"]
    assert [(e["reason"], e["step_name"]) for e in waits] == [("retry", "flaky"), ("retry", "flaky")]
    assert all(w["due_at"] >= r.timestamp for w, r in zip(waits, retries, strict=True))
    types = [e.type for e in mine]
    assert types.count("run:leased") == 3 and types[-1] == "run:complete"
    assert types.index("step:retry") < types.index("run:waiting")


async def test_a_step_policy_overrides_the_job_default(make_durably):
    charge = failing(5)
    notify = failing(2, OSError)

    @define_job("override", retry=RetryPolicy(max_attempts=5, initial_delay=0.01))
    async def job(step: StepContext, payload: Any) -> int:
        if payload == "charge":
            return await step.run("charge", charge, retry=RetryPolicy(max_attempts=1))
        return await step.run(
            "notify", notify, retry=RetryPolicy(max_attempts=10, initial_delay=0.01, retry_on=(OSError,))
        )

    durably = await make_durably(job)
    failed = await durably.trigger_and_wait(job, "charge", timeout=30)
    assert failed.status == "failed" and charge.calls["n"] == 1
    done = await durably.trigger_and_wait(job, "notify", timeout=30)
    assert done.status == "completed" and notify.calls["n"] == 3


@pytest.mark.parametrize("exc", [NonRetryableError, ValueError, KeyError])
async def test_non_retryable_errors_fail_at_once(make_durably, exc):
    fn = failing(5, exc)

    @define_job(
        "non-retryable",
        retry=RetryPolicy(
            max_attempts=5,
            initial_delay=0.01,
            no_retry_on=(ValueError,),
            retry_on=(OSError, ValueError, NonRetryableError),
        ),
    )
    async def job(step: StepContext, payload: Any) -> int:
        return await step.run("once", fn)

    durably = await make_durably(job)
    done = await durably.trigger_and_wait(job, None, timeout=30)
    assert done.status == "failed" and fn.calls["n"] == 1
    assert done.error is not None and done.error.type == exc.__name__


async def test_exhausted_attempts_fail_the_run_with_the_last_error(make_durably):
    fn = failing(10)

    @define_job("exhausted", retry=RetryPolicy(max_attempts=3, initial_delay=0.01))
    async def job(step: StepContext, payload: Any) -> int:
        return await step.run("always", fn)

    durably = await make_durably(job)
    done = await durably.trigger_and_wait(job, None, timeout=30)
    assert done.status == "failed" and fn.calls["n"] == 3
    assert done.error is not None and done.error.message == "failure 3"
    attempts = await durably.get_step_attempts(done.id)
    assert [(a.attempt, a.status, a.error.message if a.error else None) for a in attempts] == [
        (1, "failed", "failure 1"),
        (2, "failed", "failure 2"),
        (3, "failed", "failure 3"),
    ]
    assert [(s.name, s.status) for s in await durably.get_steps(done.id)] == [("always", "failed")]


async def test_the_backoff_is_the_persisted_wake_up_time_not_an_in_memory_sleep(make_durably, sql):
    clock = FakeClock()
    fn = failing(1)

    @define_job("clocked", retry=RetryPolicy(max_attempts=2, initial_delay=30.0))
    async def job(step: StepContext, payload: Any) -> int:
        return await step.run("flaky", fn)

    durably = await make_durably(job, clock=clock)
    run = await durably.trigger(job, None)
    waiting = await wait_until(lambda: durably.get_runs(status="waiting"))
    assert [r.id for r in waiting] == [run.id]
    assert waiting[0].wake_at is not None and waiting[0].wake_at.timestamp() == pytest.approx(clock.now + 30)
    assert waiting[0].wait_reason == "retry" and waiting[0].wait_step == "flaky"
    assert sql("SELECT status, available_at, lease_owner FROM durably_runs") == [
        ("waiting", int((clock.now + 30) * 1000), None)
    ]
    await asyncio.sleep(0.3)  # many polling intervals: not due on the engine's clock, so not retried
    assert (await durably.get_run(run.id)).status == "waiting" and fn.calls["n"] == 1
    clock.now += 30
    done = await durably.wait_for_run(run.id, timeout=30)
    assert done.status == "completed" and fn.calls["n"] == 2


async def test_a_waiting_run_holds_no_worker_slot(make_durably):
    gate = asyncio.Event()
    other_ran = asyncio.Event()

    @define_job("slow-retry", retry=RetryPolicy(max_attempts=2, initial_delay=0.2))
    async def slow(step: StepContext, payload: Any) -> str:
        async def attempt() -> str:
            if not gate.is_set():
                gate.set()
                raise OSError("first attempt")
            await asyncio.wait_for(other_ran.wait(), 10)  # only passes if the other run got the slot
            return "done"

        return await step.run("s", attempt)

    @define_job("other")
    async def other(step: StepContext, payload: Any) -> str:
        other_ran.set()
        return "other"

    durably = await make_durably(slow, other, max_concurrent_runs=1)
    first = await durably.trigger(slow, None)
    await wait_until(lambda: durably.get_runs(status="waiting"))
    second = await durably.trigger(other, None)
    assert (await durably.wait_for_run(second.id, timeout=30)).status == "completed"
    assert (await durably.wait_for_run(first.id, timeout=30)).status == "completed"


async def test_a_waiting_run_can_be_cancelled_and_is_not_retried(make_durably):
    fn = failing(1)

    @define_job("cancel-waiting", retry=RetryPolicy(max_attempts=2, initial_delay=0.3))
    async def job(step: StepContext, payload: Any) -> int:
        return await step.run("flaky", fn)

    durably = await make_durably(job)
    run = await durably.trigger(job, None)
    await wait_until(lambda: durably.get_runs(status="waiting"))
    assert (await durably.cancel(run.id)).status == "cancelled"
    await asyncio.sleep(0.5)
    assert (await durably.get_run(run.id)).status == "cancelled" and fn.calls["n"] == 1


async def test_a_local_retry_continues_without_waiting_for_a_poll(make_durably):
    fn = failing(1)

    @define_job("prompt", retry=RetryPolicy(max_attempts=2, initial_delay=0.1))
    async def job(step: StepContext, payload: Any) -> int:
        return await step.run("flaky", fn)

    durably = await make_durably(job, polling_interval=30.0)  # a poll would take 30 s
    started = time.monotonic()
    done = await durably.trigger_and_wait(job, None, timeout=20)
    assert done.status == "completed" and time.monotonic() - started < 10


# --- migration ---------------------------------------------------------------------------------------------

FIXTURE = Path(__file__).with_name("fixtures") / "schema_v1.db"


async def test_a_database_written_by_the_previous_release_upgrades_in_place(tmp_path):
    path = tmp_path / "old.db"
    path.write_bytes(FIXTURE.read_bytes())
    conn = sqlite3.connect(path)
    before = conn.execute(
        "SELECT id, status, input, output, labels, attempt FROM durably_runs ORDER BY id"
    ).fetchall()
    steps_before = conn.execute(
        "SELECT run_id, seq, name, status, output FROM durably_steps ORDER BY run_id, seq"
    ).fetchall()
    logs_before = conn.execute("SELECT COUNT(*) FROM durably_logs").fetchone()[0]
    labels_before = conn.execute("SELECT COUNT(*) FROM durably_run_labels").fetchone()[0]
    assert conn.execute("SELECT MAX(version) FROM durably_migrations").fetchone()[0] == 1
    conn.close()
    assert before and steps_before and logs_before and labels_before

    @define_job("legacy")
    async def legacy(step: StepContext, payload: Any) -> Any:
        return await step.run("only", lambda: payload)

    async with Durably(f"sqlite:///{path}", jobs=[legacy], polling_interval=0.02) as durably:
        pending = [r for r in await durably.get_runs() if r.status == "pending"]
        assert pending
        for run in pending:
            assert (await durably.wait_for_run(run.id, timeout=30)).status == "completed"
        assert await durably.get_runs(labels={"fixture": "yes"})

    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT MAX(version) FROM durably_migrations").fetchone()[0] == SCHEMA_VERSION
        after = conn.execute(
            "SELECT id, status, input, output, labels, attempt FROM durably_runs ORDER BY id"
        ).fetchall()
        finished_before = [row for row in before if row[1] != "pending"]
        assert [row for row in after if row[0] in {r[0] for r in finished_before}] == finished_before
        steps_after = conn.execute(
            "SELECT run_id, seq, name, status, output FROM durably_steps ORDER BY run_id, seq"
        ).fetchall()
        assert set(steps_before) <= set(steps_after)
        assert conn.execute("SELECT COUNT(*) FROM durably_logs").fetchone()[0] == logs_before
        assert conn.execute("SELECT COUNT(*) FROM durably_run_labels").fetchone()[0] == labels_before
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        conn.close()


# --- real kills -------------------------------------------------------------------------------------------


async def test_sigkill_during_a_backoff_then_restart_retries_at_the_persisted_time(db_url, db_path, tmp_path):
    side_effects = tmp_path / "side-effects.txt"
    first, (run_id, _, due_ms) = await kill_once_waiting(
        db_url, db_path, side_effects, kind="retry", seconds=3
    )
    name = f"flaky-{run_id}"
    assert [(n, pid) for n, pid, _ in timed_lines(side_effects)] == [(name, first.pid)]
    assert time.time() < due_ms / 1000, "the backoff ended before the kill; nothing was tested"

    second = start_process("wait", db_url, str(side_effects), "--kind", "retry", "--seconds", "3")
    result = finish_process(second)
    assert result["disposition"] == "idempotent" and result["status"] == "completed"
    lines = timed_lines(side_effects)
    assert [(n, pid) for n, pid, _ in lines] == [(name, first.pid), (name, result["pid"])]
    retried_at = lines[1][2]
    assert retried_at >= due_ms / 1000 - 0.01  # not at once...
    assert retried_at <= due_ms / 1000 + 5.0  # ...and not never (poll 0.02 s; slack for a loaded machine)

    async with Durably(db_url, worker=False) as client:
        attempts = await client.get_step_attempts(run_id)
    assert [(a.attempt, a.status) for a in attempts] == [(1, "failed"), (2, "completed")]
    assert attempts[0].error is not None and "first attempt fails" in attempts[0].error.message


async def test_two_workers_on_one_file_never_both_execute_a_retry(db_url, tmp_path):
    side_effects = tmp_path / "side-effects.txt"
    count = 6
    async with Durably(db_url, worker=False) as client:
        runs = [
            await client.trigger(
                crash_jobs.flaky_job, crash_jobs.WaitIn(side_effects=str(side_effects), seconds=0.3)
            )
            for _ in range(count)
        ]
        workers = [start_process("serve-waits", db_url, str(count)) for _ in range(2)]
        try:
            results = [finish_process(worker) for worker in workers]
        finally:
            for worker in workers:
                if worker.poll() is None:
                    worker.kill()
        for run in runs:
            done = await client.get_run(run.id)
            assert done.status == "completed", done
            attempts = await client.get_step_attempts(run.id)
            assert [(a.attempt, a.status) for a in attempts] == [(1, "failed"), (2, "completed")]
    lines = timed_lines(side_effects)
    per_run = {run.id: [line for line in lines if line[0] == f"flaky-{run.id}"] for run in runs}
    assert all(len(found) == 2 for found in per_run.values()), per_run  # one failure, one retry, each once
    assert {pid for _, pid, _ in lines} <= {r["pid"] for r in results}
    json.dumps(per_run)


async def test_wait_run_is_fenced_and_writes_the_attempt_with_the_waiting_state(make_durably, sql):
    @define_job("fenced-wait")
    async def job(step: StepContext, payload: Any) -> None:
        return None

    client = await make_durably(job, worker=False)
    run = await client.trigger(job, None)
    store = client.store
    now = client.now_ms()
    claimed = await store.claim_run(
        worker_id="w", job_names=["fenced-wait"], now=now, lease_until=now + 60_000
    )
    assert claimed is not None and claimed.id == run.id
    failed = StepRecord(run.id, 0, "s", "failed", None, '{"type":"OSError"}', now, now, attempt=1)
    stale = claimed.lease_generation - 1
    assert not await store.wait_run(
        run.id, stale, until=now + 5000, reason="retry", step_name="s", now=now, failed_attempt=failed
    )
    assert sql("SELECT COUNT(*) FROM durably_step_attempts") == [(0,)]
    assert sql("SELECT status FROM durably_runs") == [("leased",)]
    assert await store.wait_run(
        run.id,
        claimed.lease_generation,
        until=now + 5000,
        reason="retry",
        step_name="s",
        now=now,
        failed_attempt=failed,
    )
    assert sql("SELECT status, available_at, lease_owner FROM durably_runs") == [
        ("waiting", now + 5000, None)
    ]
    assert sql("SELECT seq, attempt FROM durably_step_attempts") == [(0, 1)]
    # Not claimable before its time, claimable at it.
    assert (
        await store.claim_run(worker_id="w", job_names=["fenced-wait"], now=now + 4999, lease_until=now)
        is None
    )
    again = await store.claim_run(
        worker_id="w", job_names=["fenced-wait"], now=now + 5000, lease_until=now + 9000
    )
    assert again is not None and again.attempt == 2
