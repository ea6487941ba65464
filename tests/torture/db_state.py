"""What the torture checker reads from the database once the workers have stopped: every
row of the five tables it checks, as dicts keyed by column name.

The rows are read straight from the backend with its own driver, not through the store
under test, and in a fixed order (SQLite and PostgreSQL need not return rows in insertion
order). Both backends have the same tables and columns (see their migrations).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

QUERIES = {
    "runs": "SELECT * FROM durably_runs ORDER BY id",
    "steps": "SELECT * FROM durably_steps ORDER BY run_id, seq",
    "attempts": "SELECT * FROM durably_step_attempts ORDER BY run_id, seq, attempt",
    "signals": "SELECT * FROM durably_signals ORDER BY id",
    "labels": "SELECT * FROM durably_run_labels ORDER BY run_id, key",
}


@dataclass
class DatabaseState:
    runs: dict[str, dict[str, Any]]  # by run id
    steps: list[dict[str, Any]]
    attempts: list[dict[str, Any]]
    signals: list[dict[str, Any]]
    labels: list[dict[str, Any]]  # durably_run_labels: the rows label filters use


def read_state(db_url: str) -> DatabaseState:
    """The rows of a ``sqlite:///<path>`` or ``postgresql://`` database."""
    if db_url.startswith("sqlite:///"):
        tables = _read_sqlite(db_url.removeprefix("sqlite:///"))
    elif db_url.startswith(("postgresql://", "postgres://")):
        tables = _read_postgres(db_url)
    else:
        raise ValueError(f"the torture reads SQLite files and PostgreSQL databases, not {db_url!r}")
    return DatabaseState(
        runs={row["id"]: row for row in tables["runs"]},
        steps=tables["steps"],
        attempts=tables["attempts"],
        signals=tables["signals"],
        labels=tables["labels"],
    )


def _read_sqlite(path: str) -> dict[str, list[dict[str, Any]]]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return {name: [dict(row) for row in conn.execute(query)] for name, query in QUERIES.items()}
    finally:
        conn.close()


def _read_postgres(db_url: str) -> dict[str, list[dict[str, Any]]]:
    import psycopg
    from psycopg import sql
    from psycopg.rows import dict_row

    from durably_web.storage.postgres import parse_url

    options = parse_url(db_url)  # our options (schema=...) are not libpq's
    with psycopg.connect(options.conninfo, autocommit=True, row_factory=dict_row) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(options.schema)))
        return {name: conn.execute(query).fetchall() for name, query in QUERIES.items()}
