"""Hypothesis throws malformed bodies and query strings at every route of the HTTP API.

The invariants: no response is a 5xx, and the stored runs, steps and logs are
unchanged. Every generated body is invalid by construction (unparseable,
not an object, or an object with an unknown field or a wrongly typed one) and
DELETE only ever names runs that do not exist, so any change to the database
is a bug.

Requests go through a minimal ASGI driver rather than an HTTP client: it
sends arbitrary bytes as the query string and body, and it reads only the
status line, so the event-stream routes (which never end for a pending run)
are fuzzed like the others.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import FAST
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.routing import Mount, Route

from durably_web import Durably, StepContext, define_job
from durably_web.asgi import create_app
from durably_web.durations import parse_duration


@define_job("fuzz-echo", input=dict[str, str])
async def echo_job(step: StepContext, payload: dict[str, str]) -> dict[str, str]:
    await step.run("copy", lambda: dict(payload), type=dict[str, str])
    step.progress(1, 1, "copied")
    step.log.info("echo", payload)
    return payload


@define_job("fuzz-fail")
async def fail_job(step: StepContext, payload: Any) -> None:
    raise ValueError("always")


@dataclass
class Harness:
    runner: asyncio.Runner
    app: Any
    db_path: Path
    run_ids: list[str]

    def request(self, method: str, path: str, query: bytes, body: bytes) -> int:
        return self.runner.run(asgi_status(self.app, method, path, query, body))

    def snapshot(self) -> list[Any]:
        conn = sqlite3.connect(self.db_path)
        try:
            return [
                conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
                for table in ("durably_runs", "durably_steps", "durably_logs")
            ]
        finally:
            conn.close()


async def asgi_status(app: Any, method: str, path: str, query: bytes, body: bytes) -> int:
    """Send one request; return the response status as soon as it starts, then hang up."""
    started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    hang_up = asyncio.Event()
    sent_body = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await hang_up.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start" and not started.done():
            started.set_result(message["status"])

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": method, "scheme": "http", "path": path, "raw_path": path.encode("utf-8"),
        "root_path": "", "query_string": query, "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1234), "server": ("localhost", 80),  # no Host: the app judges this
    }
    task = asyncio.ensure_future(app(scope, receive, send))
    done, _ = await asyncio.wait({task, started}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    assert done, f"no response to {method} {path}"
    hang_up.set()
    try:
        await asyncio.wait_for(task, 30)
    except Exception as exc:  # the app raised: a 500 in a real server
        raise AssertionError(f"{method} {path}?{query!r} raised {exc!r}") from exc
    assert started.done(), f"{method} {path} ended without a response"
    return started.result()


def _table_names(db_path: Path) -> set[str]:
    conn = sqlite3.connect(db_path)
    try:
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        conn.close()


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    """Completed, failed, cancelled and pending runs; then an app over a Durably without a worker."""
    db_path = tmp_path_factory.mktemp("fuzz") / "fuzz.db"
    url = f"sqlite:///{db_path}"
    runner = asyncio.Runner()

    async def populate() -> list[str]:
        async with Durably(url, jobs=[echo_job, fail_job], **FAST) as worker:
            done = await worker.trigger_and_wait("fuzz-echo", {"a": "b"}, timeout=30, labels={"t": "x"})
            failed = await worker.trigger_and_wait("fuzz-fail", None, timeout=30)
        return [done.id, failed.id]

    async def start() -> tuple[Durably, list[str]]:
        durably = Durably(url, jobs=[echo_job, fail_job], worker=False, **FAST)
        await durably.init()
        cancelled = await durably.trigger("fuzz-echo", {"c": "d"}, idempotency_key="idem")
        await durably.cancel(cancelled.id)
        pending = await durably.trigger("fuzz-echo", {"e": "f"}, concurrency_key="ck")
        return durably, [cancelled.id, pending.id]

    with runner:
        finished = runner.run(populate())
        durably, open_runs = runner.run(start())
        assert {"durably_runs", "durably_steps", "durably_logs"} <= _table_names(db_path)
        try:
            yield Harness(runner, create_app(durably), db_path, finished + open_runs)
        finally:
            runner.run(durably.stop())


def _routes(app: Any) -> list[tuple[str, str]]:
    found = []
    for route in app.routes:
        if isinstance(route, Route):
            path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)  # {name:path} -> {name}
            found += [(method, path) for method in sorted(route.methods or ()) if method != "HEAD"]
        elif isinstance(route, Mount):
            found.append(("GET", route.path + "/{path}"))
    return found


# --- strategies -----------------------------------------------------------------

# Every field any route's body knows (POST /trigger, /trigger/batch, /purge): an
# "unknown field" drawn outside this list is unknown to every route.
KNOWN_FIELDS = [
    "job", "input", "idempotency_key", "concurrency_key", "coalesce", "labels",
    "items", "older_than", "limit", "payload", "signal_id", "from_step",
]
any_text = st.text(max_size=20)  # lone surrogates and NULs included
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), any_text
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def _is_not_json(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except (ValueError, RecursionError):
        return True
    return False


malformed_text = st.one_of(
    # Not whitespace alone: the server reads that as no body, which routes without a
    # required body (retrigger, resume) rightly accept.
    st.binary(min_size=1, max_size=200).filter(lambda raw: _is_not_json(raw) and raw.strip() != b""),
    st.sampled_from([
        b"{", b'{"job": NaN}', b'{"job": Infinity}', b'{"job": "\\ud800"}', b"\xff\xfe{}", b"[" * 50_000,
        b'{"job": "fuzz-echo",}', b"{'job': 'fuzz-echo'}", b'{"job": "fuzz-echo"} trailing',
    ]),
)
not_an_object = json_values.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode())
unknown_field = st.builds(
    lambda extra, value, base: json.dumps({**base, extra: value}).encode(),
    st.text(min_size=1, max_size=12).filter(lambda k: k not in KNOWN_FIELDS),
    json_values,
    st.dictionaries(st.sampled_from(KNOWN_FIELDS), json_values, max_size=4),
)
wrong_type = st.builds(
    lambda job, base: json.dumps({**base, "job": job}).encode(),
    json_values.filter(lambda v: not isinstance(v, str)),
    st.dictionaries(st.sampled_from(KNOWN_FIELDS), json_values, max_size=4),
)


def _valid_echo_input(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())


# Well-formed requests the engine must refuse: an unknown job, or fuzz-echo with an
# input that is not a dict of strings; keys and labels are arbitrary text.
engine_refused = st.builds(
    lambda job, options: json.dumps({"job": job, **options}).encode(),
    any_text.filter(lambda name: name not in ("fuzz-echo", "fuzz-fail")),
    st.fixed_dictionaries({}, optional={
        "input": json_values, "idempotency_key": any_text, "concurrency_key": any_text,
        "coalesce": st.just("skip"), "labels": st.dictionaries(any_text, any_text, max_size=3),
    }),
) | st.builds(
    lambda payload, options: json.dumps({"job": "fuzz-echo", "input": payload, **options}).encode(),
    json_values.filter(lambda v: not _valid_echo_input(v)),
    st.fixed_dictionaries({}, optional={
        "idempotency_key": any_text, "concurrency_key": any_text,
        "labels": st.dictionaries(any_text, any_text, max_size=3),
    }),
)
surrogate = st.characters(categories=["Cs"])
poisoned_text = st.one_of(
    st.builds(lambda a, bad, b: a + bad + b, any_text, surrogate, any_text),
    st.builds(lambda a, b: a + "\x00" + b, any_text, any_text),
    st.just(""),
    st.text(min_size=256, max_size=300),
)
# A valid job and input, but a key or a label no store can take: the request must be
# refused as a whole (not half-written, not a 500).
poisoned_options = st.one_of(
    st.builds(lambda key: {"idempotency_key": key}, poisoned_text),
    st.builds(lambda key: {"concurrency_key": key}, poisoned_text),
    st.builds(lambda key, value: {"labels": {key: value}}, poisoned_text, any_text),
    st.builds(
        lambda value: {"labels": {"ok": value}},
        st.one_of(
            st.builds(
                lambda a, bad, b: a + bad + b, any_text, st.one_of(surrogate, st.just("\x00")), any_text
            ),
            st.text(min_size=513, max_size=600),  # label values may be 512 characters
        ),
    ),
)
poisoned = st.builds(
    # ensure_ascii writes a lone surrogate as the JSON escape "\\ud800", which parses
    lambda payload, options: json.dumps({"job": "fuzz-echo", "input": payload, **options}).encode(),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
    poisoned_options,
)
malformed_bodies = st.one_of(
    malformed_text, not_an_object, unknown_field, wrong_type, engine_refused, poisoned
)

# --- POST /trigger/batch: every batch holds at least one item the server must refuse, so
# any run it creates (a batch that is not all-or-nothing) shows up in the snapshot.
text_dicts = st.dictionaries(st.text(alphabet="abcxyz", max_size=4), st.text(alphabet="abcxyz", max_size=6),
                             max_size=3)
valid_item = st.builds(lambda payload: {"input": payload}, text_dicts)
item_fields = ["input", "idempotency_key", "concurrency_key", "coalesce", "labels"]
bad_item = st.one_of(
    # not an item object
    json_values.filter(lambda v: not isinstance(v, dict)),
    # an unknown field
    st.builds(
        lambda extra, value, payload: {"input": payload, extra: value},
        st.text(min_size=1, max_size=12).filter(lambda k: k not in item_fields),
        json_values,
        text_dicts,
    ),
    # no input
    st.fixed_dictionaries({}, optional={"labels": st.just({"a": "b"}), "coalesce": st.just("skip")}),
    # an option of the wrong type
    st.builds(
        lambda field, value, payload: {"input": payload, field: value},
        st.sampled_from(["idempotency_key", "concurrency_key", "labels", "coalesce"]),
        json_values.filter(lambda v: not isinstance(v, str | type(None))),
        text_dicts,
    ),
    # an input the job refuses (not a dict of strings)
    st.builds(lambda payload: {"input": payload}, json_values.filter(lambda v: not _valid_echo_input(v))),
    # a key or label no store can take
    st.builds(lambda payload, options: {"input": payload, **options}, text_dicts, poisoned_options),
    # the concurrency key of the harness's pending run, without coalesce: a conflict
    st.builds(lambda payload: {"input": payload, "concurrency_key": "ck"}, text_dicts),
)
# Two items sharing a fresh concurrency key without coalesce: the second conflicts with the first.
conflicting_pair = st.builds(
    lambda a, b: [{"input": a, "concurrency_key": "fuzz-new"}, {"input": b, "concurrency_key": "fuzz-new"}],
    text_dicts,
    text_dicts,
)


def _batch(job: str, before: list[Any], bad: list[Any], after: list[Any]) -> bytes:
    return json.dumps({"job": job, "items": [*before, *bad, *after]}).encode()


refused_batches = st.one_of(
    st.builds(
        _batch,
        st.just("fuzz-echo"),
        st.lists(valid_item, max_size=3),
        st.one_of(bad_item.map(lambda item: [item]), conflicting_pair),
        st.lists(valid_item, max_size=3),
    ),
    # an unknown job, every item fine
    st.builds(
        _batch,
        any_text.filter(lambda name: name not in ("fuzz-echo", "fuzz-fail")),
        st.lists(valid_item, min_size=1, max_size=3),
        st.just([]),
        st.just([]),
    ),
    # a job of the wrong type, or items that are not a list
    st.builds(
        lambda job, items: json.dumps({"job": job, "items": items}).encode(),
        json_values.filter(lambda v: not isinstance(v, str)),
        st.lists(valid_item, max_size=2),
    ),
    st.builds(
        lambda items: json.dumps({"job": "fuzz-echo", "items": items}).encode(),
        json_values.filter(lambda v: not isinstance(v, list)),
    ),
    # too many items
    st.just(json.dumps({"job": "fuzz-echo", "items": [{"input": {}}] * 1001}).encode()),
    # an unknown top-level field next to valid items
    st.builds(
        lambda extra, value, items: json.dumps({"job": "fuzz-echo", "items": items, extra: value}).encode(),
        st.text(min_size=1, max_size=12).filter(lambda k: k not in ("job", "items")),
        json_values,
        st.lists(valid_item, min_size=1, max_size=2),
    ),
)

# --- POST /purge: every body is refused, so no finished run of the harness may disappear.
def _not_a_duration(value: Any) -> bool:
    """Neither a number nor a duration string ("30d"): POST /purge must refuse it."""
    if isinstance(value, str):
        try:
            parse_duration(value)
        except ValueError:
            return True
        return False
    return isinstance(value, bool) or not isinstance(value, int | float)


not_a_number = json_values.filter(_not_a_duration)
refused_purges = st.one_of(
    st.builds(lambda value: json.dumps({"older_than": value}).encode(), not_a_number),
    st.builds(
        lambda value: json.dumps({"older_than": value}).encode(),
        st.one_of(
            st.integers(max_value=-1),
            st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False),
            st.floats(min_value=1.0001e12, allow_nan=False, allow_infinity=False),
            st.integers(min_value=10**12 + 1),
        ),
    ),
    st.sampled_from([
        b'{"older_than": NaN}', b'{"older_than": Infinity}', b'{"older_than": -Infinity}',
        b'{"older_than": 1e999}', b"{}", b'{"limit": 1}', b'{"older_than": 0, "limit": 1e999}',
    ]),
    st.builds(
        lambda limit: json.dumps({"older_than": 0, "limit": limit}).encode(),
        st.one_of(
            json_values.filter(lambda v: v is not None and (isinstance(v, bool) or not isinstance(v, int))),
            st.integers(max_value=-1),
            st.integers(min_value=2**62),
        ),
    ),
    st.builds(
        lambda extra, value: json.dumps({"older_than": 0, extra: value}).encode(),
        st.text(min_size=1, max_size=12).filter(lambda k: k not in ("older_than", "limit")),
        json_values,
    ),
)

query_keys = st.one_of(
    st.sampled_from(["job", "status", "limit", "offset", "label.t", "label.", "label.bad key", "tenant"]),
    st.text(max_size=10),
)
edge_numbers = st.sampled_from(
    ["-1", "0", "1e3", "0x10", " 5", "9" * 20, str(2**63), str(2**63 - 1), str(2**64), "1" * 400]
)
query_values = st.one_of(st.text(max_size=30), st.integers().map(str), edge_numbers)


def _encode_pairs(pairs: list[tuple[str, str]]) -> bytes:
    return "&".join(f"{k}={v}" for k, v in pairs).encode("utf-8", "surrogatepass")


query_strings = st.one_of(
    st.binary(max_size=80),
    st.lists(st.tuples(query_keys, query_values), max_size=6).map(_encode_pairs),
    # every known parameter at most once, so the values themselves get tested
    st.fixed_dictionaries(
        {}, optional={key: query_values for key in ("job", "status", "limit", "offset", "label.t")}
    ).map(lambda params: _encode_pairs(list(params.items()))),
)
path_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40
).filter(lambda s: "/" not in s)


def _fill(path: str, run_id: str, rest: str) -> str:
    return path.replace("{run_id}", run_id).replace("{path}", rest)


SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)


@SETTINGS
@given(data=st.data())
def test_no_route_fails_on_malformed_input(harness: Harness, data: st.DataObject) -> None:
    before = harness.snapshot()
    method, path = data.draw(st.sampled_from(_routes(harness.app)), label="route")
    mutating = method in ("POST", "DELETE")
    if method == "DELETE":
        run_id = data.draw(path_text.filter(lambda s: s not in harness.run_ids), label="unknown run id")
    else:
        run_id = data.draw(st.one_of(st.sampled_from(harness.run_ids), path_text), label="run id")
    rest = data.draw(st.one_of(path_text, st.just("..%2F..%2Fpyproject.toml")), label="file")
    query = data.draw(query_strings, label="query")
    body = data.draw(
        malformed_bodies if mutating else st.one_of(st.just(b""), malformed_bodies), label="body"
    )

    status = harness.request(method, _fill(path, run_id, rest), query, body)

    assert status < 500, (method, path, run_id, query, body, status)
    if mutating and method == "POST":
        assert 400 <= status < 500, "a malformed body was accepted"
    assert harness.snapshot() == before


@SETTINGS
@given(body=st.one_of(poisoned, engine_refused, malformed_bodies), query=query_strings)
def test_trigger_refuses_every_malformed_body(harness: Harness, body: bytes, query: bytes) -> None:
    before = harness.snapshot()
    status = harness.request("POST", "/trigger", query, body)
    assert status in (400, 404, 413), (body, status)
    assert harness.snapshot() == before


@SETTINGS
@given(body=st.one_of(refused_batches, malformed_bodies), query=query_strings)
def test_trigger_batch_refuses_every_malformed_batch_as_a_whole(
    harness: Harness, body: bytes, query: bytes
) -> None:
    before = harness.snapshot()
    status = harness.request("POST", "/trigger/batch", query, body)
    assert status in (400, 404, 409, 413), (body, status)
    assert harness.snapshot() == before


@SETTINGS
@given(body=st.one_of(refused_purges, malformed_bodies), query=query_strings)
def test_purge_refuses_every_malformed_body(harness: Harness, body: bytes, query: bytes) -> None:
    before = harness.snapshot()
    status = harness.request("POST", "/purge", query, body)
    assert status == 400, (body, status)
    assert harness.snapshot() == before


@SETTINGS
@given(query=query_strings)
def test_list_and_stream_queries_never_fail(harness: Harness, query: bytes) -> None:
    before = harness.snapshot()
    for path in ("/runs", "/events", f"/runs/{harness.run_ids[-1]}/events"):
        assert harness.request("GET", path, query, b"") in (200, 400)
    assert harness.snapshot() == before


def test_the_harness_sees_every_route(harness: Harness) -> None:
    routes = _routes(harness.app)
    assert ("POST", "/trigger") in routes and ("DELETE", "/runs/{run_id}") in routes
    assert ("GET", "/events") in routes and ("GET", "/static/{path}") in routes
    assert ("POST", "/trigger/batch") in routes and ("POST", "/purge") in routes
    # the driver reports real statuses, so the invariants above are not vacuous
    assert harness.request("GET", f"/runs/{harness.run_ids[0]}", b"", b"") == 200
    assert harness.request("POST", "/trigger", b"", b"{") == 400
    assert harness.request("DELETE", "/runs/01NOPE", b"", b"") == 404
    assert harness.request("GET", "/runs", b"limit=x", b"") == 400
    assert harness.request("POST", "/trigger/batch", b"", b"{") == 400
    assert harness.request("POST", "/purge", b"", b"{") == 400
    # well-formed requests that change nothing: the routes do answer 2xx
    before = harness.snapshot()
    assert harness.request("POST", "/purge", b"", b'{"older_than": 1e12}') == 200
    assert harness.request("POST", "/trigger/batch", b"", b'{"job": "fuzz-echo", "items": []}') == 200
    idempotent = b'{"job": "fuzz-echo", "items": [{"input": {}, "idempotency_key": "idem"}]}'
    assert harness.request("POST", "/trigger/batch", b"", idempotent) == 200
    assert harness.snapshot() == before
