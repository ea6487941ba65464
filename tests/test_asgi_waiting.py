"""Durable waiting over HTTP: signals, resume, fork and step attempts, on a real SQLite file.

``POST /runs/{id}/signals/{name}``, ``POST /runs/{id}/resume``, ``POST /runs/{id}/fork`` and
``GET /runs/{id}/attempts``: what each answers, that a refused or malformed request changes
nothing in the database, which ``on_run_access`` operation each asks, that a fork passes
``on_trigger``, and that another web page cannot send any of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from asgi_helpers import JSON_HEADERS, api_client, next_event, running_server, sse_events
from helpers import wait_until
from pydantic import BaseModel

from durably_web import Durably, RetryPolicy, StepContext, define_job
from durably_web.asgi import HTTPException, TriggerRequest, create_app
from durably_web.models import Run

EVIL = "http://evil.example"
CALLS: dict[str, int] = {}
FAIL: set[str] = set()
GATES: dict[str, asyncio.Event] = {}


class Approval(BaseModel):
    by: str


class In(BaseModel):
    n: int


def _count(name: str) -> str:
    CALLS[name] = CALLS.get(name, 0) + 1
    if name in FAIL:
        raise OSError(f"{name} failed")
    return f"{name}-value"


@define_job("w-approve", signals={"approval": Approval})
async def approve_job(step: StepContext, payload: Any) -> str:
    await step.run("before", _count, "before")
    approval = await step.wait_for_signal("approval", type=Approval)
    await step.run("after", _count, "after")
    return f"approved by {approval.by}"


@define_job("w-steps", input=In)
async def steps_job(step: StepContext, payload: In) -> list[str]:
    return [await step.run(name, _count, name) for name in ("fetch", "save", "notify")]


@define_job("w-flaky", retry=RetryPolicy(max_attempts=3, initial_delay=0.01))
async def flaky_job(step: StepContext, payload: Any) -> int:
    def flaky() -> int:
        CALLS["flaky"] = CALLS.get("flaky", 0) + 1
        if CALLS["flaky"] == 1:
            raise OSError("first attempt fails")
        return CALLS["flaky"]

    return await step.run("flaky", flaky)


async def _wait_gate(name: str) -> None:
    await GATES.setdefault(name, asyncio.Event()).wait()


@define_job("w-hold")
async def hold_job(step: StepContext, payload: Any) -> None:
    await step.run("hold", _wait_gate, payload)


@define_job("w-nap")
async def nap_job(step: StepContext, payload: Any) -> None:
    await step.sleep("nap", 3600)


JOBS = (approve_job, steps_job, flaky_job, hold_job, nap_job)
ClientFor = Callable[..., Awaitable[httpx.AsyncClient]]
Sql = Callable[..., list[tuple[Any, ...]]]


@pytest.fixture
async def client_for() -> AsyncIterator[ClientFor]:
    """``await client_for(durably, **app_options)`` -> an httpx client on the app."""
    clients: list[httpx.AsyncClient] = []

    async def make(durably: Durably, **options: Any) -> httpx.AsyncClient:
        client = api_client(create_app(durably, **options))
        clients.append(client)
        return client

    CALLS.clear()
    FAIL.clear()
    yield make
    for client in clients:
        await client.aclose()
    for gate in GATES.values():
        gate.set()
    GATES.clear()


@pytest.fixture
async def idle(make_durably: Any) -> Durably:
    """No worker: triggered runs stay pending."""
    return await make_durably(*JOBS, worker=False, max_payload_bytes=1000)


@pytest.fixture
async def working(make_durably: Any) -> Durably:
    return await make_durably(*JOBS)


def _snapshot(sql: Sql) -> list[list[tuple[Any, ...]]]:
    """Every row a route could write: runs, labels, steps, attempts, signals, logs."""
    tables = (
        "durably_runs",
        "durably_run_labels",
        "durably_steps",
        "durably_step_attempts",
        "durably_signals",
        "durably_logs",
    )
    return [sql(f"SELECT * FROM {table} ORDER BY 1, 2") for table in tables]


async def _failed_steps_run(durably: Durably, **options: Any) -> Run:
    """A w-steps run that failed in its "save" step ("fetch" completed)."""
    FAIL.add("save")
    run = await durably.trigger_and_wait("w-steps", {"n": 1}, timeout=10, **options)
    FAIL.discard("save")
    assert run.status == "failed"
    return run


async def _status(durably: Durably, run_id: str) -> str:
    return (await durably.get_run(run_id)).status


# --- signals ----------------------------------------------------------------------------------------


async def test_a_signal_over_http_wakes_the_waiting_run_which_completes(
    working: Durably, client_for: ClientFor, sql: Sql
) -> None:
    client = await client_for(working)
    run = await working.trigger("w-approve", None)
    await wait_until(lambda: _is_waiting(working, run.id))

    sent = await client.post(
        f"/runs/{run.id}/signals/approval", json={"payload": {"by": "ana"}, "signal_id": "mail-1"}
    )
    assert sent.status_code == 200, sent.text
    assert sent.json() == {"run_id": run.id, "name": "approval", "disposition": "delivered"}
    done = await working.wait_for_run(run.id, timeout=10)
    assert done.status == "completed" and done.output == "approved by ana"
    assert CALLS == {"before": 1, "after": 1}
    steps = (await client.get(f"/runs/{run.id}/steps")).json()["steps"]
    assert [(s["name"], s["kind"], s["output"]) for s in steps] == [
        ("before", "run", "before-value"),
        ("approval", "signal", {"payload": {"by": "ana"}}),
        ("after", "run", "after-value"),
    ]

    # a finished run takes no more signals, even with the id it saw: 409, nothing stored
    before = _snapshot(sql)
    again = await client.post(
        f"/runs/{run.id}/signals/approval", json={"payload": {"by": "bo"}, "signal_id": "mail-1"}
    )
    assert again.status_code == 409 and again.json()["error"] == "ConflictError"
    assert _snapshot(sql) == before


async def _is_waiting(durably: Durably, run_id: str) -> bool:
    return await _status(durably, run_id) == "waiting"


async def test_a_signal_sent_before_the_wait_is_stored_and_a_repeated_id_is_a_duplicate(
    idle: Durably, client_for: ClientFor, make_durably: Any
) -> None:
    client = await client_for(idle)
    run = await idle.trigger("w-approve", None)
    url = f"/runs/{run.id}/signals/approval"

    first = await client.post(url, json={"payload": {"by": "ana"}, "signal_id": "s-1"})
    assert first.status_code == 200 and first.json()["disposition"] == "stored"
    repeated = await client.post(url, json={"payload": {"by": "mallory"}, "signal_id": "s-1"})
    assert repeated.status_code == 200
    assert repeated.json() == {"run_id": run.id, "name": "approval", "disposition": "duplicate"}
    # no body at all: a signal with a null payload (of a name without a declared type)
    bare = await client.post(f"/runs/{run.id}/signals/other")
    assert bare.status_code == 200
    assert bare.json() == {"run_id": run.id, "name": "other", "disposition": "stored"}

    worker = await make_durably(*JOBS)
    done = await worker.wait_for_run(run.id, timeout=10)
    # the run got the first payload: the duplicate stored nothing
    assert done.status == "completed" and done.output == "approved by ana"


@pytest.mark.parametrize(
    ("body", "status", "kind"),
    [
        ({"payload": {"by": 5}}, 400, "ValidationError"),  # the signal's declared type refuses it
        ({"payload": None}, 400, "ValidationError"),
        ({"payload": {"by": "x" * 2000}}, 400, "ValidationError"),  # over max_payload_bytes=1000
        ({"payload": {"by": "ana"}, "signal_id": "s-bad", "extra": 1}, 400, "BadRequest"),
        ({"payload": {"by": "ana"}, "signal_id": ""}, 400, "BadRequest"),
        ({"payload": {"by": "ana"}, "signal_id": 5}, 400, "BadRequest"),
        ([{"by": "ana"}], 400, "BadRequest"),
        (b'{"payload": {"by": "ana"}', 400, "BadRequest"),
        (b'{"payload": {"by": "ana"}, "payload": {"by": "bo"}}', 400, "BadRequest"),
        ({"payload": "x" * 70_000}, 413, "PayloadTooLarge"),  # the body itself: over the limit + slack
    ],
)
async def test_a_refused_signal_stores_nothing(
    idle: Durably, client_for: ClientFor, sql: Sql, body: Any, status: int, kind: str
) -> None:
    client = await client_for(idle)
    run = await idle.trigger("w-approve", None)
    url = f"/runs/{run.id}/signals/approval"
    before = _snapshot(sql)
    if isinstance(body, bytes):
        response = await client.post(url, content=body)
    else:
        response = await client.post(url, json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"] == kind
    if body == {"payload": {"by": 5}}:
        [detail] = response.json()["details"]  # pydantic's, passed on
        assert detail["loc"] == ["by"] and detail["type"] == "string_type"
    assert _snapshot(sql) == before
    # nothing was kept under the id either: the next send with it is stored, not a duplicate
    ok = await client.post(url, json={"payload": {"by": "ana"}, "signal_id": "s-bad"})
    assert ok.json()["disposition"] == "stored"


async def test_signals_to_missing_and_finished_runs(idle: Durably, client_for: ClientFor, sql: Sql) -> None:
    client = await client_for(idle)
    run = await idle.trigger("w-approve", None)
    await idle.cancel(run.id)
    before = _snapshot(sql)
    missing = await client.post("/runs/01NOPE/signals/approval", json={"payload": {"by": "a"}})
    assert missing.status_code == 404 and missing.json()["error"] == "NotFoundError"
    cancelled = await client.post(f"/runs/{run.id}/signals/approval", json={"payload": {"by": "a"}})
    assert cancelled.status_code == 409 and "cancelled" in cancelled.json()["message"]
    assert _snapshot(sql) == before


async def test_signal_names_are_percent_decoded_from_the_path(
    idle: Durably, client_for: ClientFor, sql: Sql
) -> None:
    client = await client_for(idle)
    run = await idle.trigger("w-approve", None)
    for encoded, name in (("a%20b", "a b"), ("%C3%A9t%C3%A9", "\u00e9t\u00e9")):
        sent = await client.post(f"/runs/{run.id}/signals/{encoded}", json={"payload": 1})
        assert sent.status_code == 200 and sent.json()["name"] == name
    assert sorted(row[0] for row in sql("SELECT name FROM durably_signals")) == ["a b", "\u00e9t\u00e9"]
    # a name holding a slash arrives whole (the server decodes %2F before routing)
    slashed = await client.post(f"/runs/{run.id}/signals/a%2Fb", json={"payload": 1})
    assert slashed.status_code == 200 and slashed.json()["name"] == "a/b"
    assert "a/b" in [row[0] for row in sql("SELECT name FROM durably_signals")]


# --- resume -----------------------------------------------------------------------------------------


async def test_a_failed_run_resumed_over_http_completes_without_repeating_its_steps(
    working: Durably, client_for: ClientFor
) -> None:
    client = await client_for(working)
    failed = await _failed_steps_run(working)
    assert CALLS == {"fetch": 1, "save": 1}

    resumed = await client.post(f"/runs/{failed.id}/resume")
    assert resumed.status_code == 200, resumed.text
    body = resumed.json()
    assert body["id"] == failed.id and body["error"] is None and body["attempt"] == 1
    # the answer is the run itself (as for cancel): same shape as GET /runs/{id}
    assert set(body) == set((await client.get(f"/runs/{failed.id}")).json())
    done = await working.wait_for_run(failed.id, timeout=10)
    assert done.status == "completed" and done.output == ["fetch-value", "save-value", "notify-value"]
    assert CALLS == {"fetch": 1, "save": 2, "notify": 1}  # "fetch" was not executed again

    attempts = (await client.get(f"/runs/{failed.id}/attempts")).json()["attempts"]
    assert [(a["name"], a["index"], a["attempt"], a["status"]) for a in attempts] == [
        ("fetch", 0, 1, "completed"),
        ("save", 1, 1, "failed"),
        ("save", 1, 2, "completed"),
        ("notify", 2, 1, "completed"),
    ]
    assert attempts[1]["error"]["type"] == "OSError" and attempts[1]["error"]["message"] == "save failed"
    assert "Traceback" in attempts[1]["error"]["traceback"]  # no auth: the operator sees it


async def test_a_cancelled_run_can_be_resumed_and_a_body_is_refused(
    idle: Durably, client_for: ClientFor, sql: Sql
) -> None:
    client = await client_for(idle)
    run = await idle.trigger("w-steps", {"n": 1})
    await idle.cancel(run.id)
    before = _snapshot(sql)
    refused = await client.post(f"/runs/{run.id}/resume", json={"force": True})
    assert refused.status_code == 400 and refused.json()["error"] == "BadRequest"
    assert _snapshot(sql) == before
    resumed = await client.post(f"/runs/{run.id}/resume", json={})
    assert resumed.status_code == 200 and resumed.json()["status"] == "pending"


async def test_resume_is_409_for_a_pending_run(idle: Durably, client_for: ClientFor, sql: Sql) -> None:
    client = await client_for(idle)
    run = await idle.trigger("w-steps", {"n": 1})
    before = _snapshot(sql)
    response = await client.post(f"/runs/{run.id}/resume")
    assert response.status_code == 409 and response.json()["error"] == "ConflictError"
    assert "pending" in response.json()["message"]
    missing = await client.post("/runs/01NOPE/resume")
    assert missing.status_code == 404 and missing.json()["error"] == "NotFoundError"
    assert _snapshot(sql) == before


async def test_resume_is_409_for_completed_leased_and_waiting_runs(
    working: Durably, client_for: ClientFor, sql: Sql
) -> None:
    client = await client_for(working)
    completed = await working.trigger_and_wait("w-steps", {"n": 1}, timeout=10)
    leased = await working.trigger("w-hold", "resume-409")
    waiting = await working.trigger("w-nap", None)
    await wait_until(lambda: _status_in(working, {leased.id: "leased", waiting.id: "waiting"}))
    before = _snapshot(sql)
    for run, status in ((completed, "completed"), (leased, "leased"), (waiting, "waiting")):
        response = await client.post(f"/runs/{run.id}/resume")
        assert response.status_code == 409, (status, response.text)
        assert response.json()["error"] == "ConflictError" and status in response.json()["message"]
    assert _snapshot(sql) == before


async def _status_in(durably: Durably, expected: dict[str, str]) -> bool:
    return all([await _status(durably, run_id) == status for run_id, status in expected.items()])


# --- fork -------------------------------------------------------------------------------------------


async def test_a_fork_over_http_copies_the_steps_before_from_step(
    working: Durably, client_for: ClientFor
) -> None:
    client = await client_for(working)
    source = await working.trigger_and_wait("w-steps", {"n": 7}, timeout=10, labels={"team": "a"})
    assert CALLS == {"fetch": 1, "save": 1, "notify": 1}

    forked = await client.post(f"/runs/{source.id}/fork", json={"from_step": "save"})
    assert forked.status_code == 201, forked.text
    body = forked.json()
    assert set(body) == {"id", "disposition", "run"}
    assert body["disposition"] == "created" and body["id"] == body["run"]["id"] != source.id
    assert body["run"]["forked_from"] == source.id and body["run"]["job_name"] == "w-steps"
    assert body["run"]["input"] == {"n": 7} and body["run"]["labels"] == {"team": "a"}
    assert body["run"]["idempotency_key"] is None and body["run"]["concurrency_key"] is None

    done = await working.wait_for_run(body["id"], timeout=10)
    assert done.status == "completed"
    assert CALLS == {"fetch": 1, "save": 2, "notify": 2}  # "fetch" was copied, not executed
    steps = (await client.get(f"/runs/{body['id']}/steps")).json()["steps"]
    assert [(s["name"], s["output"]) for s in steps] == [
        ("fetch", "fetch-value"),
        ("save", "save-value"),
        ("notify", "notify-value"),
    ]
    assert (await working.get_run(source.id)).forked_from is None


@pytest.mark.parametrize(
    ("body", "status", "kind"),
    [
        ({"from_step": "no-such-step"}, 404, "NotFoundError"),
        (None, 400, "BadRequest"),
        ({}, 400, "BadRequest"),
        ({"from_step": ""}, 400, "BadRequest"),
        ({"from_step": 5}, 400, "BadRequest"),
        ({"from_step": "save", "labels": {"x": "y"}}, 400, "BadRequest"),
    ],
)
async def test_a_refused_fork_creates_nothing(
    idle: Durably, client_for: ClientFor, sql: Sql, body: Any, status: int, kind: str
) -> None:
    client = await client_for(idle)
    source = await idle.trigger("w-steps", {"n": 1})
    await idle.cancel(source.id)
    before = _snapshot(sql)
    response = await client.post(f"/runs/{source.id}/fork", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"] == kind
    assert _snapshot(sql) == before


async def test_fork_of_a_missing_run_is_404(idle: Durably, client_for: ClientFor) -> None:
    response = await (await client_for(idle)).post("/runs/01NOPE/fork", json={"from_step": "fetch"})
    assert response.status_code == 404 and response.json()["error"] == "NotFoundError"
    assert await idle.get_runs() == []


# --- attempts ---------------------------------------------------------------------------------------


async def test_attempts_list_every_retried_failure(working: Durably, client_for: ClientFor) -> None:
    client = await client_for(working)
    run = await working.trigger_and_wait("w-flaky", None, timeout=10)
    assert run.status == "completed" and run.output == 2
    response = await client.get(f"/runs/{run.id}/attempts")
    assert response.status_code == 200
    attempts = response.json()["attempts"]
    assert [(a["run_id"], a["name"], a["attempt"], a["status"]) for a in attempts] == [
        (run.id, "flaky", 1, "failed"),
        (run.id, "flaky", 2, "completed"),
    ]
    assert attempts[0]["error"]["message"] == "first attempt fails" and attempts[1]["error"] is None
    assert set(attempts[0]) == {
        "run_id", "index", "name", "attempt", "status", "error", "started_at", "completed_at", "duration_ms",
        "offline", "metadata",
    }
    # GET /steps keeps one row per step
    assert len((await client.get(f"/runs/{run.id}/steps")).json()["steps"]) == 1
    missing = await client.get("/runs/01NOPE/attempts")
    assert missing.status_code == 404 and missing.json()["error"] == "NotFoundError"


# --- auth hooks -------------------------------------------------------------------------------------


class Policy:
    """Tenants from ``x-tenant``; runs labelled with their tenant; async hooks like a real policy."""

    def __init__(self) -> None:
        self.access: list[tuple[str, str, str]] = []
        self.triggers: list[tuple[str, TriggerRequest]] = []
        self.readonly: set[str] = set()  # tenants that may read but change nothing
        self.no_forks: set[str] = set()  # tenants whose new runs on_trigger refuses
        self.tamper: dict[str, Any] = {}  # what on_trigger wrongly changes

    async def authenticate(self, request: Any) -> str:
        tenant = request.headers.get("x-tenant")
        if not tenant:
            raise HTTPException(401, "who are you?")
        return str(tenant)

    async def on_trigger(self, ctx: str, trigger: TriggerRequest) -> TriggerRequest:
        self.triggers.append((ctx, trigger))
        if ctx in self.no_forks:
            raise PermissionError("over quota")
        labels = {**(trigger.labels or {}), "tenant": ctx, "by": ctx}
        return trigger.namespaced(ctx).model_copy(update={"labels": labels, **self.tamper})

    async def on_run_access(self, ctx: str, run: Run, operation: str) -> None:
        await asyncio.sleep(0)
        self.access.append((ctx, run.id, operation))
        if run.labels.get("tenant") != ctx:
            raise HTTPException(403, "not your run")
        if ctx in self.readonly and operation not in ("read", "steps", "subscribe"):
            raise PermissionError("read-only tenant")


def as_(tenant: str) -> dict[str, str]:
    return {"x-tenant": tenant}


WAITING_ROUTES = [
    ("POST", "/runs/{id}/signals/approval", {"payload": {"by": "x"}}, "signal"),
    ("POST", "/runs/{id}/resume", None, "resume"),
    ("POST", "/runs/{id}/fork", {"from_step": "fetch"}, "fork"),
    ("GET", "/runs/{id}/attempts", None, "steps"),
]


async def test_each_route_asks_on_run_access_for_its_operation(
    idle: Durably, client_for: ClientFor
) -> None:
    policy = Policy()
    client = await client_for(idle, auth=policy)
    waiting = await idle.trigger("w-approve", None, labels={"tenant": "a"})
    failed = await idle.trigger("w-steps", {"n": 1}, labels={"tenant": "a"})
    await idle.cancel(failed.id)

    signal = await client.post(
        f"/runs/{waiting.id}/signals/approval", json={"payload": {"by": "a"}}, headers=as_("a")
    )
    assert signal.status_code == 200 and signal.json()["disposition"] == "stored"
    fork = await client.post(f"/runs/{failed.id}/fork", json={"from_step": "fetch"}, headers=as_("a"))
    assert fork.status_code == 404 and "no recorded step" in fork.json()["message"]  # no step recorded yet
    attempts = await client.get(f"/runs/{failed.id}/attempts", headers=as_("a"))
    assert attempts.status_code == 200 and attempts.json() == {"attempts": []}
    resume = await client.post(f"/runs/{failed.id}/resume", headers=as_("a"))
    assert resume.status_code == 200 and resume.json()["status"] == "pending"
    assert policy.access == [
        ("a", waiting.id, "signal"),
        ("a", failed.id, "fork"),
        ("a", failed.id, "steps"),
        ("a", failed.id, "resume"),
    ]


@pytest.mark.parametrize(("method", "path", "body", "operation"), WAITING_ROUTES)
async def test_another_tenants_run_is_404_like_a_missing_one(
    working: Durably, client_for: ClientFor, sql: Sql, method: str, path: str, body: Any, operation: str
) -> None:
    policy = Policy()
    client = await client_for(working, auth=policy)
    run = await _failed_steps_run(working, labels={"tenant": "a"})
    missing_id = run.id[:-1] + ("0" if run.id[-1] != "0" else "1")
    before = _snapshot(sql)

    refused = await client.request(method, path.format(id=run.id), json=body, headers=as_("b"))
    missing = await client.request(method, path.format(id=missing_id), json=body, headers=as_("b"))
    assert refused.status_code == missing.status_code == 404
    assert refused.json() == {"error": "NotFoundError", "message": f"run {run.id!r} not found"}
    assert missing.json()["message"] == f"run {missing_id!r} not found"
    # the operation was asked, refused, then read was asked (also refused) to tell 404 from 403
    assert policy.access == [("b", run.id, operation), ("b", run.id, "read")]
    assert policy.triggers == []  # a refused fork never reaches on_trigger
    assert _snapshot(sql) == before


@pytest.mark.parametrize(("method", "path", "body", "operation"), WAITING_ROUTES[:3])
async def test_a_readable_run_refused_for_the_operation_is_403(
    working: Durably, client_for: ClientFor, sql: Sql, method: str, path: str, body: Any, operation: str
) -> None:
    policy = Policy()
    policy.readonly.add("a")
    client = await client_for(working, auth=policy)
    run = await _failed_steps_run(working, labels={"tenant": "a"})
    before = _snapshot(sql)
    response = await client.request(method, path.format(id=run.id), json=body, headers=as_("a"))
    assert response.status_code == 403, response.text
    assert response.json() == {"error": "Forbidden", "message": "read-only tenant"}
    assert _snapshot(sql) == before
    # reading the attempts ("steps") stays allowed, with the traceback hidden from tenants
    attempts = (await client.get(f"/runs/{run.id}/attempts", headers=as_("a"))).json()["attempts"]
    assert [(a["name"], a["status"]) for a in attempts] == [("fetch", "completed"), ("save", "failed")]
    assert attempts[1]["error"] == {"type": "OSError", "message": "save failed", "traceback": ""}


async def test_a_fork_passes_on_trigger_and_keeps_the_labels_it_admits(
    working: Durably, client_for: ClientFor
) -> None:
    policy = Policy()
    client = await client_for(working, auth=policy)
    source = await working.trigger_and_wait(
        "w-steps", {"n": 3}, timeout=10, labels={"tenant": "a", "team": "red"}
    )
    forked = await client.post(f"/runs/{source.id}/fork", json={"from_step": "notify"}, headers=as_("a"))
    assert forked.status_code == 201, forked.text
    # the hook saw the trigger the fork amounts to: the source's job, input and labels, no keys
    [(ctx, trigger)] = policy.triggers
    assert ctx == "a"
    assert trigger == TriggerRequest(job="w-steps", input={"n": 3}, labels={"tenant": "a", "team": "red"})
    run = forked.json()["run"]
    assert run["labels"] == {"tenant": "a", "team": "red", "by": "a"}  # what the hook admitted
    assert run["forked_from"] == source.id and run["concurrency_key"] is None
    done = await working.wait_for_run(run["id"], timeout=10)
    assert done.status == "completed" and done.labels == {"tenant": "a", "team": "red", "by": "a"}
    assert CALLS == {"fetch": 1, "save": 1, "notify": 2}
    # the fork is the tenant's: listed for a, 404 for b
    assert (await client.get(f"/runs/{run['id']}", headers=as_("a"))).status_code == 200
    assert (await client.get(f"/runs/{run['id']}", headers=as_("b"))).status_code == 404


async def test_a_fork_on_trigger_rejects_creates_nothing(
    working: Durably, client_for: ClientFor, sql: Sql
) -> None:
    policy = Policy()
    policy.no_forks.add("a")
    client = await client_for(working, auth=policy)
    source = await working.trigger_and_wait("w-steps", {"n": 3}, timeout=10, labels={"tenant": "a"})
    before = _snapshot(sql)
    refused = await client.post(f"/runs/{source.id}/fork", json={"from_step": "save"}, headers=as_("a"))
    assert refused.status_code == 403 and refused.json()["message"] == "over quota"
    assert len(policy.triggers) == 1
    assert _snapshot(sql) == before
    assert [r.id for r in await working.get_runs()] == [source.id]


@pytest.mark.parametrize(
    ("tamper", "named"),
    [
        ({"input": {"n": 4}}, "input"),
        ({"job": "w-approve"}, "job"),
        ({"concurrency_key": "k"}, "concurrency_key"),
        ({"idempotency_key": "k"}, "idempotency_key"),
    ],
)
async def test_an_on_trigger_that_changes_a_fork_beyond_its_labels_is_a_hook_error(
    working: Durably, client_for: ClientFor, sql: Sql, tamper: dict[str, Any], named: str
) -> None:
    policy = Policy()
    policy.tamper = tamper
    client = await client_for(working, auth=policy)
    source = await working.trigger_and_wait("w-steps", {"n": 3}, timeout=10, labels={"tenant": "a"})
    before = _snapshot(sql)
    # a programming error of the hook: the app raises (a 500 from a server), the test client re-raises
    with pytest.raises(TypeError, match=f"on_trigger changed the {named} of a fork"):
        await client.post(f"/runs/{source.id}/fork", json={"from_step": "save"}, headers=as_("a"))
    assert _snapshot(sql) == before


async def test_resume_hides_which_run_holds_the_concurrency_key_from_tenants(
    idle: Durably, client_for: ClientFor, sql: Sql
) -> None:
    """The engine's conflict names the run pending for the key, which may be another tenant's."""
    client = await client_for(idle, auth=Policy())
    mine = await idle.trigger("w-steps", {"n": 1}, concurrency_key="shared", labels={"tenant": "a"})
    await idle.cancel(mine.id)
    theirs = await idle.trigger("w-steps", {"n": 2}, concurrency_key="shared", labels={"tenant": "b"})
    before = _snapshot(sql)
    response = await client.post(f"/runs/{mine.id}/resume", headers=as_("a"))
    assert response.status_code == 409
    assert theirs.id not in response.text and "concurrency key" in response.json()["message"]
    assert _snapshot(sql) == before
    # without auth (the operator) the engine's message is kept
    open_client = await client_for(idle)
    assert theirs.id in (await open_client.post(f"/runs/{mine.id}/resume")).text


# --- other web pages --------------------------------------------------------------------------------


def _bare_client(app: Any) -> httpx.AsyncClient:
    """Sends only the headers each request gives (no JSON content type by default)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost")


