"""The dashboard and the remote JS client in real headless Chromium against a real CPython server.

The server is the real thing: ``create_app`` mounted under a prefix, served by
uvicorn on a free port in a background thread, with a worker executing the jobs
below on an SQLite file. The page is ``<prefix>/dashboard/`` as the app serves
it, so it finds its API at ``..`` and loads ``remote.js`` next to itself.
Runs are triggered through the HTTP API (httpx), the way another program would.
Chromium comes from conftest.py's ``driver`` fixture (fresh profile, outside
network trapped; skipped without Chromium, failed under CI=1).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import uvicorn
from opentelemetry.sdk.trace import TracerProvider
from pagekit import page, wait_until
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.routing import Mount

from durably_web import Durably, RetryPolicy, StepContext, define_job
from durably_web.asgi import create_app

pytestmark = pytest.mark.browser

PREFIX = "/api/durably"
XSS = "<img src=x onerror=window.__pwned=1>"


# -- jobs the server runs ---------------------------------------------------------------


async def _part(index: int, delay: float) -> dict[str, int]:
    await asyncio.sleep(delay)
    return {"part": index, "rows": (index * 37) % 100}


@define_job("slow-report")
async def slow_report(step: StepContext, payload: Any) -> dict[str, Any]:
    """``parts`` steps of ``delay`` seconds each, with progress and a log line per step."""
    payload = payload or {}
    parts, delay = int(payload.get("parts", 4)), float(payload.get("delay", 0.3))
    total = 0
    for i in range(1, parts + 1):
        done = await step.run(f"load-part-{i}", _part, i, delay)
        total += done["rows"]
        step.progress(i, parts, f"loaded part {i} of {parts}")
        step.log.info(f"part {i}: {done['rows']} rows", {"part": i})
    if "note" in payload:
        step.log.warning(str(payload["note"]))
    return {"parts": parts, "rows": total, "note": payload.get("note")}


class Invoice(BaseModel):
    customer: str = Field(min_length=1)
    amount: float = Field(gt=0)


@define_job("send-invoice", input=Invoice)
async def send_invoice(step: StepContext, invoice: Invoice) -> dict[str, Any]:
    number = await step.run("allocate-number", lambda: 1042)
    await step.run("render-pdf", asyncio.sleep, 0.05)
    if invoice.customer.startswith("fail"):
        await step.run("deliver", _refuse, invoice.customer)
    return {"number": number, "customer": invoice.customer}


async def _refuse(customer: str) -> None:
    raise ConnectionError(f"mail server refused delivery to {customer}")


# Durable waiting: a run waiting for a signal, a retried step, a run that fails once (for
# Resume), a sleep. Their error messages carry XSS: attempts and errors must show it as text.


class Approval(BaseModel):
    by: str


@define_job("approval")
async def approval(step: StepContext, payload: Any) -> dict[str, Any]:
    """Prepares, waits for the signal ``payload["signal"]`` (an ``Approval``), then finishes."""
    payload = payload or {}
    await step.run("prepare", asyncio.sleep, float(payload.get("delay", 0)))
    got = await step.wait_for_signal(str(payload.get("signal", "approval")), type=Approval)
    await step.run("finish", lambda: None)
    return {"approved_by": got.by}


_CALLS: dict[str, int] = {}


def _flaky_call(key: str, failures: int) -> str:
    _CALLS[key] = _CALLS.get(key, 0) + 1
    if _CALLS[key] <= failures:
        raise RuntimeError(f"{XSS} attempt {_CALLS[key]}")
    return "ok"


@define_job("flaky")
async def flaky(step: StepContext, payload: dict[str, Any]) -> str:
    """``call-api`` fails ``fail`` times, retried after ``delay`` seconds each time."""
    policy = RetryPolicy(max_attempts=5, initial_delay=float(payload["delay"]), backoff=1.0)
    await step.run("connect", asyncio.sleep, float(payload.get("pause", 0)))
    return await step.run("call-api", _flaky_call, step.run_id, int(payload["fail"]), retry=policy)


@define_job("fail-once")
async def fail_once(step: StepContext, payload: Any) -> str:
    """``deliver`` fails on its first execution only, with no retry policy: the run fails."""
    await step.run("render", lambda: "pdf")
    key = (payload or {}).get("key") or step.run_id  # a fork (same input) shares the count
    return await step.run("deliver", _flaky_call, key, 1)


@define_job("nap")
async def nap(step: StepContext, payload: Any) -> None:
    await step.sleep("cool-down", 3600)


def _summarize(step: StepContext) -> str:
    step.attempt.set_metadata({"model": XSS, "tokens": 812})
    return "summary"


@define_job("noted")
async def noted(step: StepContext, payload: Any) -> dict[str, Any]:
    """A step.all whose branch "summarize" attaches attempt metadata (with XSS in it)."""
    return await step.all({"summarize": (_summarize, step), "classify": lambda: "plain"})


@define_job("tree-parent")
async def tree_parent(step: StepContext, payload: Any) -> None:
    """Starts a "nap" child (asleep for an hour) and waits for it: a tree to show."""
    child = await step.start_child("nap-child", nap, None)
    await step.wait_for_child("nap-done", child)


@define_job("settle", debounce=3600)
async def settle(step: StepContext, payload: Any) -> Any:
    """Debounced for an hour: its run stays pending (held back) while the test looks at it."""
    return payload


JOBS = [slow_report, send_invoice, approval, flaky, fail_once, nap, noted, tree_parent, settle]


# -- the server ----------------------------------------------------------------------------


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the test process keeps its own signal handling


class ServerThread(threading.Thread):
    """Durably (worker on) + create_app under PREFIX + uvicorn, in an event loop of its own."""

    def __init__(self, db_url: str) -> None:
        super().__init__(daemon=True)
        self.db_url = db_url
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.base = f"http://127.0.0.1:{self.sock.getsockname()[1]}{PREFIX}"
        self.server: _QuietServer | None = None
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self.failure = exc

    async def _main(self) -> None:
        durably = Durably(
            self.db_url,
            jobs=JOBS,
            polling_interval=0.05,
            lease_duration=5.0,
            lease_renew_interval=0.5,
            shutdown_timeout=2.0,
            max_concurrent_runs=8,
            # Tracing on (no exporter needed): an HTTP trigger's traceparent header is stored.
            tracing=TracerProvider(),
        )
        await durably.init()
        app = Starlette(routes=[Mount(PREFIX, app=create_app(durably, sse_throttle=0.05))])
        self.server = _QuietServer(
            uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
        )
        try:
            await self.server.serve(sockets=[self.sock])
        finally:
            await durably.stop()

    def wait_started(self) -> None:
        deadline = time.monotonic() + 20
        while not (self.server is not None and self.server.started):
            if self.failure is not None or not self.is_alive():
                raise AssertionError(f"the server did not start: {self.failure!r}")
            if time.monotonic() > deadline:
                raise AssertionError("the server did not start within 20 s")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        self.join(15)
        self.sock.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, driver: Any) -> Iterator[ServerThread]:
    db = tmp_path_factory.mktemp("dashboard") / "runs.db"
    thread = ServerThread(f"sqlite:///{db}")
    thread.start()
    thread.wait_started()
    try:
        yield thread
    finally:
        driver.get("about:blank")  # the page closes its event streams on pagehide
        thread.stop()


@pytest.fixture(scope="module")
def api(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base + "/", timeout=20) as client:
        yield client


def trigger(api: httpx.Client, job: str, payload: Any, **extra: Any) -> str:
    response = api.post("trigger", json={"job": job, "input": payload, **extra})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def open_dashboard(driver: Any, server: ServerThread) -> None:
    driver.set_window_size(1440, 1000)
    driver.get(server.base + "/dashboard")  # the app redirects to dashboard/
    wait_until(
        lambda: driver.execute_script("return document.body.dataset.ready === '1'"), what="dashboard ready"
    )
    driver.get_log("browser")  # start the console check from here


def row_status(driver: Any, run_id: str) -> str | None:
    return driver.execute_script(
        "const row = document.querySelector(`tr[data-run-id='${arguments[0]}']`);"
        "return row && row.querySelector('.badge').textContent;",
        run_id,
    )


def detail_status(driver: Any) -> str | None:
    return driver.execute_script(
        "const b = document.querySelector('#detail .detail-title .badge'); return b && b.textContent;"
    )


def click_row(driver: Any, run_id: str) -> None:
    wait_until(lambda: row_status(driver, run_id), what=f"row of {run_id}")
    driver.execute_script("document.querySelector(`tr[data-run-id='${arguments[0]}']`).click()", run_id)
    wait_until(
        lambda: driver.execute_script(
            "return document.querySelector('#detail .run-id')?.textContent === arguments[0]", run_id
        ),
        what="the run's detail",
    )


def click_button(driver: Any, label: str) -> None:
    clicked = driver.execute_script(
        "const b = [...document.querySelectorAll('#detail .detail-actions button')]"
        "  .find((x) => x.textContent === arguments[0]);"
        "if (!b || b.disabled) return false; b.click(); return true;",
        label,
    )
    assert clicked, f"no enabled {label!r} button"


def console_errors(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


# -- tests -----------------------------------------------------------------------------------------


def test_dashboard_loads_and_follows_a_run_live(driver: Any, server: ServerThread, api: httpx.Client) -> None:
    open_dashboard(driver, server)
    assert driver.title.startswith("Runs")
    assert driver.current_url == server.base + "/dashboard/"
    jobs = driver.execute_script(
        "return [...document.querySelectorAll('#filter-job option')].map(o => o.value)"
    )
    assert jobs == [
        "",
        "approval",
        "fail-once",
        "flaky",
        "nap",
        "noted",
        "send-invoice",
        "settle",
        "slow-report",
        "tree-parent",
    ]
    driver.execute_script("window.__sameDocument = true")

    run_id = trigger(api, "slow-report", {"parts": 5, "delay": 0.4}, labels={"team": "billing"})
    seen: set[str] = set()

    def completed() -> bool:
        status = row_status(driver, run_id)
        if status:
            seen.add(status)
        return status == "completed"

    wait_until(completed, what="the row to turn completed")
    assert "running" in seen, f"the row never showed the run in flight: {seen}"
    assert driver.execute_script("return window.__sameDocument === true"), "the page reloaded"

    click_row(driver, run_id)
    detail = driver.execute_script(
        """const d = document.getElementById('detail');
        return {steps: [...d.querySelectorAll('.step .step-name')].map(e => e.textContent),
                durations: [...d.querySelectorAll('.step .step-duration')].map(e => e.textContent),
                logs: [...d.querySelectorAll('.log .log-message')].map(e => e.textContent),
                output: [...d.querySelectorAll('pre.json')].map(e => e.textContent),
                labels: [...d.querySelectorAll('.chip')].map(e => e.textContent),
                progress: d.querySelector('.progress-caption').textContent}"""
    )
    assert detail["steps"] == [f"load-part-{i}" for i in range(1, 6)]
    assert all(d.endswith("ms") or d.endswith(" s") for d in detail["durations"])
    assert detail["logs"][:2] == ["part 1: 37 rows", "part 2: 74 rows"]
    assert json.loads(detail["output"][0]) == api.get(f"runs/{run_id}").json()["output"]
    assert detail["labels"] == ["team=billing"]
    assert detail["progress"] == "5/5 · loaded part 5 of 5"

    # Filters go to the server: a status filter that excludes the run hides it.
    driver.execute_script(
        "const s = document.getElementById('filter-status'); s.value = 'failed';"
        "s.dispatchEvent(new Event('change'))"
    )
    wait_until(lambda: row_status(driver, run_id) is None, what="the filter to hide the run")
    driver.execute_script(
        "const s = document.getElementById('filter-status'); s.value = '';"
        "s.dispatchEvent(new Event('change'));"
        "const l = document.getElementById('filter-label'); l.value = 'team=billing';"
        "l.dispatchEvent(new Event('input'))"
    )
    wait_until(lambda: row_status(driver, run_id) == "completed", what="the label filter to show the run")
    assert console_errors(driver) == []


def test_cancel_from_the_ui(driver: Any, server: ServerThread, api: httpx.Client) -> None:
    open_dashboard(driver, server)
    run_id = trigger(api, "slow-report", {"parts": 40, "delay": 0.5})
    click_row(driver, run_id)
    wait_until(lambda: detail_status(driver) == "running", what="the run to start")
    wait_until(
        lambda: driver.execute_script("return document.querySelectorAll('#detail .step').length >= 2"),
        what="live steps in the detail",
    )
    click_button(driver, "Cancel")
    wait_until(lambda: detail_status(driver) == "cancelled", what="the detail to show cancelled")
    wait_until(lambda: row_status(driver, run_id) == "cancelled", what="the row to show cancelled")
    run = api.get(f"runs/{run_id}").json()
    assert run["status"] == "cancelled"
    assert len(api.get(f"runs/{run_id}/steps").json()["steps"]) < 40

    # Retrigger from the UI makes a new run with the same input; delete needs two clicks.
    click_button(driver, "Retrigger")
    wait_until(
        lambda: (
            driver.execute_script("return document.querySelector('#detail .run-id').textContent") != run_id
        ),
        what="the retriggered run to be shown",
    )
    new_id = driver.execute_script("return document.querySelector('#detail .run-id').textContent")
    assert api.get(f"runs/{new_id}").json()["input"] == {"parts": 40, "delay": 0.5}
    click_button(driver, "Cancel")
    wait_until(lambda: detail_status(driver) == "cancelled", what="the retriggered run to be cancelled")
    click_button(driver, "Delete")
    assert api.get(f"runs/{new_id}").status_code == 200  # the first click only arms the button
    click_button(driver, "Confirm delete")
    wait_until(lambda: api.get(f"runs/{new_id}").status_code == 404, what="the run to be deleted")
    wait_until(lambda: row_status(driver, new_id) is None, what="the row to disappear")
    assert console_errors(driver) == []


def test_user_data_is_rendered_as_text(driver: Any, server: ServerThread, api: httpx.Client) -> None:
    open_dashboard(driver, server)
    run_id = trigger(
        api,
        "slow-report",
        {"parts": 1, "delay": 0, "note": XSS, XSS: XSS},
        labels={"html": XSS, "html2": XSS},
    )
    failed_id = trigger(api, "send-invoice", {"customer": "fail " + XSS, "amount": 12.5})
    wait_until(lambda: api.get(f"runs/{run_id}").json()["status"] == "completed", what="the run to complete")
    wait_until(lambda: api.get(f"runs/{failed_id}").json()["status"] == "failed", what="the run to fail")

    click_row(driver, run_id)
    wait_until(lambda: driver.execute_script("return document.querySelectorAll('#detail .log').length === 2"))
    click_row(driver, failed_id)
    wait_until(lambda: driver.execute_script("return !!document.querySelector('#detail .traceback')"))
    error_text = driver.execute_script("return document.querySelector('#detail .error-head').textContent")
    assert error_text == f"ConnectionError: mail server refused delivery to fail {XSS}"
    assert XSS in driver.execute_script("return document.querySelector('#detail .traceback').textContent")

    click_row(driver, run_id)
    wait_until(lambda: driver.execute_script("return document.querySelectorAll('#detail .log').length === 2"))
    texts = driver.execute_script(
        """const d = document.getElementById('detail');
        return {chips: [...document.querySelectorAll('.chip')].map(e => e.textContent),
                logs: [...d.querySelectorAll('.log-message')].map(e => e.textContent),
                pre: [...d.querySelectorAll('pre')].map(e => e.textContent).join('\\n')}"""
    )
    assert f"html={XSS}" in texts["chips"] and f"html2={XSS}" in texts["chips"]
    assert XSS in texts["logs"]
    assert texts["pre"].count(XSS) >= 3  # input key + value + note, output note
    assert driver.execute_script("return document.querySelectorAll('img').length") == 0
    assert driver.execute_script("return window.__pwned") is None
    assert console_errors(driver) == []


def test_screenshot(driver: Any, server: ServerThread, api: httpx.Client, artifacts_dir: Path) -> None:
    """A dashboard with runs in every state and a live run selected, kept as a build artifact."""
    ids = [
        trigger(api, "send-invoice", {"customer": "Acme Corp", "amount": 1290.0}, labels={"tenant": "acme"}),
        trigger(api, "send-invoice", {"customer": "fail-fast GmbH", "amount": 80.0}, labels={"tenant": "ff"}),
        trigger(api, "slow-report", {"parts": 3, "delay": 0.05}, labels={"region": "eu"}),
    ]
    for run_id in ids:
        wait_until(
            lambda run_id=run_id: api.get(f"runs/{run_id}").json()["status"] in ("completed", "failed")
        )
    pending = trigger(
        api, "slow-report", {"parts": 60, "delay": 0.5}, labels={"region": "us", "tier": "gold"}
    )
    open_dashboard(driver, server)
    click_row(driver, pending)
    wait_until(
        lambda: driver.execute_script("return document.querySelectorAll('#detail .step').length >= 5"),
        timeout=30,
        what="a few live steps",
    )
    driver.set_window_size(1440, 1250)
    path = artifacts_dir / "dashboard.png"
    assert driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000
    click_button(driver, "Cancel")
    wait_until(lambda: detail_status(driver) == "cancelled")
    print(f"\nscreenshot: {path}")


# -- the remote client API (remote.js), exercised from the page ------------------------------------

CLIENT_SCRIPT = r"""
const done = arguments[arguments.length - 1];
const api = arguments[0];
const c = DurablyWebRemote.connect(api);
const out = {};
const caught = async (promise) => {
  try { await promise; return null; }
  catch (e) { return {name: e.name, status: e.status, message: e.message, details: e.details}; }
};
(async () => {
  out.kind = c.kind;
  out.jobs = await c.jobs();
  const seen = [];
  const off = c.on("run:complete", (e) => seen.push(e.run_id));
  const all = [];
  const offAll = c.on("*", (e) => all.push(e.type));

  const run = await c.trigger("send-invoice", {customer: "Initech", amount: 10},
                              {idempotencyKey: "inv-1", labels: {suite: "client"}});
  out.trigger = {disposition: run.disposition, status: run.status, labels: run.labels};
  const again = await c.trigger("send-invoice", {customer: "Initech", amount: 10}, {idempotencyKey: "inv-1"});
  out.again = again.disposition + ":" + String(again.id === run.id);

  const events = [];
  for await (const e of c.subscribe(run.id)) events.push(e.type);
  out.events = events;

  out.waited = (await c.waitForRun(run.id)).output;
  out.steps = (await c.getSteps(run.id)).map((s) => s.name);
  out.logs = await c.getLogs(run.id);
  out.andWait = await c.triggerAndWait("slow-report", {parts: 2, delay: 0.05}, {timeout: 20000});

  out.byLabel = (await c.getRuns({labels: {suite: "client"}})).map((r) => r.id);
  const failing = await c.trigger("send-invoice", {customer: "fail-1", amount: 1});
  out.failed = (await c.waitForRun(failing.id)).error.type;
  out.byStatus = (await c.getRuns({status: ["failed"], jobName: "send-invoice", limit: 1})).length;
  out.paged = (await c.getRuns({limit: 1, offset: 1})).length;

  const slow = await c.trigger("slow-report", {parts: 30, delay: 0.3});
  out.timeout = await caught(c.waitForRun(slow.id, {timeout: 300}));
  const cbEvents = [];
  await new Promise((resolve) => {
    c.subscribe(slow.id, (e) => {
      cbEvents.push(e.type);
      const firstStep = e.type === "step:complete" && !cbEvents.slice(0, -1).includes("step:complete");
      if (firstStep) c.cancel(slow.id);
      if (e.type === "run:cancel") resolve();
    });
  });
  out.callback = cbEvents;
  out.cancelled = (await c.getRun(slow.id)).status;
  out.retrigger = (await c.retrigger(slow.id)).disposition;
  const retriggered = (await c.getRuns({status: "pending", jobName: "slow-report"}))[0];
  if (retriggered) await c.cancel(retriggered.id).catch(() => {});

  out.batch = (await c.batchTrigger("send-invoice", [
    {customer: "A", amount: 1}, {input: {customer: "B", amount: 2}, options: {labels: {b: "1"}}}]))
    .map((r) => [r.input.customer, r.labels]);
  out.batchError = await caught(c.batchTrigger("send-invoice", [{customer: "C", amount: 3}, {customer: ""}]));
  out.batchConflict = await caught(c.batchTrigger("send-invoice", [
    {input: {customer: "D", amount: 4}, options: {concurrencyKey: "batch-ck"}},
    {input: {customer: "E", amount: 5}, options: {concurrencyKey: "batch-ck"}}]));
  out.batchBadOption = await caught(c.batchTrigger("send-invoice", [
    // urgency is no option (priority is one now)
    {customer: "F", amount: 6}, {input: {customer: "G", amount: 7}, options: {urgency: 1}}]));
  // all or nothing: none of the refused batches left a run behind
  // list items are summaries (no input): the inputs come from getRun
  const listed = await c.getRuns({jobName: "send-invoice", limit: 1000});
  out.summaryKeys = Object.keys(listed[0]).sort();
  out.batchLeftovers = (await Promise.all(listed.map((r) => c.getRun(r.id))))
    .map((r) => r.input.customer).filter((name) => ["C", "D", "E", "F", "G"].includes(name));
  out.batchIdempotent = (await c.batchTrigger("send-invoice", [
    {input: {customer: "Initech", amount: 10}, options: {idempotencyKey: "inv-1"}},
    {input: {customer: "H", amount: 8}, options: {idempotencyKey: "batch-h"}}]))
    .map((r) => [r.disposition, r.id === run.id]);
  out.batchEmpty = await c.batchTrigger("send-invoice", []);

  out.notFound = await caught(c.getRun("no-such-run"));
  out.unknownJob = await caught(c.trigger("no-such-job", {}));
  out.invalid = await caught(c.trigger("send-invoice", {customer: "", amount: -1}));
  out.badLabels = await caught(c.trigger("slow-report", {}, {labels: {n: 1}}));
  out.conflict = await caught(c.cancel(run.id));
  // A running (leased) run cannot be deleted; a cancelled one can, and is gone then.
  const busy = await c.trigger("slow-report", {parts: 60, delay: 0.5});
  await new Promise((resolve) => c.subscribe(busy.id, (e) => e.type === "step:complete" && resolve()));
  out.deleteLeased = await caught(c.deleteRun(busy.id));
  out.busyStatus = (await c.getRun(busy.id)).status;
  await c.cancel(busy.id);
  out.deleteCancelled = await caught(c.deleteRun(slow.id));
  out.deletedCancelled = await caught(c.getRun(slow.id));
  out.unknownOption = await caught(c.getRuns({state: "x"}));
  out.badStatus = await caught(c.getRuns({status: "sleeping"}));
  out.purgeMissing = await caught(c.purgeRuns());
  out.purgeNegative = await caught(c.purgeRuns({olderThan: -1}));
  out.purgeBadLimit = await caught(c.purgeRuns({olderThan: 0, limit: 1.5}));
  out.subscribeMissing = await caught((async () => {
    for await (const e of c.subscribe("no-such-run")) out.missingEvent = e.type;
  })());
  await c.deleteRun(run.id);
  out.deleted = await caught(c.getRun(run.id));

  const finished = {status: ["completed", "failed", "cancelled"], limit: 1000};
  const finishedBefore = (await c.getRuns(finished)).map((r) => r.id);
  out.purgeRecent = await c.purgeRuns({olderThan: 24 * 3600 * 1000});  // nothing ended a day ago
  out.purged = await c.purgeRuns({olderThan: 0, limit: 2});
  const finishedAfter = (await c.getRuns(finished)).map((r) => r.id);
  out.purgeCounts = [finishedBefore.length, finishedAfter.length];
  out.purgeOnlyRemoved = finishedAfter.every((id) => finishedBefore.includes(id));
  out.badType = (() => { try { c.on("nope", () => {}); return null; } catch (e) { return e.name; } })();

  out.seen = seen.includes(run.id);
  out.all = [...new Set(all)].sort();
  off(); offAll();
  await c.close();
  out.closed = await caught(c.getRun(run.id));
  done({ok: true, out});
})().catch((e) => done({ok: false, error: String(e && e.stack || e)}));
"""


def test_remote_client_api(driver: Any, server: ServerThread) -> None:
    open_dashboard(driver, server)
    reply = driver.execute_async_script(CLIENT_SCRIPT, server.base)
    assert reply["ok"], reply.get("error")
    out = reply["out"]
    assert out["kind"] == "remote"
    assert out["jobs"] == [
        "approval",
        "fail-once",
        "flaky",
        "nap",
        "noted",
        "send-invoice",
        "settle",
        "slow-report",
        "tree-parent",
    ]
    assert out["trigger"] == {"disposition": "created", "status": "pending", "labels": {"suite": "client"}}
    assert out["again"] == "idempotent:true"
    assert out["events"][-1] == "run:complete"
    assert out["events"].count("step:complete") == 2  # live or replayed, each step once
    assert out["waited"] == {"number": 1042, "customer": "Initech"}
    assert out["steps"] == ["allocate-number", "render-pdf"]
    assert out["logs"] == []
    assert out["andWait"]["status"] == "completed" and out["andWait"]["output"]["parts"] == 2
    assert len(out["byLabel"]) == 1
    assert out["failed"] == "ConnectionError"
    assert out["byStatus"] == 1 and out["paged"] == 1
    assert out["timeout"]["name"] == "WaitTimeoutError"
    assert out["callback"][0] == "run:snapshot" and out["callback"][-1] == "run:cancel"
    assert out["cancelled"] == "cancelled"
    assert out["retrigger"] == "created"
    assert out["batch"] == [["A", {}], ["B", {"b": "1"}]]
    assert out["batchError"]["name"] == "ValidationError" and out["batchError"]["message"].startswith(
        "batch item 1:"
    )
    assert out["notFound"]["name"] == "NotFoundError" and out["notFound"]["status"] == 404
    assert out["unknownJob"]["name"] == "NotFoundError"
    assert out["invalid"]["name"] == "ValidationError" and out["invalid"]["status"] == 400
    assert {tuple(d["loc"]) for d in out["invalid"]["details"]} == {("customer",), ("amount",)}
    assert out["badLabels"]["name"] == "ValidationError" and out["badLabels"]["details"]
    assert out["conflict"]["name"] == "ConflictError" and out["conflict"]["status"] == 409
    assert out["deleteLeased"]["name"] == "ConflictError" and out["deleteLeased"]["status"] == 409
    assert out["busyStatus"] == "leased"
    assert out["deleteCancelled"] is None and out["deletedCancelled"]["name"] == "NotFoundError"
    assert out["unknownOption"]["name"] == "ValidationError"
    assert out["badStatus"]["name"] == "ValidationError" and out["badStatus"]["status"] == 400
    assert out["batchConflict"]["name"] == "ConflictError" and out["batchConflict"]["status"] == 409
    assert out["batchBadOption"]["name"] == "ValidationError"
    assert out["batchBadOption"]["message"].startswith("batch item 1:")
    assert out["batchLeftovers"] == []
    assert "input" not in out["summaryKeys"] and "output" not in out["summaryKeys"]
    assert "input_bytes" in out["summaryKeys"] and "status" in out["summaryKeys"]
    assert out["batchIdempotent"] == [["idempotent", True], ["created", False]]
    assert out["batchEmpty"] == []
    for refused in ("purgeMissing", "purgeNegative", "purgeBadLimit"):
        assert out[refused]["name"] == "ValidationError", out[refused]
    assert out["purgeRecent"] == 0
    assert out["purged"] == 2
    before, after = out["purgeCounts"]
    assert before >= 2 and after == before - 2
    assert out["purgeOnlyRemoved"] is True
    assert out["subscribeMissing"]["name"] == "NotFoundError" and "missingEvent" not in out
    assert out["deleted"]["name"] == "NotFoundError"
    assert out["badType"] == "ValidationError"
    assert out["seen"] is True
    assert {"run:trigger", "run:leased", "run:complete", "run:cancel"} <= set(out["all"])
    assert all(t.startswith("run:") for t in out["all"])
    assert out["closed"]["name"] == "DurablyError"


# -- durable waiting: why and until when, signals, resume, fork, attempts -------------------------


def status_of(api: httpx.Client, run_id: str) -> str:
    return str(api.get(f"runs/{run_id}").json()["status"])


def wait_status(api: httpx.Client, run_id: str, status: str) -> dict[str, Any]:
    wait_until(lambda: status_of(api, run_id) == status, what=f"run {run_id} to be {status}")
    return dict(api.get(f"runs/{run_id}").json())


def detail(driver: Any) -> dict[str, Any]:
    """What the detail panel shows, as text."""
    return dict(
        driver.execute_script(
            """const d = document.getElementById('detail');
            const text = (sel) => { const e = d.querySelector(sel); return e ? e.textContent : null; };
            return {
              id: text('.run-id'), status: text('.detail-title .badge'),
              wait: text('.wait-box .wait-text'), form: !!d.querySelector('.signal-form'),
              signalError: d.querySelector('.signal-error:not([hidden])')?.textContent ?? null,
              forkedFrom: text('.forked-from dd'),
              steps: [...d.querySelectorAll('.steps > .step')].map((s) => ({
                name: s.dataset.step, cls: s.className,
                kind: s.querySelector('.step-kind')?.textContent ?? null,
                note: s.querySelector('.step-note')?.textContent ?? null,
                metadata: s.querySelector('.step-metadata')?.textContent ?? null,
                attempts: [...s.querySelectorAll('.attempt')].map((a) =>
                  [...a.children].map((c) => c.textContent))})),
            };"""
        )
    )


def page_is_unharmed(driver: Any) -> None:
    assert driver.execute_script("return document.querySelectorAll('img').length") == 0
    assert driver.execute_script("return window.__pwned") is None
    # The 400/409 answers the tests provoke are logged by Chromium as failed loads; nothing else.
    errors = [m for m in console_errors(driver) if "Failed to load resource" not in m]
    assert errors == []


def set_filter(driver: Any, value: str) -> None:
    driver.execute_script(
        "const s = document.getElementById('filter-status'); s.value = arguments[0];"
        "s.dispatchEvent(new Event('change'))",
        value,
    )


def submit_signal(driver: Any, payload: str, signal_id: str = "") -> None:
    driver.execute_script(
        """const f = document.querySelector('#detail .signal-form');
        f.querySelector('.signal-payload').value = arguments[0];
        f.querySelector('.signal-id').value = arguments[1];
        f.requestSubmit();""",
        payload,
        signal_id,
    )


def test_a_signal_sent_from_the_dashboard_completes_the_run(
    driver: Any, server: ServerThread, api: httpx.Client
) -> None:
    open_dashboard(driver, server)
    name = f"ok {XSS}"  # a hostile name: shown as text, sent in the URL path
    run_id = trigger(api, "approval", {"signal": name})
    wait_status(api, run_id, "waiting")

    # The list says why it waits; the status filter has "waiting".
    set_filter(driver, "waiting")

    def filtered() -> bool:
        statuses = driver.execute_script(
            "return [...document.querySelectorAll('#runs-body tr .badge')].map((b) => b.textContent)"
        )
        return row_status(driver, run_id) == "waiting" and set(statuses) == {"waiting"}

    wait_until(filtered, what="a list of waiting runs only, this one among them")
    row_wait = driver.execute_script(
        "return document.querySelector(`tr[data-run-id='${arguments[0]}'] .wait-text`).textContent", run_id
    )
    assert row_wait == f"waiting for signal '{name}'"
    click_row(driver, run_id)
    shown = detail(driver)
    assert shown["status"] == "waiting" and shown["wait"] == f"waiting for signal '{name}'"
    assert shown["form"]

    # Not JSON: refused in the page, nothing sent.
    submit_signal(driver, "{by: ana")
    wait_until(lambda: detail(driver)["signalError"], what="the JSON error")
    assert detail(driver)["signalError"].startswith("Payload is not valid JSON")
    assert status_of(api, run_id) == "waiting"

    # JSON the signal's type refuses: the server's ValidationError, as text.
    submit_signal(driver, '{"by": 5}')
    wait_until(
        lambda: (detail(driver)["signalError"] or "").startswith("ValidationError"), what="the server's error"
    )
    assert status_of(api, run_id) == "waiting"

    # What was typed survives a re-render (as a live event causes).
    driver.execute_script("document.querySelector('#detail .signal-payload').value = 'typed'")
    driver.execute_script("renderDetail()")
    assert driver.execute_script("return document.querySelector('#detail .signal-payload').value") == "typed"

    submit_signal(driver, json.dumps({"by": f"ana {XSS}"}), signal_id="mail-1")
    wait_until(
        lambda: (
            driver.execute_script("return document.getElementById('toast').textContent")
            == f"Signal '{name}' delivered"
        ),
        what="the disposition",
    )
    wait_until(lambda: detail_status(driver) == "completed", what="the detail to show the run completed")
    assert api.get(f"runs/{run_id}").json()["output"] == {"approved_by": f"ana {XSS}"}
    steps = detail(driver)["steps"]
    assert [(s["name"], s["kind"]) for s in steps] == [("prepare", None), (name, "signal"), ("finish", None)]
    assert steps[1]["note"] == f'payload {{ "by": "ana {XSS}" }}'
    assert not detail(driver)["form"]
    set_filter(driver, "")
    page_is_unharmed(driver)


def test_resume_button_continues_a_failed_run(driver: Any, server: ServerThread, api: httpx.Client) -> None:
    open_dashboard(driver, server)
    run_id = trigger(api, "fail-once", None)
    wait_status(api, run_id, "failed")
    click_row(driver, run_id)
    wait_until(lambda: detail_status(driver) == "failed", what="the failed run")
    error = driver.execute_script("return document.querySelector('#detail .error-head').textContent")
    assert error == f"RuntimeError: {XSS} attempt 1"

    click_button(driver, "Resume")
    wait_until(lambda: detail_status(driver) == "completed", what="the resumed run to complete")
    run = api.get(f"runs/{run_id}").json()
    assert run["output"] == "ok" and run["error"] is None
    # The attempt that failed before the resume is kept, and shown with its step.
    wait_until(lambda: any(s["attempts"] for s in detail(driver)["steps"]), what="the attempts of 'deliver'")
    deliver = detail(driver)["steps"][-1]
    assert deliver["name"] == "deliver"
    assert [a[:3] for a in deliver["attempts"]] == [
        ["attempt 1", "failed", f"RuntimeError: {XSS} attempt 1"],
        ["attempt 2", "completed", ""],
    ]
    # Only a failed or cancelled run can be resumed.
    assert driver.execute_script(
        "return [...document.querySelectorAll('#detail .detail-actions button')]"
        ".find((b) => b.textContent === 'Resume').disabled"
    )
    page_is_unharmed(driver)


def test_fork_from_a_step_opens_the_new_run(driver: Any, server: ServerThread, api: httpx.Client) -> None:
    open_dashboard(driver, server)
    source = trigger(api, "slow-report", {"parts": 3, "delay": 0})
    wait_status(api, source, "completed")
    click_row(driver, source)
    wait_until(lambda: len(detail(driver)["steps"]) == 3, what="the source's steps")
    clicked = driver.execute_script(
        "const b = document.querySelector(`#detail .step[data-step='load-part-2'] .step-fork`);"
        "if (!b || b.disabled) return false; b.click(); return true;"
    )
    assert clicked, "no enabled Fork button on load-part-2"
    wait_until(lambda: detail(driver)["id"] not in (None, source), what="the fork to be shown")
    forked = detail(driver)["id"]
    assert detail(driver)["forkedFrom"] == source
    run = wait_status(api, forked, "completed")
    assert run["forked_from"] == source and run["input"] == {"parts": 3, "delay": 0}
    source_steps = api.get(f"runs/{source}/steps").json()["steps"]
    forked_steps = api.get(f"runs/{forked}/steps").json()["steps"]
    assert [s["name"] for s in forked_steps] == ["load-part-1", "load-part-2", "load-part-3"]
    assert forked_steps[0]["started_at"] == source_steps[0]["started_at"]  # copied, not run again
    assert forked_steps[1]["started_at"] != source_steps[1]["started_at"]  # run again
    wait_until(lambda: detail_status(driver) == "completed", what="the fork's detail to complete")

    # The "Forked from" link leads back to the source.
    driver.execute_script("document.querySelector('#detail .forked-from button').click()")
    wait_until(lambda: detail(driver)["id"] == source, what="the source to be shown again")
    page_is_unharmed(driver)


def test_retried_steps_show_their_attempts_and_waits_say_until_when(
    driver: Any, server: ServerThread, api: httpx.Client
) -> None:
    open_dashboard(driver, server)
    done = trigger(api, "flaky", {"fail": 2, "delay": 0.05})
    slow = trigger(api, "flaky", {"fail": 1, "delay": 3600})
    sleeping = trigger(api, "nap", None)
    wait_status(api, done, "completed")

    click_row(driver, done)
    wait_until(lambda: any(s["attempts"] for s in detail(driver)["steps"]), what="the attempts")
    steps = detail(driver)["steps"]
    assert [s["name"] for s in steps] == ["connect", "call-api"]
    assert steps[0]["attempts"] == []  # tried once: nothing to add
    assert [a[:3] for a in steps[1]["attempts"]] == [
        ["attempt 1", "failed", f"RuntimeError: {XSS} attempt 1"],
        ["attempt 2", "failed", f"RuntimeError: {XSS} attempt 2"],
        ["attempt 3", "completed", ""],
    ]

    # Waiting for a retry an hour away: why and until when, and the failed attempt so far.
    wake = wait_status(api, slow, "waiting")["wake_at"]
    click_row(driver, slow)
    shown = detail(driver)
    when = driver.execute_script("return fmtTime(arguments[0])", wake)
    assert shown["wait"] == f"retry of 'call-api' at {when}"
    assert not shown["form"]
    retrying = shown["steps"][-1]
    assert retrying["name"] == "call-api" and "step-retrying" in retrying["cls"]
    assert [a[:3] for a in retrying["attempts"]] == [
        ["attempt 1", "failed", f"RuntimeError: {XSS} attempt 1"]
    ]
    click_button(driver, "Cancel")
    wait_until(lambda: detail_status(driver) == "cancelled", what="the retrying run to be cancelled")

    # Sleeping: the sleep is a step of kind "sleep" with its due time.
    wake = wait_status(api, sleeping, "waiting")["wake_at"]
    click_row(driver, sleeping)
    shown = detail(driver)
    when = driver.execute_script("return fmtTime(arguments[0])", wake)
    assert shown["wait"] == f"sleeping in 'cool-down' until {when}"
    assert [(s["name"], s["kind"], s["note"]) for s in shown["steps"]] == [
        ("cool-down", "sleep", f"until {when}")
    ]
    click_button(driver, "Cancel")
    wait_until(lambda: detail_status(driver) == "cancelled", what="the sleeping run to be cancelled")
    page_is_unharmed(driver)


# -- the remote client's waiting API (remote.js), from the page --------------------------------------

WAITING_CLIENT_SCRIPT = r"""
const done = arguments[arguments.length - 1];
const c = DurablyWebRemote.connect(arguments[0]);
const out = {};
const caught = async (promise) => {
  try { await promise; return null; }
  catch (e) { return {name: e.name, status: e.status ?? null, message: e.message}; }
};
(async () => {
  // Sent before the run reaches its wait: stored, then taken by the wait.
  const run = await c.trigger("approval", {signal: "go ahead? #1", delay: 0.5});
  const events = [];
  const streamed = (async () => { for await (const e of c.subscribe(run.id)) events.push(e.type); })();
  out.stored = await c.sendSignal(run.id, "go ahead? #1", {by: "early"}, {signalId: "s-1"});
  out.duplicate = await c.sendSignal(run.id, "go ahead? #1", {by: "other"}, {signalId: "s-1"});
  out.output = (await c.waitForRun(run.id, {timeout: 20000})).output;
  await streamed;
  out.events = events;

  // Delivered to a waiting run; a payload left out is null (which the Approval type refuses).
  const waitingEvents = [];
  const offWaiting = c.on("run:waiting", (e) => waitingEvents.push(e.run_id));
  // (a first step long enough for the event stream to be open when the run starts waiting)
  const waiting = await c.trigger("approval", {signal: "plain", delay: 0.3});
  while ((await c.getRun(waiting.id)).status !== "waiting") await new Promise((r) => setTimeout(r, 50));
  out.waitingRun = await c.getRun(waiting.id);
  out.waitingListed = (await c.getRuns({status: "waiting"})).map((r) => [r.id, r.wait_reason, r.wait_step])
    .filter(([id]) => id === waiting.id);
  out.badPayload = await caught(c.sendSignal(waiting.id, "plain"));
  out.delivered = await c.sendSignal(waiting.id, "plain", {by: "ana"});
  out.output2 = (await c.waitForRun(waiting.id, {timeout: 20000})).output;
  offWaiting();
  out.onWaiting = waitingEvents.includes(waiting.id);
  out.finished = await caught(c.sendSignal(waiting.id, "plain", {by: "late"}));
  out.unknownRun = await caught(c.sendSignal("no-such-run", "plain"));
  out.noName = await caught(c.sendSignal(run.id, ""));
  out.dotDot = await caught(c.sendSignal(run.id, ".."));
  out.badOption = await caught(c.sendSignal(run.id, "x", null, {id: "s"}));
  out.badSignalId = await caught(c.sendSignal(run.id, "x", null, {signalId: ""}));
  out.badRunId = await caught(c.sendSignal("", "x"));

  // A retried step fails once per attempt: subscribe() passes each of those events.
  const flaky = await c.trigger("flaky", {fail: 2, delay: 0.05, pause: 0.5});
  const flakyEvents = [];
  for await (const e of c.subscribe(flaky.id)) {
    const wanted = ["step:fail", "step:retry", "run:waiting"].includes(e.type);
    if (wanted) flakyEvents.push([e.type, e.attempt ?? null]);
  }
  out.flakyEvents = flakyEvents;

  // Resume: a failed run continues; a completed one is a conflict.
  const failing = await c.trigger("fail-once", {key: "client-" + Date.now()});
  await c.waitForRun(failing.id, {timeout: 20000});
  const resumed = await c.resumeRun(failing.id);
  out.resumed = [resumed.id === failing.id, resumed.status];
  out.resumedEnd = (await c.waitForRun(failing.id, {timeout: 20000})).status;
  out.resumeCompleted = await caught(c.resumeRun(failing.id));
  out.resumeUnknown = await caught(c.resumeRun("no-such-run"));
  out.attempts = (await c.getStepAttempts(failing.id)).map((a) => [a.name, a.attempt, a.status]);
  out.attemptsUnknown = await caught(c.getStepAttempts("no-such-run"));

  // Fork: a new run from a recorded step.
  const fork = await c.forkRun(failing.id, {fromStep: "deliver"});
  out.fork = [fork.disposition, fork.forked_from === failing.id, fork.id !== failing.id, fork.status];
  out.forkEnd = (await c.waitForRun(fork.id, {timeout: 20000})).status;
  out.forkUnknownStep = await caught(c.forkRun(failing.id, {fromStep: "no-such-step"}));
  out.forkNoStep = await caught(c.forkRun(failing.id));
  out.forkBadOption = await caught(c.forkRun(failing.id, {from_step: "deliver"}));
  out.forkUnknownRun = await caught(c.forkRun("no-such-run", {fromStep: "deliver"}));
  await c.close();
  done({ok: true, out});
})().catch((e) => done({ok: false, error: String(e && e.stack || e)}));
"""


def test_remote_client_waiting_api(driver: Any, server: ServerThread) -> None:
    open_dashboard(driver, server)
    reply = driver.execute_async_script(WAITING_CLIENT_SCRIPT, server.base)
    assert reply["ok"], reply.get("error")
    out = reply["out"]
    assert out["stored"] == "stored" and out["duplicate"] == "duplicate"
    assert out["output"] == {"approved_by": "early"}
    assert out["events"][0] == "run:snapshot" and out["events"][-1] == "run:complete", out["events"]
    assert out["waitingRun"]["wait_reason"] == "signal" and out["waitingRun"]["wait_step"] == "plain"
    assert out["waitingRun"]["wake_at"] is None
    assert out["waitingListed"] == [[out["waitingRun"]["id"], "signal", "plain"]]
    assert out["onWaiting"] is True  # on() accepts the waiting events and the stream carries them
    assert out["badPayload"]["name"] == "ValidationError" and out["badPayload"]["status"] == 400
    assert out["delivered"] == "delivered" and out["output2"] == {"approved_by": "ana"}
    assert out["finished"]["name"] == "ConflictError" and out["finished"]["status"] == 409
    assert out["unknownRun"]["name"] == "NotFoundError" and out["unknownRun"]["status"] == 404
    for refused in ("noName", "dotDot", "badOption", "badRunId"):  # refused before any request
        assert out[refused]["name"] == "ValidationError" and out[refused]["status"] is None, out[refused]
    assert out["badSignalId"]["name"] == "ValidationError" and out["badSignalId"]["status"] == 400
    assert out["flakyEvents"] == [
        ["step:fail", 1],
        ["step:retry", 1],
        ["run:waiting", None],
        ["step:fail", 2],
        ["step:retry", 2],
        ["run:waiting", None],
    ]
    assert out["resumed"] == [True, "pending"] and out["resumedEnd"] == "completed"
    assert out["resumeCompleted"]["name"] == "ConflictError" and out["resumeCompleted"]["status"] == 409
    assert out["resumeUnknown"]["name"] == "NotFoundError"
    assert out["attempts"] == [
        ["render", 1, "completed"],
        ["deliver", 1, "failed"],
        ["deliver", 2, "completed"],
    ]
    assert out["attemptsUnknown"]["name"] == "NotFoundError"
    assert out["fork"] == ["created", True, True, "pending"] and out["forkEnd"] == "completed"
    assert out["forkUnknownStep"]["name"] == "NotFoundError" and out["forkUnknownStep"]["status"] == 404
    for refused in ("forkNoStep", "forkBadOption"):
        assert out[refused]["name"] == "ValidationError" and out[refused]["status"] is None, out[refused]
    assert out["forkUnknownRun"]["name"] == "NotFoundError"


# -- dashboard.html?local= / ?remote=: only this origin's code -------------------------------------


class _Recorder(BaseHTTPRequestHandler):
    """Another origin's server: serves a job module to anyone (CORS *) and records every request."""

    requests: list[str] = []

    def do_GET(self) -> None:
        self.requests.append(self.path)
        body = b'raise SystemExit("this must never run")\n'
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_OPTIONS = do_GET

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def other_origin() -> Iterator[tuple[str, list[str]]]:
    """(base URL, request log) of a server on 127.0.0.2: a different origin from the site's."""
    requests: list[str] = []
    handler = type("Recorder", (_Recorder,), {"requests": requests})
    try:
        srv = ThreadingHTTPServer(("127.0.0.2", 0), handler)
    except OSError as exc:
        pytest.skip(f"cannot listen on 127.0.0.2: {exc}")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.2:{srv.server_address[1]}/", requests
    finally:
        srv.shutdown()
        srv.server_close()


