"""SQLite storage: one SQL text for CPython's sqlite3 and the browser's sqlite-wasm."""

from .connection import SqlConnection, StdlibSqlConnection
from .store import SCHEMA_VERSION, SQLiteStore, apply_connection_policy

__all__ = [
    "SCHEMA_VERSION",
    "SQLiteStore",
    "SqlConnection",
    "StdlibSqlConnection",
    "apply_connection_policy",
]
