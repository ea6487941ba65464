"""The PostgreSQL store against a real server (a throwaway cluster, tests/support/postgres.py).

First the Store contract, method by method, as tests/test_storage.py and the engine suites
check it on SQLite (plus one scenario run on both stores whose answers must be equal);
then what only PostgreSQL has: URL options, schemas, many stores at once (migrations,
idempotent triggers, concurrency-key contention), fences against writers in flight,
LISTEN/NOTIFY, and a server restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import itertools
import logging
import random
import sqlite3
import sys
import time
from importlib import resources
from typing import Any

import pytest
from helpers import wait_until

from durably_web.errors import (
    ConflictError,
    ExistingRunRefusedError,
    NotFoundError,
    SchemaVersionError,
    StorageError,
    ValidationError,
)
from durably_web.storage import LogRecord, NewRun, RunFilter, StepRecord, Store, open_store
from durably_web.storage.base import NEVER_MS

pytestmark = pytest.mark.postgres


# --- helpers --------------------------------------------------------------------------------------


def new_run(
    run_id: str,
    *,
    job: str = "job",
    labels: dict[str, str] | None = None,
    idem: str | None = None,
    key: str | None = None,
    coalesce: bool = False,
    at: int = 1000,
) -> NewRun:
    return NewRun(run_id, job, '{"n": 1}', labels or {}, idem, key, coalesce, at)


def step(run_id: str, index: int, name: str, *, status: str = "completed", **fields: Any) -> StepRecord:
    output = fields.pop("output", None if status == "failed" else "1")
    error = fields.pop("error", '{"message": "boom"}' if status == "failed" else None)
    return StepRecord(run_id, index, name, status, output, error, 1000 + index, 1001 + index, **fields)


async def claim(
    store: Store, now: int = 1100, until: int = 9000, worker: str = "w1", jobs: Any = ("job",)
) -> Any:
    return await store.claim_run(worker_id=worker, job_names=list(jobs), now=now, lease_until=until)


async def finish(
    store: Store, run_id: str, generation: int, *, status: str = "completed", now: int = 2000
) -> bool:
    return await store.finish_run(
        run_id,
        generation,
        status=status,
        output_json="1" if status == "completed" else None,
        error_json='{"message": "boom"}' if status == "failed" else None,
        failed_step=None,
        drop_step_outputs=False,
        now=now,
    )


async def sql(url: str, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    """One statement through an independent connection (autocommit); its rows, if any."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cursor = await conn.execute(statement, params)
        return await cursor.fetchall() if cursor.description else []


def url_with(url: str, **params: Any) -> str:
    return url + ("&" if "?" in url else "?") + "&".join(f"{key}={value}" for key, value in params.items())


@pytest.fixture
async def store(postgres_url: str) -> Any:
    opened = open_store(postgres_url)
    await opened.migrate()
    yield opened
    await opened.close()


# --- migrations and schema ------------------------------------------------------------------------


def _migration_versions() -> list[int]:
    folder = resources.files("durably_web.storage.postgres").joinpath("migrations")
    return sorted(
        int(entry.name.split("_", 1)[0]) for entry in folder.iterdir() if entry.name.endswith(".sql")
    )


async def test_migrate_records_each_version_once_and_again_is_a_no_op(postgres_url):
    from durably_web.storage.postgres import SCHEMA_VERSION

    store = open_store(postgres_url)
    try:
        await store.migrate()
        first = await sql(postgres_url, "SELECT version, applied_at FROM durably_migrations ORDER BY version")
        assert [version for version, _ in first] == _migration_versions()
        assert first[-1][0] == SCHEMA_VERSION and all(applied > 0 for _, applied in first)
        await store.migrate()
        await store.check_schema()
    finally:
        await store.close()
    again = open_store(postgres_url)
    try:
        await again.migrate()
    finally:
        await again.close()
    assert (
        await sql(postgres_url, "SELECT version, applied_at FROM durably_migrations ORDER BY version")
        == first
    )


async def test_the_schema_has_the_tables_and_columns_of_the_sqlite_schema(store, postgres_url, tmp_path):
    # The same tables and columns as SQLite after all its migrations (types are each dialect's own).
    reference = sqlite3.connect(tmp_path / "reference.db")
    try:
        folder = resources.files("durably_web.storage.sqlite").joinpath("migrations")
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            if entry.name.endswith(".sql"):
                reference.executescript(entry.read_text(encoding="utf-8"))
        tables = [
            name for (name,) in reference.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        ]
        expected = {
            table: {row[1] for row in reference.execute(f"PRAGMA table_info({table})")} for table in tables
        }
    finally:
        reference.close()
    rows = await sql(
        postgres_url,
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = 'public' AND table_name <> 'durably_migrations'",
    )
    found: dict[str, set[str]] = {}
    for table, column in rows:
        found.setdefault(table, set()).add(column)
    assert found == expected


def test_queries_come_from_queries_sql():
    from durably_web.storage.postgres import store as module

    text = resources.files("durably_web.storage.postgres").joinpath("queries.sql").read_text(encoding="utf-8")
    headers = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("-- name:")]
    assert sorted(headers) == sorted(module.Q) and len(headers) == len(set(headers))
    assert all(statement.strip() for statement in module.Q.values())


async def test_a_database_from_a_newer_schema_version_is_refused_untouched(store, postgres_url):
    from durably_web.storage.postgres import SCHEMA_VERSION

    await store.create_runs([new_run("r1")])
    await sql(postgres_url, "INSERT INTO durably_migrations VALUES (%s, 0)", (SCHEMA_VERSION + 1,))
    newer = open_store(postgres_url)
    try:
        for call in (newer.migrate, newer.check_schema):
            with pytest.raises(SchemaVersionError) as info:
                await call()
            assert str(SCHEMA_VERSION + 1) in str(info.value) and "upgrade durably-web" in str(info.value)
            assert (info.value.found, info.value.expected) == (SCHEMA_VERSION + 1, SCHEMA_VERSION)
    finally:
        await newer.close()
    assert await sql(postgres_url, "SELECT id, status FROM durably_runs") == [("r1", "pending")]


async def test_check_schema_refuses_an_empty_or_older_database_and_writes_nothing(postgres_url):
    reader = open_store(postgres_url, read_only=True)
    try:
        with pytest.raises(SchemaVersionError, match="not a durably-web database"):
            await reader.check_schema()
        assert await sql(postgres_url, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]
        writer = open_store(postgres_url)
        await writer.migrate()
        await writer.close()
        await reader.check_schema()
        await sql(
            postgres_url,
            "DELETE FROM durably_migrations WHERE version = (SELECT max(version) FROM durably_migrations)",
        )
        with pytest.raises(SchemaVersionError, match="older than"):
            await reader.check_schema()
    finally:
        await reader.close()


async def test_ten_stores_migrating_at_once_apply_each_migration_once(postgres_url):
    stores = [open_store(url_with(postgres_url, pool_size=1)) for _ in range(10)]
    try:
        await asyncio.gather(*(store.migrate() for store in stores))
        await asyncio.gather(*(store.check_schema() for store in stores))
    finally:
        await asyncio.gather(*(store.close() for store in stores))
    rows = await sql(postgres_url, "SELECT version FROM durably_migrations ORDER BY version")
    assert [version for (version,) in rows] == _migration_versions()


async def test_a_read_only_store_reads_and_refuses_every_write(store, postgres_url):
    await store.create_runs([new_run("r1")])
    reader = open_store(postgres_url, read_only=True)
    try:
        await reader.check_schema()
        assert (await reader.get_run("r1")).status == "pending"
        async with reader._connection() as conn:  # type: ignore[attr-defined]
            shown = await (await conn.execute("SHOW default_transaction_read_only")).fetchone()
        assert shown == {"default_transaction_read_only": "on"}
        with pytest.raises(StorageError, match="read-only"):
            await reader.create_runs([new_run("r2")])
        with pytest.raises(StorageError, match="read-only"):
            await reader.cancel_run("r1", 2000)
    finally:
        await reader.close()
    assert (await store.get_run("r1")).status == "pending"


# --- URLs and options -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "pool_size=0",
        "pool_size=many",
        "pool_size=-1",
        "statement_timeout=-5",
        "statement_timeout=soon",
        "pool_timeout=0",
        "pool_timeout=later",
        "schema=",
        "schema=two%20words",
        "schema=1abc",
        "schema=a-b",
        "no_such_libpq_option=1",
    ],
)
def test_bad_url_options_raise_validation_error(query):
    with pytest.raises(ValidationError):
        open_store(f"postgresql://user:secret@localhost:5432/db?{query}")


@pytest.mark.parametrize("url", ["postgresql://localhost:notaport/db", "postgres://[::1/db"])
def test_malformed_urls_raise_validation_error(url):
    with pytest.raises(ValidationError):
        open_store(url)


def test_messages_never_echo_the_password():
    with pytest.raises(ValidationError) as info:
        open_store("postgresql://app:hunter2@localhost/db?pool_size=0")
    assert "hunter2" not in str(info.value) and "app:***@localhost" in str(info.value)


