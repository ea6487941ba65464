"""Constants and helpers shared by conftest.py and the tests in tests/pyodide.

(Imported by name: a ``from conftest import …`` could pick up another directory's conftest.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

# Core engine test modules run inside Pyodide. Left out entirely: test_asgi.py,
# test_asgi_fuzz.py, test_sse.py (the HTTP server extra: starlette/uvicorn/httpx are
# not part of the browser build), test_cli.py and test_crash.py (subprocesses, SIGKILL).
# The durable-waiting modules (retries, sleep, signals, resume/fork) run too; their few
# SIGKILL / two-process tests are skipped there by name (test_pyodide_core.NEEDS_CPYTHON).
CORE_MODULES = [
    "tests/test_durably.py",
    "tests/test_steps.py",
    "tests/test_engine.py",
    "tests/test_events.py",
    "tests/test_storage.py",
    "tests/test_retries.py",
    "tests/test_sleep.py",
    "tests/test_signals.py",
    "tests/test_resume.py",
    "tests/test_network.py",
    "tests/test_flow_control.py",
    "tests/test_parallel_steps.py",
    "tests/test_attempt_metadata.py",
    "tests/test_child_runs.py",
    "tests/test_deadlines.py",
    "tests/test_versions.py",
    "tests/test_schedules.py",
    # The storage contract, also on the browser's sqlite-wasm connection there (conftest.py's
    # ``store`` fixture, in_pyodide.open_wasm_store).
    "tests/test_store_contract.py",
]
# Copied into the Pyodide FS next to the modules, unchanged; plus this directory's
# in_pyodide.py and parity.py. schema_v1.db: test_retries' upgrade-in-place test opens a copy.
SUPPORT_FILES = [
    "tests/conftest.py",
    "tests/helpers.py",
    "tests/crash_jobs.py",
    "tests/flow_jobs.py",
    "tests/fixtures/schema_v1.db",
]
PYODIDE_SIDE_FILES = ["in_pyodide.py", "parity.py"]
# Wheels loaded into Pyodide: durably-web from site/, pytest & co. (browser-wheels.json's "test"
# group) from build/test-site/ only.
PACKAGES = ["durably-web", "pytest", "pytest-asyncio", "hypothesis", "tzdata"]


def run_python(runner: Any, code: str) -> Any:
    """Run Python synchronously in the runtime; the code's last expression must be a JSON str."""
    return json.loads(runner.run(code))


def run_python_async(runner: Any, code: str) -> Any:
    """Run Python with top-level ``await`` on Pyodide's own WebLoop; last expression: a JSON str."""
    return json.loads(runner.run_async(code))
