"""The handler's view of a run: checkpointed steps, progress and logs, with replay."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import math
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TypeVar, overload

from . import children
from .errors import NonDeterministicReplayError, StepError, WaitTimeoutError
from .models import ErrorInfo
from .retry import _NEVER_RETRIED, NO_RETRY, RetryPolicy
from .serialization import _NO_TYPE, decode, encode, return_type_of
from .storage.base import NEVER_MS, LogRecord, StepRecord

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .job import JobDefinition
    from .models import ChildRun
    from .network import NetworkStatus
    from .storage.base import NewRun, RunRecord
    from .threads import SyncStepThreads

T = TypeVar("T")


class StepHost(Protocol):
    """What a ``StepContext`` needs from the execution of its run (``engine.RunExecution``):
    the run as claimed, the clock, events, and the fenced writes of checkpoints, waits,
    signals, progress and logs."""

    run_id: str
    job_name: str
    attempt: int
    record: RunRecord
    job: JobDefinition[Any, Any]
    sync_threads: SyncStepThreads | None
    sync_step_done: asyncio.Event
    network: NetworkStatus

    def now_ms(self) -> int: ...
    def emit(self, event_type: str, data: dict[str, Any]) -> None: ...
    def check_can_start_step(self, name: str) -> None: ...
    def step_failed(self, step: StepRecord, exc: BaseException) -> None: ...
    async def record_step(self, step: StepRecord) -> None: ...
    async def retry_step(self, failed: StepRecord, exc: BaseException, delay: float) -> NoReturn: ...
    async def wait_offline(
        self, step_name: str, failed: StepRecord | None = None, exc: BaseException | None = None
    ) -> NoReturn: ...
    async def wait_until(
        self,
        until: int,
        *,
        reason: str,
        step_name: str,
        step: StepRecord | None = None,
        deadline: int | None = None,
        child_run_id: str | None = None,
    ) -> NoReturn: ...
    async def next_signal(self, name: str) -> tuple[int, str] | None: ...
    async def consume_signal(self, key: int, step: StepRecord) -> bool: ...
    async def reject_signal(self, key: int, log: LogRecord, data: Any) -> None: ...
    def set_progress(self, current: int, total: int | None, message: str | None) -> None: ...
    def write_log(self, log: LogRecord, data: Any) -> None: ...
    # Child runs (durably_web/children.py).
    def find_job(self, name: str) -> JobDefinition[Any, Any] | None: ...
    async def get_run(self, run_id: str) -> RunRecord | None: ...
    async def start_child(self, child: NewRun, step: StepRecord) -> None: ...


class StepContext:
    """Passed to every job handler as ``step``.

    ``await step.run(name, fn, *args, **kwargs)`` runs ``fn`` once per run: its
    result is committed before ``run`` returns, and when the run resumes after
    a crash the stored result is returned instead of calling ``fn`` again.
    """

    def __init__(
        self,
        execution: StepHost,
        recorded: dict[int, StepRecord],
        failed_attempts: dict[int, tuple[int, int]] | None = None,
    ) -> None:
        self._execution = execution
        # Position -> (failed attempts of that step in all, since the last resume_run): the
        # first numbers the attempts, the second counts against the retry policy.
        self._failed_attempts = failed_attempts or {}
        # Keyed by position: a failed step that the handler caught leaves a gap.
        self._recorded = recorded
        self._last_recorded = max(recorded, default=-1)
        self._recorded_names = {step.name: step.index for step in recorded.values()}
        self._next_index = 0
        self._names: set[str] = set()
        self._current_step: str | None = None
        self.log = StepLogger(self)
        self._loop = asyncio.get_running_loop()
        # A resumed handler runs again from the top and calls step.progress() again for
        # the steps it replays. Until it executes a new step (or returns), progress is
        # only noted, not persisted or emitted: listeners would see it repeat and go
        # backwards. The last value noted is written then, if it differs from the stored one.
        record = execution.record
        self._persisted_progress = (record.progress_current, record.progress_total, record.progress_message)
        self._holding_progress = bool(recorded) or record.progress_current is not None
        self._held_progress: tuple[int, int | None, str | None] | None = None
        # Child run id -> its job, as start_child was given it: wait_for_child decodes with it.
        self._child_jobs: dict[str, JobDefinition[Any, Any]] = {}

    @property
    def run_id(self) -> str:
        return self._execution.run_id

    @property
    def job_name(self) -> str:
        return self._execution.job_name

    @property
    def attempt(self) -> int:
        return self._execution.attempt

    @property
    def is_replaying(self) -> bool:
        """True when the next ``step.run`` call will return a recorded result (a resumed run)."""
        return self._next_index <= self._last_recorded

    @overload
    async def run(
        self,
        name: str,
        fn: Callable[..., Any],
        *args: Any,
        type: type[T],
        retry: RetryPolicy | None = None,
        needs_network: bool = False,
        **kwargs: Any,
    ) -> T: ...
    @overload
    async def run(
        self,
        name: str,
        fn: Callable[..., Any],
        *args: Any,
        retry: RetryPolicy | None = None,
        needs_network: bool = False,
        **kwargs: Any,
    ) -> Any: ...

    async def run(
        self,
        name: str,
        fn: Callable[..., Any],
        *args: Any,
        type: Any = _NO_TYPE,
        retry: RetryPolicy | None = None,
        needs_network: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` as the step ``name`` (sync or async callable).

        The result type is ``type`` if given, else ``fn``'s return annotation;
        without either only plain JSON values are accepted. ``retry`` overrides the
        job's ``RetryPolicy`` for this step; a retry's delay is persisted as the run's
        wake-up time (the run is 'waiting' meanwhile), never slept in memory.

        In the browser, a step that fails with a network error while the browser is
        offline uses up no retry: the run waits (reason ``"offline"``) and tries it again
        when the network is back. ``needs_network=True`` also keeps the step from being
        attempted at all while offline. Elsewhere the network counts as always there.
        """
        self._claim_name(name)
        if not callable(fn):
            raise StepError(f"step {name!r}: {fn!r} is not callable")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise StepError(f"step {name!r}: retry must be a RetryPolicy, not {retry!r}")
        if not isinstance(needs_network, bool):
            raise StepError(f"step {name!r}: needs_network must be True or False, not {needs_network!r}")
        index = self._next_index
        self._next_index += 1
        tp = type if type is not _NO_TYPE else return_type_of(fn)

        recorded = self._recorded.get(index)
        if recorded is not None:
            if recorded.name != name or recorded.kind != "run":
                self._replay_mismatch(index, recorded, name, "run")
            return decode(recorded.output_json, tp)
        self._check_not_recorded_elsewhere(name, index)

        execution = self._execution
        execution.check_can_start_step(name)
        if self._holding_progress:
            self._end_replay()
        network = execution.network
        if not network.online() and (needs_network or self._waited_offline_at(name)):
            # Still offline: a step that needs the network, or the one that failed for want of
            # it, is not attempted (that would only add a failed attempt per recheck).
            await execution.wait_offline(name)
        failed_before, failed_this_round = self._failed_attempts.get(index, (0, 0))
        attempt = failed_before + 1
        started_at = execution.now_ms()
        execution.emit("step:start", {"step_name": name, "step_index": index, "attempt": attempt})
        self._current_step = name
        try:
            value = await self._call(fn, args, kwargs)
            output_json, value = encode(value, tp, what=f"step {name!r}")
        except Exception as exc:
            # Not the step's fault: the request could not leave. Recorded (flagged, so it uses
            # up no retry), and the run waits for the network instead of failing or backing off.
            # A NonRetryableError (or a cancel, a lost lease) still ends the step at once.
            offline = (
                not isinstance(exc, _NEVER_RETRIED) and not network.online() and network.is_network_error(exc)
            )
            failed = StepRecord(
                run_id=self.run_id,
                index=index,
                name=name,
                status="failed",
                output_json=None,
                error_json=_error_json(exc),
                started_at=started_at,
                completed_at=execution.now_ms(),
                attempt=attempt,
                offline=offline,
            )
            if offline:
                await execution.wait_offline(name, failed, exc)
            policy = retry if retry is not None else (execution.job.retry or NO_RETRY)
            round_attempt = failed_this_round + 1
            if policy.should_retry(exc, round_attempt):
                # Persisted with the attempt record in one transaction; raises _Suspend.
                await execution.retry_step(failed, exc, policy.delay_before(round_attempt + 1))
            execution.step_failed(failed, exc)
            raise
        finally:
            self._current_step = None
        await execution.record_step(
            StepRecord(
                run_id=self.run_id,
                index=index,
                name=name,
                status="completed",
                output_json=output_json,
                error_json=None,
                started_at=started_at,
                completed_at=execution.now_ms(),
                attempt=attempt,
            )
        )
        return value

    def _waited_offline_at(self, name: str) -> bool:
        """Whether this execution resumed a run that was waiting for the network at ``name``."""
        record = self._execution.record
        return record.wait_reason == "offline" and record.wait_step == name

    async def sleep(self, name: str, duration: float | int | timedelta) -> None:
        """A durable sleep, the checkpoint ``name``: the run waits (holding no lease and no
        worker slot) and continues on any worker once ``duration`` (seconds or a timedelta)
        has passed. The due time is fixed when the sleep first executes; a resumed run
        replays it and never sleeps twice."""
        seconds = duration.total_seconds() if isinstance(duration, timedelta) else duration
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds):
            raise StepError(f"sleep {name!r}: duration must be seconds or a timedelta, not {duration!r}")
        if not 0 <= seconds <= 1e11:
            raise StepError(f"sleep {name!r}: duration must be between 0 and 1e11 seconds, not {seconds}")
        await self._sleep(name, lambda now: now + int(seconds * 1000))

    async def sleep_until(self, name: str, when: datetime) -> None:
        """Like :meth:`sleep`, until the aware datetime ``when`` (a past one continues at once)."""
        if not isinstance(when, datetime) or when.tzinfo is None or when.utcoffset() is None:
            raise StepError(f"sleep_until {name!r}: 'when' must be a timezone-aware datetime, not {when!r}")
        due = int(when.timestamp() * 1000)
        await self._sleep(name, lambda now: due)

    async def _sleep(self, name: str, due_from: Callable[[int], int]) -> None:
        self._claim_name(name)
        index = self._next_index
        self._next_index += 1
        execution = self._execution
        recorded = self._recorded.get(index)
        if recorded is not None:
            if recorded.name != name or recorded.kind != "sleep":
                self._replay_mismatch(index, recorded, name, "sleep")
            due = int(recorded.output_json or 0)
            if execution.now_ms() < due:  # woken early (a clock step back): wait for the rest
                execution.check_can_start_step(name)
                await execution.wait_until(due, reason="sleep", step_name=name, step=None)
            return
        self._check_not_recorded_elsewhere(name, index)
        execution.check_can_start_step(name)
        if self._holding_progress:
            self._end_replay()
        now = execution.now_ms()
        due = due_from(now)
        step = StepRecord(
            run_id=self.run_id,
            index=index,
            name=name,
            status="completed",
            output_json=str(due),
            error_json=None,
            started_at=now,
            completed_at=max(now, due),
            kind="sleep",
        )
        if due <= now:  # overdue: a checkpoint, no wait
            await execution.record_step(step)
            return
        # The checkpoint (with its due time) and the waiting state commit together.
        await execution.wait_until(due, reason="sleep", step_name=name, step=step)

    @overload
    async def wait_for_signal(
        self, name: str, *, type: type[T], timeout: float | timedelta | None = None
    ) -> T: ...
    @overload
    async def wait_for_signal(self, name: str, *, timeout: float | timedelta | None = None) -> Any: ...

    async def wait_for_signal(
        self, name: str, *, type: Any = _NO_TYPE, timeout: float | timedelta | None = None
    ) -> Any:
        """Wait, durably, for the signal ``name`` (``Durably.send_signal``) and return its payload,
        validated by ``type`` (the same typed round trip as step results). The wait is the
        checkpoint ``name``: the run is 'waiting' meanwhile (no lease, no worker slot). With
        ``timeout`` (seconds or a timedelta, fixed when the wait first executes),
        ``WaitTimeoutError`` is raised here at the deadline. The outcome is recorded: a replay
        returns the same payload or raises the same timeout. A signal sent before the run got
        here was kept for it."""
        self._claim_name(name)
        limit = None
        if timeout is not None:
            limit = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
            if isinstance(limit, bool) or not isinstance(limit, int | float) or not 0 <= limit <= 1e11:
                raise StepError(f"wait_for_signal {name!r}: timeout must be seconds or a timedelta")
        tp = type
        execution = self._execution
        if type is not _NO_TYPE:
            execution.job.signal_types.setdefault(name, type)  # lets send_signal validate here
        index = self._next_index
        self._next_index += 1
        recorded = self._recorded.get(index)
        if recorded is not None:
            if recorded.name != name or recorded.kind != "signal":
                self._replay_mismatch(index, recorded, name, "signal")
            return self._signal_outcome(name, recorded.output_json or "{}", tp)
        self._check_not_recorded_elsewhere(name, index)
        execution.check_can_start_step(name)
        if self._holding_progress:
            self._end_replay()
        record = execution.record
        now = execution.now_ms()
        if record.wait_reason == "signal" and record.wait_step == name:
            deadline = record.wait_deadline  # fixed on the first execution of this wait
        else:
            deadline = None if limit is None else now + int(limit * 1000)
        while True:
            found = await execution.next_signal(name)
            if found is not None:
                key, payload_json = found
                refusal = self._payload_refusal(payload_json, tp)
                if refusal is not None:
                    await self._reject_signal(key, name, refusal)
                    continue
                outcome = f'{{"payload":{payload_json}}}'
                step = self._signal_step(index, name, outcome, now)
                if not await execution.consume_signal(key, step):
                    continue  # taken meanwhile (cannot happen under our lease) or fenced
                return self._signal_outcome(name, outcome, tp)
            if deadline is not None and execution.now_ms() >= deadline:
                outcome = '{"timeout":true}'
                await execution.record_step(self._signal_step(index, name, outcome, now))
                return self._signal_outcome(name, outcome, tp)
            await execution.wait_until(
                NEVER_MS if deadline is None else deadline,
                reason="signal",
                step_name=name,
                deadline=deadline,
            )

    @staticmethod
    def _payload_refusal(payload_json: str, tp: Any) -> str | None:
        """Why ``tp`` refuses a stored payload (``None`` when it fits or there is no type).

        ``send_signal`` validates where it knows the type; a sender that does not (another
        process without ``define_job(signals=)``, a database-URL client) stores any JSON."""
        if tp is _NO_TYPE or tp is None:
            return None
        try:
            decode(payload_json, tp)
        except Exception as exc:  # pydantic's ValidationError, or a type that cannot validate
            return f"{type(exc).__name__}: {exc}"
        return None

    async def _reject_signal(self, key: int, name: str, reason: str) -> None:
        execution = self._execution
        message = f"signal {name!r} rejected: its payload does not fit the wait's type; the run keeps waiting"
        await execution.reject_signal(
            key,
            LogRecord(
                run_id=self.run_id,
                step_name=name,
                level="warning",
                message=message,
                data_json=json.dumps({"signal": name, "error": reason}),
                created_at=execution.now_ms(),
            ),
            {"signal": name, "error": reason},
        )

    def _signal_step(self, index: int, name: str, outcome: str, started_at: int) -> StepRecord:
        return StepRecord(
            run_id=self.run_id,
            index=index,
            name=name,
            status="completed",
            output_json=outcome,
            error_json=None,
            started_at=started_at,
            completed_at=self._execution.now_ms(),
            kind="signal",
        )

    def _signal_outcome(self, name: str, outcome_json: str, tp: Any) -> Any:
        outcome = json.loads(outcome_json)
        if outcome.get("timeout"):
            raise WaitTimeoutError(f"run {self.run_id}: signal {name!r} did not arrive before the timeout")
        return decode(json.dumps(outcome.get("payload")), tp)

    def _claim_name(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise StepError(f"step name must be a non-empty string, not {name!r}")
        if name in self._names:
            raise StepError(
                f"step name {name!r} is used twice in run {self.run_id}; step names must be "
                f"unique within a run (in loops use names like f'item-{{i}}')"
            )
        self._names.add(name)

    def _replay_mismatch(self, index: int, recorded: StepRecord, name: str, kind: str) -> None:
        raise NonDeterministicReplayError(
            f"non-deterministic replay in run {self.run_id}: step #{index} was recorded "
            f"as {recorded.kind} {recorded.name!r} but the handler now calls {kind} {name!r}; the "
            "handler must call the same steps in the same order on every execution"
        )

    def _check_not_recorded_elsewhere(self, name: str, index: int) -> None:
        if name in self._recorded_names:
            raise NonDeterministicReplayError(
                f"non-deterministic replay in run {self.run_id}: step {name!r} was recorded at "
                f"position #{self._recorded_names[name]} but the handler now calls it at #{index}"
            )

    async def _call(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if inspect.iscoroutinefunction(fn):
            return await fn(*args, **kwargs)
        threads = self._execution.sync_threads
        if threads is not None:
            # A blocking callable must not starve the event loop (lease renewal, cancel).
            done = self._execution.sync_step_done
            done.clear()
            result = await threads.run(fn, args, kwargs, on_done=done.set)
        else:
            result = fn(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result

    def progress(self, current: int, total: int | None = None, message: str | None = None) -> None:
        """Record progress (persisted and emitted as ``run:progress``).

        While a resumed run replays its recorded steps, progress is held back until
        the first new step starts, then recorded once if it moved (see ``_end_replay``).
        """
        if self._holding_progress:
            self._held_progress = (current, total, message)
            return
        self._on_loop(self._execution.set_progress, current, total, message)

    def _end_replay(self) -> None:
        """The handler is past its replayed steps: record the progress it reported
        meanwhile, unless that is what was stored before (no repeated event)."""
        self._holding_progress = False
        held, self._held_progress = self._held_progress, None
        if held is not None and held != self._persisted_progress:
            self._execution.set_progress(*held)

    def _on_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call ``fn`` on the run's event loop: a sync step runs in a worker thread, and the
        store connection and event listeners belong to the loop's thread."""
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            return fn(*args)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def call() -> None:
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)

        self._loop.call_soon_threadsafe(call)
        return future.result()

    def _write_log(self, level: str, message: str, data: Any) -> None:
        self._on_loop(self._write_log_now, level, message, data)

    def _write_log_now(self, level: str, message: str, data: Any) -> None:
        execution = self._execution
        data_json = None if data is None else json.dumps(data, default=str)
        execution.write_log(
            LogRecord(
                run_id=self.run_id,
                step_name=self._current_step,
                level=level,
                message=str(message),
                data_json=data_json,
                created_at=execution.now_ms(),
            ),
            data,
        )

    async def start_child(
        self,
        name: str,
        job: JobDefinition[Any, Any] | str,
        input: Any = None,
        *,
        labels: Mapping[str, str] | None = None,
        concurrency_key: str | None = None,
    ) -> ChildRun:
        """Start a child run of ``job`` (a ``JobDefinition`` or a registered job name) with
        ``input``, as the checkpoint ``name``, and return its handle (``ChildRun``).

        The child is an ordinary run (its own steps, retries, leases) with ``parent_run_id``
        set to this run. It is created and the checkpoint recorded in one transaction: a
        replay returns the same handle and never starts a second child. ``input`` is
        validated against the job's input type first (``ValidationError``). The child gets
        this run's labels, updated with ``labels``; ``concurrency_key`` is its own, as for
        ``trigger`` (one with another pending run raises ``ConflictError``, and nothing is
        written)."""
        return await children.start_child(
            self, name, job, input, labels=labels, concurrency_key=concurrency_key
        )

    @overload
    async def wait_for_child(self, name: str, child: ChildRun | str, *, type: type[T]) -> T: ...
    @overload
    async def wait_for_child(self, name: str, child: ChildRun | str) -> Any: ...

    async def wait_for_child(self, name: str, child: ChildRun | str, *, type: Any = _NO_TYPE) -> Any:
        """Wait, durably, until the child run ``child`` (a ``ChildRun`` or a child's run id)
        ends, as the checkpoint ``name``, and return its output decoded with the child job's
        output type (or ``type``). Meanwhile this run is 'waiting' (reason ``"child"``; no
        lease, no worker slot); the child's outcome makes it due at once. A child that
        already ended returns (or raises) at once. A failed child raises
        ``ChildRunFailedError`` here, a cancelled one ``ChildRunCancelledError`` (a
        subclass), each with the child's id and ``ErrorInfo``; catch it, or this run fails
        at this step (resume the child, then this run, to wait again)."""
        return await children.wait_for_child(self, name, child, type=type)


class StepLogger:
    """``step.log.info("message", {"any": "json"})`` — persisted and emitted as ``log:write``."""

    def __init__(self, step: StepContext) -> None:
        self._step = step

    def debug(self, message: str, data: Any = None) -> None:
        self._step._write_log("debug", message, data)

    def info(self, message: str, data: Any = None) -> None:
        self._step._write_log("info", message, data)

    def warning(self, message: str, data: Any = None) -> None:
        self._step._write_log("warning", message, data)

    warn = warning

    def error(self, message: str, data: Any = None) -> None:
        self._step._write_log("error", message, data)


def _error_json(exc: BaseException) -> str:
    info = ErrorInfo.from_exception(exc)
    return json.dumps({"type": info.type, "message": info.message, "traceback": info.traceback})
