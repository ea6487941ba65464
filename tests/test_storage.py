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
from durably_web.storage import Store, open_store
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
    # Statements the store assembles from the others: the claim with the rate-window test.
    derived = ["find_claimable_run_rate_limited", "lease_claimable_run_rate_limited"]
    assert sorted([*headers, *derived]) == sorted(sqlite_store_module.Q)
    assert len(headers) == len(set(headers))
    assert all(statement.strip() for statement in sqlite_store_module.Q.values())
    assert not any("{" in statement for statement in sqlite_store_module.Q.values())


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
        # One thread (and event loop) per store, as four processes would open the file.
        await asyncio.gather(*(asyncio.to_thread(asyncio.run, store.migrate()) for store in stores))
    finally:
        for store in stores:
            await store.close()
    conn = sqlite3.connect(tmp_path / "race.db")
    try:
        assert conn.execute("SELECT version FROM durably_migrations").fetchall() == [
            (v,) for v, _, _ in migration_files()
        ]
    finally:
        conn.close()


def database_at_version(path: Path, version: int) -> sqlite3.Connection:
    """A database migrated up to ``version`` only, as an older durably-web left it."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(sqlite_store_module.Q["create_migrations_table"])
    for number, _, script in migration_files():
        if number <= version:
            conn.executescript(
                f"BEGIN;\n{script}\n;INSERT INTO durably_migrations VALUES ({number}, 1);\nCOMMIT;"
            )
    return conn


STEP_COLUMNS = "run_id, seq, name, status, output, error, attempt, started_at, completed_at, kind, metadata"

replayed_calls: list[str] = []


@define_job("legacy-steps")
async def legacy_steps(step: StepContext, payload: Any) -> Any:
    def call(name: str, value: Any) -> Any:
        replayed_calls.append(name)
        return value

    first = await step.run("a", call, "a", "A")
    big = await step.run("big", call, "big", "new")
    return [first, len(big), await step.run("c", call, "c", "C")]


async def test_steps_written_before_migration_12_are_read_back_unchanged_and_replay(tmp_path):
    # Migration 0012 rebuilds durably_steps as a WITHOUT ROWID table. Steps of a finished run
    # and of a run still to finish (interleaved, with outputs up to 300 KB, a failed step, a
    # sleep, metadata) must come through intact; the unfinished run replays what it recorded.
    path = tmp_path / "v10.db"
    conn = database_at_version(path, 10)
    large, medium = "L" * 300_000, "m" * 5_000
    error = '{"type": "ValueError", "message": "no"}'
    runs = [("r1-done", "completed", 0), ("r2-pending", "pending", 1)]
    for run_id, status, attempt in runs:
        conn.execute(
            "INSERT INTO durably_runs (id, job_name, status, input, attempt, available_at, created_at,"
            " updated_at) VALUES (?, 'legacy-steps', ?, 'null', ?, 1000, 1000, 1000)",
            (run_id, status, attempt),
        )
    steps = [
        ("r1-done", 0, "a", "completed", '"A"', None, 1, 1, 2, "run", '{"model": "m"}'),
        ("r2-pending", 0, "a", "completed", '"A"', None, 1, 1, 2, "run", None),
        ("r1-done", 1, "big", "completed", f'"{large}"', None, 2, 3, 4, "run", None),
        ("r2-pending", 1, "big", "completed", f'"{large}"', None, 1, 3, 4, "run", None),
        ("r1-done", 2, "nap", "completed", "5000", None, 1, 5, 6, "sleep", None),
        ("r1-done", 3, "medium", "completed", f'"{medium}"', None, 1, 7, 8, "run", None),
        ("r1-done", 4, "dropped", "completed", None, None, 1, 9, 10, "run", None),
        ("r1-done", 5, "broken", "failed", None, error, 3, 11, 12, "run", None),
    ]
    conn.executemany(f"INSERT INTO durably_steps ({STEP_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)", steps)
    conn.close()

    replayed_calls.clear()
    async with Durably(f"sqlite:///{path}", jobs=[legacy_steps], **FAST) as durably:
        done = await durably.wait_for_run("r2-pending", timeout=30)
        assert done.status == "completed" and done.output == ["A", 300_000, "C"]
        assert replayed_calls == ["c"]  # "a" and "big" came from their rows
        finished = await durably.get_steps("r1-done")
        assert [(s.index, s.name, s.status, s.kind) for s in finished] == [
            (0, "a", "completed", "run"),
            (1, "big", "completed", "run"),
            (2, "nap", "completed", "sleep"),
            (3, "medium", "completed", "run"),
            (4, "dropped", "completed", "run"),
            (5, "broken", "failed", "run"),
        ]
        assert [s.output for s in finished] == ["A", large, 5000, medium, None, None]
        assert finished[5].error is not None and finished[5].error.message == "no"

    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT MAX(version) FROM durably_migrations").fetchone()[0] == SCHEMA_VERSION
        after = conn.execute(f"SELECT {STEP_COLUMNS} FROM durably_steps ORDER BY run_id, seq").fetchall()
        assert [row for row in after if row[0] == "r1-done"] == [s for s in steps if s[0] == "r1-done"]
        assert [row[:3] for row in after if row[0] == "r2-pending"] == [
            ("r2-pending", 0, "a"),
            ("r2-pending", 1, "big"),
            ("r2-pending", 2, "c"),
        ]
        table_sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'durably_steps'").fetchone()[0]
        assert "WITHOUT ROWID" in table_sql
        # One b-tree: the primary key is the table; no index beside it.
        assert [row[1] for row in conn.execute("PRAGMA index_list(durably_steps)")] == [
            "sqlite_autoindex_durably_steps_1"
        ]
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        # The foreign key still cascades.
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("DELETE FROM durably_runs WHERE id = 'r1-done'")
        assert conn.execute("SELECT COUNT(*) FROM durably_steps WHERE run_id = 'r1-done'").fetchone() == (0,)
    finally:
        conn.close()


# --- connection policy -----------------------------------------------------------------


async def test_file_databases_use_wal_busy_timeout_and_foreign_keys(db_url, db_path):
    store = open_store(db_url)
    try:
        await store.migrate()
        conn = store.connection  # type: ignore[attr-defined]
        assert conn.fetch_one("PRAGMA journal_mode")["journal_mode"] == "wal"
        # SQLite's busy handler is off (it would block the event loop); the store waits
        # for a lock itself, up to busy_timeout.
        assert conn.fetch_one("PRAGMA busy_timeout")["timeout"] == 0
        assert store.busy_timeout_ms == 5000  # type: ignore[attr-defined]
        assert conn.fetch_one("PRAGMA synchronous")["synchronous"] == 1  # NORMAL
        assert conn.fetch_one("PRAGMA foreign_keys")["foreign_keys"] == 1
    finally:
        await store.close()
    independent = sqlite3.connect(db_path)
    try:  # WAL is a property of the file itself
        assert independent.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        independent.close()


async def test_url_options_set_the_connection_policy(db_url):
    store = open_store(f"{db_url}?busy_timeout=1234&synchronous=full")
    try:
        conn = store.connection  # type: ignore[attr-defined]
        assert store.busy_timeout_ms == 1234  # type: ignore[attr-defined]
        assert conn.fetch_one("PRAGMA synchronous")["synchronous"] == 2  # FULL
    finally:
        await store.close()


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


async def test_waiting_for_a_locked_database_does_not_freeze_the_event_loop(make_durably, db_path):
    client = await make_durably(worker=False)
    client.register(noop)
    locker = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        locker.execute("BEGIN IMMEDIATE")
        timer = threading.Timer(0.5, lambda: locker.execute("COMMIT"))
        timer.start()
        created = await client.trigger(noop, None)
        timer.join()
        assert created.disposition == "created"
        # Half a second of waiting for the lock: the loop kept running other tasks meanwhile
        # (a blocking busy handler would have allowed none).
        assert ticks >= 10, ticks
    finally:
        ticker.cancel()
        await asyncio.wait([ticker])
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
