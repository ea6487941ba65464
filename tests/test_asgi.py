"""The HTTP API through httpx's ASGI transport, on a real SQLite file: routes, status codes, auth hooks."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_helpers import api_client
from helpers import wait_until
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.routing import Mount, Route

from durably_web import Durably, StepContext, define_job
from durably_web.asgi import (
    HTTPException,
    ProgressThrottle,
    RunsFilter,
    TriggerRequest,
    create_app,
)
from durably_web.asgi.app import _default_static_dir
from durably_web.errors import ValidationError
from durably_web.models import Event, Run


class EchoIn(BaseModel):
    text: str = Field(max_length=100)


class EchoOut(BaseModel):
    text: str
    length: int


def shout(text: str) -> str:
    return text.upper()


@define_job("api-echo", input=EchoIn, output=EchoOut)
async def echo_job(step: StepContext, payload: EchoIn) -> EchoOut:
    loud = await step.run("shout", shout, payload.text)
    step.progress(1, 1, "shouted")
    step.log.info("echoed", {"text": loud})
    return EchoOut(text=loud, length=len(loud))


GATES: dict[str, asyncio.Event] = {}


async def wait_for_gate(name: str) -> None:
    await GATES.setdefault(name, asyncio.Event()).wait()


@define_job("api-hold")
async def hold_job(step: StepContext, payload: Any) -> None:
    await step.run("hold", wait_for_gate, payload["gate"])


@define_job("api-fail")
async def fail_job(step: StepContext, payload: Any) -> None:
    raise RuntimeError("boom")


JOBS = (echo_job, hold_job, fail_job)
ClientFor = Callable[..., Awaitable[httpx.AsyncClient]]


@pytest.fixture
async def client_for() -> AsyncIterator[ClientFor]:
    """``await client_for(durably, auth=None, **app_options)`` -> an httpx client on the app."""
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


@pytest.fixture
async def idle(make_durably: Any) -> Durably:
    """A Durably without a worker: triggered runs stay pending."""
    return await make_durably(*JOBS, worker=False)


@pytest.fixture
async def working(make_durably: Any) -> Durably:
    return await make_durably(*JOBS)


# --- OpenAPI and plumbing --------------------------------------------------------------------------


def _app_operations(app: Starlette) -> set[tuple[str, str]]:
    operations = set()
    for route in app.routes:
        if isinstance(route, Route):
            for method in route.methods or ():
                if method != "HEAD":
                    path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)  # {name:path} -> {name}
                    operations.add((path, method.lower()))
        elif isinstance(route, Mount):
            operations.add((route.path + "/{path}", "get"))
        else:
            raise AssertionError(f"unexpected route type {route!r}")
    return operations


async def test_openapi_describes_every_route_and_nothing_else(idle: Durably, client_for: ClientFor) -> None:
    client = await client_for(idle)
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.1")
    described = {(path, method) for path, item in document["paths"].items() for method in item}
    assert described == _app_operations(create_app(idle))
    # every schema reference resolves
    text = response.text
    for name in document["components"]["schemas"]:
        text = text.replace(f'"#/components/schemas/{name}"', '""')
    assert "#/components/schemas/" not in text


async def test_health_reports_ok_and_jobs(idle: Durably, client_for: ClientFor) -> None:
    response = await (await client_for(idle)).get("/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    assert response.json()["jobs"] == ["api-echo", "api-fail", "api-hold"]


async def test_health_is_503_when_the_database_is_not_open(db_url: str, client_for: ClientFor) -> None:
    never_started = Durably(db_url, jobs=list(JOBS), worker=False)
    response = await (await client_for(never_started)).get("/health")
    assert response.status_code == 503
    assert response.json()["status"] == "unavailable"


async def test_jobs_lists_names_and_input_schemas(idle: Durably, client_for: ClientFor) -> None:
    response = await (await client_for(idle)).get("/jobs")
    assert response.status_code == 200
    jobs = {job["name"]: job["input_schema"] for job in response.json()["jobs"]}
    assert set(jobs) == {"api-echo", "api-fail", "api-hold"}
    assert jobs["api-echo"]["properties"]["text"]["type"] == "string"


async def test_unknown_route_and_method_answer_json(idle: Durably, client_for: ClientFor) -> None:
    client = await client_for(idle)
    missing = await client.get("/nope")
    assert missing.status_code == 404 and missing.json()["error"] == "HTTPError"
    wrong_method = await client.put("/runs")
    assert wrong_method.status_code == 405 and "message" in wrong_method.json()


def test_create_app_rejects_a_negative_throttle(db_url: str) -> None:
    with pytest.raises(ValidationError):
        create_app(Durably(db_url), sse_throttle=-1)


async def test_app_mounts_under_a_prefix(idle: Durably) -> None:
    outer = Starlette(routes=[Mount("/api/durably", app=create_app(idle))])
    async with api_client(outer) as client:
        assert (await client.get("/api/durably/health")).status_code == 200
        created = await client.post("/api/durably/trigger", json={"job": "api-echo", "input": {"text": "x"}})
        assert created.status_code == 201
        assert (await client.get(f"/api/durably/runs/{created.json()['id']}")).status_code == 200
        document = (await client.get("/api/durably/openapi.json")).json()
        assert document["servers"] == [{"url": "/api/durably"}]
        redirect = await client.get("/api/durably/dashboard")
        assert redirect.status_code == 307 and redirect.headers["location"] == "dashboard/"
        assert (await client.get("/runs")).status_code == 404


# --- trigger -----------------------------------------------------------------


async def test_trigger_dispositions(idle: Durably, client_for: ClientFor) -> None:
    client = await client_for(idle)
    body = {"job": "api-echo", "input": {"text": "hi"}, "labels": {"team": "a"}}
    first = await client.post("/trigger", json={**body, "idempotency_key": "k1"})
    assert first.status_code == 201
    assert first.json()["disposition"] == "created"
    run = first.json()["run"]
    assert run["id"] == first.json()["id"] and run["status"] == "pending"
    assert run["input"] == {"text": "hi"} and run["labels"] == {"team": "a"}

    again = await client.post("/trigger", json={**body, "idempotency_key": "k1"})
    assert again.status_code == 200
    assert again.json()["disposition"] == "idempotent" and again.json()["id"] == first.json()["id"]

    pending = await client.post("/trigger", json={**body, "concurrency_key": "c"})
    assert pending.status_code == 201
    conflict = await client.post("/trigger", json={**body, "concurrency_key": "c"})
    assert conflict.status_code == 409 and conflict.json()["error"] == "ConflictError"
    coalesced = await client.post("/trigger", json={**body, "concurrency_key": "c", "coalesce": "skip"})
    assert coalesced.status_code == 200
    assert coalesced.json()["disposition"] == "coalesced" and coalesced.json()["id"] == pending.json()["id"]
    assert len(await idle.get_runs()) == 2


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"job": "api-echo", "input": {"text": 5}}, ["text"]),
        ({"job": "api-echo", "input": {}}, ["text"]),
        ({"job": "api-echo", "input": {"text": "x" * 101}}, ["text"]),
        ({"job": "api-echo", "input": {"text": "x"}, "urgency": 1}, ["urgency"]),
        ({"job": 7, "input": {"text": "x"}}, ["job"]),
        ({"input": {"text": "x"}}, ["job"]),
        ({"job": "api-echo", "input": {"text": "x"}, "labels": {"k": 1}}, ["labels", "k"]),
        ({"job": "api-echo", "input": {"text": "x"}, "coalesce": "always"}, ["coalesce"]),
        ({"job": "api-echo", "input": {"text": "x"}, "idempotency_key": 3}, ["idempotency_key"]),
    ],
)
async def test_trigger_rejects_invalid_bodies_with_details(
    idle: Durably, client_for: ClientFor, body: dict[str, Any], where: list[str]
) -> None:
    response = await (await client_for(idle)).post("/trigger", json=body)
    assert response.status_code == 400
    details = response.json()["details"]
    assert any(detail["loc"][-len(where):] == where for detail in details), details
    assert await idle.get_runs() == []


@pytest.mark.parametrize(
    "raw",
    [b"{", b"[1, 2]", b"null", b'"job"', b'{"job": NaN}', b"\xff\xfe", b'{"job": "\\ud800"}', b"[" * 100_000],
)
async def test_trigger_rejects_malformed_json(idle: Durably, client_for: ClientFor, raw: bytes) -> None:
    response = await (await client_for(idle)).post("/trigger", content=raw)
    assert response.status_code == 400
    assert response.json()["error"] == "BadRequest"
    assert await idle.get_runs() == []


async def test_trigger_engine_validation_errors_are_400(idle: Durably, client_for: ClientFor) -> None:
    client = await client_for(idle)
    bad_label = await client.post("/trigger", json={"job": "api-hold", "labels": {"bad key": "v"}})
    assert bad_label.status_code == 400 and bad_label.json()["error"] == "ValidationError"
    empty_key = await client.post("/trigger", json={"job": "api-hold", "idempotency_key": ""})
    assert empty_key.status_code == 400
    assert await idle.get_runs() == []


async def test_trigger_unknown_job_is_404(idle: Durably, client_for: ClientFor) -> None:
    response = await (await client_for(idle)).post("/trigger", json={"job": "nope"})
    assert response.status_code == 404 and response.json()["error"] == "NotFoundError"


async def test_trigger_body_over_the_limit_is_413(make_durably: Any, client_for: ClientFor) -> None:
    durably = await make_durably(*JOBS, worker=False, max_payload_bytes=1000)
    response = await (await client_for(durably)).post(
        "/trigger", json={"job": "api-hold", "input": "x" * 100_000}
    )
    assert response.status_code == 413
    assert await durably.get_runs() == []


# --- batch trigger -----------------------------------------------------------------


async def test_trigger_batch_creates_every_run_in_order(idle: Durably, client_for: ClientFor) -> None:
    client = await client_for(idle)
    existing = await idle.trigger("api-echo", {"text": "old"}, idempotency_key="k-old")
    response = await client.post(
        "/trigger/batch",
        json={
            "job": "api-echo",
            "items": [
                {"input": {"text": "a"}},
                {"input": {"text": "b"}, "labels": {"team": "b"}, "concurrency_key": "cb"},
                {"input": {"text": "ignored"}, "idempotency_key": "k-old"},
                {"input": {"text": "c"}, "idempotency_key": "k-new"},
                {"input": {"text": "c again"}, "idempotency_key": "k-new"},
                {"input": {"text": "b2"}, "concurrency_key": "cb", "coalesce": "skip"},
            ],
        },
    )
    assert response.status_code == 201, response.text
    runs = response.json()["runs"]
    assert [run["disposition"] for run in runs] == [
        "created", "created", "idempotent", "created", "idempotent", "coalesced"
    ]
    assert [run["input"]["text"] for run in runs] == ["a", "b", "old", "c", "c", "b"]
    assert runs[1]["labels"] == {"team": "b"} and runs[0]["labels"] == {}
    assert runs[2]["id"] == existing.id and runs[4]["id"] == runs[3]["id"] and runs[5]["id"] == runs[1]["id"]
    assert all(run["status"] == "pending" and run["job_name"] == "api-echo" for run in runs)
    assert len(await idle.get_runs()) == 4

    # nothing new: 200, like an idempotent POST /trigger
    again = await client.post(
        "/trigger/batch",
        json={"job": "api-echo", "items": [{"input": {"text": "x"}, "idempotency_key": "k-old"}]},
    )
    assert again.status_code == 200 and again.json()["runs"][0]["id"] == existing.id
    empty = await client.post("/trigger/batch", json={"job": "api-echo", "items": []})
    assert empty.status_code == 200 and empty.json() == {"runs": []}
    assert len(await idle.get_runs()) == 4


async def test_trigger_batch_runs_execute(working: Durably, client_for: ClientFor) -> None:
    client = await client_for(working)
    response = await client.post(
        "/trigger/batch",
        json={"job": "api-echo", "items": [{"input": {"text": "x"}}, {"input": {"text": "yz"}}]},
    )
    assert response.status_code == 201
    outputs = [
        (await working.wait_for_run(run["id"], timeout=10)).to_dict()["output"]
        for run in response.json()["runs"]
    ]
    assert outputs == [{"text": "X", "length": 1}, {"text": "YZ", "length": 2}]


async def test_trigger_batch_with_one_invalid_item_creates_nothing(
    idle: Durably, client_for: ClientFor
) -> None:
    client = await client_for(idle)
    ok = {"input": {"text": "ok"}}
    engine_refused = await client.post(
        "/trigger/batch", json={"job": "api-echo", "items": [ok, {"input": {"text": 5}}, ok]}
    )
    assert engine_refused.status_code == 400
    assert engine_refused.json()["error"] == "ValidationError"
    assert engine_refused.json()["message"].startswith("batch item 1:")
    assert engine_refused.json()["details"][0]["loc"] == ["text"]

    bad_label = await client.post(
        "/trigger/batch", json={"job": "api-echo", "items": [ok, {**ok, "labels": {"bad key": "v"}}]}
    )
    assert bad_label.status_code == 400
    assert await idle.get_runs() == []


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"job": "api-echo", "items": [{"input": {"text": "x"}}, {"input": {"text": "x"}, "urgency": 1}]},
         ["items", 1, "urgency"]),
        ({"job": "api-echo", "items": [{"input": {"text": "x"}}, {"text": "x"}]}, ["items", 1, "input"]),
        ({"job": "api-echo", "items": [{"input": {"text": "x"}, "labels": {"k": 1}}]},
         ["items", 0, "labels", "k"]),
        ({"job": "api-echo", "items": [{"input": None, "coalesce": "always"}]}, ["items", 0, "coalesce"]),
        ({"job": "api-echo", "items": [{"input": None, "idempotency_key": 3}]},
         ["items", 0, "idempotency_key"]),
        ({"job": "api-echo", "items": {"input": {"text": "x"}}}, ["items"]),
        ({"job": "api-echo", "items": [{"input": {"text": "x"}}] * 1001}, ["items"]),
        ({"job": "api-echo"}, ["items"]),
        ({"items": []}, ["job"]),
        ({"job": 7, "items": []}, ["job"]),
        ({"job": "api-echo", "items": [], "labels": {}}, ["labels"]),
        ({"job": "api-echo", "input": {"text": "x"}, "items": []}, ["input"]),
    ],
)
async def test_trigger_batch_rejects_invalid_bodies_with_details(
    idle: Durably, client_for: ClientFor, body: dict[str, Any], where: list[Any]
) -> None:
    response = await (await client_for(idle)).post("/trigger/batch", json=body)
    assert response.status_code == 400
    details = response.json()["details"]
    assert any(detail["loc"][-len(where):] == where for detail in details), details
    assert await idle.get_runs() == []


@pytest.mark.parametrize(
    "raw", [b"{", b"[]", b"null", b"", b'{"job": "api-echo", "items": [{"input": NaN}]}']
)
async def test_trigger_batch_rejects_malformed_json(idle: Durably, client_for: ClientFor, raw: bytes) -> None:
    response = await (await client_for(idle)).post("/trigger/batch", content=raw)
    assert response.status_code == 400
    assert await idle.get_runs() == []


async def test_trigger_batch_concurrency_conflict_creates_nothing(
    idle: Durably, client_for: ClientFor
) -> None:
    client = await client_for(idle)
    inside = await client.post(
        "/trigger/batch",
        json={"job": "api-echo", "items": [
            {"input": {"text": "a"}}, {"input": {"text": "b"}, "concurrency_key": "c"},
            {"input": {"text": "c"}, "concurrency_key": "c"},
        ]},
    )
    assert inside.status_code == 409 and inside.json()["error"] == "ConflictError"
    assert await idle.get_runs() == []

    pending = await idle.trigger("api-echo", {"text": "p"}, concurrency_key="c")
    against_stored = await client.post(
        "/trigger/batch",
        json={
            "job": "api-echo",
            "items": [{"input": {"text": "a"}}, {"input": {"text": "b"}, "concurrency_key": "c"}],
        },
    )
    assert against_stored.status_code == 409
    assert [run.id for run in await idle.get_runs()] == [pending.id]


async def test_trigger_batch_unknown_job_and_size_limit(make_durably: Any, client_for: ClientFor) -> None:
    durably = await make_durably(*JOBS, worker=False, max_payload_bytes=1000)
    client = await client_for(durably)
    unknown = await client.post("/trigger/batch", json={"job": "nope", "items": [{"input": None}]})
    assert unknown.status_code == 404 and unknown.json()["error"] == "NotFoundError"
    too_big = await client.post(
        "/trigger/batch", json={"job": "api-hold", "items": [{"input": "x" * 500_000}] * 10}
    )
    assert too_big.status_code == 413
    item_too_big = await client.post(
        "/trigger/batch", json={"job": "api-hold", "items": [{"input": "x"}, {"input": "x" * 2000}]}
    )
    assert item_too_big.status_code == 400 and "batch item 1" in item_too_big.json()["message"]
    assert await durably.get_runs() == []


# --- purge -----------------------------------------------------------------


async def _finished_runs(durably: Durably, count: int) -> list[str]:
    ids = []
    for n in range(count):
        run = await durably.trigger("api-echo", {"text": str(n)})
        await durably.cancel(run.id)
        ids.append(run.id)
    await asyncio.sleep(0.01)  # completed_at must lie strictly before "now - older_than"
    return ids


async def test_purge_deletes_finished_runs(idle: Durably, client_for: ClientFor) -> None:
    client = await client_for(idle)
    finished = await _finished_runs(idle, 3)
    pending = await idle.trigger("api-echo", {"text": "stays"})

    recent = await client.post("/purge", json={"older_than": 3600})
    assert recent.status_code == 200 and recent.json() == {"purged": 0}
    limited = await client.post("/purge", json={"older_than": 0, "limit": 1})
    assert limited.status_code == 200 and limited.json() == {"purged": 1}
    rest = await client.post("/purge", json={"older_than": 0.0, "limit": None})
    assert rest.status_code == 200 and rest.json() == {"purged": 2}
    assert [run.id for run in await idle.get_runs()] == [pending.id]
    for run_id in finished:
        assert (await client.get(f"/runs/{run_id}")).status_code == 404


@pytest.mark.parametrize(
    ("older_than", "purged"),
    [("30d", 0), ("12h", 0), ("1.5h", 0), ("90m", 0), (" 3600 ", 0), ("0s", 1), ("0", 1), ("0.0D", 1)],
)
async def test_purge_accepts_the_command_line_duration_forms(
    idle: Durably, client_for: ClientFor, older_than: str, purged: int
) -> None:
    await _finished_runs(idle, 1)
    response = await (await client_for(idle)).post("/purge", json={"older_than": older_than})
    assert response.status_code == 200, response.text
    assert response.json() == {"purged": purged}


@pytest.mark.parametrize(
    "body",
    [
        {}, {"older_than": -1}, {"older_than": "5 fortnights"}, {"older_than": "-1d"},
        {"older_than": "1e3"}, {"older_than": "99999999999d"}, {"older_than": True}, {"older_than": None},
        {"older_than": 1, "limit": -1}, {"older_than": 1, "limit": 1.5}, {"older_than": 1, "limit": "2"},
        {"older_than": 1, "everything": True}, {"older_than": 1e13}, [1],
    ],
)
async def test_purge_rejects_invalid_bodies(idle: Durably, client_for: ClientFor, body: Any) -> None:
    await _finished_runs(idle, 1)
    response = await (await client_for(idle)).post("/purge", json=body)
    assert response.status_code == 400, response.text
    assert len(await idle.get_runs()) == 1


@pytest.mark.parametrize("raw", [b"", b"{", b'{"older_than": NaN}', b'{"older_than": 1e999}'])
async def test_purge_rejects_malformed_json(idle: Durably, client_for: ClientFor, raw: bytes) -> None:
    await _finished_runs(idle, 1)
    response = await (await client_for(idle)).post("/purge", content=raw)
    assert response.status_code == 400, response.text
    assert len(await idle.get_runs()) == 1


# --- listing -----------------------------------------------------------------


async def test_list_runs_filters_and_pages(idle: Durably, client_for: ClientFor) -> None:
    client = await client_for(idle)
    a = await idle.trigger("api-echo", {"text": "a"}, labels={"team": "red"})
    b = await idle.trigger("api-hold", {"gate": "g"}, labels={"team": "blue"})
    c = await idle.trigger("api-echo", {"text": "c"}, labels={"team": "blue", "env": "prod"})
    await idle.cancel(a.id)

    async def ids(query: str) -> list[str]:
        response = await client.get(f"/runs{query}")
        assert response.status_code == 200, response.text
        return [run["id"] for run in response.json()["runs"]]

    assert await ids("") == [c.id, b.id, a.id]
    assert await ids("?job=api-echo") == [c.id, a.id]
    assert await ids("?job=api-hold,api-echo") == [c.id, b.id, a.id]
    assert await ids("?status=cancelled") == [a.id]
    assert await ids("?status=pending&status=cancelled") == [c.id, b.id, a.id]
    assert await ids("?status=pending,leased") == [c.id, b.id]
    assert await ids("?label.team=blue") == [c.id, b.id]
    assert await ids("?label.team=blue&label.env=prod") == [c.id]
    assert await ids("?label.team=green") == []
    assert await ids("?limit=1") == [c.id]
    assert await ids("?limit=2&offset=1") == [b.id, a.id]
    assert await ids("?token=ignored-by-routes") == [c.id, b.id, a.id]
    page = (await client.get("/runs?limit=1&offset=2")).json()
    assert page["limit"] == 1 and page["offset"] == 2


@pytest.mark.parametrize(
    "query",
    [
        "status=bogus", "status=pending,nope", "limit=-1", "limit=abc", f"limit={10**6}", "offset=1e3",
        "offset=99999999999999999999", "limit=1&limit=2", "label.k=1&label.k=2", "label.bad%20key=1",
    ],
)
async def test_list_runs_rejects_bad_queries(idle: Durably, client_for: ClientFor, query: str) -> None:
    response = await (await client_for(idle)).get(f"/runs?{query}")
    assert response.status_code == 400, response.text


# --- one run -----------------------------------------------------------------


async def test_completed_run_with_steps_and_logs(working: Durably, client_for: ClientFor) -> None:
    client = await client_for(working)
    created = await client.post("/trigger", json={"job": "api-echo", "input": {"text": "hi"}})
    run_id = created.json()["id"]
    await working.wait_for_run(run_id, timeout=10)

    run = (await client.get(f"/runs/{run_id}")).json()
    assert run["status"] == "completed"
    assert run["output"] == {"text": "HI", "length": 2}
    assert run["progress"] == {"current": 1, "total": 1, "message": "shouted"}
    steps = (await client.get(f"/runs/{run_id}/steps")).json()["steps"]
    assert [(s["name"], s["status"], s["output"]) for s in steps] == [("shout", "completed", "HI")]
    assert steps[0]["duration_ms"] >= 0
    logs = (await client.get(f"/runs/{run_id}/logs")).json()["logs"]
    assert [(log["level"], log["message"], log["data"]) for log in logs] == [
        ("info", "echoed", {"text": "HI"})
    ]


async def test_failed_run_carries_error_and_traceback(working: Durably, client_for: ClientFor) -> None:
    client = await client_for(working)
    run_id = (await client.post("/trigger", json={"job": "api-fail"})).json()["id"]
    await working.wait_for_run(run_id, timeout=10)
    run = (await client.get(f"/runs/{run_id}")).json()
    assert run["status"] == "failed"
    assert run["error"]["type"] == "RuntimeError" and run["error"]["message"] == "boom"
    assert "Traceback" in run["error"]["traceback"]


RUN_ROUTES = [
    ("GET", "/runs/{id}"), ("GET", "/runs/{id}/steps"), ("GET", "/runs/{id}/logs"),
    ("GET", "/runs/{id}/events"), ("POST", "/runs/{id}/cancel"), ("POST", "/runs/{id}/retrigger"),
    ("DELETE", "/runs/{id}"), ("POST", "/runs/{id}/signals/go"), ("POST", "/runs/{id}/resume"),
    ("POST", "/runs/{id}/fork"), ("GET", "/runs/{id}/attempts"),
]


@pytest.mark.parametrize(("method", "path"), RUN_ROUTES)
async def test_unknown_run_is_404(idle: Durably, client_for: ClientFor, method: str, path: str) -> None:
    response = await (await client_for(idle)).request(method, path.format(id="01NOPE"))
    assert response.status_code == 404
    assert response.json()["error"] == "NotFoundError"


async def test_cancel_retrigger_delete(idle: Durably, client_for: ClientFor) -> None:
    client = await client_for(idle)
    run = await idle.trigger("api-echo", {"text": "x"}, labels={"team": "red"})

    refused = await client.post(f"/runs/{run.id}/cancel", json={"force": True})
    assert refused.status_code == 400
    assert (await idle.get_run(run.id)).status == "pending"

    cancelled = await client.post(f"/runs/{run.id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"

    again = await client.post(f"/runs/{run.id}/retrigger", json={})
    assert again.status_code == 201
    new = again.json()["run"]
    assert new["id"] != run.id and new["status"] == "pending"
    assert new["input"] == {"text": "x"} and new["labels"] == {"team": "red"}

    deleted = await client.delete(f"/runs/{run.id}")
    assert deleted.status_code == 200 and deleted.json() == {"id": run.id, "deleted": True}
    assert (await client.get(f"/runs/{run.id}")).status_code == 404
    assert [r.id for r in await idle.get_runs()] == [new["id"]]


async def test_conflicts_are_409(working: Durably, client_for: ClientFor) -> None:
    client = await client_for(working)
    done = await working.trigger_and_wait("api-echo", {"text": "x"}, timeout=10)
    cancel_done = await client.post(f"/runs/{done.id}/cancel")
    assert cancel_done.status_code == 409 and cancel_done.json()["error"] == "ConflictError"

    held = await working.trigger("api-hold", {"gate": "conflict"})
    await wait_until(lambda: _status_is(working, held.id, "leased"), timeout=10)
    delete_running = await client.delete(f"/runs/{held.id}")
    assert delete_running.status_code == 409
    assert (await working.get_run(held.id)).status == "leased"


async def _status_is(durably: Durably, run_id: str, status: str) -> bool:
    return (await durably.get_run(run_id)).status == status


# --- dashboard and static files -----------------------------------------------------------------


async def test_dashboard_and_static_files(idle: Durably, client_for: ClientFor, tmp_path: Path) -> None:
    static = tmp_path / "static"
    static.mkdir()
    (static / "dashboard.html").write_text("<h1>runs</h1>")
    (static / "durably.js").write_text("export const x = 1;")
    (tmp_path / "secret.txt").write_text("no")
    client = await client_for(idle, static_dir=static)

    redirect = await client.get("/dashboard")
    assert redirect.status_code == 307 and redirect.headers["location"] == "dashboard/"
    page = await client.get("/dashboard/")
    assert page.status_code == 200 and page.text == "<h1>runs</h1>"
    assert page.headers["content-type"].startswith("text/html")
    for path in ("/static/durably.js", "/dashboard/durably.js"):
        script = await client.get(path)
        assert script.status_code == 200 and "export const x" in script.text
    assert (await client.get("/static/missing.js")).status_code == 404
    assert (await client.get("/static/..%2Fsecret.txt")).status_code == 404
    assert (await client.get("/static/../secret.txt")).status_code == 404


async def test_dashboard_falls_back_to_index_html(
    idle: Durably, client_for: ClientFor, tmp_path: Path
) -> None:
    (tmp_path / "index.html").write_text("index page")
    client = await client_for(idle, static_dir=tmp_path)
    assert (await client.get("/dashboard/")).text == "index page"


async def test_missing_static_folder_is_a_clear_404(
    idle: Durably, client_for: ClientFor, tmp_path: Path
) -> None:
    client = await client_for(idle, static_dir=tmp_path / "not-there")
    for path in ("/dashboard/", "/static/durably.js", "/dashboard/durably.js"):
        response = await client.get(path)
        assert response.status_code == 404
        assert "not installed" in response.json()["message"]
    empty = await client_for(idle, static_dir=tmp_path)
    response = await empty.get("/dashboard/")
    assert response.status_code == 404 and "dashboard.html" in response.json()["message"]


def test_default_static_folder_is_next_to_the_package() -> None:
    import durably_web

    package = Path(durably_web.__file__).resolve().parent
    found = _default_static_dir()
    candidates = [package / "static", package.parent / "static"]
    if any(candidate.is_dir() for candidate in candidates):
        assert found in candidates and found is not None and found.is_dir()
    else:
        assert found is None


# --- progress throttle -----------------------------------------------------------------


def _event(kind: str, run_id: str, current: int = 0) -> Event:
    return Event(kind, run_id, "job", datetime.now(UTC), {"progress": current})


def test_progress_throttle_holds_and_always_delivers_the_latest() -> None:
    now = [100.0]
    throttle = ProgressThrottle(1.0, clock=lambda: now[0])

    def currents(events: list[Event]) -> list[tuple[str, str | None, int]]:
        return [(e.type, e.run_id, e.data["progress"]) for e in events]

    assert currents(throttle.offer(_event("run:progress", "a", 1))) == [("run:progress", "a", 1)]
    assert throttle.offer(_event("run:progress", "a", 2)) == []
    assert throttle.offer(_event("run:progress", "a", 3)) == []
    # another run has its own slot
    assert currents(throttle.offer(_event("run:progress", "b", 1))) == [("run:progress", "b", 1)]
    assert throttle.seconds_until_due() == 1.0
    now[0] += 0.5
    assert throttle.due() == [] and throttle.seconds_until_due() == 0.5
    now[0] += 0.5
    assert currents(throttle.due()) == [("run:progress", "a", 3)]
    assert throttle.seconds_until_due() is None
    # a held progress is released before the run's next event, in order
    assert throttle.offer(_event("run:progress", "a", 4)) == []
    released = throttle.offer(_event("run:complete", "a"))
    assert currents(released) == [("run:progress", "a", 4), ("run:complete", "a", 0)]
    # after the terminal event the run starts afresh
    assert currents(throttle.offer(_event("run:progress", "a", 5))) == [("run:progress", "a", 5)]


def test_progress_throttle_zero_passes_everything() -> None:
    throttle = ProgressThrottle(0)
    events = [_event("run:progress", "a", n) for n in range(5)]
    assert [sent for event in events for sent in throttle.offer(event)] == events


# --- auth hooks -----------------------------------------------------------------


class TenantAuth:
    """A multi-tenant policy: the tenant comes from a header (or ?tenant= for EventSource)."""

    def __init__(self) -> None:
        self.access: list[tuple[str, str, str]] = []
        self.triggers: list[tuple[str, TriggerRequest]] = []

    async def authenticate(self, request: Any) -> str:
        tenant = request.headers.get("x-tenant") or request.query_params.get("tenant")
        if not tenant:
            raise HTTPException(401, "who are you?")
        if tenant == "blocked":
            raise HTTPException(403, "this tenant is blocked")
        return str(tenant)

    def on_trigger(self, ctx: str, trigger: TriggerRequest) -> TriggerRequest:
        self.triggers.append((ctx, trigger))
        if trigger.job == "api-fail":
            raise PermissionError(f"{ctx} may not run api-fail")
        if (trigger.labels or {}).get("secret") == "yes":
            raise PermissionError("secret runs are not allowed")
        return trigger.model_copy(update={"labels": {**(trigger.labels or {}), "tenant": ctx}})

    async def on_run_access(self, ctx: str, run: Run, operation: str) -> None:
        self.access.append((ctx, run.id, operation))
        if run.labels.get("tenant") != ctx:
            raise HTTPException(403, "not your run")

    def scope_runs(self, ctx: str, runs_filter: RunsFilter) -> RunsFilter:
        return dataclasses.replace(runs_filter, labels={**runs_filter.labels, "tenant": ctx})


def as_tenant(tenant: str) -> dict[str, str]:
    return {"x-tenant": tenant}


class AdminAuth(TenantAuth):
    """TenantAuth where the tenant "admin" (only) may purge; the hook is async."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []

    async def can_purge(self, ctx: str) -> bool:
        self.asked.append(ctx)
        return ctx == "admin"


