"""A worker process that fills its own disk: ``RLIMIT_FSIZE`` makes every write past a
few bytes fail with ``EFBIG`` (SQLite reports "database or disk is full").

    python fault_worker.py <db_url> <where>

``where`` is ``step`` (the limit is set inside step s2, so s2's commit fails) or
``finish`` (set after the last step, so the run's completion cannot be written).
The main coroutine watches the worker fail, checks what the database says while
the disk is full, lifts the limit, waits for the run to end and prints a JSON
report on stdout (a pipe: not limited).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import sys
import time
from typing import Any

from durably_web import Durably, StepContext, StorageError, define_job

STEPS = 5
EXECUTED: list[str] = []
FAULT_ON = False
SOFT, HARD = resource.getrlimit(resource.RLIMIT_FSIZE)


def disk_full() -> None:
    global FAULT_ON
    resource.setrlimit(resource.RLIMIT_FSIZE, (1, HARD))
    FAULT_ON = True


def disk_ok() -> None:
    global FAULT_ON
    resource.setrlimit(resource.RLIMIT_FSIZE, (SOFT, HARD))
    FAULT_ON = False


def make_job(where: str) -> Any:
    def work(name: str) -> str:
        EXECUTED.append(name)
        time.sleep(0.02)
        if where == "step" and name == "s2" and not FAULT_ON and EXECUTED.count("s2") == 1:
            disk_full()
        return name

    @define_job("fill")
    async def fill(step: StepContext, payload: Any) -> list[str]:
        done = [await step.run(f"s{i}", work, f"s{i}") for i in range(STEPS)]
        if where == "finish" and "finished" not in EXECUTED:
            EXECUTED.append("finished")  # the handler body, not a step: runs again on resume
            disk_full()
        return done

    return fill


async def main(db_url: str, where: str) -> dict[str, Any]:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
    report: dict[str, Any] = {"pid": os.getpid()}
    worker_errors: list[str] = []
    job = make_job(where)
    async with Durably(
        db_url, jobs=[job], polling_interval=0.02, lease_duration=1.0, lease_renew_interval=0.1
    ) as durably:
        durably.on("worker:error", lambda event: worker_errors.append(event.data["error"].type))
        run = await durably.trigger(job, None)
        deadline = time.monotonic() + 20
        while not (FAULT_ON and "StorageError" in worker_errors):
            if time.monotonic() > deadline:
                raise SystemExit(f"the fault never showed: executed={EXECUTED} errors={worker_errors}")
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)  # the worker keeps trying while the disk is full
        during = await durably.get_run(run.id)
        report["status_during_fault"] = during.status
        report["steps_during_fault"] = [s.name for s in await durably.get_steps(run.id)]
        try:
            await durably.trigger(job, None)
        except StorageError as exc:
            report["trigger_during_fault"] = f"StorageError: {exc}"
        else:
            report["trigger_during_fault"] = "accepted"
        report["executed_during_fault"] = list(EXECUTED)
        disk_ok()
        done = await durably.wait_for_run(run.id, timeout=30)
        report["final_status"] = done.status
        report["output"] = done.output
        report["attempt"] = done.attempt
        report["executed"] = list(EXECUTED)
        report["worker_errors"] = sorted(set(worker_errors))
    return report


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2]))), flush=True)
