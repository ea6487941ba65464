"""The SQLite store: all SQL for CPython and the browser, over a :class:`SqlConnection`."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from importlib import resources
from typing import Any, Concatenate, ParamSpec, TypeVar

from ...errors import ConflictError, ExistingRunRefusedError, NotFoundError, SchemaVersionError, StorageError
from ..base import (
    JobLimits,
    LogRecord,
    NewRun,
    RunFilter,
    RunRecord,
    ScheduleRecord,
    StepRecord,
    Store,
    WouldBlock,
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
from .connection import SqlConnection, SqliteBusyError

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


def _with_claim_filters(queries: dict[str, str]) -> dict[str, str]:
    """The claim's texts: find_claimable_run, whose {claim_filter} stands for the tests
    each candidate passes (three branches share them), with and without the rate-window
    test; lease_claimable_run around each; and lease_found_run, the plain claim's write."""
    template = queries["find_claimable_run"]
    plain = queries["claim_filter"]
    rated = plain + "\n" + queries["rate_limit_filter"]
    queries["find_claimable_run"] = template.replace("{claim_filter}", plain)
    queries["find_claimable_run_rate_limited"] = template.replace("{claim_filter}", rated)
    lease = queries["lease_claimable_run"].replace("{lease_columns}", queries["lease_columns"])
    for suffix in ("", "_rate_limited"):
        find = queries["find_claimable_run" + suffix]
        queries["lease_claimable_run" + suffix] = lease.replace("{claimable}", find)
    queries["lease_found_run"] = (
        queries["lease_found_run"]
        .replace("{lease_columns}", queries["lease_columns"])
        .replace("{claim_filter}", plain)
    )
    return queries


Q = _with_claim_filters(_load_queries())
MIGRATIONS = _load_migrations()
SCHEMA_VERSION = MIGRATIONS[-1][0]


def apply_connection_policy(
    conn: SqlConnection,
    *,
    journal_mode: str | None,
    synchronous: str,
    busy_timeout_ms: int,
    read_only: bool = False,
) -> None:
    """The one place that decides how every SQLite connection behaves.

    WAL lets readers run beside the writer and makes a commit one sequential
    append; ``synchronous=NORMAL`` in WAL keeps every commit across a process
    kill (``FULL`` adds power-loss safety at the cost of an fsync per commit).
    A ``read_only`` connection leaves the journal mode as the file has it (changing
    it is a write), skips ``synchronous`` and refuses every write (``query_only``).
    """
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    if synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
        raise ValueError(f"unknown synchronous level {synchronous!r}")
    if read_only:
        # No journal_mode or synchronous: both concern writing (and both read the file
        # header, so they would fail on a file that is not a database before check_schema
        # could say so).
        conn.execute("PRAGMA query_only = ON")
    else:
        if journal_mode:
            conn.fetch_one(f"PRAGMA journal_mode = {journal_mode}")
        conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
    conn.execute("PRAGMA foreign_keys = ON")


def _refuse_newer_schema(current: int) -> None:
    if current > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"this database has schema version {current}, but this durably-web "
            f"understands up to {SCHEMA_VERSION}; upgrade durably-web to open it",
            found=current,
            expected=SCHEMA_VERSION,
        )


def _plain_insert(new: NewRun) -> bool:
    """Whether creating ``new`` is the insert_run statement alone (no key to resolve first,
    no delay or labels to write after it)."""
    return (
        new.idempotency_key is None and new.concurrency_key is None and not new.debounce_ms and not new.labels
    )


def _claim_query(kind: str, params: dict[str, Any]) -> str:
    """The claim's ``kind`` of text (find_claimable_run or lease_claimable_run): with the
    rate-window test only while some job's window is full."""
    return Q[kind if params["rate_limited"] == "[]" else kind + "_rate_limited"]


class _Rollback(Exception):
    """Raised inside a transaction to undo it (the caller reports ``False``)."""


P = ParamSpec("P")
R = TypeVar("R")
SyncMethod = Callable[Concatenate["SQLiteStore", P], R]
AsyncMethod = Callable[Concatenate["SQLiteStore", P], Coroutine[Any, Any, R]]

#: How often a plain claim looks again when other claimers took each run it found first.
_CLAIM_TRIES = 3

#: The first and the longest pause between two tries at a database another process has locked.
_FIRST_BUSY_PAUSE = 0.001
_LONGEST_BUSY_PAUSE = 0.05


