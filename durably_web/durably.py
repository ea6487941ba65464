"""``Durably``: the application object — job registry, configuration, public API."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any, Literal

from pydantic import ValidationError as PydanticValidationError

from . import ids
from .engine import Worker, WorkerConfig
from .errors import (
    ConflictError,
    DurablyError,
    ExistingRunRefusedError,
    NotFoundError,
    ReadOnlyError,
    StepError,
    ValidationError,
    WaitTimeoutError,
)
from .events import TERMINAL_EVENT_TYPES, EventBus, RunSubscription
from .job import JobDefinition, validate_timeout
from .models import (
    RUN_STATUSES,
    TERMINAL_STATUSES,
    ErrorInfo,
    Event,
    LogEntry,
    Progress,
    Run,
    Schedule,
    Step,
    StepAttempt,
    from_ms,
)
from .network import ALWAYS_ONLINE, NetworkStatus
from .serialization import _NO_TYPE, encode
from .storage import NewRun, RunFilter, RunRecord, Store, open_store
from .storage.base import ScheduleRecord, WouldBlock

logger = logging.getLogger("durably_web")

Seconds = float | int | timedelta
LABEL_KEY = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")
MAX_LABELS = 32
MAX_LABEL_VALUE = 512
MAX_KEY_LENGTH = 255
MAX_SECONDS = 1e12
_STATUS_EVENT = {"completed": "run:complete", "failed": "run:fail", "cancelled": "run:cancel"}
#: The event a change notification of each status can become (``_change_event``).
_CHANGE_EVENT = {
    **_STATUS_EVENT,
    "deleted": "run:delete",
    "leased": "run:leased",
    "waiting": "run:waiting",
    "pending": "run:trigger",
}
#: The change notice of a run created already leased (``Store.create_leased_run``): to other
#: processes it is both a trigger and a lease.
_STARTED_CHANGE = "started"


@dataclass(frozen=True, slots=True)
class TriggerItem:
    """One entry of ``batch_trigger`` with its own options."""

    input: Any
    idempotency_key: str | None = None
    concurrency_key: str | None = None
    coalesce: Literal["skip"] | None = None
    labels: Mapping[str, str] | None = None
    priority: int = 0
    #: This run's deadline in seconds (overrides the job's ``timeout``), as in ``trigger``.
    timeout: Seconds | str | None = None


def _seconds(
    name: str, value: Seconds | None, *, allow_none: bool = False, minimum: float = 0.0
) -> float | None:
    if value is None:
        if allow_none:
            return None
        raise ValidationError(f"{name} is required")
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValidationError(f"{name} must be a number of seconds or a timedelta, not {value!r}")
    if value > MAX_SECONDS:  # beyond this, milliseconds no longer fit SQLite's 64-bit integers
        raise ValidationError(f"{name} must be at most {MAX_SECONDS:.0e} seconds, not {value}")
    if value < minimum:
        raise ValidationError(f"{name} must be at least {minimum} seconds, not {value}")
    return float(value)


def _in_pyodide() -> bool:
    return "_pyodide_core" in sys.modules


class Durably:
    """Runs durable jobs on one database.

    ``async with Durably("sqlite:///app.db", jobs=[...]) as durably:`` migrates
    the schema, starts the worker, and stops it (releasing its leases) on exit.
    Pass ``worker=False`` for a client that only triggers and queries, and
    ``read_only=True`` for one that only queries: the database is then opened so
    that nothing is written (not even a migration; its schema must be this
    version's, see ``SchemaVersionError``), no worker runs, and every write
    operation raises ``ReadOnlyError``.

    ``network`` tells the worker whether the network is there (see
    ``durably_web.network``); the browser runtime passes its own, which makes runs wait
    (reason ``"offline"``) instead of spending retries on requests that cannot leave,
    and checks them again every ``offline_recheck_interval`` if no "online" notice came.
    The default is always online.
    """

    def __init__(
        self,
        database: str | Store = "sqlite://:memory:",
        *,
        jobs: Iterable[JobDefinition[Any, Any]] = (),
        polling_interval: Seconds = 1.0,
        lease_duration: Seconds = 30.0,
        lease_renew_interval: Seconds = 5.0,
        max_concurrent_runs: int = 4,
        retain_runs: Seconds | None = None,
        preserve_steps: bool = True,
        shutdown_timeout: Seconds = 10.0,
        worker: bool = True,
        run_sync_in_thread: bool | None = None,
        inline_short_sync_steps: bool = True,
        max_payload_bytes: int = 10 * 1024 * 1024,
        sole_worker: bool = False,
        read_only: bool = False,
        clock: Callable[[], float] = time.time,
        offline_recheck_interval: Seconds = 30.0,
        network: NetworkStatus = ALWAYS_ONLINE,
        tracing: Any = False,
    ) -> None:
        self.polling_interval: float = _seconds("polling_interval", polling_interval, minimum=0.001)  # type: ignore[assignment]
        self.lease_duration: float = _seconds("lease_duration", lease_duration, minimum=0.05)  # type: ignore[assignment]
        self.lease_renew_interval: float = _seconds(
            "lease_renew_interval", lease_renew_interval, minimum=0.01
        )  # type: ignore[assignment]
        if self.lease_renew_interval >= self.lease_duration:
            raise ValidationError(
                f"lease_renew_interval ({self.lease_renew_interval}s) must be shorter than "
                f"lease_duration ({self.lease_duration}s) or leases would expire while renewed"
            )
        if (
            isinstance(max_concurrent_runs, bool)
            or not isinstance(max_concurrent_runs, int)
            or max_concurrent_runs < 1
        ):
            raise ValidationError(f"max_concurrent_runs must be a positive int, not {max_concurrent_runs!r}")
        self.max_concurrent_runs = max_concurrent_runs
        self.retain_runs = _seconds("retain_runs", retain_runs, allow_none=True)
        self.preserve_steps = bool(preserve_steps)
        self.shutdown_timeout: float = _seconds("shutdown_timeout", shutdown_timeout)  # type: ignore[assignment]
        self.offline_recheck_interval: float = _seconds(
            "offline_recheck_interval", offline_recheck_interval, minimum=0.001
        )  # type: ignore[assignment]
        for member in ("online", "is_network_error", "watch"):
            if not callable(getattr(network, member, None)):
                raise ValidationError(f"network must be a NetworkStatus (no {member}()): {network!r}")
        self.network = network
        self.run_sync_in_thread = (not _in_pyodide()) if run_sync_in_thread is None else run_sync_in_thread
        self.inline_short_sync_steps = bool(inline_short_sync_steps)
        if (
            isinstance(max_payload_bytes, bool)
            or not isinstance(max_payload_bytes, int)
            or max_payload_bytes < 1
        ):
            raise ValidationError(f"max_payload_bytes must be a positive int, not {max_payload_bytes!r}")
        self.max_payload_bytes = max_payload_bytes
        self.sole_worker = bool(sole_worker)
        self.read_only = bool(read_only)
        self.clock = clock
        self._database = database
        self._start_worker = worker
        self.bus = EventBus()
        self._store: Store | None = None
        self._worker: Worker | None = None
        # Runs changed by other processes, reported by a store that notifies (PostgreSQL).
        self._changes: asyncio.Queue[tuple[str, str]] | None = None
        self._changes_task: asyncio.Task[None] | None = None
        self._stop_watching: Callable[[], None] | None = None
        self.jobs: dict[str, JobDefinition[Any, Any]] = {}
        for job in jobs:
            self.register(job)
        # Tracing (the otel extra), imported only when asked for: without it no module of
        # OpenTelemetry is loaded. True: the global tracer provider; or a TracerProvider.
        self._tracer: Any = None
        if tracing is not False and tracing is not None:
            from .tracing import RunTracer

            self._tracer = RunTracer(self.bus, None if tracing is True else tracing)

    # --- lifecycle ----------------------------------------------------------------
    async def init(self, *, worker: bool | None = None, read_only: bool | None = None) -> Durably:
        """Open the database, apply migrations and start the worker. Idempotent.

        ``worker=False`` opens without a worker (overriding the constructor), for
        tools that only trigger, query and manage runs; ``read_only=True`` (also
        overriding the constructor) opens without writing anything, for tools
        that only look.
        """
        if self._store is not None:
            return self
        if read_only is not None:
            self.read_only = bool(read_only)
        if self.read_only and worker:
            raise ValidationError("a read-only Durably cannot run a worker: pass worker=False")
        if worker is not None:
            self._start_worker = worker
        if self.read_only:
            self._start_worker = False
        if isinstance(self._database, Store):
            store = self._database
        else:
            store = open_store(self._database, read_only=self.read_only)
        try:
            if self.read_only:
                await store.check_schema()
            else:
                await store.migrate()
            if self.sole_worker and self._start_worker:
                # Nothing else can be running these runs: resume them now, not after lease expiry.
                await store.expire_leases(self.now_ms())
            ticker = self._schedule_ticker(store)
            if self._start_worker:
                await ticker.sync_definitions()  # define_job(schedule=) rows exist once init returns
        except BaseException:
            await store.close()
            raise
        self._store = store
        if store.notifies_changes:
            await self._watch_other_processes(store)
        if self._start_worker:
            self._worker = Worker(
                store=store,
                jobs=self.jobs,
                config=WorkerConfig(
                    polling_interval=self.polling_interval,
                    lease_duration=self.lease_duration,
                    lease_renew_interval=self.lease_renew_interval,
                    max_concurrent_runs=self.max_concurrent_runs,
                    run_sync_in_thread=self.run_sync_in_thread,
                    inline_short_sync_steps=self.inline_short_sync_steps,
                    preserve_steps=self.preserve_steps,
                    retain_runs=self.retain_runs,
                    offline_recheck_interval=self.offline_recheck_interval,
                ),
                events=self,
                now_ms=self.now_ms,
                report_error=self.report_worker_error,
                network=self.network,
                schedules=ticker.fire_due,
            )
            await self._worker.start()
        return self

    async def stop(self) -> None:
        """Stop the worker (handlers stop at their next step, leases are released) and close."""
        if self._store is None:
            return
        if self._worker is not None:
            await self._worker.stop(self.shutdown_timeout)
            self._worker = None
        if self._tracer is not None:
            self._tracer.end_open_spans()  # executions this stop released end their spans
        if self._stop_watching is not None:
            self._stop_watching()
            self._stop_watching = None
        if self._changes_task is not None:
            self._changes_task.cancel()
            await asyncio.wait([self._changes_task])
            self._changes_task = self._changes = None
        await self.bus.drain(self.shutdown_timeout)  # async listeners' tasks end here too
        store, self._store = self._store, None
        await store.close()

    async def _watch_other_processes(self, store: Store) -> None:
        """Turn the store's change notifications into events on this bus, so listeners,
        ``subscribe``, ``wait_for_run`` and the HTTP run list see runs that other processes
        (workers on other hosts) trigger, execute and finish, as they happen."""
        changes: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._changes = changes
        self._stop_watching = await store.watch_changes(
            lambda run_id, status: changes.put_nowait((run_id, status))
        )
        self._changes_task = asyncio.create_task(self._emit_changes(changes), name="durably-changes")

    async def _emit_changes(self, changes: asyncio.Queue[tuple[str, str]]) -> None:
        while True:
            run_id, status = await changes.get()
            if not run_id:  # reconnected: anything may have changed meanwhile; pollers catch up
                continue
            if status == _STARTED_CHANGE:
                types: tuple[str, ...] = ("run:trigger", "run:leased")
            else:
                types = (_CHANGE_EVENT.get(status, ""),)
            if not any(self.bus.wants(kind) for kind in types):
                # Nobody here listens for what it would become: spare the read. Every process
                # hears every change of every other one, two or more per run.
                continue
            try:
                events = await self._change_events(run_id, status)
            except Exception as exc:  # the database is down: the run's pollers still see it later
                logger.debug("durably-web: could not read run %s after a notification: %s", run_id, exc)
                continue
            for event in events:
                if self.bus.wants(event.type):
                    self.bus.emit(event)

    async def _change_events(self, run_id: str, status: str) -> list[Event]:
        if status == "deleted":
            return [self._event("run:delete", run_id, None, {})]
        record = await self.store.get_run(run_id)
        if record is None:
            return []
        if status == _STARTED_CHANGE:  # created leased: its trigger, then its lease (if still so)
            run = self._to_run(record)
            data = {"input": run.input, "labels": run.labels}
            trigger = self._event("run:trigger", run_id, run.job_name, data)
            if record.status != "leased" or record.lease_generation != 1:
                return [trigger]  # changed again since: that change has its own notification
            return [trigger, self._event("run:leased", run_id, record.job_name, {"attempt": record.attempt})]
        if record.status != status:
            return []  # changed again since: that change has its own notification
        if record.status in TERMINAL_STATUSES:
            return [self._terminal_event(record)]
        if record.status == "leased":
            return [self._event("run:leased", run_id, record.job_name, {"attempt": record.attempt})]
        if record.status == "waiting":
            due_at = None if record.wake_at is None else from_ms(record.wake_at)
            data = {"reason": record.wait_reason, "step_name": record.wait_step, "due_at": due_at}
            return [self._event("run:waiting", run_id, record.job_name, data)]
        if record.status == "pending" and record.attempt == 0:
            run = self._to_run(record)
            return [
                self._event("run:trigger", run_id, run.job_name, {"input": run.input, "labels": run.labels})
            ]
        return []

    async def __aenter__(self) -> Durably:
        return await self.init()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @property
    def store(self) -> Store:
        if self._store is None:
            raise DurablyError(
                "Durably is not started: use 'async with Durably(...)' or 'await durably.init()'"
            )
        return self._store

    def register(self, job: JobDefinition[Any, Any]) -> JobDefinition[Any, Any]:
        if not isinstance(job, JobDefinition):
            raise ValidationError(f"not a job (use @define_job): {job!r}")
        existing = self.jobs.get(job.name)
        if existing is not None and existing is not job:
            raise ConflictError(f"another job is already registered as {job.name!r}")
        self.jobs[job.name] = job
        if self._worker is not None:
            self._worker.wake()
        return job

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    # --- events ----------------------------------------------------------------------
    def on(self, event_type: str, listener: Callable[[Event], Any]) -> Callable[[], None]:
        """Call ``listener(event)`` for each event of ``event_type`` ('*' for all); returns unsubscribe."""
        return self.bus.on(event_type, listener)

    def subscribe(
        self, run_id: str, *, max_buffered: int | None = None, max_buffered_bytes: int | None = None
    ) -> RunSubscription:
        """Async iterator of one run's events, ending with its terminal event.

        ``max_buffered`` (events) and ``max_buffered_bytes`` (their JSON size) bound what
        waits for a slow consumer (see ``EventBuffer``: progress coalesces, anything more
        raises ``SubscriptionOverflowError``); ``None`` keeps every event.

        It listens from this call on, so no event is missed between a trigger and the first
        ``async for`` step. An unknown run raises ``NotFoundError`` here when the store can
        answer at once (SQLite), otherwise on the first step (a network database); a run
        that had already finished yields its terminal event at once.
        """
        store = self.store
        job_name: str | None = None
        try:
            known = store.get_run_nowait(_run_id(run_id))
        except WouldBlock:
            known = None
        else:
            if known is None:
                raise NotFoundError(f"run {run_id!r} not found")
            job_name = known.job_name

        async def poll(first: bool) -> Event | None:
            nonlocal job_name
            current = await self.store.get_run(run_id)
            if current is None:
                if first and job_name is None:
                    raise NotFoundError(f"run {run_id!r} not found")
                return self._event("run:delete", run_id, job_name, {})
            job_name = current.job_name
            if current.status in TERMINAL_STATUSES:
                return self._terminal_event(current)
            return None

        return RunSubscription(
            self.bus,
            run_id,
            poll,
            self.polling_interval,
            max_buffered=max_buffered,
            max_buffered_bytes=max_buffered_bytes,
        )

    def wants(self, event_type: str) -> bool:
        """Whether any listener takes ``event_type`` (so the worker builds the event at all)."""
        return self.bus.wants(event_type)

    def emit(self, event_type: str, run_id: str | None, job_name: str | None, data: dict[str, Any]) -> None:
        if self.bus.wants(event_type):
            self.bus.emit(self._event(event_type, run_id, job_name, data))

    def _event(
        self, event_type: str, run_id: str | None, job_name: str | None, data: dict[str, Any]
    ) -> Event:
        return Event(event_type, run_id, job_name, from_ms(self.now_ms()), data)  # type: ignore[arg-type]

    def _terminal_event(self, record: RunRecord) -> Event:
        run = self._to_run(record)
        data: dict[str, Any] = {"output": run.output} if run.status == "completed" else {"error": run.error}
        return self._event(_STATUS_EVENT[record.status], record.id, record.job_name, data)

    def report_worker_error(
        self, exc: BaseException, *, run_id: str | None = None, job_name: str | None = None
    ) -> None:
        logger.warning("durably-web worker error (run %s): %s", run_id, exc)
        self.emit(
            "worker:error", run_id, job_name, {"error": ErrorInfo.from_exception(exc), "source": "worker"}
        )

    # --- triggering ----------------------------------------------------------------------
    def _job(self, job: str | JobDefinition[Any, Any]) -> JobDefinition[Any, Any]:
        if isinstance(job, JobDefinition):
            if job.name not in self.jobs:
                self.register(job)
            return self.jobs[job.name]
        if isinstance(job, str):
            found = self.jobs.get(job)
            if found is None:
                raise NotFoundError(f"unknown job {job!r}; registered jobs: {sorted(self.jobs)}")
            return found
        raise ValidationError(f"job must be a job name or a job definition, not {type(job).__name__}")

    def _new_run(
        self,
        job: JobDefinition[Any, Any],
        input: Any,
        idempotency_key: str | None,
        concurrency_key: str | None,
        coalesce: str | None,
        labels: Mapping[str, str] | None,
        priority: int = 0,
        timeout: Seconds | str | None = None,
    ) -> NewRun:
        self._check_writable(f"trigger {job.name!r}")
        _, input_json = job.validate_input(input)
        if len(input_json.encode()) > self.max_payload_bytes:
            raise ValidationError(
                f"input for job {job.name!r} is {len(input_json.encode())} bytes as JSON; "
                f"the limit is max_payload_bytes={self.max_payload_bytes}"
            )
        for name, key in (("idempotency_key", idempotency_key), ("concurrency_key", concurrency_key)):
            if key is not None and not _is_storable_text(key, MAX_KEY_LENGTH):
                raise ValidationError(
                    f"{name} must be a non-empty string of at most {MAX_KEY_LENGTH} characters "
                    "(valid UTF-8, no NUL)"
                )
        if coalesce not in (None, "skip"):
            raise ValidationError(f"coalesce must be None or 'skip', not {coalesce!r}")
        check_priority(priority)
        if job.debounce is not None and concurrency_key is None:
            raise ValidationError(
                f"job {job.name!r} is debounced: trigger it with a concurrency_key (the triggers "
                "that share one become one run)"
            )
        seconds = validate_timeout("timeout", timeout) if timeout is not None else job.timeout
        now = self.now_ms()
        return NewRun(
            id=ids.new_id(self.now_ms()),
            job_name=job.name,
            input_json=input_json,
            labels=_validate_labels(labels),
            idempotency_key=idempotency_key,
            concurrency_key=concurrency_key,
            coalesce=coalesce == "skip",
            created_at=now,
            priority=priority,
            trace_parent=None if self._tracer is None else self._tracer.current_trace_parent(),
            debounce_ms=None if job.debounce is None else int(job.debounce * 1000),
            deadline_at=_deadline(now, seconds),
            version=job.version,
        )

    async def _create(
        self, news: list[NewRun], accept_existing: Callable[[Run], bool] | None = None
    ) -> list[Run]:
        if accept_existing is None:
            results = await self.store.create_runs(news)
        else:
            verdict = accept_existing
            try:
                results = await self.store.create_runs(
                    news, accept_existing=lambda record: bool(verdict(self._to_run(record)))
                )
            except ExistingRunRefusedError as exc:
                raise ExistingRunRefusedError(
                    str(exc), records=exc.records, runs=[self._to_run(r) for r in exc.records]
                ) from None
        return self._created(results)

    def _created(self, results: list[tuple[RunRecord, str]]) -> list[Run]:
        runs = []
        for record, disposition in results:
            run = self._to_run(record, disposition=disposition)
            if disposition == "created":
                self.emit("run:trigger", run.id, run.job_name, {"input": run.input, "labels": run.labels})
            elif disposition == "coalesced":
                self.emit("run:coalesced", run.id, run.job_name, {"concurrency_key": run.concurrency_key})
            elif disposition == "debounced":
                data = {"concurrency_key": run.concurrency_key, "debounced": True, "input": run.input}
                self.emit("run:coalesced", run.id, run.job_name, data)
            runs.append(run)
        if self._worker is not None and any(
            d == "created" and record.status == "pending" for record, d in results
        ):
            self._worker.wake()
        if self._worker is not None:
            for record, disposition in results:
                if disposition in ("created", "debounced") and record.available_at > record.created_at:
                    # A debounced run starts later: this worker's timer takes it then (others poll).
                    self._worker.wake_at(record.available_at)
                if disposition == "created" and record.deadline_at is not None:
                    # So a run still pending at its deadline fails then, not at the next poll.
                    self._worker.wake_at(record.deadline_at)
        return runs

    async def trigger(
        self,
        job: str | JobDefinition[Any, Any],
        input: Any = None,
        *,
        idempotency_key: str | None = None,
        concurrency_key: str | None = None,
        coalesce: Literal["skip"] | None = None,
        labels: Mapping[str, str] | None = None,
        accept_existing: Callable[[Run], bool] | None = None,
        priority: int = 0,
        timeout: Seconds | str | None = None,
    ) -> Run:
        """Validate ``input`` and create a pending run (or return the existing one).

        ``timeout`` (seconds, a ``timedelta`` or a duration text such as ``"10m"``) sets this
        run's deadline, overriding the job's ``timeout``: counted from now, waits included;
        past it the run fails with ``RunTimeoutError`` (``Run.deadline_at``).

        ``disposition`` tells which: "created", "idempotent" (same idempotency
        key) or "coalesced" (a pending run with the same concurrency key and
        ``coalesce="skip"``). Without ``coalesce``, a pending run for the same
        concurrency key raises ``ConflictError``.

        ``accept_existing(run) -> bool`` decides, inside the transaction, whether
        an existing run the keys resolve to may be returned; on ``False``,
        ``ExistingRunRefusedError`` (with the run in ``runs``) is raised and nothing
        is written. The HTTP API uses it so that a key cannot hand one tenant
        another tenant's run. It is called synchronously and must be quick.

        ``priority`` (an int, default 0): workers claim runs of higher priority first, then
        the oldest. A run of a debounced job (``define_job(debounce=)``) needs a
        ``concurrency_key``; a trigger that joins the pending run of its key returns it with
        disposition "debounced" (its input replaced, its start pushed back).
        """
        definition = self._job(job)
        new = self._new_run(
            definition, input, idempotency_key, concurrency_key, coalesce, labels, priority, timeout
        )
        return (await self._create([new], accept_existing))[0]

    async def batch_trigger(
        self,
        job: str | JobDefinition[Any, Any],
        inputs: Sequence[Any],
        *,
        labels: Mapping[str, str] | None = None,
        accept_existing: Callable[[Run], bool] | None = None,
        priority: int = 0,
    ) -> list[Run]:
        """Trigger many runs in one transaction: all are created or none is.

        Items are inputs, or ``TriggerItem`` values carrying their own options.
        ``accept_existing`` is asked about every existing run an item resolves to
        (idempotent or coalesced), as in ``trigger``; one refusal raises
        ``ExistingRunRefusedError`` listing every refused run, and nothing of the
        batch is written or executed.
        """
        definition = self._job(job)
        if isinstance(inputs, str | bytes) or not isinstance(inputs, Sequence):
            raise ValidationError("inputs must be a list")
        news = []
        for position, item in enumerate(inputs):
            try:
                if isinstance(item, TriggerItem):
                    item_labels = {**_validate_labels(labels), **_validate_labels(item.labels)}
                    news.append(
                        self._new_run(
                            definition,
                            item.input,
                            item.idempotency_key,
                            item.concurrency_key,
                            item.coalesce,
                            item_labels,
                            item.priority,
                            item.timeout,
                        )
                    )
                else:
                    news.append(self._new_run(definition, item, None, None, None, labels, priority))
            except ValidationError as exc:
                raise ValidationError(f"batch item {position}: {exc}", exc.errors) from None
        return await self._create(news, accept_existing) if news else []

    async def trigger_and_wait(
        self,
        job: str | JobDefinition[Any, Any],
        input: Any = None,
        *,
        timeout: Seconds | None = None,
        idempotency_key: str | None = None,
        concurrency_key: str | None = None,
        coalesce: Literal["skip"] | None = None,
        labels: Mapping[str, str] | None = None,
        priority: int = 0,
        run_timeout: Seconds | str | None = None,
    ) -> Run:
        """Trigger, then wait until the run ends; returns the final run (check ``status``).

        ``timeout`` is how long this call waits (``WaitTimeoutError``; the run goes on);
        ``run_timeout`` is the run's own deadline, ``trigger``'s ``timeout`` (past it the run
        fails with ``RunTimeoutError``)."""
        limit = _seconds("timeout", timeout, allow_none=True)
        definition = self._job(job)
        new = self._new_run(
            definition, input, idempotency_key, concurrency_key, coalesce, labels, priority, run_timeout
        )
        # The caller waits for this run: when this process's worker is idle, it starts the run
        # at once, created leased (no claim), instead of it waiting in the queue for a claim.
        started = None if self._worker is None else await self._worker.start_at_once(new)
        if started is not None:
            if self.bus.wants("run:trigger"):
                self._created([(started, "created")])
            # Just written, and running: the wait need not read it first.
            return await self._wait_for_run(started.id, limit, read_first=False)
        run = (await self._create([new]))[0]
        if run.status in TERMINAL_STATUSES:  # an idempotency key found a run that has ended
            return run
        # The run was just read or written (pending): the wait need not read it again first.
        return await self._wait_for_run(run.id, limit, read_first=False)

    async def wait_for_run(self, run_id: str, *, timeout: Seconds | None = None) -> Run:
        """Wait until the run is completed, failed or cancelled; ``WaitTimeoutError`` on timeout."""
        limit = _seconds("timeout", timeout, allow_none=True)
        _run_id(run_id)
        return await self._wait_for_run(run_id, limit, read_first=True)

    async def _wait_for_run(self, run_id: str, limit: float | None, *, read_first: bool) -> Run:
        finished = asyncio.Event()

        def on_event(event: Event) -> None:
            if event.run_id == run_id and event.type in TERMINAL_EVENT_TYPES:
                finished.set()

        # Only terminal types: a '*' listener would make every step build events.
        unsubscribers = [self.bus.on(kind, on_event) for kind in TERMINAL_EVENT_TYPES]
        loop = asyncio.get_running_loop()
        deadline = None if limit is None else loop.time() + limit
        status = "pending"
        try:
            while True:
                if read_first:
                    record = await self.store.get_run(run_id)
                    if record is None:
                        raise NotFoundError(f"run {run_id!r} not found")
                    if record.status in TERMINAL_STATUSES:
                        return self._to_run(record)
                    status = record.status
                read_first = True
                wait = self.polling_interval
                if deadline is not None:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise WaitTimeoutError(f"run {run_id} is still {status} after {limit}s")
                    wait = min(wait, remaining)
                try:
                    async with asyncio.timeout(wait):  # no helper task, unlike wait_for
                        await finished.wait()
                except TimeoutError:
                    pass
        finally:
            for unsubscribe in unsubscribers:
                unsubscribe()

    # --- queries ------------------------------------------------------------------------------
    async def get_run(self, run_id: str) -> Run:
        record = await self.store.get_run(_run_id(run_id))
        if record is None:
            raise NotFoundError(f"run {run_id!r} not found")
        return self._to_run(record)

    async def get_runs(
        self,
        *,
        status: str | Sequence[str] | None = None,
        job_name: str | Sequence[str] | None = None,
        labels: Mapping[str, str] | None = None,
        limit: int = 100,
        offset: int = 0,
        parent_run_id: str | None = None,
        version: str | Sequence[str] | None = None,
    ) -> list[Run]:
        """Runs, newest first, filtered by status(es), job name(s), exact labels and the job
        version(s) that started them (``version``: with the unfinished statuses, what is still
        in flight per version during a deploy); with ``parent_run_id``, only the children that
        run started (``step.start_child``)."""
        statuses = _one_or_many("status", status)
        if statuses is not None:
            unknown = set(statuses) - RUN_STATUSES
            if unknown:
                raise ValidationError(
                    f"unknown status(es) {sorted(unknown)}; expected {sorted(RUN_STATUSES)}"
                )
        for name, value in (("limit", limit), ("offset", offset)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**62:
                raise ValidationError(f"{name} must be a non-negative int, not {value!r}")
        records = await self.store.list_runs(
            RunFilter(
                statuses=statuses,
                job_names=_one_or_many("job_name", job_name),
                labels=_validate_labels(labels, filtering=True),
                limit=min(limit, 10_000),
                offset=offset,
                parent_run_id=None if parent_run_id is None else _run_id(parent_run_id),
                versions=_one_or_many("version", version),
            )
        )
        return [self._to_run(record) for record in records]

    async def get_steps(self, run_id: str) -> list[Step]:
        """The run's recorded steps in execution order (completed, and the failed one if any)."""
        await self._require(run_id)
        return [
            Step(
                run_id=s.run_id,
                index=s.index,
                name=s.name,
                status=s.status,  # type: ignore[arg-type]
                output=None if s.output_json is None else json.loads(s.output_json),
                error=_error_info(s.error_json),
                started_at=from_ms(s.started_at),  # type: ignore[arg-type]
                completed_at=from_ms(s.completed_at),  # type: ignore[arg-type]
                kind=s.kind,  # type: ignore[arg-type]
            )
            for s in await self.store.list_steps(run_id)
        ]

    async def get_step_attempts(self, run_id: str) -> list[StepAttempt]:
        """Every attempt of every ``step.run`` step, by position then attempt number: each
        retried failure, and the attempt that ended the step (completed, or failed for good).
        An attempt that failed for want of the network (``offline``) is listed too; it used
        up no retry. ``metadata``: what the step attached to the attempt
        (``step.attempt.set_metadata``), kept when step outputs are dropped."""
        await self._require(run_id)
        attempts = [
            StepAttempt(
                run_id=s.run_id,
                index=s.index,
                name=s.name,
                attempt=s.attempt,
                status=s.status,  # type: ignore[arg-type]
                error=_error_info(s.error_json),
                started_at=from_ms(s.started_at),  # type: ignore[arg-type]
                completed_at=from_ms(s.completed_at),  # type: ignore[arg-type]
                offline=s.offline,
                metadata=None if s.metadata_json is None else json.loads(s.metadata_json),
            )
            for s in [*await self.store.list_step_attempts(run_id), *await self.store.list_steps(run_id)]
            if s.kind == "run"
        ]
        attempts.sort(key=lambda a: (a.index, a.attempt))
        return attempts

    async def get_logs(self, run_id: str) -> list[LogEntry]:
        await self._require(run_id)
        return [
            LogEntry(
                run_id=log.run_id,
                step_name=log.step_name,
                level=log.level,  # type: ignore[arg-type]
                message=log.message,
                data=None if log.data_json is None else json.loads(log.data_json),
                created_at=from_ms(log.created_at),  # type: ignore[arg-type]
            )
            for log in await self.store.list_logs(run_id)
        ]

    # --- management --------------------------------------------------------------------------------
    async def cancel(self, run_id: str) -> Run:
        """Cancel a pending or running run; a running handler is stopped within one
        lease-renew interval (at once when it runs in this process). Its child runs that
        have not ended (and theirs) are cancelled with it, in the same transaction; a
        parent waiting for this run continues (``ChildRunCancelledError`` there)."""
        self._check_writable("cancel a run")
        before = await self._require(run_id)
        record, *descendants = await self.store.cancel_run_tree(run_id, self.now_ms())
        stopped = [record] if before.status != "cancelled" else []
        for cancelled in [*stopped, *descendants]:
            if self._worker is not None and cancelled.id in self._worker.active:
                self._worker.active[cancelled.id].stop("cancelled")
            self.emit("run:cancel", cancelled.id, cancelled.job_name, {})
        if self._worker is not None and (record.parent_run_id is not None or descendants):
            self._worker.wake()  # a parent waiting for it is due now
        return self._to_run(record)

    async def send_signal(
        self, run_id: str, name: str, payload: Any = None, *, signal_id: str | None = None
    ) -> str:
        """Send the signal ``name`` with ``payload`` to a run; return the disposition:
        "delivered" (the run was waiting for it and continues now), "stored" (kept until the
        run reaches ``wait_for_signal(name)``) or "duplicate" (this ``signal_id`` was sent to
        the run before; nothing changed). ``NotFoundError`` for an unknown run,
        ``ConflictError`` for a finished one. When the payload type is known here (the job's
        ``define_job(signals=)``, or a ``wait_for_signal(name, type=)`` this process has
        executed), a payload that fails it raises ``ValidationError`` and nothing is stored.
        """
        self._check_writable("send a signal")
        record = await self._require(run_id)
        if not _is_storable_text(name, MAX_KEY_LENGTH):
            raise ValidationError(f"signal name must be a non-empty string of at most {MAX_KEY_LENGTH} chars")
        if signal_id is not None and not _is_storable_text(signal_id, MAX_KEY_LENGTH):
            raise ValidationError(f"signal_id must be a non-empty string of at most {MAX_KEY_LENGTH} chars")
        job = self.jobs.get(record.job_name)
        tp = job.signal_types.get(name, _NO_TYPE) if job is not None else _NO_TYPE
        try:
            payload_json, _ = encode(payload, tp, what=f"signal {name!r}")
        except StepError as exc:
            cause = exc.__cause__
            if isinstance(cause, PydanticValidationError):
                raise ValidationError(
                    f"invalid payload for signal {name!r}: {cause}",
                    cause.errors(include_url=False, include_context=False, include_input=False),  # type: ignore[arg-type]
                ) from None
            raise ValidationError(f"invalid payload for signal {name!r}: {exc}") from None
        if len(payload_json.encode()) > self.max_payload_bytes:
            raise ValidationError(f"signal payload is larger than max_payload_bytes={self.max_payload_bytes}")
        disposition, record = await self.store.send_signal(
            run_id, name, payload_json, signal_id, self.now_ms()
        )
        if disposition != "duplicate":
            self.emit(
                "signal:received",
                run_id,
                record.job_name,
                {"name": name, "signal_id": signal_id, "disposition": disposition},
            )
        if disposition == "delivered" and self._worker is not None:
            self._worker.wake()
        return disposition

    async def resume_run(self, run_id: str) -> Run:
        """Continue a failed or cancelled run after its last completed step.

        The run goes back to pending with its attempt count kept; when it executes,
        its completed steps replay and the step that failed executes again (with a
        fresh budget of its ``RetryPolicy``; the earlier attempts stay in
        ``get_step_attempts``). ``ConflictError`` for any other status (completed,
        pending, leased, waiting), for a cancelled run whose handler is still
        stopping, and when another run of its concurrency key is pending.
        """
        self._check_writable("resume a run")
        before = await self._require(run_id)
        record = await self.store.resume_run(run_id, self.now_ms())
        data = {"attempt": record.attempt, "previous_status": before.status}
        self.emit("run:resume", run_id, record.job_name, data)
        if self._worker is not None:
            self._worker.wake()
        return self._to_run(record)

    async def fork_run(self, run_id: str, *, from_step: str, labels: Mapping[str, str] | None = None) -> Run:
        """A new run of the same job, input and labels (re-validated, as in ``retrigger``) holding
        copies of the source's completed steps recorded before ``from_step``: those replay,
        ``from_step`` and everything after it run again. ``forked_from`` links it to the source.

        ``from_step`` must name a recorded step of the source (``NotFoundError`` otherwise). The
        fork has no idempotency or concurrency key. ``labels``, when given, replace the source's
        labels (the HTTP API passes the labels its ``on_trigger`` hook admitted).
        """
        self._check_writable("fork a run")
        record = await self._require(run_id)
        if not isinstance(from_step, str) or not from_step:
            raise ValidationError(f"from_step must be a step name, not {from_step!r}")
        input_json = record.input_json
        if record.job_name in self.jobs:
            _, input_json = self.jobs[record.job_name].validate_input(json.loads(record.input_json))
        new = NewRun(
            id=ids.new_id(self.now_ms()),
            job_name=record.job_name,
            input_json=input_json,
            labels=dict(record.labels) if labels is None else _validate_labels(labels),
            idempotency_key=None,
            concurrency_key=None,
            coalesce=False,
            created_at=self.now_ms(),
            forked_from=record.id,
            deadline_at=_carried_deadline(record, self.now_ms()),
            version=self.jobs[record.job_name].version if record.job_name in self.jobs else None,
        )
        created = await self.store.fork_run(new, record.id, from_step)
        return self._created([(created, "created")])[0]

    async def retrigger(self, run_id: str) -> Run:
        """A new run of the same job with the same input, labels and concurrency key.

        With the job registered here, the input is re-validated against its current
        input model. Without it (a client on a database URL, ``jobs=[]``), the stored
        input is reused as it is: it was validated when the run was first triggered,
        and the worker that executes the new run decodes it with its job's model
        (a run whose input no longer fits fails with the ``ValidationError``).
        """
        record = await self._require(run_id)
        if record.job_name in self.jobs:
            new = self._new_run(
                self.jobs[record.job_name],
                json.loads(record.input_json),
                None,
                record.concurrency_key,
                None,
                record.labels,
                record.priority,
                _carried_timeout(record),
            )
        else:
            self._check_writable(f"retrigger a run of {record.job_name!r}")
            new = NewRun(
                id=ids.new_id(self.now_ms()),
                job_name=record.job_name,
                input_json=record.input_json,
                labels=dict(record.labels),
                idempotency_key=None,
                concurrency_key=record.concurrency_key,
                coalesce=False,
                created_at=self.now_ms(),
                priority=record.priority,
                deadline_at=_carried_deadline(record, self.now_ms()),
            )
        return (await self._create([new]))[0]

    async def delete_run(self, run_id: str) -> None:
        """Delete a run that is not leased, with its steps and logs. ``ConflictError`` while
        it is leased or one of its child runs is still pending, leased or waiting."""
        self._check_writable("delete a run")
        record = await self.store.delete_run(_run_id(run_id))
        self.emit("run:delete", record.id, record.job_name, {"labels": record.labels})

    async def purge_runs(self, *, older_than: Seconds, limit: int | None = None) -> int:
        """Delete completed/failed/cancelled runs that ended more than ``older_than`` ago."""
        self._check_writable("purge runs")
        age = _seconds("older_than", older_than)
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit < 2**62
        ):
            raise ValidationError(f"limit must be a non-negative int, not {limit!r}")
        return await self.store.purge_runs(self.now_ms() - int(age * 1000), limit)  # type: ignore[operator]

    # --- schedules ---------------------------------------------------------------------------------
    def _schedule_ticker(self, store: Store) -> Any:
        from .schedules import ScheduleTicker

        return ScheduleTicker(
            store=store,
            jobs=self.jobs,
            now_ms=self.now_ms,
            created=self._created,
            max_payload_bytes=self.max_payload_bytes,
            report_error=self.report_worker_error,
        )

    async def schedule(
        self,
        job: str | JobDefinition[Any, Any],
        cron: str,
        *,
        input: Any = None,
        name: str | None = None,
        timezone: str = "UTC",
        catch_up: Literal["latest", "all"] = "latest",
    ) -> Schedule:
        """Create or replace the schedule ``name`` (default: the job's name): each tick of
        ``cron`` (read in ``timezone``, an IANA name) creates a run of ``job`` with ``input``,
        exactly once across all workers on this database. Ticks fire in any process that runs
        a worker. ``catch_up`` is what happens to ticks missed while no worker ran: ``"latest"``
        creates one run (for the latest of them), ``"all"`` one per missed tick (at most 100,
        the latest). Replacing a schedule keeps whether it is paused, and its next tick unless
        the cron or the time zone changed. ``ValidationError`` for an invalid cron expression,
        unknown time zone or input the job refuses."""
        from .schedules import new_schedule

        self._check_writable("schedule a job")
        definition = self._job(job)
        record = new_schedule(
            definition,
            cron,
            input=input,
            name=definition.name if name is None else name,
            timezone=timezone,
            catch_up=catch_up,
            now=self.now_ms(),
            max_payload_bytes=self.max_payload_bytes,
        )
        stored = await self.store.upsert_schedule(record)
        self._schedules_changed()
        return self._to_schedule(stored)

    async def unschedule(self, name: str) -> None:
        """Delete the schedule ``name`` (the runs it created stay); ``NotFoundError``. A
        ``define_job(schedule=)`` schedule comes back when a worker starts with that job."""
        self._check_writable("unschedule")
        await self.store.delete_schedule(_schedule_name(name))

    async def list_schedules(self) -> list[Schedule]:
        """Every schedule on this database, by name."""
        return [self._to_schedule(record) for record in await self.store.list_schedules()]

    async def get_schedule(self, name: str) -> Schedule:
        record = await self.store.get_schedule(_schedule_name(name))
        if record is None:
            raise NotFoundError(f"schedule {name!r} not found")
        return self._to_schedule(record)

    async def pause_schedule(self, name: str) -> Schedule:
        """Stop creating runs for ``name`` until ``resume_schedule``; ``NotFoundError``."""
        self._check_writable("pause a schedule")
        record = await self.store.set_schedule_paused(_schedule_name(name), True, None, self.now_ms())
        return self._to_schedule(record)

    async def resume_schedule(self, name: str) -> Schedule:
        """Create runs for ``name`` again from its next tick after now: ticks that passed while
        it was paused are skipped, not caught up. ``NotFoundError``."""
        from .schedules import next_tick_after

        self._check_writable("resume a schedule")
        current = await self.store.get_schedule(_schedule_name(name))
        if current is None:
            raise NotFoundError(f"schedule {name!r} not found")
        now = self.now_ms()
        next_tick = None
        if current.paused:
            next_tick = next_tick_after(current.cron, current.timezone, now)
        record = await self.store.set_schedule_paused(current.name, False, next_tick, now)
        self._schedules_changed()
        return self._to_schedule(record)

    def _schedules_changed(self) -> None:
        if self._worker is not None:
            self._worker.schedules_changed()

    def _to_schedule(self, record: ScheduleRecord) -> Schedule:
        job = self.jobs.get(record.job_name)
        return Schedule(
            name=record.name,
            job_name=record.job_name,
            cron=record.cron,
            timezone=record.timezone,
            input=_decode(record.input_json, job.decode_input if job else None),
            catch_up=record.catch_up,  # type: ignore[arg-type]
            paused=record.paused,
            next_tick_at=from_ms(record.next_tick_at),  # type: ignore[arg-type]
            last_tick_at=from_ms(record.last_tick_at),
            last_run_id=record.last_run_id,
            created_at=from_ms(record.created_at),
            updated_at=from_ms(record.updated_at),
        )

    def _check_writable(self, operation: str) -> None:
        if self.read_only:
            raise ReadOnlyError(
                f"cannot {operation}: this Durably was opened read-only (read_only=True); "
                "open it without read_only to change anything"
            )

    async def _require(self, run_id: str) -> RunRecord:
        record = await self.store.get_run(_run_id(run_id))
        if record is None:
            raise NotFoundError(f"run {run_id!r} not found")
        return record

    def _to_run(self, record: RunRecord, *, disposition: str | None = None) -> Run:
        job = self.jobs.get(record.job_name)
        progress = None
        if record.progress_current is not None:
            progress = Progress(record.progress_current, record.progress_total, record.progress_message)
        return Run(
            id=record.id,
            job_name=record.job_name,
            status=record.status,  # type: ignore[arg-type]
            input=_decode(record.input_json, job.decode_input if job else None),
            output=_decode(record.output_json, job.decode_output if job else None),
            error=_error_info(record.error_json),
            labels=record.labels,
            progress=progress,
            attempt=record.attempt,
            idempotency_key=record.idempotency_key,
            concurrency_key=record.concurrency_key,
            created_at=from_ms(record.created_at),
            started_at=from_ms(record.started_at),
            completed_at=from_ms(record.completed_at),
            updated_at=from_ms(record.updated_at),
            disposition=disposition,  # type: ignore[arg-type]
            wake_at=from_ms(record.wake_at),
            wait_reason=record.wait_reason if record.status == "waiting" else None,
            wait_step=record.wait_step if record.status == "waiting" else None,
            forked_from=record.forked_from,
            priority=record.priority,
            not_before=from_ms(record.available_at)
            if record.status == "pending" and record.available_at > record.created_at
            else None,
            parent_run_id=record.parent_run_id,
            wait_child_id=record.wait_child_id if record.status == "waiting" else None,
            deadline_at=from_ms(record.deadline_at),
            version=record.version,
            trace_parent=record.trace_parent,
        )


