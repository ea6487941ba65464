"""Many worker OS processes on one real PostgreSQL database (tests/postgres_workers.py).

Each step records its own side effect (a begin and an end record per execution, with pid,
run attempt and an execution id) in its process's file, and its committed result names
the execution it came from. From those records and the database, :func:`check` proves:
every run completed once with its own results, no step ran again after its commit, no
commit a worker acted on was lost, no two executions of one step (nor two claims of one
run) were live at once, and no two runs of one concurrency key overlapped in time.

1. four workers, 2,000 runs: every step ran exactly once, and every worker took part. Each
   keyed run triggers the next run of its key in its first step, so that run waits, pending,
   for most of this one: claims that ignore the key (its check removed from the claim
   query) show as dozens of overlaps, and claims without ``FOR UPDATE SKIP LOCKED`` as steps
   run twice.
2. one worker SIGKILLed mid-run: the others take its runs over once their leases expire (a
   claim that takes an expired-soon lease shows), and only the victim's last step of a run
   may run again (a replay that ignores recorded steps never finishes).
3. the server restarted twice (its own cluster, fsync on) while four workers are busy: they
   log, reconnect by themselves and finish everything; nothing committed is lost, and no
   worker goes on with a run whose lease ran out while the server was away (before the
   engine checked that, 3 of 6 runs showed steps run again, even two at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from postgres_workers import StepsIn, chain_item, expected_total, mp_steps, step_names, steps_of

from durably_web import ConflictError, Durably, StorageError, TriggerItem

pytestmark = pytest.mark.postgres

WORKER_SCRIPT = Path(__file__).with_name("postgres_workers.py")
UNFINISHED = ["pending", "leased", "waiting"]


# --- the records ------------------------------------------------------------------------------


@dataclass
class Execution:
    """One execution of one step: its B record and, once it ended, its E record."""

    run_id: str
    step: str
    pid: int
    attempt: int
    xid: str
    begin: int  # monotonic ns
    begin_wall: int  # time.time_ns()
    end: int | None = None
    end_wall: int | None = None

    def stop(self, killed: dict[int, int]) -> int | None:
        """When the side effect stopped: its end, or the moment its process was SIGKILLed."""
        return self.end if self.end is not None else killed.get(self.pid)


@dataclass
class Records:
    executions: dict[str, Execution] = field(default_factory=dict)  # by xid
    ready: dict[int, int] = field(default_factory=dict)  # pid -> monotonic ns
    errors: list[tuple[int, str, int]] = field(default_factory=list)  # pid, error type, monotonic ns
    problems: list[str] = field(default_factory=list)


def read_records(records_dir: Path, *, pid: int | None = None) -> Records:
    """Every worker's records, or one worker's (a last line without its newline is being
    written: skipped)."""
    records = Records()
    for path in sorted(records_dir.glob("*.log" if pid is None else f"{pid}.log")):
        for line in path.read_bytes().decode().split("\n")[:-1]:
            parts = line.split(" ")
            if parts[0] == "S" and len(parts) == 4:
                records.ready[int(parts[1])] = int(parts[2])
            elif parts[0] == "B" and len(parts) == 8:
                run_id, step, pid, attempt, xid, mono, wall = parts[1:]
                if xid in records.executions:
                    records.problems.append(f"execution {xid} begins twice")
                records.executions[xid] = Execution(
                    run_id, step, int(pid), int(attempt), xid, int(mono), int(wall)
                )
            elif parts[0] == "E" and len(parts) == 8:
                execution = records.executions.get(parts[5])
                if execution is None or execution.end is not None or execution.step != parts[2]:
                    records.problems.append(f"end record without its begin: {line!r}")
                else:
                    execution.end, execution.end_wall = int(parts[6]), int(parts[7])
            elif parts[0] == "X" and len(parts) == 5:
                records.errors.append((int(parts[1]), parts[2], int(parts[3])))
            else:
                records.problems.append(f"unparseable record {line!r} in {path.name}")
    return records


# --- the checker ------------------------------------------------------------------------------


@dataclass
class Outcome:
    violations: list[str] = field(default_factory=list)
    reexecuted: list[Execution] = field(default_factory=list)  # executions whose result was not kept
    claims: int = 0  # (run, pid, attempt) segments: one per claim that executed something


def check(
    records: Records,
    runs: dict[str, dict[str, Any]],
    step_rows: list[dict[str, Any]],
    expected: dict[str, dict[str, Any]],
    *,
    killed: dict[int, int] | None = None,
    may_reexecute: Callable[[Execution], bool] = lambda execution: False,
) -> Outcome:
    """Check the records against the database.

    ``expected``: every run the client created, by id: its concurrency key and step count.
    ``killed``: pid -> monotonic ns when that worker was SIGKILLed (and reaped).
    ``may_reexecute``: whether an execution whose result the database did not keep is
    acceptable (a SIGKILL, a failed commit); by default none is: every step ran exactly once.
    """
    killed = killed or {}
    out = Outcome()
    v = out.violations
    v += records.problems
    executions = sorted(records.executions.values(), key=lambda e: e.begin)

    # Every side effect that began ended, unless its process was killed.
    for e in executions:
        if e.stop(killed) is None:
            v.append(f"{e.run_id}/{e.step} (execution {e.xid}, pid {e.pid}) began and never ended")
    if v:
        return out

    # The runs: every one created completed with its own results, and nothing else exists.
    if set(runs) != set(expected):
        v.append(
            f"runs in the database differ from those created: {len(set(runs) - set(expected))} extra, "
            f"{len(set(expected) - set(runs))} missing"
        )
    committed: dict[tuple[str, str], str] = {}
    steps_of_run: dict[str, list[str]] = defaultdict(list)
    for row in step_rows:
        key = (row["run_id"], row["name"])
        steps_of_run[row["run_id"]].append(row["name"])
        if row["status"] != "completed":
            v.append(f"step {key} is {row['status']}")
            continue
        output = json.loads(row["output"])
        committed[key] = output["x"]
    for run_id, exp in expected.items():
        run = runs.get(run_id)
        if run is None:
            continue
        if run["status"] != "completed":
            v.append(f"run {run_id} is {run['status']}: {run['error']}")
            continue
        total = json.loads(run["output"])["total"]
        if total != expected_total(run_id, exp["steps"]):
            v.append(f"run {run_id} completed with total {total}: another run's results?")
        if sorted(steps_of_run[run_id]) != step_names(exp["steps"]):
            v.append(f"run {run_id} has steps {sorted(steps_of_run[run_id])}")
        if run["concurrency_key"] != exp["key"]:
            v.append(f"run {run_id} has concurrency key {run['concurrency_key']}, not {exp['key']}")

    # Per step: the committed result came from an execution of that very step that ended,
    # which began last; the executions never overlapped; each one lost is accounted for.
    by_step: dict[tuple[str, str], list[Execution]] = defaultdict(list)
    for e in executions:
        by_step[(e.run_id, e.step)].append(e)
    for key, found in by_step.items():
        xid = committed.get(key)
        winner = records.executions.get(xid) if xid is not None else None
        if winner is None or (winner.run_id, winner.step) != key or winner.end is None:
            v.append(f"step {key} committed {xid}, which is no finished execution of it")
            continue
        for first, second in itertools.pairwise(found):
            stopped = first.stop(killed)
            assert stopped is not None
            if second.begin < stopped:
                v.append(f"step {key}: executions {first.xid} and {second.xid} were live at once")
        if found[-1] is not winner:
            late = [e.xid for e in found if e.begin > winner.begin]
            v.append(f"step {key} ran again after its commit ({winner.xid}): {late}")
        for e in found:
            if e is not winner:
                out.reexecuted.append(e)
                if not may_reexecute(e):
                    v.append(f"step {key} ran {len(found)} times: {[x.xid for x in found]} (pids {e.pid})")
    for key in committed.keys() - by_step.keys():
        v.append(f"step {key} was committed but never executed")

    # Within one claim (run, pid, attempt) a step begins only once the one before it was
    # committed (record_step returned): that commit must be the one the database kept.
    claims: dict[tuple[str, int, int], list[Execution]] = defaultdict(list)
    for e in executions:
        claims[(e.run_id, e.pid, e.attempt)].append(e)
    out.claims = len(claims)
    for claim, found in claims.items():
        for e in found[:-1]:
            if committed.get((e.run_id, e.step)) != e.xid:
                v.append(
                    f"claim {claim}: {e.step}'s commit ({e.xid}) was acknowledged (the next step began) "
                    f"but the database holds {committed.get((e.run_id, e.step))}"
                )

    # Claims, as [first begin, last stop], never overlap: not two of one run, and not two
    # runs of one concurrency key.
    spans: dict[str, list[tuple[int, int, tuple[str, int, int]]]] = defaultdict(list)
    for claim, found in claims.items():
        stops = [e.stop(killed) for e in found]
        span = (found[0].begin, max(s for s in stops if s is not None), claim)
        group = expected.get(claim[0], {}).get("key") or f"run {claim[0]}"
        spans[group].append(span)
    for group, group_spans in spans.items():
        group_spans.sort()
        latest: tuple[int, int, tuple[str, int, int]] | None = None
        for span in group_spans:
            if latest is not None and span[0] < latest[1]:
                v.append(
                    f"{group}: claim {span[2]} began {(latest[1] - span[0]) / 1e6:.1f} ms before "
                    f"claim {latest[2]} stopped"
                )
            if latest is None or span[1] > latest[1]:
                latest = span
    return out


# --- processes, the client, the database ------------------------------------------------------


class Workers:
    """Worker processes; whatever is still alive at the end is SIGKILLed (see the fixture)."""

    def __init__(self, workdir: Path) -> None:
        self.records_dir = workdir / "records"
        self.records_dir.mkdir()
        self.logs_dir = workdir / "stderr"
        self.logs_dir.mkdir()
        self.processes: list[subprocess.Popen[bytes]] = []
        self.killed: dict[int, int] = {}

    def start(self, db_url: str, count: int, *options: str) -> None:
        for _ in range(count):
            n = len(self.processes)
            with open(self.logs_dir / f"worker-{n}.stderr", "wb") as stderr:
                self.processes.append(
                    subprocess.Popen(
                        [sys.executable, str(WORKER_SCRIPT), db_url, str(self.records_dir), *options],
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=stderr,
                    )
                )

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def stderr(self, pid: int) -> str:
        n = self.pids.index(pid)
        return (self.logs_dir / f"worker-{n}.stderr").read_text(errors="replace")

    def all_stderr(self) -> str:
        return "\n".join(f"--- worker {pid}:\n{self.stderr(pid)[-3000:]}" for pid in self.pids)

    def check_alive(self) -> None:
        for process in self.processes:
            if process.pid not in self.killed and process.poll() is not None:
                raise AssertionError(
                    f"worker {process.pid} exited with {process.returncode}:\n{self.stderr(process.pid)}"
                )

    async def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not set(self.pids) - set(self.killed) <= set(read_records(self.records_dir).ready):
            self.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"workers did not start in {timeout}s\n{self.all_stderr()}")
            await asyncio.sleep(0.02)

    def kill(self, pid: int) -> int:
        """SIGKILL one worker and reap it; return the monotonic ns after which it wrote nothing."""
        process = self.processes[self.pids.index(pid)]
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        self.killed[pid] = time.monotonic_ns()
        return self.killed[pid]

    async def stop(self, timeout: float = 30) -> None:
        """SIGTERM every live worker; each must stop gracefully (exit status 0)."""
        live = [p for p in self.processes if p.pid not in self.killed]
        for process in live:
            process.send_signal(signal.SIGTERM)
        for process in live:
            try:
                code = await asyncio.to_thread(process.wait, timeout)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"worker {process.pid} did not stop on SIGTERM") from None
            assert code == 0, f"worker {process.pid} exited with {code}:\n{self.stderr(process.pid)}"

    def kill_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait(30)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    started = Workers(tmp_path)
    try:
        yield started
    finally:
        started.kill_all()


@pytest.fixture
async def client(postgres_url: str) -> AsyncIterator[Durably]:
    durably = Durably(postgres_url, jobs=[mp_steps], worker=False)
    await durably.init()
    try:
        yield durably
    finally:
        await durably.stop()


@dataclass
class Planned:
    """The runs to create, numbered 0 .. total - 1 (run n has idempotency key ``mp-n``): per
    concurrency key a sequence of runs, and unkeyed ones."""

    keyed: dict[str, list[int]]  # per key, the runs the test still has to trigger
    unkeyed: list[int]
    key_of: dict[int, str | None]  # every run's concurrency key
    # True: a keyed run triggers the next run of its key itself, in its first step, so that
    # run is pending (held back by the key alone) while this one executes its other steps.
    # False: the feeder triggers it once this one has been claimed (no step talks to the
    # database, for the restart test); how long it is pending then depends on timing.
    chained: bool
    delay: float  # seconds each step's side effect lasts in an unkeyed run ...
    keyed_delay: float  # ... and in a keyed run (long: its successor waits meanwhile)
    # At most this many unkeyed runs pending at once: claims go oldest first, and a deep
    # queue of older unkeyed runs would hold the next run of a key back until its
    # predecessor had ended anyway.
    backlog: int = 16
    created: dict[str, str] = field(default_factory=dict)  # run id -> disposition (our triggers)

    @staticmethod
    def make(
        *,
        keys: int,
        per_key: int,
        unkeyed: int,
        chained: bool,
        delay: float = 0.003,
        keyed_delay: float = 0.05,
    ) -> Planned:
        numbers = itertools.count()
        keyed = {f"k{k:02d}": [next(numbers) for _ in range(per_key)] for k in range(keys)}
        loose = [next(numbers) for _ in range(unkeyed)]
        key_of: dict[int, str | None] = {n: key for key, ns in keyed.items() for n in ns}
        key_of.update((n, None) for n in loose)
        return Planned(keyed, loose, key_of, chained, delay, keyed_delay)

    @property
    def total(self) -> int:
        return len(self.key_of)

    def item(self, n: int, key: str | None) -> TriggerItem:
        chain = self.keyed[key][1:] if key is not None and self.chained else []
        payload = StepsIn(
            steps=steps_of(n), delay=self.delay if key is None else self.keyed_delay, key=key, chain=chain
        )
        # Idempotency keys: a batch retried after a lost COMMIT reply creates nothing twice.
        return TriggerItem(input=payload, idempotency_key=chain_item(n), concurrency_key=key)

    def expected(self, runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Every run in the database, by id: its key and step count, from its number; fails
        unless every number is there exactly once (nothing lost, nothing created twice)."""
        numbers: dict[int, list[str]] = defaultdict(list)
        for run in runs.values():
            numbers[int((run["idempotency_key"] or "mp--1").removeprefix("mp-"))].append(run["id"])
        assert sorted(numbers) == list(range(self.total)), (
            f"run numbers missing: {sorted(set(range(self.total)) - set(numbers))[:20]}, "
            f"unexpected: {sorted(set(numbers) - set(range(self.total)))[:20]}"
        )
        assert all(len(ids) == 1 for ids in numbers.values())
        return {ids[0]: {"key": self.key_of[n], "steps": steps_of(n)} for n, ids in numbers.items()}


