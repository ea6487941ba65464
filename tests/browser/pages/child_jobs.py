"""Jobs for tests/browser/test_child_run_reload.py: a parent run that starts a child and waits for it.

Loaded after runtime_jobs.py (``jobs=runtime_jobs.py,child_jobs.py``): its recorder is reused,
so every step execution leaves IndexedDB records ("B" when it begins, "E" just before it
returns; see tests/browser/executions.py) that outlive page reloads.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from runtime_jobs import record_effect  # type: ignore[import-not-found]

from durably_web import StepContext, define_job


async def executed(step: StepContext, name: str, value: Any) -> Any:
    async def fn() -> Any:
        await record_effect("B", step.run_id, name, step.attempt)
        await record_effect("E", step.run_id, name, step.attempt)
        return value

    return await step.run(name, fn)


class InvoiceIn(BaseModel):
    order: int
    nap: float = Field(0, ge=0, le=60)  # seconds the child sleeps between its two steps


class Invoice(BaseModel):
    order: int
    total: int


@define_job("b-invoice", input=InvoiceIn, output=Invoice)
async def invoice(step: StepContext, payload: InvoiceIn) -> Invoice:
    total = await executed(step, "total", payload.order * 10)
    await step.sleep("nap", payload.nap)
    await executed(step, "send", None)
    return Invoice(order=payload.order, total=total)


@define_job("b-order", input=InvoiceIn)
async def order(step: StepContext, payload: InvoiceIn) -> dict[str, Any]:
    child = await step.start_child("invoice", invoice, payload)
    out: Invoice = await step.wait_for_child("invoice-done", child)
    assert isinstance(out, Invoice)  # typed, with the child job's output model
    await executed(step, "ship", None)
    return {"child": child.run_id, "total": out.total}