def start_error(driver: Any, timeout: float = 90) -> dict[str, Any]:
    """Wait for the dashboard's start failure; return what the page shows."""
    wait_until(
        lambda: driver.execute_script("return document.body.dataset.startError"),
        timeout=timeout,
        what="the dashboard to report why it cannot start",
    )
    return driver.execute_script(
        """const box = document.querySelector('#detail .start-error');
        return {name: document.body.dataset.startError,
                connection: document.getElementById('connection-text').textContent,
                state: document.getElementById('connection').dataset.state,
                head: box && box.querySelector('.error-head').textContent,
                traceback: box && box.querySelector('.traceback')?.textContent,
                visible: !!box && box.getClientRects().length > 0,
                loaded: performance.getEntriesByType('resource').map((e) => e.name)}"""
    )


def test_local_and_remote_urls_from_other_origins_are_refused(
    driver: Any, site_url: Any, other_origin: tuple[str, list[str]]
) -> None:
    url, _ = site_url
    evil, evil_requests = other_origin
    host = evil.split("//", 1)[1]
    refused = [
        ("local", evil + "evil.py"),
        ("local", f"//{host}evil.py"),  # protocol-relative
        ("local", "data:text/x-python,print(1)"),
        ("local", f"blob:{url.rstrip('/')}/00000000-0000-0000-0000-000000000000"),
        ("local", "javascript:alert(1)"),
        ("remote", evil + "api/durably"),
    ]
    for param, value in refused:
        driver.get(f"{url}dashboard.html?{param}={quote(value, safe='')}&storage=memory&db=refused.db")
        shown = start_error(driver)
        assert shown["name"] == "RefusedURL", (value, shown)
        assert shown["state"] == "offline"
        assert "refused" in shown["connection"] and f"?{param}=" in shown["connection"], shown
        assert shown["visible"] and "only this page's origin" in shown["head"], shown
        # Refused before anything was loaded: no runtime, no worker, no Python.
        assert not [u for u in shown["loaded"] if u.endswith(("durably.js", "worker.js", "remote.js"))], shown
    assert evil_requests == [], f"the other origin was contacted: {evil_requests}"


