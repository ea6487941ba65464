"""Child runs: step.start_child / step.wait_for_child, the parent waiting without a slot, typed
outputs, failures raised in the parent, the cancel cascade, delete refused, replay and kills."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from helpers import finish_process, start_process, timed_lines, wait_until
from pydantic import BaseModel

from durably_web import (
    ChildRun,
    ChildRunCancelledError,
    ChildRunFailedError,
    ConflictError,
    Durably,
    Event,
    RetryPolicy,
    StepContext,
    StepError,
    ValidationError,
    define_job,
)

pytestmark = pytest.mark.all_backends


class InvoiceIn(BaseModel):
    order: int


class Invoice(BaseModel):
    order: int
    total: int


def invoice_job(gate: asyncio.Event | None = None, *, fail: bool = False) -> Any:
    @define_job("invoice", input=InvoiceIn, output=Invoice)
    async def invoice(step: StepContext, payload: InvoiceIn) -> Invoice:
        if gate is not None:
            await step.run("held", gate.wait)
        if fail:
            await step.run("charge", _refuse)
        total = await step.run("total", lambda: payload.order * 10)
        return Invoice(order=payload.order, total=total)

    return invoice


def _refuse() -> None:
    raise ValueError("card declined")


def order_job(invoice: Any, seen: list[Any] | None = None) -> Any:
    @define_job("order", output=int)
    async def order(step: StepContext, payload: Any) -> int:
        child = await step.start_child("invoice", invoice, {"order": 4})
        out = await step.wait_for_child("invoice-done", child)
        if seen is not None:
            seen.append((child, out))
        return out.total

    return order


async def test_a_parent_waits_without_a_slot_and_gets_the_childs_typed_output(make_durably):
    gate = asyncio.Event()
    seen: list[Any] = []
    invoice = invoice_job(gate)
    order = order_job(invoice, seen)
    events: list[Event] = []
    # One slot: a parent that kept its slot while waiting would leave none for its child.
    durably = await make_durably(invoice, order, max_concurrent_runs=1)
    durably.on("*", events.append)
    run = await durably.trigger(order)
    [waiting] = await wait_until(lambda: durably.get_runs(status="waiting", job_name="order"))
    [child] = await durably.get_runs(parent_run_id=run.id)
    assert waiting.id == run.id and waiting.wait_reason == "child" and waiting.wait_step == "invoice-done"
    assert waiting.wait_child_id == child.id and waiting.wake_at is None
    assert child.parent_run_id == run.id and child.job_name == "invoice" and child.input == InvoiceIn(order=4)
    await wait_until(lambda: durably.get_run(child.id), timeout=10)
    assert (await durably.get_run(child.id)).status == "leased"  # it got the one slot
    gate.set()
    done = await durably.wait_for_run(run.id, timeout=30)
    assert done.status == "completed" and done.output == 40 and done.wait_child_id is None
    [(handle, out)] = seen
    assert handle == ChildRun(run_id=child.id, job_name="invoice")
    assert out == Invoice(order=4, total=40)
    steps = await durably.get_steps(run.id)
    assert [(s.name, s.kind, s.output) for s in steps] == [
        ("invoice", "child", {"run_id": child.id, "job_name": "invoice"}),
        ("invoice-done", "child_wait", {"output": {"order": 4, "total": 40}}),
    ]
    assert (await durably.get_run(child.id)).status == "completed"
    triggered = [e for e in events if e.type == "run:trigger" and e.run_id == child.id]
    assert [e["parent_run_id"] for e in triggered] == [run.id]
    waits = [e for e in events if e.type == "run:waiting" and e.run_id == run.id]
    assert [(e["reason"], e["child_run_id"]) for e in waits] == [("child", child.id)]
    # Only the parent's children; other runs have none.
    assert await durably.get_runs(parent_run_id=child.id) == []
    assert [r.id for r in await durably.get_runs(parent_run_id=run.id, status="completed")] == [child.id]
    assert await durably.get_runs(parent_run_id=run.id, status="failed") == []


async def test_a_child_that_already_ended_is_returned_without_waiting(make_durably):
    invoice = invoice_job()
    opened: list[Durably] = []

    async def until_completed(run_id: str) -> None:
        async def completed() -> bool:
            return (await opened[0].get_run(run_id)).status == "completed"

        await wait_until(completed, timeout=20)

    @define_job("order-later", output=int)
    async def order(step: StepContext, payload: Any) -> int:
        child = await step.start_child("invoice", "invoice", {"order": 2})  # by registered name
        await step.run("until-done", until_completed, child.run_id)
        out = await step.wait_for_child("invoice-done", child.run_id)  # a run id works too
        return out.total

    events: list[Event] = []
    durably = await make_durably(invoice, order)
    opened.append(durably)
    durably.on("run:waiting", events.append)
    run = await durably.trigger(order)
    done = await durably.wait_for_run(run.id, timeout=30)
    assert done.status == "completed" and done.output == 20
    assert events == []  # never waited


async def test_a_failed_child_raises_in_the_parent_with_its_error(make_durably):
    invoice = invoice_job(fail=True)
    caught: list[ChildRunFailedError] = []

    @define_job("careful-order")
    async def careful(step: StepContext, payload: Any) -> str:
        child = await step.start_child("invoice", invoice, {"order": 1})
        try:
            await step.wait_for_child("invoice-done", child)
        except ChildRunFailedError as exc:
            caught.append(exc)
            return "no invoice"
        return "invoiced"

    durably = await make_durably(invoice, careful, order_job(invoice))
    run = await durably.trigger(careful)
    done = await durably.wait_for_run(run.id, timeout=30)
    assert done.status == "completed" and done.output == "no invoice"
    [exc] = caught
    [child] = await durably.get_runs(parent_run_id=run.id)
    assert child.status == "failed" and exc.child_run_id == child.id and exc.status == "failed"
    assert exc.error is not None and exc.error.type == "ValueError" and "card declined" in exc.error.message
    assert not isinstance(exc, ChildRunCancelledError)

    # Not caught: the parent fails at its wait step with the child's error.
    uncaught = await durably.trigger("order")
    failed = await durably.wait_for_run(uncaught.id, timeout=30)
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.type == "ChildRunFailedError" and "card declined" in failed.error.message
    steps = await durably.get_steps(uncaught.id)
    assert [(s.name, s.status) for s in steps] == [("invoice", "completed"), ("invoice-done", "failed")]


async def test_a_cancelled_child_raises_child_run_cancelled_error(make_durably):
    gate = asyncio.Event()
    invoice = invoice_job(gate)
    caught: list[BaseException] = []

    @define_job("cancel-aware")
    async def parent(step: StepContext, payload: Any) -> str:
        child = await step.start_child("invoice", invoice, {"order": 1})
        try:
            await step.wait_for_child("invoice-done", child)
        except ChildRunCancelledError as exc:
            caught.append(exc)
            return "cancelled child"
        return "done"

    durably = await make_durably(invoice, parent)
    run = await durably.trigger(parent)
    await wait_until(lambda: durably.get_runs(status="waiting", job_name="cancel-aware"))
    [child] = await durably.get_runs(parent_run_id=run.id)
    await durably.cancel(child.id)
    done = await durably.wait_for_run(run.id, timeout=30)
    assert done.status == "completed" and done.output == "cancelled child"
    [exc] = caught
    assert isinstance(exc, ChildRunFailedError) and exc.status == "cancelled" and exc.child_run_id == child.id


async def test_cancelling_a_parent_cancels_its_children_recursively_and_delete_waits_for_them(make_durably):
    gate = asyncio.Event()
    invoice = invoice_job(gate)

    @define_job("middle")
    async def middle(step: StepContext, payload: Any) -> int:
        child = await step.start_child("invoice", invoice, {"order": 3})
        return (await step.wait_for_child("invoice-done", child)).total

    @define_job("top")
    async def top(step: StepContext, payload: Any) -> int:
        child = await step.start_child("middle", middle, None)
        return int(await step.wait_for_child("middle-done", child))

    events: list[Event] = []
    durably = await make_durably(invoice, middle, top)
    durably.on("run:cancel", events.append)
    run = await durably.trigger(top)
    await wait_until(lambda: durably.get_runs(status="waiting", job_name="middle"))
    [mid] = await durably.get_runs(parent_run_id=run.id)
    [leaf] = await wait_until(lambda: durably.get_runs(parent_run_id=mid.id, status="leased"))
    with pytest.raises(ConflictError, match="child run"):
        await durably.delete_run(run.id)  # its child is still waiting
    cancelled = await durably.cancel(run.id)
    assert cancelled.status == "cancelled"
    assert {e.run_id for e in events} == {run.id, mid.id, leaf.id}
    for run_id in (run.id, mid.id, leaf.id):
        assert (await durably.wait_for_run(run_id, timeout=30)).status == "cancelled"
    gate.set()  # the leaf's handler, stopped by the cancel, records nothing more
    await durably.delete_run(leaf.id)
    await durably.delete_run(run.id)  # its children have ended now
    assert [r.id for r in await durably.get_runs()] == [mid.id]


async def test_replay_never_starts_a_second_child(make_durably):
    invoice = invoice_job()
    attempts: list[int] = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise OSError("not yet")
        return "ok"

    @define_job("retrying-order", output=int)
    async def order(step: StepContext, payload: Any) -> int:
        child = await step.start_child("invoice", invoice, {"order": 5})
        await step.run("flaky", flaky, retry=RetryPolicy(max_attempts=5, initial_delay=0.01))
        return (await step.wait_for_child("invoice-done", child)).total

    durably = await make_durably(invoice, order)
    run = await durably.trigger(order)
    done = await durably.wait_for_run(run.id, timeout=30)
    assert done.status == "completed" and done.output == 50 and len(attempts) == 3
    children = await durably.get_runs(parent_run_id=run.id)
    assert len(children) == 1 and len(await durably.get_runs(job_name="invoice")) == 1


async def test_bad_child_input_and_bad_handles_raise_and_start_nothing(make_durably):
    invoice = invoice_job()
    outcomes: list[str] = []

    @define_job("sloppy")
    async def sloppy(step: StepContext, payload: Any) -> str:
        try:
            await step.start_child("invoice", invoice, {"order": "many"})
        except ValidationError:
            outcomes.append("invalid input")
        try:
            await step.wait_for_child("not-a-child", step.run_id)
        except StepError as exc:
            outcomes.append("not a child" if "not a child" in str(exc) else str(exc))
        try:
            await step.wait_for_child("no-handle", 42)  # type: ignore[arg-type]
        except StepError:
            outcomes.append("bad handle")
        return "done"

    durably = await make_durably(invoice, sloppy)
    run = await durably.trigger(sloppy)
    assert (await durably.wait_for_run(run.id, timeout=30)).status == "completed"
    assert outcomes == ["invalid input", "not a child", "bad handle"]
    assert await durably.get_runs(job_name="invoice") == []


async def test_a_child_deleted_while_its_parent_waits_raises_in_the_parent(make_durably):
    @define_job("napping-child")
    async def napper(step: StepContext, payload: Any) -> str:
        await step.sleep("nap", 3600)
        return "rested"

    @define_job("patient")
    async def patient(step: StepContext, payload: Any) -> str:
        child = await step.start_child("nap", napper, None)
        try:
            await step.wait_for_child("nap-done", child)
        except ChildRunFailedError as exc:
            return exc.status
        return "rested"

    durably = await make_durably(napper, patient)
    run = await durably.trigger(patient)
    await wait_until(lambda: durably.get_runs(status="waiting", job_name="patient"))
    [child] = await wait_until(lambda: durably.get_runs(parent_run_id=run.id, status="waiting"))
    await durably.delete_run(child.id)
    done = await durably.wait_for_run(run.id, timeout=30)
    assert done.status == "completed" and done.output == "deleted"


async def test_a_waiting_parent_is_woken_by_a_child_finished_in_another_process(make_durably, db_url):
    """Two Durably instances on one database: the child runs on one, the parent on the other;
    the child's outcome makes the parent due in its own transaction (no lost wake-up)."""
    gate = asyncio.Event()
    invoice = invoice_job(gate)
    order = order_job(invoice)
    parent_side = await make_durably(order)  # runs only parents
    child_side = await make_durably(invoice)  # runs only children
    run = await parent_side.trigger(order)
    await wait_until(lambda: parent_side.get_runs(status="waiting", job_name="order"))
    gate.set()
    done = await parent_side.wait_for_run(run.id, timeout=30)
    assert done.status == "completed" and done.output == 40
    assert len(await child_side.get_runs(parent_run_id=run.id)) == 1


