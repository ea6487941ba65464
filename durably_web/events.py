"""In-process event delivery: listeners by type, and per-run subscriptions."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pydantic_core

from .errors import SubscriptionOverflowError, ValidationError
from .models import ErrorInfo, Event

logger = logging.getLogger("durably_web")

EVENT_TYPES: frozenset[str] = frozenset(
    {
        "run:trigger",
        "run:coalesced",
        "run:leased",
        "run:complete",
        "run:fail",
        "run:cancel",
        "run:delete",
        "run:progress",
        "run:waiting",
        "run:resume",
        "step:start",
        "step:complete",
        "step:fail",
        "step:retry",
        "signal:received",
        "log:write",
        "worker:error",
    }
)
TERMINAL_EVENT_TYPES: frozenset[str] = frozenset({"run:complete", "run:fail", "run:cancel", "run:delete"})
ALL = "*"

Listener = Callable[[Event], Any]


class EventBus:
    """Calls listeners synchronously, in registration order.

    A listener that raises (or an async listener whose task fails) is logged and
    reported as a ``worker:error`` event; it never breaks the emitter.
    """

    def __init__(self) -> None:
        self._listeners: dict[str, list[Listener]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def on(self, event_type: str, listener: Listener) -> Callable[[], None]:
        if not isinstance(event_type, str) or (event_type != ALL and event_type not in EVENT_TYPES):
            raise ValidationError(
                f"unknown event type {event_type!r}; expected one of {sorted(EVENT_TYPES)} or '*'"
            )
        if not callable(listener):
            raise ValidationError("listener must be callable")
        listeners = self._listeners.setdefault(event_type, [])
        listeners.append(listener)

        def unsubscribe() -> None:
            if listener in listeners:
                listeners.remove(listener)

        return unsubscribe

    def wants(self, event_type: str) -> bool:
        return bool(self._listeners.get(event_type) or self._listeners.get(ALL))

    def emit(self, event: Event) -> None:
        for listener in (*self._listeners.get(event.type, ()), *self._listeners.get(ALL, ())):
            try:
                result = listener(event)
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(result)
                    self._tasks.add(task)
                    task.add_done_callback(self._async_listener_done)
            except Exception as exc:
                self._listener_failed(event, exc)

    async def drain(self, timeout: float) -> None:
        """Wait (up to ``timeout``) for the tasks of async listeners, then cancel the rest.

        Called when ``Durably`` stops, so that no listener task outlives it.
        """
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    def _async_listener_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._listener_failed(None, task.exception())  # type: ignore[arg-type]

    def _listener_failed(self, event: Event | None, exc: BaseException) -> None:
        logger.exception("durably-web event listener failed", exc_info=exc)
        if event is not None and event.type == "worker:error":
            return  # never recurse
        now = event.timestamp if event is not None else datetime.now(UTC)
        self.emit(
            Event(
                "worker:error",
                event.run_id if event else None,
                event.job_name if event else None,
                now,
                {"error": ErrorInfo.from_exception(exc), "source": "listener"},
            )
        )


def _json_size(event: Event) -> int:
    """About how many bytes ``event`` takes as JSON (what a stream would send)."""
    return len(pydantic_core.to_json(event.data, inf_nan_mode="null", serialize_unknown=True)) + 128


class EventBuffer:
    """Events waiting for one consumer; with a ``limit``, a consumer that falls behind cannot
    make it grow without bound.

    ``run:progress`` is state, not history: once the buffer is full, a progress event
    replaces the run's progress event at the end of the buffer (the newest wins, order
    is kept). ``limit`` counts events; ``max_bytes`` bounds the JSON size of what is
    held (events can carry megabytes: log data, step outputs), except that an empty
    buffer always takes one event, so a consumer that keeps up never overflows on a
    single large one. Any other event that does not fit *overflows* the buffer: it is
    emptied at once (freeing what it held), takes nothing more, and ``get`` raises
    ``SubscriptionOverflowError``; the consumer must start over from the current state
    (the HTTP streams then send ``stream:reset`` and end, and clients reconnect).
    Without bounds (``None``) it is unbounded, as in-process consumers expect.
    """

    def __init__(self, limit: int | None = None, *, max_bytes: int | None = None) -> None:
        for name, value in (("limit", limit), ("max_bytes", max_bytes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValidationError(f"{name} must be None or a positive int, not {value!r}")
        self.limit = limit
        self.max_bytes = max_bytes
        self.overflowed = False
        self._events: deque[Event] = deque()
        self._sizes: deque[int] = deque()  # each held event's JSON size, when max_bytes is set
        self._bytes = 0
        self.peak_bytes = 0  # the most ever held at once (for diagnostics and tests)
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._events)

    def put(self, event: Event) -> None:
        if self.overflowed:
            return
        events = self._events
        size = _json_size(event) if self.max_bytes is not None else 0
        full = bool(events) and (
            (self.limit is not None and len(events) >= self.limit)
            or (self.max_bytes is not None and self._bytes + size > self.max_bytes)
        )
        if full:
            last = events[-1]
            if event.type == "run:progress" and last.type == "run:progress" and last.run_id == event.run_id:
                events[-1] = event
                if self.max_bytes is not None:
                    self._bytes += size - self._sizes[-1]
                    self._sizes[-1] = size
                    if self._bytes > self.max_bytes and len(events) > 1:
                        self.overflow()
                return
            self.overflow()
            return
        events.append(event)
        if self.max_bytes is not None:
            self._sizes.append(size)
            self._bytes += size
            self.peak_bytes = max(self.peak_bytes, self._bytes)
        self._ready.set()

    @property
    def buffered_bytes(self) -> int:
        """The JSON size of the events held (counted only when ``max_bytes`` is set)."""
        return self._bytes

    def overflow(self) -> None:
        """Give up on this consumer: drop what is buffered; ``get`` raises from now on."""
        self.overflowed = True
        self._events.clear()
        self._sizes.clear()
        self._bytes = 0
        self._ready.set()

    async def get(self, timeout: float | None = None) -> Event | None:
        """The oldest event; ``None`` after ``timeout`` seconds without one."""
        while not self._events:
            if self.overflowed:
                raise SubscriptionOverflowError(
                    f"the consumer fell more than {self.limit} events behind; "
                    "start over from the current state"
                )
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except TimeoutError:
                if not self._events and not self.overflowed:
                    return None
        if self._sizes:
            self._bytes -= self._sizes.popleft()
        return self._events.popleft()


class RunSubscription:
    """Async iterator over one run's events; ends after the run's terminal event.

    Registered on creation, so no event is missed between trigger and iteration.
    Runs executed by another process are noticed by polling the store, in which
    case a terminal event is synthesised from the stored state. With
    ``max_buffered``, events are held in a bounded ``EventBuffer``: a consumer that
    falls further behind gets ``SubscriptionOverflowError`` (and the subscription
    stops listening) instead of a buffer that grows with every event.
    """

    def __init__(
        self,
        bus: EventBus,
        run_id: str,
        poll: Callable[[bool], Awaitable[Event | None]],
        poll_interval: float,
        *,
        max_buffered: int | None = None,
        max_buffered_bytes: int | None = None,
    ) -> None:
        self._run_id = run_id
        self._buffer = EventBuffer(max_buffered, max_bytes=max_buffered_bytes)
        self._poll = poll
        self._poll_interval = poll_interval
        self._done = False
        self._looked_up = False
        self._unsubscribe = bus.on(ALL, self._offer)

    @property
    def backlog(self) -> int:
        """How many events wait to be taken."""
        return len(self._buffer)

    def _offer(self, event: Event) -> None:
        if event.run_id == self._run_id:
            self._buffer.put(event)
            if self._buffer.overflowed:
                self._unsubscribe()

    def __aiter__(self) -> RunSubscription:
        return self

    async def __anext__(self) -> Event:
        if self._done:
            raise StopAsyncIteration
        if not self._looked_up:
            # The first step looks the run up (``poll(True)`` raises NotFoundError for an
            # unknown one) unless its events already arrived; a run that had already
            # finished yields its terminal event.
            self._looked_up = True
            if not len(self._buffer):
                try:
                    terminal = await self._poll(True)
                except BaseException:
                    self.close()
                    raise
                if terminal is not None:
                    self._buffer.put(terminal)
        while True:
            try:
                event = await self._buffer.get(self._poll_interval)
            except SubscriptionOverflowError:
                self.close()
                raise
            if event is None:
                synthesised = await self._poll(False)
                if synthesised is None:
                    continue
                event = synthesised
            if event.type in TERMINAL_EVENT_TYPES:
                self.close()
            return event

    def close(self) -> None:
        self._done = True
        self._unsubscribe()

    async def aclose(self) -> None:
        self.close()
