"""durably_web/browser.py under CPython: how job modules are imported and how failures are reported."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from durably_web import browser

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