def test_a_same_origin_redirect_to_another_origin_does_not_run_its_module(
    driver: Any, site_url: Any, other_origin: tuple[str, list[str]]
) -> None:
    # The URL passes the page's origin check; the site then redirects it elsewhere (an open
    # redirect of the hosting app). The worker must refuse the other origin's code.
    url, _ = site_url
    evil, evil_requests = other_origin
    redirect = f"/_test/redirect?to={quote(evil + 'redirected.py', safe='')}"
    driver.get(f"{url}dashboard.html?local={quote(redirect, safe='')}&storage=memory&db=redirect.db")
    shown = start_error(driver)
    assert "redirected to another origin" in shown["head"], shown
    assert "this must never run" not in (shown["traceback"] or ""), shown
    assert evil_requests.count("/redirected.py") <= 1  # fetched at most once, never imported


def test_local_jobs_from_this_origin_still_run(driver: Any, site_url: Any) -> None:
    url, _ = site_url
    driver.get(f"{url}dashboard.html?local={quote(url + 'demo_jobs.py', safe='')}&storage=memory&db=same.db")
    wait_until(
        lambda: driver.execute_script("return document.body.dataset.ready === '1'"),
        timeout=90,
        what="dashboard ready",
    )
    assert driver.execute_script("return document.getElementById('connection-text').textContent").startswith(
        "in this browser"
    )
    jobs = driver.execute_script(
        "return [...document.querySelectorAll('#filter-job option')].map(o => o.value)"
    )
    assert "weather-report" in jobs


