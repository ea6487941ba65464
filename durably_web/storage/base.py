"""The storage interface the engine talks to, and the records it exchanges.

Storage sees opaque JSON text for inputs, outputs, errors and step results:
serialization stays in the core. Times are integer milliseconds since the
epoch (UTC). Operations marked *fenced* only take effect while the run is
leased under the given lease generation, and return ``False`` otherwise, so a
worker whose lease was taken over cannot write anything more for that run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

#: The wake-up time of a wait with no deadline (a signal wait without timeout): 9999-12-31.
NEVER_MS = 253_402_300_799_000


@dataclass(frozen=True, slots=True)
class NewRun:
    id: str
    job_name: str
    input_json: str
    labels: dict[str, str]
    idempotency_key: str | None
    concurrency_key: str | None
    coalesce: bool
    created_at: int
    forked_from: str | None = None
    #: Flow control: claimed before runs of lower priority (then oldest first).
    priority: int = 0
    #: Tracing: the W3C ``traceparent`` of the span current at trigger time (opaque here).
    trace_parent: str | None = None
    #: Debounce (needs ``concurrency_key``): the run starts this long after its last trigger;
    #: a pending, never started run of the same job and key takes this trigger's input and
    #: not-before time instead of a new run being created ("debounced").
    debounce_ms: int | None = None
    #: A child run (``step.start_child``): the run whose step started it.
    parent_run_id: str | None = None
    #: When the run fails with RunTimeoutError (ms; created_at + its timeout), or None.
    deadline_at: int | None = None
    #: The job's version as the triggering process knows it (None: it does not know the
    #: job); the first claim records the claiming worker's version instead.
    version: str | None = None


@dataclass(frozen=True, slots=True)
class JobLimits:
    """Flow control of one job, honoured by ``claim_run`` across every worker that passes it.

    ``max_concurrent``: at most this many runs of the job under a live lease (cancelled runs
    whose handler is still stopping included). ``rate_count`` per ``rate_window_ms``: at most
    this many runs of the job *started* (first claimed: ``started_at``) in any sliding window
    of that length; a run claimed again (after a wait, a crash or a resume) is not a new start.
    """

    max_concurrent: int | None = None
    rate_count: int | None = None
    rate_window_ms: int | None = None


@dataclass(slots=True)
class RunRecord:
    id: str
    job_name: str
    status: str
    input_json: str
    output_json: str | None
    error_json: str | None
    labels: dict[str, str]
    progress_current: int | None
    progress_total: int | None
    progress_message: str | None
    attempt: int
    idempotency_key: str | None
    concurrency_key: str | None
    lease_owner: str | None
    lease_generation: int
    lease_expires_at: int | None
    available_at: int
    created_at: int
    started_at: int | None
    completed_at: int | None
    updated_at: int
    wait_reason: str | None = None  # the last wait: "retry" | "sleep" | "signal" | "offline"
    wait_step: str | None = None
    forked_from: str | None = None
    wait_deadline: int | None = None  # a signal wait's timeout (ms), fixed on first execution
    priority: int = 0
    trace_parent: str | None = None
    parent_run_id: str | None = None  # a child run: the run whose step started it
    wait_child_id: str | None = None  # waiting with reason "child": the child run it waits for
    deadline_at: int | None = None  # the run's own deadline (ms): past it, it fails (timeout=)
    version: str | None = None  # the job version that started it (before that: the trigger's)

    @property
    def wake_at(self) -> int | None:
        """While waiting: when the run continues (ms); ``None`` for a signal wait without timeout."""
        return self.available_at if self.status == "waiting" and self.available_at < NEVER_MS else None


@dataclass(frozen=True, slots=True)
class StepRecord:
    run_id: str
    index: int
    name: str
    status: str  # "completed" | "failed"
    output_json: str | None
    error_json: str | None
    started_at: int
    completed_at: int
    #: "run" | "sleep" (output: the due time in ms) | "signal" (the outcome) | "child" (output:
    #: the started child's handle) | "child_wait" (output: the child's outcome)
    kind: str = "run"
    attempt: int = 1
    #: A failed attempt that hit a network error while the browser was offline: kept in the
    #: history, numbered, but not counted against the step's retry budget.
    offline: bool = False
    #: JSON the step attached to this attempt (``step.attempt.set_metadata``); kept when
    #: step outputs are dropped.
    metadata_json: str | None = None


@dataclass(frozen=True, slots=True)
class LogRecord:
    run_id: str
    step_name: str | None
    level: str
    message: str
    data_json: str | None
    created_at: int


@dataclass(frozen=True, slots=True)
class RunFilter:
    statuses: Sequence[str] | None = None
    job_names: Sequence[str] | None = None
    labels: dict[str, str] = field(default_factory=dict)
    limit: int = 100
    offset: int = 0
    #: Only the children of this run (``step.start_child``).
    parent_run_id: str | None = None
    versions: Sequence[str] | None = None


@dataclass(frozen=True, slots=True)
class ScheduleRecord:
    """A schedule as stored: the run of ``job_name`` with ``input_json`` that each tick of
    ``cron`` (read in ``timezone``) creates, and when the next tick is due (ms)."""

    name: str
    job_name: str
    cron: str
    timezone: str
    input_json: str
    catch_up: str  # "latest" | "all"
    paused: bool
    next_tick_at: int
    last_tick_at: int | None
    last_run_id: str | None
    created_at: int
    updated_at: int


class WouldBlock(Exception):
    """A ``*_nowait`` store call cannot answer without waiting."""


ChangeListener = Callable[[str, str], None]
"""Called with (run id, new status) when any process changes a run (see ``watch_changes``)."""


class Store(ABC):
    """One backend's implementation of durable run storage.

    Every method is a coroutine, so a network database never blocks the event loop.
    A backend that answers in-process (SQLite) completes without suspending, which
    costs a coroutine call and nothing more; it suspends only to wait for a lock held
    by another process, never blocking the loop while it waits.

    Durability is part of the contract: when a write that changes what a run has done
    (a step, an outcome, a wait, a trigger, a signal, a cancel, a resume, a fork)
    returns, it survives a crash of this process or a reload of the page. A backend
    that persists asynchronously (the browser's IndexedDB mode) waits for that inside
    the write. Progress, logs and lease bookkeeping may be lost to a crash.
    """

    #: True when this backend tells every process about runs changed by any other
    #: (``watch_changes`` is then live); False when only this process's events exist.
    notifies_changes: bool = False

    async def watch_changes(self, listener: ChangeListener) -> Callable[[], None]:
        """Call ``listener(run_id, status)`` on this event loop whenever another store
        instance (another process, another host) creates a run, changes its status (also a
        signal delivered to a waiting run) or deletes it (status ``"deleted"``), and return
        a function that stops it. Changes made through this instance are not reported: its
        caller's own events cover them. Runs that become claimable wake idle workers this
        way. Backends with ``notifies_changes = False`` never call it.

        ``listener("", "")`` (an empty run id and status) means "something may have changed
        that you were not told about": the backend lost its channel (a database restart) and
        has just got it back. A listener then looks again (a worker tries to claim, a view
        reloads). Listeners must be quick and must not raise; one that raises is logged."""
        return _no_op

    async def wait_durable(self) -> None:
        """Return once every transaction committed so far is durable (writes already
        wait for themselves; this is for a caller that wants a barrier)."""
        return None

    @abstractmethod
    async def migrate(self) -> None:
        """Create or upgrade the schema; raise ``SchemaVersionError`` if the database is newer."""

    @abstractmethod
    async def check_schema(self) -> None:
        """Without writing anything, raise ``SchemaVersionError`` unless the database has
        exactly this version's schema (for read-only use: nothing is created or migrated)."""

    @abstractmethod
    async def close(self) -> None: ...

    # --- runs -----------------------------------------------------------------
    @abstractmethod
    async def create_runs(
        self,
        runs: Sequence[NewRun],
        *,
        accept_existing: Callable[[RunRecord], bool] | None = None,
    ) -> list[tuple[RunRecord, str]]:
        """Insert runs in one transaction; return each run with its disposition.

        An existing run with the same (job, idempotency key) is returned as
        "idempotent". A pending run with the same concurrency key is returned as
        "coalesced" when ``coalesce`` is set, otherwise ``ConflictError`` is raised
        and nothing is written. With ``debounce_ms``, a pending run of the same job and
        concurrency key that never started takes the new input and becomes available
        ``debounce_ms`` after ``created_at`` ("debounced"); a new run starts that late too.

        ``accept_existing``, when given, is called inside the transaction with every
        run an item resolves to (idempotent or coalesced) that this call did not
        itself insert; if it returns false for any, ``ExistingRunRefusedError``
        (with every refused record in ``records``) is raised and nothing is written.
        It must be quick and must not touch the store.
        """

    @abstractmethod
    async def create_leased_run(self, new: NewRun, *, worker_id: str, lease_until: int) -> RunRecord:
        """Insert ``new`` already leased to ``worker_id``: its first claim made by the insert
        itself (``attempt`` 1, started and leased at ``created_at``, the lease until
        ``lease_until``, ``version`` as given), in one transaction with its labels.

        For a worker that starts at once a run its own process triggers while it has a free
        slot and found nothing to claim: the run never waits in the queue, and its claim
        costs no write of its own. ``new`` has no idempotency or concurrency key and no
        debounce (``create_runs`` resolves those); ``ValidationError`` otherwise.
        """

    @abstractmethod
    async def get_run(self, run_id: str) -> RunRecord | None: ...

    def get_run_nowait(self, run_id: str) -> RunRecord | None:
        """``get_run`` answered without awaiting, for the few synchronous API calls that want
        an answer at once (``Durably.subscribe`` refusing an unknown run). Raise
        ``WouldBlock`` when that is not possible now (a network backend always, a locked
        SQLite database); the caller then asks ``get_run`` later."""
        raise WouldBlock

    @abstractmethod
    async def list_runs(self, run_filter: RunFilter) -> list[RunRecord]:
        """Newest first."""

    @abstractmethod
    async def cancel_run(self, run_id: str, now: int) -> RunRecord:
        """Pending, leased or waiting → cancelled; already cancelled is returned as is.

        Raise ``NotFoundError`` / ``ConflictError`` (completed or failed).
        """

    @abstractmethod
    async def cancel_run_tree(self, run_id: str, now: int) -> list[RunRecord]:
        """``cancel_run`` for the run and, in the same transaction, every pending, leased or
        waiting descendant (its children, theirs, …, also below a child that already ended).
        Returns the run first (as ``cancel_run`` does), then each descendant this call
        cancelled, nearest first (a child before its own children). A parent waiting for
        the run is made due, as when a child ends."""

    @abstractmethod
    async def delete_run(self, run_id: str) -> RunRecord:
        """Delete a run with its steps and logs; ``ConflictError`` while it is leased or
        while one of its children is pending, leased or waiting. A parent waiting for the
        deleted run is made due (it then finds its child gone)."""

    @abstractmethod
    async def purge_runs(self, completed_before: int, limit: int | None) -> int:
        """Delete terminal runs that ended before the given time; return how many."""

    # --- worker ----------------------------------------------------------------
    @abstractmethod
    async def claim_run(
        self,
        *,
        worker_id: str,
        job_names: Sequence[str],
        now: int,
        lease_until: int,
        limits: Mapping[str, JobLimits] | None = None,
        versions: Mapping[str, str] | None = None,
        pinned_versions: Mapping[str, str] | None = None,
    ) -> RunRecord | None:
        """Lease the runnable run of highest priority, oldest first among equals: pending and
        available, or leased with an expired lease; never one whose concurrency key has
        another run under a live lease. Increments the lease generation and the attempt count.

        ``limits`` (job name -> ``JobLimits``): a job at its ``max_concurrent`` is passed
        over, and so is a not yet started run of a job whose rate window is full; checked
        and leased atomically against every other claimer (also in other processes).

        ``versions`` (job name -> this worker's version of it) is recorded as the run's
        ``version`` when this claim is its first (``started_at`` still unset). A started run
        of a job in ``pinned_versions`` (job name -> version) is passed over unless it was
        started by that version (or before versions were recorded): a worker never claims
        what it must leave for another version, so nothing is claimed and released again."""

    async def next_claimable_at(
        self, *, job_names: Sequence[str], limits: Mapping[str, JobLimits], now: int
    ) -> int | None:
        """When (ms, after ``now``) a run of these jobs may become claimable with nobody
        writing anything: the earliest not-before time of a pending run (a debounce) or the
        moment a full rate window of one of ``limits`` frees a start. ``None``: no such time.
        A worker with nothing to claim sets a timer for it instead of polling faster."""
        return None

    @abstractmethod
    async def fail_overdue_runs(
        self, now: int, *, error_json: str, drop_step_outputs: bool
    ) -> list[RunRecord]:
        """Fail every unfinished run whose ``deadline_at`` has passed by ``now`` and that no
        worker holds a live lease on (pending, waiting, or leased with an expired lease: a
        worker holding a live lease stops the handler itself), with ``error_json``, in one
        transaction; return the failed runs. Cheap when none is due (an index on the
        deadline). Other processes are told, as for any finished run."""

    @abstractmethod
    async def renew_leases(
        self, leases: Sequence[tuple[str, int]], now: int, lease_until: int, *, cancelled: bool = False
    ) -> list[str]:
        """Extend (run id, generation) leases; return the ids whose lease is no longer ours.

        A lease that has expired by ``now`` is no longer ours even if nobody took the run
        over yet: another run of its concurrency key may already have been claimed.

        With ``cancelled``, extend the leases of cancelled runs whose handlers are still
        stopping, so they keep holding their concurrency keys."""

    @abstractmethod
    async def release_run(self, run_id: str, generation: int, now: int) -> None:
        """Give a lease up so any worker may resume the run at once (fenced).

        A leased run goes back to 'pending' (it stays 'leased' with an expired lease
        only while another run of its concurrency key is pending); a cancelled run
        stays cancelled."""

    @abstractmethod
    async def expire_leases(self, now: int) -> int:
        """Expire every live lease, so leased runs can be claimed at once; return how many.

        Only for a caller that knows no other worker is alive (the browser's leader lock)."""

    @abstractmethod
    async def record_step(self, step: StepRecord, generation: int) -> bool:
        """Persist a completed step (fenced); it replaces a failed one at its position."""

    @abstractmethod
    async def wait_run(
        self,
        run_id: str,
        generation: int,
        *,
        until: int,
        reason: str,
        step_name: str,
        now: int,
        failed_attempt: StepRecord | None = None,
        step: StepRecord | None = None,
        deadline: int | None = None,
        failed_attempts: Sequence[StepRecord] = (),
        child_run_id: str | None = None,
    ) -> bool:
        """Leased → 'waiting' until ``until`` (fenced), in one transaction with what it waits
        for: the ``failed_attempt`` to retry (an attempt record) and/or a ``step`` to record
        (a sleep's checkpoint). ``failed_attempts``: more attempt records written in the same
        transaction (the retried branches of a ``step.all``). The lease is given up;
        ``claim_run`` takes the run again once ``until`` is due. A signal wait
        (``reason="signal"``) whose signal was stored meanwhile (sent after the handler last
        looked) is due at once, so no delivery is lost.

        A child wait (``reason="child"``) names the child in ``child_run_id`` (kept as the
        run's ``wait_child_id``); a child that ended (or vanished) meanwhile makes it due at
        once, and a child ending later makes it due in the transaction of its outcome
        (``finish_run``, ``cancel_run_tree``, ``delete_run``), so no wake-up is lost."""

    @abstractmethod
    async def wake_offline_runs(self, now: int) -> int:
        """The network is back: every run waiting with reason ``"offline"`` becomes due at
        ``now`` (one statement, so a run is either still waiting for its recheck time or due;
        a run that is not waiting for the network is untouched). Returns how many. Other
        processes are told, as for any run that becomes claimable."""

    @abstractmethod
    async def count_step_attempts(self, run_id: str) -> dict[int, tuple[int, int]]:
        """Per step position: (failed attempts in all, failed attempts since the last resume
        that count against the retry budget: not the ``offline`` ones)."""

    @abstractmethod
    async def resume_run(self, run_id: str, now: int) -> RunRecord:
        """Failed or cancelled → pending (attempt count kept), in one transaction that turns the
        failed step's row into an attempt record and starts a fresh retry budget. Raise
        ``NotFoundError``, or ``ConflictError`` for any other status, for a cancelled run whose
        handler is still stopping, or when another run of its concurrency key is pending."""

    @abstractmethod
    async def fork_run(self, new: NewRun, source_id: str, from_step: str) -> RunRecord:
        """Create ``new`` holding copies of ``source_id``'s completed steps recorded before the
        step ``from_step``, in one transaction. ``NotFoundError`` if ``from_step`` is not a
        recorded step of the source; ``ConflictError`` if a step to copy lost its output."""

    @abstractmethod
    async def send_signal(
        self, run_id: str, name: str, payload_json: str, signal_id: str | None, now: int
    ) -> tuple[str, RunRecord]:
        """Store a signal for a run; return its disposition and the run, in one transaction:
        "duplicate" (this ``signal_id`` was sent to the run before: nothing is written),
        "delivered" (the run was waiting for it: it is due now) or "stored" (kept for a
        later ``wait_for_signal``). ``NotFoundError``; ``ConflictError`` for a finished run."""

    @abstractmethod
    async def next_signal(self, run_id: str, name: str) -> tuple[int, str] | None:
        """The oldest unconsumed signal ``name`` of the run: (its id, payload JSON)."""

    @abstractmethod
    async def consume_signal(self, signal_key: int, step: StepRecord, generation: int, now: int) -> bool:
        """Record the wait's outcome ``step`` and mark the signal consumed, in one transaction
        (fenced; ``False`` if the lease was lost or another execution took the signal)."""

    @abstractmethod
    async def reject_signal(self, signal_key: int, generation: int, log: LogRecord) -> bool:
        """Drop an unconsumed signal whose payload the waiting handler's type refused, and
        append ``log`` (why), in one transaction; fenced like ``consume_signal``. The signal's
        ``signal_id`` may then be sent again with a valid payload."""

    @abstractmethod
    async def start_child(self, child: NewRun, step: StepRecord, generation: int) -> bool:
        """Create the run ``child`` (its ``parent_run_id`` is ``step.run_id``) and record
        ``step``, the parent's checkpoint holding the child's handle, in one transaction,
        fenced on the parent's lease: ``False`` and nothing written once the lease is lost.
        A kill at any instant leaves either both or neither. ``child`` has no idempotency
        key; a concurrency key with another pending run raises ``ConflictError``, as in
        ``create_runs``, and nothing is written."""

    @abstractmethod
    async def list_step_attempts(self, run_id: str) -> list[StepRecord]:
        """The failed attempts that were retried, by position then attempt number."""

    @abstractmethod
    async def set_progress(
        self,
        run_id: str,
        generation: int,
        current: int,
        total: int | None,
        message: str | None,
        now: int,
    ) -> bool:
        """Fenced."""

    @abstractmethod
    async def finish_run(
        self,
        run_id: str,
        generation: int,
        *,
        status: str,
        output_json: str | None,
        error_json: str | None,
        failed_step: StepRecord | None,
        drop_step_outputs: bool,
        now: int,
    ) -> bool:
        """Move a leased run to completed/failed, with its failed step, in one transaction (fenced).
        A parent waiting for this run (``wait_reason="child"``) is made due in it too."""

    # --- steps and logs ----------------------------------------------------------
    @abstractmethod
    async def list_steps(self, run_id: str, *, completed_only: bool = False) -> list[StepRecord]:
        """In execution order."""

    @abstractmethod
    async def append_log(self, log: LogRecord) -> None: ...

    @abstractmethod
    async def list_logs(self, run_id: str) -> list[LogRecord]: ...


    # --- schedules -----------------------------------------------------------------
    @abstractmethod
    async def upsert_schedule(self, schedule: ScheduleRecord) -> ScheduleRecord:
        """Insert the schedule, or update the one of that name (job, cron, timezone, input,
        catch-up), and return what is stored. An update keeps ``paused``, ``last_tick_at``,
        ``last_run_id`` and ``created_at``, and keeps ``next_tick_at`` too unless the cron or
        the timezone changed (so every worker syncing the same definition at start moves
        nothing)."""

    @abstractmethod
    async def get_schedule(self, name: str) -> ScheduleRecord | None: ...

    @abstractmethod
    async def list_schedules(self) -> list[ScheduleRecord]:
        """By name."""

    @abstractmethod
    async def delete_schedule(self, name: str) -> ScheduleRecord:
        """Delete a schedule (its runs stay); ``NotFoundError``."""

    @abstractmethod
    async def set_schedule_paused(
        self, name: str, paused: bool, next_tick_at: int | None, now: int
    ) -> ScheduleRecord:
        """Pause or resume; a resume moves ``next_tick_at`` to the given time (past what was
        missed while paused), ``None`` keeps it. ``NotFoundError``."""

    @abstractmethod
    async def due_schedules(self, now: int, limit: int) -> list[ScheduleRecord]:
        """Schedules not paused whose next tick is due by ``now``, earliest first."""

    @abstractmethod
    async def next_schedule_tick(self) -> int | None:
        """The earliest ``next_tick_at`` of the schedules not paused (``None``: there are none)."""

    @abstractmethod
    async def fire_schedule(
        self,
        name: str,
        *,
        expected_next_tick: int,
        next_tick_at: int,
        last_tick_at: int,
        runs: Sequence[NewRun],
        now: int,
    ) -> list[tuple[RunRecord, str]] | None:
        """Fire a tick: in one transaction, move the schedule's next tick from
        ``expected_next_tick`` to ``next_tick_at`` (compare-and-set: ``None`` and nothing written
        if another worker fired it first, or it was paused, changed or deleted) and create
        ``runs`` (each with its tick's idempotency key; one that exists already is returned as
        "idempotent", not created again). ``last_tick_at`` and the last run's id are recorded."""


def _no_op() -> None:
    return None
