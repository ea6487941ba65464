"""Small helpers shared by the test modules (waiting on conditions, fast options)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Short intervals keep the suite fast; every wait in the tests has a generous timeout instead.
FAST: dict[str, Any] = {
    "polling_interval": 0.02,
    "lease_duration": 2.0,
    "lease_renew_interval": 0.1,
    "shutdown_timeout": 2.0,
}


async def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01) -> Any:
    """Poll ``predicate`` (sync or async) until it returns a truthy value; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        await asyncio.sleep(interval)


async def wait_event(event: asyncio.Event, timeout: float = 10.0) -> None:
    await asyncio.wait_for(event.wait(), timeout)


CRASH_JOBS = Path(__file__).with_name("crash_jobs.py")


def start_process(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``python tests/crash_jobs.py ARGS...`` with this interpreter (``env``: extra variables)."""
    return subprocess.Popen(
        [sys.executable, str(CRASH_JOBS), *args],
        env=None if env is None else {**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_process(process: subprocess.Popen[str], timeout: float = 60) -> dict[str, Any]:
    """Wait for a worker process to exit successfully; return the JSON it printed last."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"worker process did not finish in {timeout}s\n{out}\n{err}") from None
    assert process.returncode == 0, f"worker exited with {process.returncode}\n{out}\n{err}"
    return json.loads(out.strip().splitlines()[-1])


def read_lines(path: Path) -> list[tuple[str, int]]:
    """The side-effect file as (name, pid) pairs; only complete lines."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")[:-1]  # a line being written has no newline yet
    return [(name, int(pid)) for name, pid in (line.rsplit(" ", 1) for line in lines)]


async def wait_for_lines(path: Path, count: int, process: subprocess.Popen[str], timeout: float = 30) -> None:
    def enough() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"worker exited early: {process.communicate()}")
        return len(read_lines(path)) >= count

    await wait_until(enough, timeout=timeout)


class FakeClock:
    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def timed_lines(path: Path) -> list[tuple[str, int, float]]:
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]
    return [(name, int(pid), float(at)) for name, pid, at in (line.split(" ") for line in lines)]


def run_row(db_path: Path) -> tuple[str, str, int] | None:
    conn = sqlite3.connect(db_path, timeout=10)
    try:
        return conn.execute("SELECT id, status, available_at FROM durably_runs").fetchone()
    except sqlite3.OperationalError:  # the schema is not there yet
        return None
    finally:
        conn.close()


async def kill_once_waiting(
    db_url: str, db_path: Path, side_effects: Path, *, kind: str, seconds: int
) -> tuple[subprocess.Popen[str], tuple[str, str, int]]:
    """Start a crash_jobs 'wait' worker (retry / sleep / signal), SIGKILL it once its run is
    'waiting'; return the dead process and the run's (id, status, available_at) row then."""
    first = start_process("wait", db_url, str(side_effects), "--kind", kind, "--seconds", str(seconds))
    try:

        def waiting() -> Any:
            if first.poll() is not None:
                raise AssertionError(f"worker exited early: {first.communicate()}")
            row = run_row(db_path)
            return row if row is not None and row[1] == "waiting" else None

        row = await wait_until(waiting, timeout=30)
        first.send_signal(signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate()
    return first, row


async def kill_once_waiting_versioned(
    db_url: str, db_path: Path, side_effects: Path, *, version: str, seconds: float
) -> tuple[str, str, str, int]:
    """Start a crash_jobs 'versioned' worker at ``version``, SIGKILL it once its run sleeps;
    return the run's (id, status, version, attempt) row then."""
    first = start_process(
        "versioned", db_url, str(side_effects), "--version", version, "--seconds", str(seconds)
    )
    try:

        def waiting() -> Any:
            if first.poll() is not None:
                raise AssertionError(f"worker exited early: {first.communicate()}")
            conn = sqlite3.connect(db_path, timeout=10)
            try:
                row = conn.execute("SELECT id, status, version, attempt FROM durably_runs").fetchone()
            except sqlite3.OperationalError:  # the schema is not there yet
                return None
            finally:
                conn.close()
            return row if row is not None and row[1] == "waiting" else None

        row = await wait_until(waiting, timeout=30)
        first.send_signal(signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate()
    return row
