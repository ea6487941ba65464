"""Jobs and the worker process of the crash-torture harness.

    python torture_jobs.py <db_url> <log_file> [--lease S] [--renew S] [--poll S]
                           [--concurrency N] [--sole]

starts a worker on ``db_url`` and works until SIGTERM (graceful stop) or
SIGKILL (the torture). Every step records its side effect itself, by appending
single-``write()`` lines to ``log_file`` (opened with ``O_APPEND``, so lines
from several processes never interleave)::

    S <pid> <t>                                              worker ready
    B <run_id> <step> <pid> <xid> <attempt> <t>              step side effect begins
    E <run_id> <step> <pid> <xid> <attempt> <t>              step side effect ends (before its commit)
    T <run_id> <child_run_id> <pid> <xid> <attempt> <t> <disposition>   a child run was triggered
    L <run_id> <pid> <t> <error type>                        the worker reported a lost lease

``t`` is ``time.monotonic_ns()``, one system-wide clock on Linux. ``xid`` names
one execution of one step (unique across processes, pid reuse included). A
step's stored result carries the ``xid``, run id and step name of the execution
that was committed, so the checker can match every committed step to the side
effect that produced it, and tell it from executions lost to a crash. Step
values depend on the run id (:func:`step_value`), so a run handed another run's
results ends with the wrong total.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import time
import zlib
from typing import Any

from pydantic import BaseModel

from durably_web import Durably, Event, StepContext, define_job

LOG_FD: int | None = None
DURABLY: Durably | None = None
# This process's tag: a fresh random prefix, so execution ids never repeat across processes.
PROCESS_TAG = os.urandom(4).hex()
EXECUTION_NUMBERS = itertools.count(1)


def log_line(*fields: object) -> None:
    """Append one line with a single write() on an O_APPEND descriptor."""
    assert LOG_FD is not None
    os.write(LOG_FD, (" ".join(str(f) for f in fields) + "\n").encode())


def open_log(path: str) -> None:
    global LOG_FD
    LOG_FD = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def new_execution_id() -> str:
    return f"{PROCESS_TAG}.{next(EXECUTION_NUMBERS)}"


class StepFailure(Exception):
    """The deliberate failure of a step (the run must end failed)."""


def step_value(run_id: str, name: str) -> int:
    """A step's value depends on its run and name: results mixed up between runs show."""
    return zlib.crc32(f"{run_id}/{name}".encode()) % 1000


def expected_total(run_id: str, names: list[str]) -> int:
    return sum(step_value(run_id, name) for name in names)


def chain_value_steps(steps: int) -> list[str]:
    """The steps of a torture-chain run that add to its total (not the spawn step)."""
    return [f"s{i}" for i in range(steps)]


CHILD_STEPS = ["c0", "c1"]


def effect_sync(run_id: str, name: str, attempt: int, delay: float, fail: bool) -> dict[str, Any]:
    """A blocking step (runs in a thread): the side effect is the B/E pair of lines."""
    pid, xid = os.getpid(), new_execution_id()
    log_line("B", run_id, name, pid, xid, attempt, time.monotonic_ns())
    try:
        time.sleep(delay)
        if fail:
            raise StepFailure(f"{name} fails on purpose")
    finally:
        log_line("E", run_id, name, pid, xid, attempt, time.monotonic_ns())
    return {"v": step_value(run_id, name), "x": xid, "run": run_id, "step": name}


async def effect_async(run_id: str, name: str, attempt: int, delay: float, fail: bool) -> dict[str, Any]:
    """An async step: cancellation interrupts its sleep; the E line is still written."""
    pid, xid = os.getpid(), new_execution_id()
    log_line("B", run_id, name, pid, xid, attempt, time.monotonic_ns())
    try:
        await asyncio.sleep(delay)
        if fail:
            raise StepFailure(f"{name} fails on purpose")
    finally:
        log_line("E", run_id, name, pid, xid, attempt, time.monotonic_ns())
    return {"v": step_value(run_id, name), "x": xid, "run": run_id, "step": name}


async def spawn_child(run_id: str, attempt: int) -> dict[str, Any]:
    """Trigger a child run with an idempotency key derived from the run: a re-executed
    step (crash before its commit) must get the same child back, never a second one."""
    assert DURABLY is not None
    pid, xid = os.getpid(), new_execution_id()
    log_line("B", run_id, "spawn", pid, xid, attempt, time.monotonic_ns())
    try:
        child = await DURABLY.trigger("torture-child", {"parent": run_id}, idempotency_key=f"spawn:{run_id}")
        log_line("T", run_id, child.id, pid, xid, attempt, time.monotonic_ns(), child.disposition)
    finally:
        log_line("E", run_id, "spawn", pid, xid, attempt, time.monotonic_ns())
    return {"v": 0, "x": xid, "run": run_id, "step": "spawn", "child": child.id}


class ChainIn(BaseModel):
    steps: int
    delay: float = 0.02
    fail_at: int = -1
    spawn: bool = False
    # > 0: step s2 (a blocking step) sleeps this long, longer than a lease, so the run
    # survives only if its lease is renewed while the step's thread blocks.
    slow: float = 0.0


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
        delay = payload.slow if (payload.slow > 0 and i == 2) else payload.delay
        result = await step.run(name, effect, step.run_id, name, step.attempt, delay, i == payload.fail_at)
        total += result["v"]
        if i % 4 == 3:
            step.progress(i + 1, payload.steps)
    return ChainOut(total=total)


class ChildIn(BaseModel):
    parent: str


@define_job("torture-child", input=ChildIn, output=ChainOut)
async def child(step: StepContext, payload: ChildIn) -> ChainOut:
    first = await step.run("c0", effect_sync, step.run_id, "c0", step.attempt, 0.01, False)
    second = await step.run("c1", effect_async, step.run_id, "c1", step.attempt, 0.01, False)
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

    def on_worker_error(event: Event) -> None:
        error = event.data["error"]
        if error.type == "LeaseLostError":
            log_line("L", event.run_id, os.getpid(), time.monotonic_ns(), error.type)

    durably.on("worker:error", on_worker_error)
    async with durably:
        log_line("S", os.getpid(), time.monotonic_ns())
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("db_url")
    parser.add_argument("log_file")
    parser.add_argument("--lease", type=float, default=3.0)
    parser.add_argument("--renew", type=float, default=0.3)
    parser.add_argument("--poll", type=float, default=0.05)
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--sole", action="store_true")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
