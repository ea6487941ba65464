"""Tracing (the otel extra): spans per run execution and step attempt, in the trigger's trace,
checked with the real OpenTelemetry SDK and its in-memory exporter."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from asgi_helpers import api_client
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from durably_web import RetryPolicy, StepContext, define_job
from durably_web.asgi import create_app
from durably_web.traceparent import parse_traceparent

pytestmark = pytest.mark.all_backends


@pytest.fixture
def traced() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


async def test_a_triggering_span_and_the_runs_spans_share_one_trace(make_durably, traced):
    provider, exporter = traced
    calls = {"n": 0}

    def flaky() -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("first attempt fails")
        return calls["n"]

    @define_job("traced", retry=RetryPolicy(max_attempts=3, initial_delay=0.01))
    async def job(step: StepContext, payload: Any) -> int:
        await step.run("plain", lambda: 1)
        return await step.run("flaky", flaky)

    durably = await make_durably(job, tracing=provider)
    with provider.get_tracer("web").start_as_current_span("POST /orders") as request_span:
        run = await durably.trigger(job, {"order": 7})
    done = await durably.wait_for_run(run.id, timeout=20)
    assert done.status == "completed"
    await durably.stop()

    spans = exporter.get_finished_spans()
    trace_id = request_span.get_span_context().trace_id
    assert {span.context.trace_id for span in spans} == {trace_id}
    executions = [s for s in spans if s.name == "durably.run traced"]
    # One execution until the retry's backoff made the run wait, one after it.
    assert [s.attributes["durably.outcome"] for s in executions] == ["waiting", "completed"]
    assert all(s.parent.span_id == request_span.get_span_context().span_id for s in executions)
    assert all(s.attributes["durably.run_id"] == run.id for s in executions)
    steps = [s for s in spans if s.name.startswith("durably.step")]
    summary = [
        (s.attributes["durably.step_name"], s.attributes["durably.attempt"], s.attributes["durably.outcome"])
        for s in steps
    ]
    assert summary == [("plain", 1, "completed"), ("flaky", 1, "failed"), ("flaky", 2, "completed")]
    failed = steps[1]
    assert failed.status.status_code is StatusCode.ERROR and failed.attributes["exception.type"] == "OSError"
    # Each attempt is a child of the execution it ran in.
    assert failed.parent.span_id == executions[0].context.span_id
    assert steps[2].parent.span_id == executions[1].context.span_id


async def test_a_run_triggered_outside_any_span_gets_its_own_trace_and_a_failure_is_an_error(
    make_durably, traced
):
    provider, exporter = traced

    @define_job("broken")
    async def broken(step: StepContext, payload: Any) -> None:
        await step.run("explode", lambda: 1 / 0)

    durably = await make_durably(broken, tracing=provider)
    run = await durably.trigger(broken)
    assert (await durably.get_run(run.id)).status in ("pending", "leased", "failed")
    assert (await durably.wait_for_run(run.id, timeout=20)).status == "failed"
    await durably.stop()
    spans = exporter.get_finished_spans()
    (execution,) = [s for s in spans if s.name == "durably.run broken"]
    assert execution.parent is None
    assert execution.attributes["durably.outcome"] == "failed"
    assert execution.status.status_code is StatusCode.ERROR
    (step,) = [s for s in spans if s.name == "durably.step explode"]
    assert step.attributes["durably.outcome"] == "failed"
    assert step.context.trace_id == execution.context.trace_id


async def test_the_trace_parent_is_stored_with_the_run(make_durably, traced):
    provider, _ = traced

    @define_job("stored")
    async def stored(step: StepContext, payload: Any) -> None:
        return None

    durably = await make_durably(stored, tracing=provider, worker=False)
    with provider.get_tracer("web").start_as_current_span("request") as span:
        run = await durably.trigger(stored)
    record = await durably.store.get_run(run.id)
    context = span.get_span_context()
    assert (
        record.trace_parent
        == f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
    )
    untraced = await durably.trigger(stored)  # no current span: nothing to carry
    assert (await durably.store.get_run(untraced.id)).trace_parent is None


def test_without_tracing_no_opentelemetry_module_is_imported(tmp_path):
    script = f"""
import asyncio, json, sys
from durably_web import Durably, define_job

@define_job("plain")
async def plain(step, payload):
    return await step.run("one", lambda: 1)

async def main():
    async with Durably("sqlite:///{tmp_path / "plain.db"}", jobs=[plain], polling_interval=0.02) as durably:
        run = await durably.trigger_and_wait(plain, timeout=20)
    loaded = sorted(name for name in sys.modules if name.startswith("opentelemetry"))
    print(json.dumps({{"status": run.status, "loaded": loaded}}))

asyncio.run(main())
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(out.stdout) == {"status": "completed", "loaded": []}


# --- HTTP: the request's traceparent header -------------------------------------------------------

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