# -- a job module that does not import ---------------------------------------------------------------


def test_a_job_module_with_a_syntax_error_names_its_file_line_and_traceback(
    driver: Any, site_url: Any
) -> None:
    url, _ = site_url
    driver.get(f"{url}dashboard.html?local=_test/syntax_error_jobs.py&storage=memory&db=broken.db")
    shown = start_error(driver)
    module = f"{url}_test/syntax_error_jobs.py"
    assert shown["name"] == "SyntaxError", shown
    assert shown["head"].startswith(f"SyntaxError: job module {module}, line 8: "), shown
    assert "was never closed" in shown["head"], shown  # Python's own reason, not "invalid syntax" alone
    assert 'return {"ok": True' in shown["traceback"] and "line 8" in shown["traceback"], shown
    assert module in shown["connection"]

    # The JS API rejects with the same, the traceback in details.
    error = page(
        driver,
        """try { await DurablyWeb.create({jobs: [args[0]], storage: "memory", database: "broken2.db"}); }
        catch (e) { return {name: e.name, message: e.message, details: e.details}; }
        return null;""",
        module,
    )
    assert error["name"] == "SyntaxError"
    assert error["message"] == shown["head"].removeprefix("SyntaxError: ")
    assert error["details"]["module"] == module and error["details"]["line"] == 8
    assert error["details"]["traceback"].rstrip().endswith("SyntaxError: '{' was never closed")


