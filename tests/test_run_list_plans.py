"""The run list (``Store.list_runs``) on SQLite and PostgreSQL: the right rows for every
filter shape, from plans that walk an index in list order instead of scanning the table.

SQLite's side also counts the work a page costs (virtual machine steps, through the
progress handler): with ten times the runs, a page of a filtered list costs the same.
No timings: the counts are what the database did, whatever the machine."""

from __future__ import annotations

import itertools
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from durably_web.storage import open_store
from durably_web.storage.base import RunFilter
from durably_web.storage.run_list import list_runs_query

JOBS = ["import", "report", "sync"]
# Skewed as real lists are: mostly finished runs, a few failed, some in flight.
STATUSES = ["completed"] * 6 + ["failed", "pending", "waiting", "cancelled"]
ORGS = ["acme", "globex", "initech", "umbrella"]
#: The one run with children (thirty of them, however many runs there are).
PARENT = "run000000001"

SHAPES = {
    "everything": RunFilter(limit=20),
    "one status": RunFilter(statuses=["failed"], limit=20),
    "two statuses": RunFilter(statuses=["pending", "waiting"], limit=20),
    "one job": RunFilter(job_names=["report"], limit=20),
    "job and status": RunFilter(job_names=["report", "sync"], statuses=["completed"], limit=20),
    "one label": RunFilter(labels={"org": "globex"}, limit=20),
    "a rare label": RunFilter(labels={"batch": "first"}, limit=20),
    "a rare status": RunFilter(statuses=["leased"], limit=20),
    "a rare status of one job": RunFilter(statuses=["leased"], job_names=["import"], limit=20),
    "two labels and a status": RunFilter(
        labels={"org": "acme", "tier": "gold"}, statuses=["completed"], limit=20
    ),
    "label and job, second page": RunFilter(
        labels={"org": "initech"}, job_names=["import"], limit=20, offset=20
    ),
    "a parent's children": RunFilter(parent_run_id=PARENT, limit=20),
    "a parent's children of a status and label": RunFilter(
        parent_run_id=PARENT, statuses=["completed"], labels={"org": "acme"}, limit=5
    ),
    "one version": RunFilter(versions=["v1"], limit=20),
    "a version still in flight": RunFilter(
        versions=["v2"], statuses=["pending", "leased", "waiting"], limit=20
    ),
    "two versions of one job": RunFilter(versions=["v1", "v2"], job_names=["sync"], limit=20),
    "a version and a label": RunFilter(versions=["v2"], labels={"org": "globex"}, limit=20),
}


def runs(count: int) -> Iterator[dict[str, Any]]:
    for i in range(count):
        labels = {"org": ORGS[i % 4]}
        if i % 3 == 0:
            labels["tier"] = "gold"
        if i < 5:  # a label and a status that a handful of runs have, however many there are
            labels["batch"] = "first"
        yield {
            "id": f"run{i:09d}",
            "job_name": JOBS[i % 3],
            "status": "leased" if i < 3 else STATUSES[(i * 7) % len(STATUSES)],
            "labels": labels,
            "parent_run_id": PARENT if 10 <= i < 40 else None,
            # Most runs by the current version, some by the one before, a few from before versions.
            "version": None if i % 11 == 0 else ("v2" if i % 4 == 1 else "v1"),
        }


def expected(rows: list[dict[str, Any]], f: RunFilter) -> list[str]:
    """The model: the rows the filter selects, newest id first, then the page."""
    chosen = [
        r["id"]
        for r in rows
        if (f.statuses is None or r["status"] in f.statuses)
        and (f.job_names is None or r["job_name"] in f.job_names)
        and all(r["labels"].get(k) == v for k, v in f.labels.items())
        and (f.parent_run_id is None or r["parent_run_id"] == f.parent_run_id)
        and (f.versions is None or r["version"] in f.versions)
    ]
    chosen.sort(reverse=True)
    return chosen[f.offset :] if f.limit < 0 else chosen[f.offset : f.offset + f.limit]


INSERT_RUN = (
    "INSERT INTO durably_runs (id, job_name, status, input, labels, available_at, created_at, updated_at, "
    "parent_run_id, version) VALUES ({0}, {0}, {0}, '{{}}', {0}, 0, 0, 0, {0}, {0})"
)
INSERT_LABEL = "INSERT INTO durably_run_labels (run_id, key, value) VALUES ({0}, {0}, {0})"