async def test_both_schemes_open_the_store_and_unknown_libpq_parameters_pass_through(postgres_url):
    from durably_web.storage.postgres import PostgresStore

    for url in (postgres_url, postgres_url.replace("postgresql://", "postgres://", 1)):
        store = open_store(url_with(url, application_name="durably_test", connect_timeout=5))
        assert isinstance(store, PostgresStore)
        try:
            await store.migrate()
            async with store._connection() as conn:
                row = await (await conn.execute("SHOW application_name")).fetchone()
            assert row == {"application_name": "durably_test"}
        finally:
            await store.close()


def test_without_psycopg_a_postgres_url_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # makes `import psycopg` fail
    with pytest.raises(ValidationError, match=r"pip install 'durably-web\[postgres\]'"):
        open_store("postgresql://localhost/db")
    with pytest.raises(ValidationError, match="pool_size"):  # options are still checked first
        open_store("postgresql://localhost/db?pool_size=0")


async def test_a_server_that_is_not_there_is_a_storage_error(postgres_cluster):
    from support.postgres import _free_port

    store = open_store(f"postgresql://postgres@127.0.0.1:{_free_port()}/db?pool_timeout=1")
    try:
        with pytest.raises(StorageError, match="cannot connect"):
            await store.get_run("r1")
    finally:
        await store.close()
    missing = open_store(postgres_cluster.url("no_such_database"))
    try:
        with pytest.raises(StorageError, match="no_such_database"):
            await missing.migrate()
    finally:
        await missing.close()


async def test_pool_size_caps_the_connections(postgres_url):
    url = url_with(postgres_url, pool_size=2, application_name="durably_pool_test")
    store = open_store(url)
    try:
        await store.migrate()
        await store.create_runs([new_run(f"r{i}") for i in range(5)])
        seen = []

        async def busy() -> None:
            for _ in range(5):
                await store.list_runs(RunFilter())
                rows = await sql(
                    postgres_url,
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'durably_pool_test'",
                )
                seen.append(rows[0][0])

        await asyncio.gather(*(busy() for _ in range(10)))
        assert max(seen) <= 2, seen  # never more connections than pool_size
    finally:
        await store.close()
    # close() leaves no connection behind.
    rows = await sql(
        postgres_url, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'durably_pool_test'"
    )
    assert rows == [(0,)]


async def test_statement_timeout_is_set_on_every_connection_and_enforced(postgres_url):
    store = open_store(url_with(postgres_url, statement_timeout=300))
    import psycopg

    try:
        await store.migrate()
        async with store._connection() as conn:
            row = await (await conn.execute("SHOW statement_timeout")).fetchone()
        assert row == {"statement_timeout": "300ms"}
        await store.create_runs([new_run("r1")])
        # Another session holds the run's row lock: cancel_run waits for it, then gives up.
        async with await psycopg.AsyncConnection.connect(postgres_url) as locker:
            await locker.execute("SELECT * FROM durably_runs WHERE id = 'r1' FOR UPDATE")
            started = time.monotonic()
            with pytest.raises(StorageError, match="statement timeout"):
                await store.cancel_run("r1", 2000)
            assert time.monotonic() - started < 5
            await locker.rollback()
        assert (await store.cancel_run("r1", 2000)).status == "cancelled"
    finally:
        await store.close()


async def test_two_schemas_in_one_database_are_two_separate_stores(postgres_url):
    a = open_store(url_with(postgres_url, schema="a"))
    b = open_store(url_with(postgres_url, schema="Beta"))  # quoted: case is kept
    other_a = open_store(url_with(postgres_url, schema="a"))  # another process of app a
    heard_by_a: list[tuple[str, str]] = []
    try:
        await asyncio.gather(a.migrate(), b.migrate(), other_a.migrate())
        stop = await a.watch_changes(lambda run_id, status: heard_by_a.append((run_id, status)))
        # The same ids and keys in both: no conflict, no idempotent hit across schemas.
        await a.create_runs([new_run("r1", idem="i", key="k")])
        created = await b.create_runs([new_run("r1", idem="i", key="k"), new_run("r2")])
        assert [disposition for _, disposition in created] == ["created", "created"]
        assert [r.id for r in await a.list_runs(RunFilter())] == ["r1"]
        assert [r.id for r in await b.list_runs(RunFilter())] == ["r2", "r1"]
        assert (await claim(other_a)).id == "r1" and (await claim(b)).id == "r1"  # one key, two apps
        await wait_until(lambda: ("r1", "leased") in heard_by_a)
        await asyncio.sleep(0.2)
        assert ("r2", "pending") not in heard_by_a  # b's change is not a's
        assert ("r1", "pending") not in heard_by_a  # nor is a's own (its caller knows it)
        stop()
    finally:
        await a.close()
        await b.close()
        await other_a.close()
    tables = await sql(
        postgres_url,
        "SELECT schemaname, count(*) FROM pg_tables WHERE tablename LIKE 'durably_%%' GROUP BY 1 ORDER BY 1",
    )
    assert tables == [("Beta", 8), ("a", 8)]  # 8: with durably_schedules


# --- the contract: runs ---------------------------------------------------------------------------


async def test_create_runs_creates_returns_and_stores_them(store):
    created = await store.create_runs(
        [new_run("r1", labels={"team": "a", "env": "prod"}), new_run("r2", at=1001)]
    )
    assert [(record.id, disposition) for record, disposition in created] == [
        ("r1", "created"),
        ("r2", "created"),
    ]
    stored = await store.get_run("r1")
    assert stored == created[0][0]
    assert (stored.status, stored.input_json, stored.labels, stored.attempt) == (
        "pending",
        '{"n": 1}',
        {"team": "a", "env": "prod"},
        0,
    )
    assert (stored.available_at, stored.created_at, stored.updated_at, stored.lease_generation) == (
        1000,
        1000,
        1000,
        0,
    )
    assert await store.get_run("nope") is None


async def test_an_idempotency_key_returns_the_existing_run(store):
    await store.create_runs([new_run("r1", idem="once")])
    again = await store.create_runs([new_run("r2", idem="once"), new_run("r3", idem="once", job="other")])
    assert [(r.id, d) for r, d in again] == [("r1", "idempotent"), ("r3", "created")]
    # Two items of one call sharing a key: the second is the first's run, with no verdict asked.
    asked: list[str] = []
    both = await store.create_runs(
        [new_run("r4", idem="pair"), new_run("r5", idem="pair")],
        accept_existing=lambda record: asked.append(record.id) or True,
    )
    assert [(r.id, d) for r, d in both] == [("r4", "created"), ("r4", "idempotent")] and asked == []


async def test_a_pending_concurrency_key_coalesces_or_conflicts_and_then_nothing_is_written(store):
    await store.create_runs([new_run("r1", key="k")])
    coalesced = await store.create_runs([new_run("r2", key="k", coalesce=True)])
    assert [(r.id, d) for r, d in coalesced] == [("r1", "coalesced")]
    with pytest.raises(ConflictError, match="already pending"):
        await store.create_runs([new_run("r3"), new_run("r4", key="k")])
    assert await store.get_run("r3") is None  # the whole call was rolled back
    # Once r1 is no longer pending, the key takes a new pending run.
    await claim(store)
    assert [(r.id, d) for r, d in await store.create_runs([new_run("r5", key="k")])] == [("r5", "created")]


async def test_accept_existing_refusing_raises_with_the_records_and_writes_nothing(store):
    await store.create_runs([new_run("r1", idem="i"), new_run("r2", key="k")])
    with pytest.raises(ExistingRunRefusedError) as info:
        await store.create_runs(
            [
                new_run("r3"),
                new_run("r4", idem="i"),
                new_run("r5", key="k", coalesce=True),
                new_run("r6", idem="i"),
            ],
            accept_existing=lambda record: False,
        )
    assert sorted(record.id for record in info.value.records) == ["r1", "r2"]  # each once
    assert isinstance(info.value, ConflictError)
    assert await store.get_run("r3") is None
    accepted = await store.create_runs(
        [new_run("r7", idem="i")], accept_existing=lambda record: record.id == "r1"
    )
    assert [(r.id, d) for r, d in accepted] == [("r1", "idempotent")]


async def test_list_runs_filters_newest_first_with_limit_and_offset(store):
    await store.create_runs(
        [
            new_run("r1", labels={"team": "a", "env": "prod"}),
            new_run("r2", labels={"team": "a"}, job="other"),
            new_run("r3", labels={"team": "b", "env": "prod"}),
            new_run("r4"),
        ]
    )
    await claim(store, jobs=["other"])

    async def ids(**fields: Any) -> list[str]:
        return [record.id for record in await store.list_runs(RunFilter(**fields))]

    assert await ids() == ["r4", "r3", "r2", "r1"]
    assert await ids(statuses=["leased"]) == ["r2"]
    assert await ids(statuses=["pending", "leased"], job_names=["other"]) == ["r2"]
    assert await ids(statuses=[]) == [] and await ids(job_names=[]) == []
    assert await ids(labels={"team": "a"}) == ["r2", "r1"]
    assert await ids(labels={"team": "a", "env": "prod"}) == ["r1"]
    assert await ids(labels={"env": "prod", "team": "c"}) == []
    assert await ids(limit=2) == ["r4", "r3"]
    assert await ids(limit=2, offset=1) == ["r3", "r2"]
    assert await ids(limit=-1, offset=-1) == ["r4", "r3", "r2", "r1"]  # as SQLite reads them


