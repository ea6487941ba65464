"""create({offline: true}) in real headless Chromium: after one visit the service worker
has precached the runtime and the page's files, so with the HTTP server stopped (or
connecting but never answering) a reload still starts the runtime, lists the earlier runs
and completes a new one."""

from __future__ import annotations

import json
import shutil
import socket
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import _serve, _SiteWithTestPages, site_build
from pagekit import page, wait_until

# worker.js's Cache Storage entry for Pyodide's memory snapshot: not one of the service
# worker's precaches (which are versioned by the build), so the counts below leave it out.
PYTHON_SNAPSHOT_CACHE = "durably-web-python-snapshot"
NOT_PRECACHES = json.dumps(["durably-web-pages", PYTHON_SNAPSHOT_CACHE])

pytestmark = pytest.mark.browser


class StoppableSite:
    """site/ and the test pages on a port that stays the same across stop() and start()
    (the origin, and so the service worker's registration and caches, stay too)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.port = 0
        self.directory = directory
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> str:
        handler = type("OfflineSiteHandler", (_SiteWithTestPages,), {"quiet": True, "request_log": []})
        self.server = ThreadingHTTPServer(
            ("127.0.0.1", self.port), lambda *a: handler(*a, directory=str(self.directory or site_build.SITE))
        )
        self.port = self.server.server_address[1]
        _serve(self.server)
        return f"http://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@pytest.fixture
def stoppable_site(site_url: Any) -> Any:  # site_url: builds site/ once per session
    site = StoppableSite()
    yield site
    site.stop()


def controlled(drv: Any) -> None:
    """Reload until the service worker controls the page (its precache is then complete)."""
    wait_until(
        lambda: drv.execute_script(
            "return navigator.serviceWorker.controller !== null || (location.reload(), false);"
        ),
        timeout=90,
        what="the service worker to control the page",
    )
    ready(drv)


def ready(drv: Any) -> None:
    wait_until(
        lambda: drv.execute_script("return window.t && (window.t.ready || window.t.error)"),
        timeout=90,
        what="the runtime to start",
    )
    assert drv.execute_script("return window.t.error") is None, drv.execute_script("return window.t.error")


def test_after_one_visit_the_app_runs_with_the_server_stopped(
    launch_chromium: Any, stoppable_site: StoppableSite
) -> None:
    url = stoppable_site.start()
    drv = launch_chromium()
    address = f"{url}_test/runtime.html?offline=1&db=offline.db&storage=opfs"
    drv.get(address)
    ready(drv)
    first = page(
        drv, 'return (await durably.triggerAndWait("count-steps", {steps: 3}, {timeout: 60000})).id;'
    )
    # The precache is complete once the service worker is active and controls the page.
    wait_until(
        lambda: drv.execute_script(
            "return navigator.serviceWorker.controller !== null || (location.reload(), false);"
        ),
        timeout=90,
        what="the service worker to control the page",
    )
    ready(drv)
    names = page(drv, "return await caches.keys();")
    precaches = [n for n in names if n.startswith("durably-web-") and n not in json.loads(NOT_PRECACHES)]
    assert precaches, names

    stoppable_site.stop()
    drv.get(address)
    ready(drv)
    got = page(
        drv,
        """
        const earlier = (await durably.getRuns()).map((r) => r.id);
        const run = await durably.triggerAndWait("count-steps", {steps: 3}, {timeout: 60000});
        return {earlier, status: run.status};
        """,
    )
    assert first in got["earlier"], got
    assert got["status"] == "completed", got

    # A network that connects but never answers (lie-fi): a socket listening on the site's
    # port that accepts nothing. The page's own files come from the pages cache once the
    # service worker has waited PAGE_NETWORK_TIMEOUT_MS for them, instead of hanging.
    silent = socket.socket()
    silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    silent.bind(("127.0.0.1", stoppable_site.port))
    silent.listen(64)
    try:
        drv.get(address)
        ready(drv)
        status = page(
            drv, 'return (await durably.triggerAndWait("count-steps", {steps: 2}, {timeout: 60000})).status;'
        )
        assert status == "completed"
    finally:
        silent.close()


def test_a_new_build_is_announced_and_used_from_the_next_load_only(
    launch_chromium: Any, site_url: Any, tmp_path: Path
) -> None:
    copy = tmp_path / "site"
    shutil.copytree(site_build.SITE, copy)
    site = StoppableSite(copy)
    url = site.start()
    try:
        drv = launch_chromium()
        address = f"{url}_test/runtime.html?offline=1&db=update.db&storage=opfs"
        drv.get(address)
        ready(drv)
        controlled(drv)
        old = page(drv, f"return (await caches.keys()).filter((n) => !{NOT_PRECACHES}.includes(n));")
        assert len(old) == 1, old

        # A new build: worker.js changed, the manifest and the service worker's version rewritten.
        worker = copy / "worker.js"
        source = worker.read_text()
        worker.unlink()
        worker.write_text(source + "\n// build two\n")
        (copy / site_build.SERVICE_WORKER).unlink()
        shutil.copy2(site_build.ROOT / "static" / site_build.SERVICE_WORKER, copy / site_build.SERVICE_WORKER)
        new_version = site_build.write_precache(copy, site_build.demo_page_files())["version"]
        assert f"durably-web-{new_version}" not in old

        page(drv, "await (await navigator.serviceWorker.getRegistration()).update();")
        announced = wait_until(
            lambda: drv.execute_script(
                "return t.events.filter((e) => e.type === 'update:ready').map((e) => e.version);"
            ),
            timeout=90,
            what="update:ready on the old page",
        )
        assert announced == [new_version], announced
        # The old page keeps its build: its runtime goes on running runs.
        run = page(drv, 'return await durably.triggerAndWait("count-steps", {steps: 2}, {timeout: 60000});')
        assert run["status"] == "completed", run
        served_old = page(drv, 'return (await (await fetch("/worker.js")).text()).includes("build two");')
        assert served_old is False, "the old page was served a file of the new build"

        drv.get(address)
        ready(drv)
        served_new = page(drv, 'return (await (await fetch("/worker.js")).text()).includes("build two");')
        assert served_new is True
        wait_until(
            lambda: (
                drv.execute_script(
                    "return caches.keys().then((names) => JSON.stringify("
                    f"names.filter((n) => n !== {PYTHON_SNAPSHOT_CACHE!r}).sort()));"
                )
                == json.dumps([f"durably-web-{new_version}", "durably-web-pages"], separators=(",", ":"))
            ),
            timeout=60,
            what="only the new build's cache (and the page files') to be left",
        )
    finally:
        site.stop()
