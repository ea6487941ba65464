"""storage "idb" in real headless Chromium: SQLite in memory, every commit in IndexedDB.

Drives the test harness (tests/browser/pages/harness.html + harness_worker.js); the
fixtures (site, network trap, Chromium with a fresh profile per module) come
from conftest.py. See the "storage idb" section of static/sqlite_bridge.js.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from pagekit import harness_call, run_py

pytestmark = pytest.mark.browser


# -- helpers ---------------------------------------------------------------------------


def load_harness(drv: Any, url: str | None = None) -> None:
    """Open (or, without url, reload) harness.html and load durably-web in its worker."""
    if url is None:
        drv.refresh()
    else:
        drv.get(url + "_test/harness.html")
    deadline = time.monotonic() + 30
    while not drv.execute_script("return window.harnessReady === true"):
        assert time.monotonic() < deadline, "harness.html did not become ready"
        time.sleep(0.05)
    harness_call(drv, "init", packages=["durably-web"])


# Python shared by the phases below: a dump of every table, to compare the live
# database with the one rebuilt from IndexedDB (snapshot + replayed log).
DUMP = r"""
import json, os
import js
from durably_web.storage.sqlite.wasm_connection import WasmSqlConnection, WasmSqliteError
from durably_web.errors import StorageError

def dump(conn):
    tables = [r["name"] for r in conn.fetch_all(
        "SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")]
    out = {}
    for t in tables:
        rows = conn.fetch_all(f'SELECT * FROM "{t}" ORDER BY rowid')
        out[t] = [{k: (v.hex() if isinstance(v, bytes) else v) for k, v in r.items()} for r in rows]
    return out
"""


# -- 1. rows survive a reload ---------------------------------------------------------------

WRITE_ROWS = (
    DUMP
    + r"""
conn = await WasmSqlConnection.open("/rows.db", storage="idb")
assert getattr(conn, "wait_durable", None) is not None
conn.execute("PRAGMA foreign_keys = ON")  # must be replayed, or the cascade below diverges
conn.execute_script('''
    CREATE TABLE parent(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,
                        price REAL, data BLOB, big INTEGER);
    CREATE TABLE child(id INTEGER PRIMARY KEY,
                       parent INTEGER NOT NULL REFERENCES parent(id) ON DELETE CASCADE, note TEXT);
''')
conn.execute("INSERT INTO parent(name, price, data, big) VALUES (:n, :p, :d, :b)",
             {"n": "autocommit", "p": 1.0, "d": b"\x00\xffbytes", "b": 2**62})
with conn.transaction():
    for i in range(3):
        conn.execute("INSERT INTO parent(name, price) VALUES (:n, :p)", {"n": f"tx-{i}", "p": i + 0.5})
        conn.execute("INSERT INTO child(parent, note) VALUES (last_insert_rowid(), :note)",
                     {"note": f"child of tx-{i}"})
try:
    with conn.transaction():
        conn.execute("INSERT INTO parent(name) VALUES ('rolled-back')")
        raise RuntimeError("boom")
except RuntimeError:
    pass
try:
    conn.execute("INSERT INTO parent(name) VALUES ('tx-0')")
    raise AssertionError("duplicate accepted")
except WasmSqliteError:
    pass
# A write through fetch_one (RETURNING) is a write too.
returned = conn.fetch_one("UPDATE parent SET price = price * 10 WHERE name = :n RETURNING price",
                          {"n": "tx-1"})
conn.execute("DELETE FROM parent WHERE name = 'tx-2'")  # cascades to its child
await conn.wait_durable()
durable_info = conn.info()
# Written after the last wait_durable: only the write-behind flush stores it.
conn.execute("INSERT INTO parent(name) VALUES ('unawaited')")
import asyncio, time
# Wait for the write-behind flush itself (not a fixed budget: a loaded machine is slow);
# a flush that never comes still fails below, after 60 s.
deadline = time.monotonic() + 60
while json.loads(conn._bridge.info())["pending"] and time.monotonic() < deadline:
    await asyncio.sleep(0.02)
json.dumps({"dump": dump(conn), "returned": returned["price"], "durable_info": durable_info,
            "info": conn.info(), "children": conn.fetch_one("SELECT count(*) AS n FROM child")["n"]})
"""
)

REOPEN_ROWS = (
    DUMP
    + r"""
conn = await WasmSqlConnection.open("/rows.db", storage="idb")
first = {"dump": dump(conn), "info": conn.info(),
         "integrity": conn.fetch_one("PRAGMA integrity_check")["integrity_check"]}
