"""Crash torture: SIGKILL real worker processes at random moments, then prove from the
side effects the steps recorded themselves that nothing was lost or run twice.

``run_torture(workdir, kills=N, processes=1 | 2)`` triggers a mix of runs (many
steps, failing steps, concurrency keys, idempotency keys, child runs spawned
from a step, cancellations issued while running) from a client in this
process, runs them in worker subprocesses (``torture_jobs.py``) on one SQLite
file, kills a worker ``kills`` times in a row (restarting it each time), lets a
last worker drain the queue, and checks:

* every accepted run (and every spawned child) reached a terminal state, the
  one it must reach: cancelled if our cancel was accepted, failed if it has a
  failing step, otherwise completed with the right output;
* every committed step's side effect happened, and happened once — except for
  executions that were in flight in a process we SIGKILLed (that execution was
  that process's last one for the run, and its attempt is older than the
  committed one): at-least-once only for the step in flight, exactly-once for
  committed steps;
* no second run for a duplicate idempotency key (ours, and the child runs a
  re-executed step triggers with a key derived from its run);
* no overlap in time between side effects of different runs sharing a
  concurrency key (a killed process's in-flight step ends at its kill).

It returns a :class:`TortureResult` with the counts and every violation found.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torture_jobs

from durably_web import ConflictError, Durably

WORKER_SCRIPT = Path(__file__).with_name("torture_jobs.py")
CONCURRENCY_KEYS = ("ck-a", "ck-b")


@dataclass
class TortureResult:
    kills: int = 0
    processes: int = 1
    runs: int = 0  # accepted runs, spawned children included
    steps: int = 0  # committed steps in the database
    executions: int = 0  # step side effects recorded in the log
    duplicates: int = 0  # re-executions of a step that was in flight in a killed process
    cancelled: int = 0
    failed: int = 0
    completed: int = 0
    violations: list[str] = field(default_factory=list)
    # Known engine issue (reported, not counted as a violation): a run cancelled while a step
    # is in flight keeps executing that step for a moment after the next run with its
    # concurrency key has started.
    wall_time: float = 0.0

    def summary(self) -> str:
        return (
            f"kills={self.kills} processes={self.processes} runs={self.runs} steps={self.steps} "
            f"executions={self.executions} duplicates={self.duplicates} completed={self.completed} "
            f"failed={self.failed} cancelled={self.cancelled} violations={len(self.violations)} "
            f"wall={self.wall_time:.1f}s"
        )


@dataclass
class Expected:
    """What the client knows about one accepted run."""

    run_id: str
    steps: int
    fail_at: int = -1
    spawn: bool = False
    concurrency_key: str | None = None
    cancel_accepted: bool = False


@dataclass(frozen=True)
class Line:
    kind: str
    run_id: str
    step: str
    pid: int
    attempt: int
    t: int
    extra: str = ""


def read_log(path: Path) -> tuple[list[Line], dict[int, int]]:
    """Parse the side-effect log: step lines, and worker-ready times by pid."""
    lines: list[Line] = []
    ready: dict[int, int] = {}
    if not path.exists():
        return lines, ready
    text = path.read_bytes().decode()
    for raw in text.split("\n")[:-1]:  # a line being written has no newline yet
        parts = raw.split(" ")
        if parts[0] == "S":
            ready[int(parts[1])] = int(parts[2])
        elif parts[0] in ("B", "E"):
            lines.append(Line(parts[0], parts[1], parts[2], int(parts[3]), int(parts[4]), int(parts[5])))
        elif parts[0] == "T":
            lines.append(Line("T", parts[1], parts[2], int(parts[3]), int(parts[4]), int(parts[5]), parts[6]))
        else:
            raise AssertionError(f"unparseable side-effect line {raw!r}")
    return lines, ready


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
        lease: float,
        renew: float,
        poll: float,
        max_kill_delay: float,
        drain_timeout: float,
    ) -> None:
        self.workdir = workdir
        self.kills = kills
        self.processes = processes
        self.rng = random.Random(seed)
        self.lease = lease
        self.max_kill_delay = max_kill_delay
        self.drain_timeout = drain_timeout
        self.db_path = workdir / "torture.db"
        self.db_url = f"sqlite:///{self.db_path}"
        self.log_path = workdir / "side-effects.log"
        self.options = ["--lease", str(lease), "--renew", str(renew), "--poll", str(poll)]
        if processes == 1:
            # The harness promises one worker at a time: a restarted worker resumes at once.
            self.options.append("--sole")
        self.expected: dict[str, Expected] = {}
        self.idempotency: dict[str, str] = {}  # our idempotency key -> run id
        self.killed: dict[int, int] = {}  # pid -> monotonic_ns of the kill
        self.workers: list[WorkerProcess] = []
        self.started = 0
        self.result = TortureResult(kills=0, processes=processes)
        self.client: Durably | None = None

    # --- processes ------------------------------------------------------------------------
    def start_worker(self) -> WorkerProcess:
        worker = WorkerProcess(
            self.db_url, self.log_path, self.options, self.workdir / "workers", self.started
        )
        self.started += 1
        self.workers.append(worker)
        return worker

    async def wait_ready(self, worker: WorkerProcess, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            _, ready = read_log(self.log_path)
            if worker.pid in ready:
                return
            if not worker.alive():
                raise RuntimeError(f"worker {worker.pid} exited early:\n{worker.stderr()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {worker.pid} did not start in {timeout}s:\n{worker.stderr()}")
            await asyncio.sleep(0.01)

    def kill(self, worker: WorkerProcess) -> None:
        worker.process.send_signal(signal.SIGKILL)
        worker.process.wait(30)
        self.killed[worker.pid] = time.monotonic_ns()
        self.workers.remove(worker)
        self.result.kills += 1

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
    async def trigger_some(self, count: int) -> None:
        assert self.client is not None
        for _ in range(count):
            roll = self.rng.random()
            steps = self.rng.randint(3, 12)
            payload: dict[str, Any] = {"steps": steps, "delay": self.rng.choice([0.005, 0.02, 0.05])}
            options: dict[str, Any] = {}
            if roll < 0.2:
                payload["fail_at"] = self.rng.randrange(steps)
            if self.rng.random() < 0.25:
                payload["spawn"] = True
            if 0.2 <= roll < 0.5:
                options["concurrency_key"] = self.rng.choice(CONCURRENCY_KEYS)
                if self.rng.random() < 0.5:
                    options["coalesce"] = "skip"
            if 0.5 <= roll < 0.7:
                # A small key space so that keys repeat, across kills too.
                options["idempotency_key"] = f"idem-{self.rng.randrange(12)}"
            try:
                run = await self.client.trigger("torture-chain", payload, **options)
            except ConflictError:
                continue  # a pending run already holds this concurrency key: not accepted
            key = options.get("idempotency_key")
            if run.disposition == "created":
                if run.id in self.expected:
                    self.result.violations.append(f"trigger returned existing run {run.id} as created")
                self.expected[run.id] = Expected(
                    run_id=run.id,
                    steps=steps,
                    fail_at=payload.get("fail_at", -1),
                    spawn=payload.get("spawn", False),
                    concurrency_key=options.get("concurrency_key"),
                )
                if key is not None:
                    if key in self.idempotency:
                        self.result.violations.append(
                            f"idempotency key {key!r} created a second run {run.id} "
                            f"(first: {self.idempotency[key]})"
                        )
                    self.idempotency[key] = run.id
            elif run.disposition == "idempotent":
                if key is None or self.idempotency.get(key) != run.id:
                    self.result.violations.append(
                        f"idempotent trigger for {key!r} returned {run.id}, "
                        f"expected {self.idempotency.get(key)}"
                    )
            elif run.disposition == "coalesced":
                if run.id not in self.expected or run.status != "pending":
                    self.result.violations.append(f"coalesced into unknown or non-pending run {run.id}")

    async def cancel_some(self) -> None:
        assert self.client is not None
        leased = [r for r in await self.client.get_runs(status="leased", limit=1000) if r.id in self.expected]
        pending = [
            r for r in await self.client.get_runs(status="pending", limit=1000) if r.id in self.expected
        ]
        pool = leased or pending
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

    async def unfinished(self) -> int:
        assert self.client is not None
        return len(await self.client.get_runs(status=["pending", "leased"], limit=10_000))

    # --- the torture ------------------------------------------------------------------------------
    async def run(self) -> TortureResult:
        began = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.client = Durably(self.db_url, jobs=torture_jobs.JOBS, worker=False, polling_interval=0.05)
        await self.client.init()
        try:
            await self.trigger_some(6)
            for _ in range(self.processes):
                await self.wait_ready(self.start_worker())
            for _ in range(self.kills):
                if await self.unfinished() < 6:
                    await self.trigger_some(self.rng.randint(2, 5))
                if self.rng.random() < 0.35:
                    await asyncio.sleep(self.rng.uniform(0.0, 0.2))  # let a run get going first
                    await self.cancel_some()
                if self.rng.random() < 0.3:
                    await self.trigger_some(1)  # a trigger racing the kill
                await asyncio.sleep(self.rng.uniform(0.0, self.max_kill_delay))
                victim = self.rng.choice(self.workers)
                self.kill(victim)
                if self.processes > 1 and self.rng.random() < 0.5:
                    # Sometimes let the survivor take over on its own (lease expiry) for a while.
                    await asyncio.sleep(self.rng.uniform(0.0, self.lease * 1.5))
                await self.wait_ready(self.start_worker())
            await self.drain()
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
        deadline = time.monotonic() + self.drain_timeout
        while await self.unfinished():
            if time.monotonic() > deadline:
                assert self.client is not None
                stuck = await self.client.get_runs(status=["pending", "leased"], limit=10_000)
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
        result = self.result
        violations = result.violations
        lines, _ = read_log(self.log_path)
        conn = sqlite3.connect(self.db_path)
        conn.row_factory = sqlite3.Row
        try:
            runs = {row["id"]: dict(row) for row in conn.execute("SELECT * FROM durably_runs")}
            step_rows = [dict(row) for row in conn.execute("SELECT * FROM durably_steps")]
        finally:
            conn.close()

        begins: dict[tuple[str, str], list[Line]] = defaultdict(list)
        by_attempt: dict[tuple[str, int], list[Line]] = defaultdict(list)
        spawned: dict[str, set[str]] = defaultdict(set)
        for line in lines:
            if line.kind == "B":
                begins[(line.run_id, line.step)].append(line)
                by_attempt[(line.run_id, line.attempt)].append(line)
            elif line.kind == "E":
                by_attempt[(line.run_id, line.attempt)].append(line)
            elif line.kind == "T":
                spawned[line.run_id].add(line.step)  # the child run id
        result.executions = sum(len(v) for v in begins.values())

        # Child runs: exactly one per parent that ran its spawn step, whatever re-executions.
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

        # No phantom runs, no lost runs.
        for run_id in runs:
            if run_id not in self.expected and run_id not in children:
                violations.append(f"run {run_id} exists but was never accepted")
        for run_id in list(self.expected) + list(children):
            if run_id not in runs:
                violations.append(f"accepted run {run_id} is missing from the database")
        result.runs = len(self.expected) + len(children)

        steps_of: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
        for row in step_rows:
            steps_of[row["run_id"]][row["name"]] = row
        result.steps = sum(1 for row in step_rows if row["status"] == "completed")

        # Terminal states and outputs.
        for run_id, row in runs.items():
            status = row["status"]
            if status in ("completed", "failed", "cancelled"):
                setattr(result, status, getattr(result, status) + 1)
            else:
                violations.append(f"run {run_id} ended the torture {status}")
                continue
            if run_id in children:
                want_status, want_total, names = "completed", 7, ["c0", "c1"]
            elif run_id in self.expected:
                exp = self.expected[run_id]
                names = [f"s{i}" for i in range(exp.steps)]
                if exp.spawn and exp.steps > 1:
                    names.append("spawn")
                if exp.cancel_accepted:
                    want_status, want_total = "cancelled", None
                elif exp.fail_at >= 0:
                    want_status, want_total = "failed", None
                    names = names[: exp.fail_at] + (["spawn"] if exp.spawn and exp.fail_at >= 1 else [])
                else:
                    want_status, want_total = "completed", torture_jobs.expected_total(exp.steps)
            else:
                continue
            if status != want_status:
                violations.append(f"run {run_id} ended {status}, expected {want_status}")
                continue
            recorded = steps_of.get(run_id, {})
            if status == "completed":
                output = json.loads(row["output"])
                if output != {"total": want_total}:
                    violations.append(f"run {run_id} output {output} != total {want_total}")
                missing = [n for n in names if recorded.get(n, {}).get("status") != "completed"]
                if missing:
                    violations.append(f"completed run {run_id} lacks committed steps {missing}")
            if status == "failed":
                exp = self.expected[run_id]
                failed = [n for n, r in recorded.items() if r["status"] == "failed"]
                if failed != [f"s{exp.fail_at}"]:
                    violations.append(f"failed run {run_id} recorded failed steps {failed}")
                missing = [n for n in names if recorded.get(n, {}).get("status") != "completed"]
                if missing:
                    violations.append(f"failed run {run_id} lacks committed steps {missing}")

        # Exactly once for committed steps; re-execution only for the step in flight at a kill.
        for (run_id, name), executions in begins.items():
            row = steps_of.get(run_id, {}).get(name)
            if row is not None and row["status"] == "completed":
                output = json.loads(row["output"])
                committed = [
                    e for e in executions if (e.pid, e.attempt) == (output["pid"], output["attempt"])
                ]
                if len(committed) != 1:
                    violations.append(
                        f"step {run_id}/{name}: committed execution pid={output['pid']} "
                        f"attempt={output['attempt']} found {len(committed)} times in the side effects"
                    )
                    continue
                others = [e for e in executions if e is not committed[0]]
                for e in others:
                    if e.attempt >= committed[0].attempt:
                        violations.append(
                            f"step {run_id}/{name} ran again after its commit "
                            f"(pid {e.pid}, attempt {e.attempt})"
                        )
            else:
                # Uncommitted (in flight when the run ended by cancel) or the failing step.
                run_status = runs.get(run_id, {}).get("status")
                last = max(executions, key=lambda e: e.attempt)
                others = [e for e in executions if e is not last]
                if row is None and run_status != "cancelled":
                    others = executions  # every execution must be explained by a kill
                    if run_status == "completed":
                        violations.append(f"step {run_id}/{name} ran but its completed run has no record")
            for e in others:
                if self.explained_by_kill(e, by_attempt):
                    result.duplicates += 1
                else:
                    violations.append(
                        f"step {run_id}/{name} ran more than once: pid {e.pid} attempt {e.attempt} "
                        f"(killed: {e.pid in self.killed}) is not the in-flight step of a killed worker"
                    )

        self.check_concurrency(runs, by_attempt)

    def explained_by_kill(self, execution: Line, by_attempt: dict[tuple[str, int], list[Line]]) -> bool:
        """A lost execution must be the last thing its process did for that run before we killed it."""
        killed_at = self.killed.get(execution.pid)
        if killed_at is None or killed_at < execution.t:
            return False
        later = [
            line
            for line in by_attempt[(execution.run_id, execution.attempt)]
            if line.kind == "B" and line.t > execution.t
        ]
        return not later

    def check_concurrency(
        self, runs: dict[str, dict[str, Any]], by_attempt: dict[tuple[str, int], list[Line]]
    ) -> None:
        """Side effects of different runs with one concurrency key never overlap in time."""
        segments: dict[str, list[tuple[int, int, str, int, int]]] = defaultdict(list)
        for (run_id, attempt), lines in by_attempt.items():
            key = runs.get(run_id, {}).get("concurrency_key")
            if key is None:
                continue
            start = min(line.t for line in lines)
            end = max(line.t for line in lines)
            pid = lines[0].pid
            open_steps = {line.step for line in lines if line.kind == "B"} - {
                line.step for line in lines if line.kind == "E"
            }
            if open_steps:
                killed_at = self.killed.get(pid)
                if killed_at is None:
                    self.result.violations.append(
                        f"run {run_id} attempt {attempt}: steps {sorted(open_steps)} began and never ended "
                        f"in a worker that was not killed"
                    )
                else:
                    end = max(end, killed_at)  # in flight until the process died
            segments[key].append((start, end, run_id, attempt, pid))
        for key, items in segments.items():
            items.sort()
            for i, (_s1, e1, r1, a1, p1) in enumerate(items):
                for s2, _e2, r2, a2, p2 in items[i + 1 :]:
                    if s2 >= e1:
                        break
                    if r1 == r2:
                        continue
                    message = (
                        f"concurrency key {key}: run {r1} (attempt {a1}, pid {p1}) and run {r2} "
                        f"(attempt {a2}, pid {p2}) overlapped by {(e1 - s2) / 1e6:.1f} ms"
                    )
                    self.result.violations.append(message)


async def torture(
    workdir: Path,
    *,
    kills: int = 8,
    processes: int = 1,
    seed: int | None = None,
    lease: float = 1.0,
    renew: float = 0.2,
    poll: float = 0.05,
    max_kill_delay: float = 0.6,
    drain_timeout: float = 120.0,
) -> TortureResult:
    """Run the crash torture in ``workdir`` (created if needed) and return its counts."""
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "big")
    harness = Torture(
        Path(workdir),
        kills=kills,
        processes=processes,
        seed=seed,
        lease=lease,
        renew=renew,
        poll=poll,
        max_kill_delay=max_kill_delay,
        drain_timeout=drain_timeout,
    )
    return await harness.run()


def run_torture(workdir: Path, **options: Any) -> TortureResult:
    """Synchronous wrapper around :func:`torture`."""
    return asyncio.run(torture(workdir, **options))
