"""What the wheel and the built site/ contain.

The wheel's package list in pyproject.toml is explicit (to map static/ into it): keep it
whole. And both ship only what users run: no test pages, harness workers or test-only wheels.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_for_the_wheel() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "durably_web").rglob("__init__.py")
    }
    assert on_disk <= listed, f"add to [tool.setuptools] packages: {sorted(on_disk - listed)}"
    assert config["package-dir"]["durably_web.static"] == "static"
    assert (ROOT / "static" / "dashboard.html").is_file()


# -- ship only what users run ------------------------------------------------------------

TEST_WHEELS = {
    spec["file_name"]
    for spec in json.loads((ROOT / "browser-wheels.json").read_text())["wheels"]
    if spec.get("group", "runtime") == "test"
}
TEST_PACKAGES = {
    spec["name"]
    for spec in json.loads((ROOT / "browser-wheels.json").read_text())["wheels"]
    if spec.get("group", "runtime") == "test"
}


def looks_like_a_test_file(name: str) -> bool:
    """Test pages, harness workers, test modules and fixtures (by file name)."""
    base = name.rsplit("/", 1)[-1]
    return (
        base.startswith(("harness", "test_", "conftest"))
        or base.endswith(("_test.py", "_test.html", "_test.js"))
        or "/tests/" in f"/{name}"
        or "/_test/" in f"/{name}"
    )


def test_wheel_ships_no_test_files(tmp_path: Path) -> None:
    # Built from a clean copy: setuptools reuses a checkout's build/lib, which may hold
    # files deleted since (the very bug this guards against would hide there).
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "durably_web", source / "durably_web", ignore=ignore)
    shutil.copytree(ROOT / "static", source / "static", ignore=ignore)
    out = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w", str(out)],
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "durably_web/static/worker.js" in names and "durably_web/static/dashboard.html" in names
    shipped_tests = [n for n in names if looks_like_a_test_file(n)]
    assert shipped_tests == [], f"the wheel ships test files: {shipped_tests}"


def test_static_and_web_sources_hold_no_test_pages() -> None:
    """static/ goes into the wheel and site/, web/ into site/: test pages live in tests/browser/pages/."""
    for folder in ("static", "web"):
        found = [p.name for p in (ROOT / folder).rglob("*") if p.is_file() and looks_like_a_test_file(p.name)]
        assert found == [], f"{folder}/ holds test files: {found}"


def test_built_site_ships_no_test_files_or_wheels() -> None:
    site = ROOT / "site"
    if not (site / "pyodide-lock.json").exists():
        pytest.skip("site/ is not built (python build.py)")
    files = [p.relative_to(site).as_posix() for p in site.rglob("*") if p.is_file()]
    assert [f for f in files if f in TEST_WHEELS] == [], "site/ ships test-only wheels"
    assert [f for f in files if looks_like_a_test_file(f)] == [], "site/ ships test files"
    lock = json.loads((site / "pyodide-lock.json").read_text())
    assert sorted(set(lock["packages"]) & TEST_PACKAGES) == [], "site/'s lock lists test-only packages"
    assert {"durably-web", "pydantic", "pydantic-core"} <= set(lock["packages"])


def test_built_site_offers_exactly_the_packages_group() -> None:
    """site/packages.json (what create({packages}) accepts) is the 'packages' group of
    browser-wheels.json, each with its wheel in site/ and its lock entry, and micropip,
    which installs them, is bundled too: nothing needs an index."""
    site = ROOT / "site"
    if not (site / "packages.json").exists():
        pytest.skip("site/ is not built (python build.py)")
    specs = json.loads((ROOT / "browser-wheels.json").read_text())["wheels"]
    group = {s["name"]: s for s in specs if s.get("group", "runtime") == "packages"}
    offered = json.loads((site / "packages.json").read_text())["packages"]
    assert offered == {name: {"version": s["version"], "depends": s["depends"]} for name, s in group.items()}
    lock = json.loads((site / "pyodide-lock.json").read_text())["packages"]
    for name in [*group, "micropip"]:
        entry = lock[name]
        assert (site / entry["file_name"]).is_file(), f"{name}: {entry['file_name']} is not in site/"
        assert all(dep in lock for dep in entry["depends"]), entry