conn.close()  # releases the Web Lock, or the next open would wait for it
# The open above replayed the log and checkpointed: this one starts from the snapshot.
# "auto" must pick the existing IndexedDB copy even though OPFS is available.
again = await WasmSqlConnection.open("/rows.db", storage="auto")
second = {"dump": dump(again), "info": again.info()}
again.close()
fresh = await WasmSqlConnection.open("/auto-fresh.db", storage="auto")
fresh_info = fresh.info()
fresh.close()
json.dumps({"first": first, "second": second, "fresh": fresh_info,
            "has_wait_durable": hasattr(fresh, "wait_durable")})
"""
)


def test_committed_rows_survive_reload(driver: Any, site_url: Any) -> None:
    url, _ = site_url
    load_harness(driver, url)
    wrote = run_py(driver, WRITE_ROWS)
    assert wrote["durable_info"]["storage"] == "idb" and wrote["durable_info"]["pending"] == 0
    assert wrote["info"]["pending"] == 0, "the write-behind flush did not store the unawaited commit"
    assert wrote["returned"] == 15.0
    assert wrote["children"] == 2
    names = [r["name"] for r in wrote["dump"]["parent"]]
    assert names == ["autocommit", "tx-0", "tx-1", "unawaited"]

    load_harness(driver)  # reload: a new worker, a new Pyodide, an empty in-memory SQLite
    read = run_py(driver, REOPEN_ROWS)
    first, second = read["first"], read["second"]
    assert first["integrity"] == "ok"
    assert first["info"]["replayed"] > 0 and first["info"]["snapshotBytes"] == 0
    # Exactly the same rows, rowids, types and bytes: the replay is deterministic.
    assert first["dump"] == wrote["dump"]
    assert second["info"]["storage"] == "idb" and second["info"]["requestedStorage"] == "auto"
    assert second["info"]["replayed"] == 0 and second["info"]["snapshotBytes"] > 0
    assert second["dump"] == wrote["dump"]
    assert read["fresh"]["storage"] == "opfs", read["fresh"]
    assert read["has_wait_durable"] is False  # an OPFS connection persists synchronously


# -- 2. a durably-web run, reloaded in the middle ---------------------------------------------

# Side effects are counted in an IndexedDB database of their own, written
# straight from the step (not through the bridge) and awaited before the step returns.
EFFECTS_JS = r"""
globalThis.effectsDb = () => new Promise((resolve, reject) => {
  const open = indexedDB.open("durably-test-effects", 1);
  open.onupgradeneeded = () => open.result.createObjectStore("effects");
  open.onsuccess = () => resolve(open.result);
  open.onerror = () => reject(open.error);
});
globalThis.recordEffect = async (name) => {
  const db = await effectsDb();
  await new Promise((resolve, reject) => {
    const tx = db.transaction("effects", "readwrite", {durability: "strict"});
    const store = tx.objectStore("effects");
    const get = store.get(name);
    get.onsuccess = () => store.put((get.result ?? 0) + 1, name);
    tx.oncomplete = resolve;
    tx.onabort = () => reject(tx.error);
  });
  db.close();
};
globalThis.readEffects = async () => {
  const db = await effectsDb();
  const result = await new Promise((resolve, reject) => {
    const store = db.transaction("effects").objectStore("effects");
    const keys = store.getAllKeys(), values = store.getAll();
    values.onsuccess = () => resolve(JSON.stringify(
      Object.fromEntries(keys.result.map((k, i) => [k, values.result[i]]))));
    values.onerror = () => reject(values.error);
  });
  db.close();
  return result;
};
"""

JOB = (
    DUMP
    + r"""
import asyncio, js
from pyodide.code import run_js
from durably_web import Durably, define_job
from durably_web.storage.sqlite.store import SQLiteStore

run_js(EFFECTS_JS)
N = 12

@define_job("reload-job")
async def reload_job(step, payload):
    total = 0
    for i in range(N):
        async def work(i=i):
            await js.recordEffect(f"step-{i}")
            await asyncio.sleep(0.15)
            return i * i
        total += await step.run(f"step-{i}", work)
        step.progress(i + 1, N)
    return {"total": total}

async def open_durably():
    conn = await WasmSqlConnection.open("/durably-run.db", storage="idb")
    return conn, Durably(SQLiteStore(conn), jobs=[reload_job], sole_worker=True, polling_interval=0.05)
