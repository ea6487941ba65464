"""Mutation check: break the engine on purpose, one way at a time, and make sure the
tests that claim to catch that break really fail.

    python benchmarks/mutants.py [--only NAME ...] [--keep] [--timeout S]

Each mutant is one entry of :data:`MUTANTS`: a name, a file, the exact text to
replace, its replacement, and the command that must fail once the text is
replaced. For every mutant the script copies the repository's ``durably_web/``,
``tests/``, ``benchmarks/`` and ``pyproject.toml`` (plus the top-level folder of
the mutated file, e.g. ``static/``, and what the entry's ``also_copy`` names) into
a fresh temporary directory, applies
the one replacement there and runs the command in that copy with ``PYTHONPATH``
pointing at it. The real source tree is never written to.

First every distinct command runs on an unmutated copy and must pass (a test
that fails anyway proves nothing). Then it prints a table (mutant, file,
command, result, seconds) and exits 1 if any mutant's text is not found exactly
once (the code drifted: update the entry), the baseline fails, or a mutant is
MISSED. Torture commands get a fixed seed (``DURABLY_TORTURE_SEED``, default
1) so a miss can be replayed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("durably_web", "tests", "benchmarks", "pyproject.toml")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache", ".ruff_cache")
PY = "{python}"  # replaced by this interpreter


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    command: tuple[str, ...]  # run in the copy's root; must fail once mutated
    also_copy: tuple[str, ...] = ()  # more top-level paths the command needs (e.g. the built site/)


# The short single-worker torture: its drain lets a slow run outlive its lease, runs of one
# concurrency key are triggered while another is leased, and kills interrupt steps in flight.
TORTURE = (PY, "benchmarks/torture.py", "--kills", "3", "--two-process-kills", "0")

MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        name="leases not renewed",
        file="durably_web/storage/sqlite/queries.sql",
        old="UPDATE durably_runs SET lease_expires_at = :lease_until\n",
        new="UPDATE durably_runs SET lease_expires_at = lease_expires_at\n",
        command=TORTURE,
    ),
    Mutant(
        name="fencing removed from step writes",
        file="durably_web/storage/sqlite/queries.sql",
        old=(
            "SELECT :run_id, :seq, :name, :status, :output, :error, :started_at, :completed_at, :kind, "
            ":attempt\n"
            "WHERE EXISTS (\n"
            "    SELECT 1 FROM durably_runs\n"
            "    WHERE id = :run_id AND status = 'leased' AND lease_generation = :generation)"
        ),
        new=(
            "SELECT :run_id, :seq, :name, :status, :output, :error, :started_at, :completed_at, :kind, "
            ":attempt\n"
            "WHERE EXISTS (\n"
            "    SELECT 1 FROM durably_runs\n"
            "    WHERE id = :run_id AND status = 'leased')"
        ),
        command=(
            PY,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_storage.py::test_store_writes_are_fenced_by_lease_generation",
        ),
    ),
    Mutant(
        name="completed step re-executed on resume",
        file="durably_web/step.py",
        old="            return decode(recorded.output_json, tp)\n",
        new=(
            "            await self._call(fn, args, kwargs)\n"
            "            return decode(recorded.output_json, tp)\n"
        ),
        command=TORTURE,
    ),
    Mutant(
        name="a step runs twice in one execution",
        file="durably_web/step.py",
        old="            value = await self._call(fn, args, kwargs)\n",
        new=(
            "            await self._call(fn, args, kwargs)\n"
            "            value = await self._call(fn, args, kwargs)\n"
        ),
        command=(PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/torture/test_model.py"),
    ),
    Mutant(
        # The browser runtime: a tab that does not get the Web Lock leads anyway, so two
        # tabs' workers run the same database. The test serves the built site/, so the
        # mutated worker.js is copied over site/worker.js (build.py copies it verbatim).
        name="two tabs' workers both allowed to run (leader lock skipped)",
        file="static/worker.js",
        old="  if (!(await request({ ifAvailable: true }))) {\n",
        new="  if (!(await request({ ifAvailable: true })) && false) {\n",
        command=(
            "sh",
            "-c",
            'cp static/worker.js site/worker.js && DURABLY_SKIP_SITE_BUILD=1 exec "$PYTHON" -m pytest -q '
            "-p no:cacheprovider tests/browser/test_runtime.py::test_two_tabs_one_leader_and_handover",
        ),
        also_copy=("static", "site", "build.py", "web", "index.html", "browser-wheels.json"),
    ),
    Mutant(
        # Durable waiting: a retry's backoff is the persisted wake-up time, not "now".
        name="retry backoff not persisted (the run is due at once)",
        file="durably_web/storage/sqlite/queries.sql",
        old="        THEN :now ELSE :until END,\n",
        new="        THEN :now ELSE :now END,\n",
        command=(
            PY,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_retries.py::test_the_backoff_is_the_persisted_wake_up_time_not_an_in_memory_sleep",
        ),
    ),
    # Durable waiting, caught by the crash torture's checker (tests/torture/harness.py).
    Mutant(
        name="a waiting run is claimed before its wake-up time",
        file="durably_web/storage/sqlite/queries.sql",
        old="WHERE ((r.status IN ('pending', 'waiting') AND r.available_at <= :now)\n",
        new=(
            "WHERE ((r.status IN ('pending', 'waiting') "
            "AND (r.available_at <= :now OR r.status = 'waiting'))\n"
        ),
        command=TORTURE,
    ),
    Mutant(
        name="a sleep's duration read as tenths of a second",
        file="durably_web/step.py",
        old="await self._sleep(name, lambda now: now + int(seconds * 1000))\n",
        new="await self._sleep(name, lambda now: now + int(seconds * 100))\n",
        command=TORTURE,
    ),
    Mutant(
        name="a consumed signal is not marked consumed",
        file="durably_web/storage/sqlite/queries.sql",
        old="UPDATE durably_signals SET consumed_at = :now WHERE id = :id AND consumed_at IS NULL\n",
        new="UPDATE durably_signals SET consumed_at = NULL WHERE id = :id AND consumed_at IS NULL\n",
        command=TORTURE,
    ),
    Mutant(
        name="a signal_id is deduplicated across runs, not per run",
        file="durably_web/storage/sqlite/queries.sql",
        old="SELECT id FROM durably_signals WHERE run_id = :run_id AND signal_id = :signal_id\n",
        new="SELECT id FROM durably_signals WHERE signal_id = :signal_id\n",
        command=TORTURE,
    ),
    Mutant(
        name="concurrency-key check removed from claiming",
        file="durably_web/storage/sqlite/queries.sql",
        old="  AND (r.concurrency_key IS NULL OR NOT EXISTS (\n",
        new="  AND (1 OR NOT EXISTS (\n",
        command=TORTURE,
    ),
    # Runs started at once (created leased by trigger_and_wait on an idle worker), caught by
    # the torture's checks of the workers' own calls (harness.check_at_once).
    Mutant(
        name="a run started at once is created leased but not executed",
        file="durably_web/engine.py",
        old="                self._start(record, self.now_ms())\n",
        new="                pass\n",
        command=TORTURE,
    ),
    Mutant(
        name="a run created leased loses its label rows",
        file="durably_web/storage/sqlite/store.py",
        old=(
            '                conn.execute(Q["insert_labels"], '
            '{"run_id": new.id, "labels": params["labels"]})\n'
        ),
        new="                pass\n",
        command=TORTURE,
    ),
)


def make_copy(base: Path, mutant: Mutant) -> Path:
    copy = Path(tempfile.mkdtemp(prefix="durably-mutant-", dir=base))
    for name in dict.fromkeys((*COPIED, mutant.file.split("/")[0], *mutant.also_copy)):
        source = ROOT / name
        if not source.exists():
            raise SystemExit(f"mutant {mutant.name!r} needs {source}, which does not exist (make site?)")
        if source.is_dir():
            shutil.copytree(source, copy / name, ignore=IGNORED)
        else:
            shutil.copy2(source, copy / name)
    return copy


def environment(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("DURABLY_TORTURE_SEED", "1")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHON"] = sys.executable  # for shell commands
    return env


def command_line(command: tuple[str, ...]) -> list[str]:
    return [sys.executable if part == PY else part for part in command]


def shown(command: tuple[str, ...]) -> str:
    return " ".join("python" if part == PY else part for part in command)


def check_imports_from(copy: Path) -> None:
    """The copy, not the editable install of the real tree, must be what gets imported."""
    out = subprocess.run(
        [sys.executable, "-c", "import durably_web; print(durably_web.__file__)"],
        cwd=copy,
        env=environment(copy),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(out).resolve().is_relative_to(copy.resolve()):
        raise SystemExit(f"durably_web is imported from {out}, not from the copy {copy}: fix PYTHONPATH")


def run(command: tuple[str, ...], copy: Path, timeout: float) -> tuple[int | None, float, str]:
    """Exit code (None: timed out), seconds, and the output's tail."""
    began = time.monotonic()
    try:
        done = subprocess.run(
            command_line(command),
            cwd=copy,
            env=environment(copy),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or ""
        if isinstance(out, bytes):
            out = out.decode(errors="replace")
        return None, time.monotonic() - began, out[-2000:]
    return done.returncode, time.monotonic() - began, (done.stdout + done.stderr)[-6000:]


def first_failure(output: str) -> str:
    """The line of a failed command's output that says why (for the log, not the verdict)."""
    for marker in ("VIOLATION", "FAILED", "Error", "assert"):
        for line in output.splitlines():
            if marker in line:
                return line.strip()[:200]
    return output.strip().splitlines()[-1][:200] if output.strip() else "(no output)"


def table(rows: list[tuple[str, str, str, str, str]]) -> str:
    headers = ("mutant", "file", "command", "result", "seconds")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="*", default=None, help="run only the mutants with these names")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per command (default 300)")
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if args.only is None or m.name in args.only]
    if args.only and len(mutants) != len(args.only):
        known = ", ".join(repr(m.name) for m in MUTANTS)
        raise SystemExit(f"unknown mutant name in {args.only}; known: {known}")

    failed = False
    base = Path(tempfile.mkdtemp(prefix="durably-mutants-"))
    try:
        # The code must still contain every mutant's text, exactly once.
        for mutant in mutants:
            count = (ROOT / mutant.file).read_text().count(mutant.old)
            if count != 1:
                print(
                    f"DRIFTED: mutant {mutant.name!r}: its text occurs {count} times in {mutant.file} "
                    "(expected once); update the entry in benchmarks/mutants.py",
                    file=sys.stderr,
                )
                failed = True
        if failed:
            return 1

        # Every command passes on the unmutated tree.
        for command in dict.fromkeys(m.command for m in mutants):
            copy = make_copy(base, next(m for m in mutants if m.command == command))
            check_imports_from(copy)
            code, seconds, tail = run(command, copy, args.timeout)
            print(f"baseline  {shown(command)}: exit {code} in {seconds:.1f} s", file=sys.stderr, flush=True)
            if code != 0:
                print(f"BASELINE FAILED: {shown(command)} fails without any mutant:\n{tail}", file=sys.stderr)
                return 1
            if not args.keep:
                shutil.rmtree(copy, ignore_errors=True)

        rows: list[tuple[str, str, str, str, str]] = []
        for mutant in mutants:
            copy = make_copy(base, mutant)
            target = copy / mutant.file
            target.write_text(target.read_text().replace(mutant.old, mutant.new, 1))
            code, seconds, tail = run(mutant.command, copy, args.timeout)
            if code is None:
                result = "caught (timeout)"
            elif code != 0:
                result = "caught"
            else:
                result = "MISSED"
                failed = True
                print(f"MISSED {mutant.name!r}; the command's output ended:\n{tail}", file=sys.stderr)
            print(f"mutant    {mutant.name}: {result} in {seconds:.1f} s", file=sys.stderr, flush=True)
            if code:
                print(f"          first failure: {first_failure(tail)}", file=sys.stderr, flush=True)
            rows.append((mutant.name, mutant.file, shown(mutant.command), result, f"{seconds:.1f}"))
            if not args.keep:
                shutil.rmtree(copy, ignore_errors=True)
        print(table(rows))
        print(f"mutants: {len(rows)}, missed: {sum(1 for r in rows if r[3] == 'MISSED')}")
    finally:
        if args.keep:
            print(f"copies kept in {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
