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
