"""build.py (the browser build's assembler and static server): what ``serve`` serves and how it fails."""

from __future__ import annotations

import importlib.util
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Load the repo-root build.py under its own name: "build" is also a PyPI package.
_spec = importlib.util.spec_from_file_location("durably_site_build", ROOT / "build.py")
assert _spec is not None and _spec.loader is not None
site_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(site_build)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, outside dir): a server on ``tmp_path/site`` and a folder next to it."""
    site = tmp_path / "site"
    outside = tmp_path / "outside"
    (site / "sub").mkdir(parents=True)
    (site / "empty").mkdir()
    outside.mkdir()
    (site / "index.html").write_text("<p>home</p>")
    (site / "app.js").write_text("ok()")
    (site / "sub" / "index.html").write_text("<p>sub</p>")
    (outside / "secret.txt").write_text("secret")
    (site / "leak.txt").symlink_to(outside / "secret.txt")
    (site / "leakdir").symlink_to(outside, target_is_directory=True)
    (site / "alias.js").symlink_to(site / "app.js")  # inside site/: fine
    server = site_build.make_server(site, 0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", outside
    finally:
        server.shutdown()
        server.server_close()


def test_serves_regular_files_and_index_pages(served: tuple[str, Path]) -> None:
    base, _ = served
    assert get(base) == (200, b"<p>home</p>")
    assert get(base + "app.js") == (200, b"ok()")
    assert get(base + "alias.js") == (200, b"ok()")
    assert get(base + "sub/") == (200, b"<p>sub</p>")
    assert get(base + "sub")[0] == 200  # redirected to sub/


def test_symlinks_out_of_the_site_are_not_followed(served: tuple[str, Path]) -> None:
    base, _ = served
    escapes = ("leak.txt", "leakdir/secret.txt", "leakdir/", "%2e%2e/outside/secret.txt", "../outside/x")
    for path in escapes:
        status, body = get(base + path)
        assert status == 404, path
        assert b"secret" not in body, path


def test_no_directory_listings(served: tuple[str, Path]) -> None:
    base, _ = served
    status, body = get(base + "empty/")
    assert status == 404
    assert b"Directory listing" not in body


def test_a_taken_port_is_named_with_the_way_out(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exc_info:
            site_build.main(["serve", "--port", str(port)])
    message = str(exc_info.value.code)
    assert f"port {port}" in message and "already in use" in message
    assert "--port" in message
    assert "Traceback" not in capsys.readouterr().err


def test_precache_manifest_lists_the_runtime_and_versions_it_by_content(tmp_path: Path) -> None:
    """Every runtime file with its sha256 and size; page files, the service worker and the
    manifest itself left out; the version moves when a listed file or the service worker's
    source changes, and only then."""
    import hashlib

    site = tmp_path / "site"
    (site / "sub").mkdir(parents=True)
    (site / "worker.js").write_text("worker v1")
    (site / "sub" / "lib.whl").write_bytes(b"\x00wheel")
    (site / "index.html").write_text("<p>page</p>")
    (site / site_build.SERVICE_WORKER).write_text(f"const V = '{site_build.VERSION_PLACEHOLDER}';")
    (site / site_build.PRECACHE_MANIFEST).write_text("{}")
    first = site_build.precache_manifest(site, {"index.html"})
    assert first["files"] == [
        {"path": "sub/lib.whl", "sha256": hashlib.sha256(b"\x00wheel").hexdigest(), "size": 6},
        {"path": "worker.js", "sha256": hashlib.sha256(b"worker v1").hexdigest(), "size": 9},
    ]
    assert site_build.precache_manifest(site, {"index.html"})["version"] == first["version"]
    (site / "index.html").write_text("<p>another page</p>")  # a page file: network-first, not versioned
    assert site_build.precache_manifest(site, {"index.html"})["version"] == first["version"]
    (site / "worker.js").write_text("worker v2")
    second = site_build.precache_manifest(site, {"index.html"})
    assert second["version"] != first["version"]
    (site / site_build.SERVICE_WORKER).write_text(
        f"// changed\nconst V = '{site_build.VERSION_PLACEHOLDER}';"
    )
    assert site_build.precache_manifest(site, {"index.html"})["version"] not in (
        first["version"],
        second["version"],
    )
