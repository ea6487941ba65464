"""The public API of ``Durably``: lifecycle, triggering, queries, management, validation."""

from __future__ import annotations

import asyncio
from datetime import datetime

import pytest
from helpers import FAST, wait_event, wait_until
from pydantic import BaseModel, Field

import durably_web
from durably_web import (
    CancelledError,
    ConflictError,
    Durably,
    DurablyError,
    Event,
    LeaseLostError,
    NotFoundError,
    StepContext,
    TriggerItem,
    ValidationError,
    WaitTimeoutError,
    define_job,
)

pytestmark = pytest.mark.all_backends


class SyncIn(BaseModel):
    org_id: str


class SyncOut(BaseModel):
    synced_count: int


def fetch_users(org_id: str) -> list[dict[str, str]]:  # sync callable
    return [{"id": f"{org_id}-u1"}, {"id": f"{org_id}-u2"}, {"id": f"{org_id}-u3"}]


saved: list[list[dict[str, str]]] = []


async def save_users(users: list[dict[str, str]]) -> None:  # async callable
    saved.append(users)


@define_job("sync-users", input=SyncIn, output=SyncOut)
async def sync_users(step: StepContext, payload: SyncIn) -> SyncOut:
    users = await step.run("fetch-users", fetch_users, payload.org_id)
    await step.run("save-to-db", save_users, users)
    step.progress(2, 2, "saved")
    step.log.info("synced", {"count": len(users)})
    return SyncOut(synced_count=len(users))


class Item(BaseModel):
    n: int = Field(ge=0)


@define_job("echo", input=Item, output=Item)
async def echo(step: StepContext, payload: Item) -> Item:
    value = await step.run("double", lambda: payload.n * 2)
    return Item(n=value)


def gated_job(name: str, gate: asyncio.Event, started: asyncio.Event | None = None):
    """A job whose only step waits for ``gate``."""

    async def wait_gate() -> str:
        if started is not None:
            started.set()
        await gate.wait()
        return "opened"

    @define_job(name, input=Item, output=Item)
    async def handler(step: StepContext, payload: Item) -> Item:
        await step.run("wait", wait_gate)
        return payload

    return handler


# --- lifecycle and the issue's quick start ---------------------------------------------


async def test_quick_start_from_the_issue_runs_as_written(db_url):
    saved.clear()
    async with Durably(db_url, jobs=[sync_users], **FAST) as durably:
        run = await durably.trigger("sync-users", {"org_id": "o1"})
        assert run.disposition == "created"
        assert run.status == "pending"
        assert run.job_name == "sync-users"
        assert run.input == SyncIn(org_id="o1")
        done = await durably.trigger_and_wait(sync_users, SyncIn(org_id="o2"), timeout=30)
        assert done.status == "completed"
        assert done.output == SyncOut(synced_count=3)
        assert isinstance(done.output, SyncOut)
        assert done.progress == durably_web.Progress(2, 2, "saved")
        first = await durably.wait_for_run(run.id, timeout=30)
        assert first.status == "completed"
        logs = await durably.get_logs(done.id)
        assert [(log.level, log.message, log.data) for log in logs] == [("info", "synced", {"count": 3})]
        steps = await durably.get_steps(done.id)
        assert [(s.index, s.name, s.status) for s in steps] == [
            (0, "fetch-users", "completed"),
            (1, "save-to-db", "completed"),
        ]
        assert steps[0].output == fetch_users("o2")
    assert sorted(users[0]["id"] for users in saved) == ["o1-u1", "o2-u1"]


async def test_init_and_stop_without_context_manager(db_url):
    durably = Durably(db_url, jobs=[echo], **FAST)
    with pytest.raises(DurablyError, match="not started"):
        await durably.trigger(echo, {"n": 1})
    assert await durably.init() is durably
    assert await durably.init() is durably  # idempotent
    done = await durably.trigger_and_wait(echo, {"n": 21}, timeout=30)
    assert done.output == Item(n=42)
    await durably.stop()
    await durably.stop()  # idempotent
    with pytest.raises(DurablyError):
        await durably.get_run(done.id)
    # The data outlives the instance.
    async with Durably(db_url, jobs=[echo], worker=False) as again:
        assert (await again.get_run(done.id)).output == Item(n=42)


