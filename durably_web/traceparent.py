"""W3C trace context carried in from outside a span: the ``traceparent`` of an HTTP trigger.

No OpenTelemetry import here: the HTTP app uses this whether or not tracing is on, and
only ``durably_web/tracing.py`` (the ``otel`` extra) reads what it sets.

A request without OpenTelemetry's ASGI instrumentation has no current span, so the run it
triggers would start a trace of its own. The trigger routes therefore put the request's
``traceparent`` header (validated by :func:`parse_traceparent`) into
:data:`REQUEST_TRACE_PARENT` for the duration of the trigger; with tracing on, a trigger
that finds no current span stores that one as the run's trace parent.
"""

from __future__ import annotations

import re
from contextvars import ContextVar

#: The validated ``traceparent`` of the HTTP request being served, while it triggers runs.
REQUEST_TRACE_PARENT: ContextVar[str | None] = ContextVar("durably_request_trace_parent", default=None)

# Version 00 exactly as the W3C Trace Context recommendation writes it: lowercase hex, one
# dash between the fields, nothing before or after (a later version's layout is not ours
# to guess, so it is ignored rather than stored).
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")


def parse_traceparent(value: str | None) -> str | None:
    """``value`` if it is a valid version-00 ``traceparent`` (trace and parent ids not all
    zeros), else ``None``: a malformed header is ignored, never stored or answered with an
    error (the caller's tracing is not the caller's request)."""
    if value is None or len(value) != 55:
        return None
    found = _TRACEPARENT.fullmatch(value)
    if found is None or set(found.group(1)) == {"0"} or set(found.group(2)) == {"0"}:
        return None
    return value
