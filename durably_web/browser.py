"""The Python half of the browser runtime; ``static/worker.js`` is the other half.

Runs inside Pyodide in the Web Worker. The worker writes the page's job
modules into Pyodide's file system and imports them early with
:func:`preload` (every tab does, so a follower tab can take over quickly);
the tab that wins the leader lock then calls :func:`open_and_start`, which
opens SQLite through ``static/sqlite_bridge.js`` (``WasmSqlConnection.open``)
and hands the connection to :func:`start`. Everything crossing the JS
boundary is JSON text, so neither side needs to know the other's object
model. Nothing here imports ``js`` at module level: the module also imports,
and is tested, under CPython.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from . import errors
from .durably import Durably
from .errors import DurablyError, ValidationError
from .job import JobDefinition
from .network import ALWAYS_ONLINE
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
    "offlineRecheckInterval": "offline_recheck_interval",
}
_PLAIN_OPTIONS = {"maxConcurrentRuns": "max_concurrent_runs", "preserveSteps": "preserve_steps"}


# How a failed fetch reads in each engine's JS TypeError (Chromium, Firefox, Safari).
_FETCH_FAILURE_MESSAGES = ("Failed to fetch", "NetworkError when attempting to fetch", "Load failed")
# pyodide.http's OSError subclasses that are not the network failing: a response arrived
# (an HTTP error status) or the body was read twice.
_NOT_NETWORK_ERRORS = {"HttpStatusError", "BodyUsedError"}


class BrowserNetworkStatus:
    """The ``NetworkStatus`` of the browser runtime (see ``durably_web.network``).

    ``online()`` is the worker's ``navigator.onLine`` (it follows the browser's state, and
    DevTools' offline emulation). Chromium fires ``online`` only at the page, never in a
    dedicated worker, so ``static/durably.js`` forwards the page's events and
    ``static/worker.js`` calls :meth:`changed` with them (and with the worker's own, in
    browsers that fire them there).
    """

    def __init__(self, navigator: Any = None) -> None:
        self._navigator = navigator  # the worker's, unless a test passes its own
        self._listeners: list[Callable[[], None]] = []

    def online(self) -> bool:
        navigator = self._navigator
        if navigator is None:
            import js  # type: ignore[import-not-found]

            navigator = js.navigator
        return bool(navigator.onLine)

    def is_network_error(self, exc: BaseException) -> bool:
        """A request that never got an answer, anywhere in ``exc``'s chain of causes (a job may
        wrap the fetch's error in its own): ``pyodide.http.pyfetch`` raises an ``OSError``
        (its ``AbortError``, "Failed to fetch") and so do its XHR calls and the standard
        library's sockets (``ConnectionError``, ``TimeoutError``); an awaited ``js.fetch``
        raises the JS ``TypeError`` itself. An HTTP error status is an answer, not this.

        The implicit ``__context__`` counts too, since jobs often re-raise without ``from``.
        An unrelated error raised while handling a network error then also waits for the
        network: the cost is a delay, never a lost attempt, because once online the step
        runs again and a real bug fails it by its retry policy."""
        seen: set[int] = set()
        current: BaseException | None = exc
        while current is not None and id(current) not in seen:
            seen.add(id(current))
            if _is_one_network_error(current):
                return True
            current = current.__cause__ or current.__context__
        return False

    def watch(self, on_online: Callable[[], None]) -> Callable[[], None]:
        self._listeners.append(on_online)

        def stop() -> None:
            if on_online in self._listeners:
                self._listeners.remove(on_online)

        return stop

    def changed(self, online: bool) -> None:
        """The browser went online or offline (worker.js calls this on the event)."""
        if online:
            for listener in list(self._listeners):
                listener()


def _is_one_network_error(exc: BaseException) -> bool:
    cls = type(exc)
    if cls.__module__.startswith("pyodide") and cls.__name__ in _NOT_NETWORK_ERRORS:
        return False
    if isinstance(exc, OSError):
        return True
    if any(base.__name__ == "JsException" for base in cls.__mro__):
        name = getattr(exc, "name", "")
        message = str(getattr(exc, "message", exc))
        return name == "NetworkError" or (
            name == "TypeError" and any(text in message for text in _FETCH_FAILURE_MESSAGES)
        )
    return False


class JobModuleError(DurablyError):
    """A job module failed to import (a syntax error, or an exception while it ran).

    ``name`` is the original exception's class (``SyntaxError``, ``NameError``, …);
    ``details`` says where: ``{"module", "file", "line", "traceback"}``, the
    traceback starting at the job module's own frames.
    """

    def __init__(self, name: str, message: str, details: dict[str, Any]) -> None:
        super().__init__(message)
        self.name = name
        self.details = details

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "message": str(self), "details": self.details}


def _import_failure(exc: BaseException, file: Path, shown_as: str) -> JobModuleError:
    """Describe ``exc`` raised while importing the job module ``file`` (``shown_as``: its URL)."""
    line: int | None = None
    if isinstance(exc, SyntaxError) and exc.filename == str(file):
        line = exc.lineno
        reason = exc.msg
    else:
        reason = str(exc) or type(exc).__name__
    # Drop the import machinery's frames: the traceback starts in the job module.
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != str(file):
        tb = tb.tb_next
    frames = traceback.extract_tb(tb) if tb is not None else []
    in_module = [frame for frame in frames if frame.filename == str(file)]
    if line is None and in_module:
        line = in_module[-1].lineno
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    where = f"{shown_as}, line {line}" if line is not None else shown_as
    return JobModuleError(
        type(exc).__name__,
        f"job module {where}: {reason}",
        {"module": shown_as, "file": str(file), "line": line, "traceback": text},
    )


def load_job_modules(
    paths: Iterable[str], shown_as: dict[str, str] | None = None
) -> list[JobDefinition[Any, Any]]:
    """Import each file as a module named after it and collect its jobs.

    A module's ``JOBS`` list wins when present; otherwise every ``define_job``
    result among its globals is taken. A module that fails to import raises
    :class:`JobModuleError` naming the file (``shown_as`` maps a path to the URL
    the page gave), the line and the traceback.
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
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise _import_failure(exc, file, (shown_as or {}).get(path, file.name)) from exc
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


