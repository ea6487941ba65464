"""Real-Chromium proof of the browser runtime: Pyodide + wheels from site/ + OPFS SQLite.

Driven with Selenium and Debian's /usr/bin/chromedriver (the driver that matches
/usr/bin/chromium, both from apt). Selenium was picked over Playwright because
it needs no browser download of its own (Playwright's Python package ships a
Node driver pinned to its own Chromium build and only tolerates a system
browser via executable_path), and because pytest-pyodide's "chrome" runtime is
Selenium too, so both use the same dependency and the same driver.

Network guard, two layers:
* Chromium runs with --proxy-server pointing at a trap on 127.0.0.1 that
  records and refuses every request; loopback bypasses proxies, so only
  requests leaving 127.0.0.1 (from the page, its workers or the browser itself)
  reach the trap;
* the DevTools performance log, with the "devtools.timeline" trace category:
  its Network.* events cover the page only, but the trace's ResourceSendRequest
  events also list every fetch and module import of the dedicated worker
  (checked: the test asserts pyodide.asm.wasm and the wheels show up).

Chromium's own background services (update checks, sign-in, the default
search engine's preconnect) also try to go out through the proxy even with the
--disable-* flags; those few exact hosts are tolerated in the trap (never in
the page's log), everything else fails the test.

Without CI set, a Chromium that cannot start skips the test; with CI=1 it fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Load the repo-root build.py under its own name: "build" is also a PyPI package.
_spec = importlib.util.spec_from_file_location("durably_site_build", ROOT / "build.py")
assert _spec is not None and _spec.loader is not None
site_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(site_build)

CHROMIUM = os.environ.get("DURABLY_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("DURABLY_CHROMEDRIVER", "/usr/bin/chromedriver")
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")

pytestmark = pytest.mark.browser

# Browser-internal traffic seen from Debian's chromium 156 despite the flags below.
CHROMIUM_BACKGROUND_HOSTS = {
    "accounts.google.com",
    "clients2.google.com",
    "optimizationguide-pa.googleapis.com",
    "safebrowsing.googleapis.com",
    "start.duckduckgo.com",
    "update.googleapis.com",
}


# -- fixtures ---------------------------------------------------------------------


class _Trap(BaseHTTPRequestHandler):
    hits: list[str] = []

    def _refuse(self) -> None:
        self.hits.append(f"{self.command} {self.path}")
        self.send_error(502, "durably-web test: outside network is forbidden")

    do_GET = do_POST = do_HEAD = do_PUT = do_OPTIONS = do_CONNECT = _refuse

    def log_message(self, *args: Any) -> None:
        pass


def _serve(server: ThreadingHTTPServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def site_url() -> Iterator[tuple[str, list[str]]]:
    if os.environ.get("DURABLY_SKIP_SITE_BUILD") != "1":
        subprocess.run([sys.executable, str(ROOT / "build.py"), "build"], cwd=ROOT, check=True)
    requests: list[str] = []
    server = site_build.make_server(site_build.SITE, 0, quiet=True, request_log=requests)
    _serve(server)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", requests
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def trap() -> Iterator[tuple[int, list[str]]]:
    hits: list[str] = []
    handler = type("Trap", (_Trap,), {"hits": hits})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    _serve(server)
    try:
        yield server.server_address[1], hits
    finally:
        server.shutdown()
        server.server_close()


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"Chromium is required under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def driver(trap: tuple[int, list[str]]) -> Iterator[Any]:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        _unavailable(f"selenium is not installed: {exc}")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(path):
            _unavailable(f"{path} is missing (apt-get install -y chromium chromium-driver)")
    profile = tempfile.mkdtemp(prefix="durably-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--disable-features=NetworkTimeServiceQuerying,OptimizationHints,MediaRouter,Translate",
        "--disable-domain-reliability",
        "--no-pings",
        f"--proxy-server=http://127.0.0.1:{trap[0]}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    options.add_experimental_option(
        "perfLoggingPrefs",
        {"enableNetwork": True, "enablePage": False, "traceCategories": "devtools.timeline"},
    )
    try:
        drv = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    except Exception as exc:
        shutil.rmtree(profile, ignore_errors=True)
        _unavailable(f"Chromium did not start: {exc}")
    drv.set_script_timeout(120)
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


# -- helpers ----------------------------------------------------------------------


def call(drv: Any, cmd: str, **args: Any) -> Any:
    """harness.call(cmd, args) in the page, raising on a worker-side error."""
    reply = drv.execute_async_script(
        """
        const [cmd, args, done] = arguments;
        const t0 = performance.now();
        harness.call(cmd, args).then(
          (result) => done({ok: true, result, pageMs: performance.now() - t0}),
          (e) => done({ok: false, error: String(e && e.stack || e)}));
        """,
        cmd,
        args,
    )
    if not reply["ok"]:
        raise AssertionError(f"worker {cmd} failed:\n{reply['error']}")
    return reply["result"]


def run_py(drv: Any, code: str) -> Any:
    """Run Python in the worker; the code's last expression is json.dumps(...)."""
    return json.loads(call(drv, "run", code=code))


