"""Shared fixtures: a real SQLite file per test, and started ``Durably`` instances that always stop."""

from __future__ import annotations

import inspect
import logging
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import FAST

from durably_web import Durably


class _StoreUsedAfterClose(logging.Handler):
    """Collects the worker errors that say a run used its store after the store was closed:
    some task outlived stop() (or a dropped event loop's task ran on when it was collected).
    No test means that to happen; it used to pass unnoticed, as a warning in a passing test."""

    SIGNS = ("Cannot operate on a closed database",)

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.reports: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "worker error" in message and any(sign in message for sign in self.SIGNS):
            self.reports.append(message)


_STORE_USED_AFTER_CLOSE = _StoreUsedAfterClose()
logging.getLogger("durably_web").addHandler(_STORE_USED_AFTER_CLOSE)


@pytest.fixture(autouse=True)
def _no_store_used_after_close() -> Iterator[None]:
    """Fails the test (at its teardown, after every other fixture's) in which such a report
    was logged: the test's own instances, or whatever it left behind, use a closed store."""
    first = len(_STORE_USED_AFTER_CLOSE.reports)
    yield
    reports = _STORE_USED_AFTER_CLOSE.reports[first:]
    if reports:
        pytest.fail(f"a worker used its store after it was closed: {reports}", pytrace=False)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "test.db"


#: The backends a module marked ``all_backends`` runs its engine tests on. A test that reads
#: the SQLite file itself (it takes ``sql`` or ``db_path``) or is marked ``sqlite_only`` stays
#: on SQLite. Inside Pyodide there is no PostgreSQL (nor any network socket).
ENGINE_BACKENDS = ["sqlite"] if "_pyodide_core" in sys.modules else ["sqlite", "postgres"]
_SQLITE_FILE_FIXTURES = {"sql", "db_path"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    definition = metafunc.definition
    if len(ENGINE_BACKENDS) == 1:
        return  # no parameter (inside Pyodide, test ids stay as the NEEDS_CPYTHON list names them)
    if not definition.get_closest_marker("all_backends") or definition.get_closest_marker("sqlite_only"):
        return
    if "db_url" not in metafunc.fixturenames:
        return
    direct = set(inspect.signature(metafunc.function).parameters)
    if direct & _SQLITE_FILE_FIXTURES:
        return
    metafunc.parametrize("backend", ENGINE_BACKENDS, indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """The storage backend of this test: "sqlite" unless the module runs on all backends."""
    return getattr(request, "param", "sqlite")


@pytest.fixture
def db_url(request: pytest.FixtureRequest, backend: str, db_path: Path) -> str:
    if backend == "postgres":
        return str(request.getfixturevalue("postgres_url"))
    # db_path is absolute, so this is sqlite:////abs/path/test.db
    return f"sqlite:///{db_path}"


MakeDurably = Callable[..., Awaitable[Durably]]


@pytest.fixture
async def make_durably(db_url: str) -> AsyncIterator[MakeDurably]:
    """``await make_durably(job, ..., url=None, **options)`` -> a started ``Durably``, stopped at teardown."""
    started: list[Durably] = []

    async def make(*jobs: Any, url: str | None = None, **options: Any) -> Durably:
        durably = Durably(url or db_url, jobs=list(jobs), **{**FAST, **options})
        await durably.init()
        started.append(durably)
        return durably

    yield make
    for durably in reversed(started):
        await durably.stop()


@pytest.fixture
def sql(db_path: Path) -> Callable[..., list[tuple[Any, ...]]]:
    """Run one statement on the test database through an independent sqlite3 connection."""

    def run(statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(db_path, timeout=10, isolation_level=None)
        try:
            return conn.execute(statement, params).fetchall()
        finally:
            conn.close()

    return run


@pytest.fixture(scope="session")
def postgres_cluster() -> Any:
    """A throwaway PostgreSQL cluster for the session (``tests/support/postgres.py``); skipped
    when the server binaries are missing (``apt-get install postgresql``), failed under CI."""
    from support.postgres import start_test_cluster

    cluster = start_test_cluster()
    yield cluster
    cluster.stop()


@pytest.fixture
def postgres_url(postgres_cluster: Any) -> Any:
    """The URL of a fresh, empty database on the session cluster, dropped after the test."""
    import uuid

    name = f"test_{uuid.uuid4().hex[:16]}"
    yield postgres_cluster.create_database(name)
    postgres_cluster.drop_database(name)


#: The backends the storage contract suite runs against (tests/test_store_contract.py). Inside
#: Pyodide (tests/pyodide) also the browser's own: SQLiteStore over the sqlite-wasm bridge.
STORE_BACKENDS = ["sqlite-file", "sqlite-memory"]
if "_pyodide_core" in sys.modules:
    STORE_BACKENDS.append("sqlite-wasm")
else:
    STORE_BACKENDS.append("postgres")  # skips on a laptop without PostgreSQL, fails under CI


@pytest.fixture(params=STORE_BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    """A migrated, empty store of one backend, closed at teardown."""
    from durably_web.storage import open_store

    if request.param == "sqlite-wasm":
        from in_pyodide import open_wasm_store  # tests/pyodide/in_pyodide.py: on sys.path there

        opened = await open_wasm_store()
    elif request.param == "postgres":
        opened = open_store(request.getfixturevalue("postgres_url"))
        await opened.migrate()
    else:
        urls = {"sqlite-file": f"sqlite:///{tmp_path / 'contract.db'}", "sqlite-memory": "sqlite://:memory:"}
        opened = open_store(urls[request.param])
        await opened.migrate()
    yield opened
    await opened.close()
