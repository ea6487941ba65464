"""Pyodide runtimes for the tests in tests/pyodide: pytest-pyodide's runners, build/test-site/ as dist dir.

build/test-site/ (``python build.py test-site``) is site/ plus the test-only wheels
(pytest, pytest-asyncio, hypothesis, ...; the ``test`` group of
browser-wheels.json) and a lock file listing them: site/, which users deploy,
never contains them. "site" below means that test copy.

``pyodide_rt`` is parametrised over the two runtimes the issue asks for:

* ``node``: pytest-pyodide's ``NodeRunner`` (node_test_driver.js does
  ``require(site + "/pyodide")``, so Pyodide, its stdlib and every wheel are read
  from site/ on disk);
* ``chrome``: pytest-pyodide's ``SeleniumChromeRunner`` with the driver pinned to
  Debian's /usr/bin/chromedriver and /usr/bin/chromium (SE_OFFLINE=true as well, so
  Selenium Manager never downloads anything), headless, fresh profile, and every
  non-loopback request sent to a dead proxy port (loopback bypasses proxies), so
  the page cannot reach a CDN even by accident. Marked ``browser``.

Both load Pyodide from one HTTP server on 127.0.0.1 that serves site/ (with
build.py's handler and MIME types), pytest-pyodide's own pages
(module_test.html …), and ``/__durably__/tests.zip``: the core test modules
and pyproject.toml (see in_pyodide.py). We use pytest-pyodide's runner classes directly instead of its
``selenium``/``runtime`` fixtures, whose runtime is one global ``--runtime``
command-line choice: here the plain ``pytest`` command runs both runtimes.

Nothing is mocked: the same wheels the browser demo loads, the real test files.
Missing node/chromium skips, or fails under CI=1.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyodide_support import CORE_MODULES, HERE, PACKAGES, PYODIDE_SIDE_FILES, ROOT, SUPPORT_FILES

CHROMIUM = os.environ.get("DURABLY_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("DURABLY_CHROMEDRIVER", "/usr/bin/chromedriver")
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")

_spec = importlib.util.spec_from_file_location("durably_site_build", ROOT / "build.py")
assert _spec is not None and _spec.loader is not None
site_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(site_build)


def unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"required under CI: {reason}")
    pytest.skip(reason)


# -- the test payload ------------------------------------------------------------


def build_tests_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(ROOT / "pyproject.toml", "pyproject.toml")
        for rel in [*CORE_MODULES, *SUPPORT_FILES]:
            zf.write(ROOT / rel, rel)
        for name in PYODIDE_SIDE_FILES:
            zf.write(HERE / name, f"tests/pyodide/{name}")
    return buffer.getvalue()


# -- the server ------------------------------------------------------------------


@pytest.fixture(scope="session")
def site_dir() -> Path:
    if os.environ.get("DURABLY_SKIP_SITE_BUILD") != "1":
        subprocess.run([sys.executable, str(ROOT / "build.py"), "build"], cwd=ROOT, check=True)
    # Derived from site/; cheap, and a no-op when it is up to date.
    subprocess.run([sys.executable, str(ROOT / "build.py"), "test-site"], cwd=ROOT, check=True)
    site = site_build.TEST_SITE
    lock = json.loads((site / "pyodide-lock.json").read_text())
    missing = [p["file_name"] for p in lock["packages"].values() if not (site / p["file_name"]).exists()]
    # A lock entry without its file is what would send Pyodide to the CDN (cdnUrl) under Node.
    assert not missing, f"pyodide-lock.json lists files missing from {site}: {missing}"
    absent = [name for name in PACKAGES if name not in lock["packages"]]
    assert not absent, f"{site} lacks {absent}: are they in browser-wheels.json's test group?"
    return site


@pytest.fixture(scope="session")
def pyodide_server(site_dir: Path) -> Iterator[dict[str, Any]]:
    from pytest_pyodide.server import DefaultHandler

    templates = DefaultHandler.default_templates  # module_test.html, module_webworker_dev.js, …
    payload = build_tests_zip()
    requests: list[str] = []

    class Handler(site_build.SiteHandler):
        quiet = True
        request_log = requests

        def do_GET(self) -> None:
            body = payload if self.path == "/__durably__/tests.zip" else templates.get(self.path)
            if body is None:
                return super().do_GET()
            kind = self.guess_type(self.path)
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    import functools
    import http.server

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(site_dir))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"port": server.server_address[1], "requests": requests, "site": site_dir}
    finally:
        server.shutdown()
        server.server_close()


# -- the runtimes ----------------------------------------------------------------


def _node_runner(server: dict[str, Any]) -> Any:
    if not shutil.which("node"):
        unavailable("node is not installed (apt-get install -y nodejs)")
    from pytest_pyodide.runner import NodeRunner

    class Runner(NodeRunner):
        script_timeout = 180

        def init_node(self, jspi: bool = False) -> None:
            super().init_node(jspi)
            # run_js_inner waits for the end of a command with pexpect's default timeout (60 s)
            self.p.timeout = self.script_timeout

    return Runner(server_port=server["port"], server_hostname="127.0.0.1", dist_dir=str(server["site"]))


def _chrome_runner(server: dict[str, Any]) -> Any:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(path):
            unavailable(f"{path} is missing (apt-get install -y chromium chromium-driver)")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager: never download a driver or browser
    from pytest_pyodide.runner import SeleniumChromeRunner
    from selenium.webdriver import Chrome
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="durably-pyodide-chromium-")
    # Everything but loopback goes to a proxy port nobody listens on: no CDN, ever. A
    # free port, bound (so nothing else takes it) but never listening (so every
    # connection is refused) for as long as this browser runs.
    dead_proxy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    dead_proxy.bind(("127.0.0.1", 0))
    dead_proxy_port = dead_proxy.getsockname()[1]

    class Runner(SeleniumChromeRunner):
        script_timeout = 180

        def get_driver(self, jspi: bool = False) -> Any:
            options = Options()
            options.binary_location = CHROMIUM
            for flag in (
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--js-flags=--expose-gc",
                f"--user-data-dir={profile}",
                f"--proxy-server=http://127.0.0.1:{dead_proxy_port}",
            ):
                options.add_argument(flag)
            return Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)

        def quit(self) -> None:
            try:
                super().quit()
            finally:
                dead_proxy.close()
                shutil.rmtree(profile, ignore_errors=True)

    try:
        return Runner(server_port=server["port"], server_hostname="127.0.0.1", dist_dir=str(server["site"]))
    except Exception as exc:
        dead_proxy.close()
        shutil.rmtree(profile, ignore_errors=True)
        if "chromium" in str(exc).lower() or "chrome" in str(exc).lower():
            unavailable(f"Chromium did not start: {exc}")
        raise


# The browser's SQLite: static/sqlite_bridge.js over sqlite-wasm, both from site/, opened once
# per runtime (in memory) for in_pyodide.open_wasm_store. Under Node, sqlite-wasm fetches
# sqlite3.wasm by its file: URL, which Node's fetch refuses, so while it loads, fetch (the main
# realm's: the module runs there, outside the driver's vm context) reads file: URLs from disk.
_OPEN_BRIDGE = """
    const { openSqliteBridge } = await import(%s);
    globalThis.durablyTestBridge = await openSqliteBridge({ storage: "memory" });
