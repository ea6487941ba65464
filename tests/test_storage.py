"""The SQLite store: migrations, connection policy, URLs, fencing, two processes on one file."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

import crash_jobs
import pytest
from helpers import FAST, finish_process, read_lines, start_process

from durably_web import Durably, SchemaVersionError, StepContext, StorageError, ValidationError, define_job
from durably_web.storage import NewRun, StepRecord, Store, open_store
from durably_web.storage.sqlite import SCHEMA_VERSION, SQLiteStore
from durably_web.storage.sqlite import store as sqlite_store_module


@define_job("noop")
async def noop(step: StepContext, payload: Any) -> int:
    return await step.run("one", lambda: 1)


def migration_files() -> list[tuple[int, str, str]]:
    folder = resources.files("durably_web.storage.sqlite").joinpath("migrations")
    found = [
        (int(entry.name.split("_", 1)[0]), entry.name, entry.read_text(encoding="utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    ]
    return sorted(found)


def schema_of(path: Path) -> set[tuple[str, str, str, str]]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master "
            "WHERE name NOT LIKE 'sqlite_%' AND name <> 'durably_migrations'"
        ).fetchall()
    finally:
        conn.close()
    return set(rows)


# --- migrations -----------------------------------------------------------------


async def test_migrations_are_recorded_in_durably_migrations(make_durably, sql):
    await make_durably()
    versions = [version for version, _, _ in migration_files()]
    assert versions and versions == sorted(set(versions))
    assert SCHEMA_VERSION == versions[-1]
    rows = sql("SELECT version, applied_at FROM durably_migrations ORDER BY version")
    assert [version for version, _ in rows] == versions
    assert all(isinstance(applied_at, int) and applied_at > 0 for _, applied_at in rows)


async def test_the_store_uses_the_schema_from_the_migration_files(make_durably, db_path, tmp_path):
    await make_durably()
    reference = tmp_path / "reference.db"
    conn = sqlite3.connect(reference)
    try:
        for _, _, script in migration_files():
            conn.executescript(script)
    finally:
        conn.close()
    expected = schema_of(reference)
    assert {name for _, name, _, _ in expected} >= {"durably_runs", "durably_steps", "durably_logs"}
    assert schema_of(db_path) == expected


def test_queries_come_from_queries_sql():
    text = resources.files("durably_web.storage.sqlite").joinpath("queries.sql").read_text(encoding="utf-8")
    headers = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("-- name:")]
    assert sorted(headers) == sorted(sqlite_store_module.Q)
    assert len(headers) == len(set(headers))
    assert all(statement.strip() for statement in sqlite_store_module.Q.values())


async def test_reopening_a_migrated_database_is_a_no_op(db_url, sql):
    async with Durably(db_url, jobs=[noop], **FAST) as first:
        done = await first.trigger_and_wait(noop, None, timeout=30)
    before = sql("SELECT version, applied_at FROM durably_migrations")
    for _ in range(2):
        async with Durably(db_url, jobs=[noop], **FAST) as again:
            assert (await again.get_run(done.id)).output == 1
    assert sql("SELECT version, applied_at FROM durably_migrations") == before


async def test_a_database_from_a_newer_schema_version_fails_clearly(make_durably, db_url, sql):
    durably = await make_durably(worker=False)
    durably.register(noop)
    run = await durably.trigger(noop, None)
    await durably.stop()
    sql("INSERT INTO durably_migrations (version, applied_at) VALUES (?, 0)", (SCHEMA_VERSION + 1,))
    newer = Durably(db_url, jobs=[noop], **FAST)
    with pytest.raises(SchemaVersionError) as info:
        await newer.init()
    assert str(SCHEMA_VERSION + 1) in str(info.value)
    assert "upgrade durably-web" in str(info.value)
    with pytest.raises(Exception, match="not started"):
        newer.store  # noqa: B018
    # Nothing was touched, and the failed open left no lock behind.
    assert sql("SELECT id, status FROM durably_runs") == [(run.id, "pending")]
    sql("DELETE FROM durably_migrations WHERE version = ?", (SCHEMA_VERSION + 1,))


async def test_concurrent_first_opens_migrate_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'race.db'}"
    stores = [open_store(url) for _ in range(4)]
    try:
        await asyncio.gather(*(asyncio.to_thread(store.migrate) for store in stores))
    finally:
        for store in stores:
            store.close()
    conn = sqlite3.connect(tmp_path / "race.db")
    try:
        assert conn.execute("SELECT version FROM durably_migrations").fetchall() == [
            (v,) for v, _, _ in migration_files()
        ]
    finally:
        conn.close()


# --- connection policy -----------------------------------------------------------------


def test_file_databases_use_wal_busy_timeout_and_foreign_keys(db_url, db_path):
    store = open_store(db_url)
    try:
        store.migrate()
        conn = store.connection  # type: ignore[attr-defined]
        assert conn.fetch_one("PRAGMA journal_mode")["journal_mode"] == "wal"
        assert conn.fetch_one("PRAGMA busy_timeout")["timeout"] == 5000
        assert conn.fetch_one("PRAGMA synchronous")["synchronous"] == 1  # NORMAL
        assert conn.fetch_one("PRAGMA foreign_keys")["foreign_keys"] == 1
    finally:
        store.close()
    independent = sqlite3.connect(db_path)
    try:  # WAL is a property of the file itself
        assert independent.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        independent.close()


def test_url_options_set_the_connection_policy(db_url):
    store = open_store(f"{db_url}?busy_timeout=1234&synchronous=full")
    try:
        conn = store.connection  # type: ignore[attr-defined]
        assert conn.fetch_one("PRAGMA busy_timeout")["timeout"] == 1234
        assert conn.fetch_one("PRAGMA synchronous")["synchronous"] == 2  # FULL
    finally:
        store.close()


async def test_writers_wait_for_a_locked_database_up_to_the_busy_timeout(make_durably, db_path, db_url):
    client = await make_durably(worker=False)
    client.register(noop)
    locker = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    try:
        locker.execute("BEGIN IMMEDIATE")  # another process holds the write lock for a while
        timer = threading.Timer(0.3, lambda: locker.execute("COMMIT"))
        timer.start()
        created = await client.trigger(noop, None)  # waits for the lock instead of failing
        assert created.disposition == "created"
        timer.join()

        impatient = await make_durably(url=f"{db_url}?busy_timeout=50", worker=False)
        impatient.register(noop)
        locker.execute("BEGIN IMMEDIATE")
        with pytest.raises(StorageError, match="locked"):
            await impatient.trigger(noop, None)
        locker.execute("COMMIT")
    finally:
        locker.close()


# --- URLs --------------------------------------------------------------------------------------


async def test_relative_url_is_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    async with Durably("sqlite:///app.db", jobs=[noop], **FAST) as durably:
        assert (await durably.trigger_and_wait(noop, None, timeout=30)).output == 1
    assert (tmp_path / "app.db").is_file()


async def test_absolute_url_has_four_slashes(tmp_path):
    path = tmp_path / "nested" / "abs.db"
    path.parent.mkdir()
    async with Durably(f"sqlite:///{path}", jobs=[noop], **FAST) as durably:
        assert f"sqlite:///{path}".startswith("sqlite:////")
        assert (await durably.trigger_and_wait(noop, None, timeout=30)).output == 1
    assert path.is_file()


async def test_memory_database_works_and_is_private(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    async with Durably("sqlite://:memory:", jobs=[noop], **FAST) as durably:
        done = await durably.trigger_and_wait(noop, None, timeout=30)
        assert done.output == 1
        assert (await durably.get_steps(done.id))[0].name == "one"
    async with Durably("sqlite://:memory:", jobs=[noop], worker=False) as other:
        assert await other.get_runs() == []
    assert list(tmp_path.iterdir()) == []  # no file was created


@pytest.mark.parametrize(
    "url",
    [
        "postgres://localhost/db?pool_size=0",  # a PostgreSQL URL is valid; a bad option is not
        "sqlite://",
        "sqlite:///",
        "sqlite:relative.db",
        "sqlite://relative.db",
        "app.db",
        "sqlite:///x.db?unknown=1",
        "sqlite:///x.db?busy_timeout=soon",
        "sqlite:///x.db?synchronous=maybe",
        "sqlite:///x.db?journal_mode=sometimes",
        123,
    ],
)
async def test_bad_urls_raise_validation_error(url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValidationError):
        open_store(url)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        await Durably(url).init()  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


async def test_a_store_instance_can_be_passed_instead_of_a_url(db_url):
    store = open_store(db_url)
    assert isinstance(store, Store) and isinstance(store, SQLiteStore)
    async with Durably(store, jobs=[noop], **FAST) as durably:
        assert (await durably.trigger_and_wait(noop, None, timeout=30)).output == 1


async def test_values_are_bound_as_parameters_not_spliced_into_sql(make_durably):
    nasty = "'); DROP TABLE durably_runs; --"
    durably = await make_durably(noop, worker=False)
    run = await durably.trigger(noop, {"text": nasty}, labels={"x": nasty}, idempotency_key=nasty)
    stored = await durably.get_run(run.id)
    assert stored.input == {"text": nasty}
    assert stored.labels == {"x": nasty}
    assert [r.id for r in await durably.get_runs(labels={"x": nasty})] == [run.id]
    assert (await durably.trigger(noop, None, idempotency_key=nasty)).id == run.id


# --- the store's fencing, directly -----------------------------------------------------------------


def test_a_released_run_is_pending_again_unless_its_concurrency_key_has_a_pending_run(db_url):
    store = open_store(db_url)
    try:
        store.migrate()
        store.create_runs(
            [
                NewRun("r1", "job", "null", {}, None, None, False, 1000),
                NewRun("r2", "job", "null", {}, None, "k", False, 1001),
                NewRun("r3", "job", "null", {}, None, "c", False, 1002),
            ]
        )
        for _ in range(3):
            assert store.claim_run(worker_id="w1", job_names=["job"], now=1100, lease_until=9000)
        store.release_run("r1", 1, 1200)
        r1 = store.get_run("r1")
        assert (r1.status, r1.lease_owner, r1.attempt) == ("pending", None, 1)
        # At most one pending run per concurrency key: with one pending, r2 stays
        # leased with its lease expired, which is just as claimable.
        store.create_runs([NewRun("r4", "job", "null", {}, None, "k", False, 1300)])
        store.release_run("r2", 1, 1400)
        r2 = store.get_run("r2")
        assert (r2.status, r2.lease_owner, r2.lease_expires_at) == ("leased", None, 1400)
        # A cancelled run stays cancelled.
        store.cancel_run("r3", 1500)
        store.release_run("r3", 1, 1600)
        r3 = store.get_run("r3")
        assert (r3.status, r3.lease_owner, r3.lease_expires_at) == ("cancelled", None, 1600)
        # Pending again means claimable again, oldest first.
        again = store.claim_run(worker_id="w2", job_names=["job"], now=1700, lease_until=9000)
        assert again is not None and (again.id, again.attempt, again.lease_generation) == ("r1", 2, 2)
    finally:
        store.close()


def test_store_writes_are_fenced_by_lease_generation(db_url):
    store = open_store(db_url)
    try:
        store.migrate()
        store.create_runs([NewRun("r1", "job", "null", {}, None, None, False, 1000)])
        first = store.claim_run(worker_id="w1", job_names=["job"], now=1000, lease_until=2000)
        assert first is not None and first.lease_generation == 1 and first.attempt == 1
        # A live lease is not claimable; an expired one is.
        assert store.claim_run(worker_id="w2", job_names=["job"], now=1500, lease_until=2500) is None
        assert store.claim_run(worker_id="w2", job_names=["other"], now=2500, lease_until=3500) is None
        second = store.claim_run(worker_id="w2", job_names=["job"], now=2000, lease_until=3000)
        assert second is not None and second.lease_generation == 2 and second.attempt == 2

        step = StepRecord("r1", 0, "s", "completed", "1", None, 1000, 1001)
        assert store.record_step(step, generation=1) is False
        assert store.set_progress("r1", 1, 1, 2, "old", 2001) is False
        assert store.renew_leases([("r1", 1)], 2001, 9999) == ["r1"]
        store.release_run("r1", 1, 2001)
        assert (
            store.finish_run(
                "r1",
                1,
                status="completed",
                output_json="1",
                error_json=None,
                failed_step=None,
                drop_step_outputs=False,
                now=2001,
            )
            is False
        )
        current = store.get_run("r1")
        assert (current.status, current.lease_owner, current.lease_expires_at) == ("leased", "w2", 3000)
        assert store.list_steps("r1") == []

        assert store.renew_leases([("r1", 2)], 2100, 4000) == []
        assert store.record_step(step, generation=2) is True
        assert (
            store.finish_run(
                "r1",
                2,
                status="completed",
                output_json="1",
                error_json=None,
                failed_step=None,
                drop_step_outputs=False,
                now=2200,
            )
            is True
        )
        assert store.get_run("r1").status == "completed"
        assert (
            store.record_step(StepRecord("r1", 1, "t", "completed", "2", None, 1, 2), generation=2) is False
        )
    finally:
        store.close()


# --- two processes on one file -----------------------------------------------------------------


async def test_two_worker_processes_on_one_file_run_every_run_exactly_once(make_durably, db_url, tmp_path):
    side_effects = tmp_path / "runs.txt"
    count = 40
    client = await make_durably(crash_jobs.record_job, worker=False)
    runs = await client.batch_trigger(
        crash_jobs.record_job,
        [{"side_effects": str(side_effects), "n": i, "processes": 2} for i in range(count)],
    )
    processes = [start_process("serve", db_url, str(count)) for _ in range(2)]
    try:
        results = [finish_process(process) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    pids = {result["pid"] for result in results}
    executions = Counter(run_id for run_id, _ in read_lines(side_effects))
    assert executions == Counter({run.id: 1 for run in runs})
    finished = await client.get_runs(limit=count)
    assert {run.status for run in finished} == {"completed"}
    assert {run.attempt for run in finished} == {1}
    # Each run's recorded output is the pid of the process that executed it.
    by_line = dict(read_lines(side_effects))
    assert {run.id: run.output for run in finished} == by_line
    # Both processes did work (each run's step waits until two processes have recorded one).
    assert set(by_line.values()) == pids, f"runs per pid: {Counter(by_line.values())}, pids {pids}"
