"""step.all: branches that run at once, each an ordinary checkpointed step, joined."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from typing import Any

import pytest
from helpers import (
    finish_process,
    kill_once_waiting,
    read_lines,
    start_process,
    timed_lines,
    wait_event,
    wait_until,
)
from pydantic import BaseModel

from durably_web import (
    Durably,
    Event,
    NonRetryableError,
    RetryPolicy,
    StepBranch,
    StepContext,
    StepError,
    define_job,
)

pytestmark = pytest.mark.all_backends


class Calls:
    """How often each branch's function ran."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1


async def test_async_branches_overlap_and_results_come_back_in_the_mappings_order(make_durably):
    started = {"users": asyncio.Event(), "teams": asyncio.Event()}

    async def fetch(name: str, other: str, org: str) -> str:
        started[name].set()
        # Only returns if the other branch is running at the same time: run one after the
        # other, the first would wait here until the timeout and fail the run.
        await asyncio.wait_for(started[other].wait(), 10)
        return f"{name} of {org}"

    @define_job("overlap")
    async def job(step: StepContext, payload: Any) -> Any:
        before = await step.run("before", lambda: "b")
        results = await step.all(
            {"users": (fetch, "users", "teams", "acme"), "teams": (fetch, "teams", "users", "acme")}
        )
        after = await step.run("after", lambda: "a")
        return {"keys": list(results), "results": results, "around": [before, after]}

    durably = await make_durably(job)
    done = await durably.trigger_and_wait(job, None, timeout=30)
    assert done.status == "completed", done.error
    assert done.output == {
        "keys": ["users", "teams"],
        "results": {"users": "users of acme", "teams": "teams of acme"},
        "around": ["b", "a"],
    }
    # A contiguous block of positions in the mapping's order, between the steps around it.
    steps = await durably.get_steps(done.id)
    assert [(s.index, s.name, s.status) for s in steps] == [
        (0, "before", "completed"),
        (1, "users", "completed"),
        (2, "teams", "completed"),
        (3, "after", "completed"),
    ]


async def test_tuples_bare_callables_and_branch_objects_with_kwargs_and_types(make_durably):
    class Team(BaseModel):
        name: str
        size: int

    def make_team(name: str, *, size: int) -> dict[str, Any]:
        return {"name": name, "size": size}

    seen: dict[str, Any] = {}

    @define_job("forms")
    async def job(step: StepContext, payload: Any) -> Any:
        branch = step.branch(make_team, "core", size=3, type=Team)
        assert isinstance(branch, StepBranch)
        results = await step.all({"plain": lambda: 7, "tuple": (max, 4, 9), "typed": branch})
        seen["typed"] = results["typed"]
        return {k: v for k, v in results.items() if k != "typed"}

    durably = await make_durably(job)
    done = await durably.trigger_and_wait(job, None, timeout=30)
    assert done.status == "completed", done.error
    assert done.output == {"plain": 7, "tuple": 9}
    assert seen["typed"] == Team(name="core", size=3)
    assert [s.output for s in await durably.get_steps(done.id)] == [7, 9, {"name": "core", "size": 3}]


async def test_sync_branches_run_at_once_in_the_workers_threads(make_durably):
    barrier = threading.Barrier(2, timeout=10)  # broken (and the run failed) unless both wait at once
    threads: list[int] = []

    def blocking(name: str) -> str:
        threads.append(threading.get_ident())
        barrier.wait()
        return name

    @define_job("sync-branches")
    async def job(step: StepContext, payload: Any) -> Any:
        return await step.all({"left": (blocking, "l"), "right": (blocking, "r")})

    durably = await make_durably(job)
    done = await durably.trigger_and_wait(job, None, timeout=30)
    assert done.status == "completed", done.error
    assert done.output == {"left": "l", "right": "r"}
    assert len(set(threads)) == 2 and threading.get_ident() not in threads