async def test_no_wake_up_is_lost_when_children_end_while_their_parents_start_waiting(make_durably):
    """Children that end at once race their parents' waits, on two instances (two workers):
    a child ending just before its parent's wait commits must make that wait due at once, and
    one ending just after must wake it. A lost wake-up leaves a parent waiting for ever (a
    child wait has no wake-up time to poll for), and wait_for_run below fails. The race is
    real on PostgreSQL (every statement awaits the server: without due_if_child_ended this
    fails there); SQLite in one process never interleaves the two transactions, and the
    kill tests cover it across processes."""

    @define_job("quick-child", output=int)
    async def quick(step: StepContext, payload: int) -> int:
        return payload * 2

    @define_job("racing-parent", output=int)
    async def racing(step: StepContext, payload: int) -> int:
        child = await step.start_child("quick", quick, payload)
        return int(await step.wait_for_child("quick-done", child))

    parents = await make_durably(racing, max_concurrent_runs=8)
    children = await make_durably(quick, max_concurrent_runs=8)
    runs = [await parents.trigger(racing, n) for n in range(40)]
    done = [await parents.wait_for_run(run.id, timeout=60) for run in runs]
    assert [(r.status, r.output) for r in done] == [("completed", n * 2) for n in range(40)]
    assert len(await children.get_runs(job_name="quick-child", status="completed", limit=1000)) == 40