async def feed(client: Durably, plan: Planned, *, interval: float = 0.02) -> None:
    """Trigger the planned runs in waves (``batch_trigger``): the next run of every key that
    has no pending run (a key may have one), and unkeyed runs up to the backlog. In a chain
    only a key's first run is ours. Retries through a database outage."""
    while plan.keyed or plan.unkeyed:
        try:
            pending = await client.get_runs(status="pending", limit=10_000)
            busy = {run.concurrency_key for run in pending}
            wave: list[tuple[int, str | None]] = [
                (queue[0], key) for key, queue in plan.keyed.items() if key not in busy
            ]
            room = plan.backlog - sum(run.concurrency_key is None for run in pending)
            wave += [(n, None) for n in plan.unkeyed[: max(0, room)]]
            if wave:
                runs = await client.batch_trigger(mp_steps, [plan.item(n, key) for n, key in wave])
                for (n, key), run in zip(wave, runs, strict=True):
                    plan.created[run.id] = run.disposition or ""
                    if key is None:
                        plan.unkeyed.remove(n)
                    elif plan.chained or len(plan.keyed[key]) == 1:
                        del plan.keyed[key]
                    else:
                        plan.keyed[key].pop(0)
        except (ConflictError, StorageError):
            pass  # a key became pending meanwhile, or the server is down: the next wave retries
        await asyncio.sleep(interval)


