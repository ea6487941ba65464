"""Jobs for tests/browser/test_waiting.py: durable sleeps, signals and retries in the browser.

Loaded after runtime_jobs.py (the page passes ``jobs=runtime_jobs.py,waiting_jobs.py``):
its recorder is reused, so every step execution leaves the same IndexedDB records
("B" when it begins, "E" just before it returns, each with the page load that
executed it; see tests/browser/executions.py), which outlive reloads. The job modules
are imported in the order the page lists them, each registered in ``sys.modules``
under its file name first, so ``import runtime_jobs`` finds the one already loaded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field
from runtime_jobs import record_effect  # type: ignore[import-not-found]

from durably_web import RetryPolicy, StepContext, define_job


async def executed(step: StepContext, name: str, work: Callable[[], Any] = lambda: None) -> Any:
    """``step.run(name)`` whose function records its execution; ``work()`` gives its value."""

    async def fn() -> Any:
        await record_effect("B", step.run_id, name, step.attempt)
        value = work()
        await record_effect("E", step.run_id, name, step.attempt)
        return value

    return await step.run(name, fn)


class WaitIn(BaseModel):
    nap: float = Field(0, ge=0, le=60)  # seconds of step.sleep("nap") after s0 (0: no wait)
    signal: bool = False  # then wait_for_signal("approval")


@define_job("sleep-and-signal", input=WaitIn)
async def sleep_and_signal(step: StepContext, payload: WaitIn) -> dict[str, Any]:
    await executed(step, "s0", lambda: 0)
    await step.sleep("nap", payload.nap)
    approval = await step.wait_for_signal("approval") if payload.signal else None
    await executed(step, "s1", lambda: 1)
    return {"approval": approval}


class FlakyError(Exception):
    pass


# The backoff is spent as the run's persisted wake-up time: the page reloads during it.
@define_job("flaky", retry=RetryPolicy(max_attempts=3, initial_delay=1.5, backoff=1.0))
async def flaky(step: StepContext, payload: Any) -> dict[str, Any]:
    await executed(step, "s0", lambda: 0)

    def fail_twice() -> int:
        # Each retry is a new execution of the handler (and a new claim of the run), so the
        # run's attempt number is this step's: the first two fail.
        if step.attempt < 3:
            raise FlakyError(f"attempt {step.attempt} fails")
        return step.attempt

    attempt = await executed(step, "flaky", fail_twice)
    return {"succeeded_at": attempt}


@define_job("fail-once")
async def fail_once(step: StepContext, payload: Any) -> dict[str, Any]:
    """Fails at "check" on the run's first attempt (no retry policy): resumeRun and forkRun."""
    await executed(step, "s0", lambda: 0)

    def check() -> None:
        if step.attempt == 1:
            raise FlakyError("the first attempt fails")

    await executed(step, "check", check)
    await executed(step, "s2", lambda: 2)
    return {"attempt": step.attempt}


@define_job("parallel-reload")
async def parallel_reload(step: StepContext, payload: Any) -> dict[str, Any]:
    """A step.all whose branch "quick" completes at once (noting attempt metadata) while "held"
    blocks on the run's first attempt: the test reloads the page then, and the next page load
    must run only "held" again."""

    async def quick() -> str:
        await record_effect("B", step.run_id, "quick", step.attempt)
        step.attempt.set_metadata({"model": "m1", "tokens": 812})
        await record_effect("E", step.run_id, "quick", step.attempt)
        return "quick"

    async def held() -> str:
        await record_effect("B", step.run_id, "held", step.attempt)
        if step.attempt == 1:
            await asyncio.Event().wait()  # until the page goes away
        await record_effect("E", step.run_id, "held", step.attempt)
        return "held"

    results = await step.all({"quick": quick, "held": held})
    return {"results": results, "after": await executed(step, "after", lambda: int(step.attempt))}