HOSTILE = [
    pytest.param({"Origin": EVIL, **JSON_HEADERS}, 403, id="cross-origin-fetch"),
    pytest.param({"Origin": "null", **JSON_HEADERS}, 403, id="sandboxed-frame"),
    pytest.param({"Sec-Fetch-Site": "cross-site", **JSON_HEADERS}, 403, id="cross-site-no-origin"),
    pytest.param({"Sec-Fetch-Site": "same-site", **JSON_HEADERS}, 403, id="same-site-no-origin"),
    pytest.param({"Origin": EVIL, "Content-Type": "text/plain;charset=UTF-8"}, 403, id="simple-fetch"),
    pytest.param({"Content-Type": "text/plain"}, 415, id="old-browser-text-plain"),
    pytest.param({"Content-Type": "application/x-www-form-urlencoded"}, 415, id="form-post"),
    pytest.param({}, 415, id="no-content-type"),
    pytest.param({"Host": "attacker.example", **JSON_HEADERS}, 421, id="dns-rebinding"),
]


@pytest.mark.parametrize(("headers", "status"), HOSTILE)
async def test_another_web_page_cannot_signal_resume_or_fork(
    idle: Durably, sql: Sql, headers: dict[str, str], status: int
) -> None:
    waiting = await idle.trigger("w-approve", None)
    source = await idle.trigger("w-steps", {"n": 1})
    await idle.cancel(source.id)
    before = _snapshot(sql)
    async with _bare_client(create_app(idle)) as client:
        for path, body in [
            (f"/runs/{waiting.id}/signals/approval", b'{"payload": {"by": "evil"}}'),
            (f"/runs/{waiting.id}/signals/approval", b""),
            (f"/runs/{source.id}/resume", b""),
            (f"/runs/{source.id}/resume", b"{}"),
            (f"/runs/{source.id}/fork", b'{"from_step": "fetch"}'),
        ]:
            response = await client.post(path, content=body, headers=headers)
            assert response.status_code == status, (path, response.text)
        if status != 415:  # run data is refused to other pages too (a GET needs no content type)
            attempts = await client.get(f"/runs/{source.id}/attempts", headers=headers)
            assert attempts.status_code == status
    assert _snapshot(sql) == before


