"""A real crash: SIGKILL a worker process mid-run, resume in a second process, count side effects."""

from __future__ import annotations

import signal
import sqlite3
from collections import Counter
from pathlib import Path

import crash_jobs
import pytest
from helpers import finish_process, read_lines, start_process, wait_for_lines


def completed_steps(db_path: Path) -> list[str]:
    conn = sqlite3.connect(db_path)
    try:
        return [
            row[0]
            for row in conn.execute("SELECT name FROM durably_steps WHERE status = 'completed' ORDER BY seq")
        ]
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("kill_after_lines", "at_once"),
    [(2, False), (4, False), (3, True)],
    ids=["queued-2", "queued-4", "started-at-once-3"],
)
async def test_sigkill_mid_run_then_resume_runs_each_completed_step_exactly_once(
    db_url, db_path, tmp_path, kill_after_lines, at_once
):
    # at_once: the run was created leased by trigger_and_wait on an idle worker (no claim).
    side_effects = tmp_path / "side-effects.txt"
    steps = [f"step-{i}" for i in range(crash_jobs.STEP_COUNT)]
    mode = ["--at-once"] if at_once else []

    first = start_process("steps", db_url, str(side_effects), "--delay", "0.25", "--lease", "1.0", *mode)
    try:
        await wait_for_lines(side_effects, kill_after_lines, first)
        first.send_signal(signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate()

    done_at_kill = completed_steps(db_path)
    lines_at_kill = read_lines(side_effects)
    assert all(pid == first.pid for _, pid in lines_at_kill)
    # Steps are strictly sequential and each is committed before the next one starts.
    assert done_at_kill == steps[: len(done_at_kill)]
    assert len(done_at_kill) >= kill_after_lines - 1
    assert len(done_at_kill) < crash_jobs.STEP_COUNT, "the run finished before the kill; nothing was tested"

    if at_once:
        conn = sqlite3.connect(db_path)
        try:
            # Created leased: started when it was created, by the first process's only lease.
            started, created, generation = conn.execute(
                "SELECT started_at, created_at, lease_generation FROM durably_runs"
            ).fetchone()
        finally:
            conn.close()
        assert (started, generation) == (created, 1)

    second = start_process("steps", db_url, str(side_effects), "--delay", "0.01", "--lease", "1.0", *mode)
    result = finish_process(second)
    assert result["disposition"] == "idempotent"  # the same run, not a new one
    assert result["status"] == "completed"
    assert result["output"] == {"total": crash_jobs.EXPECTED_TOTAL}
    assert result["attempt"] == 2

    lines = read_lines(side_effects)
    counts = Counter(name for name, _ in lines)
    # Every step that had completed before the kill ran exactly once, in the first process.
    for name in done_at_kill:
        assert counts[name] == 1, (name, lines)
    # The resumed process started right after the last completed step and ran the rest once each.
    resumed = [name for name, pid in lines if pid == result["pid"]]
    assert resumed == steps[len(done_at_kill) :]
    # Only the step in flight at the kill may have run twice (once in each process).
    twice = [name for name, count in counts.items() if count > 1]
    assert len(twice) <= 1 and all(count <= 2 for count in counts.values())
    if twice:
        assert twice == [steps[len(done_at_kill)]]
    assert set(counts) == set(steps)
    assert completed_steps(db_path) == steps
