"""A JSON call interface over ``Durably`` for non-Python callers (the browser worker).

``await Dispatcher(durably).call("trigger", {...})`` takes and returns plain
JSON values, so the JS side needs no knowledge of Python objects. Method names
and option names are the JS API's (camelCase); data (runs, steps, events) keeps
the Python field names, the same shape the HTTP API returns. Errors come back
as ``{"name": "ValidationError", "message": ..., "details": [...]}``.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from .durably import Durably, TriggerItem
from .errors import DurablyError, ValidationError


def error_to_json(exc: BaseException) -> dict[str, Any]:
    details = exc.errors if isinstance(exc, ValidationError) else None
    name = type(exc).__name__ if isinstance(exc, DurablyError) else "DurablyError"
    message = str(exc) if isinstance(exc, DurablyError) else f"{type(exc).__name__}: {exc}"
    return {"name": name, "message": message, "details": details}


def _options(params: dict[str, Any], allowed: set[str]) -> dict[str, Any]:
    if not isinstance(params, dict):
        raise ValidationError("options must be an object")
    unknown = set(params) - allowed
    if unknown:
        raise ValidationError(f"unknown option(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    return params


def _positive_seconds(ms: Any, name: str) -> float | None:
    seconds = _seconds(ms, name)
    if seconds is not None and not seconds > 0:
        raise ValidationError(f"{name} must be a positive number of milliseconds")
    return seconds


def _seconds(ms: Any, name: str) -> float | None:
    if ms is None:
        return None
    if isinstance(ms, bool) or not isinstance(ms, int | float):
        raise ValidationError(f"{name} must be a number of milliseconds")
    return ms / 1000


#: ``timeout`` (ms): the run's deadline, ``trigger(timeout=)``; triggerAndWait calls it
#: ``runTimeout``, its ``timeout`` being how long the call waits (as in Python).
_TRIGGER_OPTIONS = {"idempotencyKey", "concurrencyKey", "coalesce", "labels", "priority", "timeout"}

#: The methods, by their JS names (static/durably.js lists them too; tests/test_rpc.py
#: checks that the lists agree and that static/durably.d.ts declares each one).
METHODS: tuple[str, ...] = (
    "trigger",
    "triggerAndWait",
    "batchTrigger",
    "waitForRun",
    "getRun",
    "getRuns",
    "getSteps",
    "getStepAttempts",
    "getLogs",
    "cancel",
    "sendSignal",
    "resumeRun",
    "forkRun",
    "retrigger",
    "deleteRun",
    "purgeRuns",
    "jobs",
    "schedule",
    "unschedule",
    "listSchedules",
    "pauseSchedule",
    "resumeSchedule",
)


class Dispatcher:
    def __init__(self, durably: Durably) -> None:
        self.durably = durably
        self._methods: dict[str, Callable[..., Awaitable[Any]]] = {
            name: getattr(self, f"_{name}") for name in METHODS
        }

    async def call(self, method: str, args: list[Any]) -> dict[str, Any]:
        """Returns ``{"ok": true, "value": ...}`` or ``{"ok": false, "error": {...}}``; never raises."""
        try:
            handler = self._methods.get(method)
            if handler is None:
                raise ValidationError(f"unknown method {method!r}")
            if not isinstance(args, list):
                raise ValidationError("args must be an array")
            signature = inspect.signature(handler)
            try:
                signature.bind(*args)
            except TypeError as exc:
                raise ValidationError(f"{method}: {exc}") from None
            return {"ok": True, "value": await handler(*args)}
        except Exception as exc:
            return {"ok": False, "error": error_to_json(exc)}

    # --- methods (JS names) --------------------------------------------------------
    def _trigger_kwargs(self, options: dict[str, Any] | None) -> dict[str, Any]:
        opts = _options(options or {}, _TRIGGER_OPTIONS)
        return {
            "idempotency_key": opts.get("idempotencyKey"),
            "concurrency_key": opts.get("concurrencyKey"),
            "coalesce": opts.get("coalesce"),
            "labels": opts.get("labels"),
            "priority": opts.get("priority", 0),
            "timeout": _positive_seconds(opts.get("timeout"), "timeout"),
        }

    async def _trigger(self, job: str, input: Any = None, options: dict[str, Any] | None = None) -> Any:
        return (await self.durably.trigger(job, input, **self._trigger_kwargs(options))).to_dict()

    async def _triggerAndWait(
        self, job: str, input: Any = None, options: dict[str, Any] | None = None
    ) -> Any:
        opts = dict(options or {})
        timeout = _seconds(opts.pop("timeout", None), "timeout")
        if "runTimeout" in opts:
            opts["timeout"] = opts.pop("runTimeout")
        kwargs = self._trigger_kwargs(opts)
        run_timeout = kwargs.pop("timeout")
        run = await self.durably.trigger_and_wait(
            job, input, timeout=timeout, run_timeout=run_timeout, **kwargs
        )
        return run.to_dict()

    async def _batchTrigger(self, job: str, items: list[Any]) -> Any:
        if not isinstance(items, list):
            raise ValidationError("items must be an array")
        prepared = []
        for item in items:
            if isinstance(item, dict) and "input" in item and set(item) <= {"input", "options"}:
                kwargs = self._trigger_kwargs(item.get("options"))
                prepared.append(TriggerItem(item["input"], **kwargs))
            else:
                prepared.append(item)
        return [run.to_dict() for run in await self.durably.batch_trigger(job, prepared)]

    async def _waitForRun(self, run_id: str, options: dict[str, Any] | None = None) -> Any:
        opts = _options(options or {}, {"timeout"})
        timeout = _seconds(opts.get("timeout"), "timeout")
        return (await self.durably.wait_for_run(run_id, timeout=timeout)).to_dict()

    async def _getRun(self, run_id: str) -> Any:
        return (await self.durably.get_run(run_id)).to_dict()

    async def _getRuns(self, query: dict[str, Any] | None = None) -> Any:
        opts = _options(
            query or {}, {"status", "jobName", "labels", "limit", "offset", "parentRunId", "version"}
        )
        runs = await self.durably.get_runs(
            status=opts.get("status"),
            job_name=opts.get("jobName"),
            labels=opts.get("labels"),
            limit=opts.get("limit", 100),
            offset=opts.get("offset", 0),
            parent_run_id=opts.get("parentRunId"),
            version=opts.get("version"),
        )
        return [run.to_dict() for run in runs]

    async def _getSteps(self, run_id: str) -> Any:
        return [step.to_dict() for step in await self.durably.get_steps(run_id)]

    async def _getStepAttempts(self, run_id: str) -> Any:
        return [attempt.to_dict() for attempt in await self.durably.get_step_attempts(run_id)]

    async def _getLogs(self, run_id: str) -> Any:
        return [log.to_dict() for log in await self.durably.get_logs(run_id)]

    async def _cancel(self, run_id: str) -> Any:
        return (await self.durably.cancel(run_id)).to_dict()

    async def _sendSignal(
        self, run_id: str, name: str, payload: Any = None, options: dict[str, Any] | None = None
    ) -> Any:
        opts = _options(options or {}, {"signalId"})
        return await self.durably.send_signal(run_id, name, payload, signal_id=opts.get("signalId"))

    async def _resumeRun(self, run_id: str) -> Any:
        return (await self.durably.resume_run(run_id)).to_dict()

    async def _forkRun(self, run_id: str, options: dict[str, Any]) -> Any:
        opts = _options(options, {"fromStep"})
        if "fromStep" not in opts:
            raise ValidationError("forkRun needs fromStep (the name of a recorded step)")
        return (await self.durably.fork_run(run_id, from_step=opts["fromStep"])).to_dict()

    async def _retrigger(self, run_id: str) -> Any:
        return (await self.durably.retrigger(run_id)).to_dict()

    async def _deleteRun(self, run_id: str) -> Any:
        await self.durably.delete_run(run_id)
        return None

    async def _purgeRuns(self, options: dict[str, Any]) -> Any:
        opts = _options(options or {}, {"olderThan", "limit"})
        older_than = _seconds(opts.get("olderThan"), "olderThan")
        if older_than is None:
            raise ValidationError("purgeRuns needs olderThan (milliseconds)")
        return await self.durably.purge_runs(older_than=older_than, limit=opts.get("limit"))

    async def _jobs(self) -> Any:
        return sorted(self.durably.jobs)

    async def _schedule(self, job: str, cron: str, options: dict[str, Any] | None = None) -> Any:
        opts = _options(options or {}, {"input", "name", "timezone", "catchUp"})
        schedule = await self.durably.schedule(
            job,
            cron,
            input=opts.get("input"),
            name=opts.get("name"),
            timezone=opts.get("timezone", "UTC"),
            catch_up=opts.get("catchUp", "latest"),
        )
        return schedule.to_dict()

    async def _unschedule(self, name: str) -> Any:
        await self.durably.unschedule(name)
        return None

    async def _listSchedules(self) -> Any:
        return [schedule.to_dict() for schedule in await self.durably.list_schedules()]

    async def _pauseSchedule(self, name: str) -> Any:
        return (await self.durably.pause_schedule(name)).to_dict()

    async def _resumeSchedule(self, name: str) -> Any:
        return (await self.durably.resume_schedule(name)).to_dict()
