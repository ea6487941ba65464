"""The worker: claims runs, keeps their leases alive, executes handlers with replay.

Fencing: every write for a run carries the lease generation it was claimed
with; once another worker re-leases the run (or it is cancelled), the store
refuses those writes and the handler is stopped with ``LeaseLostError`` /
``CancelledError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

from . import ids
from .errors import CancelledError, LeaseLostError, RunTimeoutError, StorageError, VersionMismatchError
from .job import JobDefinition
from .models import ErrorInfo, Progress, from_ms
from .network import ALWAYS_ONLINE, NetworkStatus
from .step import StepContext, _error_json
from .storage.base import NEVER_MS, JobLimits, LogRecord, NewRun, RunRecord, StepRecord, Store
from .threads import SyncStepThreads


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """The worker's settings (validated by ``Durably``); seconds unless named otherwise."""

    polling_interval: float
    lease_duration: float
    lease_renew_interval: float
    max_concurrent_runs: int
    run_sync_in_thread: bool
    preserve_steps: bool
    retain_runs: float | None
    #: A run waiting for the network is tried again after this long even if no "online"
    #: notice came (one may be missed: a page asleep, a browser that sends none).
    offline_recheck_interval: float = 30.0
    #: With run_sync_in_thread: a sync step function seen to return within 1 ms, three
    #: times in a row, runs on the loop's thread with no hand-off (see threads.py).
    inline_short_sync_steps: bool = True


class EventSink(Protocol):
    """Where the worker's events go (``Durably``'s event bus)."""

    def wants(self, event_type: str) -> bool:
        """Whether anyone listens for ``event_type`` (an event nobody wants is not built)."""

    def emit(
        self, event_type: str, run_id: str | None, job_name: str | None, data: dict[str, Any]
    ) -> None: ...


class ErrorReporter(Protocol):
    """Told about errors that are not a job's own (storage failures, lost leases)."""

    def __call__(
        self, exc: BaseException, *, run_id: str | None = None, job_name: str | None = None
    ) -> None: ...


logger = logging.getLogger("durably_web")

#: After a failed claim, the claim loop waits at least this long, doubling per failure in a row.
_FIRST_CLAIM_BACKOFF = 0.1
_LONGEST_CLAIM_BACKOFF = 10.0


def _overdue_error() -> RunTimeoutError:
    return RunTimeoutError("the run passed its deadline while no worker was executing it")


_OVERDUE_ERROR_JSON = _error_json(_overdue_error())


class _ShutdownSignal(BaseException):
    """Raised at a step boundary when the worker is stopping; the run is released, not failed.

    A BaseException so that handlers catching ``Exception`` do not swallow it.
    """


class _Suspend(BaseException):
    """Raised once the run has been made 'waiting' (persisted): the handler stops here and
    the execution ends without touching the run again. A BaseException, like
    ``_ShutdownSignal``, so that handlers catching ``Exception`` do not swallow it."""


