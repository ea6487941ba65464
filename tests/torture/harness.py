"""Crash torture: SIGKILL real worker processes at random moments, then prove from the
side effects the steps recorded themselves that nothing was lost or run twice.

``run_torture(workdir, kills=N, processes=1 | 2, seed=S)`` triggers a mix of runs
(many steps, failing steps, concurrency keys, idempotency keys, child runs
spawned from a step, cancellations issued while running or waiting, slow runs whose
blocking step outlasts the lease, so they survive only if the lease is renewed,
and durable waits: a step retried under a ``RetryPolicy`` that fails N times then
succeeds or runs out of attempts, short ``step.sleep`` naps, and ``wait_for_signal``
runs whose signals this client sends with a ``signal_id``, before the run reaches
its wait, while it waits, while no worker is alive, and twice; ``step.all`` runs whose
sync and async branches run at once, one of them sometimes failing on purpose; and parents
that start a child run with ``step.start_child`` and wait for it with ``wait_for_child``)
from a client in this process, runs them in worker subprocesses
(``torture_jobs.py``) on one database (a SQLite file of its own, or the empty
database ``db_url`` names: PostgreSQL), kills a worker ``kills`` times in a
row (restarting it each time; some kills aimed at a moment a step is in
flight), lets the last workers drain the queue, and checks, from the
side-effect log (every step execution writes a begin line before its side
effect and an end line after it, tagged with pid and an execution id) and the
database:

* every accepted run (and every spawned child) reached the terminal state it
  must reach: cancelled if our cancel was accepted, failed if it has a failing
  step, otherwise completed with the right output (step values depend on the
  run id, so a run handed another run's results has the wrong total);
* every committed step was produced by an execution in the log, of that run
  and that step, whose side effect ended (committed-but-never-run is caught);
* no step ran again after its commit, and no step ran twice in one attempt;
* no two executions of one step overlapped while both were live: a second
  execution must begin after the first one's side effect ended or its process
  was SIGKILLed (a takeover of a live run is a violation, whatever the lease);
* every execution that did not produce the committed result is accounted for:
  its process was killed while it was that process's last step of the run (the
  branches of a step.all together), or
  the run was taken over later (a lease lapse, counted), or it is the last try
  of a step whose run was cancelled or failed there;
* every step that began also ended, unless its process was killed;
* no second run for a duplicate idempotency key (ours, and the child runs a
  re-executed step triggers with a key derived from its run);
* every ``torture-parent`` run started exactly one child run (``parent_run_id`` its id,
  however often it was killed between ``start_child`` and ``wait_for_child``), and its
  output is that child's (its id and total);
* no overlap in time between side effects of different runs sharing a
  concurrency key (a killed process's in-flight step ends at its kill);
* every ``LeaseLostError`` a worker reported is for a run that another
  execution really took over (they are counted: a healthy torture has none);
* flow control: runs of ``torture-limited`` (``max_concurrent=2``, triggered in bursts,
  some with a priority) never have side effects of more than 2 of them live at once,
  across every worker process (a killed process's in-flight step ends at its kill), and
  each completes with its output; the peak is counted (a torture whose limit was never
  reached tested nothing).

Runs started at once (:func:`check_at_once`): every worker process also calls
``trigger_and_wait`` itself for a few runs (``torture_jobs.AtOnceCaller``), each once it is
idle, so that the engine creates the run already leased to it and starts it without a claim
(``Worker.start_at_once``); the kills hit them like any other run. They are accepted runs,
found by their label (``torture_jobs.AT_ONCE_LABEL``) and known by the job and input the
worker logged before the call, so every rule above holds for them too; and besides:

* a call created at most one run, of its job and input, and one unless its process was
  killed before the insert; a run the worker saw created (C line) is in the database, with
  its label rows;
* a run created leased has ``started_at == created_at`` (the insert was its claim); its
  first attempt executed in the process that created it, nowhere else, and no later
  attempt began while that process lived, unless the run committed a wait there or it
  reported the lease lost (every torture has such a run whose creator is never killed);
* ``trigger_and_wait`` returned to every caller that was not killed, the run's final status
  and output.

They are counted: started at once, queued (created pending: the worker was no longer idle),
and resumed (started at once, their first lease lost to a kill, finished by a later attempt).
A torture in which no run started at once tested nothing of them.

Durable waiting (:func:`check_waits`; wall-clock times in ms, the engine's clock):

* retries: a step's recorded attempt numbers are 1, 2, ... n with no gap, and its
  final row is attempt n + 1; n is what the policy allows (the step's failures, or
  max_attempts - 1 when they run out); every recorded failure names (in its error)
  an execution of that very attempt that failed on purpose and ended, and no
  execution of that attempt (or an earlier one) begins after it; an execution of
  attempt k + 1 never begins before attempt k's recorded end plus the policy's
  backoff, nor before the wake-up time the engine persisted for that retry (the
  ``run:waiting`` event's, logged once the wait committed), nor before attempt k's
  side effect ended; a retry wait is never committed without its attempt row;
* sleeps: the checkpoint records a due time of its start plus the duration; every
  committed wait of the sleep persisted that same due time (never recomputed after
  a kill); the handler never gets past the sleep before it (on any execution);
* signals: every accepted send (``stored`` / ``delivered``) is stored exactly once
  with its payload, a repeated ``signal_id`` is reported ``duplicate`` and stores
  nothing; a wait consumed exactly one signal, the first one sent under its name,
  and its checkpoint holds that signal's payload; a signal is consumed if and only
  if its wait's checkpoint committed; the handler (on every execution, replays
  included) and the step after the wait got that payload, never before it was
  sent; only a cancelled run refuses a signal it still waits for.
* network: the harness takes the workers' network down and up at random (a flag file
  their ``NetworkStatus`` reads); a step that fails with a network error while it is
  down records an attempt flagged ``offline`` that names an execution which failed for
  that reason, and uses up no attempt (the job has no retries: one counted failure fails
  its run, and the run must complete); its runs wait with reason ``offline`` only.

Seeds: ``seed=None`` picks one, and every summary and violation names it;
passing it back replays the same choices (the timing of a loaded machine is
not replayable, so a replay may need a few tries).

It returns a :class:`TortureResult` with the counts and every violation found.
The checker (:func:`check_log`) is a plain function of the log text, the
database rows and the client's knowledge, so tests can feed it hand-made logs.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torture_jobs
from db_state import read_state

from durably_web import ConflictError, Durably

WORKER_SCRIPT = Path(__file__).with_name("torture_jobs.py")
CONCURRENCY_KEYS = ("ck-a", "ck-b")
# One wall clock (time.time) on one machine; 1 ms for the engine's int(time * 1000) against
# the log's time_ns() // 10**6.
CLOCK_SLACK_MS = 1
WAIT_JOBS = ("torture-retry", "torture-sleep", "torture-signal", "torture-offline")
#: A job with a deadline: timed out on purpose when triggered with a timeout below its nap.
DEADLINE_JOB = "torture-deadline"
SEED_VARIABLE = "DURABLY_TORTURE_SEED"
# Long enough that a loaded 2-core machine does not stall a worker's event loop past its
# lease (a lapse while the worker lives is a takeover of a live run: a violation).
DEFAULT_LEASE = 3.0
DEFAULT_RENEW = 0.3


def choose_seed(seed: int | None = None) -> int:
    """``seed``, else ``$DURABLY_TORTURE_SEED``, else a fresh random one."""
    if seed is not None:
        return seed
    env = os.environ.get(SEED_VARIABLE)
    if env:
        return int(env)
    return int.from_bytes(os.urandom(4), "big")


@dataclass
class TortureResult:
    seed: int = 0
    kills: int = 0
    processes: int = 1
    runs: int = 0  # accepted runs, spawned children included
    steps: int = 0  # committed steps in the database
    executions: int = 0  # step executions recorded in the log
    duplicates: int = 0  # lost executions explained by a kill
    interrupted: int = 0  # kills that hit a process with a step in flight
    lease_lapses: int = 0  # lost executions of a live worker whose run was taken over
    lease_lost_errors: int = 0  # LeaseLostError reported by workers
    outlasted_lease: int = 0  # run executions that lived longer than one lease (renewal needed)
    cancelled: int = 0
    failed: int = 0
    completed: int = 0
    retried: int = 0  # recorded failed attempts of retried steps
    slept: int = 0  # sleep checkpoints committed
    waits: int = 0  # waits committed (W lines: retry backoffs, sleeps, signal waits)
    signals_sent: int = 0  # send_signal calls, duplicates included
    signals_duplicate: int = 0  # sends reported "duplicate" (a repeated signal_id)
    signals_early: int = 0  # sends "stored" (the run was not waiting for it yet)
    signals_delivered: int = 0  # sends "delivered" (the run was waiting for it)
    signals_consumed: int = 0  # signal waits whose checkpoint committed
    offline_waits: int = 0  # waits for the network committed (W lines with reason offline)
    offline_failures: int = 0  # recorded step attempts that failed offline (no retry used up)
    child_runs: int = 0  # runs started with step.start_child (one per torture-parent run)
    limited_runs: int = 0  # runs of torture-limited (max_concurrent=LIMITED_MAX)
    limited_peak: int = 0  # the most of them with a side effect live at one moment
    at_once_calls: int = 0  # trigger_and_wait calls of the workers themselves (I lines)
    started_at_once: int = 0  # ... whose run the engine created leased and started at once
    at_once_queued: int = 0  # ... whose run was created pending (the worker was busy again)
    at_once_resumed: int = 0  # runs started at once whose first lease a kill ended, resumed later
    violations: list[str] = field(default_factory=list)
    wall_time: float = 0.0
    timed_out: int = 0  # runs failed with RunTimeoutError at their deadline, as intended

    def summary(self) -> str:
        return (
            f"seed={self.seed} kills={self.kills} processes={self.processes} runs={self.runs} "
            f"steps={self.steps} executions={self.executions} duplicates={self.duplicates} "
            f"interrupted={self.interrupted} outlasted_lease={self.outlasted_lease} "
            f"lease_lapses={self.lease_lapses} lease_lost_errors={self.lease_lost_errors} "
            f"completed={self.completed} failed={self.failed} cancelled={self.cancelled} "
            f"retried={self.retried} slept={self.slept} waits={self.waits} "
            f"signals_sent={self.signals_sent} (stored={self.signals_early} "
            f"delivered={self.signals_delivered} duplicate={self.signals_duplicate}) "
            f"signals_consumed={self.signals_consumed} child_runs={self.child_runs} "
            f"offline_waits={self.offline_waits} offline_failures={self.offline_failures} "
            f"timed_out={self.timed_out} "
            f"limited_runs={self.limited_runs} limited_peak={self.limited_peak} "
            f"at_once_calls={self.at_once_calls} started_at_once={self.started_at_once} "
            f"at_once_queued={self.at_once_queued} at_once_resumed={self.at_once_resumed} "
            f"violations={len(self.violations)} wall={self.wall_time:.1f}s"
        )

    def report(self) -> str:
        """The summary and every violation, each naming the seed to replay it with."""
        lines = [self.summary()]
        lines += [f"VIOLATION (seed {self.seed}): {v}" for v in self.violations]
        return "\n".join(lines)


@dataclass
class SentSignal:
    """One ``send_signal`` call of the client, and what it answered."""

    name: str
    signal_id: str
    token: str  # the payload is {"token": token}
    role: str  # "primary" (the first of its name), "duplicate" (its signal_id again), "spare"
    disposition: str = ""  # stored | delivered | duplicate | refused (ConflictError: run ended)
    sent_ms: int = 0  # wall clock just before the call


@dataclass
class Expected:
    """What the client knows about one accepted run."""

    run_id: str
    steps: int = 0
    fail_at: int = -1
    spawn: bool = False
    concurrency_key: str | None = None
    cancel_accepted: bool = False
    protected: bool = False  # never chosen for cancellation: the mix stays mixed
    job: str = "torture-chain"
    fails: int = 0  # torture-retry: failures of the step 'flaky' ...
    max_attempts: int = 1  # ... under a policy of this many attempts ...
    retry_delay: float = 0.0  # ... with this initial delay
    naps: list[float] = field(default_factory=list)  # torture-sleep: the sleeps' seconds
    waits: int = 0  # torture-signal: the signal waits go-0 ..
    signals: list[SentSignal] = field(default_factory=list)  # every send to this run, in order
    branches: int = 0  # torture-parallel: the step.all's branches ...
    fail_branch: int = -1  # ... and the one that fails on purpose
    nap: float = 0.0  # torture-deadline: the sleep's seconds ...
    timeout: float | None = None  # ... and the trigger's timeout (None: the job's 120 s)

    @property
    def times_out(self) -> bool:
        """A torture-deadline run whose deadline comes before it can wake: it must time out."""
        return self.job == DEADLINE_JOB and self.timeout is not None and self.timeout < self.nap

    def winners(self) -> dict[str, SentSignal]:
        """Per signal name, the send a wait must consume: the first one stored."""
        found: dict[str, SentSignal] = {}
        for sent in self.signals:
            if sent.disposition in ("stored", "delivered"):
                found.setdefault(sent.name, sent)
        return found


@dataclass
class Execution:
    """One execution of one step, from its B line (and E line, if it ended)."""

    run_id: str
    step: str
    pid: int
    xid: str
    attempt: int
    begin: int
    end: int | None = None


@dataclass
class Wait:
    """A W line: a wait that committed, with the wake-up time the engine persisted."""

    run_id: str
    step: str
    reason: str
    due_ms: int  # -1: none (a signal wait without timeout)
    after: int  # a retry: the failed step attempt it follows; else 0
    pid: int


@dataclass
class Passed:
    """An H line: the handler got past a sleep or a signal wait."""

    run_id: str
    wait: str
    pid: int
    attempt: int
    wall_ms: int
    token: str  # the signal's payload; "-" for a sleep


@dataclass
class AtOnceCall:
    """A worker's own trigger_and_wait call: its I line, then its C and D lines (if any)."""

    token: str
    pid: int
    job: str
    payload: dict[str, Any]
    run_id: str | None = None  # C: the run created ...
    how: str = ""  # ... "leased" (started at once) or "pending" ...
    created_t: int = 0  # ... at this time.monotonic_ns()
    returned: tuple[str, str, Any] | None = None  # D: (run id, status, output)
    error: str | None = None  # X: what it raised