async def test_values_are_bound_as_parameters_not_spliced_into_sql(store):
    nasty = "'); DROP TABLE durably_runs; -- %s %(x)s"
    await store.create_runs([new_run("r1", labels={nasty: nasty}, idem=nasty)])
    assert [r.id for r in await store.list_runs(RunFilter(labels={nasty: nasty}))] == ["r1"]
    assert (await store.get_run("r1")).labels == {nasty: nasty}
    assert (await store.create_runs([new_run("r2", idem=nasty)]))[0][0].id == "r1"


async def test_cancel_run(store):
    await store.create_runs([new_run("r1"), new_run("r2", at=1001), new_run("r3", at=1002)])
    cancelled = await store.cancel_run("r1", 1500)
    assert (cancelled.status, cancelled.completed_at, cancelled.updated_at) == ("cancelled", 1500, 1500)
    assert await store.cancel_run("r1", 1600) == cancelled  # already cancelled: as it is
    leased = await claim(store)
    assert leased.id == "r2"
    held = await store.cancel_run("r2", 1700)
    # A cancelled run keeps its lease until its handler has stopped.
    assert (held.status, held.lease_owner, held.lease_expires_at) == ("cancelled", "w1", 9000)
    r3 = await claim(store)
    assert await finish(store, "r3", r3.lease_generation)
    with pytest.raises(ConflictError, match="completed"):
        await store.cancel_run("r3", 2100)
    with pytest.raises(NotFoundError):
        await store.cancel_run("nope", 2100)


async def test_delete_run_removes_its_steps_logs_labels_and_signals(store, postgres_url):
    await store.create_runs([new_run("r1", labels={"a": "b"}), new_run("r2")])
    r1 = await claim(store)
    assert await store.record_step(step("r1", 0, "s"), r1.lease_generation)
    await store.append_log(LogRecord("r1", "s", "info", "hello", None, 1200))
    with pytest.raises(ConflictError, match="leased"):
        await store.delete_run("r1")
    await store.send_signal("r1", "go", "1", None, 1250)
    await finish(store, "r1", r1.lease_generation)
    deleted = await store.delete_run("r1")
    assert deleted.id == "r1" and deleted.status == "completed"
    assert await store.get_run("r1") is None
    for table in ("durably_steps", "durably_logs", "durably_run_labels", "durably_signals"):
        assert await sql(postgres_url, f"SELECT count(*) FROM {table}") == [(0,)], table
    with pytest.raises(NotFoundError):
        await store.delete_run("r1")
    assert (await store.delete_run("r2")).status == "pending"


async def test_purge_runs_deletes_runs_that_ended_before_the_time(store):
    await store.create_runs([new_run(f"r{i}", at=1000 + i) for i in range(5)])
    for i in range(4):
        record = await claim(store, now=1100 + i)
        await finish(
            store,
            record.id,
            record.lease_generation,
            now=2000 + i,
            status="failed" if i == 1 else "completed",
        )
    await store.cancel_run("r4", 2004)
    assert await store.purge_runs(2001, limit=None) == 1  # r0 (ended at 2000)
    assert await store.purge_runs(9999, limit=2) == 2  # r1, r2: the oldest first
    assert [r.id for r in await store.list_runs(RunFilter())] == ["r4", "r3"]
    assert await store.purge_runs(9999, limit=None) == 2
    assert await store.purge_runs(9999, limit=None) == 0


# --- the contract: claims, leases, fencing --------------------------------------------------------


async def test_claims_take_the_oldest_runnable_run_and_bump_generation_and_attempt(store):
    await store.create_runs([new_run("r2", at=1000), new_run("r1", at=1000), new_run("r3", job="other")])
    first = await claim(store)
    assert (first.id, first.status, first.lease_owner, first.lease_generation, first.attempt) == (
        "r1",
        "leased",
        "w1",
        1,
        1,
    )
    assert (first.lease_expires_at, first.started_at, first.updated_at) == (9000, 1100, 1100)
    assert (await claim(store)).id == "r2"
    assert await claim(store) is None  # r3 is another job's
    assert await claim(store, jobs=[]) is None
    assert await store.claim_run(worker_id="w", job_names=["nope"], now=1100, lease_until=9000) is None
    # A run not yet available is not claimed before its time.
    await store.create_runs([new_run("r4", at=5000)])
    assert await claim(store, now=4999) is None
    assert (await claim(store, now=5000)).id == "r4"


async def test_an_expired_lease_is_claimable_again(store):
    await store.create_runs([new_run("r1")])
    first = await claim(store, now=1000, until=2000)
    assert await claim(store, now=1999) is None
    second = await claim(store, now=2000, until=3000, worker="w2")
    assert (second.id, second.lease_owner, second.lease_generation, second.attempt) == ("r1", "w2", 2, 2)
    assert second.started_at == first.started_at == 1000  # the first start is kept


async def test_a_claim_walks_only_the_unfinished_runs_however_many_have_finished(store, postgres_url):
    # The planner must see that a claim wants only unfinished runs (durably_runs_active);
    # walking the primary key instead passes over every finished run older than the first
    # claimable one, and the claim slows down with every run that completes.
    from durably_web.storage.postgres.store import Q

    # A backlog behind many finished runs: the planner expects a claimable run soon in any
    # order, and the primary key's order finds it only after every finished one.
    await store.create_runs([new_run(f"r{i:04}", at=1000 + i) for i in range(1000)])
    await sql(postgres_url, "UPDATE durably_runs SET status = 'completed', completed_at = 1 WHERE id < 'r05'")
    await sql(postgres_url, "ANALYZE durably_runs")
    params = {
        "now": 5000,
        "job_names": ["job"],
        "passed_over": [],
        "rate_limited": [],
        "worker_id": "w1",
        "lease_until": 9000,
        "channel": "c",
        "origin": "o",
        "versions": "{}",
        "pinned_versions": '{"job": "v1"}',
    }
    for name in ("claim_unkeyed_run", "find_claimable_run"):
        plan = [row[0] for row in await sql(postgres_url, "EXPLAIN " + Q[name], params)]
        scans = [line for line in plan if "Scan" in line and " on durably_runs r" in line]
        assert scans and not any("durably_runs_pkey" in line for line in scans), (name, plan)
    assert (await claim(store, now=5000)).id == "r0500"


async def test_finding_overdue_runs_is_an_index_probe_however_many_runs_there_are(store, postgres_url):
    # Every claim loop turn asks fail_overdue_runs; with none due it must not scan the runs.
    from durably_web.storage.postgres.store import Q

    await store.create_runs([new_run(f"r{i:04}", at=1000 + i) for i in range(2000)])
    await sql(postgres_url, "UPDATE durably_runs SET deadline_at = 900000 WHERE id < 'r0010'")
    await sql(postgres_url, "ANALYZE durably_runs")
    params = {"now": 5000, "error": "{}", "channel": "c", "origin": "o"}
    plan = [row[0] for row in await sql(postgres_url, "EXPLAIN " + Q["fail_overdue_runs"], params)]
    # The deadline index finds the candidates; the update reaches each by its primary key.
    assert any("Index Scan using durably_runs_deadline" in line for line in plan), plan
    assert not any("Seq Scan" in line for line in plan), plan
    error = '{"type": "RunTimeoutError", "message": "late"}'
    assert await store.fail_overdue_runs(5000, error_json=error, drop_step_outputs=False) == []
    failed = await store.fail_overdue_runs(900_000, error_json=error, drop_step_outputs=False)
    assert sorted(r.id for r in failed) == [f"r{i:04}" for i in range(10)]


async def test_a_concurrency_key_blocks_while_another_run_holds_a_live_lease(store):
    await store.create_runs([new_run("a1", key="k"), new_run("b1", key="other")])
    a1 = await claim(store, now=1000, until=2000)
    assert a1.id == "a1"
    # a2 (pending) is blocked by a1's live lease; b1 (another key) is not.
    await store.create_runs([new_run("a2", key="k", at=1001)])
    assert (await claim(store, now=1100)).id == "b1"
    assert await claim(store, now=1100) is None
    # Cancelled with a live lease: still holds the key, until the lease ends.
    await store.cancel_run("a1", 1200)
    assert await claim(store, now=1300) is None
    assert (await claim(store, now=2000)).id == "a2"


async def test_a_released_run_is_pending_again_unless_its_concurrency_key_has_a_pending_run(store):
    # tests/test_storage.py's test of the same name, on PostgreSQL.
    await store.create_runs(
        [new_run("r1", at=1000), new_run("r2", key="k", at=1001), new_run("r3", key="c", at=1002)]
    )
    for _ in range(3):
        assert await claim(store, until=9000)
    await store.release_run("r1", 1, 1200)
    r1 = await store.get_run("r1")
    assert (r1.status, r1.lease_owner, r1.attempt) == ("pending", None, 1)
    await store.create_runs([new_run("r4", key="k", at=1300)])
    await store.release_run("r2", 1, 1400)
    r2 = await store.get_run("r2")
    assert (r2.status, r2.lease_owner, r2.lease_expires_at) == ("leased", None, 1400)
    await store.cancel_run("r3", 1500)
    await store.release_run("r3", 1, 1600)
    r3 = await store.get_run("r3")
    assert (r3.status, r3.lease_owner, r3.lease_expires_at) == ("cancelled", None, 1600)
    again = await claim(store, now=1700, worker="w2")
    assert (again.id, again.attempt, again.lease_generation) == ("r1", 2, 2)
    await store.release_run("r1", 1, 1800)  # a stale generation changes nothing
    assert (await store.get_run("r1")).lease_owner == "w2"