async def test_a_fork_that_copied_the_start_shares_its_sources_child(make_durably):
    invoice = invoice_job()
    order = order_job(invoice)
    durably = await make_durably(invoice, order)
    run = await durably.trigger(order)
    assert (await durably.wait_for_run(run.id, timeout=30)).status == "completed"
    [child] = await durably.get_runs(parent_run_id=run.id)
    fork = await durably.fork_run(run.id, from_step="invoice-done")  # "invoice" is copied
    done = await durably.wait_for_run(fork.id, timeout=30)
    assert done.status == "completed" and done.output == 40
    assert await durably.get_runs(parent_run_id=fork.id) == []  # no second child
    assert [r.id for r in await durably.get_runs(job_name="invoice")] == [child.id]


# --- kills ------------------------------------------------------------------------------------


def _rows(db_path: Path, query: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db_path, timeout=10)
    try:
        return conn.execute(query).fetchall()
    except sqlite3.OperationalError:  # the schema is not there yet
        return []
    finally:
        conn.close()


def _open_gates(side_effects: Path, *names: str) -> None:
    """Create the files the crash_jobs 'child' steps block on (see tests/crash_jobs.py)."""
    for name in names:
        Path(f"{side_effects}.{name}").touch()


async def _kill_when(first: Any, ready: Any) -> None:
    def check() -> Any:
        if first.poll() is not None:
            raise AssertionError(f"worker exited early: {first.communicate()}")
        return ready()

    try:
        await wait_until(check, timeout=60)
    finally:
        first.kill()
        first.communicate()


