"""Model-based test: a hypothesis state machine drives the public API against a simple
in-memory model of what every run's state must be.

Rules: trigger (with and without idempotency / concurrency keys, coalescing),
cancel, retrigger, delete, purge, let a worker run everything to the end, and
crash — a worker (and the client) is dropped mid-run without ``stop()``: its
event loop is simply never run again, exactly as frozen as a killed process,
and a new ``Durably`` is opened on the same file.
"""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
)

from durably_web import ConflictError, Durably, NotFoundError, StepContext, define_job

EXECUTIONS: Counter[tuple[str, str]] = Counter()
FAST = {"polling_interval": 0.01, "lease_duration": 5.0, "lease_renew_interval": 1.0, "shutdown_timeout": 2.0}


async def touch(run_id: str, name: str, value: int) -> int:
    EXECUTIONS[(run_id, name)] += 1
    await asyncio.sleep(0.004)
    return value


@define_job("model-ok", output=int)
async def ok_job(step: StepContext, payload: Any) -> int:
    total = 0
    for i in range(3):
        total += await step.run(f"s{i}", touch, step.run_id, f"s{i}", i + 1)
    return total


@define_job("model-fail")
async def fail_job(step: StepContext, payload: Any) -> None:
    await step.run("s0", touch, step.run_id, "s0", 1)

    async def boom() -> None:
        await touch(step.run_id, "s1", 0)
        raise RuntimeError("boom")

    await step.run("s1", boom)


JOBS = [ok_job, fail_job]
FINAL = {"model-ok": "completed", "model-fail": "failed"}
STEPS = {"model-ok": ["s0", "s1", "s2"], "model-fail": ["s0", "s1"]}