async def test_run_fields_after_completion(make_durably):
    durably = await make_durably(sync_users)
    done = await durably.trigger_and_wait("sync-users", {"org_id": "x"}, labels={"team": "a"}, timeout=30)
    assert done.id and isinstance(done.id, str)
    assert done.job_name == "sync-users"
    assert done.status == "completed"
    assert done.input == SyncIn(org_id="x")
    assert done.error is None
    assert done.labels == {"team": "a"}
    assert done.attempt == 1
    assert done.is_terminal
    assert all(
        isinstance(t, datetime)
        for t in (done.created_at, done.started_at, done.completed_at, done.updated_at)
    )
    assert done.created_at <= done.started_at <= done.completed_at <= done.updated_at
    as_dict = done.to_dict()
    assert as_dict["output"] == {"synced_count": 3}
    assert as_dict["progress"] == {"current": 2, "total": 2, "message": "saved"}


async def test_run_ids_sort_in_creation_order(make_durably):
    durably = await make_durably(echo, worker=False)
    runs = [await durably.trigger(echo, {"n": i}) for i in range(20)]
    ids = [run.id for run in runs]
    assert ids == sorted(ids)
    assert len(set(ids)) == 20
    newest_first = await durably.get_runs()
    assert [run.id for run in newest_first] == ids[::-1]


async def test_worker_false_only_triggers_and_a_worker_elsewhere_runs_it(make_durably):
    client = await make_durably(echo, worker=False)
    run = await client.trigger(echo, {"n": 5})
    await make_durably(echo)
    done = await client.wait_for_run(run.id, timeout=30)
    assert done.status == "completed"
    assert done.output == Item(n=10)


# --- input validation -----------------------------------------------------------------


async def test_invalid_input_raises_validation_error_with_pydantic_details_and_creates_no_run(make_durably):
    durably = await make_durably(sync_users, worker=False)
    with pytest.raises(ValidationError) as missing:
        await durably.trigger("sync-users", {"wrong": "field"})
    assert any(err["loc"] == ("org_id",) and err["type"] == "missing" for err in missing.value.errors)
    with pytest.raises(ValidationError) as wrong_type:
        await durably.trigger(echo, {"n": -1})
    assert wrong_type.value.errors[0]["loc"] == ("n",)
    assert wrong_type.value.errors[0]["type"] == "greater_than_equal"
    with pytest.raises(ValidationError):
        await durably.trigger_and_wait(echo, {"n": "not a number"}, timeout=1)
    assert await durably.get_runs() == []


async def test_validation_error_is_a_durably_error_and_value_error():
    for error in (
        NotFoundError,
        ValidationError,
        ConflictError,
        CancelledError,
        LeaseLostError,
        WaitTimeoutError,
    ):
        assert issubclass(error, DurablyError)
        assert getattr(durably_web, error.__name__) is error
    assert issubclass(ValidationError, ValueError)
    assert issubclass(WaitTimeoutError, TimeoutError)


async def test_unknown_job_name_raises_not_found(make_durably):
    durably = await make_durably(echo, worker=False)
    with pytest.raises(NotFoundError, match="nope"):
        await durably.trigger("nope", {})
    with pytest.raises(ValidationError):
        await durably.trigger(42, {})  # type: ignore[arg-type]


async def test_trigger_with_an_unregistered_job_object_registers_it(make_durably):
    durably = await make_durably()
    done = await durably.trigger_and_wait(echo, {"n": 2}, timeout=30)
    assert done.output == Item(n=4)
    assert durably.jobs["echo"] is echo


async def test_two_different_jobs_with_one_name_conflict(make_durably):
    @define_job("echo")
    async def other(step: StepContext, payload: object) -> None:
        return None

    durably = await make_durably(echo, worker=False)
    with pytest.raises(ConflictError):
        durably.register(other)


def test_define_job_validates_name_and_handler():
    with pytest.raises(ValidationError):
        define_job("bad name with spaces")
    with pytest.raises(ValidationError):
        define_job("")

    with pytest.raises(TypeError, match="async def"):

        @define_job("sync-handler")
        def handler(step, payload):  # not async
            return None


@pytest.mark.parametrize(
    "options",
    [
        {"lease_duration": 1.0, "lease_renew_interval": 1.0},
        {"lease_duration": 1.0, "lease_renew_interval": 2.0},
        {"max_concurrent_runs": 0},
        {"max_concurrent_runs": True},
        {"polling_interval": -1},
        {"polling_interval": "fast"},
        {"retain_runs": -5},
    ],
)
def test_bad_options_raise_validation_error(options):
    with pytest.raises(ValidationError):
        Durably("sqlite://:memory:", **options)


async def test_invalid_output_fails_the_run(make_durably):
    @define_job("bad-output", output=Item)
    async def bad_output(step: StepContext, payload: object) -> Item:
        return {"n": -3}  # type: ignore[return-value]

    durably = await make_durably(bad_output)
    done = await durably.trigger_and_wait(bad_output, None, timeout=30)
    assert done.status == "failed"
    assert done.error.type == "ValidationError"
    assert "invalid output" in done.error.message


# --- idempotency, concurrency keys, coalescing ------------------------------------------------


async def test_idempotency_key_returns_the_existing_run(make_durably):
    durably = await make_durably(echo, sync_users, worker=False)
    first = await durably.trigger(echo, {"n": 1}, idempotency_key="k1")
    again = await durably.trigger(echo, {"n": 999}, idempotency_key="k1")
    assert first.disposition == "created"
    assert again.disposition == "idempotent"
    assert again.id == first.id
    assert again.input == Item(n=1)  # the existing run, not the new input
    # Keys are per job.
    other_job = await durably.trigger(sync_users, {"org_id": "o"}, idempotency_key="k1")
    assert other_job.disposition == "created"
    assert len(await durably.get_runs()) == 2


async def test_idempotency_key_still_returns_the_run_after_it_completed(make_durably):
    durably = await make_durably(echo)
    first = await durably.trigger_and_wait(echo, {"n": 1}, idempotency_key="once", timeout=30)
    again = await durably.trigger(echo, {"n": 1}, idempotency_key="once")
    assert again.id == first.id
    assert again.disposition == "idempotent"
    assert again.status == "completed"
    assert len(await durably.get_runs()) == 1


async def test_concurrency_key_allows_one_pending_run(make_durably):
    durably = await make_durably(echo, worker=False)
    first = await durably.trigger(echo, {"n": 1}, concurrency_key="tenant-1")
    with pytest.raises(ConflictError, match="tenant-1"):
        await durably.trigger(echo, {"n": 2}, concurrency_key="tenant-1")
    coalesced = await durably.trigger(echo, {"n": 3}, concurrency_key="tenant-1", coalesce="skip")
    assert coalesced.disposition == "coalesced"
    assert coalesced.id == first.id
    other = await durably.trigger(echo, {"n": 4}, concurrency_key="tenant-2")
    assert other.disposition == "created"
    assert len(await durably.get_runs()) == 2
    with pytest.raises(ValidationError):
        await durably.trigger(echo, {"n": 5}, concurrency_key="tenant-3", coalesce="replace")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        await durably.trigger(echo, {"n": 5}, concurrency_key="")


async def test_concurrency_key_allows_one_running_run(make_durably):
    gate = asyncio.Event()
    started = asyncio.Event()
    job = gated_job("gated", gate, started)
    durably = await make_durably(job, echo, max_concurrent_runs=4)
    events: list[Event] = []
    durably.on("*", events.append)
    first = await durably.trigger(job, {"n": 1}, concurrency_key="k")
    await wait_event(started)
    assert (await durably.get_run(first.id)).status == "leased"
    # No pending run holds the key any more, so a second run may be queued...
    second = await durably.trigger(job, {"n": 2}, concurrency_key="k")
    assert second.disposition == "created"
    # ...but it is not started while the first one runs, although the worker has room
    # and has claimed a newer run since.
    later = await durably.trigger_and_wait(echo, {"n": 3}, timeout=30)
    assert later.status == "completed"
    assert later.id > second.id
    assert (await durably.get_run(second.id)).status == "pending"
    gate.set()
    assert (await durably.wait_for_run(first.id, timeout=30)).status == "completed"
    assert (await durably.wait_for_run(second.id, timeout=30)).status == "completed"
    # The second run's step ran after the first run's ended (read from step events, not from
    # started_at: a claim reads its clock before its query, which may wait for a connection).
    keyed = (first.id, second.id)
    steps = [
        (e.type, e.run_id) for e in events if e.type in ("step:start", "step:complete") and e.run_id in keyed
    ]
    assert steps == [
        ("step:start", first.id),
        ("step:complete", first.id),
        ("step:start", second.id),
        ("step:complete", second.id),
    ], steps


# --- labels -----------------------------------------------------------------


async def test_labels_are_stored_and_filter_by_exact_key_and_value(make_durably):
    durably = await make_durably(echo, worker=False)
    a = await durably.trigger(echo, {"n": 1}, labels={"env": "prod", "team": "a"})
    b = await durably.trigger(echo, {"n": 2}, labels={"env": "prod", "team": "b"})
    c = await durably.trigger(echo, {"n": 3}, labels={"env": "dev"})
    await durably.trigger(echo, {"n": 4})
    assert (await durably.get_run(a.id)).labels == {"env": "prod", "team": "a"}
    ids = lambda runs: {run.id for run in runs}  # noqa: E731
    assert ids(await durably.get_runs(labels={"env": "prod"})) == {a.id, b.id}
    assert ids(await durably.get_runs(labels={"env": "prod", "team": "b"})) == {b.id}
    assert ids(await durably.get_runs(labels={"env": "dev"})) == {c.id}
    assert ids(await durably.get_runs(labels={"env": "pro"})) == set()  # exact, not prefix
    assert ids(await durably.get_runs(labels={"team": "a", "env": "dev"})) == set()


@pytest.mark.parametrize(
    "labels",
    [
        {"bad key": "v"},
        {"": "v"},
        {"k": 1},
        {"k": "x" * 513},
        {f"k{i}": "v" for i in range(33)},
        ["not", "a", "mapping"],
    ],
)
async def test_invalid_labels_raise_validation_error_and_create_nothing(make_durably, labels):
    durably = await make_durably(echo, worker=False)
    with pytest.raises(ValidationError):
        await durably.trigger(echo, {"n": 1}, labels=labels)
    assert await durably.get_runs() == []


# --- batch trigger -----------------------------------------------------------------


async def test_batch_trigger_creates_all_runs(make_durably):
    durably = await make_durably(echo)
    runs = await durably.batch_trigger(echo, [{"n": i} for i in range(5)], labels={"batch": "1"})
    assert [run.disposition for run in runs] == ["created"] * 5
    assert [run.input for run in runs] == [Item(n=i) for i in range(5)]
    finished = [await durably.wait_for_run(run.id, timeout=30) for run in runs]
    assert [run.output for run in finished] == [Item(n=2 * i) for i in range(5)]
    assert len(await durably.get_runs(labels={"batch": "1"})) == 5
    assert await durably.batch_trigger(echo, []) == []


async def test_batch_trigger_with_an_invalid_item_creates_nothing(make_durably):
    durably = await make_durably(echo, worker=False)
    with pytest.raises(ValidationError, match="batch item 1") as info:
        await durably.batch_trigger(echo, [{"n": 1}, {"n": -1}, {"n": 2}])
    assert info.value.errors[0]["loc"] == ("n",)
    assert await durably.get_runs() == []


async def test_batch_trigger_is_one_transaction(make_durably):
    durably = await make_durably(echo, worker=False)
    await durably.trigger(echo, {"n": 0}, concurrency_key="busy")
    items = [TriggerItem({"n": 1}), TriggerItem({"n": 2}, concurrency_key="busy")]
    with pytest.raises(ConflictError):
        await durably.batch_trigger(echo, items)
    assert len(await durably.get_runs()) == 1  # the first item was rolled back too


async def test_batch_trigger_items_carry_their_own_options(make_durably):
    durably = await make_durably(echo, worker=False)
    existing = await durably.trigger(echo, {"n": 0}, idempotency_key="idem")
    pending = await durably.trigger(echo, {"n": 0}, concurrency_key="ck")
    runs = await durably.batch_trigger(
        echo,
        [
            TriggerItem({"n": 1}, idempotency_key="idem"),
            TriggerItem({"n": 2}, concurrency_key="ck", coalesce="skip"),
            TriggerItem({"n": 3}, labels={"x": "y"}),
        ],
        labels={"all": "yes"},
    )
    assert [(r.id, r.disposition) for r in runs[:2]] == [
        (existing.id, "idempotent"),
        (pending.id, "coalesced"),
    ]
    assert runs[2].disposition == "created"
    assert runs[2].labels == {"all": "yes", "x": "y"}


# --- waiting -----------------------------------------------------------------


async def test_wait_timeout_raises_wait_timeout_error(make_durably):
    gate = asyncio.Event()
    job = gated_job("slow", gate)
    durably = await make_durably(job)
    with pytest.raises(WaitTimeoutError):
        await durably.trigger_and_wait(job, {"n": 1}, timeout=0.2)
    run = (await durably.get_runs())[0]
    assert run.status in ("pending", "leased")
    gate.set()
    assert (await durably.wait_for_run(run.id, timeout=30)).status == "completed"


async def test_wait_for_unknown_run_raises_not_found(make_durably):
    durably = await make_durably(echo)
    with pytest.raises(NotFoundError):
        await durably.wait_for_run("01NOSUCHRUN", timeout=1)


async def test_wait_for_run_sees_a_run_finished_by_another_instance(make_durably):
    client = await make_durably(echo, worker=False)
    run = await client.trigger(echo, {"n": 4})
    await make_durably(echo)
    assert (await client.wait_for_run(run.id, timeout=30)).output == Item(n=8)


# --- queries -----------------------------------------------------------------


async def test_get_runs_filters_by_status_and_job_name_and_pages(make_durably):
    @define_job("boom")
    async def boom(step: StepContext, payload: object) -> None:
        raise RuntimeError("boom")

    durably = await make_durably(echo, boom)  # its worker does not know sync-users
    ok = [await durably.trigger_and_wait(echo, {"n": i}, timeout=30) for i in range(3)]
    bad = await durably.trigger_and_wait(boom, None, timeout=30)
    client = await make_durably(sync_users, worker=False)
    waiting = await client.trigger(sync_users, {"org_id": "z"})
    await durably.cancel(waiting.id)
    queued = await client.trigger(sync_users, {"org_id": "q"})
    ids = lambda runs: [run.id for run in runs]  # noqa: E731
    assert set(ids(await durably.get_runs(status="completed"))) >= {r.id for r in ok}
    assert ids(await durably.get_runs(status="failed")) == [bad.id]
    assert ids(await durably.get_runs(status="cancelled")) == [waiting.id]
    assert set(ids(await durably.get_runs(status=["failed", "cancelled"]))) == {bad.id, waiting.id}
    assert set(ids(await durably.get_runs(job_name="echo"))) == {r.id for r in ok}
    assert set(ids(await durably.get_runs(job_name=["echo", "boom"]))) == {r.id for r in ok} | {bad.id}
    assert ids(await durably.get_runs(job_name="echo", status="failed")) == []
    every = ids(await durably.get_runs())
    assert len(every) == 6 and queued.id in every
    assert ids(await durably.get_runs(status="pending")) == [queued.id]
    assert ids(await durably.get_runs(limit=2)) == every[:2]
    assert ids(await durably.get_runs(limit=2, offset=2)) == every[2:4]
    assert ids(await durably.get_runs(offset=5)) == every[5:]
    with pytest.raises(ValidationError):
        await durably.get_runs(status="done")
    with pytest.raises(ValidationError):
        await durably.get_runs(limit=-1)
    with pytest.raises(ValidationError):
        await durably.get_runs(job_name=[1, 2])  # type: ignore[list-item]


async def test_get_run_decodes_with_the_model_or_falls_back_to_json(make_durably):
    durably = await make_durably(echo)
    done = await durably.trigger_and_wait(echo, {"n": 3}, timeout=30)
    assert (await durably.get_run(done.id)).output == Item(n=6)
    stranger = await make_durably(worker=False)  # does not know the job
    run = await stranger.get_run(done.id)
    assert run.input == {"n": 3}
    assert run.output == {"n": 6}


async def test_get_steps_lists_steps_in_order(make_durably):
    @define_job("three-steps")
    async def three(step: StepContext, payload: object) -> None:
        for i in range(3):
            await step.run(f"item-{i}", lambda i=i: {"i": i})

    durably = await make_durably(three)
    done = await durably.trigger_and_wait(three, None, timeout=30)
    steps = await durably.get_steps(done.id)
    assert [(s.index, s.name, s.status, s.output) for s in steps] == [
        (0, "item-0", "completed", {"i": 0}),
        (1, "item-1", "completed", {"i": 1}),
        (2, "item-2", "completed", {"i": 2}),
    ]
    assert all(s.error is None and s.duration_ms >= 0 for s in steps)
    assert steps[0].to_dict()["name"] == "item-0"


# --- management -----------------------------------------------------------------


async def test_unknown_ids_raise_not_found(make_durably):
    durably = await make_durably(echo)
    for call in (
        durably.get_run,
        durably.get_steps,
        durably.get_logs,
        durably.cancel,
        durably.retrigger,
        durably.delete_run,
        durably.subscribe,
    ):
        with pytest.raises(NotFoundError):
            result = call("01UNKNOWNRUNID")
            if asyncio.iscoroutine(result):
                await result
            else:  # a subscription: over a network database its first step looks the run up
                await anext(result)
    with pytest.raises(ValidationError):
        await durably.get_run(123)  # type: ignore[arg-type]


async def test_cancel_pending_run_and_illegal_transitions(make_durably):
    durably = await make_durably(echo, worker=False)
    run = await durably.trigger(echo, {"n": 1})
    cancelled = await durably.cancel(run.id)
    assert cancelled.status == "cancelled"
    assert cancelled.completed_at is not None
    assert (await durably.cancel(run.id)).status == "cancelled"  # idempotent
    worker = await make_durably(echo)
    done = await worker.trigger_and_wait(echo, {"n": 2}, timeout=30)
    with pytest.raises(ConflictError, match="completed"):
        await durably.cancel(done.id)
    # The cancelled run is never executed.
    assert (await worker.get_run(run.id)).status == "cancelled"
    assert await worker.get_steps(run.id) == []


async def test_cancel_a_failed_run_is_a_conflict(make_durably):
    @define_job("fails")
    async def fails(step: StepContext, payload: object) -> None:
        raise ValueError("no")

    durably = await make_durably(fails)
    failed = await durably.trigger_and_wait(fails, None, timeout=30)
    assert failed.status == "failed"
    with pytest.raises(ConflictError):
        await durably.cancel(failed.id)


async def test_retrigger_creates_a_new_run_with_the_same_input_and_labels(make_durably):
    durably = await make_durably(echo)
    done = await durably.trigger_and_wait(echo, {"n": 7}, labels={"who": "me"}, timeout=30)
    again = await durably.retrigger(done.id)
    assert again.id != done.id
    assert again.disposition == "created"
    assert again.input == Item(n=7)
    assert again.labels == {"who": "me"}
    finished = await durably.wait_for_run(again.id, timeout=30)
    assert finished.output == Item(n=14)
    assert (await durably.get_run(done.id)).status == "completed"


async def test_retrigger_revalidates_the_input(make_durably, db_url):
    old = await make_durably(echo, worker=False)
    run = await old.trigger(echo, {"n": 1})
    await old.cancel(run.id)

    class Stricter(BaseModel):
        n: int = Field(ge=100)

    @define_job("echo", input=Stricter)
    async def stricter(step: StepContext, payload: Stricter) -> None:
        return None

    new = await make_durably(stricter, worker=False)
    with pytest.raises(ValidationError) as info:
        await new.retrigger(run.id)
    assert info.value.errors[0]["loc"] == ("n",)
    assert len(await new.get_runs()) == 1


async def test_retrigger_without_the_job_definition_reuses_the_stored_input(make_durably, db_url):
    worker = await make_durably(echo)
    done = await worker.trigger_and_wait(
        echo, {"n": 3}, labels={"who": "me"}, concurrency_key="k", timeout=30
    )
    client = await make_durably(worker=False)  # no jobs: what a database URL gives
    again = await client.retrigger(done.id)
    assert again.disposition == "created" and again.id != done.id
    assert again.input == {"n": 3} and again.labels == {"who": "me"} and again.concurrency_key == "k"
    finished = await worker.wait_for_run(again.id, timeout=30)
    assert finished.status == "completed" and finished.output == Item(n=6)
    with pytest.raises(NotFoundError):
        await client.retrigger("01NOSUCHRUN")


async def test_delete_run_removes_it_with_its_steps_and_logs(make_durably, sql):
    durably = await make_durably(sync_users)
    done = await durably.trigger_and_wait(sync_users, {"org_id": "d"}, timeout=30)
    assert sql("SELECT COUNT(*) FROM durably_steps WHERE run_id = ?", (done.id,)) == [(2,)]
    await durably.delete_run(done.id)
    with pytest.raises(NotFoundError):
        await durably.get_run(done.id)
    with pytest.raises(NotFoundError):
        await durably.delete_run(done.id)
    for table in ("durably_steps", "durably_logs", "durably_run_labels"):
        assert sql(f"SELECT COUNT(*) FROM {table} WHERE run_id = ?", (done.id,)) == [(0,)]


async def test_delete_a_leased_run_is_a_conflict(make_durably):
    gate = asyncio.Event()
    started = asyncio.Event()
    job = gated_job("held", gate, started)
    durably = await make_durably(job)
    run = await durably.trigger(job, {"n": 1})
    await wait_event(started)
    with pytest.raises(ConflictError, match="cancel"):
        await durably.delete_run(run.id)
    gate.set()
    await durably.wait_for_run(run.id, timeout=30)
    await durably.delete_run(run.id)


async def test_delete_a_pending_run(make_durably):
    durably = await make_durably(echo, worker=False)
    run = await durably.trigger(echo, {"n": 1})
    await durably.delete_run(run.id)
    assert await durably.get_runs() == []


async def test_purge_runs_deletes_only_old_terminal_runs(make_durably):
    durably = await make_durably(echo)
    finished = [await durably.trigger_and_wait(echo, {"n": i}, timeout=30) for i in range(3)]
    client = await make_durably(worker=False)
    # A pending run of a job no worker knows is never purged.
    client.register(gated_job("nobody-runs-me", asyncio.Event()))
    pending = await client.trigger("nobody-runs-me", {"n": 1})
    assert await durably.purge_runs(older_than=3600) == 0
    await wait_until(lambda: durably.now_ms() > int(finished[-1].completed_at.timestamp() * 1000))
    assert await durably.purge_runs(older_than=0, limit=2) == 2
    assert await durably.purge_runs(older_than=0) == 1
    assert [run.id for run in await durably.get_runs()] == [pending.id]
    with pytest.raises(ValidationError):
        await durably.purge_runs(older_than=-1)
    with pytest.raises(ValidationError):
        await durably.purge_runs(older_than=0, limit=-1)
