"""Storage backends, chosen from a URL and imported lazily.

``sqlite:///relative.db``, ``sqlite:////absolute/path.db`` and
``sqlite://:memory:``; SQLite options go in the query string:
``?synchronous=full&busy_timeout=10000``.

``postgresql://user:pass@host:port/db`` (or ``postgres://``) opens the PostgreSQL store,
with ``?pool_size=…&pool_timeout=…&statement_timeout=…&schema=…`` of ours and any libpq
parameter besides (see ``storage/postgres/options.py`` and docs/postgres.md); it needs
``pip install 'durably-web[postgres]'``.
"""

from __future__ import annotations

from urllib.parse import parse_qs

from ..errors import ValidationError
from .base import LogRecord, NewRun, RunFilter, RunRecord, StepRecord, Store

__all__ = ["LogRecord", "NewRun", "RunFilter", "RunRecord", "StepRecord", "Store", "open_store"]

_SQLITE_OPTIONS = {"synchronous", "busy_timeout", "journal_mode"}


def open_store(url: str, *, read_only: bool = False) -> Store:
    """Open (but do not migrate) the store a URL names.

    ``read_only`` opens it so that nothing can be written, created or changed
    (for SQLite: ``mode=ro``, the journal mode left as it is, ``query_only``); check
    it with ``check_schema()`` rather than ``migrate()``. A missing file is an error
    then, and an in-memory database (empty, private to its connection) is refused.
    """
    if not isinstance(url, str):
        raise ValidationError(f"database URL must be a string, not {type(url).__name__}")
    scheme, _, rest = url.partition("://")
    if scheme == "sqlite":
        return _open_sqlite(url, rest, read_only=read_only)
    if scheme in ("postgresql", "postgres"):
        return _open_postgres(url, read_only=read_only)
    raise ValidationError(
        f"unsupported database URL {url!r}: expected sqlite:///path.db, sqlite://:memory: "
        "or postgresql://user@host/database"
    )


def _open_postgres(url: str, *, read_only: bool) -> Store:
    # Validated before psycopg is imported: a bad option is reported as such even without it.
    from .postgres.options import mask_password, parse_url

    options = parse_url(url)
    try:
        import psycopg
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        raise ValidationError(
            f"{mask_password(url)!r} needs the PostgreSQL driver, which is not installed ({exc}): "
            "pip install 'durably-web[postgres]'"
        ) from None
    from psycopg.conninfo import conninfo_to_dict

    from .postgres import PostgresStore

    try:
        conninfo_to_dict(options.conninfo)  # libpq's own check of every parameter left to it
    except psycopg.Error as exc:
        raise ValidationError(f"invalid PostgreSQL URL {options.display!r}: {exc}") from None
    return PostgresStore(options, read_only=read_only)


def _open_sqlite(url: str, rest: str, *, read_only: bool) -> Store:
    from .sqlite import SQLiteStore, StdlibSqlConnection, apply_connection_policy

    path_part, _, query = rest.partition("?")
    if path_part in (":memory:", "/:memory:"):
        path = ":memory:"
    elif path_part.startswith("/") and len(path_part) > 1:
        path = path_part[1:]  # sqlite:///rel.db -> rel.db ; sqlite:////abs.db -> /abs.db
    else:
        raise ValidationError(
            f"invalid SQLite URL {url!r}: use sqlite:///relative.db, sqlite:////absolute.db "
            "or sqlite://:memory:"
        )
    options = {key: values[-1] for key, values in parse_qs(query).items()}
    unknown = set(options) - _SQLITE_OPTIONS
    if unknown:
        raise ValidationError(f"unknown SQLite option(s) in {url!r}: {sorted(unknown)}")
    try:
        busy_timeout_ms = int(options.get("busy_timeout", "5000"))
    except ValueError:
        raise ValidationError(f"busy_timeout must be milliseconds in {url!r}") from None
    synchronous = options.get("synchronous", "normal")
    if synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
        raise ValidationError(f"synchronous must be off, normal, full or extra in {url!r}")
    journal_mode = options.get("journal_mode", "wal")
    if journal_mode.upper() not in {"WAL", "DELETE", "TRUNCATE", "PERSIST", "MEMORY"}:
        raise ValidationError(f"unsupported journal_mode in {url!r}")
    if read_only and path == ":memory:":
        raise ValidationError(
            f"{url!r} cannot be opened read-only: an in-memory database starts empty and "
            "belongs to one connection, so there is nothing to read"
        )
    conn = StdlibSqlConnection(path, busy_timeout_ms=busy_timeout_ms, read_only=read_only)
    try:
        apply_connection_policy(
            conn,
            journal_mode=None if path == ":memory:" else journal_mode,
            synchronous=synchronous,
            busy_timeout_ms=busy_timeout_ms,
            read_only=read_only,
        )
    except BaseException:
        conn.close()
        raise
    return SQLiteStore(conn, busy_timeout_ms=busy_timeout_ms)
