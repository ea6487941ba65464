"""Running sync step callables off the event loop, cheaply (CPython only).

``loop.run_in_executor`` costs ~75 µs per call here (a concurrent.futures
Future chained to an asyncio one, plus the executor's bookkeeping) against a
~25 µs SQLite commit. This pool hands work over a ``SimpleQueue`` and answers
straight into the loop's own future: ~25 µs. Threads start lazily, only when
none is idle, up to ``max_threads``. Never used in Pyodide (no threads there).
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
from collections.abc import Callable
from typing import Any

_STOP = object()


class SyncStepThreads:
    def __init__(self, loop: asyncio.AbstractEventLoop, max_threads: int = 32) -> None:
        self._loop = loop
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
        """
        future = self._loop.create_future()
        self._queue.put((future, contextvars.copy_context(), fn, args, kwargs, on_done))
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
            try:
                result = context.run(fn, *args, **kwargs)
            except BaseException as exc:
                error = exc
            # Idle again before waking the loop, so that right after the wake-up this
            # thread blocks in get() and leaves the GIL to the loop's thread at once.
            with self._lock:
                self._idle += 1
            _post(loop, future, result, error, on_done)

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


def _post(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    result: Any,
    exc: BaseException | None,
    on_done: Callable[[], None] | None,
) -> None:
    def settle() -> None:
        if on_done is not None:
            on_done()
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
