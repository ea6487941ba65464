"""Workers in real subprocesses for tests/test_flow_control.py (flow control across processes).

python flow_jobs.py limited <db_url> <side_effects> <runs>
    Work on "limited" runs (max_concurrent=1; the test triggers them) until <runs> of them
    have ended. Each run's step appends "start <pid> <time>" and, 0.05 s later,
    "end <pid> <time>": two processes' intervals must never overlap.

python flow_jobs.py debounce <db_url> <ready_file>
    Trigger "debounced" (debounce 30 s) three times with concurrency key "k" and inputs
    1, 2, 3, create <ready_file>, then wait to be killed.

python flow_jobs.py rate <db_url> <side_effects>
    Trigger four "rated" runs (rate_limit (2, 3600 s)) and work: each run's step appends
    "start <pid>" and then blocks, so two runs are executing when the test kills it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

from durably_web import Durably, StepContext, define_job

FAST = {"polling_interval": 0.02, "lease_duration": 1.0, "lease_renew_interval": 0.1, "shutdown_timeout": 2.0}


def append_line(path: str, line: str) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()


def limited_job(side_effects: str):  # type: ignore[no-untyped-def]
    @define_job("limited", max_concurrent=1)
    async def limited(step: StepContext, payload: object) -> None:
        async def work() -> None:
            append_line(side_effects, f"start {os.getpid()} {time.time()}")
            await asyncio.sleep(0.05)
            append_line(side_effects, f"end {os.getpid()} {time.time()}")

        await step.run("work", work)

    return limited


@define_job("debounced", debounce=30)
async def debounced(step: StepContext, payload: int) -> int:
    return payload


def rated_job(side_effects: str):  # type: ignore[no-untyped-def]
    @define_job("rated", rate_limit=(2, 3600), version="rated-1")
    async def rated(step: StepContext, payload: int) -> None:
        async def work() -> None:
            append_line(side_effects, f"start {os.getpid()}")
            await asyncio.sleep(3600)

        await step.run("work", work)

    return rated


async def limited_mode(args: argparse.Namespace) -> None:
    async with Durably(args.db_url, jobs=[limited_job(args.side_effects)], **FAST) as durably:
        while True:
            runs = await durably.get_runs(job_name="limited", limit=1000)
            if len(runs) >= args.runs and all(run.is_terminal for run in runs):
                break
            await asyncio.sleep(0.05)
    print(json.dumps({"runs": len(runs)}))


async def debounce_mode(args: argparse.Namespace) -> None:
    async with Durably(args.db_url, jobs=[debounced], **FAST) as durably:
        for value in (1, 2, 3):
            await durably.trigger(debounced, value, concurrency_key="k")
        Path(args.ready_file).touch()  # noqa: ASYNC240 (one tiny write; the test waits for it)
        await asyncio.sleep(3600)


async def rate_mode(args: argparse.Namespace) -> None:
    rated = rated_job(args.side_effects)
    async with Durably(args.db_url, jobs=[rated], **FAST) as durably:
        for value in range(4):
            await durably.trigger(rated, value, idempotency_key=f"r{value}")
        await asyncio.sleep(3600)


def main() -> None:
    parser = argparse.ArgumentParser()
    modes = parser.add_subparsers(dest="mode", required=True)
    limited = modes.add_parser("limited")
    limited.add_argument("db_url")
    limited.add_argument("side_effects")
    limited.add_argument("runs", type=int)
    debounce = modes.add_parser("debounce")
    debounce.add_argument("db_url")
    debounce.add_argument("ready_file")
    rate = modes.add_parser("rate")
    rate.add_argument("db_url")
    rate.add_argument("side_effects")
    args = parser.parse_args()
    handlers = {"limited": limited_mode, "debounce": debounce_mode, "rate": rate_mode}
    asyncio.run(handlers[args.mode](args))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
