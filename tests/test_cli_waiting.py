"""The command line for durable waiting: ``signal``, ``resume``, ``fork``, and what ``show``
and ``runs`` say about waiting runs, retried steps and forks, on a real SQLite file.

Commands given APP as ``module:attribute`` run as ``python -m durably_web`` subprocesses in
the test's directory, as in ``tests/test_cli.py`` (that is how the module is found); those
given the database URL run in this process (``build_parser`` + ``run_command``, the code
``main`` runs, output captured), which keeps the file fast. The runs they act on are executed
by a ``durably-web worker`` subprocess or, where a test checks which steps executed, by a
worker in this process on the same file: the jobs module written into the test's directory
is imported here too, so its call log is this process's.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from helpers import FAST, wait_until

from durably_web import Durably
from durably_web.cli import build_parser, run_command

# Every control sequence a terminal acts on, as in tests/test_cli.py.
NASTY = "\x1b]52;c;aGFja2Vk\x07 \x1b[2J\x9b31m \u202eevil\u202c \x7f\rfake\nline"
HOSTILE_SIGNAL = "ok\x1b[2J\u202e"
# What must never reach the terminal raw (newline and tab may: output has several lines).
RAW_CONTROL = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)

JOBS_MODULE = f'''
from pathlib import Path

from pydantic import BaseModel

from durably_web import Durably, RetryPolicy, define_job

NASTY = {NASTY!r}
HOSTILE_SIGNAL = {HOSTILE_SIGNAL!r}


class Approval(BaseModel):
    by: str


class Order(BaseModel):
    item: str


CALLS: list[str] = []  # every step function call, in this process
FAIL: set[str] = set()  # step names that raise


def call(name):
    CALLS.append(name)
    if name in FAIL:
        raise RuntimeError(f"{{name}} failed")
    return name


@define_job("approve", signals={{"approval": Approval}})
async def approve(step, payload):
    await step.run("prepare", call, "prepare")
    approval = await step.wait_for_signal("approval", type=Approval)
    go = await step.wait_for_signal("go")
    await step.run("finish", call, "finish")
    return {{"by": approval.by, "go": go}}


@define_job("pipeline", input=Order)
async def pipeline(step, payload: Order):
    for name in ("fetch", "charge", "notify"):
        await step.run(name, call, name)
    return payload.item


FLAKY = {{"n": 0}}


def flaky_fetch():
    FLAKY["n"] += 1
    if FLAKY["n"] < 3:
        raise OSError(f"{{NASTY}} #{{FLAKY['n']}}")
    return FLAKY["n"]


@define_job("flaky")
async def flaky(step, payload):
    n = await step.run("fetch", flaky_fetch, retry=RetryPolicy(max_attempts=3, initial_delay=0.01), type=int)
    await step.sleep("nap", 3600)
    return n


def unreachable():
    raise OSError("connection refused")


@define_job("patient")
async def patient(step, payload):
    await step.run("fetch", unreachable, retry=RetryPolicy(max_attempts=2, initial_delay=3600))


@define_job("hostile")
async def hostile(step, payload):
    return await step.wait_for_signal(HOSTILE_SIGNAL)


def refused():
    raise ConnectionError("Failed to fetch")


# Offline (a Durably given a NetworkStatus that says so): "upload" is not attempted, and
# "sync"'s network error waits for the network instead of failing (one attempt allowed).
@define_job("uploader")
async def uploader(step, payload):
    await step.run("upload", call, "upload", needs_network=True)


@define_job("syncer", retry=RetryPolicy(max_attempts=1))
async def syncer(step, payload):
    await step.run("sync", refused)


JOBS = [approve, pipeline, flaky, patient, hostile, uploader, syncer]
OPTIONS = dict(polling_interval=0.02, lease_duration=5.0, lease_renew_interval=0.2, shutdown_timeout=5.0)
durably = Durably(f"sqlite:///{{Path(__file__).with_name('app.db')}}", jobs=JOBS, **OPTIONS)
'''

APP = "waitjobs:durably"
UNKNOWN_RUN = "01ARZ3NDEKTSV4RRFFQ69G5FAV"

Result = subprocess.CompletedProcess[str]


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "durably_web", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


@dataclass
class Env:
    workdir: Path
    db: str  # the database URL (absolute path)
    jobs: ModuleType  # the jobs module, imported in this process
    started: list[Durably]

    async def cli(self, *args: str) -> Result:
        """One command in this process, on this event loop (a worker here keeps executing)."""
        assert APP not in args, "module:attribute APPs run in a subprocess: use process()"
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = await run_command(build_parser().parse_args(args))
            except SystemExit as exc:  # argparse: --help, or a usage error
                code = exc.code if isinstance(exc.code, int) else 2
        return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())

    async def process(self, *args: str) -> Result:
        """One ``python -m durably_web`` process in the test's directory, without blocking
        the event loop."""
        return await asyncio.to_thread(
            subprocess.run, _command(*args), cwd=self.workdir, capture_output=True, text=True,
            timeout=60, env=_env(),
        )

    async def durably(self, *, worker: bool = True, **options: Any) -> Durably:
        """A ``Durably`` on the same file in this process, stopped at teardown."""
        durably = Durably(self.db, jobs=self.jobs.JOBS, worker=worker, **{**FAST, **options})
        await durably.init()
        self.started.append(durably)
        return durably


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    (tmp_path / "waitjobs.py").write_text(JOBS_MODULE)
    name = f"waitjobs_{os.getpid()}_{id(tmp_path)}"
    spec = importlib.util.spec_from_file_location(name, tmp_path / "waitjobs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        state = Env(tmp_path, f"sqlite:///{tmp_path / 'app.db'}", module, [])
        yield state
        for durably in reversed(state.started):
            await durably.stop()
    finally:
        del sys.modules[name]


class Worker:
    """A ``durably-web worker`` process whose combined output goes to a file the test polls."""

    def __init__(self, workdir: Path) -> None:
        self.log = workdir / "worker.log"
        self._handle = self.log.open("w")
        self.process = subprocess.Popen(
            _command("worker", APP), cwd=workdir, stdout=self._handle, stderr=subprocess.STDOUT, env=_env()
        )

    def output(self) -> str:
        return self.log.read_text()

    async def wait_for(self, pattern: str, timeout: float = 30) -> None:
        def seen() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited ({self.process.returncode}):\n{self.output()}")
            return re.search(pattern, self.output()) is not None

        try:
            await wait_until(seen, timeout=timeout, interval=0.02)
        except AssertionError as exc:
            raise AssertionError(f"{pattern!r} not seen: {exc}\n{self.output()}") from None

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self._handle.close()


@pytest.fixture
def worker_process(env: Env) -> Iterator[Callable[[], Worker]]:
    started: list[Worker] = []

    def start() -> Worker:
        started.append(Worker(env.workdir))
        return started[-1]

    yield start
    for worker in started:
        worker.close()


def _field(shown: str, name: str) -> str:
    """The value of one ``name  value`` line of ``show``."""
    match = re.search(rf"^{re.escape(name)}\s{{2,}}(.*)$", shown, re.MULTILINE)
    assert match, f"no {name!r} line in:\n{shown}"
    return match.group(1)


def _assert_terminal_safe(result: Result) -> None:
    for stream in (result.stdout, result.stderr):
        assert RAW_CONTROL.search(stream) is None, stream


async def _waiting(durably: Durably, run_id: str, step: str) -> None:
    async def at_step() -> bool:
        run = await durably.get_run(run_id)
        assert run.status not in ("completed", "failed", "cancelled"), run
        return run.status == "waiting" and run.wait_step == step

    await wait_until(at_step, timeout=15)


# --- signal ---------------------------------------------------------------------------------------------


async def test_a_signal_sent_with_the_cli_continues_a_run_in_a_worker_process(
    env: Env, worker_process: Callable[[], Worker]
) -> None:
    worker = worker_process()
    await worker.wait_for("worker started")
    triggered = await env.process("trigger", APP, "approve")
    assert triggered.returncode == 0, triggered.stderr
    run_id = triggered.stdout.strip()
    await worker.wait_for(rf"run {run_id} \(approve\) waiting: signal at step 'approval', no timeout")
    # Another run, triggered here, still waits when the worker stops: it holds no lease to hand back.
    client = await env.durably(worker=False)
    other = await client.trigger("approve", None)
    await worker.wait_for(rf"run {other.id} \(approve\) waiting: signal at step 'approval'")

    listed = await env.cli("runs", env.db, "--status", "waiting")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["ID", "JOB", "STATUS", "WAKES", "PROGRESS", "CREATED", "LABELS"]
    assert [row.split()[0] for row in rows] == [other.id, run_id]
    assert rows[0][header.index("STATUS"):].startswith("waiting")
    assert rows[0][header.index("WAKES"):].startswith("on signal")

    shown = (await env.cli("show", env.db, run_id)).stdout
    assert _field(shown, "status") == "waiting"
    assert _field(shown, "wait reason") == "signal" and _field(shown, "wait step") == "approval"
    assert _field(shown, "wake at").startswith("- (no timeout")
    assert f"durably-web signal APP {run_id} approval --payload JSON" in _field(shown, "state")

    for payload in ("{by: ana}", "", "nul"):
        not_json = await env.cli("signal", env.db, run_id, "approval", "--payload", payload)
        assert not_json.returncode == 2 and "error: --payload is not valid JSON" in not_json.stderr
        assert not_json.stdout == ""
    # The job declares the signal's type: with APP as module:attribute it is checked here.
    refused = await env.process("signal", APP, run_id, "approval", "--payload", '{"who": "ana"}')
    assert refused.returncode == 2 and "invalid payload for signal 'approval'" in refused.stderr
    assert "by" in refused.stderr and refused.stdout == ""
    unknown = await env.cli("signal", env.db, UNKNOWN_RUN, "approval", "--payload", '{"by": "ana"}')
    assert unknown.returncode == 1 and f"run {UNKNOWN_RUN!r} not found" in unknown.stderr

    sent = await env.process(
        "signal", APP, run_id, "approval", "--payload", '{"by": "ana"}', "--signal-id", "m1"
    )
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout == f"run {run_id}: signal 'approval' delivered\n"
    assert "not checked" not in sent.stderr  # the job declares the type: checked here
    await worker.wait_for(rf"run {run_id} \(approve\) waiting: signal at step 'go'")

    # With the default payload (null), to a signal the job declares no type for.
    go = await env.process("signal", APP, run_id, "go")
    assert go.returncode == 0, go.stderr
    assert go.stdout == f"run {run_id}: signal 'go' delivered\n"
    assert (
        "the payload was not checked here (job 'approve' declares no type for 'go' in "
        "define_job(signals=...))"
    ) in go.stderr
    await worker.wait_for(rf"run {run_id} \(approve\) completed")

    done = json.loads((await env.cli("show", env.db, run_id, "--json")).stdout)
    assert done["run"]["status"] == "completed" and done["run"]["output"] == {"by": "ana", "go": None}
    assert [(s["name"], s["kind"]) for s in done["steps"]] == [
        ("prepare", "run"), ("approval", "signal"), ("go", "signal"), ("finish", "run")
    ]
    assert done["steps"][1]["output"] == {"payload": {"by": "ana"}}  # the refused one was never stored

    finished = await env.cli("signal", env.db, run_id, "go", "--signal-id", "m1")
    assert finished.returncode == 1 and "is completed; it takes no more signals" in finished.stderr
    worker.process.send_signal(signal.SIGINT)
    assert worker.process.wait(timeout=30) == 0
    assert "worker stopped" in worker.output() and "handing back" not in worker.output()
    assert (await client.get_run(other.id)).status == "waiting"


async def test_signals_sent_before_the_wait_are_kept_and_a_signal_id_counts_once(env: Env) -> None:
    client = await env.durably(worker=False)
    run = await client.trigger("approve", None)
    # A database URL cannot check the type: a refused payload is stored, and the wait drops it.
    wrong = await env.cli("signal", env.db, run.id, "approval", "--payload", '{"who": "x"}')
    assert wrong.returncode == 0 and wrong.stdout == f"run {run.id}: signal 'approval' stored\n"
    assert "the payload was not checked here (a database URL knows no signal types)" in wrong.stderr
    stored = await env.cli(
        "signal", env.db, run.id, "approval", "--payload", '{"by": "ana"}', "--signal-id", "s1"
    )
    assert stored.returncode == 0, stored.stderr
    assert stored.stdout == f"run {run.id}: signal 'approval' stored\n"
    assert "the run is not waiting for 'approval' now" in stored.stderr
    again = await env.cli(
        "signal", env.db, run.id, "approval", "--payload", '{"by": "bo"}', "--signal-id", "s1"
    )
    assert again.returncode == 0 and again.stdout == f"run {run.id}: signal 'approval' duplicate\n"
    assert "signal id 's1' was sent to this run before: nothing changed" in again.stderr
    assert "not checked" not in again.stderr
    assert (await env.cli("signal", env.db, run.id, "go", "--payload", "[1, 2]")).returncode == 0

    with sqlite3.connect(env.workdir / "app.db") as conn:
        kept = conn.execute("SELECT name, signal_id, payload FROM durably_signals ORDER BY id").fetchall()
    conn.close()
    assert kept == [
        ("approval", None, '{"who":"x"}'), ("approval", "s1", '{"by":"ana"}'), ("go", None, "[1,2]")
    ]

    await env.durably()  # a worker: the run takes the kept signals without waiting
    done = await client.wait_for_run(run.id, timeout=30)
    assert done.status == "completed" and done.output == {"by": "ana", "go": [1, 2]}
    assert env.jobs.CALLS == ["prepare", "finish"]
    assert any(log.level == "warning" for log in await client.get_logs(run.id))


# --- show: retries, sleeps, escaping ----------------------------------------------------------------------


async def test_show_lists_the_attempts_of_retried_steps_and_the_wait(env: Env) -> None:
    durably = await env.durably()
    flaky = await durably.trigger("flaky", None)
    patient = await durably.trigger("patient", None)
    await _waiting(durably, flaky.id, "nap")
    await _waiting(durably, patient.id, "fetch")

    shown = await env.cli("show", env.db, flaky.id)
    assert shown.returncode == 0, shown.stderr
    _assert_terminal_safe(shown)
    out = shown.stdout
    assert _field(out, "wait reason") == "sleep" and _field(out, "wait step") == "nap"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(in (59\.\d|60\.0) min\)", _field(out, "wake at"))
    assert _field(out, "state").startswith("sleeping at step 'nap'; any worker continues it at ")
    assert re.search(r"^#\s+STEP\s+STATUS\s+DURATION\s+KIND$", out, re.MULTILINE)
    assert re.search(r"^0\s+fetch\s+completed\s+\S+ ms\s+run, 3 attempts$", out, re.MULTILINE)
    # A sleep is recorded when it starts, completing at its due time: its duration is its length.
    assert re.search(r"^1\s+nap\s+completed\s+60\.0 min\s+sleep, until \d{4}-", out, re.MULTILINE)
    attempts = out.split("attempts of retried steps (3):\n")[1].splitlines()[:3]
    escaped = r"\x1b]52;c;aGFja2Vk\x07 \x1b[2J\x9b31m \u202eevil\u202c \x7f\rfake\nline"
    for number, line in enumerate(attempts[:2], start=1):
        assert f" attempt {number} of step 'fetch' failed after " in line
        assert line.endswith(f": OSError: {escaped} #{number}")
    assert " attempt 3 of step 'fetch' completed after " in attempts[2] and ": " not in attempts[2][20:]

    # --json keeps the exact strings (still valid JSON, and still safe on a terminal).
    as_json = await env.cli("show", env.db, flaky.id, "--json")
    _assert_terminal_safe(as_json)
    data = json.loads(as_json.stdout)
    assert [(a["attempt"], a["status"]) for a in data["attempts"]] == [
        (1, "failed"), (2, "failed"), (3, "completed")
    ]
    assert data["attempts"][0]["error"]["message"] == f"{NASTY} #1"
    assert data["run"]["wait_reason"] == "sleep" and data["run"]["wait_step"] == "nap"

    retrying = (await env.cli("show", env.db, patient.id)).stdout
    assert _field(retrying, "wait reason") == "retry" and _field(retrying, "wait step") == "fetch"
    assert _field(retrying, "state").startswith("waiting to retry step 'fetch' (attempts below)")
    assert "steps (0):" in retrying  # the failed attempt is no step yet, but it is listed:
    assert re.search(
        r"^attempts of retried steps \(1\):\n\S+ \S+ attempt 1 of step 'fetch' failed after \S+ ms: "
        r"OSError: connection refused$", retrying, re.MULTILINE
    )

    listed = (await env.cli("runs", env.db, "--status", "waiting")).stdout
    header, *rows = listed.splitlines()
    wakes = {row.split()[0]: row[header.index("WAKES"):header.index("PROGRESS")].strip() for row in rows}
    assert set(wakes) == {flaky.id, patient.id}
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(sleep\)", wakes[flaky.id])
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(retry\)", wakes[patient.id])


class Offline:
    """A NetworkStatus that is always offline (``ConnectionError`` is its network error)."""

    def online(self) -> bool:
        return False

    def is_network_error(self, exc: BaseException) -> bool:
        return isinstance(exc, ConnectionError)

    def watch(self, on_online: Callable[[], None]) -> Callable[[], None]:
        return lambda: None


async def test_show_and_runs_say_a_run_waits_for_the_network(env: Env) -> None:
    durably = await env.durably(network=Offline(), offline_recheck_interval=3600)
    uploader = await durably.trigger("uploader", None)
    syncer = await durably.trigger("syncer", None)
    await _waiting(durably, uploader.id, "upload")
    await _waiting(durably, syncer.id, "sync")
    assert "upload" not in env.jobs.CALLS  # needs_network: not attempted offline

    out = (await env.cli("show", env.db, uploader.id)).stdout
    assert _field(out, "wait reason") == "offline" and _field(out, "wait step") == "upload"
    assert _field(out, "state").startswith(
        "waiting for the network at step 'upload' (the browser was offline; no retry was used up); "
        "it continues when the browser is back online, checked again at "
    )
    out = (await env.cli("show", env.db, syncer.id)).stdout
    assert re.search(
        r"^attempts of retried steps \(1\):\n\S+ \S+ attempt 1 of step 'sync' failed offline "
        r"\(no retry used up\) after \S+ ms: ConnectionError: Failed to fetch$",
        out,
        re.MULTILINE,
    ), out
    data = json.loads((await env.cli("show", env.db, syncer.id, "--json")).stdout)
    assert [(a["attempt"], a["status"], a["offline"]) for a in data["attempts"]] == [(1, "failed", True)]

    listed = (await env.cli("runs", env.db, "--status", "waiting")).stdout
    header, *rows = listed.splitlines()
    wakes = {row.split()[0]: row[header.index("WAKES"):header.index("PROGRESS")].strip() for row in rows}
    assert set(wakes) == {uploader.id, syncer.id}
    for wake in wakes.values():
        assert re.fullmatch(r"when online, or check \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", wake), wake


async def test_hostile_signal_names_and_step_text_cannot_drive_the_terminal(env: Env) -> None:
    durably = await env.durably()
    run = await durably.trigger("hostile", None)
    await _waiting(durably, run.id, HOSTILE_SIGNAL)
    shown = await env.cli("show", env.db, run.id)
    _assert_terminal_safe(shown)
    assert _field(shown.stdout, "wait step") == r"ok\x1b[2J\u202e"
    assert r"signal APP " + run.id + r" 'ok\x1b[2J\u202e' --payload JSON" in _field(shown.stdout, "state")
    listed = await env.cli("runs", env.db)
    _assert_terminal_safe(listed)

    sent = await env.cli("signal", env.db, run.id, HOSTILE_SIGNAL, "--payload", json.dumps(NASTY))
    assert sent.returncode == 0, sent.stderr
    _assert_terminal_safe(sent)
    assert sent.stdout == f"run {run.id}: signal 'ok\\x1b[2J\\u202e' delivered\n"
    done = await durably.wait_for_run(run.id, timeout=30)
    assert done.status == "completed" and done.output == NASTY
    after = await env.cli("show", env.db, run.id)
    _assert_terminal_safe(after)
    row = r"^0\s+ok\\x1b\[2J\\u202e\s+completed\s+\S+ ms\s+signal, received \"\\u001b\]52;c;aGFja2Vk\\u0007 "
    assert re.search(row, after.stdout, re.MULTILINE), after.stdout


# --- resume and fork ----------------------------------------------------------------------------------------


async def test_resume_continues_a_failed_run_without_repeating_its_completed_steps(env: Env) -> None:
    durably = await env.durably()
    env.jobs.FAIL.add("charge")
    run = await durably.trigger("pipeline", {"item": "book"})
    failed = await durably.wait_for_run(run.id, timeout=30)
    assert failed.status == "failed" and env.jobs.CALLS == ["fetch", "charge"]
    env.jobs.FAIL.clear()  # the outage is over

    resumed = await env.cli("resume", env.db, run.id)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout == f"run {run.id}: pending\n"
    assert f"run {run.id} of pipeline resumed (it was failed)" in resumed.stderr
    done = await durably.wait_for_run(run.id, timeout=30)
    assert done.status == "completed" and done.output == "book"
    assert env.jobs.CALLS == ["fetch", "charge", "charge", "notify"]  # "fetch" replayed, not executed

    shown = (await env.cli("show", env.db, run.id)).stdout
    assert re.search(r"^0\s+fetch\s+completed\s+\S+ ms\s+run$", shown, re.MULTILINE)
    assert re.search(r"^1\s+charge\s+completed\s+\S+ ms\s+run, 2 attempts$", shown, re.MULTILINE)
    failure = r" attempt 1 of step 'charge' failed after \S+ ms: RuntimeError: charge failed$"
    assert re.search(failure, shown, re.MULTILINE), shown
    assert re.search(r" attempt 2 of step 'charge' completed after \S+ ms$", shown, re.M)

    again = await env.process("resume", APP, run.id)
    assert again.returncode == 1
    assert "is completed; only a failed or cancelled run can be resumed" in again.stderr
    assert again.stdout == ""
    unknown = await env.cli("resume", env.db, UNKNOWN_RUN)
    assert unknown.returncode == 1 and "not found" in unknown.stderr


async def test_fork_from_a_step_copies_the_steps_before_it(env: Env) -> None:
    durably = await env.durably()
    source = await durably.trigger("pipeline", {"item": "lamp"}, labels={"team": "red"})
    assert (await durably.wait_for_run(source.id, timeout=30)).status == "completed"
    env.jobs.CALLS.clear()

    forked = await env.process("fork", APP, source.id, "--from-step", "charge")
    assert forked.returncode == 0, forked.stderr
    new_id = forked.stdout.strip()
    assert re.fullmatch(r"[0-9A-Z]{26}", new_id) and new_id != source.id
    assert (
        f"run {new_id} of pipeline: created, forked from {source.id} at step 'charge'; "
        "1 completed step(s) copied ('fetch'), the rest runs again"
    ) in forked.stderr
    done = await durably.wait_for_run(new_id, timeout=30)
    assert done.status == "completed" and done.output == "lamp" and done.labels == {"team": "red"}
    assert env.jobs.CALLS == ["charge", "notify"]  # "fetch" was copied and replayed

    shown = (await env.cli("show", env.db, new_id)).stdout
    assert _field(shown, "forked from") == source.id
    table = shown.split("steps (3):\n")[1].splitlines()
    assert table[0].split() == ["#", "STEP", "STATUS", "DURATION"]  # plain steps: no KIND column
    assert [line.split()[1] for line in table[1:4]] == [
        "fetch", "charge", "notify"
    ]

    from_url = await env.cli("fork", env.db, source.id, "--from-step", "fetch")
    assert from_url.returncode == 0, from_url.stderr
    assert "0 completed step(s) copied, the rest runs again" in from_url.stderr
    assert (await durably.get_run(from_url.stdout.strip())).forked_from == source.id
    no_step = await env.cli("fork", env.db, source.id, "--from-step", "nope")
    assert no_step.returncode == 1 and "has no recorded step 'nope'" in no_step.stderr
    missing = await env.cli("fork", env.db, source.id)
    assert missing.returncode == 2 and "--from-step" in missing.stderr
    assert len(await durably.get_runs(job_name="pipeline")) == 3  # neither failure created a run


async def test_the_waiting_commands_write_but_never_take_over_another_database(env: Env) -> None:
    other = env.workdir / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    conn.close()
    before = other.read_bytes()
    for command in (
        ["signal", UNKNOWN_RUN, "go"], ["resume", UNKNOWN_RUN], ["fork", UNKNOWN_RUN, "--from-step", "a"]
    ):
        result = await env.cli(command[0], f"sqlite:///{other}", *command[1:])
        assert result.returncode == 1, result
        assert "not a durably-web database" in result.stderr and "nothing was written" in result.stderr
        assert other.read_bytes() == before and not other.with_name("other.db-wal").exists()

    # On a durably-web database, though, they are writes: not opened read-only.
    client = await env.durably(worker=False)
    run = await client.trigger("approve", None)
    assert (await env.cli("signal", env.db, run.id, "go")).returncode == 0
    assert (await env.cli("cancel", env.db, run.id)).returncode == 0
    resumed = await env.cli("resume", env.db, run.id)
    assert resumed.returncode == 0 and "(it was cancelled)" in resumed.stderr, resumed.stderr
    assert (await client.get_run(run.id)).status == "pending"


async def test_the_help_names_the_three_commands(env: Env) -> None:
    result = await env.cli("--help")
    assert result.returncode == 0
    for name in ("signal", "resume", "fork"):
        assert re.search(rf"^\s+{name}\s+\S", result.stdout, re.MULTILINE), result.stdout
    usage = await env.cli("signal", "--help")
    assert "[--payload JSON] [--signal-id ID]" in usage.stdout and "RUN_ID NAME" in usage.stdout
