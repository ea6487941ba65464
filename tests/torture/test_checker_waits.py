"""The crash-torture checker's durable-waiting rules (retries, sleeps, signals), on hand-made
records: a valid history passes, and each broken one is reported, so the checker can fail.

Each scenario is one run as the torture would leave it: side-effect log lines (format in
torture_jobs.py), the database rows, and what the client knows (``Expected``, the signals
it sent). A test breaks one thing and asserts the violation that names it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from harness import Expected, SentSignal, TortureResult, check_log, parse_log
from torture_jobs import RETRY_STEPS, signal_names, sleep_names, step_value

LEASE_NS = 3_000_000_000
WALL = 1_800_000_000_000  # wall-clock ms: where the database's times are


@dataclass
class Scenario:
    lines: list[str]
    steps: list[dict[str, Any]]
    run: dict[str, Any]
    expected: Expected
    attempts: list[dict[str, Any]] = field(default_factory=list)
    signals: list[dict[str, Any]] = field(default_factory=list)
    killed: dict[int, int] = field(default_factory=dict)

    def check(self) -> TortureResult:
        result = TortureResult()
        check_log(
            parse_log("\n".join(self.lines) + "\n"),
            {self.run["id"]: self.run},
            self.steps,
            {self.expected.run_id: self.expected},
            self.killed,
            result,
            lease_ns=LEASE_NS,
            attempt_rows=self.attempts,
            signal_rows=self.signals,
        )
        return result


def step_row(name: str, xid: str, *, attempt: int = 1, **extra: Any) -> dict[str, Any]:
    output = {"v": step_value("R1", name), "x": xid, "run": "R1", "step": name, **extra}
    return {
        "run_id": "R1",
        "name": name,
        "status": "completed",
        "kind": "run",
        "output": json.dumps(output),
        "attempt": attempt,
        "started_at": WALL,
    }


def run_row(job: str, output: dict[str, Any] | None, *, status: str = "completed") -> dict[str, Any]:
    return {
        "id": "R1",
        "job_name": job,
        "status": status,
        "output": None if output is None else json.dumps(output),
        "idempotency_key": None,
        "concurrency_key": None,
        "attempt": 3,
    }


def executed(name: str, xid: str, attempt: int, begin: int, *, pid: int = 100) -> list[str]:
    """The B/E lines of one execution that ran to its end (monotonic ns)."""
    return [f"B R1 {name} {pid} {xid} {attempt} {begin}", f"E R1 {name} {pid} {xid} {attempt} {begin + 50}"]


def has(result: TortureResult, text: str) -> bool:
    return any(text in v for v in result.violations)


# --- retries ----------------------------------------------------------------------------------------
# torture-retry, fails=1 under max_attempts=3 and initial delay 0.1 s: 'flaky' fails attempt 1
# at WALL + 5; the backoff (100 ms) makes attempt 2 due at WALL + 105, the persisted time WALL + 106.


def retry_scenario(second_begins: int = WALL + 120, *, wake: int = WALL + 106) -> Scenario:
    lines = [
        *executed("s0", "x0", 1, 1000),
        "B R1 flaky 100 x1 1 2000",
        f"A R1 flaky 100 x1 1 {WALL}",
        "F R1 flaky 100 x1",
        "E R1 flaky 100 x1 1 2050",
        f"W R1 flaky retry {wake} 1 100 2100",
        "B R1 flaky 100 x2 2 3000",
        f"A R1 flaky 100 x2 2 {second_begins}",
        "E R1 flaky 100 x2 2 3050",
        *executed("s1", "x3", 2, 4000),
    ]
    failure = {"type": "StepFailure", "message": "flaky fails on purpose (attempt 1, xid x1)"}
    attempts = [
        {
            "run_id": "R1",
            "seq": 1,
            "name": "flaky",
            "attempt": 1,
            "error": json.dumps(failure),
            "started_at": WALL,
            "completed_at": WALL + 5,
        }
    ]
    steps = [
        step_row("s0", "x0"),
        step_row("flaky", "x2", attempt=2, attempt_seen=2),
        step_row("s1", "x3", attempt=1),
    ]
    total = sum(step_value("R1", n) for n in RETRY_STEPS)
    expected = Expected(run_id="R1", job="torture-retry", fails=1, max_attempts=3, retry_delay=0.1)
    return Scenario(lines, steps, run_row("torture-retry", {"total": total}), expected, attempts)


def test_a_retry_after_its_backoff_is_accepted() -> None:
    result = retry_scenario().check()
    assert result.violations == []
    assert (result.retried, result.waits, result.lease_lapses) == (1, 1, 0)


def test_a_retry_before_its_backoff_ended_is_reported() -> None:
    result = retry_scenario(second_begins=WALL + 40).check()
    assert has(result, "before its failure plus the backoff"), result.violations


def test_a_retry_before_its_persisted_wake_up_time_is_reported() -> None:
    # After the failure plus the backoff (WALL + 105), but before the time the engine persisted.
    result = retry_scenario(second_begins=WALL + 105, wake=WALL + 200).check()
    assert has(result, "before its persisted wake-up time"), result.violations
    assert not has(result, "plus the backoff"), result.violations


def test_a_persisted_wake_up_time_shorter_than_the_backoff_is_reported() -> None:
    result = retry_scenario(wake=WALL + 6).check()
    assert has(result, "was due at"), result.violations


def test_attempt_numbers_with_a_gap_are_reported() -> None:
    scenario = retry_scenario()
    scenario.steps[1]["attempt"] = 3  # attempt 1 failed, then "attempt 3" completed
    result = scenario.check()
    assert has(result, "attempt numbers are not consecutive"), result.violations


def test_a_recorded_attempt_that_runs_again_is_reported() -> None:
    scenario = retry_scenario()
    # Attempt 1 executes again (another pid) after its failure was recorded.
    scenario.lines[9:9] = [
        "B R1 flaky 200 x9 2 2500",
        f"A R1 flaky 200 x9 1 {WALL + 110}",
        "F R1 flaky 200 x9",
        "E R1 flaky 200 x9 2 2550",
    ]
    result = scenario.check()
    assert has(result, "executed attempt 1 again after attempt 1's failure"), result.violations


def test_a_recorded_failure_that_no_execution_produced_is_reported() -> None:
    scenario = retry_scenario()
    scenario.attempts[0]["error"] = json.dumps({"message": "flaky fails on purpose (attempt 1, xid nope)"})
    assert has(scenario.check(), "names execution nope"), scenario.check().violations


def test_a_retry_wait_without_its_attempt_row_is_reported() -> None:
    scenario = retry_scenario()
    scenario.attempts.clear()  # the wait committed, the attempt row (same transaction) did not
    result = scenario.check()
    assert has(result, "that attempt is not recorded"), result.violations


def test_more_retried_failures_than_the_policy_allows_are_reported() -> None:
    scenario = retry_scenario()
    scenario.expected.max_attempts = 1  # no retry at all: attempt 1 should have failed the run
    result = scenario.check()
    assert has(result, "failed attempts recorded as retried"), result.violations


# --- sleeps ----------------------------------------------------------------------------------------
# torture-sleep with one nap of 0.2 s, begun at WALL: due at WALL + 200.


def sleep_scenario(past_at: int = WALL + 201, *, waits: tuple[int, ...] = (WALL + 200,)) -> Scenario:
    due = WALL + 200
    lines = [
        *executed("s0", "x0", 1, 1000),
        *(f"W R1 nap-0 sleep {w} 0 100 2000" for w in waits),
        f"H R1 nap-0 100 2 {past_at} -",
        *executed("s1", "x1", 2, 3000),
    ]
    nap = {"run_id": "R1", "name": "nap-0", "status": "completed", "kind": "sleep", "output": str(due)}
    steps = [step_row("s0", "x0"), {**nap, "started_at": WALL}, step_row("s1", "x1")]
    names, values = sleep_names(1)
    total = sum(step_value("R1", n) for n in values)
    expected = Expected(run_id="R1", job="torture-sleep", naps=[0.2])
    assert [r["name"] for r in steps] == names
    return Scenario(lines, steps, run_row("torture-sleep", {"total": total}), expected)


def test_a_sleep_that_ends_at_its_due_time_is_accepted() -> None:
    result = sleep_scenario().check()
    assert result.violations == []
    assert result.slept == 1


def test_a_sleep_that_ends_before_its_due_time_is_reported() -> None:
    result = sleep_scenario(past_at=WALL + 150).check()
    assert has(result, "50 ms before its due time"), result.violations


def test_a_sleep_restarted_after_a_kill_is_reported() -> None:
    # A second wait of the same sleep persisted a later due time: it slept again.
    result = sleep_scenario(waits=(WALL + 200, WALL + 900)).check()
    assert has(result, "the sleep was restarted"), result.violations


def test_a_sleep_whose_due_time_is_not_its_start_plus_its_duration_is_reported() -> None:
    scenario = sleep_scenario()
    scenario.steps[1]["started_at"] = WALL + 50
    assert has(scenario.check(), "not its start"), scenario.check().violations


# --- signals ----------------------------------------------------------------------------------------
# torture-signal with one wait (go-0): the primary p-go-0 sent at WALL (stored), then the same
# signal_id again with another payload (a duplicate).


def signal_scenario(
    *, token_seen: str = "tA", breaks: Callable[[Scenario], None] | None = None
) -> Scenario:
    sent = [
        SentSignal("go-0", "p-go-0", "tA", "primary", "stored", WALL),
        SentSignal("go-0", "p-go-0", "tB", "duplicate", "duplicate", WALL + 1),
    ]
    lines = [
        *executed("s0", "x0", 1, 1000),
        "W R1 go-0 signal -1 0 100 2000",
        f"H R1 go-0 100 2 {WALL + 10} {token_seen}",
        *executed("after-0", "x1", 2, 3000),
    ]
    wait = {
        "run_id": "R1",
        "name": "go-0",
        "status": "completed",
        "kind": "signal",
        "output": json.dumps({"payload": {"token": "tA"}}),
    }
    steps = [step_row("s0", "x0"), wait, step_row("after-0", "x1", token="tA")]
    names, values = signal_names(1)
    assert [r["name"] for r in steps] == names
    total = sum(step_value("R1", n) for n in values)
    stored = [
        {
            "id": 1,
            "run_id": "R1",
            "name": "go-0",
            "signal_id": "p-go-0",
            "payload": json.dumps({"token": "tA"}),
            "created_at": WALL,
            "consumed_at": WALL + 9,
        }
    ]
    expected = Expected(run_id="R1", job="torture-signal", waits=1, signals=sent)
    run = run_row("torture-signal", {"total": total, "tokens": ["tA"]})
    scenario = Scenario(lines, steps, run, expected, signals=stored)
    if breaks is not None:
        breaks(scenario)
    return scenario


def test_a_signal_consumed_once_with_its_payload_is_accepted() -> None:
    result = signal_scenario().check()
    assert result.violations == []
    assert result.signals_consumed == 1


def test_a_duplicate_signal_id_stored_again_is_reported() -> None:
    def duplicate_stored(s: Scenario) -> None:
        again = {"id": 2, "payload": json.dumps({"token": "tB"}), "consumed_at": None}
        s.signals.append({**s.signals[0], **again})

    result = signal_scenario(breaks=duplicate_stored).check()
    assert has(result, "is stored 2 times"), result.violations


def test_a_signal_consumed_twice_is_reported() -> None:
    def spare_consumed_too(s: Scenario) -> None:
        s.expected.signals.append(SentSignal("go-0", "spare-go-0", "tC", "spare", "stored", WALL + 2))
        s.signals.append(
            {**s.signals[0], "id": 2, "signal_id": "spare-go-0", "payload": json.dumps({"token": "tC"})}
        )

    result = signal_scenario(breaks=spare_consumed_too).check()
    assert has(result, "2 signals consumed by one wait"), result.violations


def test_a_handler_given_another_payload_is_reported() -> None:
    result = signal_scenario(token_seen="tB").check()  # the duplicate's payload reached the handler
    assert has(result, "got tB, not the payload of the signal sent"), result.violations


def test_a_wait_that_recorded_another_payload_is_reported() -> None:
    def wrong_outcome(s: Scenario) -> None:
        s.steps[1]["output"] = json.dumps({"payload": {"token": "tB"}})

    result = signal_scenario(breaks=wrong_outcome).check()
    assert has(result, "not the first signal sent"), result.violations


def test_a_consumed_signal_without_its_wait_checkpoint_is_reported() -> None:
    def cancelled_before_the_checkpoint(s: Scenario) -> None:
        s.run.update(status="cancelled", output=None)
        s.expected.cancel_accepted = True
        del s.steps[1:]
        s.lines[:] = s.lines[:2]

    result = signal_scenario(breaks=cancelled_before_the_checkpoint).check()
    assert has(result, "a signal was consumed, but the wait's checkpoint is missing"), result.violations


def test_a_lost_signal_is_reported() -> None:
    def lost(s: Scenario) -> None:
        s.signals.clear()  # accepted ("stored"), then gone

    result = signal_scenario(breaks=lost).check()
    assert has(result, "is stored 0 times"), result.violations


def test_a_refused_signal_of_a_run_still_waiting_is_reported() -> None:
    def refused(s: Scenario) -> None:
        s.expected.signals[0].disposition = "refused"

    result = signal_scenario(breaks=refused).check()
    assert has(result, "refused signal go-0"), result.violations


# --- deadlines -------------------------------------------------------------------------------------
# torture-deadline with a nap of 5 s and a trigger timeout of 0.6 s: the run fails with
# RunTimeoutError during its sleep, at its deadline WALL + 600. That is intentional.

TIMEOUT_ERROR = json.dumps({"type": "RunTimeoutError", "message": "passed its deadline"})


def deadline_scenario(*, completed_at: int = WALL + 601, error: str = TIMEOUT_ERROR) -> Scenario:
    lines = [*executed("s0", "x0", 1, 1000), f"W R1 nap sleep {WALL + 5000} 0 100 2000"]
    nap = {"run_id": "R1", "name": "nap", "status": "completed", "kind": "sleep", "output": str(WALL + 5000)}
    steps = [step_row("s0", "x0"), {**nap, "started_at": WALL}]
    run = {
        **run_row("torture-deadline", None, status="failed"),
        "error": error,
        "deadline_at": WALL + 600,
        "completed_at": completed_at,
    }
    expected = Expected(run_id="R1", job="torture-deadline", nap=5.0, timeout=0.6)
    return Scenario(lines, steps, run, expected)


def test_a_run_that_timed_out_on_purpose_is_accepted() -> None:
    result = deadline_scenario().check()
    assert result.violations == [] and result.timed_out == 1


def test_a_timed_out_run_with_its_step_in_flight_at_the_deadline_is_accepted() -> None:
    scenario = deadline_scenario()
    scenario.lines = scenario.lines[:2]  # s0 ran (its E line: written when cancelled too), no row
    scenario.steps = []
    assert scenario.check().violations == []


def test_a_deadline_run_failed_before_its_deadline_or_by_another_error_is_reported() -> None:
    early = deadline_scenario(completed_at=WALL + 300).check()
    assert has(early, "before its deadline"), early.violations
    other = deadline_scenario(error=json.dumps({"type": "StepFailure", "message": "no"})).check()
    assert has(other, "should have timed out"), other.violations


def test_a_run_in_time_that_ended_after_its_deadline_is_reported() -> None:
    scenario = deadline_scenario()
    scenario.expected.timeout = None  # the job's 120 s: it should have completed in time
    scenario.lines += [f"H R1 nap 100 2 {WALL + 5001} -", *executed("s1", "x1", 2, 3000)]
    scenario.steps.append(step_row("s1", "x1"))
    total = step_value("R1", "s0") + step_value("R1", "s1")
    scenario.run = {
        **run_row("torture-deadline", {"total": total}),
        "deadline_at": WALL + 600,
        "completed_at": WALL + 5002,
    }
    result = scenario.check()
    assert has(result, "after its deadline"), result.violations
