"""Durable waiting in real headless Chromium: sleeps, signals and retry backoffs outlive a
page reload, a step.all reloaded between its branches, and the JS API's sendSignal, resumeRun, forkRun
and getStepAttempts.

The page is pages/runtime.html with the job modules runtime_jobs.py and waiting_jobs.py
(whose steps record every execution in IndexedDB, see tests/browser/executions.py), on a
short polling interval: after a reload the new leader finds the runs whose wait is due by
polling. A page load costs several seconds (Pyodide), so one Chromium serves the module and
the tests share one page on OPFS: the follower test adds a second tab, the reload test
reloads it. Waits are short (a 3 s sleep, 1.5 s backoffs) and every deadline is generous.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from executions import load_violations
from pagekit import page, wait_ready

pytestmark = pytest.mark.browser

JOBS = "runtime_jobs.py,waiting_jobs.py"
# A 10-minute lease: nothing here may wait for one to expire.
LEASE_MS = 600000
POLL_MS = 200
DEADLINE_MS = 60000  # for waitForRun in the page; below the driver's 120 s script timeout

# Runs in the page: poll(fn) awaits fn() until it is truthy (30 s at most).
POLL_JS = """
const poll = async (fn, what) => {
  const deadline = Date.now() + 30000;
  for (;;) {
    const value = await fn();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
};
const waitingAt = (id, reason) => poll(async () => {
  const run = await durably.getRun(id);
  return run.status === "waiting" && run.wait_reason === reason && run;
}, `run ${id} waiting (${reason})`);
"""


def open_page(drv: Any, url: str, storage: str, db: str, poll_ms: int = POLL_MS) -> None:
    """Show runtime.html on ``db``; a page already showing exactly that is kept."""
    target = f"{url}_test/runtime.html?db={db}&storage={storage}&jobs={JOBS}&poll={poll_ms}&lease={LEASE_MS}"
    if drv.current_url == target and drv.execute_script("return !!(window.t && t.ready)"):
        return
    drv.get(target)
    wait_ready(drv)


def executions(drv: Any, run_id: str) -> list[tuple[str, str, int]]:
    """(step, page load, attempt) of every execution of the run's steps, in order."""
    records = page(drv, "return await effects()")
    mine = [r for r in records if r["run"] == run_id and r["kind"] == "B"]
    return [(r["step"], r["worker"], r["attempt"]) for r in mine]


def check_one_page_load_at_a_time(drv: Any, run_ids: list[str]) -> None:
    """Of these runs' step executions, no two page loads' overlap (executions.py). Only these
    runs: page loads of other databases (earlier tests) may still be alive after a navigation."""
    records = [r for r in page(drv, "return await effects()") if r["run"] in run_ids]
    violations = load_violations(records)
    assert violations == [], "\n".join(violations)


# -- tests --------------------------------------------------------------------------


def test_resume_fork_attempts_and_subscribe_across_a_wait(driver: Any, site_url: Any) -> None:
    url, _ = site_url
    open_page(driver, url, "opfs", "waiting-opfs.db")
    out = page(
        driver,
        """
        const caught = async (promise) => { try { await promise; return null } catch (e) { return e.name } };
        const failed = await durably.triggerAndWait("fail-once", {}, {timeout: 30000});
        const resumed = await durably.resumeRun(failed.id);
        const done = await durably.waitForRun(failed.id, {timeout: 30000});
        const fork = await durably.forkRun(failed.id, {fromStep: "s2"});
        const forkDone = await durably.waitForRun(fork.id, {timeout: 30000});
        // A short sleep: subscribe() goes on across run:waiting, to the end of the run.
        const napper = await durably.trigger("sleep-and-signal", {nap: 0.3});
        const types = [];
        for await (const e of durably.subscribe(napper.id)) types.push(e.type);
        return {
          failed, resumed, done, fork, forkDone, types,
          attempts: await durably.getStepAttempts(failed.id),
          forkSteps: await durably.getSteps(fork.id),
          resumeCompleted: await caught(durably.resumeRun(failed.id)),
          resumeMissing: await caught(durably.resumeRun("no-such-run")),
          forkMissingStep: await caught(durably.forkRun(failed.id, {fromStep: "nope"})),
          forkBadOption: await caught(durably.forkRun(failed.id, {from_step: "s2"})),
          forkNoOptions: await caught(durably.forkRun(failed.id)),
          attemptsMissing: await caught(durably.getStepAttempts("no-such-run")),
        };
        """,
    )
    assert out["failed"]["status"] == "failed" and out["failed"]["error"]["type"] == "FlakyError"
    assert out["resumed"]["status"] == "pending" and out["resumed"]["id"] == out["failed"]["id"]
    assert out["done"]["status"] == "completed" and out["done"]["output"] == {"attempt": 2}
    attempts = [(a["name"], a["attempt"], a["status"]) for a in out["attempts"]]
    assert attempts == [
        ("s0", 1, "completed"),
        ("check", 1, "failed"),
        ("check", 2, "completed"),
        ("s2", 1, "completed"),
    ]
    assert out["attempts"][1]["error"]["message"] == "the first attempt fails"
    # The resumed run executed only the step that had failed, and what came after it.
    assert [step for step, _, _ in executions(driver, out["failed"]["id"])] == ["s0", "check", "check", "s2"]

    fork, fork_done = out["fork"], out["forkDone"]
    assert (fork["disposition"], fork["status"]) == ("created", "pending")
    assert fork["forked_from"] == out["failed"]["id"]
    assert fork_done["status"] == "completed" and fork_done["output"] == {"attempt": 1}
    # The fork holds the source's steps before "s2" (replayed, not executed) and ran "s2" itself.
    assert [s["name"] for s in out["forkSteps"]] == ["s0", "check", "s2"]
    assert [step for step, _, _ in executions(driver, fork["id"])] == ["s2"]

    types = out["types"]
    assert "run:waiting" in types and types[-1] == "run:complete", types
    assert "step:start" in types[types.index("run:waiting") :], types  # s1, after the nap
    assert out["resumeCompleted"] == "ConflictError"
    assert out["resumeMissing"] == "NotFoundError"
    assert out["forkMissingStep"] == "NotFoundError"
    assert out["forkBadOption"] == "ValidationError"
    assert out["forkNoOptions"] == "ValidationError"
    assert out["attemptsMissing"] == "NotFoundError"


def test_a_signal_from_a_follower_tab_reaches_the_leaders_run(driver: Any, site_url: Any) -> None:
    """A second tab forwards its calls to the leader tab: its sendSignal executes in the
    leader's Durably, which wakes its own worker, and the run completes there. (With the
    page's 200 ms polling this does not tell that wake from a poll; it shows that the
    follower's signal reaches the leader and takes effect, and prints how long it took.)"""
    url, _ = site_url
    open_page(driver, url, "opfs", "waiting-opfs.db")
    assert page(driver, "return durably.role") == "leader"
    leader = driver.current_window_handle
    driver.switch_to.new_window("tab")
    try:
        open_page(driver, url, "opfs", "waiting-opfs.db")
        out = page(
            driver,
            POLL_JS
            + """
            const role = durably.role;
            const run = await durably.trigger("sleep-and-signal", {signal: true});
            await waitingAt(run.id, "signal");
            const sentAt = Date.now();
            const options = {signalId: "tab-1"};
            const disposition = await durably.sendSignal(run.id, "approval", {by: "tab"}, options);
            const done = await durably.waitForRun(run.id, {timeout: 30000});
            const ms = Date.now() - sentAt;
            const again = await durably.sendSignal(run.id, "approval", null, options).catch((e) => e.name);
            return {role, disposition, done, ms, again};
            """,
        )
    finally:
        driver.close()
        driver.switch_to.window(leader)
    assert out["role"] == "follower"
    assert out["disposition"] == "delivered"
    assert out["done"]["status"] == "completed" and out["done"]["output"] == {"approval": {"by": "tab"}}
    assert out["again"] == "ConflictError"  # the run has finished: it takes no more signals
    ran = executions(driver, out["done"]["id"])
    assert [step for step, _, _ in ran] == ["s0", "s1"] and len({load for _, load, _ in ran}) == 1
    print(f"\nfollower sendSignal -> run completed in the leader tab: {out['ms']} ms")


# IndexedDB costs two more page loads (~20 s on a busy 2-core machine): with the slow tests.
@pytest.mark.parametrize("storage", ["opfs", pytest.param("idb", marks=pytest.mark.slow)])
def test_sleep_signal_and_retry_backoff_survive_a_reload(driver: Any, site_url: Any, storage: str) -> None:
    url, _ = site_url
    open_page(driver, url, storage, f"waiting-{storage}.db")
    assert page(driver, "return durably.storage") == storage
    before = page(
        driver,
        POLL_JS
        + """
        const sleeper = await durably.trigger("sleep-and-signal", {nap: 3});
        const waiter = await durably.trigger("sleep-and-signal", {signal: true});
        const early = await durably.trigger("sleep-and-signal", {nap: 2, signal: true});
        const flaky = await durably.trigger("flaky", {});
        await waitingAt(sleeper.id, "sleep");
        await waitingAt(waiter.id, "signal");
        await waitingAt(early.id, "sleep");
        await waitingAt(flaky.id, "retry");
        // Not waiting for "approval" yet (still asleep): kept until it gets there.
        const stored = await durably.sendSignal(early.id, "approval", {by: "early"});
        const ids = [sleeper.id, waiter.id, early.id, flaky.id];
        const runs = await Promise.all(ids.map((id) => durably.getRun(id)));
        return {ids, runs, stored, events: t.events.filter((e) => ids.includes(e.run_id))};
        """,
    )
    driver.refresh()  # at once: every run is still waiting
    reloaded_at = time.time() * 1000
    sleeper, waiter, _, flaky = before["runs"]
    ids = before["ids"]

    wait_ready(driver)
    after = page(
        driver,
        """
        const [sleeper, waiter, early, flaky] = args[0];
        const waiting = await durably.getRun(waiter);  // still waiting for its signal
        const delivered = await durably.sendSignal(waiter, "approval", {by: "ana"});
        const done = await Promise.all(args[0].map((id) => durably.waitForRun(id, {timeout: args[1]})));
        return {
          waiting, delivered, done,
          steps: await Promise.all(args[0].map((id) => durably.getSteps(id))),
          attempts: await durably.getStepAttempts(flaky),
          events: t.events.filter((e) => args[0].includes(e.run_id)),
        };
        """,
        ids,
        DEADLINE_MS,
    )

    # Before the reload: each run waiting where it should, holding no lease.
    waits = [(r["status"], r["wait_reason"], r["wait_step"]) for r in before["runs"]]
    assert waits == [
        ("waiting", "sleep", "nap"),
        ("waiting", "signal", "approval"),
        ("waiting", "sleep", "nap"),
        ("waiting", "retry", "flaky"),
    ]
    assert sleeper["wake_at"] and flaky["wake_at"] and waiter["wake_at"] is None
    assert before["stored"] == "stored"
    retry = next(e for e in before["events"] if e["type"] == "step:retry")
    assert (retry["run_id"], retry["attempt"], retry["next_attempt"], retry["delay"]) == (ids[3], 1, 2, 1.5)
    assert {(e["run_id"], e["reason"]) for e in before["events"] if e["type"] == "run:waiting"} >= {
        (ids[0], "sleep"),
        (ids[1], "signal"),
        (ids[3], "retry"),
    }

    # After it: the signal wait survived and took the signal; everything completed.
    assert (after["waiting"]["status"], after["waiting"]["wait_reason"]) == ("waiting", "signal")
    assert after["delivered"] == "delivered"
    assert [r["status"] for r in after["done"]] == ["completed"] * 4
    assert [r["output"] for r in after["done"]] == [
        {"approval": None},
        {"approval": {"by": "ana"}},
        {"approval": {"by": "early"}},  # the stored signal, kept across the reload
        {"succeeded_at": 3},
    ]
    kinds = [[(s["name"], s["kind"]) for s in steps] for steps in after["steps"]]
    assert kinds[0] == [("s0", "run"), ("nap", "sleep"), ("s1", "run")]
    assert kinds[1] == kinds[2] == [("s0", "run"), ("nap", "sleep"), ("approval", "signal"), ("s1", "run")]
    assert kinds[3] == [("s0", "run"), ("flaky", "run")]
    attempts = [(a["name"], a["attempt"], a["status"]) for a in after["attempts"]]
    assert attempts == [
        ("s0", 1, "completed"),
        ("flaky", 1, "failed"),
        ("flaky", 2, "failed"),
        ("flaky", 3, "completed"),
    ]
    assert [a["error"]["message"] for a in after["attempts"][1:3]] == ["attempt 1 fails", "attempt 2 fails"]
    assert after["attempts"][3]["error"] is None

    # Steps before each wait ran once, in the first page load; the rest in the second.
    ran = {run_id: executions(driver, run_id) for run_id in ids}
    first_load = ran[ids[0]][0][1]
    loads = {load for records in ran.values() for _, load, _ in records}
    assert len(loads) == 2, ran
    (second_load,) = loads - {first_load}
    for run_id in ids[:3]:
        assert [(step, load) for step, load, _ in ran[run_id]] == [("s0", first_load), ("s1", second_load)]
    # The flaky step's first attempt before the reload, the other two after it.
    assert ran[ids[3]] == [
        ("s0", first_load, 1),
        ("flaky", first_load, 1),
        ("flaky", second_load, 2),
        ("flaky", second_load, 3),
    ]
    check_one_page_load_at_a_time(driver, ids)
    assert not [e for e in after["events"] if e["type"] == "step:start" and e["step_name"] == "s0"]
    signal_events = [e for e in after["events"] if e["type"] == "signal:received"]
    signals = [(e["run_id"], e["name"], e["disposition"]) for e in signal_events]
    assert signals == [(ids[1], "approval", "delivered")]
    assert page(driver, "return await durably.integrityCheck()") == "ok"
    first_step = min(e["at"] for e in after["events"] if e["type"] == "step:start")
    print(f"\n{storage}: reload -> first step of a woken run {first_step - reloaded_at:.0f} ms")


@pytest.mark.parametrize("storage", ["opfs", pytest.param("idb", marks=pytest.mark.slow)])
def test_a_reload_during_a_step_all_runs_only_its_unfinished_branch_again(
    driver: Any, site_url: Any, storage: str
) -> None:
    url, _ = site_url
    open_page(driver, url, storage, f"parallel-{storage}.db")
    run_id = page(
        driver,
        POLL_JS
        + """
        const run = await durably.trigger("parallel-reload", {});
        // "quick" is recorded while "held" is still running: the reload comes in between.
        await poll(async () => (await durably.getSteps(run.id)).some((s) => s.name === "quick"), "quick");
        await poll(async () => (await effects()).some((r) => r.run === run.id && r.step === "held"), "held");
        return run.id;
        """,
    )
    driver.refresh()
    wait_ready(driver)
    after = page(
        driver,
        """
        const done = await durably.waitForRun(args[0], {timeout: args[1]});
        const [steps, attempts] = [await durably.getSteps(args[0]), await durably.getStepAttempts(args[0])];
        return {done, steps, attempts};
        """,
        run_id,
        DEADLINE_MS,
    )
    assert after["done"]["status"] == "completed", after["done"]
    assert after["done"]["output"] == {"results": {"quick": "quick", "held": "held"}, "after": 2}
    assert [(s["index"], s["name"]) for s in after["steps"]] == [(0, "quick"), (1, "held"), (2, "after")]
    metadata = {a["name"]: a["metadata"] for a in after["attempts"]}
    assert metadata == {"quick": {"model": "m1", "tokens": 812}, "held": None, "after": None}

    ran = executions(driver, run_id)
    (first_load,) = {load for step, load, _ in ran if step == "quick"}
    loads = {load for _, load, _ in ran}
    assert len(loads) == 2, ran
    (second_load,) = loads - {first_load}
    # "quick" ran once, before the reload; "held" began then and ran again after it, alone.
    assert sorted(ran) == sorted(
        [
            ("quick", first_load, 1),
            ("held", first_load, 1),
            ("held", second_load, 2),
            ("after", second_load, 2),
        ]
    )
    check_one_page_load_at_a_time(driver, [run_id])
    assert page(driver, "return await durably.integrityCheck()") == "ok"