def test_a_job_module_that_raises_on_import_names_its_line(driver: Any, site_url: Any) -> None:
    url, _ = site_url
    driver.get(f"{url}dashboard.html?local=_test/import_error_jobs.py&storage=memory&db=raising.db")
    shown = start_error(driver)
    assert shown["name"] == "KeyError", shown
    assert shown["head"].startswith(f"KeyError: job module {url}_test/import_error_jobs.py, line 6: "), shown
    assert 'REGION = SETTINGS["region"]' in shown["traceback"], shown
    assert "importlib" not in shown["traceback"], "the import machinery's frames are noise"


def test_a_step_all_shows_its_branches_and_their_attempt_metadata_as_text(
    driver: Any, server: ServerThread, api: httpx.Client
) -> None:
    open_dashboard(driver, server)
    run = trigger(api, "noted", None)
    wait_status(api, run, "completed")
    click_row(driver, run)
    wait_until(lambda: any(s["metadata"] for s in detail(driver)["steps"]), what="the attempt metadata")
    steps = detail(driver)["steps"]
    assert [(s["name"], s["metadata"]) for s in steps] == [
        ("summarize", f"model: {json.dumps(XSS)} · tokens: 812"),
        ("classify", None),
    ]


def test_a_parent_and_its_child_run_link_to_each_other(
    driver: Any, server: ServerThread, api: httpx.Client
) -> None:
    open_dashboard(driver, server)
    parent_id = trigger(api, "tree-parent", None)
    wait_status(api, parent_id, "waiting")
    [child] = api.get("runs", params={"parent_run_id": parent_id}).json()["runs"]
    wait_status(api, child["id"], "waiting")
    # The child's row in the list names its parent.
    wait_until(lambda: row_status(driver, child["id"]) == "waiting", what="the child's row")
    marker = driver.execute_script(
        "return document.querySelector(`tr[data-run-id='${arguments[0]}'] .child-of`)?.title ?? null",
        child["id"],
    )
    assert marker == f"child run of {parent_id}"
    click_row(driver, parent_id)
    wait_until(lambda: detail_status(driver) == "waiting", what="the waiting parent")
    assert detail(driver)["wait"] == f"waiting in 'nap-done' for child run …{child['id'][-8:]}"
    children = driver.execute_script(
        "return [...document.querySelectorAll('#detail .child-runs li')].map((li) => li.textContent)"
    )
    assert len(children) == 1 and child["id"] in children[0] and "waited for" in children[0]
    driver.execute_script(
        "document.querySelector(`#detail .child-runs button[data-child-id='${arguments[0]}']`).click()",
        child["id"],
    )
    wait_until(lambda: detail(driver)["id"] == child["id"], what="the child to be shown")
    driver.execute_script("document.querySelector('#detail .parent-run button').click()")
    wait_until(lambda: detail(driver)["id"] == parent_id, what="the parent to be shown again")
    # The child is cancelled with it: nothing sleeps on after the test.
    cancelled = api.post(f"runs/{parent_id}/cancel", headers={"Content-Type": "application/json"})
    assert cancelled.status_code == 200, cancelled.text
    wait_status(api, child["id"], "cancelled")
    page_is_unharmed(driver)


