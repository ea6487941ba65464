"""The handler's view of a run: checkpointed steps, progress and logs, with replay."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TypeVar, overload

from . import children
from .errors import (
    CancelledError,
    LeaseLostError,
    NonDeterministicReplayError,
    StepError,
    ValidationError,
    WaitTimeoutError,
)
from .models import ErrorInfo
from .retry import _NEVER_RETRIED, NO_RETRY, RetryPolicy
from .serialization import _NO_TYPE, decode, encode, return_type_of
from .storage.base import NEVER_MS, LogRecord, StepRecord

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .job import JobDefinition
    from .models import ChildRun
    from .network import NetworkStatus
    from .storage.base import NewRun, RunRecord
    from .threads import SyncStepThreads

T = TypeVar("T")

#: The largest ``step.attempt.set_metadata`` value, as UTF-8 JSON: metadata is a note about
#: an attempt (a model, token counts), not a place for outputs.
MAX_ATTEMPT_METADATA_BYTES = 64 * 1024


@dataclass(slots=True)
class _AttemptState:
    """The step attempt running in this context: what ``step.log`` names and what
    ``step.attempt.set_metadata`` writes to."""

    owner: StepContext
    name: str
    metadata: dict[str, Any] | None = None
    metadata_json: str | None = None


# A context variable, not an attribute of the StepContext: the branches of a step.all run at
# once (as tasks, or in threads, which get a copy of the context), each with its own attempt.
_CURRENT_ATTEMPT: contextvars.ContextVar[_AttemptState | None] = contextvars.ContextVar(
    "durably_current_attempt", default=None
)


class AttemptNumber(int):
    """``step.attempt``: the run's attempt number, an ``int`` (1 on the first execution, 2 after
    a crash or a retry's wait...), which can also attach metadata to the attempt of the step
    running now: ``step.attempt.set_metadata({"model": "m1", "tokens": 812})``."""

    _step: StepContext
    #: A step may return it (or put it in its result): it is stored, and replayed, as its int.
    _stored_as_int = True

    def __new__(cls, value: int, step: StepContext) -> AttemptNumber:
        number = super().__new__(cls, value)
        number._step = step
        return number

    def set_metadata(self, metadata: Mapping[str, Any]) -> None:
        """Attach JSON to the attempt of the step that is running (call it inside the step's
        function). Each call adds its keys (a key set again takes the new value). The metadata
        is stored with the attempt, completed or failed, returned by ``get_step_attempts``,
        and kept when step outputs are dropped (``preserve_steps=False``). ``StepError``
        outside a step; ``ValidationError`` for a value that is not a JSON object or is larger
        than ``MAX_ATTEMPT_METADATA_BYTES``."""
        self._step._set_attempt_metadata(metadata)


@dataclass(frozen=True, slots=True)
class StepBranch:
    """One branch of ``step.all`` with options, made by ``step.branch(fn, *args, **kwargs)``."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    type: Any = _NO_TYPE
    retry: RetryPolicy | None = None
    needs_network: bool = False


@dataclass(frozen=True, slots=True)
class _Done:
    value: Any