ALL_API_ROUTES = [
    ("GET", "/jobs"), ("POST", "/trigger"), ("POST", "/trigger/batch"), ("POST", "/purge"), ("GET", "/runs"),
    ("GET", "/events"), *RUN_ROUTES,
]


@pytest.mark.parametrize(("method", "path"), ALL_API_ROUTES)
async def test_every_api_route_needs_authentication(
    idle: Durably, client_for: ClientFor, method: str, path: str
) -> None:
    run = await idle.trigger("api-echo", {"text": "x"}, labels={"tenant": "a"})
    client = await client_for(idle, auth=TenantAuth())
    url = path.format(id=run.id)
    bodies: dict[str, Any] = {
        "/trigger": {"job": "api-echo", "input": {"text": "y"}},
        "/trigger/batch": {"job": "api-echo", "items": [{"input": {"text": "y"}}]},
        "/purge": {"older_than": 0},
    }
    response = await client.request(method, url, json=bodies.get(path))
    assert response.status_code == 401
    assert response.json()["message"] == "who are you?"
    blocked = await client.request(method, url, headers=as_tenant("blocked"), json=bodies.get(path))
    assert blocked.status_code == 403
    assert [r.id for r in await idle.get_runs()] == [run.id]
    assert (await idle.get_run(run.id)).status == "pending"


