"""The OpenAPI 3.1 description of the HTTP API (hand-written; a test keeps it true)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from .. import __version__
from ..models import RUN_STATUSES
from .requests import (
    MAX_BATCH_ITEMS,
    MAX_LIMIT,
    MAX_OFFSET,
    RUN_LEVEL_EVENT_TYPES,
    ForkRequest,
    PurgeRequest,
    ScheduleRequest,
    SignalRequest,
    TriggerBatchItem,
    TriggerBatchRequest,
    TriggerRequest,
)
from .schedules import SCHEDULE_SCHEMA, schedule_paths


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


_ERROR_RESPONSES = {
    "400": {"description": "malformed request or invalid input", "content": _json_content(_ref("Error"))},
    "401": {"description": "rejected by the authenticate hook", "content": _json_content(_ref("Error"))},
    "403": {"description": "rejected by an auth hook", "content": _json_content(_ref("Error"))},
}
_NOT_FOUND = {"404": {"description": "no such run", "content": _json_content(_ref("Error"))}}
_CONFLICT = {
    "409": {"description": "not allowed in the run's current state", "content": _json_content(_ref("Error"))}
}
_RUN_ID = {"name": "run_id", "in": "path", "required": True, "schema": {"type": "string"}}
_SSE = {"text/event-stream": {"schema": {"type": "string"}}}


def _op(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"summary": summary, "responses": responses, **extra}


# What ``security.SecurityMiddleware`` answers before any route runs.
_CROSS_ORIGIN = (
    "a cross-origin request (Origin not this server's and not in allowed_origins, Origin: null, "
    "or Sec-Fetch-Site: cross-site/same-site without Origin)"
)
_HOST_REFUSED = {
    "description": "the Host is not served (loopback names, the connection's own IP address and "
    "allowed_hosts are); a DNS-rebinding defence",
    "content": _json_content(_ref("Error")),
}
_NOT_JSON = {
    "description": "a POST (or a request with a body) without Content-Type: application/json (UTF-8)",
    "content": _json_content(_ref("Error")),
}


def _with_refusals(paths: dict[str, Any]) -> dict[str, Any]:
    """Every operation with the refusals of the security checks (403 cross-origin, 421, 415 for POST)."""
    for item in paths.values():
        for method, operation in item.items():
            responses = operation["responses"]
            forbidden = responses.get("403")
            responses["403"] = {
                "description": _CROSS_ORIGIN
                if forbidden is None
                else f"{forbidden['description']}, or {_CROSS_ORIGIN}",
                "content": _json_content(_ref("Error")),
            }
            if method == "post":
                responses["415"] = _NOT_JSON
            responses["421"] = _HOST_REFUSED
    return paths


def _component_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON Schema with nested models referenced as components (listed separately)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    return schema


def openapi_document(server_url: str = "") -> dict[str, Any]:
    """The OpenAPI 3.1 description of ``create_app``'s routes (hand-written; a test keeps it true)."""
    run_schema = {
        "type": "object",
        "required": ["id", "job_name", "status"],
        "properties": {
            "id": {"type": "string"},
            "job_name": {"type": "string"},
            "status": {"enum": sorted(RUN_STATUSES)},
            "input": {},
            "output": {},
            "error": {"oneOf": [{"type": "null"}, _ref("ErrorInfo")]},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "progress": {
                "oneOf": [
                    {"type": "null"},
                    {
                        "type": "object",
                        "properties": {
                            "current": {"type": "integer"},
                            "total": {"type": ["integer", "null"]},
                            "message": {"type": ["string", "null"]},
                        },
                    },
                ]
            },
            "attempt": {"type": "integer"},
            "idempotency_key": {"type": ["string", "null"]},
            "concurrency_key": {"type": ["string", "null"]},
            "created_at": {"type": ["string", "null"], "format": "date-time"},
            "started_at": {"type": ["string", "null"], "format": "date-time"},
            "completed_at": {"type": ["string", "null"], "format": "date-time"},
            "updated_at": {"type": ["string", "null"], "format": "date-time"},
            "disposition": {"enum": ["created", "idempotent", "coalesced", "debounced", None]},
            "wake_at": {"type": ["string", "null"], "format": "date-time"},
            "wait_reason": {"enum": ["retry", "sleep", "signal", "offline", "child", None]},
            "wait_step": {"type": ["string", "null"]},
            "forked_from": {"type": ["string", "null"]},
            "priority": {"type": "integer"},
            "not_before": {"type": ["string", "null"], "format": "date-time"},
            "parent_run_id": {
                "type": ["string", "null"],
                "description": "a child run (step.start_child): the run that started it",
            },
            "wait_child_id": {"type": ["string", "null"], "description": "waiting for this child run"},
            "deadline_at": {
                "type": ["string", "null"],
                "format": "date-time",
                "description": "when the run fails with RunTimeoutError if it has not ended (timeout)",
            },
            "version": {
                "type": ["string", "null"],
                "description": "the job version that started the run (before that: the trigger's)",
            },
            "trace_parent": {"type": ["string", "null"], "description": "W3C traceparent (tracing on)"},
        },
    }
    run_properties: dict[str, Any] = run_schema["properties"]  # type: ignore[assignment]
    list_filters = [
        {
            "name": "job",
            "in": "query",
            "schema": {"type": "array", "items": {"type": "string"}},
            "description": "job name(s); repeat or comma-separate",
        },
        {
            "name": "label.{key}",
            "in": "query",
            "schema": {"type": "string"},
            "description": "exact label match, e.g. label.tenant=acme (not a literal parameter name)",
        },
    ]
    created = {"description": "the run", "content": _json_content(_ref("TriggerResult"))}
    batch_created = {
        "description": "the runs, in the order of the items, each with its disposition",
        "content": _json_content(
            {
                "type": "object",
                "required": ["runs"],
                "properties": {"runs": {"type": "array", "items": _ref("Run")}},
            }
        ),
    }
    paths: dict[str, Any] = {
        "/health": {
            "get": _op(
                "Liveness and database check (no authentication)",
                {
                    "200": {"description": "ok", "content": _json_content({"type": "object"})},
                    "503": {
                        "description": "database unavailable",
                        "content": _json_content({"type": "object"}),
                    },
                },
            )
        },
        "/openapi.json": {"get": _op("This document", {"200": {"description": "OpenAPI 3.1"}})},
        "/jobs": {
            "get": _op(
                "Registered jobs with their input JSON Schema",
                {
                    "200": {"description": "jobs", "content": _json_content({"type": "object"})},
                    **_ERROR_RESPONSES,
                },
            )
        },
        "/trigger": {
            "post": _op(
                "Trigger a job (201 when created, 200 for an idempotent or coalesced run)",
                {
                    "200": created,
                    "201": created,
                    **_ERROR_RESPONSES,
                    **_NOT_FOUND,
                    **_CONFLICT,
                    "413": {"description": "body too large", "content": _json_content(_ref("Error"))},
                },
                requestBody={"required": True, "content": _json_content(_ref("TriggerRequest"))},
            )
        },
        "/trigger/batch": {
            "post": _op(
                "Trigger many runs of one job in one transaction: every item is created (or resolved "
                "to its idempotent or coalesced run) or, on any error, none is. on_trigger applies to "
                f"each item. At most {MAX_BATCH_ITEMS} items. 201 when at least one run was created, "
                "200 when every item resolved to an existing run",
                {
                    "200": batch_created,
                    "201": batch_created,
                    **_ERROR_RESPONSES,
                    **_NOT_FOUND,
                    "409": {
                        "description": "an item's concurrency key is taken (nothing was created), or a key "
                        "names a run the caller cannot read",
                        "content": _json_content(_ref("Error")),
                    },
                    "413": {"description": "body too large", "content": _json_content(_ref("Error"))},
                },
                requestBody={"required": True, "content": _json_content(_ref("TriggerBatchRequest"))},
            )
        },
        "/purge": {
            "post": _op(
                "Delete finished (completed, failed, cancelled) runs that ended more than older_than "
                'ago (a number of seconds, or a duration string such as "30d", "12h", "90m", '
                '"1.5h"), of every tenant. With auth hooks configured, allowed only when the '
                "can_purge hook returns true",
                {
                    "200": {
                        "description": "how many runs were deleted",
                        "content": _json_content(
                            {
                                "type": "object",
                                "required": ["purged"],
                                "properties": {"purged": {"type": "integer"}},
                            }
                        ),
                    },
                    **_ERROR_RESPONSES,
                },
                requestBody={"required": True, "content": _json_content(_ref("PurgeRequest"))},
            )
        },
        "/runs": {
            "get": _op(
                "List runs, newest first",
                {
                    "200": {
                        "description": "runs",
                        "content": _json_content(
                            {
                                "type": "object",
                                "properties": {
                                    "runs": {"type": "array", "items": _ref("RunSummary")},
                                    "limit": {"type": "integer"},
                                    "offset": {"type": "integer"},
                                },
                            }
                        ),
                    },
                    **_ERROR_RESPONSES,
                },
                parameters=[
                    *list_filters,
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {"type": "array", "items": {"enum": sorted(RUN_STATUSES)}},
                        "description": "status(es); repeat or comma-separate",
                    },
                    {
                        "name": "version",
                        "in": "query",
                        "schema": {"type": "array", "items": {"type": "string"}},
                        "description": "the job version(s) that started the runs; repeat or comma-separate",
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 0, "maximum": MAX_LIMIT, "default": 100},
                    },
                    {
                        "name": "offset",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET, "default": 0},
                    },
                    {
                        "name": "parent_run_id",
                        "in": "query",
                        "schema": {"type": "string"},
                        "description": "only the child runs this run started (step.start_child)",
                    },
                ],
            )
        },
        "/runs/{run_id}": {
            "get": _op(
                "One run",
                {
                    "200": {"description": "the run", "content": _json_content(_ref("Run"))},
                    **_ERROR_RESPONSES,
                    **_NOT_FOUND,
                },
                parameters=[_RUN_ID],
            ),
            "delete": _op(
                "Delete a run that is not running, with its steps and logs (409 while a child run "
                "of it is active)",
                {
                    "200": {"description": "deleted", "content": _json_content({"type": "object"})},
                    **_ERROR_RESPONSES,
                    **_NOT_FOUND,
                    **_CONFLICT,
                },
                parameters=[_RUN_ID],
            ),
        },
        "/runs/{run_id}/steps": {
            "get": _op(
                "The run's recorded steps",
                {
                    "200": {
                        "description": "steps",
                        "content": _json_content(
                            {
                                "type": "object",
                                "properties": {"steps": {"type": "array", "items": _ref("Step")}},
                            }
                        ),
                    },
                    **_ERROR_RESPONSES,
                    **_NOT_FOUND,
                },
                parameters=[_RUN_ID],
            )
        },
        "/runs/{run_id}/logs": {
            "get": _op(
                "The run's log lines",
                {
                    "200": {
                        "description": "logs",
                        "content": _json_content(
                            {
                                "type": "object",
                                "properties": {"logs": {"type": "array", "items": _ref("LogEntry")}},
                            }
                        ),
                    },
                    **_ERROR_RESPONSES,
                    **_NOT_FOUND,
                },
                parameters=[_RUN_ID],
            )
        },
        "/runs/{run_id}/cancel": {
            "post": _op(
                "Cancel a pending or running run (body: none or {})",
                {
                    "200": {"description": "the cancelled run", "content": _json_content(_ref("Run"))},
                    **_ERROR_RESPONSES,
                    **_NOT_FOUND,
                    **_CONFLICT,
                },
                parameters=[_RUN_ID],
            )
        },
        "/runs/{run_id}/retrigger": {
            "post": _op(
                "A new run of the same job with the same input and labels (body: none or {})",
                {"201": created, **_ERROR_RESPONSES, **_NOT_FOUND, **_CONFLICT},
                parameters=[_RUN_ID],
            )
        },
        "/runs/{run_id}/signals/{name}": {
            "post": _op(
                "Send the signal name to a run: delivered (the run was waiting for it in "
                "wait_for_signal and continues now), stored (kept until the run reaches "
                "wait_for_signal(name)) or duplicate (this signal_id was sent to the run before; "
                "nothing changed). A payload the signal's type refuses (where this server knows the "
                "type) is a 400 with details and is not stored. The body may be empty (payload null)",
                {
                    "200": {"description": "the disposition", "content": _json_content(_ref("SignalResult"))},
                    **_ERROR_RESPONSES,
                    **_NOT_FOUND,
                    "409": {
                        "description": "the run is finished (completed, failed or cancelled)",
                        "content": _json_content(_ref("Error")),
                    },
                    "413": {"description": "body too large", "content": _json_content(_ref("Error"))},
                },
                parameters=[
                    _RUN_ID,
                    {
                        "name": "name",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                        "description": "the signal's name, as in wait_for_signal (percent-encoded; "
                        "it cannot contain /)",
                    },
                ],
                requestBody={"required": False, "content": _json_content(_ref("SignalRequest"))},
            )
        },
        "/runs/{run_id}/resume": {
            "post": _op(
                "Continue a failed or cancelled run after its last completed step: it is pending "
                "again with its attempt count kept; completed steps replay, the failed step executes "
                "again (body: none or {})",
                {
                    "200": {"description": "the resumed run", "content": _json_content(_ref("Run"))},
                    **_ERROR_RESPONSES,
                    **_NOT_FOUND,
                    "409": {
                        "description": "the run is not failed or cancelled (completed, pending, leased, "
                        "waiting), its cancelled handler is still stopping, or another run of its "
                        "concurrency key is pending",
                        "content": _json_content(_ref("Error")),
                    },
                },
                parameters=[_RUN_ID],
            )
        },
        "/runs/{run_id}/fork": {
            "post": _op(
                "A new run of the same job, input and labels holding copies of the run's completed "
                "steps before from_step (they replay; from_step and the rest execute again), with "
                "forked_from set and no idempotency or concurrency key. The new run passes the "
                "on_trigger hook like any new run",
                {
                    "201": created,
                    **_ERROR_RESPONSES,
                    "404": {
                        "description": "no such run, or from_step names no recorded step of it",
                        "content": _json_content(_ref("Error")),
                    },
                    "409": {
                        "description": "the run's step outputs were not kept (preserve_steps=False)",
                        "content": _json_content(_ref("Error")),
                    },
                },
                parameters=[_RUN_ID],
                requestBody={"required": True, "content": _json_content(_ref("ForkRequest"))},
            )
        },
        "/runs/{run_id}/attempts": {
            "get": _op(
                "Every attempt of every step.run step of the run, by position then attempt number: "
                "each retried failure, and the attempt that ended the step",
                {
                    "200": {
                        "description": "attempts",
                        "content": _json_content(
                            {
                                "type": "object",
                                "required": ["attempts"],
                                "properties": {"attempts": {"type": "array", "items": _ref("StepAttempt")}},
                            }
                        ),
                    },
                    **_ERROR_RESPONSES,
                    **_NOT_FOUND,
                },
                parameters=[_RUN_ID],
            )
        },
        "/runs/{run_id}/events": {
            "get": _op(
                "Server-Sent Events for one run: run:snapshot, the recorded steps (replayed: true) and "
                "run:progress first, then live events; the stream ends after the terminal event "
                "(run:complete, run:fail, run:cancel or run:delete) — close the EventSource then, "
                "or it reconnects. run:progress is throttled per run; the last one is always sent. "
                "A client that falls too far behind gets a final stream:reset event and the stream "
                "ends: reconnect (the new stream starts again with run:snapshot).",
                {"200": {"description": "event stream", "content": _SSE}, **_ERROR_RESPONSES, **_NOT_FOUND},
                parameters=[_RUN_ID],
            )
        },
        "/events": {
            "get": _op(
                "Server-Sent Events for the run list: "
                + ", ".join(RUN_LEVEL_EVENT_TYPES)
                + " of the runs inside the (scoped) filter, each with the run's current state in `run` "
                "(a RunSummary). Events carry no input or output (run:trigger, run:complete): "
                "GET /runs/{run_id} has them. A client that falls too far behind gets a final "
                "stream:reset event and the stream ends: reconnect and reload the list.",
                {"200": {"description": "event stream", "content": _SSE}, **_ERROR_RESPONSES},
                parameters=list_filters,
            )
        },
        "/dashboard": {"get": _op("Redirect to /dashboard/", {"307": {"description": "redirect"}})},
        "/dashboard/": {
            "get": _op(
                "The dashboard page",
                {
                    "200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}},
                    **_NOT_FOUND,
                },
            )
        },
        "/dashboard/{path}": {
            "get": _op(
                "The dashboard's static files",
                {"200": {"description": "a file"}, **_NOT_FOUND},
                parameters=[{"name": "path", "in": "path", "required": True, "schema": {"type": "string"}}],
            )
        },
        "/static/{path}": {
            "get": _op(
                "The same static files (durably.js for pages elsewhere)",
                {"200": {"description": "a file"}, **_NOT_FOUND},
                parameters=[{"name": "path", "in": "path", "required": True, "schema": {"type": "string"}}],
            )
        },
    }
    paths.update(schedule_paths(_op, _ref, _json_content, _ERROR_RESPONSES))
    schemas = {
        "ScheduleRequest": ScheduleRequest.model_json_schema(),
        "Schedule": SCHEDULE_SCHEMA,
        "TriggerRequest": TriggerRequest.model_json_schema(),
        "TriggerBatchRequest": _component_schema(TriggerBatchRequest),
        "TriggerBatchItem": TriggerBatchItem.model_json_schema(),
        "PurgeRequest": PurgeRequest.model_json_schema(),
        "SignalRequest": SignalRequest.model_json_schema(),
        "ForkRequest": ForkRequest.model_json_schema(),
        "SignalResult": {
            "type": "object",
            "required": ["run_id", "name", "disposition"],
            "properties": {
                "run_id": {"type": "string"},
                "name": {"type": "string"},
                "disposition": {"enum": ["delivered", "stored", "duplicate"]},
            },
        },
        "TriggerResult": {
            "type": "object",
            "required": ["id", "disposition", "run"],
            "properties": {
                "id": {"type": "string"},
                "disposition": {"enum": ["created", "idempotent", "coalesced", "debounced"]},
                "run": _ref("Run"),
            },
        },
        "Run": run_schema,
        "RunSummary": {
            "type": "object",
            "description": "A run as lists show it: no input, output or traceback, their sizes instead. "
            "GET /runs/{run_id} returns the whole run.",
            "required": ["id", "job_name", "status", "input_bytes", "output_bytes"],
            "properties": {
                **{
                    name: schema
                    for name, schema in run_properties.items()
                    # Lists show no input, output, traceback or trace parent (GET /runs/{run_id} has them).
                    if name not in ("input", "output", "error", "disposition", "trace_parent")
                },
                "error": {
                    "oneOf": [
                        {"type": "null"},
                        {
                            "type": "object",
                            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
                        },
                    ]
                },
                "input_bytes": {"type": "integer", "description": "size of the stored input JSON (UTF-8)"},
                "output_bytes": {
                    "type": ["integer", "null"],
                    "description": "size of the stored output JSON (UTF-8); null until completed",
                },
            },
        },
        "ErrorInfo": {
            "type": "object",
            "properties": {
                "type": {"type": "string"},
                "message": {"type": "string"},
                "traceback": {"type": "string"},
            },
        },
        "Step": {
            "type": "object",
            "properties": {
                "run_id": {"type": "string"},
                "index": {"type": "integer"},
                "name": {"type": "string"},
                "kind": {"enum": ["run", "sleep", "signal"]},
                "status": {"enum": ["completed", "failed"]},
                "output": {},
                "error": {"oneOf": [{"type": "null"}, _ref("ErrorInfo")]},
                "started_at": {"type": "string", "format": "date-time"},
                "completed_at": {"type": "string", "format": "date-time"},
                "duration_ms": {"type": "number"},
            },
        },
        "StepAttempt": {
            "type": "object",
            "properties": {
                "run_id": {"type": "string"},
                "index": {"type": "integer"},
                "name": {"type": "string"},
                "attempt": {"type": "integer", "description": "1 for the first attempt"},
                "status": {"enum": ["completed", "failed"]},
                "error": {"oneOf": [{"type": "null"}, _ref("ErrorInfo")]},
                "started_at": {"type": "string", "format": "date-time"},
                "completed_at": {"type": "string", "format": "date-time"},
                "duration_ms": {"type": "number"},
                "offline": {
                    "type": "boolean",
                    "description": "failed with a network error while the browser was offline "
                    "(used up no retry)",
                },
                "metadata": {
                    "type": ["object", "null"],
                    "description": "what the step attached to this attempt (step.attempt.set_metadata)",
                },
            },
        },
        "LogEntry": {
            "type": "object",
            "properties": {
                "run_id": {"type": "string"},
                "step_name": {"type": ["string", "null"]},
                "level": {"enum": ["debug", "info", "warning", "error"]},
                "message": {"type": "string"},
                "data": {},
                "created_at": {"type": "string", "format": "date-time"},
            },
        },
        "Error": {
            "type": "object",
            "required": ["error", "message"],
            "properties": {
                "error": {"type": "string"},
                "message": {"type": "string"},
                "details": {"type": "array", "items": {"type": "object"}},
            },
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "durably-web",
            "version": __version__,
            "description": "Trigger, watch and manage durable job runs.",
        },
        "servers": [{"url": server_url or "/"}],
        "paths": _with_refusals(paths),
        "components": {"schemas": schemas},
    }
