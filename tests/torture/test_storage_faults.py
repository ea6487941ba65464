"""Storage faults: a read-only database, a full disk, a database locked by another process.

Each gives a clear ``StorageError``; a run is never marked completed unless its
data was written; once the fault clears the worker recovers and the run
completes, re-executing at most the step whose commit failed.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until

from durably_web import Durably, StepContext, StorageError, define_job

HERE = Path(__file__).resolve().parent


def dump(db_path: Path) -> list[str]:
    conn = sqlite3.connect(db_path)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


@contextmanager
def read_only(*paths: Path) -> Iterator[None]:
    """Make files and directories unwritable for this process: chmod for a normal user;
    root ignores permissions, so there the immutable attribute (chattr +i) is used."""
    root = os.geteuid() == 0
    modes = {p: p.stat().st_mode for p in paths}
    done: list[Path] = []
    try:
        for p in paths:
            if root:
                subprocess.run(["chattr", "+i", str(p)], check=True)
            else:
                p.chmod(0o555 if p.is_dir() else 0o444)
            done.append(p)
        for p in paths:
            if p.is_file():
                with pytest.raises(PermissionError):
                    open(p, "r+b").close()
        yield
    finally:
        for p in reversed(done):
            if root:
                subprocess.run(["chattr", "-i", str(p)], check=True)
            else:
                p.chmod(modes[p])


executed: list[str] = []


def work(name: str) -> str:
    executed.append(name)
    return name


@define_job("three")
async def three(step: StepContext, payload: Any) -> list[str]:
    return [await step.run(f"s{i}", work, f"s{i}") for i in range(3)]


async def test_read_only_database_gives_storage_error_and_recovers_when_writable(tmp_path: Path) -> None:
    db_dir = tmp_path / "ro"
    db_dir.mkdir()
    db = db_dir / "app.db"
    url = f"sqlite:///{db}"
    client = Durably(url, jobs=[three], worker=False)
    await client.init()
    pending = await client.trigger(three, None)
    await client.stop()  # the last connection closes: -wal and -shm are removed
    before = dump(db)
    executed.clear()

    # Directory and file read-only: the database cannot even be opened for use.
    with read_only(db, db_dir):
        with pytest.raises(StorageError, match="open"):
            await Durably(url, jobs=[three]).init()
    assert dump(db) == before

    # Only the file read-only: it opens, but nothing can be written.
    with read_only(db):
        durably = Durably(
            url, jobs=[three], polling_interval=0.02, lease_duration=1.0, lease_renew_interval=0.1
        )
        await durably.init()
        try:
            with pytest.raises(StorageError, match="readonly"):
                await durably.trigger(three, None)
            await asyncio.sleep(0.3)  # the worker tries to claim the pending run and fails
            assert (await durably.get_run(pending.id)).status == "pending"
            assert executed == []
        finally:
            await durably.stop()
    assert dump(db) == before

    # Writable again: the pending run is resumed and completes.
    durably = Durably(url, jobs=[three], polling_interval=0.02, lease_duration=1.0, lease_renew_interval=0.1)
    await durably.init()
    try:
        done = await durably.wait_for_run(pending.id, timeout=20)
    finally:
        await durably.stop()
    assert (done.status, done.output) == ("completed", ["s0", "s1", "s2"])
    assert executed == ["s0", "s1", "s2"]


@pytest.mark.parametrize("where", ["step", "finish"])
def test_disk_full_is_a_storage_error_and_the_worker_recovers(tmp_path: Path, where: str) -> None:
    """RLIMIT_FSIZE in a worker process: every write past the first byte fails with EFBIG."""
    db = tmp_path / "full.db"
    result = subprocess.run(
        [sys.executable, str(HERE / "fault_worker.py"), f"sqlite:///{db}", where],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    steps = [f"s{i}" for i in range(5)]

    assert report["trigger_during_fault"].startswith("StorageError")
    assert report["status_during_fault"] == "leased"  # never completed while nothing could be written
    assert "StorageError" in report["worker_errors"]
    assert report["final_status"] == "completed"
    assert report["output"] == steps
    if where == "step":
        # s2's commit failed: it is the only step that ran twice; everything committed ran once.
        assert report["steps_during_fault"] == ["s0", "s1"]
        assert report["executed"] == ["s0", "s1", "s2", "s2", "s3", "s4"]
    else:
        # Every step was committed; only the run's completion could not be written.
        assert report["steps_during_fault"] == steps
        assert report["executed"] == [*steps, "finished"]
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT name FROM durably_steps ORDER BY seq").fetchall() == [(s,) for s in steps]
        assert conn.execute("SELECT status FROM durably_runs").fetchall() == [("completed",)]
    finally:
        conn.close()


LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
"""


async def test_database_locked_by_another_process_gives_storage_error_then_recovers(tmp_path: Path) -> None:
    db = tmp_path / "locked.db"
    gate = asyncio.Event()
    ran: list[str] = []
    worker_errors: list[str] = []

    async def slow(name: str) -> str:
        ran.append(name)
        if name == "s1":
            await gate.wait()  # the lock is taken while s1 runs
        return name

    @define_job("locked")
    async def job(step: StepContext, payload: Any) -> list[str]:
        return [await step.run(f"s{i}", slow, f"s{i}") for i in range(4)]

    durably = Durably(
        f"sqlite:///{db}?busy_timeout=200",
        jobs=[job],
        polling_interval=0.02,
        lease_duration=1.0,
        lease_renew_interval=0.1,
    )
    await durably.init()
    durably.on("worker:error", lambda event: worker_errors.append(event.data["error"].type))
    locker = None
    try:
        run = await durably.trigger(job, None)
        await wait_until(lambda: "s1" in ran)
        locker = subprocess.Popen(  # noqa: ASYNC220 - a real second process holding the lock
            [sys.executable, "-c", LOCKER, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert locker.stdout is not None and locker.stdin is not None
        assert await asyncio.to_thread(locker.stdout.readline) == "locked\n"

        with pytest.raises(StorageError, match="locked"):
            await durably.trigger(job, None)
        gate.set()  # s1 returns; its commit waits 200 ms for the lock and fails
        for _ in range(300):
            if "StorageError" in worker_errors:
                break
            await asyncio.sleep(0.01)
        assert "StorageError" in worker_errors
        await asyncio.sleep(1.2)  # longer than the lease: renewals fail too
        during = await durably.get_run(run.id)
        assert during.status == "leased"
        assert [s.name for s in await durably.get_steps(run.id)] == ["s0"]

        locker.stdin.write("\n")
        locker.stdin.flush()
        assert await asyncio.to_thread(locker.wait, 10) == 0
        done = await durably.wait_for_run(run.id, timeout=20)
    finally:
        if locker is not None:
            if locker.poll() is None:
                locker.kill()
            locker.wait()
            for pipe in (locker.stdin, locker.stdout):  # or they are left to the GC (ResourceWarning)
                if pipe is not None:
                    pipe.close()
        await durably.stop()
    assert (done.status, done.output) == ("completed", ["s0", "s1", "s2", "s3"])
    # s0 was committed before the lock and ran once; s1's commit failed, so it ran again.
    assert ran == ["s0", "s1", "s1", "s2", "s3"]