@dataclass
class Log:
    executions: dict[str, Execution] = field(default_factory=dict)  # by xid
    ready: dict[int, int] = field(default_factory=dict)  # pid -> t
    spawned: list[tuple[str, str, str]] = field(default_factory=list)  # parent, child, xid
    lease_lost: list[tuple[str, int, int]] = field(default_factory=list)  # run_id, pid, t
    step_attempts: dict[str, tuple[int, int]] = field(default_factory=dict)  # xid -> (attempt, wall_ms)
    failures: set[str] = field(default_factory=set)  # xids that failed on purpose
    waits: list[Wait] = field(default_factory=list)
    passed: list[Passed] = field(default_factory=list)
    calls: dict[str, AtOnceCall] = field(default_factory=dict)  # by token
    quit: set[int] = field(default_factory=set)  # pids that trigger nothing more (Q lines)
    problems: list[str] = field(default_factory=list)


def parse_log(text: str) -> Log:
    """Parse the side-effect log (format in ``torture_jobs.py``); a last line without its
    newline is still being written and is ignored."""
    log = Log()
    for raw in text.split("\n")[:-1]:
        parts = raw.split(" ")
        kind = parts[0]
        if kind == "S" and len(parts) == 3:
            log.ready[int(parts[1])] = int(parts[2])
        elif kind == "B" and len(parts) == 7:
            run_id, step, pid, xid, attempt, t = parts[1:]
            if xid in log.executions:
                log.problems.append(f"execution id {xid} begins twice")
            log.executions[xid] = Execution(run_id, step, int(pid), xid, int(attempt), int(t))
        elif kind == "E" and len(parts) == 7:
            xid = parts[4]
            execution = log.executions.get(xid)
            if execution is None or execution.end is not None or execution.step != parts[2]:
                log.problems.append(f"end line without its begin: {raw!r}")
            else:
                execution.end = int(parts[6])
        elif kind == "T" and len(parts) == 8:
            log.spawned.append((parts[1], parts[2], parts[4]))
        elif kind == "L" and len(parts) == 5:
            log.lease_lost.append((parts[1], int(parts[2]), int(parts[3])))
        elif kind == "A" and len(parts) == 7:
            xid, step_attempt, wall = parts[4], int(parts[5]), int(parts[6])
            execution = log.executions.get(xid)
            if execution is None or execution.step != parts[2] or xid in log.step_attempts:
                log.problems.append(f"attempt line without its begin: {raw!r}")
            else:
                log.step_attempts[xid] = (step_attempt, wall)
        elif kind == "F" and len(parts) == 5:
            if parts[4] not in log.executions:
                log.problems.append(f"failure line without its begin: {raw!r}")
            log.failures.add(parts[4])
        elif kind == "W" and len(parts) == 8:
            run_id, step, reason, due, after, pid = parts[1:7]
            log.waits.append(Wait(run_id, step, reason, int(due), int(after), int(pid)))
        elif kind == "H" and len(parts) == 7:
            run_id, wait, pid, attempt, at, token = parts[1:]
            log.passed.append(Passed(run_id, wait, int(pid), int(attempt), int(at), token))
        elif kind == "I" and len(parts) == 6:
            token, pid, job, payload = parts[1:5]
            if token in log.calls:
                log.problems.append(f"trigger_and_wait token {token} announced twice")
            log.calls[token] = AtOnceCall(token, int(pid), job, json.loads(payload))
        elif kind in ("C", "D", "X") and len(parts) >= 4:
            call = log.calls.get(parts[1])
            if call is None:
                log.problems.append(f"{kind} line of a trigger_and_wait never announced: {raw!r}")
            elif kind == "C" and len(parts) == 6 and call.run_id is None:
                call.run_id, call.how, call.created_t = parts[2], parts[4], int(parts[5])
            elif kind == "D" and len(parts) == 7 and call.run_id == parts[2] and call.returned is None:
                output = None if parts[5] == "-" else json.loads(parts[5])
                call.returned = (parts[2], parts[4], output)
            elif kind == "X":
                call.error = " ".join(parts[3:])
            else:
                log.problems.append(f"unexpected trigger_and_wait line {raw!r}")
        elif kind == "Q" and len(parts) == 3:
            log.quit.add(int(parts[1]))
        else:
            log.problems.append(f"unparseable side-effect line {raw!r}")
    return log


def expected_of(
    run_id: str, job: str, payload: dict[str, Any], options: dict[str, Any], *, protected: bool
) -> Expected:
    """What triggering ``job`` with ``payload`` and trigger ``options`` must lead to."""
    return Expected(
        run_id=run_id,
        steps=payload.get("steps", 0),
        fail_at=payload.get("fail_at", -1),
        spawn=payload.get("spawn", False),
        concurrency_key=options.get("concurrency_key"),
        protected=protected,
        job=job,
        fails=payload.get("fails", 0),
        max_attempts=payload.get("max_attempts", 1),
        retry_delay=payload.get("delay", 0.0) if job == "torture-retry" else 0.0,
        naps=list(payload.get("naps", [])),
        waits=payload.get("waits", 0),
        branches=payload.get("branches", 0),
        fail_branch=payload.get("fail_branch", -1),
        nap=payload.get("nap", 0.0),
        timeout=options.get("timeout"),
    )


def read_log(path: Path) -> Log:
    return parse_log(path.read_bytes().decode() if path.exists() else "")


def expected_outcome(exp: Expected) -> tuple[list[str], str, dict[str, Any] | None, str | None]:
    """The checkpoints a run must have committed, its final status, its output (None: no
    output expected) and the step it fails at (None: it does not fail)."""
    total = torture_jobs.expected_total
    if exp.job == "torture-retry":
        names = list(torture_jobs.RETRY_STEPS)
        if exp.cancel_accepted:
            return names, "cancelled", None, None
        if exp.fails >= exp.max_attempts:
            return ["s0"], "failed", None, "flaky"
        return names, "completed", {"total": total(exp.run_id, names)}, None
    if exp.job == "torture-offline":
        names = list(torture_jobs.OFFLINE_STEPS)
        if exp.cancel_accepted:
            return names, "cancelled", None, None
        return names, "completed", {"total": total(exp.run_id, names)}, None
    if exp.job == DEADLINE_JOB:
        names = list(torture_jobs.DEADLINE_STEPS)
        if exp.times_out:  # intentional: nothing need have run, no step fails
            return [], "failed", None, None
        return names, "completed", {"total": total(exp.run_id, ["s0", "s1"])}, None
    if exp.job == "torture-limited":
        names = torture_jobs.chain_value_steps(exp.steps)
        if exp.cancel_accepted:
            return names, "cancelled", None, None
        return names, "completed", {"total": total(exp.run_id, names)}, None
    if exp.job in ("torture-sleep", "torture-signal"):
        if exp.job == "torture-sleep":
            names, values = torture_jobs.sleep_names(len(exp.naps))
            output: dict[str, Any] = {"total": total(exp.run_id, values)}
        else:
            names, values = torture_jobs.signal_names(exp.waits)
            winners = exp.winners()
            tokens = [winners[f"go-{i}"].token if f"go-{i}" in winners else None for i in range(exp.waits)]
            output = {"total": total(exp.run_id, values), "tokens": tokens}
        if exp.cancel_accepted:
            return names, "cancelled", None, None
        return names, "completed", output, None
    if exp.job == "torture-parallel":
        names = torture_jobs.parallel_names(exp.branches)
        if exp.cancel_accepted:
            return names, "cancelled", None, None
        if exp.fail_branch >= 0:
            # The failing branch's siblings are recorded all the same; s1 is never reached.
            failing = f"p{exp.fail_branch}"
            return [n for n in names if n not in (failing, "s1")], "failed", None, failing
        return names, "completed", {"total": total(exp.run_id, names)}, None
    names = [f"s{i}" for i in range(exp.steps)]
    if exp.spawn and exp.steps > 1:
        names.append("spawn")
    if exp.cancel_accepted:
        return names, "cancelled", None, None
    if exp.fail_at >= 0:
        committed = names[: exp.fail_at] + (["spawn"] if exp.spawn and exp.fail_at >= 1 else [])
        return committed, "failed", None, f"s{exp.fail_at}"
    want = {"total": total(exp.run_id, torture_jobs.chain_value_steps(exp.steps))}
    return names, "completed", want, None