def open_harness(drv: Any, url: str) -> dict[str, Any]:
    drv.get(url + "harness.html")
    _wait_ready(drv)
    return _init(drv)


def _wait_ready(drv: Any) -> None:
    deadline = time.monotonic() + 30
    while not drv.execute_script("return window.harnessReady === true"):
        if time.monotonic() > deadline:
            raise AssertionError("harness.html did not become ready")
        time.sleep(0.05)


def _init(drv: Any) -> dict[str, Any]:
    timings = call(drv, "init", packages=["durably-web"])
    timings["navToReadyMs"] = drv.execute_script("return performance.now()")
    return timings


def _trap_host(hit: str) -> str:
    """Host of a trap log line: 'CONNECT host:443' or 'GET http://host/path'."""
    target = hit.split(" ", 1)[1]
    if "://" in target:
        target = target.split("://", 1)[1]
    return target.split("/", 1)[0].rsplit(":", 1)[0]


def network_urls(drv: Any) -> list[str]:
    """URLs requested since the last call, by the page (Network.*) and its workers (trace)."""
    urls = []
    for entry in drv.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        method, params = message.get("method"), message.get("params", {})
        if method == "Network.requestWillBeSent":
            urls.append(params["request"]["url"])
        elif method == "Tracing.dataCollected" and params.get("name") == "ResourceSendRequest":
            urls.append(params["args"]["data"]["url"])
    return urls


# -- Python that runs inside the worker ----------------------------------------------