"""
_WITH_FILE_FETCH_IN_NODE = """
    const main = require("vm").runInThisContext("globalThis");
    const webFetch = main.fetch;
    main.fetch = async (url, init) => {
      const parsed = new main.URL(String(url));
      if (parsed.protocol !== "file:") return webFetch(url, init);
      const body = await require("fs/promises").readFile(parsed);
      return new main.Response(body, { headers: { "Content-Type": "application/wasm" } });
    };
    try { %s } finally { main.fetch = webFetch; }
"""


def _prepare(runner: Any, site: Path) -> None:
    """Load the wheels the tests need, unpack the test payload into /durably, open the bridge."""
    runner.load_package(PACKAGES)
    runner.run_js(
        """
        const response = await fetch("/__durably__/tests.zip");
        if (!response.ok) throw new Error(`tests.zip: HTTP ${response.status}`);
        pyodide.unpackArchive(await response.arrayBuffer(), "zip", { extractDir: "/durably" });
        """
    )
    if runner.browser == "node":
        opening = _OPEN_BRIDGE % json.dumps((site / "sqlite_bridge.js").as_uri())
        runner.run_js(_WITH_FILE_FETCH_IN_NODE % opening)
    else:
        runner.run_js(_OPEN_BRIDGE % json.dumps("/sqlite_bridge.js"))  # served from site/


@pytest.fixture(
    scope="session",
    params=["node", pytest.param("chrome", marks=pytest.mark.browser)],
)
def pyodide_rt(request: pytest.FixtureRequest, pyodide_server: dict[str, Any]) -> Iterator[Any]:
    """A loaded Pyodide runtime (pytest-pyodide runner) with durably-web, pytest and the tests."""
    make = _node_runner if request.param == "node" else _chrome_runner
    runner = make(pyodide_server)
    try:
        _prepare(runner, pyodide_server["site"])
        yield runner
    finally:
        runner.quit()


@pytest.hookimpl(tryfirst=True)  # before -m 'not slow' deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The whole core suite inside Pyodide in Chromium (~55 s) is with the slow tests: make test
    runs the same suite in Pyodide under Node, and every tests/browser test runs Pyodide in
    Chromium (the chrome runtime's package and parity checks here stay in make test too)."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if (
            getattr(item, "originalname", None) == "test_core_suite_runs_in_pyodide"
            and callspec is not None
            and callspec.params.get("pyodide_rt") == "chrome"
        ):
            item.add_marker(pytest.mark.slow)
