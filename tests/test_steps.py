"""``StepContext``: replay, typed round trips, persistence errors, names, determinism, sync steps."""

from __future__ import annotations

import asyncio
import math
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from enum import Enum
from typing import Any
from uuid import UUID

import pytest
from helpers import wait_event, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from durably_web import StepContext, StepError, define_job
from durably_web.serialization import _NO_TYPE, decode, encode

pytestmark = pytest.mark.all_backends

# --- types used through return annotations (module level so annotations resolve) ---------------


class Money(BaseModel):
    amount: Decimal
    currency: str
    at: datetime


@dataclass
class Point:
    x: int
    tags: tuple[str, ...]


class Color(Enum):
    RED = "red"
    BLUE = "blue"


calls: Counter[str] = Counter()


def make_money() -> Money:
    calls["model"] += 1
    return Money(
        amount=Decimal("12.30"), currency="EUR", at=datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)
    )


def make_datetime() -> datetime:
    calls["datetime"] += 1
    return datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=timezone(timedelta(hours=2)))


async def make_point_async() -> Point:
    calls["dataclass-annotated"] += 1
    return Point(x=3, tags=["a", "b"])  # type: ignore[arg-type] - becomes a tuple on the round trip


def make_money_map() -> dict[str, Money]:
    calls["dict-of-models"] += 1
    return {"a": make_money()}


def maybe_int() -> int | None:
    calls["optional"] += 1
    return None


def make_color() -> Color:
    calls["enum"] += 1
    return Color.BLUE


def add(a: int, b: int, *, c: int = 0) -> int:
    calls["add"] += 1
    return a + b + c


def not_an_int() -> int:
    return "abc"  # type: ignore[return-value]


def counted(name: str, value: Any):
    def fn():
        calls[name] += 1
        return value

    return fn


# (step name, how step.run is called) — the value comes from fn, the type from annotation or type=
TYPED_STEPS: list[tuple[str, Any, dict[str, Any]]] = [
    ("json", counted("json", {"a": [1, 2.5, "x", None, True], "b": {}, "c": -7}), {}),
    ("float", counted("float", 1.0), {}),
    ("model", make_money, {}),
    ("dataclass-type", counted("dataclass-type", Point(1, ["x"])), {"type": Point}),  # type: ignore[arg-type]
    ("dataclass-annotated", make_point_async, {}),
    ("datetime", make_datetime, {}),
    ("naive-datetime", counted("naive-datetime", datetime(2020, 2, 29, 23, 59)), {"type": datetime}),
    ("date", counted("date", date(1999, 12, 31)), {"type": date}),
    ("timedelta", counted("timedelta", timedelta(days=1, seconds=5)), {"type": timedelta}),
    ("uuid", counted("uuid", UUID("12345678-1234-5678-1234-567812345678")), {"type": UUID}),
    ("decimal", counted("decimal", Decimal("0.1")), {"type": Decimal}),
    ("set", counted("set", {3, 1, 2}), {"type": set[int]}),
    ("tuple", counted("tuple", (1, "one")), {"type": tuple[int, str]}),
    ("dict-of-models", make_money_map, {}),
    ("optional", maybe_int, {}),
    ("enum", make_color, {}),
    ("none", counted("none", None), {}),
]


def _deep_types(value: Any) -> Any:
    """The value's type tree, so "same type" covers nested fields too."""
    if isinstance(value, dict):
        return (dict, {k: _deep_types(v) for k, v in value.items()})
    if isinstance(value, list | tuple | set):
        return (type(value), sorted(repr(_deep_types(v)) for v in value))
    if isinstance(value, BaseModel):
        return (type(value), {k: _deep_types(getattr(value, k)) for k in type(value).model_fields})
    if hasattr(value, "__dataclass_fields__"):
        return (type(value), {k: _deep_types(getattr(value, k)) for k in value.__dataclass_fields__})
    if isinstance(value, datetime):
        return (datetime, value.utcoffset())
    return type(value)


# --- replay -----------------------------------------------------------------


