#!/usr/bin/env python3
"""Assemble and serve the browser build of durably-web (standard library only).

    python build.py [build]            assemble site/ (the default command)
    python build.py serve [--port N]   serve site/ on http://127.0.0.1:N/ (default 8000)
    python build.py test-site          assemble build/test-site/ for tests/pyodide

``site/`` (git-ignored) is self-contained: a page or worker served from it
loads Pyodide, sqlite-wasm and every Python wheel from the same origin; no CDN
is ever contacted. It holds:

* Pyodide's core files, from the npm package pinned in package.json
  (``npm ci`` runs when node_modules is missing or does not match
  package-lock.json);
* sqlite-wasm's ESM build and ``sqlite3.wasm`` under ``site/sqlite-wasm/``;
* the ``runtime`` wheels pinned (version and sha256) in ``browser-wheels.json``,
  downloaded once from PyPI into ``build/browser-cache/`` so rebuilds work offline;
* the ``packages`` wheels of browser-wheels.json (pure-Python libraries job
  modules may import, e.g. python-dateutil), listed in the lock file and in
  ``site/packages.json`` but loaded only when a page passes
  ``create({packages: [...]})``;
* the project's own wheel, built with ``pip wheel . --no-deps``;
* ``pyodide-lock.json``: Pyodide's lock file ``info`` (its ABI must match
  pyodide.asm.wasm) with one entry per wheel above, so
  ``pyodide.loadPackage(["durably-web"])`` resolves its dependencies from
  site/ itself. Pyodide's own package entries are dropped: the npm package
  ships none of their wheels, and an entry without its file makes
  ``loadPackage`` 404 in a browser (and fall back to the CDN under Node);
* the hand-written ``static/*`` (page API, worker, SQLite bridge, dashboard, service
  worker), the demo page ``index.html`` (the repository's top level) and its assets
  ``web/*`` (script, styles, web app manifest, icons), all copied to the top of site/;
* ``precache-manifest.json``: every runtime file of site/ (all of the above but the
  demo page and its assets, which are the page's own files) with its sha256 and size,
  and the build's version, a hash of them all. build.py writes the version into
  ``site/service_worker.js`` too: a new build changes the service worker's bytes, which
  is how the browser notices it (see docs/browser-build.md, "Offline").

site/ is what users deploy, so it holds only what pages run: no test pages (those
live in ``tests/browser/pages/``) and no test-only wheels. ``build/test-site/``
is site/ plus the ``test`` group of browser-wheels.json (pytest, hypothesis, …)
and a lock file that lists them; it is pytest-pyodide's ``--dist-dir`` for
tests/pyodide: it has ``pyodide.js`` (Node runtime), ``pyodide.mjs``
(module_test.html, served by pytest-pyodide itself) and the lock file it reads
to decide which packages are "built".
"""

from __future__ import annotations

import argparse
import email.parser
import errno
import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SITE = ROOT / "site"
BUILD = ROOT / "build"
TEST_SITE = BUILD / "test-site"  # site/ + the test-only wheels, for tests/pyodide (never deployed)
CACHE = BUILD / "browser-cache"  # downloaded wheels, keyed by sha256
NODE_MODULES = ROOT / "node_modules"
NPM_STAMP = NODE_MODULES / ".durably-build-stamp"
WHEELS_FILE = ROOT / "browser-wheels.json"

PYODIDE_DIR = NODE_MODULES / "pyodide"
PYODIDE_FILES = [
    "pyodide.js",  # CommonJS/UMD entry (Node, classic <script>, pytest-pyodide's node runtime)
    "pyodide.mjs",  # ES module entry (module workers, pytest-pyodide's module_test.html)
    "pyodide.asm.mjs",  # Emscripten glue (Pyodide >= 0.28 ships .asm.mjs, not .asm.js)
    "pyodide.asm.wasm",
    "python_stdlib.zip",
    "pyodide.js.map",
    "pyodide.mjs.map",
    "package.json",  # version info; Pyodide's own dist has it too
]
# console.html is deliberately not copied: it loads jQuery from a CDN.

SQLITE_DIR = NODE_MODULES / "@sqlite.org" / "sqlite-wasm" / "dist"
SQLITE_FILES = [
    "index.mjs",  # ESM build with oo1 + opfs-sahpool; finds sqlite3.wasm next to itself
    "sqlite3.wasm",
    "sqlite3-opfs-async-proxy.js",  # only used by the "opfs" VFS (needs COOP/COEP); harmless
]

