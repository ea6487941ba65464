"""The command line, run as ``python -m durably_web`` subprocesses on a real SQLite file.

A jobs module is written into the test's directory, which is the subprocesses'
working directory: that is how ``module:attribute`` APPs are found in real use.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest

JOBS_MODULE = """
import asyncio

from pydantic import BaseModel

from durably_web import Durably, define_job


class Greet(BaseModel):
    name: str


class Count(BaseModel):
    n: int


@define_job("greet", input=Greet)
async def greet(step, payload: Greet) -> dict:
    hello = await step.run("hello", lambda: f"hello {payload.name}", type=str)
    step.progress(1, 2, "said hello")
    step.log.info("greeted", {"name": payload.name})
    await step.run("pause", asyncio.sleep, 0.02)
    step.progress(2, 2, "done")
    return {"greeting": hello}


@define_job("boom")
async def boom(step, payload) -> None:
    await step.run("ok", lambda: 1, type=int)
    raise RuntimeError("boom went the job")


@define_job("steady", input=Count)
async def steady(step, payload: Count) -> int:
    for i in range(payload.n):
        await step.run(f"tick-{i}", asyncio.sleep, 0.15)
        step.progress(i + 1, payload.n, f"tick {i}")
        step.log.info(f"tick {i} done")
    return payload.n


class Echo(BaseModel):
    text: str
    fail: bool = False


@define_job("echo", input=Echo)
async def echo(step, payload: Echo) -> dict:
    said = await step.run(f"say {payload.text}", lambda: payload.text, type=str)
    step.progress(1, 2, payload.text)
    step.log.info(payload.text, {"text": payload.text})
    if payload.fail:
        raise RuntimeError(payload.text)
    return {"echo": said}


OPTIONS = dict(polling_interval=0.05, lease_duration=5.0, lease_renew_interval=0.2, shutdown_timeout=5.0)
durably = Durably("sqlite:///app.db", jobs=[greet, boom, steady, echo], **OPTIONS)


def make_durably():
    return durably


not_durably = 42
unreachable = Durably("sqlite:////nonexistent-dir/deeper/app.db", jobs=[greet])
fresh = Durably("sqlite:///fresh.db", jobs=[greet])
"""

TENANCY_MODULE = """
from durably_web.asgi import HTTPException


class HeaderAuth:
    def authenticate(self, request):
        if request.headers.get("x-token") != "let-me-in":
            raise HTTPException(401, "token required")
        return "ok"


