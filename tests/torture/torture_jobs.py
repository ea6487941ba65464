"""Jobs and the worker process of the crash-torture harness.

    python torture_jobs.py <db_url> <log_file> [--lease S] [--renew S] [--poll S]
                           [--concurrency N] [--sole] [--offline-flag PATH]
                           [--at-once N --at-once-seed S --at-once-quit PATH]

starts a worker on ``db_url`` and works until SIGTERM (graceful stop) or
SIGKILL (the torture). Every step records its side effect itself, by appending
single-``write()`` lines to ``log_file`` (opened with ``O_APPEND``, so lines
from several processes never interleave)::

    S <pid> <t>                                              worker ready
    B <run_id> <step> <pid> <xid> <attempt> <t>              step side effect begins
    E <run_id> <step> <pid> <xid> <attempt> <t>              step side effect ends (before its commit)
    T <run_id> <child_run_id> <pid> <xid> <attempt> <t> <disposition>   a child run was triggered
    L <run_id> <pid> <t> <error type>                        the worker reported a lost lease

and, for the durable-waiting jobs (retries, sleeps, signals)::

    A <run_id> <step> <pid> <xid> <step_attempt> <wall_ms>   a retried step's execution (after its B
                                                             line): which attempt of the step it is
    F <run_id> <step> <pid> <xid>                            that execution fails on purpose (E follows)
    W <run_id> <step> <reason> <due_ms> <after> <pid> <t>    a wait this process committed (its own
                                                             run:waiting event); after: the failed
                                                             step attempt of a retry, else 0
    H <run_id> <wait> <pid> <attempt> <wall_ms> <token>      the handler got past a sleep or a signal
                                                             wait (token: the signal's payload, - for a sleep)

and, for the runs a worker triggers itself (``--at-once N``: up to N ``trigger_and_wait``
calls, each made while the worker is idle, so that the engine starts the run at once,
created leased to this worker: ``Worker.start_at_once``)::

    I <token> <pid> <job> <input json> <t>                   about to call trigger_and_wait
                                                             (the run carries label AT_ONCE_LABEL=token)
    C <token> <run_id> <pid> <leased|pending> <t>            its run was created (after the insert
                                                             committed): started at once, or queued
    D <token> <run_id> <pid> <status> <output json|-> <t>    trigger_and_wait returned this run
    X <token> <pid> <error>                                  trigger_and_wait raised
    Q <pid> <t>                                              this worker triggers nothing more

and, for the network-aware job (``--offline-flag``: the network is down while that file
exists), ``A``/``F`` lines as above for its step 'fetch', whose failures while offline are
ConnectionErrors (W lines with reason ``offline`` follow).

The flow-limited job ``torture-limited`` (``max_concurrent=LIMITED_MAX``) writes only B/E
lines; the checker counts how many of its runs have a side effect live at once.

``wall_ms`` is ``time.time_ns() // 10**6``, the clock the engine persists wake-up times
with (``Durably.now_ms``), so the checker can compare them with the database.

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
import contextlib
import contextvars
import itertools
import json
import os
import random
import signal
import time
import zlib
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from durably_web import Durably, Event, RetryPolicy, StepContext, define_job
from durably_web.storage.base import NewRun, RunRecord

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


# --- durable waiting: retries, sleeps, signals ----------------------------------------------------


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


# The run the current task executes, set by the waiting jobs' handlers. The engine emits a
# run's own events (run:waiting, step:retry) from the task that executes it; on PostgreSQL it
# also re-emits other processes' changes, from a task of its own, and those W lines belong
# to the process that committed the wait (it writes them itself).
EXECUTING: contextvars.ContextVar[str | None] = contextvars.ContextVar("executing", default=None)


RETRY_BACKOFF = 2.0
RETRY_MAX_DELAY = 0.4


def retry_delay_ms(initial_delay: float, failed_attempt: int) -> int:
    """The backoff (ms) after the failed step attempt ``failed_attempt`` under the torture's
    policy, computed here independently of ``RetryPolicy.delay_before`` (so the checker does
    not trust the code it checks)."""
    return int(min(initial_delay * RETRY_BACKOFF ** (failed_attempt - 1), RETRY_MAX_DELAY) * 1000)


class RetryIn(BaseModel):
    fails: int  # the step 'flaky' fails its first `fails` attempts, then succeeds
    max_attempts: int  # fails >= max_attempts: the retries run out and the run fails
    delay: float = 0.1  # the policy's initial_delay (backoff 2, at most RETRY_MAX_DELAY, no jitter)


async def flaky_effect(run_id: str, attempt: int, fails: int, delay: float) -> dict[str, Any]:
    """A step that fails its first ``fails`` attempts. Which attempt of the step this is comes
    from the attempts the database has recorded (``get_step_attempts``): an execution lost to
    a kill before its failure was recorded is that same attempt again."""
    assert DURABLY is not None
    recorded = await DURABLY.get_step_attempts(run_id)
    step_attempt = 1 + sum(1 for a in recorded if a.name == "flaky" and a.status == "failed")
    pid, xid = os.getpid(), new_execution_id()
    log_line("B", run_id, "flaky", pid, xid, attempt, time.monotonic_ns())
    log_line("A", run_id, "flaky", pid, xid, step_attempt, wall_ms())
    try:
        await asyncio.sleep(delay)
        if step_attempt <= fails:
            log_line("F", run_id, "flaky", pid, xid)
            # The xid goes into the recorded error: the checker matches each attempt row to it.
            raise StepFailure(f"flaky fails on purpose (attempt {step_attempt}, xid {xid})")
    finally:
        log_line("E", run_id, "flaky", pid, xid, attempt, time.monotonic_ns())
    value = step_value(run_id, "flaky")
    return {"v": value, "x": xid, "run": run_id, "step": "flaky", "attempt": step_attempt}


RETRY_STEPS = ["s0", "flaky", "s1"]


@define_job("torture-retry", input=RetryIn, output=ChainOut)
async def retrying(step: StepContext, payload: RetryIn) -> ChainOut:
    EXECUTING.set(step.run_id)
    policy = RetryPolicy(
        max_attempts=payload.max_attempts,
        initial_delay=payload.delay,
        backoff=RETRY_BACKOFF,
        max_delay=RETRY_MAX_DELAY,
    )
    first = await step.run("s0", effect_sync, step.run_id, "s0", step.attempt, 0.01, False)
    flaky = await step.run(
        "flaky", flaky_effect, step.run_id, step.attempt, payload.fails, 0.01, retry=policy
    )
    last = await step.run("s1", effect_async, step.run_id, "s1", step.attempt, 0.01, False)
    return ChainOut(total=first["v"] + flaky["v"] + last["v"])


class SleepIn(BaseModel):
    naps: list[float]  # seconds of each sleep; the steps s0, nap-0, s1, nap-1, s2, ...


def sleep_names(naps: int) -> tuple[list[str], list[str]]:
    """(every checkpoint of a torture-sleep run in order, the steps whose values add up)."""
    names = ["s0"]
    for i in range(naps):
        names += [f"nap-{i}", f"s{i + 1}"]
    return names, [n for n in names if n.startswith("s")]


@define_job("torture-sleep", input=SleepIn, output=ChainOut)
async def sleeper(step: StepContext, payload: SleepIn) -> ChainOut:
    EXECUTING.set(step.run_id)
    total = (await step.run("s0", effect_sync, step.run_id, "s0", step.attempt, 0.01, False))["v"]
    for i, seconds in enumerate(payload.naps):
        await step.sleep(f"nap-{i}", seconds)
        log_line("H", step.run_id, f"nap-{i}", os.getpid(), step.attempt, wall_ms(), "-")
        name = f"s{i + 1}"
        effect = effect_sync if i % 2 else effect_async
        total += (await step.run(name, effect, step.run_id, name, step.attempt, 0.01, False))["v"]
    return ChainOut(total=total)


class Token(BaseModel):
    token: str


class SignalIn(BaseModel):
    waits: int  # waits for the signals go-0 .. go-{waits-1}, each followed by a step after-i


class SignalOut(BaseModel):
    total: int
    tokens: list[str]


MAX_WAITS = 3


def signal_names(waits: int) -> tuple[list[str], list[str]]:
    """(every checkpoint of a torture-signal run in order, the steps whose values add up)."""
    names = ["s0"]
    for i in range(waits):
        names += [f"go-{i}", f"after-{i}"]
    return names, [n for n in names if not n.startswith("go-")]


async def after_signal(run_id: str, name: str, attempt: int, token: str) -> dict[str, Any]:
    """The step after a wait: its committed result carries the payload the handler got."""
    result = await effect_async(run_id, name, attempt, 0.01, False)
    return {**result, "token": token}


@define_job(
    "torture-signal",
    input=SignalIn,
    output=SignalOut,
    signals={f"go-{i}": Token for i in range(MAX_WAITS)},
)
async def signalled(step: StepContext, payload: SignalIn) -> SignalOut:
    EXECUTING.set(step.run_id)
    total = (await step.run("s0", effect_sync, step.run_id, "s0", step.attempt, 0.02, False))["v"]
    tokens = []
    for i in range(payload.waits):
        got = await step.wait_for_signal(f"go-{i}", type=Token)
        log_line("H", step.run_id, f"go-{i}", os.getpid(), step.attempt, wall_ms(), got.token)
        after = await step.run(f"after-{i}", after_signal, step.run_id, f"after-{i}", step.attempt, got.token)
        total += after["v"]
        tokens.append(after["token"])
    return SignalOut(total=total, tokens=tokens)


# --- network-aware steps: offline waits ------------------------------------------------------------

# The harness's flag file: while it exists the network counts as down (set by --offline-flag).
OFFLINE_FLAG: str | None = None
OFFLINE_RECHECK = 0.2  # the workers' offline_recheck_interval (s): no "online" notice ever comes


class FlagFileNetwork:
    """The torture's network: down while the harness's flag file exists. It never announces
    that the network is back, so the workers find out by the recheck timer alone (a browser
    asleep, or one that sends no ``online`` event)."""

    def __init__(self, flag: str) -> None:
        self.flag = flag

    def online(self) -> bool:
        return not os.path.exists(self.flag)

    def is_network_error(self, exc: BaseException) -> bool:
        return isinstance(exc, ConnectionError)

    def watch(self, on_online: Callable[[], None]) -> Callable[[], None]:
        return lambda: None


class OfflineIn(BaseModel):
    needs_network: bool  # the step 'fetch' declares it (not attempted while offline)


OFFLINE_STEPS = ["s0", "fetch", "s1"]


async def fetch_effect(run_id: str, attempt: int) -> dict[str, Any]:
    """A request that fails with a ConnectionError while the flag file says offline. Its
    attempt number comes from the database, as flaky_effect's does."""
    assert DURABLY is not None
    recorded = await DURABLY.get_step_attempts(run_id)
    step_attempt = 1 + sum(1 for a in recorded if a.name == "fetch" and a.status == "failed")
    pid, xid = os.getpid(), new_execution_id()
    log_line("B", run_id, "fetch", pid, xid, attempt, time.monotonic_ns())
    log_line("A", run_id, "fetch", pid, xid, step_attempt, wall_ms())
    try:
        await asyncio.sleep(0.01)
        if OFFLINE_FLAG is not None and not FlagFileNetwork(OFFLINE_FLAG).online():
            log_line("F", run_id, "fetch", pid, xid)
            raise ConnectionError(f"fetch: no network (attempt {step_attempt}, xid {xid})")
    finally:
        log_line("E", run_id, "fetch", pid, xid, attempt, time.monotonic_ns())
    value = step_value(run_id, "fetch")
    return {"v": value, "x": xid, "run": run_id, "step": "fetch", "attempt": step_attempt}