SERVICE_WORKER = "service_worker.js"
PRECACHE_MANIFEST = "precache-manifest.json"
# The line of static/service_worker.js that build.py fills in with the build's version.
VERSION_PLACEHOLDER = "__DURABLY_BUILD_VERSION__"
REPRODUCIBLE_EPOCH = "315532800"  # 1980-01-01, the earliest time a zip entry can hold
VERSION_LENGTH = 16  # hex digits of the version (64 bits: the cache is named after it)

MIME_TYPES = {
    ".wasm": "application/wasm",
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".json": "application/json",
    ".map": "application/json",
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".zip": "application/zip",
    ".whl": "application/zip",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".webmanifest": "application/manifest+json",
    ".txt": "text/plain; charset=utf-8",
}


def log(message: str) -> None:
    print(f"[build] {message}", flush=True)


def canonical_name(name: str) -> str:
    """PEP 503 normalisation, which is also how pyodide-lock.json keys are spelled."""
    return re.sub(r"[-_.]+", "-", name).lower()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- npm -----------------------------------------------------------------------


def ensure_node_modules() -> None:
    """Run ``npm ci`` unless node_modules was installed from the current lock file."""
    wanted = sha256_of(ROOT / "package-lock.json")
    have = NPM_STAMP.read_text().strip() if NPM_STAMP.exists() else None
    missing = [
        p
        for p in [*(PYODIDE_DIR / f for f in PYODIDE_FILES), *(SQLITE_DIR / f for f in SQLITE_FILES)]
        if not p.exists()
    ]
    if have == wanted and not missing:
        return
    log("node_modules missing or stale: npm ci")
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=ROOT, check=True)
    NPM_STAMP.write_text(wanted + "\n")


# -- wheels ----------------------------------------------------------------------


def download_wheel(spec: dict) -> Path:
    """Return the cached wheel for ``spec``, downloading (and verifying) it if needed."""
    target = CACHE / spec["sha256"] / spec["file_name"]
    if target.exists() and sha256_of(target) == spec["sha256"]:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"downloading {spec['file_name']}")
    partial = target.with_suffix(".part")
    with urllib.request.urlopen(spec["url"], timeout=120) as response, partial.open("wb") as f:
        shutil.copyfileobj(response, f)
    got = sha256_of(partial)
    if got != spec["sha256"]:
        partial.unlink()
        raise SystemExit(f"sha256 mismatch for {spec['file_name']}: expected {spec['sha256']}, got {got}")
    partial.replace(target)
    return target


def wheel_metadata(path: Path) -> email.message.Message:
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(zf.read(name).decode("utf-8"))


def wheel_imports(path: Path) -> list[str]:
    """Top-level importable names in a wheel (packages, namespace packages, modules)."""
    names = set()
    with zipfile.ZipFile(path) as zf:
        for entry in zf.namelist():
            top, sep, _rest = entry.partition("/")
            if top.endswith((".dist-info", ".data")):
                continue
            if sep:  # a directory: package or namespace package
                names.add(top)
            elif top.endswith(".py"):
                names.add(top[:-3])
            elif top.endswith(".so"):
                names.add(top.split(".", 1)[0])
    return sorted(n for n in names if n.isidentifier())


def lock_entry(path: Path, name: str, version: str, depends: list[str]) -> dict:
    return {
        "name": canonical_name(name),
        "version": version,
        "file_name": path.name,
        "install_dir": "site",
        "sha256": sha256_of(path),
        "package_type": "package",
        "imports": wheel_imports(path),
        "depends": sorted(canonical_name(d) for d in depends),
        "unvendored_tests": False,
    }


def third_party_wheels(out: Path, group: str) -> list[dict]:
    """Copy the wheels of one group of browser-wheels.json (``runtime`` or ``test``) into ``out``."""
    specs = json.loads(WHEELS_FILE.read_text())["wheels"]
    entries = []
    for spec in specs:
        if spec.get("group", "runtime") != group:
            continue
        cached = download_wheel(spec)
        shutil.copy2(cached, out / spec["file_name"])
        meta = wheel_metadata(cached)
        if canonical_name(meta["Name"]) != canonical_name(spec["name"]) or meta["Version"] != spec["version"]:
            raise SystemExit(
                f"{spec['file_name']} is {meta['Name']} {meta['Version']}, not what browser-wheels.json says"
            )
        entries.append(lock_entry(out / spec["file_name"], spec["name"], spec["version"], spec["depends"]))
        check_requirements(meta, spec, {canonical_name(s["name"]): s["version"] for s in specs})
    return entries