async def test_health_and_openapi_need_no_authentication(idle: Durably, client_for: ClientFor) -> None:
    client = await client_for(idle, auth=TenantAuth())
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/openapi.json")).status_code == 200


async def test_a_tenant_cannot_touch_another_tenants_run(idle: Durably, client_for: ClientFor) -> None:
    auth = TenantAuth()
    client = await client_for(idle, auth=auth)
    created = await client.post("/trigger", json={"job": "api-echo", "input": {"text": "mine"}},
                                headers=as_tenant("a"))
    assert created.status_code == 201
    run_id = created.json()["id"]
    assert created.json()["run"]["labels"] == {"tenant": "a"}
    auth.access.clear()

    for method, path in RUN_ROUTES:
        response = await client.request(method, path.format(id=run_id), headers=as_tenant("b"))
        # 404, as for a missing run: the answer must not tell that the id exists
        assert response.status_code == 404, (method, path, response.text)
        assert response.json() == {"error": "NotFoundError", "message": f"run {run_id!r} not found"}
    # an operation other than read is refused, then read is asked to tell 403 from 404
    assert auth.access == [
        ("b", run_id, operation)
        for asked in (
            "read", "steps", "read", "subscribe", "cancel", "retrigger", "delete", "signal", "resume", "fork",
            "steps",
        )
        for operation in ((asked,) if asked == "read" else (asked, "read"))
    ]
    # nothing happened to the run, and nothing new was created
    assert [(r.id, r.status) for r in await idle.get_runs()] == [(run_id, "pending")]

    # lists are scoped: b does not see it, even asking for a's label
    for query in ("", "?label.tenant=a", "?job=api-echo&status=pending&label.tenant=a"):
        listed = await client.get(f"/runs{query}", headers=as_tenant("b"))
        assert listed.status_code == 200 and listed.json()["runs"] == []
    mine = await client.get("/runs", headers=as_tenant("a"))
    assert [r["id"] for r in mine.json()["runs"]] == [run_id]

    # the owner may do everything
    assert (await client.get(f"/runs/{run_id}", headers=as_tenant("a"))).status_code == 200
    assert (await client.get(f"/runs/{run_id}/steps", headers=as_tenant("a"))).status_code == 200
    assert (await client.get(f"/runs/{run_id}/logs", headers=as_tenant("a"))).status_code == 200
    assert (await client.post(f"/runs/{run_id}/cancel", headers=as_tenant("a"))).status_code == 200
    again = await client.post(f"/runs/{run_id}/retrigger", headers=as_tenant("a"))
    assert again.status_code == 201 and again.json()["run"]["labels"] == {"tenant": "a"}
    assert (await client.delete(f"/runs/{run_id}", headers=as_tenant("a"))).status_code == 200