@define_job("torture-offline", input=OfflineIn, output=ChainOut)
async def offline_fetcher(step: StepContext, payload: OfflineIn) -> ChainOut:
    """No retry policy: a network failure that used up an attempt would fail the run."""
    EXECUTING.set(step.run_id)
    first = await step.run("s0", effect_sync, step.run_id, "s0", step.attempt, 0.01, False)
    fetched = await step.run(
        "fetch", fetch_effect, step.run_id, step.attempt, needs_network=payload.needs_network
    )
    last = await step.run("s1", effect_async, step.run_id, "s1", step.attempt, 0.01, False)
    return ChainOut(total=first["v"] + fetched["v"] + last["v"])


# --- parallel steps (step.all) ---------------------------------------------------------------------


class ParallelIn(BaseModel):
    branches: int  # s0, then the branches p0 .. p{branches-1} in one step.all, then s1
    delay: float = 0.02
    fail_branch: int = -1  # this branch fails on purpose: the run fails, its siblings are recorded


def parallel_names(branches: int) -> list[str]:
    """Every step of a torture-parallel run, in position order (all add to its total)."""
    return ["s0", *(f"p{i}" for i in range(branches)), "s1"]


@define_job("torture-parallel", input=ParallelIn, output=ChainOut)
async def parallel(step: StepContext, payload: ParallelIn) -> ChainOut:
    run_id = step.run_id
    total = (await step.run("s0", effect_sync, run_id, "s0", step.attempt, 0.01, False))["v"]
    # Sync and async branches alternate: threads and tasks at once, each branch its own step.
    results = await step.all(
        {
            f"p{i}": (
                effect_sync if i % 2 == 0 else effect_async,
                run_id,
                f"p{i}",
                step.attempt,
                payload.delay * (1 + i % 3),
                i == payload.fail_branch,
            )
            for i in range(payload.branches)
        }
    )
    total += sum(result["v"] for result in results.values())
    total += (await step.run("s1", effect_async, run_id, "s1", step.attempt, 0.01, False))["v"]
    return ChainOut(total=total)


