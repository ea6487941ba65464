"""The storage contract: one suite for the ``Store`` interface, run against every backend.

Each test takes the ``store`` fixture: a migrated, empty store of one backend (an SQLite
file, SQLite in memory, PostgreSQL; the sqlite-wasm connection inside Pyodide runs this
module too, see tests/pyodide). Only the interface is used, so a backend that passes
behaves the same under the engine. Times are made-up milliseconds: the store takes ``now``
from its caller and never reads a clock for these decisions.

Run ids sort in creation order here, as the engine's ids do (durably_web/ids.py), so
"oldest" and "newest" mean the same by id and by ``created_at``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from durably_web.errors import ConflictError, ExistingRunRefusedError, NotFoundError, ValidationError
from durably_web.storage import LogRecord, NewRun, RunFilter, RunRecord, StepRecord, Store
from durably_web.storage.base import NEVER_MS, ScheduleRecord, WouldBlock

JOB = "job"
#: How long every lease below lasts unless a test says otherwise (ms).
LEASE = 1000
ERROR = '{"type": "OSError", "message": "boom"}'


def new_run(
    run_id: str,
    at: int,
    *,
    job: str = JOB,
    labels: dict[str, str] | None = None,
    idempotency_key: str | None = None,
    concurrency_key: str | None = None,
    coalesce: bool = False,
    forked_from: str | None = None,
) -> NewRun:
    return NewRun(
        run_id,
        job,
        '{"n": 1}',
        dict(labels or {}),
        idempotency_key,
        concurrency_key,
        coalesce,
        at,
        forked_from=forked_from,
    )


def step(
    run_id: str,
    index: int,
    name: str,
    *,
    output: str | None = "1",
    status: str = "completed",
    error: str | None = None,
    kind: str = "run",
    attempt: int = 1,
    at: int = 1500,
) -> StepRecord:
    return StepRecord(run_id, index, name, status, output, error, at, at + 1, kind=kind, attempt=attempt)


def failed_step(run_id: str, index: int, name: str, *, attempt: int = 1, at: int = 1500) -> StepRecord:
    return step(run_id, index, name, output=None, status="failed", error=ERROR, attempt=attempt, at=at)


async def claim(
    store: Store, now: int, *, jobs: tuple[str, ...] = (JOB,), worker: str = "w1", lease: int = LEASE
) -> RunRecord | None:
    return await store.claim_run(worker_id=worker, job_names=list(jobs), now=now, lease_until=now + lease)


async def claimed(store: Store, run_id: str, now: int, **kwargs: Any) -> RunRecord:
    """Claim and check that it is ``run_id`` that was claimed."""
    record = await claim(store, now, **kwargs)
    assert record is not None and record.id == run_id, record
    return record


async def finish(
    store: Store,
    run_id: str,
    generation: int,
    now: int,
    *,
    status: str = "completed",
    failed: StepRecord | None = None,
    drop_step_outputs: bool = False,
) -> bool:
    return await store.finish_run(
        run_id,
        generation,
        status=status,
        output_json='"done"' if status == "completed" else None,
        error_json=ERROR if status == "failed" else None,
        failed_step=failed,
        drop_step_outputs=drop_step_outputs,
        now=now,
    )


async def get(store: Store, run_id: str) -> RunRecord:
    record = await store.get_run(run_id)
    assert record is not None, f"run {run_id} is missing"
    return record


async def make_run(
    store: Store, run_id: str, status: str, *, at: int = 1000, job: str = JOB, key: str | None = None
) -> RunRecord:
    """A run created at ``at`` and brought to ``status`` through the interface.

    Claimed (if it gets that far) at ``at`` until ``at + LEASE``; finished, cancelled or
    made to wait (a sleep, due at ``at + 100_000``) at ``at + 1``.
    """
    await store.create_runs([new_run(run_id, at, job=job, concurrency_key=key)])
    if status == "cancelled":
        return await store.cancel_run(run_id, at + 1)
    if status != "pending":
        record = await claimed(store, run_id, at, jobs=(job,))
        if status in ("completed", "failed"):
            assert await finish(store, run_id, record.lease_generation, at + 1, status=status)
        elif status == "waiting":
            assert await store.wait_run(
                run_id,
                record.lease_generation,
                until=at + 100_000,
                reason="sleep",
                step_name="nap",
                now=at + 1,
            )
        else:
            assert status == "leased", status
    record = await get(store, run_id)
    assert record.status == status
    return record


def dispositions(results: list[tuple[RunRecord, str]]) -> list[tuple[str, str]]:
    return [(record.id, disposition) for record, disposition in results]


async def retry_wait(store: Store, generation: int, attempt: StepRecord, *, until: int, now: int) -> bool:
    """The leased run waits until ``until`` to retry the step whose ``attempt`` failed."""
    return await store.wait_run(
        attempt.run_id,
        generation,
        until=until,
        reason="retry",
        step_name=attempt.name,
        now=now,
        failed_attempt=attempt,
    )


async def consume(store: Store, key: int, run_id: str, generation: int, now: int, index: int = 0) -> bool:
    """Take the signal ``key`` as the outcome of the wait at position ``index``."""
    return await store.consume_signal(key, step(run_id, index, "approval", kind="signal"), generation, now)


async def wait_for_signal(
    store: Store, run_id: str, generation: int, now: int, name: str = "approval"
) -> None:
    """The leased run waits, without timeout, for the signal ``name``."""
    assert await store.wait_run(run_id, generation, until=NEVER_MS, reason="signal", step_name=name, now=now)


# --- create_runs -----------------------------------------------------------------------------


async def test_create_runs_returns_created_pending_runs_as_get_run_reads_them(store):
    results = await store.create_runs([new_run("a", 1000), new_run("b", 1001, labels={"team": "x"})])
    assert dispositions(results) == [("a", "created"), ("b", "created")]
    for record, _ in results:
        assert record == await store.get_run(record.id)
    a = results[0][0]
    assert (a.job_name, a.status, a.input_json) == (JOB, "pending", '{"n": 1}')
    assert (a.attempt, a.lease_generation) == (0, 0)
    assert (a.created_at, a.available_at, a.updated_at) == (1000, 1000, 1000)
    assert (a.output_json, a.error_json, a.started_at, a.completed_at) == (None, None, None, None)
    assert (a.lease_owner, a.lease_expires_at) == (None, None)


async def test_labels_round_trip(store):
    labels = {"team": "données", "env": "prod", "empty": "", "odd key": "a=b&c, 'd'"}
    ((created, _),) = await store.create_runs([new_run("a", 1000, labels=labels)])
    assert created.labels == labels
    assert (await get(store, "a")).labels == labels
    (listed,) = await store.list_runs(RunFilter(labels={"team": "données", "odd key": "a=b&c, 'd'"}))
    assert listed.labels == labels


async def test_an_idempotency_key_returns_the_existing_run_as_idempotent_and_writes_nothing(store):
    await store.create_runs([new_run("a", 1000, idempotency_key="order-1")])
    ((record, disposition),) = await store.create_runs([new_run("b", 2000, idempotency_key="order-1")])
    assert (record.id, disposition) == ("a", "idempotent")
    assert record == await store.get_run("a")
    assert await store.get_run("b") is None


async def test_an_idempotency_key_resolves_to_its_run_even_after_it_finished(store):
    await store.create_runs([new_run("a", 1000, idempotency_key="order-1")])
    record = await claimed(store, "a", 1000)
    assert await finish(store, "a", record.lease_generation, 1001)
    ((again, disposition),) = await store.create_runs([new_run("b", 2000, idempotency_key="order-1")])
    assert (again.id, again.status, disposition) == ("a", "completed", "idempotent")


async def test_an_idempotency_key_belongs_to_its_job(store):
    await store.create_runs([new_run("a", 1000, idempotency_key="order-1")])
    ((record, disposition),) = await store.create_runs(
        [new_run("b", 2000, job="other", idempotency_key="order-1")]
    )
    assert (record.id, disposition) == ("b", "created")


async def test_two_items_with_one_idempotency_key_in_one_call_create_one_run(store):
    results = await store.create_runs(
        [new_run("a", 1000, idempotency_key="order-1"), new_run("b", 1000, idempotency_key="order-1")]
    )
    assert dispositions(results) == [("a", "created"), ("a", "idempotent")]
    assert await store.get_run("b") is None


async def test_a_pending_run_of_the_concurrency_key_coalesces_a_new_run_that_asks_for_it(store):
    await store.create_runs([new_run("a", 1000, concurrency_key="k")])
    ((record, disposition),) = await store.create_runs(
        [new_run("b", 2000, concurrency_key="k", coalesce=True)]
    )
    assert (record.id, record.status, disposition) == ("a", "pending", "coalesced")
    assert await store.get_run("b") is None


async def test_a_pending_run_of_the_concurrency_key_refuses_a_new_run_that_does_not_coalesce(store):
    await store.create_runs([new_run("a", 1000, concurrency_key="k")])
    with pytest.raises(ConflictError):
        await store.create_runs([new_run("b", 2000), new_run("c", 2000, concurrency_key="k")])
    # Nothing of the call was written, not even the item before the conflicting one.
    assert await store.get_run("b") is None and await store.get_run("c") is None
    assert [r.id for r in await store.list_runs(RunFilter())] == ["a"]


async def test_items_of_one_call_coalesce_into_the_run_the_call_created(store):
    results = await store.create_runs(
        [new_run("a", 1000, concurrency_key="k"), new_run("b", 1000, concurrency_key="k", coalesce=True)]
    )
    assert dispositions(results) == [("a", "created"), ("a", "coalesced")]


async def test_items_of_one_call_conflict_over_a_concurrency_key_and_nothing_is_written(store):
    with pytest.raises(ConflictError):
        await store.create_runs(
            [new_run("a", 1000, concurrency_key="k"), new_run("b", 1000, concurrency_key="k")]
        )
    assert await store.list_runs(RunFilter()) == []


@pytest.mark.parametrize("status", ["leased", "waiting", "completed", "failed", "cancelled"])
async def test_only_a_pending_run_holds_its_concurrency_key_against_new_runs(store, status):
    await make_run(store, "a", status, key="k")
    ((record, disposition),) = await store.create_runs([new_run("b", 2000, concurrency_key="k")])
    assert (record.id, disposition) == ("b", "created")


async def test_accept_existing_is_asked_only_about_runs_this_call_did_not_insert(store):
    await store.create_runs(
        [new_run("a", 1000, idempotency_key="i1"), new_run("b", 1001, concurrency_key="k")]
    )
    asked: list[str] = []

    def accept(record: RunRecord) -> bool:
        asked.append(record.id)
        return True

    results = await store.create_runs(
        [
            new_run("c", 2000, idempotency_key="i2"),
            new_run("d", 2000, idempotency_key="i2"),  # resolves to c, which this call inserted
            new_run("e", 2000, idempotency_key="i1"),
            new_run("f", 2000, concurrency_key="k", coalesce=True),
        ],
        accept_existing=accept,
    )
    assert dispositions(results) == [
        ("c", "created"),
        ("c", "idempotent"),
        ("a", "idempotent"),
        ("b", "coalesced"),
    ]
    assert set(asked) == {"a", "b"}


async def test_accept_existing_refusing_raises_with_every_refused_record_and_writes_nothing(store):
    await store.create_runs(
        [new_run("a", 1000, idempotency_key="i1"), new_run("b", 1001, concurrency_key="k")]
    )
    with pytest.raises(ExistingRunRefusedError) as refused:
        await store.create_runs(
            [
                new_run("c", 2000),  # inserted first, then rolled back
                new_run("d", 2000, idempotency_key="i1"),
                new_run("e", 2000, concurrency_key="k", coalesce=True),
            ],
            accept_existing=lambda record: False,
        )
    assert sorted(record.id for record in refused.value.records) == ["a", "b"]
    assert all(isinstance(record, RunRecord) for record in refused.value.records)
    assert [r.id for r in await store.list_runs(RunFilter())] == ["b", "a"]


# --- get_run, list_runs ----------------------------------------------------------------------


async def test_get_run_of_an_unknown_id_is_none(store):
    assert await store.get_run("no-such-run") is None


async def test_get_run_nowait_answers_like_get_run_or_raises_would_block(store):
    await store.create_runs([new_run("a", 1000)])
    for run_id in ("a", "no-such-run"):
        try:
            answer = store.get_run_nowait(run_id)
        except WouldBlock:
            continue  # allowed: the caller asks get_run instead
        assert answer == await store.get_run(run_id)


async def test_list_runs_is_newest_first(store):
    await store.create_runs([new_run("b", 1001), new_run("a", 1000)])
    await store.create_runs([new_run("c", 1002)])
    assert [r.id for r in await store.list_runs(RunFilter())] == ["c", "b", "a"]


async def test_list_runs_filters_by_status(store):
    for run_id, status in [("a", "pending"), ("b", "leased"), ("c", "completed"), ("d", "cancelled")]:
        await make_run(store, run_id, status, job=f"job-{run_id}")
    found = await store.list_runs(RunFilter(statuses=["pending", "cancelled"]))
    assert [r.id for r in found] == ["d", "a"]


async def test_list_runs_filters_by_job_name(store):
    await store.create_runs(
        [new_run("a", 1000, job="x"), new_run("b", 1001, job="y"), new_run("c", 1002, job="z")]
    )
    assert [r.id for r in await store.list_runs(RunFilter(job_names=["x", "z"]))] == ["c", "a"]


async def test_list_runs_label_filter_needs_every_pair(store):
    await store.create_runs(
        [
            new_run("a", 1000, labels={"team": "a", "env": "prod"}),
            new_run("b", 1001, labels={"team": "a"}),
            new_run("c", 1002, labels={"team": "b", "env": "prod"}),
        ]
    )

    async def ids(labels: dict[str, str]) -> list[str]:
        return [r.id for r in await store.list_runs(RunFilter(labels=labels))]

    assert await ids({"team": "a", "env": "prod"}) == ["a"]
    assert await ids({"team": "a"}) == ["b", "a"]
    assert await ids({"env": "prod"}) == ["c", "a"]
    assert await ids({"team": "c"}) == []
    assert await ids({}) == ["c", "b", "a"]


async def test_list_runs_pages_with_limit_and_offset(store):
    await store.create_runs([new_run(run_id, 1000 + i) for i, run_id in enumerate("abcde")])

    async def page(limit: int, offset: int) -> list[str]:
        return [r.id for r in await store.list_runs(RunFilter(limit=limit, offset=offset))]

    assert await page(2, 0) == ["e", "d"]
    assert await page(2, 2) == ["c", "b"]
    assert await page(2, 4) == ["a"]
    assert await page(2, 5) == []


# --- cancel_run, delete_run, purge_runs ------------------------------------------------------


async def test_cancel_run_cancels_a_pending_run(store):
    await store.create_runs([new_run("a", 1000)])
    record = await store.cancel_run("a", 2000)
    assert (record.status, record.completed_at) == ("cancelled", 2000)
    assert record == await store.get_run("a")
    assert await claim(store, 3000) is None


async def test_cancel_run_cancels_a_leased_run_which_keeps_its_lease(store):
    leased = await make_run(store, "a", "leased")
    record = await store.cancel_run("a", 1500)
    assert (record.status, record.completed_at) == ("cancelled", 1500)
    # Its handler is still stopping: the lease (the concurrency key's hold) stays until released.
    assert record.lease_generation == leased.lease_generation
    assert record.lease_expires_at == leased.lease_expires_at


async def test_cancel_run_cancels_a_waiting_run(store):
    await make_run(store, "a", "waiting")
    assert (await store.cancel_run("a", 1500)).status == "cancelled"
    assert await claim(store, 200_000) is None


async def test_cancelling_a_cancelled_run_returns_it_as_is(store):
    await store.create_runs([new_run("a", 1000)])
    first = await store.cancel_run("a", 2000)
    again = await store.cancel_run("a", 3000)
    assert again == first and again.completed_at == 2000


async def test_cancel_run_of_an_unknown_run_raises_not_found(store):
    with pytest.raises(NotFoundError):
        await store.cancel_run("no-such-run", 1000)


@pytest.mark.parametrize("status", ["completed", "failed"])
async def test_cancel_run_of_a_finished_run_raises_conflict(store, status):
    await make_run(store, "a", status)
    with pytest.raises(ConflictError):
        await store.cancel_run("a", 2000)
    assert (await get(store, "a")).status == status


async def test_delete_run_deletes_the_run_with_its_steps_logs_signals_and_attempts(store):
    record = await make_run(store, "a", "leased")
    generation = record.lease_generation
    assert await retry_wait(store, generation, failed_step("a", 0, "s"), until=1200, now=1100)
    record = await claimed(store, "a", 1200)
    assert await store.record_step(step("a", 0, "s"), record.lease_generation)
    await store.append_log(LogRecord("a", "s", "info", "hello", None, 1300))
    await store.send_signal("a", "approval", "{}", None, 1300)
    assert await finish(store, "a", record.lease_generation, 1400)

    deleted = await store.delete_run("a")
    assert (deleted.id, deleted.status) == ("a", "completed")
    assert await store.get_run("a") is None
    assert await store.list_steps("a") == []
    assert await store.list_logs("a") == []
    assert await store.list_step_attempts("a") == []
    assert await store.count_step_attempts("a") == {}
    assert await store.next_signal("a", "approval") is None


async def test_a_deleted_runs_idempotency_key_creates_a_new_run(store):
    await store.create_runs([new_run("a", 1000, idempotency_key="order-1")])
    await store.delete_run("a")
    ((record, disposition),) = await store.create_runs([new_run("b", 2000, idempotency_key="order-1")])
    assert (record.id, disposition) == ("b", "created")


async def test_delete_run_of_an_unknown_run_raises_not_found(store):
    with pytest.raises(NotFoundError):
        await store.delete_run("no-such-run")


async def test_delete_run_of_a_leased_run_raises_conflict_and_keeps_it(store):
    await make_run(store, "a", "leased")
    with pytest.raises(ConflictError):
        await store.delete_run("a")
    assert (await get(store, "a")).status == "leased"


async def test_purge_runs_deletes_only_terminal_runs_that_ended_before_the_time(store):
    await make_run(store, "r1", "completed", at=1000)  # ended at 1001
    await make_run(store, "r2", "failed", at=1100)
    await make_run(store, "r3", "cancelled", at=1200)
    await make_run(store, "r4", "completed", at=2999)  # ended at 3000: not before 3000
    await make_run(store, "r5", "completed", at=4000)
    await make_run(store, "r6", "pending", at=500)
    await make_run(store, "r7", "waiting", at=600, job="other")
    await make_run(store, "r8", "leased", at=700, job="third")
    leased = await get(store, "r8")
    assert await store.record_step(step("r8", 0, "s"), leased.lease_generation)

    assert await store.purge_runs(3000, None) == 3
    assert sorted(r.id for r in await store.list_runs(RunFilter())) == ["r4", "r5", "r6", "r7", "r8"]
    assert await store.list_steps("r8") != []


async def test_purge_runs_deletes_the_purged_runs_steps_and_logs(store):
    record = await make_run(store, "a", "leased")
    assert await store.record_step(step("a", 0, "s"), record.lease_generation)
    await store.append_log(LogRecord("a", None, "info", "hello", None, 1100))
    assert await finish(store, "a", record.lease_generation, 1200)
    assert await store.purge_runs(5000, None) == 1
    assert await store.list_steps("a") == [] and await store.list_logs("a") == []


async def test_purge_runs_deletes_no_more_than_the_limit(store):
    for i, run_id in enumerate(["a", "b", "c"]):
        await make_run(store, run_id, "completed", at=1000 + 100 * i)
    assert await store.purge_runs(5000, 2) == 2
    assert len(await store.list_runs(RunFilter())) == 1
    assert await store.purge_runs(5000, 2) == 1
    assert await store.purge_runs(5000, 2) == 0


# --- claim_run, expire_leases ----------------------------------------------------------------


async def test_claim_run_takes_the_oldest_runnable_run_first(store):
    await store.create_runs([new_run("b", 1001), new_run("c", 1002)])
    await store.create_runs([new_run("a", 1000)])
    assert [(await claimed(store, run_id, 2000)).id for run_id in "abc"] == ["a", "b", "c"]
    assert await claim(store, 2000) is None


async def test_claim_run_takes_only_runs_of_the_given_job_names(store):
    await store.create_runs(
        [new_run("a", 1000, job="x"), new_run("b", 1001, job="y"), new_run("c", 1002, job="z")]
    )
    assert await claim(store, 2000, jobs=("w",)) is None
    assert (await claimed(store, "b", 2000, jobs=("y", "z"))).job_name == "y"
    assert (await claimed(store, "c", 2000, jobs=("y", "z"))).job_name == "z"
    assert await claim(store, 2000, jobs=("y", "z")) is None


async def test_claim_run_does_not_take_a_run_before_it_is_available(store):
    await store.create_runs([new_run("a", 5000)])
    assert await claim(store, 4999) is None
    await claimed(store, "a", 5000)


async def test_claim_run_leases_the_run_and_increments_generation_and_attempt(store):
    await store.create_runs([new_run("a", 1000)])
    record = await claimed(store, "a", 2000, worker="w1", lease=1000)
    assert (record.status, record.lease_owner, record.lease_expires_at) == ("leased", "w1", 3000)
    assert (record.lease_generation, record.attempt, record.started_at) == (1, 1, 2000)
    assert record == await store.get_run("a")


async def test_claim_run_takes_a_run_over_once_its_lease_has_expired(store):
    await store.create_runs([new_run("a", 1000)])
    await claimed(store, "a", 2000, worker="w1", lease=1000)
    assert await claim(store, 2999, worker="w2") is None  # live until 3000
    record = await claimed(store, "a", 3000, worker="w2")
    assert (record.lease_owner, record.lease_generation, record.attempt) == ("w2", 2, 2)
    assert record.started_at == 2000  # when it first started


async def test_create_leased_run_inserts_a_run_already_claimed_by_the_worker(store):
    new = NewRun("a", JOB, '{"n": 1}', {"team": "x"}, None, None, False, 1000, priority=3, version="v1")
    record = await store.create_leased_run(new, worker_id="w1", lease_until=2000)
    assert (record.status, record.lease_owner, record.lease_expires_at) == ("leased", "w1", 2000)
    assert (record.lease_generation, record.attempt, record.started_at) == (1, 1, 1000)
    assert (record.priority, record.version, record.labels) == (3, "v1", {"team": "x"})
    assert record == await store.get_run("a")
    assert [r.id for r in await store.list_runs(RunFilter(labels={"team": "x"}))] == ["a"]
    assert await claim(store, 1999, worker="w2") is None  # its lease is live: nobody takes it
    # It is an ordinary leased run: renewed, fenced by its generation, finished by it.
    assert await store.renew_leases([("a", 1)], 1500, 2500) == []
    assert not await store.record_step(step("a", 0, "s0"), 2)
    assert await store.record_step(step("a", 0, "s0"), 1)
    assert await finish(store, "a", 1, 1600)
    assert (await store.get_run("a")).status == "completed"


async def test_a_run_created_leased_is_taken_over_once_its_lease_expires(store):
    new = NewRun("a", JOB, "{}", {}, None, None, False, 1000)
    await store.create_leased_run(new, worker_id="w1", lease_until=2000)
    record = await claimed(store, "a", 2000, worker="w2")  # its worker died: another resumes it
    assert (record.lease_owner, record.lease_generation, record.attempt) == ("w2", 2, 2)
    assert record.started_at == 1000


async def test_a_released_run_created_leased_is_pending_and_claimable(store):
    new = NewRun("a", JOB, "{}", {}, None, None, False, 1000)
    await store.create_leased_run(new, worker_id="w1", lease_until=9000)
    await store.release_run("a", 1, 1100)
    assert (await store.get_run("a")).status == "pending"
    await claimed(store, "a", 1200)


@pytest.mark.parametrize(
    "keys",
    [{"idempotency_key": "k"}, {"concurrency_key": "k"}, {"debounce_ms": 100, "concurrency_key": "k"}],
    ids=["idempotency", "concurrency", "debounce"],
)
async def test_create_leased_run_refuses_a_run_with_keys_to_resolve(store, keys):
    base = {"idempotency_key": None, "concurrency_key": None}
    base.update({k: v for k, v in keys.items() if k in base})
    new = NewRun(
        "a",
        JOB,
        "{}",
        {},
        base["idempotency_key"],
        base["concurrency_key"],
        False,
        1000,
        debounce_ms=keys.get("debounce_ms"),
    )
    with pytest.raises(ValidationError):
        await store.create_leased_run(new, worker_id="w1", lease_until=2000)
    assert await store.get_run("a") is None  # nothing written


async def test_claim_run_skips_a_run_whose_concurrency_key_has_another_run_under_a_live_lease(store):
    await store.create_runs([new_run("a", 1000, concurrency_key="k")])
    first = await claimed(store, "a", 2000, lease=5000)
    await store.create_runs(
        [new_run("b", 2100, concurrency_key="k"), new_run("c", 2200, concurrency_key="other")]
    )
    await claimed(store, "c", 2300)  # another key is not held
    assert await claim(store, 2400) is None
    assert await finish(store, "a", first.lease_generation, 2500)
    await claimed(store, "b", 2600)


async def test_a_cancelled_run_still_holding_its_lease_holds_its_concurrency_key(store):
    await store.create_runs([new_run("a", 1000, concurrency_key="k")])
    await claimed(store, "a", 2000, lease=1000)
    await store.cancel_run("a", 2100)
    await store.create_runs([new_run("b", 2200, concurrency_key="k")])
    assert await claim(store, 2999) is None
    await claimed(store, "b", 3000)  # the cancelled run's lease ran out


async def test_a_waiting_run_does_not_hold_its_concurrency_key(store):
    await make_run(store, "a", "waiting", key="k")
    await store.create_runs([new_run("b", 2000, concurrency_key="k")])
    await claimed(store, "b", 2000)


async def test_expire_leases_makes_every_leased_run_claimable_at_once_and_counts_them(store):
    await store.create_runs([new_run("a", 1000), new_run("b", 1001, concurrency_key="k"), new_run("c", 1002)])
    await claimed(store, "a", 2000, lease=1000)
    await claimed(store, "b", 2000, lease=1000)
    await claimed(store, "c", 2000, lease=500)  # already expired at 2600: not counted
    await store.cancel_run("b", 2100)  # a cancelled run's lease is a live lease too
    await store.create_runs([new_run("d", 2200, concurrency_key="k")])
    assert await store.expire_leases(2600) == 2
    assert (await claimed(store, "a", 2600)).attempt == 2
    await claimed(store, "c", 2600)
    await claimed(store, "d", 2600)  # b no longer holds the key
    assert await claim(store, 2600) is None
    assert (await get(store, "b")).status == "cancelled"


# --- renew_leases ----------------------------------------------------------------------------


async def test_renew_leases_extends_live_leases(store):
    await store.create_runs([new_run("a", 1000), new_run("b", 1001)])
    a = await claimed(store, "a", 2000, lease=1000)
    b = await claimed(store, "b", 2000, lease=1000)
    assert await store.renew_leases([("a", a.lease_generation), ("b", b.lease_generation)], 2500, 6000) == []
    assert [(await get(store, run_id)).lease_expires_at for run_id in "ab"] == [6000, 6000]
    assert await claim(store, 5999) is None


async def test_renew_leases_reports_a_lease_taken_over_as_lost(store):
    await store.create_runs([new_run("a", 1000)])
    await claimed(store, "a", 2000, lease=1000)
    await claimed(store, "a", 3000, worker="w2", lease=3000)  # generation 2, until 6000
    assert await store.renew_leases([("a", 1)], 3100, 9000) == ["a"]
    record = await get(store, "a")
    assert (record.lease_owner, record.lease_expires_at) == ("w2", 6000)


async def test_renew_leases_reports_runs_that_are_not_leased_as_lost(store):
    for run_id, status in [("a", "pending"), ("b", "waiting"), ("c", "completed"), ("d", "failed")]:
        await make_run(store, run_id, status, job=f"job-{run_id}")
    leases = [("a", 0), ("b", 1), ("c", 1), ("d", 1), ("no-such-run", 1)]
    assert sorted(await store.renew_leases(leases, 1100, 9000)) == ["a", "b", "c", "d", "no-such-run"]
    assert await claim(store, 1100, jobs=("job-a",)) is not None  # a was not leased by the call


async def test_a_cancelled_runs_lease_is_lost_to_renew_leases_but_renewed_with_cancelled(store):
    record = await make_run(store, "a", "leased")  # until 2000
    await store.cancel_run("a", 1100)
    assert await store.renew_leases([("a", record.lease_generation)], 1200, 5000) == ["a"]
    assert (await get(store, "a")).lease_expires_at == 2000
    assert await store.renew_leases([("a", record.lease_generation)], 1200, 5000, cancelled=True) == []
    assert (await get(store, "a")).lease_expires_at == 5000


async def test_renew_leases_with_cancelled_does_not_revive_an_expired_lease(store):
    record = await make_run(store, "a", "leased")  # until 2000
    await store.cancel_run("a", 1100)
    assert await store.renew_leases([("a", record.lease_generation)], 2000, 5000, cancelled=True) == ["a"]


# --- release_run -----------------------------------------------------------------------------


async def test_a_released_run_is_pending_and_claimable_again_at_once(store):
    await store.create_runs([new_run("a", 1000)])
    await claimed(store, "a", 1100, lease=8000)
    await store.release_run("a", 1, 1200)
    record = await get(store, "a")
    assert (record.status, record.lease_owner, record.attempt) == ("pending", None, 1)
    again = await claimed(store, "a", 1200, worker="w2")
    assert (again.attempt, again.lease_generation) == (2, 2)


async def test_a_released_run_stays_leased_with_an_expired_lease_while_its_key_has_a_pending_run(store):
    # At most one pending run per concurrency key: with one pending, the released run stays
    # leased with its lease expired, which is just as claimable (and older, so first).
    await store.create_runs([new_run("a", 1000, concurrency_key="k")])
    await claimed(store, "a", 1100, lease=8000)
    await store.create_runs([new_run("b", 1300, concurrency_key="k")])
    await store.release_run("a", 1, 1400)
    record = await get(store, "a")
    assert (record.status, record.lease_owner, record.lease_expires_at) == ("leased", None, 1400)
    await claimed(store, "a", 1400)


async def test_a_released_cancelled_run_stays_cancelled_and_frees_its_key(store):
    await store.create_runs([new_run("a", 1000, concurrency_key="k")])
    await claimed(store, "a", 1100, lease=8000)
    await store.cancel_run("a", 1500)
    await store.create_runs([new_run("b", 1550, concurrency_key="k")])
    await store.release_run("a", 1, 1600)
    record = await get(store, "a")
    assert (record.status, record.lease_owner, record.lease_expires_at) == ("cancelled", None, 1600)
    await claimed(store, "b", 1600)


@pytest.mark.parametrize("status", ["waiting", "completed", "failed"])
async def test_release_run_of_a_run_that_is_not_leased_changes_nothing(store, status):
    before = await make_run(store, "a", status)
    await store.release_run("a", before.lease_generation, 1500)
    assert await store.get_run("a") == before


# --- fencing (every fenced write) ------------------------------------------------------------


async def test_store_writes_are_fenced_by_lease_generation(store):
    await store.create_runs([NewRun("r1", "job", "null", {}, None, None, False, 1000)])
    first = await store.claim_run(worker_id="w1", job_names=["job"], now=1000, lease_until=2000)
    assert first is not None and first.lease_generation == 1 and first.attempt == 1
    # A live lease is not claimable; an expired one is.
    assert await store.claim_run(worker_id="w2", job_names=["job"], now=1500, lease_until=2500) is None
    assert await store.claim_run(worker_id="w2", job_names=["other"], now=2500, lease_until=3500) is None
    second = await store.claim_run(worker_id="w2", job_names=["job"], now=2000, lease_until=3000)
    assert second is not None and second.lease_generation == 2 and second.attempt == 2

    step = StepRecord("r1", 0, "s", "completed", "1", None, 1000, 1001)
    assert await store.record_step(step, generation=1) is False
    assert await store.set_progress("r1", 1, 1, 2, "old", 2001) is False
    assert await store.renew_leases([("r1", 1)], 2001, 9999) == ["r1"]
    await store.release_run("r1", 1, 2001)
    assert (
        await store.finish_run(
            "r1",
            1,
            status="completed",
            output_json="1",
            error_json=None,
            failed_step=None,
            drop_step_outputs=False,
            now=2001,
        )
        is False
    )
    current = await store.get_run("r1")
    assert (current.status, current.lease_owner, current.lease_expires_at) == ("leased", "w2", 3000)
    assert await store.list_steps("r1") == []

    assert await store.renew_leases([("r1", 2)], 2100, 4000) == []
    assert await store.record_step(step, generation=2) is True
    assert (
        await store.finish_run(
            "r1",
            2,
            status="completed",
            output_json="1",
            error_json=None,
            failed_step=None,
            drop_step_outputs=False,
            now=2200,
        )
        is True
    )
    assert (await store.get_run("r1")).status == "completed"
    assert (
        await store.record_step(StepRecord("r1", 1, "t", "completed", "2", None, 1, 2), generation=2) is False
    )


async def test_an_expired_lease_is_not_renewed_even_before_anyone_took_the_run_over(store):
    # Once a lease lapsed, another run of its concurrency key may be claimed; renewing the
    # lapsed one late would let both run.
    await store.create_runs([NewRun("a", "job", "null", {}, None, "k", False, 1000)])
    first = await store.claim_run(worker_id="w1", job_names=["job"], now=1000, lease_until=2000)
    assert first is not None and first.id == "a"
    await store.create_runs([NewRun("b", "job", "null", {}, None, "k", False, 1001)])
    assert await store.claim_run(worker_id="w2", job_names=["job"], now=1500, lease_until=2500) is None
    assert await store.renew_leases([("a", 1)], 1999, 3000) == []  # live: renewed until 3000
    assert await store.renew_leases([("a", 1)], 3001, 4000) == ["a"]  # lapsed at 3000
    current = await store.get_run("a")
    assert current is not None and current.lease_expires_at == 3000
    second = await store.claim_run(worker_id="w2", job_names=["job"], now=3001, lease_until=5000)
    assert second is not None  # the key is free again: one of its runs may start


@pytest.mark.parametrize("status", ["pending", "waiting", "completed", "cancelled"])
async def test_fenced_writes_to_a_run_that_is_not_leased_are_refused(store, status):
    before = await make_run(store, "a", status)
    generation = before.lease_generation
    assert await store.record_step(step("a", 0, "s"), generation) is False
    assert await store.set_progress("a", generation, 1, 2, "late", 1500) is False
    assert await finish(store, "a", generation, 1500) is False
    assert await store.wait_run("a", generation, until=9000, reason="sleep", step_name="s", now=1500) is False
    assert await store.get_run("a") == before
    assert await store.list_steps("a") == []


# --- record_step, list_steps -----------------------------------------------------------------


async def test_list_steps_is_in_execution_order_and_round_trips_every_field(store):
    record = await make_run(store, "a", "leased")
    steps = [
        step("a", 1, "nap", output="5000", kind="sleep", at=1200),
        step("a", 0, "fetch", output='{"rows": [1, 2]}', attempt=3, at=1100),
        step("a", 2, "approval", output='{"payload": {"by": "ana"}}', kind="signal", at=1300),
    ]
    for s in steps:
        assert await store.record_step(s, record.lease_generation) is True
    assert await store.list_steps("a") == sorted(steps, key=lambda s: s.index)


async def test_list_steps_of_a_run_without_steps_is_empty(store):
    assert await store.list_steps("no-such-run") == []
    await store.create_runs([new_run("a", 1000)])
    assert await store.list_steps("a") == []


async def test_a_completed_step_is_never_replaced(store):
    record = await make_run(store, "a", "leased")
    assert await store.record_step(step("a", 0, "s", output='"first"'), record.lease_generation)
    await store.record_step(step("a", 0, "s", output='"second"'), record.lease_generation)
    (kept,) = await store.list_steps("a")
    assert kept.output_json == '"first"'


async def test_after_resume_the_failed_steps_position_takes_its_completed_step(store):
    record = await make_run(store, "a", "leased")
    assert await store.record_step(step("a", 0, "fetch"), record.lease_generation)
    assert await finish(
        store, "a", record.lease_generation, 1100, status="failed", failed=failed_step("a", 1, "save")
    )
    await store.resume_run("a", 2000)
    again = await claimed(store, "a", 2000)
    assert await store.record_step(step("a", 1, "save", output='"saved"', attempt=2), again.lease_generation)
    assert [(s.index, s.name, s.status, s.output_json) for s in await store.list_steps("a")] == [
        (0, "fetch", "completed", "1"),
        (1, "save", "completed", '"saved"'),
    ]


async def test_list_steps_completed_only_leaves_out_the_failed_step(store):
    record = await make_run(store, "a", "leased")
    done = step("a", 0, "fetch")
    assert await store.record_step(done, record.lease_generation)
    assert await finish(
        store, "a", record.lease_generation, 1100, status="failed", failed=failed_step("a", 1, "save")
    )
    assert [s.status for s in await store.list_steps("a")] == ["completed", "failed"]
    assert await store.list_steps("a", completed_only=True) == [done]


# --- set_progress, finish_run ----------------------------------------------------------------


async def test_set_progress_is_stored_on_the_leased_run(store):
    record = await make_run(store, "a", "leased")
    assert await store.set_progress("a", record.lease_generation, 3, 10, "three of ten", 1500) is True
    current = await get(store, "a")
    assert (current.progress_current, current.progress_total) == (3, 10)
    assert current.progress_message == "three of ten"
    assert await store.set_progress("a", record.lease_generation, 4, None, None, 1600) is True
    current = await get(store, "a")
    assert (current.progress_current, current.progress_total, current.progress_message) == (4, None, None)


async def test_finish_run_completes_a_leased_run_and_frees_its_key(store):
    record = await make_run(store, "a", "leased", key="k")
    await store.create_runs([new_run("b", 1100, concurrency_key="k")])
    assert await finish(store, "a", record.lease_generation, 1500) is True
    done = await get(store, "a")
    assert (done.status, done.completed_at) == ("completed", 1500)
    assert (done.output_json, done.error_json) == ('"done"', None)
    assert done.lease_owner is None
    await claimed(store, "b", 1500)


async def test_finish_run_fails_a_run_with_its_failed_step(store):
    record = await make_run(store, "a", "leased")
    failed = failed_step("a", 0, "save", attempt=2)
    assert await finish(store, "a", record.lease_generation, 1500, status="failed", failed=failed) is True
    done = await get(store, "a")
    assert (done.status, done.completed_at) == ("failed", 1500)
    assert (done.output_json, done.error_json) == (None, ERROR)
    assert await store.list_steps("a") == [failed]


async def test_finish_run_with_drop_step_outputs_keeps_the_steps_without_their_outputs(store):
    record = await make_run(store, "a", "leased")
    for i, name in enumerate(["fetch", "save"]):
        assert await store.record_step(step("a", i, name, output='"big"'), record.lease_generation)
    assert await finish(store, "a", record.lease_generation, 1500, drop_step_outputs=True)
    assert [(s.name, s.status, s.output_json) for s in await store.list_steps("a")] == [
        ("fetch", "completed", None),
        ("save", "completed", None),
    ]
    assert (await get(store, "a")).output_json == '"done"'  # the run's own output stays


async def test_a_run_cancelled_while_leased_cannot_be_finished(store):
    record = await make_run(store, "a", "leased")
    await store.cancel_run("a", 1100)
    assert await finish(store, "a", record.lease_generation, 1200) is False
    done = await get(store, "a")
    assert (done.status, done.output_json, done.completed_at) == ("cancelled", None, 1100)


# --- logs --------------------------------------------------------------------------------


async def test_logs_are_listed_per_run_in_the_order_they_were_appended(store):
    await store.create_runs([new_run("a", 1000), new_run("b", 1001)])
    logs = [
        LogRecord("a", "fetch", "info", "first", '{"n": 1}', 1200),
        LogRecord("b", None, "warning", "other run", None, 1100),
        LogRecord("a", None, "error", "second, earlier clock", None, 1100),
    ]
    for log in logs:
        await store.append_log(log)
    assert await store.list_logs("a") == [logs[0], logs[2]]
    assert await store.list_logs("b") == [logs[1]]
    assert await store.list_logs("no-such-run") == []


# --- wait_run, step attempts ---------------------------------------------------------------


async def test_wait_run_makes_the_run_wait_until_the_given_time_without_a_lease(store):
    record = await make_run(store, "a", "leased")
    assert await store.wait_run(
        "a",
        record.lease_generation,
        until=5000,
        reason="signal",
        step_name="approval",
        now=1100,
        deadline=5000,
    )
    waiting = await get(store, "a")
    assert (waiting.status, waiting.wake_at, waiting.available_at) == ("waiting", 5000, 5000)
    assert (waiting.wait_reason, waiting.wait_step, waiting.wait_deadline) == ("signal", "approval", 5000)
    assert (waiting.lease_owner, waiting.attempt) == (None, 1)


async def test_a_waiting_run_is_not_claimed_before_its_time_and_is_claimed_at_it(store):
    record = await make_run(store, "a", "leased")
    assert await store.wait_run(
        "a", record.lease_generation, until=5000, reason="sleep", step_name="nap", now=1100
    )
    assert await claim(store, 4999) is None
    again = await claimed(store, "a", 5000)
    assert (again.status, again.attempt, again.lease_generation) == ("leased", 2, record.lease_generation + 1)


async def test_a_wait_without_a_deadline_never_comes_due(store):
    record = await make_run(store, "a", "leased")
    await wait_for_signal(store, "a", record.lease_generation, 1100)
    waiting = await get(store, "a")
    assert (waiting.status, waiting.wake_at, waiting.wait_deadline) == ("waiting", None, None)
    assert await claim(store, NEVER_MS - 1) is None


async def test_wait_run_writes_the_failed_attempt_with_the_wait(store):
    record = await make_run(store, "a", "leased")
    attempt = failed_step("a", 0, "fetch", attempt=1)
    assert await retry_wait(store, record.lease_generation, attempt, until=5000, now=1100)
    assert await store.list_step_attempts("a") == [attempt]
    assert await store.count_step_attempts("a") == {0: (1, 1)}
    assert await store.list_steps("a") == []  # an attempt is not a step


async def test_wait_run_records_the_step_with_the_wait(store):
    record = await make_run(store, "a", "leased")
    nap = step("a", 0, "nap", output="5000", kind="sleep")
    assert await store.wait_run(
        "a", record.lease_generation, until=5000, reason="sleep", step_name="nap", now=1100, step=nap
    )
    assert await store.list_steps("a") == [nap]
    assert (await get(store, "a")).status == "waiting"


async def test_wait_run_with_a_stale_generation_writes_neither_the_attempt_nor_the_step(store):
    await store.create_runs([new_run("a", 1000)])
    await claimed(store, "a", 1000, lease=100)
    current = await claimed(store, "a", 1100, worker="w2")  # generation 2
    assert not await store.wait_run(
        "a",
        1,
        until=5000,
        reason="retry",
        step_name="fetch",
        now=1200,
        failed_attempt=failed_step("a", 0, "fetch"),
        step=step("a", 0, "nap", kind="sleep"),
    )
    assert await store.get_run("a") == current
    assert await store.list_step_attempts("a") == [] and await store.list_steps("a") == []


async def test_step_attempts_are_listed_by_position_then_attempt_and_counted_per_position(store):
    await store.create_runs([new_run("a", 1000)])
    attempts = [failed_step("a", 1, "save", attempt=1), failed_step("a", 0, "fetch", attempt=1)]
    attempts.append(failed_step("a", 0, "fetch", attempt=2))
    now = 1000
    for attempt in attempts:
        record = await claimed(store, "a", now)
        assert await retry_wait(store, record.lease_generation, attempt, until=now + 10, now=now + 1)
        now += 10
    assert [(a.index, a.attempt) for a in await store.list_step_attempts("a")] == [(0, 1), (0, 2), (1, 1)]
    assert await store.count_step_attempts("a") == {0: (2, 2), 1: (1, 1)}


async def test_count_step_attempts_of_a_run_without_attempts_is_empty(store):
    await store.create_runs([new_run("a", 1000)])
    assert await store.count_step_attempts("a") == {}
    assert await store.list_step_attempts("a") == []


# --- offline waits ----------------------------------------------------------------------------


async def offline_wait(
    store: Store, run_id: str, generation: int, *, until: int, now: int, failed: StepRecord | None = None
) -> bool:
    """The leased run waits for the network at "fetch" (checked again at ``until``)."""
    return await store.wait_run(
        run_id, generation, until=until, reason="offline", step_name="fetch", now=now, failed_attempt=failed
    )


async def test_wake_offline_runs_makes_every_run_waiting_for_the_network_due_now(store):
    for run_id in ("a", "b"):
        record = await make_run(store, run_id, "leased")
        assert await offline_wait(store, run_id, record.lease_generation, until=90_000, now=1100)
    assert await claim(store, 2000) is None
    assert await store.wake_offline_runs(2000) == 2
    woken = [await get(store, run_id) for run_id in ("a", "b")]
    assert [(r.status, r.wait_reason, r.wait_step, r.wake_at) for r in woken] == [
        ("waiting", "offline", "fetch", 2000)
    ] * 2
    assert (await claimed(store, "a", 2000)).attempt == 2
    assert (await claimed(store, "b", 2000)).attempt == 2
    assert await store.wake_offline_runs(2100) == 0  # nothing waits for the network any more


async def test_wake_offline_runs_leaves_every_other_run_alone(store):
    sleeping = await make_run(store, "sleep", "waiting")  # a sleep, due at 101_000
    record = await make_run(store, "retry", "leased")
    failed = failed_step("retry", 0, "fetch")
    assert await retry_wait(store, record.lease_generation, failed, until=50_000, now=1100)
    record = await make_run(store, "signal", "leased")
    await wait_for_signal(store, "signal", record.lease_generation, 1100)
    record = await make_run(store, "soon", "leased")
    assert await offline_wait(store, "soon", record.lease_generation, until=1500, now=1100)  # already due
    others = {status: await make_run(store, status, status) for status in ("pending", "leased", "completed")}
    before = {run_id: await get(store, run_id) for run_id in ("sleep", "retry", "signal", "soon", *others)}
    assert await store.wake_offline_runs(2000) == 0
    assert {run_id: await get(store, run_id) for run_id in before} == before
    assert sleeping.wake_at == 101_000


async def test_an_offline_attempt_is_listed_and_numbered_but_uses_up_no_retry(store):
    await store.create_runs([new_run("a", 1000)])
    record = await claimed(store, "a", 1000)
    failed = failed_step("a", 0, "fetch", attempt=1)
    assert await retry_wait(store, record.lease_generation, failed, until=1010, now=1001)
    record = await claimed(store, "a", 1010)
    offline = StepRecord("a", 0, "fetch", "failed", None, ERROR, 1011, 1012, attempt=2, offline=True)
    assert await offline_wait(store, "a", record.lease_generation, until=90_000, now=1012, failed=offline)
    attempts = await store.list_step_attempts("a")
    assert [(a.attempt, a.offline) for a in attempts] == [(1, False), (2, True)]
    assert attempts[1] == offline
    # Two attempts number the step; one counts against its retry budget.
    assert await store.count_step_attempts("a") == {0: (2, 1)}
    assert (await get(store, "a")).wait_reason == "offline"


async def test_an_offline_wait_of_a_stale_generation_writes_nothing_and_is_not_woken(store):
    await store.create_runs([new_run("a", 1000)])
    await claimed(store, "a", 1000, lease=100)
    current = await claimed(store, "a", 1100, worker="w2")  # generation 2
    offline = StepRecord("a", 0, "fetch", "failed", None, ERROR, 1150, 1160, offline=True)
    assert not await offline_wait(store, "a", 1, until=90_000, now=1200, failed=offline)
    assert await store.wake_offline_runs(1300) == 0
    assert await store.get_run("a") == current and await store.list_step_attempts("a") == []


# --- signals -----------------------------------------------------------------------------


async def test_a_signal_for_a_run_not_waiting_for_it_is_stored(store):
    await store.create_runs([new_run("a", 1000)])
    disposition, record = await store.send_signal("a", "approval", '{"by": "ana"}', None, 1100)
    assert (disposition, record.id, record.status) == ("stored", "a", "pending")
    key_payload = await store.next_signal("a", "approval")
    assert key_payload is not None and key_payload[1] == '{"by": "ana"}'


async def test_a_signal_delivered_to_a_run_waiting_for_it_makes_it_claimable_now(store):
    record = await make_run(store, "a", "leased")
    await wait_for_signal(store, "a", record.lease_generation, 1100)
    disposition, woken = await store.send_signal("a", "approval", '{"by": "ana"}', None, 5000)
    assert (disposition, woken.status, woken.wake_at) == ("delivered", "waiting", 5000)
    assert woken == await store.get_run("a")
    await claimed(store, "a", 5000)


async def test_a_signal_of_another_name_leaves_a_waiting_run_waiting(store):
    record = await make_run(store, "a", "leased")
    await wait_for_signal(store, "a", record.lease_generation, 1100, name="approval")
    disposition, _ = await store.send_signal("a", "rejection", "{}", None, 5000)
    assert disposition == "stored"
    assert await claim(store, 5000) is None


async def test_a_signal_wait_for_a_signal_already_sent_is_due_at_once(store):
    # The signal came while the run was still executing (stored); the wait that follows must
    # not miss it, or the run would wait forever for a signal it already has.
    record = await make_run(store, "a", "leased")
    assert (await store.send_signal("a", "approval", "{}", None, 1100))[0] == "stored"
    await wait_for_signal(store, "a", record.lease_generation, 1200)
    await claimed(store, "a", 1200)


async def test_a_repeated_signal_id_is_a_duplicate_and_writes_nothing(store):
    record = await make_run(store, "a", "leased")
    assert (await store.send_signal("a", "approval", '"first"', "sig-1", 1100))[0] == "stored"
    disposition, same = await store.send_signal("a", "approval", '"second"', "sig-1", 1200)
    assert (disposition, same.id) == ("duplicate", "a")
    found = await store.next_signal("a", "approval")
    assert found is not None and found[1] == '"first"'
    assert await consume(store, found[0], "a", record.lease_generation, 1300)
    assert await store.next_signal("a", "approval") is None  # the duplicate was never stored


async def test_a_consumed_signals_id_is_still_a_duplicate(store):
    record = await make_run(store, "a", "leased")
    await store.send_signal("a", "approval", '"first"', "sig-1", 1100)
    found = await store.next_signal("a", "approval")
    assert found is not None
    assert await consume(store, found[0], "a", record.lease_generation, 1200)
    assert (await store.send_signal("a", "approval", '"again"', "sig-1", 1300))[0] == "duplicate"


async def test_signal_ids_are_per_run(store):
    await store.create_runs([new_run("a", 1000), new_run("b", 1001)])
    assert (await store.send_signal("a", "approval", "{}", "sig-1", 1100))[0] == "stored"
    assert (await store.send_signal("b", "approval", "{}", "sig-1", 1100))[0] == "stored"


async def test_send_signal_to_an_unknown_run_raises_not_found(store):
    with pytest.raises(NotFoundError):
        await store.send_signal("no-such-run", "approval", "{}", None, 1000)


@pytest.mark.parametrize("status", ["completed", "failed", "cancelled"])
async def test_send_signal_to_a_finished_run_raises_conflict_and_stores_nothing(store, status):
    await make_run(store, "a", status)
    with pytest.raises(ConflictError):
        await store.send_signal("a", "approval", "{}", None, 2000)
    assert await store.next_signal("a", "approval") is None


async def test_next_signal_is_the_oldest_unconsumed_signal_of_that_name(store):
    record = await make_run(store, "a", "leased")
    await store.send_signal("a", "approval", '"a1"', None, 1100)
    await store.send_signal("a", "other", '"b1"', None, 1101)
    await store.send_signal("a", "approval", '"a2"', None, 1102)
    first = await store.next_signal("a", "approval")
    assert first is not None and first[1] == '"a1"'
    assert await consume(store, first[0], "a", record.lease_generation, 1200)
    second = await store.next_signal("a", "approval")
    assert second is not None and second[1] == '"a2"' and second[0] != first[0]
    other = await store.next_signal("a", "other")
    assert other is not None and other[1] == '"b1"'
    assert await store.next_signal("a", "nothing-sent") is None
    assert await store.next_signal("no-such-run", "approval") is None


async def test_consume_signal_records_the_outcome_step_and_takes_the_signal(store):
    record = await make_run(store, "a", "leased")
    await store.send_signal("a", "approval", '{"by": "ana"}', None, 1100)
    found = await store.next_signal("a", "approval")
    assert found is not None
    outcome = step("a", 0, "approval", output='{"payload": {"by": "ana"}}', kind="signal")
    assert await store.consume_signal(found[0], outcome, record.lease_generation, 1200) is True
    assert await store.list_steps("a") == [outcome]
    assert await store.next_signal("a", "approval") is None


async def test_a_signal_is_consumed_exactly_once(store):
    record = await make_run(store, "a", "leased")
    await store.send_signal("a", "approval", "{}", None, 1100)
    found = await store.next_signal("a", "approval")
    assert found is not None
    first = step("a", 0, "approval", kind="signal")
    assert await store.consume_signal(found[0], first, record.lease_generation, 1200) is True
    second = step("a", 1, "approval-again", kind="signal")
    assert await store.consume_signal(found[0], second, record.lease_generation, 1300) is False
    assert await store.list_steps("a") == [first]


async def test_consume_signal_is_fenced_and_leaves_the_signal_for_the_new_owner(store):
    await store.create_runs([new_run("a", 1000)])
    await claimed(store, "a", 1000, lease=100)
    await claimed(store, "a", 1100, worker="w2")  # generation 2
    await store.send_signal("a", "approval", '"yes"', None, 1200)
    found = await store.next_signal("a", "approval")
    assert found is not None
    assert await consume(store, found[0], "a", 1, 1300) is False
    assert await store.next_signal("a", "approval") == found
    assert await store.list_steps("a") == []
    assert await consume(store, found[0], "a", 2, 1300) is True


async def test_reject_signal_drops_the_signal_and_appends_the_log(store):
    record = await make_run(store, "a", "leased")
    await store.send_signal("a", "approval", '{"who": "x"}', "bad", 1100)
    found = await store.next_signal("a", "approval")
    assert found is not None
    why = LogRecord("a", "approval", "warning", "signal rejected", '{"signal": "approval"}', 1200)
    assert await store.reject_signal(found[0], record.lease_generation, why) is True
    assert await store.next_signal("a", "approval") is None
    assert await store.list_logs("a") == [why]
    assert await store.list_steps("a") == []


async def test_a_rejected_signals_id_may_be_sent_again(store):
    record = await make_run(store, "a", "leased")
    await store.send_signal("a", "approval", '{"who": "x"}', "bad", 1100)
    found = await store.next_signal("a", "approval")
    assert found is not None
    why = LogRecord("a", "approval", "warning", "signal rejected", None, 1200)
    assert await store.reject_signal(found[0], record.lease_generation, why)
    assert (await store.send_signal("a", "approval", '{"by": "ana"}', "bad", 1300))[0] == "stored"
    again = await store.next_signal("a", "approval")
    assert again is not None and again[1] == '{"by": "ana"}'


async def test_reject_signal_is_fenced(store):
    record = await make_run(store, "a", "leased")
    await store.send_signal("a", "approval", '{"who": "x"}', None, 1100)
    found = await store.next_signal("a", "approval")
    assert found is not None
    why = LogRecord("a", "approval", "warning", "signal rejected", None, 1200)
    assert await store.reject_signal(found[0], record.lease_generation + 1, why) is False
    assert await store.next_signal("a", "approval") == found
    assert await store.list_logs("a") == []


async def test_a_consumed_signal_cannot_be_rejected(store):
    record = await make_run(store, "a", "leased")
    await store.send_signal("a", "approval", "{}", None, 1100)
    found = await store.next_signal("a", "approval")
    assert found is not None
    assert await consume(store, found[0], "a", record.lease_generation, 1200)
    why = LogRecord("a", "approval", "warning", "signal rejected", None, 1300)
    assert await store.reject_signal(found[0], record.lease_generation, why) is False
    assert await store.list_logs("a") == []


# --- resume_run ------------------------------------------------------------------------------


async def test_resume_run_makes_a_failed_run_pending_and_keeps_its_attempt_count(store):
    await make_run(store, "a", "failed")
    resumed = await store.resume_run("a", 2000)
    assert (resumed.status, resumed.attempt, resumed.available_at) == ("pending", 1, 2000)
    assert (resumed.output_json, resumed.error_json) == (None, None)
    assert (resumed.completed_at, resumed.lease_owner) == (None, None)
    assert resumed == await store.get_run("a")
    assert (await claimed(store, "a", 2000)).attempt == 2


async def test_resume_run_makes_a_cancelled_run_pending(store):
    await make_run(store, "a", "cancelled")
    assert (await store.resume_run("a", 2000)).status == "pending"
    await claimed(store, "a", 2000)


async def test_resume_run_archives_the_failed_step_as_an_attempt_and_starts_a_fresh_retry_budget(store):
    await store.create_runs([new_run("a", 1000)])
    record = await claimed(store, "a", 1000)
    assert await retry_wait(
        store, record.lease_generation, failed_step("a", 0, "fetch", attempt=1), until=1200, now=1100
    )
    record = await claimed(store, "a", 1200)
    last = failed_step("a", 0, "fetch", attempt=2, at=1300)
    assert await finish(store, "a", record.lease_generation, 1400, status="failed", failed=last)
    assert await store.count_step_attempts("a") == {0: (1, 1)}

    await store.resume_run("a", 2000)
    assert await store.count_step_attempts("a") == {0: (2, 0)}
    assert [(a.index, a.attempt) for a in await store.list_step_attempts("a")] == [(0, 1), (0, 2)]
    assert await store.list_steps("a") == []  # the step runs again


async def test_attempts_after_a_resume_count_towards_the_fresh_budget_only(store):
    await make_run(store, "a", "leased")
    assert await finish(store, "a", 1, 1100, status="failed", failed=failed_step("a", 0, "fetch", attempt=1))
    await store.resume_run("a", 2000)
    record = await claimed(store, "a", 2000)
    assert await retry_wait(
        store, record.lease_generation, failed_step("a", 0, "fetch", attempt=2), until=2200, now=2100
    )
    assert await store.count_step_attempts("a") == {0: (2, 1)}


@pytest.mark.parametrize("status", ["pending", "leased", "waiting", "completed"])
async def test_resume_run_refuses_a_run_that_is_not_failed_or_cancelled(store, status):
    before = await make_run(store, "a", status)
    with pytest.raises(ConflictError):
        await store.resume_run("a", 1500)
    assert await store.get_run("a") == before


async def test_resume_run_refuses_a_cancelled_run_whose_handler_still_holds_its_lease(store):
    await make_run(store, "a", "leased")  # until 2000
    await store.cancel_run("a", 1100)
    with pytest.raises(ConflictError):
        await store.resume_run("a", 1999)
    assert (await get(store, "a")).status == "cancelled"
    assert (await store.resume_run("a", 2000)).status == "pending"  # the lease ran out


async def test_resume_run_refuses_while_another_run_of_its_concurrency_key_is_pending(store):
    await make_run(store, "a", "failed", key="k")
    await store.create_runs([new_run("b", 2000, concurrency_key="k")])
    with pytest.raises(ConflictError):
        await store.resume_run("a", 2100)
    assert (await get(store, "a")).status == "failed"


async def test_resume_run_of_an_unknown_run_raises_not_found(store):
    with pytest.raises(NotFoundError):
        await store.resume_run("no-such-run", 1000)


# --- fork_run --------------------------------------------------------------------------------


async def failed_source(store: Store) -> None:
    """Run "src": fetch and parse completed, save failed (steps 0, 1, 2)."""
    record = await make_run(store, "src", "leased")
    for i, name in enumerate(["fetch", "parse"]):
        assert await store.record_step(step("src", i, name, output=f'"{name}-out"'), record.lease_generation)
    assert await finish(
        store, "src", record.lease_generation, 1100, status="failed", failed=failed_step("src", 2, "save")
    )


async def test_fork_run_copies_the_completed_steps_before_from_step(store):
    await failed_source(store)
    fork = new_run("t-fork", 2000, labels={"why": "retry by hand"}, forked_from="src")
    created = await store.fork_run(fork, "src", "parse")
    assert (created.id, created.status, created.forked_from) == ("t-fork", "pending", "src")
    assert created.labels == {"why": "retry by hand"}
    assert created == await store.get_run("t-fork")
    assert [(s.run_id, s.index, s.name, s.output_json) for s in await store.list_steps("t-fork")] == [
        ("t-fork", 0, "fetch", '"fetch-out"'),
    ]
    await claimed(store, "t-fork", 2000)
    assert len(await store.list_steps("src")) == 3  # the source is left as it was


async def test_fork_run_from_the_failed_step_copies_every_completed_step(store):
    await failed_source(store)
    await store.fork_run(new_run("t-fork", 2000, forked_from="src"), "src", "save")
    assert [(s.index, s.name, s.status) for s in await store.list_steps("t-fork")] == [
        (0, "fetch", "completed"),
        (1, "parse", "completed"),
    ]


async def test_fork_run_from_an_unknown_step_raises_not_found_and_creates_nothing(store):
    await failed_source(store)
    with pytest.raises(NotFoundError):
        await store.fork_run(new_run("t-fork", 2000, forked_from="src"), "src", "no-such-step")
    assert await store.get_run("t-fork") is None


async def test_fork_run_of_an_unknown_run_raises_not_found(store):
    with pytest.raises(NotFoundError):
        await store.fork_run(new_run("t-fork", 2000, forked_from="no-such-run"), "no-such-run", "fetch")
    assert await store.get_run("t-fork") is None


async def test_fork_run_refuses_a_run_whose_step_outputs_were_dropped(store):
    record = await make_run(store, "src", "leased")
    for i, name in enumerate(["fetch", "parse"]):
        assert await store.record_step(step("src", i, name), record.lease_generation)
    assert await finish(store, "src", record.lease_generation, 1100, drop_step_outputs=True)
    with pytest.raises(ConflictError):
        await store.fork_run(new_run("t-fork", 2000, forked_from="src"), "src", "parse")
    assert await store.get_run("t-fork") is None


# --- child runs --------------------------------------------------------------------------------


def child_run(
    run_id: str, at: int, parent: str, *, key: str | None = None, labels: dict[str, str] | None = None
) -> NewRun:
    return NewRun(run_id, JOB, '{"n": 2}', dict(labels or {}), None, key, False, at, parent_run_id=parent)


def start_step(parent: str, child: str, index: int = 0) -> StepRecord:
    return step(
        parent, index, f"start-{child}", output=f'{{"run_id":"{child}","job_name":"job"}}', kind="child"
    )


async def started_child(store: Store, parent: str, child: str, now: int, **kwargs: Any) -> int:
    """``parent`` (created and claimed here) starts ``child``; returns the parent's generation."""
    await store.create_runs([new_run(parent, now)])
    record = await claimed(store, parent, now)
    assert await store.start_child(
        child_run(child, now + 1, parent, **kwargs), start_step(parent, child), record.lease_generation
    )
    return record.lease_generation


