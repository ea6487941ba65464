"""The core engine test suite, run INSIDE Pyodide (node and headless Chromium) with pytest.

pytest.main runs in the Pyodide interpreter over the unchanged test modules (see
in_pyodide.py for how they get there and which event loop drives them). The host
asserts: nothing failed or errored, at least MIN_PASSED tests passed (some in every module of
CORE_MODULES; the per-module counts are printed), and the only
skips are exactly the tests listed in NEEDS_CPYTHON (each skipped there with the
``needs_cpython`` marker and its reason).
"""

from __future__ import annotations

import json
import os
from typing import Any

from pyodide_support import CORE_MODULES

# nodeid -> why it cannot run in Pyodide. Checked both ways: a listed test that no
# longer exists fails the run, and any other skip fails it too.
_THREADS = "threads: Pyodide cannot start a thread"
_SIGKILL = "subprocess + SIGKILL: Pyodide cannot spawn or kill processes"
NEEDS_CPYTHON: dict[str, str] = {
    "tests/test_steps.py::test_a_blocking_sync_step_runs_off_the_event_loop_and_leases_keep_renewing": (
        f"{_THREADS} (asserts the sync step ran on a worker thread and uses asyncio.to_thread; "
        "in Pyodide Durably runs sync steps on the loop, run_sync_in_thread=False)"
    ),
    "tests/test_steps.py::test_logs_and_progress_from_inside_a_sync_step_are_delivered_on_the_event_loop": (
        f"{_THREADS} (asserts the sync step ran on a thread other than the event loop's)"
    ),
    "tests/test_engine.py::test_cancel_during_a_blocking_sync_step_runs_no_further_steps": (
        f"{_THREADS} (the step blocks its worker thread on a threading.Event; asyncio.to_thread)"
    ),
    "tests/test_storage.py::test_concurrent_first_opens_migrate_once": (
        f"{_THREADS} (migrates from several threads at once via asyncio.to_thread)"
    ),
    "tests/test_storage.py::test_writers_wait_for_a_locked_database_up_to_the_busy_timeout": (
        f"{_THREADS} (a threading.Timer releases the lock; MEMFS SQLite has no file locking either)"
    ),
    "tests/test_storage.py::test_waiting_for_a_locked_database_does_not_freeze_the_event_loop": (
        f"{_THREADS} (a threading.Timer releases the lock; MEMFS SQLite has no file locking either)"
    ),
    "tests/test_engine.py::test_abandoned_run_is_reclaimed_after_lease_expiry_and_resumes": (
        "subprocess: a second OS process (tests/crash_jobs.py) runs the job; Pyodide cannot spawn processes"
    ),
    "tests/test_storage.py::test_two_worker_processes_on_one_file_run_every_run_exactly_once": (
        "subprocess: two OS worker processes share one database file; Pyodide cannot spawn processes"
    ),
    "tests/test_retries.py::test_sigkill_during_a_backoff_then_restart_retries_at_the_persisted_time": (
        f"{_SIGKILL} (a crash_jobs.py worker is killed during its backoff, a second one retries)"
    ),
    "tests/test_retries.py::test_two_workers_on_one_file_never_both_execute_a_retry": (
        "subprocess: two OS worker processes share one database file; Pyodide cannot spawn processes"
    ),
    "tests/test_flow_control.py::test_max_concurrent_holds_across_two_processes": (
        "subprocess: two OS worker processes share one database file; Pyodide cannot spawn processes"
    ),
    "tests/test_flow_control.py::test_sigkill_after_a_burst_of_debounced_triggers_leaves_exactly_one_run": (
        f"{_SIGKILL} (a flow_jobs.py process is killed after its triggers, a second one runs the run)"
    ),
    "tests/test_flow_control.py::test_sigkill_with_a_full_rate_window_keeps_the_limit_after_restart": (
        f"{_SIGKILL} (a flow_jobs.py worker is killed with its rate window full, a second one resumes)"
    ),
    "tests/test_sleep.py::test_sigkill_during_a_sleep_then_restart_continues_at_the_due_time_without_sleeping_again": (  # noqa: E501
        f"{_SIGKILL} (a crash_jobs.py worker is killed during its sleep, a second one continues)"
    ),
    "tests/test_signals.py::test_sigkill_while_waiting_for_a_signal_then_signal_and_restart": (
        f"{_SIGKILL} (a crash_jobs.py worker is killed while it waits, a second one takes the signal)"
    ),
    "tests/test_resume.py::test_a_resumed_run_survives_sigkill_and_never_repeats_its_completed_steps": (
        f"{_SIGKILL} (crash_jobs.py workers fail, resume and are killed mid-step)"
    ),
    "tests/test_network.py::test_a_run_waiting_for_the_network_survives_sigkill_and_continues_after_a_restart_online": (  # noqa: E501
        f"{_SIGKILL} (a crash_jobs.py worker is killed while its run waits for the network)"
    ),
    "tests/test_parallel_steps.py::test_sync_branches_run_at_once_in_the_workers_threads": (
        f"{_THREADS} (two sync branches meet at a threading.Barrier; in Pyodide they run in turn)"
    ),
    "tests/test_parallel_steps.py::test_sigkill_during_a_step_all_then_restart_runs_only_the_unfinished_branch": (  # noqa: E501
        f"{_SIGKILL} (a crash_jobs.py worker is killed while one branch of its step.all is blocked)"
    ),
    "tests/test_parallel_steps.py::test_sigkill_while_a_step_all_waits_for_a_branch_retry_then_restart_retries_only_it": (  # noqa: E501
        f"{_SIGKILL} (a crash_jobs.py worker is killed while its step.all waits to retry a branch)"
    ),
    "tests/test_attempt_metadata.py::test_metadata_over_http_rpc_and_the_cli": (
        "the HTTP app (httpx's ASGI transport) and the CLI are CPython surfaces"
    ),
    "tests/test_child_runs.py::test_sigkill_between_start_child_and_wait_for_child_then_restart_has_one_child": (  # noqa: E501
        f"{_SIGKILL} (a crash_jobs.py worker is killed between start_child and wait_for_child)"
    ),
    "tests/test_child_runs.py::test_sigkill_while_a_parent_waits_for_its_child_then_restart_completes_both": (
        f"{_SIGKILL} (a crash_jobs.py worker is killed while the parent waits for its child)"
    ),
    "tests/test_deadlines.py::test_a_sync_step_past_the_deadline_ends_but_its_result_is_not_recorded": (
        f"{_THREADS} (the step blocks its worker thread on a threading.Event; asyncio.to_thread)"
    ),
    "tests/test_deadlines.py::test_a_worker_killed_in_a_step_leaves_the_deadline_to_the_next_worker": (
        f"{_SIGKILL} (a crash_jobs.py worker is killed mid-step, a second one fails the overdue run)"
    ),
    "tests/test_versions.py::test_the_code_hash_is_the_same_in_another_process_with_other_string_hashing": (
        "subprocess: the hash is computed again in interpreters with other PYTHONHASHSEEDs"
    ),
    "tests/test_versions.py::test_after_a_kill_a_worker_of_another_version_never_claims_the_run": (
        f"{_SIGKILL} (crash_jobs.py workers of two versions, the first killed while its run sleeps)"
    ),
    "tests/test_schedules.py::test_two_processes_firing_every_second_create_one_run_per_tick": (
        "subprocess: two OS worker processes fire one schedule's ticks; Pyodide cannot spawn processes"
    ),
    "tests/test_schedules.py::test_sigkill_right_after_a_tick_fired_then_restart_runs_it_once_and_fires_the_next": (  # noqa: E501
        f"{_SIGKILL} (a crash_jobs.py worker kills itself right after firing a tick, a second one goes on)"
    ),
    "tests/test_schedules.py::test_sigkill_at_any_moment_while_ticks_fire_leaves_one_run_per_tick": (
        f"{_SIGKILL} (a crash_jobs.py worker firing a tick a second is killed, a second one goes on)"
    ),
}