# --- child runs: step.start_child / step.wait_for_child ---------------------------------------


class ParentIn(BaseModel):
    delay: float = 0.02  # the step p0 between starting the child and waiting for it


class ParentOut(BaseModel):
    total: int  # the child's total: what wait_for_child returned
    child: str


#: The checkpoints of a torture-parent run: the child started, a step, the child waited for.
PARENT_STEPS = ["child", "p0", "child-done"]


@define_job("torture-subrun", input=ChildIn, output=ChainOut)
async def subrun(step: StepContext, payload: ChildIn) -> ChainOut:
    first = await step.run("c0", effect_sync, step.run_id, "c0", step.attempt, 0.01, False)
    second = await step.run("c1", effect_async, step.run_id, "c1", step.attempt, 0.01, False)
    return ChainOut(total=first["v"] + second["v"])


@define_job("torture-parent", input=ParentIn, output=ParentOut)
async def parent(step: StepContext, payload: ParentIn) -> ParentOut:
    handle = await step.start_child("child", subrun, {"parent": step.run_id})
    await step.run("p0", effect_async, step.run_id, "p0", step.attempt, payload.delay, False)
    out: ChainOut = await step.wait_for_child("child-done", handle)
    return ParentOut(total=out.total, child=handle.run_id)


class DeadlineIn(BaseModel):
    nap: float  # seconds of the sleep between s0 and s1


