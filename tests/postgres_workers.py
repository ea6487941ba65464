"""The job and the worker process of tests/test_postgres_workers.py (many worker processes
on one PostgreSQL database).

    python postgres_workers.py <db_url> <records_dir> [--lease S] [--renew S] [--poll S]
                               [--concurrency N]

works on "mp-steps" runs until SIGTERM (a graceful stop, exit status 0) or SIGKILL (the
test). Each process appends records to its own file ``<records_dir>/<pid>.log``, one
``write()`` per line on an ``O_APPEND`` descriptor, so a line is either whole or missing::

    S <pid> <mono_ns> <wall_ns>                                  the worker is ready
    B <run_id> <step> <pid> <attempt> <xid> <mono_ns> <wall_ns>  a step's side effect begins
    E <run_id> <step> <pid> <attempt> <xid> <mono_ns> <wall_ns>  ... and ends (before its commit)
    X <pid> <error type> <mono_ns> <wall_ns>                     the worker reported an error

A run of a chain (``chain``: the numbers of the runs still to come on its concurrency key)
triggers the next one in its first step, so that run is pending, held back only by the
key, while this one executes its other steps.

``mono_ns`` is ``time.monotonic_ns()`` (one clock for every process on Linux), ``wall_ns``
``time.time_ns()`` (the clock the engine writes lease times with). ``xid`` names one
execution of one step, unique across processes; a step's committed result carries it, so
the test can tell which execution's result the database kept. ``attempt`` is the run's
attempt (one per claim), so the records of one claim of a run can be told apart.

Warnings (worker errors, a lost LISTEN connection) go to stderr through ``logging``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import signal
import time
import zlib
from typing import Any

from pydantic import BaseModel

from durably_web import Durably, Event, StepContext, define_job

LOG_FD: int | None = None
DURABLY: Durably | None = None
# A fresh prefix per process: execution ids never repeat across processes (pid reuse included).
PROCESS_TAG = os.urandom(4).hex()
EXECUTIONS = itertools.count(1)


def record(*fields: object) -> None:
    assert LOG_FD is not None
    os.write(LOG_FD, (" ".join(str(f) for f in fields) + "\n").encode())


def step_value(run_id: str, name: str) -> int:
    """Depends on the run and the step: a run handed another run's results ends with the wrong total."""
    return zlib.crc32(f"{run_id}/{name}".encode()) % 1000


def step_names(steps: int) -> list[str]:
    return [f"s{i}" for i in range(steps)]


def expected_total(run_id: str, steps: int) -> int:
    return sum(step_value(run_id, name) for name in step_names(steps))


def _begin(run_id: str, name: str, attempt: int) -> str:
    xid = f"{PROCESS_TAG}.{next(EXECUTIONS)}"
    record("B", run_id, name, os.getpid(), attempt, xid, time.monotonic_ns(), time.time_ns())
    return xid


def _end(run_id: str, name: str, attempt: int, xid: str) -> dict[str, Any]:
    record("E", run_id, name, os.getpid(), attempt, xid, time.monotonic_ns(), time.time_ns())
    return {"v": step_value(run_id, name), "x": xid}


async def async_effect(run_id: str, name: str, attempt: int, delay: float) -> dict[str, Any]:
    """An async step. The engine cancels it when its run's lease is lost or the worker stops
    (after shutdown_timeout): its side effect then ends at the cancel, so E is written anyway."""
    xid = _begin(run_id, name, attempt)
    try:
        await asyncio.sleep(delay)
    finally:
        result = _end(run_id, name, attempt, xid)
    return result


def sync_effect(run_id: str, name: str, attempt: int, delay: float) -> dict[str, Any]:
    """A blocking step: the engine runs it in a thread while the lease is renewed."""
    xid = _begin(run_id, name, attempt)
    time.sleep(delay)
    return _end(run_id, name, attempt, xid)


class StepsIn(BaseModel):
    steps: int  # 2 or 3
    delay: float = 0.003
    key: str | None = None  # the run's concurrency key
    chain: list[int] = []  # the runs still to come on that key: s0 triggers the first one


def chain_item(n: int) -> str:
    """The idempotency key of run number ``n`` (whoever triggers it: the test or a chain)."""
    return f"mp-{n}"


def steps_of(n: int) -> int:
    return 2 + n % 2


class StepsOut(BaseModel):
    total: int


async def trigger_next(run_id: str, name: str, attempt: int, payload: StepsIn) -> dict[str, Any]:
    """Step s0 of a chained run: trigger the next run of the chain (idempotent: a re-executed
    s0 gets the same run back), then the usual side effect."""
    assert DURABLY is not None
    xid = _begin(run_id, name, attempt)
    try:
        n, rest = payload.chain[0], payload.chain[1:]
        await DURABLY.trigger(
            mp_steps,
            StepsIn(steps=steps_of(n), delay=payload.delay, key=payload.key, chain=rest),
            idempotency_key=chain_item(n),
            concurrency_key=payload.key,
        )
        await asyncio.sleep(payload.delay)
    finally:
        result = _end(run_id, name, attempt, xid)
    return result


@define_job("mp-steps", input=StepsIn, output=StepsOut)
async def mp_steps(step: StepContext, payload: StepsIn) -> StepsOut:
    total = 0
    for i, name in enumerate(step_names(payload.steps)):
        if i == 0 and payload.chain:
            result = await step.run(name, trigger_next, step.run_id, name, step.attempt, payload)
        else:
            effect = sync_effect if i == 1 else async_effect
            result = await step.run(name, effect, step.run_id, name, step.attempt, payload.delay)
        total += result["v"]
    return StepsOut(total=total)


async def serve(args: argparse.Namespace) -> None:
    global LOG_FD, DURABLY
    LOG_FD = os.open(
        os.path.join(args.records_dir, f"{os.getpid()}.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    durably = Durably(
        args.db_url,
        jobs=[mp_steps],
        polling_interval=args.poll,
        lease_duration=args.lease,
        lease_renew_interval=args.renew,
        max_concurrent_runs=args.concurrency,
        shutdown_timeout=5.0,
    )
    DURABLY = durably

    def on_error(event: Event) -> None:
        record("X", os.getpid(), event.data["error"].type, time.monotonic_ns(), time.time_ns())

    durably.on("worker:error", on_error)
    async with durably:
        record("S", os.getpid(), time.monotonic_ns(), time.time_ns())
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("db_url")
    parser.add_argument("records_dir")
    parser.add_argument("--lease", type=float, default=5.0)
    parser.add_argument("--renew", type=float, default=0.5)
    parser.add_argument("--poll", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=8)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("psycopg").setLevel(logging.WARNING)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
