"""Safe deploys: each run records the job version that started it, and a worker of another
version leaves it alone (or continues or fails it, per job)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers import FakeClock, finish_process, kill_once_waiting_versioned, start_process, wait_until

from durably_web import StepContext, ValidationError, define_job
from durably_web.versions import code_version

pytestmark = pytest.mark.all_backends


def versioned(version: str | None, *, policy: str = "leave", order: tuple[str, ...] = ("a", "b")) -> Any:
    """The job "deploy" as one version of the code: its steps, a long sleep, one more step."""

    @define_job("deploy", version=version, on_version_mismatch=policy)  # type: ignore[arg-type]
    async def deploy(step: StepContext, payload: Any) -> str:
        for name in order:
            await step.run(name, lambda name=name: name)
        await step.sleep("pause", timedelta(hours=1))
        await step.run("after", lambda: version)
        return f"finished by {version}"

    return deploy


# --- what a version is ---------------------------------------------------------------------------


def test_an_explicit_version_is_kept_and_a_bad_one_or_policy_refused():
    assert versioned("2").version == "2"
    for bad in ("", " 2", "x" * 65, 2, "a\nb"):
        with pytest.raises(ValidationError, match="version"):
            versioned(bad)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="on_version_mismatch"):
        versioned("2", policy="ignore")


def _compiled(source: str, name: str, *, leading_lines: int = 0, filename: str = "jobs.py") -> Any:
    namespace: dict[str, Any] = {}
    # dont_inherit: not this module's "from __future__ import annotations" (a flag of the code).
    exec(
        compile("\n" * leading_lines + textwrap.dedent(source), filename, "exec", dont_inherit=True),
        namespace,
    )
    return namespace[name]


HANDLER = """
async def handler(step, payload):
    kind = payload.get("kind")
    if kind in {"alpha", "beta", "gamma", "delta"}:
        return await step.run("known", lambda: [kind, 1.5, None])
    return await step.run("other", lambda: (kind, b"x"))