async def wait_for_child(store: Store, parent: str, child: str, generation: int, now: int) -> bool:
    return await store.wait_run(
        parent, generation, until=NEVER_MS, reason="child", step_name="wait", now=now, child_run_id=child
    )


async def test_start_child_creates_the_child_and_records_the_parents_step_together(store):
    await started_child(store, "p", "c", 1000, labels={"team": "x"}, key="k")
    child = await get(store, "c")
    assert (child.status, child.parent_run_id, child.labels, child.concurrency_key) == (
        "pending",
        "p",
        {"team": "x"},
        "k",
    )
    assert child.idempotency_key is None and child.input_json == '{"n": 2}'
    assert (await get(store, "p")).parent_run_id is None
    [recorded] = await store.list_steps("p")
    assert (recorded.name, recorded.kind, recorded.output_json) == (
        "start-c",
        "child",
        '{"run_id":"c","job_name":"job"}',
    )


async def test_start_child_is_fenced_and_writes_nothing_after_the_lease_is_lost(store):
    await store.create_runs([new_run("p", 1000)])
    record = await claimed(store, "p", 1000)
    assert not await store.start_child(
        child_run("c", 1001, "p"), start_step("p", "c"), record.lease_generation + 1
    )
    assert await store.get_run("c") is None and await store.list_steps("p") == []


