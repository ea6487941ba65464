"""Request bodies and the run filter of the HTTP API (strict pydantic models)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from ..durations import DURATION_FORMS, DURATION_PATTERN, parse_duration

#: Most items one ``POST /trigger/batch`` may carry.
MAX_BATCH_ITEMS = 1000
MAX_LIMIT = 1000
MAX_OFFSET = 1_000_000_000  # SQLite integers are 64-bit; keep far below overflow
#: Event types the run-list stream (``GET /events``) carries: one line per run change.
RUN_LEVEL_EVENT_TYPES: tuple[str, ...] = (
    "run:trigger",
    "run:coalesced",
    "run:leased",
    "run:progress",
    "run:waiting",
    "run:resume",
    "run:complete",
    "run:fail",
    "run:cancel",
    "run:delete",
)


def _duration_or_none(value: Any) -> Any:
    return parse_duration(value) if isinstance(value, str) else value


#: ``timeout`` of a trigger: the run's deadline, in seconds or a duration string ("10m").
_RunTimeout = Annotated[
    Annotated[float, Field(gt=0, allow_inf_nan=False)] | None,
    BeforeValidator(_duration_or_none),
    WithJsonSchema(
        {
            "description": "the run's deadline from now, waits included (overrides the job's "
            f"timeout; past it the run fails with RunTimeoutError): {DURATION_FORMS}",
            "oneOf": [
                {"type": "number", "exclusiveMinimum": 0},
                {"type": "string", "pattern": DURATION_PATTERN, "examples": ["10m", "1h", "90"]},
                {"type": "null"},
            ],
        }
    ),
]


class TriggerRequest(BaseModel):
    """Body of ``POST /trigger``. Strict: unknown fields and coerced types are rejected."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    job: str = Field(min_length=1, max_length=128, description="name of a registered job")
    input: Any = Field(None, description="the job's input; validated by the job's input model")
    idempotency_key: str | None = None
    concurrency_key: str | None = None
    coalesce: Literal["skip"] | None = None
    labels: dict[str, str] | None = None
    priority: int = Field(default=0, description="claimed before runs of lower priority (then oldest first)")
    timeout: _RunTimeout = None

    def namespaced(self, namespace: str) -> TriggerRequest:
        """A copy whose idempotency and concurrency keys live in ``namespace`` (a tenant's id).

        Keys are global to the database, so without this one tenant could learn that
        another's key exists, squat a key the other will use, or hold its concurrency
        key. Each key becomes ``f"{len(namespace)}:{namespace}:{key}"``: the length makes
        the prefix unambiguous (tenant ``a`` with key ``b:x`` never meets tenant ``a:b``
        with key ``x``). A key that already carries this prefix is kept as it is, so the
        trigger of a retrigger, which carries the run's stored (namespaced) keys, keeps
        them. Responses show the stored, namespaced keys.
        """
        if not isinstance(namespace, str) or not namespace:
            raise ValueError("namespace must be a non-empty string")
        prefix = f"{len(namespace)}:{namespace}:"

        def inside(key: str | None) -> str | None:
            return key if key is None or key.startswith(prefix) else prefix + key

        return self.model_copy(
            update={
                "idempotency_key": inside(self.idempotency_key),
                "concurrency_key": inside(self.concurrency_key),
            }
        )


class TriggerBatchItem(BaseModel):
    """One item of ``POST /trigger/batch``: an input with its own trigger options."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    input: Any = Field(description="the job's input; validated by the job's input model")
    idempotency_key: str | None = None
    concurrency_key: str | None = None
    coalesce: Literal["skip"] | None = None
    labels: dict[str, str] | None = None
    priority: int = 0
    timeout: _RunTimeout = None


class TriggerBatchRequest(BaseModel):
    """Body of ``POST /trigger/batch``: many runs of one job, created all together or not at all."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    job: str = Field(min_length=1, max_length=128, description="name of a registered job")
    items: list[TriggerBatchItem] = Field(max_length=MAX_BATCH_ITEMS)