DEADLINE_CLIENT_SCRIPT = r"""
const done = arguments[arguments.length - 1];
const c = DurablyWebRemote.connect(arguments[0]);
const caught = async (promise) => {
  try { await promise; return null; } catch (e) { return {name: e.name, message: e.message}; }
};
(async () => {
  const out = {};
  const run = await c.trigger("nap", null, {timeout: 90000});
  out.deadlineSeconds = (Date.parse(run.deadline_at) - Date.parse(run.created_at)) / 1000;
  out.version = run.version;
  const waited = await c.triggerAndWait("slow-report", {parts: 1, delay: 0},
                                        {timeout: 20000, runTimeout: 60000});
  out.waitedSeconds = (Date.parse(waited.deadline_at) - Date.parse(waited.created_at)) / 1000;
  out.byVersion = (await c.getRuns({version: run.version})).map((r) => r.id).includes(run.id);
  out.otherVersion = (await c.getRuns({version: ["no-such-version"]})).length;
  out.badTimeout = await caught(c.trigger("nap", null, {timeout: -1}));
  await c.cancel(run.id);
  done({ok: true, out});
})().catch((e) => done({ok: false, error: String(e && e.stack || e)}));
"""


# -- flow control and tracing: priority, a held-back start, "debounced", the trace parent ----------

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def row_texts(driver: Any, run_id: str) -> dict[str, Any]:
    return dict(
        driver.execute_script(
            """const row = document.querySelector(`tr[data-run-id='${arguments[0]}']`);
            if (!row) return {};
            return {priority: row.querySelector('.chip-priority')?.textContent ?? null,
                    startsAfter: row.querySelector('.starts-after')?.textContent ?? null};""",
            run_id,
        )
    )


