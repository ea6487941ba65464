"""Fixtures for the real-Chromium tests: the built site, an outside-network trap, browsers.

Driven with Selenium and Debian's /usr/bin/chromedriver (the driver that matches
/usr/bin/chromium, both from apt). Selenium was picked over Playwright because
it needs no browser download of its own (Playwright's Python package ships a
Node driver pinned to its own Chromium build and only tolerates a system
browser via executable_path), and because pytest-pyodide's "chrome" runtime is
Selenium too, so both use the same dependency and the same driver.

Network guard, two layers:
* Chromium runs with --proxy-server pointing at a trap on 127.0.0.1 that
  records and refuses every request; loopback bypasses proxies, so only
  requests leaving 127.0.0.1 (from the page, its workers or the browser itself)
  reach the trap;
* the DevTools performance log, with the "devtools.timeline" trace category:
  its Network.* events cover the page only, but the trace's ResourceSendRequest
  events also list every fetch and module import of the dedicated worker.

Chromium's own background services (update checks, sign-in, the default
search engine's preconnect) also try to go out through the proxy even with the
--disable-* flags; those few exact hosts are tolerated in the trap (never in
the page's log), everything else fails the test.

The site server also serves ``tests/browser/pages/`` under ``/_test/`` (test
pages and job modules that must not ship in site/).

Without CI set, a Chromium that cannot start skips the test; with CI=1 it fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = Path(__file__).resolve().parent / "pages"
# Load the repo-root build.py under its own name: "build" is also a PyPI package.
_spec = importlib.util.spec_from_file_location("durably_site_build", ROOT / "build.py")
assert _spec is not None and _spec.loader is not None
site_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(site_build)

CHROMIUM = os.environ.get("DURABLY_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("DURABLY_CHROMEDRIVER", "/usr/bin/chromedriver")
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")

# Browser-internal traffic seen from Debian's chromium 156 despite the flags below.
CHROMIUM_BACKGROUND_HOSTS = {
    "accounts.google.com",
    "clients2.google.com",
    "content-autofill.googleapis.com",
    "optimizationguide-pa.googleapis.com",
    "safebrowsing.googleapis.com",
    "start.duckduckgo.com",
    "update.googleapis.com",
}


# -- servers ------------------------------------------------------------------------


class _Trap(BaseHTTPRequestHandler):
    hits: list[str] = []

    def _refuse(self) -> None:
        self.hits.append(f"{self.command} {self.path}")
        self.send_error(502, "durably-web test: outside network is forbidden")

    do_GET = do_POST = do_HEAD = do_PUT = do_OPTIONS = do_CONNECT = _refuse

    def log_message(self, *args: Any) -> None:
        pass


def _serve(server: ThreadingHTTPServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


#: Requests to /_test/hit?step=KEY, counted per KEY (the ``endpoint_hits`` fixture).
ENDPOINT_HITS: Counter[str] = Counter()
_ENDPOINT_LOCK = threading.Lock()


class _SiteWithTestPages(site_build.SiteHandler):  # type: ignore[misc,name-defined]
    """site/, plus tests/browser/pages/ under /_test/."""

    extra_roots = (str(PAGES),)

    def do_GET(self) -> None:
        # /_test/hit?step=KEY: a local HTTP endpoint for job steps to call; it counts the
        # requests that reached it per KEY and answers {"count": n}, never from a cache.
        if self.path.startswith("/_test/hit?"):
            key = parse_qs(urlsplit(self.path).query).get("step", [""])[0]
            with _ENDPOINT_LOCK:
                ENDPOINT_HITS[key] += 1
                body = json.dumps({"count": ENDPOINT_HITS[key]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        # /_test/redirect?to=URL answers 302 to URL: the open redirect an app that hosts
        # the dashboard may have (the ?local= redirect test uses it).
        if self.path.startswith("/_test/redirect?"):
            target = parse_qs(urlsplit(self.path).query).get("to", [""])[0]
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    def translate_path(self, path: str) -> str:
        translated: str = super().translate_path(path)
        overlay = os.path.join(self.directory, "_test")
        if translated == overlay or translated.startswith(overlay + os.sep):
            return str(PAGES) + translated[len(overlay) :]
        return translated


@pytest.fixture(scope="session")
def site_url() -> Iterator[tuple[str, list[str]]]:
    """(base URL of the served site/, list of requested paths). Builds site/ once per session."""
    if os.environ.get("DURABLY_SKIP_SITE_BUILD") != "1":
        subprocess.run([sys.executable, str(ROOT / "build.py"), "build"], cwd=ROOT, check=True)
    requests: list[str] = []
    handler = type("TestSiteHandler", (_SiteWithTestPages,), {"quiet": True, "request_log": requests})
    server = ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(site_build.SITE)))
    _serve(server)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", requests
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def endpoint_hits() -> Counter[str]:
    """How often each /_test/hit?step=KEY was requested (keys hold run ids: no reset needed)."""
    return ENDPOINT_HITS


@pytest.fixture(scope="session")
def trap() -> Iterator[tuple[int, list[str]]]:
    """(port, hits) of a proxy that refuses and records every request sent to it."""
    hits: list[str] = []
    handler = type("Trap", (_Trap,), {"hits": hits})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    _serve(server)
    try:
        yield server.server_address[1], hits
    finally:
        server.shutdown()
        server.server_close()


# -- Chromium -------------------------------------------------------------------------


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"Chromium is required under CI: {reason}")
    pytest.skip(reason)


def start_chromium(trap_port: int, profile: str) -> Any:
    """A headless Chromium on ``profile`` (a --user-data-dir), logging network requests."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        _unavailable(f"selenium is not installed: {exc}")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(path):
            _unavailable(f"{path} is missing (apt-get install -y chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        # AutofillServerCommunication: pages with a form otherwise make Chromium
        # ask content-autofill.googleapis.com about the form's fields.
        "--disable-features=NetworkTimeServiceQuerying,OptimizationHints,MediaRouter,Translate,"
        "AutofillServerCommunication",
        "--disable-domain-reliability",
        "--no-pings",
        f"--proxy-server=http://127.0.0.1:{trap_port}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    options.add_experimental_option(
        "perfLoggingPrefs",
        {"enableNetwork": True, "enablePage": False, "traceCategories": "devtools.timeline"},
    )
    try:
        drv = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    except Exception as exc:
        _unavailable(f"Chromium did not start: {exc}")
    drv.set_script_timeout(120)
    return drv