def rows_for_insert(rows: list[dict[str, Any]]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    run_rows = [
        (r["id"], r["job_name"], r["status"], json.dumps(r["labels"]), r["parent_run_id"], r["version"])
        for r in rows
    ]
    label_rows = [(r["id"], k, v) for r in rows for k, v in r["labels"].items()]
    return run_rows, label_rows


# -- SQLite ---------------------------------------------------------------------------


async def sqlite_database(path: Path, count: int) -> list[dict[str, Any]]:
    store = open_store(f"sqlite:///{path}")
    await store.migrate()
    await store.close()
    rows = list(runs(count))
    run_rows, label_rows = rows_for_insert(rows)
    with sqlite3.connect(path) as conn:
        conn.executemany(INSERT_RUN.format("?"), run_rows)
        conn.executemany(INSERT_LABEL.format("?"), label_rows)
    conn.close()
    return rows


def sqlite_query(f: RunFilter) -> tuple[str, dict[str, Any]]:
    return list_runs_query(f, lambda name: f":{name}", no_limit=-1)


def vm_steps(conn: sqlite3.Connection, f: RunFilter) -> int:
    """How much work SQLite does for one page (progress-handler calls, one per 100 VM steps)."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    sql, params = sqlite_query(f)
    conn.set_progress_handler(count, 100)
    try:
        conn.execute(sql, params).fetchall()
    finally:
        conn.set_progress_handler(None, 0)
    return steps


@pytest.mark.parametrize("shape", list(SHAPES))
async def test_sqlite_lists_the_right_runs_through_indexes(tmp_path: Path, shape: str) -> None:
    f = SHAPES[shape]
    rows = await sqlite_database(tmp_path / "list.db", 3000)
    store = open_store(f"sqlite:///{tmp_path / 'list.db'}")
    try:
        assert [r.id for r in await store.list_runs(f)] == expected(rows, f)
    finally:
        await store.close()
    sql, params = sqlite_query(f)
    with sqlite3.connect(tmp_path / "list.db") as conn:
        plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]
    conn.close()
    # "SCAN <table>" without an index is a walk over every row; "SEARCH" and a scan of an
    # index in list order (the primary key, for the unfiltered list) are not.
    full_scans = [
        line
        for line in plan
        if line.startswith("SCAN")
        and " USING " not in line
        and not line.startswith(("SCAN b", "SCAN merged"))
    ]
    assert full_scans == [], plan


@pytest.mark.parametrize("shape", list(SHAPES))
async def test_sqlite_page_costs_the_same_with_ten_times_the_runs(tmp_path: Path, shape: str) -> None:
    f = SHAPES[shape]
    costs = []
    for count in (2_000, 20_000):
        path = tmp_path / f"runs{count}.db"
        await sqlite_database(path, count)
        with sqlite3.connect(path) as conn:
            conn.execute("ANALYZE")
            costs.append(vm_steps(conn, f))
        conn.close()
    small, large = costs
    assert large <= 2 * small + 5, f"{shape}: {small} -> {large} (x100 VM steps) for 10x the runs"


async def test_an_empty_status_or_job_list_matches_nothing(tmp_path: Path) -> None:
    await sqlite_database(tmp_path / "list.db", 30)
    store = open_store(f"sqlite:///{tmp_path / 'list.db'}")
    try:
        assert await store.list_runs(RunFilter(statuses=[])) == []
        assert await store.list_runs(RunFilter(job_names=[], labels={"org": "acme"})) == []
        assert len(await store.list_runs(RunFilter(job_names=["sync"]))) == 10
    finally:
        await store.close()


# -- PostgreSQL -------------------------------------------------------------------------


def plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from plan_nodes(child)


async def test_postgres_lists_the_right_runs_through_indexes(postgres_url: str) -> None:
    store = open_store(postgres_url)
    await store.migrate()
    try:
        rows = list(runs(20_000))
        run_rows, label_rows = rows_for_insert(rows)
        async with store._connection() as conn:  # the store's own pool: its schema is on the path
            async with conn.cursor() as cursor:
                await cursor.executemany(INSERT_RUN.format("%s"), run_rows)
                await cursor.executemany(INSERT_LABEL.format("%s"), label_rows)
            await conn.execute("ANALYZE durably_runs")
            await conn.execute("ANALYZE durably_run_labels")
        for shape, f in itertools.chain(
            SHAPES.items(), [("all of one job", RunFilter(job_names=["sync"], limit=-1))]
        ):
            got = [r.id for r in await store.list_runs(f)]
            assert got == expected(rows, f), shape
            if f.limit < 0:
                continue  # every row of a job: a scan may well be the best plan
            sql, params = list_runs_query(f, lambda name: f"%({name})s", no_limit=None)
            async with store._connection() as conn:
                cursor = await conn.execute("EXPLAIN (FORMAT JSON) " + sql, params, prepare=False)
                (plan,) = (await cursor.fetchone()).values()
            nodes = list(plan_nodes(plan[0]["Plan"]))
            scans = [n.get("Relation Name") for n in nodes if n["Node Type"] == "Seq Scan"]
            assert scans == [], f"{shape}: {json.dumps(plan, indent=1)}"
    finally:
        await store.close()


# --- the claim, with priorities and flow control (issue 14) ------------------------------------------


async def test_sqlite_claim_and_flow_counts_are_served_by_indexes(tmp_path: Path) -> None:
    from durably_web.storage.sqlite.store import Q

    path = tmp_path / "claim.db"
    await sqlite_database(path, 20_000)
    conn = sqlite3.connect(path)
    try:
        conn.execute(
            "UPDATE durably_runs SET priority = id % 5, started_at = created_at WHERE status <> 'pending'"
        )
        conn.execute("ANALYZE")
        params = {
            "now": 10**13,
            "job_names": '["import", "sync"]',
            "rate_limited": '["sync"]',
            "pinned_versions": '{"sync": "v1"}',
            "job_name": "sync",
            "since": 5,
            "skip": 0,
            "id": "r1",
            "worker_id": "w1",
            "lease_until": 10**13 + 1,
            "versions": "{}",
        }
        plans = {
            name: " | ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + Q[name], params))
            for name in (
                "find_claimable_run",
                "find_claimable_run_rate_limited",
                "count_job_leases",
                "count_job_starts",
                "nth_job_start",
                "lease_found_run",
            )
        }
    finally:
        conn.close()
    # The claim walks the pending runs in claim order, and finds due waiting runs and
    # expired leases through the queue and lease indexes (never a table scan).
    for name in ("find_claimable_run", "find_claimable_run_rate_limited"):
        assert "SCAN r USING INDEX durably_runs_claim_order" in plans[name], plans
        assert "durably_runs_queue" in plans[name], plans
        assert "durably_runs_leases" in plans[name], plans
        assert "SCAN r " not in plans[name].replace("SCAN r USING INDEX durably_runs_claim_order", ""), plans
    assert "durably_runs_leases" in plans["count_job_leases"], plans
    assert "durably_runs_job_started" in plans["count_job_starts"], plans
    assert "durably_runs_job_started" in plans["nth_job_start"], plans
    # The plain claim leases what the look found by its primary key.
    by_id = "SEARCH r USING INDEX sqlite_autoindex_durably_runs_1 (id=?)"
    assert plans["lease_found_run"].startswith(by_id), plans
    assert not any(" SCAN durably_runs" in f" {plan}" for plan in plans.values()), plans


def claim_vm_steps(path: Path, now: int) -> int:
    """SQLite's work (progress-handler calls, one per 100 VM steps) for one claim lookup."""
    from durably_web.storage.sqlite.store import Q

    conn = sqlite3.connect(path)
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    params = {"now": now, "job_names": '["import", "sync"]', "pinned_versions": "{}"}
    conn.set_progress_handler(count, 100)
    try:
        found = conn.execute(Q["find_claimable_run"], params).fetchall()
    finally:
        conn.set_progress_handler(None, 0)
        conn.close()
    assert len(found) == 1
    return steps


async def test_sqlite_claim_costs_the_same_behind_ten_times_the_backlog(tmp_path: Path) -> None:
    # Pending runs of three priorities, waiting runs with due and future wake-ups, live and
    # expired leases: the claim reads the best of each kind, it does not sort the backlog
    # (a sort over every due run made a claim behind 2,000 pending runs cost 1 ms).
    work = {}
    for count in (2_000, 20_000):
        path = tmp_path / f"claim{count}.db"
        await sqlite_database(path, count)
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE durably_runs SET status = 'pending' WHERE status = 'completed'")
            conn.execute("UPDATE durably_runs SET priority = CAST(substr(id, -1) AS INTEGER) % 3")
            due_or_not = "CASE WHEN rowid % 2 = 0 THEN 10 ELSE 1000000000000 END"
            conn.execute(
                f"UPDATE durably_runs SET available_at = {due_or_not}, lease_expires_at = {due_or_not}"
            )
        work[count] = claim_vm_steps(path, now=1000)
    assert work[20_000] <= work[2_000] + 2, work


async def test_postgres_claim_walks_the_unfinished_runs_in_priority_order(postgres_url: str) -> None:
    from durably_web.storage.postgres.store import Q

    store = open_store(postgres_url)
    await store.migrate()
    try:
        rows = list(runs(20_000))
        run_rows, _ = rows_for_insert(rows)
        async with store._connection() as conn:
            async with conn.cursor() as cursor:
                await cursor.executemany(INSERT_RUN.format("%s"), run_rows)
            await conn.execute("UPDATE durably_runs SET priority = (random() * 4)::int")
            await conn.execute("ANALYZE durably_runs")
            params = {
                "now": 10**13,
                "job_names": ["import", "sync"],
                "passed_over": [],
                "rate_limited": [],
                "worker_id": "w",
                "lease_until": 10**13 + 1,
                "channel": "c",
                "origin": "o",
                "versions": "{}",
                "pinned_versions": '{"sync": "v1"}',
            }
            # The plain claim (jobs without limits) tests no flow-control condition per candidate.
            assert "ALL(" not in Q["claim_unkeyed_run"] and "rate_limited" not in Q["claim_unkeyed_run"]
            for name in ("claim_unkeyed_run", "find_claimable_run"):
                cursor = await conn.execute("EXPLAIN (FORMAT JSON) " + Q[name], params, prepare=False)
                (plan,) = (await cursor.fetchone()).values()
                nodes = list(plan_nodes(plan[0]["Plan"]))
                on_runs = [
                    n for n in nodes if n.get("Relation Name") == "durably_runs" and n.get("Alias") == "r"
                ]
                # An index walk in claim order that stops at the first claimable run: no sort,
                # no scan of the table.
                assert [n.get("Index Name") for n in on_runs] == ["durably_runs_active"], (name, plan)
                assert not any(n["Node Type"] == "Sort" for n in nodes), (name, plan)
    finally:
        await store.close()