async def test_start_child_with_a_busy_concurrency_key_raises_conflict_and_writes_nothing(store):
    await store.create_runs([new_run("other", 900, job="other", concurrency_key="k")])
    await store.create_runs([new_run("p", 1000)])
    record = await claimed(store, "p", 1000)
    with pytest.raises(ConflictError):
        await store.start_child(
            child_run("c", 1001, "p", key="k"), start_step("p", "c"), record.lease_generation
        )
    assert await store.get_run("c") is None and await store.list_steps("p") == []


async def test_list_runs_by_parent_lists_only_its_children_newest_first(store):
    generation = await started_child(store, "p", "c1", 1000)
    assert await store.start_child(
        child_run("c2", 1002, "p", labels={"a": "1"}), start_step("p", "c2", 1), generation
    )
    await store.create_runs([new_run("x", 1003)])
    assert [r.id for r in await store.list_runs(RunFilter(parent_run_id="p"))] == ["c2", "c1"]
    assert [r.id for r in await store.list_runs(RunFilter(parent_run_id="p", labels={"a": "1"}))] == ["c2"]
    assert [r.id for r in await store.list_runs(RunFilter(parent_run_id="p", statuses=["leased"]))] == []
    assert [r.id for r in await store.list_runs(RunFilter(parent_run_id="p", limit=1, offset=1))] == ["c1"]
    assert await store.list_runs(RunFilter(parent_run_id="c1")) == []