@pytest.fixture(scope="module")
def driver(trap: tuple[int, list[str]]) -> Iterator[Any]:
    """One Chromium (fresh profile) shared by a test module."""
    profile = tempfile.mkdtemp(prefix="durably-chromium-")
    try:
        drv = start_chromium(trap[0], profile)
        try:
            yield drv
        finally:
            drv.quit()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def launch_chromium(trap: tuple[int, list[str]], tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """``launch(profile=None)``: a new Chromium; a fresh profile unless one is given
    (pass the same directory again to reopen a browser). All are quit at teardown."""
    drivers: list[Any] = []

    def launch(profile: Path | None = None) -> Any:
        if profile is None:
            profile = Path(tempfile.mkdtemp(prefix="profile-", dir=tmp_path))
        drv = start_chromium(trap[0], str(profile))
        drivers.append(drv)
        return drv

    yield launch
    for drv in drivers:
        try:
            drv.quit()
        except Exception:
            pass


# -- network guard ----------------------------------------------------------------------


def trap_host(hit: str) -> str:
    """Host of a trap log line: 'CONNECT host:443' or 'GET http://host/path'."""
    target = hit.split(" ", 1)[1]
    if "://" in target:
        target = target.split("://", 1)[1]
    return target.split("/", 1)[0].rsplit(":", 1)[0]


def network_urls(drv: Any) -> list[str]:
    """URLs requested since the last call, by the page (Network.*) and its workers (trace)."""
    urls = []
    for entry in drv.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        method, params = message.get("method"), message.get("params", {})
        if method == "Network.requestWillBeSent":
            urls.append(params["request"]["url"])
        elif method == "Tracing.dataCollected" and params.get("name") == "ResourceSendRequest":
            urls.append(params["args"]["data"]["url"])
    return urls


class NetworkGuard:
    """``urls(driver)`` collects requests; ``check(urls, base)`` fails on any outside 127.0.0.1."""

    def __init__(self, trap_hits: list[str]) -> None:
        self.trap_hits = trap_hits

    urls = staticmethod(network_urls)

    def check(self, urls: list[str], base_url: str) -> None:
        # Network schemes only: chrome:// (the initial new-tab page), data: and blob: never leave the browser.
        outside = [
            u for u in urls if u.startswith(("http:", "https:", "ws:", "wss:")) and not u.startswith(base_url)
        ]
        assert outside == [], f"requests outside 127.0.0.1: {outside}"
        leaked = [hit for hit in self.trap_hits if trap_host(hit) not in CHROMIUM_BACKGROUND_HOSTS]
        assert leaked == [], f"requests reached the outside-network trap: {leaked}"
        # The performance log must really see the worker's fetches, or the check above is hollow.
        assert any(u.endswith("pyodide.asm.wasm") for u in urls), [u for u in urls if u.startswith("http")]
        assert any(u.endswith(".whl") for u in urls), urls


@pytest.fixture(scope="session")
def network_guard(trap: tuple[int, list[str]]) -> NetworkGuard:
    return NetworkGuard(trap[1])


# -- artifacts ----------------------------------------------------------------------------


@pytest.fixture
def artifacts_dir(tmp_path: Path) -> Path:
    """Where a test saves screenshots: the test's tmp_path, or DURABLY_ARTIFACTS when set
    (a folder to keep them in, created if needed); never a fixed folder in the repository."""
    wanted = os.environ.get("DURABLY_ARTIFACTS")
    if not wanted:
        return tmp_path
    folder = Path(wanted).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return folder
