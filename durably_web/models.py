"""The values the public API hands out: runs, steps, log lines, progress, events."""

from __future__ import annotations

import traceback as tb
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

RunStatus = Literal["pending", "leased", "waiting", "completed", "failed", "cancelled"]
Disposition = Literal["created", "idempotent", "coalesced", "debounced"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
RUN_STATUSES: frozenset[str] = frozenset({"pending", "leased", "waiting", *TERMINAL_STATUSES})


def from_ms(value: int | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value / 1000, tz=UTC)


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """What went wrong: the exception's type name, message and formatted traceback."""

    type: str
    message: str
    traceback: str = ""

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorInfo:
        return cls(
            type=type(exc).__qualname__,
            message=str(exc),
            traceback="".join(tb.format_exception(exc)),
        )

    def __str__(self) -> str:
        return f"{self.type}: {self.message}"

    def __contains__(self, text: str) -> bool:
        """``"timeout" in run.error`` searches the type, message and traceback."""
        return text in self.type or text in self.message or text in self.traceback


@dataclass(frozen=True, slots=True)
class Progress:
    current: int
    total: int | None = None
    message: str | None = None


@dataclass(frozen=True, slots=True)
class Run:
    """One execution request of a job and everything known about it.

    ``input`` and ``output`` are decoded with the job's models when this
    ``Durably`` instance knows the job, otherwise they are plain JSON values.
    ``disposition`` is set only on the value ``trigger`` returns.
    """

    id: str
    job_name: str
    status: RunStatus
    input: Any
    output: Any = None
    error: ErrorInfo | None = None
    labels: dict[str, str] = field(default_factory=dict)
    progress: Progress | None = None
    attempt: int = 0
    idempotency_key: str | None = None
    concurrency_key: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    updated_at: datetime | None = None
    disposition: Disposition | None = None
    #: While ``status == "waiting"``: when it continues, why ("retry" | "sleep" | "signal" |
    #: "offline") and at which step. An "offline" run continues as soon as the network is
    #: back; ``wake_at`` is then only when it is checked again at the latest.
    wake_at: datetime | None = None
    wait_reason: str | None = None
    wait_step: str | None = None
    #: ``fork_run``: the id of the run this one was forked from.
    forked_from: str | None = None
    #: Flow control: ``trigger(priority=)``; a claim takes higher priorities first.
    priority: int = 0
    #: While ``status == "pending"``: the earliest start (a debounced job's run starts
    #: ``debounce`` seconds after its last trigger); ``None`` when it may start at once.
    not_before: datetime | None = None
    #: A child run (``step.start_child``): the id of the run that started it.
    parent_run_id: str | None = None
    #: While waiting with ``wait_reason == "child"``: the child run it waits for.
    wait_child_id: str | None = None
    #: When the run fails with ``RunTimeoutError`` if it has not ended (``timeout=``), or None.
    deadline_at: datetime | None = None
    #: The job version that started the run (``define_job(version=)``, else a hash of the
    #: handler's code); before its first claim, the version the triggering process had.
    version: str | None = None
    #: Tracing: the W3C ``traceparent`` the trigger carried (its current span's, or an HTTP
    #: trigger's header), the parent of the run's spans; ``None`` without one.
    trace_parent: str | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (models dumped, datetimes as ISO 8601 UTC)."""
        return {
            "id": self.id,
            "job_name": self.job_name,
            "status": self.status,
            "input": to_jsonable(self.input),
            "output": to_jsonable(self.output),
            "error": None if self.error is None else asdict(self.error),
            "labels": dict(self.labels),
            "progress": None if self.progress is None else asdict(self.progress),
            "attempt": self.attempt,
            "idempotency_key": self.idempotency_key,
            "concurrency_key": self.concurrency_key,
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "completed_at": iso(self.completed_at),
            "updated_at": iso(self.updated_at),
            "disposition": self.disposition,
            "wake_at": iso(self.wake_at),
            "wait_reason": self.wait_reason,
            "wait_step": self.wait_step,
            "forked_from": self.forked_from,
            "priority": self.priority,
            "not_before": iso(self.not_before),
            "parent_run_id": self.parent_run_id,
            "wait_child_id": self.wait_child_id,
            "deadline_at": iso(self.deadline_at),
            "version": self.version,
            "trace_parent": self.trace_parent,
        }


@dataclass(frozen=True, slots=True)
class Step:
    """A recorded step. ``output`` is the stored JSON value (the typed value is what ``step.run`` returns)."""

    run_id: str
    index: int
    name: str
    status: Literal["completed", "failed"]
    output: Any
    error: ErrorInfo | None
    started_at: datetime
    completed_at: datetime
    #: "run" (``step.run``), "sleep" (``step.sleep``/``sleep_until``; output: the due time in
    #: ms since the epoch) or "signal" (``wait_for_signal``; output: ``{"payload": ...}`` or
    #: ``{"timeout": true}``), "child" (``start_child``; output: the ``ChildRun`` handle as
    #: ``{"run_id": ..., "job_name": ...}``) or "child_wait" (``wait_for_child``; output:
    #: ``{"output": ...}``, the child's output).
    kind: Literal["run", "sleep", "signal", "child", "child_wait"] = "run"

    @property
    def duration_ms(self) -> float:
        return (self.completed_at - self.started_at).total_seconds() * 1000

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "index": self.index,
            "name": self.name,
            "kind": self.kind,
            "status": self.status,
            "output": self.output,
            "error": None if self.error is None else asdict(self.error),
            "started_at": iso(self.started_at),
            "completed_at": iso(self.completed_at),
            "duration_ms": self.duration_ms,
        }


@dataclass(frozen=True, slots=True)
class StepAttempt:
    """One attempt of one step (``get_step_attempts``): every retried failure, and the
    attempt that ended the step (completed, or failed for good). ``offline``: the attempt
    failed with a network error while the browser was offline; it used up no retry.
    ``metadata``: the JSON object the step attached to this attempt
    (``step.attempt.set_metadata``), or ``None``."""

    run_id: str
    index: int
    name: str
    attempt: int
    status: Literal["completed", "failed"]
    error: ErrorInfo | None
    started_at: datetime
    completed_at: datetime
    offline: bool = False
    metadata: dict[str, Any] | None = None

    @property
    def duration_ms(self) -> float:
        return (self.completed_at - self.started_at).total_seconds() * 1000

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "index": self.index,
            "name": self.name,
            "attempt": self.attempt,
            "status": self.status,
            "error": None if self.error is None else asdict(self.error),
            "started_at": iso(self.started_at),
            "completed_at": iso(self.completed_at),
            "duration_ms": self.duration_ms,
            "offline": self.offline,
            "metadata": self.metadata,
        }


@dataclass(frozen=True, slots=True)
class LogEntry:
    run_id: str
    step_name: str | None
    level: Literal["debug", "info", "warning", "error"]
    message: str
    data: Any
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "step_name": self.step_name,
            "level": self.level,
            "message": self.message,
            "data": self.data,
            "created_at": iso(self.created_at),
        }


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened; ``data`` depends on ``type`` (see README, "Events")."""

    type: str
    run_id: str | None
    job_name: str | None
    timestamp: datetime
    data: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        """``event["step_name"]``: a common field or an entry of ``data``."""
        if key in ("type", "run_id", "job_name", "timestamp"):
            return getattr(self, key)
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "run_id": self.run_id,
            "job_name": self.job_name,
            "timestamp": iso(self.timestamp),
            **{k: to_jsonable(v) for k, v in self.data.items()},
        }