async def test_a_child_finishing_makes_its_waiting_parent_due_in_the_same_transaction(store):
    generation = await started_child(store, "p", "c", 1000)
    assert await wait_for_child(store, "p", "c", generation, 1100)
    parent = await get(store, "p")
    assert (parent.status, parent.wait_reason, parent.wait_child_id, parent.available_at) == (
        "waiting",
        "child",
        "c",
        NEVER_MS,
    )
    child = await claimed(store, "c", 1200)
    assert await claim(store, 1300) is None  # the parent is not due yet
    assert await finish(store, "c", child.lease_generation, 1400, status="failed")
    assert (await get(store, "p")).available_at == 1400
    assert (await claimed(store, "p", 1500)).attempt == 2


async def test_a_child_wait_for_a_child_that_already_ended_is_due_at_once(store):
    generation = await started_child(store, "p", "c", 1000)
    await store.cancel_run("c", 1050)
    assert await wait_for_child(store, "p", "c", generation, 1100)
    assert (await get(store, "p")).available_at == 1100


async def test_a_child_wait_for_a_deleted_child_is_due_at_once_and_deleting_a_child_wakes_it(store):
    generation = await started_child(store, "p", "c", 1000)
    assert await wait_for_child(store, "p", "c", generation, 1100)
    await store.delete_run("c")
    assert (await get(store, "p")).available_at <= 1100
    await store.create_runs([new_run("q", 2000, job="other")])
    q = await claimed(store, "q", 2000, jobs=("other",))
    assert await store.start_child(child_run("d", 2001, "q"), start_step("q", "d"), q.lease_generation)
    await store.delete_run("d")
    assert await wait_for_child(store, "q", "d", q.lease_generation, 2100)
    assert (await get(store, "q")).available_at == 2100


