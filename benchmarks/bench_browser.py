"""Browser benchmark (headless Debian Chromium): ``python benchmarks/bench_browser.py``.

Prints, in one run, for storage "opfs" (opfs-sahpool, WAL + exclusive locking, as
the runtime opens it) and "memory":

  ready      page navigation -> ``DurablyWeb.create()`` resolved (Pyodide + worker.js +
             wheels + job module + database open), with a warm HTTP cache: the page is
             loaded once, then reloaded --reloads times; median (min-max);
  offline    the same with create({offline: true}) on OPFS, from the service worker's
             cache with the HTTP server stopped, and the first run after each such load
             (ready -> a one-step run completed), against the polling interval (1 s);
  per-step   a job with N no-op steps run by Durably on SQLiteStore over
             WasmSqlConnection inside a worker: (time(N steps) - time(0 steps)) / N;
             measured in the test harness worker (tests/browser/pages/harness_worker.js), which
             runs Python we send, and also through the public API (worker.js,
             triggerAndWait from the page; includes the page<->worker messages);
  floor      one committed INSERT through the same bridge (WasmSqlConnection.execute
             in autocommit, same pragmas), and a BEGIN/INSERT/COMMIT of three calls;
  ratio      per-step / floor (autocommit INSERT).

Targets (issue 3): ready < 3 s warm; per-step within 3x the floor.
Nothing is fetched from outside 127.0.0.1: Chromium's non-loopback traffic goes to
a dead proxy port. Use --no-build to reuse an existing site/.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HARNESS_PAGES = ROOT / "tests" / "browser" / "pages"  # harness.html + harness_worker.js
CHROMIUM = os.environ.get("DURABLY_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("DURABLY_CHROMEDRIVER", "/usr/bin/chromedriver")

_spec = importlib.util.spec_from_file_location("durably_site_build", ROOT / "build.py")
assert _spec is not None and _spec.loader is not None
site_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(site_build)

# Served under /_bench/ (never shipped in site/).
BENCH_JOBS = """
from durably_web import StepContext, define_job


def noop() -> None:
    return None


@define_job("noop-steps", output=int)
async def noop_steps(step: StepContext, payload: dict) -> int:
    for i in range(payload["steps"]):
        await step.run(f"s{i}", noop)
    return payload["steps"]


JOBS = [noop_steps]
"""

BENCH_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>durably-web browser benchmark</title>
<link rel="icon" href="data:,">
<script src="../durably.js"></script></head>
<body><script>
  const params = new URLSearchParams(location.search);
  const storage = params.get("storage") || "opfs";
  const offline = params.get("offline") === "1";
  window.bench = { status: [], pageScript: performance.now() };
  const onStatus = (s) => {
    bench.status.push([performance.now(), s.state]);
    // worker.js's phase ends (timeOrigin + now, a clock both sides share) -> ms since navigation
    if (s.state === "ready" && s.detail && s.detail.phases) {
      bench.phases = Object.fromEntries(
        Object.entries(s.detail.phases)
          .filter(([, t]) => typeof t === "number").map(([k, t]) => [k, t - performance.timeOrigin]));
      bench.snapshot = s.detail.phases.snapshot || "none";
    }
  };
  const database = "bench-" + storage + ".db";
  DurablyWeb.create({ jobs: ["bench_jobs.py"], database, storage, onStatus, offline })
    .then(async (d) => {
      bench.durably = d;
      const ready = performance.now();
      if (offline) {  // the first run after the load: ready -> a one-step run completed
        await d.triggerAndWait("noop-steps", {steps: 1}, {timeout: 60000});
        bench.firstRunMs = performance.now() - ready;
      }
      bench.readyMs = ready;
    })
    .catch((e) => { bench.error = String((e && e.stack) || e); });
</script></body></html>
"""