async def test_every_branch_has_its_own_step_events_and_log_step_name(make_durably):
    a_logged = asyncio.Event()

    async def branch_a(step: StepContext) -> str:
        step.log.info("from a")
        a_logged.set()
        return "a"

    async def branch_b(step: StepContext) -> str:
        await asyncio.wait_for(a_logged.wait(), 10)  # a has logged while b runs: names must not mix
        step.log.info("from b")
        return "b"

    @define_job("branch-events")
    async def job(step: StepContext, payload: Any) -> Any:
        step.log.info("before")
        out = await step.all({"b": (branch_b, step), "a": (branch_a, step)})
        step.log.info("after")
        return out

    durably = await make_durably(job)
    events: list[Event] = []
    durably.on("*", events.append)
    done = await durably.trigger_and_wait(job, None, timeout=30)
    assert done.status == "completed", done.error
    logs = [(log.message, log.step_name) for log in await durably.get_logs(done.id)]
    assert logs == [("before", None), ("from a", "a"), ("from b", "b"), ("after", None)]
    per_step = [(e.type, e["step_name"], e["step_index"]) for e in events if e.type.startswith("step:")]
    assert sorted(per_step) == sorted(
        [("step:start", "b", 0), ("step:start", "a", 1), ("step:complete", "a", 1), ("step:complete", "b", 0)]
    )


async def test_the_first_failing_branch_by_position_is_raised_and_its_siblings_are_recorded(make_durably):
    third_failed = asyncio.Event()

    async def second() -> None:
        await asyncio.wait_for(third_failed.wait(), 10)  # fails after the third, in time
        raise ValueError("second fails")

    async def third() -> None:
        third_failed.set()
        raise KeyError("third fails")

    @define_job("first-failure")
    async def job(step: StepContext, payload: Any) -> Any:
        await step.all({"ok": lambda: "fine", "second": second, "third": third})

    durably = await make_durably(job)
    events: list[Event] = []
    durably.on("run:fail", events.append)
    done = await durably.trigger_and_wait(job, None, timeout=30)
    assert done.status == "failed"
    assert (done.error.type, done.error.message) == ("ValueError", "second fails")
    assert events[0]["step_name"] == "second"
    steps = {s.name: s for s in await durably.get_steps(done.id)}
    assert (steps["ok"].status, steps["ok"].output) == ("completed", "fine")
    assert steps["second"].status == "failed" and steps["second"].error.type == "ValueError"
    assert steps["third"].status == "failed" and steps["third"].error.type == "KeyError"


async def test_a_resumed_run_runs_only_the_branches_that_did_not_complete(make_durably):
    calls = Calls()
    fail = {"flaky": True}

    def branch(name: str) -> str:
        calls.count(name)
        if fail.get(name):
            raise RuntimeError(f"{name} fails")
        return name.upper()

    @define_job("resume-branches")
    async def job(step: StepContext, payload: Any) -> Any:
        return await step.all({name: (branch, name) for name in ("steady", "flaky", "other")})

    durably = await make_durably(job)
    failed = await durably.trigger_and_wait(job, None, timeout=30)
    assert failed.status == "failed" and calls.counts == {"steady": 1, "flaky": 1, "other": 1}
    fail["flaky"] = False
    await durably.resume_run(failed.id)
    done = await durably.wait_for_run(failed.id, timeout=30)
    assert done.status == "completed", done.error
    assert done.output == {"steady": "STEADY", "flaky": "FLAKY", "other": "OTHER"}
    assert calls.counts == {"steady": 1, "flaky": 2, "other": 1}
    attempts = [(a.name, a.attempt, a.status) for a in await durably.get_step_attempts(done.id)]
    assert attempts == [
        ("steady", 1, "completed"),
        ("flaky", 1, "failed"),
        ("flaky", 2, "completed"),
        ("other", 1, "completed"),
    ]


