"""Network-aware steps: runs wait for the network (reason "offline") instead of failing.

The engine is given a ``NetworkStatus`` (durably_web/network.py); the browser runtime's reads
``navigator.onLine`` (tests/browser/test_offline_steps.py runs that one in Chromium). Here a
test implementation of that same interface is switched on and off by the test, on real
SQLite files and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from typing import Any

import pytest
from helpers import FakeClock, finish_process, kill_once_waiting, start_process, timed_lines, wait_until

from durably_web import (
    Durably,
    NetworkStatus,
    NonRetryableError,
    RetryPolicy,
    StepContext,
    StepError,
    ValidationError,
    define_job,
)
from durably_web.browser import durably_options

pytestmark = pytest.mark.all_backends


class SwitchedNetwork:
    """A ``NetworkStatus`` the test turns on and off. ``ConnectionError`` is its network error."""

    def __init__(self, online: bool = True) -> None:
        self.is_online = online
        self.listeners: list[Callable[[], None]] = []

    def online(self) -> bool:
        return self.is_online

    def is_network_error(self, exc: BaseException) -> bool:
        return isinstance(exc, ConnectionError)

    def watch(self, on_online: Callable[[], None]) -> Callable[[], None]:
        self.listeners.append(on_online)
        return lambda: self.listeners.remove(on_online)

    def back_online(self) -> None:
        self.is_online = True
        for listener in list(self.listeners):
            listener()


def test_the_test_network_is_a_network_status() -> None:
    network: NetworkStatus = SwitchedNetwork()  # checked by mypy against the Protocol
    assert network.online()


class Calls:
    """How often each step's function ran."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __call__(self, name: str, fn: Callable[[], Any] = lambda: None) -> Callable[[], Any]:
        def counted() -> Any:
            self.counts[name] = self.counts.get(name, 0) + 1
            return fn()

        return counted


async def waiting_offline(durably: Durably, run_id: str) -> Any:
    async def check() -> Any:
        run = await durably.get_run(run_id)
        return run.status == "waiting" and run.wait_reason == "offline" and run

    return await wait_until(check)


# An hour: only the "online" notice can wake these runs before the test's timeouts.
NO_RECHECK = 3600.0


async def test_a_step_that_needs_the_network_waits_offline_without_being_attempted(make_durably) -> None:
    network = SwitchedNetwork(online=False)
    calls = Calls()

    @define_job("upload")
    async def upload(step: StepContext, payload: Any) -> Any:
        prepared = await step.run("prepare", calls("prepare", lambda: 41))
        sent = await step.run("send", calls("send", lambda: prepared + 1), needs_network=True)
        return {"sent": sent}

    durably = await make_durably(upload, network=network, offline_recheck_interval=NO_RECHECK)
    events: list[Any] = []
    durably.on("*", events.append)
    run = await durably.trigger(upload, None)
    waiting = await waiting_offline(durably, run.id)
    assert waiting.wait_step == "send" and waiting.wake_at is not None
    assert calls.counts == {"prepare": 1}
    assert [a.name for a in await durably.get_step_attempts(run.id)] == ["prepare"]  # "send" never began
    assert not [e for e in events if e.type == "step:start" and e["step_name"] == "send"]
    await asyncio.sleep(0.2)  # many polls: still waiting, still not attempted
    assert (await durably.get_run(run.id)).status == "waiting" and calls.counts == {"prepare": 1}

    network.back_online()
    done = await durably.wait_for_run(run.id, timeout=30)
    assert done.status == "completed" and done.output == {"sent": 42}
    assert calls.counts == {"prepare": 1, "send": 1}  # "prepare" was replayed, not run again
    waits = [(e["reason"], e["step_name"]) for e in events if e.type == "run:waiting"]
    assert waits == [("offline", "send")]


