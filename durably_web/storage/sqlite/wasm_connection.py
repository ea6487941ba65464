""":class:`SqlConnection` over sqlite-wasm, for durably-web running in Pyodide.

The SQLite engine lives in JavaScript (``static/sqlite_bridge.js``, loaded in
the same Web Worker as Pyodide). That file's header documents the bridge
protocol; in short, the bridge is a synchronous JS object with
``run(kind, sql, params_json)``, ``lastError()``, ``inTransaction()``,
``info()`` and ``close()``.

With ``storage="idb"`` the database lives in memory in the worker and the
bridge keeps a redo log of committed transactions that ``flush()`` writes to
IndexedDB asynchronously. Such a connection (and only such a connection) has an
async :meth:`WasmSqlConnection.wait_durable`, which ``SQLiteStore`` finds with
``getattr`` and the engine awaits after every step, outcome and trigger; a
failed write (quota, storage cleared, another writer) raises
:class:`WasmSqliteError`, a ``StorageError``.

Each call is one FFI crossing: parameters go over as one JSON string, rows come
back as one JSON string (``{"c": columns, "r": rows, "x": 0|1}``), and the
statement is prepared once and cached on the JS side. Values JSON cannot carry
exactly (BLOBs, REALs with an integral value, integers beyond 2**53) travel as
``{"$b": base64}``, ``{"$f": x}`` and ``{"$i": "digits"}``.

Errors become :class:`WasmSqliteError` (a :class:`~durably_web.errors.StorageError`)
carrying SQLite's extended result code; constraint failures are
:class:`WasmSqliteIntegrityError` and UNIQUE / PRIMARY KEY violations
:class:`WasmSqliteUniqueError`.

Nothing here imports ``js`` or ``pyodide`` at module level, so the module
imports (and its encoding helpers can be tested) under CPython.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ...errors import StorageError
from .connection import Params, Row

__all__ = [
    "WasmSqlConnection",
    "WasmSqliteError",
    "WasmSqliteIntegrityError",
    "WasmSqliteUniqueError",
]

_EXECUTE, _ONE, _ALL, _SCRIPT = 0, 1, 2, 3
_MAX_SAFE_INT = 2**53 - 1

SQLITE_CONSTRAINT = 19
SQLITE_CONSTRAINT_PRIMARYKEY = 1555
SQLITE_CONSTRAINT_UNIQUE = 2067


class WasmSqliteError(StorageError):
    """An error reported by sqlite-wasm (or by the bridge for misuse).

    ``code`` is SQLite's extended result code, ``primary_code`` its low byte,
    ``name`` e.g. ``"SQLITE_CONSTRAINT_UNIQUE"``. ``sqlite_errorcode`` and
    ``sqlite_errorname`` mirror CPython's ``sqlite3.Error`` attributes.
    """

    def __init__(self, message: str, code: int = 1, name: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.primary_code = code & 0xFF
        self.name = name or "SQLITE_ERROR"
        self.sqlite_errorcode = code
        self.sqlite_errorname = self.name

    @property
    def is_unique_violation(self) -> bool:
        return self.code in (SQLITE_CONSTRAINT_UNIQUE, SQLITE_CONSTRAINT_PRIMARYKEY)


class WasmSqliteIntegrityError(WasmSqliteError):
    """A constraint failed (SQLITE_CONSTRAINT_*)."""


class WasmSqliteUniqueError(WasmSqliteIntegrityError):
    """A UNIQUE or PRIMARY KEY constraint failed."""


def _error_from_info(info: dict[str, Any] | None, fallback: str) -> WasmSqliteError:
    if not info:
        return WasmSqliteError(fallback)
    code = int(info.get("code") or 1)
    name = info.get("name")
    message = str(info.get("message") or fallback)
    if code in (SQLITE_CONSTRAINT_UNIQUE, SQLITE_CONSTRAINT_PRIMARYKEY):
        cls: type[WasmSqliteError] = WasmSqliteUniqueError
    elif code & 0xFF == SQLITE_CONSTRAINT:
        cls = WasmSqliteIntegrityError
    else:
        cls = WasmSqliteError
    return cls(message, code, name)


# -- value encoding (see the "Value encoding" section of sqlite_bridge.js) ----


def _encode_value(value: Any) -> Any:
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, int):
        return value if -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT else {"$i": str(value)}
    if isinstance(value, float):
        if math.isnan(value):
            return {"$f": "nan"}
        if math.isinf(value):
            return {"$f": "inf" if value > 0 else "-inf"}
        return {"$f": value} if value.is_integer() else value
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$b": base64.b64encode(bytes(value)).decode("ascii")}
    raise WasmSqliteError(f"unsupported parameter type {type(value).__name__}", 21, "SQLITE_MISUSE")


_to_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def encode_params(params: Params | None) -> str | None:
    """Parameters as the bridge's JSON text (``None`` when there are none)."""
    if not params:
        return None
    # Nearly every parameter is a str, None or an int JSON carries exactly, which the C
    # encoder writes as they are: one pass of type tests, then one encode. Under Pyodide
    # this halves the cost of a step's twelve parameters against a call per value.
    for value in params.values():
        cls = value.__class__
        if cls is str or value is None or (cls is int and -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT):
            continue
        return _to_json({key: _encode_value(value) for key, value in params.items()})
    return _to_json(params if params.__class__ is dict else dict(params))


