"""remote.js when the server gives up on a slow stream: stream:reset, then an immediate reconnect.

The server (test_dashboard.py's ``ServerThread``: create_app under a prefix, uvicorn,
a worker) holds at most ``STREAM_BACKLOG`` events per stream; here that is 3, so the
stream of a run with several steps (step:complete, progress, log, step:start come at
once) overflows again and again, and so does a run-list stream when a batch arrives. The page's
``subscribe()`` must still deliver each step once and end with the run, and ``on()``
listeners keep receiving run events after their stream was reset.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_dashboard import ServerThread, open_dashboard

import durably_web.asgi.app as app_module
from durably_web.events import EventBuffer

LIST_BUFFERS: list[EventBuffer] = []


class _RecordingBuffer(EventBuffer):
    """The run-list streams' buffers (app.py creates them), to see that they did overflow."""

    def __init__(self, limit: int | None = None, *, max_bytes: int | None = None) -> None:
        super().__init__(limit, max_bytes=max_bytes)
        LIST_BUFFERS.append(self)


SCRIPT = r"""
const done = arguments[arguments.length - 1];
const c = DurablyWebRemote.connect(arguments[0]);
(async () => {
  const listed = [];
  const off = c.on("run:complete", (e) => listed.push(e.run_id));
  const run = await c.trigger("slow-report", {parts: 6, delay: 0.05});
  const events = [];
  for await (const e of c.subscribe(run.id)) events.push(e.type);
  // a batch's six run:trigger events at once reset the run-list stream
  const batch = await c.batchTrigger("slow-report", Array(6).fill({parts: 1, delay: 0.05}));
  for (const r of batch) await c.waitForRun(r.id, {timeout: 20000});
  // after the reconnect, the list stream still delivers
  const second = await c.trigger("slow-report", {parts: 2, delay: 0.3});
  await c.waitForRun(second.id, {timeout: 20000});
  const deadline = Date.now() + 10000;
  while (!listed.includes(second.id) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
  off();
  await c.close();
  done({ok: true, events, listedSecond: listed.includes(second.id)});
})().catch((e) => done({ok: false, error: String(e && e.stack || e)}));
"""


@pytest.fixture
def server(tmp_path: Path, driver: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServerThread]:
    monkeypatch.setattr(app_module, "STREAM_BACKLOG", 3)
    monkeypatch.setattr(app_module, "EventBuffer", _RecordingBuffer)
    LIST_BUFFERS.clear()
    thread = ServerThread(f"sqlite:///{tmp_path / 'runs.db'}")
    thread.start()
    thread.wait_started()
    try:
        yield thread
    finally:
        driver.get("about:blank")
        thread.stop()


def test_subscribe_survives_stream_resets(driver: Any, server: ServerThread) -> None:
    open_dashboard(driver, server)
    driver.set_script_timeout(60)
    reply = driver.execute_async_script(SCRIPT, server.base)
    assert reply["ok"], reply.get("error")
    events = reply["events"]
    assert events[-1] == "run:complete", events
    assert events.count("step:complete") == 6, events  # each step once, across reconnects
    assert events.count("run:snapshot") >= 2, events  # it was reset, and reconnected
    assert "stream:reset" not in events  # handled by the client, not handed out
    assert any(buffer.overflowed for buffer in LIST_BUFFERS)  # a list stream was reset...
    assert reply["listedSecond"]  # ...and on() kept delivering after it