async def test_a_network_error_while_offline_waits_and_uses_up_no_retry(make_durably) -> None:
    network = SwitchedNetwork(online=True)
    calls = Calls()

    def fetch() -> str:
        if calls.counts["fetch"] == 1:
            network.is_online = False  # the connection dropped during the request
            raise ConnectionError("Failed to fetch")
        return "payload"

    # max_attempts=1: one counted failure would fail the run.
    @define_job("sync", retry=RetryPolicy(max_attempts=1))
    async def sync(step: StepContext, payload: Any) -> Any:
        await step.run("local", calls("local"))
        return await step.run("fetch", calls("fetch", fetch))

    durably = await make_durably(sync, network=network, offline_recheck_interval=NO_RECHECK)
    events: list[Any] = []
    durably.on("*", events.append)
    run = await durably.trigger(sync, None)
    waiting = await waiting_offline(durably, run.id)
    assert waiting.wait_step == "fetch" and waiting.error is None
    attempts = await durably.get_step_attempts(run.id)
    assert [(a.name, a.attempt, a.status, a.offline) for a in attempts] == [
        ("local", 1, "completed", False),
        ("fetch", 1, "failed", True),
    ]
    assert attempts[1].error is not None and attempts[1].error.type == "ConnectionError"
    assert attempts[1].to_dict()["offline"] is True
    [fail] = [e for e in events if e.type == "step:fail"]
    assert (fail["attempt"], fail["will_retry"], fail["offline"]) == (1, True, True)
    assert not [e for e in events if e.type == "step:retry"]  # no retry was spent

    network.back_online()
    done = await durably.wait_for_run(run.id, timeout=30)
    assert done.status == "completed" and done.output == "payload"
    assert calls.counts == {"local": 1, "fetch": 2}
    attempts = await durably.get_step_attempts(run.id)
    assert [(a.name, a.attempt, a.status, a.offline) for a in attempts] == [
        ("local", 1, "completed", False),
        ("fetch", 1, "failed", True),
        ("fetch", 2, "completed", False),
    ]


async def test_offline_failures_never_add_up_to_the_retry_limit(make_durably) -> None:
    """Three offline failures in a row on a step allowed two attempts, then one real failure
    and a success: only the real failure counts, so the run completes."""
    network = SwitchedNetwork(online=True)
    calls = Calls()

    def fetch() -> str:
        n = calls.counts["fetch"]
        if n <= 3:
            network.is_online = False
            raise ConnectionError(f"offline {n}")
        if n == 4:
            raise ConnectionError("the server hung up")  # online: an ordinary failure
        return "ok"

    @define_job("patient", retry=RetryPolicy(max_attempts=2, initial_delay=0.01))
    async def patient(step: StepContext, payload: Any) -> Any:
        return await step.run("fetch", calls("fetch", fetch))

    durably = await make_durably(patient, network=network, offline_recheck_interval=NO_RECHECK)
    run = await durably.trigger(patient, None)
    for _ in range(3):
        await waiting_offline(durably, run.id)
        network.back_online()
        await wait_until(lambda: not network.is_online or calls.counts["fetch"] >= 4)
    done = await durably.wait_for_run(run.id, timeout=30)
    assert done.status == "completed" and done.output == "ok"
    attempts = await durably.get_step_attempts(run.id)
    assert [(a.attempt, a.status, a.offline) for a in attempts] == [
        (1, "failed", True),
        (2, "failed", True),
        (3, "failed", True),
        (4, "failed", False),
        (5, "completed", False),
    ]


async def test_while_online_a_network_error_follows_the_retry_policy(make_durably) -> None:
    network = SwitchedNetwork(online=True)
    calls = Calls()

    def fetch() -> None:
        raise ConnectionError("connection refused")

    @define_job("strict", retry=RetryPolicy(max_attempts=2, initial_delay=0.01))
    async def strict(step: StepContext, payload: Any) -> Any:
        return await step.run("fetch", calls("fetch", fetch), needs_network=True)

    durably = await make_durably(strict, network=network, offline_recheck_interval=NO_RECHECK)
    done = await durably.trigger_and_wait(strict, None, timeout=30)
    assert done.status == "failed" and done.error is not None and done.error.type == "ConnectionError"
    assert calls.counts == {"fetch": 2}
    attempts = await durably.get_step_attempts(done.id)
    assert [(a.attempt, a.status, a.offline) for a in attempts] == [
        (1, "failed", False),
        (2, "failed", False),
    ]


