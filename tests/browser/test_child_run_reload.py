"""Child runs in real headless Chromium: a parent waiting for its child outlives a page reload.

The page is pages/runtime.html with runtime_jobs.py and child_jobs.py (whose steps record every
execution in IndexedDB, tests/browser/executions.py), on OPFS. The parent starts a child that
sleeps 3 s, and waits for it; the page reloads while both wait. After the reload the new page
load's worker continues the child when its sleep is due, and the child's outcome makes the
parent due: both complete, the child was started once and each step ran once.
"""

from __future__ import annotations

from typing import Any

import pytest
from pagekit import page, wait_ready

pytestmark = pytest.mark.browser

JOBS = "runtime_jobs.py,child_jobs.py"
LEASE_MS = 600000  # nothing here may wait for a lease to expire
POLL_MS = 200


def test_a_parent_waiting_for_its_child_survives_a_reload(driver: Any, site_url: Any) -> None:
    url, _ = site_url
    driver.get(
        f"{url}_test/runtime.html?db=children-opfs.db&storage=opfs&jobs={JOBS}&poll={POLL_MS}&lease={LEASE_MS}"
    )
    wait_ready(driver)
    before = page(
        driver,
        """
        const poll = async (fn, what) => {
          const deadline = Date.now() + 30000;
          for (;;) {
            const value = await fn();
            if (value) return value;
            if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
            await new Promise((resolve) => setTimeout(resolve, 50));
          }
        };
        const parent = await durably.trigger("b-order", {order: 4, nap: 3});
        const waiting = await poll(async () => {
          const run = await durably.getRun(parent.id);
          return run.status === "waiting" && run.wait_reason === "child" && run;
        }, "the parent waiting for its child");
        const [child] = await durably.getRuns({parentRunId: parent.id});
        return {parent: waiting, child, asleep: await poll(async () => {
          const run = await durably.getRun(child.id);
          return run.status === "waiting" && run.wait_reason === "sleep" && run;
        }, "the child asleep")};
        """,
    )
    driver.refresh()  # at once: both runs are still waiting
    wait_ready(driver)
    parent_id, child_id = before["parent"]["id"], before["child"]["id"]
    after = page(
        driver,
        """
        const [parentId, childId] = args;
        const parent = await durably.waitForRun(parentId, {timeout: 60000});
        const child = await durably.waitForRun(childId, {timeout: 60000});
        return {
          parent, child,
          children: await durably.getRuns({parentRunId: parentId}),
          invoices: await durably.getRuns({jobName: "b-invoice"}),
          parentSteps: await durably.getSteps(parentId),
          effects: (await effects()).filter((r) => r.kind === "B" && [parentId, childId].includes(r.run)),
        };
        """,
        parent_id,
        child_id,
    )
    assert before["parent"]["wait_child_id"] == child_id and before["parent"]["wait_step"] == "invoice-done"
    assert before["child"]["parent_run_id"] == parent_id
    assert after["parent"]["status"] == "completed"
    assert after["parent"]["output"] == {"child": child_id, "total": 40}
    assert after["child"]["status"] == "completed" and after["child"]["output"] == {"order": 4, "total": 40}
    assert [r["id"] for r in after["children"]] == [child_id]
    assert [r["id"] for r in after["invoices"]] == [child_id]  # started once
    assert [(s["name"], s["kind"]) for s in after["parentSteps"]] == [
        ("invoice", "child"),
        ("invoice-done", "child_wait"),
        ("ship", "run"),
    ]
    ran = sorted((r["run"] == child_id, r["step"]) for r in after["effects"])
    assert ran == [(False, "ship"), (True, "send"), (True, "total")]  # each step once
    # The child's second half ran in the page load after the reload.
    loads = {r["step"]: r["worker"] for r in after["effects"] if r["run"] == child_id}
    assert loads["total"] != loads["send"]
