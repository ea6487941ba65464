"""``durably-web schedules list|pause|resume|delete`` on a database URL, in a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from durably_web import Durably, StepContext, define_job


@define_job("feed")
async def feed_job(step: StepContext, payload: Any) -> Any:
    return payload


def cli(workdir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "durably_web", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


async def test_schedules_list_pause_resume_delete(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    async with Durably(url, jobs=[feed_job], worker=False) as durably:
        await durably.schedule(feed_job, "*/15 * * * *", input={"u": 1}, name="poll-feed")
        await durably.schedule(feed_job, "0 3 * * *", name="nightly", timezone="Europe/Oslo")

    listed = cli(tmp_path, "schedules", "list", url)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:4] == ["NAME", "JOB", "CRON", "TIMEZONE"]
    assert [line.split()[0] for line in lines[1:]] == ["nightly", "poll-feed"]
    assert "Europe/Oslo" in lines[1]

    paused = cli(tmp_path, "schedules", "pause", url, "poll-feed")
    assert paused.returncode == 0 and paused.stdout.strip() == "schedule poll-feed: paused"
    as_json = json.loads(cli(tmp_path, "schedules", "list", url, "--json").stdout)
    assert {s["name"]: s["paused"] for s in as_json} == {"nightly": False, "poll-feed": True}
    assert "paused" in cli(tmp_path, "schedules", "list", url).stdout

    # APP from DURABLY_APP: the schedule's name is not taken for it.
    resumed = cli(tmp_path, "schedules", "resume", "poll-feed", env={"DURABLY_APP": url})
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith("schedule poll-feed: next tick ")

    deleted = cli(tmp_path, "schedules", "delete", url, "nightly")
    assert deleted.returncode == 0 and "deleted" in deleted.stdout
    assert "runs it created stay" in deleted.stderr
    missing = cli(tmp_path, "schedules", "delete", url, "nightly")
    assert missing.returncode == 1 and "not found" in missing.stderr
    async with Durably(url, worker=False) as durably:
        [left] = await durably.list_schedules()
        assert left.name == "poll-feed" and not left.paused


async def test_schedules_list_on_an_empty_database_says_so(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    async with Durably(url, worker=False):
        pass  # created and migrated
    result = cli(tmp_path, "schedules", "list", url)
    assert result.returncode == 0 and result.stdout == "" and "no schedules" in result.stderr
