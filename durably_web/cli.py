"""The ``durably-web`` command (also ``python -m durably_web``).

APP is either ``module:attribute`` naming a ``Durably`` instance (or a function
returning one), imported with the current directory on ``sys.path``, or a
database URL such as ``sqlite:///app.db``. A URL gives management commands only:
without the job module there is nothing to execute and no input model to
validate a trigger against.

Commands: ``worker``, ``serve``, ``trigger`` (these three need the job module),
``runs``, ``show``, ``watch``, ``cancel``, ``retrigger``, ``delete``, ``purge``,
``migrate``, and for durable waiting ``signal`` (send a run a signal), ``resume``
(continue a failed or cancelled run after its last completed step) and ``fork``
(a new run from a step on).

``runs``, ``show`` and ``watch`` open the database read-only: they never write,
migrate or create it; the other commands write. Everything printed from the
database is escaped (:mod:`durably_web.display`), so stored text cannot drive
the terminal.

Exit codes: 0 success, 1 the operation failed (unknown run, conflict,
unreachable database, a watched run that did not complete), 2 bad arguments
(including an APP that cannot be imported and input a job rejects).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import functools
import importlib
import json
import logging
import os
import shlex
import signal
import socket
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, NoReturn, TextIO

from .display import printable, printable_json
from .durably import Durably
from .durations import DURATION_FORMS, parse_duration
from .errors import (
    ConflictError,
    DurablyError,
    NotFoundError,
    SchemaVersionError,
    ValidationError,
    WaitTimeoutError,
)
from .models import Run, Step, StepAttempt, from_ms, to_jsonable
from .storage import open_store

PROG = "durably-web"
EXIT_FAILURE = 1
EXIT_USAGE = 2


class CliError(Exception):
    """A failure to report as one line on stderr with an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


# Output: stored data (labels, inputs, logs, step names, errors) is escaped where it is put into a
# line (``_p``, one line; ``_json`` for JSON), and every line is escaped again on its way out
# (``_out``, ``_say``, ``_log_line``; harmless, escapes are printable): no terminal control
# sequence from a database or a job reaches the terminal.

_p = printable


def _out(text: str = "", *, end: str = "\n", file: TextIO | None = None, flush: bool = False) -> None:
    print(printable(text, multiline=True), end=end, file=file or sys.stdout, flush=flush)