WRITE_PHASE = r"""
import json
from pydantic import BaseModel, Field, ValidationError
from durably_web.storage.sqlite.wasm_connection import (
    WasmSqlConnection, WasmSqliteError, WasmSqliteUniqueError)

class Order(BaseModel):
    id: int
    item: str = Field(min_length=1)

order = Order.model_validate({"id": "7", "item": "tea"})
assert order.id == 7
try:
    Order.model_validate({"id": "x", "item": ""})
    raise AssertionError("pydantic accepted bad input")
except ValidationError as exc:
    pydantic_errors = len(exc.errors())

waits = []
conn = await WasmSqlConnection.open("/smoke.db", storage="opfs", on_wait=waits.append)
info = conn.info()
conn.execute_script('''
    CREATE TABLE IF NOT EXISTS item(
        id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, price REAL, data BLOB, big INTEGER);
    DELETE FROM item;
''')
assert conn.execute("INSERT INTO item(name, price, data, big) VALUES (:n, :p, :d, :b)",
                    {"n": "autocommit-1", "p": 1.0, "d": b"\x00\xffbytes", "b": 2**62}) == 1
assert conn.execute("INSERT INTO item(name, price) VALUES (:n, :p)", {"n": "autocommit-2", "p": 2.5}) == 1
assert not conn.in_transaction
with conn.transaction():
    assert conn.in_transaction
    for i in range(3):
        conn.execute("INSERT INTO item(name) VALUES (:n)", {"n": f"tx-{i}"})
try:
    with conn.transaction():
        conn.execute("INSERT INTO item(name) VALUES (:n)", {"n": "rolled-back"})
        raise RuntimeError("boom")
except RuntimeError:
    pass
assert not conn.in_transaction
try:
    conn.execute("INSERT INTO item(name) VALUES (:n)", {"n": "tx-0"})
    raise AssertionError("duplicate accepted")
except WasmSqliteUniqueError as exc:
    unique = {"code": exc.code, "name": exc.name, "message": exc.message,
              "is_unique": exc.is_unique_violation}
try:
    conn.fetch_all("SELECT nope FROM item")
    raise AssertionError("bad column accepted")
except WasmSqliteError as exc:
    syntax = {"code": exc.code, "message": exc.message,
              "unique": isinstance(exc, WasmSqliteUniqueError)}
try:
    conn.execute("INSERT INTO item(name) VALUES (:n)", {})
    raise AssertionError("missing parameter accepted")
except WasmSqliteError as exc:
    missing = exc.message
row = conn.fetch_one("SELECT name, price, data, big FROM item WHERE name = :n", {"n": "autocommit-1"})
none = conn.fetch_one("SELECT name FROM item WHERE name = :n", {"n": "absent"})
names = [r["name"] for r in conn.fetch_all("SELECT name FROM item ORDER BY id")]
conn.close()
json.dumps({"pydantic_errors": pydantic_errors, "info": info, "unique": unique, "syntax": syntax,
            "missing": missing,
            "row": {**row, "data": row["data"].hex(), "price_type": type(row["price"]).__name__},
            "none": none, "names": names, "waits": len(waits)})
"""

READ_PHASE = r"""
import json
from durably_web.storage.sqlite.wasm_connection import WasmSqlConnection
waits = []
conn = await WasmSqlConnection.open("/smoke.db", storage="opfs", on_wait=waits.append)
names = [r["name"] for r in conn.fetch_all("SELECT name FROM item ORDER BY id")]
row = conn.fetch_one("SELECT data, big, price FROM item WHERE name = 'autocommit-1'")
info = conn.info()
conn.close()
json.dumps({"names": names, "data": row["data"].hex(), "big": row["big"], "price": row["price"],
            "waits": len(waits), "info": info})
"""

EXPECTED_NAMES = ["autocommit-1", "autocommit-2", "tx-0", "tx-1", "tx-2"]