def _duration_seconds(value: Any) -> Any:
    """A duration string (``"30d"``) becomes seconds; anything else is left to the strict float check."""
    return parse_duration(value) if isinstance(value, str) else value


#: ``older_than`` in the OpenAPI document: a number of seconds or a duration string.
_DURATION_SCHEMA: dict[str, Any] = {
    "description": f"how long ago the run ended: {DURATION_FORMS}",
    "oneOf": [
        {"type": "number", "minimum": 0},
        {"type": "string", "pattern": DURATION_PATTERN, "examples": ["30d", "12h", "90m", "1.5h"]},
    ],
}


class PurgeRequest(BaseModel):
    """Body of ``POST /purge``: delete finished runs that ended more than ``older_than`` ago.

    ``older_than`` takes the forms the command line's ``--older-than`` does
    (:mod:`durably_web.durations`): a number of seconds, or a string such as ``"30d"``.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    older_than: Annotated[float, BeforeValidator(_duration_seconds), WithJsonSchema(_DURATION_SCHEMA)] = (
        Field(ge=0, allow_inf_nan=False)
    )
    limit: int | None = Field(None, ge=0, description="delete at most this many runs (oldest first)")


class SignalRequest(BaseModel):
    """Body of ``POST /runs/{run_id}/signals/{name}``; an empty body is a signal with a ``null`` payload."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    payload: Any = Field(
        None, description="any JSON; validated by the signal's type where this server knows it"
    )
    signal_id: str | None = Field(
        None,
        min_length=1,
        description="the sender's id for this signal: sending it again to the run changes nothing "
        "(disposition duplicate)",
    )


class ForkRequest(BaseModel):
    """Body of ``POST /runs/{run_id}/fork``: the recorded step the new run executes again from."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    from_step: str = Field(
        min_length=1,
        description="a recorded step of the run: the steps before it are copied, it and the rest run again",
    )


class _EmptyBody(BaseModel):
    """Body of the action routes (cancel, retrigger, resume): nothing, or ``{}``."""

    model_config = ConfigDict(extra="forbid", strict=True)


@dataclass(frozen=True)
class RunsFilter:
    """Which runs a listing or the run-list stream covers; ``scope_runs`` may narrow it.

    ``job`` and ``labels`` apply to the list and to ``GET /events``; ``status``,
    ``limit`` and ``offset`` only to the list (a live stream follows runs through
    every status). To restrict a tenant, add a label:
    ``dataclasses.replace(f, labels={**f.labels, "tenant": ctx.tenant})``.
    """

    job: tuple[str, ...] | None = None
    status: tuple[str, ...] | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    limit: int = 100
    offset: int = 0
    #: Only the children of this run (``GET /runs?parent_run_id=``); the list only.
    parent_run_id: str | None = None
    #: ``version`` (repeated or comma-separated): the job version(s) that started the runs.
    version: tuple[str, ...] | None = None

    def matches(self, job_name: str | None, labels: Mapping[str, str]) -> bool:
        """Whether a run with this job name and these labels is inside the filter (status aside)."""
        if self.job is not None and job_name not in self.job:
            return False
        return all(labels.get(key) == value for key, value in self.labels.items())


class ScheduleRequest(BaseModel):
    """Body of ``POST /schedules``: create or replace the schedule ``name`` (default: the
    job's name). Strict, like every body."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    job: str = Field(min_length=1, max_length=128, description="name of a registered job")
    cron: str = Field(min_length=1, max_length=200, description="a cron expression, e.g. '*/15 * * * *'")
    input: Any = Field(None, description="each tick's run input; validated by the job's input model")
    name: str | None = Field(None, min_length=1, max_length=128, description="default: the job's name")
    timezone: str = Field("UTC", min_length=1, max_length=64, description="an IANA zone, e.g. 'Europe/Oslo'")
    catch_up: Literal["latest", "all"] = Field(
        "latest",
        description="ticks missed while no worker ran: one run ('latest') or one each ('all', at most 100)",
    )
