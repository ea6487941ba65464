"""The demo page (site/index.html) in real headless Chromium: it loads with no console
errors and no request outside 127.0.0.1, runs a weather report to its output, after
a reload in the middle of a run shows the run resuming with its finished steps restored,
and offline (DevTools' emulation) shows the run waiting for the network at "publish".

Fixtures (built site/, Chromium with a fresh profile, network guard) are in conftest.py.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from network_emulation import OfflineEmulation
from pagekit import wait_until

from durably_web.demo.jobs import fetch_reading, summarize

pytestmark = pytest.mark.browser


def expected_report(city: str, days: int) -> dict[str, Any]:
    """What CPython computes for the same input (the module is the same file)."""

    async def readings() -> list[Any]:
        return [await fetch_reading(city, day, 0) for day in range(1, days + 1)]

    return summarize(city, asyncio.run(readings())).model_dump()


def open_demo(driver: Any, url: str) -> None:
    driver.set_window_size(1280, 1000)
    driver.get(url + "index.html")
    wait_ready(driver)


def wait_ready(driver: Any) -> None:
    wait_until(
        lambda: driver.execute_script("return document.body.dataset.ready === '1'"), what="the demo ready"
    )


def start_report(driver: Any, city: str, days: int, delay: float) -> str:
    driver.execute_script(
        """const [city, days, delay] = arguments;
        document.getElementById('city').value = city;
        document.getElementById('days').value = days;
        document.getElementById('delay').value = delay;
        document.getElementById('start').click();""",
        city,
        days,
        delay,
    )
    return wait_until(
        lambda: driver.execute_script(
            "const r = window.demo.view.run; return r && r.input.city === arguments[0] && r.id", city
        ),
        what="the new run to be shown",
    )


def page_state(driver: Any) -> dict[str, Any]:
    return driver.execute_script(
        """const q = (s) => [...document.querySelectorAll(s)].map((e) => e.textContent);
        const $ = (id) => document.getElementById(id);
        return {status: $('run-status').textContent, invite: !$('reload-invite').hidden,
                resumed: $('resumed').hidden ? null : $('resumed').textContent,
                steps: q('#steps .step-name'), tags: q('#steps .tag'),
                logs: q('#log .log-msg'), stats: q('#result .stat-value'),
                recent: q('#recent-body tr td.city'), runtime: $('runtime-text').textContent,
                network: $('network-text').textContent, online: $('network').dataset.online,
                progress: $('progress-text').textContent}"""
    )


def console_errors(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_demo_runs_a_report(driver: Any, site_url: Any, network_guard: Any) -> None:
    url, _ = site_url
    open_demo(driver, url)  # the module's first page: the log holds exactly its requests
    urls = network_guard.urls(driver)
    state = page_state(driver)
    assert state["runtime"].startswith("Python ready"), state["runtime"]
    assert driver.execute_script("return document.getElementById('start').disabled") is False

    run_id = start_report(driver, "Bergen", 3, 0.05)
    wait_until(lambda: page_state(driver)["status"] == "completed", what="the report to complete")
    wait_until(lambda: len(page_state(driver)["logs"]) == 4, what="the four log lines")
    state = page_state(driver)
    report = expected_report("Bergen", 3)
    assert state["stats"] == [
        f"{report['mean_temperature_c']} °C",
        f"{report['total_rain_mm']} mm",
        f"day {report['wettest_day']}",
        "3",
    ]
    assert state["steps"] == ["fetch-day-1", "fetch-day-2", "fetch-day-3", "summarize", "publish"]
    assert state["tags"] == ["ran here"] * 5
    assert (state["online"], state["network"]) == ("true", "Online")
    assert state["logs"][-1] == "report for Bergen published"
    assert state["invite"] is False and state["resumed"] is None
    assert state["logs"][0].startswith("day 1: ")
    wait_until(lambda: page_state(driver)["recent"][:1] == ["Bergen"], what="the recent list")
    output = driver.execute_async_script(
        "const done = arguments[1]; window.demo.client.getRun(arguments[0]).then((r) => done(r.output));",
        run_id,
    )
    assert output == report

    assert console_errors(driver) == []
    # Chromium's autofill service looks at any page with a form (browser-internal, like the
    # background hosts conftest.py tolerates); everything else goes through the shared check.
    hits = [hit for hit in network_guard.trap_hits if " content-autofill.googleapis.com:" not in hit]
    type(network_guard)(hits).check(urls + network_guard.urls(driver), url)


def test_demo_resumes_after_reload(driver: Any, site_url: Any, artifacts_dir: Path) -> None:
    url, _ = site_url
    open_demo(driver, url)
    run_id = start_report(driver, "Trondheim", 8, 0.6)
    wait_until(
        lambda: len(driver.execute_script("return [...window.demo.view.steps.keys()]")) >= 2,
        what="two finished steps",
    )
    assert page_state(driver)["invite"] is True

    driver.refresh()
    wait_ready(driver)
    state = page_state(driver)
    assert driver.execute_script("return window.demo.view.run.id") == run_id
    assert state["resumed"] and "restored from storage" in state["resumed"], state
    restored_before = state["tags"].count("restored")
    assert restored_before >= 2
    if state["status"] == "running":  # the picture worth keeping: a run resuming
        driver.set_window_size(1280, 1750)
        assert driver.save_screenshot(str(artifacts_dir / "demo.png"))
        driver.set_window_size(1280, 1000)

    wait_until(lambda: page_state(driver)["status"] == "completed", what="the resumed run to complete")
    state = page_state(driver)
    assert len(state["tags"]) == 10
    assert state["tags"].count("restored") == restored_before  # restored steps were not run again
    assert state["tags"][restored_before:] == ["ran here"] * (10 - restored_before)
    report = expected_report("Trondheim", 8)
    assert state["stats"][0] == f"{report['mean_temperature_c']} °C"
    # Each day is logged by the page that fetched it. The last restored day may be logged
    # twice: demo_jobs.py asks step.is_replaying *after* step.run, and that already says
    # False once the last recorded step has been replayed.
    days = Counter(line.split(":")[0] for line in state["logs"] if line.startswith("day "))
    assert set(days) == {f"day {d}" for d in range(1, 9)}
    assert {day for day, n in days.items() if n > 1} <= {f"day {restored_before}"}
    assert console_errors(driver) == []


def test_dashboard_in_local_mode(driver: Any, site_url: Any) -> None:
    """dashboard.html?local=… runs on the same database as the demo (same profile, same OPFS):
    a report run in the demo shows up there, with its steps. (Runs on its own too: it makes
    its own run instead of relying on the tests before it.)"""
    url, _ = site_url
    open_demo(driver, url)
    run_id = start_report(driver, "Oslo", 2, 0.05)
    wait_until(lambda: page_state(driver)["status"] == "completed", what="the report to complete")

    driver.get(url + "dashboard.html?local=demo_jobs.py&db=demo.db")
    wait_until(
        lambda: driver.execute_script("return document.body.dataset.ready === '1'"), what="dashboard ready"
    )
    assert driver.execute_script("return document.getElementById('connection-text').textContent").startswith(
        "in this browser"
    )
    rows = wait_until(
        lambda: driver.execute_script(
            "const rows = [...document.querySelectorAll('#runs-body tr')].map((r) => [r.dataset.runId,"
            " r.querySelector('.badge').textContent, r.querySelector('.job').textContent]);"
            " return rows.some((r) => r[0] === arguments[0]) && rows",
            run_id,
        ),
        what="the demo's run in the list",
    )
    assert [run_id, "completed", "weather-report"] in rows, rows
    assert all(r[2] == "weather-report" for r in rows), rows
    driver.execute_script(
        "[...document.querySelectorAll('#runs-body tr')]"
        ".find((r) => r.dataset.runId === arguments[0]).click()",
        run_id,
    )
    wait_until(
        lambda: driver.execute_script("return document.querySelectorAll('#detail .step').length === 4"),
        what="the Oslo run's four steps (two days, summarize, publish) in the detail",
    )
    assert console_errors(driver) == []


def test_demo_run_waits_for_the_network(driver: Any, site_url: Any) -> None:
    """Offline, a report computes everything it can, then waits at "publish" (needs_network)
    and says so; back online it publishes and completes, its other steps not run again."""
    url, _ = site_url
    open_demo(driver, url)
    network = OfflineEmulation(driver)
    try:
        network.set_offline(True)
        wait_until(lambda: page_state(driver)["online"] == "false", what="the page to show offline")
        assert page_state(driver)["network"].startswith("Offline")
        run_id = start_report(driver, "Tromsø", 2, 0)
        waiting = wait_until(
            lambda: (s := page_state(driver))["status"] == "waiting for the network" and s,
            what="the run to wait for the network",
        )
        assert 'step "publish" waits for the network' in waiting["progress"], waiting
        assert waiting["tags"] == ["ran here"] * 3 + ["needs the network"]
        network.set_offline(False)
        done = wait_until(
            lambda: (s := page_state(driver))["status"] == "completed" and s,
            what="the run to complete online",
        )
    finally:
        network.close()
    assert (done["online"], done["network"]) == ("true", "Online")
    assert done["tags"] == ["ran here"] * 4 and done["logs"][-1].endswith(" published")
    attempts = driver.execute_async_script(
        "const done = arguments[1]; window.demo.client.getStepAttempts(arguments[0])"
        ".then((a) => done(a.map((x) => [x.name, x.attempt])));",
        run_id,
    )
    assert attempts == [["fetch-day-1", 1], ["fetch-day-2", 1], ["summarize", 1], ["publish", 1]]
    assert console_errors(driver) == []


def test_demo_is_an_installable_app(driver: Any, site_url: Any) -> None:
    """Chromium's own installability check passes: manifest (name, start URL, standalone
    display, 192 and 512 px icons that load) and the page served from it."""
    url, _ = site_url
    open_demo(driver, url)
    manifest = driver.execute_cdp_cmd("Page.getAppManifest", {})
    assert manifest["url"] == url + "manifest.webmanifest"
    assert manifest["errors"] == []
    parsed = manifest["manifest"]  # Chromium's parse of it, with URLs resolved
    assert parsed["display"] == "kStandalone" and parsed["startUrl"] == url
    assert {icon["sizes"] for icon in parsed["icons"]} >= {"192x192", "512x512"}
    seen: list[Any] = []

    def installable() -> bool:
        seen[:] = driver.execute_cdp_cmd("Page.getInstallabilityErrors", {})["installabilityErrors"]
        return seen == []

    try:
        wait_until(installable, timeout=20, what="Chromium to report no installability errors")
    except AssertionError:
        raise AssertionError(f"not installable: {seen}") from None
