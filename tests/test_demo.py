"""The terminal demo (``python -m durably_web.demo``) as a new user runs it: Ctrl-C, then again."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT to a subprocess")


def _demo(db: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "durably_web.demo", "--db", str(db), "--days", "6", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _read_until(process: subprocess.Popen[str], text: str, timeout: float = 30) -> list[str]:
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    process.kill()
    out, err = process.communicate()
    raise AssertionError(f"{text!r} not printed:\n{''.join(lines)}{out}\n{err}")


def test_ctrl_c_hands_the_run_back_and_the_next_start_says_so(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    first = _demo(db, "--delay", "0.3")
    try:
        _read_until(first, "running  fetch-day-3")
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 130, (out, err)
    assert "handed back and is pending again" in out, out
    assert "Traceback" not in err, err
    conn = sqlite3.connect(db)
    try:
        status, owner, attempt, current = conn.execute(
            "SELECT status, lease_owner, attempt, progress_current FROM durably_runs"
        ).fetchone()
    finally:
        conn.close()
    # The step in flight (day 3) was finished and its progress stored before the stop.
    assert (status, owner, attempt, current) == ("pending", None, 1, 3)

    second = _demo(db, "--delay", "0")
    out, err = second.communicate(timeout=60)
    assert second.returncode == 0, (out, err)
    assert "at 3/7 (fetched day 3 of 6), attempt 2" in out, out
    assert "stopped cleanly and handed it back" in out, out
    assert "died" not in out and "still holds its lease" not in out, out
    bars = [line.split("]")[1].split()[0] for line in out.splitlines() if line.strip().startswith("[")]
    # Days 1-3 replay without repeating their progress; it only moves forward.
    assert bars == ["4/7", "5/7", "6/7", "7/7"], out
    assert "completed" in out