auth = HeaderAuth()
"""

APP = "clijobs:durably"
DB = "sqlite:///app.db"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "clijobs.py").write_text(JOBS_MODULE)
    (tmp_path / "tenancy.py").write_text(TENANCY_MODULE)
    return tmp_path


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "durably_web", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


@pytest.fixture
def cli(workdir: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    def run(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            _command(*args), cwd=workdir, capture_output=True, text=True, timeout=timeout, env=_env()
        )

    return run


class Background:
    """A CLI process whose combined output goes to a file the test can poll."""

    def __init__(self, workdir: Path, name: str, *args: str) -> None:
        self.log = workdir / f"{name}.log"
        self._handle = self.log.open("w")
        self.process = subprocess.Popen(
            _command(*args), cwd=workdir, stdout=self._handle, stderr=subprocess.STDOUT, env=_env()
        )

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.output())
            if match:
                return match
            if self.process.poll() is not None:
                raise AssertionError(f"process exited ({self.process.returncode}):\n{self.output()}")
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not seen within {timeout}s:\n{self.output()}")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self._handle.close()


@pytest.fixture
def background(workdir: Path) -> Iterator[Callable[..., Background]]:
    started: list[Background] = []

    def start(name: str, *args: str) -> Background:
        process = Background(workdir, name, *args)
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()


# --- argument and environment errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate", APP],
        ["runs"],
        ["runs", "no-colon-here"],
        ["runs", "missing_module:durably"],
        ["runs", "clijobs:nothing_here"],
        ["runs", "clijobs:not_durably"],
        ["runs", "sqlite://not-a-valid-url"],
        ["runs", APP, "--limit", "many"],
        ["trigger", APP, "greet", "--input", "{not json"],
        ["trigger", APP, "greet", "--input", '{"name": 5}'],
        ["trigger", APP, "greet", "--label", "no-equals-sign"],
        ["trigger", DB, "greet", "--input", '{"name": "x"}'],
        ["worker", DB],
        ["purge", APP],
        ["purge", APP, "--older-than", "30 fortnights"],
        ["watch", APP, "01ANY", "--interval", "0"],
        ["serve", APP, "--port", "70000"],
        ["serve", APP, "--port", "http"],
    ],
)
def test_bad_arguments_exit_2(cli: Callable[..., subprocess.CompletedProcess[str]], args: list[str]) -> None:
    result = cli(*args)
    assert result.returncode == 2, result
    assert "error" in result.stderr
    assert result.stdout == ""


def test_commands_that_need_the_jobs_say_what_to_pass(
    cli: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    for command in (["trigger", DB, "greet"], ["worker", DB]):
        result = cli(*command)
        assert result.returncode == 2
        assert "module:attribute" in result.stderr and f"{command[0]} myapp:durably" in result.stderr


def test_valid_trigger_after_rejected_input_created_nothing(
    cli: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    assert cli("trigger", APP, "greet", "--input", '{"name": 5}').returncode == 2
    listed = cli("runs", APP, "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == []


def test_unreachable_database_exits_1(
    cli: Callable[..., subprocess.CompletedProcess[str]], workdir: Path
) -> None:
    missing = cli("runs", "sqlite:///missing.db")
    assert missing.returncode == 1 and "database file not found" in missing.stderr
    assert not (workdir / "missing.db").exists()

    no_directory = cli("runs", "clijobs:unreachable")
    assert no_directory.returncode == 1 and "cannot open the database" in no_directory.stderr

    (workdir / "junk.db").write_bytes(b"this is not a SQLite database, just bytes" * 100)
    junk = cli("runs", "sqlite:///junk.db")
    assert junk.returncode == 1 and "cannot open the database" in junk.stderr


# --- management commands (no worker anywhere) ----------------------------------------------------------


def test_trigger_list_show_cancel_retrigger_delete_purge(
    cli: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    first = cli(
        "trigger",
        APP,
        "greet",
        "--input",
        '{"name": "ada"}',
        "--label",
        "team=red",
        "--idempotency-key",
        "k1",
    )
    assert first.returncode == 0, first.stderr
    run_id = first.stdout.strip()
    assert re.fullmatch(r"[0-9A-Z]{26}", run_id) and "created" in first.stderr

    same = cli("trigger", APP, "greet", "--input", '{"name": "ada"}', "--idempotency-key", "k1")
    assert same.stdout.strip() == run_id and "idempotent" in same.stderr

    keyed = cli("trigger", APP, "greet", "--input", '{"name": "bo"}', "--concurrency-key", "c", "--json")
    assert keyed.returncode == 0
    keyed_run = json.loads(keyed.stdout)
    assert keyed_run["status"] == "pending" and keyed_run["concurrency_key"] == "c"
    clash = cli("trigger", APP, "greet", "--input", '{"name": "bo"}', "--concurrency-key", "c")
    assert clash.returncode == 1 and "already pending" in clash.stderr
    coalesced = cli(
        "trigger", APP, "greet", "--input", '{"name": "bo"}', "--concurrency-key", "c", "--coalesce"
    )
    assert coalesced.returncode == 0 and coalesced.stdout.strip() == keyed_run["id"]
    assert "coalesced" in coalesced.stderr

    table = cli("runs", DB)
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    header = lines[0]
    assert header.split() == ["ID", "JOB", "STATUS", "PROGRESS", "CREATED", "LABELS"]
    assert [line.split()[0] for line in lines[1:]] == [keyed_run["id"], run_id]
    for line in lines[1:]:
        assert line[header.index("STATUS") :].startswith("pending")
        assert line[header.index("JOB") :].startswith("greet")
    assert "team=red" in lines[2]

    by_label = cli("runs", DB, "--label", "team=red")
    assert [line.split()[0] for line in by_label.stdout.splitlines()[1:]] == [run_id]
    none = cli("runs", DB, "--status", "completed,failed")
    assert none.returncode == 0 and none.stdout == "" and "no runs match" in none.stderr
    by_job = cli("runs", APP, "--job", "greet", "--limit", "1", "--json")
    assert [run["id"] for run in json.loads(by_job.stdout)] == [keyed_run["id"]]

    shown = cli("show", DB, run_id)
    assert shown.returncode == 0
    assert re.search(r"^status\s+pending$", shown.stdout, re.MULTILINE)
    assert '"name": "ada"' in shown.stdout and "team=red" in shown.stdout and "k1" in shown.stdout
    assert json.loads(cli("show", DB, run_id, "--json").stdout)["run"]["id"] == run_id

    cancelled = cli("cancel", DB, run_id)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    assert cli("cancel", DB, run_id).returncode == 0  # cancelling twice is harmless
    assert re.search(r"^status\s+cancelled$", cli("show", DB, run_id).stdout, re.MULTILINE)

    again = cli("retrigger", APP, run_id)
    assert again.returncode == 0
    new_id = again.stdout.strip()
    assert new_id != run_id
    new_run = json.loads(cli("show", DB, new_id, "--json").stdout)["run"]
    assert new_run["input"] == {"name": "ada"} and new_run["labels"] == {"team": "red"}
    # As the README shows it: from the database URL alone (the stored input is reused).
    from_url = cli("retrigger", DB, run_id)
    assert from_url.returncode == 0, from_url.stderr
    url_run = json.loads(cli("show", DB, from_url.stdout.strip(), "--json").stdout)["run"]
    assert url_run["input"] == {"name": "ada"} and url_run["labels"] == {"team": "red"}
    assert url_run["status"] == "pending" and url_run["id"] not in (run_id, new_id)
    assert cli("delete", DB, url_run["id"]).returncode == 0

    deleted = cli("delete", DB, new_id)
    assert deleted.returncode == 0 and "deleted" in deleted.stdout
    for command in ("show", "cancel", "delete"):
        gone = cli(command, DB, new_id)
        assert gone.returncode == 1 and "not found" in gone.stderr
    assert cli("retrigger", APP, new_id).returncode == 1
    assert cli("retrigger", DB, new_id).returncode == 1

    kept = cli("purge", DB, "--older-than", "30d")
    assert kept.returncode == 0 and "purged 0 run(s)" in kept.stdout
    purged = cli("purge", DB, "--older-than", "0s")
    assert purged.returncode == 0 and "purged 1 run(s)" in purged.stdout
    remaining = json.loads(cli("runs", DB, "--json").stdout)
    assert [run["id"] for run in remaining] == [keyed_run["id"]]


# --- worker, watch, serve --------------------------------------------------------------------------------


def test_worker_executes_runs_triggered_elsewhere_and_stops_on_sigint(
    cli: Callable[..., subprocess.CompletedProcess[str]], background: Callable[..., Background]
) -> None:
    worker = background("worker", "worker", APP)
    worker.wait_for(r"worker started")

    done = cli("trigger", APP, "greet", "--input", '{"name": "ada"}', "--wait", "--timeout", "60")
    assert done.returncode == 0, done.stderr
    run_id = done.stdout.splitlines()[0]
    assert "completed" in done.stdout and '"greeting": "hello ada"' in done.stdout

    shown = cli("show", APP, run_id)
    assert re.search(r"^status\s+completed$", shown.stdout, re.MULTILINE)
    assert re.search(r"^0\s+hello\s+completed\s+\d+(\.\d+)? (ms|s)$", shown.stdout, re.MULTILINE)
    assert re.search(r"^1\s+pause\s+completed\s+\d+(\.\d+)? (ms|s)$", shown.stdout, re.MULTILINE)
    assert "INFO    greeted" in shown.stdout and '"greeting": "hello ada"' in shown.stdout

    failed = cli("trigger", APP, "boom", "--wait", "--timeout", "60")
    assert failed.returncode == 1
    assert "failed: RuntimeError: boom went the job" in failed.stdout and "Traceback" in failed.stdout
    failed_id = failed.stdout.splitlines()[0]
    failed_show = cli("show", DB, failed_id)
    assert "error: RuntimeError: boom went the job" in failed_show.stdout
    assert "Traceback (most recent call last)" in failed_show.stdout
    assert re.search(r"^0\s+ok\s+completed", failed_show.stdout, re.MULTILINE)
    watched_failure = cli("watch", DB, failed_id)
    assert watched_failure.returncode == 1 and "failed" in watched_failure.stdout

    worker.wait_for(rf"run {run_id} \(greet\) completed")
    # A run retriggered from the database URL alone is executed like any other.
    again = cli("retrigger", DB, run_id)
    assert again.returncode == 0, again.stderr
    rerun = cli("watch", DB, again.stdout.strip(), "--interval", "0.05")
    assert rerun.returncode == 0 and '"greeting": "hello ada"' in rerun.stdout
    assert worker.stop(signal.SIGINT) == 0
    assert "stopping gracefully" in worker.output() and "worker stopped" in worker.output()


def test_watch_follows_a_run_executed_by_another_process(
    cli: Callable[..., subprocess.CompletedProcess[str]], background: Callable[..., Background]
) -> None:
    run_id = cli("trigger", APP, "steady", "--input", '{"n": 4}').stdout.strip()
    watcher = background("watch", "watch", DB, run_id, "--interval", "0.05")
    watcher.wait_for(rf"watching run {run_id} of steady \(pending\)")
    worker = background("worker", "worker", APP)
    assert watcher.process.wait(timeout=90) == 0
    output = watcher.output()
    assert re.search(r"\[#+\.*\] 1/4 +25% tick 0", output)
    assert "[" + "#" * 30 + "] 4/4 100% tick 3" in output
    assert [line.split()[-2] for line in output.splitlines() if line.startswith("INFO")] == [
        "0",
        "1",
        "2",
        "3",
    ]
    assert "completed; output:\n4" in output
    assert worker.stop(signal.SIGTERM) == 0

    finished = cli("watch", DB, run_id)
    assert finished.returncode == 0 and "completed" in finished.stdout
    assert cli("watch", DB, "01NOSUCHRUN").returncode == 1


def _served_url(process: Background) -> str:
    return process.wait_for(r"serving \S+ at (http://\S+)/ \(dashboard").group(1)


def test_serve_binds_loopback_without_auth_and_runs_jobs(background: Callable[..., Background]) -> None:
    server = background("serve", "serve", APP, "--port", "0")
    url = _served_url(server)
    assert url.startswith("http://127.0.0.1:")
    assert "no auth hook" in server.output() and "bound to 127.0.0.1 only" in server.output()
    with httpx.Client(base_url=url, timeout=20) as http:
        assert http.get("/health").json()["jobs"] == ["boom", "echo", "greet", "steady"]
        created = http.post("/trigger", json={"job": "greet", "input": {"name": "web"}})
        assert created.status_code == 201
        run_id = created.json()["id"]
        deadline = time.monotonic() + 60
        while http.get(f"/runs/{run_id}").json()["status"] != "completed":
            assert time.monotonic() < deadline, "run did not complete"
            time.sleep(0.05)
        assert http.get(f"/runs/{run_id}").json()["output"] == {"greeting": "hello web"}
        assert http.get("/openapi.json").status_code == 200
    assert server.stop(signal.SIGINT) == 0
    assert "stopped" in server.output()


def test_serve_with_an_auth_hook_and_a_prefix(background: Callable[..., Background]) -> None:
    server = background(
        "serve", "serve", APP, "--auth", "tenancy:auth", "--prefix", "/api/durably", "--port", "0"
    )
    url = _served_url(server)
    # An auth hook does not expose the server: still loopback unless --host says otherwise.
    assert url.startswith("http://127.0.0.1:") and url.endswith("/api/durably")
    assert "auth hook tenancy:auth" in server.output() and "bound to 127.0.0.1 only" in server.output()
    port = url.split(":")[2].split("/")[0]
    base = f"http://127.0.0.1:{port}/api/durably"
    with httpx.Client(base_url=base, timeout=20) as http:
        assert http.get("/runs").status_code == 401
        allowed = http.get("/runs", headers={"x-token": "let-me-in"})
        assert allowed.status_code == 200 and allowed.json()["runs"] == []
        assert http.get("/health").status_code == 200
    assert server.stop(signal.SIGTERM) == 0


def test_serve_reports_a_busy_port(background: Callable[..., Background]) -> None:
    first = background("serve-1", "serve", APP, "--port", "0")
    port = _served_url(first).rsplit(":", 1)[1]
    second = background("serve-2", "serve", DB, "--port", port)
    assert second.process.wait(timeout=60) == 1
    output = second.output()
    assert f"cannot listen on 127.0.0.1:{port}: port {port} is already in use" in output
    assert "--port N" in output and "Traceback" not in output and "OSError" not in output
    assert first.stop(signal.SIGINT) == 0


def test_serve_a_database_url_without_a_worker(
    cli: Callable[..., subprocess.CompletedProcess[str]], background: Callable[..., Background]
) -> None:
    run_id = cli("trigger", APP, "greet", "--input", '{"name": "x"}').stdout.strip()
    server = background("serve", "serve", DB, "--port", "0")
    url = _served_url(server)
    assert "no worker (database URL)" in server.output()
    with httpx.Client(base_url=url, timeout=20) as http:
        assert http.get(f"/runs/{run_id}").json()["status"] == "pending"
        assert http.post(f"/runs/{run_id}/cancel", json={}).json()["status"] == "cancelled"
    assert server.stop(signal.SIGINT) == 0


def test_app_may_come_from_the_durably_app_environment_variable(workdir: Path) -> None:
    def run(*args: str, app: str | None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in _env().items() if k != "DURABLY_APP"}
        if app is not None:
            env["DURABLY_APP"] = app
        return subprocess.run(
            _command(*args), cwd=workdir, capture_output=True, text=True, timeout=90, env=env
        )

    triggered = run("trigger", "greet", "--input", '{"name": "env"}', app=APP)
    assert triggered.returncode == 0, triggered.stderr
    run_id = triggered.stdout.strip()
    shown = run("show", run_id, app=DB)
    assert shown.returncode == 0, shown.stderr
    assert run_id in shown.stdout and "greet" in shown.stdout
    assert run_id in run("runs", app=DB).stdout
    # An explicit APP still wins over the variable.
    assert run("show", DB, run_id, app="nowhere:nothing").returncode == 0
    missing = run("show", run_id, app=None)
    assert missing.returncode == 2 and "DURABLY_APP" in missing.stderr


def test_purge_takes_the_duration_forms_the_http_api_takes(
    cli: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    run_id = cli("trigger", APP, "greet", "--input", '{"name": "old"}').stdout.strip()
    assert cli("cancel", DB, run_id).returncode == 0
    for text in ("1.5h", "90m", "12h", "30d", "3600", " 2D "):
        kept = cli("purge", DB, "--older-than", text)
        assert kept.returncode == 0 and "purged 0 run(s)" in kept.stdout, (text, kept.stderr)
    for bad in ("-1d", "1e3", "1.5 weeks", "h"):
        refused = cli("purge", DB, f"--older-than={bad}")
        assert refused.returncode == 2 and "invalid duration" in refused.stderr, bad
    helped = cli("purge", "--help")
    assert all(form in helped.stdout for form in ("90s", "15m", "12h", "30d", "1.5h"))
    purged = cli("purge", DB, "--older-than", "0.0s")
    assert purged.returncode == 0 and "purged 1 run(s)" in purged.stdout


# --- stored text is escaped on the terminal ------------------------------------------------------------

#: An OSC 52 clipboard write, a screen clear, a C1 CSI, a bidi override, DEL, a bell, CR and a newline.
NASTY = "\x1b]52;c;aGFja2Vk\x07 \x1b[2J\x9b31m \u202eevil\u202c \x7f\rfake\nline"
RAW_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _assert_escaped(result: subprocess.CompletedProcess[str] | str, *, visible: bool = True) -> None:
    for name, text in (
        [("stdout", result.stdout), ("stderr", result.stderr)]
        if isinstance(result, subprocess.CompletedProcess)
        else [("output", result)]
    ):
        raw = RAW_CONTROLS.search(text)
        assert raw is None, f"raw {raw.group()!r} in {name}: {text!r}"
    if visible:
        combined = result if isinstance(result, str) else result.stdout + result.stderr
        assert "\\x1b]52;c;aGFja2Vk\\x07" in combined or "\\u001b]52;c;aGFja2Vk\\u0007" in combined


def test_control_characters_in_stored_data_are_escaped_everywhere(
    cli: Callable[..., subprocess.CompletedProcess[str]], background: Callable[..., Background]
) -> None:
    label = f"note={NASTY}"
    pending = cli("trigger", APP, "echo", "--input", json.dumps({"text": NASTY}), "--label", label)
    assert pending.returncode == 0, pending.stderr
    pending_id = pending.stdout.strip()
    table = cli("runs", DB)
    _assert_escaped(table)
    assert len(table.stdout.splitlines()) == 2  # the newline in the label did not start a row
    shown_label = r"note=\x1b]52;c;aGFja2Vk\x07 \x1b[2J\x9b31m \u202eevil\u202c \x7f\rfake\nline"
    assert shown_label in table.stdout
    _assert_escaped(cli("show", DB, pending_id))

    worker = background("worker", "worker", APP)
    worker.wait_for("worker started")
    failed = cli(
        "trigger",
        APP,
        "echo",
        "--input",
        json.dumps({"text": NASTY, "fail": True}),
        "--label",
        label,
        "--wait",
        "--timeout",
        "60",
    )
    assert failed.returncode == 1, failed.stderr
    _assert_escaped(failed)
    failed_id = failed.stdout.splitlines()[0]
    done = cli("trigger", APP, "echo", "--input", json.dumps({"text": NASTY}), "--wait", "--timeout", "60")
    assert done.returncode == 0, done.stderr
    _assert_escaped(done)
    worker.wait_for(rf"run {failed_id} \(echo\) failed")

    for run_id in (pending_id, failed_id, done.stdout.splitlines()[0]):
        shown = cli("show", DB, run_id)
        assert shown.returncode == 0
        _assert_escaped(shown)
        _assert_escaped(cli("watch", DB, run_id, "--interval", "0.05"), visible=run_id != pending_id)
    shown_failed = cli("show", DB, failed_id).stdout
    assert "say \\x1b]52" in shown_failed and "INFO    \\x1b]52" in shown_failed
    assert "error: RuntimeError: \\x1b]52" in shown_failed and "Traceback" in shown_failed

    # JSON stays valid JSON with the very same strings in it, and just as safe.
    listed = cli("runs", DB, "--json")
    _assert_escaped(listed)
    assert {run["labels"]["note"] for run in json.loads(listed.stdout) if run["labels"]} == {NASTY}
    shown_json = cli("show", DB, failed_id, "--json")
    _assert_escaped(shown_json)
    document = json.loads(shown_json.stdout)
    assert document["run"]["input"]["text"] == NASTY and document["run"]["error"]["message"] == NASTY
    assert document["steps"][0]["name"] == f"say {NASTY}" and document["logs"][0]["message"] == NASTY
    assert document["logs"][0]["data"] == {"text": NASTY}

    # ids and other arguments echoed in error messages
    _assert_escaped(cli("show", DB, NASTY), visible=False)
    _assert_escaped(cli("runs", DB, "--label", label), visible=False)
    unrecognized = cli("runs", DB, NASTY)  # argparse echoes what it does not understand
    assert unrecognized.returncode == 2 and "unrecognized arguments" in unrecognized.stderr
    _assert_escaped(unrecognized)

    assert worker.stop(signal.SIGINT) == 0
    _assert_escaped(worker.output())


# --- the commands that only look never write -------------------------------------------------------------

READ_ONLY_COMMANDS = (("runs",), ("runs", "--json"), ("show", "01NOSUCHRUN"), ("watch", "01NOSUCHRUN"))


def _fingerprint(workdir: Path, name: str) -> tuple[str, list[str]]:
    """The file's SHA-256 and the directory listing (a -wal/-shm/-journal file appearing shows)."""
    return hashlib.sha256((workdir / name).read_bytes()).hexdigest(), sorted(
        path.name for path in workdir.iterdir() if path.name.startswith(name)
    )