async def test_store_writes_are_fenced_by_lease_generation(store):
    # tests/test_storage.py's test of the same name, on PostgreSQL.
    await store.create_runs([new_run("r1")])
    first = await claim(store, now=1000, until=2000)
    assert first.lease_generation == 1 and first.attempt == 1
    assert await claim(store, now=1500, worker="w2") is None
    assert await claim(store, now=2500, jobs=["other"]) is None
    second = await claim(store, now=2000, until=3000, worker="w2")
    assert second.lease_generation == 2 and second.attempt == 2

    s = StepRecord("r1", 0, "s", "completed", "1", None, 1000, 1001)
    assert await store.record_step(s, generation=1) is False
    assert await store.set_progress("r1", 1, 1, 2, "old", 2001) is False
    assert await store.renew_leases([("r1", 1)], 2001, 9999) == ["r1"]
    await store.release_run("r1", 1, 2001)
    assert await finish(store, "r1", 1, now=2001) is False
    assert await store.wait_run("r1", 1, until=5000, reason="sleep", step_name="nap", now=2001) is False
    current = await store.get_run("r1")
    assert (current.status, current.lease_owner, current.lease_expires_at) == ("leased", "w2", 3000)
    assert await store.list_steps("r1") == []

    assert await store.renew_leases([("r1", 2)], 2100, 4000) == []
    assert await store.record_step(s, generation=2) is True
    assert await store.set_progress("r1", 2, 1, 2, "half", 2150) is True
    assert await finish(store, "r1", 2, now=2200) is True
    done = await store.get_run("r1")
    assert (
        done.status,
        done.output_json,
        done.progress_current,
        done.progress_total,
        done.progress_message,
    ) == (
        "completed",
        "1",
        1,
        2,
        "half",
    )
    assert (done.lease_owner, done.lease_expires_at, done.completed_at) == (None, None, 2200)
    assert (
        await store.record_step(StepRecord("r1", 1, "t", "completed", "2", None, 1, 2), generation=2) is False
    )


async def test_renewing_an_expired_lease_is_refused_even_if_nobody_took_the_run(store):
    await store.create_runs([new_run("r1"), new_run("r2")])
    r1 = await claim(store, now=1000, until=2000)
    r2 = await claim(store, now=1000, until=2000)
    assert (
        await store.renew_leases([("r1", r1.lease_generation), ("r2", r2.lease_generation)], 1999, 3000) == []
    )
    assert await store.renew_leases(
        [("r1", r1.lease_generation), ("r2", r2.lease_generation)], 3000, 4000
    ) == [
        "r1",
        "r2",
    ]
    assert (await store.get_run("r1")).lease_expires_at == 3000  # untouched by the refused renewal
    assert await store.renew_leases([], 3000, 4000) == []


async def test_renewing_cancelled_leases_keeps_their_keys_held(store):
    await store.create_runs([new_run("a1", key="k")])
    a1 = await claim(store, now=1000, until=2000)
    await store.create_runs([new_run("a2", key="k", at=1001)])
    await store.cancel_run("a1", 1100)
    assert await store.renew_leases([("a1", a1.lease_generation)], 1500, 2500) == ["a1"]  # not 'leased'
    assert await store.renew_leases([("a1", a1.lease_generation)], 1500, 2500, cancelled=True) == []
    assert await claim(store, now=2100) is None
    await store.release_run("a1", a1.lease_generation, 2200)
    assert (await claim(store, now=2200)).id == "a2"


async def test_renewal_is_refused_when_another_run_of_its_key_holds_a_live_lease(store, postgres_url):
    # The race renew_leases guards against: a claim with a later clock saw a1's lease expired
    # and took a2 before a1's worker, whose clock read earlier, got its renewal in.
    await store.create_runs([new_run("a1", key="k")])
    a1 = await claim(store, now=1000, until=2000)
    await store.create_runs([new_run("a0", key="k", at=1001)])  # "a0": older than a1, claimed first
    a0 = await claim(store, now=2000, until=3000, worker="w2")
    assert a0.id == "a0"
    assert await store.renew_leases([("a1", a1.lease_generation)], 1999, 4000) == ["a1"]


async def test_expire_leases_makes_every_leased_run_claimable_at_once(store):
    await store.create_runs([new_run("r1"), new_run("r2", at=1001), new_run("r3", at=1002)])
    for _ in range(3):
        await claim(store, now=1100, until=9000)
    await store.cancel_run("r3", 1100)
    assert await store.expire_leases(1200) == 3
    r1 = await store.get_run("r1")
    assert (r1.status, r1.lease_owner, r1.lease_expires_at) == ("leased", None, 1200)
    assert (await claim(store, now=1200, worker="w2")).lease_generation == 2
    assert await store.expire_leases(1300) == 1  # the new lease, and nothing already expired


# --- the contract: steps, waits, signals, resume, fork --------------------------------------------


async def test_record_step_replaces_a_failed_step_but_never_a_completed_one(store):
    await store.create_runs([new_run("r1")])
    g = (await claim(store)).lease_generation
    assert await store.record_step(step("r1", 0, "a", kind="sleep", output="5000"), g)
    assert await store.record_step(step("r1", 0, "a", output="2"), g) is False
    failed = step("r1", 1, "b", status="failed")
    assert await store.finish_run(
        "r1",
        g,
        status="failed",
        output_json=None,
        error_json="{}",
        failed_step=failed,
        drop_step_outputs=False,
        now=2100,
    )
    steps = await store.list_steps("r1")
    assert [(s.index, s.name, s.status, s.kind, s.output_json) for s in steps] == [
        (0, "a", "completed", "sleep", "5000"),
        (1, "b", "failed", "run", None),
    ]
    assert [s.name for s in await store.list_steps("r1", completed_only=True)] == ["a"]
    await store.resume_run("r1", 2200)
    g = (await claim(store, now=2300)).lease_generation
    assert await store.record_step(step("r1", 1, "b", attempt=2), g)
    assert [(s.status, s.attempt) for s in await store.list_steps("r1")] == [
        ("completed", 1),
        ("completed", 2),
    ]
    # Driver errors come back as StorageError: a step name is unique within a run.
    with pytest.raises(StorageError):
        await store.record_step(step("r1", 2, "a"), g)


async def test_finish_run_can_drop_step_outputs(store):
    await store.create_runs([new_run("r1")])
    g = (await claim(store)).lease_generation
    await store.record_step(step("r1", 0, "a"), g)
    assert await store.finish_run(
        "r1",
        g,
        status="completed",
        output_json="7",
        error_json=None,
        failed_step=None,
        drop_step_outputs=True,
        now=2000,
    )
    assert [(s.name, s.output_json) for s in await store.list_steps("r1")] == [("a", None)]
    assert (await store.get_run("r1")).output_json == "7"


async def test_wait_run_for_a_retry_records_the_attempt_and_wakes_at_its_time(store):
    await store.create_runs([new_run("r1")])
    g = (await claim(store, now=1000)).lease_generation
    failed = step("r1", 0, "flaky", status="failed", attempt=1)
    assert await store.wait_run(
        "r1", g, until=3000, reason="retry", step_name="flaky", now=1500, failed_attempt=failed
    )
    waiting = await store.get_run("r1")
    assert (
        waiting.status,
        waiting.available_at,
        waiting.wait_reason,
        waiting.wait_step,
        waiting.wake_at,
    ) == (
        "waiting",
        3000,
        "retry",
        "flaky",
        3000,
    )
    assert (waiting.lease_owner, waiting.lease_expires_at) == (None, None)
    assert await claim(store, now=2999) is None
    again = await claim(store, now=3000)
    assert (again.id, again.lease_generation, again.attempt) == ("r1", 2, 2)
    assert [(s.index, s.name, s.attempt, s.error_json) for s in await store.list_step_attempts("r1")] == [
        (0, "flaky", 1, '{"message": "boom"}')
    ]
    assert await store.count_step_attempts("r1") == {0: (1, 1)}
    # The same attempt twice (a replay) is recorded once.
    assert await store.wait_run(
        "r1", 2, until=4000, reason="retry", step_name="flaky", now=3100, failed_attempt=failed
    )
    assert len(await store.list_step_attempts("r1")) == 1


async def test_wait_run_for_a_sleep_records_its_step_in_the_same_transaction(store):
    await store.create_runs([new_run("r1")])
    g = (await claim(store)).lease_generation
    nap = step("r1", 0, "nap", kind="sleep", output="5000")
    assert await store.wait_run("r1", g, until=5000, reason="sleep", step_name="nap", now=1200, step=nap)
    assert [(s.name, s.kind) for s in await store.list_steps("r1")] == [("nap", "sleep")]
    g = (await claim(store, now=5000)).lease_generation
    # A step already completed at that position: nothing is written, the run stays leased.
    assert (
        await store.wait_run("r1", g, until=9000, reason="sleep", step_name="nap", now=5100, step=nap)
        is False
    )
    assert (await store.get_run("r1")).status == "leased"