def stop_time(killed: dict[int, int]) -> Callable[[Execution], int | None]:
    """When an execution's side effect stopped: its end line, or its process's death."""

    def stopped(e: Execution) -> int | None:
        death = killed.get(e.pid)
        if death is not None and death < e.begin:
            death = None  # a reused pid: not this process's death
        candidates = [t for t in (e.end, death) if t is not None]
        return min(candidates) if candidates else None

    return stopped


def steps_of(executions: Iterable[Execution]) -> dict[tuple[str, str], list[Execution]]:
    """Executions by (run id, step name), each list in order of beginning."""
    by_step: dict[tuple[str, str], list[Execution]] = defaultdict(list)
    for e in executions:
        by_step[(e.run_id, e.step)].append(e)
    for items in by_step.values():
        items.sort(key=lambda e: e.begin)
    return by_step


def live_overlaps(by_step: dict[tuple[str, str], list[Execution]], killed: dict[int, int]) -> list[str]:
    """Two executions of one step at once, both live: the second began before the first's
    side effect ended or its process was killed."""
    stopped = stop_time(killed)
    found = []
    for (run_id, name), items in by_step.items():
        for i, first in enumerate(items):
            first_stop = stopped(first)
            for second in items[i + 1 :]:
                if first_stop is None or second.begin < first_stop:
                    lasted = (
                        "still running"
                        if first_stop is None
                        else f"{(first_stop - second.begin) / 1e6:.1f} ms"
                    )
                    found.append(
                        f"step {run_id}/{name}: two live executions at once: {second.xid} (pid {second.pid}, "
                        f"attempt {second.attempt}) began while {first.xid} (pid {first.pid}, attempt "
                        f"{first.attempt}) was still running it (overlap: {lasted}; first killed: "
                        f"{first.pid in killed})"
                    )
    return found


def check_log(
    log: Log,
    runs: dict[str, dict[str, Any]],
    step_rows: Iterable[dict[str, Any]],
    expected: dict[str, Expected],
    killed: dict[int, int],
    result: TortureResult,
    *,
    lease_ns: int,
    idempotency: dict[str, str] | None = None,
    attempt_rows: Iterable[dict[str, Any]] = (),
    signal_rows: Iterable[dict[str, Any]] = (),
    label_rows: Iterable[dict[str, Any]] = (),
) -> None:
    """Check every invariant of the module docstring; add counts and violations to ``result``.

    ``runs``, ``step_rows``, ``attempt_rows`` (durably_step_attempts), ``signal_rows``
    (durably_signals) and ``label_rows`` (durably_run_labels) are the database rows (as
    dicts), ``expected`` what the client accepted (and the signals it sent; the runs the
    workers triggered themselves are added from the log), ``killed`` the SIGKILL time
    (``time.monotonic_ns()``, after the process was reaped) of every process we killed.
    """
    attempt_rows = list(attempt_rows)
    violations = result.violations
    violations.extend(log.problems)
    expected = {**expected, **adopt_at_once(log, runs, expected, result)}
    executions = list(log.executions.values())
    result.executions = len(executions)

    stopped = stop_time(killed)

    by_step = steps_of(executions)

    # No two live executions of one step at once.
    violations.extend(live_overlaps(by_step, killed))

    # Every step that began also ended, unless its process was killed.
    for e in executions:
        if stopped(e) is None:
            violations.append(
                f"step {e.run_id}/{e.step}: execution {e.xid} (pid {e.pid}) began and never ended "
                "in a worker that was not killed"
            )
    result.interrupted = sum(1 for pid in killed if any(e.pid == pid and e.end is None for e in executions))

    for (run_id, name), items in by_step.items():
        per_attempt: dict[int, list[str]] = defaultdict(list)
        for e in items:
            per_attempt[e.attempt].append(e.xid)
        for attempt, xids in per_attempt.items():
            if len(xids) > 1:
                violations.append(f"step {run_id}/{name} ran {len(xids)} times in attempt {attempt}: {xids}")

    rows_of: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for row in step_rows:
        rows_of[row["run_id"]][row["name"]] = row
    result.steps = sum(1 for rows in rows_of.values() for r in rows.values() if r["status"] == "completed")

    # Every committed step came from an ended execution of that very run and step.
    committed_xid: dict[tuple[str, str], str] = {}
    for run_id, rows in rows_of.items():
        for name, row in rows.items():
            if row["status"] == "failed":
                if not any(e.end is not None for e in by_step.get((run_id, name), [])):
                    violations.append(f"step {run_id}/{name} is recorded failed but never ran to its end")
                continue
            if row["status"] != "completed" or row.get("kind", "run") != "run":
                continue  # sleeps and signal waits run no side effect: check_waits checks them
            output = json.loads(row["output"]) if row["output"] else None
            xid = output.get("x") if isinstance(output, dict) else None
            execution = log.executions.get(xid) if isinstance(xid, str) else None
            if execution is None:
                violations.append(
                    f"step {run_id}/{name} is committed (result {output}) but no execution of it is in "
                    "the side effects: recorded, never executed"
                )
                continue
            if (execution.run_id, execution.step) != (run_id, name) or output.get("run") != run_id:
                violations.append(
                    f"step {run_id}/{name} committed the result of {execution.run_id}/{execution.step} "
                    f"(execution {xid}): results mixed up"
                )
                continue
            if execution.end is None:
                violations.append(f"step {run_id}/{name} was committed before its side effect ended ({xid})")
            if name != "spawn" and output.get("v") != torture_jobs.step_value(run_id, name):
                violations.append(f"step {run_id}/{name} committed value {output.get('v')}, not its own")
            committed_xid[(run_id, name)] = xid

    # Runs taken over later: the last attempt that executed anything, per run.
    last_attempt: dict[str, int] = defaultdict(int)
    for e in executions:
        last_attempt[e.run_id] = max(last_attempt[e.run_id], e.attempt)
    for run_id, row in runs.items():
        last_attempt[run_id] = max(last_attempt[run_id], int(row.get("attempt") or 0))
    lost_lease_at: set[tuple[str, int]] = {(run_id, pid) for run_id, pid, _ in log.lease_lost}
    # The executions whose failure was recorded as a retried attempt: accounted for.
    recorded_failures = {x for x in (failure_xid(r) for r in attempt_rows) if x is not None}

    # Committed steps never run again; every other execution is accounted for.
    for (run_id, name), items in by_step.items():
        xid = committed_xid.get((run_id, name))
        row = rows_of.get(run_id, {}).get(name)
        run_status = runs.get(run_id, {}).get("status")
        if xid is not None:
            committed = log.executions[xid]
            lost = [e for e in items if e.xid != xid]
            for e in lost:
                if e.begin > committed.begin or e.attempt > committed.attempt:
                    violations.append(
                        f"step {run_id}/{name} ran again after its commit: {e.xid} (pid {e.pid}, attempt "
                        f"{e.attempt}) after the committed {xid} (attempt {committed.attempt})"
                    )
            lost = [e for e in lost if e.begin < committed.begin and e.attempt < committed.attempt]
        else:
            lost = list(items)
            last = items[-1]
            if row is not None and row["status"] == "failed":
                lost.remove(last)  # the failing execution itself
            elif run_status == "cancelled" and row is None:
                lost.remove(last)  # in flight when the cancel stopped its run
            elif run_status == "failed" and row is None and _timed_out(runs[run_id]):
                lost.remove(last)  # in flight when the deadline stopped its run
            elif run_status == "completed":
                violations.append(f"step {run_id}/{name} ran but its completed run has no record of it")
        for e in lost:
            if e.xid in recorded_failures:
                continue  # a retried attempt (check_waits checks it matches its row)
            death = killed.get(e.pid)
            if death is not None and death >= e.begin:
                # The branches of one step.all run at once: together they are the last step.
                branches = runs.get(run_id, {}).get("job_name") == "torture-parallel" and _is_branch(name)
                later = [
                    o
                    for o in executions
                    if o.pid == e.pid
                    and o.run_id == run_id
                    and o.attempt == e.attempt
                    and o.begin > e.begin
                    and not (branches and _is_branch(o.step))
                ]
                if not later:
                    result.duplicates += 1
                    continue
            if last_attempt[run_id] > e.attempt or (run_id, e.pid) in lost_lease_at:
                result.lease_lapses += 1  # a live worker's run was taken over: counted, overlap checked above
                continue
            violations.append(
                f"step {run_id}/{name} ran more than once: {e.xid} (pid {e.pid}, attempt {e.attempt}, "
                f"killed: {e.pid in killed}) is neither a killed worker's in-flight step "
                "nor a taken-over run's"
            )

    # Lease-lost errors: only for runs another execution really took over.
    result.lease_lost_errors = len(log.lease_lost)
    for run_id, pid, _t in log.lease_lost:
        mine = [e.attempt for e in executions if e.run_id == run_id and e.pid == pid]
        if not mine or last_attempt[run_id] <= min(mine):  # the L line names no attempt
            violations.append(
                f"worker {pid} reported LeaseLostError for run {run_id}, which nobody took over"
            )

    # Renewal mattered: run executions (per run, attempt, process) that lived longer than a lease.
    spans: dict[tuple[str, int, int], list[int]] = {}
    for e in executions:
        stop = stopped(e) or e.begin
        span = spans.setdefault((e.run_id, e.attempt, e.pid), [e.begin, stop])
        span[0], span[1] = min(span[0], e.begin), max(span[1], stop)
    result.outlasted_lease = sum(1 for begin, end in spans.values() if end - begin > lease_ns)

    check_runs(log, runs, rows_of, expected, result, idempotency or {})
    check_at_once(log, runs, by_step, list(label_rows), killed, result)
    check_concurrency(runs, spans, result)
    check_max_concurrent(runs, spans, result)
    check_waits(log, by_step, rows_of, attempt_rows, list(signal_rows), expected, result)