def _journal_mode(path: Path) -> str:
    conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    try:
        return str(conn.execute("PRAGMA journal_mode").fetchone()[0])
    finally:
        conn.close()


def test_read_only_commands_leave_a_durably_database_untouched(
    cli: Callable[..., subprocess.CompletedProcess[str]], workdir: Path
) -> None:
    run_id = cli("trigger", APP, "greet", "--input", '{"name": "ro"}').stdout.strip()
    # A database in rollback-journal mode: the old read path switched it to WAL.
    conn = sqlite3.connect(workdir / "app.db")
    assert conn.execute("PRAGMA journal_mode = DELETE").fetchone()[0] == "delete"
    conn.close()
    before = _fingerprint(workdir, "app.db")
    for app in (DB, APP):
        for command in (*READ_ONLY_COMMANDS, ("show", run_id), ("show", run_id, "--json")):
            result = cli(command[0], app, *command[1:])
            assert result.returncode in (0, 1), result
            assert _fingerprint(workdir, "app.db") == before, (app, command)
    assert run_id in cli("runs", DB).stdout
    assert _journal_mode(workdir / "app.db") == "delete"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"this is not a SQLite database, just bytes" * 100, "not a durably-web database"),
        ("unrelated", "not a durably-web database"),
        ("empty", "not a durably-web database"),
        ("older", "durably-web migrate sqlite:///other.db"),
    ],
)
def test_read_only_commands_refuse_other_files_and_change_nothing(
    cli: Callable[..., subprocess.CompletedProcess[str]], workdir: Path, content: bytes | str, message: str
) -> None:
    target = workdir / "other.db"
    if isinstance(content, bytes):
        target.write_bytes(content)
    elif content == "empty":
        target.write_bytes(b"")  # SQLite reads a zero-byte file as an empty database
    else:
        conn = sqlite3.connect(target)
        if content == "unrelated":
            conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
            conn.execute("INSERT INTO invoices (total) VALUES (9.5)")
        else:  # a durably-web database whose schema is older than this version's
            conn.execute("CREATE TABLE durably_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER)")
        conn.commit()
        conn.close()
    before = _fingerprint(workdir, "other.db")
    for command in READ_ONLY_COMMANDS:
        result = cli(command[0], "sqlite:///other.db", *command[1:])
        assert result.returncode == 1, result
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert result.stdout == ""
        assert _fingerprint(workdir, "other.db") == before, command
    if content == "older":
        migrated = cli("migrate", "sqlite:///other.db")
        assert migrated.returncode == 0, migrated.stderr
        assert "up to date" in migrated.stdout
        listed = cli("runs", "sqlite:///other.db", "--json")
        assert listed.returncode == 0 and json.loads(listed.stdout) == []


