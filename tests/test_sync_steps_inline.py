"""Short sync step functions run on the event loop's thread (CPython; durably_web/threads.py).

A sync step callable is handed to a thread so that a blocking one cannot hold up the loop
(lease renewal, cancels, other runs). A Python function seen to return quickly
``INLINE_AFTER`` times in a row skips the hand-off; one slow call on the loop's thread
sends it back to the threads for good. ``INLINE_UNDER`` is raised to 0.25 s here so that a
scheduler hiccup on a busy machine cannot make a no-op look slow.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from typing import Any

import pytest
from helpers import wait_event

import durably_web.threads as threads_module
from durably_web import StepContext, define_job
from durably_web.threads import INLINE_AFTER, SyncStepThreads


@pytest.fixture(autouse=True)
def generous_short_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads_module, "INLINE_UNDER", 0.25)


def on_loop_thread(idents: list[int]) -> list[bool]:
    main = threading.main_thread().ident
    return [ident == main for ident in idents]


async def test_a_short_function_runs_on_the_loop_thread_after_its_first_short_calls(make_durably):
    idents: list[int] = []

    def quick(i: int) -> int:
        idents.append(threading.get_ident())
        return i * 2

    @define_job("quick-steps")
    async def job(step: StepContext, payload: Any) -> list[int]:
        return [await step.run(f"s{i}", quick, i) for i in range(INLINE_AFTER + 4)]

    durably = await make_durably(job)
    done = await durably.trigger_and_wait(job, None, timeout=30)
    assert done.status == "completed", done.error
    assert done.output == [i * 2 for i in range(INLINE_AFTER + 4)]
    assert on_loop_thread(idents) == [False] * INLINE_AFTER + [True] * 4
    # A lambda written once is one function, however many steps call it.
    lambdas: list[int] = []

    @define_job("lambda-steps")
    async def with_lambdas(step: StepContext, payload: Any) -> None:
        for i in range(INLINE_AFTER + 2):
            await step.run(f"l{i}", lambda: lambdas.append(threading.get_ident()))

    durably.register(with_lambdas)
    assert (await durably.trigger_and_wait(with_lambdas, None, timeout=30)).status == "completed"
    assert on_loop_thread(lambdas) == [False] * INLINE_AFTER + [True] * 2


async def test_a_function_slow_on_the_loop_thread_goes_back_to_threads_for_good(make_durably):
    idents: list[int] = []
    slow_on = {INLINE_AFTER}  # the first call that runs inline blocks

    def sometimes_slow(i: int) -> int:
        idents.append(threading.get_ident())
        if i in slow_on:
            time.sleep(0.4)
        return i

    @define_job("sometimes-slow")
    async def job(step: StepContext, payload: Any) -> list[int]:
        return [await step.run(f"s{i}", sometimes_slow, i) for i in range(INLINE_AFTER + 5)]

    durably = await make_durably(job)
    done = await durably.trigger_and_wait(job, None, timeout=30)
    assert done.status == "completed", done.error
    assert done.output == list(range(INLINE_AFTER + 5))
    # Quick three times, then inline once (slow), then in threads however quick it is again.
    assert on_loop_thread(idents) == [False] * INLINE_AFTER + [True] + [False] * 4


async def test_a_slow_function_never_runs_inline_and_other_runs_keep_going(make_durably):
    release = threading.Event()
    blocking_calls: list[int] = []

    def blocks_on_its_fourth_call(i: int) -> int:
        blocking_calls.append(threading.get_ident())
        if i == 0:
            time.sleep(0.3)  # slow from the start: never counted as short
        if i == INLINE_AFTER:
            assert release.wait(30)
        return i

    @define_job("blocker")
    async def blocker(step: StepContext, payload: Any) -> None:
        for i in range(INLINE_AFTER + 1):
            await step.run(f"s{i}", blocks_on_its_fourth_call, i)

    @define_job("bystander")
    async def bystander(step: StepContext, payload: Any) -> str:
        await step.run("one", lambda: None)
        return "went on"

    durably = await make_durably(blocker, bystander, max_concurrent_runs=2)
    blocked = await durably.trigger(blocker, None)
    started = asyncio.Event()
    durably.on("step:start", lambda e: started.set() if e.data.get("step_index") == INLINE_AFTER else None)
    await wait_event(started)
    # The fourth call blocks in a thread: the loop is free, so another run completes meanwhile.
    other = await durably.trigger_and_wait(bystander, None, timeout=30)
    assert other.output == "went on"
    release.set()
    assert (await durably.wait_for_run(blocked.id, timeout=30)).status == "completed"
    assert not any(on_loop_thread(blocking_calls))


async def test_inline_short_sync_steps_false_keeps_every_call_in_a_thread(make_durably):
    idents: list[int] = []

    @define_job("always-threads")
    async def job(step: StepContext, payload: Any) -> None:
        for i in range(INLINE_AFTER + 3):
            await step.run(f"s{i}", lambda: idents.append(threading.get_ident()))

    durably = await make_durably(job, inline_short_sync_steps=False)
    assert (await durably.trigger_and_wait(job, None, timeout=30)).status == "completed"
    assert not any(on_loop_thread(idents))


async def test_an_error_raised_inline_fails_the_step_like_one_raised_in_a_thread(make_durably):
    def fails_on_the_last_call(i: int) -> int:
        if i == INLINE_AFTER + 1:
            raise ValueError(f"call {i} failed on thread {threading.current_thread().name}")
        return i

    @define_job("fails-inline")
    async def job(step: StepContext, payload: Any) -> None:
        for i in range(INLINE_AFTER + 2):
            await step.run(f"s{i}", fails_on_the_last_call, i)

    durably = await make_durably(job)
    done = await durably.trigger_and_wait(job, None, timeout=30)
    assert done.status == "failed"
    assert done.error.type == "ValueError"
    assert done.error.message == f"call {INLINE_AFTER + 1} failed on thread MainThread"
    steps = await durably.get_steps(done.id)
    assert [s.status for s in steps] == ["completed"] * (INLINE_AFTER + 1) + ["failed"]


async def test_only_python_functions_are_inlined_and_context_changes_stay_in_the_call() -> None:
    import contextvars

    seen: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="outer")

    def sets_the_variable() -> str:
        before = seen.get()
        seen.set("inner")
        return before

    class CallableObject:
        def __call__(self) -> None:
            return None

    pool = SyncStepThreads(asyncio.get_running_loop())
    try:
        builtin = functools.partial(time.sleep, 0)
        for _ in range(INLINE_AFTER + 1):
            await pool.run(builtin, (), {})
            await pool.run(CallableObject(), (), {})
            assert await pool.run(sets_the_variable, (), {}) == "outer"
        assert not pool.runs_inline(builtin)
        assert not pool.runs_inline(CallableObject())
        assert pool.runs_inline(sets_the_variable)
        assert pool.runs_inline(functools.partial(sets_the_variable))  # the same code
        # Inline, the function's own context changes do not leak into the caller's.
        assert await pool.run(sets_the_variable, (), {}) == "outer"
        assert seen.get() == "outer"
    finally:
        assert await pool.shutdown(timeout=5)
