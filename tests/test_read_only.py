"""Read-only opens: ``Durably(..., read_only=True)`` / ``init(read_only=True)`` and
``open_store(url, read_only=True)`` look at a database without writing to it."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest
from helpers import FAST
from pydantic import BaseModel

from durably_web import (
    Durably,
    ReadOnlyError,
    SchemaVersionError,
    StepContext,
    StorageError,
    ValidationError,
    define_job,
)
from durably_web.storage import open_store


class Note(BaseModel):
    text: str


@define_job("ro-note", input=Note)
async def note_job(step: StepContext, payload: Note) -> str:
    return await step.run("copy", lambda: payload.text, type=str)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _companions(path: Path) -> list[str]:
    """The file and any -wal, -shm or -journal beside it."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name))


async def _seeded(db_url: str) -> str:
    """A migrated database with one finished run; closed again."""
    async with Durably(db_url, jobs=[note_job], **FAST) as writer:
        run = await writer.trigger_and_wait(note_job, Note(text="hi"), timeout=30)
        assert run.status == "completed"
        return run.id


async def test_a_read_only_durably_reads_and_refuses_every_write(db_url: str, db_path: Path) -> None:
    run_id = await _seeded(db_url)
    before = _digest(db_path)
    async with Durably(db_url, jobs=[note_job], read_only=True, **FAST) as reader:
        assert [run.id for run in await reader.get_runs()] == [run_id]
        assert (await reader.get_run(run_id)).output == "hi"
        assert [step.name for step in await reader.get_steps(run_id)] == ["copy"]
        assert await reader.get_logs(run_id) == []
        writes = [
            lambda: reader.trigger(note_job, Note(text="no")),
            lambda: reader.batch_trigger(note_job, [Note(text="no")]),
            lambda: reader.retrigger(run_id),
            lambda: reader.cancel(run_id),
            lambda: reader.delete_run(run_id),
            lambda: reader.purge_runs(older_than=0),
        ]
        for write in writes:
            with pytest.raises(ReadOnlyError, match="read-only"):
                await write()
        # Below Durably, the connection itself refuses to write.
        with pytest.raises(StorageError, match="readonly"):
            await reader.store.purge_runs(reader.now_ms(), None)
    assert _digest(db_path) == before


async def test_init_read_only_overrides_the_constructor_and_starts_no_worker(db_url: str) -> None:
    await _seeded(db_url)
    durably = Durably(db_url, jobs=[note_job], **FAST)  # worker=True by default
    await durably.init(read_only=True)
    try:
        assert durably.read_only
        with pytest.raises(ReadOnlyError):
            await durably.trigger(note_job, Note(text="no"))
    finally:
        await durably.stop()
    with pytest.raises(ValidationError, match="cannot run a worker"):
        await Durably(db_url, jobs=[note_job], read_only=True).init(worker=True)


async def test_a_read_only_reader_sees_what_a_writer_commits_meanwhile(db_url: str) -> None:
    await _seeded(db_url)
    async with (
        Durably(db_url, read_only=True, **FAST) as reader,
        Durably(db_url, jobs=[note_job], worker=False, **FAST) as writer,
    ):
        assert len(await reader.get_runs()) == 1
        await writer.trigger(note_job, Note(text="later"))
        assert len(await reader.get_runs()) == 2


async def test_read_only_opens_refuse_what_is_not_this_schema_and_change_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    with pytest.raises(StorageError):
        await Durably(f"sqlite:///{missing}", read_only=True).init()
    assert not missing.exists()

    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite at all " * 200)
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    conn.commit()
    conn.close()
    old = tmp_path / "old.db"
    conn = sqlite3.connect(old)
    conn.execute("CREATE TABLE durably_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER)")
    conn.commit()
    conn.close()
    for path, found, text in ((junk, None, "not a durably-web"), (other, None, "not a durably-web"),
                              (old, 0, "older")):
        before = _digest(path)
        with pytest.raises(SchemaVersionError, match=text) as caught:
            await Durably(f"sqlite:///{path}", read_only=True).init()
        assert caught.value.found == found and caught.value.expected is not None
        assert _digest(path) == before
        assert _companions(path) == [path.name]

    # The old one opened for writing is migrated, and then readable read-only.
    async with Durably(f"sqlite:///{old}", worker=False):
        pass
    async with Durably(f"sqlite:///{old}", read_only=True) as reader:
        assert await reader.get_runs() == []


async def test_an_in_memory_database_cannot_be_read_only() -> None:
    with pytest.raises(ValidationError, match="cannot be opened read-only"):
        open_store("sqlite://:memory:", read_only=True)
    store = open_store("sqlite://:memory:")  # the writing open still works
    await store.migrate()
    await store.check_schema()
    await store.close()


async def test_a_read_only_store_keeps_the_journal_mode(db_path: Path, db_url: str) -> None:
    store = open_store(db_url)
    await store.migrate()
    await store.close()
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.close()
    reader = open_store(f"{db_url}?journal_mode=wal", read_only=True)
    await reader.check_schema()
    await reader.close()
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    conn.close()