DEADLINE_STEPS = ["s0", "nap", "s1"]


@define_job("torture-deadline", input=DeadlineIn, output=ChainOut, timeout=120)
async def deadlined(step: StepContext, payload: DeadlineIn) -> ChainOut:
    """A run with a deadline (the job's 120 s, or the trigger's): triggered with a timeout
    shorter than its nap it must fail with RunTimeoutError, whoever is alive at the deadline;
    otherwise it completes like any run, kills and all."""
    EXECUTING.set(step.run_id)
    first = await step.run("s0", effect_sync, step.run_id, "s0", step.attempt, 0.01, False)
    await step.sleep("nap", payload.nap)
    log_line("H", step.run_id, "nap", os.getpid(), step.attempt, wall_ms(), "-")
    last = await step.run("s1", effect_async, step.run_id, "s1", step.attempt, 0.01, False)
    return ChainOut(total=first["v"] + last["v"])


# --- flow control: a job with max_concurrent ----------------------------------------------------------

LIMITED_MAX = 2  # torture-limited's max_concurrent: never more of its runs live at once


class LimitedIn(BaseModel):
    steps: int
    delay: float = 0.04


@define_job("torture-limited", input=LimitedIn, output=ChainOut, max_concurrent=LIMITED_MAX)
async def limited(step: StepContext, payload: LimitedIn) -> ChainOut:
    """Steps s0 .. s{steps-1}, long enough that its runs' side effects overlap whenever the
    workers run several at once (the limit is what keeps them to LIMITED_MAX)."""
    total = 0
    for i in range(payload.steps):
        name = f"s{i}"
        effect = effect_sync if i % 2 == 0 else effect_async
        total += (await step.run(name, effect, step.run_id, name, step.attempt, payload.delay, False))["v"]
    return ChainOut(total=total)


JOBS = [
    chain,
    child,
    retrying,
    sleeper,
    signalled,
    offline_fetcher,
    parallel,
    subrun,
    parent,
    deadlined,
    limited,
]