async def test_on_trigger_stamps_the_tenant_and_may_reject(idle: Durably, client_for: ClientFor) -> None:
    client = await client_for(idle, auth=TenantAuth())
    spoofed = await client.post(
        "/trigger", json={"job": "api-echo", "input": {"text": "x"}, "labels": {"tenant": "b", "k": "v"}},
        headers=as_tenant("a"),
    )
    assert spoofed.status_code == 201
    assert spoofed.json()["run"]["labels"] == {"tenant": "a", "k": "v"}
    refused = await client.post("/trigger", json={"job": "api-fail"}, headers=as_tenant("a"))
    assert refused.status_code == 403 and "may not run api-fail" in refused.json()["message"]
    assert len(await idle.get_runs()) == 1


async def test_keys_do_not_leak_another_tenants_run(idle: Durably, client_for: ClientFor) -> None:
    client = await client_for(idle, auth=TenantAuth())
    body = {"job": "api-echo", "input": {"text": "x"}}
    mine = await client.post("/trigger", json={**body, "idempotency_key": "shared"}, headers=as_tenant("a"))
    theirs = await client.post("/trigger", json={**body, "idempotency_key": "shared"}, headers=as_tenant("b"))
    assert theirs.status_code == 409
    assert mine.json()["id"] not in theirs.text

    pending = await client.post("/trigger", json={**body, "concurrency_key": "c"}, headers=as_tenant("a"))
    clash = await client.post("/trigger", json={**body, "concurrency_key": "c"}, headers=as_tenant("b"))
    assert clash.status_code == 409 and pending.json()["id"] not in clash.text
    skip = await client.post(
        "/trigger", json={**body, "concurrency_key": "c", "coalesce": "skip"}, headers=as_tenant("b")
    )
    assert skip.status_code == 409 and pending.json()["id"] not in skip.text

    same_tenant = await client.post(
        "/trigger", json={**body, "idempotency_key": "shared"}, headers=as_tenant("a")
    )
    assert same_tenant.status_code == 200 and same_tenant.json()["id"] == mine.json()["id"]
    assert len(await idle.get_runs()) == 2


