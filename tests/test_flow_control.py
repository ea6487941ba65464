"""Flow control: max_concurrent, rate_limit, priority and debounce, on every backend, across
workers and processes, and through a SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import FakeClock, wait_until

from durably_web import Durably, StepContext, ValidationError, define_job

pytestmark = pytest.mark.all_backends

FLOW_JOBS = Path(__file__).with_name("flow_jobs.py")


def start_flow_process(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(FLOW_JOBS), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


class Gate:
    """Runs that block in their step until opened; counts how many run at once."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.running = 0
        self.most = 0
        self.started: list[Any] = []

    async def enter(self, payload: Any) -> None:
        self.running += 1
        self.most = max(self.most, self.running)
        self.started.append(payload)
        try:
            await self.open.wait()
        finally:
            self.running -= 1


# --- definitions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"max_concurrent": 0},
        {"max_concurrent": True},
        {"max_concurrent": 1.5},
        {"rate_limit": 5},
        {"rate_limit": (0, 1)},
        {"rate_limit": (1, 0)},
        {"rate_limit": (1, 2, 3)},
        {"rate_limit": (1, float("inf"))},
        {"debounce": 0},
        {"debounce": -1},
        {"debounce": "1"},
    ],
)
def test_flow_options_are_validated_when_the_job_is_defined(options):
    with pytest.raises(ValidationError, match="job 'j'"):
        define_job("j", **options)


async def test_a_debounced_job_needs_a_concurrency_key_and_priority_must_be_an_int(make_durably):
    @define_job("debounced", debounce=5)
    async def debounced(step: StepContext, payload: Any) -> None:
        return None

    durably = await make_durably(debounced, worker=False)
    with pytest.raises(ValidationError, match="concurrency_key"):
        await durably.trigger(debounced, 1)
    for bad in (1.5, True, "2", 2**31):
        with pytest.raises(ValidationError, match="priority"):
            await durably.trigger(debounced, 1, concurrency_key="k", priority=bad)
    assert await durably.get_runs() == []


# --- priority ------------------------------------------------------------------------------------


async def test_runs_are_claimed_by_priority_then_oldest(make_durably):
    order: list[str] = []

    @define_job("ordered")
    async def ordered(step: StepContext, payload: str) -> None:
        order.append(payload)

    client = await make_durably(ordered, worker=False)
    await client.trigger(ordered, "a")
    await client.trigger(ordered, "b", priority=5)
    await client.trigger(ordered, "c", priority=5)
    await client.trigger(ordered, "d", priority=-1)
    batch = await client.batch_trigger(ordered, ["f"], priority=7)
    assert (await client.get_run(batch[0].id)).priority == 7
    await make_durably(ordered, max_concurrent_runs=1)
    await wait_until(lambda: len(order) == 5)
    assert order == ["f", "b", "c", "a", "d"]


# --- max_concurrent --------------------------------------------------------------------------------


async def test_max_concurrent_holds_across_two_workers_on_one_database(make_durably):
    gate = Gate()

    @define_job("limited", max_concurrent=2)
    async def limited(step: StepContext, payload: int) -> None:
        await step.run("work", gate.enter, payload)

    first = await make_durably(limited, max_concurrent_runs=4)
    await make_durably(limited, max_concurrent_runs=4)
    runs = [await first.trigger(limited, i) for i in range(6)]
    await wait_until(lambda: gate.running == 2)
    # Both workers poll every 20 ms meanwhile; a third lease would show here.
    await asyncio.sleep(0.3)
    assert gate.running == 2
    assert [r.status for r in await first.get_runs(status="pending")].count("pending") == 4
    gate.open.set()
    for run in runs:
        assert (await first.wait_for_run(run.id, timeout=20)).status == "completed"
    assert gate.most == 2


async def test_max_concurrent_holds_across_two_processes(db_url, tmp_path):
    side_effects = tmp_path / "limited.txt"

    @define_job("limited", max_concurrent=1)
    async def limited(step: StepContext, payload: int) -> None:
        return None

    async with Durably(db_url, jobs=[limited], worker=False) as client:
        for i in range(8):
            await client.trigger(limited, i)
    processes = [start_flow_process("limited", db_url, str(side_effects), "8") for _ in range(2)]
    for process in processes:
        _, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
    lines = [line.split(" ") for line in side_effects.read_text().splitlines()]
    assert len(lines) == 16
    # Each start is followed by its own end: never two runs of the job at once.
    for start, end in zip(lines[::2], lines[1::2], strict=True):
        assert (start[0], end[0], start[1]) == ("start", "end", end[1])


# --- rate_limit ------------------------------------------------------------------------------------


async def test_rate_limit_starts_count_runs_per_sliding_window(make_durably):
    clock = FakeClock()
    started: list[int] = []

    @define_job("rated", rate_limit=(2, 60))
    async def rated(step: StepContext, payload: int) -> None:
        started.append(payload)

    durably = await make_durably(rated, clock=clock)
    for i in range(5):
        await durably.trigger(rated, i)
        if i < 2:  # the two starts one second apart
            await wait_until(lambda i=i: len(started) == i + 1)
        clock.now += 1
    await asyncio.sleep(0.2)  # many polls: the window is full
    assert started == [0, 1]
    first_start = (await durably.get_runs(status="completed"))[-1].started_at
    assert first_start is not None
    # The first start leaves the window 60 s after it: one more run, not two.
    store = durably.store
    from durably_web.storage.base import JobLimits

    limits = {"rated": JobLimits(rate_count=2, rate_window_ms=60_000)}
    due = await store.next_claimable_at(job_names=["rated"], limits=limits, now=durably.now_ms())
    assert due == int(first_start.timestamp() * 1000) + 60_000
    clock.now = due / 1000
    await wait_until(lambda: len(started) == 3)
    await asyncio.sleep(0.2)
    assert started == [0, 1, 2]
    clock.now += 61
    await wait_until(lambda: len(started) == 5)


