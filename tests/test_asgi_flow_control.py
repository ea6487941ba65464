"""Flow control over HTTP: a trigger's priority is honoured by the claim, and a debounced
job's burst of triggers becomes one run with the latest input (disposition "debounced")."""

from __future__ import annotations

from typing import Any

import pytest
from asgi_helpers import api_client

from durably_web import StepContext, define_job
from durably_web.asgi import create_app

pytestmark = pytest.mark.all_backends


async def test_runs_triggered_over_http_are_claimed_in_priority_order(make_durably) -> None:
    order: list[str] = []

    @define_job("ordered")
    async def ordered(step: StepContext, name: str) -> str:
        order.append(name)
        return name

    client_side = await make_durably(ordered, worker=False)
    async with api_client(create_app(client_side)) as client:
        ids = []
        for name, priority in (("low", -1), ("plain", 0), ("urgent-1", 5), ("plain-2", 0), ("urgent-2", 5)):
            response = await client.post(
                "/trigger", json={"job": "ordered", "input": name, "priority": priority}
            )
            assert response.status_code == 201, response.text
            assert response.json()["run"]["priority"] == priority
            ids.append(response.json()["id"])
        batch = await client.post(
            "/trigger/batch", json={"job": "ordered", "items": [{"input": "batched-top", "priority": 9}]}
        )
        assert batch.status_code == 201 and batch.json()["runs"][0]["priority"] == 9
        listed = (await client.get("/runs", params={"job": "ordered"})).json()["runs"]
        assert {run["priority"] for run in listed} == {-1, 0, 5, 9}
    # One worker slot: each claim takes the highest priority left, then the oldest.
    worker = await make_durably(ordered, max_concurrent_runs=1)
    for run_id in ids:
        assert (await worker.wait_for_run(run_id, timeout=20)).status == "completed"
    assert order == ["batched-top", "urgent-1", "urgent-2", "plain", "plain-2", "low"]


async def test_a_burst_of_debounced_http_triggers_is_one_run_with_the_latest_input(make_durably) -> None:
    seen: list[Any] = []

    @define_job("settle", debounce=2.0)  # long enough that the burst lands inside it
    async def settle(step: StepContext, payload: Any) -> Any:
        seen.append(payload)
        return payload

    durably = await make_durably(settle)
    async with api_client(create_app(durably)) as client:
        body = {"job": "settle", "concurrency_key": "doc:1"}
        first = await client.post("/trigger", json={**body, "input": {"v": 1}})
        assert first.status_code == 201 and first.json()["disposition"] == "created", first.text
        run_id = first.json()["id"]
        for v in (2, 3):
            again = await client.post("/trigger", json={**body, "input": {"v": v}})
            assert again.status_code == 200, again.text
            assert again.json()["disposition"] == "debounced" and again.json()["id"] == run_id
        shown = (await client.get(f"/runs/{run_id}")).json()
        if shown["status"] == "pending":  # a loaded machine may already have started it
            assert shown["input"] == {"v": 3} and shown["not_before"] is not None
        done = await durably.wait_for_run(run_id, timeout=20)
        assert done.status == "completed" and done.output == {"v": 3}
        runs = (await client.get("/runs", params={"job": "settle"})).json()["runs"]
        assert [run["id"] for run in runs] == [run_id]
        # Without its concurrency key a debounced trigger is refused, clearly.
        refused = await client.post("/trigger", json={"job": "settle", "input": 4})
        assert refused.status_code == 400 and "concurrency_key" in refused.json()["message"]
    assert seen == [{"v": 3}]