def test_writing_commands_on_a_url_do_not_take_over_another_database(
    cli: Callable[..., subprocess.CompletedProcess[str]], workdir: Path
) -> None:
    conn = sqlite3.connect(workdir / "other.db")
    conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    conn.commit()
    conn.close()
    before = _fingerprint(workdir, "other.db")
    for command in (
        ["cancel", "01ANY"],
        ["retrigger", "01ANY"],
        ["delete", "01ANY"],
        ["purge", "--older-than", "0"],
        ["serve", "--port", "0"],
    ):
        result = cli(command[0], "sqlite:///other.db", *command[1:])
        assert result.returncode == 1, result
        assert "not a durably-web database" in result.stderr and "nothing was written" in result.stderr
        assert _fingerprint(workdir, "other.db") == before, command
    assert _journal_mode(workdir / "other.db") == "delete"


def test_read_only_commands_do_not_create_a_missing_database(
    cli: Callable[..., subprocess.CompletedProcess[str]], workdir: Path
) -> None:
    for app in ("clijobs:fresh", "sqlite:///fresh.db"):
        for command in READ_ONLY_COMMANDS:
            result = cli(command[0], app, *command[1:])
            assert result.returncode == 1, result
            assert "Traceback" not in result.stderr
            assert not any(path.name.startswith("fresh.db") for path in workdir.iterdir()), (app, command)
    memory = cli("runs", "sqlite://:memory:")
    assert memory.returncode == 2 and "cannot be opened read-only" in memory.stderr