async def test_signals_stored_delivered_and_duplicate(store):
    await store.create_runs([new_run("r1")])
    g = (await claim(store)).lease_generation
    # Sent while the run is leased: stored; the wait then finds it and is due at once.
    disposition, record = await store.send_signal("r1", "go", '{"x": 1}', "s-1", 1200)
    assert (disposition, record.status) == ("stored", "leased")
    assert (await store.send_signal("r1", "go", '{"x": 2}', "s-1", 1210))[0] == "duplicate"
    assert await store.wait_run(
        "r1", g, until=NEVER_MS, reason="signal", step_name="go", now=1300, deadline=None
    )
    assert (await store.get_run("r1")).available_at == 1300
    g = (await claim(store, now=1400)).lease_generation
    key, payload = await store.next_signal("r1", "go")
    assert payload == '{"x": 1}'
    assert await store.consume_signal(
        key, step("r1", 0, "go", kind="signal", output='{"payload": 1}'), g, 1500
    )
    assert await store.next_signal("r1", "go") is None
    assert await store.consume_signal(key, step("r1", 1, "again", kind="signal"), g, 1500) is False  # taken
    # Waiting with no signal yet: the wait lasts (NEVER_MS, no wake-up time) until one is delivered.
    assert await store.wait_run(
        "r1", g, until=NEVER_MS, reason="signal", step_name="more", now=1600, deadline=None
    )
    waiting = await store.get_run("r1")
    assert (waiting.available_at, waiting.wake_at) == (NEVER_MS, None)
    assert (await store.send_signal("r1", "other", "1", None, 1650))[0] == "stored"
    disposition, record = await store.send_signal("r1", "more", "2", None, 1700)
    assert (disposition, record.available_at) == ("delivered", 1700)
    await store.cancel_run("r1", 1800)
    with pytest.raises(ConflictError, match="cancelled"):
        await store.send_signal("r1", "more", "3", None, 1900)
    with pytest.raises(NotFoundError):
        await store.send_signal("nope", "more", "3", None, 1900)


async def test_consume_and_reject_are_fenced(store):
    await store.create_runs([new_run("r1")])
    g = (await claim(store, now=1000, until=2000)).lease_generation
    await store.send_signal("r1", "go", "bad", "s-1", 1100)
    key, _ = await store.next_signal("r1", "go")
    log = LogRecord("r1", "go", "warning", "payload refused", '{"why": 1}', 1200)
    assert await store.consume_signal(key, step("r1", 0, "go", kind="signal"), g + 1, 1200) is False
    assert await store.reject_signal(key, g + 1, log) is False
    assert await store.next_signal("r1", "go") == (key, "bad")  # kept for the lease holder
    assert await store.list_steps("r1") == []
    assert await store.reject_signal(key, g, log) is True
    assert await store.next_signal("r1", "go") is None
    assert await store.list_logs("r1") == [log]
    # The rejected signal's id may be sent again.
    assert (await store.send_signal("r1", "go", "good", "s-1", 1300))[0] == "stored"


async def test_resume_run_archives_the_failed_step_and_starts_a_fresh_retry_budget(store):
    await store.create_runs([new_run("r1", key="k")])
    g = (await claim(store, now=1000)).lease_generation
    await store.record_step(step("r1", 0, "a"), g)
    await store.wait_run(
        "r1",
        g,
        until=1100,
        reason="retry",
        step_name="b",
        now=1050,
        failed_attempt=step("r1", 1, "b", status="failed"),
    )
    g = (await claim(store, now=1100)).lease_generation
    await store.finish_run(
        "r1", g, status="failed", output_json=None, error_json='{"m": 1}',
        failed_step=step("r1", 1, "b", status="failed", attempt=2), drop_step_outputs=False, now=1200,
    )  # fmt: skip
    await store.create_runs([new_run("r2", key="k", at=1210)])
    with pytest.raises(ConflictError, match="already pending"):
        await store.resume_run("r1", 1220)
    await store.cancel_run("r2", 1250)
    resumed = await store.resume_run("r1", 1300)
    assert (
        resumed.status,
        resumed.available_at,
        resumed.error_json,
        resumed.completed_at,
        resumed.attempt,
    ) == (
        "pending",
        1300,
        None,
        None,
        2,
    )
    assert [s.name for s in await store.list_steps("r1")] == ["a"]
    assert [(s.index, s.attempt) for s in await store.list_step_attempts("r1")] == [(1, 1), (1, 2)]
    assert await store.count_step_attempts("r1") == {1: (2, 0)}
    with pytest.raises(ConflictError, match="pending"):
        await store.resume_run("r1", 1400)
    with pytest.raises(NotFoundError):
        await store.resume_run("nope", 1400)


async def test_resume_refuses_a_cancelled_run_still_stopping_or_a_key_with_a_pending_run(store):
    await store.create_runs([new_run("r1", key="k")])
    g = (await claim(store, now=1000, until=5000)).lease_generation
    await store.cancel_run("r1", 1100)
    with pytest.raises(ConflictError, match="still stopping"):
        await store.resume_run("r1", 1200)
    await store.create_runs([new_run("r2", key="k", at=1300)])
    await store.release_run("r1", g, 1400)
    with pytest.raises(ConflictError, match="already pending"):
        await store.resume_run("r1", 1500)
    await store.cancel_run("r2", 1600)
    assert (await store.resume_run("r1", 1700)).status == "pending"


async def test_fork_run_copies_the_completed_steps_before_the_fork_point(store):
    await store.create_runs([new_run("src", labels={"a": "b"})])
    g = (await claim(store)).lease_generation
    for i, name in enumerate(["one", "two", "three"]):
        await store.record_step(step("src", i, name), g)
    await finish(store, "src", g)
    fork = NewRun("fork", "job", '{"n": 2}', {"a": "b"}, None, None, False, 3000, forked_from="src")
    created = await store.fork_run(fork, "src", "three")
    assert (created.id, created.status, created.forked_from, created.labels) == (
        "fork",
        "pending",
        "src",
        {"a": "b"},
    )
    assert await store.get_run("fork") == created
    assert [(s.index, s.name) for s in await store.list_steps("fork")] == [(0, "one"), (1, "two")]
    with pytest.raises(NotFoundError, match="no recorded step"):
        await store.fork_run(dataclasses.replace(fork, id="fork2"), "src", "four")
    with pytest.raises(NotFoundError):
        await store.fork_run(dataclasses.replace(fork, id="fork2"), "nope", "one")


async def test_fork_refuses_a_run_whose_step_outputs_were_dropped(store):
    await store.create_runs([new_run("src")])
    g = (await claim(store)).lease_generation
    await store.record_step(step("src", 0, "one"), g)
    await store.record_step(step("src", 1, "two"), g)
    await store.finish_run(
        "src",
        g,
        status="completed",
        output_json="1",
        error_json=None,
        failed_step=None,
        drop_step_outputs=True,
        now=2000,
    )
    fork = NewRun("fork", "job", "null", {}, None, None, False, 3000, forked_from="src")
    with pytest.raises(ConflictError, match="dropped"):
        await store.fork_run(fork, "src", "two")
    assert (await store.fork_run(fork, "src", "one")).id == "fork"  # nothing to copy before "one"


async def test_logs_are_appended_in_order_and_need_their_run(store):
    await store.create_runs([new_run("r1")])
    logs = [
        LogRecord("r1", None, "info", "first", None, 1000),
        LogRecord("r1", "s", "error", "second", '{"a": 1}', 1001),
    ]
    for log in logs:
        await store.append_log(log)
    assert await store.list_logs("r1") == logs
    assert await store.list_logs("nope") == []
    with pytest.raises(StorageError):
        await store.append_log(LogRecord("nope", None, "info", "orphan", None, 1000))


# --- the same scenario on SQLite and PostgreSQL ---------------------------------------------------


