"""The Python half of the browser runtime; ``static/worker.js`` is the other half.

Runs inside Pyodide in the Web Worker. The worker opens SQLite through
``static/sqlite_bridge.js`` and hands the bridge object to :func:`start`,
together with the paths (in Pyodide's file system) of the job modules it
fetched. Everything crossing the JS boundary is JSON text, so neither side
needs to know the other's object model. Nothing here imports ``js``: the
module also imports, and is tested, under CPython.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .durably import Durably
from .errors import ValidationError
from .job import JobDefinition
from .rpc import Dispatcher
from .storage.sqlite import SQLiteStore, apply_connection_policy
from .storage.sqlite.connection import SqlConnection

# Durably options the page may set, by their JS names (seconds are given in ms).
_DURATION_OPTIONS = {
    "pollingInterval": "polling_interval",
    "leaseDuration": "lease_duration",
    "leaseRenewInterval": "lease_renew_interval",
    "retainRuns": "retain_runs",
    "shutdownTimeout": "shutdown_timeout",
}
_PLAIN_OPTIONS = {"maxConcurrentRuns": "max_concurrent_runs", "preserveSteps": "preserve_steps"}


def load_job_modules(paths: Iterable[str]) -> list[JobDefinition[Any, Any]]:
    """Import each file as a module named after it and collect its jobs.

    A module's ``JOBS`` list wins when present; otherwise every ``define_job``
    result among its globals is taken.
    """
    jobs: list[JobDefinition[Any, Any]] = []
    for path in paths:
        file = Path(path)
        name = file.stem
        spec = importlib.util.spec_from_file_location(name, file)
        if spec is None or spec.loader is None:
            raise ValidationError(f"cannot import job module {path!r}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        declared = getattr(module, "JOBS", None)
        found = (
            list(declared)
            if declared is not None
            else [value for value in vars(module).values() if isinstance(value, JobDefinition)]
        )
        if not found:
            raise ValidationError(f"job module {path!r} defines no jobs (use @define_job)")
        jobs.extend(job for job in found if job not in jobs)
    return jobs


def durably_options(options: dict[str, Any]) -> dict[str, Any]:
    """Translate the page's options (JS names, milliseconds) into ``Durably`` keyword arguments."""
    unknown = set(options) - set(_DURATION_OPTIONS) - set(_PLAIN_OPTIONS)
    if unknown:
        raise ValidationError(f"unknown option(s) {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    for js_name, py_name in _DURATION_OPTIONS.items():
        if options.get(js_name) is not None:
            value = options[js_name]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValidationError(f"{js_name} must be a number of milliseconds")
            kwargs[py_name] = value / 1000
    for js_name, py_name in _PLAIN_OPTIONS.items():
        if options.get(js_name) is not None:
            kwargs[py_name] = options[js_name]
    return kwargs


class BrowserRuntime:
    """What the worker talks to: ``await runtime.call(method, args_json) -> result_json``."""

    def __init__(self, durably: Durably) -> None:
        self.durably = durably
        self._dispatcher = Dispatcher(durably)

    async def call(self, method: str, args_json: str) -> str:
        try:
            args = json.loads(args_json)
        except ValueError as exc:
            return json.dumps({"ok": False, "error": {"name": "ValidationError", "message": str(exc)}})
        return json.dumps(await self._dispatcher.call(method, args), default=str)

    async def stop(self) -> None:
        await self.durably.stop()


async def start(
    connection: SqlConnection,
    job_module_paths: Iterable[str],
    config_json: str,
    post_event: Callable[[str], Any],
) -> BrowserRuntime:
    """Open the store on ``connection``, start a worker for the jobs, forward events as JSON.

    ``config``: ``{"soleWorker": bool, "synchronous": str, "options": {...}}``.
    ``soleWorker`` is true when this worker holds the database's leader lock:
    runs leased by a previous page are then resumed at once.
    """
    config = json.loads(config_json)
    apply_connection_policy(
        connection,
        journal_mode=None,  # chosen by the bridge, which knows what the VFS supports
        synchronous=config.get("synchronous", "normal"),
        busy_timeout_ms=int(config.get("busyTimeoutMs", 5000)),
    )
    durably = Durably(
        SQLiteStore(connection),
        jobs=load_job_modules(job_module_paths),
        sole_worker=bool(config.get("soleWorker", False)),
        worker=bool(config.get("worker", True)),
        **durably_options(config.get("options") or {}),
    )
    await durably.init()
    durably.on("*", lambda event: post_event(json.dumps(event.to_dict(), default=str)))
    return BrowserRuntime(durably)