async def test_replayed_values_equal_first_values_with_the_same_types(make_durably):
    calls.clear()
    first: dict[str, Any] = {}
    replayed: dict[str, Any] = {}
    replay_flags: list[bool] = []
    holding = asyncio.Event()

    async def hold() -> None:
        holding.set()
        await asyncio.Event().wait()  # until the worker is stopped

    async def release() -> None:
        return None

    @define_job("typed")
    async def typed(step: StepContext, payload: Any) -> None:
        seen = first if step.attempt == 1 else replayed
        for name, fn, options in TYPED_STEPS:
            replay_flags.append(step.is_replaying)
            seen[name] = await step.run(name, fn, **options)
        await step.run("hold", hold if step.attempt == 1 else release)
        assert not step.is_replaying

    a = await make_durably(typed, shutdown_timeout=0.2)
    run = await a.trigger(typed, None)
    await wait_event(holding)
    await a.stop()  # the handler does not reach a step boundary: cancelled and released

    b = await make_durably(typed)
    done = await b.wait_for_run(run.id, timeout=30)
    assert done.status == "completed", done.error
    assert done.attempt == 2
    assert set(replayed) == {name for name, _, _ in TYPED_STEPS}
    for name, _, _ in TYPED_STEPS:
        assert replayed[name] == first[name], name
        assert _deep_types(replayed[name]) == _deep_types(first[name]), name
    # Each callable ran once, on the first attempt only.
    assert all(count == 1 for name, count in calls.items() if name != "model"), calls
    assert calls["model"] == 2  # once directly, once inside make_money_map
    # First execution already returns the round-tripped value: the list became a tuple.
    assert first["dataclass-type"] == Point(1, ("x",))
    assert isinstance(first["dataclass-type"].tags, tuple)
    assert first["dataclass-annotated"].tags == ("a", "b")
    assert first["datetime"].utcoffset() == timedelta(hours=2)
    assert first["naive-datetime"].tzinfo is None
    assert first["set"] == {1, 2, 3} and isinstance(first["set"], set)
    assert first["tuple"] == (1, "one")
    assert first["enum"] is Color.BLUE and replayed["enum"] is Color.BLUE
    assert isinstance(first["float"], float) and isinstance(replayed["float"], float)
    n = len(TYPED_STEPS)
    assert replay_flags[:n] == [False] * n  # first attempt
    assert replay_flags[n:] == [True] * n  # every recorded step is replayed


async def test_first_execution_returns_a_copy_not_the_callables_object(make_durably):
    original = {"items": [1, 2]}
    returned: list[Any] = []

    @define_job("copy")
    async def copy_job(step: StepContext, payload: Any) -> None:
        returned.append(await step.run("data", lambda: original))

    durably = await make_durably(copy_job)
    await durably.trigger_and_wait(copy_job, None, timeout=30)
    assert returned == [original]
    assert returned[0] is not original


async def test_a_completed_step_is_committed_before_the_next_step_starts(make_durably, db_path):
    seen_by_second: list[Any] = []

    def second() -> str:
        # An independent connection sees the first step already committed.
        conn = sqlite3.connect(db_path)
        try:
            seen_by_second.extend(
                conn.execute("SELECT seq, name, status, output FROM durably_steps").fetchall()
            )
        finally:
            conn.close()
        return "ok"

    @define_job("ordered")
    async def ordered(step: StepContext, payload: Any) -> None:
        await step.run("first", lambda: {"v": 1})
        await step.run("second", second)

    durably = await make_durably(ordered)
    done = await durably.trigger_and_wait(ordered, None, timeout=30)
    assert done.status == "completed"
    assert seen_by_second == [(0, "first", "completed", '{"v":1}')]


async def test_args_and_kwargs_are_passed_to_the_callable(make_durably):
    results: list[int] = []

    async def async_add(a: int, b: int) -> int:
        return a * b

    @define_job("args")
    async def args_job(step: StepContext, payload: Any) -> None:
        results.append(await step.run("sync", add, 1, 2, c=3))
        results.append(await step.run("async", async_add, 4, b=5))

    durably = await make_durably(args_job)
    await durably.trigger_and_wait(args_job, None, timeout=30)
    assert results == [6, 20]


# --- results that cannot be persisted -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fn", "options", "message"),
    [
        (lambda: object(), {}, "not a plain JSON value"),
        (lambda: {1, 2}, {}, "not a plain JSON value"),
        (lambda: {1: "int key"}, {}, "not a plain JSON value"),
        (lambda: datetime(2024, 1, 1), {}, "annotate the callable's return type"),
        (lambda: math.nan, {}, "cannot be stored as JSON"),
        (not_an_int, {}, "does not round-trip"),
        (lambda: object(), {"type": Point}, "step 'produce'"),
    ],
)
async def test_unpersistable_result_fails_the_step_before_the_next_step(make_durably, fn, options, message):
    after: list[str] = []

    @define_job("unpersistable")
    async def job(step: StepContext, payload: Any) -> None:
        await step.run("fine", lambda: 1)
        await step.run("produce", fn, **options)
        await step.run("after", lambda: after.append("ran"))

    durably = await make_durably(job)
    done = await durably.trigger_and_wait(job, None, timeout=30)
    assert done.status == "failed"
    assert done.error.type == "StepError"
    assert "step 'produce'" in done.error.message
    assert message in done.error.message
    assert after == []
    steps = await durably.get_steps(done.id)
    assert [(s.name, s.status) for s in steps] == [("fine", "completed"), ("produce", "failed")]
    assert steps[1].error.type == "StepError"


