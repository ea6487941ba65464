"""The PostgreSQL store: psycopg 3 (async) over a connection pool; all SQL in ``queries.sql``.

It implements the :class:`~durably_web.storage.base.Store` contract with the semantics of
the SQLite store, method by method. SQLite gets them almost for free: every write
transaction takes the one database write lock, so each read-then-write is atomic. Here
many workers on many hosts write at once under READ COMMITTED, and each statement sees
the data committed when it started. Where that matters:

* **Claims and concurrency keys.** ``claim_run`` picks its candidate with ``FOR UPDATE
  SKIP LOCKED`` (two claimers never take one run, and neither waits for the other), but
  two claimers can pick two *different* runs of one key, each seeing no live lease on the
  key in its snapshot. So a claim of a keyed run first takes the key's transaction-level
  advisory lock and only then checks the key once more, in a new statement (whose snapshot
  includes every lease committed by whoever held the lock before). It only *tries* the
  lock: a key being claimed or written right now is passed over (the next poll or
  notification gets it), so a claim never waits and never deadlocks. A run without a
  key needs none of that: it is found and leased in one statement (one round trip), and
  only a claim whose oldest candidate has a key goes on to that transaction.
* **Who else takes a key's lock.** Every transaction that could make a run of the key
  pending (``create_runs``, ``release_run``, ``resume_run``: the database allows one
  pending run per key, and a race would be a unique violation) or keep a lease alive
  (``renew_leases``) takes it, blocking, sorted, before any row lock.
* **Renewals.** A renewal that read the clock just before its lease expired can reach
  the database just after a claim (with a later clock) took another run of the key. So
  ``renew_leases`` refuses a lease that has expired by ``now`` (the interface says so),
  and also one whose key another run holds a live lease on, under the key's lock.
* **Fenced writes.** An ``UPDATE`` of the run row rechecks its ``WHERE`` on the latest
  version, so it is fenced by itself. A write to another table that is fenced by the run
  row (a step, a dropped signal) locks that row ``FOR SHARE`` in the same statement: a
  takeover's ``UPDATE`` then either committed first (the write sees the new generation and
  does nothing) or waits for the write to commit (and the new owner reads the step).
* **Idempotency keys.** ``create_runs`` takes the advisory locks of its idempotency keys
  too, so a concurrent trigger of the same key waits and then finds the winner's run
  ("idempotent"); ``INSERT … ON CONFLICT DO NOTHING`` backs that up without a raw error.
* **Signals.** ``send_signal`` and ``wait_run`` both lock the run row first, so a signal
  sent while the run is about to wait is either seen by the wait or wakes it.

Every method that creates a run or changes its status, or makes it claimable without
changing it (a signal delivered, a lease released or expired), sends
``pg_notify(channel, '<run id> <status>')`` inside its transaction (delivered at commit,
never for a rolled-back change); :meth:`watch_changes` listens on a dedicated connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import select
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ...errors import ConflictError, ExistingRunRefusedError, NotFoundError, SchemaVersionError, StorageError
from ..base import (
    NEVER_MS,
    ChangeListener,
    JobLimits,
    LogRecord,
    NewRun,
    RunFilter,
    RunRecord,
    ScheduleRecord,
    StepRecord,
    Store,
)
from ..flow import flow_limits_of
from ..rows import (
    check_leased_insert,
    leased_run_record,
    new_run_record,
    run_from_row,
    schedule_from_row,
    schedule_params,
    step_from_row,
)
from ..run_list import list_runs_query
from .options import PostgresOptions

logger = logging.getLogger("durably_web")

Connection = psycopg.AsyncConnection[DictRow]
Row = dict[str, Any]

_NAME_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def _load_queries() -> dict[str, str]:
    text = resources.files(__package__).joinpath("queries.sql").read_text(encoding="utf-8")
    parts = _NAME_HEADER.split(text)[1:]
    return {name: body.strip() for name, body in zip(parts[::2], parts[1::2], strict=True)}


def _load_migrations() -> list[tuple[int, str]]:
    folder = resources.files(__package__).joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.read_text(encoding="utf-8")))
    return sorted(found)


Q = _load_queries()
MIGRATIONS = _load_migrations()
SCHEMA_VERSION = MIGRATIONS[-1][0]

#: The advisory lock every migration holds ("durably" in ASCII): one constant, so every
#: process agrees on it whatever its version; migrations of different schemas in one
#: database merely take turns.
MIGRATION_LOCK = int.from_bytes(b"durably\0", "big")
#: How many candidates one claim looks at before it gives up until the next poll (each
#: one passed over was being claimed, or its key taken, by someone else meanwhile).
_CLAIM_CANDIDATES = 10
#: The LISTEN connection: after this many quiet seconds it is checked with a query (a
#: server that vanished without closing the socket would otherwise go unnoticed).
_LISTEN_CHECK_SECONDS = 30.0
_RECONNECT_FIRST, _RECONNECT_MAX = 0.1, 5.0


def channel_name(schema: str) -> str:
    """The NOTIFY channel of a schema's store: apps in other schemas of the database do not hear it."""
    name = f"durably_changes_{schema}"
    # A channel name is an identifier (at most 63 bytes); schema names are ASCII.
    return name if len(name) <= 63 else f"durably_changes_{hashlib.sha256(schema.encode()).hexdigest()[:32]}"


def _refuse_newer_schema(current: int) -> None:
    if current > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"this database has schema version {current}, but this durably-web "
            f"understands up to {SCHEMA_VERSION}; upgrade durably-web to open it",
            found=current,
            expected=SCHEMA_VERSION,
        )


def _storage_error(exc: BaseException, context: str = "PostgreSQL error") -> StorageError:
    detail = str(exc).strip() or type(exc).__name__
    sqlstate = getattr(exc, "sqlstate", None)
    return StorageError(f"{context}: {detail}" + (f" (SQLSTATE {sqlstate})" if sqlstate else ""))


class _Rollback(Exception):
    """Raised inside a transaction to undo it (the caller reports ``False``)."""


async def _one(conn: Connection, name: str, params: dict[str, Any] | None = None) -> Row | None:
    cursor = await conn.execute(Q[name], params)
    return await cursor.fetchone()


async def _all(
    conn: Connection, name: str, params: dict[str, Any] | None = None, *, prepare: bool | None = None
) -> list[Row]:
    cursor = await conn.execute(Q[name], params, prepare=prepare)
    return await cursor.fetchall()