async def test_sigkill_between_start_child_and_wait_for_child_then_restart_has_one_child(
    db_url, db_path, tmp_path
):
    side_effects = tmp_path / "side-effects.txt"
    first = start_process("child", db_url, str(side_effects))
    # Killed inside "between": the child is started (and recorded), the wait not reached yet.
    await _kill_when(first, lambda: {name for name, _, _ in timed_lines(side_effects)} >= {"between", "work"})
    assert _rows(db_path, "SELECT job_name, parent_run_id IS NOT NULL FROM durably_runs ORDER BY id") == [
        ("parent", 0),
        ("child", 1),
    ]
    assert _rows(db_path, "SELECT name, kind FROM durably_steps ORDER BY seq") == [("start", "child")]
    _open_gates(side_effects, "between", "child")
    second = start_process("child", db_url, str(side_effects))
    result = finish_process(second)
    assert result["disposition"] == "idempotent" and result["status"] == "completed"
    assert result["output"] == {"worked_by": result["pid"]}
    [(parent_id, child_id)] = _rows(
        db_path, "SELECT parent_run_id, id FROM durably_runs WHERE job_name = 'child'"
    )
    assert parent_id == result["id"]
    assert _rows(db_path, f"SELECT status FROM durably_runs WHERE id = '{child_id}'") == [("completed",)]
    names = [(name, pid) for name, pid, _ in timed_lines(side_effects)]
    # Each interrupted step ran again in the second process; nothing else ran twice.
    assert sorted(names) == sorted(
        [("between", first.pid), ("work", first.pid), ("between", result["pid"]), ("work", result["pid"])]
    )


