"""durably_web/browser.py under CPython: how job modules are imported and how failures are reported."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from durably_web import browser
from durably_web.http import HttpError

GOOD = """
from durably_web import define_job


@define_job("hello")
async def hello(step, payload):
    return {"ok": True}
"""

BROKEN = """
from durably_web import define_job


@define_job("never")
async def never(step, payload):
    return {"ok": True
"""

RAISING = """
SETTINGS = {}


def region():
    return SETTINGS["region"]


REGION = region()
"""


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_preload_lists_the_jobs(tmp_path: Path) -> None:
    path = write(tmp_path, "good_jobs_mod.py", GOOD)
    assert json.loads(browser.preload(json.dumps([path]))) == {"ok": True, "value": ["hello"]}


def test_a_syntax_error_names_the_module_url_line_and_reason(tmp_path: Path) -> None:
    path = write(tmp_path, "broken_jobs_mod.py", BROKEN)
    url = "http://127.0.0.1:8000/broken_jobs_mod.py"
    reply = json.loads(browser.preload(json.dumps([path]), json.dumps({path: url})))
    assert reply["ok"] is False
    error = reply["error"]
    assert error["name"] == "SyntaxError"
    assert error["message"] == f"job module {url}, line 7: '{{' was never closed"
    assert error["details"]["module"] == url and error["details"]["line"] == 7
    assert error["details"]["file"] == path
    assert 'return {"ok": True' in error["details"]["traceback"]
    assert error["details"]["traceback"].rstrip().endswith("SyntaxError: '{' was never closed")


def test_an_exception_at_import_names_the_line_with_a_traceback_from_the_module(tmp_path: Path) -> None:
    path = write(tmp_path, "raising_jobs_mod.py", RAISING)
    with pytest.raises(browser.JobModuleError) as info:
        browser.load_job_modules([path])
    error = info.value.to_json()
    assert error["name"] == "KeyError"
    assert error["message"] == "job module raising_jobs_mod.py, line 6: 'region'"  # the innermost frame
    tb = error["details"]["traceback"]
    assert tb.startswith("Traceback (most recent call last):")
    assert "REGION = region()" in tb and 'return SETTINGS["region"]' in tb
    assert "importlib" not in tb and "browser.py" not in tb
    assert "raising_jobs_mod" not in sys.modules


# --- BrowserNetworkStatus ----------------------------------------------------------------------


class Navigator:
    def __init__(self, on_line: bool) -> None:
        self.onLine = on_line


def _raised(make: Callable[[], BaseException], cause: BaseException | None = None) -> BaseException:
    """``make()`` raised (from ``cause`` when given), with its traceback and chain."""
    try:
        if cause is None:
            raise make()
        try:
            raise cause
        except BaseException as inner:
            raise make() from inner
    except BaseException as exc:
        return exc


def _pyodide_class(name: str, base: type[BaseException]) -> type[BaseException]:
    """A stand-in for one of pyodide's exception classes (same name and module)."""
    return type(name, (base,), {"__module__": "pyodide.http._exceptions"})


class JsException(Exception):
    """What pyodide.ffi.JsException carries: the JS error's name and message."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


def test_online_is_the_navigators_on_line() -> None:
    assert browser.BrowserNetworkStatus(Navigator(True)).online() is True
    assert browser.BrowserNetworkStatus(Navigator(False)).online() is False


@pytest.mark.parametrize(
    ("error", "network"),
    [
        (lambda: OSError("Failed to fetch"), True),  # pyfetch's AbortError is an OSError
        (lambda: _pyodide_class("AbortError", OSError)("Failed to fetch"), True),
        (lambda: _pyodide_class("XHRNetworkError", OSError)("Network error occurred"), True),
        (lambda: ConnectionRefusedError("refused"), True),
        (lambda: TimeoutError("timed out"), True),
        (lambda: JsException("TypeError", "Failed to fetch"), True),  # an awaited js.fetch
        (lambda: JsException("TypeError", "NetworkError when attempting to fetch resource."), True),
        (lambda: JsException("TypeError", "Load failed"), True),
        (lambda: JsException("NetworkError", "A network error occurred."), True),  # sync XHR
        (lambda: JsException("TypeError", "x.json is not a function"), False),  # a bug, not the network
        (lambda: _pyodide_class("HttpStatusError", OSError)("503 Service Unavailable"), False),  # an answer
        (lambda: _pyodide_class("BodyUsedError", OSError)("Response body is already used"), False),
        (lambda: ValueError("bad JSON"), False),
        (lambda: HttpError("GET /x returned HTTP 500", 500), False),
    ],
)
def test_is_network_error(error: Callable[[], BaseException], network: bool) -> None:
    status = browser.BrowserNetworkStatus(Navigator(False))
    assert status.is_network_error(_raised(error)) is network


def test_a_network_error_anywhere_in_the_chain_counts() -> None:
    status = browser.BrowserNetworkStatus(Navigator(False))
    # durably_web.http wraps a failed request: HttpError(...) from the OSError.
    wrapped = _raised(lambda: HttpError("GET /x failed: Failed to fetch"), OSError("Failed to fetch"))
    assert status.is_network_error(wrapped) is True
    assert status.is_network_error(_raised(lambda: RuntimeError("sync failed"), wrapped)) is True
    assert status.is_network_error(_raised(lambda: RuntimeError("no"), ValueError("bad"))) is False


def test_changed_calls_the_watchers_when_the_network_is_back_until_they_stop() -> None:
    status = browser.BrowserNetworkStatus(Navigator(True))
    calls: list[str] = []
    stop = status.watch(lambda: calls.append("online"))
    status.changed(False)
    assert calls == []
    status.changed(True)
    assert calls == ["online"]
    stop()
    stop()  # twice is harmless
    status.changed(True)
    assert calls == ["online"]


async def test_the_runtime_passes_network_changes_on(tmp_path: Path) -> None:
    from durably_web import Durably

    status = browser.BrowserNetworkStatus(Navigator(True))
    calls: list[str] = []
    status.watch(lambda: calls.append("online"))
    runtime = browser.BrowserRuntime(Durably(f"sqlite:///{tmp_path / 'db.sqlite'}"), None, status)
    runtime.network_changed(True)
    assert calls == ["online"]
    without = browser.BrowserRuntime(Durably(f"sqlite:///{tmp_path / 'db.sqlite'}"))
    without.network_changed(True)  # a runtime without a network status: nothing to tell