# --- runs started at once: trigger_and_wait from the worker's own process --------------------------

#: The label that names a run a worker triggered itself: its token, from the I line before.
AT_ONCE_LABEL = "torture-at-once"


def draw_at_once_run(rng: random.Random, lease: float) -> tuple[str, dict[str, Any]]:
    """The job and input of a run a worker triggers itself: mostly chains (some failing,
    spawning a child, or with a blocking step that outlasts the lease, so the lease it was
    created with must be renewed), some step.all runs and some sleeps (the run leaves its
    lease at the sleep and is claimed again)."""
    roll = rng.random()
    # Steps long enough that a kill aimed at such a run (harness.wait_at_once_in_flight) finds one.
    delay = rng.choice([0.02, 0.05, 0.1])
    if roll < 0.15:
        branches = rng.randint(2, 4)
        payload: dict[str, Any] = {"branches": branches, "delay": delay}
        if rng.random() < 0.2:
            payload["fail_branch"] = rng.randrange(branches)
        return "torture-parallel", payload
    if roll < 0.3:
        return "torture-sleep", {"naps": [round(rng.uniform(0.05, 0.3), 3)]}
    steps = rng.randint(3, 8)
    payload = {"steps": steps, "delay": delay}
    if rng.random() < 0.15:
        payload["fail_at"] = rng.randrange(steps)
    if rng.random() < 0.2:
        payload["spawn"] = True
    if rng.random() < 0.08:
        payload["slow"] = lease * 1.25
    return "torture-chain", payload


def compact(value: Any) -> str:
    """JSON without spaces: one field of a log line."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


class AtOnceCaller:
    """This worker's own ``trigger_and_wait`` calls, each made once the worker is idle (its
    last look found nothing to claim), so that the engine creates the run leased to this
    worker and starts it at once; the torture kills them like any other run.

    Whether a run was started at once is what ``Worker.start_at_once`` answered (it is
    observed, not replaced). A call waits for its run's insert (its C line, or an error)
    before the next call, and once the harness's quit flag exists none is made: after the
    Q line this process creates no more runs, so the harness can drain the queue."""

    def __init__(self, durably: Durably, args: argparse.Namespace) -> None:
        self.durably = durably
        self.budget = args.at_once
        self.rng = random.Random(args.at_once_seed)
        self.quit_flag = args.at_once_quit
        self.lease = args.lease
        self.started_at_once: set[str] = set()  # run ids start_at_once created leased
        self.inserted: dict[str, asyncio.Future[None]] = {}  # token -> its run was created
        self.calls: set[asyncio.Task[None]] = set()
        self.loop_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        worker = self.durably._worker
        assert worker is not None
        plain = worker.start_at_once

        async def observed(new: NewRun) -> RunRecord | None:
            record = await plain(new)
            if record is not None:
                self.started_at_once.add(record.id)
            return record

        worker.start_at_once = observed  # type: ignore[method-assign]
        # Emitted right after the insert committed, on both paths. On PostgreSQL this also
        # hears other processes' triggers (read back after their notifications): not our tokens.
        self.durably.on("run:trigger", self.on_trigger)
        self.loop_task = asyncio.create_task(self.call_when_idle(), name="torture-at-once")

    def on_trigger(self, event: Event) -> None:
        token = (event.data.get("labels") or {}).get(AT_ONCE_LABEL)
        inserted = self.inserted.pop(token, None) if token is not None else None
        if inserted is None:
            return
        how = "leased" if event.run_id in self.started_at_once else "pending"
        log_line("C", token, event.run_id, os.getpid(), how, time.monotonic_ns())
        if not inserted.done():
            inserted.set_result(None)

    def quitting(self) -> bool:
        return self.quit_flag is not None and os.path.exists(self.quit_flag)

    def idle(self) -> bool:
        """The worker's last look found nothing to claim and it has a free slot."""
        worker = self.durably._worker
        assert worker is not None
        return worker.found_nothing_to_claim and len(worker.active) < worker.config.max_concurrent_runs

    async def call_when_idle(self) -> None:
        loop = asyncio.get_running_loop()
        while self.budget > 0 and not self.quitting():
            await asyncio.sleep(self.rng.uniform(0.0, 0.3))
            # Polls: the worker announces no idle moment (test_start_at_once waits the same way).
            while not self.quitting() and not self.idle():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            if self.quitting():
                break
            self.budget -= 1
            token = new_execution_id()
            job, payload = draw_at_once_run(self.rng, self.lease)
            inserted: asyncio.Future[None] = loop.create_future()
            self.inserted[token] = inserted
            log_line("I", token, os.getpid(), job, compact(payload), time.monotonic_ns())
            call = asyncio.create_task(self.call(token, job, payload, inserted), name=f"torture-call-{token}")
            self.calls.add(call)
            call.add_done_callback(self.calls.discard)
            await inserted
        log_line("Q", os.getpid(), time.monotonic_ns())

    async def call(
        self, token: str, job: str, payload: dict[str, Any], inserted: asyncio.Future[None]
    ) -> None:
        try:
            run = await self.durably.trigger_and_wait(job, payload, labels={AT_ONCE_LABEL: token})
        except Exception as exc:  # the checker reports it: a caller must get its run back
            log_line("X", token, os.getpid(), f"{type(exc).__name__}: {exc}".replace("\n", " "))
            return
        finally:
            self.inserted.pop(token, None)
            if not inserted.done():
                inserted.set_result(None)  # no run, or an error: the next call may go
        output = run.output.model_dump() if isinstance(run.output, BaseModel) else run.output
        output_field = "-" if output is None else compact(output)
        log_line("D", token, run.id, os.getpid(), run.status, output_field, time.monotonic_ns())

    async def stop(self) -> None:
        """Before the store closes: no more calls, and each one in flight returns (every run
        has ended when the harness stops a worker) or is cancelled after a while."""
        if self.loop_task is not None:
            self.loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.loop_task
        if self.calls:
            _done, late = await asyncio.wait(set(self.calls), timeout=5.0)
            for call in late:
                call.cancel()
            await asyncio.gather(*late, return_exceptions=True)