async def test_a_run_continuing_after_a_wait_is_no_new_start(make_durably):
    clock = FakeClock()
    gate = Gate()

    @define_job("rated-sleeper", rate_limit=(1, 3600))
    async def sleeper(step: StepContext, payload: int) -> None:
        await step.sleep("nap", 10)
        await step.run("work", gate.enter, payload)

    durably = await make_durably(sleeper, clock=clock)
    first = await durably.trigger(sleeper, 1)
    second = await durably.trigger(sleeper, 2)
    await wait_until(lambda: _is_waiting(durably, first.id))
    clock.now += 11
    await wait_until(lambda: gate.started == [1])  # claimed again though the window is full
    gate.open.set()
    assert (await durably.wait_for_run(first.id, timeout=10)).status == "completed"
    assert (await durably.get_run(second.id)).status == "pending"


async def _is_waiting(durably: Durably, run_id: str) -> bool:
    return (await durably.get_run(run_id)).status == "waiting"


# --- debounce --------------------------------------------------------------------------------------


async def test_a_burst_of_debounced_triggers_becomes_one_run_with_the_latest_input(make_durably):
    clock = FakeClock()
    seen: list[int] = []

    @define_job("debounced", debounce=30)
    async def debounced(step: StepContext, payload: int) -> int:
        seen.append(payload)
        return payload

    durably = await make_durably(debounced, clock=clock)
    runs = []
    for value in range(1, 5):
        runs.append(await durably.trigger(debounced, value, concurrency_key="k"))
        clock.now += 10  # each within the debounce of the one before
    assert {run.id for run in runs} == {runs[0].id}
    assert [run.disposition for run in runs] == ["created", "debounced", "debounced", "debounced"]
    pending = await durably.get_run(runs[0].id)
    assert (pending.status, pending.input) == ("pending", 4)
    assert pending.not_before is not None
    assert int(pending.not_before.timestamp()) == int(clock.now - 10 + 30)
    await asyncio.sleep(0.2)
    assert seen == []  # 20 s after the last trigger: not yet
    other = await durably.trigger(debounced, 9, concurrency_key="other")  # keys are separate
    assert other.id != runs[0].id and other.disposition == "created"
    clock.now += 21
    done = await durably.wait_for_run(runs[0].id, timeout=10)
    assert (done.status, done.output) == ("completed", 4)
    assert seen[0] == 4
    # A run that started is not changed: the next trigger starts a new debounce.
    later = await durably.trigger(debounced, 5, concurrency_key="k")
    assert later.id != runs[0].id and later.disposition == "created"
    assert len(await durably.get_runs(job_name="debounced")) == 3


# --- kills ------------------------------------------------------------------------------------------


async def test_sigkill_after_a_burst_of_debounced_triggers_leaves_exactly_one_run(db_url, tmp_path):
    ready = tmp_path / "ready"
    process = start_flow_process("debounce", db_url, str(ready))
    try:
        await wait_until(lambda: ready.exists() or process.poll() is not None, timeout=30)
        assert ready.exists(), process.communicate()[1]
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.communicate()

    @define_job("debounced", debounce=30)
    async def debounced(step: StepContext, payload: int) -> int:
        return payload

    clock = FakeClock(start=__import__("time").time())
    async with Durably(db_url, jobs=[debounced], clock=clock, polling_interval=0.02) as durably:
        runs = await durably.get_runs(job_name="debounced")
        assert [(r.status, r.input) for r in runs] == [("pending", 3)]
        again = await durably.trigger(debounced, 4, concurrency_key="k")
        assert (again.id, again.disposition) == (runs[0].id, "debounced")
        clock.now += 31
        done = await durably.wait_for_run(runs[0].id, timeout=10)
        assert (done.status, done.output) == ("completed", 4)
        assert len(await durably.get_runs(job_name="debounced")) == 1


async def test_sigkill_with_a_full_rate_window_keeps_the_limit_after_restart(db_url, tmp_path):
    side_effects = tmp_path / "rated.txt"
    process = start_flow_process("rate", db_url, str(side_effects))

    def starts() -> int:
        return len(side_effects.read_text().splitlines()) if side_effects.exists() else 0

    try:
        await wait_until(lambda: starts() >= 2 or process.poll() is not None, timeout=30)
        await asyncio.sleep(0.3)  # a third start would show here
        assert starts() == 2, process.poll()
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.communicate()

    done: list[int] = []

    # The version flow_jobs.py's "rated" has: runs it started are left to that version (safe deploys).
    @define_job("rated", rate_limit=(2, 3600), version="rated-1")
    async def rated(step: StepContext, payload: int) -> None:
        async def work() -> None:
            done.append(payload)

        await step.run("work", work)

    async with Durably(
        db_url, jobs=[rated], polling_interval=0.02, lease_duration=1.0, lease_renew_interval=0.1
    ) as durably:
        # The two killed runs are taken over once their leases expire (not new starts) ...
        await wait_until(lambda: len(done) == 2, timeout=30)
        await asyncio.sleep(0.3)
        runs = await durably.get_runs(job_name="rated")
        # ... and the window, full of their starts, still holds the other two back.
        assert sorted(r.status for r in runs) == ["completed", "completed", "pending", "pending"]
        assert all(r.started_at is None for r in runs if r.status == "pending")
