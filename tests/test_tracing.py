"""Tracing (the otel extra): spans per run execution and step attempt, in the trigger's trace,
checked with the real OpenTelemetry SDK and its in-memory exporter."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from durably_web import RetryPolicy, StepContext, define_job

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
