"""The statements one single-step run costs on SQLite (issue 15's hot path), counted.

No timings: the count and the kinds of statements are what the database is asked to do,
whatever the machine. A run through the queue is four commits (trigger, claim, step,
outcome); one that ``trigger_and_wait`` starts at once on an idle worker is three (created
leased, step, outcome). Everything else on the path is a read. A change that adds a
statement to every run fails here and has to say why.
"""

from __future__ import annotations

from typing import Any

from durably_web import Durably, StepContext, define_job


async def noop() -> None:
    return None


@define_job("hot-path-one-step")
async def one_step(step: StepContext, payload: Any) -> None:
    await step.run("only", noop)


def kind(statement: str) -> str:
    """The statement's first keyword (past its leading comment lines)."""
    lines = [line for line in statement.splitlines() if line.strip() and not line.lstrip().startswith("--")]
    return lines[0].split()[0].upper()


async def traced(durably: Durably, call: Any) -> list[str]:
    """The kinds of the statements ``call()`` makes, and its result."""
    statements: list[str] = []
    raw = durably._store._conn._conn  # the stdlib sqlite3 connection under the store
    raw.set_trace_callback(statements.append)
    try:
        run = await call()
    finally:
        raw.set_trace_callback(None)
    assert run.status == "completed"
    return [kind(s) for s in statements]


async def test_a_single_step_run_through_the_queue_is_four_writes_and_a_few_reads(tmp_path) -> None:
    async with Durably(f"sqlite:///{tmp_path / 'hot.db'}", jobs=[one_step]) as durably:
        await durably.trigger_and_wait(one_step, None, timeout=30)  # warm: the first claim loop turns

        async def trigger_then_wait() -> Any:
            run = await durably.trigger(one_step, None)
            return await durably.wait_for_run(run.id, timeout=30)

        kinds = await traced(durably, trigger_then_wait)
    # Writes: the trigger's INSERT, the claim's UPDATE, the step's INSERT, and the outcome's
    # UPDATE (in a transaction, since it may wake a parent): four commits.
    writes = [k for k in kinds if k in ("INSERT", "UPDATE", "DELETE")]
    assert writes == ["INSERT", "UPDATE", "INSERT", "UPDATE"], kinds
    assert kinds.count("BEGIN") == 1 and kinds.count("COMMIT") == 1, kinds
    # Reads: overdue deadlines, the claim's look (before and after the run), the waiter's
    # first read and the final run.
    assert len(kinds) <= 11, kinds


async def test_trigger_and_wait_on_an_idle_worker_is_three_writes_and_a_few_reads(tmp_path) -> None:
    async with Durably(f"sqlite:///{tmp_path / 'hot.db'}", jobs=[one_step]) as durably:
        await durably.trigger_and_wait(one_step, None, timeout=30)  # warm: the first claim loop turns
        worker = durably._worker
        assert worker is not None and worker.found_nothing_to_claim  # idle (SQLite answers at once)
        kinds = await traced(durably, lambda: durably.trigger_and_wait(one_step, None, timeout=30))
    # Writes: the run created leased to this worker (no claim), the step's INSERT, the
    # outcome's UPDATE: three commits.
    writes = [k for k in kinds if k in ("INSERT", "UPDATE", "DELETE")]
    assert writes == ["INSERT", "INSERT", "UPDATE"], kinds
    assert kinds.count("BEGIN") == 1 and kinds.count("COMMIT") == 1, kinds
    # One read: the waiter's of the final run. The worker, whose last look found nothing and
    # which nothing woke since, does not look again when the run's slot frees.
    assert kinds == ["INSERT", "INSERT", "BEGIN", "UPDATE", "COMMIT", "SELECT"], kinds


@define_job("hot-path-steps")
async def many_steps(step: StepContext, payload: int) -> None:
    for i in range(payload):
        await step.run(f"s{i}", noop)


async def test_a_step_commit_writes_about_one_page(tmp_path) -> None:
    # A step's commit cost follows the pages it writes (on OPFS each is a write through a
    # sync access handle). durably_steps is one b-tree (migration 0012): a step is one leaf,
    # plus now and then a split; with its old two indexes it wrote 3.4 pages per step.
    path = tmp_path / "pages.db"
    async with Durably(f"sqlite:///{path}", jobs=[many_steps]) as durably:
        await durably.trigger_and_wait(many_steps, 10, timeout=30)  # warm: schema, first pages
        raw = durably._store._conn._conn
        raw.execute("PRAGMA wal_autocheckpoint = 0")  # the WAL keeps every page written
        page_size = raw.execute("PRAGMA page_size").fetchone()["page_size"]

        async def frames_of(steps: int) -> int:
            raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            await durably.trigger_and_wait(many_steps, steps, timeout=60)
            return (path.with_name(path.name + "-wal").stat().st_size - 32) // (page_size + 24)

        empty = await frames_of(0)
        full = await frames_of(300)
    per_step = (full - empty) / 300
    assert per_step < 1.5, per_step