async def _call(store: Store, method: str, *args: Any, **kwargs: Any) -> Any:
    """Call a store method, whether it is a coroutine (this interface) or still synchronous."""
    try:
        result = getattr(store, method)(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
    except (ConflictError, NotFoundError) as exc:
        return type(exc).__name__
    if isinstance(result, list):
        return [dataclasses.asdict(item) if dataclasses.is_dataclass(item) else item for item in result]
    return dataclasses.asdict(result) if dataclasses.is_dataclass(result) else result


SCENARIO: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    (
        "create_runs",
        ([new_run("a", key="k", labels={"x": "1"}), new_run("b", idem="i"), new_run("c", at=900)],),
        {},
    ),
    ("create_runs", ([new_run("d", idem="i"), new_run("e", key="k", coalesce=True)],), {}),
    ("create_runs", ([new_run("f", key="k")],), {}),
    ("claim_run", (), {"worker_id": "w", "job_names": ["job"], "now": 1100, "lease_until": 2000}),
    ("claim_run", (), {"worker_id": "w", "job_names": ["job"], "now": 1100, "lease_until": 2000}),
    ("create_runs", ([new_run("g", key="k", at=1150)],), {}),
    ("claim_run", (), {"worker_id": "w", "job_names": ["job"], "now": 1200, "lease_until": 2000}),
    ("claim_run", (), {"worker_id": "w", "job_names": ["job"], "now": 1200, "lease_until": 2000}),
    ("record_step", (step("a", 0, "s1"), 1), {}),
    ("set_progress", ("a", 1, 1, 3, "one of three", 1250), {}),
    ("append_log", (LogRecord("a", "s1", "info", "hi", None, 1260),), {}),
    (
        "wait_run",
        ("a", 1),
        {
            "until": 1500,
            "reason": "retry",
            "step_name": "s2",
            "now": 1300,
            "failed_attempt": step("a", 1, "s2", status="failed"),
        },
    ),
    ("claim_run", (), {"worker_id": "w2", "job_names": ["job"], "now": 1300, "lease_until": 3000}),
    ("send_signal", ("b", "go", '{"p": 1}', "sig", 1310), {}),
    ("send_signal", ("b", "go", '{"p": 2}', "sig", 1311), {}),
    ("wait_run", ("b", 1), {"until": NEVER_MS, "reason": "signal", "step_name": "go", "now": 1320}),
    ("next_signal", ("b", "go"), {}),
    ("claim_run", (), {"worker_id": "w2", "job_names": ["job"], "now": 1330, "lease_until": 3000}),
    ("consume_signal", (1, step("b", 0, "go", kind="signal"), 2, 1340), {}),
    (
        "finish_run",
        ("b", 2),
        {
            "status": "failed",
            "output_json": None,
            "error_json": "{}",
            "failed_step": step("b", 1, "x", status="failed"),
            "drop_step_outputs": False,
            "now": 1350,
        },
    ),
    ("resume_run", ("b", 1360), {}),
    ("count_step_attempts", ("b",), {}),
    ("list_step_attempts", ("b",), {}),
    ("cancel_run", ("c", 1370), {}),
    ("release_run", ("c", 1, 1380), {}),
    ("renew_leases", ([("a", 1), ("g", 1), ("c", 1)], 1390, 4000), {}),
    ("expire_leases", (1400,), {}),
    ("claim_run", (), {"worker_id": "w3", "job_names": ["job"], "now": 1500, "lease_until": 5000}),
    ("claim_run", (), {"worker_id": "w3", "job_names": ["job"], "now": 1500, "lease_until": 5000}),
    ("claim_run", (), {"worker_id": "w3", "job_names": ["job"], "now": 1500, "lease_until": 5000}),
    ("record_step", (step("a", 1, "s2"), 2), {}),
    ("record_step", (step("a", 2, "s3"), 2), {}),
    (
        "finish_run",
        ("a", 2),
        {
            "status": "completed",
            "output_json": "3",
            "error_json": None,
            "failed_step": None,
            "drop_step_outputs": False,
            "now": 1550,
        },
    ),
    ("delete_run", ("c",), {}),
    ("delete_run", ("nope",), {}),
    ("fork_run", (NewRun("h", "job", "null", {}, None, None, False, 1600, forked_from="a"), "a", "s3"), {}),
    ("fork_run", (NewRun("i", "job", "null", {}, None, None, False, 1600, forked_from="a"), "a", "zz"), {}),
    ("list_runs", (RunFilter(),), {}),
    ("list_runs", (RunFilter(labels={"x": "1"}, statuses=["leased", "waiting"]),), {}),
    ("list_steps", ("a",), {}),
    ("list_steps", ("h",), {}),
    ("list_logs", ("a",), {}),
    ("purge_runs", (1551, None), {}),
    ("list_runs", (RunFilter(limit=2, offset=1),), {}),
]


async def test_the_same_calls_give_the_same_answers_on_sqlite_and_postgresql(store, tmp_path):
    reference = open_store(f"sqlite:///{tmp_path / 'reference.db'}")
    try:
        await _call(reference, "migrate")
        for method, args, kwargs in SCENARIO:
            expected = await _call(reference, method, *args, **kwargs)
            got = await _call(store, method, *args, **kwargs)
            assert got == expected, f"{method}{args}{kwargs}"
    finally:
        await _call(reference, "close")


# --- many writers at once -------------------------------------------------------------------------


async def test_concurrent_triggers_of_one_idempotency_key_create_one_run(postgres_url):
    stores = [open_store(url_with(postgres_url, pool_size=3)) for _ in range(8)]
    try:
        await stores[0].migrate()

        async def trigger(store: Store, n: int) -> list[tuple[str, str]]:
            # Each item also shares keys across batches, in different orders (no deadlock).
            items = [new_run(f"r{n}-a", idem="one"), new_run(f"r{n}-b", idem=f"pair-{n % 2}")]
            result = await store.create_runs(items if n % 3 else items[::-1])
            return [(record.id, disposition) for record, disposition in result]

        results = await asyncio.gather(*(trigger(stores[n % 8], n) for n in range(40)))
    finally:
        await asyncio.gather(*(store.close() for store in stores))
    flat = [item for result in results for item in result]
    ones = {run_id for run_id, _ in flat if run_id.endswith("-a")}
    assert len(ones) == 1
    assert sum(1 for _, disposition in flat if disposition == "created") == 3  # "one", "pair-0", "pair-1"
    rows = await sql(postgres_url, "SELECT idempotency_key, count(*) FROM durably_runs GROUP BY 1 ORDER BY 1")
    assert rows == [("one", 1), ("pair-0", 1), ("pair-1", 1)]


async def test_concurrent_triggers_of_one_concurrency_key_coalesce_or_conflict_cleanly(postgres_url):
    stores = [open_store(url_with(postgres_url, pool_size=2)) for _ in range(6)]
    try:
        await stores[0].migrate()

        async def trigger(store: Store, n: int) -> str:
            try:
                ((_, disposition),) = await store.create_runs(
                    [new_run(f"r{n}", key="k", coalesce=n % 2 == 0)]
                )
            except ConflictError:
                return "conflict"
            return disposition

        outcomes = await asyncio.gather(*(trigger(stores[n % 6], n) for n in range(30)))
    finally:
        await asyncio.gather(*(store.close() for store in stores))
    assert outcomes.count("created") == 1
    assert set(outcomes) <= {"created", "coalesced", "conflict"}
    assert await sql(postgres_url, "SELECT count(*) FROM durably_runs") == [(1,)]


async def test_claimers_on_many_stores_never_run_two_runs_of_one_key_at_once(postgres_url):
    """8 stores (8 pools) claim, finish, release and re-wait 50 runs over 5 keys as fast as they can.

    Each key has many claimable runs at once (waiting runs, due now, are not limited to one per
    key as pending runs are), so claimers race for different runs of one key. After every claim
    the database must show at most one live lease per key, and the claimers' own intervals
    (claim returned .. finish sent) of one key must never overlap.
    """
    keys = [f"key{k}" for k in range(5)]
    setup = open_store(postgres_url)
    await setup.migrate()
    now_ms = int(time.time() * 1000)
    for i in range(50):
        run_id = f"run{i:02d}"
        await setup.create_runs([new_run(run_id, key=keys[i % 5], at=now_ms - 1000)])
        # Claim it and make it wait (its key is then free for the next pending run)...
        record = await setup.claim_run(
            worker_id="setup", job_names=["job"], now=now_ms, lease_until=now_ms + 60_000
        )
        assert record is not None and record.id == run_id
        assert await setup.wait_run(
            run_id, record.lease_generation, until=NEVER_MS, reason="sleep", step_name="s", now=now_ms
        )
    await setup.close()
    # ... then make every wait due at once: ten claimable runs per key.
    await sql(postgres_url, "UPDATE durably_runs SET available_at = 0")

    stores = [open_store(url_with(postgres_url, pool_size=2)) for _ in range(8)]
    intervals: dict[str, list[tuple[float, float, str]]] = {key: [] for key in keys}
    violations: list[Any] = []
    claims = 0
    rng = random.Random(1234)

    async def worker(store: Store, name: str) -> None:
        nonlocal claims
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = int(time.time() * 1000)
            record = await store.claim_run(
                worker_id=name, job_names=["job"], now=now, lease_until=now + 30_000
            )
            if record is None:
                remaining = await sql(
                    postgres_url, "SELECT count(*) FROM durably_runs WHERE status <> 'completed'"
                )
                if remaining == [(0,)]:
                    return
                await asyncio.sleep(0.002)
                continue
            claimed_at = time.monotonic()
            claims += 1
            # Held leases only (lease_owner set), live by the clock now: a run released while
            # another run of its key was pending stays 'leased' with lease_expires_at = the
            # releaser's clock, which may be later than this claimer's earlier reading without
            # the lease being live for anyone.
            live = await sql(
                postgres_url,
                "SELECT concurrency_key, array_agg(id) FROM durably_runs "
                "WHERE status IN ('leased', 'cancelled') AND lease_owner IS NOT NULL "
                "AND lease_expires_at > %s "
                "GROUP BY concurrency_key HAVING count(*) > 1",
                (int(time.time() * 1000),),
            )
            if live:
                violations.append(live)
            await asyncio.sleep(rng.random() * 0.003)
            action = rng.random()
            finished_at = time.monotonic()
            later = int(time.time() * 1000)
            if action < 0.6:
                assert await finish(store, record.id, record.lease_generation, now=later)
            elif action < 0.8:
                await store.release_run(record.id, record.lease_generation, later)
            else:
                assert await store.wait_run(
                    record.id, record.lease_generation, until=0, reason="sleep", step_name="s", now=later
                )
            intervals[record.concurrency_key].append((claimed_at, finished_at, record.id))

    try:
        await asyncio.gather(*(worker(store, f"w{n}") for n, store in enumerate(stores)))
    finally:
        await asyncio.gather(*(store.close() for store in stores))
    assert violations == []
    assert await sql(postgres_url, "SELECT count(*) FROM durably_runs WHERE status = 'completed'") == [(50,)]
    assert claims >= 50
    for key, spans in intervals.items():
        spans.sort()
        for (_, end, first), (start, _, second) in itertools.pairwise(spans):
            assert start >= end, f"{key}: {second} was claimed while {first} still ran"


