"""Jobs and a worker entry point for tests that run durably-web in real subprocesses.

Every step appends one line "<step name> <pid>" to a side-effect file *before*
doing its work, so a test can count how many times each step really ran.

    python crash_jobs.py steps <db_url> <side_effect_file> [--delay S] [--lease S]
        Trigger the multi-step job (idempotency key "crash": a second process
        gets the same run), work until it ends, print the run as JSON.

    python crash_jobs.py serve <db_url> <expected_runs>
        Work on "record" runs until <expected_runs> runs exist and all have ended.

    python crash_jobs.py wait <db_url> <side_effect_file> --kind retry|sleep|signal|offline|parallel-retry
                              --seconds S
        Trigger (idempotency key "wait") a job whose first attempt of step "flaky" fails and is
        retried after S seconds (retry), that sleeps S seconds between two steps (sleep), that
        waits up to S seconds for the signal "go" between two steps (signal), or whose step
        "fetch" fails with a network error while offline and waits for the network, checked
        again every S seconds (offline: the network is "online" while the file
        <side_effect_file>.online exists), or whose step.all's branch "flaky" fails once and is
        retried after S seconds while its sibling "steady" completes (parallel-retry);
        work until it ends, print the run as JSON. Side-effect lines: "<name> <pid> <unix time>".

    python crash_jobs.py parallel <db_url> <side_effect_file>
        Trigger (idempotency key "parallel") a job whose step.all has a branch "fast" that
        returns at once and a branch "slow" that blocks (a minute) on its first execution
        only, then a step "after"; work until it ends, print the run as JSON.

    python crash_jobs.py serve-waits <db_url> <expected_runs>
        Work on "flaky" runs (triggered by the test) until <expected_runs> runs have ended.

    python crash_jobs.py child <db_url> <side_effect_file>
        Trigger (idempotency key "child") a "parent" run that starts a "child" run, runs its step
        "between" (which blocks until the file <side_effect_file>.between exists) and waits for
        the child; the child's step "work" blocks until <side_effect_file>.child exists. Work
        until the parent ends, print it as JSON. Side-effect lines: "<name> <pid> <unix time>".
    python crash_jobs.py deadline <db_url> <side_effect_file> --timeout S
        Trigger (idempotency key "deadline", run deadline S seconds) a job whose step "long"
        writes its line and then waits a minute; work until the run ends, print it as JSON.

    python crash_jobs.py versioned <db_url> <side_effect_file> --version V --seconds S [--serve S2]
        The job "versioned" at version V (step "first", a sleep of S seconds, step "second"):
        trigger it (idempotency key "versioned") and work until it ends, printing the run; or,
        with --serve, only work for S2 seconds (without triggering), then print the run.

    python crash_jobs.py schedule <db_url> <completed_ticks> [--kill-after-fire]
        Run a worker with the job "every-second" (define_job(schedule="* * * * * *"): a tick
        each second) until <completed_ticks> of its runs have completed (each returns the pid
        that executed it); print the worker errors seen and the pid as JSON. With
        --kill-after-fire the process SIGKILLs itself right after its first firing of a tick
        committed (the run exists, the next tick is moved on, nothing has executed it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from durably_web import Durably, JobDefinition, NetworkStatus, RetryPolicy, StepContext, define_job
from durably_web.network import ALWAYS_ONLINE

STEP_COUNT = 6


class CrashIn(BaseModel):
    side_effects: str
    delay: float = 0.2


class CrashOut(BaseModel):
    total: int


def append_line(path: str, line: str) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()


def do_step(path: str, name: str, delay: float, value: int) -> int:
    append_line(path, f"{name} {os.getpid()}")
    if os.environ.get("CRASH_FAIL_STEP") == name:  # resume tests: this step fails in this process
        raise RuntimeError(f"{name} fails in this process")
    time.sleep(delay)  # a blocking step: runs in a thread while leases are renewed
    return value


def step_value(index: int) -> int:
    return (index + 1) * 10


@define_job("crash-steps", input=CrashIn, output=CrashOut)
async def crash_steps(step: StepContext, payload: CrashIn) -> CrashOut:
    total = 0
    for i in range(STEP_COUNT):
        total += await step.run(
            f"step-{i}", do_step, payload.side_effects, f"step-{i}", payload.delay, step_value(i)
        )
    return CrashOut(total=total)


EXPECTED_TOTAL = sum(step_value(i) for i in range(STEP_COUNT))


class RecordIn(BaseModel):
    side_effects: str
    n: int
    # Hold the step until this many processes have recorded a side effect (at most 30 s):
    # with 2, both worker processes are sure to take part, however late one starts.
    processes: int = 1


def record(path: str, run_id: str, processes: int = 1) -> int:
    append_line(path, f"{run_id} {os.getpid()}")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with open(path, encoding="utf-8") as handle:
            if len({line.rsplit(" ", 1)[-1] for line in handle.read().splitlines()}) >= processes:
                break
        time.sleep(0.01)
    time.sleep(0.005)
    return os.getpid()


@define_job("record", input=RecordIn)
async def record_job(step: StepContext, payload: RecordIn) -> int:
    return await step.run("record", record, payload.side_effects, step.run_id, payload.processes)


class WaitIn(BaseModel):
    side_effects: str
    seconds: float


def timed_line(path: str, name: str) -> int:
    """Append "<name> <pid> <time>"; return how many lines for ``name`` exist now."""
    append_line(path, f"{name} {os.getpid()} {time.time():.3f}")
    with open(path, encoding="utf-8") as handle:
        return sum(1 for line in handle if line.split(" ", 1)[0] == name)


def flaky_step(path: str, name: str) -> str:
    if timed_line(path, name) < 2:
        raise OSError(f"{name}: the first attempt fails")
    return "ok"


@define_job("flaky", input=WaitIn, retry=RetryPolicy(max_attempts=3, initial_delay=1.0))
async def flaky_job(step: StepContext, payload: WaitIn) -> str:
    return await step.run(
        f"flaky-{step.run_id}",
        flaky_step,
        payload.side_effects,
        f"flaky-{step.run_id}",
        retry=RetryPolicy(max_attempts=3, initial_delay=payload.seconds),
    )


@define_job("sleepy", input=WaitIn)
async def sleepy_job(step: StepContext, payload: WaitIn) -> str:
    await step.run("before", timed_line, payload.side_effects, "before")
    await step.sleep("nap", payload.seconds)
    await step.run("after", timed_line, payload.side_effects, "after")
    return "rested"


@define_job("signalled", input=WaitIn)
async def signalled_job(step: StepContext, payload: WaitIn) -> str:
    await step.run("before", timed_line, payload.side_effects, "before")
    by = await step.wait_for_signal("go", type=str, timeout=payload.seconds)
    await step.run("after", timed_line, payload.side_effects, "after")
    return f"go from {by}"


class FlagFileNetwork:
    """A ``NetworkStatus`` that is online while a file exists (the test creates it)."""

    def __init__(self, flag: str) -> None:
        self.flag = flag

    def online(self) -> bool:
        return os.path.exists(self.flag)

    def is_network_error(self, exc: BaseException) -> bool:
        return isinstance(exc, ConnectionError)

    def watch(self, on_online: Callable[[], None]) -> Callable[[], None]:
        return lambda: None  # no notices: a restart (or the recheck) finds the network back


def fetch_step(path: str, flag: str) -> str:
    timed_line(path, "fetch")
    if not os.path.exists(flag):
        raise ConnectionError("fetch: the network is down")
    return "fetched"


# One attempt: only an offline failure (which counts against no retry) lets the run go on.
@define_job("offline", input=WaitIn, retry=RetryPolicy(max_attempts=1))
async def offline_job(step: StepContext, payload: WaitIn) -> str:
    await step.run("before", timed_line, payload.side_effects, "before")
    fetched = await step.run("fetch", fetch_step, payload.side_effects, payload.side_effects + ".online")
    await step.run("after", timed_line, payload.side_effects, "after")
    return fetched


class ParallelIn(BaseModel):
    side_effects: str


def fast_branch(path: str) -> str:
    append_line(path, f"fast {os.getpid()}")
    return "fast"


def slow_branch(path: str) -> str:
    append_line(path, f"slow {os.getpid()}")
    with open(path, encoding="utf-8") as handle:
        first = sum(1 for line in handle if line.startswith("slow ")) == 1
    if first:
        time.sleep(60)  # the test kills this process meanwhile
    return "slow"


def after_branches(path: str) -> int:
    append_line(path, f"after {os.getpid()}")
    with open(path, encoding="utf-8") as handle:
        return sum(1 for line in handle if line.startswith("slow "))


@define_job("parallel", input=ParallelIn)
async def parallel_job(step: StepContext, payload: ParallelIn) -> dict[str, object]:
    results = await step.all(
        {"fast": (fast_branch, payload.side_effects), "slow": (slow_branch, payload.side_effects)}
    )
    return {**results, "after": await step.run("after", after_branches, payload.side_effects)}


async def run_parallel(args: argparse.Namespace) -> None:
    async with Durably(args.db_url, jobs=[parallel_job], **worker_options(1.0)) as durably:
        run = await durably.trigger(
            parallel_job, ParallelIn(side_effects=args.side_effects), idempotency_key="parallel"
        )
        done = await durably.wait_for_run(run.id, timeout=60)
        print(json.dumps({**done.to_dict(), "pid": os.getpid(), "disposition": run.disposition}), flush=True)


class DeadlineIn(BaseModel):
    side_effects: str


async def long_step(path: str) -> str:
    timed_line(path, "long")
    await asyncio.sleep(60)  # cancelled at the deadline (if a worker is alive then)
    return "done"


@define_job("deadline-job", input=DeadlineIn)
async def deadline_job(step: StepContext, payload: DeadlineIn) -> str:
    return await step.run("long", long_step, payload.side_effects)


async def run_deadline(args: argparse.Namespace) -> None:
    async with Durably(args.db_url, jobs=[deadline_job], **worker_options(2.0)) as durably:
        run = await durably.trigger(
            deadline_job,
            DeadlineIn(side_effects=args.side_effects),
            idempotency_key="deadline",
            timeout=args.timeout,
        )
        done = await durably.wait_for_run(run.id, timeout=60)
        print(json.dumps({**done.to_dict(), "pid": os.getpid(), "disposition": run.disposition}), flush=True)


def versioned_job_at(version: str) -> JobDefinition[WaitIn, str]:
    @define_job("versioned", input=WaitIn, version=version)
    async def versioned(step: StepContext, payload: WaitIn) -> str:
        await step.run("first", timed_line, payload.side_effects, "first")
        await step.sleep("pause", payload.seconds)
        await step.run("second", timed_line, payload.side_effects, "second")
        return version

    return versioned


async def run_versioned(args: argparse.Namespace) -> None:
    job = versioned_job_at(args.version)
    async with Durably(args.db_url, jobs=[job], **worker_options(2.0)) as durably:
        if args.serve is not None:
            await asyncio.sleep(args.serve)  # a worker of this version, only working
            [run] = await durably.get_runs(job_name="versioned")
            print(json.dumps({**run.to_dict(), "pid": os.getpid()}), flush=True)
            return
        run = await durably.trigger(
            job, WaitIn(side_effects=args.side_effects, seconds=args.seconds), idempotency_key="versioned"
        )
        done = await durably.wait_for_run(run.id, timeout=60)
        print(json.dumps({**done.to_dict(), "pid": os.getpid()}), flush=True)


@define_job("parallel-retry", input=WaitIn)
async def parallel_retry_job(step: StepContext, payload: WaitIn) -> dict[str, str]:
    """A step.all whose branch "flaky" fails its first attempt and is retried after S seconds,
    while its sibling "steady" completes."""
    path = payload.side_effects
    retry = RetryPolicy(max_attempts=3, initial_delay=payload.seconds)
    return await step.all(
        {
            "steady": lambda: str(timed_line(path, "steady")),
            "flaky": step.branch(flaky_step, path, "flaky", retry=retry),
        }
    )


async def run_wait(args: argparse.Namespace) -> None:
    jobs = {
        "retry": flaky_job,
        "sleep": sleepy_job,
        "signal": signalled_job,
        "offline": offline_job,
        "parallel-retry": parallel_retry_job,
    }
    job = jobs[args.kind]
    network: NetworkStatus = ALWAYS_ONLINE
    options: dict[str, float] = {}
    if args.kind == "offline":
        network = FlagFileNetwork(args.side_effects + ".online")
        options["offline_recheck_interval"] = args.seconds
    async with Durably(args.db_url, jobs=[job], network=network, **options, **worker_options(2.0)) as durably:
        run = await durably.trigger(
            job, WaitIn(side_effects=args.side_effects, seconds=args.seconds), idempotency_key="wait"
        )
        done = await durably.wait_for_run(run.id, timeout=60)
        print(json.dumps({**done.to_dict(), "pid": os.getpid(), "disposition": run.disposition}), flush=True)


class ChildIn(BaseModel):
    side_effects: str


class ChildOut(BaseModel):
    worked_by: int


def blocked_line(path: str, name: str, gate: str) -> int:
    """Append a line for ``name``, then block until the file ``gate`` exists (the test kills
    the process meanwhile, or creates the file)."""
    timed_line(path, name)
    while not os.path.exists(gate):
        time.sleep(0.01)
    return os.getpid()


@define_job("child", input=ChildIn, output=ChildOut)
async def child_job(step: StepContext, payload: ChildIn) -> ChildOut:
    pid = await step.run("work", blocked_line, payload.side_effects, "work", payload.side_effects + ".child")
    return ChildOut(worked_by=pid)


@define_job("parent", input=ChildIn, output=ChildOut)
async def parent_job(step: StepContext, payload: ChildIn) -> ChildOut:
    child = await step.start_child("start", child_job, {"side_effects": payload.side_effects})
    gate = payload.side_effects + ".between"
    await step.run("between", blocked_line, payload.side_effects, "between", gate)
    out: ChildOut = await step.wait_for_child("wait", child)
    return out


async def run_child(args: argparse.Namespace) -> None:
    async with Durably(args.db_url, jobs=[parent_job, child_job], **worker_options(2.0)) as durably:
        payload = ChildIn(side_effects=args.side_effects)
        run = await durably.trigger(parent_job, payload, idempotency_key="child")
        done = await durably.wait_for_run(run.id, timeout=60)
        print(json.dumps({**done.to_dict(), "pid": os.getpid(), "disposition": run.disposition}), flush=True)


async def serve_waits(args: argparse.Namespace) -> None:
    options = worker_options(2.0)
    async with Durably(args.db_url, jobs=[flaky_job], max_concurrent_runs=2, **options) as durably:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            runs = await durably.get_runs(limit=10_000)
            if len(runs) >= args.expected_runs and all(run.is_terminal for run in runs):
                break
            await asyncio.sleep(0.05)
        else:
            sys.exit("timed out waiting for the runs to finish")
    print(json.dumps({"pid": os.getpid()}), flush=True)


@define_job("every-second", schedule="* * * * * *")
async def every_second(step: StepContext, payload: Any) -> int:
    return os.getpid()


def kill_after_first_fire() -> None:
    """Make the first committed firing of a tick the last thing this process does."""
    import signal

    from durably_web.schedules import ScheduleTicker

    original = ScheduleTicker.fire

    async def fire(self: ScheduleTicker, schedule: Any, now: int) -> Any:
        results = await original(self, schedule, now)
        if results:
            os.kill(os.getpid(), signal.SIGKILL)
        return results

    ScheduleTicker.fire = fire  # type: ignore[method-assign]


async def run_schedule(args: argparse.Namespace) -> None:
    if args.kill_after_fire:
        kill_after_first_fire()
    errors: list[str] = []
    async with Durably(args.db_url, jobs=[every_second], **worker_options(2.0)) as durably:
        durably.on("worker:error", lambda event: errors.append(str(event["error"])))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            runs = await durably.get_runs(job_name="every-second", status="completed", limit=10_000)
            if len(runs) >= args.completed_ticks:
                break
            await asyncio.sleep(0.05)
        else:
            sys.exit("timed out waiting for the scheduled runs")
    print(json.dumps({"pid": os.getpid(), "errors": errors}), flush=True)


def worker_options(lease: float) -> dict[str, float]:
    return {"polling_interval": 0.02, "lease_duration": lease, "lease_renew_interval": lease / 5}


async def run_steps(args: argparse.Namespace) -> None:
    payload = CrashIn(side_effects=args.side_effects, delay=args.delay)
    async with Durably(args.db_url, jobs=[crash_steps], **worker_options(args.lease)) as durably:
        if args.at_once:
            # trigger_and_wait on an idle worker: the run is created leased and starts at once.
            # A second process finds it and waits for it (it resumes once the lease lapses).
            existing = await durably.get_runs(job_name=crash_steps.name)
            if existing:
                done = await durably.wait_for_run(existing[0].id, timeout=60)
                disposition = "idempotent"
            else:
                await asyncio.sleep(0.2)  # the worker's first look finds nothing: it is idle
                done = await durably.trigger_and_wait(crash_steps, payload, timeout=60)
                disposition = "created"
        else:
            run = await durably.trigger(crash_steps, payload, idempotency_key="crash")
            done = await durably.wait_for_run(run.id, timeout=60)
            disposition = run.disposition
        print(json.dumps({**done.to_dict(), "pid": os.getpid(), "disposition": disposition}), flush=True)


async def serve(args: argparse.Namespace) -> None:
    async with Durably(
        args.db_url, jobs=[record_job], max_concurrent_runs=2, **worker_options(2.0)
    ) as durably:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            runs = await durably.get_runs(limit=10_000)
            if len(runs) >= args.expected_runs and all(run.is_terminal for run in runs):
                break
            await asyncio.sleep(0.05)
        else:
            sys.exit("timed out waiting for the runs to finish")
    print(json.dumps({"pid": os.getpid()}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    steps = sub.add_parser("steps")
    steps.add_argument("db_url")
    steps.add_argument("side_effects")
    steps.add_argument("--delay", type=float, default=0.2)
    steps.add_argument("--lease", type=float, default=1.0)
    steps.add_argument("--at-once", action="store_true", help="trigger_and_wait (started at once)")
    serve_parser = sub.add_parser("serve")
    serve_parser.add_argument("db_url")
    serve_parser.add_argument("expected_runs", type=int)
    wait_parser = sub.add_parser("wait")
    wait_parser.add_argument("db_url")
    wait_parser.add_argument("side_effects")
    kinds = ["retry", "sleep", "signal", "offline", "parallel-retry"]
    wait_parser.add_argument("--kind", choices=kinds, required=True)
    wait_parser.add_argument("--seconds", type=float, required=True)
    serve_waits_parser = sub.add_parser("serve-waits")
    serve_waits_parser.add_argument("db_url")
    serve_waits_parser.add_argument("expected_runs", type=int)
    parallel_parser = sub.add_parser("parallel")
    parallel_parser.add_argument("db_url")
    parallel_parser.add_argument("side_effects")
    child_parser = sub.add_parser("child")
    child_parser.add_argument("db_url")
    child_parser.add_argument("side_effects")
    deadline_parser = sub.add_parser("deadline")
    deadline_parser.add_argument("db_url")
    deadline_parser.add_argument("side_effects")
    deadline_parser.add_argument("--timeout", type=float, required=True)
    versioned_parser = sub.add_parser("versioned")
    versioned_parser.add_argument("db_url")
    versioned_parser.add_argument("side_effects")
    versioned_parser.add_argument("--version", required=True)
    versioned_parser.add_argument("--seconds", type=float, default=1.0)
    versioned_parser.add_argument("--serve", type=float, default=None)
    schedule_parser = sub.add_parser("schedule")
    schedule_parser.add_argument("db_url")
    schedule_parser.add_argument("completed_ticks", type=int)
    schedule_parser.add_argument("--kill-after-fire", action="store_true")
    args = parser.parse_args()
    modes = {
        "steps": run_steps,
        "serve": serve,
        "wait": run_wait,
        "serve-waits": serve_waits,
        "parallel": run_parallel,
        "child": run_child,
        "deadline": run_deadline,
        "versioned": run_versioned,
        "schedule": run_schedule,
    }
    asyncio.run(modes[args.mode](args))


if __name__ == "__main__":
    main()