def _decode_value(value: Any) -> Any:
    if isinstance(value, dict):
        if "$f" in value:
            return float(value["$f"])  # also "inf", "-inf", "nan"
        if "$i" in value:
            return int(value["$i"])
        if "$b" in value:
            return base64.b64decode(value["$b"])
    return value


def decode_rows(text: str) -> list[Row]:
    """Rows from the bridge's result JSON."""
    result = json.loads(text)
    columns = result["c"]
    if result["x"]:
        return [{c: _decode_value(v) for c, v in zip(columns, row, strict=True)} for row in result["r"]]
    return [dict(zip(columns, row, strict=True)) for row in result["r"]]


class WasmSqlConnection:
    """:class:`~durably_web.storage.sqlite.connection.SqlConnection` over the JS bridge.

    ``bridge`` is the object ``openSqliteBridge()`` resolved to, passed into
    Python as a JsProxy (e.g. ``from js import durablyBridge``). Use
    :meth:`open` to create one from Python inside the worker.
    """

    def __init__(self, bridge: Any) -> None:
        self._bridge = bridge
        self._run = bridge.run  # bound once: saves an attribute lookup per call
        self._closed = False
        # Only the IndexedDB bridge persists asynchronously and has flush().
        self._flush: Any = getattr(bridge, "flush", None)

    @property
    def wait_durable(self) -> Callable[[], Awaitable[None]]:
        """``async wait_durable()``: return once every commit so far is in IndexedDB.

        Present only when the bridge persists asynchronously (``storage="idb"``):
        for other storages reading the attribute raises ``AttributeError``, so
        ``getattr(conn, "wait_durable", None)`` is ``None`` and the store keeps
        ``deferred_durability`` off.
        """
        if self._flush is None:
            raise AttributeError("wait_durable: this connection persists synchronously")
        return self._wait_durable

    async def _wait_durable(self) -> None:
        bridge = self._bridge
        if self._closed or not bridge.hasPending():
            return  # no Promise, no trip through the event loop
        try:
            await self._flush()
        except Exception as exc:
            try:
                info = json.loads(bridge.flushError())
            except Exception:
                info = None
            raise _error_from_info(info, f"IndexedDB flush failed: {exc}") from exc

    @classmethod
    async def open(
        cls,
        filename: str = "/durably.db",
        *,
        storage: str = "opfs",
        journal_mode: str | None = None,
        locking_mode: str | None = None,
        synchronous: str | None = None,
        directory: str | None = None,
        pool_capacity: int | None = None,
        on_wait: Any = None,
        idb_durability: str | None = None,
        idb_bucket: dict[str, Any] | None = None,
        idb_flush_timeout_ms: int | None = None,
    ) -> WasmSqlConnection:
        """Open a database through ``globalThis.openSqliteBridge`` (set by the worker).

        ``storage`` is ``"opfs"`` (opfs-sahpool, persistent), ``"idb"`` (in memory,
        persisted to IndexedDB; see :meth:`wait_durable`), ``"auto"`` (an existing
        IndexedDB copy, else OPFS when sync access handles exist, else IndexedDB)
        or ``"memory"``. ``idb_durability`` is IndexedDB's transaction durability
        for ``"idb"``: ``"strict"`` (default, flushed to disk) or ``"relaxed"``;
        ``idb_bucket`` (``{"name", "quota", "persisted"}``) keeps it in a Storage Bucket;
        an IndexedDB write unfinished after ``idb_flush_timeout_ms`` (30 s) fails.
        ``on_wait`` is called with a dict while the OPFS pool waits for a
        previous page to release its files. ``pool_capacity`` is the number of
        OPFS files the pool keeps (default 6); every database needs one slot,
        plus one for its journal or WAL, and the first open in a worker fixes it.
        """
        import js  # type: ignore[import-not-found]
        from pyodide.ffi import create_proxy, to_js  # type: ignore[import-not-found]

        options: dict[str, Any] = {"storage": storage, "filename": filename}
        for key, value in (
            ("journalMode", journal_mode),
            ("lockingMode", locking_mode),
            ("synchronous", synchronous),
            ("directory", directory),
            ("initialCapacity", pool_capacity),
            ("idbDurability", idb_durability),
            ("bucket", idb_bucket),
            ("flushTimeoutMs", idb_flush_timeout_ms),
        ):
            if value is not None:
                options[key] = value
        proxy = None
        if on_wait is not None:
            proxy = create_proxy(lambda info: on_wait(info.to_py()))
            options["onWait"] = proxy
        try:
            js_options = to_js(options, dict_converter=js.Object.fromEntries)
            bridge = await js.openSqliteBridge(js_options)
        except Exception as exc:
            js_error = getattr(exc, "js_error", None)
            code = getattr(js_error, "resultCode", None)
            raise WasmSqliteError(
                f"cannot open SQLite database {filename!r}: {exc}",
                code if isinstance(code, int) else 14,  # SQLITE_CANTOPEN
                None if isinstance(code, int) else "SQLITE_CANTOPEN",
            ) from exc
        finally:
            if proxy is not None:
                proxy.destroy()
        return cls(bridge)

    # -- SqlConnection ----------------------------------------------------------

    def _call(self, kind: int, sql: str, params: Params | None) -> Any:
        if self._closed:
            raise WasmSqliteError("the database connection is closed", 21, "SQLITE_MISUSE")
        params_json = encode_params(params)
        try:
            return self._run(kind, sql, params_json)
        except Exception as exc:
            raise self._translate(exc) from exc

    def _translate(self, exc: Exception) -> WasmSqliteError:
        try:
            info = json.loads(self._bridge.lastError())
        except Exception:
            info = None
        return _error_from_info(info, str(exc))

    def execute(self, sql: str, params: Params | None = None) -> int:
        return int(self._call(_EXECUTE, sql, params))

    def fetch_one(self, sql: str, params: Params | None = None) -> Row | None:
        text = self._call(_ONE, sql, params)
        if not isinstance(text, str):  # undefined (None) when there is no row
            return None
        rows = decode_rows(text)
        return rows[0] if rows else None

    def fetch_all(self, sql: str, params: Params | None = None) -> list[Row]:
        return decode_rows(self._call(_ALL, sql, params))

    def execute_script(self, sql: str) -> None:
        try:
            self._call(_SCRIPT, sql, None)
        except WasmSqliteError:
            if self.in_transaction:
                self._run(_EXECUTE, "ROLLBACK", None)
            raise

    @property
    def in_transaction(self) -> bool:
        return bool(self._bridge.inTransaction())

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self.in_transaction:
                self.execute("ROLLBACK")
            raise
        self.execute("COMMIT")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._bridge.close()

    def info(self) -> dict[str, Any]:
        """What the bridge opened: storage, vfs, filename, journal mode, SQLite version…"""
        result: dict[str, Any] = json.loads(self._bridge.info())
        return result
