"""The routes, event streams, auth hooks and ``create_app`` of the HTTP API.

Design notes:

* Every request body is parsed strictly (no NaN, no lone surrogates, no unknown
  fields, no type coercion) so bad input is always a 400 and never reaches the
  engine in a shape it was not written for.
* Authorization is a set of optional hooks on one object (see ``DurablyAuth``)
  applied to *every* route that exposes run data, the SSE streams included:
  a multi-tenant app implements ``authenticate`` + ``on_run_access`` +
  ``scope_runs`` and no route leaks another tenant's runs.
* Streams never miss events: the event listener is registered before the
  current state is read, so an event that happens in between is delivered
  (step events already covered by the replay are dropped by index).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
import math
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

import anyio
import pydantic_core
from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from .. import __version__
from ..durably import Durably, TriggerItem, _validate_labels
from ..errors import (
    ConflictError,
    DurablyError,
    ExistingRunRefusedError,
    NotFoundError,
    SchemaVersionError,
    StorageError,
    SubscriptionOverflowError,
    ValidationError,
)
from ..events import TERMINAL_EVENT_TYPES, EventBuffer
from ..models import RUN_STATUSES, ErrorInfo, Event, Run, from_ms, iso, to_jsonable
from ..storage import RunFilter, RunRecord
from ..traceparent import REQUEST_TRACE_PARENT, parse_traceparent
from .openapi import openapi_document
from .requests import (
    MAX_BATCH_ITEMS,
    MAX_LIMIT,
    MAX_OFFSET,
    RUN_LEVEL_EVENT_TYPES,
    ForkRequest,
    PurgeRequest,
    RunsFilter,
    SignalRequest,
    TriggerBatchRequest,
    TriggerRequest,
    _EmptyBody,
)
from .schedules import schedule_routes
from .security import SecurityMiddleware, parse_allowed_hosts, parse_allowed_origins

RunOperation = Literal[
    "read", "subscribe", "steps", "cancel", "retrigger", "delete", "signal", "resume", "fork"
]

#: A comment line this often keeps proxies from closing an idle stream.
KEEPALIVE_SECONDS = 15.0
_META_CACHE_SIZE = 10_000
#: Most events one stream holds for a client that does not keep up. Beyond it (progress
#: aside, which coalesces to the latest) the stream sends ``stream:reset`` and ends, and
#: the client reconnects to the current state: a slow client costs bounded memory. Twice
#: the largest batch, so that one batch (its events come all at once) never resets a stream.
STREAM_BACKLOG = 2 * MAX_BATCH_ITEMS
#: Most bytes (as JSON) one stream holds for a client that does not keep up: events can be
#: large (log data, step outputs). A single event larger than this still goes through.
STREAM_BACKLOG_BYTES = 16 * 1024 * 1024
#: Most run ids a run-list stream remembers as inside or outside its filter (oldest forgotten
#: first; a forgotten run is looked up again if it has another event).
_VISIBLE_CACHE_SIZE = 10_000
#: How often a trigger is tried again after ``on_run_access`` allowed the existing runs its
#: keys resolved to (each try may meet runs created meanwhile); then it answers 409.
_TRIGGER_ATTEMPTS = 3
_LABEL_PARAM = re.compile(r"^label\.(.+)$")


# --- auth hooks ----------------------------------------------------------------------------------


class DurablyAuth(Protocol):
    """The auth hooks ``create_app(auth=...)`` accepts. Every method is optional, sync or async.

    * ``authenticate(request) -> ctx`` runs first on every API route (not on
      ``/health``, ``/openapi.json`` or the static files). Raise
      ``HTTPException(401)`` (or 403) to reject; the return value is the ``ctx``
      handed to the other hooks. EventSource cannot send headers, so for the SSE
      routes read a cookie or a query parameter (unknown query parameters are
      ignored by the routes and left to this hook).
    * ``on_trigger(ctx, trigger)`` may reject a trigger (raise) or return a
      replacement ``TriggerRequest`` (e.g. with a tenant label stamped on).
      ``POST /trigger/batch`` calls it once per item (with a ``TriggerRequest``
      built from the batch's job and the item): one rejection rejects the whole
      batch; replacements are honoured, but every item must keep one job.
      ``POST /runs/{id}/retrigger`` calls it too (after ``on_run_access`` allowed
      ``retrigger``), with a ``TriggerRequest`` built from the run: its job, input,
      labels and concurrency key as stored, no idempotency key; a replacement is
      honoured in full, as for ``/trigger``. Idempotency and concurrency keys are
      global to the database: a multi-tenant policy returns
      ``trigger.namespaced(tenant)`` so tenants never meet each other's keys
      (the stored keys a retrigger carries are already namespaced and stay so).
      ``POST /runs/{id}/fork`` calls it too (after ``on_run_access`` allowed ``fork``
      on the source run), with a ``TriggerRequest`` of the source's job, input and
      labels and no keys; the fork gets the labels the hook admits. A fork keeps
      the source's job and input and has no keys, so a replacement that changes the
      job or the input, or sets a key or ``coalesce``, is a bug of the hook
      (``TypeError``, answered 500): a hook that stamps a key on every trigger must
      leave the keys of a fork's trigger ``None``.
    * ``on_run_access(ctx, run, operation)`` guards one run: ``read`` (the run
      and its logs), ``steps`` (its steps and their attempts), ``subscribe``,
      ``cancel``, ``retrigger``, ``delete``, ``signal`` (send it a signal),
      ``resume`` (continue a failed or cancelled run) and ``fork`` (a new run
      from its steps; the new run also passes ``on_trigger``).
      A refusal (``PermissionError`` or ``HTTPException(403)``) of a run the caller
      may not even ``read`` is answered 404, exactly as for a missing run, so ids
      cannot be probed; ``read`` is asked for that after another operation is
      refused. It also decides which existing runs an idempotency or concurrency
      key may resolve to (see ``ExistingRunRefusedError``): one it refuses makes
      the trigger or batch a 409 that writes nothing.
    * ``scope_runs(ctx, filter) -> filter`` narrows ``GET /runs`` and ``GET /events``.
    * ``can_purge(ctx) -> bool`` allows ``POST /purge``. Purging is not scoped: it
      deletes the finished runs of *every* tenant. So once an ``auth`` object is
      given, ``POST /purge`` answers 403 unless it has this hook and the hook
      returns ``True`` (anything else, ``None`` included, is a refusal). Without
      ``auth`` the route is open, like every other route.
    * ``can_manage_schedules(ctx, operation) -> bool`` allows the schedule routes
      (``operation``: "list", "schedule", "unschedule", "pause", "resume"). Schedules
      are not scoped either (a tick's run passes no ``on_trigger``), so with ``auth``
      they answer 403 unless this hook returns ``True``, as for ``can_purge``.

    ``PermissionError`` raised by a hook is answered with 403.
    """

    def authenticate(self, request: Request) -> Any: ...

    def on_trigger(self, ctx: Any, trigger: TriggerRequest) -> TriggerRequest | None: ...

    def on_run_access(self, ctx: Any, run: Run, operation: RunOperation) -> None: ...

    def scope_runs(self, ctx: Any, runs_filter: RunsFilter) -> RunsFilter: ...

    def can_purge(self, ctx: Any) -> bool: ...

    def can_manage_schedules(self, ctx: Any, operation: str) -> bool: ...


def _is_refusal(exc: Exception) -> bool:
    """A hook's "no": ``PermissionError`` or ``HTTPException(403)``."""
    return isinstance(exc, PermissionError) or (isinstance(exc, HTTPException) and exc.status_code == 403)


async def _call_hook(hook: Callable[..., Any], *args: Any) -> Any:
    result = hook(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


# --- progress throttling ---------------------------------------------------------------------------


class ProgressThrottle:
    """Per-run rate limit for ``run:progress`` events on one stream.

    A progress event is sent at once if the run's previous one went out at least
    ``interval`` seconds ago; otherwise it is held (replacing an older held one)
    until its slot comes, so the *latest* progress is always delivered. Any other
    event of the run first releases the held progress, which keeps the order of
    a run's events intact and guarantees the last progress precedes the
    terminal event.
    """

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = max(0.0, float(interval))
        self._clock = clock
        self._last_sent: dict[str | None, float] = {}
        self._held: dict[str | None, Event] = {}

    def offer(self, event: Event) -> list[Event]:
        """The events to send now (in order) because ``event`` arrived."""
        run_id = event.run_id
        if event.type != "run:progress":
            held = self._held.pop(run_id, None)
            if event.type in TERMINAL_EVENT_TYPES:
                self._last_sent.pop(run_id, None)
            return [held, event] if held is not None else [event]
        now = self._clock()
        last = self._last_sent.get(run_id)
        if last is None or now - last >= self.interval:
            self._held.pop(run_id, None)
            self._last_sent[run_id] = now
            return [event]
        self._held[run_id] = event
        return []

    def due(self) -> list[Event]:
        """Held progress events whose slot has come."""
        now = self._clock()
        ready = [run_id for run_id in self._held if now - self._last_sent[run_id] >= self.interval]
        for run_id in ready:
            self._last_sent[run_id] = now
        return [self._held.pop(run_id) for run_id in ready]

    def seconds_until_due(self) -> float | None:
        if not self._held:
            return None
        now = self._clock()
        return max(0.0, min(self._last_sent[r] + self.interval - now for r in self._held))


# --- responses --------------------------------------------------------------------------------------


def _json_bytes(content: Any) -> bytes:
    # pydantic_core dumps dataclasses, models and datetimes, and writes NaN/inf as
    # null: stored data (log payloads) may hold them and must not turn into a 500.
    return pydantic_core.to_json(content, inf_nan_mode="null", serialize_unknown=True)


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _json_bytes(content)


def _error(status: int, kind: str, message: str, details: Any = None) -> JSONResponse:
    body: dict[str, Any] = {"error": kind, "message": message}
    if details is not None:
        body["details"] = details
    return JSONResponse(body, status_code=status)


def _light(data: dict[str, Any]) -> dict[str, Any]:
    """Stream data without a run's input (``run:trigger``): it may be megabytes, per client."""
    if data.get("type") == "run:trigger":
        data.pop("input", None)
    return data


def _sse(event_type: str, data: Mapping[str, Any]) -> bytes:
    return b"event: " + event_type.encode() + b"\ndata: " + _json_bytes(data) + b"\n\n"


def _reset_event(run_id: str | None) -> Event:
    """The last event of a stream whose client fell more than ``STREAM_BACKLOG`` events behind."""
    return Event("stream:reset", run_id, None, datetime.now(UTC), {"reason": "the client fell behind"})


def _reset_sse(event: Event) -> bytes:
    # retry: reconnect soon; the new stream starts from the current state.
    return b"retry: 500\n" + _sse("stream:reset", {**event.to_dict(), "reconnect": True})


class _EventStream(StreamingResponse):
    """A ``text/event-stream`` response that stops as soon as the client goes away.

    Starlette only watches for the disconnect on ASGI servers older than spec
    2.4; racing it here on every server frees the event listeners of a closed
    stream at once instead of at the next keep-alive write.
    """

    def __init__(self, content: AsyncIterator[bytes]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:

            async def stream() -> None:
                try:
                    await self.stream_response(send)
                except OSError:
                    pass  # the client is gone
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()


def _text_bytes(text: str | None) -> int | None:
    if text is None:
        return None
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def run_summary(record: RunRecord) -> dict[str, Any]:
    """What lists show of a run (``GET /runs``, ``run`` in ``GET /events``): no input, output or traceback.

    A run's input and output may be megabytes; a list of a hundred of them must not be.
    ``input_bytes`` / ``output_bytes`` are the sizes of the stored JSON (UTF-8);
    ``GET /runs/{id}`` returns the whole run.
    """
    error = None
    if record.error_json is not None:
        stored = json.loads(record.error_json)
        error = {"type": stored.get("type", "Error"), "message": stored.get("message", "")}
    progress = None
    if record.progress_current is not None:
        progress = {
            "current": record.progress_current,
            "total": record.progress_total,
            "message": record.progress_message,
        }
    return {
        "id": record.id,
        "job_name": record.job_name,
        "status": record.status,
        "error": error,
        "labels": dict(record.labels),
        "progress": progress,
        "attempt": record.attempt,
        "idempotency_key": record.idempotency_key,
        "concurrency_key": record.concurrency_key,
        "created_at": iso(from_ms(record.created_at)),
        "started_at": iso(from_ms(record.started_at)),
        "completed_at": iso(from_ms(record.completed_at)),
        "updated_at": iso(from_ms(record.updated_at)),
        "input_bytes": _text_bytes(record.input_json),
        "output_bytes": _text_bytes(record.output_json),
        # A waiting run's list row says why and until when (the dashboard shows it).
        "wake_at": iso(from_ms(record.wake_at)),
        "wait_reason": record.wait_reason if record.status == "waiting" else None,
        "wait_step": record.wait_step if record.status == "waiting" else None,
        "forked_from": record.forked_from,
        "priority": record.priority,
        "not_before": iso(from_ms(record.available_at))
        if record.status == "pending" and record.available_at > record.created_at
        else None,
        "parent_run_id": record.parent_run_id,
        "wait_child_id": record.wait_child_id if record.status == "waiting" else None,
        "deadline_at": iso(from_ms(record.deadline_at)),
        "version": record.version,
    }


# --- request parsing ------------------------------------------------------------------------------


class _BadRequest(Exception):
    def __init__(self, message: str, details: Any = None, status: int = 400) -> None:
        super().__init__(message)
        self.details = details
        self.status = status


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    # json.loads turns 1e400 into inf, which would be stored as null: refuse it instead.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range for a 64-bit float")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A repeated key is ambiguous (the last wins here, the first in some proxies and
    # filters in front of us): refuse it rather than guess which one was meant.
    value: dict[str, Any] = {}
    for key, item in pairs:
        if key in value:
            raise ValueError(f"the key {key[:60]!r} appears more than once in one object")
        value[key] = item
    return value


def _pydantic_details(exc: PydanticValidationError) -> list[dict[str, Any]]:
    return exc.errors(include_url=False, include_context=False, include_input=False)  # type: ignore[return-value]


_NO_BODY: Any = object()


async def _read_json(request: Request, limit: int) -> Any:
    """The request body as strict JSON (``_NO_BODY`` when empty); ``_BadRequest`` otherwise."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _BadRequest(f"request body is larger than {limit} bytes", status=413)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        return _NO_BODY
    try:
        value = json.loads(
            raw.decode("utf-8"),
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            object_pairs_hook=_unique_keys,
        )
        # A lone surrogate (from "\ud800") cannot be stored as UTF-8 text.
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (UnicodeError, ValueError, RecursionError) as exc:
        raise _BadRequest(f"malformed JSON body: {exc}") from None
    return value


@contextlib.contextmanager
def _request_trace_parent(request: Request) -> Iterator[None]:
    """While a trigger route creates runs: the request's W3C ``traceparent`` header, for a
    Durably with tracing on to store as the runs' trace parent when no span is current
    (a server without OpenTelemetry's ASGI instrumentation). A malformed header, or more
    than one, counts as none: it is the caller's tracing, not part of the request."""
    headers = request.headers.getlist("traceparent")
    token = REQUEST_TRACE_PARENT.set(parse_traceparent(headers[0]) if len(headers) == 1 else None)
    try:
        yield
    finally:
        REQUEST_TRACE_PARENT.reset(token)


def _parse_model(model: type[BaseModel], value: Any) -> Any:
    try:
        return model.model_validate({} if value is _NO_BODY else value)
    except PydanticValidationError as exc:
        message = f"invalid request body: {exc.error_count()} error(s)"
        raise _BadRequest(message, _pydantic_details(exc)) from None


def _split_values(values: Sequence[str]) -> tuple[str, ...] | None:
    items = tuple(part.strip() for value in values for part in value.split(",") if part.strip())
    return items or None


def _int_param(request: Request, name: str, default: int, maximum: int) -> int:
    values = request.query_params.getlist(name)
    if not values:
        return default
    if len(values) > 1:
        raise _BadRequest(f"query parameter {name!r} is given more than once")
    text = values[0].strip()
    if not re.fullmatch(r"\d{1,12}", text):
        raise _BadRequest(f"query parameter {name!r} must be a non-negative integer, not {values[0]!r}")
    number = int(text)
    if number > maximum:
        raise _BadRequest(f"query parameter {name!r} must be at most {maximum}")
    return number


def _filter_from_query(request: Request) -> RunsFilter:
    """``job`` and ``status`` (repeated or comma-separated), ``label.<key>=value``, ``limit``, ``offset``.

    Unknown parameters are ignored: they may belong to the auth hook (an access
    token for EventSource, which cannot send headers).
    """
    params = request.query_params
    statuses = _split_values(params.getlist("status"))
    if statuses is not None:
        unknown = sorted(set(statuses) - RUN_STATUSES)
        if unknown:
            raise _BadRequest(f"unknown status(es) {unknown}; expected some of {sorted(RUN_STATUSES)}")
    labels: dict[str, str] = {}
    for key, value in params.multi_items():
        match = _LABEL_PARAM.match(key)
        if match is None:
            continue
        if match.group(1) in labels:
            raise _BadRequest(f"label {match.group(1)!r} is given more than once")
        labels[match.group(1)] = value
    return RunsFilter(
        job=_split_values(params.getlist("job")),
        status=statuses,
        labels=labels,
        limit=_int_param(request, "limit", 100, MAX_LIMIT),
        offset=_int_param(request, "offset", 0, MAX_OFFSET),
        parent_run_id=params.get("parent_run_id") or None,
        version=_split_values(params.getlist("version")),
    )


# --- the application ----------------------------------------------------------------------------


def _default_static_dir() -> Path | None:
    """``durably_web/static`` when packaged inside the wheel, else the checkout's ``static/``."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "static", package.parent / "static"):
        if candidate.is_dir():
            return candidate
    return None


class _Api:
    """The route handlers, sharing the ``Durably`` instance, the auth hooks and a run cache."""

    def __init__(
        self, durably: Durably, auth: Any, sse_throttle: float, expose_tracebacks: bool | None = None
    ) -> None:
        self.durably = durably
        self.auth = auth
        self.sse_throttle = sse_throttle
        self.expose_tracebacks = auth is None if expose_tracebacks is None else bool(expose_tracebacks)
        # job name and labels of runs seen lately: a run-list stream needs them to
        # decide who may see a run's deletion, when the row itself is already gone.
        self._meta: OrderedDict[str, tuple[str, dict[str, str]]] = OrderedDict()
        durably.on("run:trigger", self._remember_triggered)

    # -- helpers ---------------------------------------------------------------------------------
    def _hook(self, name: str) -> Callable[..., Any] | None:
        return getattr(self.auth, name, None) if self.auth is not None else None

    def _remember(self, run_id: str, job_name: str, labels: Mapping[str, str]) -> None:
        self._meta[run_id] = (job_name, dict(labels))
        self._meta.move_to_end(run_id)
        while len(self._meta) > _META_CACHE_SIZE:
            self._meta.popitem(last=False)

    def _remember_triggered(self, event: Event) -> None:
        if event.run_id is not None and event.job_name is not None:
            self._remember(event.run_id, event.job_name, event.data.get("labels") or {})

    async def _authenticate(self, request: Request) -> Any:
        hook = self._hook("authenticate")
        return None if hook is None else await _call_hook(hook, request)

    async def _scope(self, ctx: Any, runs_filter: RunsFilter) -> RunsFilter:
        hook = self._hook("scope_runs")
        if hook is None:
            return runs_filter
        scoped = await _call_hook(hook, ctx, runs_filter)
        if not isinstance(scoped, RunsFilter):
            raise TypeError(f"scope_runs must return a RunsFilter, not {type(scoped).__name__}")
        return scoped

    async def _check_access(self, ctx: Any, run: Run, operation: RunOperation) -> None:
        hook = self._hook("on_run_access")
        if hook is not None:
            await _call_hook(hook, ctx, run, operation)

    async def _run_for(self, request: Request, operation: RunOperation) -> tuple[Any, Run]:
        """Authenticate, load the path's run and check the operation on it (401/403/404 otherwise).

        A run the caller may not even ``read`` answers exactly like a missing one (404), so
        ids cannot be probed for other tenants' runs; a run it may read but not, say,
        cancel answers 403.
        """
        ctx = await self._authenticate(request)
        run_id = request.path_params["run_id"]
        run = await self.durably.get_run(run_id)
        self._remember(run.id, run.job_name, run.labels)
        try:
            await self._check_access(ctx, run, operation)
        except (HTTPException, PermissionError) as exc:
            if _is_refusal(exc) and (operation == "read" or not await self._readable(ctx, run)):
                raise NotFoundError(f"run {run_id!r} not found") from None
            raise
        return ctx, run

    async def _empty_body(self, request: Request) -> None:
        _parse_model(_EmptyBody, await _read_json(request, 64 * 1024))

    def _scrub_error(self, error: Any) -> Any:
        """``error`` (an ``ErrorInfo`` or its dict) without its traceback unless tracebacks are exposed."""
        if self.expose_tracebacks or error is None:
            return error
        if isinstance(error, ErrorInfo):
            return {"type": error.type, "message": error.message, "traceback": ""}
        if isinstance(error, dict) and error.get("traceback"):
            return {**error, "traceback": ""}
        return error

    def _scrub(self, data: dict[str, Any]) -> dict[str, Any]:
        """A run, step or event dict with its ``error`` scrubbed (see ``expose_tracebacks``)."""
        if not self.expose_tracebacks and data.get("error") is not None:
            data["error"] = self._scrub_error(data["error"])
        return data

    def _run_dict(self, run: Run) -> dict[str, Any]:
        return self._scrub(run.to_dict())

    def _run_response(self, run: Run, status_code: int = 200) -> JSONResponse:
        return JSONResponse(self._run_dict(run), status_code=status_code)

    def _created_response(self, run: Run) -> JSONResponse:
        """Answer a trigger/retrigger (201 for a new run, 200 for an idempotent or coalesced one)."""
        self._remember(run.id, run.job_name, run.labels)
        status_code = 201 if run.disposition == "created" else 200
        body = {"id": run.id, "disposition": run.disposition, "run": self._run_dict(run)}
        return JSONResponse(body, status_code=status_code)

    # -- JSON routes -------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        try:
            await self.durably.get_runs(limit=1)
        except DurablyError as exc:
            return JSONResponse({"status": "unavailable", "message": str(exc)}, status_code=503)
        return JSONResponse({"status": "ok", "version": __version__, "jobs": sorted(self.durably.jobs)})

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document(request.scope.get("root_path", "")))

    async def jobs(self, request: Request) -> Response:
        await self._authenticate(request)
        jobs = []
        for name, job in sorted(self.durably.jobs.items()):
            try:
                schema = job.input_adapter.json_schema()
            except Exception:  # a type pydantic cannot describe; the job still works
                schema = None
            jobs.append({"name": name, "input_schema": schema})
        return JSONResponse({"jobs": jobs})

    async def _on_trigger(self, ctx: Any, trigger: TriggerRequest) -> TriggerRequest:
        """The trigger as the ``on_trigger`` hook lets it through (it raises to reject)."""
        hook = self._hook("on_trigger")
        if hook is None:
            return trigger
        replacement = await _call_hook(hook, ctx, trigger)
        if replacement is None:
            return trigger
        if not isinstance(replacement, TriggerRequest):
            raise TypeError("on_trigger must return None or a TriggerRequest")
        return replacement

    def _hide_conflict(self, exc: ConflictError) -> ConflictError:
        # The engine's message names the pending run, which may be another tenant's.
        if self.auth is None:
            return exc
        return ConflictError("a run is already pending for this concurrency key")

    async def _readable(self, ctx: Any, run: Run) -> bool:
        """Whether the caller may read ``run`` (which an idempotency or concurrency key resolved to)."""
        try:
            await self._check_access(ctx, run, "read")
        except (HTTPException, PermissionError):
            return False
        return True

    async def _create_runs(self, ctx: Any, triggers: Sequence[TriggerRequest], *, batch: bool) -> list[Run]:
        """Create the runs of ``triggers`` (already through ``on_trigger``) in one transaction.

        An idempotency or concurrency key may resolve to an existing run. Whether the
        caller may have it is decided *inside* the transaction (``accept_existing``:
        "is it in the approved set?"); a run not yet approved rolls everything back
        and is put to ``on_run_access`` (which may be async, so it cannot run in the
        transaction). All readable: approve them and try again. Any not: 409 with
        nothing written (and nothing said about the run). So a refused trigger or
        batch writes, emits and executes nothing.
        """
        jobs = {trigger.job for trigger in triggers}
        if len(jobs) > 1:
            raise TypeError("on_trigger must not give the items of one batch different jobs")
        job = jobs.pop()
        approved: set[str] = set()
        accept = None if self._hook("on_run_access") is None else (lambda run: run.id in approved)
        for _ in range(_TRIGGER_ATTEMPTS):
            try:
                if batch:
                    items = [
                        TriggerItem(
                            trigger.input,
                            idempotency_key=trigger.idempotency_key,
                            concurrency_key=trigger.concurrency_key,
                            coalesce=trigger.coalesce,
                            labels=trigger.labels,
                            priority=trigger.priority,
                            timeout=trigger.timeout,
                        )
                        for trigger in triggers
                    ]
                    runs = await self.durably.batch_trigger(job, items, accept_existing=accept)
                else:
                    (one,) = triggers
                    runs = [
                        await self.durably.trigger(
                            one.job,
                            one.input,
                            idempotency_key=one.idempotency_key,
                            concurrency_key=one.concurrency_key,
                            coalesce=one.coalesce,
                            labels=one.labels,
                            accept_existing=accept,
                            priority=one.priority,
                            timeout=one.timeout,
                        )
                    ]
            except ExistingRunRefusedError as refused:
                for run in refused.runs:
                    self._remember(run.id, run.job_name, run.labels)
                    if not await self._readable(ctx, run):
                        raise ConflictError("a key is in use by a run you cannot access") from None
                    approved.add(run.id)
                continue
            except ConflictError as exc:
                hidden = self._hide_conflict(exc)
                if hidden is exc:
                    raise
                raise hidden from exc
            for run in runs:
                self._remember(run.id, run.job_name, run.labels)
            return runs
        raise ConflictError("the trigger's keys kept resolving to new runs; try again")

    async def _trigger_one(self, ctx: Any, trigger: TriggerRequest) -> Response:
        """One trigger through the whole path: ``on_trigger``, the keys' runs checked, the answer.

        ``/trigger`` and ``/runs/{id}/retrigger`` use it; so will any route that starts a
        run on a caller's behalf, so that none of them bypasses the hooks.
        """
        admitted = await self._on_trigger(ctx, trigger)
        (run,) = await self._create_runs(ctx, [admitted], batch=False)
        return self._created_response(run)

    async def trigger(self, request: Request) -> Response:
        ctx = await self._authenticate(request)
        body = _parse_model(TriggerRequest, await _read_json(request, self.durably.max_payload_bytes + 65536))
        with _request_trace_parent(request):
            return await self._trigger_one(ctx, body)

    async def trigger_batch(self, request: Request) -> Response:
        """Many runs of one job in one transaction: all are created (or resolved) or none is."""
        ctx = await self._authenticate(request)
        limit = 4 * self.durably.max_payload_bytes + MAX_BATCH_ITEMS * 4096
        body = _parse_model(TriggerBatchRequest, await _read_json(request, limit))
        triggers = []
        for item in body.items:
            single = TriggerRequest(
                job=body.job,
                input=item.input,
                idempotency_key=item.idempotency_key,
                concurrency_key=item.concurrency_key,
                coalesce=item.coalesce,
                labels=item.labels,
                priority=item.priority,
                timeout=item.timeout,
            )
            triggers.append(await self._on_trigger(ctx, single))
        if not triggers:  # nothing to create; an unknown job is still a 404
            return JSONResponse({"runs": await self.durably.batch_trigger(body.job, [])})
        with _request_trace_parent(request):
            runs = await self._create_runs(ctx, triggers, batch=True)
        status_code = 201 if any(run.disposition == "created" for run in runs) else 200
        return JSONResponse({"runs": [self._run_dict(run) for run in runs]}, status_code=status_code)

    async def purge(self, request: Request) -> Response:
        """Delete finished runs of every tenant: with ``auth``, only when ``can_purge`` says so."""
        ctx = await self._authenticate(request)
        if self.auth is not None:
            hook = self._hook("can_purge")
            if hook is None or await _call_hook(hook, ctx) is not True:
                raise PermissionError("purging runs is not allowed")
        body = _parse_model(PurgeRequest, await _read_json(request, 64 * 1024))
        purged = await self.durably.purge_runs(older_than=body.older_than, limit=body.limit)
        return JSONResponse({"purged": purged})

    async def list_runs(self, request: Request) -> Response:
        ctx = await self._authenticate(request)
        runs_filter = await self._scope(ctx, _filter_from_query(request))
        # Straight from the store: summaries need no decoded input or output.
        records = await self.durably.store.list_runs(
            RunFilter(
                statuses=runs_filter.status,
                job_names=runs_filter.job,
                labels=_validate_labels(runs_filter.labels, filtering=True),
                limit=min(runs_filter.limit, MAX_LIMIT),
                offset=runs_filter.offset,
                parent_run_id=runs_filter.parent_run_id,
                versions=runs_filter.version,
            )
        )
        return JSONResponse(
            {
                "runs": [run_summary(record) for record in records],
                "limit": runs_filter.limit,
                "offset": runs_filter.offset,
            }
        )

    async def get_run(self, request: Request) -> Response:
        _, run = await self._run_for(request, "read")
        return self._run_response(run)

    async def get_steps(self, request: Request) -> Response:
        _, run = await self._run_for(request, "steps")
        steps = await self.durably.get_steps(run.id)
        return JSONResponse({"steps": [self._scrub(step.to_dict()) for step in steps]})

    async def get_attempts(self, request: Request) -> Response:
        _, run = await self._run_for(request, "steps")
        attempts = await self.durably.get_step_attempts(run.id)
        return JSONResponse({"attempts": [self._scrub(attempt.to_dict()) for attempt in attempts]})

    async def get_logs(self, request: Request) -> Response:
        _, run = await self._run_for(request, "read")
        return JSONResponse({"logs": [log.to_dict() for log in await self.durably.get_logs(run.id)]})

    async def cancel(self, request: Request) -> Response:
        _, run = await self._run_for(request, "cancel")
        await self._empty_body(request)
        return self._run_response(await self.durably.cancel(run.id))

    async def retrigger(self, request: Request) -> Response:
        ctx, run = await self._run_for(request, "retrigger")
        await self._empty_body(request)
        again = TriggerRequest(
            job=run.job_name,
            input=to_jsonable(run.input),
            concurrency_key=run.concurrency_key,
            labels=dict(run.labels) or None,
            priority=run.priority,
            # The same timeout, counted from the new run's trigger (as Durably.retrigger does).
            timeout=None
            if run.deadline_at is None or run.created_at is None
            else max((run.deadline_at - run.created_at).total_seconds(), 0.001),
        )
        with _request_trace_parent(request):
            return await self._trigger_one(ctx, again)

    async def signal(self, request: Request) -> Response:
        """Send the path's signal to the run: 200 with its disposition (delivered, stored, duplicate)."""
        _, run = await self._run_for(request, "signal")
        body = _parse_model(SignalRequest, await _read_json(request, self.durably.max_payload_bytes + 65536))
        name = request.path_params["name"]
        disposition = await self.durably.send_signal(run.id, name, body.payload, signal_id=body.signal_id)
        return JSONResponse({"run_id": run.id, "name": name, "disposition": disposition})

    async def resume(self, request: Request) -> Response:
        """Continue a failed or cancelled run after its last completed step (409 in any other state)."""
        _, run = await self._run_for(request, "resume")
        await self._empty_body(request)
        try:
            resumed = await self.durably.resume_run(run.id)
        except ConflictError as exc:
            # Only this conflict names another run (the one pending for the key), which may be
            # another tenant's; the others speak of this run, which the caller may read.
            if self.auth is None or run.concurrency_key is None or "concurrency key" not in str(exc):
                raise
            raise self._hide_conflict(exc) from exc
        return self._run_response(resumed)

    async def fork(self, request: Request) -> Response:
        """A new run with the source's steps before ``from_step``; it passes ``on_trigger`` as any new run.

        The hook sees the trigger the fork amounts to (the source's job, input and labels, no
        keys) and may reject it or change its labels; changing anything else is a hook bug.
        """
        ctx, run = await self._run_for(request, "fork")
        body = _parse_model(ForkRequest, await _read_json(request, 64 * 1024))
        trigger = TriggerRequest(
            job=run.job_name, input=to_jsonable(run.input), labels=dict(run.labels) or None
        )
        admitted = await self._on_trigger(ctx, trigger)
        changed = [
            name
            for name, differs in (
                ("job", admitted.job != trigger.job),
                ("input", admitted.input != trigger.input),
                ("idempotency_key", admitted.idempotency_key is not None),
                ("concurrency_key", admitted.concurrency_key is not None),
                ("coalesce", admitted.coalesce is not None),
            )
            if differs
        ]
        if changed:
            raise TypeError(
                f"on_trigger changed the {', '.join(changed)} of a fork of run {run.id!r}: a fork keeps "
                "the source's job and input and has no keys; the hook may reject it or change its labels"
            )
        forked = await self.durably.fork_run(run.id, from_step=body.from_step, labels=admitted.labels or {})
        return self._created_response(forked)

    async def delete(self, request: Request) -> Response:
        _, run = await self._run_for(request, "delete")
        await self.durably.delete_run(run.id)
        return JSONResponse({"id": run.id, "deleted": True})

    # -- event streams --------------------------------------------------------------------------------
    async def run_events(self, request: Request) -> Response:
        _, run = await self._run_for(request, "subscribe")
        return _EventStream(self._run_stream(run.id))

    async def list_events(self, request: Request) -> Response:
        ctx = await self._authenticate(request)
        runs_filter = await self._scope(ctx, _filter_from_query(request))
        return _EventStream(self._list_stream(runs_filter))

    async def _paced(
        self, next_event: Callable[[], Awaitable[Event | None]], throttle: ProgressThrottle
    ) -> AsyncIterator[Event | None]:
        """Events from ``next_event`` (``None`` ends) through ``throttle``; ``None`` = keep-alive due.

        The pending ``next_event`` task is never cancelled while the stream runs, so a
        timeout (for a held progress event or a keep-alive) cannot drop an event.
        """
        pending: asyncio.Task[Event | None] | None = None
        quiet_since = time.monotonic()
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(next_event())
                wait = KEEPALIVE_SECONDS - (time.monotonic() - quiet_since)
                held = throttle.seconds_until_due()
                if held is not None:
                    wait = min(wait, held)
                done, _ = await asyncio.wait({pending}, timeout=max(0.0, wait))
                for event in throttle.due():
                    quiet_since = time.monotonic()
                    yield event
                if not done:
                    if time.monotonic() - quiet_since >= KEEPALIVE_SECONDS:
                        quiet_since = time.monotonic()
                        yield None
                    continue
                incoming = pending.result()
                pending = None
                if incoming is None:
                    return
                for ready in throttle.offer(incoming):
                    quiet_since = time.monotonic()
                    yield ready
        finally:
            if pending is not None:
                pending.cancel()

    async def _run_stream(self, run_id: str) -> AsyncIterator[bytes]:
        """One run: its current state (``run:snapshot``, recorded steps, progress), then live events.

        Ends after the run's terminal event (complete, fail, cancel or delete).
        """
        durably = self.durably
        try:
            subscription = durably.subscribe(
                run_id, max_buffered=STREAM_BACKLOG, max_buffered_bytes=STREAM_BACKLOG_BYTES
            )
        except NotFoundError:
            yield _sse("run:delete", {"type": "run:delete", "run_id": run_id})
            return
        try:
            try:
                run = await durably.get_run(run_id)
                steps = await durably.get_steps(run_id)
            except NotFoundError:
                yield _sse("run:delete", {"type": "run:delete", "run_id": run_id})
                return
            envelope = {"run_id": run.id, "job_name": run.job_name, "timestamp": iso(run.updated_at)}
            yield _sse("run:snapshot", {"type": "run:snapshot", **envelope, "run": self._run_dict(run)})
            for step in steps:
                kind = "step:complete" if step.status == "completed" else "step:fail"
                yield _sse(
                    kind,
                    {
                        "type": kind,
                        **envelope,
                        "step_name": step.name,
                        "step_index": step.index,
                        "output": step.output,
                        "error": self._scrub_error(step.error),
                        "duration_ms": step.duration_ms,
                        "replayed": True,
                    },
                )
            if run.progress is not None:
                yield _sse(
                    "run:progress",
                    {
                        "type": "run:progress",
                        **envelope,
                        "progress": run.progress,
                        "replayed": True,
                    },
                )
            replayed_steps = max((step.index for step in steps), default=-1)

            async def next_event() -> Event | None:
                try:
                    return await subscription.__anext__()
                except StopAsyncIteration:
                    return None
                except SubscriptionOverflowError:
                    return _reset_event(run_id)

            async for event in self._paced(next_event, ProgressThrottle(self.sse_throttle)):
                if event is None:
                    yield b": keep-alive\n\n"
                    continue
                if event.type == "stream:reset":
                    yield _reset_sse(event)
                    return
                if event.type.startswith("step:") and event.data.get("step_index", -1) <= replayed_steps:
                    continue  # already in the replay
                yield _sse(event.type, _light(self._scrub(event.to_dict())))
                if event.type in TERMINAL_EVENT_TYPES:
                    return
        finally:
            subscription.close()

    async def _list_stream(self, runs_filter: RunsFilter) -> AsyncIterator[bytes]:
        """Run-level events of every run inside ``runs_filter``, each with the run's current state.

        Events wait in a bounded ``EventBuffer``; a client more than ``STREAM_BACKLOG``
        events (or ``STREAM_BACKLOG_BYTES``) behind gets ``stream:reset`` and the stream ends.
        """
        buffer = EventBuffer(STREAM_BACKLOG, max_bytes=STREAM_BACKLOG_BYTES)
        visible = _Verdicts(_VISIBLE_CACHE_SIZE)
        known = visible.remember

        def offer(event: Event) -> None:
            run_id = event.run_id
            if run_id is None:
                return
            if event.type == "run:trigger" and run_id not in visible:
                known(run_id, runs_filter.matches(event.job_name, event.data.get("labels") or {}))
            if visible.get(run_id) is False:  # outside the filter: not even buffered
                if event.type in TERMINAL_EVENT_TYPES:
                    visible.pop(run_id, None)
                return
            if "input" in event.data or "output" in event.data:
                # Never sent on this stream: do not keep megabytes alive while the event waits.
                data = {k: v for k, v in event.data.items() if k not in ("input", "output")}
                event = dataclasses.replace(event, data=data)
            buffer.put(event)
            if buffer.overflowed:
                for unsubscribe in unsubscribers:
                    unsubscribe()

        unsubscribers = [self.durably.on(kind, offer) for kind in RUN_LEVEL_EVENT_TYPES]

        async def is_visible(event: Event) -> bool:
            run_id = event.run_id
            if run_id is None:
                return False
            if run_id not in visible:
                if event.type == "run:trigger":
                    labels = event.data.get("labels") or {}
                    known(run_id, runs_filter.matches(event.job_name, labels))
                else:
                    record = await self.durably.store.get_run(run_id)
                    if record is not None:
                        self._remember(run_id, record.job_name, record.labels)
                    meta = self._meta.get(run_id)
                    # A deleted run nobody here has seen cannot be attributed: stay silent.
                    known(run_id, meta is not None and runs_filter.matches(meta[0], meta[1]))
            return visible[run_id]

        async def next_event() -> Event | None:
            while True:
                try:
                    event = await buffer.get()
                except SubscriptionOverflowError:
                    return _reset_event(None)
                if event is not None and await is_visible(event):
                    return event

        try:
            yield b": ready\n\n"
            async for event in self._paced(next_event, ProgressThrottle(self.sse_throttle)):
                if event is None:
                    yield b": keep-alive\n\n"
                    continue
                if event.type == "stream:reset":
                    yield _reset_sse(event)
                    return
                data = _light(self._scrub(event.to_dict()))
                data.pop("output", None)  # a list carries summaries: GET /runs/{id} has the output
                if event.type != "run:delete" and event.run_id is not None:
                    record = await self.durably.store.get_run(event.run_id)
                    data["run"] = None if record is None else run_summary(record)
                if event.type in TERMINAL_EVENT_TYPES and event.run_id is not None:
                    visible.pop(event.run_id, None)
                yield _sse(event.type, data)
        finally:
            for unsubscribe in unsubscribers:
                unsubscribe()


class _Verdicts(OrderedDict[str, bool]):
    """Run id -> inside a stream's filter, for at most ``size`` runs (least recently set forgotten)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def remember(self, run_id: str, inside: bool) -> None:
        self[run_id] = inside
        self.move_to_end(run_id)
        while len(self) > self.size:
            self.popitem(last=False)


# --- static files ------------------------------------------------------------------------------------


class _StaticDir:
    """Files of a directory that may not exist yet: 404 with a clear message instead of a 500."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._files: StaticFiles | None = None

    def missing(self) -> Response | None:
        if self.directory is None or not self.directory.is_dir():
            where = self.directory or "no static/ folder next to the package"
            return _error(404, "NotFound", f"the dashboard's static files are not installed ({where})")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = self.missing()
        if response is not None:
            await response(scope, receive, send)
            return
        if self._files is None:
            self._files = StaticFiles(directory=self.directory, check_dir=False)
        await self._files(scope, receive, send)

    async def page(self, request: Request) -> Response:
        """The dashboard page: ``dashboard.html`` (or ``index.html``) of the directory."""
        response = self.missing()
        if response is not None:
            return response
        assert self.directory is not None
        for name in ("dashboard.html", "index.html"):
            candidate = self.directory / name
            if candidate.is_file():
                return FileResponse(candidate, media_type="text/html")
        return _error(404, "NotFound", f"no dashboard.html or index.html in {self.directory}")


async def _to_dashboard_dir(request: Request) -> Response:
    # Relative, so it works under any mount prefix; the trailing slash makes the
    # page's relative URLs (its scripts, "../runs") resolve inside the prefix.
    return RedirectResponse("dashboard/", status_code=307)


# --- errors -----------------------------------------------------------------------------------------


async def _handle_http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = exc.detail if isinstance(exc.detail, str) else "request rejected"
    response = _error(exc.status_code, "HTTPError", message)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def _handle_bad_request(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, _BadRequest)
    return _error(exc.status, "BadRequest" if exc.status == 400 else "PayloadTooLarge", str(exc), exc.details)


async def _handle_permission(request: Request, exc: Exception) -> Response:
    return _error(403, "Forbidden", str(exc) or "forbidden")


async def _handle_durably(request: Request, exc: Exception) -> Response:
    kind = type(exc).__name__
    if isinstance(exc, ValidationError):
        return _error(400, kind, str(exc), exc.errors)
    if isinstance(exc, NotFoundError):
        return _error(404, kind, str(exc))
    if isinstance(exc, ConflictError):
        return _error(409, kind, str(exc))
    if isinstance(exc, StorageError | SchemaVersionError):
        return _error(503, kind, str(exc))
    return _error(500, kind, str(exc))


# --- factory ---------------------------------------------------------------------------------------


def create_app(
    durably: Durably,
    *,
    auth: DurablyAuth | Any | None = None,
    sse_throttle: float = 0.1,
    static_dir: str | Path | None = None,
    expose_tracebacks: bool | None = None,
    allowed_hosts: Sequence[str] = (),
    allowed_origins: Sequence[str] = (),
) -> Starlette:
    """An ASGI app serving ``durably``'s HTTP API, SSE streams, OpenAPI and dashboard.

    ``durably`` must be started (``await durably.init()``) before requests arrive;
    the app neither starts nor stops it, so it can be mounted in an app that owns
    the lifecycle. ``auth`` is an object with the hooks of ``DurablyAuth``.
    ``sse_throttle`` is the minimum gap between two progress events of one run on
    one stream. ``static_dir`` overrides where the dashboard's files are found.
    ``expose_tracebacks`` decides whether run and step errors carry their Python
    traceback (server paths, source lines) in responses and streams; ``None`` (the
    default) shows them without ``auth`` and hides them (``"traceback": ""``) once
    ``auth`` is given, where the callers are tenants rather than the operator.

    Other web pages cannot drive the app (see ``security``): it answers only the
    loopback names, the IP address a connection arrived on and ``allowed_hosts``
    (``"name"``, ``"name:port"``, ``"*.domain"``; ``["*"]`` for any Host, behind a
    proxy that checks it), else 421; it refuses cross-origin requests (403) except
    from ``allowed_origins`` (exact ``scheme://host[:port]``, trusted with the
    user's credentials; CORS preflights answered); ``POST`` needs
    ``Content-Type: application/json`` (415).
    """
    if isinstance(sse_throttle, bool) or not isinstance(sse_throttle, int | float) or not sse_throttle >= 0:
        raise ValidationError(f"sse_throttle must be a non-negative number of seconds, not {sse_throttle!r}")
    # Checked now: a typo in a host or an origin fails here, not on the first request.
    parse_allowed_hosts(allowed_hosts)
    parse_allowed_origins(allowed_origins)
    guard = Middleware(
        SecurityMiddleware,
        allowed_hosts=allowed_hosts,
        allowed_origins=allowed_origins,
        public_paths=("/dashboard", "/dashboard/", "/static/"),
    )
    api = _Api(durably, auth, float(sse_throttle), expose_tracebacks)
    static = _StaticDir(Path(static_dir) if static_dir is not None else _default_static_dir())
    routes: list[BaseRoute] = [
        Route("/health", api.health, methods=["GET"]),
        Route("/openapi.json", api.openapi, methods=["GET"]),
        Route("/jobs", api.jobs, methods=["GET"]),
        Route("/trigger", api.trigger, methods=["POST"]),
        Route("/trigger/batch", api.trigger_batch, methods=["POST"]),
        Route("/purge", api.purge, methods=["POST"]),
        Route("/runs", api.list_runs, methods=["GET"]),
        Route("/runs/{run_id}", api.get_run, methods=["GET"]),
        Route("/runs/{run_id}", api.delete, methods=["DELETE"]),
        Route("/runs/{run_id}/steps", api.get_steps, methods=["GET"]),
        Route("/runs/{run_id}/logs", api.get_logs, methods=["GET"]),
        Route("/runs/{run_id}/cancel", api.cancel, methods=["POST"]),
        Route("/runs/{run_id}/retrigger", api.retrigger, methods=["POST"]),
        # :path, so that a name holding "/" (sent as %2F, which the server decodes) still arrives.
        Route("/runs/{run_id}/signals/{name:path}", api.signal, methods=["POST"]),
        Route("/runs/{run_id}/resume", api.resume, methods=["POST"]),
        Route("/runs/{run_id}/fork", api.fork, methods=["POST"]),
        Route("/runs/{run_id}/attempts", api.get_attempts, methods=["GET"]),
        Route("/runs/{run_id}/events", api.run_events, methods=["GET"]),
        Route("/events", api.list_events, methods=["GET"]),
        *schedule_routes(api),
        Route("/dashboard", _to_dashboard_dir, methods=["GET"]),
        Route("/dashboard/", static.page, methods=["GET"]),
        Mount("/dashboard", app=static),
        Mount("/static", app=static),
    ]
    return Starlette(
        routes=routes,
        middleware=[guard],
        exception_handlers={
            HTTPException: _handle_http,
            _BadRequest: _handle_bad_request,
            PermissionError: _handle_permission,
            DurablyError: _handle_durably,
        },
    )
