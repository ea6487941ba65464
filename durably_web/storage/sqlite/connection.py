"""The tiny SQL executor the SQLite store runs on.

One SQL text serves CPython (stdlib ``sqlite3``) and the browser (sqlite-wasm
through the Pyodide bridge): both implement :class:`SqlConnection`. Rows come
back as ``dict`` keyed by column name; parameters are named (``:name``) and
passed as a ``dict``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from ...errors import StorageError

Row = dict[str, Any]
Params = Mapping[str, Any]


class SqlConnection(Protocol):
    """What the SQLite store needs from a driver.

    Statements outside ``transaction()`` run in autocommit mode: each one is its
    own committed transaction. ``transaction()`` takes the write lock up front
    (``BEGIN IMMEDIATE``) so read-then-write sequences cannot deadlock.
    """

    def execute(self, sql: str, params: Params | None = None) -> int:
        """Run one statement; return the number of rows it changed."""

    def fetch_one(self, sql: str, params: Params | None = None) -> Row | None: ...

    def fetch_all(self, sql: str, params: Params | None = None) -> list[Row]: ...

    def execute_script(self, sql: str) -> None:
        """Run several statements (a migration); the script manages its own transaction."""

    def transaction(self) -> Any:
        """Context manager: BEGIN IMMEDIATE … COMMIT, ROLLBACK on error."""

    def close(self) -> None: ...


def _dict_row(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> Row:
    return {column[0]: value for column, value in zip(cursor.description, row, strict=True)}


class StdlibSqlConnection:
    """:class:`SqlConnection` over CPython's ``sqlite3``; driver errors become ``StorageError``.

    Used from one event-loop thread at a time (``check_same_thread`` is off so a
    ``Durably`` may be created in one thread and run in another).
    """

    def __init__(self, path: str, *, busy_timeout_ms: int, read_only: bool = False) -> None:
        # read_only: SQLite's own read-only open (mode=ro), which can neither create the
        # file nor write to it; a WAL database still gets its -wal/-shm companions, which
        # is how SQLite lets a reader share the file with a writer.
        target = f"{Path(path).absolute().as_uri()}?mode=ro" if read_only else path
        try:
            self._conn = sqlite3.connect(
                target,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,
                timeout=busy_timeout_ms / 1000,
                uri=read_only,
            )
        except sqlite3.Error as exc:
            raise _storage_error(exc, f"cannot open SQLite database {path!r}") from exc
        self._conn.row_factory = _dict_row

    def execute(self, sql: str, params: Params | None = None) -> int:
        try:
            return self._conn.execute(sql, params or {}).rowcount
        except sqlite3.Error as exc:
            raise _storage_error(exc) from exc

    def fetch_one(self, sql: str, params: Params | None = None) -> Row | None:
        try:
            row: Row | None = self._conn.execute(sql, params or {}).fetchone()
            return row
        except sqlite3.Error as exc:
            raise _storage_error(exc) from exc

    def fetch_all(self, sql: str, params: Params | None = None) -> list[Row]:
        try:
            return self._conn.execute(sql, params or {}).fetchall()
        except sqlite3.Error as exc:
            raise _storage_error(exc) from exc

    def execute_script(self, sql: str) -> None:
        try:
            self._conn.executescript(sql)
        except sqlite3.Error as exc:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise _storage_error(exc) from exc

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        self.execute("COMMIT")

    def close(self) -> None:
        self._conn.close()


class SqliteBusyError(StorageError):
    """Another connection holds the lock this statement needs (``SQLITE_BUSY``); the store
    tries the whole call again later instead of blocking in SQLite's busy handler."""


_BUSY_CODES = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}


def _storage_error(exc: sqlite3.Error, context: str = "SQLite error") -> Exception:
    # The primary result code is the low byte (SQLITE_BUSY_SNAPSHOT is BUSY | 2 << 8).
    if getattr(exc, "sqlite_errorcode", 0) & 0xFF in _BUSY_CODES:
        return SqliteBusyError(f"{context}: {exc}")
    return StorageError(f"{context}: {exc}")
