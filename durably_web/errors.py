"""Every error the public API raises derives from :class:`DurablyError`."""

from __future__ import annotations

from typing import Any


class DurablyError(Exception):
    """Root of all durably-web errors."""


class NotFoundError(DurablyError):
    """A run, job or step that was asked for does not exist."""


class ErrorDetails(list[dict[str, Any]]):
    """A list of error dicts that can also be called, like pydantic's ``errors()``."""

    def __call__(self) -> list[dict[str, Any]]:
        return list(self)


class ValidationError(DurablyError, ValueError):
    """Input, output, labels or an option failed validation; nothing was written.

    ``errors`` (also ``details``) carries pydantic's error details (a list of
    dicts) when pydantic did the validating, otherwise a single entry
    describing the problem.
    """

    def __init__(self, message: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.errors = ErrorDetails(errors if errors is not None else [{"msg": message}])

    @property
    def details(self) -> list[dict[str, Any]]:
        return self.errors


class ConflictError(DurablyError):
    """The operation is not allowed in the run's current state.

    Examples: cancelling a completed run, deleting a leased run, triggering a
    second pending run for one concurrency key.
    """


class ExistingRunRefusedError(ConflictError):
    """A trigger's key resolved to an existing run that the caller's ``accept_existing`` refused.

    Raised by ``trigger`` / ``batch_trigger`` (and the store's ``create_runs``) from
    inside the transaction, which is rolled back: nothing of the trigger or the
    batch was written, no event was emitted, nothing runs. ``runs`` holds the
    refused runs (``Run`` values; the store raises it with ``records``, its
    ``RunRecord`` values), so the caller can decide about them and try again.
    """

    def __init__(
        self, message: str, *, records: list[Any] | None = None, runs: list[Any] | None = None
    ) -> None:
        super().__init__(message)
        self.records: list[Any] = list(records or [])
        self.runs: list[Any] = list(runs or [])


class SubscriptionOverflowError(DurablyError):
    """A bounded event subscription's consumer fell too far behind; its buffered events were dropped.

    Start over from the current state (``get_run``, ``get_steps``) and subscribe again.
    """


class CancelledError(DurablyError):
    """The run was cancelled; its handler must not continue."""


class LeaseLostError(DurablyError):
    """This worker no longer holds the run's lease (another worker took it over).

    Raised inside the handler when it tries to record a step, progress or the
    outcome; nothing further is written for that run by this worker.
    """


class NonRetryableError(DurablyError):
    """Raise it (or a subclass) from a step to fail the step at once, whatever its ``RetryPolicy``."""


class StepError(DurablyError):
    """A step was used wrongly: a repeated name, or a result that cannot be persisted."""


class NonDeterministicReplayError(DurablyError):
    """A resumed handler called steps in a different order than the recorded run."""


class SchemaVersionError(DurablyError):
    """The database's schema is not one this durably-web can use as it is.

    Raised when the database was written by a newer durably-web schema than this
    one understands, and, when it was opened read-only (so nothing is migrated),
    when its schema is older than this version's or it has no durably-web schema
    at all. ``found`` is the database's schema version (``None``: not a
    durably-web database), ``expected`` this version's.
    """

    def __init__(self, message: str, *, found: int | None = None, expected: int | None = None) -> None:
        super().__init__(message)
        self.found = found
        self.expected = expected


class ReadOnlyError(DurablyError):
    """A write (trigger, cancel, delete, purge, …) was asked of a ``Durably`` opened read-only."""


class StorageError(DurablyError):
    """The storage backend failed (disk full, read-only file, locked database, …).

    ``__cause__`` holds the driver's original exception.
    """


class WaitTimeoutError(DurablyError, TimeoutError):
    """``wait_for_run`` / ``trigger_and_wait`` gave up before the run ended."""


class ChildRunFailedError(DurablyError):
    """``step.wait_for_child`` found the child run failed: raised in the parent's handler.

    ``child_run_id`` is the child's id, ``status`` its final status (``"failed"``;
    ``"cancelled"`` for :class:`ChildRunCancelledError`; ``"deleted"`` when the child was
    deleted before the parent saw its outcome) and ``error`` its ``ErrorInfo`` (``None``
    when there is none). Like any error, the parent may catch it; uncaught, the parent
    fails with it at the wait step, and ``resume_run`` on the parent (after resuming the
    child) waits for the child again."""

    def __init__(self, message: str, *, child_run_id: str, status: str, error: Any = None) -> None:
        super().__init__(message)
        self.child_run_id = child_run_id
        self.status = status
        self.error = error


class ChildRunCancelledError(ChildRunFailedError):
    """The child run was cancelled (``status == "cancelled"``): catching
    ``ChildRunFailedError`` catches this too."""
class RunTimeoutError(DurablyError):
    """The run passed its deadline (``timeout=`` on the job or the trigger) and was failed.

    The deadline counts the run's whole life from its trigger, waits included (sleeps,
    signal waits, retry back-offs, time spent pending). It is stored with the run
    (``Run.deadline_at``), so any worker enforces it, also one started after it passed.
    """


class VersionMismatchError(DurablyError):
    """A run started by one version of its job was claimed by a worker with another, whose
    job says ``on_version_mismatch="fail"``: the run is failed instead of mixing code."""
