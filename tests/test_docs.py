"""The README and docs/ name files that exist (files move; their mentions must follow)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Mentions that are repository paths: `durably_web/asgi/app.py`, `static/worker.js`, ...
TRACKED_TOPS = ("durably_web/", "static/", "tests/", "docs/", "web/", "benchmarks/", "examples/")


def mentioned_paths(text: str) -> set[str]:
    found = set()
    for code in re.findall(r"`([^`\n]+)`", text):
        for word in code.split():
            word = word.strip(",.:;()\"'")
            if word.startswith(TRACKED_TOPS) and re.fullmatch(r"[\w./*-]+", word):
                found.add(word)
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_mentioned_path_exists(doc: Path) -> None:
    missing = sorted(
        path for path in mentioned_paths(doc.read_text()) if not list(ROOT.glob(path.rstrip("/")))
    )
    assert missing == [], f"{doc.relative_to(ROOT)} names files that do not exist: {missing}"


def test_browser_build_doc_is_a_document_not_phase_notes() -> None:
    text = (ROOT / "docs" / "browser-build.md").read_text()
    assert text.splitlines()[0] == "# The browser build"
    assert "phase 1" not in text.lower()