# --- serve: what it binds, which Host names and origins it answers -------------------------------------


def test_serve_on_all_interfaces_answers_only_the_names_it_is_told(
    background: Callable[..., Background],
) -> None:
    server = background(
        "serve",
        "serve",
        APP,
        "--auth",
        "tenancy:auth",
        "--host",
        "0.0.0.0",
        "--port",
        "0",
        "--allowed-host",
        "jobs.example.test",
        "--allowed-origin",
        "https://app.example.test",
    )
    url = _served_url(server)
    output = server.output()
    assert url.startswith("http://0.0.0.0:")
    assert "bound to all interfaces (0.0.0.0)" in output and "jobs.example.test" in output
    assert "--allowed-host NAME" in output and "https://app.example.test" in output
    port = url.rsplit(":", 1)[1]
    token = {"x-token": "let-me-in"}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20) as http:
        assert http.get("/runs", headers=token).status_code == 200
        assert http.get("/runs", headers={**token, "Host": "jobs.example.test"}).status_code == 200
        assert http.get("/runs", headers={**token, "Host": "rebound.example"}).status_code == 421
        cors = http.get("/runs", headers={**token, "Origin": "https://app.example.test"})
        assert cors.status_code == 200
        assert cors.headers["access-control-allow-origin"] == "https://app.example.test"
        assert http.get("/runs", headers={**token, "Origin": "https://evil.example"}).status_code == 403
    assert server.stop(signal.SIGINT) == 0