#: The priorities a run may have (PostgreSQL's INTEGER).
MIN_PRIORITY, MAX_PRIORITY = -(2**31), 2**31 - 1


def check_priority(priority: Any) -> int:
    """``trigger(priority=)``: an int that both backends store (``ValidationError`` otherwise)."""
    if (
        isinstance(priority, bool)
        or not isinstance(priority, int)
        or not MIN_PRIORITY <= priority <= MAX_PRIORITY
    ):
        raise ValidationError(
            f"priority must be an int from {MIN_PRIORITY} to {MAX_PRIORITY}, not {priority!r}"
        )
    return priority


def _deadline(created_at: int, timeout: float | None) -> int | None:
    return None if timeout is None else created_at + int(timeout * 1000)


def _carried_timeout(record: RunRecord) -> float | None:
    """A retriggered or forked run gets the source's timeout, counted from its own trigger."""
    return None if record.deadline_at is None else max(record.deadline_at - record.created_at, 1) / 1000


def _carried_deadline(record: RunRecord, now: int) -> int | None:
    return _deadline(now, _carried_timeout(record))


def _decode(text: str | None, decoder: Callable[[str], Any] | None) -> Any:
    if text is None:
        return None
    if decoder is not None:
        try:
            return decoder(text)
        except Exception:  # stored by an older model version: show the raw value
            pass
    return json.loads(text)


