"""Schedules in real headless Chromium: in the browser worker (cronsim from site/, zone data
only with create({packages: ["tzdata"]})), through remote.js, and the dashboard's list with
pause/resume."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pagekit import page
from test_dashboard import ServerThread, open_dashboard, wait_until

pytestmark = pytest.mark.browser


def test_schedules_in_the_browser_worker_fire_and_take_zones_with_tzdata(
    launch_chromium: Any, site_url: Any, network_guard: Any
) -> None:
    url, _ = site_url
    drv = launch_chromium()
    drv.get(f"{url}_test/packages.html")
    out = page(
        drv,
        """
        const durably = await DurablyWeb.create({jobs: ["schedule_jobs.py"], storage: "memory"});
        const listed = await durably.listSchedules();
        let zoneError = null;
        try {
          await durably.schedule("ping", "0 3 * * *", {name: "oslo", timezone: "Europe/Oslo"});
        } catch (e) { zoneError = {name: e.name, message: e.message}; }
        const made = await durably.schedule("ping", "* * * * * *", {name: "every-second", input: {n: 1}});
        const deadline = Date.now() + 30000;
        let runs = [];
        while (Date.now() < deadline) {
          runs = await durably.getRuns({labels: {"durably:schedule": "every-second"}, status: "completed"});
          if (runs.length >= 2) break;
          await new Promise((r) => setTimeout(r, 100));
        }
        const paused = await durably.pauseSchedule("every-second");
        await durably.unschedule("every-second");
        const after = (await durably.listSchedules()).map((s) => s.name);
        await durably.close();
        return {listed, zoneError, made, runs, paused, after};
        """,
    )
    [nightly] = out["listed"]
    assert (nightly["name"], nightly["cron"], nightly["timezone"]) == ("nightly-page", "0 3 * * *", "UTC")
    assert out["zoneError"]["name"] == "ValidationError" and "tzdata" in out["zoneError"]["message"]
    assert out["made"]["name"] == "every-second" and out["made"]["input"] == {"n": 1}
    ticks = [run["labels"]["durably:tick"] for run in out["runs"]]
    assert len(ticks) >= 2 and len(set(ticks)) == len(ticks), ticks
    assert all(run["output"] == {"n": 1} for run in out["runs"])
    assert out["paused"]["paused"] is True and out["after"] == ["nightly-page"]

    drv.get(f"{url}_test/packages.html")
    oslo = page(
        drv,
        """
        const durably = await DurablyWeb.create({jobs: ["schedule_jobs.py"], storage: "memory",
                                                 packages: ["tzdata"]});
        const made = await durably.schedule("ping", "30 2 * * *", {name: "oslo", timezone: "Europe/Oslo"});
        await durably.close();
        return made;
        """,
    )
    assert oslo["timezone"] == "Europe/Oslo" and oslo["next_tick_at"].endswith(":30:00Z")
    urls = network_guard.urls(drv)
    assert any("cronsim-" in u for u in urls) and any("tzdata-" in u for u in urls), urls
    network_guard.check(urls, url)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, driver: Any) -> Iterator[ServerThread]:
    db: Path = tmp_path_factory.mktemp("schedules") / "runs.db"
    thread = ServerThread(f"sqlite:///{db}")
    thread.start()
    thread.wait_started()
    try:
        yield thread
    finally:
        driver.get("about:blank")
        thread.stop()


REMOTE_SCRIPT = r"""
const done = arguments[arguments.length - 1];
const c = DurablyWebRemote.connect(arguments[0]);
(async () => {
  const made = await c.schedule("nap", "0 3 * * *", {name: "team/nightly", timezone: "Europe/Oslo"});
  const listed = (await c.listSchedules()).map((s) => [s.name, s.paused]);
  const paused = await c.pauseSchedule("team/nightly");
  const resumed = await c.resumeSchedule("team/nightly");
  let bad = null;
  try { await c.schedule("nap", "not a cron"); } catch (e) { bad = e.name; }
  let unknown = null;
  try { await c.schedule("nap", "0 3 * * *", {every: 1}); } catch (e) { unknown = e.name; }
  await c.unschedule("team/nightly");
  let missing = null;
  try { await c.pauseSchedule("team/nightly"); } catch (e) { missing = e.name; }
  const kept = await c.schedule("nap", "0 4 * * *", {name: "dash"});
  await c.close();
  done({ok: true, made, listed, paused: paused.paused, resumed: resumed.paused, bad, unknown, missing,
        kept: kept.name});
})().catch((e) => done({ok: false, error: String(e && e.stack || e)}));
"""


def test_remote_client_and_dashboard_manage_schedules(driver: Any, server: ServerThread) -> None:
    open_dashboard(driver, server)
    reply = driver.execute_async_script(REMOTE_SCRIPT, server.base)
    assert reply["ok"], reply.get("error")
    assert reply["made"]["name"] == "team/nightly" and reply["made"]["timezone"] == "Europe/Oslo"
    assert reply["listed"] == [["team/nightly", False]]
    assert (reply["paused"], reply["resumed"]) == (True, False)
    errors = (reply["bad"], reply["unknown"], reply["missing"])
    assert errors == ("ValidationError", "ValidationError", "NotFoundError")
    assert reply["kept"] == "dash"

    open_dashboard(driver, server)  # the list shows the schedule that is left

    def button_text() -> str | None:
        return driver.execute_script(
            "const b = document.querySelector('#schedules button[data-schedule=\"dash\"]');"
            "return !document.getElementById('schedules').hidden && b ? b.textContent : null;"
        )

    assert wait_until(lambda: button_text() == "Pause", what="schedules list")
    driver.execute_script("document.querySelector('#schedules button[data-schedule=\"dash\"]').click()")
    wait_until(lambda: button_text() == "Resume", what="paused")
    row = driver.execute_script(
        "return document.querySelector('#schedules tr[data-schedule=\"dash\"]').textContent"
    )
    assert "paused" in row and "0 4 * * *" in row
    driver.execute_script("document.querySelector('#schedules button[data-schedule=\"dash\"]').click()")
    wait_until(lambda: button_text() == "Pause", what="resumed")
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []
