"""The schedule routes of the HTTP API: list, create or replace, delete, pause, resume.

Schedules belong to the whole database, not to a tenant (a tick's run passes no
``on_trigger``), so once ``auth`` is given every schedule route answers 403 unless the
``can_manage_schedules(ctx, operation)`` hook returns ``True`` for the operation ("list",
"schedule", "unschedule", "pause", "resume"), as ``can_purge`` guards ``POST /purge``. The
mutating routes are ``POST``/``DELETE`` and so get the security middleware's same-origin and
``Content-Type: application/json`` checks, like every other mutating route.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from .requests import ScheduleRequest, _EmptyBody

if TYPE_CHECKING:
    from .app import _Api

ScheduleOperation = Literal["list", "schedule", "unschedule", "pause", "resume"]


def schedule_routes(api: _Api) -> list[BaseRoute]:
    """The routes, bound to ``api`` (its Durably and auth hooks)."""
    from .app import _call_hook, _parse_model, _read_json

    async def allowed(request: Request, operation: ScheduleOperation) -> None:
        ctx = await api._authenticate(request)
        if api.auth is not None:
            hook = api._hook("can_manage_schedules")
            if hook is None or await _call_hook(hook, ctx, operation) is not True:
                raise PermissionError(f"schedules: {operation} is not allowed")

    async def list_schedules(request: Request) -> Response:
        await allowed(request, "list")
        schedules = await api.durably.list_schedules()
        return JSONResponse({"schedules": [schedule.to_dict() for schedule in schedules]})

    async def create(request: Request) -> Response:
        await allowed(request, "schedule")
        body = _parse_model(ScheduleRequest, await _read_json(request, api.durably.max_payload_bytes + 65536))
        schedule = await api.durably.schedule(
            body.job,
            body.cron,
            input=body.input,
            name=body.name,
            timezone=body.timezone,
            catch_up=body.catch_up,
        )
        return JSONResponse(schedule.to_dict())

    async def delete(request: Request) -> Response:
        await allowed(request, "unschedule")
        name = request.path_params["name"]
        await api.durably.unschedule(name)
        return JSONResponse({"name": name, "deleted": True})

    async def pause(request: Request) -> Response:
        await allowed(request, "pause")
        _parse_model(_EmptyBody, await _read_json(request, 64 * 1024))
        return JSONResponse((await api.durably.pause_schedule(request.path_params["name"])).to_dict())

    async def resume(request: Request) -> Response:
        await allowed(request, "resume")
        _parse_model(_EmptyBody, await _read_json(request, 64 * 1024))
        return JSONResponse((await api.durably.resume_schedule(request.path_params["name"])).to_dict())

    return [
        Route("/schedules", list_schedules, methods=["GET"]),
        Route("/schedules", create, methods=["POST"]),
        # :path, so that a name holding "/" still arrives; the suffixed routes come first.
        Route("/schedules/{name:path}/pause", pause, methods=["POST"]),
        Route("/schedules/{name:path}/resume", resume, methods=["POST"]),
        Route("/schedules/{name:path}", delete, methods=["DELETE"]),
    ]


def schedule_paths(op: Any, ref: Any, json_content: Any, errors: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI paths of these routes (built with the document's own helpers)."""
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    one = {"200": {"description": "the schedule", "content": json_content(ref("Schedule"))}, **errors}
    not_found = {"404": {"description": "no such schedule", "content": json_content(ref("Error"))}}
    guard = (
        " With auth hooks configured, allowed only when can_manage_schedules(ctx, operation) returns true."
    )
    return {
        "/schedules": {
            "get": op(
                "List the schedules of the database, by name." + guard,
                {
                    "200": {
                        "description": "schedules",
                        "content": json_content(
                            {
                                "type": "object",
                                "properties": {"schedules": {"type": "array", "items": ref("Schedule")}},
                            }
                        ),
                    },
                    **errors,
                },
            ),
            "post": op(
                "Create or replace a schedule: each tick of cron (in timezone) creates one run of job, "
                "exactly once across all workers. Replacing keeps paused, and the next tick unless cron "
                "or timezone changed." + guard,
                one,
                requestBody={"required": True, "content": json_content(ref("ScheduleRequest"))},
            ),
        },
        "/schedules/{name}": {
            "delete": op(
                "Delete a schedule (its runs stay)." + guard,
                {
                    "200": {
                        "description": "deleted",
                        "content": json_content(
                            {
                                "type": "object",
                                "properties": {"name": {"type": "string"}, "deleted": {"const": True}},
                            }
                        ),
                    },
                    **errors,
                    **not_found,
                },
                parameters=[name],
            )
        },
        "/schedules/{name}/pause": {
            "post": op(
                "Pause a schedule: no runs until resumed." + guard, {**one, **not_found}, parameters=[name]
            )
        },
        "/schedules/{name}/resume": {
            "post": op(
                "Resume a schedule from its next tick after now (ticks missed while paused are skipped)."
                + guard,
                {**one, **not_found},
                parameters=[name],
            )
        },
    }


SCHEDULE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name", "job_name", "cron", "timezone", "catch_up", "paused", "next_tick_at"],
    "properties": {
        "name": {"type": "string"},
        "job_name": {"type": "string"},
        "cron": {"type": "string"},
        "timezone": {"type": "string"},
        "input": {},
        "catch_up": {"enum": ["latest", "all"]},
        "paused": {"type": "boolean"},
        "next_tick_at": {"type": "string", "format": "date-time"},
        "last_tick_at": {"type": ["string", "null"], "format": "date-time"},
        "last_run_id": {"type": ["string", "null"]},
        "created_at": {"type": "string", "format": "date-time"},
        "updated_at": {"type": "string", "format": "date-time"},
    },
}