# Python run inside the harness worker (top-level await; last expression is the result).
WORKER_BENCH = r"""
import json, statistics, time
from durably_web import Durably, StepContext, define_job
from durably_web.storage.sqlite import SQLiteStore, apply_connection_policy
from durably_web.storage.sqlite.wasm_connection import WasmSqlConnection

N = __N__
REPEAT = __REPEAT__
STORAGE = __STORAGE__

def noop():
    return None

@define_job("noop-steps", output=int)
async def noop_steps(step: StepContext, payload: dict) -> int:
    for i in range(payload["steps"]):
        await step.run(f"s{i}", noop)
    return payload["steps"]

async def open_conn(name):
    # As browser.open_and_start + browser.start open the runtime's database.
    if STORAGE == "memory":
        conn = await WasmSqlConnection.open(":memory:", storage="memory")
    else:
        conn = await WasmSqlConnection.open(f"/{name}", storage="opfs", journal_mode="wal", pool_capacity=16)
    apply_connection_policy(conn, journal_mode=None, synchronous="normal", busy_timeout_ms=5000)
    return conn

# -- per step, through Durably
conn = await open_conn("bench-steps.db")
durably = Durably(SQLiteStore(conn), jobs=[noop_steps], sole_worker=True, polling_interval=0.05)
await durably.init()

async def timed(steps):
    t = time.perf_counter()
    run = await durably.trigger_and_wait("noop-steps", {"steps": steps}, timeout=300)
    elapsed = time.perf_counter() - t
    assert run.status == "completed" and run.output == steps, run
    return elapsed

await timed(50)  # warm-up: JIT, statement cache, pool files
per_step = []
for _ in range(REPEAT):
    empty = await timed(0)
    full = await timed(N)
    per_step.append((full - empty) / N)
info = conn.info()
await durably.stop()
conn.close()

# -- floor: one committed INSERT through the same bridge
conn = await open_conn("bench-floor.db")
conn.execute_script("CREATE TABLE IF NOT EXISTS b(id INTEGER PRIMARY KEY, run TEXT, n INTEGER, payload TEXT)")
sql = "INSERT INTO b(run, n, payload) VALUES (:run, :n, :payload)"
payload = "x" * 200
for i in range(50):
    conn.execute(sql, {"run": "warm", "n": i, "payload": payload})
autocommit, three_calls = [], []
for _ in range(REPEAT):
    t = time.perf_counter()
    for i in range(N):
        conn.execute(sql, {"run": "a", "n": i, "payload": payload})
    autocommit.append((time.perf_counter() - t) / N)
    t = time.perf_counter()
    for i in range(N):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(sql, {"run": "t", "n": i, "payload": payload})
        conn.execute("COMMIT")
    three_calls.append((time.perf_counter() - t) / N)
conn.close()

json.dumps({
    "per_step_ms": statistics.median(per_step) * 1e3,
    "per_step_all_ms": [round(x * 1e3, 3) for x in per_step],
    "floor_ms": statistics.median(autocommit) * 1e3,
    "floor3_ms": statistics.median(three_calls) * 1e3,
    "journal": info.get("journalMode"), "locking": info.get("lockingMode"),
})
"""


def serve(site: Path) -> http.server.ThreadingHTTPServer:
    extra = {"/_bench/bench.html": BENCH_PAGE.encode(), "/_bench/bench_jobs.py": BENCH_JOBS.encode()}

    class Handler(site_build.SiteHandler):
        quiet = True

        extra_roots = (str(HARNESS_PAGES),)

        def translate_path(self, path: str) -> str:
            # The test harness (harness.html, harness_worker.js) is served under /_test/.
            if path.split("?")[0].startswith("/_test/harness"):
                return str(HARNESS_PAGES / path.split("?")[0].rsplit("/", 1)[1])
            return super().translate_path(path)

        def do_GET(self) -> None:
            body = extra.get(self.path.split("?")[0])
            if body is None:
                return super().do_GET()
            self.send_response(200)
            self.send_header("Content-Type", self.guess_type(self.path.split("?")[0]))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(site))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def launch(profile: str) -> Any:
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download a driver/browser
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--proxy-server=http://127.0.0.1:9",  # non-loopback traffic: nowhere
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_script_timeout(600)
    return driver