def _is_branch(step: str) -> bool:
    """Whether a step of a torture-parallel run is one of its step.all's branches (p0, p1 ...)."""
    return re.fullmatch(r"p\d+", step) is not None


def at_once_token(row: dict[str, Any]) -> str | None:
    """The token of a run a worker triggered itself (its label), else None."""
    labels = json.loads(row["labels"]) if row.get("labels") else {}
    return labels.get(torture_jobs.AT_ONCE_LABEL)


def adopt_at_once(
    log: Log, runs: dict[str, dict[str, Any]], expected: dict[str, Expected], result: TortureResult
) -> dict[str, Expected]:
    """The runs the workers triggered themselves and the client has not adopted yet, as
    accepted runs: found by their label, known by the job and input of their I line."""
    adopted: dict[str, Expected] = {}
    for run_id, row in runs.items():
        token = at_once_token(row)
        if token is None or run_id in expected:
            continue
        call = log.calls.get(token)
        if call is None:
            result.violations.append(
                f"run {run_id} carries {torture_jobs.AT_ONCE_LABEL}={token}, "
                "but no worker announced that call"
            )
            continue
        adopted[run_id] = expected_of(run_id, call.job, call.payload, {}, protected=True)
    return adopted


def check_at_once(
    log: Log,
    runs: dict[str, dict[str, Any]],
    by_step: dict[tuple[str, str], list[Execution]],
    label_rows: list[dict[str, Any]],
    killed: dict[int, int],
    result: TortureResult,
) -> None:
    """The workers' own trigger_and_wait calls: the rules of the module docstring's third list
    (the runs themselves are checked with the others, by check_runs and the step rules)."""
    violations = result.violations
    runs_of: dict[str, list[str]] = defaultdict(list)  # token -> runs carrying it
    for run_id, row in runs.items():
        token = at_once_token(row)
        if token is not None:
            runs_of[token].append(run_id)
    labels_of: dict[str, dict[str, str]] = defaultdict(dict)
    for label in label_rows:
        labels_of[label["run_id"]][label["key"]] = label["value"]
    executions_of: dict[str, list[Execution]] = defaultdict(list)
    for (run_id, _name), items in by_step.items():
        executions_of[run_id] += items
    waited_in: set[tuple[str, int]] = {(w.run_id, w.pid) for w in log.waits}
    lost_lease_at: set[tuple[str, int]] = {(run_id, pid) for run_id, pid, _ in log.lease_lost}
    result.at_once_calls = len(log.calls)
    for token, call in log.calls.items():
        where = f"trigger_and_wait {token} (pid {call.pid}, {call.job})"
        ids = runs_of.get(token, [])
        if call.error is not None:
            violations.append(f"{where} raised {call.error}")
        if len(ids) > 1:
            violations.append(f"{where} created {len(ids)} runs: {sorted(ids)}")
        if not ids:
            if call.run_id is not None:
                violations.append(f"{where} created run {call.run_id}, which is missing from the database")
            elif call.pid not in killed:
                violations.append(f"{where} created no run, and its process was not killed")
            continue
        run_id = ids[0]
        row = runs[run_id]
        stored_input = json.loads(row["input"])  # the job's model: its defaults filled in
        if row["job_name"] != call.job or {k: stored_input.get(k) for k in call.payload} != call.payload:
            violations.append(
                f"{where}: its run {run_id} is {row['job_name']} {row['input']}, "
                f"not the call's {call.payload}"
            )
        if call.run_id is not None and call.run_id != run_id:
            violations.append(f"{where} was told {call.run_id} was created, but {run_id} carries its token")
        if labels_of.get(run_id, {}) != json.loads(row["labels"]):
            violations.append(
                f"run {run_id}: label rows {labels_of.get(run_id, {})} differ from its labels {row['labels']}"
            )
        executions = executions_of.get(run_id, [])
        if call.how == "leased":
            result.started_at_once += 1
            if row["started_at"] != row["created_at"]:
                violations.append(
                    f"run {run_id} was created leased (started at once), but started_at {row['started_at']} "
                    f"!= created_at {row['created_at']}"
                )
            elsewhere = sorted({e.pid for e in executions if e.attempt == 1 and e.pid != call.pid})
            if elsewhere:
                violations.append(
                    f"run {run_id} was started at once in pid {call.pid}, but its attempt 1 also ran "
                    f"in {elsewhere}"
                )
            # The insert's lease is the creator's until its process dies: a later attempt begins
            # only after that, or once attempt 1 committed a wait or reported the lease lost (a
            # lapse: the step rules count it and check it for overlaps).
            later = [e for e in executions if e.attempt > 1]
            handed_on = (run_id, call.pid) in waited_in or (run_id, call.pid) in lost_lease_at
            if later and not handed_on:
                first_later = min(later, key=lambda e: e.begin)
                death = killed.get(call.pid)
                if death is not None and death < call.created_t:
                    death = None  # a reused pid: an earlier process's death
                if death is None or first_later.begin < death:
                    violations.append(
                        f"run {run_id} was started at once in pid {call.pid}, but its attempt "
                        f"{first_later.attempt} began ({first_later.xid}, pid {first_later.pid}) while "
                        "that process still held the lease it was created with"
                    )
                else:
                    result.at_once_resumed += 1  # its first lease ended with its process
        elif call.how == "pending":
            result.at_once_queued += 1
        if call.returned is None:
            if call.pid not in killed:
                violations.append(f"{where}: never returned, and its process was not killed")
            continue
        returned_id, status, output = call.returned
        stored = json.loads(row["output"]) if row.get("output") else None
        if (returned_id, status, output) != (run_id, row["status"], stored):
            violations.append(
                f"{where} returned run {returned_id} {status} {output}, but run {run_id} ended "
                f"{row['status']} {stored}"
            )


def check_runs(
    log: Log,
    runs: dict[str, dict[str, Any]],
    rows_of: dict[str, dict[str, dict[str, Any]]],
    expected: dict[str, Expected],
    result: TortureResult,
    idempotency: dict[str, str],
) -> None:
    """Children, phantom and lost runs, terminal states and outputs."""
    violations = result.violations
    spawned: dict[str, set[str]] = defaultdict(set)
    for parent, child_id, _xid in log.spawned:
        spawned[parent].add(child_id)
    children: dict[str, str] = {}
    for parent, child_ids in spawned.items():
        if len(child_ids) != 1:
            violations.append(f"run {parent} spawned {len(child_ids)} child runs: {sorted(child_ids)}")
        for child_id in child_ids:
            children[child_id] = parent
    for run_id, row in runs.items():
        if row["job_name"] == "torture-child":
            key = row["idempotency_key"]
            if run_id not in children or key != f"spawn:{children[run_id]}":
                violations.append(f"child run {run_id} (key {key!r}) was not seen being spawned")
    # Child runs (step.start_child): exactly one per torture-parent run, linked to it.
    subruns: dict[str, list[str]] = defaultdict(list)
    for run_id, row in runs.items():
        if row["job_name"] == "torture-subrun":
            parent = row.get("parent_run_id")
            if parent not in expected or expected[parent].job != "torture-parent":
                violations.append(f"child run {run_id} has parent {parent!r}, not an accepted torture-parent")
            else:
                subruns[parent].append(run_id)
                children[run_id] = parent
                result.child_runs += 1
    for run_id, exp in expected.items():
        if exp.job == "torture-parent" and run_id in runs and len(subruns[run_id]) != 1:
            violations.append(f"run {run_id} started {len(subruns[run_id])} child runs: {subruns[run_id]}")

    for run_id in runs:
        if run_id not in expected and run_id not in children:
            violations.append(f"run {run_id} exists but was never accepted")
    for run_id in list(expected) + list(children):
        if run_id not in runs:
            violations.append(f"accepted run {run_id} is missing from the database")
    result.runs = len(expected) + len(children)
    keys: dict[str, list[str]] = defaultdict(list)
    for run_id, row in runs.items():
        if row.get("idempotency_key") and row["job_name"] == "torture-chain":
            keys[row["idempotency_key"]].append(run_id)
    for key, ids in keys.items():
        if len(ids) > 1 or (key in idempotency and idempotency[key] != ids[0]):
            violations.append(f"idempotency key {key!r} has runs {ids} (accepted: {idempotency.get(key)})")

    for run_id, row in runs.items():
        status = row["status"]
        if status in ("completed", "failed", "cancelled"):
            setattr(result, status, getattr(result, status) + 1)
        else:
            violations.append(f"run {run_id} ended the torture {status}")
            continue
        if run_id in children:
            names, want_status = torture_jobs.CHILD_STEPS, "completed"
            want_output: dict[str, Any] | None = {
                "total": torture_jobs.expected_total(run_id, torture_jobs.CHILD_STEPS)
            }
            want_failed: str | None = None
        elif run_id in expected and expected[run_id].job == "torture-parent":
            # Its output is its one child's: the child's id and total (an extra or missing
            # child is reported above, and then no output can be right).
            child_id = subruns[run_id][0] if len(subruns[run_id]) == 1 else "?"
            names, want_status, want_failed = torture_jobs.PARENT_STEPS, "completed", None
            want_output = {
                "total": torture_jobs.expected_total(child_id, torture_jobs.CHILD_STEPS),
                "child": child_id,
            }
        elif run_id in expected:
            names, want_status, want_output, want_failed = expected_outcome(expected[run_id])
        else:
            continue
        if status != want_status:
            violations.append(f"run {run_id} ({row['job_name']}) ended {status}, expected {want_status}")
            continue
        recorded = rows_of.get(run_id, {})
        if status == "completed":
            output = json.loads(row["output"])
            if output != want_output:
                violations.append(f"run {run_id} output {output} != {want_output}")
        if status == "failed":
            failed = [n for n, r in recorded.items() if r["status"] == "failed"]
            if failed != ([want_failed] if want_failed is not None else []):
                violations.append(f"failed run {run_id} recorded failed steps {failed}, not {[want_failed]}")
        if run_id in expected and expected[run_id].job == DEADLINE_JOB:
            check_deadline(expected[run_id], row, recorded, result)
        if status in ("completed", "failed"):
            missing = [n for n in names if recorded.get(n, {}).get("status") != "completed"]
            if missing:
                violations.append(f"{status} run {run_id} lacks committed steps {missing}")


def _timed_out(row: dict[str, Any]) -> bool:
    return bool(row.get("error")) and json.loads(row["error"]).get("type") == "RunTimeoutError"


