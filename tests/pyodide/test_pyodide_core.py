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

# 201 pass under CPython in the engine modules (on SQLite), minus the 14 above: 187; the 31 of
# tests/test_schedules.py minus its 3 above: 28. The storage contract (tests/test_store_contract.py)
# adds its 137 tests once per store backend; in Pyodide there are three (sqlite-file and
# sqlite-memory on stdlib sqlite3, sqlite-wasm on the browser's): 411.
MIN_PASSED = 187 + 28 + 411


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
