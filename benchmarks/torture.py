"""The long crash torture: SIGKILL real worker processes hundreds of times and prove, from
the side effects the steps record themselves, that nothing was lost or run twice (retried
steps, durable sleeps, signal waits and runs started at once included: see tests/torture/harness.py).

    python benchmarks/torture.py [--kills 200] [--two-process-kills 100] [--seed N] [--keep DIR]
                                 [--postgres]

Runs the single-worker torture (a restarted worker resumes at once) and the
two-worker race on one SQLite file, then prints a table. With ``--postgres`` both run
on a throwaway PostgreSQL cluster instead (tests/support/postgres.py: the server
binaries of ``apt-get install postgresql``), one empty database each; the checker's
rules are the same. Exits non-zero when any invariant was violated, or when no run
started at once (the workers' own ``trigger_and_wait`` calls: then the torture tested
nothing of them). The seed (``--seed``, else ``$DURABLY_TORTURE_SEED``,
else a random one) is printed with the table and every violation; the
single-worker torture uses it and the two-worker one ``seed + 1``, so
``--seed N`` replays both. The harness lives in tests/torture/harness.py; the
short version runs in the normal test suite.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "torture"))

from harness import TortureResult, choose_seed, run_torture  # noqa: E402
from torture_jobs import LIMITED_MAX  # noqa: E402


def table(rows: list[tuple[str, TortureResult]]) -> str:
    headers = [
        "mode",
        "seed",
        "kills",
        "runs",
        "steps",
        "executions",
        "dup (in-flight)",
        "interrupted",
        "> lease",
        "lapses",
        "LeaseLost",
        "completed",
        "failed",
        "cancelled",
        "retried",
        "slept",
        "signals",
        "sig dup",
        "consumed",
        "offline waits",
        "offline fails",
        "child runs",
        "timed out",
        "limited",
        "peak",
        "at once",
        "queued",
        "resumed",
        "violations",
        "wall",
    ]
    body = [
        [
            mode,
            str(r.seed),
            str(r.kills),
            str(r.runs),
            str(r.steps),
            str(r.executions),
            str(r.duplicates),
            str(r.interrupted),
            str(r.outlasted_lease),
            str(r.lease_lapses),
            str(r.lease_lost_errors),
            str(r.completed),
            str(r.failed),
            str(r.cancelled),
            str(r.retried),
            str(r.slept),
            str(r.signals_sent),
            str(r.signals_duplicate),
            str(r.signals_consumed),
            str(r.offline_waits),
            str(r.offline_failures),
            str(r.child_runs),
            str(r.timed_out),
            str(r.limited_runs),
            f"{r.limited_peak}/{LIMITED_MAX}",
            str(r.started_at_once),
            str(r.at_once_queued),
            str(r.at_once_resumed),
            str(len(r.violations)),
            f"{r.wall_time:.1f} s",
        ]
        for mode, r in rows
    ]
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(headers)]
    lines = [
        "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in body]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=200, help="SIGKILLs of the single worker (default 200)")
    parser.add_argument(
        "--two-process-kills", type=int, default=100, help="SIGKILLs in the two-worker race (default 100)"
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="random seed (default: $DURABLY_TORTURE_SEED, else random)"
    )
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="keep the SQLite databases and the logs in this directory (a PostgreSQL cluster is removed)",
    )
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="run the workers on a throwaway PostgreSQL cluster instead of SQLite files",
    )
    args = parser.parse_args()
    seed = choose_seed(args.seed)
    print(f"seed {seed}", file=sys.stderr, flush=True)

    cluster = None
    if args.postgres:
        sys.path.insert(0, str(ROOT / "tests"))
        from support.postgres import PostgresCluster, PostgresUnavailable

        try:
            cluster = PostgresCluster().start()
        except PostgresUnavailable as exc:
            print(f"--postgres: {exc}", file=sys.stderr)
            return 2
        print(f"PostgreSQL cluster {cluster.url()} ({cluster.bin_dir})", file=sys.stderr, flush=True)
    if cluster is not None:
        modes = ("1 worker, PostgreSQL", "2 workers, 1 database")
    else:
        modes = ("1 worker", "2 workers, 1 file")
    rows: list[tuple[str, TortureResult]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="durably-torture-") as tmp:
            base = args.keep or Path(tmp)
            plan = [(modes[0], 1, args.kills), (modes[1], 2, args.two_process_kills)]
            for n, (mode, processes, kills) in enumerate(plan):
                if kills <= 0:
                    continue
                print(f"{mode}: {kills} kills, seed {seed + n} ...", file=sys.stderr, flush=True)
                db_url = cluster.create_database(f"torture_p{processes}") if cluster else None
                result = run_torture(
                    base / f"p{processes}", kills=kills, processes=processes, seed=seed + n, db_url=db_url
                )
                print(f"  {result.summary()}", file=sys.stderr, flush=True)
                rows.append((mode, result))
    finally:
        if cluster is not None:
            cluster.stop()

    print(table(rows))
    print()
    print("dup (in-flight): re-executions of a step whose process was SIGKILLed inside it, before its")
    print("  commit; each is checked to be that process's last step of the run, older than the commit.")
    print("interrupted: kills that hit a step in flight. > lease: run executions that lived longer than")
    print("  one lease (renewal kept them). lapses / LeaseLost: executions lost to a lease lapse of a live")
    print("  worker / LeaseLostErrors workers reported (both 0 on a healthy run; any overlap they cause is")
    print("  a violation).")
    print("retried: failed step attempts recorded and retried after their backoff. slept: sleep")
    print("  checkpoints. signals / sig dup / consumed: send_signal calls, those reported duplicate (a")
    print("  signal_id sent again), signal waits that consumed theirs. timed out: runs failed with")
    print("  RunTimeoutError at their deadline on purpose (the mix's run whose timeout is shorter")
    print("  than its sleep).")
    print(f"limited / peak: runs of a job with max_concurrent={LIMITED_MAX} (triggered in bursts, some with")
    print("  a priority) / the most of them with a side effect live at once, across the workers.")
    print("at once / queued / resumed: the workers' own trigger_and_wait calls (made when idle) whose run")
    print("  the engine created leased and started at once / created pending (the worker was busy again);")
    print("  runs started at once whose first lease ended with a kill, resumed by a later attempt.")
    failed = False
    for mode, result in rows:
        for violation in result.violations:
            print(f"VIOLATION [{mode}, seed {result.seed}]: {violation}")
            failed = True
        if result.started_at_once == 0:
            # Like a limit never reached: the torture tested nothing of runs started at once.
            print(f"NOT TESTED [{mode}, seed {result.seed}]: no run started at once")
            failed = True
    print(f"seed: {seed}")
    print("violations: " + ("FOUND" if any(r.violations for _, r in rows) else "0"))
    if failed:
        print(
            f"replay: python benchmarks/torture.py --kills {args.kills} "
            f"--two-process-kills {args.two_process_kills} --seed {seed}" + (" --postgres" if cluster else "")
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