def check_deadline(
    exp: Expected, row: dict[str, Any], recorded: dict[str, dict[str, Any]], result: TortureResult
) -> None:
    """A timed-out run failed with RunTimeoutError, not before its deadline and never past
    its nap; a run in time ended before its deadline. Both have the deadline stored."""
    violations = result.violations
    where = f"deadline run {exp.run_id}"
    deadline_at, completed_at = row.get("deadline_at"), row.get("completed_at")
    if deadline_at is None or completed_at is None:
        violations.append(f"{where}: deadline_at {deadline_at}, completed_at {completed_at}")
        return
    if exp.times_out:
        if not _timed_out(row):
            violations.append(f"{where} should have timed out; error {row.get('error')}")
        else:
            result.timed_out += 1
        if completed_at < deadline_at:
            violations.append(f"{where} was failed at {completed_at}, before its deadline {deadline_at}")
        if "s1" in recorded:
            violations.append(f"{where} committed s1, after a nap that outlasts its deadline")
    elif completed_at > deadline_at:
        violations.append(f"{where} completed at {completed_at}, after its deadline {deadline_at}")


def check_concurrency(
    runs: dict[str, dict[str, Any]], spans: dict[tuple[str, int, int], list[int]], result: TortureResult
) -> None:
    """Side effects of different runs with one concurrency key never overlap in time."""
    segments: dict[str, list[tuple[int, int, str, int, int]]] = defaultdict(list)
    for (run_id, attempt, pid), (begin, end) in spans.items():
        key = runs.get(run_id, {}).get("concurrency_key")
        if key is not None:
            segments[key].append((begin, end, run_id, attempt, pid))
    for key, items in segments.items():
        items.sort()
        for i, (_s1, e1, r1, a1, p1) in enumerate(items):
            for s2, _e2, r2, a2, p2 in items[i + 1 :]:
                if s2 >= e1:
                    break
                if r1 != r2:
                    result.violations.append(
                        f"concurrency key {key}: run {r1} (attempt {a1}, pid {p1}) and run {r2} "
                        f"(attempt {a2}, pid {p2}) overlapped by {(e1 - s2) / 1e6:.1f} ms"
                    )


def check_max_concurrent(
    runs: dict[str, dict[str, Any]], spans: dict[tuple[str, int, int], list[int]], result: TortureResult
) -> None:
    """Never more than LIMITED_MAX runs of torture-limited with a side effect live at once.

    A run's execution (run, attempt, process) is live from its first step's begin to its last
    step's end or its process's kill (``spans``); a step's side effect lies inside the lease
    that the limit counts, so more live executions than the limit means more leases than
    the limit. Two executions of one run (a takeover) are one run."""
    edges: list[tuple[int, int, str]] = []  # (time, +1 begin / -1 end, run id); ends sort first
    for (run_id, _attempt, _pid), (begin, end) in spans.items():
        if runs.get(run_id, {}).get("job_name") == "torture-limited":
            edges += [(begin, 1, run_id), (end, -1, run_id)]
    result.limited_runs = sum(1 for row in runs.values() if row["job_name"] == "torture-limited")
    live: dict[str, int] = defaultdict(int)  # run id -> its live executions
    reported = False
    for at, change, run_id in sorted(edges):
        live[run_id] += change
        if live[run_id] == 0:
            del live[run_id]
        result.limited_peak = max(result.limited_peak, len(live))
        if len(live) > torture_jobs.LIMITED_MAX and not reported:
            reported = True  # one overlap is reported once, not at each later edge
            result.violations.append(
                f"max_concurrent={torture_jobs.LIMITED_MAX}: {len(live)} runs of torture-limited "
                f"live at once ({sorted(live)}, at t={at})"
            )
        elif len(live) <= torture_jobs.LIMITED_MAX:
            reported = False


_FAILURE_XID = re.compile(r"xid (\S+)\)")


def failure_xid(row: dict[str, Any]) -> str | None:
    """The execution a recorded failure names (torture_jobs.flaky_effect puts it in the error)."""
    error = json.loads(row["error"]) if row.get("error") else {}
    found = _FAILURE_XID.search(str(error.get("message", "")))
    return found.group(1) if found else None


def check_waits(
    log: Log,
    by_step: dict[tuple[str, str], list[Execution]],
    rows_of: dict[str, dict[str, dict[str, Any]]],
    attempt_rows: list[dict[str, Any]],
    signal_rows: list[dict[str, Any]],
    expected: dict[str, Expected],
    result: TortureResult,
) -> None:
    """Retries, sleeps and signals: the invariants of the module docstring's second list."""
    result.waits = len(log.waits)
    attempts_of: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in attempt_rows:
        attempts_of[(row["run_id"], row["name"])].append(row)
    waits_of: dict[tuple[str, str], list[Wait]] = defaultdict(list)
    for wait in log.waits:
        waits_of[(wait.run_id, wait.step)].append(wait)
    passed_of: dict[tuple[str, str], list[Passed]] = defaultdict(list)
    for passed in log.passed:
        passed_of[(passed.run_id, passed.wait)].append(passed)
    signals_of: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in signal_rows:
        signals_of[row["run_id"]].append(row)
    for (run_id, name), waits in waits_of.items():
        exp = expected.get(run_id)
        if exp is None or (exp.job not in WAIT_JOBS and exp.job != DEADLINE_JOB):
            result.violations.append(
                f"run {run_id} committed a {waits[0].reason} wait at {name!r}: its job never waits"
            )
    for exp in expected.values():
        rows = rows_of.get(exp.run_id, {})
        if exp.job == "torture-retry":
            check_retried_step(exp, "flaky", by_step, log, rows.get("flaky"), attempts_of, waits_of, result)
        elif exp.job == "torture-sleep":
            check_sleeps(exp, rows, waits_of, passed_of, result)
        elif exp.job == "torture-signal":
            check_signals(exp, rows, signals_of.get(exp.run_id, []), passed_of, result)
        elif exp.job == "torture-offline":
            check_offline(exp, log, attempts_of, waits_of, result)
    for wait in log.waits:
        if wait.reason == "offline":
            result.offline_waits += 1
            exp = expected.get(wait.run_id)
            if exp is not None and exp.job != "torture-offline":
                result.violations.append(
                    f"run {wait.run_id} waited for the network at {wait.step!r}: its job needs none"
                )
    known = {exp.run_id for exp in expected.values() if exp.job == "torture-signal"}
    for run_id in signals_of:
        if run_id not in known:
            result.violations.append(f"run {run_id} has signals stored, but nobody sent it any")


def check_retried_step(
    exp: Expected,
    name: str,
    by_step: dict[tuple[str, str], list[Execution]],
    log: Log,
    final: dict[str, Any] | None,
    attempts_of: dict[tuple[str, str], list[dict[str, Any]]],
    waits_of: dict[tuple[str, str], list[Wait]],
    result: TortureResult,
) -> None:
    violations = result.violations
    run_id, where = exp.run_id, f"step {exp.run_id}/{name}"
    rows = sorted(attempts_of.get((run_id, name), []), key=lambda r: r["attempt"])
    numbers = [r["attempt"] for r in rows]
    result.retried += len(rows)
    if numbers != list(range(1, len(rows) + 1)):
        violations.append(f"{where}: recorded attempt numbers {numbers} are not 1, 2, ... without gaps")
    if final is not None and final.get("attempt") != len(rows) + 1:
        violations.append(
            f"{where}: its final row is attempt {final.get('attempt')} after {len(rows)} recorded "
            "failures: attempt numbers are not consecutive"
        )
    allowed = min(exp.fails, exp.max_attempts - 1)  # failures the policy retries
    if len(rows) > allowed or (final is not None and len(rows) != allowed):
        violations.append(
            f"{where}: {len(rows)} failed attempts recorded as retried, but the step fails {exp.fails} "
            f"times under max_attempts={exp.max_attempts} (final row: {final and final['status']})"
        )
    executions = by_step.get((run_id, name), [])
    for e in executions:
        if e.xid not in log.step_attempts and e.end is not None:
            violations.append(f"{where}: execution {e.xid} ended without saying which attempt it was")
    attempt_of = {e.xid: log.step_attempts[e.xid] for e in executions if e.xid in log.step_attempts}

    def source(row: dict[str, Any], what: str, *, failed: bool) -> Execution | None:
        """The execution that produced ``row`` (named in its result or error), checked."""
        if failed:
            xid = failure_xid(row)
        else:
            output = json.loads(row["output"]) if row.get("output") else {}
            xid = output.get("x") if isinstance(output, dict) else None
        execution = log.executions.get(xid) if xid else None
        if execution is None or (execution.run_id, execution.step) != (run_id, name):
            violations.append(f"{where}: {what} names execution {xid}, which is not one of this step's")
            return None
        step_attempt = attempt_of.get(execution.xid, (None, 0))[0]
        if step_attempt != row["attempt"]:
            violations.append(
                f"{where}: {what} is attempt {row['attempt']}, but its execution {xid} was attempt "
                f"{step_attempt}"
            )
        if failed and (xid not in log.failures or execution.end is None):
            violations.append(f"{where}: {what} was recorded failed, but {xid} did not fail to its end")
        return execution

    for row in rows:
        k = row["attempt"]
        recorded = source(row, f"recorded failure of attempt {k}", failed=True)
        if recorded is None:
            continue
        for e in executions:
            if e.begin > recorded.begin and attempt_of.get(e.xid, (k + 1, 0))[0] <= k:
                violations.append(
                    f"{where}: {e.xid} executed attempt {attempt_of[e.xid][0]} again after attempt {k}'s "
                    f"failure ({recorded.xid}) was recorded"
                )
        earliest = row["completed_at"] + torture_jobs.retry_delay_ms(exp.retry_delay, k)
        retry_waits = [w for w in waits_of.get((run_id, name), []) if w.reason == "retry" and w.after == k]
        persisted = [w.due_ms for w in retry_waits]
        for due in persisted:
            if due < earliest - CLOCK_SLACK_MS:
                violations.append(
                    f"{where}: the retry after attempt {k} was due at {due}, before its failure at "
                    f"{row['completed_at']} plus the backoff ({earliest})"
                )
        for e in executions:
            step_attempt, began = attempt_of.get(e.xid, (0, 0))
            if step_attempt != k + 1:
                continue
            bounds = [(earliest, "its failure plus the backoff")]
            bounds += [(due, "its persisted wake-up time") for due in persisted]
            for due, what in bounds:
                if began < due - CLOCK_SLACK_MS:
                    violations.append(
                        f"{where}: attempt {k + 1} ({e.xid}) began at {began}, {due - began} ms before "
                        f"{what} ({due}) after attempt {k}"
                    )
            if recorded.end is None or e.begin < recorded.end:
                violations.append(f"{where}: attempt {k + 1} ({e.xid}) began before attempt {k} ended")
    for wait in waits_of.get((run_id, name), []):
        if wait.reason == "retry" and wait.after not in numbers:
            violations.append(
                f"{where}: a retry wait after attempt {wait.after} committed, but that attempt is "
                "not recorded"
            )
    if final is not None:
        what = f"its final attempt ({final['status']})"
        final_execution = source(final, what, failed=final["status"] == "failed")
        if final_execution is not None:
            for e in executions:
                step_attempt = attempt_of.get(e.xid, (0, 0))[0]
                if step_attempt > final["attempt"]:
                    violations.append(f"{where}: {e.xid} executed attempt {step_attempt}, past the last one")


