"""Pages on other origins against the real server, in real Chromium (issue 9).

The API (``create_app`` under a prefix, uvicorn on 127.0.0.1) lists one allowed
origin. Two tiny pages are served on two other ports of 127.0.0.1 (another port
is another origin): the attacker's page replays the probe's attacks with the
browser's own machinery (a ``no-cors`` text/plain purge, a form post, a CORS
read, an EventSource, a ``<script src>`` of the run list), and must change and
read nothing; the allowed page loads ``remote.js`` from the server and uses
``DurablyWebRemote.connect`` for real: trigger, a live ``subscribe``, errors,
purge.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from asgi_helpers import running_server
from pagekit import page
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.types import Receive, Scope, Send

from durably_web import Durably, StepContext, define_job
from durably_web.asgi import create_app

pytestmark = pytest.mark.browser

PREFIX = "/api/durably"


@define_job("xo-echo")
async def echo_job(step: StepContext, payload: Any) -> Any:
    return await step.run("echo", lambda: payload)


class _Blank(BaseHTTPRequestHandler):
    """An empty page: all a test needs is a document of this origin."""

    def do_GET(self) -> None:
        body = b"<!doctype html><meta charset=utf-8><title>other origin</title><body></body>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def origins() -> Iterator[tuple[str, str]]:
    """(attacker's page URL, allowed page URL): two more ports of 127.0.0.1."""
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), _Blank) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield tuple(f"http://127.0.0.1:{s.server_address[1]}" for s in servers)  # type: ignore[misc]
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


class ApiServer(threading.Thread):
    """Durably (worker on) + create_app(allowed_origins=[...]) under PREFIX, in a loop of its own.

    ``answers`` records (method, path, status) of every request the app answered.
    """

    def __init__(self, db_url: str, allowed_origin: str) -> None:
        super().__init__(daemon=True)
        self.db_url = db_url
        self.allowed_origin = allowed_origin
        self.base = ""
        self.answers: list[tuple[str, str, int]] = []
        self.durably: Durably | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.started = threading.Event()
        self.failure: BaseException | None = None
        self._quit: asyncio.Event | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self.failure = exc
            self.started.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._quit = asyncio.Event()
        durably = Durably(self.db_url, jobs=[echo_job], polling_interval=0.05, shutdown_timeout=2.0)
        await durably.init()
        self.durably = durably
        api = create_app(durably, sse_throttle=0, allowed_origins=[self.allowed_origin])
        inner = Starlette(routes=[Mount(PREFIX, app=api)])

        async def recording(scope: Scope, receive: Receive, send: Send) -> None:
            async def watch(message: Any) -> None:
                if message["type"] == "http.response.start":
                    self.answers.append((scope["method"], scope["path"], message["status"]))
                await send(message)

            await inner(scope, receive, watch)

        try:
            async with running_server(recording) as base:
                self.base = base + PREFIX + "/"
                self.started.set()
                await self._quit.wait()
        finally:
            await durably.stop()

    def call(self, coro: Any) -> Any:
        """Run ``coro`` (on the server's Durably) in the server's loop; its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def stop(self) -> None:
        if self.loop is not None and self._quit is not None:
            self.loop.call_soon_threadsafe(self._quit.set)
        self.join(20)


@pytest.fixture(scope="module")
def api_server(
    tmp_path_factory: pytest.TempPathFactory, origins: tuple[str, str], driver: Any
) -> Iterator[ApiServer]:
    db = tmp_path_factory.mktemp("cross-origin") / "runs.db"
    server = ApiServer(f"sqlite:///{db}", allowed_origin=origins[1])
    server.start()
    assert server.started.wait(30) and server.failure is None, server.failure
    try:
        yield server
    finally:
        driver.get("about:blank")  # closes the pages' event streams
        server.stop()


ATTACKS = """
const api = args[0];
const out = {};
// the probe: a "simple" request, text/plain, no CORS needed to send it
const noCors = await fetch(api + "purge", {method: "POST", mode: "no-cors",
  headers: {"Content-Type": "text/plain"}, body: JSON.stringify({older_than: 0})});
out.noCors = noCors.type;
// a bodyless simple POST
await fetch(api + "runs/" + args[1] + "/retrigger", {method: "POST", mode: "no-cors"});
// JSON needs a preflight, which this origin does not pass
try { await fetch(api + "purge", {method: "POST", headers: {"Content-Type": "application/json"},
                                  body: '{"older_than": 0}'}); out.corsPost = "answered"; }
