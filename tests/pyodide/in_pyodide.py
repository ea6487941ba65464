"""Runs INSIDE Pyodide (never imported by the host test run): pytest over the real core tests.

The host side (conftest.py) unpacks a zip into the Pyodide file system:

    /durably/pyproject.toml          the project's pytest settings (asyncio_mode=auto, markers, addopts)
    /durably/tests/*.py              the core test modules, conftest.py and helpers, unchanged
    /durably/tests/pyodide/in_pyodide.py   this file

and opens the browser's SQLite, ``static/sqlite_bridge.js`` over sqlite-wasm, as
``globalThis.durablyTestBridge`` (an in-memory database): the ``store`` fixture's
"sqlite-wasm" backend (:func:`open_wasm_store`) runs tests/test_store_contract.py on it.

pytest, pytest-asyncio and hypothesis (and their dependencies) come from build/test-site/
(browser-wheels.json's ``test`` group, never in site/), durably-web and pydantic from the
runtime wheels, via ``pyodide.loadPackage``;
pytest finds the plugins through their pytest11 entry points, as under CPython.

Event loop: pytest is synchronous, and pytest-asyncio drives each test with
``loop.run_until_complete``. Pyodide's WebLoop cannot block without JSPI (absent in Node 20),
so the tests run on ``SyncLoop``: CPython's own ``asyncio.BaseEventLoop`` (the same scheduler,
tasks, timers and futures as under CPython) with a "selector" that has no file descriptors to
watch and simply sleeps until the next timer. Nothing in the core needs I/O readiness: SQLite
calls are synchronous, and Pyodide has no threads or sockets to wake a loop. It is handed to
pytest-asyncio through its ``pytest_asyncio_loop_factories`` hook.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import time
import traceback
from typing import Any

ROOT = "/durably"


class _SleepSelector:
    """The part of a selector BaseEventLoop uses: wait for ``timeout`` seconds, report no I/O."""

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is None:
            # Nothing scheduled and nothing can arrive from outside (no threads, no fds):
            # the loop would wait forever. Fail loudly instead of hanging the runtime.
            raise RuntimeError("SyncLoop: the event loop has nothing left to run (deadlock)")
        if timeout > 0:
            time.sleep(timeout)
        return []

    def close(self) -> None:
        pass


class SyncLoop(asyncio.BaseEventLoop):
    def __init__(self) -> None:
        super().__init__()
        self._selector = _SleepSelector()

    def _process_events(self, event_list: list[Any]) -> None:
        pass

    def _write_to_self(self) -> None:
        pass  # call_soon_threadsafe: there are no other threads to wake us from


async def open_wasm_store() -> Any:
    """A migrated, empty ``SQLiteStore`` on ``WasmSqlConnection``, the connection the browser uses.

    Opening a bridge awaits JS promises, which no test can while SyncLoop blocks the JS event
    loop, so every such store shares the one bridge the host opened: its tables are dropped
    first (a fresh database, as far as the store can tell), and closing the store closes this
    connection object but leaves the bridge open for the next test.
    """
    import js  # type: ignore[import-not-found]

    from durably_web.storage.sqlite import SQLiteStore, apply_connection_policy
    from durably_web.storage.sqlite.wasm_connection import WasmSqlConnection

    class SharedBridgeConnection(WasmSqlConnection):
        def close(self) -> None:
            self._closed = True

    bridge = getattr(js, "durablyTestBridge", None)
    if bridge is None:
        raise RuntimeError("globalThis.durablyTestBridge is missing: tests/pyodide/conftest.py opens it")
    conn = SharedBridgeConnection(bridge)
    conn.execute("PRAGMA foreign_keys = OFF")  # so the tables can go in any order
    tables = conn.fetch_all("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite%'")
    for row in tables:
        conn.execute(f'DROP TABLE "{row["name"]}"')
    # As durably_web.browser.start does; the bridge chose the journal mode.
    apply_connection_policy(conn, journal_mode=None, synchronous="normal", busy_timeout_ms=5000)
    store = SQLiteStore(conn)
    await store.migrate()
    return store


class _LoopFactoryPlugin:
    def pytest_asyncio_loop_factories(self, config: Any, item: Any) -> dict[str, Any]:
        return {"pyodide-sync": SyncLoop}


class _NeedsCPython:
    """Skip (with the marker ``needs_cpython`` and a reason) the tests listed by the host."""

    def __init__(self, skips: dict[str, str]) -> None:
        self.skips = skips
        self.matched: set[str] = set()

    def pytest_configure(self, config: Any) -> None:
        config.addinivalue_line(
            "markers", "needs_cpython: cannot run inside Pyodide (threads, subprocesses, signals)"
        )

    def pytest_collection_modifyitems(self, config: Any, items: list[Any]) -> None:
        import pytest

        for item in items:
            reason = self.skips.get(item.nodeid) or self.skips.get(item.nodeid.split("[")[0])
            if reason:
                self.matched.add(item.nodeid.split("[")[0] if item.nodeid not in self.skips else item.nodeid)
                item.add_marker(pytest.mark.needs_cpython)
                item.add_marker(pytest.mark.skip(reason=f"needs_cpython: {reason}"))


class _Results:
    def __init__(self) -> None:
        self.outcomes: dict[str, str] = {}
        self.failures: dict[str, str] = {}
        self.skip_reasons: dict[str, str] = {}
        self.durations: dict[str, float] = {}

    def pytest_runtest_logreport(self, report: Any) -> None:
        nodeid = report.nodeid
        if report.when == "call":
            self.durations[nodeid] = report.duration
        if report.failed:
            self.outcomes[nodeid] = "failed" if report.when == "call" else "error"
            self.failures[nodeid] = f"[{report.when}] {report.longreprtext}"
        elif report.skipped and nodeid not in self.outcomes:
            self.outcomes[nodeid] = "skipped"
            longrepr = report.longrepr
            self.skip_reasons[nodeid] = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        elif report.passed and report.when == "call" and nodeid not in self.outcomes:
            self.outcomes[nodeid] = "passed"

    def pytest_collectreport(self, report: Any) -> None:
        if report.failed:
            self.outcomes[report.nodeid] = "error"
            self.failures[report.nodeid] = f"[collect] {report.longreprtext}"


def run_pytest(modules: list[str], skips: dict[str, str], extra_args: list[str] | None = None) -> str:
    """Run pytest on ``modules`` (paths relative to /durably); return a JSON summary."""
    sys.path[:0] = [f"{ROOT}/tests"]
    os.chdir(ROOT)
    import pytest

    results = _Results()
    needs = _NeedsCPython(skips)
    out = io.StringIO()
    old_out, old_err = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = out
    started = time.monotonic()
    # Pyodide marks its WebLoop as permanently "running" (it runs on the JS event loop), which
    # makes asyncio refuse to start another loop. Step aside for the duration of the run.
    web_loop = asyncio.events._get_running_loop()
    asyncio.events._set_running_loop(None)
    try:
        code = pytest.main(
            [*modules, "-p", "no:cacheprovider", "-q", *(extra_args or [])],
            plugins=[_LoopFactoryPlugin(), needs, results],
        )
    except BaseException:
        code = -1
        out.write(traceback.format_exc())
    finally:
        sys.stdout, sys.stderr = old_out, old_err
        asyncio.events._set_running_loop(web_loop)
        asyncio.set_event_loop(web_loop)
    counts: dict[str, int] = {}
    for outcome in results.outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    return json.dumps(
        {
            "exit_code": int(code),
            "counts": counts,
            "outcomes": results.outcomes,
            "failures": results.failures,
            "skip_reasons": results.skip_reasons,
            "durations": results.durations,
            "unmatched_skips": sorted(set(skips) - needs.matched),
            "seconds": round(time.monotonic() - started, 2),
            "python": sys.version,
            "platform": sys.platform,
            "output_tail": out.getvalue()[-6000:],
        }
    )