async def test_the_same_requests_pass_from_this_origin_and_allowed_origins(idle: Durably) -> None:
    """The refusals above come from the page's origin, not from the requests themselves."""
    waiting = await idle.trigger("w-approve", None)
    source = await idle.trigger("w-steps", {"n": 1})
    await idle.cancel(source.id)
    app = create_app(idle, allowed_origins=[EVIL])
    async with _bare_client(app) as client:
        for origin in ("http://localhost", EVIL):
            headers = {"Origin": origin, **JSON_HEADERS}
            signal = await client.post(
                f"/runs/{waiting.id}/signals/approval", content=b'{"payload": {"by": "a"}}', headers=headers
            )
            assert signal.status_code == 200 and signal.json()["disposition"] == "stored"
            attempts = await client.get(f"/runs/{source.id}/attempts", headers=headers)
            assert attempts.status_code == 200
        allowed = await client.post(f"/runs/{source.id}/resume", headers={"Origin": EVIL, **JSON_HEADERS})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == EVIL
    assert await _status(idle, source.id) == "pending"


# --- streams ----------------------------------------------------------------------------------------


async def test_a_run_stream_follows_the_wait_the_signal_and_the_end(working: Durably) -> None:
    run = await working.trigger("w-approve", None)
    await wait_until(lambda: _is_waiting(working, run.id))
    async with (
        running_server(create_app(working, sse_throttle=0)) as base,
        httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(20.0), headers=JSON_HEADERS) as client,
        client.stream("GET", f"/runs/{run.id}/events") as stream,
    ):
        events = sse_events(stream)
        snapshot = await next_event(events)
        assert snapshot.event == "run:snapshot"
        assert snapshot.data["run"]["status"] == "waiting"
        assert snapshot.data["run"]["wait_reason"] == "signal"
        assert snapshot.data["run"]["wait_step"] == "approval"
        assert (await next_event(events)).event == "step:complete"  # "before", replayed
        sent = await client.post(f"/runs/{run.id}/signals/approval", json={"payload": {"by": "ana"}})
        assert sent.json()["disposition"] == "delivered"
        seen = []
        while not seen or seen[-1].event != "run:complete":
            seen.append(await next_event(events))
    kinds = [event.event for event in seen]
    assert kinds[0] == "signal:received" and kinds[-1] == "run:complete"
    assert seen[0].data["name"] == "approval" and seen[0].data["disposition"] == "delivered"
    assert "run:leased" in kinds


