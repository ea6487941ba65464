"""Network-aware steps in real headless Chromium: DevTools' offline emulation during runs whose
steps call a local HTTP endpoint (the test server's /_test/hit, which counts requests per step).

Offline, a step whose request fails makes its run wait (reason "offline") without using up a
retry (each job allows one attempt per step: a counted failure would fail the run), and a step
declared ``needs_network=True`` is not attempted at all. Back online, the page's ``online``
event (forwarded to the worker by durably.js) makes them continue: the page's recheck interval
is ten minutes, so nothing else could wake them within the test. Completed steps are not run
again: the endpoint saw each step exactly once.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from network_emulation import OfflineEmulation
from pagekit import page, wait_ready

pytestmark = pytest.mark.browser

JOBS = "runtime_jobs.py,offline_jobs.py"
RECHECK_MS = 600000  # the timer never fires here: only the online event wakes the runs
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


def attempts_of(attempts: list[dict[str, Any]]) -> list[tuple[str, int, str, bool]]:
    return [(a["name"], a["attempt"], a["status"], a["offline"]) for a in attempts]


def test_offline_steps_wait_without_spending_retries_and_continue_online(
    driver: Any, site_url: Any, endpoint_hits: Counter[str]
) -> None:
    url, _ = site_url
    driver.get(
        f"{url}_test/runtime.html?db=offline-steps.db&storage=opfs&jobs={JOBS}"
        f"&poll=200&lease=600000&recheck={RECHECK_MS}"
    )
    wait_ready(driver)
    endpoint = f"{url}_test/hit"
    network = OfflineEmulation(driver)
    try:
        ids = page(
            driver,
            POLL_JS
            + """
            const runs = [];
            for (const via of ["pyfetch", "js"]) {
              runs.push(await durably.trigger("sync-over-http", {endpoint: args[0], via}));
            }
            for (const run of runs) await waitingAt(run.id, "signal");
            return runs.map((run) => run.id);
            """,
            endpoint,
        )
        assert [endpoint_hits[f"{run_id}/first"] for run_id in ids] == [1, 1]

        network.set_offline(True)
        offline = page(
            driver,
            POLL_JS
            + """
            const [ids, endpoint] = args;
            const onLine = navigator.onLine;
            for (const id of ids) await durably.sendSignal(id, "go", null);
            const early = await durably.trigger("needs-network", {endpoint});
            const all = [...ids, early.id];
            const waiting = [];
            for (const id of all) waiting.push(await waitingAt(id, "offline"));
            const attempts = await Promise.all(all.map((id) => durably.getStepAttempts(id)));
            return {onLine, early: early.id, waiting, attempts};
            """,
            ids,
            endpoint,
        )
        assert offline["onLine"] is False
        early = offline["early"]
        # The plain step was attempted: its request failed in the browser (it never reached
        # the server), recorded as an offline attempt that counts against no retry budget.
        assert [run["wait_step"] for run in offline["waiting"]] == ["second", "second", "send"]
        for run_attempts in offline["attempts"][:2]:
            assert attempts_of(run_attempts) == [
                ("first", 1, "completed", False),
                ("second", 1, "failed", True),
            ]
        # pyfetch raises pyodide.http.AbortError (an OSError), an awaited js.fetch the JS TypeError.
        errors = [a[1]["error"] for a in offline["attempts"][:2]]
        assert [e["type"] for e in errors] == ["AbortError", "JsException"], errors
        assert all("Failed to fetch" in e["message"] for e in errors), errors
        # needs_network: not attempted at all while offline.
        assert offline["attempts"][2] == []
        assert [endpoint_hits[f"{run_id}/second"] for run_id in ids] == [0, 0]
        assert endpoint_hits[f"{early}/send"] == 0

        network.set_offline(False)
        done = page(
            driver,
            """
            const ids = args[0];
            const done = await Promise.all(ids.map((id) => durably.waitForRun(id, {timeout: 60000})));
            const attempts = await Promise.all(ids.map((id) => durably.getStepAttempts(id)));
            const events = t.events.filter((e) => ids.includes(e.run_id));
            return {done, attempts, events, onLine: navigator.onLine};
            """,
            [*ids, early],
        )
    finally:
        network.close()

    assert done["onLine"] is True
    assert [run["status"] for run in done["done"]] == ["completed"] * 3
    assert [run["output"] for run in done["done"]] == [{"first": 1, "second": 1, "third": 1}] * 2 + [
        {"send": 1}
    ]
    for run_attempts in done["attempts"][:2]:
        assert attempts_of(run_attempts) == [
            ("first", 1, "completed", False),
            ("second", 1, "failed", True),
            ("second", 2, "completed", False),
            ("third", 1, "completed", False),
        ]
    assert attempts_of(done["attempts"][2]) == [("send", 1, "completed", False)]
    # Every step reached the endpoint once: nothing completed ran again after the wait.
    for run_id in ids:
        assert [endpoint_hits[f"{run_id}/{s}"] for s in ("first", "second", "third")] == [1, 1, 1]
    assert endpoint_hits[f"{early}/send"] == 1

    events = done["events"]
    waits = [(e["run_id"], e["reason"], e["step_name"]) for e in events if e["type"] == "run:waiting"]
    for run_id in ids:
        assert [(r, s) for i, r, s in waits if i == run_id] == [("signal", "go"), ("offline", "second")]
    offline_fails = [e for e in events if e["type"] == "step:fail"]
    assert {(e["run_id"], e["step_name"], e["offline"]) for e in offline_fails} == {
        (i, "second", True) for i in ids
    }
    assert not [e for e in events if e["type"] in ("step:retry", "run:fail")]
    assert len([e for e in events if e["type"] == "step:start" and e["run_id"] == early]) == 1
    assert page(driver, "return await durably.integrityCheck()") == "ok"
