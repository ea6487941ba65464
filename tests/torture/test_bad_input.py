"""Hypothesis-generated bad inputs for every public entry point.

Each one must raise a typed durably-web error (a ``DurablyError`` subclass),
leave the database byte-for-byte unchanged (a dump of every table), and leave
the worker running: a good run still completes afterwards. Unstorable step
results fail their run with ``StepError`` before anything of the step is
committed.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from durably_web import (
    Durably,
    DurablyError,
    NotFoundError,
    StepContext,
    TriggerItem,
    ValidationError,
    define_job,
)
from durably_web.events import EVENT_TYPES

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
PAYLOAD_LIMIT = 64 * 1024


class Order(BaseModel):
    name: str = Field(max_length=40)
    count: int = Field(ge=0, le=1000)
    tags: list[str] = []


@define_job("order", input=Order, output=int)
async def order_job(step: StepContext, payload: Order) -> int:
    return await step.run("count", lambda: payload.count)


@define_job("free")
async def free_job(step: StepContext, payload: Any) -> Any:
    return await step.run("echo", lambda: payload)


BAD_RESULTS: dict[int, Any] = {}
RAN_AFTER: list[int] = []


class Token(BaseModel):
    token: int
    typed: bool = False


@define_job("bad-result", input=Token)
async def bad_result_job(step: StepContext, payload: Token) -> None:
    value = BAD_RESULTS[payload.token]
    if payload.typed:
        await step.run("produce", lambda: value, type=int)
    else:
        await step.run("produce", lambda: value)
    await step.run("after", RAN_AFTER.append, payload.token)


JOBS = [order_job, free_job, bad_result_job]


def dump(db_path: Path) -> list[str]:
    conn = sqlite3.connect(db_path)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


@dataclass
class Session:
    runner: asyncio.Runner
    durably: Durably
    db_path: Path

    def run(self, coro: Any) -> Any:
        return self.runner.run(coro)

    def rejects(self, make_call: Any, *kinds: type[DurablyError]) -> DurablyError:
        """The call raises a typed error and the database is unchanged."""
        before = dump(self.db_path)
        with pytest.raises(kinds or (DurablyError,)) as info:
            self.run(make_call())
        assert dump(self.db_path) == before
        return info.value

    def good_run_completes(self) -> None:
        done = self.run(self.durably.trigger_and_wait("order", {"name": "ok", "count": 7}, timeout=20))
        assert (done.status, done.output) == ("completed", 7)


@contextmanager
def session(tmp_path: Path, **options: Any) -> Iterator[Session]:
    db_path = tmp_path / "bad-input.db"
    with asyncio.Runner() as runner:
        durably = Durably(
            f"sqlite:///{db_path}",
            jobs=JOBS,
            polling_interval=0.02,
            lease_duration=2.0,
            lease_renew_interval=0.1,
            max_payload_bytes=PAYLOAD_LIMIT,
            **options,
        )
        runner.run(durably.init())
        s = Session(runner, durably, db_path)
        try:
            s.good_run_completes()  # the database has content to stay unchanged
            yield s
            s.good_run_completes()  # and the worker is still running
        finally:
            runner.run(durably.stop())


# --- strategies -----------------------------------------------------------------------------------

lone_surrogate = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
with_surrogate = st.builds(
    lambda a, s, b: a + s + b, st.text(max_size=5), lone_surrogate, st.text(max_size=5)
)
not_a_string = st.one_of(
    st.none(),
    st.integers(),
    st.floats(),
    st.booleans(),
    st.binary(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
json_like = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
good_order = st.fixed_dictionaries(
    {"name": st.text(max_size=40).filter(lambda s: "\x00" not in s), "count": st.integers(0, 1000)}
)

schema_violations = st.one_of(
    # wrong top-level types
    not_a_string.filter(lambda v: not isinstance(v, dict)),
    st.text(max_size=10),
    # missing or wrong fields
    st.fixed_dictionaries({"name": st.text(max_size=10)}),
    st.fixed_dictionaries({"count": st.integers(0, 10)}),
    good_order.flatmap(
        lambda g: st.sampled_from(
            [
                {**g, "count": -1},
                {**g, "count": 1001},
                {**g, "name": "x" * 41},
                {**g, "count": "many"},
                {**g, "name": 5},
                {**g, "tags": "not-a-list"},
                {**g, "tags": [1, None]},
                {**g, "count": 1.5},
            ]
        )
    ),
    # strings that are not valid UTF-8 text
    st.builds(lambda g, s: {**g, "name": s}, good_order, with_surrogate.filter(lambda s: len(s) <= 40)),
    st.builds(lambda g, s: {**g, "tags": [s]}, good_order, with_surrogate),
)


def unstorable_free_input() -> st.SearchStrategy[Any]:
    """Values the Any-typed job cannot store as JSON."""
    return st.one_of(
        with_surrogate,
        st.dictionaries(with_surrogate, st.integers(), min_size=1, max_size=2),
        st.lists(with_surrogate, min_size=1, max_size=3),
        st.builds(object),
        st.builds(lambda n: [n, object()], st.integers()),
        st.binary(min_size=1).filter(lambda b: not _utf8(b)),
        st.integers(1000, 5000).map(_nested),
    )


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


huge_payload = st.integers(PAYLOAD_LIMIT + 1, 4 * PAYLOAD_LIMIT).map(lambda n: {"blob": "x" * n})
unknown_job = st.text(max_size=30).filter(lambda s: s not in {"order", "free", "bad-result"})
bad_label_key = st.one_of(
    st.just(""),
    st.text(min_size=65, max_size=70, alphabet="abc"),
    st.text(min_size=1, max_size=10).filter(
        lambda s: any(not (c.isascii() and (c.isalnum() or c in "_.:/-")) for c in s)
    ),
    not_a_string.filter(lambda v: not isinstance(v, str) and _hashable(v)),
)
bad_label_value = st.one_of(
    not_a_string.filter(lambda v: not isinstance(v, str)),
    with_surrogate,
    st.text(min_size=513, max_size=600, alphabet="v"),
    st.just("a\x00b"),
)
bad_labels = st.one_of(
    st.builds(lambda k: {k: "v"}, bad_label_key),
    st.builds(lambda v: {"key": v}, bad_label_value),
    st.just({f"k{i}": "v" for i in range(33)}),
    st.one_of(
        st.lists(st.tuples(st.text(), st.text()), min_size=1, max_size=2), st.integers(), st.text(min_size=1)
    ),
)
bad_key = st.one_of(
    not_a_string.filter(lambda v: v is not None),
    st.just(""),
    with_surrogate,
    st.just("a\x00b"),
    st.text(min_size=256, max_size=300, alphabet="k"),
)


def empty_container(value: Any) -> bool:
    return isinstance(value, list | bytes | dict) and len(value) == 0


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


# --- tests ---------------------------------------------------------------------------------------


def test_job_inputs_that_violate_the_schema_are_rejected_and_change_nothing(tmp_path: Path) -> None:
    with session(tmp_path) as s:
        durably = s.durably

        @SETTINGS
        @given(bad=schema_violations, good=good_order)
        def check(bad: Any, good: dict[str, Any]) -> None:
            error = s.rejects(lambda: durably.trigger("order", bad), ValidationError)
            assert error.errors  # pydantic's details, or one entry describing the problem
            s.rejects(lambda: durably.trigger(order_job, bad), ValidationError)
            s.rejects(lambda: durably.trigger_and_wait("order", bad, timeout=5), ValidationError)
            # A batch is all or nothing: the good items around the bad one are not created either.
            s.rejects(lambda: durably.batch_trigger("order", [good, bad, good]), ValidationError)
            s.rejects(
                lambda: durably.batch_trigger("order", [TriggerItem(good), TriggerItem(bad)]), ValidationError
            )

        check()


def test_unstorable_inputs_huge_payloads_and_unknown_jobs_are_rejected(tmp_path: Path) -> None:
    with session(tmp_path) as s:
        durably = s.durably

        @SETTINGS
        @given(bad=unstorable_free_input(), huge=huge_payload, name=unknown_job, wrong=not_a_string)
        def check(bad: Any, huge: Any, name: str, wrong: Any) -> None:
            s.rejects(lambda: durably.trigger("free", bad), ValidationError)
            s.rejects(lambda: durably.trigger("free", huge), ValidationError)
            s.rejects(lambda: durably.batch_trigger("free", [1, huge]), ValidationError)
            s.rejects(
                lambda: durably.trigger(name, {"name": "x", "count": 1}), NotFoundError, ValidationError
            )
            s.rejects(lambda: durably.trigger(wrong, {"name": "x", "count": 1}), ValidationError)
            if not isinstance(wrong, list):  # a list of anything is a batch of Any inputs
                s.rejects(lambda: durably.batch_trigger("free", wrong), ValidationError)

        check()


def test_an_input_over_the_default_ten_mib_limit_is_rejected(tmp_path: Path) -> None:
    with session(tmp_path) as s:
        durably = Durably(f"sqlite:///{s.db_path}", jobs=JOBS, worker=False)  # default limit
        s.run(durably.init())
        try:
            s.rejects(lambda: durably.trigger("free", "x" * (10 * 1024 * 1024)), ValidationError)
        finally:
            s.run(durably.stop())


def test_bad_labels_keys_and_trigger_options_are_rejected(tmp_path: Path) -> None:
    with session(tmp_path) as s:
        durably = s.durably
        good = {"name": "x", "count": 1}

        @SETTINGS
        @given(
            labels=bad_labels,
            key=bad_key,
            coalesce=st.one_of(st.booleans(), st.text(max_size=5), st.integers()),
        )
        def check(labels: Any, key: Any, coalesce: Any) -> None:
            s.rejects(lambda: durably.trigger("order", good, labels=labels), ValidationError)
            s.rejects(lambda: durably.batch_trigger("order", [good], labels=labels), ValidationError)
            s.rejects(
                lambda: durably.batch_trigger("order", [TriggerItem(good, labels=labels)]), ValidationError
            )
            s.rejects(lambda: durably.get_runs(labels=labels), ValidationError)
            s.rejects(lambda: durably.trigger("order", good, idempotency_key=key), ValidationError)
            s.rejects(lambda: durably.trigger("order", good, concurrency_key=key), ValidationError)
            s.rejects(
                lambda: durably.batch_trigger("order", [TriggerItem(good, idempotency_key=key)]),
                ValidationError,
            )
            if coalesce != "skip":
                s.rejects(
                    lambda: durably.trigger("order", good, concurrency_key="k", coalesce=coalesce),
                    ValidationError,
                )

        check()


def test_bad_run_ids_and_query_arguments_get_typed_errors(tmp_path: Path) -> None:
    with session(tmp_path) as s:
        durably = s.durably
        existing = s.run(durably.get_runs())[0].id
        calls = [
            durably.get_run,
            durably.get_steps,
            durably.get_logs,
            durably.cancel,
            durably.retrigger,
            durably.delete_run,
            lambda rid: durably.wait_for_run(rid, timeout=0.01),
        ]

        async def subscribe(rid: Any) -> None:
            durably.subscribe(rid)

        calls.append(subscribe)
        bad_id = st.one_of(
            not_a_string,
            with_surrogate,
            st.text(max_size=30).filter(lambda t: t != existing),
            st.text(min_size=5000, max_size=6000, alphabet="Z"),
        )
        number = st.one_of(
            st.text(max_size=3),
            st.none(),
            st.just(float("nan")),
            st.just(float("inf")),
            st.just(float("-inf")),
            st.floats(max_value=-0.001),
            st.floats(min_value=1e13, allow_infinity=False),
            st.lists(st.integers()),
        )
        bad_count = st.one_of(
            st.integers(max_value=-1),
            st.integers(min_value=2**62),
            st.booleans(),
            st.floats(),
            st.text(max_size=3),
        )

        @SETTINGS
        @given(
            rid=bad_id, seconds=number, count=bad_count, status=st.one_of(st.text(max_size=8), not_a_string)
        )
        def check(rid: Any, seconds: Any, count: Any, status: Any) -> None:
            for call in calls:
                s.rejects(lambda call=call: call(rid), NotFoundError, ValidationError)
            s.rejects(lambda: durably.purge_runs(older_than=seconds), ValidationError)
            s.rejects(lambda: durably.purge_runs(older_than=1, limit=count), ValidationError)
            if seconds is not None:  # None: wait without a timeout
                s.rejects(lambda: durably.wait_for_run(existing, timeout=seconds), ValidationError)
            s.rejects(lambda: durably.get_runs(limit=count), ValidationError)
            s.rejects(lambda: durably.get_runs(offset=count), ValidationError)
            if empty_container(status):
                return  # an empty filter list is a valid filter
            if status not in ("pending", "leased", "completed", "failed", "cancelled", None):
                s.rejects(lambda: durably.get_runs(status=status), ValidationError)
            if not isinstance(status, str) and status is not None:
                s.rejects(lambda: durably.get_runs(job_name=status), ValidationError)
            if not (isinstance(status, str) and (status in EVENT_TYPES or status == "*")):
                with pytest.raises(ValidationError):
                    durably.on(status, lambda event: None)

        check()


def test_bad_options_urls_and_job_names_get_typed_errors(tmp_path: Path) -> None:
    durations = [
        "polling_interval",
        "lease_duration",
        "lease_renew_interval",
        "shutdown_timeout",
        "retain_runs",
    ]
    url = f"sqlite:///{tmp_path / 'options.db'}"

    @SETTINGS
    @given(
        option=st.sampled_from([*durations, "max_concurrent_runs", "max_payload_bytes"]),
        value=st.one_of(
            st.text(max_size=4),
            st.just(float("nan")),
            st.just(float("inf")),
            st.floats(max_value=-0.001),
            st.integers(max_value=-1),
            st.lists(st.integers(), max_size=2),
            st.just(0),
        ),
        database=st.one_of(
            not_a_string,
            st.text(max_size=20).filter(lambda t: not t.startswith("sqlite://")),
            st.sampled_from(
                [
                    "sqlite://",
                    "sqlite:///",
                    "sqlite:///x.db?bogus=1",
                    "sqlite:///x.db?busy_timeout=soon",
                    "sqlite:///x.db?synchronous=maybe",
                    "sqlite:///x.db?journal_mode=nope",
                ]
            ),
        ),
        name=st.one_of(
            not_a_string,
            st.just(""),
            st.text(min_size=129, max_size=140, alphabet="j"),
            st.text(min_size=1, max_size=10).filter(
                lambda t: any(not (c.isascii() and (c.isalnum() or c in "_.:-/")) for c in t)
            ),
        ),
    )
    def check(option: str, value: Any, database: Any, name: Any) -> None:
        if option in ("shutdown_timeout", "retain_runs") and type(value) is int and value == 0:
            return  # zero seconds is valid for these two
        with pytest.raises(ValidationError):
            Durably(url, **{option: value})
        with pytest.raises(ValidationError):
            asyncio.run(Durably(database).init())
        with pytest.raises(ValidationError):
            define_job(name)

    check()


unstorable_results = st.one_of(
    st.builds(object),
    st.frozensets(st.integers(), min_size=1, max_size=3).map(set),
    st.binary(min_size=1, max_size=5),
    st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    st.dictionaries(st.integers(), st.integers(), min_size=1, max_size=3),
    st.complex_numbers(allow_nan=False, allow_infinity=False),
    st.just(datetime.datetime(2024, 1, 1)),
    st.decimals(allow_nan=False, allow_infinity=False),
    st.tuples(st.integers()),
    st.builds(lambda n: [n, {"deep": object()}], st.integers()),
    st.integers(2000, 4000).map(_nested),
)
typed_unstorable = st.one_of(
    st.text(min_size=1, max_size=5, alphabet="xyz"),
    st.builds(object),
    st.just(float("nan")),
    st.just(decimal.Decimal("1.5")),
    st.lists(st.integers(), min_size=1, max_size=2),
)


def test_unstorable_step_results_fail_the_run_with_step_error_and_record_nothing(tmp_path: Path) -> None:
    with session(tmp_path) as s:
        durably = s.durably

        @settings(SETTINGS, max_examples=40)
        @given(value=unstorable_results, typed_value=typed_unstorable)
        def check(value: Any, typed_value: Any) -> None:
            for typed, bad in ((False, value), (True, typed_value)):
                token = len(BAD_RESULTS)
                BAD_RESULTS[token] = bad
                done = s.run(
                    durably.trigger_and_wait("bad-result", {"token": token, "typed": typed}, timeout=20)
                )
                assert done.status == "failed"
                assert done.error is not None and done.error.type == "StepError", done.error
                steps = s.run(durably.get_steps(done.id))
                assert [(step.name, step.status, step.output) for step in steps] == [
                    ("produce", "failed", None)
                ]
                assert token not in RAN_AFTER  # the next step never started

        check()