async def test_batch_applies_on_trigger_to_every_item(idle: Durably, client_for: ClientFor) -> None:
    auth = TenantAuth()
    client = await client_for(idle, auth=auth)
    items = [
        {"input": {"text": "a"}},
        {"input": {"text": "b"}, "labels": {"tenant": "b", "k": "v"}, "idempotency_key": "i"},
    ]
    response = await client.post("/trigger/batch", json={"job": "api-echo", "items": items},
                                 headers=as_tenant("a"))
    assert response.status_code == 201, response.text
    assert [run["labels"] for run in response.json()["runs"]] == [{"tenant": "a"}, {"tenant": "a", "k": "v"}]
    assert [(ctx, t.job, t.input, t.idempotency_key) for ctx, t in auth.triggers] == [
        ("a", "api-echo", {"text": "a"}, None), ("a", "api-echo", {"text": "b"}, "i"),
    ]

    # one refused item refuses the batch: nothing of it is created
    refused = await client.post(
        "/trigger/batch",
        json={
            "job": "api-echo",
            "items": [{"input": {"text": "c"}}, {"input": {"text": "d"}, "labels": {"secret": "yes"}}],
        },
        headers=as_tenant("a"),
    )
    assert refused.status_code == 403 and refused.json()["message"] == "secret runs are not allowed"
    whole_job = await client.post(
        "/trigger/batch", json={"job": "api-fail", "items": [{"input": None}]}, headers=as_tenant("a")
    )
    assert whole_job.status_code == 403
    assert len(await idle.get_runs()) == 2

    # the runs are the tenant's own: b does not see them, a does
    assert (await client.get("/runs", headers=as_tenant("b"))).json()["runs"] == []
    assert len((await client.get("/runs", headers=as_tenant("a"))).json()["runs"]) == 2