async def test_a_branch_retries_on_its_own_policy_after_its_siblings_finished(make_durably):
    calls = Calls()
    release_slow = asyncio.Event()

    def flaky() -> str:
        calls.count("flaky")
        if calls.counts["flaky"] == 1:
            raise OSError("first attempt fails")
        return "recovered"

    async def slow() -> str:
        calls.count("slow")
        await asyncio.wait_for(release_slow.wait(), 10)
        return "slow done"

    @define_job("branch-retry")  # the job's own policy retries nothing: the branch's does
    async def job(step: StepContext, payload: Any) -> Any:
        return await step.all(
            {
                "flaky": step.branch(flaky, retry=RetryPolicy(max_attempts=3, initial_delay=0.05)),
                "slow": slow,
                "steady": lambda: calls.count("steady") or "steady",
            }
        )

    durably = await make_durably(job)
    events: list[Event] = []
    durably.on("*", events.append)
    run = await durably.trigger(job, None)
    await wait_until(lambda: calls.counts.get("flaky") == 1 and calls.counts.get("steady") == 1)
    # The failed branch does not make the run wait while a sibling is still running.
    await asyncio.sleep(0.2)
    assert (await durably.get_run(run.id)).status == "leased"
    assert not [e for e in events if e.type == "run:waiting"]
    release_slow.set()
    done = await durably.wait_for_run(run.id, timeout=30)
    assert done.status == "completed", done.error
    assert done.output == {"flaky": "recovered", "slow": "slow done", "steady": "steady"}
    assert calls.counts == {"flaky": 2, "slow": 1, "steady": 1}  # the siblings were replayed
    waits = [(e["reason"], e["step_name"]) for e in events if e.type == "run:waiting"]
    assert waits == [("retry", "flaky")]
    retries = [(e["step_name"], e["attempt"], e["next_attempt"]) for e in events if e.type == "step:retry"]
    assert retries == [("flaky", 1, 2)]
    attempts = [(a.name, a.attempt, a.status) for a in await durably.get_step_attempts(run.id)]
    assert attempts == [
        ("flaky", 1, "failed"),
        ("flaky", 2, "completed"),
        ("slow", 1, "completed"),
        ("steady", 1, "completed"),
    ]


async def test_several_branches_to_retry_wait_once_for_the_soonest_and_all_run_again(make_durably):
    calls = Calls()

    def failing_once(name: str) -> str:
        calls.count(name)
        if calls.counts[name] == 1:
            raise OSError(f"{name} fails once")
        return name

    @define_job("two-retries")
    async def job(step: StepContext, payload: Any) -> Any:
        return await step.all(
            {
                "slow-retry": step.branch(failing_once, "slow-retry", retry=RetryPolicy(initial_delay=0.3)),
                "quick-retry": step.branch(
                    failing_once, "quick-retry", retry=RetryPolicy(initial_delay=0.05)
                ),
            }
        )

    durably = await make_durably(job)
    events: list[Event] = []
    durably.on("*", events.append)
    done = await durably.trigger_and_wait(job, None, timeout=30)
    assert done.status == "completed", done.error
    assert calls.counts == {"slow-retry": 2, "quick-retry": 2}
    waits = [(e["reason"], e["step_name"]) for e in events if e.type == "run:waiting"]
    assert waits == [("retry", "quick-retry")]
    assert sorted(e["step_name"] for e in events if e.type == "step:retry") == ["quick-retry", "slow-retry"]


async def test_a_branch_failing_for_good_ends_the_step_all_without_retrying_the_others(make_durably):
    calls = Calls()

    def retried() -> None:
        calls.count("retried")
        raise OSError("would be retried")

    def fatal() -> None:
        calls.count("fatal")
        raise NonRetryableError("fatal")

    @define_job("fatal-branch")
    async def job(step: StepContext, payload: Any) -> Any:
        await step.all(
            {"retried": step.branch(retried, retry=RetryPolicy(initial_delay=0.01)), "fatal": fatal}
        )

    durably = await make_durably(job)
    done = await durably.trigger_and_wait(job, None, timeout=30)
    assert done.status == "failed" and done.error.type == "NonRetryableError"
    assert calls.counts == {"retried": 1, "fatal": 1}