def check_requirements(meta: email.message.Message, spec: dict, pinned: dict[str, str]) -> None:
    """Fail when browser-wheels.json contradicts a wheel's own Requires-Dist.

    Checked: every requirement without an environment marker is listed in
    ``depends``, and an exact pin (``==X``) matches the version pinned here.
    Requirements with markers (extras, Windows, old Pythons) are left to the
    person editing the file.
    """
    depends = {canonical_name(d) for d in spec["depends"]}
    for requirement in meta.get_all("Requires-Dist") or []:
        if ";" in requirement:
            continue
        match = re.match(r"\s*([A-Za-z0-9._-]+)\s*(?:\[[^\]]*\])?\s*(.*)", requirement)
        name, constraint = canonical_name(match.group(1)), match.group(2).strip()
        if name not in depends:
            raise SystemExit(f"{spec['name']} requires {requirement!r}; add it to its depends")
        exact = re.search(r"==\s*([^,\s]+)", constraint)
        if exact and pinned.get(name) != exact.group(1):
            raise SystemExit(
                f"{spec['name']} {spec['version']} requires {requirement!r} "
                f"but browser-wheels.json pins {name} {pinned.get(name)}"
            )


def project_wheel(out: Path) -> dict:
    """Build durably-web's own wheel with pip (setuptools backend from pyproject.toml)."""
    wheel_dir = BUILD / "project-wheel"
    shutil.rmtree(wheel_dir, ignore_errors=True)
    # setuptools reuses build/lib: stale copies of deleted modules would end up in the wheel.
    shutil.rmtree(BUILD / "lib", ignore_errors=True)
    for stale in BUILD.glob("bdist.*"):
        shutil.rmtree(stale, ignore_errors=True)
    log("building the durably-web wheel (pip wheel . --no-deps)")
    # SOURCE_DATE_EPOCH fixes the zip entries' timestamps: the same sources give the same
    # wheel bytes, so the build's version (precache-manifest.json) changes only with them.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(wheel_dir)],
        cwd=ROOT,
        check=True,
        env={**os.environ, "SOURCE_DATE_EPOCH": REPRODUCIBLE_EPOCH},
    )
    (wheel,) = wheel_dir.glob("*.whl")
    shutil.copy2(wheel, out / wheel.name)
    meta = wheel_metadata(wheel)
    depends = []
    for requirement in meta.get_all("Requires-Dist") or []:
        if ";" in requirement:  # extras / environment markers: not needed in the browser
            continue
        depends.append(re.match(r"[A-Za-z0-9._-]+", requirement).group(0))
    return lock_entry(out / wheel.name, meta["Name"], meta["Version"], depends)


def write_lock(out: Path, entries: list[dict], base_lock: Path | None = None) -> None:
    base = json.loads((base_lock or PYODIDE_DIR / "pyodide-lock.json").read_text())
    packages = {
        key: value
        for key, value in base["packages"].items()
        if (out / value["file_name"]).exists()  # none, with the npm package
    }
    for entry in entries:
        packages[entry["name"]] = entry
    for entry in packages.values():
        for dep in entry["depends"]:
            if dep not in packages:
                raise SystemExit(f"{entry['name']} depends on {dep}, which {out.name}/ does not provide")
    lock = {"info": base["info"], "packages": dict(sorted(packages.items()))}
    (out / "pyodide-lock.json").write_text(json.dumps(lock, indent=1, sort_keys=False) + "\n")


def write_packages_index(out: Path, packages: list[dict]) -> None:
    """site/packages.json: the wheels a page may ask for with create({packages: [...]}).

    The one registry worker.js reads: a name not listed here is refused before
    anything loads, with a message saying how to bundle it. Each entry is also in
    pyodide-lock.json, so ``pyodide.loadPackage`` installs it and its depends from
    site/ itself.
    """
    index = {e["name"]: {"version": e["version"], "depends": e["depends"]} for e in packages}
    (out / "packages.json").write_text(json.dumps({"packages": index}, indent=1, sort_keys=True) + "\n")


# -- site ------------------------------------------------------------------------


def copy_tree_into(src: Path, dest: Path) -> None:
    if not src.is_dir():
        return
    for item in sorted(src.iterdir()):
        if item.name.startswith("."):
            continue
        target = dest / item.name
        if target.exists():
            raise SystemExit(f"{item} would overwrite {target} in site/")
        if item.is_dir():
            shutil.copytree(item, target)
        else:
            shutil.copy2(item, target)


