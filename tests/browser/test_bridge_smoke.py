"""Real-Chromium proof of the browser runtime: Pyodide + wheels from site/ + OPFS SQLite.

The fixtures (the built site, the outside-network trap, Chromium with Debian's
chromedriver, the network guard) live in conftest.py, which explains them.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from pagekit import harness_call, run_py

pytestmark = pytest.mark.browser


# -- helpers ----------------------------------------------------------------------


def open_harness(drv: Any, url: str) -> dict[str, Any]:
    drv.get(url + "_test/harness.html")
    _wait_ready(drv)
    return _init(drv)


def _wait_ready(drv: Any) -> None:
    deadline = time.monotonic() + 30
    while not drv.execute_script("return window.harnessReady === true"):
        if time.monotonic() > deadline:
            raise AssertionError("harness.html did not become ready")
        time.sleep(0.05)


def _init(drv: Any) -> dict[str, Any]:
    timings = harness_call(drv, "init", packages=["durably-web"])
    timings["navToReadyMs"] = drv.execute_script("return performance.now()")
    return timings


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


def test_pyodide_pydantic_and_opfs_sqlite_survive_reload(
    driver: Any, site_url: Any, network_guard: Any
) -> None:
    url, served = site_url
    first = open_harness(driver, url)
    wrote = run_py(driver, WRITE_PHASE)
    urls = network_guard.urls(driver)

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

    urls += network_guard.urls(driver)
    network_guard.check(urls, url)
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
  const holder = new Worker("./harness_worker.js", {type: "module"});
  const A = rpc(holder);
  await A.call("init", {packages: ["durably-web"]});
  await A.call("run", {code: OPEN +
    "conn.execute_script('CREATE TABLE IF NOT EXISTS t(x); INSERT INTO t VALUES (42)')\n'held'"});
  const B = rpc(new Worker("./harness_worker.js", {type: "module"}));
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
    driver.get(url + "_test/harness.html")
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


VALUES_ROUND_TRIP = r"""
import json
from durably_web.storage.sqlite.wasm_connection import WasmSqlConnection

texts = ["", "plain", "é ü ß", "日本語", "emoji 🎉👍🏽", "nul\x00inside", "x" * 5000,
         "é" * 100_000,      # 200 KB of UTF-8: the text buffer grows
         "🎉" * 300_000]     # 1.2 MB: bound from an allocation of its own
ints = [0, 1, -1, 2**31 - 1, 2**31, -2**31, -2**31 - 1, 2**53 - 1, -(2**53 - 1), 2**53, 2**62,
        -2**63, 2**63 - 1]
reals = [1.5, -0.25, 2.0, 0.0, 1e300, float("inf"), float("-inf")]
others = [True, False, None, b"", b"\x00\xffbytes"]
conn = await WasmSqlConnection.open(":memory:", storage="memory")
conn.execute_script("CREATE TABLE v(id INTEGER PRIMARY KEY, x); CREATE TABLE m(a, b, c, n)")
back = []
for value in texts + ints + reals + others:
    conn.execute("DELETE FROM v")
    conn.execute("INSERT INTO v(id, x) VALUES (1, :x)", {"x": value})
    row = conn.fetch_one("SELECT x, typeof(x) AS t FROM v WHERE id = 1")
    back.append([row["x"] == value and type(row["x"]) is type(value if not isinstance(value, bool) else 1),
                 row["t"], repr(value)[:40]])
# Several texts in one statement, each bound while the others are already bound.
conn.execute("INSERT INTO m VALUES (:a, :b, :c, :n)", {"a": "first", "b": "é" * 3000, "c": "third", "n": 7})
several = conn.fetch_one("SELECT a, b, c, n FROM m")
conn.close()
json.dumps({"back": back, "several": [several["a"], len(several["b"]), several["b"] == "é" * 3000,
                                      several["c"], several["n"]]})
"""


def test_every_kind_of_value_round_trips_through_the_bridge(driver: Any, site_url: Any) -> None:
    url, _ = site_url
    open_harness(driver, url)
    result = run_py(driver, VALUES_ROUND_TRIP)
    assert [ok for ok, _, _ in result["back"]] == [True] * len(result["back"]), result["back"]
    types = [t for _, t, _ in result["back"]]
    others = ["integer", "integer", "null", "blob", "blob"]
    assert types == ["text"] * 9 + ["integer"] * 13 + ["real"] * 7 + others
    assert result["several"] == ["first", 3000, True, "third", 7]