async def test_cancel_during_a_step_all_stops_every_branch(make_durably):
    running: list[str] = []
    stopped: list[str] = []
    both = asyncio.Event()
    later: list[str] = []

    async def forever(name: str) -> None:
        running.append(name)
        if len(running) == 2:
            both.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            stopped.append(name)
            raise

    @define_job("cancel-all")
    async def job(step: StepContext, payload: Any) -> None:
        await step.all({"one": (forever, "one"), "two": (forever, "two")})
        await step.run("later", lambda: later.append("ran"))

    durably = await make_durably(job)
    run = await durably.trigger(job, None)
    await wait_event(both)
    await durably.cancel(run.id)
    await wait_until(lambda: len(stopped) == 2)
    await wait_until(lambda: not durably._worker.active if durably._worker else True)
    assert (await durably.get_run(run.id)).status == "cancelled"
    assert sorted(stopped) == ["one", "two"] and later == []
    assert await durably.get_steps(run.id) == []
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("durably-branch-")]


@pytest.mark.parametrize("resumed", [["b", "a"], ["a", "c"]])
async def test_a_changed_step_all_is_caught_as_non_deterministic_replay(make_durably, resumed):
    executed: list[str] = []
    holding = asyncio.Event()

    async def hold() -> None:
        holding.set()
        await asyncio.Event().wait()

    @define_job("nondet-all")
    async def job(step: StepContext, payload: Any) -> None:
        names = ["a", "b"] if step.attempt == 1 else resumed
        await step.all({name: (executed.append, name) for name in names})
        await step.run("hold", hold)

    first = await make_durably(job, shutdown_timeout=0.2)
    run = await first.trigger(job, None)
    await wait_event(holding)
    await first.stop()
    second = await make_durably(job)
    done = await second.wait_for_run(run.id, timeout=30)
    assert done.status == "failed" and done.error.type == "NonDeterministicReplayError"
    assert executed == ["a", "b"]  # nothing ran again


async def test_a_failed_branchs_name_called_at_another_position_is_non_deterministic_replay(make_durably):
    # The failed branch stays in the run's history (the handler caught its error). A later
    # execution that calls its name at another position is refused before any branch runs:
    # step names stay unique within a run although SQLite keeps no index on them.
    executed: list[str] = []
    holding = asyncio.Event()

    def branch(name: str) -> str:
        executed.append(name)
        if name == "x":
            raise RuntimeError("x fails")
        return name

    async def hold() -> None:
        holding.set()
        await asyncio.Event().wait()

    @define_job("moved-failed-branch")
    async def job(step: StepContext, payload: Any) -> None:
        names = ["x", "a"] if step.attempt == 1 else ["y", "a", "x"]
        try:
            await step.all({name: (branch, name) for name in names})
        except RuntimeError:
            pass
        await step.run("hold", hold)

    first = await make_durably(job, shutdown_timeout=0.2)
    run = await first.trigger(job, None)
    await wait_event(holding)
    await first.stop()
    assert sorted(executed) == ["a", "x"]
    second = await make_durably(job)
    done = await second.wait_for_run(run.id, timeout=30)
    assert done.status == "failed" and done.error.type == "NonDeterministicReplayError"
    assert "'x'" in done.error.message and "#0" in done.error.message
    assert sorted(executed) == ["a", "x"]  # nothing ran again
    steps = [(s.index, s.name, s.status) for s in await second.get_steps(run.id)]
    assert steps == [(0, "x", "failed"), (1, "a", "completed")]


async def test_a_branch_that_needs_the_network_waits_offline_while_its_siblings_complete(make_durably):
    from test_network import NO_RECHECK, SwitchedNetwork, waiting_offline

    network = SwitchedNetwork(online=False)
    calls = Calls()

    @define_job("offline-branch")
    async def job(step: StepContext, payload: Any) -> Any:
        return await step.all(
            {
                "local": lambda: calls.count("local") or "local",
                "upload": step.branch(lambda: calls.count("upload") or "sent", needs_network=True),
            }
        )

    durably = await make_durably(job, network=network, offline_recheck_interval=NO_RECHECK)
    run = await durably.trigger(job, None)
    waiting = await waiting_offline(durably, run.id)
    assert waiting.wait_step == "upload" and calls.counts == {"local": 1}
    network.back_online()
    done = await durably.wait_for_run(run.id, timeout=30)
    assert done.status == "completed", done.error
    assert done.output == {"local": "local", "upload": "sent"}
    assert calls.counts == {"local": 1, "upload": 1}


