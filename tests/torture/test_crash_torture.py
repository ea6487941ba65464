"""The crash torture, short: SIGKILL real worker processes 8 times in a row and check the
invariants from the steps' own side-effect log (the long run is benchmarks/torture.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from harness import Line, Torture, TortureResult, run_torture
from helpers import wait_until

from durably_web import Durably, StepContext, define_job


def assert_clean(result: TortureResult, kills: int) -> None:
    assert result.violations == [], "\n".join(result.violations)
    assert result.kills == kills
    assert result.runs >= 6 and result.steps > 0
    assert result.completed + result.failed + result.cancelled == result.runs
    assert result.completed > 0 and result.failed > 0  # the mix really was mixed


def test_sigkill_torture_single_worker(tmp_path: Path) -> None:
    result = run_torture(tmp_path, kills=8, processes=1)
    assert_clean(result, 8)


def test_sigkill_torture_two_workers_racing_on_one_file(tmp_path: Path) -> None:
    result = run_torture(tmp_path, kills=8, processes=2)
    assert_clean(result, 8)


def test_the_checker_catches_re_execution_lost_runs_and_overlaps(tmp_path: Path) -> None:
    """Forge the side effects a broken engine would leave, and watch the checker object."""
    harness = Torture(
        tmp_path,
        kills=2,
        processes=1,
        seed=7,
        lease=1.0,
        renew=0.2,
        poll=0.05,
        max_kill_delay=0.4,
        drain_timeout=60,
    )
    result = asyncio.run(harness.run())
    assert result.violations == [], result.violations
    lines = (tmp_path / "side-effects.log").read_text().splitlines()
    begin = next(line.split() for line in lines if line.startswith("B "))
    run_id, step, pid, attempt, t = begin[1], begin[2], int(begin[3]), int(begin[4]), int(begin[5])
    forged = [
        # A committed step executed again by a later attempt (the promise broken).
        f"B {run_id} {step} {pid} {attempt + 5} {t + 1}",
        f"E {run_id} {step} {pid} {attempt + 5} {t + 2}",
        # A second execution by a process that was never killed.
        f"B {run_id} {step} 999999 {attempt} {t + 3}",
        # A side effect of a run nobody accepted.
        f"T {run_id} 01BOGUSCHILD 999999 {attempt} {t + 4} created",
    ]
    with open(tmp_path / "side-effects.log", "a") as handle:
        handle.write("\n".join(forged) + "\n")
    harness.result = TortureResult()
    harness.check()
    text = "\n".join(harness.result.violations)
    assert "ran again after its commit" in text
    assert "is not the in-flight step of a killed worker" in text
    assert "accepted run 01BOGUSCHILD is missing from the database" in text
    # Two runs of one concurrency key whose side effects interleave.
    by_attempt = {
        ("RUN-A", 1): [Line("B", "RUN-A", "s0", 1, 1, 100), Line("E", "RUN-A", "s0", 1, 1, 300)],
        ("RUN-B", 1): [Line("B", "RUN-B", "s0", 2, 1, 200), Line("E", "RUN-B", "s0", 2, 1, 400)],
    }
    runs: dict[str, Any] = {
        "RUN-A": {"concurrency_key": "k", "status": "completed"},
        "RUN-B": {"concurrency_key": "k", "status": "completed"},
    }
    harness.result = TortureResult()
    harness.check_concurrency(runs, by_attempt)
    assert [v for v in harness.result.violations if "overlapped" in v]
    # The same two runs one after the other are fine.
    by_attempt[("RUN-B", 1)] = [Line("B", "RUN-B", "s0", 2, 1, 301), Line("E", "RUN-B", "s0", 2, 1, 400)]
    harness.result = TortureResult()
    harness.check_concurrency(runs, by_attempt)
    assert harness.result.violations == []


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