async def test_an_error_that_is_not_a_network_error_fails_the_step_even_offline(make_durably) -> None:
    network = SwitchedNetwork(online=False)

    def parse() -> None:
        raise ValueError("bad data")

    @define_job("parse")
    async def parse_job(step: StepContext, payload: Any) -> Any:
        return await step.run("parse", parse)

    durably = await make_durably(parse_job, network=network, offline_recheck_interval=NO_RECHECK)
    done = await durably.trigger_and_wait(parse_job, None, timeout=30)
    assert done.status == "failed" and done.error is not None and done.error.type == "ValueError"


async def test_without_an_online_notice_the_run_is_checked_again_at_the_recheck_time(make_durably) -> None:
    """The recheck timer: a missed "online" notice delays the run by one interval at most.
    While the network is still down at a recheck, the step that failed for want of it is
    not attempted again (no failed attempt per recheck)."""
    clock = FakeClock()
    network = SwitchedNetwork(online=True)
    calls = Calls()
    events: list[Any] = []

    def fetch() -> str:
        if calls.counts["fetch"] == 1:
            network.is_online = False
            raise ConnectionError("Failed to fetch")
        return "late"

    @define_job("recheck")
    async def recheck(step: StepContext, payload: Any) -> Any:
        return await step.run("fetch", calls("fetch", fetch))

    durably = await make_durably(recheck, network=network, clock=clock, offline_recheck_interval=60)
    durably.on("run:waiting", events.append)
    run = await durably.trigger(recheck, None)
    first = await waiting_offline(durably, run.id)
    assert first.wake_at is not None and first.wake_at.timestamp() == pytest.approx(clock.now + 60)
    clock.now += 60  # due, still offline: it is claimed, and waits again without an attempt
    await wait_until(lambda: len(events) >= 2)
    again = await waiting_offline(durably, run.id)
    assert again.attempt == 2 and calls.counts == {"fetch": 1}
    assert again.wake_at is not None and again.wake_at.timestamp() == pytest.approx(clock.now + 60)
    assert len(await durably.get_step_attempts(run.id)) == 1
    network.is_online = True  # back, and nobody says so
    clock.now += 60
    done = await durably.wait_for_run(run.id, timeout=30)
    assert done.status == "completed" and done.output == "late" and calls.counts == {"fetch": 2}


async def test_the_online_notice_leaves_runs_waiting_for_something_else_alone(make_durably) -> None:
    network = SwitchedNetwork(online=False)

    @define_job("napper")
    async def napper(step: StepContext, payload: Any) -> Any:
        await step.sleep("nap", 3600)
        return "awake"

    durably = await make_durably(napper, network=network, offline_recheck_interval=NO_RECHECK)
    run = await durably.trigger(napper, None)
    await wait_until(lambda: durably.get_runs(status="waiting"))
    network.back_online()
    await asyncio.sleep(0.2)
    run = await durably.get_run(run.id)
    assert (run.status, run.wait_reason) == ("waiting", "sleep")


async def test_stop_stops_watching_the_network(make_durably) -> None:
    network = SwitchedNetwork()

    @define_job("noop")
    async def noop(step: StepContext, payload: Any) -> None:
        return None

    durably = await make_durably(noop, network=network)
    assert len(network.listeners) == 1
    await durably.stop()
    assert network.listeners == []


async def test_by_default_the_network_is_always_there_and_needs_network_changes_nothing(make_durably) -> None:
    calls = Calls()

    @define_job("plain", retry=RetryPolicy(max_attempts=2, initial_delay=0.01))
    async def plain(step: StepContext, payload: Any) -> Any:
        def fetch() -> str:
            if calls.counts["fetch"] == 1:
                raise ConnectionError("refused")
            return "ok"

        return await step.run("fetch", calls("fetch", fetch), needs_network=True)

    durably = await make_durably(plain)
    done = await durably.trigger_and_wait(plain, None, timeout=30)
    assert done.status == "completed" and calls.counts == {"fetch": 2}
    attempts = await durably.get_step_attempts(done.id)
    assert [(a.attempt, a.status, a.offline) for a in attempts] == [
        (1, "failed", False),
        (2, "completed", False),
    ]