async def test_batch_keys_do_not_leak_another_tenants_run(idle: Durably, client_for: ClientFor) -> None:
    client = await client_for(idle, auth=TenantAuth())
    body = {"job": "api-echo", "input": {"text": "x"}}
    mine = await client.post("/trigger", json={**body, "idempotency_key": "shared"}, headers=as_tenant("a"))
    pending = await client.post("/trigger", json={**body, "concurrency_key": "c"}, headers=as_tenant("a"))
    before = sorted(run.id for run in await idle.get_runs())

    for clash in (
        {"input": {"text": "y"}, "idempotency_key": "shared"},
        {"input": {"text": "y"}, "concurrency_key": "c", "coalesce": "skip"},
        {"input": {"text": "y"}, "concurrency_key": "c"},
    ):
        theirs = await client.post(
            "/trigger/batch",
            json={
                "job": "api-echo",
                "items": [{"input": {"text": "new"}}, clash, {"input": {"text": "new2"}}],
            },
            headers=as_tenant("b"),
        )
        assert theirs.status_code == 409, (clash, theirs.text)
        assert theirs.json()["error"] == "ConflictError" and "details" not in theirs.json()
        assert mine.json()["id"] not in theirs.text and pending.json()["id"] not in theirs.text
        # all or nothing: the batch's other items were not created (or were taken back)
        assert sorted(run.id for run in await idle.get_runs()) == before

    same_tenant = await client.post(
        "/trigger/batch",
        json={"job": "api-echo", "items": [{"input": {"text": "y"}, "idempotency_key": "shared"}]},
        headers=as_tenant("a"),
    )
    assert same_tenant.status_code == 200 and same_tenant.json()["runs"][0]["id"] == mine.json()["id"]