def check_offline(
    exp: Expected,
    log: Log,
    attempts_of: dict[tuple[str, str], list[dict[str, Any]]],
    waits_of: dict[tuple[str, str], list[Wait]],
    result: TortureResult,
) -> None:
    """A network-aware run: every recorded failure of its step 'fetch' is flagged offline and
    names an execution that failed for want of the network and ended; its attempt numbers
    run 1, 2, ... without a gap; it waited for nothing but the network; its other steps
    never failed."""
    violations = result.violations
    run_id = exp.run_id
    for (rid, name), _rows in attempts_of.items():
        if rid == run_id and name != "fetch":
            violations.append(f"step {run_id}/{name} has recorded failed attempts: it never fails")
    rows = sorted(attempts_of.get((run_id, "fetch"), []), key=lambda r: r["attempt"])
    result.offline_failures += len(rows)
    if [r["attempt"] for r in rows] != list(range(1, len(rows) + 1)):
        violations.append(f"step {run_id}/fetch: recorded attempts {[r['attempt'] for r in rows]} have a gap")
    for row in rows:
        where = f"step {run_id}/fetch attempt {row['attempt']}"
        if not row.get("offline"):
            violations.append(f"{where} failed offline but counts against its retries (offline flag unset)")
        xid = failure_xid(row)
        execution = log.executions.get(xid) if xid is not None else None
        if execution is None or execution.run_id != run_id or execution.step != "fetch":
            violations.append(f"{where}: its error names no execution of that step ({xid})")
        elif xid not in log.failures or execution.end is None:
            violations.append(f"{where}: execution {xid} did not fail for want of the network and end")
        elif log.step_attempts.get(xid, (None, 0))[0] != row["attempt"]:
            violations.append(f"{where}: execution {xid} ran as attempt {log.step_attempts.get(xid)}")
    for (rid, name), waits in waits_of.items():
        if rid != run_id:
            continue
        for wait in waits:
            if wait.reason != "offline" or name != "fetch":
                violations.append(f"run {run_id} waited ({wait.reason}) at {name!r}: not for the network")


def check_sleeps(
    exp: Expected,
    rows: dict[str, dict[str, Any]],
    waits_of: dict[tuple[str, str], list[Wait]],
    passed_of: dict[tuple[str, str], list[Passed]],
    result: TortureResult,
) -> None:
    violations = result.violations
    for i, seconds in enumerate(exp.naps):
        name = f"nap-{i}"
        where = f"sleep {exp.run_id}/{name}"
        row = rows.get(name)
        waits = waits_of.get((exp.run_id, name), [])
        passed = passed_of.get((exp.run_id, name), [])
        if row is None:
            if waits or passed:
                violations.append(f"{where}: waited or got past, but its checkpoint is not recorded")
            continue
        if row.get("kind") != "sleep" or row["status"] != "completed":
            violations.append(f"{where}: recorded {row.get('kind')} {row['status']}, not a completed sleep")
            continue
        result.slept += 1
        due = int(row["output"])
        if due != row["started_at"] + int(seconds * 1000):
            violations.append(
                f"{where}: due at {due}, not its start {row['started_at']} plus {seconds} s"
            )
        for wait in waits:
            if (wait.reason, wait.due_ms) != ("sleep", due):
                violations.append(
                    f"{where}: a {wait.reason} wait (pid {wait.pid}) persisted wake-up time {wait.due_ms}, "
                    f"not the recorded due time {due}: the sleep was restarted"
                )
        for seen in passed:
            if seen.wall_ms < due - CLOCK_SLACK_MS:
                violations.append(
                    f"{where}: the handler (pid {seen.pid}, attempt {seen.attempt}) got past it at "
                    f"{seen.wall_ms}, {due - seen.wall_ms} ms before its due time {due}"
                )


def check_signals(
    exp: Expected,
    rows: dict[str, dict[str, Any]],
    stored: list[dict[str, Any]],
    passed_of: dict[tuple[str, str], list[Passed]],
    result: TortureResult,
) -> None:
    violations = result.violations
    run_id = exp.run_id
    accepted = [s for s in exp.signals if s.disposition in ("stored", "delivered")]
    for sent in exp.signals:
        if sent.role == "primary" and sent.disposition == "refused" and not exp.cancel_accepted:
            violations.append(f"run {run_id} refused signal {sent.name} ({sent.signal_id}) it waited for")
    for sent in accepted:
        matches = [r for r in stored if r["signal_id"] == sent.signal_id]
        if len(matches) != 1:
            violations.append(
                f"signal {run_id}/{sent.signal_id} was sent ({sent.disposition}) and is stored "
                f"{len(matches)} times"
            )
        elif matches[0]["name"] != sent.name or json.loads(matches[0]["payload"]) != {"token": sent.token}:
            violations.append(
                f"signal {run_id}/{sent.signal_id} is stored as {matches[0]['name']} "
                f"{matches[0]['payload']}, not as sent ({sent.name} {sent.token})"
            )
    accepted_ids = {s.signal_id for s in accepted}
    for stored_row in stored:
        if stored_row["signal_id"] not in accepted_ids:
            violations.append(
                f"signal {run_id}/{stored_row['signal_id']} ({stored_row['name']}) is stored, but no "
                "send of it was accepted (a duplicate or refused send stored anyway?)"
            )
    winners = exp.winners()
    for i in range(exp.waits):
        name = f"go-{i}"
        where = f"signal wait {run_id}/{name}"
        winner = winners.get(name)
        row = rows.get(name)
        consumed = [r for r in stored if r["name"] == name and r["consumed_at"] is not None]
        if len(consumed) > 1:
            violations.append(f"{where}: {len(consumed)} signals consumed by one wait")
        if row is None:
            if consumed:
                violations.append(f"{where}: a signal was consumed, but the wait's checkpoint is missing")
        elif winner is None:
            violations.append(f"{where}: its checkpoint is recorded, but no signal {name} was ever stored")
        else:
            outcome = json.loads(row["output"]) if row.get("output") else None
            if row.get("kind") != "signal" or outcome != {"payload": {"token": winner.token}}:
                violations.append(
                    f"{where}: recorded {row.get('kind')} {outcome}, not the first signal sent "
                    f"({winner.signal_id}: {winner.token})"
                )
            if [r["signal_id"] for r in consumed] != [winner.signal_id]:
                violations.append(
                    f"{where}: consumed {[r['signal_id'] for r in consumed]}, not the first signal sent "
                    f"({winner.signal_id}): a signal is consumed exactly once, with its wait"
                )
            else:
                result.signals_consumed += 1
        for seen in passed_of.get((run_id, name), []):
            if winner is None or seen.token != winner.token:
                violations.append(
                    f"{where}: the handler (pid {seen.pid}, attempt {seen.attempt}) got {seen.token}, "
                    f"not the payload of the signal sent ({winner and winner.token})"
                )
            elif seen.wall_ms < winner.sent_ms - CLOCK_SLACK_MS:
                violations.append(f"{where}: the handler got the payload before it was sent")
        after = rows.get(f"after-{i}")
        if after is not None and after["status"] == "completed":
            token = json.loads(after["output"]).get("token")
            if winner is None or token != winner.token:
                violations.append(f"step {run_id}/after-{i} committed token {token}, not the signal's")


class WorkerProcess:
    def __init__(self, db_url: str, log_path: Path, options: list[str], stderr_dir: Path, n: int) -> None:
        stderr_dir.mkdir(exist_ok=True)
        self.stderr_path = stderr_dir / f"worker-{n}.stderr"
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, str(WORKER_SCRIPT), db_url, str(log_path), *options],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        self.pid = self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


