"""Jobs for tests/browser/test_offline_steps.py: steps that call the test server over HTTP.

Every step asks ``<endpoint>?step=<run id>/<step name>``; the test server counts the hits
per step (tests/browser/conftest.py, ``/_test/hit``), so a step run twice shows twice, and
a request that could not leave the browser shows not at all. ``via`` picks how: Pyodide's
``pyfetch`` (which raises an ``OSError`` when the fetch fails) or an awaited ``js.fetch``
(which raises the JS ``TypeError`` itself).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from durably_web import RetryPolicy, StepContext, define_job


class SyncIn(BaseModel):
    endpoint: str  # absolute URL of the test server's /_test/hit
    via: Literal["pyfetch", "js"] = "pyfetch"


async def hit(endpoint: str, key: str, via: str) -> int:
    """One request to the test server; returns its hit count for ``key``."""
    url = f"{endpoint}?step={key}"
    if via == "js":
        import js  # type: ignore[import-not-found]

        response = await js.fetch(url, cache="no-store")
        return int((await response.json()).count)
    from pyodide.http import pyfetch  # type: ignore[import-not-found]

    response = await pyfetch(url, cache="no-store")
    response.raise_for_status()
    return int((await response.json())["count"])


# One attempt per step: an attempt that counted would fail the run.
@define_job("sync-over-http", input=SyncIn, retry=RetryPolicy(max_attempts=1))
async def sync_over_http(step: StepContext, payload: SyncIn) -> dict[str, Any]:
    """first; wait for the signal "go" (the test goes offline meanwhile); second (a plain
    step: its request fails while offline); third (needs_network=True)."""
    first = await step.run("first", hit, payload.endpoint, f"{step.run_id}/first", payload.via)
    await step.wait_for_signal("go")
    second = await step.run("second", hit, payload.endpoint, f"{step.run_id}/second", payload.via)
    third = await step.run(
        "third", hit, payload.endpoint, f"{step.run_id}/third", payload.via, needs_network=True
    )
    return {"first": first, "second": second, "third": third}


@define_job("needs-network", input=SyncIn, retry=RetryPolicy(max_attempts=1))
async def needs_network(step: StepContext, payload: SyncIn) -> dict[str, Any]:
    """Triggered while offline: its first step is not even attempted until the network is back."""
    sent = await step.run(
        "send", hit, payload.endpoint, f"{step.run_id}/send", payload.via, needs_network=True
    )
    return {"send": sent}