async def test_another_runs_outcome_does_not_wake_a_child_wait(store):
    generation = await started_child(store, "p", "c", 1000)
    assert await wait_for_child(store, "p", "c", generation, 1100)
    await store.create_runs([new_run("other", 1150, job="other")])
    other = await claimed(store, "other", 1200, jobs=("other",))
    assert await finish(store, "other", other.lease_generation, 1300)
    await store.cancel_run("c", 1350)  # its own child, now: due
    assert (await get(store, "p")).available_at == 1350


async def test_cancel_run_tree_cancels_every_unfinished_descendant_and_wakes_the_waiting_parent(store):
    generation = await started_child(store, "r0", "r1", 1000)
    assert await store.start_child(child_run("r2", 1002, "r0"), start_step("r0", "r2", 1), generation)
    r1 = await claimed(store, "r1", 1100)
    assert await store.start_child(child_run("r3", 1101, "r1"), start_step("r1", "r3"), r1.lease_generation)
    assert await wait_for_child(store, "r1", "r3", r1.lease_generation, 1102)
    finished = await claimed(store, "r2", 1103)
    assert await finish(store, "r2", finished.lease_generation, 1104)
    cancelled = await store.cancel_run_tree("r0", 1200)
    assert cancelled[0].id == "r0" and cancelled[0].status == "cancelled"
    assert sorted(r.id for r in cancelled[1:]) == ["r1", "r3"]
    assert all(r.status == "cancelled" for r in cancelled)
    assert (await get(store, "r2")).status == "completed"
    # Cancelled again: as it is, nothing more to cascade.
    assert [r.id for r in await store.cancel_run_tree("r0", 1300)] == ["r0"]
    # A child cancelled on its own makes its waiting parent due.
    generation = await started_child(store, "s0", "s1", 2000)
    assert await wait_for_child(store, "s0", "s1", generation, 2001)
    assert [r.id for r in await store.cancel_run_tree("s1", 2100)] == ["s1"]
    assert (await get(store, "s0")).available_at == 2100


