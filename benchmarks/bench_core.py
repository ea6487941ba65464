"""Core engine benchmark (CPython, SQLite file): ``python benchmarks/bench_core.py``.

Prints, in one run:
  floor      one committed INSERT per iteration with raw sqlite3, same settings
             as the store (WAL, synchronous=NORMAL, autocommit), same file system;
  per-step   overhead of a job with N no-op async steps (and sync steps, which
             hop to a thread), i.e. wall time of the run divided by N;
  runs/s     N single-step runs, triggered one by one, until all are complete;
  per-run    N single-step runs one after another with trigger_and_wait (async and
             sync step): wall time per run, and its ratio to the floor (on an idle
             worker a run is three commits: created leased, step, outcome); and the
             store's calls of such a run alone, without the engine (what the schema
             and SQLite take of it);
  batch      --batch single-step runs created by one batch_trigger, then drained by
             one worker: runs/s, and the time per run as a ratio to the floor;
  claim      Store.claim_run alone, µs per claim, N pending runs claimed one by one: plain
             (no limits), and with a max_concurrent and a rate_limit on the job (flow control:
             its counts are taken in the claim's transaction) -- also alone with --only-claim;
  get_runs   one page (100 runs) of the run list filtered by a common label, a rare
             label and a rare status, at --list-small and --list-large runs, and the
             ratio large / small (an index walk stays near 1; a scan grows with the table);
and the ratio per-step / floor. Each figure is the median of --repeat runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from durably_web import Durably, StepContext, define_job


async def noop() -> None:
    return None


def noop_sync() -> None:
    return None


def make_jobs(steps: int):
    @define_job("many-steps")
    async def many_steps(step: StepContext, payload: dict) -> None:
        for i in range(steps):
            await step.run(f"s{i}", noop)

    @define_job("many-sync-steps")
    async def many_sync_steps(step: StepContext, payload: dict) -> None:
        for i in range(steps):
            await step.run(f"s{i}", noop_sync)

    @define_job("one-step")
    async def one_step(step: StepContext, payload: dict) -> None:
        await step.run("only", noop)

    @define_job("one-sync-step")
    async def one_sync_step(step: StepContext, payload: dict) -> None:
        await step.run("only", noop_sync)

    return many_steps, many_sync_steps, one_step, one_sync_step


def floor_us(folder: Path, n: int, tag: str = "") -> float:
    conn = sqlite3.connect(folder / f"floor{tag}.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(
        "CREATE TABLE steps (run_id TEXT, seq INTEGER, name TEXT, output TEXT, "
        "started_at INTEGER, completed_at INTEGER, PRIMARY KEY (run_id, seq))"
    )
    start = time.perf_counter()
    for i in range(n):
        conn.execute("INSERT INTO steps VALUES (?, ?, ?, ?, ?, ?)", ("run", i, f"s{i}", "null", i, i))
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed / n * 1e6


async def per_step_us(folder: Path, job, n: int, tag: str) -> float:
    async with Durably(f"sqlite:////{(folder / f'{tag}.db').as_posix().lstrip('/')}", jobs=[job]) as durably:
        run = await durably.trigger(job, {})
        started: list[float] = []
        durably.on("run:leased", lambda e: started.append(time.perf_counter()))
        done = await durably.wait_for_run(run.id, timeout=600)
        finished = time.perf_counter()
        assert done.status == "completed", done.error
        return (finished - started[0]) / n * 1e6


async def runs_per_second(folder: Path, job, n: int) -> float:
    async with Durably(
        f"sqlite:////{(folder / 'runs.db').as_posix().lstrip('/')}", jobs=[job], max_concurrent_runs=8
    ) as durably:
        remaining = n
        all_done = asyncio.Event()

        def on_complete(_event: object) -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0:
                all_done.set()

        durably.on("run:complete", on_complete)
        start = time.perf_counter()
        for _ in range(n):
            await durably.trigger(job, {})
        await asyncio.wait_for(all_done.wait(), 600)
        return n / (time.perf_counter() - start)


async def per_run_us(folder: Path, job, n: int, tag: str) -> float:
    """Wall time per run of ``n`` single-step runs, each trigger_and_wait'ed before the next."""
    async with Durably(f"sqlite:///{folder / f'{tag}.db'}", jobs=[job]) as durably:
        await durably.trigger_and_wait(job, {}, timeout=60)  # warm: migrations, first claim
        start = time.perf_counter()
        for _ in range(n):
            run = await durably.trigger_and_wait(job, {}, timeout=60)
            assert run.status == "completed", run.error
        return (time.perf_counter() - start) / n * 1e6


async def batch_drain_per_second(folder: Path, job, n: int) -> float:
    """``n`` runs created by one batch_trigger before the worker starts, drained by one worker."""
    url = f"sqlite:///{folder / 'batch.db'}"
    async with Durably(url, jobs=[job], worker=False) as client:
        for first in range(0, n, 1000):  # one transaction per 1000 runs
            await client.batch_trigger(job, [{} for _ in range(min(1000, n - first))])
    durably = Durably(url, jobs=[job], max_concurrent_runs=8)
    remaining = n
    all_done = asyncio.Event()

    def on_complete(_event: object) -> None:
        nonlocal remaining
        remaining -= 1
        if remaining == 0:
            all_done.set()

    durably.on("run:complete", on_complete)
    start = time.perf_counter()
    async with durably:  # the worker starts here
        await asyncio.wait_for(all_done.wait(), 1200)
        return n / (time.perf_counter() - start)