def public_error_name(name: str) -> str:
    """The nearest error class of :mod:`durably_web.errors` for an error class name.

    The JS API promises names like ``"StorageError"``; storage backends raise
    subclasses (``WasmSqliteError``), which the page should see by their
    public family name.
    """
    public = {
        value.__name__
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, DurablyError)
    }
    if name in public:
        return name
    pending: list[type] = [DurablyError]
    while pending:
        cls = pending.pop()
        if cls.__name__ == name:
            return next(c.__name__ for c in cls.__mro__ if c.__name__ in public)
        pending.extend(cls.__subclasses__())
    return name


class BrowserRuntime:
    """What the worker talks to: ``await runtime.call(method, args_json) -> result_json``.

    Besides the :class:`~durably_web.rpc.Dispatcher` methods it answers
    ``integrityCheck`` (``PRAGMA integrity_check``) and ``storageInfo`` (what
    the bridge opened), for the page and the tests.
    """

    #: Answered here, not by the dispatcher (they need the SQL connection).
    LOCAL_METHODS: tuple[str, ...] = ("integrityCheck", "storageInfo")

    def __init__(
        self,
        durably: Durably,
        connection: SqlConnection | None = None,
        network: BrowserNetworkStatus | None = None,
    ) -> None:
        self.durably = durably
        self.connection = connection
        self.network = network
        self._dispatcher = Dispatcher(durably)

    def network_changed(self, online: bool) -> None:
        """worker.js: the browser went online (runs waiting for the network continue now) or offline."""
        if self.network is not None:
            self.network.changed(bool(online))

    async def call(self, method: str, args_json: str) -> str:
        try:
            args = json.loads(args_json)
        except ValueError as exc:
            return json.dumps({"ok": False, "error": {"name": "ValidationError", "message": str(exc)}})
        if method in self.LOCAL_METHODS:
            result = self._local(method)
        else:
            result = await self._dispatcher.call(method, args)
        if not result["ok"]:
            result["error"]["name"] = public_error_name(result["error"]["name"])
        return json.dumps(result, default=str)

    def _local(self, method: str) -> dict[str, Any]:
        try:
            if self.connection is None:
                raise DurablyError(f"{method} needs the runtime's SQL connection")
            if method == "integrityCheck":
                rows = self.connection.fetch_all("PRAGMA integrity_check")
                value: Any = "\n".join(str(next(iter(row.values()))) for row in rows)
            else:
                info = getattr(self.connection, "info", None)
                value = info() if callable(info) else {}
            return {"ok": True, "value": value}
        except Exception as exc:
            from .rpc import error_to_json

            return {"ok": False, "error": error_to_json(exc)}

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
    paths = list(job_module_paths)
    jobs = _preloaded[1] if _preloaded is not None and _preloaded[0] == paths else load_job_modules(paths)
    # Under CPython (this module's own tests) there is no navigator: always online.
    network = BrowserNetworkStatus() if "_pyodide_core" in sys.modules else None
    durably = Durably(
        SQLiteStore(connection),
        jobs=jobs,
        sole_worker=bool(config.get("soleWorker", False)),
        worker=bool(config.get("worker", True)),
        network=network or ALWAYS_ONLINE,
        **durably_options(config.get("options") or {}),
    )
    # Listen before init(): a resumed run may emit its first events right away.
    durably.on("*", lambda event: post_event(json.dumps(event.to_dict(), default=str)))
    await durably.init()
    return BrowserRuntime(durably, connection, network)


# (paths, jobs) imported by preload(), reused by start() for the same paths.
_preloaded: tuple[list[str], list[JobDefinition[Any, Any]]] | None = None


def preload(job_module_paths_json: str, urls_json: str = "{}") -> str:
    """Import the job modules now (every tab does), so a later takeover only opens the database.

    ``urls_json`` maps each path to the URL it came from, for messages. Returns
    ``{"ok": true, "value": [job names]}``, or ``{"ok": false, "error": {name,
    message, details}}`` for a module that does not import (in every tab): the
    worker rejects the page's ``create()`` with it as it is.
    """
    global _preloaded
    paths = list(json.loads(job_module_paths_json))
    try:
        jobs = load_job_modules(paths, json.loads(urls_json))
    except JobModuleError as exc:
        return json.dumps({"ok": False, "error": exc.to_json()}, default=str)
    _preloaded = (paths, jobs)
    return json.dumps({"ok": True, "value": sorted(job.name for job in jobs)})


async def open_and_start(
    job_module_paths_json: str, config_json: str, post_event: Callable[[str], Any]
) -> BrowserRuntime:
    """Open the database the page asked for (``config``: ``storage``, ``filename``,
    ``journalMode``) through the worker's ``openSqliteBridge`` and :func:`start` on it."""
    from .storage.sqlite.wasm_connection import WasmSqlConnection

    config = json.loads(config_json)
    connection = await WasmSqlConnection.open(
        config["filename"], storage=config["storage"], journal_mode=config.get("journalMode")
    )
    try:
        return await start(connection, json.loads(job_module_paths_json), config_json, post_event)
    except BaseException:
        connection.close()
        raise