def test_serve_adds_the_bound_name_to_the_allowed_hosts() -> None:
    from durably_web.cli import serve_allowed_hosts

    assert serve_allowed_hosts("127.0.0.1", []) == []
    assert serve_allowed_hosts("localhost", ["a.example"]) == ["a.example"]
    assert serve_allowed_hosts("myhost.lan", []) == ["myhost.lan"]
    assert serve_allowed_hosts("myhost.lan", ["myhost.lan", "b.example"]) == ["myhost.lan", "b.example"]
    assert serve_allowed_hosts("0.0.0.0", ["c.example"]) == ["c.example"]
    assert serve_allowed_hosts("::", []) == []
    assert serve_allowed_hosts("fe80::1", []) == ["[fe80::1]"]


@pytest.mark.parametrize("flag", [["--allowed-origin", "*"], ["--allowed-host", "http://x.example/path"]])
def test_serve_refuses_malformed_allowed_names_before_listening(
    cli: Callable[..., subprocess.CompletedProcess[str]], flag: list[str]
) -> None:
    result = cli("serve", APP, "--port", "0", *flag)
    assert result.returncode == 2 and "error" in result.stderr and "Traceback" not in result.stderr
    assert "serving" not in result.stderr


# --- a graceful stop hands running runs back ------------------------------------------------------------