async def test_unannotated_result_may_be_given_a_type(make_durably):
    out: list[Any] = []

    @define_job("typed-lambda")
    async def job(step: StepContext, payload: Any) -> None:
        out.append(await step.run("when", lambda: datetime(2024, 1, 1), type=datetime))

    durably = await make_durably(job)
    done = await durably.trigger_and_wait(job, None, timeout=30)
    assert done.status == "completed"
    assert out == [datetime(2024, 1, 1)]


async def test_an_unresolvable_return_annotation_is_named_with_its_reason_and_the_fix(make_durably):
    # This module has 'from __future__ import annotations': '-> Local' is the string
    # 'Local', which is not in the module's globals, so it cannot be resolved.
    class Local(BaseModel):
        x: int

    def make_local() -> Local:
        return Local(x=1)

    errors: list[str] = []
    typed: list[Any] = []

    @define_job("local-annotation")
    async def job(step: StepContext, payload: Any) -> None:
        try:
            await step.run("untyped", make_local)
        except StepError as exc:
            errors.append(str(exc))
        typed.append(await step.run("typed", make_local, type=Local))

    durably = await make_durably(job)
    done = await durably.trigger_and_wait(job, None, timeout=30)
    assert done.status == "completed", done.error
    [message] = errors
    assert "step 'untyped'" in message
    assert "return annotation 'Local' of " in message and "make_local()" in message
    assert "NameError: name 'Local' is not defined" in message
    assert "pass type=Local to step.run()" in message
    assert "annotate the callable's return type" not in message  # it was annotated
    assert typed == [Local(x=1)]


async def test_an_unresolvable_parameter_annotation_does_not_hide_the_return_type(make_durably):
    class Local:
        pass

    def make_point(unused: Local | None = None) -> Point:
        return Point(3, ("p",))

    out: list[Any] = []

    @define_job("local-parameter")
    async def job(step: StepContext, payload: Any) -> None:
        out.append(await step.run("point", make_point))

    durably = await make_durably(job)
    done = await durably.trigger_and_wait(job, None, timeout=30)
    assert done.status == "completed", done.error
    assert out == [Point(3, ("p",))]


# --- step names and determinism -----------------------------------------------------------------


async def test_a_repeated_step_name_fails_the_run_naming_the_step(make_durably):
    executed: list[str] = []

    @define_job("dup")
    async def dup(step: StepContext, payload: Any) -> None:
        await step.run("fetch", lambda: executed.append("first"))
        await step.run("fetch", lambda: executed.append("second"))

    durably = await make_durably(dup)
    done = await durably.trigger_and_wait(dup, None, timeout=30)
    assert done.status == "failed"
    assert done.error.type == "StepError"
    assert "'fetch'" in done.error.message and "unique" in done.error.message
    assert executed == ["first"]


@pytest.mark.parametrize("bad_name", ["", None, 5])
async def test_invalid_step_names_and_callables_are_rejected(make_durably, bad_name):
    errors: list[BaseException] = []

    @define_job("bad-step")
    async def job(step: StepContext, payload: Any) -> None:
        for args in ((bad_name, lambda: 1), ("not-callable", 42)):
            try:
                await step.run(*args)
            except StepError as exc:
                errors.append(exc)

    durably = await make_durably(job)
    done = await durably.trigger_and_wait(job, None, timeout=30)
    assert done.status == "completed"
    assert len(errors) == 2
    assert "not callable" in str(errors[1])


@pytest.mark.parametrize("resumed_order", [["a", "x"], ["b", "a"], ["a", "b-renamed"]])
async def test_non_deterministic_replay_fails_the_run(make_durably, resumed_order):
    executed: list[tuple[int, str]] = []
    holding = asyncio.Event()

    async def hold() -> None:
        holding.set()
        await asyncio.Event().wait()

    @define_job("nondet")
    async def nondet(step: StepContext, payload: Any) -> None:
        order = ["a", "b"] if step.attempt == 1 else resumed_order
        for name in order:
            await step.run(name, lambda name=name: executed.append((step.attempt, name)))
        await step.run("hold", hold)

    a = await make_durably(nondet, shutdown_timeout=0.2)
    run = await a.trigger(nondet, None)
    await wait_event(holding)
    await a.stop()
    b = await make_durably(nondet)
    done = await b.wait_for_run(run.id, timeout=30)
    assert done.status == "failed"
    assert done.error.type == "NonDeterministicReplayError"
    assert "non-deterministic replay" in done.error.message
    assert executed == [(1, "a"), (1, "b")]  # nothing ran on the resumed attempt


# --- synchronous callables -----------------------------------------------------------------