@dataclass(frozen=True, slots=True)
class _Failed:
    """An attempt that failed: recorded as ``record``; ``retry_delay`` when its policy retries
    it, ``offline`` when it failed for want of the network (no retry used up)."""

    record: StepRecord
    error: Exception
    offline: bool
    retry_delay: float | None


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
    failed_step: StepRecord | None

    def now_ms(self) -> int: ...
    def emit(self, event_type: str, data: dict[str, Any]) -> None: ...
    def check_can_start_step(self, name: str) -> None: ...
    def step_failed(self, step: StepRecord, exc: BaseException) -> None: ...
    async def record_step(self, step: StepRecord) -> None: ...
    async def record_failed_step(self, step: StepRecord) -> None: ...
    async def wait_for_branches(
        self,
        retries: Sequence[tuple[StepRecord, BaseException, float]],
        offline_failures: Sequence[tuple[StepRecord, BaseException]],
        offline_step: str | None,
    ) -> NoReturn: ...
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
        failed: dict[int, StepRecord] | None = None,
    ) -> None:
        self._execution = execution
        # Position -> (failed attempts of that step in all, since the last resume_run): the
        # first numbers the attempts, the second counts against the retry policy.
        self._failed_attempts = failed_attempts or {}
        # Keyed by position: a failed step that the handler caught leaves a gap.
        self._recorded = recorded
        self._last_recorded = max(recorded, default=-1)
        # Every name a row of this run holds, completed or failed (``failed``: the failed
        # steps kept in its history, which run again at their position): none may be used at
        # another position. This, with _claim_name, is what keeps step names unique within a
        # run on SQLite, whose durably_steps has no index on them (migration 0012). It holds
        # across processes because only the lease holder writes a run's steps (record_step
        # is fenced), and it read them all after taking the lease.
        self._recorded_names = {step.name: step.index for step in (failed or {}).values()}
        self._recorded_names.update((step.name, step.index) for step in recorded.values())
        self._next_index = 0
        self._names: set[str] = set()
        self._sync_steps_running = 0  # sync branches of a step.all may run in several threads
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
    def attempt(self) -> AttemptNumber:
        """The run's attempt number (an ``int``); ``step.attempt.set_metadata({...})`` attaches
        JSON to the attempt of the step running now (see ``AttemptNumber``)."""
        return AttemptNumber(self._execution.attempt, self)

    def _set_attempt_metadata(self, metadata: Mapping[str, Any]) -> None:
        state = _CURRENT_ATTEMPT.get()
        if state is None or state.owner is not self:
            raise StepError(
                f"run {self.run_id}: step.attempt.set_metadata() was called outside a step; call it "
                "inside the function that step.run or step.all runs"
            )
        if not isinstance(metadata, Mapping) or not all(isinstance(key, str) for key in metadata):
            raise ValidationError(
                f"step {state.name!r}: attempt metadata must be a JSON object (a dict with str keys), "
                f"not {metadata!r}"
            )
        merged = {**(state.metadata or {}), **metadata}
        try:
            encoded = json.dumps(merged, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise ValidationError(f"step {state.name!r}: attempt metadata is not JSON: {exc}") from exc
        size = len(encoded.encode())
        if size > MAX_ATTEMPT_METADATA_BYTES:
            raise ValidationError(
                f"step {state.name!r}: attempt metadata is {size} bytes as JSON; at most "
                f"{MAX_ATTEMPT_METADATA_BYTES} are kept"
            )
        state.metadata, state.metadata_json = merged, encoded

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
        if not execution.network.online() and (needs_network or self._waited_offline_at(name)):
            # Still offline: a step that needs the network, or the one that failed for want of
            # it, is not attempted (that would only add a failed attempt per recheck).
            await execution.wait_offline(name)
        outcome = await self._attempt(index, name, fn, args, kwargs, tp, retry)
        if isinstance(outcome, _Done):
            return outcome.value
        if outcome.offline:
            # Not the step's fault: the request could not leave. Recorded (flagged, so it uses
            # up no retry), and the run waits for the network instead of failing or backing off.
            await execution.wait_offline(name, outcome.record, outcome.error)
        if outcome.retry_delay is not None:
            # Persisted with the attempt record in one transaction; raises _Suspend.
            await execution.retry_step(outcome.record, outcome.error, outcome.retry_delay)
        execution.step_failed(outcome.record, outcome.error)
        raise outcome.error

    async def _attempt(
        self,
        index: int,
        name: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        tp: Any,
        retry: RetryPolicy | None,
    ) -> _Done | _Failed:
        """One attempt of the step at ``index``: a success is recorded before this returns; a
        failure is returned with what its retry policy and the network make of it."""
        execution = self._execution
        failed_before, failed_this_round = self._failed_attempts.get(index, (0, 0))
        attempt = failed_before + 1
        started_at = execution.now_ms()
        execution.emit("step:start", {"step_name": name, "step_index": index, "attempt": attempt})
        state = _AttemptState(self, name)
        token: contextvars.Token[_AttemptState | None] | None = _CURRENT_ATTEMPT.set(state)
        try:
            value = await self._call(fn, args, kwargs)
            output_json, value = encode(value, tp, what=f"step {name!r}")
        except GeneratorExit:
            # Closed, not cancelled: the task is being destroyed without running again (its loop
            # was dropped, as a killed process's is). The collector closes it from whatever
            # context it runs in, where the reset below would raise ValueError, and the run would
            # be failed with it. Nothing more of this execution may happen (see execute()).
            token = None
            raise
        except Exception as exc:
            # A NonRetryableError (or a cancel, a lost lease) ends the step at once, even offline.
            network = execution.network
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
                metadata_json=state.metadata_json,
            )
            policy = retry if retry is not None else (execution.job.retry or NO_RETRY)
            round_attempt = failed_this_round + 1
            delay = None
            if not offline and policy.should_retry(exc, round_attempt):
                delay = policy.delay_before(round_attempt + 1)
            return _Failed(failed, exc, offline, delay)
        finally:
            if token is not None:
                _CURRENT_ATTEMPT.reset(token)
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
                metadata_json=state.metadata_json,
            )
        )
        return _Done(value)

    @staticmethod
    def branch(
        fn: Callable[..., Any],
        *args: Any,
        type: Any = _NO_TYPE,
        retry: RetryPolicy | None = None,
        needs_network: bool = False,
        **kwargs: Any,
    ) -> StepBranch:
        """A ``step.all`` branch with keyword arguments or options: ``fn(*args, **kwargs)``, its
        result typed by ``type`` (else ``fn``'s return annotation), retried by ``retry`` (else
        the job's policy), not attempted while offline with ``needs_network`` — the options of
        ``step.run``."""
        return StepBranch(fn, args, kwargs, type, retry, needs_network)

    async def all(self, branches: Mapping[str, Any]) -> dict[str, Any]:
        """Run several steps at once and return ``{name: result}`` in the mapping's order.

        Each key is a branch's step name; each value is ``(fn, *args)``, a bare callable, or
        ``step.branch(fn, *args, retry=..., type=..., needs_network=..., **kwargs)``. Each branch
        is an ordinary step (checkpointed on its own, at the next position in the mapping's
        order): async branches run as tasks, sync ones in the worker's threads (one after the
        other where there are none, as in Pyodide). After a crash only the branches that were
        not recorded run again.

        The join waits for every branch. A cancel or a lost lease stops every branch and is
        raised; otherwise the first branch (by position) that failed for good is raised, its
        siblings' results recorded. Branches to retry (their own ``retry`` policy) or waiting
        for the network do not hold the others up: once every other branch has finished, the
        run waits (reason ``"retry"``, until the soonest retry, or ``"offline"``) and then runs
        all of them again. A branch that failed for good ends the ``step.all`` without
        retrying the others.
        """
        if not isinstance(branches, Mapping):
            raise StepError(f"step.all takes a mapping of step name -> branch, not {branches!r}")
        specs = [(name, _as_branch(name, value)) for name, value in branches.items()]
        for name, _ in specs:
            self._claim_name(name)
        first = self._next_index
        self._next_index += len(specs)
        results: dict[str, Any] = {}
        pending: list[tuple[int, str, StepBranch, Any]] = []
        for offset, (name, spec) in enumerate(specs):
            index = first + offset
            tp = spec.type if spec.type is not _NO_TYPE else return_type_of(spec.fn)
            recorded = self._recorded.get(index)
            if recorded is not None:
                if recorded.name != name or recorded.kind != "run":
                    self._replay_mismatch(index, recorded, name, "run")
                results[name] = decode(recorded.output_json, tp)
            else:
                self._check_not_recorded_elsewhere(name, index)
                pending.append((index, name, spec, tp))
        if pending:
            results.update(await self._run_branches(pending, [name for name, _ in specs]))
        return {name: results[name] for name, _ in specs}

    async def _run_branches(
        self, pending: list[tuple[int, str, StepBranch, Any]], names: list[str]
    ) -> dict[str, Any]:
        execution = self._execution
        execution.check_can_start_step(pending[0][1])
        if self._holding_progress:
            self._end_replay()
        # Still offline: branches that need the network, or all of them when the run was
        # waiting for it at one of them, are not attempted (see run()).
        record = execution.record
        waited_offline = record.wait_reason == "offline" and record.wait_step in names
        skipped: list[str] = []
        to_run = pending
        if not execution.network.online():
            skipped = [name for _, name, spec, _ in pending if spec.needs_network or waited_offline]
            to_run = [branch for branch in pending if branch[1] not in skipped]
        outcomes = await self._join(to_run)
        values = {name: outcome.value for name, outcome in outcomes.items() if isinstance(outcome, _Done)}
        failures = [o for o in outcomes.values() if isinstance(o, _Failed)]
        failures.sort(key=lambda failure: failure.record.index)
        for_good = [f for f in failures if not f.offline and f.retry_delay is None]
        if for_good:
            for failure in failures:
                await execution.record_failed_step(failure.record)
                execution.step_failed(failure.record, failure.error)
            raised = for_good[0]
            execution.failed_step = raised.record
            raise raised.error
        offline = [(f.record, f.error) for f in failures if f.offline]
        retries = [(f.record, f.error, f.retry_delay) for f in failures if f.retry_delay is not None]
        if skipped or offline or retries:
            offline_step = skipped[0] if skipped else (offline[0][0].name if offline else None)
            await execution.wait_for_branches(retries, offline, offline_step)
        return values

    async def _join(self, branches: list[tuple[int, str, StepBranch, Any]]) -> dict[str, _Done | _Failed]:
        """Run the branches at once, each as a task; wait for all of them. A branch that raises
        (a cancel, a lost lease, a store failure: what stops the run, not the step's own
        failure) stops the others, and a cancel or lost lease is raised before anything else."""
        loop = asyncio.get_running_loop()
        tasks = {
            loop.create_task(
                self._branch(index, name, spec, tp), name=f"durably-branch-{self.run_id}-{name}"
            ): (index, name)
            for index, name, spec, tp in branches
        }
        waiting = set(tasks)
        try:
            while waiting:
                done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if any(not task.cancelled() and task.exception() is not None for task in done):
                    break
        except GeneratorExit:
            # Destroyed with its loop, not cancelled (see _attempt): so are the branches' tasks.
            # Cancelling them needs that loop, and nothing may be awaited while closing.
            waiting = set()
            raise
        finally:
            # Also when this (the run's task) is cancelled: no branch outlives the step.all.
            for task in waiting:
                task.cancel()
            if waiting:
                await asyncio.wait(waiting)
            # Every branch's exception is looked at (else asyncio reports it as never retrieved).
            errors = sorted(
                (tasks[task][0], error)
                for task in tasks
                if task.done() and not task.cancelled() and (error := task.exception()) is not None
            )
        if errors:
            stops: list[BaseException] = [
                error for _, error in errors if isinstance(error, CancelledError | LeaseLostError)
            ]
            raise (stops or [error for _, error in errors])[0]
        return {tasks[task][1]: task.result() for task in tasks}

    async def _branch(self, index: int, name: str, spec: StepBranch, tp: Any) -> _Done | _Failed:
        self._execution.check_can_start_step(name)
        return await self._attempt(index, name, spec.fn, spec.args, spec.kwargs, tp, spec.retry)

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
        # At its own position a name is a failed step running again.
        if self._recorded_names.get(name, index) != index:
            raise NonDeterministicReplayError(
                f"non-deterministic replay in run {self.run_id}: step {name!r} was recorded at "
                f"position #{self._recorded_names[name]} but the handler now calls it at #{index}"
            )

    async def _call(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if inspect.iscoroutinefunction(fn):
            return await fn(*args, **kwargs)
        threads = self._execution.sync_threads
        if threads is not None:
            # A blocking callable must not starve the event loop (lease renewal, cancel). The
            # event is set once no sync step of this run is in a thread (step.all runs several).
            done = self._execution.sync_step_done
            done.clear()
            self._sync_steps_running += 1

            def finished() -> None:
                self._sync_steps_running -= 1
                if self._sync_steps_running == 0:
                    done.set()

            result = await threads.run(fn, args, kwargs, on_done=finished)
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
        # Read here, in the caller's context (a branch's task, a sync step's thread), not on
        # the loop's side of _on_loop.
        state = _CURRENT_ATTEMPT.get()
        step_name = state.name if state is not None and state.owner is self else None
        self._on_loop(self._write_log_now, level, message, data, step_name)

    def _write_log_now(self, level: str, message: str, data: Any, step_name: str | None) -> None:
        execution = self._execution
        data_json = None if data is None else json.dumps(data, default=str)
        execution.write_log(
            LogRecord(
                run_id=self.run_id,
                step_name=step_name,
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


def _as_branch(name: Any, value: Any) -> StepBranch:
    """A ``step.all`` value as a branch: ``(fn, *args)``, a bare callable or a ``StepBranch``."""
    if isinstance(value, StepBranch):
        spec = value
    elif isinstance(value, tuple) and value:
        spec = StepBranch(value[0], value[1:])
    elif callable(value):
        spec = StepBranch(value)
    else:
        raise StepError(
            f"step.all branch {name!r}: expected (fn, *args), a callable or step.branch(...), not {value!r}"
        )
    if not callable(spec.fn):
        raise StepError(f"step.all branch {name!r}: {spec.fn!r} is not callable")
    if spec.retry is not None and not isinstance(spec.retry, RetryPolicy):
        raise StepError(f"step.all branch {name!r}: retry must be a RetryPolicy, not {spec.retry!r}")
    if not isinstance(spec.needs_network, bool):
        raise StepError(f"step.all branch {name!r}: needs_network must be True or False")
    return spec


def _error_json(exc: BaseException) -> str:
    info = ErrorInfo.from_exception(exc)
    return json.dumps({"type": info.type, "message": info.message, "traceback": info.traceback})