async def test_an_http_trigger_takes_the_requests_traceparent_header_as_the_runs_trace_parent(
    make_durably, traced
):
    provider, exporter = traced

    @define_job("via-http")
    async def via_http(step: StepContext, payload: Any) -> int:
        return await step.run("one", lambda: 1)

    durably = await make_durably(via_http, tracing=provider)
    async with api_client(create_app(durably)) as client:
        response = await client.post(
            "/trigger", json={"job": "via-http"}, headers={"traceparent": TRACEPARENT}
        )
        assert response.status_code == 201, response.text
        run_id = response.json()["id"]
        assert (await durably.wait_for_run(run_id, timeout=20)).status == "completed"
        shown = (await client.get(f"/runs/{run_id}")).json()
    assert shown["trace_parent"] == TRACEPARENT
    assert (await durably.get_run(run_id)).trace_parent == TRACEPARENT
    await durably.stop()
    (execution,) = [s for s in exporter.get_finished_spans() if s.name == "durably.run via-http"]
    # The request and the job it started share the caller's trace, without any ASGI instrumentation.
    assert f"{execution.context.trace_id:032x}" == TRACE_ID
    assert f"{execution.parent.span_id:016x}" == PARENT_ID


async def test_a_current_span_wins_over_the_header_and_batch_and_retrigger_take_it_too(make_durably, traced):
    provider, _ = traced

    @define_job("kept")
    async def kept(step: StepContext, payload: Any) -> None:
        return None

    durably = await make_durably(kept, tracing=provider, worker=False)
    header = {"traceparent": TRACEPARENT}
    async with api_client(create_app(durably)) as client:
        items = [{"input": 1}, {"input": 2}]
        batch = await client.post("/trigger/batch", json={"job": "kept", "items": items}, headers=header)
        assert batch.status_code == 201, batch.text
        for run in batch.json()["runs"]:
            assert (await durably.get_run(run["id"])).trace_parent == TRACEPARENT
        untraced = (await client.post("/trigger", json={"job": "kept"})).json()["id"]
        again = await client.post(f"/runs/{untraced}/retrigger", headers=header)
        assert again.status_code == 201, again.text
        assert (await durably.get_run(again.json()["id"])).trace_parent == TRACEPARENT
        assert (await durably.get_run(untraced)).trace_parent is None
        # The ASGI transport runs the app in this task: a span current here is the request's
        # span (as an instrumented server's would be), and it is the parent, not the header.
        with provider.get_tracer("web").start_as_current_span("instrumented request") as span:
            inner = (await client.post("/trigger", json={"job": "kept"}, headers=header)).json()["id"]
    stored = (await durably.get_run(inner)).trace_parent
    assert stored is not None and stored.split("-")[1:3] == [
        f"{span.get_span_context().trace_id:032x}",
        f"{span.get_span_context().span_id:016x}",
    ]


@pytest.mark.parametrize(
    "header",
    [
        TRACEPARENT.upper(),  # the recommendation's hex is lowercase
        f"01-{TRACE_ID}-{PARENT_ID}-01",  # a later version: its layout is not guessed
        f"ff-{TRACE_ID}-{PARENT_ID}-01",
        f"00-{'0' * 32}-{PARENT_ID}-01",  # all-zero trace id
        f"00-{TRACE_ID}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE_ID}-{PARENT_ID}-01-extra",
        f" {TRACEPARENT}",
        f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01",
        f"00_{TRACE_ID}_{PARENT_ID}_01",
        "00-not-hex-at-all-but-fifty-five-characters-long-xxxxxxx"[:55],
        "",
        "x" * 5000,
    ],
)
async def test_a_malformed_traceparent_header_is_ignored_never_an_error_or_stored(
    make_durably, traced, header
):
    provider, _ = traced

    @define_job("strict")
    async def strict(step: StepContext, payload: Any) -> None:
        return None

    durably = await make_durably(strict, tracing=provider, worker=False)
    async with api_client(create_app(durably)) as client:
        response = await client.post("/trigger", json={"job": "strict"}, headers={"traceparent": header})
    assert response.status_code == 201, response.text
    assert (await durably.get_run(response.json()["id"])).trace_parent is None


async def test_two_traceparent_headers_are_ignored_and_without_tracing_none_is_stored(make_durably, traced):
    provider, _ = traced

    @define_job("plain-http")
    async def plain_http(step: StepContext, payload: Any) -> None:
        return None

    traced_durably = await make_durably(plain_http, tracing=provider, worker=False)
    untraced_durably = await make_durably(plain_http, worker=False)
    twice = [("traceparent", TRACEPARENT), ("traceparent", f"00-{TRACE_ID}-{'1' * 16}-01")]
    async with api_client(create_app(traced_durably)) as client:
        response = await client.post("/trigger", json={"job": "plain-http"}, headers=twice)
    assert (await traced_durably.get_run(response.json()["id"])).trace_parent is None
    async with api_client(create_app(untraced_durably)) as client:
        response = await client.post(
            "/trigger", json={"job": "plain-http"}, headers={"traceparent": TRACEPARENT}
        )
    assert response.status_code == 201
    assert (await untraced_durably.get_run(response.json()["id"])).trace_parent is None


def test_parse_traceparent_accepts_exactly_version_00() -> None:
    assert parse_traceparent(TRACEPARENT) == TRACEPARENT
    assert parse_traceparent(f"00-{TRACE_ID}-{PARENT_ID}-00") is not None  # not sampled: still a parent
    assert parse_traceparent(None) is None
    assert parse_traceparent(TRACEPARENT + "\n") is None