async def test_making_runs_of_one_key_pending_from_many_stores_never_hits_the_unique_index(postgres_url):
    """Triggers, releases and resumes all make runs of one key pending, and at most one may be.

    Under the keys' advisory locks each one sees the others' pending run and coalesces, stays
    leased or is refused with ConflictError: a race that reached the unique index would be a
    StorageError (a driver error), which must never happen.
    """
    stores = [open_store(url_with(postgres_url, pool_size=2)) for _ in range(6)]
    await stores[0].migrate()
    rng = random.Random(99)
    errors: list[str] = []
    counter = 0

    async def worker(store: Store, name: str) -> None:
        nonlocal counter
        for _ in range(60):
            now = int(time.time() * 1000)
            key = f"k{rng.randrange(2)}"
            try:
                action = rng.random()
                if action < 0.35:
                    counter += 1
                    await store.create_runs([new_run(f"{name}-{counter}", key=key, coalesce=True, at=now)])
                elif action < 0.5:
                    for record in await store.list_runs(RunFilter(statuses=["cancelled", "failed"], limit=3)):
                        with contextlib.suppress(ConflictError):
                            await store.resume_run(record.id, now)
                else:
                    record = await store.claim_run(
                        worker_id=name, job_names=["job"], now=now, lease_until=now + 30_000
                    )
                    if record is not None:
                        choice = rng.random()
                        if choice < 0.5:
                            await store.release_run(record.id, record.lease_generation, now)
                        elif choice < 0.75:
                            await store.cancel_run(record.id, now)
                            await store.release_run(record.id, record.lease_generation, now)
                        else:
                            await finish(store, record.id, record.lease_generation, status="failed", now=now)
            except StorageError as exc:
                errors.append(str(exc))

    try:
        await asyncio.gather(*(worker(store, f"w{n}") for n, store in enumerate(stores)))
    finally:
        await asyncio.gather(*(store.close() for store in stores))
    assert errors == []
    pending = await sql(
        postgres_url, "SELECT concurrency_key, count(*) FROM durably_runs WHERE status = 'pending' GROUP BY 1"
    )
    assert all(count == 1 for _, count in pending)


async def test_a_claim_passes_over_a_key_whose_lock_another_transaction_holds(store, postgres_url):
    import psycopg

    await store.create_runs([new_run("a1", key="busy"), new_run("b1", at=1001)])
    async with await psycopg.AsyncConnection.connect(postgres_url) as other:
        # Another claim (or trigger) of key "busy" in flight: its advisory lock is taken.
        lock = "durably-web\x1fpublic\x1fc\x1fbusy"
        await other.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (lock,))
        assert (await claim(store)).id == "b1"  # a1 is passed over, without waiting
        assert await claim(store) is None
        await other.rollback()
    assert (await claim(store)).id == "a1"


async def test_a_step_write_waits_for_a_takeover_in_flight_and_then_is_fenced(store, postgres_url):
    import psycopg

    await store.create_runs([new_run("r1")])
    g = (await claim(store, now=1000, until=2000)).lease_generation
    async with await psycopg.AsyncConnection.connect(postgres_url) as other:
        # A takeover (claim_run's lease UPDATE) not yet committed.
        await other.execute("UPDATE durably_runs SET lease_generation = lease_generation + 1 WHERE id = 'r1'")
        write = asyncio.create_task(store.record_step(step("r1", 0, "s"), g))
        await asyncio.sleep(0.3)
        assert not write.done()  # it waits for the takeover instead of writing under the old lease
        await other.commit()
        assert await write is False
    assert await store.list_steps("r1") == []


async def test_a_signal_committed_while_the_run_starts_waiting_makes_the_wait_due(store, postgres_url):
    import psycopg

    await store.create_runs([new_run("r1")])
    g = (await claim(store)).lease_generation
    async with await psycopg.AsyncConnection.connect(postgres_url) as other:
        # send_signal in flight: it has locked the run row and inserted the signal.
        await other.execute("SELECT 1 FROM durably_runs WHERE id = 'r1' FOR UPDATE")
        await other.execute(
            "INSERT INTO durably_signals (run_id, name, payload, created_at) VALUES ('r1', 'go', '1', 1200)"
        )
        wait = asyncio.create_task(
            store.wait_run("r1", g, until=NEVER_MS, reason="signal", step_name="go", now=1300)
        )
        await asyncio.sleep(0.3)
        assert not wait.done()
        await other.commit()
        assert await wait is True
    assert (await store.get_run("r1")).available_at == 1300  # due now, not never


# --- LISTEN / NOTIFY ------------------------------------------------------------------------------


async def test_watch_changes_hears_changes_made_by_another_store(store, postgres_url):
    other = open_store(postgres_url)
    heard: list[tuple[str, str]] = []
    second: list[tuple[str, str]] = []
    try:
        assert store.notifies_changes is True
        stop = await store.watch_changes(lambda run_id, status: heard.append((run_id, status)))
        stop_second = await store.watch_changes(lambda run_id, status: second.append((run_id, status)))
        await other.create_runs([new_run("r1"), new_run("r2", at=1001)])
        record = await claim(other)
        await finish(other, "r1", record.lease_generation)
        r2 = await claim(other)
        await other.wait_run(
            "r2", r2.lease_generation, until=NEVER_MS, reason="signal", step_name="go", now=1200
        )
        await other.send_signal("r2", "go", "1", None, 1300)
        await other.cancel_run("r2", 1400)
        await other.resume_run("r2", 1500)
        expected = [
            ("r1", "pending"),
            ("r2", "pending"),
            ("r1", "leased"),
            ("r1", "completed"),
            ("r2", "leased"),
            ("r2", "waiting"),
            ("r2", "waiting"),  # the signal made it due
            ("r2", "cancelled"),
            ("r2", "pending"),
        ]
        await wait_until(lambda: len(heard) >= len(expected))
        assert heard == expected and second == expected
        # A rolled-back change is never announced.
        with pytest.raises(ConflictError):
            await other.create_runs([new_run("r3"), new_run("r4", key="k"), new_run("r5", key="k")])
        stop()
        await other.create_runs([new_run("r6")])
        await wait_until(lambda: ("r6", "pending") in second)
        assert len(heard) == len(expected) and ("r3", "pending") not in second
        stop_second()
        stop()  # twice: harmless
    finally:
        await other.close()


async def test_each_claim_and_finish_is_announced_once_on_either_path(store, postgres_url):
    # A run without a key is claimed (and finished) in one statement; one with a key, or a
    # failed run with its failed step, in a transaction after the one statement found it.
    listener = open_store(postgres_url)
    heard: list[tuple[str, str]] = []
    try:
        await listener.watch_changes(lambda run_id, status: heard.append((run_id, status)))
        await store.create_runs([new_run("k1", key="k"), new_run("u1", at=1001)])
        keyed = await claim(store)
        unkeyed = await claim(store)
        assert (keyed.id, unkeyed.id) == ("k1", "u1")
        assert await claim(store) is None
        assert await finish(store, "u1", unkeyed.lease_generation)
        assert await store.finish_run(
            "k1",
            keyed.lease_generation,
            status="failed",
            output_json=None,
            error_json='{"message": "boom"}',
            failed_step=step("k1", 0, "s", status="failed"),
            drop_step_outputs=False,
            now=2000,
        )
        assert not await finish(store, "u1", unkeyed.lease_generation)  # already finished
        expected = [
            ("k1", "pending"),
            ("u1", "pending"),
            ("k1", "leased"),
            ("u1", "leased"),
            ("u1", "completed"),
            ("k1", "failed"),
        ]
        await wait_until(lambda: len(heard) >= len(expected))
        await asyncio.sleep(0.1)  # nothing more arrives
        assert heard == expected
    finally:
        await listener.close()


async def test_a_durably_reads_a_run_changed_elsewhere_only_for_an_event_it_listens_for(postgres_url):
    # Each process hears every other one's changes; reading the run for each (to build an
    # event nobody wants) cost every worker two queries per run done elsewhere.
    from durably_web import Durably, StepContext, define_job

    @define_job("one-step")
    async def one_step(step: StepContext, payload: dict) -> None:
        await step.run("only", lambda: None)

    async with (
        Durably(postgres_url, worker=False) as watcher,
        Durably(postgres_url, jobs=[one_step]) as worker,
    ):
        reads: list[str] = []
        read = watcher.store.get_run

        async def counted(run_id: str) -> Any:
            reads.append(run_id)
            return await read(run_id)

        watcher.store.get_run = counted  # type: ignore[method-assign]
        completed: list[str] = []
        watcher.on("run:complete", lambda event: completed.append(event.run_id))
        run = await worker.trigger(one_step, {})  # pending, leased, completed: heard by the watcher
        await wait_until(lambda: completed == [run.id])
        assert reads == [run.id]  # for run:complete only