async def test_the_run_list_stream_shows_a_resume(working: Durably) -> None:
    failed = await _failed_steps_run(working)
    async with (
        running_server(create_app(working, sse_throttle=0)) as base,
        httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(20.0), headers=JSON_HEADERS) as client,
        client.stream("GET", "/events") as stream,
    ):
        events = sse_events(stream, comments=True)
        assert (await next_event(events)).data == {"text": "ready"}  # listening from here on
        resumed = await client.post(f"/runs/{failed.id}/resume")
        assert resumed.status_code == 200
        seen = []
        while not seen or seen[-1].event != "run:complete":
            event = await next_event(events)
            if event.event != ":":  # keep-alive comments
                seen.append(event)
    assert seen[0].event == "run:resume" and seen[0].data["run_id"] == failed.id
    assert seen[0].data["previous_status"] == "failed"
    assert seen[-1].data["run"]["status"] == "completed"


# --- OpenAPI ----------------------------------------------------------------------------------------


async def test_the_openapi_document_describes_the_waiting_routes(
    idle: Durably, client_for: ClientFor
) -> None:
    document = (await (await client_for(idle)).get("/openapi.json")).json()
    paths = document["paths"]
    schemas = document["components"]["schemas"]

    signal = paths["/runs/{run_id}/signals/{name}"]["post"]
    assert [p["name"] for p in signal["parameters"]] == ["run_id", "name"]
    assert signal["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/SignalRequest"
    }
    assert set(schemas["SignalRequest"]["properties"]) == {"payload", "signal_id"}
    assert schemas["SignalRequest"]["additionalProperties"] is False
    dispositions = schemas["SignalResult"]["properties"]["disposition"]
    assert dispositions == {"enum": ["delivered", "stored", "duplicate"]}

    fork = paths["/runs/{run_id}/fork"]["post"]
    assert fork["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ForkRequest")
    assert schemas["ForkRequest"]["required"] == ["from_step"]
    created = fork["responses"]["201"]["content"]["application/json"]["schema"]
    assert created["$ref"].endswith("/TriggerResult")

    resume = paths["/runs/{run_id}/resume"]["post"]
    assert resume["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/Run")
    attempts = paths["/runs/{run_id}/attempts"]["get"]
    listed = attempts["responses"]["200"]["content"]["application/json"]["schema"]
    assert listed["properties"]["attempts"]["items"]["$ref"].endswith("/StepAttempt")
    assert set(schemas["StepAttempt"]["properties"]) == {
        "run_id", "index", "name", "attempt", "status", "error", "started_at", "completed_at", "duration_ms",
        "offline", "metadata",
    }

    for operation in (signal, fork, resume):
        assert {"400", "403", "404", "409", "415", "421"} <= set(operation["responses"])
    assert {"403", "404", "421"} <= set(attempts["responses"]) and "415" not in attempts["responses"]
    # the run-list stream documents the waiting events it carries
    description = paths["/events"]["get"]["summary"]
    assert "run:waiting" in description and "run:resume" in description