# The engine modules' tests that pass under CPython on SQLite, minus the ones above: 187 for the
# modules before issue 14; the flow-control module adds 17; the parallel-step and attempt-metadata
# modules 29; the child-run module 12; the deadline and version modules 28; the schedule module 28.
# The storage contract (tests/test_store_contract.py) adds its tests once per store backend; in
# Pyodide there are three (sqlite-file and sqlite-memory on stdlib sqlite3, sqlite-wasm on the
# browser's).
MIN_PASSED = 187 + 17 + 29 + 12 + 28 + 28 + 167 * 3


def test_core_suite_runs_in_pyodide(pyodide_rt: Any) -> None:
    # DURABLY_PYODIDE_TESTS="tests/test_steps.py -k foo" narrows the run while debugging.
    selected = os.environ.get("DURABLY_PYODIDE_TESTS", "").split()
    summary = json.loads(
        pyodide_rt.run(
            "import sys; sys.path.insert(0, '/durably/tests/pyodide')\n"
            "import in_pyodide\n"
            f"in_pyodide.run_pytest({selected or CORE_MODULES!r}, {NEEDS_CPYTHON!r})"
        )
    )
    counts = summary["counts"]
    print(
        f"\n[{pyodide_rt.browser}] {summary['python'].split()[0]} on {summary['platform']}: {counts} "
        f"in {summary['seconds']} s (pytest exit code {summary['exit_code']})"
    )
    per_module: dict[str, dict[str, int]] = {}
    for nodeid, outcome in summary["outcomes"].items():
        tally = per_module.setdefault(nodeid.split("::")[0], {})
        tally[outcome] = tally.get(outcome, 0) + 1
    for module, tally in sorted(per_module.items()):
        print(f"  {module}: " + ", ".join(f"{n} {k}" for k, n in sorted(tally.items())))
    slowest = sorted(summary["durations"].items(), key=lambda kv: -kv[1])[:5]
    print("  slowest: " + ", ".join(f"{n.split('::')[-1]} {d:.1f}s" for n, d in slowest))
    for nodeid, reason in sorted(summary["skip_reasons"].items()):
        print(f"  skipped {nodeid}: {reason}")
    for nodeid, text in summary["failures"].items():
        print(f"\n--- {nodeid}\n{text[-3000:]}")
    assert not summary["failures"], f"{len(summary['failures'])} failed in Pyodide:\n{summary['output_tail']}"
    assert summary["exit_code"] == 0, summary["output_tail"]
    if selected:
        return  # a narrowed debugging run: the checks below are about the whole suite
    assert not summary["unmatched_skips"], f"NEEDS_CPYTHON lists unknown tests: {summary['unmatched_skips']}"
    assert set(summary["skip_reasons"]) == set(NEEDS_CPYTHON), summary["skip_reasons"]
    assert counts.get("passed", 0) >= MIN_PASSED, counts
    # Every module listed ran something (a module that collected nothing would pass silently).
    idle = [m for m in CORE_MODULES if not per_module.get(m, {}).get("passed")]
    assert not idle, f"no test passed in Pyodide in {idle}"
    on_wasm = [n for n, outcome in summary["outcomes"].items() if "[sqlite-wasm" in n and outcome == "passed"]
    assert on_wasm, "no storage contract test passed on the sqlite-wasm store"
