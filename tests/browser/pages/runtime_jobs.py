"""Jobs for tests/browser/test_runtime.py, loaded by pages/runtime.html into the worker
(waiting_jobs.py, for test_waiting.py, reuses its recorder).

Every step records a "B" (begin) record in IndexedDB ("durably-test-effects",
strict durability) when it starts and an "E" (end) record just before it
returns, both before the step's result is committed, so a test can tell after
reloads and tab closes how often, by which page load and with which other page
loads alive each step really executed. Each record carries the id of the worker
that executed it: the page starts one worker per create() and the worker imports
this module once, so WORKER_ID names the page load. The records and their
checks are described in tests/browser/executions.py.
"""

from __future__ import annotations

import asyncio
import json
import secrets

from pydantic import BaseModel, Field

from durably_web import StepContext, define_job

WORKER_ID = secrets.token_hex(6)

# Runs in the worker (Pyodide's run_js evaluates it in the worker's global scope).
# From its first record on, the worker holds the Web Lock "durably-test-alive:<id>"
# until it dies; every record lists the workers holding such a lock.
RECORD_EFFECT = """(record) => (async () => {
  const r = JSON.parse(record);
  const prefix = "durably-test-alive:";
  self.durablyTestAlive ??= new Promise((held) =>
    navigator.locks.request(prefix + r.worker, () => { held(); return new Promise(() => {}); }));
  await self.durablyTestAlive;
  const alive = (await navigator.locks.query()).held
    .filter((l) => l.name.startsWith(prefix)).map((l) => l.name.slice(prefix.length));
  await new Promise((resolve, reject) => {
    const open = indexedDB.open("durably-test-effects", 1);
    open.onupgradeneeded = () => open.result.createObjectStore("effects", {autoIncrement: true});
    open.onerror = () => reject(open.error);
    open.onsuccess = () => {
      const db = open.result;
      const tx = db.transaction("effects", "readwrite", {durability: "strict"});
      tx.objectStore("effects").add({...r, alive, at: Date.now()});
      tx.oncomplete = () => { db.close(); resolve(); };
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error);
    };
  });
})()"""


async def record_effect(kind: str, run_id: str, step: str, attempt: int) -> None:
    from pyodide.code import run_js  # type: ignore[import-not-found]

    record = {"kind": kind, "run": run_id, "step": step, "worker": WORKER_ID, "attempt": attempt}
    await run_js(RECORD_EFFECT)(json.dumps(record))


class StepsIn(BaseModel):
    steps: int = Field(3, ge=1, le=200)
    delay: float = Field(0.05, ge=0, le=10)


class StepsOut(BaseModel):
    total: int


@define_job("count-steps", input=StepsIn, output=StepsOut)
async def count_steps(step: StepContext, payload: StepsIn) -> StepsOut:
    total = 0
    for i in range(payload.steps):
        name = f"s{i}"

        async def work(i: int = i, name: str = name) -> int:
            await record_effect("B", step.run_id, name, step.attempt)
            await asyncio.sleep(payload.delay)
            await record_effect("E", step.run_id, name, step.attempt)
            return i

        total += await step.run(name, work)
        step.progress(i + 1, payload.steps, name)
    return StepsOut(total=total)
