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
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from asgi_helpers import api_client, next_event, running_server, sse_events
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
        client = api_client(create_app(durably, **options))
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
    ("GET", "/runs/{id}"),
    ("GET", "/runs/{id}/steps"),
    ("GET", "/runs/{id}/logs"),
    ("GET", "/runs/{id}/events"),
    ("POST", "/runs/{id}/cancel"),
    ("POST", "/runs/{id}/retrigger"),
    ("DELETE", "/runs/{id}"),
    ("POST", "/runs/{id}/signals/go"),
    ("POST", "/runs/{id}/resume"),
    ("POST", "/runs/{id}/fork"),
    ("GET", "/runs/{id}/attempts"),
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


@pytest.mark.parametrize(
    "body",
    [
        b'{"job": "t-note", "input": {"text": "x"}, "job": "t-other"}',
        b'{"job": "t-note", "input": {"text": "x", "text": "y"}}',
    ],
)
async def test_a_key_repeated_in_one_object_is_rejected(
    idle: Durably, client_for: ClientFor, body: bytes
) -> None:
    client = await client_for(idle)
    response = await client.post("/trigger", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert "appears more than once" in response.json()["message"]
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


# --- a refused batch writes and executes nothing -------------------------------------------------


def _database_rows(sql: Any) -> dict[str, int]:
    return {
        table: sql(f"SELECT count(*) FROM {table}")[0][0]
        for table in ("durably_runs", "durably_run_labels", "durably_steps", "durably_logs")
    }


async def test_a_refused_batch_leaves_the_database_unchanged(
    working: Durably, client_for: ClientFor, sql: Any
) -> None:
    # Without namespaced keys, tenant b's key can name tenant a's run: the batch is refused.
    client = await client_for(working, auth=Policy(namespace_keys=False))
    mine = await client.post(
        "/trigger",
        json={"job": "t-note", "input": {"text": "a"}, "idempotency_key": "shared"},
        headers=as_("a"),
    )
    await working.wait_for_run(mine.json()["id"], timeout=10)
    # one run of a's holds concurrency key "c" (leased), so the next one stays pending
    await working.trigger("t-hold", {"gate": "never"}, concurrency_key="c", labels={"tenant": "a"})
    await asyncio.sleep(0.1)  # let the worker lease it
    pending = await working.trigger("t-hold", {"gate": "never"}, concurrency_key="c", labels={"tenant": "a"})
    await asyncio.sleep(0.1)
    assert (await working.get_run(pending.id)).status == "pending"
    before = _database_rows(sql)
    events: list[str] = []
    unsubscribe = working.on("*", lambda event: events.append(event.type))

    for clash in (
        {"input": {"text": "b2"}, "idempotency_key": "shared"},
        {"input": {"text": "b2"}, "concurrency_key": "c", "coalesce": "skip"},
    ):
        items = [{"input": {"text": "b1"}}, clash, {"input": {"text": "b3"}}]
        refused = await client.post(
            "/trigger/batch", json={"job": "t-note", "items": items}, headers=as_("b")
        )
        assert refused.status_code == 409, refused.text
        assert refused.json() == {
            "error": "ConflictError",
            "message": "a key is in use by a run you cannot access",
        }
        assert mine.json()["id"] not in refused.text and pending.id not in refused.text

    # give a worker every chance to pick up anything the batches might have left behind
    await asyncio.sleep(0.3)
    unsubscribe()
    assert _database_rows(sql) == before
    assert STARTED == ["a"]  # no step of a refused batch ever ran
    assert [kind for kind in events if kind in ("run:trigger", "run:delete", "run:cancel")] == []

    # the same keys are fine for their owner: resolved inside one transaction
    own = await client.post(
        "/trigger/batch",
        json={
            "job": "t-note",
            "items": [
                {"input": {"text": "x"}, "idempotency_key": "shared"},
                {"input": {"text": "y"}, "idempotency_key": "new"},
                {"input": {"text": "z"}, "idempotency_key": "new"},
            ],
        },
        headers=as_("a"),
    )
    assert own.status_code == 201, own.text
    runs = own.json()["runs"]
    assert [r["disposition"] for r in runs] == ["idempotent", "created", "idempotent"]
    assert runs[0]["id"] == mine.json()["id"] and runs[1]["id"] == runs[2]["id"]


async def test_a_refused_single_trigger_writes_nothing(
    idle: Durably, client_for: ClientFor, sql: Any
) -> None:
    client = await client_for(idle, auth=Policy(namespace_keys=False))
    body = {"job": "t-note", "input": {"text": "a"}, "idempotency_key": "k"}
    first = await client.post("/trigger", json=body, headers=as_("a"))
    before = _database_rows(sql)
    theirs = await client.post("/trigger", json=body, headers=as_("b"))
    assert theirs.status_code == 409 and first.json()["id"] not in theirs.text
    assert _database_rows(sql) == before


async def test_durably_accept_existing_refuses_inside_the_transaction(idle: Durably) -> None:
    from durably_web import ExistingRunRefusedError, TriggerItem

    kept = await idle.trigger("t-note", {"text": "old"}, idempotency_key="k")
    with pytest.raises(ExistingRunRefusedError) as refused:
        await idle.batch_trigger(
            "t-note",
            [TriggerItem({"text": "new"}), TriggerItem({"text": "again"}, idempotency_key="k")],
            accept_existing=lambda run: False,
        )
    assert [run.id for run in refused.value.runs] == [kept.id]
    assert [run.id for run in await idle.get_runs()] == [kept.id]
    with pytest.raises(ExistingRunRefusedError):
        await idle.trigger("t-note", {"text": "x"}, idempotency_key="k", accept_existing=lambda run: False)
    again = await idle.trigger(
        "t-note", {"text": "x"}, idempotency_key="k", accept_existing=lambda run: run.id == kept.id
    )
    assert again.id == kept.id and again.disposition == "idempotent"
    # a run this very call creates needs no verdict
    pair = await idle.batch_trigger(
        "t-note",
        [TriggerItem({"text": "p"}, idempotency_key="p"), TriggerItem({"text": "p"}, idempotency_key="p")],
        accept_existing=lambda run: False,
    )
    assert pair[0].id == pair[1].id and [r.disposition for r in pair] == ["created", "idempotent"]


# --- retrigger goes through on_trigger ---------------------------------------------------------


async def test_retrigger_passes_through_on_trigger(idle: Durably, client_for: ClientFor) -> None:
    policy = Policy()
    client = await client_for(idle, auth=policy)
    refused = await client.post("/trigger", json={"job": "t-quota"}, headers=as_("poor"))
    assert refused.status_code == 403
    # a run of that job the tenant may read (say, an operator started it for them)
    theirs = await idle.trigger("t-quota", None, labels={"tenant": "poor"})
    again = await client.post(f"/runs/{theirs.id}/retrigger", headers=as_("poor"))
    assert again.status_code == 403 and again.json()["message"] == "over quota"
    assert [run.id for run in await idle.get_runs()] == [theirs.id]

    # what the hook sees, and that its replacement is honoured
    created = await client.post(
        "/trigger",
        json={"job": "t-note", "input": {"text": "n"}, "concurrency_key": "c", "labels": {"k": "v"}},
        headers=as_("a"),
    )
    run_id = created.json()["id"]
    assert created.json()["run"]["concurrency_key"] == "1:a:c"
    policy.triggers.clear()
    await idle.cancel(run_id)  # no longer pending, so its concurrency key is free
    retriggered = await client.post(f"/runs/{run_id}/retrigger", headers=as_("a"))
    assert retriggered.status_code == 201, retriggered.text
    [(ctx, seen)] = policy.triggers
    assert (ctx, seen.job, seen.input, seen.idempotency_key, seen.concurrency_key, seen.labels) == (
        "a",
        "t-note",
        {"text": "n"},
        None,
        "1:a:c",
        {"k": "v", "tenant": "a"},
    )
    run = retriggered.json()["run"]
    assert (run["concurrency_key"], run["labels"], run["input"]) == (
        "1:a:c",
        {"k": "v", "tenant": "a"},
        {"text": "n"},
    )


async def test_retrigger_replacement_may_change_the_trigger(idle: Durably, client_for: ClientFor) -> None:
    class Rewrite:
        def on_trigger(self, ctx: Any, trigger: TriggerRequest) -> TriggerRequest:
            return trigger.model_copy(update={"input": {"text": "rewritten"}, "labels": {"via": "hook"}})

    run = await idle.trigger("t-note", {"text": "original"})
    response = await (await client_for(idle, auth=Rewrite())).post(f"/runs/{run.id}/retrigger")
    assert response.status_code == 201
    assert (response.json()["run"]["input"], response.json()["run"]["labels"]) == (
        {"text": "rewritten"},
        {"via": "hook"},
    )


# --- keys are per tenant ------------------------------------------------------------------------


async def test_two_tenants_with_the_same_keys_never_meet(idle: Durably, client_for: ClientFor) -> None:
    client = await client_for(idle, auth=Policy())
    body = {"job": "t-note", "input": {"text": "x"}}
    for key in (
        {"idempotency_key": "k"},
        {"concurrency_key": "c"},
        {"concurrency_key": "s", "coalesce": "skip"},
    ):
        a = await client.post("/trigger", json={**body, **key}, headers=as_("a"))
        b = await client.post("/trigger", json={**body, **key}, headers=as_("b"))
        assert (a.status_code, b.status_code) == (201, 201), (key, a.text, b.text)
        assert a.json()["id"] != b.json()["id"]
        assert a.json()["run"]["labels"]["tenant"] == "a" and b.json()["run"]["labels"]["tenant"] == "b"
        # each tenant's repeat resolves to its own run (or, for a pending concurrency key, is a 409
        # about its own run)
        again_b = await client.post("/trigger", json={**body, **key}, headers=as_("b"))
        if "idempotency_key" in key or "coalesce" in key:
            assert again_b.status_code == 200 and again_b.json()["id"] == b.json()["id"]
        else:
            assert again_b.status_code == 409
        assert a.json()["id"] not in again_b.text

    # batches: the same keys again, in one batch per tenant
    items = [
        {"input": {"text": "y"}, "idempotency_key": "k"},
        {"input": {"text": "y"}, "concurrency_key": "s", "coalesce": "skip"},
        {"input": {"text": "y"}, "idempotency_key": "fresh"},
    ]
    for tenant in ("a", "b"):
        response = await client.post(
            "/trigger/batch", json={"job": "t-note", "items": items}, headers=as_(tenant)
        )
        assert response.status_code == 201, response.text
        runs = response.json()["runs"]
        assert [r["disposition"] for r in runs] == ["idempotent", "coalesced", "created"]
        assert {r["labels"]["tenant"] for r in runs} == {tenant}
    assert {r["labels"]["tenant"] for r in (await client.get("/runs", headers=as_("a"))).json()["runs"]} == {
        "a"
    }


async def test_a_running_concurrency_key_blocks_only_its_own_tenant(
    working: Durably, client_for: ClientFor
) -> None:
    client = await client_for(working, auth=Policy())
    GATES["held"] = asyncio.Event()
    held = await client.post(
        "/trigger",
        json={"job": "t-hold", "input": {"gate": "held"}, "concurrency_key": "c"},
        headers=as_("a"),
    )
    for _ in range(200):
        if (await working.get_run(held.json()["id"])).status == "leased":
            break
        await asyncio.sleep(0.01)
    other = await client.post(
        "/trigger", json={"job": "t-note", "input": {"text": "b"}, "concurrency_key": "c"}, headers=as_("b")
    )
    assert other.status_code == 201
    done = await working.wait_for_run(other.json()["id"], timeout=10)
    assert done.status == "completed"  # a's running run with "c" did not hold b's back
    assert (await working.get_run(held.json()["id"])).status == "leased"


def test_namespaced_keys_are_prefix_free() -> None:
    trigger = TriggerRequest(job="j", idempotency_key="b:x", concurrency_key="c")
    a = trigger.namespaced("a")
    ab = TriggerRequest(job="j", idempotency_key="x").namespaced("a:b")
    assert a.idempotency_key != ab.idempotency_key
    assert (a.idempotency_key, a.concurrency_key) == ("1:a:b:x", "1:a:c")
    assert a.namespaced("a") == a  # already inside: kept
    assert TriggerRequest(job="j").namespaced("a") == TriggerRequest(job="j")
    with pytest.raises(ValueError):
        trigger.namespaced("")


# --- lists are summaries -------------------------------------------------------------------------


async def test_run_lists_are_summaries_and_the_run_route_is_whole(
    working: Durably, client_for: ClientFor
) -> None:
    client = await client_for(working)
    big = {"gate": "never", "blob": "é" * 200_000}
    held = await working.trigger("t-hold", big)
    failed = await working.trigger("t-fail", None)
    await working.wait_for_run(failed.id, timeout=10)
    listed = await client.get("/runs")
    assert len(listed.content) < 5_000  # not the 400 kB input
    by_id = {run["id"]: run for run in listed.json()["runs"]}
    summary = by_id[held.id]
    assert "input" not in summary and "output" not in summary
    assert summary["input_bytes"] == len(json.dumps(big, ensure_ascii=False, separators=(",", ":")).encode())
    assert summary["output_bytes"] is None
    assert set(summary) == {
        "id",
        "job_name",
        "status",
        "error",
        "labels",
        "progress",
        "attempt",
        "idempotency_key",
        "concurrency_key",
        "created_at",
        "started_at",
        "completed_at",
        "updated_at",
        "input_bytes",
        "output_bytes",
        "wake_at",
        "wait_reason",
        "wait_step",
        "forked_from",
        "priority",
        "not_before",
        "parent_run_id",
        "wait_child_id",
        "deadline_at",
        "version",
    }
    assert by_id[failed.id]["error"] == {"type": "RuntimeError", "message": "boom"}
    whole = (await client.get(f"/runs/{held.id}")).json()
    assert (
        whole["input"] == big
        and "Traceback" in (await client.get(f"/runs/{failed.id}")).json()["error"]["traceback"]
    )
