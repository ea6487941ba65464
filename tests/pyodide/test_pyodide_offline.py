"""pytest-pyodide's runtimes load everything from site/, never from a CDN.

Pyodide falls back to its ``cdnUrl`` (jsdelivr) only under Node and only for a lock
entry whose file is missing locally; site_dir() already checks that every entry of the
generated lock has its file. Here: what Pyodide reports as loaded, and where from.
(Chromium additionally runs with every non-loopback request sent to a dead proxy.)
"""

from __future__ import annotations

import json
from typing import Any

from pyodide_support import PACKAGES


def test_every_loaded_package_comes_from_site(pyodide_rt: Any, pyodide_server: dict[str, Any]) -> None:
    site = pyodide_server["site"]
    lock = json.loads((site / "pyodide-lock.json").read_text())
    loaded = pyodide_rt.run_js(
        "const c = pyodide._api.config; return JSON.stringify({loaded: pyodide.loadedPackages,"
        " indexUrl: c.indexURL, packageBaseUrl: c.packageBaseUrl ?? null})"
    )
    info = json.loads(loaded)
    print(f"\n[{pyodide_rt.browser}] {info}")
    assert set(PACKAGES) <= set(info["loaded"])
    assert set(info["loaded"]) <= set(lock["packages"]), "a package that site/'s lock does not list"
    local = f"{site}/" if pyodide_rt.browser == "node" else f"http://127.0.0.1:{pyodide_server['port']}/"
    assert info["indexUrl"] == local and info["packageBaseUrl"] == local, info
    for name, source in info["loaded"].items():
        assert "cdn" not in str(source).lower() and "jsdelivr" not in str(source).lower(), (name, source)
    if pyodide_rt.browser == "chrome":
        served = set(pyodide_server["requests"])
        for entry in lock["packages"].values():
            if entry["name"] in info["loaded"]:
                assert f"/{entry['file_name']}" in served, f"{entry['file_name']} was not fetched from site/"
