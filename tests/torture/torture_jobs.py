"""Jobs and the worker process of the crash-torture harness.

    python torture_jobs.py <db_url> <log_file> [--lease S] [--renew S] [--poll S]
                           [--concurrency N] [--sole]

starts a worker on ``db_url`` and works until SIGTERM (graceful stop) or
SIGKILL (the torture). Every step records its side effect itself, by appending
single-``write()`` lines to ``log_file`` (opened with ``O_APPEND``, so lines
from several processes never interleave)::

    S <pid> <t>                                          worker ready
    B <run_id> <step> <pid> <attempt> <t>                step side effect begins
    E <run_id> <step> <pid> <attempt> <t>                step side effect ends (before its commit)
    T <run_id> <child_run_id> <pid> <attempt> <t> <disposition>   a child run was triggered

``t`` is ``time.monotonic_ns()``, one system-wide clock on Linux. A step's
stored result carries the ``pid`` and ``attempt`` of the execution that was
committed, so the checker can tell it from executions lost to a crash.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
from typing import Any

from pydantic import BaseModel

from durably_web import Durably, StepContext, define_job

LOG_FD: int | None = None
DURABLY: Durably | None = None


def log_line(*fields: object) -> None:
    """Append one line with a single write() on an O_APPEND descriptor."""
    assert LOG_FD is not None
    os.write(LOG_FD, (" ".join(str(f) for f in fields) + "\n").encode())


def open_log(path: str) -> None:
    global LOG_FD
    LOG_FD = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


class StepFailure(Exception):
    """The deliberate failure of a step (the run must end failed)."""


def step_value(index: int) -> int:
    return index * 7 + 1


def expected_total(steps: int) -> int:
    return sum(step_value(i) for i in range(steps))


def effect_sync(run_id: str, name: str, attempt: int, delay: float, value: int, fail: bool) -> dict[str, Any]:
    """A blocking step (runs in a thread): the side effect is the B/E pair of lines."""
    pid = os.getpid()
    log_line("B", run_id, name, pid, attempt, time.monotonic_ns())
    try:
        time.sleep(delay)
        if fail:
            raise StepFailure(f"{name} fails on purpose")
    finally:
        log_line("E", run_id, name, pid, attempt, time.monotonic_ns())
    return {"v": value, "pid": pid, "attempt": attempt}


async def effect_async(
    run_id: str, name: str, attempt: int, delay: float, value: int, fail: bool
) -> dict[str, Any]:
    """An async step: cancellation interrupts its sleep; the E line is still written."""
    pid = os.getpid()
    log_line("B", run_id, name, pid, attempt, time.monotonic_ns())
    try:
        await asyncio.sleep(delay)
        if fail:
            raise StepFailure(f"{name} fails on purpose")
    finally:
        log_line("E", run_id, name, pid, attempt, time.monotonic_ns())
    return {"v": value, "pid": pid, "attempt": attempt}


async def spawn_child(run_id: str, attempt: int) -> dict[str, Any]:
    """Trigger a child run with an idempotency key derived from the run: a re-executed
    step (crash before its commit) must get the same child back, never a second one."""
    assert DURABLY is not None
    pid = os.getpid()
    log_line("B", run_id, "spawn", pid, attempt, time.monotonic_ns())
    try:
        child = await DURABLY.trigger("torture-child", {"parent": run_id}, idempotency_key=f"spawn:{run_id}")
        log_line("T", run_id, child.id, pid, attempt, time.monotonic_ns(), child.disposition)
    finally:
        log_line("E", run_id, "spawn", pid, attempt, time.monotonic_ns())
    return {"v": 0, "pid": pid, "attempt": attempt, "child": child.id}


class ChainIn(BaseModel):
    steps: int
    delay: float = 0.02
    fail_at: int = -1
    spawn: bool = False


class ChainOut(BaseModel):
    total: int


@define_job("torture-chain", input=ChainIn, output=ChainOut)
async def chain(step: StepContext, payload: ChainIn) -> ChainOut:
    total = 0
    for i in range(payload.steps):
        if payload.spawn and i == 1:
            await step.run("spawn", spawn_child, step.run_id, step.attempt)
        name = f"s{i}"
        effect = effect_sync if i % 2 == 0 else effect_async
        result = await step.run(
            name, effect, step.run_id, name, step.attempt, payload.delay, step_value(i), i == payload.fail_at
        )
        total += result["v"]
        if i % 4 == 3:
            step.progress(i + 1, payload.steps)
    return ChainOut(total=total)


class ChildIn(BaseModel):
    parent: str


@define_job("torture-child", input=ChildIn, output=ChainOut)
async def child(step: StepContext, payload: ChildIn) -> ChainOut:
    first = await step.run("c0", effect_sync, step.run_id, "c0", step.attempt, 0.01, 3, False)
    second = await step.run("c1", effect_async, step.run_id, "c1", step.attempt, 0.01, 4, False)
    return ChainOut(total=first["v"] + second["v"])


JOBS = [chain, child]


async def serve(args: argparse.Namespace) -> None:
    global DURABLY
    open_log(args.log_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    durably = Durably(
        args.db_url,
        jobs=JOBS,
        polling_interval=args.poll,
        lease_duration=args.lease,
        lease_renew_interval=args.renew,
        max_concurrent_runs=args.concurrency,
        sole_worker=args.sole,
        shutdown_timeout=2.0,
    )
    DURABLY = durably
    async with durably:
        log_line("S", os.getpid(), time.monotonic_ns())
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("db_url")
    parser.add_argument("log_file")
    parser.add_argument("--lease", type=float, default=1.0)
    parser.add_argument("--renew", type=float, default=0.2)
    parser.add_argument("--poll", type=float, default=0.05)
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--sole", action="store_true")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
