"""Helpers for driving test pages in Chromium (selenium): run async JS, wait for conditions."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

_ASYNC_BODY = """
    const done = arguments[arguments.length - 1];
    const args = Array.from(arguments).slice(0, -1);
    (async (args) => { BODY })(args).then(
      (value) => done({ok: true, value: value === undefined ? null : value}),
      (e) => done({ok: false, error: {name: e && e.name, message: String(e && e.message || e),
                                      details: (e && e.details) ?? null}}));
"""


class PageError(AssertionError):
    """A rejection inside the page; ``error`` holds its name, message and details."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error['name']}: {error['message']}")
        self.error = error


def page(drv: Any, body: str, *args: Any) -> Any:
    """Run ``body`` (an async function body; ``args`` is the argument list) in the page.

    Returns its value; a rejection is raised as :class:`PageError`.
    """
    reply = drv.execute_async_script(_ASYNC_BODY.replace("BODY", body), *args)
    if not reply["ok"]:
        raise PageError(reply["error"])
    return reply["value"]


def wait_until(condition: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def wait_for(drv: Any, condition: str, timeout: float = 30) -> Any:
    """Poll a JS expression until it is truthy; returns its value."""
    return wait_until(lambda: drv.execute_script(f"return {condition}"), timeout, condition)


def wait_ready(drv: Any, timeout: float = 90) -> float:
    """Wait until the test page's DurablyWeb.create() resolved (``window.t.ready``).

    The test pages set ``window.t = {ready, error, ...}``; a failed create() fails the
    test at once. Returns the seconds waited.
    """
    t0 = time.monotonic()

    def ready() -> bool:
        state = drv.execute_script("return window.t && {ready: t.ready, error: t.error}")
        if state and state["error"]:
            raise AssertionError(f"create() failed: {state['error']}")
        return bool(state and state["ready"])

    wait_until(ready, timeout, "DurablyWeb.create() to resolve")
    return time.monotonic() - t0


def harness_call(drv: Any, cmd: str, **args: Any) -> Any:
    """``harness.call(cmd, args)`` on harness.html, raising on a worker-side error."""
    reply = drv.execute_async_script(
        """
        const [cmd, args, done] = arguments;
        harness.call(cmd, args).then(
          (result) => done({ok: true, result}),
          (e) => done({ok: false, error: String(e && e.stack || e)}));
        """,
        cmd,
        args,
    )
    if not reply["ok"]:
        raise AssertionError(f"worker {cmd} failed:\n{reply['error']}")
    return reply["result"]


def run_py(drv: Any, code: str) -> Any:
    """Run Python in the harness worker; the code's last expression is json.dumps(...)."""
    return json.loads(harness_call(drv, "run", code=code))