def test_pyodide_pydantic_and_opfs_sqlite_survive_reload(driver: Any, site_url: Any, trap: Any) -> None:
    url, served = site_url
    first = open_harness(driver, url)
    wrote = run_py(driver, WRITE_PHASE)
    urls = network_urls(driver)

    assert wrote["pydantic_errors"] == 2
    assert wrote["info"]["storage"] == "opfs"
    assert wrote["info"]["vfs"].startswith("opfs-sahpool")
    assert wrote["names"] == EXPECTED_NAMES
    assert wrote["unique"] == {
        "code": 2067,
        "name": "SQLITE_CONSTRAINT_UNIQUE",
        "message": "UNIQUE constraint failed: item.name",
        "is_unique": True,
    }
    assert wrote["syntax"]["code"] == 1 and "no such column" in wrote["syntax"]["message"]
    assert not wrote["syntax"]["unique"]
    assert "binding parameter :n" in wrote["missing"]
    assert wrote["row"] == {
        "name": "autocommit-1",
        "price": 1.0,
        "price_type": "float",
        "data": "00ff6279746573",
        "big": 2**62,
    }
    assert wrote["none"] is None

    # Reload: a new worker, a new Pyodide, the same OPFS files (Chromium may still
    # hold the old worker's access handles for a moment; the bridge waits).
    driver.refresh()
    _wait_ready(driver)
    second = _init(driver)
    read = run_py(driver, READ_PHASE)
    assert read["names"] == EXPECTED_NAMES
    assert read["data"] == "00ff6279746573" and read["big"] == 2**62 and read["price"] == 1.0

    urls += network_urls(driver)
    # Network schemes only: chrome:// (the initial new-tab page), data: and blob: never leave the browser.
    outside = [u for u in urls if u.startswith(("http:", "https:", "ws:", "wss:")) and not u.startswith(url)]
    assert outside == [], f"requests outside 127.0.0.1: {outside}"
    leaked = [hit for hit in trap[1] if _trap_host(hit) not in CHROMIUM_BACKGROUND_HOSTS]
    assert leaked == [], f"requests reached the outside-network trap: {leaked}"
    # The performance log must really see the worker's fetches, or the check above is hollow.
    assert any(u.endswith("pyodide.asm.wasm") for u in urls), [u for u in urls if u.startswith("http")]
    assert any(u.endswith(".whl") for u in urls), urls
    assert any(p.endswith(".whl") for p in served)

    status = driver.execute_script("return window.harnessStatus")
    print(
        "\nfirst load:",
        {k: round(v) if isinstance(v, float) else v for k, v in first.items()},
        "\nreload:",
        {k: round(v) if isinstance(v, float) else v for k, v in second.items()},
        "\npool after reload:",
        read["info"]["poolWaitMs"],
        "ms,",
        read["info"]["poolAttempts"],
        "attempt(s); opfs-wait events:",
        [s for s in status if s.get("event") == "opfs-wait"],
    )


CONTENTION = r"""
const done = arguments[arguments.length - 1];
function rpc(worker) {
  let next = 0;
  const pending = new Map(), events = [];
  worker.onmessage = (e) => {
    const m = e.data;
    if (m.type === "status") { events.push(m); return; }
    const p = pending.get(m.id);
    pending.delete(m.id);
    m.ok ? p.resolve(m.result) : p.reject(new Error(m.error));
  };
  return {events, call: (cmd, args = {}) => new Promise((resolve, reject) => {
    const id = ++next;
    pending.set(id, {resolve, reject});
    worker.postMessage({id, cmd, ...args});
  })};
}
const OPEN = "from durably_web.storage.sqlite.wasm_connection import WasmSqlConnection\n" +
  "waits = []\n" +
  "conn = await WasmSqlConnection.open('/contended.db', directory='.contended', on_wait=waits.append)\n";
(async () => {
  const holder = new Worker("./durably_worker.js", {type: "module"});
  const A = rpc(holder);
  await A.call("init", {packages: ["durably-web"]});
  await A.call("run", {code: OPEN +
    "conn.execute_script('CREATE TABLE IF NOT EXISTS t(x); INSERT INTO t VALUES (42)')\n'held'"});
  const B = rpc(new Worker("./durably_worker.js", {type: "module"}));
  await B.call("init", {packages: ["durably-web"]});
  const t0 = performance.now();
  const result = B.call("run", {code: "import json\n" + OPEN +
    "json.dumps({'x': conn.fetch_one('SELECT x FROM t')['x'], 'waits': len(waits)})"});
  setTimeout(() => holder.terminate(), 1500);  // the "previous page" goes away
  const r = JSON.parse(await result);
  done({ok: true, r, events: B.events.filter((m) => m.event === "opfs-wait"),
        ms: performance.now() - t0});
})().catch((e) => done({ok: false, error: String(e && e.stack || e)}));
"""


def test_pool_install_waits_for_the_previous_holder(driver: Any, site_url: Any) -> None:
    """A second worker retries (with backoff, reporting each wait) until the first lets go."""
    url, _ = site_url
    driver.get(url + "harness.html")
    _wait_ready(driver)
    reply = driver.execute_async_script(CONTENTION)
    assert reply["ok"], reply.get("error")
    assert reply["r"]["x"] == 42
    assert reply["r"]["waits"] >= 1  # the Python on_wait callback saw the waits
    assert len(reply["events"]) == reply["r"]["waits"]  # and so did the page
    delays = [e["delayMs"] for e in reply["events"]]
    assert delays == sorted(delays) and delays[0] < delays[-1]  # backoff
    assert reply["ms"] >= 1400
    print(f"\nsecond worker waited {reply['ms']:.0f} ms, retries at {delays} ms")