class Torture:
    def __init__(
        self,
        workdir: Path,
        *,
        kills: int,
        processes: int,
        seed: int,
        lease: float = DEFAULT_LEASE,
        renew: float = DEFAULT_RENEW,
        poll: float = 0.05,
        max_kill_delay: float = 0.6,
        drain_timeout: float = 180.0,
        db_url: str | None = None,
    ) -> None:
        self.workdir = workdir
        self.kills = kills
        self.processes = processes
        self.seed = seed
        self.rng = random.Random(seed)
        self.lease = lease
        self.max_kill_delay = max_kill_delay
        self.drain_timeout = drain_timeout
        # By default a SQLite file of its own; any URL the workers can share (an empty
        # PostgreSQL database) works the same way.
        self.db_url = db_url or f"sqlite:///{workdir / 'torture.db'}"
        self.log_path = workdir / "side-effects.log"
        # While this file exists the workers' network is down (torture_jobs.FlagFileNetwork).
        self.offline_flag = workdir / "offline"
        self.options = ["--lease", str(lease), "--renew", str(renew), "--poll", str(poll)]
        self.options += ["--offline-flag", str(self.offline_flag)]
        # Once this file exists the workers make no more trigger_and_wait calls of their own.
        self.at_once_quit = workdir / "at-once-quit"
        self.options += ["--at-once-quit", str(self.at_once_quit)]
        if processes == 1:
            # The harness promises one worker at a time: a restarted worker resumes at once.
            self.options.append("--sole")
        self.expected: dict[str, Expected] = {}
        self.idempotency: dict[str, str] = {}  # our idempotency key -> run id
        # Signals still to send, per run, in order: (when, signal); when is "now" (at once),
        # "later" (at a random moment) or "waiting" (once the run waits, or at random).
        self.to_send: dict[str, list[tuple[str, SentSignal]]] = {}
        self.killed: dict[int, int] = {}  # pid -> monotonic_ns once the killed process was reaped
        self.workers: list[WorkerProcess] = []
        self.started = 0
        self.result = TortureResult(seed=seed, kills=0, processes=processes)
        self.client: Durably | None = None
        self.aborted = False  # the drain stopped early: a violation was already in the log
        self.hit_at_once = False  # a kill was aimed at a run started at once, with a step in flight
        # The mix's network-aware runs: the network stays down until both waited for it.
        self.offline_mix: set[str] = set()

    # --- processes ------------------------------------------------------------------------
    def start_worker(self) -> WorkerProcess:
        # A few runs of its own, started at once when it is idle (its choices seeded from ours).
        at_once = ["--at-once", str(self.rng.randint(1, 3)), "--at-once-seed", str(self.rng.randrange(2**31))]
        worker = WorkerProcess(
            self.db_url, self.log_path, [*self.options, *at_once], self.workdir / "workers", self.started
        )
        self.started += 1
        self.workers.append(worker)
        return worker

    async def wait_ready(self, worker: WorkerProcess, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if worker.pid in read_log(self.log_path).ready:
                return
            if not worker.alive():
                raise RuntimeError(f"worker {worker.pid} exited early:\n{worker.stderr()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {worker.pid} did not start in {timeout}s:\n{worker.stderr()}")
            await asyncio.sleep(0.01)

    async def wait_in_flight(self, worker: WorkerProcess, timeout: float) -> None:
        """Wait (up to ``timeout``) until ``worker`` has a step in flight: an aimed kill."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = read_log(self.log_path)
            if any(e.pid == worker.pid and e.end is None for e in log.executions.values()):
                return
            await asyncio.sleep(0.01)

    async def wait_at_once_in_flight(self, timeout: float) -> WorkerProcess | None:
        """Wait (up to ``timeout``) until a worker has a step in flight of a run it started at
        once (created leased to it, never claimed): that worker, for an aimed kill."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = read_log(self.log_path)
            started = {(c.run_id, c.pid) for c in log.calls.values() if c.how == "leased"}
            for worker in self.workers:
                if any(
                    e.pid == worker.pid and e.end is None and (e.run_id, e.pid) in started
                    for e in log.executions.values()
                ):
                    return worker
            await asyncio.sleep(0.01)
        return None

    def kill(self, worker: WorkerProcess, *, counted: bool = True) -> None:
        worker.process.send_signal(signal.SIGKILL)
        worker.process.wait(30)
        self.killed[worker.pid] = time.monotonic_ns()
        self.workers.remove(worker)
        self.result.kills += counted

    async def stop_workers(self) -> None:
        for worker in self.workers:
            if worker.alive():
                worker.process.send_signal(signal.SIGTERM)
        for worker in self.workers:
            try:
                await asyncio.to_thread(worker.process.wait, 30)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
                self.result.violations.append(f"worker {worker.pid} did not stop on SIGTERM")
            else:
                if worker.process.returncode != 0:
                    self.result.violations.append(
                        f"worker {worker.pid} exited with {worker.process.returncode}:\n{worker.stderr()}"
                    )
        self.workers.clear()

    # --- the client's side: triggers and cancels ---------------------------------------------------
    async def trigger(
        self,
        payload: dict[str, Any],
        options: dict[str, Any],
        *,
        protected: bool = False,
        job: str = "torture-chain",
    ) -> str | None:
        """Trigger one run and check its disposition; the run id if it was created."""
        assert self.client is not None
        try:
            run = await self.client.trigger(job, payload, **options)
        except ConflictError:
            return None  # a pending run already holds this concurrency key: not accepted
        key = options.get("idempotency_key")
        violations = self.result.violations
        if run.disposition == "created":
            if run.id in self.expected:
                violations.append(f"trigger returned existing run {run.id} as created")
            self.expected[run.id] = expected_of(run.id, job, payload, options, protected=protected)
            if job == "torture-signal":
                self.plan_signals(run.id, payload["waits"], mix=protected)
                await self.send_some(run.id)  # those due "now": before the run reaches its wait
            if key is not None:
                if key in self.idempotency:
                    violations.append(
                        f"idempotency key {key!r} created a second run {run.id} "
                        f"(first: {self.idempotency[key]})"
                    )
                self.idempotency[key] = run.id
            return run.id
        if run.disposition == "idempotent":
            if key is None or self.idempotency.get(key) != run.id:
                violations.append(
                    f"idempotent trigger for {key!r} returned {run.id}, expected {self.idempotency.get(key)}"
                )
        elif run.disposition == "coalesced":
            if run.id not in self.expected or run.status != "pending":
                violations.append(f"coalesced into unknown or non-pending run {run.id}")
        return None

    def slow_delay(self) -> float:
        return self.lease * 1.25  # one blocking step outlasts the lease: renewal must work

    async def trigger_mix(self) -> str | None:
        """One of each kind, never cancelled, so every torture exercises every kind; returns
        the keyed run's id."""
        await self.trigger({"steps": 5, "delay": 0.02, "fail_at": 3}, {}, protected=True)
        await self.trigger({"steps": 4, "delay": 0.02, "slow": self.slow_delay()}, {}, protected=True)
        await self.trigger({"steps": 4, "delay": 0.02, "spawn": True}, {}, protected=True)
        await self.trigger({"steps": 3, "delay": 0.02}, {"idempotency_key": "idem-mix"}, protected=True)
        await self.trigger({"steps": 3, "delay": 0.02}, {"idempotency_key": "idem-mix"})
        # Durable waiting: a step retried until it succeeds, one whose retries run out, two
        # sleeps, two signal waits (one signal sent at once plus its duplicate, one once it waits).
        retry = "torture-retry"
        await self.trigger({"fails": 2, "max_attempts": 4, "delay": 0.1}, {}, protected=True, job=retry)
        await self.trigger({"fails": 2, "max_attempts": 2, "delay": 0.05}, {}, protected=True, job=retry)
        await self.trigger({"naps": [0.4, 0.15]}, {}, protected=True, job="torture-sleep")
        await self.trigger({"waits": 2}, {}, protected=True, job="torture-signal")
        await self.trigger({"waits": 1}, {}, protected=True, job="torture-signal")  # the same signal_ids
        # The network is down when the workers start (see run()): one run meets it at its step,
        # the other declares needs_network and waits before the attempt.
        for needs_network in (False, True):
            payload = {"needs_network": needs_network}
            run_id = await self.trigger(payload, {}, protected=True, job="torture-offline")
            assert run_id is not None
            self.offline_mix.add(run_id)
        # Parallel steps: a step.all that completes, one whose branch fails (siblings recorded).
        await self.trigger({"branches": 4, "delay": 0.05}, {}, protected=True, job="torture-parallel")
        await self.trigger({"branches": 3, "fail_branch": 1}, {}, protected=True, job="torture-parallel")
        # Child runs: a parent starts one, runs a step, waits for it (killed anywhere in between).
        await self.trigger({"delay": 0.05}, {}, protected=True, job="torture-parent")
        await self.trigger({"delay": 0.2}, {}, protected=True, job="torture-parent")
        # Deadlines: one times out on purpose during its sleep (whoever is alive then), one
        # with the job's own deadline (120 s) completes.
        await self.trigger({"nap": 5.0}, {"timeout": 0.6}, protected=True, job=DEADLINE_JOB)
        await self.trigger({"nap": 0.2}, {}, protected=True, job=DEADLINE_JOB)
        # Flow control: four runs of a job with max_concurrent=2, two of them ahead by
        # priority, so the workers' first claims take those two together (the limit is met).
        for priority in (5, 0, 5, 0):
            payload = {"steps": 5, "delay": 0.04}
            await self.trigger(payload, {"priority": priority}, protected=True, job="torture-limited")
        return await self.trigger({"steps": 10, "delay": 0.05}, {"concurrency_key": "ck-a"}, protected=True)

    def plan_signals(self, run_id: str, waits: int, *, mix: bool = False) -> None:
        """The signals to send a torture-signal run: per wait a primary, sometimes the same
        signal_id again (it must be a duplicate, its other payload ignored) and sometimes a
        spare of the same name (it must stay unconsumed). The ids repeat across runs: a
        signal_id is unique per run only."""
        rng = self.rng
        plan: list[tuple[str, SentSignal]] = []
        for i in range(waits):
            name = f"go-{i}"
            if mix:
                when = "now" if i == 0 else "waiting"
            else:
                when = rng.choice(["now", "later", "waiting"])
            plan.append((when, SentSignal(name, f"p-{name}", f"t{rng.randrange(10**9)}", "primary")))
            if (mix and i == 0) or rng.random() < 0.4:
                token = f"dup{rng.randrange(10**9)}"
                plan.append((rng.choice(["now", "later"]), SentSignal(name, f"p-{name}", token, "duplicate")))
            if rng.random() < 0.25:
                token = f"spare{rng.randrange(10**9)}"
                plan.append(("later", SentSignal(name, f"spare-{name}", token, "spare")))
        self.to_send[run_id] = plan

    async def send(self, run_id: str, sent: SentSignal) -> None:
        assert self.client is not None
        exp = self.expected[run_id]
        sent.sent_ms = torture_jobs.wall_ms()
        try:
            sent.disposition = await self.client.send_signal(
                run_id, sent.name, {"token": sent.token}, signal_id=sent.signal_id
            )
        except ConflictError:
            sent.disposition = "refused"  # the run has ended (check_signals: only if cancelled)
        exp.signals.append(sent)
        result = self.result
        result.signals_sent += 1
        result.signals_duplicate += sent.disposition == "duplicate"
        result.signals_early += sent.disposition == "stored"
        result.signals_delivered += sent.disposition == "delivered"
        allowed = ("duplicate", "refused") if sent.role == "duplicate" else ("stored", "delivered", "refused")
        if sent.disposition not in allowed:
            result.violations.append(
                f"send_signal({run_id}, {sent.name}, signal_id={sent.signal_id}) [{sent.role}] returned "
                f"{sent.disposition!r}, expected one of {allowed}"
            )

    async def send_some(self, only: str | None = None, *, everything: bool = False) -> None:
        """Send the signals that are due (``everything``: all that are left, in order)."""
        assert self.client is not None
        for run_id in [only] if only is not None else list(self.to_send):
            plan = self.to_send.get(run_id, [])
            while plan:
                when, sent = plan[0]
                if not everything and when == "later" and self.rng.random() < 0.5:
                    break
                if not everything and when == "waiting":
                    run = await self.client.get_run(run_id)
                    if run.status != "waiting" and self.rng.random() < 0.8:
                        break
                plan.pop(0)
                await self.send(run_id, sent)
            if not plan:
                self.to_send.pop(run_id, None)

    async def trigger_limited_burst(self, size: int) -> None:
        """A burst of torture-limited runs (max_concurrent=2), some with a priority: more of
        them pending at once than the limit lets run. Protected, so each must complete."""
        for _ in range(size):
            options = {"priority": self.rng.choice([0, 0, 5, -3])}
            payload = {"steps": self.rng.randint(3, 6), "delay": self.rng.choice([0.02, 0.04])}
            await self.trigger(payload, options, protected=True, job="torture-limited")

    async def trigger_waiting_kind(self) -> None:
        """One run of a waiting job, its parameters drawn at random."""
        rng = self.rng
        kind = rng.choice(WAIT_JOBS)
        if kind == "torture-retry":
            max_attempts = rng.randint(1, 4)
            payload: dict[str, Any] = {
                "fails": rng.randint(0, max_attempts),  # == max_attempts: the retries run out
                "max_attempts": max_attempts,
                "delay": rng.choice([0.05, 0.1, 0.2]),
            }
        elif kind == "torture-sleep":
            payload = {"naps": [round(rng.uniform(0.1, 0.5), 3) for _ in range(rng.randint(1, 2))]}
        elif kind == "torture-offline":
            payload = {"needs_network": rng.random() < 0.5}
        else:
            payload = {"waits": rng.randint(1, torture_jobs.MAX_WAITS)}
        await self.trigger(payload, {}, job=kind)

    async def trigger_some(self, count: int) -> None:
        for _ in range(count):
            if self.rng.random() < 0.3:
                await self.trigger_waiting_kind()
                continue
            if self.rng.random() < 0.15:
                branches = self.rng.randint(2, 5)
                payload = {"branches": branches, "delay": self.rng.choice([0.005, 0.02, 0.05])}
                if self.rng.random() < 0.2:
                    payload["fail_branch"] = self.rng.randrange(branches)
                await self.trigger(payload, {}, job="torture-parallel")
                continue
            roll = self.rng.random()
            steps = self.rng.randint(3, 12)
            payload: dict[str, Any] = {"steps": steps, "delay": self.rng.choice([0.005, 0.02, 0.05])}
            options: dict[str, Any] = {}
            if roll < 0.2:
                payload["fail_at"] = self.rng.randrange(steps)
            if self.rng.random() < 0.25:
                payload["spawn"] = True
            if self.rng.random() < 0.08:
                payload["slow"] = self.slow_delay()
            if 0.2 <= roll < 0.5:
                options["concurrency_key"] = self.rng.choice(CONCURRENCY_KEYS)
                if self.rng.random() < 0.5:
                    options["coalesce"] = "skip"
            if 0.5 <= roll < 0.7:
                # A small key space so that keys repeat, across kills too.
                options["idempotency_key"] = f"idem-{self.rng.randrange(12)}"
            await self.trigger(payload, options)

    def adopt_at_once_runs(self) -> None:
        """The runs the workers triggered themselves so far (C lines), as accepted runs that
        may be cancelled like the client's (check_log adopts the rest)."""
        for call in read_log(self.log_path).calls.values():
            if call.run_id is not None and call.run_id not in self.expected:
                exp = expected_of(call.run_id, call.job, call.payload, {}, protected=False)
                self.expected[call.run_id] = exp

    async def stop_runs_at_once(self, timeout: float = 60.0) -> None:
        """Let no worker trigger runs of its own any more: then the queue can drain. First a
        worker that is never killed gets the time to start a run at once (the queue is
        emptying: it becomes idle), so every torture has one whose creator outlives it: a
        run created leased but not executed by its creator is taken over under it then."""
        deadline = time.monotonic() + timeout / 2
        # Polls the side-effect log, as wait_ready does: no event to wait for across processes.
        while time.monotonic() < deadline:
            log = read_log(self.log_path)
            alive = {w.pid for w in self.workers if w.alive()}
            if any(c.how == "leased" and c.pid in alive for c in log.calls.values()):
                break
            if all(w.pid in log.quit for w in self.workers if w.alive()):
                break  # no worker has a call left to make
            await asyncio.sleep(0.05)
        self.at_once_quit.touch()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # until every live worker logged its Q line
            if all(w.pid in read_log(self.log_path).quit for w in self.workers if w.alive()):
                return
            await asyncio.sleep(0.02)
        self.result.violations.append(f"the workers did not stop triggering runs at once in {timeout} s")

    async def cancel_some(self) -> None:
        assert self.client is not None
        self.adopt_at_once_runs()
        candidates = {run_id for run_id, exp in self.expected.items() if not exp.protected}
        leased = [r for r in await self.client.get_runs(status="leased", limit=1000) if r.id in candidates]
        waiting = [r for r in await self.client.get_runs(status="waiting", limit=1000) if r.id in candidates]
        pending = [r for r in await self.client.get_runs(status="pending", limit=1000) if r.id in candidates]
        pool = (leased + waiting) or pending
        if not pool:
            return
        target = self.rng.choice(pool)
        try:
            run = await self.client.cancel(target.id)
        except ConflictError:
            return  # it completed or failed in between
        if run.status != "cancelled":
            self.result.violations.append(f"cancel({target.id}) returned status {run.status}")
        self.expected[target.id].cancel_accepted = True

    def set_network(self, online: bool) -> None:
        if online:
            self.offline_flag.unlink(missing_ok=True)
        else:
            self.offline_flag.touch()

    def mix_waited_offline(self) -> bool:
        waited = {w.run_id for w in read_log(self.log_path).waits if w.reason == "offline"}
        return self.offline_mix <= waited

    async def toggle_network(self) -> None:
        """Take the network down or bring it back at random, but not back before the mix's
        network-aware runs both waited for it (so every torture has an offline wait and an
        offline failure to check)."""
        if not self.offline_flag.exists():
            if self.rng.random() < 0.2:
                self.set_network(online=False)
        elif self.rng.random() < 0.5 and self.mix_waited_offline():
            self.set_network(online=True)

    async def bring_network_back(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        # Polls the side-effect log, as wait_ready does: no event to wait for across processes.
        while self.offline_flag.exists() and not self.mix_waited_offline() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        self.set_network(online=True)

    async def unfinished(self) -> int:
        assert self.client is not None
        return len(await self.client.get_runs(status=["pending", "leased", "waiting"], limit=10_000))

    async def run_keyed_pair(self, first: str | None) -> None:
        """Once the keyed run of the mix is leased, trigger another run of its key: it must
        wait (a broken concurrency check runs both at once)."""
        assert self.client is not None
        if first is None:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            run = await self.client.get_run(first)
            if run.status != "pending":
                break
            await asyncio.sleep(0.01)
        await self.trigger({"steps": 4, "delay": 0.02}, {"concurrency_key": "ck-a"}, protected=True)

    # --- the torture ------------------------------------------------------------------------------
    async def run(self) -> TortureResult:
        began = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.client = Durably(self.db_url, jobs=torture_jobs.JOBS, worker=False, polling_interval=0.05)
        await self.client.init()
        try:
            keyed = await self.trigger_mix()
            self.set_network(online=False)
            for _ in range(self.processes):
                await self.wait_ready(self.start_worker())
            await self.run_keyed_pair(keyed)
            for n in range(self.kills):
                if await self.unfinished() < 6:
                    await self.trigger_some(self.rng.randint(2, 5))
                    if self.rng.random() < 0.3:
                        await self.trigger_limited_burst(self.rng.randint(3, 5))
                if self.rng.random() < 0.35:
                    await asyncio.sleep(self.rng.uniform(0.0, 0.2))  # let a run get going first
                    await self.cancel_some()
                if self.rng.random() < 0.3:
                    await self.trigger_some(1)  # a trigger racing the kill
                await self.toggle_network()
                await self.send_some()
                victim = self.rng.choice(self.workers)
                roll = self.rng.random()
                if (n >= 1 and not self.hit_at_once) or 0.35 <= roll < 0.45:
                    # Aimed at a run a worker started at once (created leased, never claimed):
                    # every kill after the first until one such kill hit.
                    aimed = await self.wait_at_once_in_flight(timeout=3.0)
                    self.hit_at_once |= aimed is not None
                    victim = aimed or victim
                elif n == 0 or roll < 0.35:
                    await self.wait_in_flight(victim, timeout=5.0)  # aimed: a step is in flight
                elif roll < 0.55:
                    await asyncio.sleep(self.lease * 1.3)  # long enough that leases need renewing
                else:
                    await asyncio.sleep(self.rng.uniform(0.0, self.max_kill_delay))
                self.kill(victim)
                if self.rng.random() < 0.5:
                    await self.send_some()  # with one worker: sent while no worker is alive
                if self.processes > 1 and self.rng.random() < 0.5:
                    # Sometimes let the survivor take over on its own (lease expiry) for a while.
                    await asyncio.sleep(self.rng.uniform(0.0, self.lease * 1.5))
                await self.wait_ready(self.start_worker())
            await self.send_some(everything=True)  # a signal run cannot end without its signals
            await self.bring_network_back()  # nor a network-aware run without the network
            await self.stop_runs_at_once()  # nor can the queue drain while workers add to it
            await self.drain()
            if self.aborted:
                for worker in list(self.workers):
                    self.kill(worker, counted=False)  # in-flight steps end at this kill
            else:
                await self.stop_workers()
            self.check()
        finally:
            for worker in self.workers:
                if worker.alive():
                    worker.process.kill()
                    worker.process.wait()
            await self.client.stop()
        self.result.wall_time = time.monotonic() - began
        return self.result

    async def drain(self) -> None:
        """Wait until every run has ended; stop early once two live executions of one step
        show in the log (a broken engine may never finish: its runs keep being taken over),
        or once the client saw a violation (a signal wrongly refused as a duplicate leaves its
        run waiting for ever)."""
        deadline = time.monotonic() + self.drain_timeout
        next_look = time.monotonic() + 1.0
        while await self.unfinished():
            if self.result.violations:
                self.aborted = True
                return
            if time.monotonic() > next_look:
                next_look = time.monotonic() + 1.0
                if live_overlaps(steps_of(read_log(self.log_path).executions.values()), self.killed):
                    self.aborted = True  # check() reports them, and the runs left unfinished
                    return
            if time.monotonic() > deadline:
                assert self.client is not None
                stuck = await self.client.get_runs(status=["pending", "leased", "waiting"], limit=10_000)
                self.result.violations.append(
                    f"{len(stuck)} run(s) never reached a terminal state: "
                    + ", ".join(f"{r.id}:{r.status}" for r in stuck[:10])
                )
                return
            for worker in self.workers:
                if not worker.alive():
                    raise RuntimeError(f"worker {worker.pid} died while draining:\n{worker.stderr()}")
            await asyncio.sleep(0.05)

    # --- the invariants -------------------------------------------------------------------------
    def check(self) -> None:
        state = read_state(self.db_url)
        check_log(
            read_log(self.log_path),
            state.runs,
            state.steps,
            self.expected,
            self.killed,
            self.result,
            lease_ns=int(self.lease * 1e9),
            idempotency=self.idempotency,
            attempt_rows=state.attempts,
            signal_rows=state.signals,
            label_rows=state.labels,
        )


async def torture(
    workdir: Path,
    *,
    kills: int = 8,
    processes: int = 1,
    seed: int | None = None,
    lease: float = DEFAULT_LEASE,
    renew: float = DEFAULT_RENEW,
    poll: float = 0.05,
    max_kill_delay: float = 0.6,
    drain_timeout: float = 180.0,
    db_url: str | None = None,
) -> TortureResult:
    """Run the crash torture in ``workdir`` (created if needed) and return its counts.

    ``seed``: see :func:`choose_seed`; the result names the seed used. ``db_url``: the
    database (empty; default: a new SQLite file in ``workdir``), e.g. a PostgreSQL one.
    """
    harness = Torture(
        Path(workdir),
        kills=kills,
        processes=processes,
        seed=choose_seed(seed),
        lease=lease,
        renew=renew,
        poll=poll,
        max_kill_delay=max_kill_delay,
        drain_timeout=drain_timeout,
        db_url=db_url,
    )
    return await harness.run()


def run_torture(workdir: Path, **options: Any) -> TortureResult:
    """Synchronous wrapper around :func:`torture`."""
    return asyncio.run(torture(workdir, **options))