class DurablyModel(RuleBasedStateMachine):
    runs = Bundle("runs")

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory(prefix="durably-model-")
        self.db = Path(self.tmp.name) / "model.db"
        self.url = f"sqlite:///{self.db}"
        self.runner = asyncio.Runner()
        # "Killed" instances: their loops never run again, like a SIGKILLed process.
        self.graveyard: list[tuple[asyncio.Runner, list[Durably]]] = []
        self.client = self.open_client()
        # The model: run id -> {"job", "status", "idem", "conc"}; deleted runs are removed.
        self.model: dict[str, dict[str, Any]] = {}
        self.frozen_steps: dict[tuple[str, str], int] = {}  # committed before a crash: executions then
        # Executions lost to crashes: a step not recorded when its worker was dropped, counted
        # then. Every later execution but one (the one that is recorded) would be a re-run.
        self.lost: Counter[tuple[str, str]] = Counter()

    # --- plumbing ----------------------------------------------------------------------------
    def run(self, coro: Any) -> Any:
        return self.runner.run(coro)

    def open_client(self) -> Durably:
        client = Durably(self.url, jobs=JOBS, worker=False, **FAST)
        self.run(client.init())
        return client

    def db_rows(self, sql: str) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(self.db, timeout=10)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()

    def pending_with(self, conc: str | None) -> str | None:
        if conc is None:
            return None
        for run_id, record in self.model.items():
            if record["conc"] == conc and record["status"] == "pending":
                return run_id
        return None

    # --- rules -------------------------------------------------------------------------------
    @initialize()
    def start(self) -> None:
        EXECUTIONS.clear()
        self.lost.clear()

    @rule(
        target=runs,
        job=st.sampled_from(["model-ok", "model-fail"]),
        idem=st.sampled_from([None, None, "i0", "i1"]),
        conc=st.sampled_from([None, None, "c0"]),
        coalesce=st.sampled_from([None, "skip"]),
    )
    def trigger(self, job: str, idem: str | None, conc: str | None, coalesce: str | None) -> Any:
        same_key = next(
            (
                rid
                for rid, r in self.model.items()
                if idem is not None and r["job"] == job and r["idem"] == idem
            ),
            None,
        )
        pending = self.pending_with(conc)
        try:
            run = self.run(
                self.client.trigger(
                    job, {"n": len(self.model)}, idempotency_key=idem, concurrency_key=conc, coalesce=coalesce
                )
            )
        except ConflictError:
            assert same_key is None and pending is not None and coalesce is None
            return multiple()
        if same_key is not None:
            assert (run.disposition, run.id) == ("idempotent", same_key)
        elif pending is not None:
            assert coalesce == "skip" and (run.disposition, run.id) == ("coalesced", pending)
        else:
            assert run.disposition == "created" and run.id not in self.model
            self.model[run.id] = {"job": job, "status": "pending", "idem": idem, "conc": conc}
        return run.id

    @rule(run_id=st.one_of(runs, st.just("01NOSUCHRUN")))
    def cancel(self, run_id: str) -> None:
        record = self.model.get(run_id)
        try:
            run = self.run(self.client.cancel(run_id))
        except NotFoundError:
            assert record is None
            return
        except ConflictError:
            assert record is not None and record["status"] in ("completed", "failed")
            return
        assert record is not None and record["status"] in ("pending", "leased", "cancelled")
        assert run.status == "cancelled"
        record["status"] = "cancelled"

    @rule(target=runs, run_id=runs)
    def retrigger(self, run_id: str) -> Any:
        record = self.model.get(run_id)
        pending = None if record is None else self.pending_with(record["conc"])
        try:
            run = self.run(self.client.retrigger(run_id))
        except NotFoundError:
            assert record is None
            return multiple()
        except ConflictError:
            assert record is not None and pending is not None
            return multiple()
        assert record is not None and pending is None
        assert run.disposition == "created" and run.id not in self.model
        self.model[run.id] = {"job": record["job"], "status": "pending", "idem": None, "conc": record["conc"]}
        return run.id

    @rule(run_id=consumes(runs))
    def delete(self, run_id: str) -> None:
        record = self.model.get(run_id)
        try:
            self.run(self.client.delete_run(run_id))
        except NotFoundError:
            assert record is None
            return
        except ConflictError:
            assert record is not None and record["status"] == "leased"
            return
        assert record is not None and record["status"] != "leased"
        del self.model[run_id]

    @rule()
    def purge(self) -> None:
        time.sleep(0.003)  # every run that has ended did so at least a millisecond ago
        ended = [rid for rid, r in self.model.items() if r["status"] in ("completed", "failed", "cancelled")]
        assert self.run(self.client.purge_runs(older_than=0)) == len(ended)
        for rid in ended:
            del self.model[rid]

    @rule()
    def work_until_idle(self) -> None:
        """A worker runs every run to its end, then stops cleanly."""
        worker = Durably(self.url, jobs=JOBS, sole_worker=True, **FAST)

        async def drain() -> None:
            await worker.init()
            try:
                for rid, record in self.model.items():
                    if record["status"] in ("pending", "leased"):
                        done = await worker.wait_for_run(rid, timeout=20)
                        assert done.status == FINAL[record["job"]], (done.status, done.error)
                        if done.status == "completed":
                            assert done.output == 6
            finally:
                await worker.stop()

        self.run(drain())
        for record in self.model.values():
            if record["status"] in ("pending", "leased"):
                record["status"] = FINAL[record["job"]]

    # No precondition: whether runs are still unfinished depends on how far a crashed worker
    # got, which is timing, and hypothesis needs the same draws to enable the same rules
    # (FlakyStrategyDefinition otherwise). With nothing unfinished a crash changes nothing.
    @rule(delay=st.sampled_from([0.0, 0.005, 0.01, 0.02, 0.04]))
    def crash(self, delay: float) -> None:
        """Start a worker, let it run a moment, then drop it (and the client) without stop()."""
        worker = Durably(self.url, jobs=JOBS, sole_worker=True, **FAST)

        async def run_a_little() -> None:
            await worker.init()
            await asyncio.sleep(delay)

        self.run(run_a_little())
        self.graveyard.append((self.runner, [worker, self.client]))  # never run again
        self.runner = asyncio.Runner()
        self.client = self.open_client()  # the old client is dropped too
        recorded = set(self.db_rows("SELECT run_id, name FROM durably_steps"))
        for run_id, name in self.db_rows("SELECT run_id, name FROM durably_steps WHERE status = 'completed'"):
            self.frozen_steps.setdefault((run_id, name), EXECUTIONS[(run_id, name)])
        for key, count in EXECUTIONS.items():
            if key not in recorded and count > self.lost[key]:
                # Only the dropped worker's one in-flight execution may be lost per crash.
                assert count - self.lost[key] == 1, (
                    f"step {key} ran {count - self.lost[key]} times unrecorded"
                )
                self.lost[key] = count
        # Runs may have moved on while the worker lived: each one only to where it may go.
        actual = dict(self.db_rows("SELECT id, status FROM durably_runs"))
        for rid, record in self.model.items():
            if record["status"] in ("pending", "leased"):
                assert actual[rid] in ("pending", "leased", FINAL[record["job"]]), (rid, actual[rid])
                record["status"] = actual[rid]

    # --- invariants --------------------------------------------------------------------------
    @invariant()
    def database_matches_the_model(self) -> None:
        actual = dict(self.db_rows("SELECT id, status FROM durably_runs"))
        assert actual == {rid: r["status"] for rid, r in self.model.items()}

    @invariant()
    def committed_steps_never_run_again(self) -> None:
        for key, count in self.frozen_steps.items():
            assert EXECUTIONS[key] == count, f"step {key} ran again after it was committed"
        for run_id, name in self.db_rows("SELECT run_id, name FROM durably_steps"):
            assert EXECUTIONS[(run_id, name)] >= 1, f"step {run_id}/{name} recorded but never ran"
        for rid, record in self.model.items():
            if record["status"] in ("completed", "failed"):
                # Counts, not a set: each step ran once, plus the executions lost to crashes.
                runs_of_steps = {
                    n: EXECUTIONS[(r, n)] - self.lost[(r, n)] for (r, n) in EXECUTIONS if r == rid
                }
                assert runs_of_steps == dict.fromkeys(STEPS[record["job"]], 1), (rid, runs_of_steps)

    @invariant()
    def idempotency_keys_are_unique(self) -> None:
        rows = self.db_rows(
            "SELECT job_name, idempotency_key, COUNT(*) FROM durably_runs "
            "WHERE idempotency_key IS NOT NULL GROUP BY 1, 2 HAVING COUNT(*) > 1"
        )
        assert rows == []

    def teardown(self) -> None:
        try:
            self.run(self.client.stop())
        finally:
            self.runner.close()
            for runner, instances in self.graveyard:
                # Not runner.close(): that would cancel the dead instances' tasks and let their
                # cleanup run. A killed process runs nothing more; just drop its connections.
                for instance in instances:
                    instance._store.connection.close()  # type: ignore[union-attr]
                loop = runner.get_loop()
                # Nor does it report anything: its pending tasks are dropped silently, not
                # logged as "Task was destroyed but it is pending!" when collected.
                loop.set_exception_handler(lambda loop, context: None)
                loop.close()
            self.tmp.cleanup()


DurablyModel.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_durably_state_machine = DurablyModel.TestCase
