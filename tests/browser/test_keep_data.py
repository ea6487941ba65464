"""Keeping the data in real headless Chromium: storageInfo() reports persistence and
the storage estimate; exportDatabase() hands back the database file as a Blob (a
consistent snapshot, WAL content included) that SQLite itself opens."""

from __future__ import annotations

import base64
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from pagekit import page

pytestmark = pytest.mark.browser

TO_BASE64 = """
const bytes = new Uint8Array(await blob.arrayBuffer());
let text = "";
for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
"""


def test_storage_info_and_export_of_an_opfs_database(
    launch_chromium: Any, site_url: Any, tmp_path: Path
) -> None:
    url, _ = site_url
    drv = launch_chromium()
    drv.get(f"{url}_test/packages.html")
    got = page(
        drv,
        """
        const durably = await DurablyWeb.create({
          jobs: ["dateutil_jobs.py"], storage: "opfs", database: "keep.db",
          packages: ["python-dateutil"], persist: true});
        window.durably = durably;
        const ids = [];
        for (const months of [1, 2, 3]) {
          const input = {date: "2026-01-31", months};
          const run = await durably.triggerAndWait("add-months", input, {timeout: 30000});
          ids.push(run.id);
        }
        const info = await durably.storageInfo();
        const blob = await durably.exportDatabase();
        """
        + TO_BASE64
        + """
        return {ids, info, type: blob.type, size: blob.size, b64: btoa(text)};
        """,
    )
    info = got["info"]
    assert info["storage"] == "opfs" and info["journalMode"] == "wal", info
    assert isinstance(info["persisted"], bool), info
    assert info["estimate"]["usage"] > 0 and info["estimate"]["quota"] >= info["estimate"]["usage"], info
    assert got["type"] == "application/vnd.sqlite3"
    data = base64.b64decode(got["b64"])
    assert len(data) == got["size"] and data.startswith(b"SQLite format 3\x00")
    copy = tmp_path / "exported.db"
    copy.write_bytes(data)
    with sqlite3.connect(copy) as db:
        rows = dict(db.execute("SELECT id, status FROM durably_runs").fetchall())
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()
    # The runs committed under WAL are all in the image.
    assert rows == {run_id: "completed" for run_id in got["ids"]}, rows


# IndexedDB is with the slow tests (two more cold Chromium starts, ~40 s on the 2-core machine):
# make test keeps the OPFS round trip here and IndexedDB persistence in test_idb_storage.py.
@pytest.mark.parametrize("storage", ["opfs", pytest.param("idb", marks=pytest.mark.slow)])
def test_export_then_import_into_a_fresh_profile_keeps_the_runs(
    launch_chromium: Any, site_url: Any, storage: str
) -> None:
    """Each persistent storage (OPFS, IndexedDB) exports a file and imports one."""
    url, _ = site_url
    create = (
        """
        window.durably = await DurablyWeb.create({jobs: ["dateutil_jobs.py"], storage: "STORAGE",
                                                  database: "moved.db", packages: ["python-dateutil"]});
        const info = await durably.storageInfo();
        if (info.storage !== "STORAGE") throw new Error("opened " + info.storage);
    """
    ).replace("STORAGE", storage)
    first = launch_chromium()
    first.get(f"{url}_test/packages.html")
    exported = page(
        first,
        create
        + """
        const ids = [];
        for (const months of [1, 5]) {
          const input = {date: "2026-01-31", months};
          ids.push((await durably.triggerAndWait("add-months", input, {timeout: 30000})).id);
        }
        const blob = await durably.exportDatabase();
        """
        + TO_BASE64
        + "return {ids, b64: btoa(text)};",
    )
    second = launch_chromium()  # a fresh --user-data-dir: nothing of the first profile
    second.get(f"{url}_test/packages.html")
    got = page(
        second,
        create
        + """
        const wait = {timeout: 30000};
        const own = await durably.triggerAndWait("add-months", {date: "2026-03-31", months: 1}, wait);
        const raw = atob(args[0]);
        const bytes = new Uint8Array(raw.length);
        for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
        let refused = null;
        try {
          await durably.importDatabase(new Blob([bytes.slice(0, 4096)]));  // truncated: not a database
        } catch (e) {
          refused = {name: e.name, message: e.message};
        }
        const kept = (await durably.getRuns()).map((r) => r.id);
        await durably.importDatabase(new Blob([bytes], {type: "application/vnd.sqlite3"}));
        const runs = await durably.getRuns();
        const again = await durably.triggerAndWait("add-months", {date: "2026-01-31", months: 2}, wait);
        const listed = runs.map((r) => [r.id, r.status, r.output]);
        return {own: own.id, refused, kept, runs: listed, again: again.output};
        """,
        exported["b64"],
    )
    assert got["refused"] and got["refused"]["name"] == "ValidationError", got["refused"]
    assert got["kept"] == [got["own"]], "a bad import changed nothing"
    runs = {run_id: (status, output) for run_id, status, output in got["runs"]}
    assert set(runs) == set(exported["ids"]), "the imported file replaced the database"
    assert runs[exported["ids"][1]] == ("completed", {"date": "2026-06-30"})
    assert got["again"] == {"date": "2026-03-31"}, "the runtime runs again after the import"
