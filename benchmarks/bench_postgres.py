"""PostgreSQL benchmark, side by side with SQLite: ``python benchmarks/bench_postgres.py``.

Starts its own throwaway PostgreSQL cluster (tests/support/postgres.py: initdb and pg_ctl
on a free port in a temporary directory, fsync off as the test suite runs it) and stops
it at the end, after Ctrl-C too. Prints, in one run, for PostgreSQL (over TCP on
127.0.0.1) and for SQLite (a file in a temporary directory):
  floor      one committed INSERT per iteration of a row shaped like a step row: over
             one psycopg connection in autocommit mode (PostgreSQL), with raw sqlite3 as
             bench_core.py does (SQLite);
  per-step   overhead of one run with N no-op async steps executed by one worker, i.e.
             wall time of the run divided by N, and its ratio to the floor;
  runs/s     M single-step runs, batch-triggered, drained by 1, 2 and 4 worker processes
             (this script with --worker), timed from the moment the waiting workers are
             given the job until the last run completed (its completed_at): process
             start-up and imports are left out. Then the 1 -> 2 speedup, the CPU the
             workers and the server used per run, and how many cores were busy with it
             (and with anything else on the machine meanwhile).
Each figure is the median of --repeat runs. --profile DIR writes a cProfile of each
worker process (and of the per-step run) of the last repeat into DIR.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from durably_web import Durably, StepContext, define_job

# bench_core (the SQLite floor of `make bench`) and the test suite's throwaway cluster,
# tests/support/postgres.py, imported as tests/conftest.py imports it.
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent / "tests")]
from bench_core import floor_us as sqlite_floor_us  # noqa: E402
from support.postgres import PostgresCluster  # noqa: E402

PROCESS_COUNTS = (1, 2, 4)
#: Each worker process's settings: the best of a sweep on the 2-core machine (runs/s with
#: 1 and 2 processes, max_concurrent_runs 1 to 32, pool_size 2 to 16). Fewer runs at once
#: leave one process waiting on round trips; more, or more connections, only add
#: contention. PostgreSQL workers wake on LISTEN/NOTIFY, so their polling interval is the
#: safety net only; SQLite workers wake by polling, or when a run of their own ends.
#: pool_size is the PostgreSQL store's URL option (connections per process).
SETTINGS: dict[str, dict[str, Any]] = {
    "postgres": {"max_concurrent_runs": 8, "pool_size": 4, "polling_interval": 1.0},
    "sqlite": {"max_concurrent_runs": 8, "polling_interval": 0.05},
}
#: A row shaped like a step row (durably_steps), for the PostgreSQL floor.
FLOOR_TABLE = (
    'CREATE TABLE {name} (run_id TEXT COLLATE "C", seq INTEGER, name TEXT, status TEXT, output TEXT, '
    "error TEXT, started_at BIGINT, completed_at BIGINT, kind TEXT, attempt INTEGER, "
    "PRIMARY KEY (run_id, seq))"
)
FLOOR_INSERT = "INSERT INTO {name} VALUES (%s, %s, %s, 'completed', 'null', NULL, %s, %s, 'run', 1)"
#: Whether a run is unfinished (on PostgreSQL through durably_runs_active: cheap to poll).
UNFINISHED = "SELECT EXISTS (SELECT 1 FROM durably_runs WHERE status IN ('pending', 'leased', 'waiting'))"
#: Once none is: when the last one ended (ms), and how many did not complete.
OUTCOME = "SELECT max(completed_at), sum(CASE WHEN status = 'completed' THEN 0 ELSE 1 END) FROM durably_runs"


async def noop() -> None:
    return None


def make_many_steps(steps: int):
    @define_job("many-steps")
    async def many_steps(step: StepContext, payload: dict) -> None:
        for i in range(steps):
            await step.run(f"s{i}", noop)

    return many_steps


#: Runs this process's handler executed (a worker process reports it when stopped).
executed = 0


@define_job("one-step")
async def one_step(step: StepContext, payload: dict) -> None:
    global executed
    await step.run("only", noop)
    executed += 1


# --- floors --------------------------------------------------------------------------------------
def postgres_floor_us(url: str, n: int) -> float:
    """One committed INSERT per iteration: autocommit, so each is its own transaction."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(FLOOR_TABLE.format(name="floor_steps"))
        insert = FLOOR_INSERT.format(name="floor_steps")
        for i in range(10):  # psycopg prepares a statement from its 5th execution on, as for the store
            conn.execute(insert, ("warm-up", i, f"s{i}", i, i))
        start = time.perf_counter()
        for i in range(n):
            conn.execute(insert, ("run", i, f"s{i}", i, i))
        elapsed = time.perf_counter() - start
    return elapsed / n * 1e6