async def test_cancel_run_tree_of_an_unknown_or_finished_run_raises(store):
    with pytest.raises(NotFoundError):
        await store.cancel_run_tree("nope", 1000)
    await make_run(store, "a", "completed")
    with pytest.raises(ConflictError):
        await store.cancel_run_tree("a", 2000)


async def test_delete_run_is_refused_while_a_child_is_active(store):
    generation = await started_child(store, "p", "c", 1000)
    assert await wait_for_child(store, "p", "c", generation, 1100)
    with pytest.raises(ConflictError, match="child"):
        await store.delete_run("p")
    child = await claimed(store, "c", 1200)
    assert await finish(store, "c", child.lease_generation, 1300)
    parent = await claimed(store, "p", 1400)
    assert await finish(store, "p", parent.lease_generation, 1500)
    await store.delete_run("p")
    assert await store.get_run("p") is None and (await get(store, "c")).parent_run_id == "p"


async def test_purge_runs_keeps_a_finished_parent_whose_child_is_active(store):
    generation = await started_child(store, "p", "c", 1000)
    assert await finish(store, "p", generation, 1100)
    assert await store.purge_runs(5000, None) == 0
    await store.cancel_run("c", 1200)
    assert await store.purge_runs(5000, None) == 2


# --- schema, durability, notifications -------------------------------------------------------


async def test_migrating_a_migrated_store_again_changes_nothing(store):
    await store.create_runs([new_run("a", 1000)])
    before = await get(store, "a")
    await store.migrate()
    await store.check_schema()
    assert await store.get_run("a") == before


async def test_wait_durable_returns(store):
    await store.create_runs([new_run("a", 1000)])
    assert await store.wait_durable() is None


async def test_watch_changes_never_reports_this_stores_own_changes(store):
    # A backend without notifications never calls the listener; one with them reports only
    # other instances' changes. Either way, changes made here are not reported here.
    seen: list[tuple[str, str]] = []
    stop = await store.watch_changes(lambda run_id, status: seen.append((run_id, status)))
    assert callable(stop)
    try:
        await store.create_runs([new_run("a", 1000), new_run("b", 1001)])
        record = await claimed(store, "a", 1100)
        assert await finish(store, "a", record.lease_generation, 1200)
        await store.cancel_run("b", 1300)
        await store.delete_run("b")
        await asyncio.sleep(0.05)  # time for a notifying backend to deliver, were it to
    finally:
        stop()
    assert seen == []


# --- flow control (issue 14): priority, job limits, debounce, trace parent -----------------------------


def flow_run(run_id: str, at: int, **options: Any) -> NewRun:
    """``new_run`` with NewRun's flow-control and tracing fields."""
    base = new_run(
        run_id, at, job=options.pop("job", JOB), concurrency_key=options.pop("concurrency_key", None)
    )
    return NewRun(**{**{name: getattr(base, name) for name in NewRun.__slots__}, **options})


async def limited_claim(
    store: Store, now: int, limits: dict[str, Any], *, worker: str = "w1", lease: int = LEASE
) -> RunRecord | None:
    return await store.claim_run(
        worker_id=worker, job_names=[JOB, "other"], now=now, lease_until=now + lease, limits=limits
    )


async def test_contract_claims_take_higher_priority_first_then_the_oldest(store: Store):
    await store.create_runs(
        [
            flow_run("r1", 1000),
            flow_run("r2", 1001, priority=3),
            flow_run("r3", 1002, priority=3),
            flow_run("r4", 1003, priority=-2),
        ]
    )
    claimed_ids = [(await claim(store, 2000)).id for _ in range(4)]  # type: ignore[union-attr]
    assert claimed_ids == ["r2", "r3", "r1", "r4"]
    assert (await store.get_run("r2")).priority == 3  # type: ignore[union-attr]


async def test_contract_the_trace_parent_is_stored_as_given(store: Store):
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    ((created, _),) = await store.create_runs([flow_run("r1", 1000, trace_parent=parent)])
    assert created.trace_parent == parent
    assert (await store.get_run("r1")).trace_parent == parent  # type: ignore[union-attr]
    assert (await claimed(store, "r1", 2000)).trace_parent == parent


