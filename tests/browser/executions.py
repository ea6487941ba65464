"""Checks on the step-execution records the browser test jobs keep outside the durable store.

The test jobs modules (pages/runtime_jobs.py, pages/torture_jobs.py) write, to an
IndexedDB database of their own, a "B" record when a step's function starts and
an "E" record just before it returns, each durable (``durability: "strict"``)
before the step commits. Every record names the worker that executed the step
(``worker``: the page starts one worker per page load, or per ``create()``, so
this is the page-load id) and the handler's ``attempt``; the store's
auto-increment ``key`` orders all records across reloads and tabs.

Liveness, independent of the code under test: from its first record until it
dies, every worker holds its own Web Lock ``durably-test-alive:<worker>``
(the browser releases it when the worker dies: tab closed, reloaded, or the
client closed), and each record lists in ``alive`` the workers holding such a
lock at that moment (``navigator.locks.query()``). So a record proves which
other page loads were still alive when a step began, not just which had
stopped writing.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Any

Record = dict[str, Any]


def load_violations(effects: list[Record]) -> list[str]:
    """One database, one executing page load at a time (records in key order).

    * When a page load begins a step, no other page load that executed a step
      before is still alive: after a reload or a tab close, the new leader's
      first step begins after the old page load stopped, and two live tabs
      never both execute.
    * The records of two page loads never interleave: the older one's last
      record comes before the newer one's first.
    """
    violations: list[str] = []
    executed: set[str] = set()
    for r in effects:
        if r["worker"] not in r["alive"]:  # the liveness record itself is broken: the check is hollow
            violations.append(f"record {r['key']}: load {r['worker']} is missing from its own alive list")
        if r["kind"] == "B":
            live = sorted((executed - {r["worker"]}) & set(r["alive"]))
            if live:
                violations.append(
                    f"{r['run']}/{r['step']}: load {r['worker']} began it (record {r['key']}) while"
                    f" load(s) {live}, which had executed steps before, were still alive"
                )
        executed.add(r["worker"])
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for r in effects:
        first.setdefault(r["worker"], r["key"])
        last[r["worker"]] = r["key"]
    spans = sorted((first[w], last[w], w) for w in first)
    for a, b in itertools.pairwise(spans):
        if b[0] < a[1]:
            violations.append(
                f"loads {a[2]} (records {a[0]}..{a[1]}) and {b[2]} (records {b[0]}..{b[1]})"
                " executed steps at the same time"
            )
    return violations


def run_violations(records: list[Record], run_id: str, names: list[str]) -> tuple[int, int, list[str]]:
    """(executions, re-executions, violations) of one run whose steps are ``names``, in order.

    Every step executed, first executions in order; it executed once, or more
    often only where its page load died with that step in flight (before the
    step committed): every extra execution is the last step its page load began
    for the run, comes from an older attempt than the committing one, and the
    committing execution ran to its end. Within one page load the run's records
    alternate B(si) E(si) B(si+1) ...
    """
    violations: list[str] = []
    records = [r for r in records if r["run"] == run_id]
    begins = [r for r in records if r["kind"] == "B"]
    first_order = list(dict.fromkeys(r["step"] for r in begins))
    if first_order != names:
        violations.append(f"{run_id}: steps first executed in order {first_order}, not {names}")

    per_worker: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        per_worker[r["worker"]].append(r)
    for worker, seq in per_worker.items():
        for a, b in itertools.pairwise(seq):
            ia, ib = names.index(a["step"]), names.index(b["step"])
            if (a["kind"], b["kind"], ib - ia) not in {("B", "E", 0), ("E", "B", 1)}:
                violations.append(
                    f"{run_id}: load {worker} went {a['kind']}{a['step']} -> {b['kind']}{b['step']}"
                )

    last_begin_of_worker = {r["worker"]: r for r in begins}
    duplicates = 0
    for name in names:
        execs = [r for r in begins if r["step"] == name]
        if not execs:
            continue
        committing = execs[-1]
        ended = [
            r
            for r in records
            if r["kind"] == "E"
            and r["step"] == name
            and r["worker"] == committing["worker"]
            and r["key"] > committing["key"]
        ]
        if not ended:
            violations.append(
                f"{run_id}/{name}: the last execution (load {committing['worker']}) never ended"
            )
        for dup in execs[:-1]:
            duplicates += 1
            if last_begin_of_worker[dup["worker"]] is not dup:
                violations.append(
                    f"{run_id}/{name}: re-executed although load {dup['worker']} went on past it"
                    " (it was not the step in flight when that load died)"
                )
            if dup["worker"] == committing["worker"]:
                violations.append(f"{run_id}/{name}: executed twice in the same page load {dup['worker']}")
            if dup["attempt"] >= committing["attempt"]:
                violations.append(
                    f"{run_id}/{name}: duplicate from attempt {dup['attempt']}, committed by attempt"
                    f" {committing['attempt']}"
                )
    return len(begins), duplicates, violations
