"""Job definitions: a name, an input model, an output model and an async handler."""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import TypeAdapter
from pydantic import ValidationError as PydanticValidationError

from .durations import parse_duration
from .errors import ValidationError
from .retry import RetryPolicy
from .serialization import adapter_for
from .versions import MAX_VERSION_LENGTH, VERSION_MISMATCH_POLICIES, VersionMismatchPolicy, code_version

if TYPE_CHECKING:
    from .step import StepContext

InputT = TypeVar("InputT")
OutputT = TypeVar("OutputT")
Handler = Callable[["StepContext", InputT], Awaitable[OutputT]]

JOB_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-/]{0,127}$")


@dataclass(frozen=True, eq=False)
class JobDefinition(Generic[InputT, OutputT]):
    """A registered job. Calling it is not how it runs: trigger it through ``Durably``."""

    name: str
    handler: Handler[InputT, OutputT]
    input_type: Any
    output_type: Any
    #: The default for this job's steps (``step.run(..., retry=)`` overrides it); None: no retry.
    retry: RetryPolicy | None = None
    #: Signal name -> payload type, for ``send_signal`` to validate before storing: declared
    #: with ``define_job(signals=)``, and learned from ``wait_for_signal(type=)`` calls.
    signal_types: dict[str, Any] = field(default_factory=dict, compare=False)
    #: The run deadline in seconds from the trigger (``trigger(timeout=)`` overrides it);
    #: None: no deadline.
    timeout: float | None = None
    #: What runs of this job record as their version: ``define_job(version=)``, else a hash
    #: of the handler's code (``durably_web.versions.code_version``).
    version: str = ""
    #: What a worker does with a run that another version started (see ``versions.py``).
    on_version_mismatch: VersionMismatchPolicy = "leave"

    def __post_init__(self) -> None:
        if not self.version:  # built directly rather than by define_job: the code's hash
            object.__setattr__(self, "version", code_version(self.handler))

    @property
    def input_adapter(self) -> TypeAdapter[Any]:
        return adapter_for(self.input_type)

    @property
    def output_adapter(self) -> TypeAdapter[Any]:
        return adapter_for(self.output_type)

    def validate_input(self, value: Any) -> tuple[InputT, str]:
        """Validate ``value`` (a model instance or plain data); return it and its JSON text."""
        adapter = self.input_adapter
        try:
            model = adapter.validate_python(value)
            return model, adapter.dump_json(model).decode()
        except PydanticValidationError as exc:
            raise ValidationError(
                f"invalid input for job {self.name!r}: {exc}", _error_details(exc)
            ) from None
        except (TypeError, ValueError) as exc:  # unserialisable values slipping past lax validation
            raise ValidationError(f"invalid input for job {self.name!r}: {exc}") from None

    def encode_output(self, value: Any) -> str:
        adapter = self.output_adapter
        try:
            return adapter.dump_json(adapter.validate_python(value)).decode()
        except PydanticValidationError as exc:
            raise ValidationError(
                f"job {self.name!r} returned an invalid output: {exc}", _error_details(exc)
            ) from None
        except (TypeError, ValueError) as exc:
            raise ValidationError(f"job {self.name!r} returned an unstorable output: {exc}") from None

    def decode_input(self, text: str) -> InputT:
        return self.input_adapter.validate_json(text)

    def decode_output(self, text: str | None) -> OutputT | None:
        return None if text is None else self.output_adapter.validate_json(text)


def _error_details(exc: PydanticValidationError) -> list[dict[str, Any]]:
    return exc.errors(include_url=False, include_context=False, include_input=False)  # type: ignore[return-value]


def define_job(
    name: str,
    *,
    input: Any = None,
    output: Any = None,
    retry: RetryPolicy | None = None,
    signals: dict[str, Any] | None = None,
    timeout: float | int | str | timedelta | None = None,
    version: str | None = None,
    on_version_mismatch: VersionMismatchPolicy = "leave",
) -> Callable[[Handler[Any, Any]], JobDefinition[Any, Any]]:
    """Decorator turning ``async def handler(step, payload)`` into a job.

    ``input``/``output`` are pydantic models (or any type pydantic's TypeAdapter
    handles); ``None`` means "any JSON value" for input and "nothing" for output.
    ``retry`` is the default ``RetryPolicy`` of the job's steps (none: a failing
    step fails the run at once). ``signals`` maps signal names to payload types, so that
    ``send_signal`` validates a payload before storing it.

    ``timeout`` (seconds, or a duration such as ``"10m"``) is each run's deadline counted
    from its trigger, waits included: past it the run fails with ``RunTimeoutError``.
    ``version`` names this code's version (default: a hash of the handler's code); a run
    records the version that started it, and ``on_version_mismatch`` says what a worker of
    another version does with it: "leave" it for a worker of its version (the default),
    "continue" it, or "fail" it with ``VersionMismatchError``.
    """
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise ValidationError(f"job {name!r}: retry must be a RetryPolicy, not {retry!r}")
    if not isinstance(name, str) or not JOB_NAME_PATTERN.match(name):
        raise ValidationError(
            f"invalid job name {name!r}: use 1-128 letters, digits and _ . : - / "
            "starting with a letter or digit"
        )
    deadline_seconds = validate_timeout(f"job {name!r}: timeout", timeout)
    if version is not None and not _is_version(version):
        raise ValidationError(
            f"job {name!r}: version must be a non-empty string of at most {MAX_VERSION_LENGTH} "
            f"printable characters, not {version!r}"
        )
    if on_version_mismatch not in VERSION_MISMATCH_POLICIES:
        raise ValidationError(
            f"job {name!r}: on_version_mismatch must be one of {list(VERSION_MISMATCH_POLICIES)}, "
            f"not {on_version_mismatch!r}"
        )

    def decorate(handler: Handler[Any, Any]) -> JobDefinition[Any, Any]:
        if not inspect.iscoroutinefunction(handler):
            raise TypeError(f"job {name!r}: the handler must be an 'async def' function")
        return JobDefinition(
            name=name,
            handler=handler,
            input_type=Any if input is None else input,
            output_type=Any if output is None else output,
            retry=retry,
            signal_types=dict(signals or {}),
            timeout=deadline_seconds,
            version=version if version is not None else code_version(handler),
            on_version_mismatch=on_version_mismatch,
        )

    return decorate


def validate_timeout(what: str, value: Any) -> float | None:
    """A run deadline's length in seconds (None: no deadline); ``ValidationError`` otherwise."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise ValidationError(f"{what}: {exc}") from None
    if seconds <= 0:
        raise ValidationError(f"{what} must be more than 0 seconds, not {value!r}")
    return seconds


def _is_version(value: Any) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_VERSION_LENGTH
        and value.isprintable()
        and value.strip() == value
    )