async def test_sigkill_while_a_parent_waits_for_its_child_then_restart_completes_both(
    db_url, db_path, tmp_path
):
    side_effects = tmp_path / "side-effects.txt"
    _open_gates(side_effects, "between")
    first = start_process("child", db_url, str(side_effects))
    await _kill_when(
        first,
        lambda: (
            _rows(db_path, "SELECT status, wait_reason FROM durably_runs WHERE job_name = 'parent'")
            == [("waiting", "child")]
            and "work" in {name for name, _, _ in timed_lines(side_effects)}
        ),
    )
    [(wait_child,)] = _rows(db_path, "SELECT wait_child_id FROM durably_runs WHERE job_name = 'parent'")
    [(child_id,)] = _rows(db_path, "SELECT id FROM durably_runs WHERE job_name = 'child'")
    assert wait_child == child_id
    _open_gates(side_effects, "child")
    second = start_process("child", db_url, str(side_effects))
    result = finish_process(second)
    assert result["status"] == "completed" and result["output"] == {"worked_by": result["pid"]}
    assert _rows(db_path, "SELECT COUNT(*) FROM durably_runs WHERE job_name = 'child'") == [(1,)]
    names = [(name, pid) for name, pid, _ in timed_lines(side_effects)]
    assert names.count(("between", first.pid)) == 1 and not any(
        n == "between" and p == result["pid"] for n, p in names
    )


async def test_a_client_without_the_jobs_sees_the_tree(make_durably, db_url):
    invoice = invoice_job()
    order = order_job(invoice)
    durably = await make_durably(invoice, order)
    run = await durably.trigger(order)
    assert (await durably.wait_for_run(run.id, timeout=30)).status == "completed"
    async with Durably(db_url, worker=False, jobs=[]) as client:
        [child] = await client.get_runs(parent_run_id=run.id)
        assert child.parent_run_id == run.id and child.output == {"order": 4, "total": 40}
        assert (await client.get_run(run.id)).parent_run_id is None
