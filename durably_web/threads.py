"""Running sync step callables off the event loop, cheaply (CPython only).

``loop.run_in_executor`` costs ~75 µs per call here (a concurrent.futures
Future chained to an asyncio one, plus the executor's bookkeeping) against a
~25 µs SQLite commit. This pool hands work over a ``SimpleQueue`` and answers
straight into the loop's own future: ~25 µs. Threads start lazily, only when
none is idle, up to ``max_threads``. Never used in Pyodide (no threads there).

Even that hand-off is two thread wake-ups, and on a busy machine each waits for a
core: 100-200 µs per step where the step itself takes a microsecond. So a callable
seen to be short runs on the loop's own thread instead: a Python function whose last
``INLINE_AFTER`` calls in a thread each returned within ``INLINE_UNDER``. One call
there that takes longer sends that function back to the threads for good, so a
function that blocks holds the loop up at most once (and only if it had been quick
three times in a row before). Functions are told apart by their code object, so a
``lambda`` written once in a loop is one function however many steps call it;
anything without Python code (a builtin such as ``time.sleep``, a callable object)
always runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import queue
import threading
import time
from collections.abc import Callable
from types import CodeType
from typing import Any

_STOP = object()

#: A call that returns within this many seconds counts as short (1 ms: longer than a
#: no-op's hand-off, shorter than anything the loop would notice).
INLINE_UNDER = 0.001
#: Short calls in a row, in a thread, before a function runs on the loop's thread.
INLINE_AFTER = 3
#: The mark of a function that was slow on the loop's thread: threads only, from then on.
_THREADS_ONLY = -1


class SyncStepThreads:
    def __init__(
        self, loop: asyncio.AbstractEventLoop, max_threads: int = 32, *, inline_short_calls: bool = True
    ) -> None:
        self._loop = loop
        self._inline_short_calls = inline_short_calls
        # Per function (code object): its short calls in a row so far, or _THREADS_ONLY.
        # Read and written on the loop's thread only.
        self._short_calls: dict[CodeType, int] = {}
        self._max_threads = max_threads
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()
        self._exited: asyncio.Event | None = None
        self._running = 0  # threads started and not yet exited

    def run(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        on_done: Callable[[], None] | None = None,
    ) -> asyncio.Future[Any]:
        """Call ``fn`` in a pool thread (with the caller's context variables); await the result.

        ``on_done`` is called on the loop when the thread has finished, even if the
        awaiting task was cancelled meanwhile (the thread itself cannot be stopped).
        A function known to be short is called on the loop's thread instead, before this
        returns (see the module's docstring); ``on_done`` is then called at once.
        """
        code = _code_of(fn) if self._inline_short_calls else None
        if code is not None and self._short_calls.get(code, 0) >= INLINE_AFTER:
            return self._run_inline(code, fn, args, kwargs, on_done)
        future = self._loop.create_future()
        observe = self._observer(code, on_done)
        self._queue.put((future, contextvars.copy_context(), fn, args, kwargs, observe))
        with self._lock:
            # Reserve an idle thread for this call, or start one: a burst of calls
            # never queues behind a long-running step while the pool may grow.
            must_grow = self._idle == 0 and len(self._threads) < self._max_threads
            if not must_grow and self._idle > 0:
                self._idle -= 1
        if must_grow:
            thread = threading.Thread(target=self._work, name="durably-sync-step", daemon=True)
            self._threads.append(thread)
            with self._lock:
                self._running += 1
            thread.start()
        return future

    def _work(self) -> None:
        loop = self._loop
        while True:
            item = self._queue.get()
            if item is _STOP:
                self._thread_exited()
                return
            future, context, fn, args, kwargs, on_done = item
            error: BaseException | None = None
            result: Any = None
            started = time.perf_counter()
            try:
                result = context.run(fn, *args, **kwargs)
            except BaseException as exc:
                error = exc
            took = time.perf_counter() - started
            # Idle again before waking the loop, so that right after the wake-up this
            # thread blocks in get() and leaves the GIL to the loop's thread at once.
            with self._lock:
                self._idle += 1
            _post(loop, future, result, error, on_done, took)

    def _observer(
        self, code: CodeType | None, on_done: Callable[[], None] | None
    ) -> Callable[[float], None]:
        """What runs on the loop once a thread has called the function: count the call
        towards (or against) running it inline, then ``on_done``."""

        def observe(took: float) -> None:
            if code is not None:
                streak = self._short_calls.get(code, 0)
                if streak != _THREADS_ONLY:
                    self._short_calls[code] = streak + 1 if took < INLINE_UNDER else 0
            if on_done is not None:
                on_done()

        return observe

    def _run_inline(
        self,
        code: CodeType,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        on_done: Callable[[], None] | None,
    ) -> asyncio.Future[Any]:
        future = self._loop.create_future()
        started = time.perf_counter()
        try:
            # A copy of the context, as in a thread: the function's own changes stay its own.
            future.set_result(contextvars.copy_context().run(fn, *args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        if time.perf_counter() - started >= INLINE_UNDER:
            self._short_calls[code] = _THREADS_ONLY
        if on_done is not None:
            on_done()
        return future

    def runs_inline(self, fn: Callable[..., Any]) -> bool:
        """Whether the next call of ``fn`` runs on the loop's thread (for tests and tools)."""
        code = _code_of(fn) if self._inline_short_calls else None
        return code is not None and self._short_calls.get(code, 0) >= INLINE_AFTER

    def _thread_exited(self) -> None:
        with self._lock:
            self._running -= 1
            last = self._running == 0
        exited = self._exited
        if last and exited is not None:
            try:
                self._loop.call_soon_threadsafe(exited.set)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    async def shutdown(self, timeout: float | None = None) -> bool:
        """Stop every thread and wait (up to ``timeout``) until they have exited.

        Idle threads exit at once; a thread still inside a step exits after it (a
        thread cannot be interrupted). Returns False if one is still running then.
        """
        self._exited = asyncio.Event()
        threads, self._threads = self._threads, []
        for _ in threads:
            self._queue.put(_STOP)
        with self._lock:
            if self._running == 0:
                self._exited.set()
        try:
            async with asyncio.timeout(timeout):
                await self._exited.wait()
        except TimeoutError:
            self._threads = [thread for thread in threads if thread.is_alive()]
            return False
        for thread in threads:
            thread.join()  # already past its last statement: returns at once
        return True


def _code_of(fn: Callable[..., Any]) -> CodeType | None:
    """The Python code ``fn`` runs (through partials and bound methods), or None."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    return code if isinstance(code, CodeType) else None


def _post(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    result: Any,
    exc: BaseException | None,
    on_done: Callable[[float], None],
    took: float,
) -> None:
    def settle() -> None:
        on_done(took)
        if future.done():  # cancelled while the thread ran: the result is dropped
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass
