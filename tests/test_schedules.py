"""Schedules: one run per tick across workers and processes, catch-up after downtime, time
zones and DST (cronsim's behaviour, asserted), pause/resume/unschedule, errors, kills."""

from __future__ import annotations

import asyncio
import os
import signal
from datetime import UTC, datetime
from typing import Any

import pytest
from helpers import FakeClock, finish_process, start_process, wait_until

from durably_web import Durably, NotFoundError, Schedule, StepContext, ValidationError, define_job
from durably_web.schedules import (
    MAX_CATCH_UP_RUNS,
    SCHEDULE_LABEL,
    TICK_LABEL,
    ScheduleTicker,
    due_ticks,
    next_tick_after,
    tick_key,
)

pytestmark = pytest.mark.all_backends

#: 2027-01-15 10:00:00 UTC, a Friday far from any DST change.
START = datetime(2027, 1, 15, 10, 0, tzinfo=UTC).timestamp()


def ms(*parts: int) -> int:
    return int(datetime(*parts, tzinfo=UTC).timestamp() * 1000)


def utc(value: int) -> str:
    return datetime.fromtimestamp(value / 1000, UTC).strftime("%Y-%m-%d %H:%M")


@define_job("tick")
async def tick_job(step: StepContext, payload: Any) -> Any:
    return payload


async def scheduled_runs(durably: Durably, name: str) -> list[Any]:
    runs = await durably.get_runs(labels={SCHEDULE_LABEL: name}, limit=10_000)
    return sorted(runs, key=lambda run: run.labels[TICK_LABEL])


async def fired_past(durably: Durably, name: str, now_s: float) -> Schedule:
    """Wait until the schedule's next tick lies past ``now_s``: its firing has committed
    (the runs of a firing are created in the same transaction)."""

    async def moved() -> Schedule | None:
        schedule = await durably.get_schedule(name)
        return schedule if schedule.next_tick_at.timestamp() > now_s else None

    result: Schedule = await wait_until(moved)
    return result


# --- cron, time zones, DST: what cronsim does, asserted ----------------------------------


def test_next_tick_is_strictly_after_the_given_time_in_the_schedules_zone():
    assert utc(next_tick_after("0 3 * * *", "UTC", ms(2027, 1, 15, 3, 0))) == "2027-01-16 03:00"
    assert utc(next_tick_after("0 3 * * *", "UTC", ms(2027, 1, 15, 2, 59))) == "2027-01-15 03:00"
    # 03:00 in Oslo is 02:00 UTC in winter (CET) and 01:00 UTC in summer (CEST).
    assert utc(next_tick_after("0 3 * * *", "Europe/Oslo", ms(2027, 1, 15, 12))) == "2027-01-16 02:00"
    assert utc(next_tick_after("0 3 * * *", "Europe/Oslo", ms(2027, 7, 15, 12))) == "2027-07-16 01:00"


def test_spring_forward_a_fixed_time_in_the_skipped_hour_runs_once_at_the_first_minute_after_it():
    # Oslo, 2026-03-29: 02:00 CET becomes 03:00 CEST; 02:30 does not exist that day.
    first = next_tick_after("30 2 * * *", "Europe/Oslo", ms(2026, 3, 28, 12))
    second = next_tick_after("30 2 * * *", "Europe/Oslo", first)
    assert (utc(first), utc(second)) == ("2026-03-29 01:00", "2026-03-30 00:30")  # 03:00 CEST, then 02:30
    # A tick outside the skipped hour is untouched.
    assert utc(next_tick_after("15 3 * * *", "Europe/Oslo", ms(2026, 3, 28, 12))) == "2026-03-29 01:15"


def test_fall_back_a_fixed_time_in_the_repeated_hour_runs_once_not_twice():
    # Oslo, 2026-10-25: 03:00 CEST becomes 02:00 CET; 02:30 happens twice in real time.
    ticks, following = due_ticks(
        "30 2 * * *", "Europe/Oslo", ms(2026, 10, 24, 0, 30), ms(2026, 10, 26, 2), "all"
    )
    assert [utc(t) for t in ticks] == ["2026-10-24 00:30", "2026-10-25 00:30", "2026-10-26 01:30"]
    assert utc(following) == "2026-10-27 01:30"


def test_a_schedule_with_a_wildcard_hour_follows_real_time_through_both_dst_changes():
    spring, _ = due_ticks("*/30 * * * *", "Europe/Oslo", ms(2026, 3, 29, 0, 30), ms(2026, 3, 29, 2), "all")
    assert [utc(t) for t in spring] == [
        "2026-03-29 00:30",
        "2026-03-29 01:00",
        "2026-03-29 01:30",
        "2026-03-29 02:00",
    ]
    fall, _ = due_ticks("*/30 * * * *", "Europe/Oslo", ms(2026, 10, 25, 0), ms(2026, 10, 25, 2), "all")
    # 02:00 and 02:30 local happen twice (CEST, then CET): each real instant is a tick.
    assert [utc(t) for t in fall] == [
        "2026-10-25 00:00",
        "2026-10-25 00:30",
        "2026-10-25 01:00",
        "2026-10-25 01:30",
        "2026-10-25 02:00",
    ]


def test_due_ticks_latest_is_the_last_due_one_and_all_is_bounded():
    ticks, following = due_ticks("* * * * *", "UTC", ms(2027, 1, 1, 0, 0), ms(2027, 1, 1, 0, 9, 30), "latest")
    assert [utc(t) for t in ticks] == ["2027-01-01 00:09"] and utc(following) == "2027-01-01 00:10"
    # A week of downtime of a minutely schedule: the latest MAX_CATCH_UP_RUNS ticks, found fast.
    ticks, following = due_ticks("* * * * *", "UTC", ms(2027, 1, 1), ms(2027, 1, 8, 0, 0, 30), "all")
    assert len(ticks) == MAX_CATCH_UP_RUNS and utc(ticks[-1]) == "2027-01-08 00:00"
    assert ticks == sorted(ticks) and ticks[-1] - ticks[0] == (MAX_CATCH_UP_RUNS - 1) * 60_000
    assert utc(following) == "2027-01-08 00:01"


def test_tick_keys_name_the_schedule_and_the_tick_in_utc():
    assert tick_key("poll-feed", ms(2027, 1, 15, 10, 15)) == "schedule:poll-feed:2027-01-15T10:15:00Z"


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"schedule": "61 * * * *"}, "invalid cron expression"),
        ({"schedule": "* * *"}, "invalid cron expression"),
        ({"schedule": ""}, "cron must be"),
        ({"schedule": "0 3 * * *", "timezone": "Mars/Olympus_Mons"}, "unknown timezone"),
        ({"schedule": "0 3 * * *", "catch_up": "some"}, "catch_up must be"),
        ({"timezone": "Europe/Oslo"}, "need schedule="),
    ],
)
def test_define_job_refuses_an_invalid_schedule(options, message):
    with pytest.raises(ValidationError, match=message):
        define_job("bad-schedule", **options)


def test_define_job_refuses_a_schedule_whose_input_the_job_refuses():
    from pydantic import BaseModel

    class In(BaseModel):
        n: int

    with pytest.raises(ValidationError, match="invalid input"):

        @define_job("needs-input", input=In, schedule="0 3 * * *")
        async def job(step: StepContext, payload: In) -> None: ...

    @define_job("has-input", input=In, schedule="0 3 * * *", schedule_input={"n": 1})
    async def fine(step: StepContext, payload: In) -> None: ...

    assert fine.schedule is not None and fine.schedule.input == {"n": 1}


async def test_schedule_refuses_invalid_cron_zone_name_and_input_and_writes_nothing(make_durably):
    durably = await make_durably(tick_job, worker=False)
    for kwargs, message in [
        ({"cron": "not cron"}, "invalid cron expression"),
        ({"cron": "0 3 * * *", "timezone": "Nowhere/City"}, "unknown timezone"),
        ({"cron": "0 3 * * *", "name": "bad name!"}, "invalid schedule name"),
        ({"cron": "0 3 * * *", "catch_up": "every"}, "catch_up must be"),
        ({"cron": "0 3 * * *", "input": object()}, "invalid input"),
    ]:
        with pytest.raises(ValidationError, match=message):
            await durably.schedule(tick_job, **kwargs)
    assert await durably.list_schedules() == []
    with pytest.raises(NotFoundError):
        await durably.schedule("no-such-job", "0 3 * * *")
    for call in (durably.unschedule, durably.pause_schedule, durably.resume_schedule, durably.get_schedule):
        with pytest.raises(NotFoundError):
            await call("missing")


# --- the API ----------------------------------------------------------------------------------


async def test_a_define_job_schedule_is_stored_at_worker_start_named_after_the_job(make_durably):
    clock = FakeClock(START)

    @define_job("nightly", input=None, schedule="0 3 * * *", timezone="Europe/Oslo")
    async def nightly(step: StepContext, payload: Any) -> str:
        return "ran"

    durably = await make_durably(nightly, clock=clock)
    [schedule] = await durably.list_schedules()
    assert (schedule.name, schedule.job_name, schedule.cron, schedule.timezone) == (
        "nightly",
        "nightly",
        "0 3 * * *",
        "Europe/Oslo",
    )
    assert schedule.next_tick_at == datetime(2027, 1, 16, 2, 0, tzinfo=UTC)  # 03:00 CET
    assert not schedule.paused and schedule.catch_up == "latest" and schedule.last_run_id is None
    assert schedule.to_dict()["next_tick_at"] == "2027-01-16T02:00:00Z"


async def test_schedule_upserts_and_keeps_the_next_tick_unless_the_cron_or_zone_changed(make_durably):
    clock = FakeClock(START)
    durably = await make_durably(tick_job, clock=clock, worker=False)
    first = await durably.schedule(tick_job, "*/15 * * * *", input={"a": 1}, name="poll-feed")
    assert first.next_tick_at == datetime(2027, 1, 15, 10, 15, tzinfo=UTC) and first.input == {"a": 1}
    clock.now += 120
    same = await durably.schedule(tick_job, "*/15 * * * *", input={"a": 2}, name="poll-feed")
    assert same.next_tick_at == first.next_tick_at and same.input == {"a": 2}
    assert same.created_at == first.created_at
    changed = await durably.schedule(tick_job, "0 * * * *", input={"a": 2}, name="poll-feed")
    assert changed.next_tick_at == datetime(2027, 1, 15, 11, 0, tzinfo=UTC) and changed.cron == "0 * * * *"
    assert [s.name for s in await durably.list_schedules()] == ["poll-feed"]


async def test_each_tick_creates_one_run_labelled_with_its_schedule_and_tick(make_durably):
    clock = FakeClock(START)
    durably = await make_durably(tick_job, clock=clock)
    await durably.schedule(tick_job, "*/15 * * * *", input={"feed": "x"}, name="poll-feed")
    clock.now += 15 * 60
    fired = await fired_past(durably, "poll-feed", clock.now)
    [run] = await scheduled_runs(durably, "poll-feed")
    assert run.labels == {SCHEDULE_LABEL: "poll-feed", TICK_LABEL: "2027-01-15T10:15:00Z"}
    assert run.idempotency_key == "schedule:poll-feed:2027-01-15T10:15:00Z"
    assert fired.last_run_id == run.id and fired.last_tick_at == datetime(2027, 1, 15, 10, 15, tzinfo=UTC)
    assert fired.next_tick_at == datetime(2027, 1, 15, 10, 30, tzinfo=UTC)
    done = await durably.wait_for_run(run.id, timeout=30)
    assert done.status == "completed" and done.output == {"feed": "x"}
    clock.now += 15 * 60
    await fired_past(durably, "poll-feed", clock.now)
    runs = await scheduled_runs(durably, "poll-feed")
    assert [r.labels[TICK_LABEL] for r in runs] == ["2027-01-15T10:15:00Z", "2027-01-15T10:30:00Z"]


async def test_two_workers_on_one_database_fire_a_tick_once(make_durably):
    clock = FakeClock(START)
    first = await make_durably(tick_job, clock=clock)
    second = await make_durably(tick_job, clock=clock)
    await first.schedule(tick_job, "0 * * * *", name="hourly")
    for hour in range(1, 4):
        clock.now = START + hour * 3600
        await fired_past(first, "hourly", clock.now)
        await fired_past(second, "hourly", clock.now)
    runs = await scheduled_runs(first, "hourly")
    assert [r.labels[TICK_LABEL] for r in runs] == [
        "2027-01-15T11:00:00Z",
        "2027-01-15T12:00:00Z",
        "2027-01-15T13:00:00Z",
    ]
    for run in runs:
        assert (await first.wait_for_run(run.id, timeout=30)).status == "completed"


async def test_two_tickers_racing_one_tick_with_the_same_reading_create_one_run(make_durably):
    clock = FakeClock(START)
    first = await make_durably(tick_job, clock=clock, worker=False)
    second = await make_durably(tick_job, clock=clock, worker=False)
    await first.schedule(tick_job, "0 * * * *", name="hourly", catch_up="all")
    clock.now = START + 3 * 3600 + 60
    [stale] = await first.store.due_schedules(first.now_ms(), 10)  # both read the same next tick

    def ticker(durably: Durably) -> ScheduleTicker:
        return ScheduleTicker(
            store=durably.store,
            jobs=durably.jobs,
            now_ms=durably.now_ms,
            created=lambda r: None,
            max_payload_bytes=1 << 20,
        )

    results = await asyncio.gather(
        ticker(first).fire(stale, first.now_ms()), ticker(second).fire(stale, second.now_ms())
    )
    assert sorted(r is None for r in results) == [False, True]  # one firing won the compare-and-set
    won = next(r for r in results if r is not None)
    assert [d for _, d in won] == ["created"] * 3
    assert len(await scheduled_runs(first, "hourly")) == 3


async def test_after_downtime_one_catch_up_run_for_the_latest_missed_tick(make_durably):
    clock = FakeClock(START)
    client = await make_durably(tick_job, clock=clock, worker=False)
    await client.schedule(tick_job, "0 * * * *", name="hourly")
    clock.now = START + 5 * 3600 + 600  # five ticks passed with no worker running
    worker = await make_durably(tick_job, clock=clock)
    fired = await fired_past(worker, "hourly", clock.now)
    [run] = await scheduled_runs(worker, "hourly")
    assert run.labels[TICK_LABEL] == "2027-01-15T15:00:00Z"
    assert fired.next_tick_at == datetime(2027, 1, 15, 16, 0, tzinfo=UTC)


async def test_catch_up_all_creates_one_run_per_missed_tick(make_durably):
    clock = FakeClock(START)
    client = await make_durably(tick_job, clock=clock, worker=False)
    await client.schedule(tick_job, "0 * * * *", name="hourly", catch_up="all")
    clock.now = START + 5 * 3600 + 600
    worker = await make_durably(tick_job, clock=clock)
    await fired_past(worker, "hourly", clock.now)
    runs = await scheduled_runs(worker, "hourly")
    assert [r.labels[TICK_LABEL][11:16] for r in runs] == ["11:00", "12:00", "13:00", "14:00", "15:00"]


async def test_catch_up_all_is_bounded(make_durably):
    clock = FakeClock(START)
    client = await make_durably(tick_job, clock=clock, worker=False)
    await client.schedule(tick_job, "* * * * *", name="minutely", catch_up="all")
    clock.now = START + 3 * 3600  # 180 missed ticks
    worker = await make_durably(tick_job, clock=clock)
    await fired_past(worker, "minutely", clock.now)
    runs = await scheduled_runs(worker, "minutely")
    assert len(runs) == MAX_CATCH_UP_RUNS and runs[-1].labels[TICK_LABEL] == "2027-01-15T13:00:00Z"


async def test_a_tick_in_the_spring_forward_gap_fires_once_at_the_first_minute_after_it(make_durably):
    clock = FakeClock(datetime(2026, 3, 28, 12, tzinfo=UTC).timestamp())
    durably = await make_durably(tick_job, clock=clock)
    await durably.schedule(tick_job, "30 2 * * *", name="oslo", timezone="Europe/Oslo")
    for day_end in (datetime(2026, 3, 29, 12, tzinfo=UTC), datetime(2026, 3, 30, 12, tzinfo=UTC)):
        clock.now = day_end.timestamp()
        await fired_past(durably, "oslo", clock.now)
    runs = await scheduled_runs(durably, "oslo")
    assert [r.labels[TICK_LABEL] for r in runs] == ["2026-03-29T01:00:00Z", "2026-03-30T00:30:00Z"]


