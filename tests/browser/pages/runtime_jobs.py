"""Jobs for tests/browser/test_runtime.py, loaded by pages/runtime.html into the worker.

Every step first records a side effect in IndexedDB ("durably-test-effects",
durable before the step's result is committed), so a test can count, after
reloads and tab closes, how often each step really executed.
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, Field

from durably_web import StepContext, define_job

# Runs in the worker (Pyodide's run_js evaluates it in the worker's global scope).
RECORD_EFFECT = """(runId, step) => new Promise((resolve, reject) => {
  const open = indexedDB.open("durably-test-effects", 1);
  open.onupgradeneeded = () => open.result.createObjectStore("effects", {autoIncrement: true});
  open.onerror = () => reject(open.error);
  open.onsuccess = () => {
    const db = open.result;
    const tx = db.transaction("effects", "readwrite", {durability: "strict"});
    tx.objectStore("effects").add({runId, step, at: Date.now()});
    tx.oncomplete = () => { db.close(); resolve(); };
    tx.onerror = () => reject(tx.error);
  };
})"""


async def record_effect(run_id: str, step: str) -> None:
    from pyodide.code import run_js  # type: ignore[import-not-found]

    await run_js(RECORD_EFFECT)(run_id, step)


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
            await record_effect(step.run_id, name)
            await asyncio.sleep(payload.delay)
            return i

        total += await step.run(name, work)
        step.progress(i + 1, payload.steps, name)
    return StepsOut(total=total)
