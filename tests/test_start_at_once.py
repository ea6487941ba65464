"""``trigger_and_wait`` on an idle worker starts the run at once, created leased (no claim).

What must not change with it: a run already waiting in this worker's queue goes first, a full
worker queues the run, flow limits are still counted by a claim, the events come in their
usual order, and a stop that begins during the insert hands the run back instead of losing it.
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import pytest
from helpers import wait_until

from durably_web import Durably, DurablyError, StepContext, define_job

pytestmark = pytest.mark.all_backends

order: list[str] = []
gate = asyncio.Event()


@define_job("at-once-echo")
async def echo(step: StepContext, payload: str) -> str:
    order.append(payload)
    return await step.run("echo", lambda: payload)


@define_job("at-once-blocked")
async def blocked(step: StepContext, payload: str) -> str:
    order.append(payload)
    await gate.wait()
    return payload


@define_job("at-once-limited", max_concurrent=2)
async def limited(step: StepContext, payload: str) -> str:
    return payload


@pytest.fixture(autouse=True)
def fresh_state() -> None:
    global gate
    order.clear()
    gate = asyncio.Event()


async def settle(durably: Durably) -> None:
    """Until the worker's claim loop has looked and found nothing: it is idle."""
    await durably.trigger_and_wait(echo, "warm", timeout=30)
    worker = durably._worker
    assert worker is not None
    await wait_until(lambda: worker.found_nothing_to_claim, timeout=30)
    order.clear()


async def test_an_idle_worker_starts_the_run_without_a_claim_and_events_keep_their_order(make_durably):
    durably = await make_durably(echo)
    await settle(durably)
    seen: list[str] = []
    durably.on("*", lambda event: seen.append(event.type) if event.job_name == echo.name else None)
    run = await durably.trigger_and_wait(echo, "a", timeout=30)
    assert (run.status, run.output, run.attempt) == ("completed", "a", 1)
    assert run.started_at is not None and run.started_at >= run.created_at
    types = [t for t in seen if t.startswith("run:")]
    assert types[:2] == ["run:trigger", "run:leased"] and types[-1] == "run:complete", seen


async def test_a_run_already_queued_here_goes_first(make_durably):
    durably = await make_durably(echo, blocked, max_concurrent_runs=1)
    await settle(durably)
    first = await durably.trigger(echo, "queued")  # pending: the claim loop has not looked yet
    run = await durably.trigger_and_wait(echo, "waited", timeout=30)
    assert run.status == "completed"
    assert (await durably.wait_for_run(first.id, timeout=30)).status == "completed"
    assert order == ["queued", "waited"]


async def test_a_full_worker_queues_the_run_until_a_slot_frees(make_durably):
    durably = await make_durably(echo, blocked, max_concurrent_runs=1)
    await settle(durably)
    busy = await durably.trigger(blocked, "busy")
    await wait_until(lambda: order == ["busy"], timeout=30)
    waiting = asyncio.create_task(durably.trigger_and_wait(echo, "next", timeout=30))
    await asyncio.sleep(0.2)
    assert not waiting.done() and order == ["busy"]  # one slot, and it is taken
    queued = [r for r in await durably.get_runs(job_name=echo.name) if r.input == "next"]
    assert [r.status for r in queued] == ["pending"]
    gate.set()
    assert (await waiting).status == "completed"
    assert (await durably.wait_for_run(busy.id, timeout=30)).status == "completed"
    assert order == ["busy", "next"]


async def test_a_job_with_flow_limits_is_claimed_not_started_at_once(make_durably):
    durably = await make_durably(limited, echo)
    await settle(durably)
    created: list[Any] = []
    original = durably._store.create_leased_run

    async def spy(new: Any, **kwargs: Any) -> Any:
        created.append(new.job_name)
        return await original(new, **kwargs)

    durably._store.create_leased_run = spy  # type: ignore[method-assign]
    assert (await durably.trigger_and_wait(limited, "x", timeout=30)).status == "completed"
    assert (await durably.trigger_and_wait(echo, "y", timeout=30)).status == "completed"
    # max_concurrent is counted by the claim's transaction; the plain job may start at once
    # (whether it does depends on whether the worker's look after the first run has ended).
    assert limited.name not in created and set(created) <= {echo.name}
    await settle(durably)
    assert (await durably.trigger_and_wait(echo, "z", timeout=30)).status == "completed"
    assert created[-1:] == [echo.name]  # an idle worker starts a plain job's run at once