def _sqlite_call(*, durable: bool) -> Callable[[SyncMethod[P, R]], AsyncMethod[P, R]]:
    """Make one synchronous store method (a whole transaction) a coroutine of the interface.

    SQLite answers in-process, so the call runs at once and the coroutine finishes without
    suspending. The busy handler is off: when another process holds the write lock, the
    connection raises ``SqliteBusyError`` at once, and the whole call is tried again after an
    ``asyncio.sleep`` (so the event loop keeps renewing leases and serving requests meanwhile),
    until ``busy_timeout`` has passed. ``durable`` writes also wait for a connection that
    persists asynchronously (the browser's IndexedDB mode) before they return.
    """

    def wrap(method: SyncMethod[P, R]) -> AsyncMethod[P, R]:
        @functools.wraps(method)
        async def call(self: SQLiteStore, *args: P.args, **kwargs: P.kwargs) -> R:
            try:
                result = method(self, *args, **kwargs)
            except SqliteBusyError:
                result = await self._retry_while_busy(functools.partial(method, self, *args, **kwargs))
            if durable and self._wait_durable is not None:
                await self._wait_durable()
            return result

        return call

    return wrap


class SQLiteStore(Store):
    def __init__(self, conn: SqlConnection, *, busy_timeout_ms: int = 5000) -> None:
        self._conn = conn
        self._busy_timeout = busy_timeout_ms / 1000
        # Our own retry loop replaces SQLite's busy handler, which would block the thread
        # (and with it the event loop) for up to busy_timeout.
        conn.execute("PRAGMA busy_timeout = 0")
        # A connection that persists asynchronously (browser IndexedDB) offers wait_durable().
        self._wait_durable = getattr(conn, "wait_durable", None)

    @property
    def busy_timeout_ms(self) -> int:
        """How long a call waits for a lock another connection holds before ``StorageError``."""
        return int(self._busy_timeout * 1000)

    async def wait_durable(self) -> None:
        if self._wait_durable is not None:
            await self._wait_durable()

    async def _retry_while_busy(self, attempt: Callable[[], R]) -> R:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._busy_timeout
        pause = _FIRST_BUSY_PAUSE
        while True:
            await asyncio.sleep(pause)
            try:
                return attempt()
            except SqliteBusyError as exc:
                if loop.time() >= deadline:
                    raise StorageError(
                        f"the SQLite database stayed locked by another connection for longer than "
                        f"busy_timeout ({int(self._busy_timeout * 1000)} ms): {exc}"
                    ) from exc
            pause = min(pause * 2, _LONGEST_BUSY_PAUSE)

    @property
    def connection(self) -> SqlConnection:
        return self._conn

    # --- schema -------------------------------------------------------------------
    @_sqlite_call(durable=False)
    def migrate(self) -> None:
        conn = self._conn
        conn.execute(Q["create_migrations_table"])
        current = self._schema_version()
        _refuse_newer_schema(current)
        if current >= SCHEMA_VERSION:
            return
        # Foreign keys off while migrating (a no-op inside a transaction, so here): a
        # migration that rebuilds a table (0002 rebuilds durably_runs to widen its
        # status CHECK) drops the old one, and with them on that cascade-deletes every
        # step, label and log of every run.
        conn.execute("PRAGMA foreign_keys = OFF")
        try:
            for version, script in MIGRATIONS:
                if version <= current:
                    continue
                now = int(time.time() * 1000)
                try:
                    conn.execute_script(
                        f"BEGIN IMMEDIATE;\n{script}\n;"
                        f"INSERT INTO durably_migrations (version, applied_at) VALUES ({version}, {now});"
                        "\nCOMMIT;"
                    )
                except SqliteBusyError:
                    raise  # tried again as a whole (another process is migrating right now)
                except StorageError:
                    # Another process may have applied it first; only that is acceptable.
                    if self._schema_version() < version:
                        raise
        finally:
            conn.execute("PRAGMA foreign_keys = ON")

    @_sqlite_call(durable=False)
    def check_schema(self) -> None:
        """Like :meth:`migrate`, but only reads: fail unless the schema is exactly this version's."""
        try:
            row = self._conn.fetch_one(Q["has_migrations_table"])
        except StorageError as exc:
            if "not a database" not in str(exc):
                raise
            raise SchemaVersionError(
                f"not a durably-web database (not even an SQLite database: {exc})",
                expected=SCHEMA_VERSION,
            ) from exc
        if not row or not row["found"]:
            raise SchemaVersionError(
                "not a durably-web database (it has no durably_migrations table)",
                expected=SCHEMA_VERSION,
            )
        current = self._schema_version()
        _refuse_newer_schema(current)
        if current < SCHEMA_VERSION:
            raise SchemaVersionError(
                f"this database has schema version {current}, older than this durably-web's "
                f"{SCHEMA_VERSION}; it was opened read-only, so it is not migrated (opening it "
                "once for writing does that)",
                found=current,
                expected=SCHEMA_VERSION,
            )

    def _schema_version(self) -> int:
        row = self._conn.fetch_one(Q["schema_version"])
        return int(row["version"]) if row else 0

    @_sqlite_call(durable=False)
    def close(self) -> None:
        self._conn.close()

    # --- runs ------------------------------------------------------------------------
    @_sqlite_call(durable=True)
    def create_runs(
        self,
        runs: Sequence[NewRun],
        *,
        accept_existing: Callable[[RunRecord], bool] | None = None,
    ) -> list[tuple[RunRecord, str]]:
        conn = self._conn
        results: list[tuple[RunRecord, str]] = []
        inserted: set[str] = set()
        refused: list[RunRecord] = []

        def resolve(record: RunRecord, disposition: str) -> None:
            # A run this very call inserted (two items sharing a key) needs no verdict.
            if accept_existing is not None and record.id not in inserted and not accept_existing(record):
                if all(r.id != record.id for r in refused):
                    refused.append(record)
            results.append((record, disposition))

        # One run with nothing to look up or add is one INSERT: its own transaction (the
        # hot path of a plain trigger, spared BEGIN and COMMIT).
        alone = len(runs) == 1 and _plain_insert(runs[0])
        with contextlib.nullcontext() if alone else conn.transaction():
            for new in runs:
                if new.idempotency_key is not None:
                    row = conn.fetch_one(
                        Q["find_idempotent_run"],
                        {"job_name": new.job_name, "idempotency_key": new.idempotency_key},
                    )
                    if row is not None:
                        resolve(run_from_row(row), "idempotent")
                        continue
                if new.concurrency_key is not None:
                    row = conn.fetch_one(
                        Q["find_pending_by_concurrency_key"],
                        {"concurrency_key": new.concurrency_key},
                    )
                    if row is not None and self._debounces(new, row):
                        debounced = conn.fetch_one(
                            Q["debounce_run"],
                            {
                                "id": row["id"],
                                "input": new.input_json,
                                "available_at": new.created_at + (new.debounce_ms or 0),
                                "now": new.created_at,
                            },
                        )
                        assert debounced is not None  # found pending and unstarted in this transaction
                        resolve(run_from_row(debounced), "debounced")
                        continue
                    if row is not None:
                        if not new.coalesce:
                            raise ConflictError(
                                f"run {row['id']} is already pending for concurrency key "
                                f"{new.concurrency_key!r} (pass coalesce='skip' to reuse it)"
                            )
                        resolve(run_from_row(row), "coalesced")
                        continue
                params = _insert_run_params(new)
                labels_json = params["labels"]
                conn.execute(Q["insert_run"], params)
                if new.debounce_ms:
                    conn.execute(
                        Q["delay_new_run"],
                        {"id": new.id, "available_at": new.created_at + new.debounce_ms},
                    )
                if new.labels:
                    conn.execute(Q["insert_labels"], {"run_id": new.id, "labels": labels_json})
                inserted.add(new.id)
                results.append((new_run_record(new), "created"))
            if refused:
                # Raising inside the transaction rolls back every insert of this call.
                raise ExistingRunRefusedError(
                    f"{len(refused)} existing run(s) a key resolved to were refused", records=refused
                )
        return results

    @_sqlite_call(durable=True)
    def create_leased_run(self, new: NewRun, *, worker_id: str, lease_until: int) -> RunRecord:
        check_leased_insert(new)
        params = _insert_run_params(new)
        params.update(worker_id=worker_id, lease_until=lease_until)
        conn = self._conn
        # Without labels one INSERT: its own transaction, as a plain trigger's.
        with conn.transaction() if new.labels else contextlib.nullcontext():
            conn.execute(Q["insert_leased_run"], params)
            if new.labels:
                conn.execute(Q["insert_labels"], {"run_id": new.id, "labels": params["labels"]})
        return leased_run_record(new, worker_id=worker_id, lease_until=lease_until)

    @staticmethod
    def _debounces(new: NewRun, pending: Any) -> bool:
        """Whether a trigger joins this pending run of its concurrency key: the job is
        debounced, the run is of the same job and has never started (once it has, the
        trigger is an ordinary one: a run that started is not changed)."""
        return bool(new.debounce_ms) and pending["job_name"] == new.job_name and pending["started_at"] is None

    @_sqlite_call(durable=False)
    def get_run(self, run_id: str) -> RunRecord | None:
        return self._get_run(run_id)

    def get_run_nowait(self, run_id: str) -> RunRecord | None:
        try:
            return self._get_run(run_id)
        except SqliteBusyError:
            raise WouldBlock from None

    def _get_run(self, run_id: str) -> RunRecord | None:
        row = self._conn.fetch_one(Q["get_run"], {"id": run_id})
        return None if row is None else run_from_row(row)

    @_sqlite_call(durable=False)
    def list_runs(self, run_filter: RunFilter) -> list[RunRecord]:
        sql, params = list_runs_query(run_filter, lambda name: f":{name}", no_limit=-1)
        return [run_from_row(row) for row in self._conn.fetch_all(sql, params)]

    @_sqlite_call(durable=True)
    def cancel_run(self, run_id: str, now: int) -> RunRecord:
        return self._cancel_tree(run_id, now)[0]

    @_sqlite_call(durable=True)
    def cancel_run_tree(self, run_id: str, now: int) -> list[RunRecord]:
        return self._cancel_tree(run_id, now)

    def _cancel_tree(self, run_id: str, now: int) -> list[RunRecord]:
        conn = self._conn
        with conn.transaction():
            record = self._require(run_id)
            if record.status in ("completed", "failed"):
                raise ConflictError(f"run {run_id} is already {record.status}; it cannot be cancelled")
            cancelled: list[RunRecord] = []
            if record.status != "cancelled":
                conn.execute(Q["cancel_run"], {"id": run_id, "now": now})
                record = self._require(run_id)
                self._wake_parent(record, now)
            # Descendants, also those of a cancelled run (one cancelled before its children
            # were cascaded, or by an older version): cancelling twice cascades again.
            for row in conn.fetch_all(Q["run_tree"], {"id": run_id}):
                if row["id"] != run_id and row["status"] in ("pending", "leased", "waiting"):
                    conn.execute(Q["cancel_run"], {"id": row["id"], "now": now})
                    cancelled.append(self._require(row["id"]))
        return [record, *reversed(cancelled)]  # nearest first, as PostgreSQL's

    def _wake_parent(self, record: RunRecord, now: int) -> None:
        """``record`` ended (or is being deleted): its waiting parent is due now."""
        if record.parent_run_id is not None:
            self._conn.execute(
                Q["wake_parent"], {"id": record.id, "parent_run_id": record.parent_run_id, "now": now}
            )

    @_sqlite_call(durable=True)
    def delete_run(self, run_id: str) -> RunRecord:
        with self._conn.transaction():
            record = self._require(run_id)
            if record.status == "leased":
                raise ConflictError(f"run {run_id} is running (leased); cancel it before deleting it")
            child = self._conn.fetch_one(Q["find_active_child"], {"id": run_id})
            if child is not None:
                raise ConflictError(
                    f"run {run_id} has a child run still {child['status']} ({child['id']}); "
                    "cancel the run (which cancels its children) or wait for them before deleting it"
                )
            self._conn.execute(Q["delete_run"], {"id": run_id})
            # No clock here: the parent is due from the deleted run's last change (a past time).
            self._wake_parent(record, record.updated_at)
        return record

    @_sqlite_call(durable=False)
    def purge_runs(self, completed_before: int, limit: int | None) -> int:
        return self._conn.execute(
            Q["purge_runs"], {"before": completed_before, "limit": -1 if limit is None else limit}
        )

    def _require(self, run_id: str) -> RunRecord:
        record = self._get_run(run_id)
        if record is None:
            raise NotFoundError(f"run {run_id!r} not found")
        return record

    # --- worker ------------------------------------------------------------------------
    @_sqlite_call(durable=False)
    def claim_run(
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
        conn = self._conn
        flow = flow_limits_of(job_names, limits)
        params = {
            "now": now,
            "job_names": json.dumps(list(job_names)),
            "rate_limited": "[]",
            "pinned_versions": json.dumps(dict(pinned_versions or {})),
        }
        if flow:
            params.update(self._flow_params(job_names, flow, now))
        lease = {
            "worker_id": worker_id,
            "lease_until": lease_until,
            "versions": json.dumps(dict(versions or {})),
        }
        if not flow:
            # Look without the write lock (an idle worker must not serialise everyone), then
            # lease what was found by its id. When another claimer took it in between, look
            # again: each miss means someone else made progress.
            for _ in range(_CLAIM_TRIES):
                found = conn.fetch_one(Q["find_claimable_run"], params)
                if found is None:
                    return None
                # fetch_all: the statement runs to its end (and commits) here.
                rows = conn.fetch_all(Q["lease_found_run"], {**params, **lease, "id": found["id"]})
                if rows:
                    return run_from_row(rows[0])
            return None  # the claim loop comes back at its next turn
        # Peek without the write lock first, as above.
        if conn.fetch_one(_claim_query("find_claimable_run", params), params) is None:
            return None
        params.update(lease)
        with conn.transaction():
            # Counted again under the write lock: no other claimer can lease in between.
            params.update(self._flow_params(job_names, flow, now))
            rows = conn.fetch_all(_claim_query("lease_claimable_run", params), params)
        return run_from_row(rows[0]) if rows else None

    def _flow_params(
        self, job_names: Sequence[str], flow: Mapping[str, JobLimits], now: int
    ) -> dict[str, str]:
        """The claim's job list without the jobs at ``max_concurrent``, and the jobs whose
        rate window is full (they start no new run)."""
        conn = self._conn
        full: set[str] = set()
        rate_limited = []
        for name, limit in flow.items():
            if limit.max_concurrent is not None:
                row = conn.fetch_one(Q["count_job_leases"], {"job_name": name, "now": now})
                if row is not None and row["n"] >= limit.max_concurrent:
                    full.add(name)
                    continue
            if limit.rate_count is not None and limit.rate_window_ms is not None:
                since = now - limit.rate_window_ms
                row = conn.fetch_one(Q["count_job_starts"], {"job_name": name, "since": since})
                if row is not None and row["n"] >= limit.rate_count:
                    rate_limited.append(name)
        return {
            "job_names": json.dumps([name for name in job_names if name not in full]),
            "rate_limited": json.dumps(rate_limited),
        }

    @_sqlite_call(durable=False)
    def next_claimable_at(
        self, *, job_names: Sequence[str], limits: Mapping[str, JobLimits], now: int
    ) -> int | None:
        conn = self._conn
        found: list[int] = []
        row = conn.fetch_one(
            Q["next_pending_available"], {"now": now, "job_names": json.dumps(list(job_names))}
        )
        if row is not None and row["at"] is not None:
            found.append(int(row["at"]))
        for name, limit in flow_limits_of(job_names, limits).items():
            if limit.rate_count is None or limit.rate_window_ms is None:
                continue
            since = now - limit.rate_window_ms
            counted = conn.fetch_one(Q["count_job_starts"], {"job_name": name, "since": since})
            over = 0 if counted is None else int(counted["n"]) - limit.rate_count
            if over >= 0:
                # The window frees a start once the (over + 1)-th oldest start in it leaves.
                start = conn.fetch_one(Q["nth_job_start"], {"job_name": name, "since": since, "skip": over})
                if start is not None:
                    found.append(int(start["started_at"]) + limit.rate_window_ms)
        return min(found) if found else None
    @_sqlite_call(durable=True)
    def fail_overdue_runs(self, now: int, *, error_json: str, drop_step_outputs: bool) -> list[RunRecord]:
        conn = self._conn
        # Peek without the write lock first: the usual answer is "none", on every poll.
        if not conn.fetch_all(Q["find_overdue_runs"], {"now": now}):
            return []
        failed = []
        with conn.transaction():
            for found in conn.fetch_all(Q["find_overdue_runs"], {"now": now}):
                params = {"id": found["id"], "now": now, "error": error_json}
                row = conn.fetch_one(Q["fail_overdue_run"], params)
                if row is None:
                    continue
                failed.append(run_from_row(row))
                if drop_step_outputs:
                    conn.execute(Q["drop_step_outputs"], {"run_id": found["id"]})
        return failed

    @_sqlite_call(durable=False)
    def renew_leases(
        self, leases: Sequence[tuple[str, int]], now: int, lease_until: int, *, cancelled: bool = False
    ) -> list[str]:
        status = "cancelled" if cancelled else "leased"
        lost = []
        with self._conn.transaction():
            for run_id, generation in leases:
                changed = self._conn.execute(
                    Q["renew_lease"],
                    {
                        "id": run_id,
                        "generation": generation,
                        "lease_until": lease_until,
                        "status": status,
                        "now": now,
                    },
                )
                if changed == 0:
                    lost.append(run_id)
        return lost

    @_sqlite_call(durable=False)
    def release_run(self, run_id: str, generation: int, now: int) -> None:
        self._conn.execute(Q["release_run"], {"id": run_id, "generation": generation, "now": now})

    @_sqlite_call(durable=False)
    def expire_leases(self, now: int) -> int:
        return self._conn.execute(Q["expire_leases"], {"now": now})

    @_sqlite_call(durable=True)
    def record_step(self, step: StepRecord, generation: int) -> bool:
        return self._record_step(step, generation)

    def _record_step(self, step: StepRecord, generation: int) -> bool:
        return (
            self._conn.execute(
                Q["record_step"],
                {
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
                },
            )
            == 1
        )

    @_sqlite_call(durable=True)
    def wait_run(
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
        conn = self._conn
        with conn.transaction():
            if step is not None and not self._record_step(step, generation):
                return False
            changed = conn.execute(
                Q["wait_run"],
                {
                    "id": run_id,
                    "generation": generation,
                    "until": until,
                    "reason": reason,
                    "step_name": step_name,
                    "deadline": deadline,
                    "now": now,
                    "child_run_id": child_run_id,
                },
            )
            if changed == 0:
                return False
            if child_run_id is not None:
                conn.execute(
                    Q["due_if_child_ended"], {"id": run_id, "child_run_id": child_run_id, "now": now}
                )
            attempts = [*([] if failed_attempt is None else [failed_attempt]), *failed_attempts]
            for attempt in attempts:
                conn.execute(Q["insert_step_attempt"], _attempt_params(run_id, attempt))
        return True

    @_sqlite_call(durable=True)
    def wake_offline_runs(self, now: int) -> int:
        return self._conn.execute(Q["wake_offline_runs"], {"now": now})

    @_sqlite_call(durable=True)
    def send_signal(
        self, run_id: str, name: str, payload_json: str, signal_id: str | None, now: int
    ) -> tuple[str, RunRecord]:
        conn = self._conn
        with conn.transaction():
            record = self._require(run_id)
            if record.status in ("completed", "failed", "cancelled"):
                raise ConflictError(f"run {run_id} is {record.status}; it takes no more signals")
            if signal_id is not None and conn.fetch_one(
                Q["find_signal_by_id"], {"run_id": run_id, "signal_id": signal_id}
            ):
                return "duplicate", record
            conn.execute(
                Q["insert_signal"],
                {"run_id": run_id, "name": name, "signal_id": signal_id, "payload": payload_json, "now": now},
            )
            woken = conn.execute(Q["wake_for_signal"], {"run_id": run_id, "name": name, "now": now})
            return ("delivered" if woken else "stored"), self._require(run_id)

    @_sqlite_call(durable=False)
    def next_signal(self, run_id: str, name: str) -> tuple[int, str] | None:
        row = self._conn.fetch_one(Q["next_signal"], {"run_id": run_id, "name": name})
        return None if row is None else (int(row["id"]), row["payload"])

    @_sqlite_call(durable=True)
    def consume_signal(self, signal_key: int, step: StepRecord, generation: int, now: int) -> bool:
        conn = self._conn
        try:
            with conn.transaction():
                if conn.execute(Q["consume_signal"], {"id": signal_key, "now": now}) == 0:
                    return False
                if not self._record_step(step, generation):
                    raise _Rollback  # the lease is gone: the signal stays for its new owner
        except _Rollback:
            return False
        return True

    @_sqlite_call(durable=True)
    def reject_signal(self, signal_key: int, generation: int, log: LogRecord) -> bool:
        with self._conn.transaction():
            if self._conn.execute(Q["reject_signal"], {"id": signal_key, "generation": generation}) == 0:
                return False
            self._append_log(log)
        return True

    @_sqlite_call(durable=False)
    def count_step_attempts(self, run_id: str) -> dict[int, tuple[int, int]]:
        rows = self._conn.fetch_all(Q["count_step_attempts"], {"run_id": run_id})
        return {row["seq"]: (int(row["total"]), int(row["current"] or 0)) for row in rows}

    @_sqlite_call(durable=True)
    def resume_run(self, run_id: str, now: int) -> RunRecord:
        conn = self._conn
        with conn.transaction():
            record = self._require(run_id)
            if record.status not in ("failed", "cancelled"):
                raise ConflictError(
                    f"run {run_id} is {record.status}; only a failed or cancelled run can be resumed"
                )
            if record.lease_expires_at is not None and record.lease_expires_at > now:
                raise ConflictError(
                    f"run {run_id} was cancelled and its handler is still stopping; try again"
                )
            if record.concurrency_key is not None:
                row = conn.fetch_one(
                    Q["find_pending_by_concurrency_key"], {"concurrency_key": record.concurrency_key}
                )
                if row is not None:
                    raise ConflictError(
                        f"run {row['id']} is already pending for concurrency key {record.concurrency_key!r}"
                    )
            conn.execute(Q["archive_failed_steps"], {"run_id": run_id})
            conn.execute(Q["mark_attempts_before_resume"], {"run_id": run_id})
            conn.execute(Q["delete_failed_steps"], {"run_id": run_id})
            conn.execute(Q["resume_run"], {"id": run_id, "now": now})
            return self._require(run_id)

    @_sqlite_call(durable=True)
    def fork_run(self, new: NewRun, source_id: str, from_step: str) -> RunRecord:
        conn = self._conn
        with conn.transaction():
            self._require(source_id)
            steps = self._list_steps(source_id)
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
            params = _insert_run_params(new, keys=False)
            labels_json = params["labels"]
            conn.execute(Q["insert_run"], params)
            if new.labels:
                conn.execute(Q["insert_labels"], {"run_id": new.id, "labels": labels_json})
            record = new_run_record(new)
            conn.execute(
                Q["copy_steps_for_fork"],
                {"new_id": new.id, "source_id": source_id, "before_seq": point.index},
            )
        return record

    @_sqlite_call(durable=True)
    def start_child(self, child: NewRun, step: StepRecord, generation: int) -> bool:
        conn = self._conn
        with conn.transaction():
            # The fence first: a parent that lost its lease starts nothing.
            if not self._record_step(step, generation):
                return False
            if child.concurrency_key is not None:
                row = conn.fetch_one(
                    Q["find_pending_by_concurrency_key"], {"concurrency_key": child.concurrency_key}
                )
                if row is not None:
                    raise ConflictError(
                        f"run {row['id']} is already pending for concurrency key "
                        f"{child.concurrency_key!r}; child run not started"
                    )
            params = {**_insert_run_params(child), "idempotency_key": None, "forked_from": None}
            labels_json = params["labels"]
            conn.execute(Q["insert_run"], params)
            if child.labels:
                conn.execute(Q["insert_labels"], {"run_id": child.id, "labels": labels_json})
        return True

    @_sqlite_call(durable=False)
    def list_step_attempts(self, run_id: str) -> list[StepRecord]:
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
            for row in self._conn.fetch_all(Q["list_step_attempts"], {"run_id": run_id})
        ]

    @_sqlite_call(durable=False)
    def set_progress(
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
        return self._conn.execute(Q["set_progress"], params) == 1

    @_sqlite_call(durable=True)
    def finish_run(
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
        conn = self._conn
        with conn.transaction():
            finished = conn.fetch_all(
                Q["finish_run"],
                {
                    "id": run_id,
                    "generation": generation,
                    "status": status,
                    "output": output_json,
                    "error": error_json,
                    "now": now,
                },
            )
            if not finished:
                return False
            parent_run_id = finished[0]["parent_run_id"]
            if parent_run_id is not None:
                conn.execute(Q["wake_parent"], {"id": run_id, "parent_run_id": parent_run_id, "now": now})
            if failed_step is not None:
                conn.execute(
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
                conn.execute(Q["drop_step_outputs"], {"run_id": run_id})
        return True

    # --- steps and logs --------------------------------------------------------------------
    @_sqlite_call(durable=False)
    def list_steps(self, run_id: str, *, completed_only: bool = False) -> list[StepRecord]:
        return self._list_steps(run_id, completed_only=completed_only)

    def _list_steps(self, run_id: str, *, completed_only: bool = False) -> list[StepRecord]:
        query = Q["list_completed_steps"] if completed_only else Q["list_steps"]
        return [step_from_row(row) for row in self._conn.fetch_all(query, {"run_id": run_id})]

    @_sqlite_call(durable=False)
    def append_log(self, log: LogRecord) -> None:
        self._append_log(log)

    def _append_log(self, log: LogRecord) -> None:
        self._conn.execute(
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

    @_sqlite_call(durable=False)
    def list_logs(self, run_id: str) -> list[LogRecord]:
        return [
            LogRecord(
                run_id=row["run_id"],
                step_name=row["step_name"],
                level=row["level"],
                message=row["message"],
                data_json=row["data"],
                created_at=row["created_at"],
            )
            for row in self._conn.fetch_all(Q["list_logs"], {"run_id": run_id})
        ]

    # --- schedules ---------------------------------------------------------------------------
    @_sqlite_call(durable=True)
    def upsert_schedule(self, schedule: ScheduleRecord) -> ScheduleRecord:
        with self._conn.transaction():
            params = schedule_params(schedule)
            self._conn.execute(Q["upsert_schedule"], {**params, "paused": int(schedule.paused)})
            return self._require_schedule(schedule.name)

    @_sqlite_call(durable=False)
    def get_schedule(self, name: str) -> ScheduleRecord | None:
        row = self._conn.fetch_one(Q["get_schedule"], {"name": name})
        return None if row is None else schedule_from_row(row)

    @_sqlite_call(durable=False)
    def list_schedules(self) -> list[ScheduleRecord]:
        return [schedule_from_row(row) for row in self._conn.fetch_all(Q["list_schedules"])]

    @_sqlite_call(durable=True)
    def delete_schedule(self, name: str) -> ScheduleRecord:
        with self._conn.transaction():
            record = self._require_schedule(name)
            self._conn.execute(Q["delete_schedule"], {"name": name})
        return record

    @_sqlite_call(durable=True)
    def set_schedule_paused(
        self, name: str, paused: bool, next_tick_at: int | None, now: int
    ) -> ScheduleRecord:
        with self._conn.transaction():
            params = {"name": name, "paused": int(paused), "next_tick_at": next_tick_at, "now": now}
            if self._conn.execute(Q["set_schedule_paused"], params) == 0:
                raise NotFoundError(f"schedule {name!r} not found")
            return self._require_schedule(name)

    @_sqlite_call(durable=False)
    def due_schedules(self, now: int, limit: int) -> list[ScheduleRecord]:
        rows = self._conn.fetch_all(Q["due_schedules"], {"now": now, "limit": limit})
        return [schedule_from_row(row) for row in rows]

    @_sqlite_call(durable=False)
    def next_schedule_tick(self) -> int | None:
        row = self._conn.fetch_one(Q["next_schedule_tick"])
        return None if row is None else row["next_tick_at"]

    @_sqlite_call(durable=True)
    def fire_schedule(
        self,
        name: str,
        *,
        expected_next_tick: int,
        next_tick_at: int,
        last_tick_at: int,
        runs: Sequence[NewRun],
        now: int,
    ) -> list[tuple[RunRecord, str]] | None:
        conn = self._conn
        results: list[tuple[RunRecord, str]] = []
        with conn.transaction():
            advanced = conn.execute(
                Q["advance_schedule"],
                {
                    "name": name,
                    "expected_next_tick": expected_next_tick,
                    "next_tick_at": next_tick_at,
                    "last_tick_at": last_tick_at,
                    "now": now,
                },
            )
            if advanced == 0:
                return None  # fired by another worker, or paused, changed or deleted meanwhile
            for new in runs:
                row = conn.fetch_one(
                    Q["find_idempotent_run"],
                    {"job_name": new.job_name, "idempotency_key": new.idempotency_key},
                )
                if row is not None:
                    results.append((run_from_row(row), "idempotent"))
                    continue
                params = _insert_run_params(new)
                labels_json = params["labels"]
                conn.execute(Q["insert_run"], params)
                if new.labels:
                    conn.execute(Q["insert_labels"], {"run_id": new.id, "labels": labels_json})
                results.append((new_run_record(new), "created"))
            if results:
                conn.execute(Q["set_schedule_last_run"], {"name": name, "run_id": results[-1][0].id})
        return results

    def _require_schedule(self, name: str) -> ScheduleRecord:
        row = self._conn.fetch_one(Q["get_schedule"], {"name": name})
        if row is None:
            raise NotFoundError(f"schedule {name!r} not found")
        return schedule_from_row(row)

def _insert_run_params(new: NewRun, *, keys: bool = True) -> dict[str, Any]:
    """The parameters of ``insert_run`` for ``new`` (``keys=False``: without its idempotency
    and concurrency keys, as a fork is inserted): one place for every column a new run has."""
    return {
        "id": new.id,
        "job_name": new.job_name,
        "input": new.input_json,
        "labels": json.dumps(new.labels, separators=(",", ":")),
        "idempotency_key": new.idempotency_key if keys else None,
        "concurrency_key": new.concurrency_key if keys else None,
        "created_at": new.created_at,
        "forked_from": new.forked_from,
        "priority": new.priority,
        "trace_parent": new.trace_parent,
        "parent_run_id": new.parent_run_id,
        "deadline_at": new.deadline_at,
        "version": new.version,
    }


def _attempt_params(run_id: str, attempt: StepRecord) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "seq": attempt.index,
        "name": attempt.name,
        "attempt": attempt.attempt,
        "error": attempt.error_json,
        "started_at": attempt.started_at,
        "completed_at": attempt.completed_at,
        "offline": int(attempt.offline),
        "metadata": attempt.metadata_json,
    }