def _say(message: str) -> None:
    """A status line on stderr, so stdout stays clean for ids and tables."""
    _out(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _log_line(message: str) -> None:
    _out(f"{datetime.now().strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


class _PrintableFormatter(logging.Formatter):
    """Log records (a worker error quoting a job's exception) escaped like everything else.

    Wraps another formatter (``inner``, e.g. uvicorn's) or formats as ``logging.Formatter``.
    """

    def __init__(self, fmt: str | None = None, inner: logging.Formatter | None = None) -> None:
        super().__init__(fmt)
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        text = self._inner.format(record) if self._inner is not None else super().format(record)
        return printable(text, multiline=True)


def _escape_log_handlers(*logger_names: str) -> None:
    for name in logger_names:
        for handler in logging.getLogger(name).handlers:
            if not isinstance(handler.formatter, _PrintableFormatter):
                handler.setFormatter(_PrintableFormatter(inner=handler.formatter or logging.Formatter()))


# --- APP resolution ---------------------------------------------------------------------------------


def _is_url(app: str) -> bool:
    return "://" in app


def _sqlite_file(url: str) -> Path | None:
    """The file a ``sqlite:///`` URL names (``None`` for ``:memory:`` or other schemes)."""
    scheme, _, rest = url.partition("://")
    path = rest.partition("?")[0]
    if scheme != "sqlite" or path in (":memory:", "/:memory:") or not path.startswith("/"):
        return None
    return Path(path[1:])


def _import_object(spec: str, what: str) -> Any:
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise CliError(f"{what} must be module:attribute, not {spec!r}", EXIT_USAGE)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CliError(f"cannot import {module_name!r} for {what} {spec!r}: {exc}", EXIT_USAGE) from None
    except Exception:
        _out(traceback.format_exc(), end="", file=sys.stderr)
        raise CliError(f"importing {module_name!r} failed (traceback above)", EXIT_USAGE) from None
    try:
        return functools.reduce(getattr, attribute.split("."), module)
    except AttributeError:
        raise CliError(f"module {module_name!r} has no attribute {attribute!r}", EXIT_USAGE) from None


async def load_durably(app: str, *, writes: bool = False) -> Durably:
    """The ``Durably`` an APP argument names, not started yet.

    A URL gives a client that never executes runs (it has no jobs). With ``writes``
    (cancel, retrigger, delete, purge, signal, resume, fork, serve), a URL naming a
    database that is not a durably-web database is refused rather than given a
    durably-web schema: ``migrate`` is the command that does that on purpose.
    """
    if _is_url(app):
        path = _sqlite_file(app)
        if path is not None and not path.is_file():
            raise CliError(f"database file not found: {path}")
        try:
            durably = Durably(app, worker=False)
        except ValidationError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
        if writes:
            await _refuse_foreign_database(app)
        return durably
    found = _import_object(app, "APP")
    if callable(found) and not isinstance(found, Durably):
        found = found()
    if not isinstance(found, Durably):
        raise CliError(f"{app} is a {type(found).__name__}, not a Durably instance", EXIT_USAGE)
    return found


async def _refuse_foreign_database(url: str) -> None:
    """A ``CliError`` when ``url`` names a database without a durably-web schema (checked read-only)."""
    try:
        store = open_store(url, read_only=True)
    except DurablyError:
        return  # the writing open reports what is wrong (or works: an in-memory database)
    try:
        await store.check_schema()
    except SchemaVersionError as exc:
        if exc.found is None:
            raise CliError(
                f"cannot open the database: {exc}; nothing was written to it "
                f"('{PROG} migrate {url}' adds the durably-web schema, if this is the file you mean)"
            ) from None
    except DurablyError:
        return
    finally:
        await store.close()


def _require_jobs(app: str, command: str) -> None:
    if _is_url(app):
        raise CliError(
            f"'{command}' needs the job definitions, which a database URL does not carry: pass APP "
            f"as module:attribute naming your Durably instance (e.g. '{PROG} {command} myapp:durably ...', "
            "with myapp.py in the current directory)",
            EXIT_USAGE,
        )


@contextlib.asynccontextmanager
async def opened(
    durably: Durably, *, worker: bool, read_only: bool = False, app: str = "APP"
) -> AsyncIterator[Durably]:
    """Start ``durably`` (with or without its worker: management commands never claim work),
    turning an unreachable or incompatible database into ``CliError``.

    ``read_only`` (the commands that only look: runs, show, watch) opens the database
    without writing anything: no migration, no journal-mode change, no file created.
    """
    try:
        await durably.init(worker=worker, read_only=read_only)
    except ValidationError as exc:  # a malformed database URL
        raise CliError(str(exc), EXIT_USAGE) from None
    except SchemaVersionError as exc:
        hint = ""
        if read_only and exc.found is not None and exc.expected is not None and exc.found < exc.expected:
            hint = (
                f"; run '{PROG} migrate {app}' to migrate it (any command that writes does "
                "too: worker, serve, trigger, cancel, ...), then try again"
            )
        raise CliError(f"cannot open the database: {exc}{hint}") from None
    except DurablyError as exc:
        raise CliError(f"cannot open the database: {exc}") from None
    try:
        yield durably
    finally:
        await durably.stop()


# --- argument helpers --------------------------------------------------------------------------------


class Duration(NamedTuple):
    """A duration argument as typed (for messages) and in seconds."""

    text: str
    seconds: float

    @classmethod
    def parse(cls, text: str) -> Duration:
        """The forms of :mod:`durably_web.durations` (``30d``, ``12h``, ``1.5h``, ``90``)."""
        try:
            seconds = parse_duration(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return cls(text.strip(), seconds)


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"invalid label {text!r}: use key=value")
    return key, value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535 (0: any free port), not {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _labels(pairs: Sequence[tuple[str, str]] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    labels: dict[str, str] = {}
    for key, value in pairs:
        if key in labels:
            raise CliError(f"label {key!r} given twice", EXIT_USAGE)
        labels[key] = value
    return labels


# --- rendering -----------------------------------------------------------------------------------------


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _duration(ms: float) -> str:
    if ms < 1000:
        return f"{ms:.0f} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    return f"{ms / 60_000:.1f} min"


def _json(value: Any, indent: int | None = 2) -> str:
    """JSON that is still valid JSON and safe on a terminal (see :func:`printable_json`)."""
    return printable_json(json.dumps(to_jsonable(value), indent=indent, ensure_ascii=False, default=str))


def _progress_text(run: Run) -> str:
    progress = run.progress
    if progress is None:
        return "-"
    return f"{progress.current}/{progress.total}" if progress.total else str(progress.current)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the last column is left ragged. Cells are escaped."""
    shown = [[printable(cell) for cell in row] for row in (headers, *rows)]
    widths = [max(len(cell) for cell in column) for column in zip(*shown, strict=False)]
    lines = []
    for row in shown:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def progress_bar(current: int, total: int | None, message: str | None, width: int = 30) -> str:
    if total:
        filled = max(0, min(width, round(width * current / total)))
        text = f"[{'#' * filled}{'.' * (width - filled)}] {current}/{total} {100 * current / total:3.0f}%"
    else:
        text = f"[{current}]"
    return f"{text} {printable(message)}" if message else text


def _until(value: datetime) -> str:
    """A due time, and how far off it is (``due`` once it has passed)."""
    ms = (value - datetime.now(UTC)).total_seconds() * 1000
    return f"{_when(value)} ({'in ' + _duration(ms) if ms > 0 else 'due'})"


def _is_due(run: Run) -> bool:
    """A waiting run whose time has come (a sleep or retry delay over, a signal delivered, a
    signal wait timed out): the next worker poll continues it."""
    return run.wake_at is not None and run.wake_at <= datetime.now(UTC)


def _wakes(run: Run) -> str:
    """When a waiting run continues, for the run list ("-" for any other status)."""
    if run.status != "waiting":
        return "-"
    if run.wait_reason == "child" and run.wait_child_id is not None:
        return "due now (child)" if _is_due(run) else f"when child {run.wait_child_id} ends"
    if run.wake_at is None:
        return "on signal"
    if _is_due(run):
        return f"due now ({run.wait_reason})"
    if run.wait_reason == "signal":
        return f"on signal or {_when(run.wake_at)}"
    if run.wait_reason == "offline":
        return f"when online, or check {_when(run.wake_at)}"
    return f"{_when(run.wake_at)} ({run.wait_reason})"


def _waiting_for(run: Run) -> str:
    """A waiting run's wait in a few words: ``signal 'approval'``, ``sleep 'nap' until ...``."""
    what = f"{run.wait_reason} {run.wait_step!r}"
    if run.wake_at is None:
        return what
    if _is_due(run):
        return f"{what}, due now"
    if run.wait_reason == "offline":
        return f"{what} until online, checked again {_when(run.wake_at)}"
    return f"{what} {'times out' if run.wait_reason == 'signal' else 'until'} {_when(run.wake_at)}"


def _state_note(run: Run) -> str | None:
    """What a non-terminal status means for the operator (``None`` once the run has ended)."""
    if run.status == "pending":
        if run.attempt == 0:
            return "waiting for a worker"
        return (
            f"waiting for a worker to resume it (attempt {run.attempt} stopped before the end; "
            "completed steps do not run again)"
        )
    if run.status == "leased":
        return (
            f"running on a worker (attempt {run.attempt}); if that worker died, another one "
            "resumes it when the lease expires"
        )
    if run.status == "waiting":
        step = repr(run.wait_step)
        due = "?" if run.wake_at is None else _when(run.wake_at)
        if run.wait_reason == "child":
            if _is_due(run):
                return f"its child run {run.wait_child_id} ended: the next worker to poll continues it"
            return (
                f"waiting at step {step} for its child run {run.wait_child_id} to end (holding no "
                f"worker); see it with: {PROG} show APP {run.wait_child_id}"
            )
        if _is_due(run):
            what = {
                "retry": f"waiting to retry step {step} (attempts below)",
                "sleep": f"sleeping at step {step}",
                "signal": f"waiting for the signal {step} (it arrived, or the wait timed out)",
                "offline": f"waiting for the network at step {step}",
            }.get(run.wait_reason or "", f"waiting ({run.wait_reason} at step {step})")
            return f"{what}, due since {due}: the next worker to poll continues it"
        if run.wait_reason == "retry":
            return f"waiting to retry step {step} (attempts below); any worker retries it at {due}"
        if run.wait_reason == "sleep":
            return f"sleeping at step {step}; any worker continues it at {due}"
        if run.wait_reason == "offline":
            return (
                f"waiting for the network at step {step} (the browser was offline; no retry was "
                f"used up); it continues when the browser is back online, checked again at {due}"
            )
        if run.wait_reason == "signal":
            command = f"{PROG} signal APP {run.id} {shlex.quote(run.wait_step or '')} --payload JSON"
            if run.wake_at is None:
                return f"waiting for the signal {step} (no timeout); send it with: {command}"
            return (
                f"waiting for the signal {step} until {due}, when the wait times out; send it with: {command}"
            )
        return f"waiting ({run.wait_reason} at step {step}); any worker continues it at {due}"
    return None


def _print_run(run: Run, out: TextIO) -> None:
    fields = [
        ("id", run.id),
        ("job", run.job_name),
        ("status", run.status),
        *([("state", state)] if (state := _state_note(run)) else []),
        ("attempt", str(run.attempt)),
        ("created", _when(run.created_at)),
        ("started", _when(run.started_at)),
        ("completed", _when(run.completed_at)),
    ]
    if run.status == "waiting":
        fields.append(("wait reason", run.wait_reason or "?"))
        fields.append(("wait step", run.wait_step or "?"))
        if run.wait_child_id is not None:
            fields.append(("wait child", run.wait_child_id))
            wake = "- (when the child run ends)" if run.wake_at is None else _until(run.wake_at)
        else:
            wake = "- (no timeout: when the signal arrives)" if run.wake_at is None else _until(run.wake_at)
        fields.append(("wake at", wake))
    if run.forked_from is not None:
        fields.append(("forked from", run.forked_from))
    if run.priority:
        fields.append(("priority", str(run.priority)))
    if run.not_before is not None:
        fields.append(("not before", _until(run.not_before)))
    if run.parent_run_id is not None:
        fields.append(("parent", run.parent_run_id))
    if run.deadline_at is not None:
        deadline = _when(run.deadline_at) if run.is_terminal else _until(run.deadline_at)
        fields.append(("deadline", deadline))
    if run.version is not None:
        fields.append(("version", run.version))
    if run.trace_parent is not None:
        fields.append(("trace parent", run.trace_parent))
    if run.progress is not None:
        progress = run.progress
        fields.append(("progress", progress_bar(progress.current, progress.total, progress.message)))
    if run.labels:
        fields.append(("labels", ", ".join(f"{k}={v}" for k, v in sorted(run.labels.items()))))
    for name, key in (("idempotency key", run.idempotency_key), ("concurrency key", run.concurrency_key)):
        if key is not None:
            fields.append((name, key))
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        _out(f"{name.ljust(width)}  {_p(value)}", file=out)


def _step_kind(step: Step, attempts: int) -> str:
    """A step's kind, with what it adds: a sleep's due time, a signal wait's outcome, a
    retried step's attempts (``run, 3 attempts``)."""
    if step.kind == "sleep" and isinstance(step.output, int) and not isinstance(step.output, bool):
        try:
            return f"sleep, until {_when(from_ms(step.output))}"
        except (OverflowError, OSError, ValueError):  # a due time no datetime can hold
            return f"sleep, until {step.output} ms"
    if step.kind == "signal" and isinstance(step.output, dict):
        if step.output.get("timeout") is True:
            return "signal, timed out"
        if "payload" in step.output:
            payload = _json(step.output["payload"], indent=None)
            return "signal, received " + (payload if len(payload) <= 60 else payload[:59] + "…")
    if step.kind == "child" and isinstance(step.output, dict) and isinstance(step.output.get("run_id"), str):
        return f"child, started {step.output['run_id']}"
    if attempts > 1:
        return f"{step.kind}, {attempts} attempts"
    return step.kind


def _retried(steps: Sequence[Step], attempts: Sequence[StepAttempt]) -> list[StepAttempt]:
    """The attempts worth listing: those of every step that was attempted more than once, or
    whose failed attempt is waiting for its retry (a single attempt is its step's own row)."""
    recorded = {step.index for step in steps}
    count: dict[int, int] = {}
    for attempt in attempts:
        count[attempt.index] = count.get(attempt.index, 0) + 1
    return [a for a in attempts if count[a.index] > 1 or a.index not in recorded]


def _attempt_line(attempt: StepAttempt) -> str:
    offline = " offline (no retry used up)" if attempt.offline else ""
    line = (
        f"{_when(attempt.completed_at)} attempt {attempt.attempt} of step {_p(repr(attempt.name))} "
        f"{attempt.status}{offline} after {_duration(attempt.duration_ms)}"
    )
    return line + (f": {_p(attempt.error)}" if attempt.error is not None else "")


# --- commands ----------------------------------------------------------------------------------------------


async def cmd_trigger(args: argparse.Namespace) -> int:
    _require_jobs(args.app, "trigger")
    try:
        payload = json.loads(args.input)
    except ValueError as exc:
        raise CliError(f"--input is not valid JSON: {exc}", EXIT_USAGE) from None
    labels = _labels(args.label)
    async with opened(await load_durably(args.app), worker=False) as durably:
        run = await durably.trigger(
            args.job,
            payload,
            idempotency_key=args.idempotency_key,
            concurrency_key=args.concurrency_key,
            coalesce="skip" if args.coalesce else None,
            labels=labels,
            priority=args.priority,
            timeout=None if args.run_timeout is None else args.run_timeout.seconds,
        )
        _say(f"run {_p(run.id)} of {_p(run.job_name)}: {run.disposition}")
        if not args.wait:
            _out(_json(run.to_dict()) if args.json else _p(run.id))
            return 0
        _say("waiting for a worker to finish it (Ctrl-C stops waiting, not the run)")
        try:
            final = await durably.wait_for_run(run.id, timeout=args.timeout)
        except WaitTimeoutError as exc:
            raise CliError(str(exc)) from None
        if args.json:
            _out(_json(final.to_dict()))
        else:
            _out(_p(final.id))
            _print_outcome(final)
        return 0 if final.status == "completed" else EXIT_FAILURE


def _print_outcome(run: Run) -> None:
    if run.status == "completed":
        _out(f"completed; output:\n{_json(run.output)}")
    elif run.error is not None:
        _out(f"{run.status}: {run.error}")
        if run.error.traceback:
            _out(run.error.traceback.rstrip())
    else:
        _out(run.status)


async def cmd_runs(args: argparse.Namespace) -> int:
    statuses = [part for value in args.status or () for part in value.split(",") if part] or None
    async with opened(await load_durably(args.app), worker=False, read_only=True, app=args.app) as durably:
        versions = [part for value in args.version or () for part in value.split(",") if part] or None
        runs = await durably.get_runs(
            status=statuses,
            job_name=args.job or None,
            labels=_labels(args.label),
            limit=args.limit,
            parent_run_id=args.parent,
            version=versions,
        )
    if args.json:
        _out(_json([run.to_dict() for run in runs]))
        return 0
    if not runs:
        _say("no runs match")
        return 0
    # A WAKES column only when it has something to say: the list of runs that all ended stays as narrow.
    wakes = any(run.status == "waiting" for run in runs)
    parents = any(run.parent_run_id is not None for run in runs)  # a PARENT column, likewise
    rows = [
        [
            run.id,
            run.job_name,
            run.status,
            *([_wakes(run)] if wakes else []),
            *([run.parent_run_id or "-"] if parents else []),
            _progress_text(run),
            _when(run.created_at),
            ",".join(f"{k}={v}" for k, v in sorted(run.labels.items())),
        ]
        for run in runs
    ]
    headers = [
        "ID",
        "JOB",
        "STATUS",
        *(["WAKES"] if wakes else []),
        *(["PARENT"] if parents else []),
        "PROGRESS",
        "CREATED",
        "LABELS",
    ]
    _out(format_table(headers, rows))
    return 0


async def cmd_show(args: argparse.Namespace) -> int:
    async with opened(await load_durably(args.app), worker=False, read_only=True, app=args.app) as durably:
        run = await durably.get_run(args.run_id)
        steps = await durably.get_steps(run.id)
        attempts = await durably.get_step_attempts(run.id)
        logs = await durably.get_logs(run.id)
        children = await durably.get_runs(parent_run_id=run.id, limit=1000)
    if args.json:
        _out(
            _json(
                {
                    "run": run.to_dict(),
                    "steps": [step.to_dict() for step in steps],
                    "attempts": [attempt.to_dict() for attempt in attempts],
                    "logs": [log.to_dict() for log in logs],
                    "children": [child.to_dict() for child in children],
                }
            )
        )
        return 0
    out = sys.stdout
    _print_run(run, out)
    _out(f"\ninput:\n{_json(run.input)}", file=out)
    _out(f"\nsteps ({len(steps)}):", file=out)
    if steps:
        per_step: dict[int, int] = {}
        for attempt in attempts:
            per_step[attempt.index] = per_step.get(attempt.index, 0) + 1
        kinds = [_step_kind(s, per_step.get(s.index, 0)) for s in steps]
        # A KIND column only when a step is not a plain ``step.run``: tables of those read as before.
        shown_kinds = any(kind != "run" for kind in kinds)
        rows = [
            [str(s.index), s.name, s.status, _duration(s.duration_ms), *([kind] if shown_kinds else [])]
            for s, kind in zip(steps, kinds, strict=True)
        ]
        headers = ["#", "STEP", "STATUS", "DURATION", *(["KIND"] if shown_kinds else [])]
        _out(format_table(headers, rows), file=out)
    if children:
        _out(f"\nchild runs ({len(children)}):", file=out)
        rows = [[c.id, c.job_name, c.status, _when(c.created_at)] for c in reversed(children)]
        _out(format_table(["ID", "JOB", "STATUS", "CREATED"], rows), file=out)
    retried = _retried(steps, attempts)
    if retried:
        _out(f"\nattempts of retried steps ({len(retried)}):", file=out)
        for attempt in retried:
            _out(_attempt_line(attempt), file=out)
    noted = [attempt for attempt in attempts if attempt.metadata is not None]
    if noted:
        _out(f"\nattempt metadata ({len(noted)}):", file=out)
        for attempt in noted:
            _out(
                f"attempt {attempt.attempt} of step {_p(repr(attempt.name))}: "
                f"{_json(attempt.metadata, indent=None)}",
                file=out,
            )
    if logs:
        _out(f"\nlogs ({len(logs)}):", file=out)
        for log in logs:
            data = "" if log.data is None else " " + _json(log.data, indent=None)
            _out(f"{_when(log.created_at)} {_p(log.level.upper()):7} {_p(log.message)}{data}", file=out)
    if run.status == "completed":
        _out(f"\noutput:\n{_json(run.output)}", file=out)
    if run.error is not None:
        _out(f"\nerror: {run.error}", file=out)
        if run.error.traceback:
            _out(run.error.traceback.rstrip(), file=out)
    return 0


async def cmd_cancel(args: argparse.Namespace) -> int:
    async with opened(await load_durably(args.app, writes=True), worker=False) as durably:
        run = await durably.cancel(args.run_id)
    _out(f"run {_p(run.id)}: {run.status}")
    return 0


async def cmd_retrigger(args: argparse.Namespace) -> int:
    # A database URL is enough: the new run reuses the stored input (see Durably.retrigger).
    async with opened(await load_durably(args.app, writes=True), worker=False) as durably:
        run = await durably.retrigger(args.run_id)
    _say(f"run {_p(run.id)} of {_p(run.job_name)}: {run.disposition} (retrigger of {_p(args.run_id)})")
    _out(_p(run.id))
    return 0


async def cmd_signal(args: argparse.Namespace) -> int:
    try:
        payload = json.loads(args.payload)
    except ValueError as exc:
        raise CliError(f"--payload is not valid JSON: {exc}", EXIT_USAGE) from None
    async with opened(await load_durably(args.app, writes=True), worker=False) as durably:
        run = await durably.get_run(args.run_id)  # NotFoundError before anything is written
        disposition = await durably.send_signal(args.run_id, args.name, payload, signal_id=args.signal_id)
        job = durably.jobs.get(run.job_name)
        typed = job is not None and args.name in job.signal_types
    name = _p(repr(args.name))
    if disposition == "stored":
        _say(f"the run is not waiting for {name} now: the signal is kept until it reaches that wait")
    elif disposition == "duplicate":
        _say(f"signal id {_p(repr(args.signal_id))} was sent to this run before: nothing changed")
    if disposition != "duplicate" and not typed:
        if _is_url(args.app):
            why = "a database URL knows no signal types"
        elif job is None:
            why = f"{_p(args.app)} has no job {_p(repr(run.job_name))}"
        else:
            why = f"job {_p(repr(run.job_name))} declares no type for {name} in define_job(signals=...)"
        _say(
            f"the payload was not checked here ({why}): the run's wait checks it, and drops a "
            "payload its type refuses with a warning in the run's log"
        )
    _out(f"run {_p(args.run_id)}: signal {name} {disposition}")
    return 0


async def cmd_resume(args: argparse.Namespace) -> int:
    async with opened(await load_durably(args.app, writes=True), worker=False) as durably:
        before = await durably.get_run(args.run_id)
        run = await durably.resume_run(args.run_id)
    _say(
        f"run {_p(run.id)} of {_p(run.job_name)} resumed (it was {before.status}): a worker replays "
        "its completed steps and runs the step that stopped it again"
    )
    _out(f"run {_p(run.id)}: {run.status}")
    return 0


async def cmd_fork(args: argparse.Namespace) -> int:
    async with opened(await load_durably(args.app, writes=True), worker=False) as durably:
        run = await durably.fork_run(args.run_id, from_step=args.from_step)
        copied = [step.name for step in await durably.get_steps(run.id)]
    listed = f" ({', '.join(_p(repr(name)) for name in copied)})" if copied else ""
    _say(
        f"run {_p(run.id)} of {_p(run.job_name)}: {run.disposition}, forked from {_p(run.forked_from)} "
        f"at step {_p(repr(args.from_step))}; {len(copied)} completed step(s) copied{listed}, "
        "the rest runs again"
    )
    _out(_p(run.id))
    return 0


async def cmd_delete(args: argparse.Namespace) -> int:
    async with opened(await load_durably(args.app, writes=True), worker=False) as durably:
        await durably.delete_run(args.run_id)
    _out(f"run {_p(args.run_id)}: deleted")
    return 0


async def cmd_purge(args: argparse.Namespace) -> int:
    async with opened(await load_durably(args.app, writes=True), worker=False) as durably:
        count = await durably.purge_runs(older_than=args.older_than.seconds)
    _out(f"purged {count} run(s) that ended more than {_p(args.older_than.text)} ago")
    return 0


async def cmd_schedules_list(args: argparse.Namespace) -> int:
    async with opened(await load_durably(args.app), worker=False, read_only=True, app=args.app) as durably:
        schedules = await durably.list_schedules()
    if args.json:
        _out(_json([schedule.to_dict() for schedule in schedules]))
        return 0
    if not schedules:
        _say("no schedules")
        return 0
    rows = [
        [
            s.name,
            s.job_name,
            s.cron,
            s.timezone,
            "paused" if s.paused else _when(s.next_tick_at),
            _when(s.last_tick_at) if s.last_tick_at else "-",
            s.last_run_id or "-",
            s.catch_up,
        ]
        for s in schedules
    ]
    headers = ["NAME", "JOB", "CRON", "TIMEZONE", "NEXT TICK", "LAST TICK", "LAST RUN", "CATCH-UP"]
    _out(format_table(headers, rows))
    return 0


async def cmd_schedules_pause(args: argparse.Namespace) -> int:
    async with opened(await load_durably(args.app, writes=True), worker=False) as durably:
        schedule = await durably.pause_schedule(args.name)
    _out(f"schedule {_p(schedule.name)}: paused")
    return 0


async def cmd_schedules_resume(args: argparse.Namespace) -> int:
    async with opened(await load_durably(args.app, writes=True), worker=False) as durably:
        schedule = await durably.resume_schedule(args.name)
    _out(f"schedule {_p(schedule.name)}: next tick {_when(schedule.next_tick_at)}")
    return 0


async def cmd_schedules_delete(args: argparse.Namespace) -> int:
    async with opened(await load_durably(args.app, writes=True), worker=False) as durably:
        await durably.unschedule(args.name)
    _say("the runs it created stay; a define_job(schedule=) schedule comes back when a worker starts")
    _out(f"schedule {_p(args.name)}: deleted")
    return 0


async def cmd_migrate(args: argparse.Namespace) -> int:
    """Open the database for writing, which creates or upgrades its schema, and say so."""
    async with opened(await load_durably(args.app), worker=False):
        pass
    _out(f"{_p(args.app)}: the database schema is up to date")
    return 0


async def cmd_watch(args: argparse.Namespace) -> int:
    """Poll the database, so runs executed by any process (a worker elsewhere) are followed."""
    tty = sys.stdout.isatty()
    async with opened(await load_durably(args.app), worker=False, read_only=True, app=args.app) as durably:
        run = await durably.get_run(args.run_id)
        _out(f"watching run {_p(run.id)} of {_p(run.job_name)} ({run.status})", flush=True)
        printed_logs = 0
        last_line = ""
        while True:
            logs = await durably.get_logs(run.id)
            for log in logs[printed_logs:]:
                if tty and last_line:
                    print("\r\033[K", end="")
                _out(f"{_p(log.level.upper()):7} {_p(log.message)}", flush=True)
                if tty and last_line:
                    _out(last_line, end="", flush=True)
            printed_logs = len(logs)
            progress = run.progress
            line = f"{run.status:9} " + (
                progress_bar(progress.current, progress.total, progress.message) if progress else "-"
            )
            if run.status == "waiting":
                line += f" ({_p(_waiting_for(run))})"
            if line != last_line:
                if tty:  # our own control sequence (clear the line), then the escaped text
                    print("\r\033[K", end="")
                    _out(line, end="", flush=True)
                else:
                    _out(line, flush=True)
                last_line = line
            if run.is_terminal:
                break
            await asyncio.sleep(args.interval)
            try:
                run = await durably.get_run(run.id)
            except NotFoundError:
                print("\nthe run was deleted" if tty else "the run was deleted", flush=True)
                return EXIT_FAILURE
        if tty:
            print()
        _print_outcome(run)
        return 0 if run.status == "completed" else EXIT_FAILURE


def _install_stop_handlers(on_stop: Callable[[], None], lease_duration: float | None = None) -> None:
    """First Ctrl-C / SIGTERM: graceful stop. Second: exit at once."""
    loop = asyncio.get_running_loop()
    asked = False

    def handle(signame: str) -> None:
        # Act first, then tell: the message must not stand in the way when stderr is gone
        # (a closed pipe, a terminal that went away).
        nonlocal asked
        if asked:
            try:
                _say(
                    f"{signame} again: exiting without waiting; runs still in progress keep their "
                    + (f"lease for up to {lease_duration:g} s " if lease_duration else "lease ")
                    + "and are then resumed by the next worker"
                )
            finally:
                os._exit(130)
        asked = True
        on_stop()
        with contextlib.suppress(OSError):
            _log_line(
                f"{signame}: stopping gracefully (running handlers stop at their next step; "
                "Ctrl-C again to exit at once)"
            )

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, handle, sig.name)


def _report_run_events(durably: Durably) -> dict[str, str]:
    """One log line per run milestone, so an operator sees the worker doing something.

    Returns the runs this process is executing (id -> job name), kept up to date: a run that
    goes waiting leaves it (it holds no lease; any worker continues it when it is due).
    Call it before ``init``: a run may be leased as soon as the worker starts.
    """
    messages = {
        "run:leased": "started",
        "run:complete": "completed",
        "run:fail": "failed",
        "run:cancel": "cancelled",
        "run:waiting": "waiting",
        "step:retry": "",
    }
    in_progress: dict[str, str] = {}
    for kind, text in messages.items():

        def report(event: Any, kind: str = kind, text: str = text) -> None:
            if event.run_id is not None and kind != "step:retry":
                if kind == "run:leased":
                    in_progress[event.run_id] = event.job_name or "?"
                else:
                    in_progress.pop(event.run_id, None)
            data = event.data
            line = f"run {_p(event.run_id)} ({_p(event.job_name)})"
            if kind == "step:retry":
                _log_line(
                    f"{line}: attempt {data.get('attempt')} of step {_p(repr(data.get('step_name')))} "
                    f"failed: {_p(data.get('error'))}; attempt {data.get('next_attempt')} in "
                    f"{data.get('delay', 0):.3g} s"
                )
                return
            if kind == "run:waiting":
                due = data.get("due_at")
                what = f"{data.get('reason')} at step {_p(repr(data.get('step_name')))}"
                _log_line(f"{line} waiting: {what}" + (f", until {_when(due)}" if due else ", no timeout"))
                return
            error = data.get("error")
            _log_line(f"{line} {text}" + (f": {_p(error)}" if error else ""))

        durably.on(kind, report)
    return in_progress


async def cmd_worker(args: argparse.Namespace) -> int:
    _require_jobs(args.app, "worker")
    durably = await load_durably(args.app)
    stop = asyncio.Event()
    # Before opening: a signal that arrives while the database opens still stops gracefully.
    _install_stop_handlers(stop.set, durably.lease_duration)
    in_progress = _report_run_events(durably)
    async with opened(durably, worker=True):
        jobs = ", ".join(sorted(durably.jobs)) or "none"
        _log_line(f"worker started for {_p(args.app)} (jobs: {_p(jobs)}); Ctrl-C to stop")
        await stop.wait()
        _say_handing_back(durably, in_progress)
    _log_line("worker stopped")
    return 0


def _say_handing_back(durably: Durably, in_progress: dict[str, str]) -> None:
    if in_progress:
        listed = ", ".join(f"{_p(run_id)} ({_p(job)})" for run_id, job in sorted(in_progress.items()))
        _log_line(
            f"handing back {len(in_progress)} run(s) in progress: {listed}; each stops at its next "
            f"step (within {durably.shutdown_timeout:g} s) and goes back to pending, so the next "
            "worker resumes it at once, after its last completed step"
        )


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a ``CliError`` saying what to do instead of an ``OSError``."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as exc:  # socket.gaierror: an unknown name
        raise CliError(f"cannot listen on {host}:{port}: --host {host!r} does not resolve ({exc})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise CliError(
                f"cannot listen on {host}:{port}: port {port} is already in use (another server, "
                f"e.g. 'python build.py serve' or another '{PROG} serve', is listening on it); "
                "choose another with --port N, or --port 0 for any free port"
            ) from None
        if exc.errno == errno.EACCES:
            raise CliError(
                f"cannot listen on {host}:{port}: permission denied (ports below 1024 need "
                "privileges); choose another with --port N"
            ) from None
        raise CliError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


_ALL_INTERFACES = frozenset({"0.0.0.0", "::", ""})
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


def serve_allowed_hosts(host: str, extra: Sequence[str]) -> list[str]:
    """The ``allowed_hosts`` ``serve`` passes to ``create_app``.

    The app always answers the loopback names and the IP address a connection
    arrived on; to those this adds the name ``--host`` binds (``--host myhost.lan``:
    clients will call it that), unless it is loopback or all interfaces, and every
    ``--allowed-host``.
    """
    names = []
    if host not in _ALL_INTERFACES and host.lower() not in _LOOPBACK_NAMES:
        names.append(f"[{host}]" if ":" in host and not host.startswith("[") else host)
    names.extend(extra)
    return list(dict.fromkeys(names))


def _binding_note(host: str, explicit: bool, allowed: Sequence[str]) -> str:
    """What the server is bound to, and who can therefore reach it under which names."""
    if host.lower() in _LOOPBACK_NAMES:
        return f"bound to {host} only" + (
            "" if explicit else " (pass --host NAME, or --host 0.0.0.0, to expose it)"
        )
    names = ", ".join(["localhost", "127.0.0.1", "[::1]", *allowed])
    if host in _ALL_INTERFACES:
        return (
            f"bound to all interfaces ({host or '0.0.0.0'}); answering Host names {names} and this "
            "machine's IP addresses; clients calling it by another name get 421: add "
            "--allowed-host NAME for each name they use"
        )
    return f"bound to {host}; answering Host names {names}"


async def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
        from starlette.applications import Starlette
        from starlette.routing import Mount

        from .asgi import create_app
    except ImportError as exc:
        raise CliError(f"serve needs the server extra (pip install 'durably-web[server]'): {exc}") from None

    class Server(uvicorn.Server):
        """uvicorn without its own signal handling: ours stops the worker gracefully too."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    no_worker = _is_url(args.app)  # a database URL: no job definitions to run
    durably = await load_durably(args.app, writes=True)
    auth = _import_object(args.auth, "--auth") if args.auth else None
    # Loopback unless --host says otherwise, with or without --auth: exposing the API
    # is a decision to type, not a side effect of adding an auth hook.
    host = args.host if args.host is not None else "127.0.0.1"
    allowed_hosts = serve_allowed_hosts(host, args.allowed_host or ())
    prefix = "/" + args.prefix.strip("/") if args.prefix.strip("/") else ""
    try:  # before binding: a malformed --allowed-host or --allowed-origin is a usage error
        app: Any = create_app(
            durably, auth=auth, allowed_hosts=allowed_hosts, allowed_origins=args.allowed_origin or ()
        )
    except ValidationError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    if prefix:
        app = Starlette(routes=[Mount(prefix, app=app)])
    sock = _bind(host, args.port)
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=3, use_colors=False)
    _escape_log_handlers("uvicorn", "uvicorn.access")  # Config has just set up its loggers
    server = Server(config)
    # Before opening, as for the worker: a signal while the database opens still stops gracefully.
    _install_stop_handlers(lambda: setattr(server, "should_exit", True), durably.lease_duration)
    in_progress = {} if no_worker else _report_run_events(durably)
    async with opened(durably, worker=not no_worker):
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        base = f"http://{shown}:{bound_port}{prefix}"
        note = (
            "no auth hook, so anyone who can reach it can manage runs"
            if auth is None
            else f"auth hook {_p(args.auth)}"
        )
        note += "; " + _binding_note(host, args.host is not None, allowed_hosts)
        if args.allowed_origin:
            note += f"; cross-origin pages allowed: {', '.join(args.allowed_origin)}"
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not (server.started or serving.done()):  # noqa: ASYNC110 - uvicorn only offers a flag
            await asyncio.sleep(0.02)
        if server.started:  # only now does a client get an answer
            _log_line(
                f"serving {args.app} at {base}/ (dashboard {base}/dashboard/, OpenAPI {base}/openapi.json); "
                f"{'no worker (database URL)' if no_worker else 'worker running'}; {note}"
            )
        await serving
        _log_line("server stopped" + ("" if no_worker else "; stopping the worker"))
        _say_handing_back(durably, in_progress)
    _log_line("stopped")
    return 0


# --- parser and entry point ------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, with its error messages escaped: "unrecognized arguments" echoes them raw."""

    def error(self, message: str) -> NoReturn:
        super().error(printable(message, multiline=True))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Run, serve and manage durably-web jobs. APP is module:attribute naming a Durably "
        "instance, or a database URL (sqlite:///app.db) for management commands.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], Awaitable[int]], help: str) -> Any:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument(
            "app",
            metavar="APP",
            nargs="?",
            help="module:attribute or a database URL (default: the DURABLY_APP environment variable)",
        )
        sub.set_defaults(handler=handler)
        return sub

    command("worker", cmd_worker, "run the worker until Ctrl-C or SIGTERM (graceful stop)")

    serve = command("serve", cmd_serve, "worker + HTTP API + dashboard")
    serve.add_argument(
        "--host",
        help="interface or name to bind (default 127.0.0.1, with or without --auth); a name is also "
        "added to the allowed Host names; 0.0.0.0 binds every interface",
    )
    serve.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0 picks a free one)")
    serve.add_argument(
        "--allowed-host",
        action="append",
        metavar="NAME",
        help="a Host name the API answers besides the loopback names and the bound --host "
        "(repeatable; 'name', 'name:port', '*.domain'; '*' for any, behind a proxy that checks it)",
    )
    serve.add_argument(
        "--allowed-origin",
        action="append",
        metavar="ORIGIN",
        help="a web origin (scheme://host[:port]) whose pages may call the API with the user's "
        "credentials (repeatable)",
    )
    serve.add_argument("--prefix", default="", help="URL prefix to mount the API under, e.g. /api/durably")
    serve.add_argument(
        "--auth", metavar="MODULE:ATTR", help="an object with the auth hooks (see durably_web.asgi)"
    )
    serve.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )

    trigger = command("trigger", cmd_trigger, "trigger a job; prints the run id")
    trigger.add_argument("job", metavar="JOB")
    trigger.add_argument("--input", default="null", help="the job input as JSON (default null)")
    trigger.add_argument("--idempotency-key")
    trigger.add_argument("--concurrency-key")
    trigger.add_argument(
        "--coalesce", action="store_true", help="reuse a pending run with the same concurrency key"
    )
    trigger.add_argument("--label", action="append", type=_label, metavar="KEY=VALUE")
    trigger.add_argument(
        "--priority", type=int, default=0, help="claimed before runs of lower priority (default 0)"
    )
    trigger.add_argument("--wait", action="store_true", help="wait until a worker finishes the run")
    trigger.add_argument("--timeout", type=_positive_float, help="seconds to --wait at most")
    trigger.add_argument(
        "--run-timeout",
        type=Duration.parse,
        metavar="DURATION",
        help="the run's deadline, waits included (overrides the job's timeout; past it the run "
        f"fails with RunTimeoutError): {DURATION_FORMS}",
    )
    trigger.add_argument("--json", action="store_true", help="print the run as JSON")

    runs = command("runs", cmd_runs, "list runs, newest first (read-only: never writes to the database)")
    runs.add_argument("--status", action="append", help="status(es), repeat or comma-separate")
    runs.add_argument("--job", action="append")
    runs.add_argument("--label", action="append", type=_label, metavar="KEY=VALUE")
    runs.add_argument("--limit", type=int, default=50)
    runs.add_argument("--parent", metavar="RUN_ID", help="only the child runs this run started")
    runs.add_argument(
        "--version",
        action="append",
        help="the job version(s) that started the runs, repeat or comma-separate (with "
        "--status pending,leased,waiting: what a deploy still has in flight)",
    )
    runs.add_argument("--json", action="store_true")

    show = command("show", cmd_show, "a run with its steps, logs, output and error (read-only: never writes)")
    show.add_argument("run_id", metavar="RUN_ID")
    show.add_argument("--json", action="store_true")

    for name, handler, text in (
        ("cancel", cmd_cancel, "cancel a pending or running run (and its unfinished child runs)"),
        ("retrigger", cmd_retrigger, "a new run with the same input and labels (a database URL will do)"),
        ("delete", cmd_delete, "delete a run that is not running and has no active child runs"),
    ):
        command(name, handler, text).add_argument("run_id", metavar="RUN_ID")

    signal_ = command(
        "signal", cmd_signal, "send a run a signal (a wait_for_signal step takes it); prints the disposition"
    )
    signal_.add_argument("run_id", metavar="RUN_ID")
    signal_.add_argument("name", metavar="NAME", help="the signal's name (the wait_for_signal name)")
    signal_.add_argument(
        "--payload", default="null", metavar="JSON", help="the payload as JSON (default null)"
    )
    signal_.add_argument(
        "--signal-id", metavar="ID", help="a key for this signal: sending it to the run again changes nothing"
    )
    command(
        "resume",
        cmd_resume,
        "continue a failed or cancelled run after its last completed step (a database URL will do)",
    ).add_argument("run_id", metavar="RUN_ID")
    fork = command(
        "fork",
        cmd_fork,
        "a new run of the same job and input, with the steps recorded before --from-step copied; "
        "prints the new run id",
    )
    fork.add_argument("run_id", metavar="RUN_ID")
    fork.add_argument("--from-step", required=True, metavar="NAME", help="the first step that runs again")

    purge = command("purge", cmd_purge, "delete finished runs older than a duration")
    purge.add_argument(
        "--older-than", required=True, type=Duration.parse, metavar="DURATION", help=DURATION_FORMS
    )

    command(
        "migrate",
        cmd_migrate,
        "create or upgrade the database schema (runs, show and watch never write, so they refuse "
        "a database whose schema is older than this version's)",
    )

    # schedules list|pause|resume|delete [APP] ...: the action first, so that an APP left to
    # DURABLY_APP is not mistaken for a schedule's name.
    schedules_help = "list, pause, resume or delete schedules (a database URL will do)"
    schedules = commands.add_parser("schedules", help=schedules_help, description=schedules_help)
    actions = schedules.add_subparsers(dest="schedule_action", required=True, metavar="ACTION")
    for action, handler, text in (
        ("list", cmd_schedules_list, "every schedule with its next tick (read-only: never writes)"),
        ("pause", cmd_schedules_pause, "stop a schedule creating runs until resumed"),
        ("resume", cmd_schedules_resume, "resume a schedule from its next tick after now"),
        ("delete", cmd_schedules_delete, "delete a schedule (its runs stay)"),
    ):
        sub = actions.add_parser(action, help=text, description=text)
        sub.add_argument(
            "app",
            metavar="APP",
            nargs="?",
            help="module:attribute or a database URL (default: the DURABLY_APP environment variable)",
        )
        if action == "list":
            sub.add_argument("--json", action="store_true")
        else:
            sub.add_argument("name", metavar="NAME", help="the schedule's name")
        sub.set_defaults(handler=handler)

    watch = command(
        "watch", cmd_watch, "follow a run's progress and logs until it ends (read-only: never writes)"
    )
    watch.add_argument("run_id", metavar="RUN_ID")
    watch.add_argument("--interval", type=_positive_float, default=0.5, help="seconds between polls")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.app is None:
        args.app = os.environ.get("DURABLY_APP")
        if not args.app:
            parser.error(
                f"{args.command}: APP is required (module:attribute or a database URL), or set DURABLY_APP"
            )
    logging.basicConfig(level=logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_PrintableFormatter("%(levelname)s %(name)s: %(message)s"))
    try:
        return asyncio.run(run_command(args))
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


async def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command (``build_parser().parse_args``) on the running event loop, its
    failures reported as one line on stderr and returned as the exit code."""
    try:
        return await args.handler(args)
    except CliError as exc:
        _say(f"error: {exc}")
        return exc.code
    except ValidationError as exc:
        _say(f"error: {exc}")
        return EXIT_USAGE
    except (NotFoundError, ConflictError, DurablyError) as exc:
        _say(f"error: {exc}")
        return EXIT_FAILURE
