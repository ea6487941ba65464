"""The HTTP API under a multi-tenant policy: what one tenant can learn or do to another's runs.

The policy here is the one the README recommends: the tenant comes from a header,
``on_trigger`` stamps a ``tenant`` label and namespaces the idempotency and
concurrency keys (``TriggerRequest.namespaced``), ``on_run_access`` allows a
tenant its own runs, ``scope_runs`` narrows lists to them. The hooks are async,
like a policy that asks a database.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from asgi_helpers import next_event, running_server, sse_events
from pydantic import BaseModel

from durably_web import Durably, StepContext, define_job
from durably_web.asgi import HTTPException, RunsFilter, TriggerRequest, create_app
from durably_web.models import Run

STARTED: list[str] = []
GATES: dict[str, asyncio.Event] = {}


class Note(BaseModel):
    text: str


async def _record(text: str) -> str:
    STARTED.append(text)
    return text


@define_job("t-note", input=Note)
async def note_job(step: StepContext, payload: Note) -> str:
    return await step.run("record", _record, payload.text)


async def _wait_gate(name: str) -> None:
    await GATES.setdefault(name, asyncio.Event()).wait()


@define_job("t-hold")
async def hold_job(step: StepContext, payload: Any) -> None:
    await step.run("hold", _wait_gate, payload["gate"])


@define_job("t-fail")
async def fail_job(step: StepContext, payload: Any) -> None:
    async def explode() -> None:
        raise RuntimeError("boom")

    await step.run("explode", explode)


@define_job("t-quota")
async def quota_job(step: StepContext, payload: Any) -> None:
    return None


JOBS = (note_job, hold_job, fail_job, quota_job)


class Policy:
    """Tenants from ``x-tenant`` (or ``?tenant=``); every hook async; keys namespaced per tenant."""

    def __init__(self, *, namespace_keys: bool = True) -> None:
        self.namespace_keys = namespace_keys
        self.triggers: list[tuple[str, TriggerRequest]] = []
        self.readonly: set[str] = set()

    async def authenticate(self, request: Any) -> str:
        tenant = request.headers.get("x-tenant") or request.query_params.get("tenant")
        if not tenant:
            raise HTTPException(401, "who are you?")
        return str(tenant)

    async def on_trigger(self, ctx: str, trigger: TriggerRequest) -> TriggerRequest:
        self.triggers.append((ctx, trigger))
        if trigger.job == "t-quota" and ctx == "poor":
            raise PermissionError("over quota")
        labels = {**(trigger.labels or {}), "tenant": ctx}
        if self.namespace_keys:
            trigger = trigger.namespaced(ctx)
        return trigger.model_copy(update={"labels": labels})

    async def on_run_access(self, ctx: str, run: Run, operation: str) -> None:
        await asyncio.sleep(0)  # a real policy awaits something
        if run.labels.get("tenant") != ctx:
            raise HTTPException(403, "not your run")
        if ctx in self.readonly and operation not in ("read", "steps", "subscribe"):
            raise PermissionError("read-only tenant")

    async def scope_runs(self, ctx: str, runs_filter: RunsFilter) -> RunsFilter:
        return dataclasses.replace(runs_filter, labels={**runs_filter.labels, "tenant": ctx})


def as_(tenant: str) -> dict[str, str]:
    return {"x-tenant": tenant}


ClientFor = Callable[..., Awaitable[httpx.AsyncClient]]


@pytest.fixture
async def client_for() -> AsyncIterator[ClientFor]:
    clients: list[httpx.AsyncClient] = []

    async def make(durably: Durably, **options: Any) -> httpx.AsyncClient:
        app = create_app(durably, **options)
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://localhost",  # a loopback Host, as the cross-site defences want
            headers={"Content-Type": "application/json"},
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()
    for gate in GATES.values():
        gate.set()
    GATES.clear()
    STARTED.clear()


@pytest.fixture
async def idle(make_durably: Any) -> Durably:
    return await make_durably(*JOBS, worker=False)


@pytest.fixture
async def working(make_durably: Any) -> Durably:
    return await make_durably(*JOBS)


RUN_ROUTES = [
    ("GET", "/runs/{id}"), ("GET", "/runs/{id}/steps"), ("GET", "/runs/{id}/logs"),
    ("GET", "/runs/{id}/events"), ("POST", "/runs/{id}/cancel"), ("POST", "/runs/{id}/retrigger"),
    ("DELETE", "/runs/{id}"),
]


# --- 404 for runs the caller may not read ------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), RUN_ROUTES)
async def test_another_tenants_run_answers_exactly_like_a_missing_one(
    idle: Durably, client_for: ClientFor, method: str, path: str
) -> None:
    client = await client_for(idle, auth=Policy())
    created = await client.post("/trigger", json={"job": "t-note", "input": {"text": "a"}}, headers=as_("a"))
    run_id = created.json()["id"]
    missing_id = run_id[:-1] + ("0" if run_id[-1] != "0" else "1")

    refused = await client.request(method, path.format(id=run_id), headers=as_("b"))
    missing = await client.request(method, path.format(id=missing_id), headers=as_("b"))
    assert refused.status_code == missing.status_code == 404
    expected = missing.json()["message"].replace(missing_id, run_id)
    assert refused.json() == {**missing.json(), "message": expected}
    assert refused.json()["error"] == "NotFoundError"
    assert [(r.id, r.status) for r in await idle.get_runs()] == [(run_id, "pending")]


async def test_a_readable_run_refused_for_one_operation_stays_403(
    idle: Durably, client_for: ClientFor
) -> None:
    policy = Policy()
    policy.readonly.add("a")
    client = await client_for(idle, auth=policy)
    run = await idle.trigger("t-note", {"text": "a"}, labels={"tenant": "a"})
    assert (await client.get(f"/runs/{run.id}", headers=as_("a"))).status_code == 200
    cancel = await client.post(f"/runs/{run.id}/cancel", headers=as_("a"))
    assert cancel.status_code == 403 and cancel.json()["message"] == "read-only tenant"
    assert (await idle.get_run(run.id)).status == "pending"


# --- strict numbers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/trigger", b'{"job": "t-note", "input": {"text": "x", "n": 1e400}}'),
        ("/trigger", b'{"job": "t-note", "input": -1e999}'),
        ("/trigger/batch", b'{"job": "t-note", "items": [{"input": {"n": 1E+400}}]}'),
        ("/purge", b'{"older_than": 1e400}'),
    ],
)
async def test_overflowing_numbers_are_rejected(
    idle: Durably, client_for: ClientFor, path: str, body: bytes
) -> None:
    client = await client_for(idle)
    response = await client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "BadRequest" and "out of range" in response.json()["message"]
    assert await idle.get_runs() == []


async def test_large_but_finite_numbers_are_kept(idle: Durably, client_for: ClientFor) -> None:
    body = b'{"job": "t-note", "input": {"text": "x"}, "labels": {"n": "1e400"}}'
    response = await (await client_for(idle)).post("/trigger", content=body)
    assert response.status_code == 201
    raw = b'{"job": "t-hold", "input": {"gate": "g", "n": 1.7e308, "m": 123456789012345678901234567890}}'
    kept = await (await client_for(idle)).post("/trigger", content=raw)
    assert kept.status_code == 201
    assert kept.json()["run"]["input"]["n"] == 1.7e308
    assert kept.json()["run"]["input"]["m"] == 123456789012345678901234567890


# --- tracebacks ----------------------------------------------------------------------------------


async def _failed_run(durably: Durably) -> str:
    run = await durably.trigger("t-fail", None, labels={"tenant": "a"})
    await durably.wait_for_run(run.id, timeout=10)
    return run.id


async def test_tracebacks_are_hidden_from_tenants_by_default(working: Durably, client_for: ClientFor) -> None:
    run_id = await _failed_run(working)
    client = await client_for(working, auth=Policy())
    run = (await client.get(f"/runs/{run_id}", headers=as_("a"))).json()
    assert run["error"] == {"type": "RuntimeError", "message": "boom", "traceback": ""}
    steps = (await client.get(f"/runs/{run_id}/steps", headers=as_("a"))).json()["steps"]
    assert steps[0]["error"]["type"] == "RuntimeError" and steps[0]["error"]["traceback"] == ""
    listed = (await client.get("/runs", headers=as_("a"))).json()["runs"]
    assert "Traceback" not in str(listed)
    stream = await client.get(f"/runs/{run_id}/events", headers=as_("a"))
    assert "run:snapshot" in stream.text and "boom" in stream.text
    assert "Traceback" not in stream.text and ".py" not in stream.text

    # without auth (the operator's own dashboard) they are shown, and the option overrides both ways
    open_client = await client_for(working)
    assert "Traceback" in (await open_client.get(f"/runs/{run_id}")).json()["error"]["traceback"]
    assert "Traceback" in (await open_client.get(f"/runs/{run_id}/events")).text
    shown = await client_for(working, auth=Policy(), expose_tracebacks=True)
    assert "Traceback" in (await shown.get(f"/runs/{run_id}", headers=as_("a"))).json()["error"]["traceback"]
    hidden = await client_for(working, expose_tracebacks=False)
    assert (await hidden.get(f"/runs/{run_id}/steps")).json()["steps"][0]["error"]["traceback"] == ""


async def test_live_stream_events_carry_no_traceback(
    working: Durably, http_client: httpx.AsyncClient
) -> None:
    GATES["live-fail"] = asyncio.Event()
    app = create_app(working, auth=Policy(), sse_throttle=0)
    async with running_server(app) as base:
        async with http_client.stream("GET", f"{base}/events?tenant=a") as listing:
            events = sse_events(listing)
            run = await working.trigger("t-fail", None, labels={"tenant": "a"})
            seen = []
            while True:
                event = await next_event(events)
                seen.append(event)
                if event.event == "run:fail" and event.data["run_id"] == run.id:
                    break
    failed = seen[-1].data
    assert failed["error"]["message"] == "boom" and failed["error"]["traceback"] == ""
    assert "Traceback" not in str([event.data for event in seen])


@pytest.fixture
async def http_client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(20.0)) as client:
        yield client