async def serve(args: argparse.Namespace) -> None:
    global DURABLY, OFFLINE_FLAG
    open_log(args.log_file)
    OFFLINE_FLAG = args.offline_flag
    network: dict[str, Any] = {}
    if args.offline_flag is not None:
        network = {"network": FlagFileNetwork(args.offline_flag), "offline_recheck_interval": OFFLINE_RECHECK}
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
        **network,
    )
    DURABLY = durably

    def on_worker_error(event: Event) -> None:
        error = event.data["error"]
        if error.type == "LeaseLostError":
            log_line("L", event.run_id, os.getpid(), time.monotonic_ns(), error.type)

    durably.on("worker:error", on_worker_error)

    # The W lines: every wait this process committed, with its persisted wake-up time. Both
    # events are emitted (synchronously, in this order) only after the wait's transaction
    # committed.
    retried: dict[str, int] = {}

    def on_retry(event: Event) -> None:
        assert event.run_id is not None
        if EXECUTING.get() == event.run_id:
            retried[event.run_id] = event.data["attempt"]

    def on_waiting(event: Event) -> None:
        assert event.run_id is not None
        if EXECUTING.get() != event.run_id:
            return  # another process's wait (PostgreSQL's notifications): it logs it itself
        due = event.data["due_at"]
        due_ms = -1 if due is None else round(due.timestamp() * 1000)
        after = retried.pop(event.run_id, 0) if event.data["reason"] == "retry" else 0
        step_name, reason = event.data["step_name"], event.data["reason"]
        log_line("W", event.run_id, step_name, reason, due_ms, after, os.getpid(), time.monotonic_ns())

    durably.on("step:retry", on_retry)
    durably.on("run:waiting", on_waiting)
    async with durably:
        log_line("S", os.getpid(), time.monotonic_ns())
        caller = AtOnceCaller(durably, args)
        caller.start()
        try:
            await stop.wait()
        finally:
            await caller.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("db_url")
    parser.add_argument("log_file")
    parser.add_argument("--lease", type=float, default=3.0)
    parser.add_argument("--renew", type=float, default=0.3)
    parser.add_argument("--poll", type=float, default=0.05)
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--sole", action="store_true")
    parser.add_argument("--offline-flag", default=None)
    parser.add_argument("--at-once", type=int, default=0, help="runs to trigger_and_wait here, when idle")
    parser.add_argument("--at-once-seed", type=int, default=0)
    parser.add_argument("--at-once-quit", default=None, help="once this file exists, trigger nothing more")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