async def postgres_async_floor_us(url: str, n: int) -> float:
    """The same over psycopg's async connection, which the store uses (without its pool)."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(FLOOR_TABLE.format(name="floor_steps_async"))
        insert = FLOOR_INSERT.format(name="floor_steps_async")
        for i in range(10):
            await conn.execute(insert, ("warm-up", i, f"s{i}", i, i))
        start = time.perf_counter()
        for i in range(n):
            await conn.execute(insert, ("run", i, f"s{i}", i, i))
        elapsed = time.perf_counter() - start
    return elapsed / n * 1e6


# --- per-step overhead -------------------------------------------------------------------------
async def per_step_us(url: str, job, n: int, profile: str | None = None) -> float:
    async with Durably(url, jobs=[job]) as durably:
        run = await durably.trigger(job, {})
        started: list[float] = []
        durably.on("run:leased", lambda e: started.append(time.perf_counter()))
        profiler = cProfile.Profile() if profile else None
        if profiler:
            profiler.enable()
        done = await durably.wait_for_run(run.id, timeout=600)
        finished = time.perf_counter()
        if profiler:
            profiler.disable()
            profiler.dump_stats(profile)
        assert done.status == "completed", done.error
        return (finished - started[0]) / n * 1e6


# --- throughput: worker processes --------------------------------------------------------------
async def worker_main(url: str, settings: dict[str, Any], profile: str | None) -> None:
    """A worker process: open, say "ready", take the job on "go", report and stop on "stop".

    It opens with no job registered, so it claims nothing until "go" registers one (which
    wakes its claim loop): imports, migration check and the LISTEN connection are all done
    before the clock starts.
    """
    loop = asyncio.get_running_loop()
    commands = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)
    async with Durably(
        url,
        max_concurrent_runs=settings["max_concurrent_runs"],
        polling_interval=settings["polling_interval"],
    ) as durably:
        print("ready", flush=True)
        assert (await commands.readline()).strip() == b"go"
        cpu = time.process_time()
        profiler = cProfile.Profile() if profile else None
        if profiler:
            profiler.enable()
        durably.register(one_step)
        assert (await commands.readline()).strip() == b"stop"
        if profiler:
            profiler.disable()
            profiler.dump_stats(profile)
        print(json.dumps({"executed": executed, "cpu": time.process_time() - cpu}), flush=True)


@dataclass
class Drain:
    rate: float  # runs/s
    executed: list[int]  # runs each worker process executed
    worker_cpu_ms: float  # per run, all worker processes together
    server_cpu_ms: float  # per run, every process of the cluster (0 for SQLite)
    cores: float  # busy with this drain: workers, server, and this process polling
    others: float  # busy with anything else on the machine meanwhile


class CpuClock:
    """CPU seconds used by the whole machine and by one PostgreSQL cluster (from /proc)."""

    def __init__(self, postmaster_pid: int | None) -> None:
        self.postmaster_pid = postmaster_pid
        self.tick = os.sysconf("SC_CLK_TCK")

    def machine(self) -> float:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return (sum(fields) - fields[3] - fields[4]) / self.tick  # all but idle and iowait

    @contextlib.contextmanager
    def others(self, into: list[float]) -> Iterator[None]:
        """Append to ``into`` how many cores anything but this process and the server kept busy."""
        machine, server, own, start = self.machine(), self.server(), time.process_time(), time.perf_counter()
        yield
        ours = self.server() - server + time.process_time() - own
        into.append(max(0.0, (self.machine() - machine - ours) / (time.perf_counter() - start)))

    def server(self) -> float:
        if self.postmaster_pid is None:
            return 0.0
        total = 0
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError):
                    stat = (entry / "stat").read_text()
                    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
                    if int(entry.name) == self.postmaster_pid:
                        # utime, stime, and cutime, cstime: the backends that exited meanwhile.
                        total += sum(int(value) for value in fields[11:15])
                    elif int(fields[1]) == self.postmaster_pid:
                        total += int(fields[11]) + int(fields[12])
        return total / self.tick


async def _query(backend: str, url: str, query: str) -> tuple[Any, ...]:
    if backend == "postgres":
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            row = await (await conn.execute(query)).fetchone()
    else:
        conn = sqlite3.connect(f"file:{url.removeprefix('sqlite:///')}?mode=ro", uri=True, timeout=10)
        try:
            row = conn.execute(query).fetchone()
        finally:
            conn.close()
    assert row is not None
    return tuple(row)


def _with_pool_size(url: str, pool_size: int | None) -> str:
    return url if pool_size is None else url + ("&" if "?" in url else "?") + f"pool_size={pool_size}"


async def _start_worker(
    url: str, settings: dict[str, Any], profile: str | None
) -> asyncio.subprocess.Process:
    command = [sys.executable, __file__, "--worker", url, "--worker-settings", json.dumps(settings)]
    if profile:
        command += ["--profile", profile]
    return await asyncio.create_subprocess_exec(
        *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )


async def drain(
    backend: str,
    url: str,
    processes: int,
    runs: int,
    clock: CpuClock,
    *,
    analyze: bool = True,
    profile: Path | None = None,
) -> Drain:
    settings = SETTINGS[backend]
    # Created (and migrated) before any worker listens, and closed: nobody hears the batch.
    async with Durably(url, worker=False) as client:
        await client.batch_trigger(one_step, [{} for _ in range(runs)])
    if analyze and backend == "postgres":
        # As autovacuum will have done on a database in use. Without statistics the planner
        # expects few runs to match, and every claim sorts the whole backlog (see the row
        # "statistics never gathered").
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute("ANALYZE durably_runs")
    workers: list[asyncio.subprocess.Process] = []
    try:
        for i in range(processes):
            worker_url = _with_pool_size(url, settings.get("pool_size"))
            workers.append(
                await _start_worker(worker_url, settings, f"{profile}-worker{i}.pstats" if profile else None)
            )
        for worker in workers:
            assert worker.stdout is not None
            if (await asyncio.wait_for(worker.stdout.readline(), 120)).strip() != b"ready":
                raise RuntimeError(
                    f"a {backend} worker process did not start (exit code {await worker.wait()})"
                )
        machine0, server0, own0 = clock.machine(), clock.server(), time.process_time()
        started = time.perf_counter()
        go_ms = time.time() * 1000
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write(b"go\n")
        await asyncio.gather(*(w.stdin.drain() for w in workers if w.stdin is not None))
        while (await _query(backend, url, UNFINISHED))[0]:
            await asyncio.sleep(0.05)
            if time.perf_counter() - started > 600:
                raise RuntimeError(f"runs still unfinished after 600 s ({backend}, {processes} processes)")
        observed = time.perf_counter() - started
        machine1, server1, own1 = clock.machine(), clock.server(), time.process_time()
        reports = []
        for worker in workers:
            assert worker.stdin is not None and worker.stdout is not None
            worker.stdin.write(b"stop\n")
            await worker.stdin.drain()
            reports.append(json.loads(await asyncio.wait_for(worker.stdout.readline(), 60)))
        for worker in workers:
            await asyncio.wait_for(worker.wait(), 60)
    finally:
        for worker in workers:
            if worker.returncode is None:
                worker.kill()
                await worker.wait()
    last_ms, not_completed = await _query(backend, url, OUTCOME)
    if not_completed:
        raise RuntimeError(
            f"{not_completed} of {runs} runs did not complete ({backend}, {processes} processes)"
        )
    worker_cpu = sum(report["cpu"] for report in reports)
    ours = worker_cpu + (server1 - server0) + (own1 - own0)
    return Drain(
        rate=runs / ((last_ms - go_ms) / 1000),
        executed=[report["executed"] for report in reports],
        worker_cpu_ms=worker_cpu / runs * 1000,
        server_cpu_ms=(server1 - server0) / runs * 1000,
        cores=ours / observed,
        others=max(0.0, (machine1 - machine0 - ours) / observed),
    )


# --- the run -----------------------------------------------------------------------------------
def _median(drains: list[Drain]) -> Drain:
    """The drain with the median rate (its CPU figures go with it)."""
    return sorted(drains, key=lambda d: d.rate)[len(drains) // 2]


def _postmaster_pid(cluster: PostgresCluster) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int((cluster.data / "postmaster.pid").read_text().split("\n", 1)[0])
    return None


@contextlib.contextmanager
def _ctrl_c_deferred() -> Iterator[None]:
    """Hold a Ctrl-C until the block is done: a half-started cluster would be left running."""
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            raise KeyboardInterrupt


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"


async def bench(args: argparse.Namespace, cluster: PostgresCluster, profile: Path | None) -> None:
    many_steps = make_many_steps(args.steps)
    clock = CpuClock(_postmaster_pid(cluster))
    floors: dict[str, list[float]] = {"postgres": [], "postgres-async": [], "sqlite": []}
    steps: dict[str, list[float]] = {"postgres": [], "sqlite": []}
    drains: dict[tuple[str, int | str], list[Drain]] = {}
    in_process: list[float] = []  # cores busy with anything else during the floors and per-step runs
    databases = 0

    def new_database() -> str:
        nonlocal databases
        databases += 1
        return cluster.create_database(f"bench{databases}")

    for attempt in range(args.repeat):
        last = profile if attempt == args.repeat - 1 else None
        urls = [new_database() for _ in range(3)]
        with clock.others(in_process):
            floors["postgres"].append(postgres_floor_us(urls[0], args.steps))
            floors["postgres-async"].append(await postgres_async_floor_us(urls[1], args.steps))
            steps["postgres"].append(
                await per_step_us(
                    urls[2], many_steps, args.steps, f"{last}/per-step.pstats" if last else None
                )
            )
        with tempfile.TemporaryDirectory(prefix="durably-bench-") as tmp:
            folder = Path(tmp)
            with clock.others(in_process):
                floors["sqlite"].append(sqlite_floor_us(folder, args.steps))
                steps["sqlite"].append(
                    await per_step_us(f"sqlite:///{folder / 'steps.db'}", many_steps, args.steps)
                )
            for backend in ("postgres", "sqlite"):
                for processes in PROCESS_COUNTS:
                    url = (
                        new_database()
                        if backend == "postgres"
                        else f"sqlite:///{folder / f'runs{processes}.db'}"
                    )
                    where = last / f"{backend}-{processes}p" if last else None
                    result = await drain(backend, url, processes, args.runs, clock, profile=where)
                    drains.setdefault((backend, processes), []).append(result)
            cold = await drain("postgres", new_database(), 1, args.runs, clock, analyze=False)
            drains.setdefault(("postgres", "cold"), []).append(cold)

    pg_floor, sq_floor = statistics.median(floors["postgres"]), statistics.median(floors["sqlite"])
    pg_step, sq_step = statistics.median(steps["postgres"]), statistics.median(steps["sqlite"])
    rate = {key: statistics.median(d.rate for d in values) for key, values in drains.items()}
    pg_speedup = rate[("postgres", 2)] / rate[("postgres", 1)]
    sq_speedup = rate[("sqlite", 2)] / rate[("sqlite", 1)]
    server = cluster.execute("SHOW server_version")[0][0].split()[0]

    def row(label: str, postgres: str, sqlite: str = "", note: str = "") -> None:
        print(f"  {label:56}{postgres:>16}{sqlite:>16}{note}")

    print(
        f"durably-web PostgreSQL benchmark  (Python {sys.version.split()[0]}, PostgreSQL {server} "
        f"over TCP, fsync={'on' if cluster.fsync else 'off'}; SQLite {sqlite3.sqlite_version}; "
        f"{os.cpu_count()} cores; median of {args.repeat})"
    )
    row("", "PostgreSQL", "SQLite")

    def spread(samples: list[float]) -> str:
        return f"{min(samples):.0f}-{max(samples):.0f}" if len(samples) > 1 else ""

    def ranges(postgres: list[float], sqlite: list[float] | None = None) -> str:
        if len(postgres) < 2:
            return ""
        return f"   range {spread(postgres)}" + (f" and {spread(sqlite)}" if sqlite else "")

    row(
        "floor: one committed INSERT of a step-shaped row",
        f"{pg_floor:.1f} us",
        f"{sq_floor:.1f} us",
        ranges(floors["postgres"], floors["sqlite"]),
    )
    row(
        "  the same over psycopg async (what the store uses)",
        f"{statistics.median(floors['postgres-async']):.1f} us",
        "",
        ranges(floors["postgres-async"]),
    )
    row(
        f"per-step overhead, {args.steps} no-op async steps",
        f"{pg_step:.1f} us",
        f"{sq_step:.1f} us",
        ranges(steps["postgres"], steps["sqlite"]),
    )
    row(
        "  ratio to the floor",
        f"{pg_step / pg_floor:.2f}x",
        f"{sq_step / sq_floor:.2f}x",
        f"   PostgreSQL target within 2x: {_verdict(pg_step / pg_floor <= 2)}",
    )
    print(f"  {args.runs} single-step runs, batch-triggered, drained by")
    for processes in PROCESS_COUNTS:
        row(
            f"    {processes} worker process{'es' if processes > 1 else ''}",
            f"{rate[('postgres', processes)]:.0f} runs/s",
            f"{rate[('sqlite', processes)]:.0f} runs/s",
        )
    row(
        "  speedup from 1 to 2 processes",
        f"{pg_speedup:.2f}x",
        f"{sq_speedup:.2f}x",
        f"   PostgreSQL target at least 1.6x: {_verdict(pg_speedup >= 1.6)}",
    )
    row("    1 worker process, statistics never gathered", f"{rate[('postgres', 'cold')]:.0f} runs/s")
    print()
    print("  the median drains: CPU per run, cores busy while draining, runs each process executed")
    print(f"  {'':30}{'workers':>10}{'server':>10}{'ours':>8}{'others':>8}   per process")
    for backend, name in (("postgres", "PostgreSQL"), ("sqlite", "SQLite")):
        for processes in (*PROCESS_COUNTS, "cold"):
            if (backend, processes) not in drains:
                continue
            d = _median(drains[(backend, processes)])
            label = f"{name}, {processes}" if processes != "cold" else f"{name}, 1, no statistics"
            server_ms = f"{d.server_cpu_ms:.2f} ms" if backend == "postgres" else "-"
            per_process = " ".join(str(n) for n in d.executed)
            cpu = f"{d.worker_cpu_ms:7.2f} ms{server_ms:>10}"
            print(f"  {label:30}{cpu}{d.cores:8.2f}{d.others:8.2f}   {per_process}")
    for backend, settings in SETTINGS.items():
        shown = ", ".join(f"{key}={value}" for key, value in settings.items())
        print(f"  {backend} worker settings: {shown}")
    busiest = max(_median(values).others for values in drains.values())
    if busiest > 0.2:
        print(
            f"  NOTE: other processes kept up to {busiest:.2f} cores busy during the drains: "
            "their runs/s are low, and worse with more processes"
        )
    if max(in_process) > 0.2:
        print(
            f"  NOTE: other processes kept up to {max(in_process):.2f} cores busy during the floors and "
            f"per-step runs (median {statistics.median(in_process):.2f}): those figures are high"
        )
    if profile:
        print(f"  cProfile stats of the last repeat's workers and per-step run: {profile}")
        print("  NOTE: the last repeat ran under cProfile, which slows it down")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=2000, help="no-op steps of the per-step run (and floor inserts)"
    )
    parser.add_argument("--runs", type=int, default=2000, help="single-step runs per throughput measurement")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke run of about a minute")
    parser.add_argument("--profile", metavar="DIR", help="write cProfile stats (pstats files) into DIR")
    parser.add_argument("--worker", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--worker-settings", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        asyncio.run(worker_main(args.worker, json.loads(args.worker_settings), args.profile))
        return
    if args.quick:
        args.steps, args.runs, args.repeat = min(args.steps, 500), min(args.runs, 500), 1
    profile = Path(args.profile).resolve() if args.profile else None
    if profile:
        profile.mkdir(parents=True, exist_ok=True)
    cluster = PostgresCluster()
    try:
        with _ctrl_c_deferred():
            cluster.start()
        asyncio.run(bench(args, cluster, profile))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        with _ctrl_c_deferred():
            cluster.stop()


if __name__ == "__main__":
    main()
