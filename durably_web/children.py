"""Child runs: ``step.start_child`` and ``step.wait_for_child``.

A child is an ordinary run with ``parent_run_id`` set. Two checkpoints of the parent
connect them:

* ``start_child`` (step kind ``"child"``) creates the child and records the handle in one
  transaction (``Store.start_child``): a replay returns the recorded handle and never
  starts a second child; a kill leaves either both or neither.
* ``wait_for_child`` (step kind ``"child_wait"``) records the child's output once it
  completed. Until then the parent waits (reason ``"child"``, no lease, no worker slot);
  the store makes it due in the same transaction as the child's outcome, so there is no
  poll delay and no lost wake-up. A failed, cancelled or deleted child raises
  ``ChildRunFailedError`` (``ChildRunCancelledError``) in the parent, as a failed step
  would: not recorded as completed, so a resumed parent waits for the child again.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from . import ids
from .errors import ChildRunCancelledError, ChildRunFailedError, NotFoundError, StepError
from .job import JobDefinition
from .models import ChildRun, ErrorInfo
from .serialization import _NO_TYPE, decode
from .storage.base import NEVER_MS, NewRun, StepRecord

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .step import StepContext

#: How often a fork waiting for its source's child looks at it again (ms): the child's outcome
#: makes only its own parent due.
_FORK_RECHECK_MS = 5000


def _handle_json(handle: ChildRun) -> str:
    return json.dumps({"run_id": handle.run_id, "job_name": handle.job_name}, separators=(",", ":"))


def _child_job(ctx: StepContext, job: Any) -> JobDefinition[Any, Any]:
    if isinstance(job, JobDefinition):
        return job
    if isinstance(job, str):
        found = ctx._execution.find_job(job)
        if found is None:
            raise NotFoundError(f"start_child: unknown job {job!r} (register it, or pass its JobDefinition)")
        return found
    raise StepError(f"start_child: job must be a JobDefinition or a job name, not {type(job).__name__}")


async def start_child(
    ctx: StepContext,
    name: str,
    job: JobDefinition[Any, Any] | str,
    input: Any = None,
    *,
    labels: Mapping[str, str] | None = None,
    concurrency_key: str | None = None,
) -> ChildRun:
    ctx._claim_name(name)
    definition = _child_job(ctx, job)
    index = ctx._next_index
    ctx._next_index += 1
    recorded = ctx._recorded.get(index)
    if recorded is not None:
        if recorded.name != name or recorded.kind != "child":
            ctx._replay_mismatch(index, recorded, name, "child")
        data = json.loads(recorded.output_json or "{}")
        handle = ChildRun(run_id=data["run_id"], job_name=data["job_name"])
        ctx._child_jobs[handle.run_id] = definition
        return handle
    ctx._check_not_recorded_elsewhere(name, index)
    execution = ctx._execution
    # Validated before anything is written: a bad input raises ValidationError here.
    _, input_json = definition.validate_input(input)
    # The parent's labels first (a tenant's child stays the tenant's), then the given ones.
    clean_labels = {**execution.record.labels, **_validated_labels(labels)}
    if concurrency_key is not None and (not isinstance(concurrency_key, str) or not concurrency_key):
        raise StepError(f"start_child {name!r}: concurrency_key must be a non-empty string")
    execution.check_can_start_step(name)
    if ctx._holding_progress:
        ctx._end_replay()
    now = execution.now_ms()
    handle = ChildRun(run_id=ids.new_id(now), job_name=definition.name)
    child = NewRun(
        id=handle.run_id,
        job_name=definition.name,
        input_json=input_json,
        labels=clean_labels,
        idempotency_key=None,  # the start step is the idempotency: a replay starts nothing
        concurrency_key=concurrency_key,
        coalesce=False,
        created_at=now,
        parent_run_id=ctx.run_id,
    )
    step = StepRecord(
        run_id=ctx.run_id,
        index=index,
        name=name,
        status="completed",
        output_json=_handle_json(handle),
        error_json=None,
        started_at=now,
        completed_at=execution.now_ms(),
        kind="child",
    )
    await execution.start_child(child, step)
    ctx._child_jobs[handle.run_id] = definition
    return handle


def _validated_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    # The one label validator lives with the public API; imported here, at call time, because
    # the public API module imports the engine.
    from .durably import _validate_labels

    return _validate_labels(labels)


async def wait_for_child(ctx: StepContext, name: str, child: ChildRun | str, *, type: Any = _NO_TYPE) -> Any:
    ctx._claim_name(name)
    if isinstance(child, ChildRun):
        child_id = child.run_id
    elif isinstance(child, str) and child:
        child_id = child
    else:
        raise StepError(f"wait_for_child {name!r}: child must be a ChildRun or a run id, not {child!r}")
    execution = ctx._execution
    index = ctx._next_index
    ctx._next_index += 1
    recorded = ctx._recorded.get(index)
    if recorded is not None:
        if recorded.name != name or recorded.kind != "child_wait":
            ctx._replay_mismatch(index, recorded, name, "child_wait")
        outcome = json.loads(recorded.output_json or "{}")
        return decode(json.dumps(outcome.get("output")), _output_type(ctx, child, child_id, type))
    ctx._check_not_recorded_elsewhere(name, index)
    execution.check_can_start_step(name)
    if ctx._holding_progress:
        ctx._end_replay()
    started_at = execution.now_ms()
    record = await execution.get_run(child_id)
    # A fork (fork_run) that copied the start_child step shares its source's child.
    forked_from = execution.record.forked_from
    if record is not None and record.parent_run_id not in (ctx.run_id, forked_from or ctx.run_id):
        raise StepError(f"wait_for_child {name!r}: run {child_id} is not a child of run {ctx.run_id}")
    if record is None or record.status in ("failed", "cancelled"):
        exc = _child_error(ctx.run_id, child_id, None if record is None else record.status, record)
        execution.step_failed(
            StepRecord(
                run_id=ctx.run_id,
                index=index,
                name=name,
                status="failed",
                output_json=None,
                error_json=_error_json(exc),
                started_at=started_at,
                completed_at=execution.now_ms(),
                kind="child_wait",
            ),
            exc,
        )
        raise exc
    if record.status == "completed":
        output_json = record.output_json or "null"
        tp = _output_type(ctx, child, child_id, type, job_name=record.job_name)
        value = decode(output_json, tp)
        await execution.record_step(
            StepRecord(
                run_id=ctx.run_id,
                index=index,
                name=name,
                status="completed",
                output_json=f'{{"output":{output_json}}}',
                error_json=None,
                started_at=started_at,
                completed_at=execution.now_ms(),
                kind="child_wait",
            )
        )
        return value
    # Still running: wait without a slot until the child's outcome makes this run due. The
    # outcome wakes the child's parent only; a fork sharing its source's child looks again
    # every _FORK_RECHECK_MS instead.
    until = NEVER_MS if record.parent_run_id == ctx.run_id else execution.now_ms() + _FORK_RECHECK_MS
    await execution.wait_until(until, reason="child", step_name=name, child_run_id=child_id)


def _output_type(
    ctx: StepContext, child: ChildRun | str, child_id: str, tp: Any, *, job_name: str | None = None
) -> Any:
    """``type`` when given, else the child job's output type (known from ``start_child`` in
    this execution, or the registry); a child job unknown here gives plain JSON."""
    if tp is not _NO_TYPE:
        return tp
    definition = ctx._child_jobs.get(child_id)
    if definition is None:
        name = child.job_name if isinstance(child, ChildRun) else job_name
        definition = ctx._execution.find_job(name) if name is not None else None
    return _NO_TYPE if definition is None else definition.output_type


def _child_error(parent_id: str, child_id: str, status: str | None, record: Any) -> ChildRunFailedError:
    if status is None:
        return ChildRunFailedError(
            f"run {parent_id}: child run {child_id} was deleted before it ended",
            child_run_id=child_id,
            status="deleted",
        )
    error = None
    if record.error_json is not None:
        data = json.loads(record.error_json)
        error = ErrorInfo(data.get("type", "Error"), data.get("message", ""), data.get("traceback", ""))
    if status == "cancelled":
        return ChildRunCancelledError(
            f"run {parent_id}: child run {child_id} was cancelled", child_run_id=child_id, status=status
        )
    detail = f": {error}" if error is not None else ""
    return ChildRunFailedError(
        f"run {parent_id}: child run {child_id} failed{detail}",
        child_run_id=child_id,
        status=status,
        error=error,
    )


def _error_json(exc: BaseException) -> str:
    info = ErrorInfo.from_exception(exc)
    return json.dumps({"type": info.type, "message": info.message, "traceback": info.traceback})