async def test_batch_on_trigger_replacement_is_honoured(idle: Durably, client_for: ClientFor) -> None:
    class Rewrite:
        def on_trigger(self, ctx: Any, trigger: TriggerRequest) -> TriggerRequest | None:
            if trigger.input == {"text": "keep"}:
                return None
            return trigger.model_copy(update={"input": {"text": "rewritten"}, "concurrency_key": "rw"})

    client = await client_for(idle, auth=Rewrite())
    response = await client.post(
        "/trigger/batch",
        json={"job": "api-echo", "items": [{"input": {"text": "keep"}}, {"input": {"text": "other"}}]},
    )
    assert response.status_code == 201
    runs = response.json()["runs"]
    assert [(r["input"], r["concurrency_key"]) for r in runs] == [
        ({"text": "keep"}, None), ({"text": "rewritten"}, "rw")
    ]


async def test_purge_needs_the_can_purge_hook(idle: Durably, client_for: ClientFor) -> None:
    await _finished_runs(idle, 2)
    without_hook = await client_for(idle, auth=TenantAuth())
    refused = await without_hook.post("/purge", json={"older_than": 0}, headers=as_tenant("admin"))
    assert refused.status_code == 403 and refused.json()["error"] == "Forbidden"
    assert (await without_hook.post("/purge", json={"older_than": 0})).status_code == 401

    auth = AdminAuth()
    client = await client_for(idle, auth=auth)
    tenant = await client.post("/purge", json={"older_than": 0}, headers=as_tenant("a"))
    assert tenant.status_code == 403
    # the hook decides before the body is looked at
    assert (await client.post("/purge", json={"older_than": -1}, headers=as_tenant("a"))).status_code == 403
    assert len(await idle.get_runs()) == 2

    admin = await client.post("/purge", json={"older_than": 0, "limit": 1}, headers=as_tenant("admin"))
    assert admin.status_code == 200 and admin.json() == {"purged": 1}
    assert auth.asked == ["a", "a", "admin"]
    assert len(await idle.get_runs()) == 1


