"""The worker: leases, reclaim, fencing, cancellation, failures, shutdown, limits, retention."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections import Counter
from typing import Any

import crash_jobs
import pytest
from helpers import read_lines, start_process, wait_event, wait_for_lines, wait_until

from durably_web import CancelledError, Event, LeaseLostError, StepContext, define_job

pytestmark = pytest.mark.all_backends

# --- leases: reclaim and fencing -----------------------------------------------------------------------


async def test_abandoned_run_is_reclaimed_after_lease_expiry_and_resumes(make_durably, db_url, tmp_path, sql):
    side_effects = tmp_path / "side-effects.txt"
    # Leases of 2 s (renewed every 0.4 s) leave room for a loaded machine.
    process = start_process("steps", db_url, str(side_effects), "--delay", "0.3", "--lease", "2.0")
    try:
        await wait_for_lines(side_effects, 1, process)
        # Once the process holds the run, this in-process worker runs beside it: it must not
        # touch the run while that lease is live, and must take it over once it expires.
        survivor = await make_durably(crash_jobs.crash_steps, lease_duration=2.0, lease_renew_interval=0.4)
        await wait_for_lines(side_effects, 3, process)
        owner = sql("SELECT lease_owner FROM durably_runs")[0][0]
        assert f":{process.pid}:" in owner
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
    completed_before = sql("SELECT COUNT(*) FROM durably_steps WHERE status = 'completed'")[0][0]
    assert completed_before >= 2
    assert all(pid == process.pid for _, pid in read_lines(side_effects))

    run_id = sql("SELECT id FROM durably_runs")[0][0]
    done = await survivor.wait_for_run(run_id, timeout=30)
    assert done.status == "completed"
    assert done.output == crash_jobs.CrashOut(total=crash_jobs.EXPECTED_TOTAL)
    assert done.attempt == 2
    lines = read_lines(side_effects)
    resumed = [name for name, pid in lines if pid != process.pid]
    # Resumed from the last completed step: nothing before it ran again.
    assert resumed == [f"step-{i}" for i in range(completed_before, crash_jobs.STEP_COUNT)]
    steps = await survivor.get_steps(run_id)
    assert [(s.name, s.output) for s in steps] == [
        (f"step-{i}", crash_jobs.step_value(i)) for i in range(crash_jobs.STEP_COUNT)
    ]


async def test_a_worker_whose_lease_was_taken_over_cannot_write(make_durably):
    in_b = asyncio.Event()
    release_first = asyncio.Event()
    executed: list[tuple[int, str]] = []
    lost: list[BaseException] = []

    def plain(name: str):
        def fn() -> str:
            return name

        return fn

    @define_job("fenced")
    async def fenced(step: StepContext, payload: Any) -> str:
        async def b() -> str:
            executed.append((step.attempt, "b"))
            if step.attempt == 1:
                in_b.set()
                await release_first.wait()
            return f"b-from-attempt-{step.attempt}"

        await step.run("a", plain("a"))
        try:
            value = await step.run("b", b)
        except LeaseLostError as exc:
            lost.append(exc)
            try:
                step.progress(1, 2)
            except LeaseLostError as again:
                lost.append(again)
            raise
        executed.append((step.attempt, "c"))
        await step.run("c", plain("c"))
        return value

    # The first worker renews rarely, so it has not noticed anything when it next writes.
    first = await make_durably(fenced, lease_duration=30, lease_renew_interval=10)
    first_errors: list[Event] = []
    first_error_seen = asyncio.Event()

    def on_error(event: Event) -> None:
        first_errors.append(event)
        first_error_seen.set()

    first.on("worker:error", on_error)
    run = await first.trigger(fenced, None)
    await wait_event(in_b)
    # A second worker whose clock is two minutes ahead sees the lease as expired: it
    # is the worker that outlived a stalled one.
    second = await make_durably(fenced, clock=lambda: time.time() + 120)
    done = await second.wait_for_run(run.id, timeout=30)
    assert done.status == "completed"
    assert done.output == "b-from-attempt-2"
    assert done.attempt == 2

    release_first.set()  # the stalled worker wakes up and tries to record step "b"
    await wait_event(first_error_seen)
    assert [type(exc) for exc in lost] == [LeaseLostError, LeaseLostError]
    assert "taken over" in str(lost[0])
    assert first_errors[0].data["error"].type == "LeaseLostError"
    assert first_errors[0].run_id == run.id
    # Nothing the first worker did after losing the lease reached the database.
    steps = await second.get_steps(run.id)
    assert [(s.name, s.output) for s in steps] == [("a", "a"), ("b", "b-from-attempt-2"), ("c", "c")]
    assert executed == [(1, "b"), (2, "b"), (2, "c")]
    final = await first.get_run(run.id)
    assert final.status == "completed" and final.progress is None


async def test_a_worker_whose_lease_ran_out_unrenewed_starts_no_further_step(make_durably):
    # Found by tests/test_postgres_workers.py: a worker whose calls (renewals included) were
    # stuck while the server restarted got its answers back after its lease had expired and
    # another worker had taken the run over, and went on to execute the run's next step
    # (fenced at commit, but executed twice). Here the worker's clock jumps past its lease
    # inside step "a", before the renewal loop (every 10 s) could notice.
    offset = 0.0
    executed: list[tuple[int, str]] = []

    @define_job("outlived")
    async def outlived(step: StepContext, payload: Any) -> str:
        def a() -> str:
            nonlocal offset
            executed.append((step.attempt, "a"))
            if step.attempt == 1:
                offset += 60  # the lease (30 s) ran out during this step
            return "a"

        def b() -> str:
            executed.append((step.attempt, "b"))
            return "b"

        return await step.run("a", a) + await step.run("b", b)

    durably = await make_durably(
        outlived, lease_duration=30, lease_renew_interval=10, clock=lambda: time.time() + offset
    )
    errors: list[Event] = []
    durably.on("worker:error", errors.append)
    run = await durably.trigger(outlived, None)
    done = await durably.wait_for_run(run.id, timeout=30)
    assert done.status == "completed" and done.output == "ab"
    # "b" did not start under the expired lease: the run was claimed again (here by the
    # same worker, its lease being expired) and "a" was replayed, not executed.
    assert executed == [(1, "a"), (2, "b")]
    assert done.attempt == 2
    assert [e.data["error"].type for e in errors] == ["LeaseLostError"]
    assert "ran out before it could be renewed" in errors[0].data["error"].message


# --- cancellation -----------------------------------------------------------------


def cancellable_job(name: str, in_step: asyncio.Event, saw_cancel: asyncio.Event, after: list[str]):
    @define_job(name)
    async def job(step: StepContext, payload: Any) -> None:
        async def forever() -> None:
            in_step.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                saw_cancel.set()
                raise

        await step.run("first", lambda: 1)
        try:
            await step.run("in-flight", forever)
        except asyncio.CancelledError:
            # A handler that swallows the cancellation still cannot start another step.
            try:
                await step.run("next", lambda: after.append("next"))
            except CancelledError as exc:
                after.append(f"refused: {type(exc).__name__}")
            raise
        after.append("handler continued")

    return job


async def test_cancel_stops_the_running_handler_inside_its_step(make_durably):
    in_step, saw_cancel, after = asyncio.Event(), asyncio.Event(), []
    job = cancellable_job("cancel-me", in_step, saw_cancel, after)
    # Lease renewal is far away: the in-process cancel must stop the handler by itself.
    durably = await make_durably(job, lease_duration=120, lease_renew_interval=60)
    cancels: list[Event] = []
    durably.on("run:cancel", cancels.append)
    run = await durably.trigger(job, None)
    await wait_event(in_step)
    cancelled = await durably.cancel(run.id)
    assert cancelled.status == "cancelled"
    await wait_event(saw_cancel, timeout=5)
    await wait_until(lambda: len(after) == 1)
    assert after == ["refused: CancelledError"]
    assert [e.run_id for e in cancels] == [run.id]
    final = await durably.wait_for_run(run.id, timeout=5)
    assert final.status == "cancelled"
    assert [s.name for s in await durably.get_steps(run.id)] == ["first"]


async def test_a_worker_that_reclaims_its_own_lapsed_run_keeps_renewing_the_new_execution(make_durably):
    # The worker's clock jumps past its own lease (a loop blocked for longer than the
    # lease does the same): its claim loop takes the run again while the old execution
    # is still parked in a step. The old one must not take the new one's place with it
    # when it ends, or nothing would renew the new execution's lease any more.
    offset = [0.0]
    gates = [asyncio.Event(), asyncio.Event()]
    entered: list[int] = []

    async def parked() -> int:
        mine = len(entered)
        entered.append(mine)
        await gates[mine].wait()
        return mine

    @define_job("reclaimed")
    async def reclaimed(step: StepContext, payload: None) -> int:
        return await step.run("parked", parked)

    durably = await make_durably(reclaimed, clock=lambda: time.time() + offset[0])
    lost: list[Event] = []
    durably.on("worker:error", lost.append)
    run = await durably.trigger(reclaimed, None)
    await wait_until(lambda: len(entered) == 1)
    worker = durably._worker
    assert worker is not None
    older = worker.active[run.id]
    offset[0] = 60.0  # far past the 2 s lease
    await wait_until(lambda: len(entered) == 2)
    newer = worker.active[run.id]
    assert newer is not older and older.task is not None
    gates[0].set()  # the old execution tries to commit, is fenced, and ends
    await wait_until(older.task.done)
    assert any(e.data["error"].type == "LeaseLostError" for e in lost)
    assert worker.active.get(run.id) is newer
    gates[1].set()
    final = await durably.wait_for_run(run.id, timeout=10)
    assert (final.status, final.output) == ("completed", 1)


async def test_cancel_from_another_instance_stops_the_handler_within_a_renew_interval(make_durably):
    in_step, saw_cancel, after = asyncio.Event(), asyncio.Event(), []
    job = cancellable_job("cancel-elsewhere", in_step, saw_cancel, after)
    worker = await make_durably(job, lease_duration=5, lease_renew_interval=0.1)
    run = await worker.trigger(job, None)
    await wait_event(in_step)
    client = await make_durably(worker=False)
    assert (await client.cancel(run.id)).status == "cancelled"
    # Noticed at the next lease renewal (0.1 s here); the timeout is only a safety net.
    await wait_event(saw_cancel, timeout=10)
    await wait_until(lambda: len(after) == 1)
    assert after == ["refused: CancelledError"]
    assert [s.name for s in await worker.get_steps(run.id)] == ["first"]
    assert (await worker.get_run(run.id)).status == "cancelled"


async def test_cancel_during_a_blocking_sync_step_runs_no_further_steps(make_durably):
    in_step = threading.Event()
    unblock = threading.Event()
    later: list[str] = []
    stopped = asyncio.Event()

    def blocking() -> int:
        in_step.set()
        unblock.wait(30)
        return 1

    @define_job("cancel-sync")
    async def job(step: StepContext, payload: Any) -> None:
        try:
            await step.run("block", blocking)
        except asyncio.CancelledError:
            stopped.set()
            raise
        await step.run("later", lambda: later.append("ran"))

    durably = await make_durably(job)
    run = await durably.trigger(job, None)
    assert await asyncio.to_thread(in_step.wait, 10)
    await durably.cancel(run.id)
    await wait_event(stopped)
    unblock.set()  # the thread itself cannot be interrupted; its result is discarded
    assert later == []
    assert await durably.get_steps(run.id) == []
    assert (await durably.get_run(run.id)).status == "cancelled"


# --- failures and retrigger -----------------------------------------------------------------


async def test_a_failing_step_fails_the_run_with_type_message_and_traceback(make_durably):
    calls: Counter[str] = Counter()
    should_fail = True

    def prepare() -> str:
        calls["prepare"] += 1
        return "prepared"

    def explode_step() -> str:
        calls["explode"] += 1
        if should_fail:
            raise ValueError("bad thing 42")
        return "fine"

    @define_job("explodes")
    async def job(step: StepContext, payload: Any) -> str:
        await step.run("prepare", prepare)
        value = await step.run("explode", explode_step)
        await step.run("after", lambda: calls.update(["after"]))
        return value

    durably = await make_durably(job)
    fails: list[Event] = []
    durably.on("run:fail", fails.append)
    failed = await durably.trigger_and_wait(job, {"x": 1}, labels={"l": "1"}, timeout=30)
    assert failed.status == "failed"
    assert failed.error.type == "ValueError"
    assert failed.error.message == "bad thing 42"
    assert "explode_step" in failed.error.traceback
    assert "ValueError: bad thing 42" in failed.error.traceback
    assert failed.output is None
    assert calls == Counter({"prepare": 1, "explode": 1})
    steps = await durably.get_steps(failed.id)
    assert [(s.name, s.status) for s in steps] == [("prepare", "completed"), ("explode", "failed")]
    assert steps[1].error.type == "ValueError" and steps[1].error.message == "bad thing 42"
    assert "explode_step" in steps[1].error.traceback
    assert fails[0].data["step_name"] == "explode"
    assert fails[0].data["error"].message == "bad thing 42"

    # retrigger starts a fresh run: every step runs again, nothing is replayed.
    should_fail = False
    again = await durably.retrigger(failed.id)
    done = await durably.wait_for_run(again.id, timeout=30)
    assert done.status == "completed"
    assert done.output == "fine"
    assert done.input == {"x": 1} and done.labels == {"l": "1"}
    assert calls == Counter({"prepare": 2, "explode": 2, "after": 1})
    assert [(s.name, s.status) for s in await durably.get_steps(done.id)] == [
        ("prepare", "completed"),
        ("explode", "completed"),
        ("after", "completed"),
    ]
    assert (await durably.get_run(failed.id)).status == "failed"  # the old run is untouched


async def test_an_exception_outside_steps_fails_the_run(make_durably):
    @define_job("raises")
    async def job(step: StepContext, payload: Any) -> None:
        await step.run("ok", lambda: 1)
        raise KeyError("missing")

    durably = await make_durably(job)
    failed = await durably.trigger_and_wait(job, None, timeout=30)
    assert failed.status == "failed"
    assert failed.error.type == "KeyError"
    assert [(s.name, s.status) for s in await durably.get_steps(failed.id)] == [("ok", "completed")]


# --- graceful stop -----------------------------------------------------------------


async def test_graceful_stop_finishes_the_step_then_releases_the_lease(make_durably, sql):
    in_b = asyncio.Event()
    gate = asyncio.Event()
    executed: list[str] = []

    @define_job("stoppable")
    async def job(step: StepContext, payload: Any) -> str:
        async def b() -> str:
            executed.append("b")
            if step.attempt == 1:
                in_b.set()
                await gate.wait()
            return "b"

        await step.run("a", lambda: executed.append("a"))
        await step.run("b", b)
        await step.run("c", lambda: executed.append("c"))
        return "done"

    # A lease far longer than the test: only a release lets another instance resume.
    first = await make_durably(job, lease_duration=120, lease_renew_interval=1, shutdown_timeout=10)
    run = await first.trigger(job, None)
    await wait_event(in_b)
    stopping = asyncio.create_task(first.stop())
    # Wait for stop() to mark the worker (and the run) as shutting down; one sleep(0)
    # is enough only while stop() awaits nothing before that.
    await wait_until(lambda: first._worker is None or first._worker._stopping)
    gate.set()  # the in-flight step completes; the next step is not started
    await asyncio.wait_for(stopping, 10)
    assert executed == ["a", "b"]
    status, owner, expires = sql("SELECT status, lease_owner, lease_expires_at FROM durably_runs")[0]
    assert (status, owner) == ("pending", None)  # released: not held by anyone
    assert expires <= time.time() * 1000
    assert sql("SELECT name FROM durably_steps ORDER BY seq") == [("a",), ("b",)]

    second = await make_durably(job, lease_duration=120, lease_renew_interval=1)
    done = await second.wait_for_run(run.id, timeout=20)
    assert done.status == "completed"
    assert done.output == "done"
    assert done.attempt == 2
    assert executed == ["a", "b", "c"]


async def test_stop_cancels_a_handler_stuck_in_a_step_and_releases_it(make_durably, sql):
    in_step = asyncio.Event()
    saw_cancel = asyncio.Event()

    @define_job("stuck")
    async def job(step: StepContext, payload: Any) -> None:
        async def forever() -> None:
            in_step.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                saw_cancel.set()
                raise

        await step.run("a", lambda: 1)
        await step.run("stuck", forever)

    durably = await make_durably(job, lease_duration=120, lease_renew_interval=1, shutdown_timeout=0.1)
    await durably.trigger(job, None)
    await wait_event(in_step)
    await durably.stop()
    assert saw_cancel.is_set()
    status, owner, expires = sql("SELECT status, lease_owner, lease_expires_at FROM durably_runs")[0]
    assert (status, owner) == ("pending", None)  # released: not held by anyone
    assert expires <= time.time() * 1000
    assert sql("SELECT name, status FROM durably_steps") == [("a", "completed")]


async def test_stop_leaves_no_task_thread_or_listener_task_behind(make_durably):
    """After stop(): no task the engine or the event bus started is left, and the
    sync-step threads have exited (a passing test run must not end in 'Task was
    destroyed but it is pending!')."""
    before = asyncio.all_tasks()
    in_step = asyncio.Event()
    listener_done: list[str] = []

    def sync_step() -> int:
        return threading.get_ident()

    @define_job("leaves-nothing")
    async def job(step: StepContext, payload: Any) -> None:
        await step.run("sync", sync_step)
        step.progress(1, 2)

        async def wait_forever() -> None:
            in_step.set()
            await asyncio.Event().wait()

        await step.run("stuck", wait_forever)

    async def slow_listener(event: Event) -> None:
        try:
            await asyncio.sleep(60)
        finally:
            listener_done.append(event.type)

    durably = await make_durably(job, shutdown_timeout=0.2)
    durably.on("run:progress", slow_listener)
    subscription = durably.subscribe((await durably.trigger(job, None)).id)
    await wait_event(in_step)
    threads = list(durably._worker.sync_threads._threads) if durably.run_sync_in_thread else []
    assert len(threads) == (1 if durably.run_sync_in_thread else 0)
    await durably.stop()
    left = asyncio.all_tasks() - before - {asyncio.current_task()}
    assert left == set(), left
    assert listener_done == ["run:progress"]  # the listener's task was cancelled and ran its cleanup
    assert [thread for thread in threads if thread.is_alive()] == []
    subscription.close()


@pytest.mark.parametrize("where", ["step", "step.all"])
async def test_a_run_whose_task_is_destroyed_mid_step_is_left_to_be_taken_over_not_failed(
    make_durably, where
):
    """A run task destroyed while pending (its event loop dropped without stop(), as a killed
    process's is) has its coroutine closed by the garbage collector, from another context.
    Nothing of the run may happen then: no outcome, no error report. The run keeps its lease
    until it expires and is taken over, exactly as after a SIGKILL."""
    in_step = asyncio.Event()

    @define_job("dropped")
    async def job(step: StepContext, payload: Any) -> str:
        async def first_time_hangs() -> int:
            if step.attempt == 1:
                in_step.set()
                await asyncio.Event().wait()
            return step.attempt

        if where == "step":
            return f"attempt {await step.run('hangs', first_time_hangs)}"
        both = await step.all({"hangs": first_time_hangs, "quick": lambda: 0})
        return f"attempt {both['hangs']}"

    durably = await make_durably(job, lease_duration=1.0)  # the dropped lease lapses in 1 s
    errors: list[Event] = []
    durably.on("worker:error", errors.append)
    run = await durably.trigger(job, None)
    await wait_event(in_step)

    def branches() -> list[asyncio.Task[Any]]:  # those not done
        return [t for t in asyncio.all_tasks() if t.get_name().startswith(f"durably-branch-{run.id}-")]

    if where == "step.all":  # the quick branch has ended (recorded); the other one hangs
        await wait_until(lambda: len(branches()) == 1)
    dropped = [durably._worker.active[run.id].task, *branches()]
    for task in dropped:
        # What collecting a pending task does: close its coroutine (GeneratorExit at its await),
        # here from the test's own task, as the collector does from whatever context it runs in.
        task.get_coro().close()
    for task in dropped:
        # The Task object outlives its coroutine here (a collected one does not): it ends at
        # once, with "cannot reuse already awaited coroutine", looked at so it is not reported.
        task.cancel()
        await asyncio.wait([task])
        assert isinstance(task.exception(), RuntimeError)
    assert (await durably.get_run(run.id)).status == "leased"
    assert [s.name for s in await durably.get_steps(run.id) if s.status != "completed"] == []
    done = await durably.wait_for_run(run.id, timeout=30)  # once the lease lapsed
    assert (done.status, done.output, done.attempt) == ("completed", "attempt 2", 2)
    assert errors == []


# --- limits and retention -----------------------------------------------------------------


async def test_max_concurrent_runs_limits_running_handlers(make_durably, sql):
    gate = asyncio.Event()
    active = 0
    peak = 0

    @define_job("limited")
    async def job(step: StepContext, payload: Any) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            await step.run("wait", gate.wait)
        finally:
            active -= 1

    durably = await make_durably(job, max_concurrent_runs=2)
    runs = await durably.batch_trigger(job, [None] * 5)
    await wait_until(lambda: active == 2)
    await asyncio.sleep(0.3)  # many polling intervals: room for the worker to (wrongly) claim more
    assert active == 2
    assert sql("SELECT COUNT(*) FROM durably_runs WHERE status = 'leased'") == [(2,)]
    gate.set()
    for run in runs:
        assert (await durably.wait_for_run(run.id, timeout=30)).status == "completed"
    assert peak == 2


async def test_retention_purges_ended_runs_but_not_pending_ones(make_durably):
    @define_job("short-lived")
    async def job(step: StepContext, payload: Any) -> int:
        return await step.run("one", lambda: 1)

    @define_job("not-served")
    async def not_served(step: StepContext, payload: Any) -> None:
        return None

    client = await make_durably(not_served, worker=False)
    pending = await client.trigger(not_served, None)
    durably = await make_durably(job, retain_runs=0.2)
    done = await durably.trigger_and_wait(job, None, timeout=30)
    assert done.status == "completed"

    async def gone() -> bool:
        return [run.id for run in await durably.get_runs()] == [pending.id]

    await wait_until(gone, timeout=15)


@pytest.mark.parametrize("preserve", [True, False])
async def test_preserve_steps_controls_step_outputs_after_the_run_ends(make_durably, preserve):
    @define_job("outputs")
    async def job(step: StepContext, payload: Any) -> int:
        first = await step.run("first", lambda: {"big": "x" * 100})
        return len(first["big"]) + await step.run("second", lambda: 5)

    options = {} if preserve else {"preserve_steps": False}
    durably = await make_durably(job, **options)
    assert durably.preserve_steps is preserve
    done = await durably.trigger_and_wait(job, None, timeout=30)
    assert done.output == 105  # the run's own output is always kept
    steps = await durably.get_steps(done.id)
    assert [(s.name, s.status) for s in steps] == [("first", "completed"), ("second", "completed")]
    if preserve:
        assert [s.output for s in steps] == [{"big": "x" * 100}, 5]
    else:
        assert [s.output for s in steps] == [None, None]


async def test_sole_worker_resumes_runs_of_a_dead_owner_without_waiting_for_expiry(make_durably, db_url):
    from durably_web.storage import open_store

    @define_job("owned")
    async def job(step: StepContext, payload: Any) -> int:
        return await step.run("one", lambda: 1)

    client = await make_durably(job, worker=False)
    run = await client.trigger(job, None)
    # A previous owner leased it for a long time and then died.
    store = open_store(db_url)
    try:
        now = int(time.time() * 1000)
        claimed = await store.claim_run(
            worker_id="dead", job_names=["owned"], now=now, lease_until=now + 3_600_000
        )
        assert claimed is not None and claimed.id == run.id
    finally:
        await store.close()
    # An ordinary worker respects the live lease...
    ordinary = await make_durably(job)
    await asyncio.sleep(0.2)  # ten polling intervals
    assert (await ordinary.get_run(run.id)).status == "leased"
    await ordinary.stop()
    # ...a sole worker knows nobody else can hold it and resumes at once.
    sole = await make_durably(job, sole_worker=True)
    done = await sole.wait_for_run(run.id, timeout=20)
    assert done.status == "completed"
    assert done.attempt == 2
