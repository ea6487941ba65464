"""Parity: the demo jobs module gives the same run and step outputs under CPython and in Pyodide.

Both sides run parity.py unchanged on an in-memory stdlib-sqlite3 store: the host with
asyncio.run, Pyodide (node and headless Chromium) with top-level ``await`` on Pyodide's
own WebLoop, i.e. the event loop the browser runtime uses.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import parity
from pyodide_support import ROOT, run_python_async


def test_site_ships_the_very_demo_jobs_module(pyodide_rt: Any) -> None:
    shipped = (ROOT / "site" / "demo_jobs.py").read_bytes()
    assert shipped == (ROOT / "durably_web" / "demo" / "jobs.py").read_bytes()


def test_demo_job_outputs_match_cpython(pyodide_rt: Any) -> None:
    host = json.loads(asyncio.run(parity.weather_reports()))
    browser = run_python_async(
        pyodide_rt,
        "import sys\n"
        "sys.path.insert(0, '/durably/tests/pyodide')\n"
        "import parity\n"
        "await parity.weather_reports()",
    )
    assert host["platform"] != "emscripten" and browser["platform"] == "emscripten"
    for result in host["results"]:
        assert result["status"] == "completed", result
        assert len(result["step_names"]) == result["input"]["days"] + 2  # the days, summarize, publish
        assert result["output"]["city"] == result["input"]["city"]
    assert browser["results"] == host["results"]