@pytest.mark.parametrize(
    ("branches", "message"),
    [
        ([("a", 1)], "not callable"),
        ("not a mapping", "mapping"),
        ({"a": 42}, "expected (fn, *args)"),
        ({"a": ()}, "expected (fn, *args)"),
        ({"": lambda: 1}, "non-empty string"),
        ({"first": lambda: 1}, "used twice"),
    ],
)
async def test_bad_step_all_arguments_are_refused_with_a_step_error(make_durably, branches, message):
    errors: list[BaseException] = []

    @define_job("bad-all")
    async def job(step: StepContext, payload: Any) -> None:
        await step.run("first", lambda: 0)
        value: Any = dict(branches) if isinstance(branches, list) else branches
        if isinstance(branches, list):
            value = {"a": (1,)}
        try:
            await step.all(value)
        except StepError as exc:
            errors.append(exc)

    durably = await make_durably(job)
    done = await durably.trigger_and_wait(job, None, timeout=30)
    assert done.status == "completed"
    assert len(errors) == 1 and message in str(errors[0])


# --- a real kill ------------------------------------------------------------------------------------


async def completed_steps(client: Durably) -> list[str]:
    runs = await client.get_runs()
    if not runs:
        return []
    return [s.name for s in await client.get_steps(runs[0].id) if s.status == "completed"]


async def test_sigkill_during_a_step_all_then_restart_runs_only_the_unfinished_branch(db_url, tmp_path):
    side_effects = tmp_path / "side-effects.txt"
    first = start_process("parallel", db_url, str(side_effects))
    try:

        def started() -> bool:
            if first.poll() is not None:
                raise AssertionError(f"worker exited early: {first.communicate()}")
            return bool(read_lines(side_effects))  # past its migration: the schema is there

        await wait_until(started, timeout=30)
        async with Durably(db_url, worker=False) as client:

            async def fast_recorded_slow_blocked() -> bool:
                started()
                names = [name for name, _ in read_lines(side_effects)]
                return "slow" in names and "fast" in await completed_steps(client)

            await wait_until(fast_recorded_slow_blocked, timeout=30)
            first.send_signal(signal.SIGKILL)
            assert first.wait(10) == -signal.SIGKILL
            assert await completed_steps(client) == ["fast"]
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate()

    second = start_process("parallel", db_url, str(side_effects))
    result = finish_process(second)
    assert result["disposition"] == "idempotent" and result["status"] == "completed"
    assert result["output"] == {"fast": "fast", "slow": "slow", "after": 2}
    lines = read_lines(side_effects)
    assert sorted(lines) == sorted(
        [("fast", first.pid), ("slow", first.pid), ("slow", result["pid"]), ("after", result["pid"])]
    )


async def test_sigkill_while_a_step_all_waits_for_a_branch_retry_then_restart_retries_only_it(
    db_url, db_path, tmp_path
):
    side_effects = tmp_path / "side-effects.txt"
    first, (run_id, _, due_ms) = await kill_once_waiting(
        db_url, db_path, side_effects, kind="parallel-retry", seconds=3
    )
    assert time.time() < due_ms / 1000, "the backoff ended before the kill; nothing was tested"
    second = start_process("wait", db_url, str(side_effects), "--kind", "parallel-retry", "--seconds", "3")
    result = finish_process(second)
    assert result["disposition"] == "idempotent" and result["status"] == "completed"
    assert result["output"] == {"steady": "1", "flaky": "ok"}
    lines = timed_lines(side_effects)
    assert sorted((name, pid) for name, pid, _ in lines) == sorted(
        [("steady", first.pid), ("flaky", first.pid), ("flaky", result["pid"])]
    )
    retried_at = next(at for name, pid, at in lines if name == "flaky" and pid == result["pid"])
    assert retried_at >= due_ms / 1000 - 0.01  # at the persisted time, not at the restart
    async with Durably(db_url, worker=False) as client:
        attempts = [(a.name, a.attempt, a.status) for a in await client.get_step_attempts(run_id)]
    assert attempts == [("steady", 1, "completed"), ("flaky", 1, "failed"), ("flaky", 2, "completed")]
