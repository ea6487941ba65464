"""Browser torture: reload the page at random moments during a 50-step run, then prove
from the side effects the steps recorded themselves that nothing was lost or run twice.

The page (pages/torture_page.html) creates the client on every load; the new leader
resumes the runs the killed page had leased at once. The jobs module
(pages/torture_jobs.py) records a "B" side effect in IndexedDB when a step
starts and an "E" side effect just before it returns — both durable
(``durability: "strict"``) before the step commits — tagged with the id of the
worker (= page load) that executed it and the page loads still alive at that
moment (tests/browser/executions.py). The store's auto-increment keys order all
records across reloads. Checked afterwards (the spirit of tests/torture/harness.py):

* after every reload the new page load's first step began after the old page load
  had stopped (it was no longer alive, and its records all came before); never did
  two page loads execute at the same time;

* every accepted run completed with the right output and step records;
* every step executed, in order; it executed once, or more often only where a
  reload killed the page while that step was in flight: every extra execution
  is the last step its page load began for that run, at most one per run and
  reload, from an older attempt than the committing one, and the committing
  execution ran to its end;
* no side effect after a run completed (record times, and nothing new after a
  further reload with every run finished, once that page load ran a fresh run);
* runs sharing a concurrency key never overlap;
* a repeated idempotency key returns the same run;
* ``PRAGMA integrity_check`` is "ok" on every load that got ready, and at the end.

The seed (DURABLY_TORTURE_SEED) and the number of reloads
(DURABLY_TORTURE_RELOADS, at least 20) can be set from the environment.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from collections import Counter, defaultdict
from datetime import datetime
from typing import Any

import pytest
from executions import load_violations, run_violations
from pagekit import page, wait_for, wait_ready

pytestmark = pytest.mark.browser

SEED = int(os.environ.get("DURABLY_TORTURE_SEED", "4242"))
RELOADS = max(20, int(os.environ.get("DURABLY_TORTURE_RELOADS", "22")))
MAIN_STEPS = 50
STEP_DELAY = 0.4  # seconds each step sleeps: slow enough that 50 steps outlast the reloads
CK_RUNS = 3  # smaller runs sharing one concurrency key
CK_STEPS = 4
EARLY = 0.2  # share of reloads issued while the page is still starting (Pyodide, storage)


# -- page helpers ------------------------------------------------------------------------


def ms(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp() * 1000


# -- the invariants ------------------------------------------------------------------------


def check_effects(
    effects: list[dict[str, Any]], runs: dict[str, dict[str, Any]], expected_steps: dict[str, int]
) -> tuple[Counter[str], list[str]]:
    """Counts and violations from the side-effect log (in key order) and the final runs."""
    counts: Counter[str] = Counter()
    violations: list[str] = []
    by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for effect in effects:
        by_run[effect["run"]].append(effect)
    unknown = set(by_run) - set(expected_steps)
    if unknown:
        violations.append(f"side effects of runs nobody triggered: {sorted(unknown)}")

    for run_id, n_steps in expected_steps.items():
        names = [f"s{i}" for i in range(n_steps)]
        records = by_run[run_id]
        begins = [r for r in records if r["kind"] == "B"]
        counts["steps"] += n_steps
        executions, duplicates, found = run_violations(records, run_id, names)
        counts["executions"] += executions
        counts["duplicates"] += duplicates
        violations += found

        run = runs.get(run_id)
        if run is None:
            violations.append(f"{run_id}: accepted run is gone")
            continue
        expected_output = {"total": sum(i * i for i in range(n_steps)), "steps": n_steps}
        if run["status"] != "completed" or run["output"] != expected_output:
            violations.append(
                f"{run_id}: ended {run['status']} with {run['output']}, expected {expected_output}"
            )
            continue
        done_ms = ms(run["completed_at"])
        late = [r for r in records if r["at"] > done_ms]
        if late:
            violations.append(f"{run_id}: {len(late)} side effect(s) after the run completed: {late[:3]}")
        steps = run["steps"]
        if [(s["name"], s["status"], s["output"]) for s in steps] != [
            (name, "completed", i * i) for i, name in enumerate(names)
        ]:
            violations.append(f"{run_id}: step records {[(s['name'], s['output']) for s in steps]}")
            continue
        # A re-executed step's stored record is the re-execution's: the killed page's
        # execution had not committed (a committed step run again would keep its old record).
        for stored in steps:
            dups = [r for r in begins if r["step"] == stored["name"]][:-1]
            if dups and ms(stored["started_at"]) < dups[-1]["at"]:
                violations.append(
                    f"{run_id}/{stored['name']}: committed at {stored['started_at']} by the execution"
                    f" of load {dups[-1]['worker']}, then executed again"
                )
    return counts, violations


def check_concurrency(effects: list[dict[str, Any]], ck_runs: list[str]) -> list[str]:
    """Runs sharing a concurrency key: their spans in the side-effect order never overlap."""
    spans = []
    for run_id in ck_runs:
        keys = [e["key"] for e in effects if e["run"] == run_id]
        if keys:
            spans.append((min(keys), max(keys), run_id))
    spans.sort()
    return [
        f"concurrency key overlap: {a[2]} (records {a[0]}..{a[1]}) and {b[2]} (records {b[0]}..{b[1]})"
        for a, b in itertools.pairwise(spans)
        if b[0] < a[1]
    ]


# -- the test ---------------------------------------------------------------------------------


@pytest.mark.slow  # ~2 min per storage: make test-slow (CI runs it after make test)
# "auto": OPFS here. offline: the same with create({offline: true}), every reload after the
# first served by the service worker's precache.
@pytest.mark.parametrize(
    ("storage", "offline"),
    [("auto", ""), ("idb", ""), ("auto", "&offline=1")],
    ids=["opfs", "idb", "opfs-service-worker"],
)
def test_random_reloads_lose_nothing_and_rerun_only_the_step_in_flight(
    launch_chromium: Any, site_url: Any, storage: str, offline: str
) -> None:
    url, _ = site_url
    rng = random.Random(f"{SEED}-{storage}{offline}")
    expected_storage = "opfs" if storage == "auto" else storage
    t0 = time.monotonic()
    drv = launch_chromium()
    drv.get(f"{url}_test/torture_page.html?storage={storage}&db=torture-{storage}.db{offline}")
    wait_ready(drv)
    assert page(drv, "return [durably.role, durably.storage]") == ["leader", expected_storage]

    main = page(
        drv,
        "return await durably.trigger('torture-steps', {steps: args[0], delay: args[1]},"
        " {idempotencyKey: 'main'})",
        MAIN_STEPS,
        STEP_DELAY,
    )
    expected_steps = {main["id"]: MAIN_STEPS}
    ck_runs: list[str] = []

    def trigger_ck() -> None:
        """The next run with concurrency key 'ck', once the previous one left "pending"
        (a key admits one pending run: it waits while another run holds the key)."""
        if len(ck_runs) == CK_RUNS:
            return
        if ck_runs and page(drv, "return (await durably.getRun(args[0])).status", ck_runs[-1]) == "pending":
            return
        run = page(
            drv,
            "return await durably.trigger('torture-steps', {steps: args[0], delay: args[1]},"
            " {concurrencyKey: 'ck', idempotencyKey: args[2]})",
            CK_STEPS,
            STEP_DELAY,
            f"ck-{len(ck_runs)}",
        )
        expected_steps[run["id"]] = CK_STEPS
        ck_runs.append(run["id"])

    trigger_ck()
    wait_for(drv, f"t.events.some((e) => e.run_id === '{ck_runs[0]}' && e.type === 'run:leased')")
    trigger_ck()  # pending behind ck-0 until it completes

    reload_at: list[float] = []  # ms, same clock as Date.now() in the browser
    early_reloads = 0
    loads_ready = 0
    integrity: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    violations: list[str] = []
    for n in range(RELOADS):
        early = n > 0 and rng.random() < EARLY
        if early:
            # The page is still loading Pyodide, waiting for storage or resuming the runs.
            early_reloads += 1
            time.sleep(rng.uniform(0, 2.5))
        else:
            if n > 0:
                wait_ready(drv)
                loads_ready += 1
                wait_for(drv, "durably.role === 'leader'", timeout=30)  # the old page is gone: this one leads
                assert page(drv, "return durably.storage") == expected_storage
                integrity[page(drv, "return await durably.integrityCheck()")] += 1
                trigger_ck()
                if n % 4 == 0:  # the same idempotency key still names the same run
                    again = page(
                        drv,
                        "return await durably.trigger('torture-steps', {steps: args[0], delay: args[1]},"
                        " {idempotencyKey: 'main'})",
                        MAIN_STEPS,
                        STEP_DELAY,
                    )
                    if (again["id"], again["disposition"]) != (main["id"], "idempotent"):
                        violations.append(
                            f"idempotency key 'main' gave {again['id']} ({again['disposition']})"
                        )
            time.sleep(rng.uniform(0, 1.5))
        statuses.update(s["state"] for s in drv.execute_script("return window.t ? t.statuses : []"))
        reload_at.append(time.time() * 1000)
        drv.refresh()

    # Let every run finish in the last load.
    wait_ready(drv)
    wait_for(drv, "durably.role === 'leader'", timeout=30)
    if offline:
        # The variant is only worth its time if the reloads really came from the precache.
        assert page(drv, "return navigator.serviceWorker.controller !== null"), "no service worker"
    runs = {}
    for run_id in expected_steps:
        run = page(drv, "return await durably.waitForRun(args[0], {timeout: 110000})", run_id)
        run["steps"] = page(drv, "return await durably.getSteps(args[0])", run_id)
        runs[run_id] = run
    integrity[page(drv, "return await durably.integrityCheck()")] += 1
    effects = page(drv, "return await effects()")

    # Nothing happens after completion: reload once more, and once the new leader has
    # claimed and finished a fresh one-step run (it claims the oldest first, so any old
    # run it wrongly took up again came before), compare. A condition, not a pause.
    drv.refresh()
    wait_ready(drv)
    wait_for(drv, "durably.role === 'leader'", timeout=30)
    sentinel = page(
        drv,
        "const r = await durably.trigger('torture-steps', {steps: 1, delay: 0},"
        " {idempotencyKey: 'sentinel'}); return await durably.waitForRun(r.id, {timeout: 100000})",
    )
    if sentinel["status"] != "completed":
        violations.append(f"the run triggered after the last reload ended {sentinel['status']}")
    after = [e for e in page(drv, "return await effects()") if e["run"] != sentinel["id"]]
    if after != effects:
        violations.append(
            f"{len(after) - len(effects)} side effect(s) appeared after every run had completed"
        )
    statuses_final = page(
        drv,
        "return (await durably.getRuns()).filter((r) => r.id !== args[0]).map((r) => [r.id, r.status])",
        sentinel["id"],
    )
    if sorted(statuses_final) != sorted([run_id, "completed"] for run_id in expected_steps):
        violations.append(f"runs after the last reload: {statuses_final}")
    integrity[page(drv, "return await durably.integrityCheck()")] += 1

    counts, found = check_effects(effects, runs, expected_steps)
    violations += found + check_concurrency(effects, ck_runs) + load_violations(effects)
    if len(ck_runs) != CK_RUNS:
        violations.append(f"only {len(ck_runs)} of the {CK_RUNS} concurrency-key runs could be triggered")
    if set(integrity) != {"ok"}:
        violations.append(f"PRAGMA integrity_check results: {dict(integrity)}")
    main_done = ms(runs[main["id"]]["completed_at"])
    during_main = sum(1 for at in reload_at if at < main_done)
    done_at_last_reload = sum(1 for st in runs[main["id"]]["steps"] if ms(st["completed_at"]) < reload_at[-1])
    workers = {e["worker"] for e in effects}
    if len(workers) > RELOADS + 1:
        violations.append(f"{len(workers)} page loads executed steps, but there were only {RELOADS + 1}")
    if counts["duplicates"] > RELOADS * 2:  # at most one per reload for each of the 2 runs in flight
        violations.append(f"{counts['duplicates']} duplicates for {RELOADS} reloads")

    print(
        f"\nbrowser torture [{storage} -> {expected_storage}] seed={SEED}: reloads={len(reload_at)}"
        f" (during the 50-step run: {during_main}, while starting: {early_reloads};"
        f" its steps done at the last reload: {done_at_last_reload}/{MAIN_STEPS}) loads_ready={loads_ready}"
        f" runs={len(expected_steps)} steps={counts['steps']} executions={counts['executions']}"
        f" duplicates={counts['duplicates']} loads_that_ran_steps={len(workers)}"
        f" integrity_checks={sum(integrity.values())} waiting_for_storage={statuses['waiting-for-storage']}"
        f" takeovers={statuses['follower']} violations={len(violations)} wall={time.monotonic() - t0:.0f}s"
    )
    for line in violations:
        print("  VIOLATION", line)
    assert violations == []
    # The reloads really hit the long run (it must not have finished before them).
    assert during_main >= 20, f"only {during_main} reloads happened during the 50-step run"
