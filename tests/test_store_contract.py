"""The storage contract: one suite for the ``Store`` interface, run against every backend.

Each test takes the ``store`` fixture: a migrated, empty store of one backend (an SQLite
file, SQLite in memory, PostgreSQL; the sqlite-wasm connection inside Pyodide runs this
module too, see tests/pyodide). Only the interface is used, so a backend that passes
behaves the same under the engine. Times are made-up milliseconds: the store takes ``now``
from its caller and never reads a clock for these decisions.
"""

from __future__ import annotations

from durably_web.storage import NewRun, StepRecord


async def test_a_released_run_is_pending_again_unless_its_concurrency_key_has_a_pending_run(store):
    await store.create_runs(
        [
            NewRun("r1", "job", "null", {}, None, None, False, 1000),
            NewRun("r2", "job", "null", {}, None, "k", False, 1001),
            NewRun("r3", "job", "null", {}, None, "c", False, 1002),
        ]
    )
    for _ in range(3):
        assert await store.claim_run(worker_id="w1", job_names=["job"], now=1100, lease_until=9000)
    await store.release_run("r1", 1, 1200)
    r1 = await store.get_run("r1")
    assert (r1.status, r1.lease_owner, r1.attempt) == ("pending", None, 1)
    # At most one pending run per concurrency key: with one pending, r2 stays
    # leased with its lease expired, which is just as claimable.
    await store.create_runs([NewRun("r4", "job", "null", {}, None, "k", False, 1300)])
    await store.release_run("r2", 1, 1400)
    r2 = await store.get_run("r2")
    assert (r2.status, r2.lease_owner, r2.lease_expires_at) == ("leased", None, 1400)
    # A cancelled run stays cancelled.
    await store.cancel_run("r3", 1500)
    await store.release_run("r3", 1, 1600)
    r3 = await store.get_run("r3")
    assert (r3.status, r3.lease_owner, r3.lease_expires_at) == ("cancelled", None, 1600)
    # Pending again means claimable again, oldest first.
    again = await store.claim_run(worker_id="w2", job_names=["job"], now=1700, lease_until=9000)
    assert again is not None and (again.id, again.attempt, again.lease_generation) == ("r1", 2, 2)


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