def fill_runs(path: Path, count: int) -> None:
    """``count`` finished runs written straight into a migrated database (triggering a
    million through the API would take minutes and measure triggers, not the list):
    four orgs as a label, five runs with a rare label, three still leased."""
    conn = sqlite3.connect(path)
    with conn:
        conn.executemany(
            "INSERT INTO durably_runs (id, job_name, status, input, labels, available_at, created_at,"
            " updated_at)"
            " VALUES (?, 'report', ?, '{}', ?, 0, 0, 0)",
            (
                (f"bench{i:010d}", "leased" if i < 3 else "completed", json.dumps(labels_of(i)))
                for i in range(count)
            ),
        )
        conn.executemany(
            "INSERT INTO durably_run_labels (run_id, key, value) VALUES (?, ?, ?)",
            ((f"bench{i:010d}", k, v) for i in range(count) for k, v in labels_of(i).items()),
        )
    conn.close()


def labels_of(i: int) -> dict[str, str]:
    labels = {"org": ("acme", "globex", "initech", "umbrella")[i % 4]}
    if i < 5:
        labels["batch"] = "first"
    return labels


LIST_QUERIES = {
    "a common label (1 in 4 runs)": {"labels": {"org": "globex"}},
    "a rare label (5 runs)": {"labels": {"batch": "first"}},
    "a rare status (3 leased runs)": {"status": "leased"},
}


async def list_ms(folder: Path, count: int, repeat: int) -> dict[str, float]:
    path = folder / f"list{count}.db"
    async with Durably(f"sqlite:///{path}", worker=False):
        pass  # migrated
    fill_runs(path, count)
    async with Durably(f"sqlite:///{path}", worker=False) as durably:
        times = {}
        for name, query in LIST_QUERIES.items():
            samples = []
            for _ in range(max(5, repeat * 5)):
                start = time.perf_counter()
                await durably.get_runs(limit=100, **query)
                samples.append((time.perf_counter() - start) * 1000)
            times[name] = statistics.median(samples)
        return times


async def store_run_us(folder: Path, n: int, tag: str) -> float:
    """µs per single-step run of the store's calls alone, as trigger_and_wait on an idle worker
    makes them (the run created leased, its step, its outcome, the final read), with no
    engine around them: the part of a run's time the schema and SQLite take."""
    from durably_web.storage import NewRun, StepRecord, open_store

    store = open_store(f"sqlite:///{folder / f'store-run-{tag}.db'}")
    await store.migrate()
    try:
        start = time.perf_counter()
        for i in range(n):
            run_id, now = f"r{i:08d}", 1000 + i
            new = NewRun(run_id, "one-step", "{}", {}, None, None, False, now, version="v1")
            record = await store.create_leased_run(new, worker_id="bench", lease_until=now + 60_000)
            step = StepRecord(run_id, 0, "only", "completed", "null", None, now, now)
            assert await store.record_step(step, record.lease_generation)
            assert await store.finish_run(
                run_id,
                record.lease_generation,
                status="completed",
                output_json="null",
                error_json=None,
                failed_step=None,
                drop_step_outputs=False,
                now=now,
            )
            assert await store.get_run(run_id) is not None
        return (time.perf_counter() - start) / n * 1e6
    finally:
        await store.close()