def _wait_for_progress(
    cli: Callable[..., subprocess.CompletedProcess[str]], run_id: str, at_least: int
) -> None:
    deadline = time.monotonic() + 60
    while True:
        run = json.loads(cli("show", DB, run_id, "--json").stdout)["run"]
        if run["progress"] and run["progress"]["current"] >= at_least:
            return
        assert time.monotonic() < deadline, run
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("command", "sig"),
    [(["worker"], signal.SIGINT), (["worker"], signal.SIGTERM), (["serve", "--port", "0"], signal.SIGINT)],
)
def test_a_stopped_worker_hands_its_run_back_and_show_says_so(
    cli: Callable[..., subprocess.CompletedProcess[str]],
    background: Callable[..., Background],
    command: list[str],
    sig: int,
) -> None:
    run_id = cli("trigger", APP, "steady", "--input", '{"n": 60}').stdout.strip()
    fresh = cli("show", DB, run_id)
    assert re.search(r"^state\s+waiting for a worker$", fresh.stdout, re.MULTILINE)
    worker = background("worker", command[0], APP, *command[1:])
    worker.wait_for(rf"run {run_id} \(steady\) started")
    _wait_for_progress(cli, run_id, 1)
    running = cli("show", DB, run_id).stdout
    assert re.search(r"^status\s+leased$", running, re.MULTILINE)
    assert re.search(r"^state\s+running on a worker \(attempt 1\)", running, re.MULTILINE)

    assert worker.stop(sig, timeout=30) == 0
    output = worker.output()
    assert "stopping gracefully" in output and "stopped" in output
    assert f"handing back 1 run(s) in progress: {run_id} (steady)" in output
    shown = cli("show", DB, run_id).stdout
    assert re.search(r"^status\s+pending$", shown, re.MULTILINE), shown
    assert re.search(r"^state\s+waiting for a worker to resume it \(attempt 1 stopped", shown, re.MULTILINE)
    table = cli("runs", DB, "--status", "pending").stdout
    assert run_id in table and "leased" not in table