def wait_for(driver: Any, expr: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(f"return {expr}")
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {expr}")
        time.sleep(0.02)


# worker.js's start phases (the "ready" status's detail.phases), in the order they end;
# each is reported as the time since the one before it. sqliteLoaded runs in parallel.
PHASES = [
    ("pageScript", "page: navigation -> the page's script runs (durably.js loaded)"),
    ("workerLoaded", "worker.js + pyodide.mjs + sqlite_bridge.js evaluated"),
    ("startReceived", "the start message reaches the worker"),
    ("pyodideLoaded", "loadPyodide() (wasm + Python start-up, or its memory snapshot restored)"),
    ("wheelsLoaded", "loadPackage(durably-web and its wheels)"),
    ("durablyImported", "job modules fetched + import durably_web.browser"),
    ("jobsImported", "job modules imported (preload)"),
    ("leading", "the leader lock"),
    ("databaseOpened", "sqlite3 ready + OPFS pool installed + database opened"),
    ("runtimeStarted", "Durably created + init (migrations, recovery, worker loop)"),
    ("ready", "storageInfo + ready"),
    ("resolved", "page: create() resolved"),
]


def page_ready(driver: Any, url: str) -> tuple[float, float, dict[str, float]]:
    """(navigation -> create() resolved, ms spent in opfs-wait status, phase ends) for one page load."""
    driver.get(url)
    state = wait_for(driver, "window.bench && (bench.readyMs || bench.error) && bench")
    if state.get("error"):
        raise SystemExit(f"DurablyWeb.create() failed: {state['error']}")
    waits = [t for t, name in state["status"] if "wait" in str(name)]
    waited = (max(waits) - min(waits)) if waits else 0.0
    phases = {**(state.get("phases") or {}), "pageScript": state["pageScript"], "resolved": state["readyMs"]}
    return float(state["readyMs"]), waited, phases


def phase_table(loads: list[dict[str, float]]) -> list[tuple[str, str, float, float]]:
    """(phase, what, median ms since the previous phase, median ms since navigation)."""
    rows = []
    previous = None
    for name, what in PHASES:
        ends = [load[name] for load in loads if name in load]
        if not ends:
            continue
        spans = [load[name] - (load[previous] if previous else 0.0) for load in loads if name in load]
        rows.append((name, what, statistics.median(spans), statistics.median(ends)))
        previous = name
    sqlite = [load["sqliteLoaded"] for load in loads if "sqliteLoaded" in load]
    if sqlite:
        what = "(in parallel) sqlite3.wasm compiled, since navigation"
        rows.append(("sqliteLoaded", what, 0.0, statistics.median(sqlite)))
    return rows


def api_per_step(driver: Any, n: int, repeat: int) -> float:
    """(triggerAndWait(N steps) - triggerAndWait(0 steps)) / N, timed in the page."""
    result = driver.execute_async_script(
        """
        const [n, repeat, done] = arguments;
        const d = bench.durably;
        const timed = async (steps) => {
          const t = performance.now();
          const run = await d.triggerAndWait("noop-steps", {steps}, {timeout: 300000});
          if (run.status !== "completed") throw new Error(JSON.stringify(run));
          return performance.now() - t;
        };
        (async () => {
          await timed(50);
          const per = [];
          for (let i = 0; i < repeat; i++) {
            const empty = await timed(0);
            per.push((await timed(n) - empty) / n);
          }
          per.sort((a, b) => a - b);
          done({ok: true, ms: per[Math.floor(per.length / 2)]});
        })().catch((e) => done({ok: false, error: String(e && e.stack || e)}));
        """,
        n,
        repeat,
    )
    if not result["ok"]:
        raise SystemExit(f"API benchmark failed: {result['error']}")
    return float(result["ms"])


def harness_bench(driver: Any, base: str, storage: str, n: int, repeat: int) -> dict[str, Any]:
    driver.get(base + "_test/harness.html")
    wait_for(driver, "window.harnessReady === true")
    code = (
        WORKER_BENCH.replace("__N__", str(n))
        .replace("__REPEAT__", str(repeat))
        .replace("__STORAGE__", repr(storage))
    )
    reply = driver.execute_async_script(
        """
        const [code, done] = arguments;
        (async () => {
          const init = await harness.call("init", {packages: ["durably-web"]});
          const r = JSON.parse(await harness.call("run", {code}));
          r.harness_init_ms = init.workerStartToReadyMs;
          return JSON.stringify(r);
        })().then((r) => done({ok: true, r}), (e) => done({ok: false, error: String(e && e.stack || e)}));
        """,
        code,
    )
    if not reply["ok"]:
        raise SystemExit(f"worker benchmark failed:\n{reply['error']}")
    return json.loads(reply["r"])


def offline_bench(reloads: int) -> dict[str, list[float]]:
    """create({offline: true}): visit with the server up until the service worker controls
    the page (its precache complete), stop the server, then time ``reloads`` loads."""
    server = serve(site_build.SITE)  # its own origin, so its own service worker
    url = f"http://127.0.0.1:{server.server_address[1]}/_bench/bench.html?storage=opfs&offline=1"
    profile = tempfile.mkdtemp(prefix="durably-bench-")
    driver = launch(profile)
    try:
        page_ready(driver, url)
        deadline = time.monotonic() + 120
        while not driver.execute_script("return navigator.serviceWorker.controller !== null"):
            if time.monotonic() > deadline:
                raise SystemExit("the service worker never took control of the page")
            time.sleep(0.5)
            page_ready(driver, url)
        server.shutdown()
        server.server_close()
        ready, first = [], []
        for _ in range(reloads):
            ready.append(page_ready(driver, url)[0])
            first.append(float(driver.execute_script("return bench.firstRunMs")))
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    return {"ready": ready, "first_run": first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3, help="per-step / floor repetitions (median)")
    parser.add_argument("--reloads", type=int, default=5, help="warm-cache page loads (median)")
    parser.add_argument("--no-build", action="store_true", help="reuse site/ as it is")
    parser.add_argument("--storages", default="opfs,memory", help="comma-separated (default opfs,memory)")
    parser.add_argument("--ready-only", action="store_true", help="only the warm-reload ready times")
    parser.add_argument("--no-offline", action="store_true", help="skip the offline (service worker) loads")
    args = parser.parse_args()
    for path in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(path):
            raise SystemExit(f"{path} is missing (apt-get install -y chromium chromium-driver)")
    if not args.no_build:
        subprocess.run([sys.executable, str(ROOT / "build.py"), "build"], cwd=ROOT, check=True)
    server = serve(site_build.SITE)
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    rows: dict[str, dict[str, Any]] = {}
    for storage in args.storages.split(","):
        profile = tempfile.mkdtemp(prefix="durably-bench-")
        driver = launch(profile)
        try:
            url = f"{base}_bench/bench.html?storage={storage}"
            cold = page_ready(driver, url)[0]  # fills the HTTP cache
            loads = [page_ready(driver, url) for _ in range(args.reloads)]
            warm = [ready for ready, _, _ in loads]
            waited = [w for _, w, _ in loads]
            phases = [p for _, _, p in loads]
            if args.ready_only:
                worker: dict[str, Any] = {
                    "per_step_ms": float("nan"),
                    "floor_ms": float("nan"),
                    "floor3_ms": float("nan"),
                    "harness_init_ms": float("nan"),
                    "journal": "-",
                    "locking": "-",
                }
                api = float("nan")
            else:
                api = api_per_step(driver, args.steps, args.repeat)
                worker = harness_bench(driver, base, storage, args.steps, args.repeat)
        finally:
            driver.quit()
            shutil.rmtree(profile, ignore_errors=True)
        rows[storage] = {
            "cold": cold,
            "warm": warm,
            "opfs_wait": waited,
            "phases": phases,
            "api": api,
            **worker,
        }
    server.shutdown()
    offline = None if args.no_offline or args.ready_only else offline_bench(args.reloads)

    version = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True).stdout.strip()
    print(
        f"\ndurably-web browser benchmark: {version}, N={args.steps} no-op steps, "
        f"median of {args.repeat} (per-step/floor) and {args.reloads} warm reloads (ready)\n"
    )
    header = (
        f"{'storage':<8} {'ready warm ms':>22} {'first load':>10} {'pyodide':>8} {'per-step ms':>11} "
        f"{'via API':>8} {'floor ms':>9} {'3-call tx':>9} {'ratio':>6}  journal"
    )
    print(header)
    print("-" * len(header))
    for storage, r in rows.items():
        warm = r["warm"]
        ready = f"{statistics.median(warm):.0f} ({min(warm):.0f}-{max(warm):.0f})"
        ratio = r["per_step_ms"] / r["floor_ms"]
        journal = f"{r['journal']}/{r['locking']}" if storage == "opfs" else r["journal"]
        print(
            f"{storage:<8} {ready:>22} {r['cold']:>10.0f} {r['harness_init_ms']:>8.0f} "
            f"{r['per_step_ms']:>11.3f} {r['api']:>8.3f} "
            f"{r['floor_ms']:>9.3f} {r['floor3_ms']:>9.3f} {ratio:>5.2f}x  {journal}"
        )
    print(
        "\nready: navigation -> DurablyWeb.create() resolved; pyodide: harness worker start -> Pyodide"
        " + durably-web wheels loaded (warm cache);\nper-step: in the worker; via API: triggerAndWait"
        " from the page"
    )
    for storage, r in rows.items():
        print(f"\nwhere the warm start goes ({storage}; medians of {args.reloads} reloads):")
        print(f"  {'phase':<16} {'ms':>7} {'ends at':>8}  what")
        for name, what, span, end in phase_table(r["phases"]):
            span_text = "" if name == "sqliteLoaded" else f"{span:7.0f}"
            print(f"  {name:<16} {span_text:>7} {end:8.0f}  {what}")
    if offline is None:
        print(json.dumps(rows))
        return
    sw, first = offline["ready"], offline["first_run"]
    print(
        f"\noffline: true, opfs, server stopped: ready {statistics.median(sw):.0f} ms"
        f" ({min(sw):.0f}-{max(sw):.0f}), vs warm HTTP cache {statistics.median(rows['opfs']['warm']):.0f} ms"
        f" (ratio {statistics.median(sw) / statistics.median(rows['opfs']['warm']):.2f}x);"
        f" first run after the load {statistics.median(first):.0f} ms ({min(first):.0f}-{max(first):.0f})"
        " vs the 1000 ms polling interval"
    )
    print("targets: ready < 3000 ms warm; per-step <= 3x floor (autocommit INSERT through the bridge)")
    print(json.dumps({**rows, "offline": offline}))


if __name__ == "__main__":
    main()