async def test_a_tick_in_the_repeated_fall_back_hour_fires_once(make_durably):
    clock = FakeClock(datetime(2026, 10, 24, 12, tzinfo=UTC).timestamp())
    durably = await make_durably(tick_job, clock=clock)
    await durably.schedule(tick_job, "30 2 * * *", name="oslo", timezone="Europe/Oslo")
    # Step through the night a quarter of an hour at a time, past both 02:30s.
    step = datetime(2026, 10, 25, 0, 0, tzinfo=UTC).timestamp()
    while step <= datetime(2026, 10, 25, 2, 0, tzinfo=UTC).timestamp():
        clock.now = step
        if (await durably.get_schedule("oslo")).next_tick_at.timestamp() <= step:
            await fired_past(durably, "oslo", step)
        step += 900
    runs = await scheduled_runs(durably, "oslo")
    assert [r.labels[TICK_LABEL] for r in runs] == ["2026-10-25T00:30:00Z"]  # 02:30 CEST only
    assert (await durably.get_schedule("oslo")).next_tick_at == datetime(2026, 10, 26, 1, 30, tzinfo=UTC)


async def test_a_paused_schedule_fires_nothing_and_resumes_from_its_next_tick_after_now(make_durably):
    clock = FakeClock(START)
    durably = await make_durably(tick_job, clock=clock)
    await durably.schedule(tick_job, "0 * * * *", name="hourly")
    paused = await durably.pause_schedule("hourly")
    assert paused.paused
    clock.now = START + 3 * 3600 + 60
    await asyncio.sleep(0.1)  # several polls of the worker: a paused schedule is never due
    assert await scheduled_runs(durably, "hourly") == []
    resumed = await durably.resume_schedule("hourly")
    # Ticks missed while paused are skipped, not caught up.
    assert not resumed.paused and resumed.next_tick_at == datetime(2027, 1, 15, 14, 0, tzinfo=UTC)
    clock.now = START + 4 * 3600
    await fired_past(durably, "hourly", clock.now)
    assert [r.labels[TICK_LABEL] for r in await scheduled_runs(durably, "hourly")] == ["2027-01-15T14:00:00Z"]
    # Resuming a running schedule changes nothing.
    again = await durably.resume_schedule("hourly")
    assert again.next_tick_at == datetime(2027, 1, 15, 15, 0, tzinfo=UTC)


async def test_unschedule_deletes_the_schedule_and_keeps_its_runs(make_durably):
    clock = FakeClock(START)
    durably = await make_durably(tick_job, clock=clock)
    await durably.schedule(tick_job, "0 * * * *", name="hourly")
    clock.now = START + 3600
    await fired_past(durably, "hourly", clock.now)
    await durably.unschedule("hourly")
    assert await durably.list_schedules() == []
    clock.now = START + 2 * 3600
    await asyncio.sleep(0.1)
    assert len(await scheduled_runs(durably, "hourly")) == 1


# --- processes and kills ------------------------------------------------------------------------


def distinct_ticks(runs: list[Any]) -> list[str]:
    ticks = [run.labels[TICK_LABEL] for run in runs]
    assert len(ticks) == len(set(ticks)), f"a tick has two runs: {ticks}"
    keys = [run.idempotency_key for run in runs]
    assert keys == [f"schedule:every-second:{tick}" for tick in ticks]
    return ticks


async def test_two_processes_firing_every_second_create_one_run_per_tick(db_url):
    first = start_process("schedule", db_url, "4")
    second = start_process("schedule", db_url, "4")
    results = [finish_process(first), finish_process(second)]
    assert [r["errors"] for r in results] == [[], []]
    async with Durably(db_url, worker=False) as client:
        runs = await scheduled_runs(client, "every-second")
        distinct_ticks(runs)
        assert len([r for r in runs if r.status == "completed"]) >= 4


async def test_sigkill_right_after_a_tick_fired_then_restart_runs_it_once_and_fires_the_next(db_url):
    killed = start_process("schedule", db_url, "1", "--kill-after-fire")
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    async with Durably(db_url, worker=False) as client:
        [fired] = await scheduled_runs(client, "every-second")
        assert fired.status == "pending"  # committed with its tick; nobody executed it
        schedule = await client.get_schedule("every-second")
        assert schedule.last_run_id == fired.id and schedule.next_tick_at > datetime.fromisoformat(
            fired.labels[TICK_LABEL]
        )
    restarted = start_process("schedule", db_url, "3")
    result = finish_process(restarted)
    assert result["errors"] == []
    async with Durably(db_url, worker=False) as client:
        runs = await scheduled_runs(client, "every-second")
        ticks = distinct_ticks(runs)
        assert ticks[0] == fired.labels[TICK_LABEL] and len(ticks) >= 3
        again = await client.get_run(fired.id)
        assert again.status == "completed" and again.output == result["pid"] and again.attempt == 1


async def test_sigkill_at_any_moment_while_ticks_fire_leaves_one_run_per_tick(db_url):
    worker = start_process("schedule", db_url, "1000")
    async with Durably(db_url, worker=False) as client:
        await wait_until(lambda: scheduled_runs(client, "every-second"), timeout=30)
        await asyncio.sleep(1.3)  # into the next second's firing, wherever it is
        os.kill(worker.pid, signal.SIGKILL)
        worker.communicate(timeout=30)
        before = distinct_ticks(await scheduled_runs(client, "every-second"))
    restarted = start_process("schedule", db_url, str(len(before) + 2))
    assert finish_process(restarted)["errors"] == []
    async with Durably(db_url, worker=False) as client:
        after = distinct_ticks(await scheduled_runs(client, "every-second"))
    assert after[: len(before)] == before and len(after) >= len(before) + 1


# --- the RPC of the browser worker (the JS names) ------------------------------------------------


async def test_schedules_through_the_rpc_with_js_names(make_durably):
    from durably_web.rpc import Dispatcher

    clock = FakeClock(START)
    durably = await make_durably(tick_job, clock=clock, worker=False)
    rpc = Dispatcher(durably)
    made = await rpc.call("schedule", ["tick", "*/15 * * * *", {"input": {"a": 1}, "name": "poll-feed"}])
    assert made["ok"] and made["value"]["name"] == "poll-feed" and made["value"]["input"] == {"a": 1}
    assert made["value"]["next_tick_at"] == "2027-01-15T10:15:00Z"
    oslo = await rpc.call("schedule", ["tick", "0 3 * * *", {"timezone": "Europe/Oslo", "catchUp": "all"}])
    assert oslo["ok"] and (oslo["value"]["name"], oslo["value"]["catch_up"]) == ("tick", "all")
    listed = await rpc.call("listSchedules", [])
    assert [s["name"] for s in listed["value"]] == ["poll-feed", "tick"]
    assert (await rpc.call("pauseSchedule", ["poll-feed"]))["value"]["paused"] is True
    assert (await rpc.call("resumeSchedule", ["poll-feed"]))["value"]["paused"] is False
    assert await rpc.call("unschedule", ["tick"]) == {"ok": True, "value": None}
    bad = await rpc.call("schedule", ["tick", "every day"])
    assert not bad["ok"] and bad["error"]["name"] == "ValidationError"
    unknown = await rpc.call("schedule", ["tick", "0 3 * * *", {"zone": "UTC"}])
    assert not unknown["ok"] and "unknown option" in unknown["error"]["message"]
    missing = await rpc.call("pauseSchedule", ["tick"])
    assert not missing["ok"] and missing["error"]["name"] == "NotFoundError"


async def test_a_schedule_this_process_cannot_fire_is_reported_once_and_runs_go_on(make_durably, sql):
    # A row written by a process with other zone data (the browser without tzdata, say).
    clock = FakeClock(START)
    durably = await make_durably(tick_job, clock=clock)
    errors: list[Any] = []
    durably.on("worker:error", errors.append)
    await durably.schedule(tick_job, "0 * * * *", name="broken")
    await durably.schedule(tick_job, "0 * * * *", name="fine")
    sql("UPDATE durably_schedules SET timezone = 'Nowhere/Unknown' WHERE name = 'broken'")
    clock.now = START + 3600 + 60
    await fired_past(durably, "fine", clock.now)
    run = await durably.trigger(tick_job, "ordinary")
    assert (await durably.wait_for_run(run.id, timeout=30)).status == "completed"
    await asyncio.sleep(0.1)  # more polls: the broken schedule is still due, not reported again
    assert [e["error"].type for e in errors] == ["ValidationError"]
    assert "Nowhere/Unknown" in errors[0]["error"].message
    assert await scheduled_runs(durably, "broken") == []