async def test_contract_max_concurrent_passes_over_a_job_at_its_limit(store: Store):
    from durably_web.storage.base import JobLimits

    limits = {JOB: JobLimits(max_concurrent=2)}
    await store.create_runs(
        [flow_run(f"r{i}", 1000 + i) for i in range(4)] + [flow_run("z1", 1010, job="other")]
    )
    first = await limited_claim(store, 2000, limits)
    second = await limited_claim(store, 2000, limits, worker="w2")
    assert (first.id, second.id) == ("r0", "r1")  # type: ignore[union-attr]
    assert (await limited_claim(store, 2000, limits)).id == "z1"  # type: ignore[union-attr]
    assert await limited_claim(store, 2000, limits) is None
    # Without limits the same worker would take r2: the limit is the claimer's to pass.
    await finish(store, "r0", first.lease_generation, 2100)  # type: ignore[union-attr]
    assert (await limited_claim(store, 2200, limits)).id == "r2"  # type: ignore[union-attr]
    # An expired lease no longer counts: r1's lapsed, so r1 itself (or r3) may be claimed.
    assert (await limited_claim(store, 2000 + LEASE + 1, limits)).id == "r1"  # type: ignore[union-attr]


async def test_contract_a_full_rate_window_holds_back_new_starts_only(store: Store):
    from durably_web.storage.base import JobLimits

    limits = {JOB: JobLimits(rate_count=2, rate_window_ms=10_000)}
    await store.create_runs([flow_run(f"r{i}", 1000 + i) for i in range(4)])
    long = 100_000  # no lease lapses in this test
    r0 = await limited_claim(store, 2000, limits, lease=long)
    await limited_claim(store, 3000, limits, lease=long)
    assert await limited_claim(store, 4000, limits) is None
    assert await store.next_claimable_at(job_names=[JOB], limits=limits, now=4000) == 12_000
    # r0 waits and becomes due: claimed again (no new start) though the window is full.
    assert r0 is not None
    await store.wait_run("r0", r0.lease_generation, until=5000, reason="sleep", step_name="nap", now=4500)
    assert (await limited_claim(store, 5000, limits, lease=long)).id == "r0"  # type: ignore[union-attr]
    assert await limited_claim(store, 11_999, limits) is None
    assert (await limited_claim(store, 12_000, limits, lease=long)).id == "r2"  # type: ignore[union-attr]
    assert await limited_claim(store, 12_000, limits) is None
    assert await store.next_claimable_at(job_names=[JOB], limits=limits, now=12_000) == 13_000


async def test_contract_debounce_replaces_the_pending_runs_input_and_pushes_its_start(store: Store):
    def burst(run_id: str, at: int, value: int) -> NewRun:
        return flow_run(run_id, at, concurrency_key="k", debounce_ms=5000, input_json=str(value))

    ((first, disposition),) = await store.create_runs([burst("r1", 1000, 1)])
    assert (disposition, first.available_at) == ("created", 6000)
    ((again, disposition),) = await store.create_runs([burst("r2", 3000, 2)])
    assert (again.id, disposition, again.input_json, again.available_at) == ("r1", "debounced", "2", 8000)
    assert await store.get_run("r2") is None
    assert await claim(store, 7999) is None
    assert await store.next_claimable_at(job_names=[JOB], limits={}, now=7000) == 8000
    leased = await claimed(store, "r1", 8000)
    assert leased.input_json == "2"
    # Started: the next trigger is a new run with its own debounce.
    ((third, disposition),) = await store.create_runs([burst("r3", 9000, 3)])
    assert (third.id, disposition, third.available_at) == ("r3", "created", 14_000)
    # Another job's pending run of the key is not debounced into: an ordinary conflict.
    with pytest.raises(ConflictError):
        await store.create_runs([flow_run("x1", 9500, job="other", concurrency_key="k", debounce_ms=10)])


# --- attempt metadata (step.attempt.set_metadata) and step.all's waits -------------------------------

META = '{"model":"m1","tokens":812}'


def with_metadata(record: StepRecord, metadata_json: str | None = META) -> StepRecord:
    return StepRecord(
        record.run_id,
        record.index,
        record.name,
        record.status,
        record.output_json,
        record.error_json,
        record.started_at,
        record.completed_at,
        kind=record.kind,
        attempt=record.attempt,
        offline=record.offline,
        metadata_json=metadata_json,
    )


async def test_a_steps_metadata_round_trips_and_survives_dropping_the_outputs(store):
    record = await make_run(store, "a", "leased")
    plain, noted = step("a", 0, "plain", output='"x"'), with_metadata(step("a", 1, "llm", output='"big"'))
    for s in (plain, noted):
        assert await store.record_step(s, record.lease_generation)
    assert await store.list_steps("a") == [plain, noted]
    assert await finish(store, "a", record.lease_generation, 1500, drop_step_outputs=True)
    assert [(s.name, s.output_json, s.metadata_json) for s in await store.list_steps("a")] == [
        ("plain", None, None),
        ("llm", None, META),
    ]


async def test_failed_attempts_keep_their_metadata_through_the_wait_the_failure_and_a_resume(store):
    await store.create_runs([new_run("a", 1000)])
    record = await claimed(store, "a", 1000)
    first = with_metadata(failed_step("a", 0, "llm", attempt=1), '{"try":1}')
    assert await retry_wait(store, record.lease_generation, first, until=1200, now=1100)
    assert await store.list_step_attempts("a") == [first]
    record = await claimed(store, "a", 1200)
    last = with_metadata(failed_step("a", 0, "llm", attempt=2, at=1300), '{"try":2}')
    assert await finish(store, "a", record.lease_generation, 1400, status="failed", failed=last)
    assert await store.list_steps("a") == [last]
    await store.resume_run("a", 2000)  # the failed step's row becomes an attempt, metadata and all
    assert [(a.attempt, a.metadata_json) for a in await store.list_step_attempts("a")] == [
        (1, '{"try":1}'),
        (2, '{"try":2}'),
    ]


async def test_a_fork_copies_the_steps_metadata(store):
    record = await make_run(store, "src", "leased")
    assert await store.record_step(with_metadata(step("src", 0, "llm")), record.lease_generation)
    assert await store.record_step(step("src", 1, "after"), record.lease_generation)
    await store.fork_run(new_run("fork", 2000, forked_from="src"), "src", "after")
    assert [(s.name, s.metadata_json) for s in await store.list_steps("fork")] == [("llm", META)]


async def test_wait_run_writes_several_failed_attempts_in_one_transaction(store):
    record = await make_run(store, "a", "leased")
    first = with_metadata(failed_step("a", 0, "users", attempt=1))
    second = failed_step("a", 2, "teams", attempt=3)
    assert await store.wait_run(
        "a",
        record.lease_generation,
        until=5000,
        reason="retry",
        step_name="users",
        now=1100,
        failed_attempts=[first, second],
    )
    assert await store.list_step_attempts("a") == [first, second]
    assert await store.count_step_attempts("a") == {0: (1, 1), 2: (1, 1)}
    waiting = await get(store, "a")
    assert (waiting.status, waiting.wait_reason, waiting.wait_step, waiting.wake_at) == (
        "waiting",
        "retry",
        "users",
        5000,
    )


async def test_wait_run_with_a_stale_generation_writes_none_of_its_failed_attempts(store):
    await store.create_runs([new_run("a", 1000)])
    await claimed(store, "a", 1000, lease=100)
    await claimed(store, "a", 1100, worker="w2")  # generation 2
    attempts = [failed_step("a", 0, "users"), failed_step("a", 1, "teams")]
    assert not await store.wait_run(
        "a", 1, until=5000, reason="retry", step_name="users", now=1200, failed_attempts=attempts
    )
    assert await store.list_step_attempts("a") == []


async def test_a_failed_step_recorded_while_leased_is_replaced_by_its_completed_retry(store):
    # step.all keeps a branch that failed for good as a failed row; the run may go on, and a
    # later execution of that position (after a resume or a crash) replaces it.
    record = await make_run(store, "a", "leased")
    failed = with_metadata(failed_step("a", 1, "teams"))
    assert await store.record_step(failed, record.lease_generation)
    assert await store.list_steps("a") == [failed]
    assert await store.list_steps("a", completed_only=True) == []
    done = step("a", 1, "teams", attempt=2)
    assert await store.record_step(done, record.lease_generation)
    assert await store.list_steps("a") == [done]


# --- deadlines (fail_overdue_runs) -------------------------------------------------------------------

TIMEOUT_ERROR = '{"type": "RunTimeoutError", "message": "past its deadline"}'


def with_deadline(
    run_id: str, at: int, deadline_at: int | None, *, version: str | None = None, **kwargs: Any
) -> NewRun:
    base = new_run(run_id, at, **kwargs)
    return NewRun(
        base.id,
        base.job_name,
        base.input_json,
        base.labels,
        base.idempotency_key,
        base.concurrency_key,
        base.coalesce,
        base.created_at,
        deadline_at=deadline_at,
        version=version,
    )


async def overdue(store: Store, now: int, *, drop: bool = False) -> list[str]:
    failed = await store.fail_overdue_runs(now, error_json=TIMEOUT_ERROR, drop_step_outputs=drop)
    return sorted(record.id for record in failed)


async def test_a_deadline_is_stored_with_the_run_and_nothing_is_due_before_it(store):
    [(created, _)] = await store.create_runs([with_deadline("r1", 1000, 5000)])
    assert created.deadline_at == 5000 and (await get(store, "r1")).deadline_at == 5000
    await store.create_runs([with_deadline("r2", 1000, None)])
    assert (await get(store, "r2")).deadline_at is None
    assert await overdue(store, 4999) == []
    assert (await get(store, "r1")).status == "pending"
    assert await overdue(store, 5000) == ["r1"]  # due at the deadline itself
    failed = await get(store, "r1")
    assert (failed.status, failed.error_json, failed.completed_at) == ("failed", TIMEOUT_ERROR, 5000)
    assert (await get(store, "r2")).status == "pending"  # no deadline, never due


async def test_fail_overdue_runs_takes_pending_waiting_and_abandoned_runs_but_not_a_live_lease(store):
    await store.create_runs([with_deadline(f"r{i}", 1000, 2000) for i in range(1, 6)])
    live = await claimed(store, "r1", 1000, lease=5000)  # leased until 6000: its worker stops it
    abandoned = await claimed(store, "r2", 1000, lease=500)  # lease ran out at 1500
    sleeping = await claimed(store, "r3", 1000)
    assert await store.wait_run(
        "r3", sleeping.lease_generation, until=90_000, reason="sleep", step_name="nap", now=1001
    )
    finished = await claimed(store, "r4", 1000)
    assert await finish(store, "r4", finished.lease_generation, 1001)
    # r5 stays pending.
    assert await overdue(store, 3000) == ["r2", "r3", "r5"]
    assert (await get(store, "r1")).status == "leased"
    assert (await get(store, "r4")).status == "completed"
    # Fenced: the abandoned run's old lease holder can write nothing more.
    assert not await store.record_step(step("r2", 0, "late"), abandoned.lease_generation)
    assert not await finish(store, "r2", abandoned.lease_generation, 3001)
    assert (await get(store, "r2")).error_json == TIMEOUT_ERROR
    # Once the live lease has expired too, it is due as well; a second call finds nothing new.
    assert await overdue(store, 7000) == ["r1"]
    assert not await finish(store, "r1", live.lease_generation, 7001)
    assert await overdue(store, 8000) == []


async def test_fail_overdue_runs_drops_step_outputs_when_asked(store):
    await store.create_runs([with_deadline("r1", 1000, 2000)])
    record = await claimed(store, "r1", 1000, lease=100)
    assert await store.record_step(step("r1", 0, "one", output='"kept?"'), record.lease_generation)
    assert await overdue(store, 3000, drop=True) == ["r1"]
    [kept] = await store.list_steps("r1")
    assert kept.name == "one" and kept.output_json is None


# --- versions (claim_run's versions / pinned_versions) --------------------------------------------------


async def claim_as(
    store: Store, now: int, version: str, *, pinned: bool = True, lease: int = LEASE
) -> RunRecord | None:
    return await store.claim_run(
        worker_id=f"w-{version}",
        job_names=[JOB],
        now=now,
        lease_until=now + lease,
        versions={JOB: version},
        pinned_versions={JOB: version} if pinned else None,
    )