"""


def test_without_a_version_the_handlers_code_is_hashed_ignoring_where_it_sits():
    base = code_version(_compiled(HANDLER, "handler"))
    assert re.fullmatch(r"[0-9a-f]{12}", base)
    # Moved down the file, in another checkout path, renamed: the same code, the same version.
    assert code_version(_compiled(HANDLER, "handler", leading_lines=7, filename="/srv/b/jobs.py")) == base
    assert code_version(_compiled(HANDLER.replace("handler", "renamed"), "renamed")) == base
    # Any change in what it does is another version, also inside the lambdas it defines.
    assert code_version(_compiled(HANDLER.replace('"gamma"', '"epsilon"'), "handler")) != base
    assert code_version(_compiled(HANDLER.replace("1.5", "2.5"), "handler")) != base
    assert code_version(_compiled(HANDLER.replace('"other"', '"others"'), "handler")) != base

    async def handler(step: StepContext, payload: Any) -> None: ...

    assert define_job("hashed")(handler).version == code_version(handler)


def test_the_code_hash_is_the_same_in_another_process_with_other_string_hashing():
    # The set literal's frozenset iterates in hash order, which PYTHONHASHSEED changes.
    here = code_version(_compiled(HANDLER, "handler"))
    program = (
        "import sys, textwrap; from durably_web.versions import code_version\n"
        "ns = {}\n"
        f"exec(compile(textwrap.dedent({HANDLER!r}), 'jobs.py', 'exec'), ns)\n"
        "print(code_version(ns['handler']))\n"
    )
    seen = set()
    for seed in ("1", "2", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", program], env=env, capture_output=True, text=True, check=True
        )
        seen.add(out.stdout.strip())
    assert seen == {here}


# --- what a worker does with another version's run ---------------------------------------------------


async def test_a_run_records_the_version_at_trigger_and_the_one_that_started_it(make_durably):
    clock = FakeClock()
    client = await make_durably(versioned("1"), clock=clock, worker=False)
    run = await client.trigger("deploy", None)
    assert run.version == "1"  # what the triggering process knows
    # Pending runs never started go to any version; the first claim records its own.
    worker = await make_durably(versioned("2"), clock=clock)
    [waiting] = await wait_until(lambda: worker.get_runs(status="waiting"))
    assert waiting.id == run.id and waiting.version == "2"


async def test_a_worker_of_another_version_leaves_a_started_run_to_its_own_version(make_durably, db_url):
    clock = FakeClock()
    old = await make_durably(versioned("1"), clock=clock)
    run = await old.trigger("deploy", None)
    await wait_until(lambda: old.get_runs(status="waiting"))
    await old.stop()  # the rolling deploy: the old worker goes, a new one comes

    new = await make_durably(versioned("2"), clock=clock)
    fresh = await new.trigger("deploy", None)  # the new version's own work goes on meanwhile
    await wait_until(lambda: new.get_runs(status="waiting", version="2"))
    clock.now += 3601  # both runs are due
    assert (await new.wait_for_run(fresh.id, timeout=30)).output == "finished by 2"
    await asyncio.sleep(0.3)  # many claim loop turns: the old run is never claimed, not even briefly
    left = await new.get_run(run.id)
    assert left.status == "waiting" and left.attempt == 1 and left.version == "1"
    assert [r.id for r in await new.get_runs(version="1", status=["pending", "leased", "waiting"])] == [
        run.id
    ]

    back = await make_durably(versioned("1"), clock=clock)  # a worker of version 1 takes it
    done = await back.wait_for_run(run.id, timeout=30)
    assert done.status == "completed" and done.output == "finished by 1" and done.attempt == 2


async def test_continue_resumes_another_versions_run_with_this_code(make_durably):
    clock = FakeClock()
    old = await make_durably(versioned("1"), clock=clock)
    run = await old.trigger("deploy", None)
    await wait_until(lambda: old.get_runs(status="waiting"))
    await old.stop()
    new = await make_durably(versioned("2", policy="continue"), clock=clock)
    clock.now += 3601
    done = await new.wait_for_run(run.id, timeout=30)
    assert done.status == "completed" and done.output == "finished by 2"
    assert done.version == "1"  # still the version that started it


async def test_continue_still_catches_a_changed_step_order_as_non_deterministic_replay(make_durably):
    clock = FakeClock()
    old = await make_durably(versioned("1"), clock=clock)
    run = await old.trigger("deploy", None)
    await wait_until(lambda: old.get_runs(status="waiting"))
    await old.stop()
    new = await make_durably(versioned("2", policy="continue", order=("b", "a")), clock=clock)
    clock.now += 3601
    done = await new.wait_for_run(run.id, timeout=30)
    assert done.status == "failed" and done.error is not None
    assert done.error.type == "NonDeterministicReplayError"


async def test_fail_fails_another_versions_run_with_version_mismatch_error(make_durably):
    clock = FakeClock()
    old = await make_durably(versioned("1"), clock=clock)
    run = await old.trigger("deploy", None)
    await wait_until(lambda: old.get_runs(status="waiting"))
    await old.stop()
    new = await make_durably(versioned("2", policy="fail"), clock=clock)
    clock.now += 3601
    done = await new.wait_for_run(run.id, timeout=30)
    assert done.status == "failed" and done.error is not None
    assert done.error.type == "VersionMismatchError" and "'1'" in done.error.message
    assert [s.name for s in await new.get_steps(run.id)] == ["a", "b", "pause"]  # nothing more ran


async def test_get_runs_filters_by_version_with_status_and_job(make_durably):
    clock = FakeClock()

    @define_job("other", version="1")
    async def other(step: StepContext, payload: Any) -> None: ...

    one = await make_durably(versioned("1"), other, clock=clock, worker=False)
    two = await make_durably(versioned("2"), clock=clock, worker=False)
    a = await one.trigger("deploy", None)
    b = await two.trigger("deploy", None)
    c = await one.trigger("other", None)
    assert [r.id for r in await one.get_runs(version="1")] == [c.id, a.id]
    assert [r.id for r in await one.get_runs(version=["1", "2"], job_name="deploy")] == [b.id, a.id]
    assert [r.id for r in await one.get_runs(version="2", status="pending")] == [b.id]
    assert await one.get_runs(version="2", status="completed") == []
    assert [r.id for r in await one.get_runs(version="1", limit=1, offset=1)] == [a.id]
    assert await one.get_runs(version=[]) == []
    with pytest.raises(ValidationError):
        await one.get_runs(version=1)  # type: ignore[arg-type]


# --- a kill --------------------------------------------------------------------------------------------


@pytest.mark.sqlite_only
async def test_after_a_kill_a_worker_of_another_version_never_claims_the_run(db_path: Path, tmp_path: Path):
    db_url = f"sqlite:///{db_path}"
    side_effects = tmp_path / "effects.txt"
    row = await kill_once_waiting_versioned(db_url, db_path, side_effects, version="1", seconds=0.5)
    assert row[1:] == ("waiting", "1", 1)  # status, version, attempt: persisted before the kill
    # Version 2 works well past the wake-up time and leaves the run alone.
    other = finish_process(
        start_process("versioned", db_url, str(side_effects), "--version", "2", "--serve", "2")
    )
    assert (other["status"], other["version"], other["attempt"]) == ("waiting", "1", 1)
    done = finish_process(
        start_process("versioned", db_url, str(side_effects), "--version", "1", "--seconds", "0.5")
    )
    assert done["status"] == "completed" and done["output"] == "1" and done["attempt"] == 2
    names = [line.split(" ")[0] for line in side_effects.read_text().splitlines()]
    assert names == ["first", "second"]