async def test_a_run_created_leased_is_announced_once_as_started(store, postgres_url):
    listener = open_store(postgres_url)
    heard: list[tuple[str, str]] = []
    try:
        await listener.watch_changes(lambda run_id, status: heard.append((run_id, status)))
        created = NewRun("s1", "job", "{}", {"k": "v"}, None, None, False, 1000)
        await store.create_leased_run(created, worker_id="w1", lease_until=5000)
        await finish(store, "s1", 1)
        await wait_until(lambda: len(heard) >= 2)
        await asyncio.sleep(0.1)  # nothing more arrives
        assert heard == [("s1", "started"), ("s1", "completed")]
    finally:
        await listener.close()


async def test_other_processes_see_a_run_started_at_once_triggered_then_leased(postgres_url):
    from durably_web import Durably, StepContext, define_job

    @define_job("one-step")
    async def one_step(step: StepContext, payload: dict) -> None:
        await step.run("only", lambda: None)

    async with (
        Durably(postgres_url, worker=False) as watcher,
        Durably(postgres_url, jobs=[one_step], polling_interval=0.05) as worker,
    ):
        seen: list[tuple[str, str | None]] = []
        for kind in ("run:trigger", "run:leased", "run:complete"):
            watcher.on(kind, lambda event: seen.append((event.type, event.run_id)))
        assert worker._worker is not None
        await wait_until(lambda: worker._worker.found_nothing_to_claim)
        run = await worker.trigger_and_wait(one_step, {}, timeout=30)
        assert run.started_at == run.created_at  # it was started at once
        await wait_until(lambda: ("run:complete", run.id) in seen)
        # The run was still leased when the watcher read it, or already done: either way its
        # trigger comes first and its end last.
        assert seen[0] == ("run:trigger", run.id) and seen[-1] == ("run:complete", run.id), seen
        assert set(seen) <= {("run:trigger", run.id), ("run:leased", run.id), ("run:complete", run.id)}


async def test_a_failing_listener_does_not_stop_the_others(store, postgres_url, caplog):
    heard: list[str] = []

    def broken(run_id: str, status: str) -> None:
        raise RuntimeError("listener bug")

    await store.watch_changes(broken)
    await store.watch_changes(lambda run_id, status: heard.append(run_id))
    other = open_store(postgres_url)  # another process's change: a store hears no echo of its own
    try:
        with caplog.at_level(logging.ERROR, logger="durably_web"):
            await other.create_runs([new_run("r1")])
            await wait_until(lambda: heard == ["r1"])
    finally:
        await other.close()
    assert "listener failed" in caplog.text


async def test_close_stops_the_listener_and_leaves_no_task_or_connection(postgres_url):
    store = open_store(url_with(postgres_url, application_name="durably_close_test"))
    await store.migrate()
    await store.watch_changes(lambda run_id, status: None)
    assert await sql(
        postgres_url, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'durably_close_test'"
    ) >= [(2,)]
    await store.close()
    await store.close()  # twice: harmless
    assert [task for task in asyncio.all_tasks() if task is not asyncio.current_task()] == []
    rows = await sql(
        postgres_url, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'durably_close_test'"
    )
    assert rows == [(0,)]
    with pytest.raises(StorageError, match="closed"):
        await store.get_run("r1")
    with pytest.raises(StorageError, match="closed"):
        await store.watch_changes(lambda run_id, status: None)


async def test_connections_the_server_terminated_are_replaced_and_the_watcher_reconnects(
    postgres_url, caplog
):
    store = open_store(url_with(postgres_url, application_name="durably_kill_test", pool_size=4))
    heard: list[tuple[str, str]] = []
    try:
        await store.migrate()
        await store.create_runs([new_run("r1")])
        await asyncio.gather(*(store.list_runs(RunFilter()) for _ in range(12)))  # several idle connections
        await store.watch_changes(lambda run_id, status: heard.append((run_id, status)))
        with caplog.at_level(logging.INFO, logger="durably_web"):
            killed = await sql(
                postgres_url,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'durably_kill_test'",
            )
            assert len(killed) >= 2  # the pool's and the listener's
            await asyncio.sleep(0.2)  # the server has closed them
            # Not an error: every broken idle connection is discarded on checkout.
            assert (await store.get_run("r1")).status == "pending"
            assert len(await store.list_runs(RunFilter())) == 1
            await wait_until(lambda: ("", "") in heard)
        assert "LISTEN connection lost" in caplog.text
        other = open_store(postgres_url)
        try:
            await other.create_runs([new_run("r2")])
            await wait_until(lambda: ("r2", "pending") in heard)
        finally:
            await other.close()
    finally:
        await store.close()


# --- a server restart -----------------------------------------------------------------------------


@pytest.fixture
def restartable_cluster() -> Any:
    """A cluster of this test's own (the session's stays up), with fsync on: a restart keeps every commit."""
    from support.postgres import start_test_cluster

    cluster = start_test_cluster(fsync=True)
    yield cluster
    cluster.stop()


async def test_a_store_and_its_watcher_survive_a_server_restart_while_workers_are_busy(
    restartable_cluster, caplog
):
    url = restartable_cluster.create_database("restart") + "?pool_timeout=3&pool_size=4"
    store = open_store(url)
    other = open_store(url)
    heard: list[tuple[str, str]] = []
    try:
        await store.migrate()
        await store.watch_changes(lambda run_id, status: heard.append((run_id, status)))
        await other.create_runs([new_run("before", job="idle")])  # no worker runs it
        await wait_until(lambda: ("before", "pending") in heard)

        # Two workers keep triggering, claiming and finishing runs through the restart.
        stop_workers = asyncio.Event()
        done: list[str] = []
        errors: list[str] = []

        async def busy(s: Store, name: str) -> None:
            n = 0
            while not stop_workers.is_set():
                try:
                    now = int(time.time() * 1000)
                    await s.create_runs([new_run(f"{name}-{n}", at=now)])
                    n += 1
                    record = await s.claim_run(
                        worker_id=name, job_names=["job"], now=now, lease_until=now + 60_000
                    )
                    if record is not None and await finish(s, record.id, record.lease_generation, now=now):
                        done.append(record.id)
                except StorageError as exc:
                    errors.append(str(exc))  # the engine's answer: leave the run to be retried
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.01)

        workers = [asyncio.create_task(busy(store, "a")), asyncio.create_task(busy(other, "b"))]
        await wait_until(lambda: len(done) >= 5)
        with caplog.at_level(logging.INFO, logger="durably_web"):
            await asyncio.to_thread(restartable_cluster.stop_server)
            with pytest.raises(StorageError):
                await store.get_run("before")  # down: a StorageError, after pool_timeout at most
            await asyncio.to_thread(restartable_cluster.start_server)
            # The listener is told that it may have missed changes, and hears new ones again.
            await wait_until(lambda: ("", "") in heard, timeout=30)
            started = time.monotonic()
            assert (await store.get_run("before")).status == "pending"  # the next call works
            assert time.monotonic() - started < 5
            before = len(done)
            await wait_until(lambda: len(done) >= before + 5, timeout=30)
            await other.create_runs([new_run("after", job="idle")])
            await wait_until(lambda: ("after", "pending") in heard)
        stop_workers.set()
        await asyncio.gather(*workers)
        assert errors, "the workers should have seen the server go away"
        assert "LISTEN connection lost" in caplog.text
        # Every run a worker finished is still completed after the restart (fsync on).
        for run_id in done:
            assert (await store.get_run(run_id)).status == "completed"
    finally:
        await store.close()
        await other.close()


async def test_an_app_role_without_create_rights_uses_a_schema_migrated_before(
    store, postgres_url, postgres_cluster
):
    # The owner migrated (the store fixture); the app role may only read and write rows.
    dbname = postgres_url.rsplit("/", 1)[1]
    role = f"app_{dbname[-8:]}"
    await sql(postgres_url, f"CREATE ROLE {role} LOGIN")
    await sql(
        postgres_url,
        f"REVOKE CREATE ON SCHEMA public FROM PUBLIC; REVOKE CREATE ON DATABASE {dbname} FROM PUBLIC",
    )
    await sql(postgres_url, f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}")
    await sql(postgres_url, f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}")
    app = open_store(f"postgresql://{role}@{postgres_cluster.host}:{postgres_cluster.port}/{dbname}")
    try:
        await app.migrate()
        await app.check_schema()
        await app.create_runs([new_run("r1")])
        assert (await claim(app)).id == "r1"
        await app.append_log(LogRecord("r1", None, "info", "hello", None, 1200))
        assert (await app.send_signal("r1", "go", "1", None, 1300))[0] == "stored"
    finally:
        await app.close()
        await sql(postgres_url, f"DROP OWNED BY {role}; DROP ROLE {role}")


async def test_text_with_a_nul_character_is_a_storage_error_and_nothing_is_written(store):
    with pytest.raises(StorageError, match="NUL"):
        await store.create_runs([new_run("r1", labels={"a": "b\0c"})])
    assert await store.get_run("r1") is None