async def test_the_first_claim_records_its_version_and_later_claims_keep_it(store):
    await store.create_runs([with_deadline("r1", 1000, None, version="trigger-v")])
    assert (await get(store, "r1")).version == "trigger-v"
    first = await claim_as(store, 1000, "v1", pinned=False, lease=10)
    assert first is not None and first.version == "v1"  # a pending run goes to any version
    again = await claim_as(store, 2000, "v2", pinned=False)  # its lease expired; not pinned
    assert again is not None and again.id == "r1" and again.version == "v1"


async def test_a_pinned_claim_passes_over_runs_another_version_started(store):
    await store.create_runs([new_run("r1", 1000), new_run("r2", 1001)])
    started = await claim_as(store, 1000, "v1")
    assert started is not None and started.id == "r1" and started.version == "v1"
    assert await store.wait_run(
        "r1", started.lease_generation, until=1500, reason="sleep", step_name="nap", now=1001
    )
    # Due again at 1500. Version 2 skips it (no lease, no attempt counted) and takes r2.
    other = await claim_as(store, 2000, "v2")
    assert other is not None and other.id == "r2" and other.version == "v2"
    assert await claim_as(store, 2001, "v2") is None
    untouched = await get(store, "r1")
    assert (untouched.status, untouched.attempt, untouched.lease_generation) == ("waiting", 1, 1)
    # Its own version takes it; so does an unpinned worker (continue / fail).
    mine = await claim_as(store, 2002, "v1", lease=10)
    assert mine is not None and mine.id == "r1" and mine.version == "v1"
    unpinned = await claim_as(store, 3000, "v2", pinned=False)
    assert unpinned is not None and unpinned.id == "r1" and unpinned.version == "v1"


async def test_a_run_started_before_versions_were_recorded_goes_to_any_version(store):
    await store.create_runs([new_run("r1", 1000)])
    record = await claim(store, 1000)  # no versions given: none recorded
    assert record is not None and record.version is None
    assert await store.wait_run(
        "r1", record.lease_generation, until=1500, reason="sleep", step_name="nap", now=1001
    )
    taken = await claim_as(store, 2000, "v9")
    assert taken is not None and taken.id == "r1" and taken.version is None


async def test_list_runs_filters_by_version(store):
    await store.create_runs(
        [
            with_deadline("r1", 1000, None, version="1"),
            with_deadline("r2", 1001, None, version="2"),
            with_deadline("r3", 1002, None, version="1", job="other"),
            new_run("r4", 1003),
        ]
    )
    ids = lambda records: [r.id for r in records]  # noqa: E731
    assert ids(await store.list_runs(RunFilter(versions=["1"]))) == ["r3", "r1"]
    assert ids(await store.list_runs(RunFilter(versions=["1", "2"], job_names=[JOB]))) == ["r2", "r1"]
    assert ids(await store.list_runs(RunFilter(versions=["2"], statuses=["pending"]))) == ["r2"]
    assert ids(await store.list_runs(RunFilter(versions=["1"], labels={"x": "y"}))) == []
    assert ids(await store.list_runs(RunFilter(versions=["1"], limit=1, offset=1))) == ["r1"]
    assert ids(await store.list_runs(RunFilter(versions=[]))) == []


# --- schedules ------------------------------------------------------------------------------


def schedule_record(
    name: str = "s",
    *,
    cron: str = "0 * * * *",
    timezone: str = "UTC",
    next_tick_at: int = 3_600_000,
    input_json: str = '{"n": 1}',
    catch_up: str = "latest",
    now: int = 1000,
) -> ScheduleRecord:
    return ScheduleRecord(
        name=name,
        job_name=JOB,
        cron=cron,
        timezone=timezone,
        input_json=input_json,
        catch_up=catch_up,
        paused=False,
        next_tick_at=next_tick_at,
        last_tick_at=None,
        last_run_id=None,
        created_at=now,
        updated_at=now,
    )


def tick_run(run_id: str, tick: int, at: int, name: str = "s") -> NewRun:
    return NewRun(
        run_id,
        JOB,
        '{"n": 1}',
        {"durably:schedule": name, "durably:tick": str(tick)},
        f"schedule:{name}:{tick}",
        None,
        False,
        at,
    )


async def test_upsert_schedule_inserts_and_returns_the_stored_schedule(store):
    stored = await store.upsert_schedule(schedule_record())
    assert stored == schedule_record()
    assert await store.get_schedule("s") == stored
    assert await store.get_schedule("other") is None


async def test_upsert_schedule_updates_the_definition_and_keeps_the_tick_unless_cron_or_zone_changed(store):
    await store.upsert_schedule(schedule_record(next_tick_at=3_600_000))
    same_cron = await store.upsert_schedule(
        schedule_record(next_tick_at=7_200_000, input_json='{"n": 2}', catch_up="all", now=2000)
    )
    assert (same_cron.next_tick_at, same_cron.input_json, same_cron.catch_up) == (
        3_600_000,
        '{"n": 2}',
        "all",
    )
    assert (same_cron.created_at, same_cron.updated_at) == (1000, 2000)
    new_zone = await store.upsert_schedule(schedule_record(timezone="Europe/Oslo", next_tick_at=7_200_000))
    assert new_zone.next_tick_at == 7_200_000 and new_zone.timezone == "Europe/Oslo"
    new_cron = await store.upsert_schedule(
        schedule_record(cron="*/5 * * * *", timezone="Europe/Oslo", next_tick_at=300_000)
    )
    assert new_cron.next_tick_at == 300_000 and new_cron.cron == "*/5 * * * *"


async def test_upsert_schedule_keeps_paused_and_the_last_tick(store):
    await store.upsert_schedule(schedule_record())
    await store.fire_schedule(
        "s",
        expected_next_tick=3_600_000,
        next_tick_at=7_200_000,
        last_tick_at=3_600_000,
        runs=[tick_run("r1", 3_600_000, 3_600_100)],
        now=3_600_100,
    )
    await store.set_schedule_paused("s", True, None, 3_700_000)
    again = await store.upsert_schedule(schedule_record(next_tick_at=99_000_000, now=3_800_000))
    assert again.paused and again.last_tick_at == 3_600_000 and again.last_run_id == "r1"
    assert again.next_tick_at == 7_200_000


async def test_list_schedules_is_by_name(store):
    for name in ("b", "a", "c"):
        await store.upsert_schedule(schedule_record(name))
    assert [s.name for s in await store.list_schedules()] == ["a", "b", "c"]


async def test_delete_schedule_returns_it_and_keeps_its_runs(store):
    await store.upsert_schedule(schedule_record())
    await store.fire_schedule(
        "s",
        expected_next_tick=3_600_000,
        next_tick_at=7_200_000,
        last_tick_at=3_600_000,
        runs=[tick_run("r1", 3_600_000, 3_600_100)],
        now=3_600_100,
    )
    deleted = await store.delete_schedule("s")
    assert deleted.name == "s" and await store.get_schedule("s") is None
    assert (await get(store, "r1")).status == "pending"
    with pytest.raises(NotFoundError):
        await store.delete_schedule("s")


async def test_set_schedule_paused_pauses_and_resumes_with_a_new_next_tick(store):
    await store.upsert_schedule(schedule_record())
    paused = await store.set_schedule_paused("s", True, None, 2000)
    assert paused.paused and paused.next_tick_at == 3_600_000 and paused.updated_at == 2000
    assert await store.due_schedules(10_000_000, 10) == []
    assert await store.next_schedule_tick() is None
    resumed = await store.set_schedule_paused("s", False, 10_800_000, 3000)
    assert not resumed.paused and resumed.next_tick_at == 10_800_000
    with pytest.raises(NotFoundError):
        await store.set_schedule_paused("missing", True, None, 3000)


async def test_due_schedules_are_the_live_ones_due_by_now_earliest_first(store):
    await store.upsert_schedule(schedule_record("late", next_tick_at=5000))
    await store.upsert_schedule(schedule_record("early", next_tick_at=2000))
    await store.upsert_schedule(schedule_record("future", next_tick_at=9000))
    await store.upsert_schedule(schedule_record("paused", next_tick_at=1000))
    await store.set_schedule_paused("paused", True, None, 1000)
    assert [s.name for s in await store.due_schedules(5000, 10)] == ["early", "late"]
    assert [s.name for s in await store.due_schedules(5000, 1)] == ["early"]
    assert await store.next_schedule_tick() == 2000


async def test_fire_schedule_moves_the_tick_and_creates_the_runs_in_one_step(store):
    await store.upsert_schedule(schedule_record())
    results = await store.fire_schedule(
        "s",
        expected_next_tick=3_600_000,
        next_tick_at=7_200_000,
        last_tick_at=3_600_000,
        runs=[tick_run("r1", 3_600_000, 3_600_100)],
        now=3_600_100,
    )
    assert results is not None and [(r.id, d) for r, d in results] == [("r1", "created")]
    run = await get(store, "r1")
    assert run.status == "pending" and run.idempotency_key == "schedule:s:3600000"
    assert run.labels == {"durably:schedule": "s", "durably:tick": "3600000"}
    assert [r.id for r in await store.list_runs(RunFilter(labels={"durably:schedule": "s"}))] == ["r1"]
    fired = await store.get_schedule("s")
    assert fired is not None
    assert (fired.next_tick_at, fired.last_tick_at, fired.last_run_id) == (7_200_000, 3_600_000, "r1")
    assert (await claim(store, 3_600_200)).id == "r1"


async def test_fire_schedule_with_a_stale_next_tick_writes_nothing(store):
    await store.upsert_schedule(schedule_record())
    first = await store.fire_schedule(
        "s",
        expected_next_tick=3_600_000,
        next_tick_at=7_200_000,
        last_tick_at=3_600_000,
        runs=[tick_run("r1", 3_600_000, 3_600_100)],
        now=3_600_100,
    )
    again = await store.fire_schedule(  # a second worker that read the same next tick
        "s",
        expected_next_tick=3_600_000,
        next_tick_at=7_200_000,
        last_tick_at=3_600_000,
        runs=[tick_run("r2", 3_600_000, 3_600_200)],
        now=3_600_200,
    )
    assert first is not None and again is None
    assert await store.get_run("r2") is None
    assert (await store.get_schedule("s")).last_run_id == "r1"  # type: ignore[union-attr]


async def test_fire_schedule_of_a_paused_or_deleted_schedule_writes_nothing(store):
    await store.upsert_schedule(schedule_record())
    await store.set_schedule_paused("s", True, None, 2000)
    fire = {"expected_next_tick": 3_600_000, "next_tick_at": 7_200_000, "last_tick_at": 3_600_000}
    assert await store.fire_schedule("s", **fire, runs=[tick_run("r1", 3_600_000, 1)], now=1) is None
    await store.delete_schedule("s")
    assert await store.fire_schedule("s", **fire, runs=[tick_run("r1", 3_600_000, 1)], now=1) is None
    assert await store.get_run("r1") is None


async def test_fire_schedule_returns_a_ticks_existing_run_as_idempotent(store):
    # A firing repeated after its run was made (another tick source, an older process).
    await store.create_runs([tick_run("r0", 3_600_000, 3_600_050)])
    await store.upsert_schedule(schedule_record())
    results = await store.fire_schedule(
        "s",
        expected_next_tick=3_600_000,
        next_tick_at=10_800_000,
        last_tick_at=7_200_000,
        runs=[tick_run("r1", 3_600_000, 7_200_100), tick_run("r2", 7_200_000, 7_200_100)],
        now=7_200_100,
    )
    assert results is not None
    assert [(r.id, d) for r, d in results] == [("r0", "idempotent"), ("r2", "created")]
    assert (await store.get_schedule("s")).last_run_id == "r2"  # type: ignore[union-attr]
    assert await store.get_run("r1") is None


async def test_two_concurrent_firings_of_one_tick_create_one_run(store):
    await store.upsert_schedule(schedule_record())
    fire = {"expected_next_tick": 3_600_000, "next_tick_at": 7_200_000, "last_tick_at": 3_600_000}
    results = await asyncio.gather(
        store.fire_schedule("s", **fire, runs=[tick_run("r1", 3_600_000, 3_600_100)], now=3_600_100),
        store.fire_schedule("s", **fire, runs=[tick_run("r2", 3_600_000, 3_600_100)], now=3_600_100),
    )
    assert sorted(r is None for r in results) == [False, True]
    assert len(await store.list_runs(RunFilter(labels={"durably:schedule": "s"}))) == 1