def meta_texts(driver: Any) -> dict[str, Any]:
    return dict(
        driver.execute_script(
            """const d = document.getElementById('detail');
            const text = (sel) => d.querySelector(sel)?.textContent ?? null;
            return {priority: text('.meta-priority dd'), startsAfter: text('.meta-starts-after dd'),
                    traceParent: text('.trace-parent dd')};"""
        )
    )


def test_priority_held_back_start_debounce_and_trace_parent_show(
    driver: Any, server: ServerThread, api: httpx.Client
) -> None:
    open_dashboard(driver, server)
    response = api.post(
        "trigger",
        json={"job": "settle", "input": {"v": 1}, "concurrency_key": "doc:ui", "priority": 4},
        headers={"traceparent": TRACEPARENT},
    )
    assert response.status_code == 201, response.text
    run_id = response.json()["id"]
    wait_until(lambda: row_texts(driver, run_id).get("priority") == "p+4", what="the priority chip")
    assert (row_texts(driver, run_id)["startsAfter"] or "").startswith("starts after ")
    click_row(driver, run_id)
    shown = meta_texts(driver)
    assert shown["priority"] == "4" and shown["traceParent"] == TRACEPARENT
    assert shown["startsAfter"] not in (None, "", "—")

    # The trigger form: the same key again is debounced into that run, and the toast says so.
    driver.execute_script(
        """document.getElementById('new-run').click();
        document.getElementById('trigger-job').value = 'settle';
        document.getElementById('trigger-input').value = '{"v": 2}';
        document.getElementById('trigger-concurrency-key').value = 'doc:ui';
        document.getElementById('trigger-form').requestSubmit();"""
    )
    toast = "return document.getElementById('toast').textContent"
    wait_until(
        lambda: (driver.execute_script(toast) or "").startswith(
            "Debounced into the pending run (latest input wins; starts after "
        ),
        what="the debounced toast",
    )
    assert api.get(f"runs/{run_id}").json()["input"] == {"v": 2}
    assert api.get("runs", params={"job": "settle"}).json()["runs"][0]["id"] == run_id

    # A run of priority 0 without a trace parent shows neither; a bad priority is refused in the page.
    plain = trigger(api, "nap", None)
    wait_until(lambda: row_status(driver, plain), what="the plain row")
    assert row_texts(driver, plain)["priority"] is None
    click_row(driver, plain)
    assert meta_texts(driver) == {"priority": None, "startsAfter": None, "traceParent": None}
    # The form's priority field takes whole numbers only (a fraction never reaches the server).
    refused = driver.execute_script(
        """const p = document.getElementById('trigger-priority'); p.value = '1.5';
        return p.validity.stepMismatch && !document.getElementById('trigger-form').checkValidity();"""
    )
    assert refused
    api.post(f"runs/{plain}/cancel")
    page_is_unharmed(driver)


