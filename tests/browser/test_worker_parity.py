"""Parity through the real browser runtime: the demo jobs module, run by the worker of
DurablyWeb.create() in headless Chromium, gives the same runs, steps, logs and
events as the same module under CPython in this process.

tests/pyodide/test_pyodide_parity.py compares CPython with bare Pyodide; this
test goes through everything a web page uses instead: durably.js, worker.js,
the sqlite-wasm bridge (storage "memory"), the JSON RPC and the event
forwarding. The page (pages/parity_page.html) loads ``../demo_jobs.py``, the
copy of durably_web/demo/jobs.py that build.py ships in site/.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from pagekit import wait_ready

from durably_web import Durably, ValidationError
from durably_web.demo import jobs as demo_jobs

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
INPUTS: list[dict[str, Any]] = [
    {"city": "Oslo", "days": 8, "step_delay": 0},
    {"city": "Zürich", "days": 3, "step_delay": 0},
    {"city": "São Paulo", "days": 14, "step_delay": 0},
    {"city": "東京", "days": 1, "step_delay": 0},
]
# Rejected by the input schema on both sides, with the same details.
BAD_INPUTS: list[dict[str, Any]] = [
    {"city": "", "days": 0},
    {"city": "Oslo", "days": "many"},
]
# Events whose order and content a run determines (timestamps and ids aside).
COMPARED_EVENTS = {"run:leased", "step:start", "step:complete", "run:progress", "log:write", "run:complete"}
VOLATILE = {"timestamp", "run_id", "created_at", "started_at", "completed_at", "duration_ms", "at"}


def strip(value: Any) -> Any:
    """Drop what legitimately differs between two executions: ids, times, durations."""
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


def summary(
    run: dict[str, Any], steps: list[dict[str, Any]], logs: list[dict[str, Any]], events: list[Any]
) -> Any:
    return {
        "run": {k: run[k] for k in ("job_name", "status", "input", "output", "error", "progress", "attempt")},
        "steps": strip(steps),
        "logs": strip(logs),
        "events": strip([e for e in events if e["type"] in COMPARED_EVENTS]),
    }


async def run_in_cpython() -> tuple[list[Any], list[Any]]:
    results = []
    events: list[dict[str, Any]] = []
    async with Durably("sqlite://:memory:", jobs=demo_jobs.JOBS, polling_interval=0.01) as durably:
        durably.on("*", lambda e: events.append(e.to_dict()))
        for request in INPUTS:
            run = await durably.trigger_and_wait("weather-report", request, timeout=60)
            stored = (await durably.get_run(run.id)).to_dict()
            steps = [s.to_dict() for s in await durably.get_steps(run.id)]
            logs = [entry.to_dict() for entry in await durably.get_logs(run.id)]
            results.append(summary(stored, steps, logs, [e for e in events if e["run_id"] == run.id]))
        rejected = []
        for bad in BAD_INPUTS:
            with pytest.raises(ValidationError) as caught:
                await durably.trigger("weather-report", bad)
            rejected.append(
                {
                    "name": "ValidationError",
                    "details": [[list(d["loc"]), d["type"]] for d in caught.value.details],
                }
            )
        assert len(await durably.get_runs()) == len(INPUTS)
    return results, rejected


def test_site_ships_the_very_demo_jobs_module(site_url: Any) -> None:
    assert (ROOT / "site" / "demo_jobs.py").read_bytes() == (
        ROOT / "durably_web" / "demo" / "jobs.py"
    ).read_bytes()


def test_demo_jobs_in_the_browser_worker_match_cpython(launch_chromium: Any, site_url: Any) -> None:
    url, requests = site_url
    host, host_rejected = asyncio.run(run_in_cpython())
    for request, result in zip(INPUTS, host, strict=True):  # the reference itself is sane
        assert result["run"]["status"] == "completed", result["run"]
        assert len(result["steps"]) == request["days"] + 2  # the days, summarize, publish
        assert result["run"]["output"]["city"] == request["city"]

    drv = launch_chromium()
    seen_before = len(requests)
    drv.get(f"{url}_test/parity_page.html")
    wait_ready(drv)
    reply = drv.execute_async_script(
        """
        const [inputs, bads, done] = arguments;
        (async () => {
          const events = [];
          durably.on("*", (e) => events.push(e));
          const results = [];
          for (const input of inputs) {
            const run = await durably.triggerAndWait("weather-report", input, {timeout: 60000});
            results.push({
              run: await durably.getRun(run.id),
              steps: await durably.getSteps(run.id),
              logs: await durably.getLogs(run.id),
              events: events.filter((e) => e.run_id === run.id),
            });
          }
          const rejected = [];
          for (const bad of bads) {
            try {
              await durably.trigger("weather-report", bad);
              rejected.push({name: "accepted"});
            } catch (e) {
              rejected.push({name: e.name, details: (e.details || []).map((d) => [d.loc, d.type])});
            }
          }
          return {results, rejected, storage: durably.storage, runs: (await durably.getRuns()).length};
        })().then(
          (value) => done({ok: true, value}),
          (e) => done({ok: false, error: `${e.name}: ${e.message}`}),
        );
        """,
        INPUTS,
        BAD_INPUTS,
    )
    assert reply["ok"], reply["error"]
    value = reply["value"]
    assert value["storage"] == "memory" and value["runs"] == len(INPUTS)
    # The worker really fetched the shipped module.
    assert "/demo_jobs.py" in requests[seen_before:], [r for r in requests[seen_before:] if ".py" in r]
    browser = [summary(r["run"], r["steps"], r["logs"], r["events"]) for r in value["results"]]

    for request, mine, theirs in zip(INPUTS, browser, host, strict=True):
        assert mine["run"] == theirs["run"], request
        assert mine["steps"] == theirs["steps"], request
        assert mine["logs"] == theirs["logs"], request
        assert mine["events"] == theirs["events"], request
    assert value["rejected"] == host_rejected
    print(
        f"\nparity: {len(INPUTS)} runs, {sum(len(r['steps']) for r in host)} steps,"
        f" {sum(len(r['events']) for r in host)} events and {len(BAD_INPUTS)} rejections identical"
        " in the browser worker and CPython"
    )