async def test_a_stop_during_the_insert_hands_the_run_back_to_the_queue(make_durably, db_url):
    durably = await make_durably(echo)
    await settle(durably)
    original = durably._store.create_leased_run
    stopping: list[asyncio.Task[None]] = []

    async def stop_meanwhile(new: Any, **kwargs: Any) -> Any:
        record = await original(new, **kwargs)
        stopping.append(asyncio.create_task(durably.stop()))
        await asyncio.sleep(0)  # stop() has begun: the worker is stopping
        return record

    durably._store.create_leased_run = stop_meanwhile  # type: ignore[method-assign]
    # The caller's wait then finds Durably stopped, as a trigger_and_wait racing stop() does.
    with pytest.raises(DurablyError, match="not started"):
        await durably.trigger_and_wait(echo, "handed back", timeout=0.3)
    await stopping[0]
    assert order == []  # it never started here
    # The run is in the queue, and the next worker runs it.
    later = Durably(db_url, jobs=[echo], polling_interval=0.02)
    async with later:
        runs = await later.get_runs(job_name=echo.name)
        handed = [r for r in runs if r.input == "handed back"]
        assert len(handed) == 1 and handed[0].status in ("pending", "leased")
        done = await later.wait_for_run(handed[0].id, timeout=30)
    assert (done.status, done.output) == ("completed", "handed back")
    assert order == ["handed back"]


# --- an idle worker that skips its look when a slot frees still takes what the run held back ---


@define_job("at-once-keyed")
async def keyed(step: StepContext, payload: str) -> str:
    order.append(payload)
    if payload == "holder":
        await gate.wait()
    return payload


@define_job("at-once-limited-one", max_concurrent=1)
async def limited_one(step: StepContext, payload: str) -> str:
    order.append(payload)
    if payload == "holder":
        await gate.wait()
    return payload


@pytest.mark.parametrize(
    ("job", "options"),
    [(keyed, {"concurrency_key": "k"}), (limited_one, {})],
    ids=["concurrency-key", "max-concurrent"],
)
async def test_the_end_of_a_run_that_held_others_back_lets_them_start_without_a_poll(
    make_durably, job, options
):
    # No poll in this test's time: only the end of the holder can start the held-back run.
    durably = await make_durably(job, echo, polling_interval=60)
    await settle(durably)
    holder = await durably.trigger(job, "holder", **options)
    await wait_until(lambda: order == ["holder"], timeout=30)
    held = await durably.trigger(job, "held", **options)
    worker = durably._worker
    assert worker is not None
    # The worker looked and found nothing it may claim: the held run waits for the holder.
    await wait_until(lambda: worker.found_nothing_to_claim, timeout=30)
    gate.set()
    assert (await durably.wait_for_run(holder.id, timeout=10)).status == "completed"
    assert (await durably.wait_for_run(held.id, timeout=10)).status == "completed"
    assert order == ["holder", "held"]


caller_tenant: contextvars.ContextVar[str | None] = contextvars.ContextVar("caller_tenant", default=None)


@define_job("at-once-context")
async def sees_context(step: StepContext, payload: str) -> str | None:
    return caller_tenant.get()


async def test_a_run_started_at_once_does_not_see_the_callers_context_variables(make_durably):
    durably = await make_durably(sees_context, echo)
    await settle(durably)
    token = caller_tenant.set("caller")
    try:
        run = await durably.trigger_and_wait(sees_context, "x", timeout=30)
    finally:
        caller_tenant.reset(token)
    assert run.started_at == run.created_at  # started at once
    assert (run.status, run.output) == ("completed", None)  # as a claimed run sees it
