"""OpenTelemetry spans for runs and step attempts (the ``otel`` extra), fed by the event bus.

``Durably(tracing=True)`` (the global tracer provider) or ``Durably(tracing=provider)``
imports this module; nothing else does, so without it no OpenTelemetry module is loaded.
The engine knows nothing of it: this is one more listener of the events the worker emits
anyway, plus one call at trigger time.

* **Trigger**: the W3C ``traceparent`` of the span current in the triggering task (a web
  request's, say) is stored with the run (``current_trace_parent``); with no span current,
  an HTTP trigger's ``traceparent`` header is (``durably_web/traceparent.py``).
* **Run execution**: each execution of a run (one lease, from ``run:leased`` until it
  completes, fails, waits, is cancelled or released) is a span ``durably.run <job>``,
  a child of the trigger's span, so the request and the job it started share a trace. A
  run that waits and continues later has one span per execution, all in that trace.
* **Step attempt**: each attempt of ``step.run`` is a span ``durably.step <name>``, a child
  of its execution's span, with the attempt number and its outcome.

Spans are started and ended as the events arrive (listeners are called synchronously),
so their times are the events' times. Handler code does not run inside these spans'
context: a span the handler starts itself belongs to whatever context it runs in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace import Span, SpanKind, Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError as exc:  # pragma: no cover - exercised in a subprocess without the extra
    from .errors import ValidationError

    raise ValidationError(
        "tracing needs OpenTelemetry: install the extra with pip install 'durably-web[otel]'"
    ) from exc

from .events import EventBus
from .models import Event
from .traceparent import REQUEST_TRACE_PARENT

#: Span attribute names (the ``durably.`` namespace; values as documented in README "Tracing").
RUN_ID = "durably.run_id"
JOB_NAME = "durably.job_name"
STEP_NAME = "durably.step_name"
ATTEMPT = "durably.attempt"
OUTCOME = "durably.outcome"

_PROPAGATOR = TraceContextTextMapPropagator()
#: How a run execution ends, by the event that ends it.
_RUN_OUTCOMES = {
    "run:complete": "completed",
    "run:fail": "failed",
    "run:waiting": "waiting",
    "run:cancel": "cancelled",
    "run:delete": "deleted",
}


@dataclass(slots=True)
class _Execution:
    span: Span
    steps: dict[str, Span] = field(default_factory=dict)  # step name -> its open attempt span


class RunTracer:
    """Turns the bus's run and step events into spans (one instance per ``Durably``)."""

    def __init__(self, bus: EventBus, tracer_provider: Any = None) -> None:
        self._tracer = trace.get_tracer("durably_web", tracer_provider=tracer_provider)
        self._open: dict[str, _Execution] = {}
        for event_type in ("run:leased", "step:start", "step:complete", "step:fail", *_RUN_OUTCOMES):
            bus.on(event_type, self._on_event)

    def current_trace_parent(self) -> str | None:
        """The W3C ``traceparent`` of the span current here; outside any span, the HTTP
        request's validated ``traceparent`` header (``REQUEST_TRACE_PARENT``), else ``None``."""
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        return carrier.get("traceparent") or REQUEST_TRACE_PARENT.get()

    def end_open_spans(self) -> None:
        """End the spans of executions this process stopped without an event (a release at
        shutdown, a lost lease): outcome "released"."""
        for run_id in list(self._open):
            self._end_run(run_id, "released")

    # --- events ----------------------------------------------------------------------
    def _on_event(self, event: Event) -> None:
        run_id = event.run_id
        if run_id is None:
            return
        if event.type == "run:leased":
            self._start_run(event, run_id)
            return
        execution = self._open.get(run_id)
        if event.type in _RUN_OUTCOMES:
            if execution is not None:
                self._end_run(run_id, _RUN_OUTCOMES[event.type], event.data.get("error"))
            return
        if execution is None:
            return
        name = event.data.get("step_name")
        if not isinstance(name, str):
            return
        if event.type == "step:start":
            parent = trace.set_span_in_context(execution.span)
            attempt = int(event.data.get("attempt") or 1)
            execution.steps[name] = self._tracer.start_span(
                f"durably.step {name}",
                context=parent,
                attributes={
                    RUN_ID: run_id,
                    JOB_NAME: event.job_name or "",
                    STEP_NAME: name,
                    ATTEMPT: attempt,
                },
            )
            return
        step = execution.steps.pop(name, None)
        if step is None:
            return  # a replayed step, or a failure outside any attempt (no span was started)
        if event.type == "step:complete":
            step.set_attribute(OUTCOME, "completed")
        else:
            _fail(step, event.data.get("error"))
        step.end()

    def _start_run(self, event: Event, run_id: str) -> None:
        if run_id in self._open:  # this worker lost the lease and claimed the run again
            self._end_run(run_id, "lease-lost")
        parent = None
        trace_parent = event.data.get("trace_parent")
        if isinstance(trace_parent, str):
            parent = _PROPAGATOR.extract({"traceparent": trace_parent}, context=otel_context.Context())
        span = self._tracer.start_span(
            f"durably.run {event.job_name}",
            context=parent if parent is not None else otel_context.Context(),
            kind=SpanKind.CONSUMER,
            attributes={
                RUN_ID: run_id,
                JOB_NAME: event.job_name or "",
                ATTEMPT: int(event.data.get("attempt") or 1),
            },
        )
        self._open[run_id] = _Execution(span)

    def _end_run(self, run_id: str, outcome: str, error: Any = None) -> None:
        execution = self._open.pop(run_id)
        for step in execution.steps.values():  # attempts cut short (a cancel, a shutdown)
            step.set_attribute(OUTCOME, outcome)
            step.end()
        execution.span.set_attribute(OUTCOME, outcome)
        if outcome == "failed":
            _fail(execution.span, error)
        execution.span.end()


def _fail(span: Span, error: Any) -> None:
    span.set_attribute(OUTCOME, "failed")
    message = getattr(error, "message", None)
    kind = getattr(error, "type", None)
    if kind:
        span.set_attribute("exception.type", str(kind))
    span.set_status(Status(StatusCode.ERROR, str(message) if message else None))