async def test_a_blocking_sync_step_runs_off_the_event_loop_and_leases_keep_renewing(make_durably, sql):
    started = threading.Event()
    finish = threading.Event()
    executions: list[int] = []
    main_thread = threading.get_ident()

    def blocking() -> str:
        executions.append(threading.get_ident())
        started.set()
        assert finish.wait(30)  # blocks its thread, like time.sleep
        return "done"

    @define_job("blocking")
    async def job(step: StepContext, payload: Any) -> str:
        return await step.run("block", blocking)

    options = {"lease_duration": 1.5, "lease_renew_interval": 0.05}
    a = await make_durably(job, **options)
    run = await a.trigger(job, None)
    assert await asyncio.to_thread(started.wait, 10)
    # A second worker on the same file would take the run over if the lease lapsed.
    await make_durably(job, **options)

    def expiry() -> int:
        return sql("SELECT lease_expires_at FROM durably_runs WHERE id = ?", (run.id,))[0][0]

    first_expiry = expiry()
    # The lease keeps being renewed while the step blocks...
    await wait_until(lambda: expiry() > first_expiry)
    # ...well past the moment it would have expired without renewal.
    await wait_until(lambda: time.time() * 1000 > first_expiry + 300, timeout=10)
    assert expiry() > first_expiry + 300
    finish.set()
    done = await a.wait_for_run(run.id, timeout=30)
    assert done.status == "completed"
    assert done.output == "done"
    assert done.attempt == 1
    assert len(executions) == 1
    assert executions[0] != main_thread


# --- progress and logs -----------------------------------------------------------------


async def test_progress_and_logs_are_persisted(make_durably):
    @define_job("chatty")
    async def chatty(step: StepContext, payload: Any) -> None:
        step.progress(1, 3)
        step.log.debug("d")

        async def inner() -> None:
            step.log.warning("inside", {"k": [1]})

        await step.run("inner", inner)
        step.log.error("e", {"x": 1})
        step.log.info("i")
        step.progress(3, 3, "all done")

    durably = await make_durably(chatty)
    done = await durably.trigger_and_wait(chatty, None, timeout=30)
    assert done.progress.current == 3 and done.progress.total == 3 and done.progress.message == "all done"
    logs = await durably.get_logs(done.id)
    assert [(log.level, log.message, log.data, log.step_name) for log in logs] == [
        ("debug", "d", None, None),
        ("warning", "inside", {"k": [1]}, "inner"),
        ("error", "e", {"x": 1}, None),
        ("info", "i", None, None),
    ]


async def test_logs_and_progress_from_inside_a_sync_step_are_delivered_on_the_event_loop(make_durably):
    threads: list[int] = []

    @define_job("thread-logs")
    async def job(step: StepContext, payload: Any) -> None:
        def work() -> int:
            threads.append(threading.get_ident())
            step.log.info("from the step's thread", {"a": 1})
            step.progress(1, 2, "half")
            return 1

        await step.run("work", work)

    durably = await make_durably(job)
    async_seen: list[str] = []
    errors: list[Any] = []

    async def async_listener(event: Any) -> None:
        async_seen.append(event.type)

    durably.on("log:write", async_listener)
    durably.on("run:progress", async_listener)
    durably.on("worker:error", errors.append)
    run = await durably.trigger(job, None)
    received = [event.type async for event in durably.subscribe(run.id)]
    assert threads and threads[0] != threading.get_ident()
    assert received == [
        "run:leased",
        "step:start",
        "log:write",
        "run:progress",
        "step:complete",
        "run:complete",
    ]
    await wait_until(lambda: len(async_seen) == 2)
    assert async_seen == ["log:write", "run:progress"]
    assert errors == []
    logs = await durably.get_logs(run.id)
    assert [(log.step_name, log.message) for log in logs] == [("work", "from the step's thread")]
    assert (await durably.get_run(run.id)).progress.message == "half"


# --- serialization, property-based --------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(json_values)
def test_plain_json_values_round_trip_exactly(value):
    text, first = encode(value, _NO_TYPE, what="step 'x'")
    replayed = decode(text, _NO_TYPE)
    assert first == value
    assert replayed == first
    assert _deep_types(replayed) == _deep_types(first) == _deep_types(value)


@settings(max_examples=100, deadline=None)
@given(st.datetimes(timezones=st.none() | st.timezones()))
def test_datetimes_round_trip_with_their_offset(value):
    text, first = encode(value, datetime, what="step 'x'")
    replayed = decode(text, datetime)
    assert replayed == first
    assert type(replayed) is datetime
    assert replayed.utcoffset() == first.utcoffset()
    offset = value.utcoffset()
    if offset is None or offset.total_seconds() % 60 == 0:
        # Same wall time and same offset: the same instant. (ISO 8601 offsets have minute
        # precision, so historic zones with second offsets are excluded; a ZoneInfo comes
        # back as a fixed offset.)
        assert first.replace(tzinfo=None) == value.replace(tzinfo=None)
        assert first.utcoffset() == offset
