"""durably-web: durable, step-oriented jobs that survive crashes and page reloads.

The same job code runs under CPython (SQLite file) and in a browser tab
(Pyodide in a Web Worker, SQLite in OPFS).
"""

from .durably import Durably, TriggerItem
from .errors import (
    CancelledError,
    ChildRunCancelledError,
    ChildRunFailedError,
    ConflictError,
    DurablyError,
    ExistingRunRefusedError,
    LeaseLostError,
    NonDeterministicReplayError,
    NonRetryableError,
    NotFoundError,
    ReadOnlyError,
    RunTimeoutError,
    SchemaVersionError,
    StepError,
    StorageError,
    ValidationError,
    VersionMismatchError,
    WaitTimeoutError,
)
from .job import JobDefinition, define_job
from .models import ChildRun, ErrorInfo, Event, LogEntry, Progress, Run, Schedule, Step, StepAttempt
from .network import NetworkStatus
from .retry import RetryPolicy
from .step import AttemptNumber, StepBranch, StepContext

__version__ = "0.1.0"

__all__ = [
    "AttemptNumber",
    "CancelledError",
    "ChildRun",
    "ChildRunCancelledError",
    "ChildRunFailedError",
    "ConflictError",
    "Durably",
    "DurablyError",
    "ErrorInfo",
    "Event",
    "ExistingRunRefusedError",
    "JobDefinition",
    "LeaseLostError",
    "LogEntry",
    "NetworkStatus",
    "NonDeterministicReplayError",
    "NonRetryableError",
    "NotFoundError",
    "Progress",
    "ReadOnlyError",
    "RetryPolicy",
    "Run",
    "RunTimeoutError",
    "Schedule",
    "SchemaVersionError",
    "Step",
    "StepAttempt",
    "StepBranch",
    "StepContext",
    "StepError",
    "StorageError",
    "TriggerItem",
    "ValidationError",
    "VersionMismatchError",
    "WaitTimeoutError",
    "define_job",
]