class RunExecution:
    """One leased run being executed by this worker."""

    def __init__(self, worker: Worker, record: RunRecord, job: JobDefinition[Any, Any]) -> None:
        self._worker = worker
        self._store = worker.store
        self._events = worker.events
        self._report_error = worker.report_error
        self.now_ms = worker.now_ms
        self.record = record
        self.job = job
        self.run_id = record.id
        self.job_name = record.job_name
        self.attempt = record.attempt
        self.generation = record.lease_generation
        # Until when (ms, this worker's clock) the database is known to hold our lease: set by
        # the claim, moved on by every renewal that got through.
        self.lease_until_ms = record.lease_expires_at
        self.sync_threads = worker.sync_threads
        self.network = worker.network
        # Cleared while a sync step's thread runs; a cancelled run keeps its
        # concurrency key until that thread is done.
        self.sync_step_done = asyncio.Event()
        self.sync_step_done.set()
        # Progress and log lines come from synchronous calls (step.progress, step.log), also
        # from a sync step's thread: they are queued and written in order by one task, and
        # every checkpoint waits for them first (a fenced write that failed is raised there).
        self._writes: deque[Callable[[], Awaitable[None]]] = deque()
        self._writer: asyncio.Task[None] | None = None
        self._write_error: BaseException | None = None
        self.stop_reason: str | None = None  # "cancelled" | "lease-lost" | "shutdown" | "timed-out"
        #: The run's deadline (ms, ``timeout=``): a loop timer (``Worker``) stops the handler at
        #: it, and every step boundary checks it against the clock.
        self.deadline_ms = record.deadline_at
        self.deadline_timer: asyncio.TimerHandle | None = None
        # Set once the execution writes its end (an outcome, a wait): a deadline that passes
        # from then on is left to that write, or to the claim loop for a waiting run.
        self._ending = False
        self.failed_step: StepRecord | None = None
        self.task: asyncio.Task[None] | None = None
        self._task_cancelled = False

    def emit(self, event_type: str, data: dict[str, Any]) -> None:
        self._events.emit(event_type, self.run_id, self.job_name, data)

    def wants(self, event_type: str) -> bool:
        return self._events.wants(event_type)

    def stop(self, reason: str) -> None:
        if self.stop_reason in (None, "shutdown"):
            self.stop_reason = reason
        if reason != "shutdown" and self.task is not None and not self._task_cancelled:
            # Once only: a second cancel would cut short the cleanup after the first.
            self._task_cancelled = True
            self.task.cancel()

    # --- called by StepContext ------------------------------------------------------
    def deadline_passed(self) -> None:
        """The run's deadline is here: stop the handler (a step in flight is cancelled; a sync
        step's thread cannot be, so the run fails once it returns, its result unrecorded)."""
        if not self._ending and self.stop_reason in (None, "shutdown"):
            self.stop("timed-out")

    def _past_deadline(self) -> bool:
        if self.stop_reason == "timed-out":
            return True
        if self.deadline_ms is not None and self.now_ms() >= self.deadline_ms:
            if self.stop_reason is None or self.stop_reason == "shutdown":
                self.stop_reason = "timed-out"
            return self.stop_reason == "timed-out"
        return False

    def timeout_error(self, what: str) -> RunTimeoutError:
        return RunTimeoutError(
            f"run {self.run_id} passed its deadline ({from_ms(self.deadline_ms)}); {what}"
        )

    def check_can_start_step(self, name: str) -> None:
        if self._past_deadline():
            raise self.timeout_error(f"step {name!r} not started")
        if self.stop_reason == "cancelled":
            raise CancelledError(f"run {self.run_id} was cancelled before step {name!r}")
        if self.stop_reason == "lease-lost":
            raise LeaseLostError(f"run {self.run_id}: lease lost before step {name!r}")
        if self.stop_reason == "shutdown":
            raise _ShutdownSignal
        if self.lease_until_ms is not None and self.now_ms() >= self.lease_until_ms:
            # No renewal got through before the lease ran out (the database was unreachable,
            # or this loop stalled): another worker may own the run by now, and the renewal
            # loop would only find out later. Starting the step could run it twice, even at
            # once with its new owner; stop here as a lost lease instead.
            self.stop_reason = "lease-lost"
            raise LeaseLostError(
                f"run {self.run_id}: this worker's lease (generation {self.generation}) ran out "
                f"before it could be renewed; step {name!r} not started"
            )

    def step_failed(self, step: StepRecord, exc: BaseException) -> None:
        self.failed_step = step
        self.emit(
            "step:fail",
            {"step_name": step.name, "step_index": step.index, "error": ErrorInfo.from_exception(exc)},
        )

    async def next_signal(self, name: str) -> tuple[int, str] | None:
        return await self._store.next_signal(self.run_id, name)

    async def consume_signal(self, key: int, step: StepRecord) -> bool:
        await self.flush_writes()
        if await self._store.consume_signal(key, step, self.generation, self.now_ms()):
            return True
        current = await self._store.get_run(self.run_id)
        if current is not None and current.status == "leased" and current.lease_generation == self.generation:
            return False  # the signal was taken; look for the next one
        raise await self.fence_error(f"signal {step.name!r}")

    async def reject_signal(self, key: int, log: LogRecord, data: Any) -> None:
        """Drop a signal the wait's type refused, with a warning in the run's log, so that a
        bad payload from a sender that could not validate it never fails the run."""
        await self.flush_writes()
        if await self._store.reject_signal(key, self.generation, log):
            self.emit(
                "log:write",
                {"level": log.level, "message": log.message, "data": data, "step_name": log.step_name},
            )
            return
        current = await self._store.get_run(self.run_id)
        if current is not None and current.status == "leased" and current.lease_generation == self.generation:
            return  # taken or dropped meanwhile; look for the next one
        raise await self.fence_error(f"signal {log.step_name!r}")

    async def retry_step(self, failed: StepRecord, exc: BaseException, delay: float) -> NoReturn:
        """The failed attempt is recorded and the run waits ``delay`` seconds for the next
        one, in one transaction: a kill at any instant leaves either the attempt in flight
        (it runs again) or the attempt recorded with its retry scheduled."""
        until = self.now_ms() + int(delay * 1000)
        self.emit(
            "step:fail",
            {
                "step_name": failed.name,
                "step_index": failed.index,
                "error": ErrorInfo.from_exception(exc),
                "attempt": failed.attempt,
                "will_retry": True,
            },
        )
        await self.wait_until(
            until,
            reason="retry",
            step_name=failed.name,
            failed_attempt=failed,
            retry_event={
                "step_name": failed.name,
                "step_index": failed.index,
                "attempt": failed.attempt,
                "next_attempt": failed.attempt + 1,
                "delay": delay,
                "error": ErrorInfo.from_exception(exc),
            },
        )

    async def wait_for_branches(
        self,
        retries: Sequence[tuple[StepRecord, BaseException, float]],
        offline_failures: Sequence[tuple[StepRecord, BaseException]],
        offline_step: str | None,
    ) -> NoReturn:
        """Some branches of a ``step.all`` wait, once every other branch has finished and been
        recorded: those to retry (attempt record, error, delay) and, when ``offline_step`` names
        a branch that waits for the network, those that failed for want of it. Their attempts
        are recorded in the one transaction that makes the run wait: for the network (reason
        ``"offline"``, at ``offline_step``) if any branch needs it, else until the earliest
        retry is due (reason ``"retry"``, at that branch). Every waiting branch runs again
        when the run continues."""
        for failed, exc in offline_failures:
            self.emit(
                "step:fail",
                {
                    "step_name": failed.name,
                    "step_index": failed.index,
                    "error": ErrorInfo.from_exception(exc),
                    "attempt": failed.attempt,
                    "will_retry": True,
                    "offline": True,
                },
            )
        retry_events = []
        for failed, exc, delay in retries:
            error = ErrorInfo.from_exception(exc)
            self.emit(
                "step:fail",
                {
                    "step_name": failed.name,
                    "step_index": failed.index,
                    "error": error,
                    "attempt": failed.attempt,
                    "will_retry": True,
                },
            )
            retry_events.append(
                {
                    "step_name": failed.name,
                    "step_index": failed.index,
                    "attempt": failed.attempt,
                    "next_attempt": failed.attempt + 1,
                    "delay": delay,
                    "error": error,
                }
            )
        attempts = [failed for failed, _ in offline_failures] + [failed for failed, _, _ in retries]
        now = self.now_ms()
        if offline_step is not None:
            until = now + int(self._worker.config.offline_recheck_interval * 1000)
            reason, step_name = "offline", offline_step
        else:
            soonest, _, delay = min(retries, key=lambda retry: (retry[2], retry[0].index))
            until = now + int(delay * 1000)
            reason, step_name = "retry", soonest.name
        await self.wait_until(
            until,
            reason=reason,
            step_name=step_name,
            failed_attempts=attempts,
            retry_events=retry_events,
        )

    async def record_failed_step(self, step: StepRecord) -> None:
        """Keep a failed step in the run's history without ending the run (a ``step.all``
        branch that failed for good; the run's failure, if it comes to that, rewrites it)."""
        await self.flush_writes()
        if not await self._store.record_step(step, self.generation):
            raise await self.fence_error(f"step {step.name!r}")

    async def wait_offline(
        self, step_name: str, failed: StepRecord | None = None, exc: BaseException | None = None
    ) -> NoReturn:
        """The network is down: the run waits (reason ``"offline"``) until the worker hears it
        is back, or the recheck interval has passed. ``failed``, the attempt that hit a network
        error, is recorded with it (flagged ``offline``: it uses up no retry)."""
        if failed is not None and exc is not None:
            self.emit(
                "step:fail",
                {
                    "step_name": failed.name,
                    "step_index": failed.index,
                    "error": ErrorInfo.from_exception(exc),
                    "attempt": failed.attempt,
                    "will_retry": True,
                    "offline": True,
                },
            )
        recheck_ms = int(self._worker.config.offline_recheck_interval * 1000)
        await self.wait_until(
            self.now_ms() + recheck_ms, reason="offline", step_name=step_name, failed_attempt=failed
        )

    async def wait_until(
        self,
        until: int,
        *,
        reason: str,
        step_name: str,
        step: StepRecord | None = None,
        failed_attempt: StepRecord | None = None,
        retry_event: dict[str, Any] | None = None,
        deadline: int | None = None,
        failed_attempts: Sequence[StepRecord] = (),
        retry_events: Sequence[dict[str, Any]] = (),
        child_run_id: str | None = None,
    ) -> NoReturn:
        """Make the run 'waiting' until ``until`` (ms): it gives up its lease and worker slot,
        and any worker claims it once due. Never returns: raises ``_Suspend``."""
        await self.flush_writes()
        if self._past_deadline():
            raise self.timeout_error(f"{reason} of step {step_name!r} not recorded")
        self._ending = True
        ok = await self._store.wait_run(
            self.run_id,
            self.generation,
            until=until,
            reason=reason,
            step_name=step_name,
            now=self.now_ms(),
            failed_attempt=failed_attempt,
            step=step,
            deadline=deadline,
            failed_attempts=failed_attempts,
            child_run_id=child_run_id,
        )
        if not ok:
            raise await self.fence_error(f"{reason} of step {step_name!r}")
        for event in [*([] if retry_event is None else [retry_event]), *retry_events]:
            self.emit("step:retry", event)
        due_at = None if until >= NEVER_MS else from_ms(until)  # a signal wait without timeout
        waiting: dict[str, Any] = {"reason": reason, "step_name": step_name, "due_at": due_at}
        if child_run_id is not None:
            waiting["child_run_id"] = child_run_id
        self.emit("run:waiting", waiting)
        if until < NEVER_MS:
            self._worker.wake_at(until)
        if self.deadline_ms is not None and self.deadline_ms < until:
            self._worker.wake_at(self.deadline_ms)  # the claim loop fails it then (fail_overdue_runs)
        raise _Suspend

    async def record_step(self, step: StepRecord) -> None:
        if self._writer is not None or self._write_error is not None:  # the hot path skips a call
            await self.flush_writes()
        if self.deadline_ms is not None and self._past_deadline():
            # A step that ended after the deadline (a sync step, which nothing can interrupt)
            # is not recorded: the run fails as of its deadline.
            raise self.timeout_error(f"step {step.name!r} ended after it and is not recorded")
        if not await self._store.record_step(step, self.generation):
            raise await self.fence_error(f"step {step.name!r}")
        if self._events.wants("step:complete"):
            self.emit(
                "step:complete",
                {
                    "step_name": step.name,
                    "step_index": step.index,
                    "output": json.loads(step.output_json) if step.output_json else None,
                    "duration_ms": step.completed_at - step.started_at,
                },
            )

    # --- child runs (durably_web/children.py) --------------------------------------------
    def find_job(self, name: str) -> JobDefinition[Any, Any] | None:
        return self._worker.jobs.get(name)

    async def get_run(self, run_id: str) -> RunRecord | None:
        return await self._store.get_run(run_id)

    async def start_child(self, child: NewRun, step: StepRecord) -> None:
        """Create the child run and record the parent's checkpoint, in one transaction."""
        await self.flush_writes()
        if not await self._store.start_child(child, step, self.generation):
            raise await self.fence_error(f"child run of step {step.name!r}")
        labels = dict(child.labels)
        self._events.emit(
            "run:trigger",
            child.id,
            child.job_name,
            {"input": json.loads(child.input_json), "labels": labels, "parent_run_id": self.run_id},
        )
        if self._events.wants("step:complete"):
            self.emit(
                "step:complete",
                {
                    "step_name": step.name,
                    "step_index": step.index,
                    "output": json.loads(step.output_json or "null"),
                    "duration_ms": step.completed_at - step.started_at,
                },
            )
        self._worker.wake()  # this worker may run the child itself

    def set_progress(self, current: int, total: int | None, message: str | None) -> None:
        """Queue a progress write (on the loop's thread); ``run:progress`` follows it. Once
        the run is known to be lost or cancelled, refuse at once, as a fenced write would."""
        if self.stop_reason == "lease-lost":
            raise LeaseLostError(f"run {self.run_id}: lease lost; progress not recorded")
        if self.stop_reason == "cancelled":
            raise CancelledError(f"run {self.run_id} was cancelled; progress not recorded")

        async def write() -> None:
            now = self.now_ms()
            if not await self._store.set_progress(self.run_id, self.generation, current, total, message, now):
                raise await self.fence_error("progress")
            self.emit("run:progress", {"progress": Progress(current, total, message)})

        self._queue_write(write)

    def write_log(self, log: LogRecord, data: Any) -> None:
        """Queue a log line (on the loop's thread); ``log:write`` follows it."""

        async def write() -> None:
            await self._store.append_log(log)
            self.emit(
                "log:write",
                {"level": log.level, "message": log.message, "data": data, "step_name": log.step_name},
            )

        self._queue_write(write)

    def _queue_write(self, write: Callable[[], Awaitable[None]]) -> None:
        self._writes.append(write)
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(
                self._drain_writes(), name=f"durably-writes-{self.run_id}"
            )

    async def _drain_writes(self) -> None:
        try:
            while self._writes:
                await self._writes.popleft()()
        except BaseException as exc:
            self._writes.clear()  # after a fenced write failed, nothing more of ours lands
            if self._write_error is None:
                self._write_error = exc
        finally:
            self._writer = None

    async def flush_writes(self) -> None:
        """Wait for queued progress and log writes; raise the first one's failure."""
        writer = self._writer
        if writer is not None:
            # Shielded: a cancelled run still writes what it reported before the cancel.
            await asyncio.shield(writer)
        if self._write_error is not None:
            error, self._write_error = self._write_error, None
            raise error

    async def _settle_writes(self) -> None:
        """At the end of an execution: let queued writes finish, whatever they raise."""
        writer = self._writer
        if writer is not None:
            await asyncio.wait([writer])
        self._write_error = None

    async def fence_error(self, what: str) -> Exception:
        current = await self._store.get_run(self.run_id)
        if current is None or current.status == "cancelled":
            self.stop_reason = "cancelled"
            return CancelledError(f"run {self.run_id} was cancelled or deleted; {what} not recorded")
        self.stop_reason = "lease-lost"
        return LeaseLostError(
            f"run {self.run_id}: this worker's lease (generation {self.generation}) was taken over; "
            f"{what} not recorded"
        )

    # --- the run itself ------------------------------------------------------------------
    @property
    def ending(self) -> bool:
        """Whether the run's outcome or wait is being written (the handler is done with it)."""
        return self._ending

    async def execute(self) -> None:
        try:
            await self._execute()
        except GeneratorExit:
            # The task is being destroyed with its loop (dropped without stop(), as a killed
            # process's is; see StepContext._attempt), not cancelled: nothing more of this run
            # happens here, no write and no await. Its lease lapses and another worker takes over.
            raise
        except BaseException:
            await self._settle_writes()
            raise
        await self._settle_writes()

    async def _execute(self) -> None:
        store = self._store
        try:
            # A first claim of a run that is not a fork has no steps yet (a claim counts in
            # attempt; only fork_run writes steps before one): spare the query on the hot path.
            first = self.attempt == 1 and self.record.forked_from is None
            steps = [] if first else await store.list_steps(self.run_id)
            # Completed steps replay; failed ones (a step.all branch the handler caught) run
            # again at their position, but their names stay taken (StepContext).
            recorded = {step.index: step for step in steps if step.status == "completed"}
            failed = {step.index: step for step in steps if step.status != "completed"}
            # A first execution has no earlier attempts: spare the query on the hot path.
            failed_attempts = await store.count_step_attempts(self.run_id) if self.attempt > 1 else {}
            leased: dict[str, Any] = {"attempt": self.attempt, "replayed_steps": len(recorded)}
            if self.record.trace_parent is not None:  # the trigger's trace (durably_web.tracing)
                leased["trace_parent"] = self.record.trace_parent
            self.emit("run:leased", leased)
            if self._past_deadline():  # claimed after its deadline passed: nothing of it runs
                await self._fail_timed_out("no handler started")
                return
            started_by = self.record.version
            if started_by is not None and started_by != self.job.version:
                # Claimed although another version started it: the claim query leaves such runs
                # to their own version unless this job continues or fails them.
                if self.job.on_version_mismatch == "fail":
                    error = VersionMismatchError(
                        f"run {self.run_id} of job {self.job_name!r} was started by version "
                        f"{started_by!r}; this worker runs version {self.job.version!r}"
                    )
                    await self._finish("failed", output_json=None, error=error)
                    return
                if self.job.on_version_mismatch == "leave":  # a store that ignored pinned_versions
                    await self._release()
                    return
            step = StepContext(self, recorded, failed_attempts, failed)
            payload = self.job.decode_input(self.record.input_json)
            result = await self.job.handler(step, payload)
            step._end_replay()  # a handler that only replayed may still have progress to record
            await self.flush_writes()
            if self._past_deadline():  # the handler swallowed RunTimeoutError and returned
                await self._fail_timed_out("its output is not recorded")
                return
            output_json = self.job.encode_output(result)
            await self._finish("completed", output_json=output_json, error=None)
        except asyncio.CancelledError:
            if self.stop_reason == "cancelled":
                await self._stopped_after_cancel()
            elif self.stop_reason == "timed-out":
                await self._fail_timed_out("the handler was stopped")
            elif self.stop_reason != "lease-lost":
                await self._release()
        except _Suspend:
            pass  # the run is waiting (persisted); nothing of it is ours any more
        except _ShutdownSignal:
            await self._release()
        except (CancelledError, LeaseLostError) as exc:
            if isinstance(exc, LeaseLostError):
                self._report_error(exc, run_id=self.run_id, job_name=self.job_name)
            elif self.stop_reason == "cancelled":
                await self._stopped_after_cancel()
        except StorageError as exc:
            # The database failed, not the job: leave the run to be retried.
            self._report_error(exc, run_id=self.run_id, job_name=self.job_name)
            await self._release()
        except Exception as exc:
            if self.stop_reason == "timed-out":
                await self._fail_timed_out("the handler was stopped")  # whatever it made of it
            elif self.stop_reason == "cancelled":
                await self._stopped_after_cancel()  # the handler turned our stop into its own error
            elif self.stop_reason != "lease-lost":
                await self._finish("failed", output_json=None, error=exc)

    async def _stopped_after_cancel(self) -> None:
        """Free the run's concurrency key once nothing of the handler runs any more."""
        await self.sync_step_done.wait()
        await self._release()

    async def _fail_timed_out(self, what: str) -> None:
        """Fail the run with ``RunTimeoutError`` once nothing of its handler runs any more (a
        sync step's thread is waited for: the run fails at that boundary)."""
        await self.sync_step_done.wait()
        self.failed_step = None
        await self._finish("failed", output_json=None, error=self.timeout_error(what))

    async def _finish(self, status: str, *, output_json: str | None, error: BaseException | None) -> None:
        self._ending = True
        failed_step = self.failed_step if error is not None else None
        try:
            if error is not None:
                await self._settle_writes()  # the failure's own log lines, if any, land first
            ok = await self._store.finish_run(
                self.run_id,
                self.generation,
                status=status,
                output_json=output_json,
                error_json=None if error is None else _error_json(error),
                failed_step=failed_step,
                drop_step_outputs=not self._worker.config.preserve_steps,
                now=self.now_ms(),
            )
        except StorageError as exc:
            self._report_error(exc, run_id=self.run_id, job_name=self.job_name)
            await self._release()
            return
        if not ok:
            fence = await self.fence_error(f"{status} outcome")
            if isinstance(fence, LeaseLostError):
                self._report_error(fence, run_id=self.run_id, job_name=self.job_name)
            return
        if self.record.parent_run_id is not None:
            self._worker.wake()  # its parent may be due now (the store made it so) and run here
        if status == "completed":
            output = self.job.decode_output(output_json) if self._events.wants("run:complete") else None
            self.emit("run:complete", {"output": output})
        else:
            assert error is not None
            data: dict[str, Any] = {"error": ErrorInfo.from_exception(error)}
            if failed_step is not None:
                data["step_name"] = failed_step.name
            self.emit("run:fail", data)

    async def _release(self) -> None:
        await self._settle_writes()  # what the handler reported before it stopped lands first
        try:
            await self._store.release_run(self.run_id, self.generation, self.now_ms())
        except StorageError as exc:
            self._report_error(exc, run_id=self.run_id, job_name=self.job_name)
        else:
            self._worker.wake()  # the run is claimable again (here too)