def test_server_log_lines_are_escaped_too() -> None:
    import io
    import logging

    from durably_web.cli import _escape_log_handlers

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("durably-test.escaping")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        _escape_log_handlers("durably-test.escaping")
        _escape_log_handlers("durably-test.escaping")  # wrapping twice changes nothing
        logger.error("request for %s", "\x1b]52;c;aGk=\x07\u202e")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == "ERROR request for \\x1b]52;c;aGk=\\x07\\u202e\n"


def test_a_worker_whose_terminal_went_away_still_stops_on_sigint(workdir: Path) -> None:
    process = subprocess.Popen(
        _command("worker", APP),
        cwd=workdir,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None and process.stdout is not None
        while "worker started" not in process.stderr.readline():
            assert process.poll() is None, "worker exited"
        process.stderr.close()  # writing the "stopping gracefully" line now fails
        process.stdout.close()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) in (0, 130)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def test_trigger_run_timeout_and_runs_by_version(
    cli: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    made = cli("trigger", APP, "greet", "--input", '{"name": "ada"}', "--run-timeout", "10m", "--json")
    assert made.returncode == 0, made.stderr
    run = json.loads(made.stdout)
    created = datetime.fromisoformat(run["created_at"])
    assert datetime.fromisoformat(run["deadline_at"]) - created == timedelta(minutes=10)
    version = run["version"]
    assert re.fullmatch(r"[0-9a-f]{12}", version)  # greet has no version=: its code's hash
    bad = cli("trigger", APP, "greet", "--input", '{"name": "x"}', "--run-timeout", "soon")
    assert bad.returncode == 2 and "--run-timeout" in bad.stderr
    shown = cli("show", DB, run["id"])
    assert re.search(r"^deadline\s+\S", shown.stdout, re.MULTILINE), shown.stdout
    assert re.search(rf"^version\s+{version}$", shown.stdout, re.MULTILINE), shown.stdout
    listed = cli("runs", DB, "--version", version, "--status", "pending,leased,waiting", "--json")
    assert [r["id"] for r in json.loads(listed.stdout)] == [run["id"]]
    other = cli("runs", DB, "--version", "no-such-version")
    assert other.returncode == 0 and "no runs match" in other.stderr


FLOW_MODULE = """
from durably_web import Durably, define_job


@define_job("settle", debounce=600)
async def settle(step, payload):
    return payload


@define_job("plain")
async def plain(step, payload):
    return payload


durably = Durably("sqlite:///flow.db", jobs=[settle, plain], polling_interval=0.05)
"""


def test_trigger_priority_and_debounce_and_what_show_prints(
    workdir: Path, cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    (workdir / "flowjobs.py").write_text(FLOW_MODULE)
    app = "flowjobs:durably"
    urgent = cli("trigger", app, "plain", "--input", '"now"', "--priority", "7", "--json")
    assert urgent.returncode == 0, urgent.stderr
    assert json.loads(urgent.stdout)["priority"] == 7
    shown = cli("show", app, json.loads(urgent.stdout)["id"])
    assert re.search(r"^priority\s+7$", shown.stdout, re.MULTILINE), shown.stdout
    plain = cli("trigger", app, "plain", "--input", '"later"')
    assert "priority" not in cli("show", app, plain.stdout.strip()).stdout  # 0 is not worth a line
    bad = cli("trigger", app, "plain", "--priority", "high")
    assert bad.returncode == 2

    first = cli("trigger", app, "settle", "--input", '{"v": 1}', "--concurrency-key", "doc:1")
    assert first.returncode == 0 and "created" in first.stderr, first.stderr
    second = cli("trigger", app, "settle", "--input", '{"v": 2}', "--concurrency-key", "doc:1")
    assert second.returncode == 0 and "debounced" in second.stderr, second.stderr
    assert second.stdout.strip() == first.stdout.strip()
    details = cli("show", app, first.stdout.strip())
    assert re.search(r"^not before\s+\S", details.stdout, re.MULTILINE), details.stdout
    assert '"v": 2' in details.stdout and '"v": 1' not in details.stdout  # the latest input won
    keyless = cli("trigger", app, "settle", "--input", "1")
    assert keyless.returncode != 0 and "concurrency_key" in keyless.stderr
