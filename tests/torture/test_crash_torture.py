"""The crash torture, short: SIGKILL real worker processes 8 times in a row and check the
invariants from the steps' own side-effect log (the long run is benchmarks/torture.py),
and unit tests of the checker itself on hand-made logs.

The torture runs on a SQLite file and, marked ``postgres``, on a PostgreSQL database.
Replay a failure with the seed it printed: ``DURABLY_TORTURE_SEED=N pytest tests/torture``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import pytest
from harness import Expected, TortureResult, check_log, parse_log, run_torture
from helpers import wait_until
from torture_jobs import LIMITED_MAX, step_value

from durably_web import Durably, StepContext, define_job

KILLS = 8


@pytest.fixture(
    scope="module",
    params=[
        (1, "sqlite"),
        (2, "sqlite"),
        # The same torture with the workers on one PostgreSQL database (the session's cluster).
        pytest.param((1, "postgres"), marks=pytest.mark.postgres),
        pytest.param((2, "postgres"), marks=pytest.mark.postgres),
    ],
    ids=["single-worker", "two-workers-one-file", "single-worker-postgres", "two-workers-postgres"],
)
def torture_result(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TortureResult:
    """One torture per mode, shared by the assertions below (each states one thing)."""
    processes, backend = request.param
    workdir = tmp_path_factory.mktemp(f"torture-{processes}-{backend}")
    if backend == "sqlite":
        return run_torture(workdir, kills=KILLS, processes=processes)
    cluster = request.getfixturevalue("postgres_cluster")
    name = f"torture_{uuid.uuid4().hex[:12]}"
    try:
        return run_torture(workdir, kills=KILLS, processes=processes, db_url=cluster.create_database(name))
    finally:
        cluster.drop_database(name)


def test_torture_finds_no_violation(torture_result: TortureResult) -> None:
    assert torture_result.violations == [], torture_result.report()


def test_torture_killed_as_often_as_asked(torture_result: TortureResult) -> None:
    assert torture_result.kills == KILLS, torture_result.summary()


def test_a_kill_interrupted_a_step_in_flight(torture_result: TortureResult) -> None:
    assert torture_result.interrupted > 0, torture_result.summary()


def test_some_run_outlived_its_lease_so_renewal_mattered(torture_result: TortureResult) -> None:
    assert torture_result.outlasted_lease > 0, torture_result.summary()


def test_every_run_ended(torture_result: TortureResult) -> None:
    r = torture_result
    assert r.completed + r.failed + r.cancelled == r.runs, r.summary()


def test_some_run_completed(torture_result: TortureResult) -> None:
    assert torture_result.completed > 0, torture_result.summary()


def test_some_run_failed(torture_result: TortureResult) -> None:
    # The mix always holds a run with a failing step that is never cancelled.
    assert torture_result.failed > 0, torture_result.summary()


def test_steps_were_retried_after_a_backoff_and_runs_slept(torture_result: TortureResult) -> None:
    # The mix always holds a step that fails twice then succeeds, one whose retries run out,
    # and a run with two sleeps, none of them ever cancelled.
    r = torture_result
    assert r.retried >= 3 and r.slept >= 2, r.summary()


def test_signals_were_sent_early_and_twice_and_consumed(torture_result: TortureResult) -> None:
    # The mix's signal run gets one signal before it reaches its wait, that signal's id again,
    # and one more signal for its second wait.
    r = torture_result
    assert r.signals_early > 0 and r.signals_duplicate > 0 and r.signals_consumed >= 2, r.summary()


def test_runs_waited_for_the_network_and_failed_offline_without_using_up_attempts(
    torture_result: TortureResult,
) -> None:
    # The network is down when the workers start: the mix's network-aware run without
    # needs_network fails offline at its step (a recorded attempt flagged offline), the one
    # with needs_network waits before attempting it; both must complete.
    r = torture_result
    assert r.offline_waits >= 2 and r.offline_failures >= 1, r.summary()


def test_a_run_timed_out_at_its_deadline_as_intended(torture_result: TortureResult) -> None:
    # The mix's torture-deadline run sleeps 5 s under a 0.6 s timeout; whoever is alive fails it.
    assert torture_result.timed_out >= 1, torture_result.summary()


def test_the_max_concurrent_limit_was_reached_and_never_passed(torture_result: TortureResult) -> None:
    # The mix holds four runs of a job with max_concurrent=2, two of them first by priority;
    # the checker's rule (no third run live at once) is in the violations above.
    r = torture_result
    assert r.limited_runs >= 4 and r.limited_peak == LIMITED_MAX, r.summary()


def test_runs_started_at_once_were_killed_and_proven(torture_result: TortureResult) -> None:
    # Every worker calls trigger_and_wait itself for a few runs, each once it is idle: the
    # engine creates the run leased to it and starts it without a claim; the second kill is
    # aimed at such a run in flight. Their checks (test_checker_at_once.py) are in the violations.
    r = torture_result
    assert r.started_at_once > 0 and r.at_once_resumed > 0, r.summary()


# --- the checker, on hand-made logs (durable waiting: test_checker_waits.py; runs started at once:
# test_checker_at_once.py) -------------------------------------------------------------------------

LEASE_NS = 3_000_000_000


def committed(run_id: str, name: str, xid: str, *, of: str | None = None) -> dict[str, Any]:
    """A committed step row whose result came from execution ``xid`` of run ``of``."""
    source = of or run_id
    output = {"v": step_value(source, name), "x": xid, "run": source, "step": name}
    return {"run_id": run_id, "name": name, "status": "completed", "output": json.dumps(output)}


def one_step_run(run_id: str, *, attempt: int) -> dict[str, Any]:
    total = step_value(run_id, "s0")
    return {
        "id": run_id,
        "job_name": "torture-chain",
        "status": "completed",
        "output": json.dumps({"total": total}),
        "idempotency_key": None,
        "concurrency_key": None,
        "attempt": attempt,
    }


def check(
    log_lines: list[str],
    step_rows: list[dict[str, Any]],
    *,
    runs: dict[str, dict[str, Any]] | None = None,
    killed: dict[int, int] | None = None,
) -> TortureResult:
    """Run the checker on a one-step run R1 (unless ``runs`` says otherwise)."""
    runs = runs or {"R1": one_step_run("R1", attempt=2)}
    expected = {run_id: Expected(run_id=run_id, steps=1) for run_id in runs}
    result = TortureResult()
    log = parse_log("\n".join(log_lines) + "\n")
    check_log(log, runs, step_rows, expected, killed or {}, result, lease_ns=LEASE_NS)
    return result


def test_checker_accepts_a_step_killed_in_flight_then_taken_over() -> None:
    result = check(
        ["B R1 s0 100 x1 1 1000", "B R1 s0 200 x2 2 5000", "E R1 s0 200 x2 2 6000"],
        [committed("R1", "s0", "x2")],
        killed={100: 2000},
    )
    assert result.violations == []
    assert result.duplicates == 1


def test_checker_rejects_two_live_workers_running_one_step_at_once() -> None:
    # The first worker was killed, but only long after the second had begun the step.
    result = check(
        ["B R1 s0 100 x1 1 1000", "B R1 s0 200 x2 2 1500", "E R1 s0 200 x2 2 2500"],
        [committed("R1", "s0", "x2")],
        killed={100: 9000},
    )
    assert any("two live executions at once" in v for v in result.violations), result.violations


def test_checker_rejects_a_takeover_while_the_first_execution_still_ran() -> None:
    # Nobody was killed: a lease lapsed under a live worker, which went on with the step.
    result = check(
        [
            "B R1 s0 100 x1 1 1000",
            "B R1 s0 200 x2 2 1500",
            "E R1 s0 100 x1 1 2000",
            "L R1 100 2100 LeaseLostError",
            "E R1 s0 200 x2 2 2500",
        ],
        [committed("R1", "s0", "x2")],
    )
    assert any("two live executions at once" in v for v in result.violations), result.violations


def test_checker_accepts_a_lease_lapse_after_the_first_execution_stopped() -> None:
    result = check(
        [
            "B R1 s0 100 x1 1 1000",
            "E R1 s0 100 x1 1 2000",
            "L R1 100 2100 LeaseLostError",
            "B R1 s0 200 x2 2 3000",
            "E R1 s0 200 x2 2 4000",
        ],
        [committed("R1", "s0", "x2")],
    )
    assert result.violations == []
    assert (result.lease_lapses, result.lease_lost_errors) == (1, 1)


def test_checker_rejects_a_lease_lost_error_nobody_explains() -> None:
    result = check(
        ["B R1 s0 100 x1 2 1000", "E R1 s0 100 x1 2 2000", "L R1 100 2100 LeaseLostError"],
        [committed("R1", "s0", "x1")],
    )
    assert any("which nobody took over" in v for v in result.violations), result.violations


def test_checker_rejects_a_committed_step_that_never_ran() -> None:
    result = check([], [committed("R1", "s0", "x9")])
    assert any("recorded, never executed" in v for v in result.violations), result.violations


def test_checker_rejects_a_run_handed_another_runs_result() -> None:
    runs = {"R1": one_step_run("R1", attempt=1), "R2": one_step_run("R2", attempt=1)}
    result = check(
        ["B R1 s0 100 x1 1 1000", "E R1 s0 100 x1 1 2000"],
        [committed("R1", "s0", "x1"), committed("R2", "s0", "x1", of="R1")],
        runs=runs,
    )
    assert any("R2/s0 committed the result of R1/s0" in v for v in result.violations), result.violations


def test_checker_rejects_a_step_run_again_after_its_commit() -> None:
    result = check(
        ["B R1 s0 100 x1 1 1000", "E R1 s0 100 x1 1 2000", "B R1 s0 200 x2 2 5000", "E R1 s0 200 x2 2 6000"],
        [committed("R1", "s0", "x1")],
        killed={100: 3000},
    )
    assert any("ran again after its commit" in v for v in result.violations), result.violations


def test_checker_rejects_a_step_run_twice_in_one_attempt() -> None:
    result = check(
        ["B R1 s0 100 x1 2 1000", "E R1 s0 100 x1 2 2000", "B R1 s0 100 x2 2 3000", "E R1 s0 100 x2 2 4000"],
        [committed("R1", "s0", "x2")],
    )
    assert any("ran 2 times in attempt 2" in v for v in result.violations), result.violations


def test_checker_rejects_a_step_that_never_ended_in_a_live_worker() -> None:
    result = check(["B R1 s0 100 x1 2 1000"], [])
    assert any("began and never ended" in v for v in result.violations), result.violations


def test_checker_rejects_overlapping_runs_of_one_concurrency_key() -> None:
    runs = {"RA": one_step_run("RA", attempt=1), "RB": one_step_run("RB", attempt=1)}
    for row in runs.values():
        row["concurrency_key"] = "k"
    lines = ["B RA s0 1 xa 1 100", "B RB s0 2 xb 1 200", "E RA s0 1 xa 1 300", "E RB s0 2 xb 1 400"]
    rows = [committed("RA", "s0", "xa"), committed("RB", "s0", "xb")]
    result = check(lines, rows, runs=runs)
    assert any("concurrency key k" in v and "overlapped" in v for v in result.violations), result.violations


def test_checker_accepts_runs_of_one_concurrency_key_one_after_the_other() -> None:
    runs = {"RA": one_step_run("RA", attempt=1), "RB": one_step_run("RB", attempt=1)}
    for row in runs.values():
        row["concurrency_key"] = "k"
    lines = ["B RA s0 1 xa 1 100", "E RA s0 1 xa 1 300", "B RB s0 2 xb 1 301", "E RB s0 2 xb 1 400"]
    rows = [committed("RA", "s0", "xa"), committed("RB", "s0", "xb")]
    assert check(lines, rows, runs=runs).violations == []


def limited_runs(*run_ids: str, attempts: dict[str, int] | None = None) -> dict[str, dict[str, Any]]:
    """One-step runs of the job with max_concurrent=LIMITED_MAX."""
    runs = {run_id: one_step_run(run_id, attempt=(attempts or {}).get(run_id, 1)) for run_id in run_ids}
    for row in runs.values():
        row["job_name"] = "torture-limited"
    return runs


def test_checker_rejects_more_runs_of_a_limited_job_at_once_than_its_max_concurrent() -> None:
    lines = [
        "B RA s0 1 xa 1 100",
        "B RB s0 2 xb 1 200",
        "B RC s0 3 xc 1 250",
        "E RA s0 1 xa 1 300",
        "E RB s0 2 xb 1 400",
        "E RC s0 3 xc 1 500",
    ]
    rows = [committed(r, "s0", x) for r, x in (("RA", "xa"), ("RB", "xb"), ("RC", "xc"))]
    result = check(lines, rows, runs=limited_runs("RA", "RB", "RC"))
    assert result.limited_peak == 3
    assert [v for v in result.violations if "max_concurrent=2" in v] != [], result.violations


def test_checker_ends_a_killed_limited_runs_step_at_the_kill() -> None:
    # RA's process is killed at 250 with its step in flight; RC begins after that kill and
    # RA's next attempt after RB's end: never more than two live at once.
    lines = [
        "B RA s0 1 xa 1 100",
        "B RB s0 2 xb 1 200",
        "B RC s0 3 xc 1 260",
        "E RB s0 2 xb 1 300",
        "B RA s0 4 xa2 2 310",
        "E RC s0 3 xc 1 400",
        "E RA s0 4 xa2 2 500",
    ]
    rows = [committed(r, "s0", x) for r, x in (("RA", "xa2"), ("RB", "xb"), ("RC", "xc"))]
    result = check(lines, rows, runs=limited_runs("RA", "RB", "RC", attempts={"RA": 2}), killed={1: 250})
    assert result.violations == [] and result.limited_peak == 2 and result.limited_runs == 3


def test_checker_rejects_a_run_nobody_accepted() -> None:
    runs = {"R1": one_step_run("R1", attempt=1)}
    result = TortureResult()
    log = parse_log("B R1 s0 100 x1 1 1000\nE R1 s0 100 x1 1 2000\n")
    check_log(log, runs, [committed("R1", "s0", "x1")], {}, {}, result, lease_ns=LEASE_NS)
    assert any("was never accepted" in v for v in result.violations), result.violations


# --- found by the torture: a cancelled run holds its key until its handler stops ---------------------


async def test_cancelled_run_in_flight_step_does_not_overlap_the_next_run_of_its_key(make_durably) -> None:
    spans: dict[str, list[float]] = {}
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    def blocking(label: str) -> str:
        spans[label] = [time.monotonic()]
        loop.call_soon_threadsafe(started.set)
        time.sleep(0.5)
        spans[label].append(time.monotonic())
        return label

    @define_job("keyed")
    async def keyed(step: StepContext, payload: Any) -> str:
        return await step.run("work", blocking, payload)

    durably: Durably = await make_durably(keyed)
    first = await durably.trigger(keyed, "first", concurrency_key="k")
    await asyncio.wait_for(started.wait(), 10)
    second = await durably.trigger(keyed, "second", concurrency_key="k")
    await durably.cancel(first.id)
    done = await durably.wait_for_run(second.id, timeout=10)
    assert done.status == "completed"
    await wait_until(lambda: len(spans["first"]) == 2)
    assert spans["second"][0] >= spans["first"][1], (
        "the next run of the key started before the cancelled one stopped"
    )


# --- the checker on a step.all (torture-parallel) ---------------------------------------------------


def parallel_failed_run(run_id: str) -> dict[str, Any]:
    return {
        "id": run_id,
        "job_name": "torture-parallel",
        "status": "failed",
        "output": None,
        "idempotency_key": None,
        "concurrency_key": None,
        "attempt": 1,
    }


def parallel_check(step_rows: list[dict[str, Any]]) -> TortureResult:
    """A torture-parallel run R1 of branches p0, p1, p2 whose p1 fails on purpose: s0 and
    every branch ran to their end in one attempt."""
    runs = {"R1": parallel_failed_run("R1")}
    expected = {"R1": Expected(run_id="R1", job="torture-parallel", branches=3, fail_branch=1)}
    lines = [f"B R1 {name} 100 x{i} 1 {1000 + i}" for i, name in enumerate(["s0", "p0", "p1", "p2"])]
    lines += [f"E R1 {name} 100 x{i} 1 {2000 + i}" for i, name in enumerate(["s0", "p0", "p1", "p2"])]
    result = TortureResult()
    check_log(parse_log("\n".join(lines) + "\n"), runs, step_rows, expected, {}, result, lease_ns=LEASE_NS)
    return result


def test_checker_accepts_a_failed_step_all_whose_siblings_were_recorded() -> None:
    failed = {"run_id": "R1", "name": "p1", "status": "failed", "output": None}
    rows = [committed("R1", "s0", "x0"), committed("R1", "p0", "x1"), failed, committed("R1", "p2", "x3")]
    assert parallel_check(rows).violations == []


def test_checker_rejects_a_failed_step_all_that_lost_a_siblings_result() -> None:
    failed = {"run_id": "R1", "name": "p1", "status": "failed", "output": None}
    result = parallel_check([committed("R1", "s0", "x0"), committed("R1", "p0", "x1"), failed])
    assert any("lacks committed steps ['p2']" in v for v in result.violations), result.violations


def test_checker_counts_a_killed_step_alls_branches_as_in_flight_not_as_a_lapse() -> None:
    # Pid 100 was killed with its step.all running: p0 had ended (its commit not yet made),
    # p1 was in flight; pid 200 re-ran both in attempt 2. Neither is a lease lapse.
    names = ["s0", "p0", "p1", "s1"]
    total = sum(step_value("R1", name) for name in names)
    run = {**parallel_failed_run("R1"), "status": "completed", "attempt": 2}
    run["output"] = json.dumps({"total": total})
    lines = [
        "B R1 s0 100 x0 1 1000",
        "E R1 s0 100 x0 1 1100",
        "B R1 p0 100 x1 1 1200",
        "E R1 p0 100 x1 1 1300",
        "B R1 p1 100 x2 1 1310",
        "B R1 p0 200 x3 2 5000",
        "E R1 p0 200 x3 2 5100",
        "B R1 p1 200 x4 2 5000",
        "E R1 p1 200 x4 2 5100",
        "B R1 s1 200 x5 2 5200",
        "E R1 s1 200 x5 2 5300",
    ]
    rows = [committed("R1", n, x) for n, x in (("s0", "x0"), ("p0", "x3"), ("p1", "x4"), ("s1", "x5"))]
    expected = {"R1": Expected(run_id="R1", job="torture-parallel", branches=2)}
    result = TortureResult()
    log = parse_log("\n".join(lines) + "\n")
    check_log(log, {"R1": run}, rows, expected, {100: 1400}, result, lease_ns=LEASE_NS)
    assert result.violations == []
    assert (result.duplicates, result.lease_lapses) == (2, 0)