def build() -> Path:
    ensure_node_modules()
    staging = BUILD / "site.new"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    for name in PYODIDE_FILES:
        shutil.copy2(PYODIDE_DIR / name, staging / name)
    (staging / "sqlite-wasm").mkdir()
    for name in SQLITE_FILES:
        shutil.copy2(SQLITE_DIR / name, staging / "sqlite-wasm" / name)

    entries = third_party_wheels(staging, "runtime")
    packages = third_party_wheels(staging, "packages")
    entries.append(project_wheel(staging))
    write_lock(staging, entries + packages)
    write_packages_index(staging, packages)

    copy_tree_into(ROOT / "static", staging)
    copy_tree_into(ROOT / "web", staging)
    # The demo page is the repository's top-level index.html (an installable app with
    # web/manifest.webmanifest); it reaches the top of site/ like web/*.
    shutil.copy2(ROOT / "index.html", staging / "index.html")
    # The demo page runs the very jobs module the terminal demo runs.
    shutil.copy2(ROOT / "durably_web" / "demo" / "jobs.py", staging / "demo_jobs.py")
    manifest = write_precache(staging, page_files=demo_page_files())

    old = BUILD / "site.old"
    shutil.rmtree(old, ignore_errors=True)
    if SITE.exists():
        SITE.rename(old)
    staging.rename(SITE)
    shutil.rmtree(old, ignore_errors=True)
    total = sum(p.stat().st_size for p in SITE.rglob("*") if p.is_file())
    log(f"site/ ready: {len(entries)} wheels, {total / 1e6:.1f} MB, version {manifest['version']}")
    return SITE


def demo_page_files() -> set[str]:
    """The demo's files in site/: a page's own files, which the service worker caches
    network-first like any page's (everything else in site/ is the versioned runtime)."""
    web = ROOT / "web"
    return {"index.html", "demo_jobs.py"} | {
        p.relative_to(web).as_posix() for p in web.rglob("*") if p.is_file() and not p.name.startswith(".")
    }


def precache_manifest(site: Path, page_files: set[str]) -> dict:
    """The runtime files of ``site`` (sorted paths relative to it, sha256, size) and their version.

    Every file is listed but the service worker, the manifest itself and
    ``page_files`` (paths relative to ``site``). The version is a hash over each
    listed file's path and sha256, and over the service worker's source, so any
    change to what a page runs, or to how it is cached, makes a new version.
    """
    skip = {SERVICE_WORKER, PRECACHE_MANIFEST, *page_files}
    files = []
    for path in sorted(site.rglob("*")):
        relative = path.relative_to(site).as_posix()
        if path.is_file() and relative not in skip and not path.name.startswith("."):
            files.append({"path": relative, "sha256": sha256_of(path), "size": path.stat().st_size})
    digest = hashlib.sha256()
    for entry in files:
        digest.update(f"{entry['path']}\0{entry['sha256']}\n".encode())
    worker = site / SERVICE_WORKER
    digest.update(b"service worker\0" + worker.read_bytes() if worker.exists() else b"")
    return {"version": digest.hexdigest()[:VERSION_LENGTH], "files": files}


def write_precache(site: Path, page_files: set[str]) -> dict:
    """Write ``site/precache-manifest.json`` and the version into ``site/service_worker.js``.

    ``site/service_worker.js`` must still be the copy of static/'s (with the
    placeholder): the version covers its source, not its filled-in bytes.
    """
    manifest = precache_manifest(site, page_files)
    worker = site / SERVICE_WORKER
    source = worker.read_text()
    if source.count(VERSION_PLACEHOLDER) != 1:
        raise SystemExit(f"{worker} must hold {VERSION_PLACEHOLDER!r} exactly once")
    worker.unlink()  # the file may be a hard link (copies of a site): never write through it
    worker.write_text(source.replace(VERSION_PLACEHOLDER, manifest["version"]))
    (site / PRECACHE_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _test_site_stamp() -> str:
    """Changes whenever site/ or browser-wheels.json does (paths, sizes, mtimes)."""
    digest = hashlib.sha256(WHEELS_FILE.read_bytes())
    for path in sorted(SITE.rglob("*")):
        if path.is_file():
            st = path.stat()
            digest.update(f"{path.relative_to(SITE)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def build_test_site() -> Path:
    """Assemble build/test-site/: site/ plus the ``test`` wheels and a lock that lists them.

    The tests in tests/pyodide load pytest, pytest-asyncio and hypothesis into Pyodide;
    those wheels must never reach the site/ users deploy, so they live here. Files are
    hard-linked from site/ where the file system allows. Skipped when up to date.
    """
    if not (SITE / "pyodide-lock.json").exists():
        build()
    stamp = _test_site_stamp()
    stamp_file = TEST_SITE / ".durably-test-site-stamp"
    if stamp_file.exists() and stamp_file.read_text().strip() == stamp:
        return TEST_SITE
    BUILD.mkdir(exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="test-site.new-", dir=BUILD))
    try:
        shutil.copytree(SITE, staging, dirs_exist_ok=True, copy_function=_link_or_copy)
        entries = third_party_wheels(staging, "test")
        (staging / "pyodide-lock.json").unlink()  # a hard link to site/'s: never write through it
        write_lock(staging, entries, base_lock=SITE / "pyodide-lock.json")
        (staging / stamp_file.name).write_text(stamp + "\n")
        old = Path(tempfile.mkdtemp(prefix="test-site.old-", dir=BUILD))
        if TEST_SITE.exists():
            TEST_SITE.rename(old / "test-site")
        staging.rename(TEST_SITE)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"{TEST_SITE.relative_to(ROOT)}/ ready: site/ + {len(entries)} test wheels")
    return TEST_SITE


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# -- serve -----------------------------------------------------------------------


class SiteHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with explicit MIME types; browsers revalidate every time.

    Only regular files whose real path (symlinks resolved) lies under the served
    directory, or under one of ``extra_roots``, are served; anything else, and
    every directory without an index.html, is a 404: no directory listings.
    """

    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, **MIME_TYPES}
    quiet = False
    request_log: list[str] | None = None
    extra_roots: tuple[str, ...] = ()  # more folders a subclass's translate_path maps into

    def send_head(self):  # type: ignore[no-untyped-def]
        path = self.translate_path(self.path)
        if os.path.isdir(path):
            if not self.path.split("?", 1)[0].split("#", 1)[0].endswith("/"):
                return super().send_head()  # the redirect to "dir/"
            path = os.path.join(path, "index.html")
        if not self._servable(path):
            self.send_error(404, "File not found")
            return None
        return super().send_head()

    def _servable(self, path: str) -> bool:
        real = os.path.realpath(path)
        if not os.path.isfile(real):
            return False
        for root in (self.directory, *self.extra_roots):
            top = os.path.realpath(root)
            if real.startswith(top.rstrip(os.sep) + os.sep):
                return True
        return False

    def list_directory(self, path):  # type: ignore[no-untyped-def]
        self.send_error(404, "File not found")
        return None

    def end_headers(self) -> None:
        # no-cache = "may store, must revalidate": a rebuilt site is never served stale,
        # and an unchanged file costs a 304 (Last-Modified / If-Modified-Since).
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Content-Type-Options", "nosniff")
        super().end_headers()

    def log_message(self, format: str, *args) -> None:
        if self.request_log is not None:
            self.request_log.append(self.path)
        if not self.quiet:
            super().log_message(format, *args)


def make_server(directory: Path = SITE, port: int = 0, quiet: bool = False, request_log: list | None = None):
    """A ThreadingHTTPServer for ``directory`` on 127.0.0.1 (port 0 picks a free port)."""
    handler = type(
        "BoundSiteHandler",
        (SiteHandler,),
        {"quiet": quiet, "request_log": request_log},
    )
    handler = functools.partial(handler, directory=str(directory))
    return http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)


def serve(port: int) -> None:
    try:
        server = make_server(SITE, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise SystemExit(
                f"build.py serve: port {port} on 127.0.0.1 is already in use (another server?).\n"
                f"Choose another port: python build.py serve --port {port + 1}   (--port 0 picks a free one)"
            ) from None
        reason = exc.strerror or exc
        raise SystemExit(f"build.py serve: cannot listen on 127.0.0.1:{port}: {reason}") from None
    if not (SITE / "pyodide-lock.json").exists():
        build()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    print(f"serving {SITE} at {url}  (dashboard: {url}dashboard.html?local=demo_jobs.py)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("build", help="assemble site/ (default)")
    serve_cmd = sub.add_parser("serve", help="serve site/ on 127.0.0.1")
    serve_cmd.add_argument(
        "--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)"
    )
    sub.add_parser("test-site", help="assemble build/test-site/ (site/ + test-only wheels) for tests/pyodide")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.port)
    elif args.command == "test-site":
        build_test_site()
    else:
        build()


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