def _error_info(text: str | None) -> ErrorInfo | None:
    if text is None:
        return None
    data = json.loads(text)
    return ErrorInfo(data.get("type", "Error"), data.get("message", ""), data.get("traceback", ""))


def _run_id(run_id: Any) -> str:
    if not isinstance(run_id, str):
        raise ValidationError(f"run id must be a string, not {type(run_id).__name__}")
    try:
        run_id.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: no run can have this id
        raise ValidationError("run id is not valid UTF-8 text") from None
    return run_id


def _schedule_name(name: Any) -> str:
    if not isinstance(name, str) or not _is_storable_text(name, MAX_KEY_LENGTH):
        raise ValidationError(f"schedule name must be a non-empty string, not {name!r}")
    return name


def _one_or_many(name: str, value: str | Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValidationError(f"{name} must be a string or a list of strings")


def _is_storable_text(value: Any, max_length: int) -> bool:
    if not isinstance(value, str) or not value or len(value) > max_length or "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return False
    return True


def _validate_labels(labels: Mapping[str, str] | None, *, filtering: bool = False) -> dict[str, str]:
    if labels is None:
        return {}
    if not isinstance(labels, Mapping):
        raise ValidationError("labels must be a mapping of strings to strings")
    if len(labels) > MAX_LABELS:
        raise ValidationError(f"at most {MAX_LABELS} labels are allowed")
    clean = {}
    for key, value in labels.items():
        if not isinstance(key, str) or not LABEL_KEY.match(key):
            raise ValidationError(f"invalid label key {key!r}: use 1-64 letters, digits and _ . : / -")
        if not isinstance(value, str) or len(value) > MAX_LABEL_VALUE or "\x00" in value:
            raise ValidationError(
                f"label {key!r} must have a string value of at most {MAX_LABEL_VALUE} characters"
            )
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationError(f"label {key!r} is not valid UTF-8 text") from None
        clean[key] = value
    return clean
