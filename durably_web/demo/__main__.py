"""Crash-and-resume demo: ``python -m durably_web.demo``.

Start it, kill it in the middle (Ctrl-C, or ``kill -9`` from another terminal),
start it again: the run resumes after the last completed step, and the steps
that already ran are replayed from the database instead of executed again.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from durably_web import Durably, Event

from .jobs import JOBS, ReportRequest, weather_report

LEASE_SECONDS = 3.0


def _bar(current: int, total: int, width: int = 30) -> str:
    filled = int(width * current / max(total, 1))
    return "[" + "#" * filled + "." * (width - filled) + f"] {current}/{total}"


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m durably_web.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--db", default="durably-demo.db", help="SQLite file (default: %(default)s)")
    parser.add_argument("--city", default="Oslo")
    parser.add_argument("--days", type=int, default=8)
    parser.add_argument("--delay", type=float, default=0.8, help="seconds per simulated fetch")
    parser.add_argument("--fresh", action="store_true", help="start a new run even if one is unfinished")
    args = parser.parse_args(argv)

    db_url = "sqlite:////" + os.path.abspath(args.db).lstrip("/")  # noqa: ASYNC240 - no disk access
    async with Durably(
        db_url, jobs=JOBS, lease_duration=LEASE_SECONDS, lease_renew_interval=1.0, polling_interval=0.25
    ) as durably:
        unfinished = await durably.get_runs(status=["pending", "leased"], job_name=weather_report.name)
        if unfinished and not args.fresh:
            run = unfinished[-1]
            done_so_far = ""
            if run.progress is not None and run.progress.total:
                done_so_far = f" at {run.progress.current}/{run.progress.total} ({run.progress.message})"
            print(f"Resuming unfinished run {run.id}{done_so_far}, attempt {run.attempt + 1}.")
            if run.status == "leased":
                # A graceful stop hands the run back as pending; a lease still held means the
                # worker was killed (kill -9, a crash) or is still running somewhere else.
                print(
                    "  Another worker still holds its lease: it was killed without handing the run "
                    "back, or it is still running. The run is taken over when that lease expires "
                    f"(within {LEASE_SECONDS:.0f}s)."
                )
            elif run.attempt > 0:
                print("  Its previous worker stopped cleanly and handed it back; it resumes now.")
        else:
            run = await durably.trigger(
                weather_report, ReportRequest(city=args.city, days=args.days, step_delay=args.delay)
            )
            print(f"Started run {run.id}: a {args.days}-day weather report for {args.city}.")
        print(
            f"Process {os.getpid()}. Kill it mid-way (Ctrl-C or kill -9 {os.getpid()}), then run me again.\n"
        )

        def show(event: Event) -> None:
            data = event.data
            if event.type == "run:leased" and data["replayed_steps"]:
                print(
                    f"  (replaying {data['replayed_steps']} completed step(s) "
                    "from the database: not run again)"
                )
            elif event.type == "step:start":
                print(f"  running  {data['step_name']} ...", flush=True)
            elif event.type == "run:progress":
                progress = data["progress"]
                print(f"  {_bar(progress.current, progress.total or progress.current)}  {progress.message}")

        durably.on("*", lambda e: show(e) if e.run_id == run.id else None)
        try:
            done = await durably.wait_for_run(run.id)
        except asyncio.CancelledError:  # Ctrl-C: asyncio.run cancels us, then raises KeyboardInterrupt
            await durably.stop()  # the step in flight finishes; the run is handed back
            await _report_stop(db_url, run.id)
            raise
        print(f"\nRun {done.id} {done.status}.")
        if done.status == "completed":
            print(f"Output: {done.output.model_dump_json(indent=2)}")
        elif done.error is not None:
            print(f"Error: {done.error}")
        steps = await durably.get_steps(done.id)
        print(f"{len(steps)} steps recorded over {done.attempt} attempt(s); completed steps never ran twice.")
        return 0 if done.status == "completed" else 1


_stop_reported = False


async def _report_stop(db_url: str, run_id: str) -> None:
    """Say what the stop left behind, read back from the database."""
    global _stop_reported
    async with Durably(db_url, jobs=JOBS, worker=False) as client:
        run = await client.get_run(run_id)
    _stop_reported = True
    if run.status == "pending":
        print(
            f"\nStopped cleanly: run {run.id} was handed back and is pending again "
            "(the step in progress was finished first). Run the same command again to resume it."
        )
    elif run.status == "leased":
        print(
            f"\nStopped, but run {run.id} is still leased (its handler did not stop in time); "
            f"run the same command again to resume it once the lease expires (within {LEASE_SECONDS:.0f}s)."
        )
    else:
        print(f"\nStopped. Run {run.id} is {run.status}.")


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except KeyboardInterrupt:
        if not _stop_reported:
            print("\nStopped. Run the same command again to resume.")
        sys.exit(130)