async def test_purge_refuses_anything_but_true(idle: Durably, client_for: ClientFor) -> None:
    await _finished_runs(idle, 1)

    class Sloppy:
        def can_purge(self, ctx: Any) -> Any:
            return "yes"

    response = await (await client_for(idle, auth=Sloppy())).post("/purge", json={"older_than": 0})
    assert response.status_code == 403
    assert len(await idle.get_runs()) == 1



# --- deadlines and versions ----------------------------------------------------------------------


async def test_trigger_takes_a_run_timeout_and_lists_filter_by_version(
    make_durably: Any, client_for: ClientFor
) -> None:
    @define_job("api-versioned", version="7", timeout="1h")
    async def versioned_job(step: StepContext, payload: Any) -> None: ...

    durably = await make_durably(*JOBS, versioned_job, worker=False)
    client = await client_for(durably)
    by_default = (await client.post("/trigger", json={"job": "api-versioned"})).json()["run"]
    shorter = (await client.post("/trigger", json={"job": "api-versioned", "timeout": "90s"})).json()["run"]
    body = {"job": "api-echo", "input": {"text": "a"}, "timeout": 5}
    seconds = (await client.post("/trigger", json=body)).json()["run"]
    for run, timeout in ((by_default, 3600), (shorter, 90), (seconds, 5)):
        created = datetime.fromisoformat(run["created_at"])
        assert datetime.fromisoformat(run["deadline_at"]) - created == timedelta(seconds=timeout)
    assert by_default["version"] == "7"
    for bad in (0, -5, "soon", True):
        refused = await client.post("/trigger", json={"job": "api-versioned", "timeout": bad})
        assert refused.status_code == 400, (bad, refused.text)
    batch = await client.post(
        "/trigger/batch", json={"job": "api-versioned", "items": [{"input": None, "timeout": "2m"}]}
    )
    [item] = batch.json()["runs"]
    assert datetime.fromisoformat(item["deadline_at"]) - datetime.fromisoformat(
        item["created_at"]
    ) == timedelta(minutes=2)
    listed = (await client.get("/runs", params={"version": "7"})).json()["runs"]
    assert [r["id"] for r in listed] == [item["id"], shorter["id"], by_default["id"]]
    assert all(r["version"] == "7" and r["deadline_at"] for r in listed)
    assert (await client.get("/runs", params={"version": "8,9"})).json()["runs"] == []
    again = (await client.post(f"/runs/{shorter['id']}/retrigger")).json()["run"]
    assert datetime.fromisoformat(again["deadline_at"]) - datetime.fromisoformat(
        again["created_at"]
    ) == timedelta(seconds=90)
