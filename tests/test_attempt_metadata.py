"""step.attempt.set_metadata: JSON attached to a step attempt, kept with it everywhere."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
from typing import Any

import pytest

from durably_web import (
    AttemptNumber,
    RetryPolicy,
    StepContext,
    StepError,
    ValidationError,
    define_job,
)
from durably_web.step import MAX_ATTEMPT_METADATA_BYTES

pytestmark = pytest.mark.all_backends


def metadata_by_attempt(attempts: list[Any]) -> list[tuple[str, int, str, Any]]:
    return [(a.name, a.attempt, a.status, a.metadata) for a in attempts]


async def test_step_attempt_is_still_the_runs_attempt_number(make_durably):
    seen: list[Any] = []

    @define_job("attempt-int")
    async def job(step: StepContext, payload: Any) -> Any:
        seen.append(step.attempt)
        # A step may return it, alone or inside its result, untyped: it is stored as its int.
        stored = await step.run("attempt", lambda: step.attempt)
        nested = await step.run("nested", lambda: {"attempts": [step.attempt]})
        return {"next": step.attempt + 1, "stored": stored, "nested": nested}

    durably = await make_durably(job)
    done = await durably.trigger_and_wait(job, None, timeout=30)
    assert done.status == "completed", done.error
    assert done.output == {"next": 2, "stored": 1, "nested": {"attempts": [1]}}
    assert [s.output for s in await durably.get_steps(done.id)] == [1, {"attempts": [1]}]
    attempt = seen[0]
    assert isinstance(attempt, int) and isinstance(attempt, AttemptNumber)
    assert attempt == 1 and attempt * 3 == 3 and f"{attempt}" == "1" and json.dumps(attempt) == "1"
    assert {attempt: "x"}[1] == "x"


async def test_metadata_is_kept_with_the_attempt_and_each_call_adds_keys(make_durably):
    async def call_model(step: StepContext) -> str:
        step.attempt.set_metadata({"model": "m1"})
        step.attempt.set_metadata({"tokens": {"in": 12, "out": 800}, "model": "m1-large"})
        return "answer"

    @define_job("llm")
    async def job(step: StepContext, payload: Any) -> str:
        await step.run("plain", lambda: 1)
        return await step.run("llm", call_model, step)

    durably = await make_durably(job)
    done = await durably.trigger_and_wait(job, None, timeout=30)
    assert done.status == "completed", done.error
    assert metadata_by_attempt(await durably.get_step_attempts(done.id)) == [
        ("plain", 1, "completed", None),
        ("llm", 1, "completed", {"model": "m1-large", "tokens": {"in": 12, "out": 800}}),
    ]


async def test_every_retried_and_the_final_failed_attempt_keep_their_own_metadata(make_durably):
    tries = {"n": 0}

    def flaky(step: StepContext) -> None:
        tries["n"] += 1
        step.attempt.set_metadata({"try": tries["n"]})
        raise OSError(f"try {tries['n']} fails")

    @define_job("meta-retries", retry=RetryPolicy(max_attempts=2, initial_delay=0.01))
    async def job(step: StepContext, payload: Any) -> None:
        await step.run("flaky", flaky, step)

    durably = await make_durably(job)
    failed = await durably.trigger_and_wait(job, None, timeout=30)
    assert failed.status == "failed"
    assert metadata_by_attempt(await durably.get_step_attempts(failed.id)) == [
        ("flaky", 1, "failed", {"try": 1}),
        ("flaky", 2, "failed", {"try": 2}),
    ]
    await durably.resume_run(failed.id)  # the failed step's row becomes an attempt: metadata kept
    again = await durably.wait_for_run(failed.id, timeout=30)
    assert again.status == "failed"
    assert [a.metadata for a in await durably.get_step_attempts(failed.id)] == [
        {"try": 1},
        {"try": 2},
        {"try": 3},
        {"try": 4},
    ]


async def test_metadata_is_kept_when_step_outputs_are_dropped(make_durably):
    def summarize(step: StepContext) -> str:
        step.attempt.set_metadata({"model": "m1", "tokens": 812})
        return "a long summary" * 100

    @define_job("dropped")
    async def job(step: StepContext, payload: Any) -> str:
        await step.run("summarize", summarize, step)
        return "done"

    durably = await make_durably(job, preserve_steps=False)
    done = await durably.trigger_and_wait(job, None, timeout=30)
    assert done.status == "completed", done.error
    assert [s.output for s in await durably.get_steps(done.id)] == [None]  # the output was dropped
    assert [a.metadata for a in await durably.get_step_attempts(done.id)] == [{"model": "m1", "tokens": 812}]


async def test_concurrent_branches_and_sync_threads_each_set_their_own_attempts_metadata(make_durably):
    both = threading.Barrier(2, timeout=10)  # sync branches in threads under CPython, in turn in Pyodide
    a_set = asyncio.Event()

    async def async_branch(step: StepContext, name: str) -> str:
        step.attempt.set_metadata({"branch": name})
        a_set.set()
        return name

    async def async_other(step: StepContext) -> str:
        await asyncio.wait_for(a_set.wait(), 10)  # the other branch has set its own meanwhile
        step.attempt.set_metadata({"other": True})
        return "other"

    def sync_branch(step: StepContext, name: str) -> str:
        step.attempt.set_metadata({"thread": name})
        if threading.current_thread() is not threading.main_thread():
            both.wait()
        return name

    @define_job("meta-branches")
    async def job(step: StepContext, payload: Any) -> Any:
        return await step.all(
            {
                "a": (async_branch, step, "a"),
                "b": (async_other, step),
                "s1": (sync_branch, step, "s1"),
                "s2": (sync_branch, step, "s2"),
            }
        )

    durably = await make_durably(job)
    done = await durably.trigger_and_wait(job, None, timeout=30)
    assert done.status == "completed", done.error
    assert {a.name: a.metadata for a in await durably.get_step_attempts(done.id)} == {
        "a": {"branch": "a"},
        "b": {"other": True},
        "s1": {"thread": "s1"},
        "s2": {"thread": "s2"},
    }


async def test_set_metadata_outside_a_step_is_a_step_error(make_durably):
    errors: list[BaseException] = []

    @define_job("outside")
    async def job(step: StepContext, payload: Any) -> None:
        for call in (lambda: step.attempt.set_metadata({"a": 1}),):
            try:
                call()
            except StepError as exc:
                errors.append(exc)
        await step.run("after", lambda: 1)
        try:
            step.attempt.set_metadata({"a": 1})  # after the step: outside again
        except StepError as exc:
            errors.append(exc)

    durably = await make_durably(job)
    done = await durably.trigger_and_wait(job, None, timeout=30)
    assert done.status == "completed"
    assert len(errors) == 2 and all("outside a step" in str(e) for e in errors)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        (["not", "an", "object"], "JSON object"),
        ({1: "int key"}, "JSON object"),
        ({"when": object()}, "not JSON"),
        ({"x": float("nan")}, "not JSON"),
        ({"big": "x" * MAX_ATTEMPT_METADATA_BYTES}, "bytes as JSON"),
    ],
)
async def test_bad_metadata_is_a_validation_error_and_changes_nothing(make_durably, metadata, message):
    errors: list[BaseException] = []

    def noted(step: StepContext) -> int:
        step.attempt.set_metadata({"kept": True})
        try:
            step.attempt.set_metadata(metadata)
        except ValidationError as exc:
            errors.append(exc)
        return 1

    @define_job("bad-metadata")
    async def job(step: StepContext, payload: Any) -> int:
        return await step.run("noted", noted, step)

    durably = await make_durably(job)
    done = await durably.trigger_and_wait(job, None, timeout=30)
    assert done.status == "completed"
    assert len(errors) == 1 and message in str(errors[0])
    assert [a.metadata for a in await durably.get_step_attempts(done.id)] == [{"kept": True}]


# --- the surfaces: HTTP, the JS client's RPC, the CLI --------------------------------------------------


async def test_metadata_over_http_rpc_and_the_cli(make_durably, db_url):
    from asgi_helpers import api_client

    from durably_web.asgi import create_app
    from durably_web.cli import build_parser, run_command
    from durably_web.rpc import Dispatcher

    def llm(step: StepContext) -> str:
        step.attempt.set_metadata({"model": "m1", "tokens": 812})
        return "ok"

    @define_job("surfaces")
    async def job(step: StepContext, payload: Any) -> str:
        return await step.run("llm", llm, step)

    durably = await make_durably(job)
    done = await durably.trigger_and_wait(job, None, timeout=30)
    async with api_client(create_app(durably)) as client:
        response = await client.get(f"/runs/{done.id}/attempts")
    assert response.status_code == 200
    assert [a["metadata"] for a in response.json()["attempts"]] == [{"model": "m1", "tokens": 812}]

    reply = await Dispatcher(durably).call("getStepAttempts", [done.id])  # what the JS client gets
    assert reply["ok"] and [a["metadata"] for a in reply["value"]] == [{"model": "m1", "tokens": 812}]

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert await run_command(build_parser().parse_args(["show", db_url, done.id])) == 0
    assert "\nattempt metadata (1):\nattempt 1 of step 'llm': " in out.getvalue()
    assert '"tokens": 812' in out.getvalue() or '"tokens":812' in out.getvalue()