FLOW_CLIENT_SCRIPT = r"""
const done = arguments[arguments.length - 1];
const c = DurablyWebRemote.connect(arguments[0]);
const out = {};
(async () => {
  const first = await c.trigger("settle", {v: 1}, {concurrencyKey: "doc:js", priority: -2});
  const second = await c.trigger("settle", {v: 2}, {concurrencyKey: "doc:js", priority: 9});
  const run = await c.getRun(first.id);
  out.dispositions = [first.disposition, second.disposition];
  out.same = second.id === first.id;
  out.input = run.input;
  out.priority = run.priority;  // the first trigger's: a debounce keeps it
  out.notBefore = typeof run.not_before === "string";
  out.summaryPriority = (await c.getRuns({jobName: "settle"})).find((r) => r.id === first.id).priority;
  try { await c.trigger("nap", null, {priority: "high"}); out.badPriority = null; }
  catch (e) { out.badPriority = e.name; }
  try { await c.trigger("settle", {v: 3}); out.keyless = null; }
  catch (e) { out.keyless = [e.name, e.message]; }
  await c.cancel(first.id);
  done({ok: true, out});
})().catch((e) => done({ok: false, error: String(e && e.stack || e)}));
"""


def test_deadline_and_version_in_the_dashboard_and_the_remote_client(
    driver: Any, server: ServerThread, api: httpx.Client
) -> None:
    open_dashboard(driver, server)
    run_id = trigger(api, "nap", None, timeout="1h")
    run = wait_status(api, run_id, "waiting")
    assert run["deadline_at"] and run["version"]
    click_row(driver, run_id)
    meta = driver.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('#detail .meta > div')]"
        "  .map((d) => [d.querySelector('dt').textContent, d.querySelector('dd').textContent]))"
    )
    assert meta["Version"] == run["version"] and meta["Deadline"] not in ("", "—"), meta
    version = driver.execute_script("return document.getElementById('filter-version')")
    assert version is not None
    driver.execute_script(
        "const v = document.getElementById('filter-version'); v.value = 'no-such-version';"
        "v.dispatchEvent(new Event('input'))"
    )
    wait_until(lambda: row_status(driver, run_id) is None, what="the version filter to hide the run")
    driver.execute_script(
        "const v = document.getElementById('filter-version'); v.value = arguments[0];"
        "v.dispatchEvent(new Event('input'))",
        run["version"],
    )
    wait_until(lambda: row_status(driver, run_id) == "waiting", what="the version filter to show the run")

    reply = driver.execute_async_script(DEADLINE_CLIENT_SCRIPT, server.base)
    assert reply["ok"], reply.get("error")
    out = reply["out"]
    assert out["deadlineSeconds"] == 90 and out["waitedSeconds"] == 60
    assert out["version"] == run["version"] and out["byVersion"] is True and out["otherVersion"] == 0
    assert out["badTimeout"]["name"] == "ValidationError"
    api.post(f"runs/{run_id}/cancel")
    assert console_errors(driver) == []


def test_remote_client_priority_and_debounce(driver: Any, server: ServerThread) -> None:
    open_dashboard(driver, server)
    reply = driver.execute_async_script(FLOW_CLIENT_SCRIPT, server.base)
    assert reply["ok"], reply.get("error")
    out = reply["out"]
    assert out["dispositions"] == ["created", "debounced"] and out["same"] is True
    assert out["input"] == {"v": 2} and out["priority"] == -2 and out["notBefore"] is True
    assert out["summaryPriority"] == -2
    assert out["badPriority"] == "ValidationError"
    assert out["keyless"][0] == "ValidationError" and "concurrency_key" in out["keyless"][1]