BENCH = r"""
import json, time
from durably_web.storage.sqlite.wasm_connection import WasmSqlConnection
N = 1000
results = {}

async def bench(label, **kw):
    conn = await WasmSqlConnection.open(**kw)
    conn.execute_script(
        "DROP TABLE IF EXISTS b;"
        "CREATE TABLE b(id INTEGER PRIMARY KEY, run TEXT, n INTEGER, payload TEXT)")
    payload = "x" * 200
    sql = "INSERT INTO b(run, n, payload) VALUES (:run, :n, :payload)"
    for i in range(100):  # warm up the JIT, the statement cache and the pool files
        conn.execute(sql, {"run": "warm", "n": -i, "payload": payload})
    t = time.perf_counter()
    for i in range(N):
        conn.execute(sql, {"run": "r", "n": i, "payload": payload})
    autocommit = (time.perf_counter() - t) / N
    t = time.perf_counter()
    with conn.transaction():
        for i in range(N):
            conn.execute(sql, {"run": "t", "n": i, "payload": payload})
    in_tx = (time.perf_counter() - t) / N
    t = time.perf_counter()
    for i in range(N):
        conn.fetch_one("SELECT n FROM b WHERE id = :id", {"id": i + 1})
    select = (time.perf_counter() - t) / N
    info = conn.info()
    conn.close()
    results[label] = {"autocommit_insert_us": round(autocommit * 1e6, 1),
                      "insert_in_tx_us": round(in_tx * 1e6, 1),
                      "select_one_us": round(select * 1e6, 1),
                      "journal": info["journalMode"], "locking": info["lockingMode"]}

await bench("memory", storage="memory", filename=":memory:")
await bench("opfs delete (default)", storage="opfs", filename="/bench-delete.db", pool_capacity=24)
await bench("opfs truncate", storage="opfs", filename="/bench-truncate.db", journal_mode="truncate")
await bench("opfs persist", storage="opfs", filename="/bench-persist.db", journal_mode="persist")
await bench("opfs wal+exclusive", storage="opfs", filename="/bench-wal.db", journal_mode="wal")
await bench("opfs delete+exclusive", storage="opfs", filename="/bench-delx.db", locking_mode="exclusive")
await bench("opfs delete sync=normal", storage="opfs", filename="/bench-deln.db", synchronous="normal")
await bench("memory (again, warm)", storage="memory", filename=":memory:")

# Which journal modes does opfs-sahpool accept with the default (normal) locking mode?
probe = await WasmSqlConnection.open("/bench-probe.db", storage="opfs")
accepted = {}
for mode in ("wal", "truncate", "persist", "memory", "off", "delete"):
    accepted[mode] = probe.fetch_one(f"PRAGMA journal_mode={mode}")["journal_mode"]
probe.close()
results["journal_mode probe (normal locking)"] = accepted

# Bridge floor: one FFI crossing that does no I/O.
conn = await WasmSqlConnection.open(":memory:", storage="memory")
t = time.perf_counter()
for i in range(2000):
    conn.fetch_one("SELECT :x AS x", {"x": i})
results["ffi select :x (memory)"] = round((time.perf_counter() - t) / 2000 * 1e6, 1)
conn.close()
json.dumps(results)
"""


@pytest.mark.slow
def test_bridge_benchmark(driver: Any, site_url: Any) -> None:
    url, _ = site_url
    open_harness(driver, url)
    results = run_py(driver, BENCH)
    print("\n" + json.dumps(results, indent=1))
    assert results["opfs wal+exclusive"]["journal"] == "wal"
