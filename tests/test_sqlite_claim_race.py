"""The SQLite claim's two statements: a look without the write lock, then a lease by id.

Another process may lease the run it found, or a run sharing its concurrency key, between
the two. These tests put exactly that between them: a second store on the same file claims
while the first one's look has returned and its lease has not run yet.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from durably_web.storage import NewRun, RunRecord
from durably_web.storage.sqlite import SQLiteStore, StdlibSqlConnection

JOB = "job"
LEASE = 1000


class LookThenInterleave(StdlibSqlConnection):
    """A real connection that runs ``between`` once, right after the first claim look."""

    def __init__(self, path: str, between: Callable[[], Any]) -> None:
        super().__init__(path, busy_timeout_ms=1000)
        self.between: Callable[[], Any] | None = between
        self.looks = 0

    def fetch_one(self, sql: str, params: Any = None) -> Any:
        row = super().fetch_one(sql, params)
        if "find_claimable_run" in sql or "Highest priority first" in sql:
            self.looks += 1
            if self.between is not None:
                between, self.between = self.between, None
                between()
        return row


def new_run(run_id: str, at: int, *, concurrency_key: str | None = None) -> NewRun:
    return NewRun(run_id, JOB, "{}", {}, None, concurrency_key, False, at)


async def open_store(path: Path) -> SQLiteStore:
    store = SQLiteStore(StdlibSqlConnection(str(path), busy_timeout_ms=1000))
    await store.migrate()
    return store


async def claim(store: SQLiteStore, now: int, worker: str) -> RunRecord | None:
    return await store.claim_run(worker_id=worker, job_names=[JOB], now=now, lease_until=now + LEASE)


async def test_a_run_leased_by_another_between_look_and_lease_is_passed_for_the_next(tmp_path: Path) -> None:
    path = tmp_path / "race.db"
    other = await open_store(path)
    await other.create_runs([new_run("r1", 100), new_run("r2", 101)])
    taken: list[RunRecord | None] = []

    def in_thread() -> None:
        # The other store's claim runs to its end here, in the middle of ours (on a loop of
        # its own: ours is busy running this claim).
        thread = threading.Thread(target=lambda: taken.append(asyncio.run(claim(other, 200, "w2"))))
        thread.start()
        thread.join()

    conn = LookThenInterleave(str(path), in_thread)
    store = SQLiteStore(conn)
    try:
        mine = await claim(store, 200, "w1")
        assert [run.id for run in taken if run is not None] == ["r1"]  # the other got the oldest
        assert mine is not None and mine.id == "r2"  # ours looked again and leased the next
        assert mine.lease_owner == "w1" and mine.status == "leased"
        assert conn.looks == 2
        r1 = await store.get_run("r1")
        assert r1 is not None and r1.lease_owner == "w2" and r1.attempt == 1  # leased once, not twice
    finally:
        await store.close()
        await other.close()


async def test_a_concurrency_key_taken_between_look_and_lease_blocks_the_lease(tmp_path: Path) -> None:
    path = tmp_path / "race.db"
    other = await open_store(path)
    # r1 is what our look finds; in between, the other store leases a run with the same key
    # (r0, which it created then, as a process triggering and claiming at that moment would).
    await other.create_runs([new_run("r1", 100, concurrency_key="k")])

    def other_takes_the_key() -> None:
        # A pending run with the key exists (r1), so the other writer leases one directly:
        # what matters is a live lease on "k" that our look did not see.
        with sqlite3.connect(path, isolation_level=None) as raw:
            raw.execute(
                "INSERT INTO durably_runs (id, job_name, status, input, concurrency_key, lease_owner,"
                " lease_generation, lease_expires_at, available_at, created_at, updated_at, attempt)"
                " VALUES ('r0', :job, 'leased', '{}', 'k', 'w2', 1, 10000, 0, 0, 0, 1)",
                {"job": JOB},
            )

    conn = LookThenInterleave(str(path), other_takes_the_key)
    store = SQLiteStore(conn)
    try:
        assert await claim(store, 200, "w1") is None  # r1 waits for the key; nothing leased
        r1 = await store.get_run("r1")
        assert r1 is not None and r1.status == "pending" and r1.attempt == 0
    finally:
        await store.close()
        await other.close()
