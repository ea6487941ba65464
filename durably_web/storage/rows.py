"""Rows as both SQL backends return them (a dict per row, columns named as in their
schemas, which match), turned into the records the ``Store`` interface exchanges."""

from __future__ import annotations

import json
from typing import Any

from ..errors import ValidationError
from .base import NewRun, RunRecord, ScheduleRecord, StepRecord

Row = dict[str, Any]


def run_from_row(row: Row) -> RunRecord:
    return RunRecord(
        id=row["id"],
        job_name=row["job_name"],
        status=row["status"],
        input_json=row["input"],
        output_json=row["output"],
        error_json=row["error"],
        labels=json.loads(row["labels"]),
        progress_current=row["progress_current"],
        progress_total=row["progress_total"],
        progress_message=row["progress_message"],
        attempt=row["attempt"],
        idempotency_key=row["idempotency_key"],
        concurrency_key=row["concurrency_key"],
        lease_owner=row["lease_owner"],
        lease_generation=row["lease_generation"],
        lease_expires_at=row["lease_expires_at"],
        available_at=row["available_at"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
        updated_at=row["updated_at"],
        wait_reason=row["wait_reason"],
        wait_step=row["wait_step"],
        forked_from=row["forked_from"],
        wait_deadline=row["wait_deadline"],
        priority=row["priority"],
        trace_parent=row["trace_parent"],
        parent_run_id=row["parent_run_id"],
        wait_child_id=row["wait_child_id"],
        deadline_at=row["deadline_at"],
        version=row["version"],
    )


def leased_run_record(new: NewRun, *, worker_id: str, lease_until: int) -> RunRecord:
    """The record of a run just inserted from ``new`` already leased (``create_leased_run``)."""
    return new_run_record(new, lease=(worker_id, lease_until))


def check_leased_insert(new: NewRun) -> None:
    """``create_leased_run`` takes runs with nothing for ``create_runs`` to resolve."""
    if new.idempotency_key is not None or new.concurrency_key is not None or new.debounce_ms:
        raise ValidationError(
            f"run {new.id}: a run created leased has no idempotency or concurrency key and no debounce"
        )


def new_run_record(
    new: NewRun, *, keys: bool = True, lease: tuple[str, int] | None = None
) -> RunRecord:
    """The record of a run just inserted from ``new`` (without its keys when ``keys`` is
    false; leased to ``lease``'s worker until its time, and started, when given)."""
    worker_id, lease_until = lease if lease is not None else (None, None)
    return RunRecord(
        id=new.id,
        job_name=new.job_name,
        status="pending" if lease is None else "leased",
        input_json=new.input_json,
        output_json=None,
        error_json=None,
        labels=dict(new.labels),
        progress_current=None,
        progress_total=None,
        progress_message=None,
        attempt=0 if lease is None else 1,
        idempotency_key=new.idempotency_key if keys else None,
        concurrency_key=new.concurrency_key if keys else None,
        lease_owner=worker_id,
        lease_generation=0 if lease is None else 1,
        lease_expires_at=lease_until,
        available_at=new.created_at + (new.debounce_ms or 0),
        created_at=new.created_at,
        started_at=None if lease is None else new.created_at,
        completed_at=None,
        updated_at=new.created_at,
        forked_from=new.forked_from,
        priority=new.priority,
        trace_parent=new.trace_parent,
        parent_run_id=new.parent_run_id,
        deadline_at=new.deadline_at,
        version=new.version,
    )


def step_from_row(row: Row) -> StepRecord:
    return StepRecord(
        run_id=row["run_id"],
        index=row["seq"],
        name=row["name"],
        status=row["status"],
        output_json=row["output"],
        error_json=row["error"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
        kind=row["kind"],
        attempt=row["attempt"],
        metadata_json=row["metadata"],
    )


def schedule_from_row(row: Row) -> ScheduleRecord:
    return ScheduleRecord(
        name=row["name"],
        job_name=row["job_name"],
        cron=row["cron"],
        timezone=row["timezone"],
        input_json=row["input"],
        catch_up=row["catch_up"],
        paused=bool(row["paused"]),
        next_tick_at=row["next_tick_at"],
        last_tick_at=row["last_tick_at"],
        last_run_id=row["last_run_id"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def schedule_params(schedule: ScheduleRecord) -> dict[str, Any]:
    """The parameters of ``upsert_schedule`` (both backends name them alike)."""
    return {
        "name": schedule.name,
        "job_name": schedule.job_name,
        "cron": schedule.cron,
        "timezone": schedule.timezone,
        "input": schedule.input_json,
        "catch_up": schedule.catch_up,
        "paused": schedule.paused,
        "next_tick_at": schedule.next_tick_at,
        "now": schedule.updated_at,
    }