def to_jsonable(value: Any) -> Any:
    """Dump models, dataclasses and datetimes to JSON-compatible values."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    from pydantic_core import to_jsonable_python

    return to_jsonable_python(value)


@dataclass(frozen=True, slots=True)
class ChildRun:
    """What ``step.start_child`` returns: the handle of the child run it started (and
    recorded, so a replay returns the same handle). Pass it to ``step.wait_for_child``;
    ``run_id`` also finds the child through ``get_run`` and ``get_runs(parent_run_id=)``."""

    run_id: str
    job_name: str


@dataclass(frozen=True, slots=True)
class Schedule:
    """A cron schedule: each tick of ``cron`` (in ``timezone``) creates a run of ``job_name``
    with ``input``. ``next_tick_at`` is when the next run is due; ``last_tick_at`` and
    ``last_run_id`` tell the tick fired last and its run (labelled ``durably:schedule`` and
    ``durably:tick``). ``catch_up`` is what a worker does about ticks missed while none ran:
    ``"latest"`` (one run) or ``"all"`` (one run per tick, at most 100)."""

    name: str
    job_name: str
    cron: str
    timezone: str
    input: Any
    catch_up: Literal["latest", "all"]
    paused: bool
    next_tick_at: datetime
    last_tick_at: datetime | None = None
    last_run_id: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (datetimes as ISO 8601 UTC)."""
        return {
            "name": self.name,
            "job_name": self.job_name,
            "cron": self.cron,
            "timezone": self.timezone,
            "input": to_jsonable(self.input),
            "catch_up": self.catch_up,
            "paused": self.paused,
            "next_tick_at": iso(self.next_tick_at),
            "last_tick_at": iso(self.last_tick_at),
            "last_run_id": self.last_run_id,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
        }