async def _count(conn: Connection, name: str, params: dict[str, Any] | None = None) -> int:
    """Run a statement; return how many rows it changed (or, for a SELECT, returned)."""
    cursor = await conn.execute(Q[name], params)
    return cursor.rowcount


class PostgresStore(Store):
    """Runs, steps and logs in one schema of a PostgreSQL database, shared by any number of processes.

    Nothing connects until the first call (or :meth:`open`); :meth:`close` closes the pool
    and the LISTEN connection.
    """

    notifies_changes = True
    #: Every write is durable when its COMMIT returns: nothing for ``wait_durable`` to wait for
    #: (the engine reads this attribute of SQLite's store, which has a deferred mode).

    def __init__(self, options: PostgresOptions, *, read_only: bool = False) -> None:
        self._options = options
        self._read_only = read_only
        self.schema = options.schema
        self.channel = channel_name(options.schema)
        # Signs this instance's notifications, so its own listeners skip them (its callers'
        # own events already cover what it did).
        self._origin = uuid.uuid4().hex
        # Advisory lock names. They are database-wide, so the schema is part of them: apps in
        # two schemas never wait for each other's keys. \x1f (unit separator) cannot occur in
        # a schema name and will not in practice in a job name.
        self._concurrency_ns = f"durably-web\x1f{options.schema}\x1fc\x1f"
        # Flow control: one advisory lock per limited job, taken by claims of that job.
        self._job_limit_ns = f"durably-web\x1f{options.schema}\x1fj\x1f"
        self._idempotency_ns = f"durably-web\x1f{options.schema}\x1fi\x1f"
        self._pool: AsyncConnectionPool[Connection] | None = None
        self._opening = asyncio.Lock()
        self._closed = False
        self._listeners: list[ChangeListener] = []
        self._watch_task: asyncio.Task[None] | None = None
        self._watch_lock = asyncio.Lock()

    # --- connections ----------------------------------------------------------------------
    async def open(self) -> None:
        """Connect the pool now (every method does it on first use); ``StorageError`` if that fails."""
        await self._get_pool()

    async def _get_pool(self) -> AsyncConnectionPool[Connection]:
        if self._pool is not None:
            return self._pool
        async with self._opening:
            if self._closed:
                raise StorageError("this PostgreSQL store is closed")
            if self._pool is None:
                self._pool = await self._open_pool()
            return self._pool

    async def _open_pool(self) -> AsyncConnectionPool[Connection]:
        options = self._options
        # One plain connection first: a wrong host, database or password then fails at once
        # with libpq's own words, where the pool would retry in the background until its
        # timeout and report only that it timed out.
        try:
            probe = await psycopg.AsyncConnection.connect(options.conninfo)
        except psycopg.Error as exc:
            raise _storage_error(exc, f"cannot connect to PostgreSQL at {options.display}") from exc
        await probe.close()
        pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
            options.conninfo,
            connection_class=psycopg.AsyncConnection[DictRow],
            # Autocommit: a lone statement is its own transaction (one round trip); every
            # multi-statement write runs inside an explicit conn.transaction().
            kwargs={"autocommit": True, "row_factory": dict_row},
            min_size=1,
            max_size=options.pool_size,
            open=False,  # opened here, in the running loop (psycopg_pool warns otherwise)
            configure=self._configure,
            # A connection the server dropped (a restart) is discarded on checkout, so the
            # call after the server is back gets a fresh one instead of an error.
            check=self._check,
            timeout=options.pool_timeout,
            # How long the pool keeps retrying to reconnect (backing off: 1 s, 2 s, 4 s, ...)
            # before it waits for demand to try again: as long as a call waits for a
            # connection, so the call after the server is back finds the pool reconnecting.
            reconnect_timeout=options.pool_timeout,
            name=f"durably-web:{options.schema}",
        )
        try:
            await pool.open(wait=True, timeout=options.pool_timeout)
        except BaseException as exc:
            await pool.close()
            if isinstance(exc, psycopg.Error):
                raise _storage_error(exc, f"cannot connect to PostgreSQL at {options.display}") from exc
            raise
        return pool

    async def _check(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """The pool's check of a connection it hands out: raise to have it discarded.

        ``AsyncConnectionPool.check_connection`` costs a round trip, which on the step hot
        path (one statement per step) nearly doubles the cost of a step. An idle connection
        whose server went away (a restart, a crash, a terminated backend) has something to
        read: the server's "terminating connection" message, or the end of the stream. So
        only a connection whose socket is readable while idle gets the full check; a silent
        one is as good as checked (were the server to vanish in between, the call fails with
        ``StorageError`` and the pool discards the broken connection when it comes back).

        One broken connection means the server most likely restarted and broke every idle
        one. The pool retries the checkout after a pause that doubles each time (1 s, 2 s,
        4 s, ...), so finding them one by one would make the first call after a restart wait
        seconds per idle connection; checking them all now discards them (the pool opens
        new ones at once) and the retry gets a fresh connection.
        """
        if not _has_input(conn):
            return
        try:
            await AsyncConnectionPool.check_connection(conn)
        except Exception:
            if self._pool is not None:
                await self._pool.check()
            raise

    async def _configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Every new pool connection: the schema, the statement timeout, read-only if asked."""
        settings = {"search_path": sql.Identifier(self.schema).as_string(conn)}
        if self._options.statement_timeout is not None:
            settings["statement_timeout"] = str(self._options.statement_timeout)
        if self._read_only:
            settings["default_transaction_read_only"] = "on"
        await conn.execute(
            Q["configure_session"], {"names": list(settings), "values": list(settings.values())}
        )

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        """A pool connection in autocommit mode; driver errors leave as ``StorageError``."""
        pool = await self._get_pool()
        try:
            async with pool.connection() as conn:
                yield conn
        except PoolTimeout as exc:
            raise StorageError(
                f"no PostgreSQL connection within {self._options.pool_timeout:g}s "
                f"(is the server at {self._options.display} up?): {exc}"
            ) from exc
        except psycopg.Error as exc:
            raise _storage_error(exc) from exc

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Connection]:
        """One transaction: committed on exit, rolled back by any exception (ours included)."""
        async with self._connection() as conn, conn.transaction():
            yield conn

    async def close(self) -> None:
        self._closed = True
        task, self._watch_task = self._watch_task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])  # it closes its connection on the way out
        self._listeners.clear()
        async with self._opening:
            pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    # --- schema -------------------------------------------------------------------------
    async def migrate(self) -> None:
        async with self._transaction() as conn:
            # Every process starting at once queues here; each one then sees what the one
            # before it committed (READ COMMITTED: the next statement has a fresh snapshot).
            await conn.execute(Q["lock_migrations"], {"key": MIGRATION_LOCK})
            # Create only what is missing: CREATE … IF NOT EXISTS still needs the privilege
            # to create, which an app role of an already migrated schema may lack.
            schema = sql.Identifier(self.schema)
            found = await _one(conn, "schema_exists", {"schema": schema.as_string(conn)})
            if not (found and found["found"]):
                # Not in queries.sql (nor LISTEN below): an identifier cannot be a parameter.
                await conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
            if not await self._has_migrations_table(conn):
                await conn.execute(Q["create_migrations_table"])
            current = await self._schema_version(conn)
            _refuse_newer_schema(current)
            for version, script in MIGRATIONS:
                if version <= current:
                    continue
                # No parameters: psycopg sends the whole script in one simple-protocol message.
                await conn.execute(script.encode("utf-8"), prepare=False)
                await conn.execute(
                    Q["record_migration"], {"version": version, "now": int(time.time() * 1000)}
                )

    async def check_schema(self) -> None:
        """Like :meth:`migrate`, but only reads: fail unless the schema is exactly this version's."""
        async with self._connection() as conn:
            if not await self._has_migrations_table(conn):
                raise SchemaVersionError(
                    f"not a durably-web database (schema {self.schema!r} has no durably_migrations table)",
                    expected=SCHEMA_VERSION,
                )
            current = await self._schema_version(conn)
        _refuse_newer_schema(current)
        if current < SCHEMA_VERSION:
            raise SchemaVersionError(
                f"this database has schema version {current}, older than this durably-web's "
                f"{SCHEMA_VERSION}; it was opened read-only, so it is not migrated (opening it "
                "once for writing does that)",
                found=current,
                expected=SCHEMA_VERSION,
            )

    async def _has_migrations_table(self, conn: Connection) -> bool:
        row = await _one(conn, "has_migrations_table")
        return bool(row and row["found"])

    async def _schema_version(self, conn: Connection) -> int:
        row = await _one(conn, "schema_version")
        return int(row["version"]) if row else 0

    # --- runs ---------------------------------------------------------------------------
    async def create_runs(
        self,
        runs: Sequence[NewRun],
        *,
        accept_existing: Callable[[RunRecord], bool] | None = None,
    ) -> list[tuple[RunRecord, str]]:
        results: list[tuple[RunRecord, str]] = []
        inserted: set[str] = set()
        refused: list[RunRecord] = []

        def resolve(record: RunRecord, disposition: str) -> None:
            # A run this very call inserted (two items sharing a key) needs no verdict.
            if accept_existing is not None and record.id not in inserted and not accept_existing(record):
                if all(r.id != record.id for r in refused):
                    refused.append(record)
            results.append((record, disposition))

        # Every key this batch may create a run for, locked up front in one sorted order:
        # a concurrent trigger of the same key waits here and then finds this batch's run;
        # two batches sharing keys cannot deadlock.
        locks = sorted(
            {self._concurrency_ns + new.concurrency_key for new in runs if new.concurrency_key is not None}
            | {
                f"{self._idempotency_ns}{new.job_name}\x1f{new.idempotency_key}"
                for new in runs
                if new.idempotency_key is not None
            }
        )
        async with self._transaction() as conn:
            if locks:
                await conn.execute(Q["lock_keys"], {"locks": locks})
            for new in runs:
                existing = await self._existing_run_for(conn, new)
                if existing is None:
                    row = await _one(conn, "insert_run", self._insert_params(new))
                    if row is not None:
                        if new.debounce_ms:
                            await conn.execute(
                                Q["delay_new_run"],
                                {"id": new.id, "available_at": new.created_at + new.debounce_ms},
                            )
                        inserted.add(new.id)
                        results.append((new_run_record(new), "created"))
                        continue
                    # A unique index was taken after all. Under the locks above that is only
                    # a writer not following them (an older version?); report what it wrote.
                    existing = await self._existing_run_for(conn, new)
                    if existing is None:
                        raise StorageError(f"cannot create run {new.id!r}: a run with this id already exists")
                resolve(*existing)
            if refused:
                # Raising inside the transaction rolls back every insert of this call.
                raise ExistingRunRefusedError(
                    f"{len(refused)} existing run(s) a key resolved to were refused", records=refused
                )
        return results

    async def _existing_run_for(self, conn: Connection, new: NewRun) -> tuple[RunRecord, str] | None:
        """The run an item's keys resolve to, with its disposition; ``ConflictError`` when refused."""
        if new.idempotency_key is not None:
            row = await _one(
                conn,
                "find_idempotent_run",
                {"job_name": new.job_name, "idempotency_key": new.idempotency_key},
            )
            if row is not None:
                return run_from_row(row), "idempotent"
        if new.concurrency_key is not None:
            row = await _one(
                conn, "find_pending_by_concurrency_key", {"concurrency_key": new.concurrency_key}
            )
            if (
                row is not None
                and new.debounce_ms
                and row["job_name"] == new.job_name
                and row["started_at"] is None
            ):
                debounced = await _one(
                    conn,
                    "debounce_run",
                    {
                        "id": row["id"],
                        "input": new.input_json,
                        "available_at": new.created_at + new.debounce_ms,
                        "now": new.created_at,
                    },
                )
                if debounced is not None:  # the key's lock is held: no claim took it meanwhile
                    return run_from_row(debounced), "debounced"
            if row is not None:
                if not new.coalesce:
                    raise ConflictError(
                        f"run {row['id']} is already pending for concurrency key "
                        f"{new.concurrency_key!r} (pass coalesce='skip' to reuse it)"
                    )
                return run_from_row(row), "coalesced"
        return None

    async def create_leased_run(self, new: NewRun, *, worker_id: str, lease_until: int) -> RunRecord:
        check_leased_insert(new)
        params = self._insert_params(new)
        params.update(worker_id=worker_id, lease_until=lease_until)
        async with self._connection() as conn:  # one statement: its own transaction
            await conn.execute(Q["insert_leased_run"], params)
        return leased_run_record(new, worker_id=worker_id, lease_until=lease_until)

    def _insert_params(self, new: NewRun, *, keys: bool = True) -> dict[str, Any]:
        return {
            "id": new.id,
            "job_name": new.job_name,
            "input": new.input_json,
            "labels": json.dumps(new.labels, separators=(",", ":")),
            "label_keys": list(new.labels),
            "label_values": list(new.labels.values()),
            "idempotency_key": new.idempotency_key if keys else None,
            "concurrency_key": new.concurrency_key if keys else None,
            "created_at": new.created_at,
            "forked_from": new.forked_from,
            "priority": new.priority,
            "trace_parent": new.trace_parent,
            "parent_run_id": new.parent_run_id,
            "deadline_at": new.deadline_at,
            "version": new.version,
            "channel": self.channel,
            "origin": self._origin,
        }

    async def get_run(self, run_id: str) -> RunRecord | None:
        async with self._connection() as conn:
            row = await _one(conn, "get_run", {"id": run_id})
        return None if row is None else run_from_row(row)

    async def list_runs(self, run_filter: RunFilter) -> list[RunRecord]:
        # As SQLite: a negative limit means no limit (LIMIT NULL), a negative offset none.
        sql, params = list_runs_query(run_filter, lambda name: f"%({name})s", no_limit=None)
        async with self._connection() as conn:
            # Never prepared: the statement's text varies with the filter's shape, and a
            # generic plan could not see which statuses and labels a page asks for.
            cursor = await conn.execute(sql, params, prepare=False)
            rows = await cursor.fetchall()
        return [run_from_row(row) for row in rows]

    async def cancel_run(self, run_id: str, now: int) -> RunRecord:
        return (await self.cancel_run_tree(run_id, now))[0]

    async def cancel_run_tree(self, run_id: str, now: int) -> list[RunRecord]:
        notify = {"now": now, "channel": self.channel, "origin": self._origin}
        async with self._transaction() as conn:
            # Every row of the tree locked deepest first (lock_run_tree), the run itself last.
            cursor = await conn.execute(Q["lock_run_tree"], {"id": run_id})
            tree = [run_from_row(row) for row in await cursor.fetchall()]
            if not tree or tree[-1].id != run_id:
                raise NotFoundError(f"run {run_id!r} not found")
            record = tree[-1]
            if record.status in ("completed", "failed"):
                raise ConflictError(f"run {run_id} is already {record.status}; it cannot be cancelled")
            cancelled: list[RunRecord] = []
            for node in tree[:-1]:
                if node.status in ("pending", "leased", "waiting"):
                    row = await _one(conn, "cancel_run", {"id": node.id, **notify})
                    assert row is not None  # the row is locked and cancellable
                    cancelled.append(run_from_row(row))
            if record.status != "cancelled":
                row = await _one(conn, "cancel_run", {"id": run_id, **notify})
                assert row is not None
                record = run_from_row(row)
                await conn.execute(Q["wake_parent"], {"id": run_id, **notify})
        return [record, *reversed(cancelled)]

    async def delete_run(self, run_id: str) -> RunRecord:
        async with self._transaction() as conn:
            record = await self._require(conn, run_id, lock="update")
            if record.status == "leased":
                raise ConflictError(f"run {run_id} is running (leased); cancel it before deleting it")
            child = await _one(conn, "find_active_child", {"id": run_id})
            if child is not None:
                raise ConflictError(
                    f"run {run_id} has a child run still {child['status']} ({child['id']}); "
                    "cancel the run (which cancels its children) or wait for them before deleting it"
                )
            # No clock here: the parent is due from the deleted run's last change (a past time).
            await conn.execute(
                Q["wake_parent"],
                {"id": run_id, "now": record.updated_at, "channel": self.channel, "origin": self._origin},
            )
            await conn.execute(
                Q["delete_run"], {"id": run_id, "channel": self.channel, "origin": self._origin}
            )
        return record

    async def purge_runs(self, completed_before: int, limit: int | None) -> int:
        async with self._connection() as conn:
            return await _count(
                conn,
                "purge_runs",
                {
                    "before": completed_before,
                    "limit": None if limit is None or limit < 0 else limit,
                    "channel": self.channel,
                    "origin": self._origin,
                },
            )

    async def _require(self, conn: Connection, run_id: str, *, lock: str | None = None) -> RunRecord:
        query = {None: "get_run", "update": "get_run_for_update", "share": "get_run_for_share"}[lock]
        row = await _one(conn, query, {"id": run_id})
        if row is None:
            raise NotFoundError(f"run {run_id!r} not found")
        return run_from_row(row)

    # --- worker -------------------------------------------------------------------------
    async def claim_run(
        self,
        *,
        worker_id: str,
        job_names: Sequence[str],
        now: int,
        lease_until: int,
        limits: Mapping[str, JobLimits] | None = None,
        versions: Mapping[str, str] | None = None,
        pinned_versions: Mapping[str, str] | None = None,
    ) -> RunRecord | None:
        names = list(job_names)
        if not names:
            return None
        pinned = json.dumps(dict(pinned_versions or {}))
        lease = {
            "worker_id": worker_id,
            "now": now,
            "lease_until": lease_until,
            "channel": self.channel,
            "origin": self._origin,
            "versions": json.dumps(dict(versions or {})),
            "pinned_versions": pinned,
        }
        flow = flow_limits_of(names, limits)
        if flow:
            return await self._claim_limited(names, flow, lease, now)
        # The fast path: a run without a concurrency key (or nothing to claim) takes one
        # statement, where the transaction below takes four round trips (BEGIN, find,
        # lease, COMMIT). A claim whose oldest candidate has a key pays one more.
        async with self._connection() as conn:
            fast = await _one(
                conn, "claim_unkeyed_run", {**lease, "job_names": names, "pinned_versions": pinned}
            )
        if fast is None:
            return None
        if fast["id"] is not None:
            return run_from_row(fast)
        passed_over: list[str] = []
        async with self._transaction() as conn:
            for _ in range(_CLAIM_CANDIDATES):
                found = await _one(
                    conn,
                    "find_claimable_run",
                    {
                        "now": now,
                        "job_names": names,
                        "passed_over": passed_over,
                        "rate_limited": [],
                        "pinned_versions": pinned,
                    },
                )
                if found is None:
                    return None
                key = found["concurrency_key"]
                if key is not None:
                    # Held until commit. Taken: no other claim of this key is in flight, and
                    # lease_run's fresh snapshot sees every earlier one. Not taken: someone is
                    # claiming, renewing or creating a run of this key right now; pass over
                    # (the run stays locked by this transaction until it ends, harmlessly).
                    locked = await _one(conn, "try_lock", {"lock": self._concurrency_ns + key})
                    if not (locked and locked["locked"]):
                        passed_over.append(found["id"])
                        continue
                row = await _one(conn, "lease_run", {**lease, "id": found["id"]})
                if row is not None:
                    return run_from_row(row)
                passed_over.append(found["id"])  # another run of its key was leased meanwhile
        return None

    async def _claim_limited(
        self, names: list[str], flow: Mapping[str, JobLimits], lease: dict[str, Any], now: int
    ) -> RunRecord | None:
        """A claim where some jobs have flow limits, in one transaction holding each limited
        job's advisory lock (blocking, in sorted order, before any row or key lock): two
        claimers of a limited job take turns, and each counts the other's committed leases
        and starts. A job at ``max_concurrent`` is left out; a job whose rate window is full
        starts no new run. Then as the keyed claim (concurrency keys only *tried*)."""
        async with self._transaction() as conn:
            await conn.execute(Q["lock_keys"], {"locks": [self._job_limit_ns + name for name in flow]})
            counts = await _all(
                conn,
                "count_job_flow",
                {
                    "now": now,
                    "job_names": list(flow),
                    "sinces": [
                        NEVER_MS if limit.rate_window_ms is None else now - limit.rate_window_ms
                        for limit in flow.values()
                    ],
                },
            )
            full: set[str] = set()
            rate_limited: list[str] = []
            for row in counts:
                limit = flow[row["name"]]
                if limit.max_concurrent is not None and row["leased"] >= limit.max_concurrent:
                    full.add(row["name"])
                elif limit.rate_count is not None and row["started"] >= limit.rate_count:
                    rate_limited.append(row["name"])
            names = [name for name in names if name not in full]
            if not names:
                return None
            passed_over: list[str] = []
            for _ in range(_CLAIM_CANDIDATES):
                found = await _one(
                    conn,
                    "find_claimable_run",
                    {
                        "now": now,
                        "job_names": names,
                        "passed_over": passed_over,
                        "rate_limited": rate_limited,
                        "pinned_versions": lease["pinned_versions"],
                    },
                )
                if found is None:
                    return None
                key = found["concurrency_key"]
                if key is not None:
                    locked = await _one(conn, "try_lock", {"lock": self._concurrency_ns + key})
                    if not (locked and locked["locked"]):
                        passed_over.append(found["id"])
                        continue
                leased = await _one(conn, "lease_run", {**lease, "id": found["id"]})
                if leased is not None:
                    return run_from_row(leased)
                passed_over.append(found["id"])
        return None

    async def next_claimable_at(
        self, *, job_names: Sequence[str], limits: Mapping[str, JobLimits], now: int
    ) -> int | None:
        found: list[int] = []
        async with self._connection() as conn:
            row = await _one(conn, "next_pending_available", {"now": now, "job_names": list(job_names)})
            if row is not None and row["at"] is not None:
                found.append(int(row["at"]))
            for name, limit in flow_limits_of(job_names, limits).items():
                if limit.rate_count is None or limit.rate_window_ms is None:
                    continue
                since = now - limit.rate_window_ms
                counted = await _one(conn, "count_job_starts", {"job_name": name, "since": since})
                over = 0 if counted is None else int(counted["n"]) - limit.rate_count
                if over >= 0:
                    # The window frees a start once the (over + 1)-th oldest start in it leaves.
                    start = await _one(
                        conn, "nth_job_start", {"job_name": name, "since": since, "skip": over}
                    )
                    if start is not None:
                        found.append(int(start["started_at"]) + limit.rate_window_ms)
        return min(found) if found else None

    async def renew_leases(
        self, leases: Sequence[tuple[str, int]], now: int, lease_until: int, *, cancelled: bool = False
    ) -> list[str]:
        if not leases:
            return []
        # Sorted by id: two renewals of overlapping runs lock rows in one order.
        ordered = sorted(leases)
        ids = [run_id for run_id, _ in ordered]
        async with self._transaction() as conn:
            keys = sorted(
                row["concurrency_key"] for row in await _all(conn, "concurrency_keys_of_runs", {"ids": ids})
            )
            if keys:
                await conn.execute(Q["lock_keys"], {"locks": [self._concurrency_ns + key for key in keys]})
            rows = await _all(
                conn,
                "renew_leases",
                {
                    "ids": ids,
                    "generations": [generation for _, generation in ordered],
                    "status": "cancelled" if cancelled else "leased",
                    "now": now,
                    "lease_until": lease_until,
                },
            )
        renewed = {row["id"] for row in rows}
        return [run_id for run_id, _ in leases if run_id not in renewed]

    async def release_run(self, run_id: str, generation: int, now: int) -> None:
        async with self._transaction() as conn:
            await conn.execute(Q["lock_concurrency_key_of_run"], {"ns": self._concurrency_ns, "id": run_id})
            await conn.execute(
                Q["release_run"],
                {
                    "id": run_id,
                    "generation": generation,
                    "now": now,
                    "channel": self.channel,
                    "origin": self._origin,
                },
            )

    async def expire_leases(self, now: int) -> int:
        async with self._connection() as conn:
            return await _count(
                conn, "expire_leases", {"now": now, "channel": self.channel, "origin": self._origin}
            )

    async def record_step(self, step: StepRecord, generation: int) -> bool:
        async with self._connection() as conn:
            return await self._record_step(conn, step, generation)

    async def _record_step(self, conn: Connection, step: StepRecord, generation: int) -> bool:
        params = {
            "run_id": step.run_id,
            "seq": step.index,
            "name": step.name,
            "status": step.status,
            "output": step.output_json,
            "error": step.error_json,
            "started_at": step.started_at,
            "completed_at": step.completed_at,
            "kind": step.kind,
            "attempt": step.attempt,
            "metadata": step.metadata_json,
            "generation": generation,
        }
        return await _count(conn, "record_step", params) == 1

    async def wait_run(
        self,
        run_id: str,
        generation: int,
        *,
        until: int,
        reason: str,
        step_name: str,
        now: int,
        failed_attempt: StepRecord | None = None,
        step: StepRecord | None = None,
        deadline: int | None = None,
        failed_attempts: Sequence[StepRecord] = (),
        child_run_id: str | None = None,
    ) -> bool:
        async with self._transaction() as conn:
            if child_run_id is not None:
                await conn.execute(Q["lock_child_for_wait"], {"child_run_id": child_run_id})
            if await _one(conn, "lock_leased_run", {"id": run_id, "generation": generation}) is None:
                return False
            if step is not None and not await self._record_step(conn, step, generation):
                return False
            params = {
                "id": run_id,
                "generation": generation,
                "until": until,
                "reason": reason,
                "step_name": step_name,
                "deadline": deadline,
                "now": now,
                "channel": self.channel,
                "origin": self._origin,
                "child_run_id": child_run_id,
            }
            if await _count(conn, "wait_run", params) == 0:
                return False
            if child_run_id is not None:
                await conn.execute(Q["due_if_child_ended"], params)
            for attempt in [*([] if failed_attempt is None else [failed_attempt]), *failed_attempts]:
                await conn.execute(
                    Q["insert_step_attempt"],
                    {
                        "run_id": run_id,
                        "seq": attempt.index,
                        "name": attempt.name,
                        "attempt": attempt.attempt,
                        "error": attempt.error_json,
                        "started_at": attempt.started_at,
                        "completed_at": attempt.completed_at,
                        "offline": attempt.offline,
                        "metadata": attempt.metadata_json,
                    },
                )
        return True

    async def wake_offline_runs(self, now: int) -> int:
        async with self._transaction() as conn:
            params = {"now": now, "channel": self.channel, "origin": self._origin}
            return await _count(conn, "wake_offline_runs", params)

    async def fail_overdue_runs(
        self, now: int, *, error_json: str, drop_step_outputs: bool
    ) -> list[RunRecord]:
        params = {"now": now, "error": error_json, "channel": self.channel, "origin": self._origin}
        if not drop_step_outputs:
            # One statement in autocommit: on every poll, and almost always "none due".
            async with self._connection() as conn:
                rows = await _all(conn, "fail_overdue_runs", params)
            return [run_from_row(row) for row in rows]
        async with self._transaction() as conn:
            rows = await _all(conn, "fail_overdue_runs", params)
            if rows:
                await conn.execute(Q["drop_step_outputs_of_runs"], {"ids": [row["id"] for row in rows]})
        return [run_from_row(row) for row in rows]

    async def send_signal(
        self, run_id: str, name: str, payload_json: str, signal_id: str | None, now: int
    ) -> tuple[str, RunRecord]:
        async with self._transaction() as conn:
            # The row lock orders this against wait_run (see its query) and against another
            # send of the same signal_id, which then finds this one and is a "duplicate".
            record = await self._require(conn, run_id, lock="update")
            if record.status in ("completed", "failed", "cancelled"):
                raise ConflictError(f"run {run_id} is {record.status}; it takes no more signals")
            if signal_id is not None and await _one(
                conn, "find_signal_by_id", {"run_id": run_id, "signal_id": signal_id}
            ):
                return "duplicate", record
            await conn.execute(
                Q["insert_signal"],
                {"run_id": run_id, "name": name, "signal_id": signal_id, "payload": payload_json, "now": now},
            )
            woken = await _count(
                conn,
                "wake_for_signal",
                {"run_id": run_id, "name": name, "now": now, "channel": self.channel, "origin": self._origin},
            )
            return ("delivered" if woken else "stored"), await self._require(conn, run_id)

    async def next_signal(self, run_id: str, name: str) -> tuple[int, str] | None:
        async with self._connection() as conn:
            row = await _one(conn, "next_signal", {"run_id": run_id, "name": name})
        return None if row is None else (int(row["id"]), row["payload"])

    async def consume_signal(self, signal_key: int, step: StepRecord, generation: int, now: int) -> bool:
        try:
            async with self._transaction() as conn:
                # The step first (it locks the run row), then the signal row: the order every
                # other transaction touching both uses (delete_run's cascade, reject_signal).
                if not await self._record_step(conn, step, generation):
                    return False  # the lease is gone: the signal stays for its new owner
                if await _count(conn, "consume_signal", {"id": signal_key, "now": now}) == 0:
                    raise _Rollback  # another execution took the signal: undo the step
        except _Rollback:
            return False
        return True

    async def reject_signal(self, signal_key: int, generation: int, log: LogRecord) -> bool:
        async with self._transaction() as conn:
            if await _count(conn, "reject_signal", {"id": signal_key, "generation": generation}) == 0:
                return False
            await self._append_log(conn, log)
        return True

    async def count_step_attempts(self, run_id: str) -> dict[int, tuple[int, int]]:
        async with self._connection() as conn:
            rows = await _all(conn, "count_step_attempts", {"run_id": run_id})
        return {row["seq"]: (int(row["total"]), int(row["current"] or 0)) for row in rows}

    async def resume_run(self, run_id: str, now: int) -> RunRecord:
        async with self._transaction() as conn:
            # The key's lock before the row's (the order renew_leases uses), so that the
            # pending check below cannot race another run of the key becoming pending.
            await conn.execute(Q["lock_concurrency_key_of_run"], {"ns": self._concurrency_ns, "id": run_id})
            record = await self._require(conn, run_id, lock="update")
            if record.status not in ("failed", "cancelled"):
                raise ConflictError(
                    f"run {run_id} is {record.status}; only a failed or cancelled run can be resumed"
                )
            if record.lease_expires_at is not None and record.lease_expires_at > now:
                raise ConflictError(
                    f"run {run_id} was cancelled and its handler is still stopping; try again"
                )
            if record.concurrency_key is not None:
                row = await _one(
                    conn, "find_pending_by_concurrency_key", {"concurrency_key": record.concurrency_key}
                )
                if row is not None:
                    raise ConflictError(
                        f"run {row['id']} is already pending for concurrency key {record.concurrency_key!r}"
                    )
            await conn.execute(Q["archive_failed_steps"], {"run_id": run_id})
            await conn.execute(Q["mark_attempts_before_resume"], {"run_id": run_id})
            await conn.execute(Q["delete_failed_steps"], {"run_id": run_id})
            row = await _one(
                conn,
                "resume_run",
                {"id": run_id, "now": now, "channel": self.channel, "origin": self._origin},
            )
            assert row is not None  # locked, and failed or cancelled
            return run_from_row(row)

    async def fork_run(self, new: NewRun, source_id: str, from_step: str) -> RunRecord:
        async with self._transaction() as conn:
            # FOR SHARE: the source cannot finish (dropping its step outputs) or be resumed
            # (deleting its failed step) between the checks below and the copy.
            await self._require(conn, source_id, lock="share")
            steps = [step_from_row(row) for row in await _all(conn, "list_steps", {"run_id": source_id})]
            point = next((s for s in steps if s.name == from_step), None)
            if point is None:
                raise NotFoundError(
                    f"run {source_id} has no recorded step {from_step!r}; recorded: {[s.name for s in steps]}"
                )
            if any(s.status == "completed" and s.output_json is None for s in steps if s.index < point.index):
                raise ConflictError(
                    f"run {source_id}'s step outputs were dropped (preserve_steps=False); it cannot be forked"
                )
            # A fork has no idempotency or concurrency key, so it is a plain insert.
            if await _one(conn, "insert_run", self._insert_params(new, keys=False)) is None:
                raise StorageError(f"cannot create run {new.id!r}: a run with this id already exists")
            await conn.execute(
                Q["copy_steps_for_fork"],
                {"new_id": new.id, "source_id": source_id, "before_seq": point.index},
            )
        return new_run_record(new, keys=False)

    async def start_child(self, child: NewRun, step: StepRecord, generation: int) -> bool:
        async with self._transaction() as conn:
            if child.concurrency_key is not None:  # key locks before any row lock, as create_runs
                await conn.execute(Q["lock_keys"], {"locks": [self._concurrency_ns + child.concurrency_key]})
            # The fence (the parent row FOR SHARE) and the checkpoint, first.
            if not await self._record_step(conn, step, generation):
                return False
            if child.concurrency_key is not None:
                row = await _one(
                    conn, "find_pending_by_concurrency_key", {"concurrency_key": child.concurrency_key}
                )
                if row is not None:
                    raise ConflictError(
                        f"run {row['id']} is already pending for concurrency key "
                        f"{child.concurrency_key!r}; child run not started"
                    )
            params = self._insert_params(child)
            params["idempotency_key"] = None
            if await _one(conn, "insert_run", params) is None:
                raise StorageError(f"cannot create child run {child.id!r}: a run with this id already exists")
        return True

    async def list_step_attempts(self, run_id: str) -> list[StepRecord]:
        async with self._connection() as conn:
            rows = await _all(conn, "list_step_attempts", {"run_id": run_id})
        return [
            StepRecord(
                run_id=row["run_id"],
                index=row["seq"],
                name=row["name"],
                status="failed",
                output_json=None,
                error_json=row["error"],
                started_at=row["started_at"],
                completed_at=row["completed_at"],
                attempt=row["attempt"],
                offline=bool(row["offline"]),
                metadata_json=row["metadata"],
            )
            for row in rows
        ]

    async def set_progress(
        self,
        run_id: str,
        generation: int,
        current: int,
        total: int | None,
        message: str | None,
        now: int,
    ) -> bool:
        params = {
            "id": run_id,
            "generation": generation,
            "current": current,
            "total": total,
            "message": message,
            "now": now,
        }
        async with self._connection() as conn:
            return await _count(conn, "set_progress", params) == 1

    async def finish_run(
        self,
        run_id: str,
        generation: int,
        *,
        status: str,
        output_json: str | None,
        error_json: str | None,
        failed_step: StepRecord | None,
        drop_step_outputs: bool,
        now: int,
    ) -> bool:
        params = {
            "id": run_id,
            "generation": generation,
            "status": status,
            "output": output_json,
            "error": error_json,
            "now": now,
            "channel": self.channel,
            "origin": self._origin,
            "with_parent": False,
        }
        if failed_step is None and not drop_step_outputs:
            # The usual end of a run is this one statement: no transaction around it (which
            # would add BEGIN and COMMIT, two more round trips). Not a child run's: nothing
            # changes then, and the transaction below (which wakes its parent) ends it.
            async with self._connection() as conn:
                if await _count(conn, "finish_run", params) == 1:
                    return True
        params["with_parent"] = True
        async with self._transaction() as conn:
            if await _count(conn, "finish_run", params) == 0:
                return False
            # A statement after the outcome's: a parent's wait that committed while this one
            # waited for the child's row lock is in its snapshot (see lock_child_for_wait).
            await conn.execute(Q["wake_parent"], params)
            if failed_step is not None:
                await conn.execute(
                    Q["record_failed_step"],
                    {
                        "run_id": run_id,
                        "seq": failed_step.index,
                        "name": failed_step.name,
                        "error": failed_step.error_json,
                        "started_at": failed_step.started_at,
                        "completed_at": failed_step.completed_at,
                        "attempt": failed_step.attempt,
                        "metadata": failed_step.metadata_json,
                    },
                )
            if drop_step_outputs:
                await conn.execute(Q["drop_step_outputs"], {"run_id": run_id})
        return True

    # --- steps and logs -------------------------------------------------------------------
    async def list_steps(self, run_id: str, *, completed_only: bool = False) -> list[StepRecord]:
        async with self._connection() as conn:
            rows = await _all(
                conn, "list_completed_steps" if completed_only else "list_steps", {"run_id": run_id}
            )
        return [step_from_row(row) for row in rows]

    async def append_log(self, log: LogRecord) -> None:
        async with self._connection() as conn:
            await self._append_log(conn, log)

    async def _append_log(self, conn: Connection, log: LogRecord) -> None:
        await conn.execute(
            Q["append_log"],
            {
                "run_id": log.run_id,
                "step_name": log.step_name,
                "level": log.level,
                "message": log.message,
                "data": log.data_json,
                "created_at": log.created_at,
            },
        )

    async def list_logs(self, run_id: str) -> list[LogRecord]:
        async with self._connection() as conn:
            rows = await _all(conn, "list_logs", {"run_id": run_id})
        return [
            LogRecord(
                run_id=row["run_id"],
                step_name=row["step_name"],
                level=row["level"],
                message=row["message"],
                data_json=row["data"],
                created_at=row["created_at"],
            )
            for row in rows
        ]

    # --- change notifications -------------------------------------------------------------
    # --- schedules -------------------------------------------------------------------------
    async def upsert_schedule(self, schedule: ScheduleRecord) -> ScheduleRecord:
        async with self._connection() as conn:
            row = await _one(conn, "upsert_schedule", schedule_params(schedule))
        assert row is not None  # RETURNING of an insert or update always has the row
        return schedule_from_row(row)

    async def get_schedule(self, name: str) -> ScheduleRecord | None:
        async with self._connection() as conn:
            row = await _one(conn, "get_schedule", {"name": name})
        return None if row is None else schedule_from_row(row)

    async def list_schedules(self) -> list[ScheduleRecord]:
        async with self._connection() as conn:
            rows = await _all(conn, "list_schedules")
        return [schedule_from_row(row) for row in rows]

    async def delete_schedule(self, name: str) -> ScheduleRecord:
        async with self._connection() as conn:
            row = await _one(conn, "delete_schedule", {"name": name})
        if row is None:
            raise NotFoundError(f"schedule {name!r} not found")
        return schedule_from_row(row)

    async def set_schedule_paused(
        self, name: str, paused: bool, next_tick_at: int | None, now: int
    ) -> ScheduleRecord:
        params = {"name": name, "paused": paused, "next_tick_at": next_tick_at, "now": now}
        async with self._connection() as conn:
            row = await _one(conn, "set_schedule_paused", params)
        if row is None:
            raise NotFoundError(f"schedule {name!r} not found")
        return schedule_from_row(row)

    async def due_schedules(self, now: int, limit: int) -> list[ScheduleRecord]:
        async with self._connection() as conn:
            rows = await _all(conn, "due_schedules", {"now": now, "limit": limit})
        return [schedule_from_row(row) for row in rows]

    async def next_schedule_tick(self) -> int | None:
        async with self._connection() as conn:
            row = await _one(conn, "next_schedule_tick")
        return None if row is None else row["next_tick_at"]

    async def fire_schedule(
        self,
        name: str,
        *,
        expected_next_tick: int,
        next_tick_at: int,
        last_tick_at: int,
        runs: Sequence[NewRun],
        now: int,
    ) -> list[tuple[RunRecord, str]] | None:
        results: list[tuple[RunRecord, str]] = []
        async with self._transaction() as conn:
            # The row lock orders racing workers: the second one waits here, then reads the
            # tick the first one moved on and gives up.
            row = await _one(conn, "get_schedule_for_update", {"name": name})
            if row is None or row["paused"] or row["next_tick_at"] != expected_next_tick:
                return None
            for new in runs:
                existing = await self._existing_run_for(conn, new)
                if existing is None:
                    inserted = await _one(conn, "insert_run", self._insert_params(new))
                    if inserted is not None:
                        results.append((new_run_record(new), "created"))
                        continue
                    existing = await self._existing_run_for(conn, new)
                    if existing is None:
                        raise StorageError(f"cannot create run {new.id!r}: a run with this id already exists")
                results.append(existing)
            await conn.execute(
                Q["advance_schedule"],
                {
                    "name": name,
                    "next_tick_at": next_tick_at,
                    "last_tick_at": last_tick_at,
                    "run_id": results[-1][0].id if results else row["last_run_id"],
                    "now": now,
                },
            )
        return results

    async def watch_changes(self, listener: ChangeListener) -> Callable[[], None]:
        """Listen on a dedicated connection (not from the pool), started by the first call.

        The listener hears every committed change of this schema's runs made by any other
        store instance (other processes, other hosts), each once, at commit. After the
        connection was lost and restored it is called once with ``("", "")``: changes made
        meanwhile were missed, so look again.
        """
        async with self._watch_lock:
            if self._closed:
                raise StorageError("this PostgreSQL store is closed")
            if self._watch_task is None:
                conn = await self._listen()
                self._watch_task = asyncio.create_task(self._watch(conn), name="durably-web-postgres-listen")
            self._listeners.append(listener)

        def stop() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return stop

    async def _listen(self) -> psycopg.AsyncConnection[Any]:
        try:
            conn = await psycopg.AsyncConnection.connect(self._options.conninfo, autocommit=True)
        except psycopg.Error as exc:
            raise _storage_error(
                exc, f"cannot connect to PostgreSQL at {self._options.display} to listen"
            ) from exc
        try:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
        except BaseException as exc:
            await conn.close()
            if isinstance(exc, psycopg.Error):
                raise _storage_error(exc, "cannot LISTEN") from exc
            raise
        return conn

    async def _watch(self, conn: psycopg.AsyncConnection[Any] | None) -> None:
        """Deliver notifications until cancelled; reconnect (backing off) when the connection breaks."""
        delay = _RECONNECT_FIRST
        try:
            while True:
                if conn is None:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _RECONNECT_MAX)
                    try:
                        conn = await self._listen()
                    except StorageError as exc:
                        logger.debug("PostgreSQL LISTEN reconnect failed (retrying in %.1fs): %s", delay, exc)
                        continue
                    logger.info("PostgreSQL LISTEN connection restored (%s)", self._options.display)
                    delay = _RECONNECT_FIRST
                    self._dispatch("", "")  # anything may have changed while nobody listened
                try:
                    async with contextlib.aclosing(conn.notifies(timeout=_LISTEN_CHECK_SECONDS)) as notifies:
                        async for notify in notifies:
                            change, _, origin = notify.payload.rpartition(" ")
                            if origin != self._origin:
                                run_id, _, status = change.rpartition(" ")
                                self._dispatch(run_id, status)
                    await conn.execute(Q["ping"])  # quiet for a while: still connected?
                except psycopg.Error as exc:
                    logger.warning(
                        "PostgreSQL LISTEN connection lost (%s): %s; reconnecting", self._options.display, exc
                    )
                    await _close_quietly(conn)
                    conn = None
        finally:
            if conn is not None:
                await _close_quietly(conn)

    def _dispatch(self, run_id: str, status: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(run_id, status)
            except Exception:
                logger.exception("a durably-web change listener failed")


def _has_input(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Whether an idle connection's socket is readable (data or end of stream), without blocking."""
    try:
        readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
    except (psycopg.Error, OSError, ValueError):
        return True  # cannot tell (closed, no socket): let the full check decide
    return bool(readable)


async def _close_quietly(conn: psycopg.AsyncConnection[Any]) -> None:
    with contextlib.suppress(psycopg.Error, OSError):
        await conn.close()