async def claim_us(folder: Path, n: int, tag: str, *, limited: bool) -> float:
    """µs per ``claim_run`` of ``n`` pending runs, claimed one by one (the engine's hot path
    for every run start), without or with flow limits on the job."""
    from durably_web.storage import NewRun, open_store

    store = open_store(f"sqlite:///{folder / f'claim-{tag}.db'}")
    await store.migrate()
    try:
        await store.create_runs(
            [NewRun(f"r{i:08d}", "one-step", "null", {}, None, None, False, 1000 + i) for i in range(n)]
        )
        options = {}
        if limited:
            from durably_web.storage.base import JobLimits

            options["limits"] = {"one-step": JobLimits(max_concurrent=n, rate_count=n, rate_window_ms=60_000)}
        start = time.perf_counter()
        for i in range(n):
            now = 10_000 + i
            record = await store.claim_run(
                worker_id="bench", job_names=["one-step"], now=now, lease_until=now + 60_000, **options
            )
            assert record is not None
        return (time.perf_counter() - start) / n * 1e6
    finally:
        await store.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--list-small", type=int, default=10_000)
    parser.add_argument("--list-large", type=int, default=1_000_000)
    parser.add_argument("--per-run", type=int, default=500, help="trigger_and_wait runs (default 500)")
    parser.add_argument("--batch", type=int, default=20_000, help="batch-triggered runs (default 20,000)")
    parser.add_argument("--claims", type=int, default=2000)
    parser.add_argument("--only-claim", action="store_true", help="print the claim figures only")
    args = parser.parse_args()
    plain, limited = [], []
    for attempt in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="durably-bench-") as tmp:
            plain.append(await claim_us(Path(tmp), args.claims, f"plain{attempt}", limited=False))
            limited.append(await claim_us(Path(tmp), args.claims, f"limited{attempt}", limited=True))
    claim_lines = [
        f"  claim_run, {args.claims} pending runs one by one, no limits        "
        f"{statistics.median(plain):8.1f} us",
        f"  claim_run, the same with max_concurrent + rate_limit        {statistics.median(limited):8.1f} us",
    ]
    if args.only_claim:
        print(f"durably-web claim benchmark (SQLite {sqlite3.sqlite_version}, median of {args.repeat})")
        print("\n".join(claim_lines))
        return
    many_steps, many_sync_steps, one_step, one_sync_step = make_jobs(args.steps)

    floors, steps_async, steps_sync, rates = [], [], [], []
    runs_async, runs_sync, batch_rates, store_runs = [], [], [], []
    for attempt in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="durably-bench-") as tmp:
            folder = Path(tmp)
            # The floor is sampled before each figure: on a machine whose load changes, one
            # early sample would skew every ratio.
            floors.append(floor_us(folder, args.steps, f"{attempt}-0"))
            steps_async.append(await per_step_us(folder, many_steps, args.steps, f"async{attempt}"))
            floors.append(floor_us(folder, args.steps, f"{attempt}-1"))
            steps_sync.append(await per_step_us(folder, many_sync_steps, args.steps, f"sync{attempt}"))
            floors.append(floor_us(folder, args.steps, f"{attempt}-2"))
            rates.append(await runs_per_second(folder, one_step, args.runs))
            floors.append(floor_us(folder, args.steps, f"{attempt}-3"))
            runs_async.append(await per_run_us(folder, one_step, args.per_run, f"run-async{attempt}"))
            floors.append(floor_us(folder, args.steps, f"{attempt}-4"))
            runs_sync.append(await per_run_us(folder, one_sync_step, args.per_run, f"run-sync{attempt}"))
            floors.append(floor_us(folder, args.steps, f"{attempt}-5"))
            store_runs.append(await store_run_us(folder, args.per_run, f"{attempt}"))
            floors.append(floor_us(folder, args.steps, f"{attempt}-6"))
            if attempt == 0:  # minutes at the default size: once is enough
                batch_rates.append(await batch_drain_per_second(folder, one_step, args.batch))

    floor = statistics.median(floors)
    step_async = statistics.median(steps_async)
    step_sync = statistics.median(steps_sync)
    print(
        f"durably-web core benchmark  (Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, "
        f"median of {args.repeat})"
    )
    print(
        f"  floor: raw sqlite3 committed INSERT (WAL, synchronous=NORMAL)   {floor:8.1f} us"
        f"   (median of {len(floors)}, {min(floors):.1f}-{max(floors):.1f})"
    )
    print(
        f"  per-step overhead, {args.steps} no-op async steps                 {step_async:8.1f} us"
        f"   ratio {step_async / floor:4.2f}x floor"
    )
    print(
        f"  per-step overhead, {args.steps} no-op sync steps (thread hop)     {step_sync:8.1f} us"
        f"   ratio {step_sync / floor:4.2f}x floor"
    )
    print(
        f"  single-step runs, {args.runs} triggered one by one              "
        f"{statistics.median(rates):8.0f} runs/s"
    )
    for what, samples in (("async", runs_async), ("sync", runs_sync)):
        per_run = statistics.median(samples)
        print(
            f"  per 1-step run, trigger_and_wait one after another, {what + ' step':<10} {per_run:8.1f} us"
            f"   ratio {per_run / floor:4.2f}x floor"
        )
    store_run = statistics.median(store_runs)
    print(
        f"  per 1-step run, the store's calls alone (no engine)             {store_run:8.1f} us"
        f"   ratio {store_run / floor:4.2f}x floor"
    )
    batch_rate = statistics.median(batch_rates)
    print(
        f"  {args.batch:,} batch-triggered 1-step runs drained by one worker {batch_rate:8.0f} runs/s"
        f"   {1e6 / batch_rate:6.1f} us/run, ratio {1e6 / batch_rate / floor:4.2f}x floor"
    )
    print("\n".join(claim_lines))
    with tempfile.TemporaryDirectory(prefix="durably-bench-") as tmp:
        small = await list_ms(Path(tmp), args.list_small, args.repeat)
        large = await list_ms(Path(tmp), args.list_large, args.repeat)
    for name in LIST_QUERIES:
        print(
            f"  get_runs, {name:<30} {args.list_small:>9,} runs {small[name]:7.2f} ms"
            f"  {args.list_large:>9,} runs {large[name]:7.2f} ms   ratio {large[name] / small[name]:4.2f}x"
        )


if __name__ == "__main__":
    asyncio.run(main())
