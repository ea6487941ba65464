"""The browser runtime end to end in real headless Chromium: durably.js + worker.js +
Pyodide + SQLite in OPFS, driven through the JS API of static/durably.d.ts.

The page is tests/browser/pages/runtime.html (served under /_test/); its jobs
module (pages/runtime_jobs.py) records the begin and end of every step execution
in IndexedDB before the step commits, with the page load that executed it and
the page loads alive at that moment; executions.py checks that only one page
load executes at a time and that only the step in flight when a page load died
ran again. The fixtures are in conftest.py.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from executions import load_violations, run_violations
from pagekit import PageError, page, wait_for, wait_ready

pytestmark = pytest.mark.browser

TERMINAL = {"run:complete", "run:fail", "run:cancel", "run:delete"}
# Pages that resume runs use a 10-minute lease: a run that resumes and completes
# within the tests' waits (100 s at most) cannot have waited for the old lease to
# expire, however slow the machine. (No bound on the takeover time itself.) The wait
# stays under the driver's 120 s script timeout, so a miss fails as WaitTimeoutError.
LONG_LEASE = "lease=600000"
RESUME_TIMEOUT_MS = 100000


# -- helpers ------------------------------------------------------------------------


def open_page(drv: Any, url: str, query: str = "", name: str = "runtime.html", timeout: float = 60) -> float:
    """Load a test page and wait until DurablyWeb.create() resolved; returns the seconds it took."""
    t0 = time.monotonic()
    drv.get(f"{url}_test/{name}{query}")
    wait_ready(drv, timeout)
    return time.monotonic() - t0


def events(drv: Any, run_id: str | None = None) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = drv.execute_script("return t.events")
    return [e for e in found if run_id is None or e["run_id"] == run_id]


def effect_counts(drv: Any, run_id: str) -> Counter[str]:
    """How often each step of the run began executing."""
    records = page(drv, "return await effects()")
    return Counter(e["step"] for e in records if e["run"] == run_id and e["kind"] == "B")


def check_executions(drv: Any, runs: dict[str, int]) -> tuple[int, int]:
    """Assert the execution records of ``runs`` (run id -> number of steps) break no rule
    of executions.py; returns (page loads that executed steps, re-executed steps)."""
    records = page(drv, "return await effects()")
    violations = load_violations(records)
    duplicates = 0
    for run_id, n_steps in runs.items():
        _, dups, found = run_violations(records, run_id, [f"s{i}" for i in range(n_steps)])
        duplicates += dups
        violations += found
    assert violations == [], "\n".join(violations)
    return len({r["worker"] for r in records}), duplicates


def completed_steps(drv: Any, run_id: str) -> list[str]:
    return [s["name"] for s in page(drv, "return await durably.getSteps(args[0])", run_id)]


# -- tests --------------------------------------------------------------------------


def test_trigger_runs_to_completion_with_events_and_no_outside_requests(
    launch_chromium: Any, site_url: Any, network_guard: Any
) -> None:
    url, _ = site_url
    drv = launch_chromium()
    ready_s = open_page(drv, url)
    info = page(drv, "return {role: durably.role, storage: durably.storage, kind: durably.kind}")
    assert info == {"role": "leader", "storage": "opfs", "kind": "local"}
    statuses = [s["state"] for s in drv.execute_script("return t.statuses")]
    assert statuses[0] == "loading-python" and statuses[-1] == "ready", statuses

    run = page(drv, "return await durably.triggerAndWait('count-steps', {steps: 3}, {timeout: 30000})")
    assert run["status"] == "completed" and run["output"] == {"total": 3}
    wait_for(drv, f"t.events.some((e) => e.run_id === '{run['id']}' && e.type === 'run:complete')")
    types = [e["type"] for e in events(drv, run["id"])]
    assert types.count("step:start") == 3 and types.count("step:complete") == 3
    progress = [e["progress"] for e in events(drv, run["id"]) if e["type"] == "run:progress"]
    assert progress[-1] == {"current": 3, "total": 3, "message": "s2"}
    assert types[0] == "run:trigger" and types[-1] == "run:complete"

    # subscribe(): the async iterator ends after the terminal event; the callback form too.
    seen = page(
        drv,
        """
        const run = await durably.trigger('count-steps', {steps: 2});
        const calls = [];
        const off = durably.subscribe(run.id, (e) => calls.push(e.type));
        const types = [];
        for await (const e of durably.subscribe(run.id)) types.push(e.type);
        const again = [];  // an already finished run still yields its terminal event
        for await (const e of durably.subscribe(run.id)) again.push(e.type);
        off();
        return {types, calls, again, jobs: await durably.jobs()};
        """,
    )
    assert seen["types"][-1] == "run:complete" and "step:complete" in seen["types"]
    assert seen["calls"][-1] == "run:complete"
    assert seen["again"] == ["run:complete"]
    assert seen["jobs"] == ["count-steps"]
    missing = page(
        drv,
        "try { for await (const e of durably.subscribe('nope')) {} } catch (e) { return e.name }",
    )
    assert missing == "NotFoundError"
    assert effect_counts(drv, run["id"]) == Counter({"s0": 1, "s1": 1, "s2": 1})
    assert check_executions(drv, {run["id"]: 3}) == (1, 0)

    network_guard.check(network_guard.urls(drv), url)

    # close() stops the worker and releases the leader lock: a new client in this page leads.
    reopened = page(
        drv,
        """
        await durably.close();
        let closed = null;
        try { await durably.getRuns() } catch (e) { closed = e.name }
        const again = await DurablyWeb.create({jobs: ['runtime_jobs.py'], database: 'runtime-test.db'});
        const result = {closed, role: again.role, runs: (await again.getRuns()).length};
        await again.close();
        return result;
        """,
    )
    assert reopened == {"closed": "DurablyError", "role": "leader", "runs": 2}
    print(f"\npage load to ready: {ready_s * 1000:.0f} ms")


def test_validation_error_reaches_js_with_name_and_details(launch_chromium: Any, site_url: Any) -> None:
    """Also: the ES module entry, storage "memory", and connect() loading remote.js on demand."""
    url, _ = site_url
    drv = launch_chromium()
    open_page(drv, url, "?storage=memory", name="module.html")
    assert drv.execute_script("return window.moduleExports") == {"same": True, "global": True}
    assert page(drv, "return [durably.storage, durably.role]") == ["memory", "leader"]
    with pytest.raises(PageError) as caught:
        page(drv, "return await durably.trigger('count-steps', {steps: 'many'})")
    error = caught.value.error
    assert error["name"] == "ValidationError"
    assert error["details"][0]["loc"] == ["steps"] and error["details"][0]["type"] == "int_parsing"
    assert page(drv, "return (await durably.getRuns()).length") == 0  # nothing was written
    with pytest.raises(PageError) as caught:
        page(drv, "return await durably.getRun('missing')")
    assert caught.value.error["name"] == "NotFoundError" and caught.value.error["details"] is None
    is_error = page(
        drv, "try { await durably.trigger('no-such-job') } catch (e) { return e instanceof Error }"
    )
    assert is_error is True

    remote = page(
        drv,
        """
        const client = DurablyWeb.connect(location.origin + '/no-server-here/');
        const kind = client.kind;  // synchronous, before remote.js has loaded
        try { await client.getRun('x') } catch (e) {
          return {kind, name: e.name, loaded: !!globalThis.DurablyWebRemote};
        }
        """,
    )
    assert remote == {"kind": "remote", "name": "NotFoundError", "loaded": True}


# offline: the same with create({offline: true}), the reload then served by the service worker.
# The IndexedDB reload is with the slow tests (~15-20 s); make test keeps OPFS both ways and
# test_idb_storage.py::test_durably_run_resumes_after_reload (a run resumed on IndexedDB).
@pytest.mark.parametrize(
    ("storage", "offline"),
    [("auto", ""), pytest.param("idb", "", marks=pytest.mark.slow), ("auto", "&offline=1")],
)
def test_reload_mid_run_resumes_without_reexecuting_steps(
    launch_chromium: Any, site_url: Any, storage: str, offline: str
) -> None:
    url, _ = site_url
    drv = launch_chromium()
    open_page(drv, url, f"?storage={storage}&{LONG_LEASE}{offline}")
    expected = "opfs" if storage == "auto" else storage
    assert page(drv, "return durably.storage") == expected
    run = page(drv, "return await durably.trigger('count-steps', {steps: 8, delay: 0.3})")
    wait_for(
        drv, f"t.events.filter((e) => e.run_id === '{run['id']}' && e.type === 'step:complete').length >= 3"
    )
    before = completed_steps(drv, run["id"])
    assert 3 <= len(before) < 8

    reload_at = time.time() * 1000
    drv.refresh()
    wait_ready(drv)
    ready_ms = drv.execute_script("return t.statuses.find((s) => s.state === 'ready').at") - reload_at
    # The resumed run starts right away: the leader lock proves the old page is gone,
    # so nobody waits for the (10-minute) lease to expire.
    done = page(
        drv, "return await durably.waitForRun(args[0], {timeout: args[1]})", run["id"], RESUME_TIMEOUT_MS
    )
    assert done["status"] == "completed" and done["output"] == {"total": sum(range(8))}
    after = events(drv, run["id"])
    first_start = min(e["at"] for e in after if e["type"] == "step:start")
    resume_ms = first_start - reload_at

    counts = effect_counts(drv, run["id"])
    assert all(counts[name] == 1 for name in before), (before, counts)  # never executed again
    # Two page loads, the new one's first step after the old one stopped; at most the
    # step in flight at the reload ran twice, first in the old page load.
    loads, duplicates = check_executions(drv, {run["id"]: 8})
    assert loads == 2 and duplicates <= 1, (loads, counts)
    resumed = [e["step_name"] for e in after if e["type"] == "step:start"]
    assert not set(resumed) & set(before), resumed
    assert page(drv, "return await durably.integrityCheck()") == "ok"
    info = page(drv, "return await durably.storageInfo()")
    assert info["storage"] == expected
    if expected == "opfs":
        assert (info["journalMode"], info["lockingMode"]) == ("wal", "exclusive")
    timeline = [f"{s['state']}@{s['at'] - reload_at:.0f}" for s in drv.execute_script("return t.statuses")]
    print(
        f"\n{storage}: reload -> ready {ready_ms:.0f} ms, -> first resumed step {resume_ms:.0f} ms;"
        f" executions per step: {dict(sorted(counts.items()))}; after reload (ms): {' '.join(timeline)}"
    )


def test_runs_survive_closing_and_reopening_the_browser(
    launch_chromium: Any, site_url: Any, tmp_path: Path
) -> None:
    url, _ = site_url
    profile = tmp_path / "profile"
    drv = launch_chromium(profile)
    open_page(drv, url, f"?{LONG_LEASE}")
    done = page(drv, "return await durably.triggerAndWait('count-steps', {steps: 3})")
    running = page(drv, "return await durably.trigger('count-steps', {steps: 12, delay: 0.25})")
    wait_for(drv, f"t.events.some((e) => e.run_id === '{running['id']}' && e.type === 'step:complete')")
    drv.quit()  # the whole browser goes away mid-run

    drv = launch_chromium(profile)
    open_page(drv, url, f"?{LONG_LEASE}")
    again = page(drv, "return await durably.getRun(args[0])", done["id"])
    assert again["status"] == "completed" and again["output"] == {"total": 3}
    steps = page(drv, "return await durably.getSteps(args[0])", done["id"])
    assert [(s["name"], s["output"]) for s in steps] == [("s0", 0), ("s1", 1), ("s2", 2)]
    resumed = page(
        drv, "return await durably.waitForRun(args[0], {timeout: args[1]})", running["id"], RESUME_TIMEOUT_MS
    )
    assert resumed["status"] == "completed" and resumed["output"] == {"total": sum(range(12))}
    assert effect_counts(drv, done["id"]) == Counter({"s0": 1, "s1": 1, "s2": 1})
    loads, duplicates = check_executions(drv, {done["id"]: 3, running["id"]: 12})
    assert loads == 2 and duplicates <= 1, (loads, effect_counts(drv, running["id"]))
    assert page(drv, "return await durably.integrityCheck()") == "ok"


# The service-worker variant is with the slow tests (~30 s): make test keeps the handover over
# the network here, and pages served by the service worker in the offline reload above and in
# test_offline.py.
@pytest.mark.parametrize(
    "offline", ["", pytest.param("&offline=1", marks=pytest.mark.slow)], ids=["network", "service-worker"]
)
def test_two_tabs_one_leader_and_handover(launch_chromium: Any, site_url: Any, offline: str) -> None:
    url, _ = site_url
    drv = launch_chromium()
    open_page(drv, url, f"?{LONG_LEASE}{offline}")
    tab_a = drv.current_window_handle
    drv.switch_to.new_window("tab")
    tab_b = drv.current_window_handle
    open_page(drv, url, f"?{LONG_LEASE}{offline}")
    assert page(drv, "return durably.role") == "follower"

    # Runs triggered from either tab execute once, in the leader; both tabs see all events.
    from_b = page(drv, "return await durably.triggerAndWait('count-steps', {steps: 3}, {timeout: 30000})")
    assert from_b["status"] == "completed"
    drv.switch_to.window(tab_a)
    assert page(drv, "return durably.role") == "leader"
    from_a = page(drv, "return await durably.triggerAndWait('count-steps', {steps: 3}, {timeout: 30000})")
    for run in (from_a, from_b):
        assert effect_counts(drv, run["id"]) == Counter({"s0": 1, "s1": 1, "s2": 1})
    drv.switch_to.window(tab_b)
    wait_for(drv, f"t.events.some((e) => e.run_id === '{from_a['id']}' && e.type === 'run:complete')")
    assert {e["type"] for e in events(drv, from_b["id"])} >= {"step:start", "step:complete", "run:progress"}

    # Close the leader mid-run: tab B takes over and resumes the run.
    long = page(drv, "return await durably.trigger('count-steps', {steps: 10, delay: 0.3})")
    wait_for(
        drv, f"t.events.filter((e) => e.run_id === '{long['id']}' && e.type === 'step:complete').length >= 2"
    )
    before = completed_steps(drv, long["id"])
    drv.switch_to.window(tab_a)
    closed_at = time.time() * 1000
    drv.close()
    drv.switch_to.window(tab_b)
    # A call issued during the handover waits for the new leader (and runs once).
    during = page(drv, "return {run: await durably.trigger('count-steps', {steps: 2}), role: durably.role}")
    took_over = wait_for(
        drv, "t.statuses.find((s) => s.state === 'leader' && s.detail && s.detail.takeover)", timeout=120
    )
    takeover_ms = took_over["at"] - closed_at
    assert page(drv, "return durably.role") == "leader"
    # Well within the 10-minute lease: the new leader did not wait for the old one's lease.
    done = page(
        drv, "return await durably.waitForRun(args[0], {timeout: args[1]})", long["id"], RESUME_TIMEOUT_MS
    )
    assert done["status"] == "completed" and done["output"] == {"total": sum(range(10))}
    counts = effect_counts(drv, long["id"])
    assert all(counts[name] == 1 for name in before), (before, counts)
    page(drv, "return await durably.waitForRun(args[0], {timeout: 30000})", during["run"]["id"])
    assert effect_counts(drv, during["run"]["id"]) == Counter({"s0": 1, "s1": 1})
    # Tab A's page load executed everything until it closed, tab B's only after that
    # (never while A was alive); only the step in flight at the close ran twice.
    runs = {from_a["id"]: 3, from_b["id"]: 3, long["id"]: 10, during["run"]["id"]: 2}
    loads, duplicates = check_executions(drv, runs)
    assert loads == 2 and duplicates <= 1, (loads, counts)
    assert page(drv, "return await durably.integrityCheck()") == "ok"
    print(
        f"\nleader tab closed -> other tab leads: {takeover_ms:.0f} ms"
        f" (a trigger issued right after the close was answered as {during['role']})"
    )
