"""The crash-torture checker's rules for runs started at once (a worker's own
``trigger_and_wait`` while it is idle: the run is created leased to it), on hand-made
records: a valid history passes, and each broken one is reported, so the checker can fail.

The scenario: worker 100 calls trigger_and_wait (token T1) for a two-step torture-chain run
R1, which it creates leased and starts at once; it is killed during s1, and worker 200
resumes the run in attempt 2. The client never saw R1: the checker adopts it from its label.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from harness import TortureResult, check_log, parse_log
from torture_jobs import AT_ONCE_LABEL, expected_total, step_value

LEASE_NS = 3_000_000_000
WALL = 1_800_000_000_000  # wall-clock ms: where the database's times are
TOTAL = expected_total("R1", ["s0", "s1"])


def run_row(run_id: str = "R1", token: str = "T1", **changes: Any) -> dict[str, Any]:
    row = {
        "id": run_id,
        "job_name": "torture-chain",
        "status": "completed",
        "input": json.dumps({"steps": 2, "delay": 0.01, "fail_at": -1, "spawn": False, "slow": 0.0}),
        "output": json.dumps({"total": expected_total(run_id, ["s0", "s1"])}),
        "labels": json.dumps({AT_ONCE_LABEL: token}),
        "idempotency_key": None,
        "concurrency_key": None,
        "attempt": 2,
        "created_at": WALL,
        "started_at": WALL,
    }
    return {**row, **changes}


def step_row(name: str, xid: str, run_id: str = "R1") -> dict[str, Any]:
    output = {"v": step_value(run_id, name), "x": xid, "run": run_id, "step": name}
    row = {"run_id": run_id, "name": name, "status": "completed", "kind": "run"}
    return {**row, "output": json.dumps(output)}


@dataclass
class Scenario:
    lines: list[str] = field(
        default_factory=lambda: [
            'I T1 100 torture-chain {"delay":0.01,"steps":2} 900',
            "C T1 R1 100 leased 950",
            "B R1 s0 100 x1 1 1000",
            "E R1 s0 100 x1 1 1100",
            "B R1 s1 100 x2 1 1200",  # killed in flight
            "B R1 s1 200 x3 2 5000",
            "E R1 s1 200 x3 2 5100",
        ]
    )
    runs: dict[str, dict[str, Any]] = field(default_factory=lambda: {"R1": run_row()})
    steps: list[dict[str, Any]] = field(default_factory=lambda: [step_row("s0", "x1"), step_row("s1", "x3")])
    labels: list[dict[str, Any]] = field(
        default_factory=lambda: [{"run_id": "R1", "key": AT_ONCE_LABEL, "value": "T1"}]
    )
    killed: dict[int, int] = field(default_factory=lambda: {100: 1300})

    def check(self) -> TortureResult:
        result = TortureResult()
        log = parse_log("\n".join(self.lines) + "\n")
        check_log(
            log, self.runs, self.steps, {}, self.killed, result, lease_ns=LEASE_NS, label_rows=self.labels
        )
        return result


def has(result: TortureResult, text: str) -> bool:
    return any(text in v for v in result.violations)


def test_a_run_started_at_once_killed_and_resumed_passes_and_is_counted() -> None:
    result = Scenario().check()
    assert result.violations == []
    assert (result.at_once_calls, result.started_at_once, result.at_once_resumed) == (1, 1, 1)
    assert (result.runs, result.completed, result.duplicates) == (1, 1, 1)


def test_a_returned_call_passes_when_it_got_the_runs_final_state() -> None:
    scenario = Scenario(killed={})
    scenario.lines[5:] = ["E R1 s1 100 x2 1 1300", f'D T1 R1 100 completed {{"total":{TOTAL}}} 1400']
    scenario.runs["R1"]["attempt"] = 1
    scenario.steps[1] = step_row("s1", "x2")
    result = scenario.check()
    assert result.violations == []
    assert (result.started_at_once, result.at_once_resumed) == (1, 0)


def test_checker_rejects_a_run_created_leased_whose_start_is_not_its_creation() -> None:
    scenario = Scenario()
    scenario.runs["R1"]["started_at"] = WALL + 40  # a claim's start, not the insert's
    assert has(scenario.check(), "started_at")


def test_checker_rejects_a_first_attempt_that_also_ran_in_another_process() -> None:
    scenario = Scenario(killed={100: 1300, 300: 1300})
    scenario.lines[4] = "B R1 s1 300 x2 1 1200"  # attempt 1, which pid 100 holds, run by pid 300
    assert has(scenario.check(), "its attempt 1 also ran in [300]")


def test_checker_rejects_a_run_without_its_label_rows() -> None:
    assert has(Scenario(labels=[]).check(), "label rows {} differ from its labels")


def test_checker_rejects_a_created_run_missing_from_the_database() -> None:
    scenario = Scenario(runs={}, steps=[])
    scenario.lines[2:] = []
    assert has(scenario.check(), "created run R1, which is missing from the database")


def test_checker_rejects_a_call_of_a_live_worker_that_created_nothing() -> None:
    scenario = Scenario(runs={}, steps=[], killed={})
    scenario.lines[1:] = []
    assert has(scenario.check(), "created no run, and its process was not killed")


def test_checker_accepts_a_call_killed_before_its_insert() -> None:
    scenario = Scenario(runs={}, steps=[], labels=[])
    scenario.lines[1:] = []
    result = scenario.check()
    assert result.violations == [] and result.at_once_calls == 1 and result.started_at_once == 0


def test_checker_rejects_two_runs_for_one_call() -> None:
    scenario = Scenario()
    scenario.runs["R2"] = run_row("R2")
    assert has(scenario.check(), "created 2 runs")


def test_checker_rejects_a_labelled_run_no_worker_announced() -> None:
    scenario = Scenario()
    scenario.runs["R1"]["labels"] = json.dumps({AT_ONCE_LABEL: "T9"})
    scenario.labels[0]["value"] = "T9"
    result = scenario.check()
    assert has(result, "no worker announced that call")
    assert has(result, "run R1 exists but was never accepted")


def test_checker_rejects_a_caller_that_never_got_its_run_back() -> None:
    scenario = Scenario(killed={})
    scenario.lines[5:] = ["E R1 s1 100 x2 1 1300"]
    scenario.runs["R1"]["attempt"] = 1
    scenario.steps[1] = step_row("s1", "x2")
    assert has(scenario.check(), "never returned, and its process was not killed")


def test_checker_rejects_a_caller_handed_another_output() -> None:
    scenario = Scenario(killed={})
    scenario.lines[5:] = ["E R1 s1 100 x2 1 1300", 'D T1 R1 100 completed {"total":1} 1400']
    scenario.runs["R1"]["attempt"] = 1
    scenario.steps[1] = step_row("s1", "x2")
    assert has(scenario.check(), "returned run R1 completed {'total': 1}")


def test_checker_rejects_a_call_that_raised() -> None:
    scenario = Scenario()
    scenario.lines.append("X T1 100 StoreError: database is locked")
    assert has(scenario.check(), "raised StoreError: database is locked")


def test_checker_counts_a_call_whose_run_was_queued() -> None:
    scenario = Scenario()
    scenario.lines[1] = "C T1 R1 100 pending 950"
    result = scenario.check()
    assert result.violations == []
    assert (result.started_at_once, result.at_once_queued, result.at_once_resumed) == (0, 1, 0)


def test_the_usual_rules_hold_for_a_run_started_at_once() -> None:
    # Adopted as an accepted run: a step run again after its commit is caught as for any run.
    scenario = Scenario()
    scenario.lines += ["B R1 s0 200 x4 2 4900", "E R1 s0 200 x4 2 4950"]
    assert has(scenario.check(), "step R1/s0 ran again after its commit")


def test_checker_rejects_a_later_attempt_while_the_creator_still_held_the_run() -> None:
    # Worker 200 began attempt 2 at 5000; worker 100, which created the run leased, lived on
    # until 6000 and reported no lost lease: its run was taken from it.
    scenario = Scenario(killed={100: 6000})
    scenario.lines[4] = "B R1 s1 100 x2 1 1200"
    scenario.lines.insert(5, "E R1 s1 100 x2 1 1300")
    result = scenario.check()
    assert has(result, "while that process still held the lease it was created with")
    assert result.at_once_resumed == 0


def test_checker_accepts_a_later_attempt_after_the_creator_reported_its_lease_lost() -> None:
    scenario = Scenario(killed={100: 6000})
    scenario.lines[4] = "B R1 s1 100 x2 1 1200"
    scenario.lines[5:5] = ["E R1 s1 100 x2 1 1300", "L R1 100 4000 LeaseLostError"]
    assert scenario.check().violations == []
