"""durably_web/rpc.py under CPython: the JSON call interface the browser worker uses, and the
names it shares with static/durably.js and static/durably.d.ts (one source: Python's)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from helpers import wait_until

import durably_web
from durably_web import RetryPolicy, StepContext, define_job
from durably_web.browser import BrowserRuntime
from durably_web.events import EVENT_TYPES, TERMINAL_EVENT_TYPES
from durably_web.models import RUN_STATUSES
from durably_web.rpc import METHODS, Dispatcher

STATIC = Path(__file__).resolve().parents[1] / "static"

FLAKY_FAILURES: dict[str, int] = {}


@define_job("rpc-waits", retry=RetryPolicy(max_attempts=3, initial_delay=0.05))
async def rpc_waits(step: StepContext, payload: Any) -> Any:
    first = await step.run("first", lambda: "one")

    def flaky() -> str:
        FLAKY_FAILURES[step.run_id] = FLAKY_FAILURES.get(step.run_id, 0) + 1
        if FLAKY_FAILURES[step.run_id] <= 1:
            raise RuntimeError("flaky")
        return "two"

    second = await step.run("second", flaky)
    approval = await step.wait_for_signal("approval")
    return {"first": first, "second": second, "approval": approval}


@define_job("rpc-fails")
async def rpc_fails(step: StepContext, payload: Any) -> Any:
    await step.run("first", lambda: 1)
    if payload.get("fail"):
        await step.run("boom", _boom)
    return "done"


def _boom() -> None:
    raise RuntimeError("boom")


async def call(dispatcher: Dispatcher, method: str, *args: Any) -> Any:
    reply = await dispatcher.call(method, list(args))
    assert reply["ok"], reply
    return reply["value"]


async def error(dispatcher: Dispatcher, method: str, *args: Any) -> dict[str, Any]:
    reply = await dispatcher.call(method, list(args))
    assert not reply["ok"], reply
    return reply["error"]


async def test_send_signal_get_step_attempts_with_js_names(make_durably: Any) -> None:
    dispatcher = Dispatcher(await make_durably(rpc_waits))
    run = await call(dispatcher, "trigger", "rpc-waits", {})
    # A signal the run does not wait for yet is kept for it.
    assert await call(dispatcher, "sendSignal", run["id"], "later", {"n": 1}) == "stored"
    waiting = await wait_until(lambda: _waiting_for_signal(dispatcher, run["id"]))
    assert (waiting["wait_reason"], waiting["wait_step"], waiting["wake_at"]) == ("signal", "approval", None)
    options = {"signalId": "mail-1"}
    assert await call(dispatcher, "sendSignal", run["id"], "approval", {"by": "ana"}, options) == "delivered"
    assert await call(dispatcher, "sendSignal", run["id"], "approval", {"by": "bo"}, options) == "duplicate"
    done = await call(dispatcher, "waitForRun", run["id"], {"timeout": 10000})
    assert done["status"] == "completed"
    assert done["output"] == {"first": "one", "second": "two", "approval": {"by": "ana"}}
    attempts = await call(dispatcher, "getStepAttempts", run["id"])
    assert [(a["name"], a["attempt"], a["status"]) for a in attempts] == [
        ("first", 1, "completed"),
        ("second", 1, "failed"),
        ("second", 2, "completed"),
    ]
    assert attempts[1]["error"]["message"] == "flaky"
    fields = {"run_id", "index", "name", "attempt", "status", "error", "started_at", "completed_at"}
    assert set(attempts[0]) == fields | {"duration_ms", "offline", "metadata"}
    kinds = [(s["name"], s["kind"]) for s in await call(dispatcher, "getSteps", run["id"])]
    assert kinds == [("first", "run"), ("second", "run"), ("approval", "signal")]

    # Strict options and the engine's errors, by name.
    bad = await error(dispatcher, "sendSignal", run["id"], "approval", None, {"signal_id": "x"})
    assert bad["name"] == "ValidationError" and "signal_id" in bad["message"]
    assert (await error(dispatcher, "sendSignal", run["id"], "approval"))["name"] == "ConflictError"
    assert (await error(dispatcher, "sendSignal", "nope", "approval"))["name"] == "NotFoundError"
    assert (await error(dispatcher, "getStepAttempts", "nope"))["name"] == "NotFoundError"
    assert (await error(dispatcher, "sendSignal", run["id"]))["name"] == "ValidationError"  # no name


async def _waiting_for_signal(dispatcher: Dispatcher, run_id: str) -> Any:
    run = await call(dispatcher, "getRun", run_id)
    return run if run["status"] == "waiting" and run["wait_reason"] == "signal" else None


async def test_resume_run_and_fork_run_with_js_names(make_durably: Any) -> None:
    dispatcher = Dispatcher(await make_durably(rpc_fails))
    failed = await call(dispatcher, "triggerAndWait", "rpc-fails", {"fail": True}, {"timeout": 10000})
    assert failed["status"] == "failed"

    resumed = await call(dispatcher, "resumeRun", failed["id"])
    assert resumed["id"] == failed["id"] and resumed["status"] == "pending"
    again = await call(dispatcher, "waitForRun", failed["id"], {"timeout": 10000})
    assert again["status"] == "failed"  # the step fails again, by design of the job
    assert (await error(dispatcher, "resumeRun", "nope"))["name"] == "NotFoundError"

    done = await call(dispatcher, "triggerAndWait", "rpc-fails", {}, {"timeout": 10000})
    assert (await error(dispatcher, "resumeRun", done["id"]))["name"] == "ConflictError"
    fork = await call(dispatcher, "forkRun", done["id"], {"fromStep": "first"})
    assert fork["id"] != done["id"] and fork["forked_from"] == done["id"]
    assert fork["disposition"] == "created" and fork["input"] == {}
    assert (await call(dispatcher, "waitForRun", fork["id"], {"timeout": 10000}))["status"] == "completed"

    missing_step = await error(dispatcher, "forkRun", done["id"], {"fromStep": "nope"})
    assert missing_step["name"] == "NotFoundError"
    for options in ({}, {"fromStep": "first", "labels": {}}, None):
        assert (await error(dispatcher, "forkRun", done["id"], options))["name"] == "ValidationError"
    assert (await error(dispatcher, "forkRun", done["id"]))["name"] == "ValidationError"


# -- the names Python and JS share -------------------------------------------------------------


def _js_string_list(source: str, name: str) -> list[str]:
    match = re.search(rf"const {name} = (?:new Set\()?\[(.*?)\]", source, re.S)
    assert match, f"{name} not found"
    return re.findall(r'"([^"]+)"', match.group(1))


def _ts_union(source: str, name: str) -> set[str]:
    match = re.search(rf"export type {name} =(.*?);", source, re.S)
    assert match, f"type {name} not found in durably.d.ts"
    return set(re.findall(r'"([^"]+)"', match.group(1)))


def test_durably_js_methods_are_the_dispatchers_and_the_runtimes() -> None:
    methods = _js_string_list((STATIC / "durably.js").read_text(), "METHODS")
    assert len(methods) == len(set(methods))
    assert set(methods) == set(METHODS) | set(BrowserRuntime.LOCAL_METHODS)


def test_durably_js_and_d_ts_share_the_event_and_status_names_and_the_version() -> None:
    js = (STATIC / "durably.js").read_text()
    dts = (STATIC / "durably.d.ts").read_text()
    version = re.search(r'const VERSION = "([^"]+)"', js)
    assert version and version.group(1) == durably_web.__version__
    assert set(_js_string_list(js, "TERMINAL")) == TERMINAL_EVENT_TYPES
    assert _ts_union(dts, "EventType") == EVENT_TYPES
    assert _ts_union(dts, "RunStatus") == RUN_STATUSES
    declared = re.search(r"interface DurablyClient \{(.*?)\n\}", dts, re.S)
    assert declared
    for method in METHODS:
        assert re.search(rf"\n  {method}\(", declared.group(1)), f"DurablyClient lacks {method}()"



@define_job("rpc-deadline", version="3")
async def rpc_deadline(step: StepContext, payload: Any) -> Any:
    return await step.run("one", lambda: "done")


async def test_trigger_timeout_run_timeout_and_get_runs_version_with_js_names(make_durably: Any) -> None:
    from datetime import datetime, timedelta

    dispatcher = Dispatcher(await make_durably(rpc_deadline))
    run = await call(dispatcher, "trigger", "rpc-deadline", None, {"timeout": 90_000})
    assert run["version"] == "3"
    created, deadline = datetime.fromisoformat(run["created_at"]), datetime.fromisoformat(run["deadline_at"])
    assert deadline - created == timedelta(seconds=90)
    done = await call(
        dispatcher, "triggerAndWait", "rpc-deadline", None, {"timeout": 30_000, "runTimeout": 60_000}
    )
    assert done["status"] == "completed"
    assert datetime.fromisoformat(done["deadline_at"]) - datetime.fromisoformat(
        done["created_at"]
    ) == timedelta(seconds=60)
    assert (await error(dispatcher, "trigger", "rpc-deadline", None, {"timeout": 0}))[
        "name"
    ] == "ValidationError"
    listed = await call(dispatcher, "getRuns", {"version": "3"})
    assert {r["id"] for r in listed} == {run["id"], done["id"]}
    assert await call(dispatcher, "getRuns", {"version": ["4"]}) == []