class Worker:
    """Claims and executes runs of the registered jobs on one store.

    It knows only what it is given: the store, the job registry (a live mapping: jobs
    registered later are claimed too), its settings, where events go, the clock and
    where to report errors that are not a job's own.
    """

    def __init__(
        self,
        *,
        store: Store,
        jobs: Mapping[str, JobDefinition[Any, Any]],
        config: WorkerConfig,
        events: EventSink,
        now_ms: Callable[[], int],
        report_error: ErrorReporter,
        network: NetworkStatus = ALWAYS_ONLINE,
        schedules: Callable[[], Awaitable[int | None]] | None = None,
    ) -> None:
        self.store = store
        self.jobs = jobs
        self.config = config
        self.events = events
        self.now_ms = now_ms
        self.report_error = report_error
        self.network = network
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{ids.new_id()[-8:]}"
        self.active: dict[str, RunExecution] = {}
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._loop_task: asyncio.Task[None] | None = None
        self._renew_task: asyncio.Task[None] | None = None
        self._stop_watching: Callable[[], None] | None = None
        self._last_purge_ms = 0
        self.sync_threads: SyncStepThreads | None = None
        self._timers: set[asyncio.TimerHandle] = set()
        # Set when the network came back: the claim loop makes the runs waiting for it due.
        self._network_returned = False
        self._stop_watching_network: Callable[[], None] | None = None
        # Flow control (define_job max_concurrent / rate_limit / debounce), see _flow_limits.
        self._flow: dict[str, JobLimits] = {}
        self._flow_job_count = -1
        self._flow_timed = False
        self._flow_wake_ms: int | None = None
        # Fires due schedule ticks and returns the next one (ms); looked at when that tick is
        # due, or after a polling interval at most (another process may add an earlier one).
        self.schedules = schedules
        self._next_schedule_check = 0
        self._schedule_timer: asyncio.TimerHandle | None = None
        self._schedules_failing = False
        # Starting a run at once (start_at_once): every wake-up that may bring a claimable
        # run counts in _wakes; _nothing_since is the count at the last look that found none.
        # While the two are equal, no run known here waits ahead of a new one.
        self._wakes = 0
        self._nothing_since = -1
        # Slots taken by runs being created leased (start_at_once) and not started yet.
        self._reserved = 0
        self._no_starts_in_flight = asyncio.Event()
        self._context = contextvars.Context()
        self._no_starts_in_flight.set()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._context = contextvars.copy_context()  # what every run task starts from
        if self.config.run_sync_in_thread:
            self.sync_threads = SyncStepThreads(
                self._loop, inline_short_calls=self.config.inline_short_sync_steps
            )
        if self.store.notifies_changes:
            # Another process's new run, release, resume or signal wakes the claim loop at
            # once; polling stays as the fallback.
            self._stop_watching = await self.store.watch_changes(lambda run_id, status: self.wake())
        self._stop_watching_network = self.network.watch(self._on_network_returned)
        # Runs left waiting for the network by an earlier process (a page reloaded while
        # offline) continue now if it is there, not at their recheck time.
        self._network_returned = self.network.online()
        self._loop_task = asyncio.create_task(self._claim_loop(), name="durably-worker")
        self._renew_task = asyncio.create_task(self._renew_loop(), name="durably-lease-renewal")

    def wake(self) -> None:
        """Look for claimable runs now: one may have been created or become due."""
        self._wakes += 1
        self._wake.set()

    @property
    def found_nothing_to_claim(self) -> bool:
        """Whether this worker's last look found no claimable run and nothing that may have
        brought one (a trigger here, a timer, a notification) came since."""
        return self._nothing_since == self._wakes

    def _can_start_at_once(self, new: NewRun) -> bool:
        job = self.jobs.get(new.job_name)
        return (
            job is not None
            and self._loop is not None
            and not self._stopping
            and self.found_nothing_to_claim
            and len(self.active) + self._reserved < self.config.max_concurrent_runs
            and job.limits is None
            and job.debounce is None
            and new.idempotency_key is None
            and new.concurrency_key is None
            and not new.debounce_ms
        )

    async def start_at_once(self, new: NewRun) -> RunRecord | None:
        """Create ``new`` leased to this worker and start executing it, when that is what a
        claim right after a pending insert would do: this worker is running with a free
        slot, its last look found nothing to claim and nothing that may have brought a run
        came since (so none known here waits ahead of this one), and neither the run nor its
        job has anything a claim must check (keys, flow limits, debounce). The run skips the
        queue and its claim costs no write of its own (Store.create_leased_run).

        Returns the created run, or None when the caller should create it pending as usual.
        """
        if not self._can_start_at_once(new):
            return None
        # The slot stays taken while the insert is in flight, and stop() waits for it.
        self._reserved += 1
        self._no_starts_in_flight.clear()
        try:
            record = await self.store.create_leased_run(
                new,
                worker_id=self.worker_id,
                lease_until=new.created_at + int(self.config.lease_duration * 1000),
            )
            if self._stopping:  # stop() began while the insert was in flight: hand it back
                await self.store.release_run(record.id, record.lease_generation, self.now_ms())
            else:
                self._start(record, self.now_ms())
            return record
        finally:
            self._reserved -= 1
            if not self._reserved:
                self._no_starts_in_flight.set()

    def _on_network_returned(self) -> None:
        """The network is back: the claim loop (not this callback, which may come from a
        browser event) makes the runs waiting for it due, then claims them."""
        self._network_returned = True
        self.wake()

    async def _wake_offline_runs(self) -> None:
        self._network_returned = False
        try:
            await self.store.wake_offline_runs(self.now_ms())
        except BaseException:
            self._network_returned = True  # tried again at the next turn of the loop
            raise

    def wake_at(self, until_ms: int) -> None:
        """Wake the claim loop when a run this worker made wait is due (a loop timer, so a
        local sleep or retry continues at once, not at the next poll). Other workers find
        it by polling; the due time itself is in the database."""
        if self._loop is None or self._stopping:
            return
        # A millisecond late, so the claim query's clock reading is past the due time.
        delay = max(0.0, (until_ms - self.now_ms() + 1) / 1000)
        handle: asyncio.TimerHandle | None = None

        def fire() -> None:
            self._timers.discard(handle)
            self.wake()

        handle = self._loop.call_later(delay, fire)
        self._timers.add(handle)

    async def _claim_loop(self) -> None:
        failures = 0  # claims in a row that failed (the database is down or unreachable)
        while not self._stopping:
            self._wake.clear()
            try:
                if self._network_returned:
                    await self._wake_offline_runs()
                await self._fail_overdue_runs()
                if self.schedules is not None and self.now_ms() >= self._next_schedule_check:
                    try:
                        await self._fire_schedules(self.schedules)
                        self._schedules_failing = False
                    except Exception as exc:  # a schedule's trouble never stops the claims
                        if not self._schedules_failing:  # an outage is reported once, not every poll
                            self.report_error(exc)
                        self._schedules_failing = True
                await self._claim_available()
                await self._purge_if_due()
            except Exception as exc:
                failures += 1
                if failures == 1 or failures % 10 == 0:  # an outage is reported, not every poll of it
                    self.report_error(exc)
            else:
                if failures:
                    logger.warning("durably-web worker: storage answers again (%d failed claims)", failures)
                failures = 0
            # While claims fail, wait longer each time (up to _LONGEST_CLAIM_BACKOFF) instead of
            # hammering a database that is restarting; notifications still wake the loop early.
            wait = self.config.polling_interval
            if failures:
                wait = max(wait, min(_FIRST_CLAIM_BACKOFF * 2 ** (failures - 1), _LONGEST_CLAIM_BACKOFF))
            try:
                # asyncio.timeout, not wait_for: no task per poll (wait_for wraps one in 3.11).
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _flow_limits(self) -> dict[str, JobLimits]:
        """The flow limits of the registered jobs, rebuilt only when a job was registered."""
        if self._flow_job_count != len(self.jobs):
            self._flow_job_count = len(self.jobs)
            self._flow = {name: job.limits for name, job in self.jobs.items() if job.limits is not None}
            self._flow_timed = bool(self._flow) or any(job.debounce is not None for job in self.jobs.values())
        return self._flow

    def schedules_changed(self) -> None:
        """A schedule was added, changed or resumed here: look at the schedules at once."""
        self._next_schedule_check = 0
        self.wake()

    async def _fire_schedules(self, fire_due: Callable[[], Awaitable[int | None]]) -> None:
        # Looked at again in a polling interval even if it fails (the loop reports the error).
        self._next_schedule_check = self.now_ms() + int(self.config.polling_interval * 1000)
        next_tick = await fire_due()
        if next_tick is None or next_tick <= self.now_ms():
            # None due later, or one this process could not fire (still due): the next poll.
            return
        self._next_schedule_check = min(self._next_schedule_check, next_tick)
        # One timer, at the next tick (a millisecond late so the clock reads past it).
        if self._schedule_timer is not None:
            self._schedule_timer.cancel()
        if self._loop is not None and not self._stopping:
            delay = max(0.0, (next_tick - self.now_ms() + 1) / 1000)
            self._schedule_timer = self._loop.call_later(delay, self.wake)

    async def _fail_overdue_runs(self) -> None:
        """Deadlines of runs no worker is executing (waiting, pending, abandoned): whichever
        worker's claim loop comes first fails them, also one that started after they passed."""
        failed = await self.store.fail_overdue_runs(
            self.now_ms(), error_json=_OVERDUE_ERROR_JSON, drop_step_outputs=not self.config.preserve_steps
        )
        if failed and self.events.wants("run:fail"):
            error = ErrorInfo.from_exception(_overdue_error())
            for record in failed:
                self.events.emit("run:fail", record.id, record.job_name, {"error": error})


    async def _claim_available(self) -> None:
        job_names = list(self.jobs)
        if not job_names:
            return
        lease_ms = int(self.config.lease_duration * 1000)
        limits = self._flow_limits()
        # Safe deploys: this worker's version of each job (recorded by a first claim), and the
        # jobs whose started runs it leaves to the version that started them.
        versions = {name: job.version for name, job in self.jobs.items()}
        pinned = {name: job.version for name, job in self.jobs.items() if job.on_version_mismatch == "leave"}
        if len(self.active) + self._reserved >= self.config.max_concurrent_runs:
            self._nothing_since = -1  # no look at all: what waits is unknown
        while not self._stopping and len(self.active) + self._reserved < self.config.max_concurrent_runs:
            now = self.now_ms()
            wakes = self._wakes
            record = await self.store.claim_run(
                worker_id=self.worker_id,
                job_names=job_names,
                now=now,
                lease_until=now + lease_ms,
                versions=versions,
                pinned_versions=pinned,
                limits=limits or None,
            )
            if record is None:
                self._nothing_since = wakes
                if self._flow_timed:
                    await self._wake_when_flow_allows(job_names, limits, now)
                return
            if self._stopping:  # stop() began while the claim was in flight: hand it back
                await self.store.release_run(record.id, record.lease_generation, self.now_ms())
                return
            self._nothing_since = -1  # found one: whether more wait is unknown until the next look
            self._start(record, now)

    def _start(self, record: RunRecord, now: int) -> None:
        """Execute a run this worker holds the lease of, as a task of its own."""
        execution = RunExecution(self, record, self.jobs[record.job_name])
        self.active[record.id] = execution
        # In the worker's own context, whether claimed by its loop or started at once from a
        # caller's trigger_and_wait: the caller's context variables are not the job's.
        execution.task = asyncio.create_task(
            self._run(execution), name=f"durably-run-{record.id}", context=self._context.copy()
        )
        if record.deadline_at is not None and self._loop is not None:
            delay = max(0.0, (record.deadline_at - now) / 1000)
            execution.deadline_timer = self._loop.call_later(delay, execution.deadline_passed)

    async def _wake_when_flow_allows(
        self, job_names: list[str], limits: Mapping[str, JobLimits], now: int
    ) -> None:
        """Nothing to claim, but a debounced run or a full rate window may allow a claim
        later without anyone writing: one timer for that moment, not a faster poll."""
        at = await self.store.next_claimable_at(job_names=job_names, limits=limits, now=now)
        if at is not None and at != self._flow_wake_ms:
            self._flow_wake_ms = at
            self.wake_at(at)

    async def _run(self, execution: RunExecution) -> None:
        try:
            await execution.execute()
        finally:
            if execution.deadline_timer is not None:
                execution.deadline_timer.cancel()
            # Only this execution's entry: after a lease lapse this worker may have
            # claimed the run again, and the new execution must stay renewed.
            if self.active.get(execution.run_id) is execution:
                del self.active[execution.run_id]
            # Not when the task is being discarded with its closed loop (a killed
            # process, simulated): waking the claim loop would need that loop.
            if self._loop is not None and not self._loop.is_closed() and self._slot_may_be_wanted(execution):
                self._wake.set()

    def _slot_may_be_wanted(self, ended: RunExecution) -> bool:
        """Whether the slot ``ended`` frees may let the claim loop take a run it could not.
        Not when its last look found nothing claimable and nothing came since, unless the
        run held back others: a concurrency key, or a job whose max_concurrent it counted.
        (What a run's end makes due, a parent, is woken for on its own.)"""
        return (
            not self.found_nothing_to_claim
            or ended.record.concurrency_key is not None
            or ended.job.limits is not None
        )

    async def _purge_if_due(self) -> None:
        retain = self.config.retain_runs
        if retain is None:
            return
        now = self.now_ms()
        if now - self._last_purge_ms < min(60.0, retain) * 1000:
            return
        self._last_purge_ms = now
        await self.store.purge_runs(now - int(retain * 1000), limit=1000)

    async def _renew_loop(self) -> None:
        lease_ms = int(self.config.lease_duration * 1000)
        while not self._stopping:
            await asyncio.sleep(self.config.lease_renew_interval)
            if not self.active:
                continue
            try:
                now = self.now_ms()
                until = now + lease_ms
                active = self.active.items()
                # A timed-out run keeps its lease while its handler winds down (a sync step's
                # thread), so no other worker takes it over before it is failed.
                renewed = (None, "shutdown", "timed-out")
                running = [(i, ex.generation) for i, ex in active if ex.stop_reason in renewed]
                for ex in list(self.active.values()):
                    # Deadlines by the clock too: the loop timer follows the loop's own time,
                    # which an injected clock (or a suspended laptop) does not move along.
                    if ex.deadline_ms is not None and now >= ex.deadline_ms:
                        ex.deadline_passed()
                stopping = [(i, ex.generation) for i, ex in active if ex.stop_reason == "cancelled"]
                lost = await self.store.renew_leases(running, now, until) if running else []
                if stopping:
                    await self.store.renew_leases(stopping, now, until, cancelled=True)
            except Exception as exc:
                self.report_error(exc)
                continue
            for run_id, generation in running:
                execution = self.active.get(run_id)
                if run_id not in lost and execution is not None and execution.generation == generation:
                    execution.lease_until_ms = until
            for run_id in lost:
                execution = self.active.get(run_id)
                # A run whose outcome or wait is being written may have committed it between
                # the renewal's look at self.active and its UPDATE: not a lost lease. Its own
                # write is fenced and reports a real takeover.
                if execution is not None and not execution.ending:
                    fence = await execution.fence_error("lease renewal")
                    if isinstance(fence, LeaseLostError):  # a cancel is not an error; a takeover is
                        self.report_error(fence, run_id=run_id, job_name=execution.job_name)
                    execution.stop("cancelled" if isinstance(fence, CancelledError) else "lease-lost")

    async def stop(self, timeout: float) -> None:
        """Stop claiming; let handlers stop at their next step boundary, then release leases.

        When this returns, no task this worker started is left (claim loop, lease
        renewal, runs, their queued writes) and the sync-step threads have exited,
        unless one is still blocked inside a step after ``timeout`` (it is reported; a
        thread cannot be interrupted).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._stopping = True
        self._wake.set()
        if self._stop_watching is not None:
            self._stop_watching()
            self._stop_watching = None
        if self._stop_watching_network is not None:
            self._stop_watching_network()
            self._stop_watching_network = None
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        if self._schedule_timer is not None:
            self._schedule_timer.cancel()
            self._schedule_timer = None
        background = [task for task in (self._loop_task, self._renew_task) if task is not None]
        # The claim loop is not cancelled mid-claim (a claimed run would keep its lease until
        # it expired): it sees _stopping and ends by itself; only its wait is cut short.
        if self._renew_task is not None:
            self._renew_task.cancel()
        executions = list(self.active.values())
        for execution in executions:
            execution.stop("shutdown")
        tasks = [ex.task for ex in executions if ex.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if background:
            _, pending = await asyncio.wait(background, timeout=max(0.0, deadline - loop.time()))
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        # A run being created leased is started or handed back before the store may close.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, deadline - loop.time())):
                await self._no_starts_in_flight.wait()
        # Runs claimed by the claim loop (or started at once) after the first look at self.active.
        late = [ex.task for ex in self.active.values() if ex.task is not None and not ex.task.done()]
        for execution in list(self.active.values()):
            execution.stop("shutdown")
        if late:
            await asyncio.wait(late)
        if self.sync_threads is not None:
            threads, self.sync_threads = self.sync_threads, None
            # Idle threads exit within microseconds; leave them a moment even when the
            # handlers used up the timeout.
            if not await threads.shutdown(max(1.0, deadline - loop.time())):
                self.report_error(
                    RuntimeError(
                        "a sync step is still running in its thread after the shutdown timeout; "
                        "the thread ends when the step's callable returns"
                    )
                )