async def wait_all_done(
    client: Durably, plan: Planned, workers: Workers, feeder: asyncio.Task[None], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        workers.check_alive()
        if feeder.done():
            feeder.result()  # its exception, if any
            try:
                left = await client.get_runs(status=UNFINISHED, limit=10_000)
            except StorageError:
                left = None
            if left == []:
                return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not done in {timeout}s (the feeder {'has' if feeder.done() else 'has not'} "
                f"triggered all of its runs)\n{workers.all_stderr()}"
            )
        await asyncio.sleep(0.1)


async def database_state(url: str) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Every run and every step row, read with a connection of our own (not through the store)."""
    import psycopg
    from psycopg.rows import dict_row

    async with await psycopg.AsyncConnection.connect(url, autocommit=True, row_factory=dict_row) as conn:
        runs = await (await conn.execute("SELECT * FROM durably_runs")).fetchall()
        steps = await (await conn.execute("SELECT * FROM durably_steps")).fetchall()
    return {row["id"]: row for row in runs}, steps


async def sql(url: str, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    import psycopg

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cursor = await conn.execute(statement, params)
        return await cursor.fetchall() if cursor.description else []


@contextlib.asynccontextmanager
async def feeding(client: Durably, plan: Planned) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(feed(client, plan))
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def waited_on_their_key(records: Records, runs: dict[str, dict[str, Any]]) -> float:
    """Of the keyed runs that had a successor (the next run of their key), the share whose
    successor was created, and so was pending, before they ended: the moments at which a
    claim that ignored the key would have run two at once."""
    ended: dict[str, int] = defaultdict(int)
    for e in records.executions.values():
        ended[e.run_id] = max(ended[e.run_id], (e.end_wall or 0) // 1_000_000)
    by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs.values():
        if run["concurrency_key"] is not None:
            by_key[run["concurrency_key"]].append(run)
    pairs = waited = 0
    for key_runs in by_key.values():
        key_runs.sort(key=lambda run: run["started_at"])
        for first, second in itertools.pairwise(key_runs):
            pairs += 1
            waited += second["created_at"] < ended[first["id"]]
    return waited / max(1, pairs)


def executions_by_pid(records: Records) -> dict[int, int]:
    counts: dict[int, int] = defaultdict(int)
    for e in records.executions.values():
        counts[e.pid] += 1
    return dict(counts)


# --- 1. four workers, 2,000 runs ---------------------------------------------------------------


async def test_four_workers_run_two_thousand_runs_and_every_step_exactly_once(
    postgres_url: str, client: Durably, workers: Workers
) -> None:
    # A long lease (no lapse on a loaded machine) and a slow poll: workers are woken by NOTIFY.
    # Room for far more runs than the keys allow at once: every slot a claim that ignored
    # the keys could use shows as an overlap.
    options = ("--lease", "10", "--renew", "1", "--poll", "1", "--concurrency", "40")
    workers.start(f"{postgres_url}?pool_size=20", 4, *options)
    await workers.wait_ready()
    plan = Planned.make(keys=50, per_key=10, unkeyed=1500, chained=True, keyed_delay=0.5)
    began = time.monotonic()
    async with feeding(client, plan) as feeder:
        await wait_all_done(client, plan, workers, feeder, timeout=240)
    elapsed = time.monotonic() - began
    await workers.stop()

    assert set(plan.created.values()) == {"created"} and len(plan.created) == 1550
    records = read_records(workers.records_dir)
    runs, steps = await database_state(postgres_url)
    expected = plan.expected(runs)
    outcome = check(records, runs, steps, expected)
    assert outcome.violations == [], "\n".join(outcome.violations[:30])
    assert len(runs) == 2000
    assert len(records.executions) == sum(run["steps"] for run in expected.values())
    assert outcome.claims == 2000, "a run was claimed twice"
    assert {run["attempt"] for run in runs.values()} == {1}
    by_pid = executions_by_pid(records)
    assert set(by_pid) == set(workers.pids) and min(by_pid.values()) >= 100, by_pid
    assert records.errors == []
    # The key check was under pressure: the next run of a key was pending while its
    # predecessor ran (a chained run triggers it in its first step).
    pressure = waited_on_their_key(records, runs)
    assert pressure > 0.9, pressure
    print(f"2000 runs, {len(records.executions)} steps, 4 workers: {elapsed:.1f} s; steps per pid {by_pid}")


# --- 2. SIGKILL one worker mid-run ---------------------------------------------------------------


async def test_sigkilled_worker_runs_are_taken_over_after_lease_expiry_and_no_committed_step_runs_again(
    postgres_url: str, client: Durably, workers: Workers
) -> None:
    lease = 2.0
    options = ("--lease", str(lease), "--renew", "0.25", "--poll", "1", "--concurrency", "8")
    workers.start(postgres_url, 4, *options)
    await workers.wait_ready()
    victim = workers.pids[0]
    # Steps of 20 ms: a worker with eight runs has a step in flight most of the time.
    plan = Planned.make(keys=50, per_key=8, unkeyed=400, chained=True, delay=0.02, keyed_delay=0.02)
    async with feeding(client, plan) as feeder:
        # Kill once the victim has done some work and has steps in flight.
        deadline = time.monotonic() + 60
        while True:
            workers.check_alive()
            mine = read_records(workers.records_dir, pid=victim).executions.values()
            if len(mine) >= 100 and sum(e.end is None for e in mine) >= 2:
                break
            assert time.monotonic() < deadline, f"the victim never got going: {len(mine)} executions"
            await asyncio.sleep(0.005)
        killed_at = workers.kill(victim)
        # Its leases as it left them: nobody may take these runs before they expire.
        held = dict(
            await sql(
                postgres_url,
                "SELECT id, lease_expires_at FROM durably_runs "
                "WHERE status = 'leased' AND lease_owner LIKE %s",
                (f"%:{victim}:%",),
            )
        )
        await wait_all_done(client, plan, workers, feeder, timeout=120)
    await workers.stop()

    records = read_records(workers.records_dir)
    runs, steps = await database_state(postgres_url)
    in_flight = [e for e in records.executions.values() if e.pid == victim and e.end is None]

    def lost_to_the_kill(e: Execution) -> bool:
        # Only the victim's last step of a run it held when it died (in flight, or ended
        # but not committed yet) may have run again.
        return e.pid == victim and e.run_id in held

    outcome = check(
        records, runs, steps, plan.expected(runs), killed={victim: killed_at}, may_reexecute=lost_to_the_kill
    )
    assert outcome.violations == [], "\n".join(outcome.violations[:30])
    assert len(runs) == 800
    assert in_flight, "no step was in flight at the kill: nothing was tested"
    assert {e.run_id for e in in_flight} <= set(held), held
    for run_id, expires_ms in held.items():
        assert runs[run_id]["attempt"] == 2, runs[run_id]
        takeover = [e for e in records.executions.values() if e.run_id == run_id and e.pid != victim]
        if takeover:  # (a run whose last step had committed is only finished by its new owner)
            first = min(takeover, key=lambda e: e.begin)
            early = expires_ms - first.begin_wall // 1_000_000
            assert early <= 0, f"{run_id} was taken over {early} ms before its lease expired"
            assert first.begin < killed_at + int((lease + 10) * 1e9), f"{run_id} was taken over late"
    # Every step that ran again is the victim's, at most one per run it held; the others ran once.
    assert len(outcome.reexecuted) <= len(held)
    assert all(e.pid == victim for e in outcome.reexecuted)
    assert {run["attempt"] for run_id, run in runs.items() if run_id not in held} == {1}
    print(
        f"killed with {len(held)} runs held, {len(in_flight)} steps in flight; "
        f"{len(outcome.reexecuted)} steps ran again"
    )


# --- 3. the server restarts while four workers are busy ---------------------------------------------


@pytest.fixture
def fsync_cluster() -> Iterator[Any]:
    """A cluster of this test's own (it is restarted), with fsync on: a commit is on disk."""
    from support.postgres import start_test_cluster

    cluster = start_test_cluster(fsync=True)
    try:
        yield cluster
    finally:
        cluster.stop()


async def test_workers_survive_server_restarts_and_nothing_committed_is_lost(
    fsync_cluster: Any, workers: Workers
) -> None:
    url = fsync_cluster.create_database("restarts")
    lease = 2.0
    workers.start(url, 4, "--lease", str(lease), "--renew", "0.25", "--poll", "1", "--concurrency", "8")
    await workers.wait_ready()
    # No step talks to the database here (the feeder triggers each next run of a key).
    plan = Planned.make(keys=50, per_key=16, unkeyed=600, chained=False, keyed_delay=0.01)
    steps_in_all = sum(steps_of(n) for n in range(plan.total))
    restarts: list[tuple[str, int, int]] = []
    async with Durably(url, jobs=[mp_steps], worker=False) as client, feeding(client, plan) as feeder:
        # An immediate stop (a crash: the server recovers from its WAL) a quarter of the
        # way through, a fast one (clean shutdown) at 60 %, each down for a second.
        for mode, share in (("immediate", 0.25), ("fast", 0.6)):
            while len(read_records(workers.records_dir).executions) < share * steps_in_all:
                workers.check_alive()
                assert not feeder.done(), feeder
                await asyncio.sleep(0.02)
            down = time.monotonic_ns()
            await asyncio.to_thread(fsync_cluster.restart, mode=mode, down_for=1.0)
            restarts.append((mode, down, time.monotonic_ns()))
        await wait_all_done(client, plan, workers, feeder, timeout=180)
    await workers.stop()

    records = read_records(workers.records_dir)
    runs, steps = await database_state(url)

    def lost_to_the_outage(e: Execution) -> bool:
        # A step that began just before a restart (its commit failed), or soon after it (its
        # claim's lease had run out meanwhile; a broken connection not yet discarded), may run
        # again on the run's next claim.
        return any(down - 1_000_000_000 <= e.begin <= up + int(lease * 1e9) for _, down, up in restarts)

    outcome = check(records, runs, steps, plan.expected(runs), may_reexecute=lost_to_the_outage)
    assert outcome.violations == [], "\n".join(outcome.violations[:30])
    assert len(runs) == 1400
    # Every worker felt each restart, said so, and came back by itself.
    last_up = restarts[-1][2]
    for pid in workers.pids:
        log = workers.stderr(pid)
        assert log.count("PostgreSQL LISTEN connection lost") >= 2, log[-3000:]
        assert log.count("PostgreSQL LISTEN connection restored") >= 2, log[-3000:]
        after = [e for e in records.executions.values() if e.pid == pid and e.begin > last_up]
        assert after, f"worker {pid} executed nothing after the last restart:\n{log[-3000:]}"
    errors = Counter(error for _, error, _ in records.errors)
    print(
        f"restarts {[(m, round((u - d) / 1e9, 2)) for m, d, u in restarts]}; "
        f"re-executed {len(outcome.reexecuted)} steps; worker errors {dict(errors)}"
    )
