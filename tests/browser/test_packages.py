"""create({packages}) in real headless Chromium: a job module imports python-dateutil,
a wheel build.py bundled into site/, with no request leaving 127.0.0.1; a package
that is not bundled is refused with a ValidationError naming it and the way to add it.

Both tests use storage "memory" (nothing stays in the profile), so they share the module's
Chromium (conftest.py's ``driver``): the second page load reuses the first one's HTTP cache."""

from __future__ import annotations

from typing import Any

import pytest
from pagekit import PageError, page

pytestmark = pytest.mark.browser


def test_a_job_module_imports_a_bundled_package_offline(
    driver: Any, site_url: Any, network_guard: Any
) -> None:
    url, _ = site_url
    drv = driver
    drv.get(f"{url}_test/packages.html")
    run = page(
        drv,
        """
        const durably = await DurablyWeb.create({jobs: ["dateutil_jobs.py"], storage: "memory",
                                                 packages: ["python-dateutil"]});
        const input = {date: "2026-01-31", months: 1};
        const run = await durably.triggerAndWait("add-months", input, {timeout: 30000});
        window.durably = durably;
        return run;
        """,
    )
    # relativedelta clamps to the month's end: the stdlib alone has no such arithmetic.
    assert run["status"] == "completed" and run["output"] == {"date": "2026-02-28"}, run
    urls = network_guard.urls(drv)
    assert any("python_dateutil-" in u and u.endswith(".whl") for u in urls), urls
    assert any("six-" in u for u in urls) and any("tzdata-" in u for u in urls), urls
    assert any("/micropip-" in u for u in urls), urls  # installed by micropip, from the site
    network_guard.check(urls, url)


def test_a_package_that_is_not_bundled_is_refused_by_name(driver: Any, site_url: Any) -> None:
    url, _ = site_url
    drv = driver
    drv.get(f"{url}_test/packages.html")
    with pytest.raises(PageError) as caught:
        page(
            drv,
            """await DurablyWeb.create({jobs: ["dateutil_jobs.py"], storage: "memory",
                                        packages: ["python-dateutil", "Not_Bundled.pkg"]});""",
        )
    error = caught.value.error
    assert error["name"] == "ValidationError", error
    assert '"not-bundled-pkg"' in error["message"] and "python-dateutil" not in error["details"]["packages"]
    assert "browser-wheels.json" in error["message"] and "build.py" in error["message"], error
    assert error["details"]["packages"] == ["not-bundled-pkg"]
    # A job module that needs a package nobody listed fails on import, naming the module.
    with pytest.raises(PageError) as caught:
        page(drv, 'await DurablyWeb.create({jobs: ["dateutil_jobs.py"], storage: "memory"});')
    assert "dateutil" in caught.value.error["message"], caught.value.error