async def test_needs_network_must_be_a_bool(make_durably) -> None:
    @define_job("bad")
    async def bad(step: StepContext, payload: Any) -> Any:
        return await step.run("x", lambda: 1, needs_network="yes")

    durably = await make_durably(bad)
    done = await durably.trigger_and_wait(bad, None, timeout=30)
    assert done.status == "failed" and done.error is not None
    assert done.error.type == StepError.__qualname__ and "needs_network" in done.error.message


def test_the_options_are_checked() -> None:
    with pytest.raises(ValidationError, match="offline_recheck_interval"):
        Durably(offline_recheck_interval=0)
    with pytest.raises(ValidationError, match="NetworkStatus"):
        Durably(network=object())  # type: ignore[arg-type]
    # The page's option, in milliseconds.
    assert durably_options({"offlineRecheckInterval": 5000}) == {"offline_recheck_interval": 5.0}


# --- kills -------------------------------------------------------------------------------------


@pytest.mark.sqlite_only
async def test_a_run_waiting_for_the_network_survives_sigkill_and_continues_after_a_restart_online(
    db_url, db_path, tmp_path
) -> None:
    """crash_jobs.py "offline": the network is there while <side effects>.online exists. The
    first process, offline, fails "fetch" with a network error and is killed while the run
    waits for the network; the second starts online and continues it at once (the recheck
    interval is an hour: only the restart's look at the network can wake it), without
    running "before" again and with the offline attempt costing no retry (max_attempts=1)."""
    side_effects = tmp_path / "side-effects.txt"
    first, (run_id, _, _) = await kill_once_waiting(
        db_url, db_path, side_effects, kind="offline", seconds=3600
    )
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("SELECT wait_reason, wait_step FROM durably_runs").fetchone() == (
            "offline",
            "fetch",
        )
        attempts = conn.execute("SELECT name, attempt, offline FROM durably_step_attempts").fetchall()
    finally:
        conn.close()
    assert attempts == [("fetch", 1, 1)]

    (tmp_path / "side-effects.txt.online").touch()
    second = start_process("wait", db_url, str(side_effects), "--kind", "offline", "--seconds", "3600")
    result = finish_process(second)
    assert result["disposition"] == "idempotent" and result["status"] == "completed"
    assert result["output"] == "fetched"
    lines = [(name, pid) for name, pid, _ in timed_lines(side_effects)]
    assert lines == [
        ("before", first.pid),
        ("fetch", first.pid),
        ("fetch", result["pid"]),
        ("after", result["pid"]),
    ]
    async with Durably(db_url, worker=False) as client:
        attempts = await client.get_step_attempts(run_id)
    assert [(a.name, a.attempt, a.status, a.offline) for a in attempts] == [
        ("before", 1, "completed", False),
        ("fetch", 1, "failed", True),
        ("fetch", 2, "completed", False),
        ("after", 1, "completed", False),
    ]


async def test_a_non_retryable_error_fails_even_when_it_wraps_a_network_error_offline(make_durably) -> None:
    network = SwitchedNetwork(online=False)

    def give_up() -> None:
        try:
            raise ConnectionError("Failed to fetch")
        except ConnectionError as exc:
            raise NonRetryableError("the caller said: do not wait") from exc

    @define_job("give-up")
    async def give_up_job(step: StepContext, payload: Any) -> Any:
        return await step.run("give-up", give_up)

    durably = await make_durably(give_up_job, network=network, offline_recheck_interval=NO_RECHECK)
    done = await durably.trigger_and_wait(give_up_job, None, timeout=30)
    assert done.status == "failed" and done.error is not None and done.error.type == "NonRetryableError"
