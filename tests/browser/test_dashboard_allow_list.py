"""dashboard.html's ``durably-allowed-origins`` meta tag in real headless Chromium.

A ``?local=`` job module from another origin is refused (test_dashboard.py) unless
the page lists that origin. Here the site is served with the shipped dashboard.html
changed in one place, the meta tag's content, the way a deployment would configure it;
the other origin (127.0.0.2) serves a job module with CORS.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from pagekit import wait_until

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
# build.py under its own name ("build" is also a PyPI package); not via "from conftest
# import", which may find tests/conftest.py instead.
_spec = importlib.util.spec_from_file_location("durably_site_build", ROOT / "build.py")
assert _spec is not None and _spec.loader is not None
site_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(site_build)

JOBS = b"""
from durably_web import define_job


@define_job("from-the-allowed-origin")
async def from_the_allowed_origin(step, payload):
    return {"ok": True}
"""


def _serve(server: ThreadingHTTPServer) -> None:
    threading.Thread(target=server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def jobs_origin() -> Iterator[tuple[str, list[str]]]:
    """(base URL, request log) of a job-module server on 127.0.0.2 (another origin)."""
    requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "text/x-python")
            self.send_header("Access-Control-Allow-Origin", "*")
            self.send_header("Content-Length", str(len(JOBS)))
            self.end_headers()
            self.wfile.write(JOBS)

        def log_message(self, *args: Any) -> None:
            pass

    try:
        server = ThreadingHTTPServer(("127.0.0.2", 0), Handler)
    except OSError as exc:
        pytest.skip(f"cannot listen on 127.0.0.2: {exc}")
    _serve(server)
    try:
        yield f"http://127.0.0.2:{server.server_address[1]}/", requests
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def configured_site(site_url: Any, jobs_origin: tuple[str, list[str]]) -> Iterator[str]:
    """site/ (built by site_url) with dashboard.html allowing the jobs origin."""
    allowed = jobs_origin[0].rstrip("/")
    shipped = (site_build.SITE / "dashboard.html").read_text()
    tag = '<meta name="durably-allowed-origins" content="" />'
    assert tag in shipped
    page = shipped.replace(tag, f'<meta name="durably-allowed-origins" content="{allowed}" />').encode()

    class Handler(site_build.SiteHandler):  # type: ignore[name-defined,misc]
        quiet = True

        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != "/dashboard.html":
                return super().do_GET()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

    server = ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: Handler(*a, directory=str(site_build.SITE)))
    _serve(server)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_an_allow_listed_origin_may_serve_local_jobs(
    driver: Any, configured_site: str, jobs_origin: tuple[str, list[str]]
) -> None:
    base, requests = jobs_origin
    module = base + "allowed_jobs.py"
    driver.get(f"{configured_site}dashboard.html?local={quote(module, safe='')}&storage=memory&db=a.db")
    wait_until(
        lambda: driver.execute_script(
            "return document.body.dataset.ready === '1' || document.body.dataset.startError"
        ),
        timeout=90,
        what="the dashboard to start",
    )
    assert driver.execute_script("return document.body.dataset.startError") is None, driver.execute_script(
        "return document.getElementById('connection-text').textContent"
    )
    jobs = driver.execute_script(
        "return [...document.querySelectorAll('#filter-job option')].map(o => o.value)"
    )
    assert "from-the-allowed-origin" in jobs
    assert "/allowed_jobs.py" in requests

    # Other origins stay refused on the same page (127.0.0.3 is not listed).
    driver.get(f"{configured_site}dashboard.html?local={quote('http://127.0.0.3:9/x.py', safe='')}")
    wait_until(lambda: driver.execute_script("return document.body.dataset.startError"), what="the refusal")
    assert driver.execute_script("return document.body.dataset.startError") == "RefusedURL"


def test_the_shipped_dashboard_allows_no_other_origin() -> None:
    shipped = (ROOT / "static" / "dashboard.html").read_text()
    assert '<meta name="durably-allowed-origins" content="" />' in shipped