"""
)

START_RUN = r"""
conn, durably = await open_durably()
await durably.init()
run = await durably.trigger("reload-job", {})
json.dumps(run.id)
"""

COMPLETED_STEPS = r"""
json.dumps(sum(s.status == "completed" for s in await durably.get_steps(RUN_ID)))
"""

RESUME_RUN = r"""
conn, durably = await open_durably()
# What IndexedDB gave back, before the engine touches anything.
durable_steps = [r["seq"] for r in conn.fetch_all(
    "SELECT seq FROM durably_steps WHERE run_id = :id AND status = 'completed' ORDER BY seq",
    {"id": RUN_ID})]
await durably.init()
run = await durably.wait_for_run(RUN_ID, timeout=60)
integrity = conn.fetch_one("PRAGMA integrity_check")["integrity_check"]
steps = [s.status for s in await durably.get_steps(RUN_ID)]
await durably.stop()
json.dumps({"durable_steps": durable_steps, "status": run.status, "output": run.output,
            "steps": steps, "integrity": integrity,
            "effects": json.loads(await js.readEffects())})
"""


def test_durably_run_resumes_after_reload(driver: Any, site_url: Any) -> None:
    url, _ = site_url
    load_harness(driver, url)
    setup = f"EFFECTS_JS = {EFFECTS_JS!r}\n" + JOB
    run_id = run_py(driver, setup + START_RUN)
    deadline = time.monotonic() + 60
    while (done := run_py(driver, f"RUN_ID = {run_id!r}\n" + COMPLETED_STEPS)) < 5:
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.05)
    load_harness(driver)  # reload mid-run: the worker dies wherever it was
    result = run_py(driver, setup + f"RUN_ID = {run_id!r}\n" + RESUME_RUN)

    n = 12
    assert result["status"] == "completed", result
    assert result["output"] == {"total": sum(i * i for i in range(n))}
    assert result["steps"] == ["completed"] * n
    assert result["integrity"] == "ok"
    durable = result["durable_steps"]
    # The engine awaits IndexedDB after each step before starting the next one,
    # so at most the last step seen in memory can have been lost with the page.
    assert durable == list(range(len(durable))) and len(durable) >= done - 1, (durable, done)
    effects = result["effects"]
    assert sorted(effects) == sorted(f"step-{i}" for i in range(n))
    for i in durable:
        assert effects[f"step-{i}"] == 1, f"step {i} was completed before the reload but ran again: {effects}"
    # Only the step in flight at the reload may have run twice.
    assert sum(effects.values()) <= n + 1, effects
    print(f"\nreloaded after {done} completed steps; {len(durable)} were in IndexedDB; effects {effects}")


# -- 3. a quota failure surfaces as StorageError; nothing committed is lost -----------------

# A real quota failure from Chromium: the database lives in a Storage Bucket
# with a 2 MiB quota. (DevTools' Storage.overrideQuotaForOrigin is reported
# active by Chromium 156 but IndexedDB writes ignore it.) Raw IndexedDB gets a
# QuotaExceededError abort there, but the bridge's over-quota transaction was
# seen to stay in its commit phase instead, never firing "abort". Either way
# the bridge must report a quota error (SQLITE_FULL, QuotaExceededError): a
# flush that times out is one only when the write does not fit in the quota
# left (the bucket's estimate()); any other hang stays SQLITE_IOERR and fails here.
QUOTA_OPEN = (
    DUMP
    + r"""
conn = await WasmSqlConnection.open(
    "/quota.db", storage="idb", idb_bucket={"name": "durably-quota-test", "quota": 2 << 20},
    idb_flush_timeout_ms=3000)
"""
)

QUOTA_SETUP = r"""
conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, payload BLOB)")
for i in range(3):
    conn.execute("INSERT INTO t(name) VALUES (:n)", {"n": f"durable-{i}"})
await conn.wait_durable()
json.dumps(conn.info())
"""

# Random bytes, so IndexedDB's compression cannot squeeze 4 MiB under 2 MiB.
QUOTA_FAIL = r"""
conn.execute("INSERT INTO t(name, payload) VALUES ('too-big', :p)", {"p": os.urandom(4 << 20)})
errors = []
for attempt in range(2):  # the second attempt retries the same pending commit
    try:
        await conn.wait_durable()
    except StorageError as exc:
        errors.append({"type": type(exc).__name__, "code": exc.code, "name": exc.name,
                       "message": str(exc), "is_wasm": isinstance(exc, WasmSqliteError)})
# The connection keeps working; the unstored commit is still visible in memory.
names = [r["name"] for r in conn.fetch_all("SELECT name FROM t ORDER BY id")]
json.dumps({"errors": errors, "names": names, "pending": conn.info()["pending"]})
"""

QUOTA_REOPENED = r"""
names = [r["name"] for r in conn.fetch_all("SELECT name FROM t ORDER BY id")]
integrity = conn.fetch_one("PRAGMA integrity_check")["integrity_check"]
conn.execute("INSERT INTO t(name) VALUES (:n)", {"n": f"after-reload-{len(names)}"})
await conn.wait_durable()
json.dumps({"names": names, "integrity": integrity})
"""


def test_quota_failure_is_a_storage_error_and_loses_nothing(driver: Any, site_url: Any) -> None:
    url, _ = site_url
    load_harness(driver, url)
    info = run_py(driver, QUOTA_OPEN + QUOTA_SETUP)
    assert info["bucket"] == "durably-quota-test"
    failed = run_py(driver, QUOTA_FAIL)
    assert len(failed["errors"]) == 2, failed
    for error in failed["errors"]:
        assert error["is_wasm"], error
        assert (error["name"], error["code"]) == ("SQLITE_FULL", 13), error
        assert ": QuotaExceededError: " in error["message"], error
    for error in failed["errors"]:
        print("\n" + error["type"] + ": " + error["message"])
    assert failed["names"] == ["durable-0", "durable-1", "durable-2", "too-big"]
    assert failed["pending"] == 1

    # The page goes away with the unstored commit: everything stored before is intact,
    # and the database takes new commits again.
    load_harness(driver)
    first = run_py(driver, QUOTA_OPEN + QUOTA_REOPENED)
    assert first["names"] == ["durable-0", "durable-1", "durable-2"]
    assert first["integrity"] == "ok"
    load_harness(driver)
    second = run_py(driver, QUOTA_OPEN + QUOTA_REOPENED)
    assert second["names"] == ["durable-0", "durable-1", "durable-2", "after-reload-3"]
    assert second["integrity"] == "ok"


# -- per-step overhead (benchmark, not a test) ------------------------------------------------

BENCH = r"""
import json, time
from durably_web import Durably, define_job
from durably_web.storage.sqlite.store import SQLiteStore
from durably_web.storage.sqlite.wasm_connection import WasmSqlConnection

def make_job(name, n):
    @define_job(name)
    async def job(step, payload):
        for i in range(n):
            await step.run(f"s{i}", lambda i=i: i)
        return n
    return job

async def measure(label, n_steps=200, **open_kw):
    conn = await WasmSqlConnection.open(**open_kw)
    jobs = [make_job("warm", 20), make_job("one", 1), make_job("many", n_steps)]
    durably = Durably(SQLiteStore(conn), jobs=jobs, sole_worker=True, polling_interval=0.01)
    await durably.init()
    await durably.trigger_and_wait("warm", None, timeout=120)
    times = {}
    for name in ("one", "many", "one", "many"):
        t = time.perf_counter()
        await durably.trigger_and_wait(name, None, timeout=120)
        times.setdefault(name, []).append(time.perf_counter() - t)
    await durably.stop()
    one, many = min(times["one"]), min(times["many"])
    return {"per_step_us": round((many - one) / (n_steps - 1) * 1e6),
            "run_of_200_ms": round(many * 1e3, 1), "run_of_1_ms": round(one * 1e3, 1)}

results = {}
results["memory"] = await measure("memory", storage="memory", filename=":memory:")
results["opfs wal+exclusive"] = await measure("opfs", storage="opfs", filename="/bench-wal.db",
                                              journal_mode="wal", pool_capacity=12)
results["opfs default journal"] = await measure("opfs", storage="opfs", filename="/bench-del.db")
results["idb strict"] = await measure("idb", storage="idb", filename="/bench-strict.db")
results["idb relaxed"] = await measure("idb", storage="idb", filename="/bench-relaxed.db",
                                       idb_durability="relaxed")
json.dumps(results)
"""


@pytest.mark.slow
def test_idb_step_overhead_benchmark(driver: Any, site_url: Any) -> None:
    url, _ = site_url
    load_harness(driver, url)
    results = run_py(driver, BENCH)
    print("\nper committed step through Durably (200-step job minus 1-step job):")
    for label, r in results.items():
        print(f"  {label:22} {r['per_step_us']:>6} us/step   (200 steps: {r['run_of_200_ms']} ms)")
    assert all(r["per_step_us"] > 0 for r in results.values())