catch (e) { out.corsPost = e.name; }
// reading the runs
try { await (await fetch(api + "runs")).json(); out.read = "answered"; } catch (e) { out.read = e.name; }
// the live run list
out.sse = await new Promise((resolve) => {
  const source = new EventSource(api + "events");
  const done = (what) => { source.close(); resolve(what); };
  source.onopen = () => done("open");
  source.onerror = () => done(source.readyState === EventSource.CLOSED ? "closed" : "error");
  setTimeout(() => done("timeout"), 10000);
});
// <script src> of the run list
out.script = await new Promise((resolve) => {
  const s = document.createElement("script");
  s.src = api + "runs";
  s.onload = () => resolve("loaded");
  s.onerror = () => resolve("error");
  document.head.append(s);
});
// a form post (text/plain body that parses as JSON) into a hidden frame
await new Promise((resolve) => {
  const frame = document.createElement("iframe");
  frame.name = "sink";
  document.body.append(frame);
  const form = document.createElement("form");
  Object.assign(form, {method: "POST", action: api + "trigger", enctype: "text/plain", target: "sink"});
  const field = document.createElement("input");
  field.name = '{"job": "xo-echo", "input": "';
  field.value = '"}';
  form.append(field);
  document.body.append(form);
  frame.onload = () => resolve();
  form.submit();
  setTimeout(resolve, 5000);
});
// our own client, loaded from the server, from this origin
await new Promise((resolve, reject) => {
  const s = document.createElement("script");
  s.src = api + "static/remote.js";
  s.onload = resolve;
  s.onerror = () => reject(new Error("remote.js did not load"));
  document.head.append(s);
});
try { await DurablyWebRemote.connect(api).purgeRuns({olderThan: 0}); out.client = "purged"; }
catch (e) { out.client = [e.name, e.status]; }
return out;
"""


def test_a_page_on_another_origin_can_neither_change_nor_read_anything(
    driver: Any, api_server: ApiServer, origins: tuple[str, str]
) -> None:
    durably = api_server.durably
    assert durably is not None
    done = api_server.call(durably.trigger_and_wait("xo-echo", {"x": "kept"}, timeout=30))
    assert done.status == "completed"
    api_server.answers.clear()
    driver.get(origins[0] + "/")
    out = page(driver, ATTACKS, api_server.base, done.id)
    assert out == {
        "noCors": "opaque",  # sent, answered, unreadable
        "corsPost": "TypeError",
        "read": "TypeError",
        "sse": "closed",  # a refused EventSource does not reconnect
        "script": "error",
        "client": ["DurablyError", 0],
    }, out
    # the server saw the requests and refused every one: nothing ran, nothing was purged
    runs = api_server.call(durably.get_runs())
    assert [(run.id, run.status) for run in runs] == [(done.id, "completed")]
    refused = {(method, path.removeprefix(PREFIX)): status for method, path, status in api_server.answers}
    assert refused[("POST", "/purge")] == 403
    assert refused[("POST", f"/runs/{done.id}/retrigger")] == 403
    assert refused[("POST", "/trigger")] == 403
    assert refused[("GET", "/runs")] == 403
    assert refused[("GET", "/events")] == 403
    assert refused[("OPTIONS", "/purge")] == 403  # the preflight of the JSON post
    assert refused[("GET", "/static/remote.js")] == 200  # public code, no data
    assert all(status in (200, 403) for status in refused.values()), refused
    assert all(
        status == 403 for (method, path), status in refused.items() if not path.startswith("/static/")
    ), refused


ALLOWED = """
const api = args[0];
await new Promise((resolve, reject) => {
  const s = document.createElement("script");
  s.src = api + "static/remote.js";
  s.onload = resolve;
  s.onerror = () => reject(new Error("remote.js did not load"));
  document.head.append(s);
});
const client = DurablyWebRemote.connect(api);
const out = {};
const run = await client.trigger("xo-echo", {x: "from the allowed origin"});
out.disposition = run.disposition;
out.events = [];
for await (const event of client.subscribe(run.id)) out.events.push(event.type);
out.final = (await client.getRun(run.id)).output;
out.listed = (await client.getRuns({jobName: "xo-echo"})).map((r) => r.id).includes(run.id);
try { await client.cancel(run.id); out.cancel = "cancelled"; } catch (e) { out.cancel = [e.name, e.status]; }
out.retriggered = (await client.retrigger(run.id)).disposition;
out.purged = await client.purgeRuns({olderThan: 3600 * 1000});
return out;
"""


def test_an_allowed_origin_uses_the_js_client_for_real(
    driver: Any, api_server: ApiServer, origins: tuple[str, str]
) -> None:
    api_server.answers.clear()
    driver.get(origins[1] + "/")
    out = page(driver, ALLOWED, api_server.base)
    assert out["disposition"] == "created"
    assert out["events"][0] == "run:snapshot" and out["events"][-1] == "run:complete", out["events"]
    assert out["final"] == {"x": "from the allowed origin"}
    assert out["listed"] is True
    assert out["cancel"] == ["ConflictError", 409]  # the error body is readable cross-origin
    assert out["retriggered"] == "created"
    assert out["purged"] == 0
    statuses = {(method, path.removeprefix(PREFIX)) for method, path, _ in api_server.answers}
    assert ("OPTIONS", "/trigger") in statuses  # the JSON post was preflighted, and passed
    assert all(status < 500 for _, _, status in api_server.answers)
