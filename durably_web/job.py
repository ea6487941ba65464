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
from .storage.base import JobLimits
from .versions import MAX_VERSION_LENGTH, VERSION_MISMATCH_POLICIES, VersionMismatchPolicy, code_version

if TYPE_CHECKING:
    from .schedules import ScheduleSpec
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
    #: Flow control (``define_job``): at most this many runs leased at once, across workers.
    max_concurrent: int | None = None
    #: At most ``count`` runs started (first claimed) per sliding ``seconds``, across workers.
    rate_limit: tuple[int, float] | None = None
    #: Seconds after its last trigger that a run keyed by ``concurrency_key`` starts.
    debounce: float | None = None

    @property
    def limits(self) -> JobLimits | None:
        """What the claim query must honour for this job (``None``: no flow limit)."""
        if self.max_concurrent is None and self.rate_limit is None:
            return None
        count, seconds = self.rate_limit if self.rate_limit is not None else (None, None)
        return JobLimits(
            max_concurrent=self.max_concurrent,
            rate_count=count,
            rate_window_ms=None if seconds is None else int(seconds * 1000),
        )
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
    #: ``define_job(schedule=)``: synced into the schedules table (named after the job) when a
    #: worker starts with the job registered.
    schedule: ScheduleSpec | None = None

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
    max_concurrent: int | None = None,
    rate_limit: tuple[int, float] | None = None,
    debounce: float | None = None,
    timeout: float | int | str | timedelta | None = None,
    version: str | None = None,
    on_version_mismatch: VersionMismatchPolicy = "leave",
    schedule: str | None = None,
    timezone: str | None = None,
    schedule_input: Any = None,
    catch_up: str = "latest",
) -> Callable[[Handler[Any, Any]], JobDefinition[Any, Any]]:
    """Decorator turning ``async def handler(step, payload)`` into a job.

    ``input``/``output`` are pydantic models (or any type pydantic's TypeAdapter
    handles); ``None`` means "any JSON value" for input and "nothing" for output.
    ``retry`` is the default ``RetryPolicy`` of the job's steps (none: a failing
    step fails the run at once). ``signals`` maps signal names to payload types, so that
    ``send_signal`` validates a payload before storing it.

    Flow control, honoured by every worker's claim (see README "Flow control"):
    ``max_concurrent`` runs leased at once; ``rate_limit=(count, seconds)`` runs started per
    sliding window (a run continuing after a wait, crash or resume is no new start); and
    ``debounce`` seconds: triggers with one ``concurrency_key`` become one run with the
    latest input, started that long after the last of them (a trigger of a debounced job
    without a concurrency key raises ``ValidationError``).
    ``timeout`` (seconds, or a duration such as ``"10m"``) is each run's deadline counted
    from its trigger, waits included: past it the run fails with ``RunTimeoutError``.
    ``version`` names this code's version (default: a hash of the handler's code); a run
    records the version that started it, and ``on_version_mismatch`` says what a worker of
    another version does with it: "leave" it for a worker of its version (the default),
    "continue" it, or "fail" it with ``VersionMismatchError``.
    """
    max_concurrent, rate_limit, debounce = _flow_control(name, max_concurrent, rate_limit, debounce)
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

    spec = None
    if schedule is not None:
        from .schedules import ScheduleSpec, check_cron, check_schedule_options

        check_schedule_options(name, catch_up)
        check_cron(schedule, timezone or "UTC")
        spec = ScheduleSpec(
            cron=schedule, timezone=timezone or "UTC", input=schedule_input, catch_up=catch_up
        )
    elif timezone is not None or schedule_input is not None or catch_up != "latest":
        raise ValidationError(f"job {name!r}: timezone, schedule_input and catch_up need schedule=")

    def decorate(handler: Handler[Any, Any]) -> JobDefinition[Any, Any]:
        if not inspect.iscoroutinefunction(handler):
            raise TypeError(f"job {name!r}: the handler must be an 'async def' function")
        job = JobDefinition(
            name=name,
            handler=handler,
            input_type=Any if input is None else input,
            output_type=Any if output is None else output,
            retry=retry,
            signal_types=dict(signals or {}),
            max_concurrent=max_concurrent,
            rate_limit=rate_limit,
            debounce=debounce,
            timeout=deadline_seconds,
            version=version if version is not None else code_version(handler),
            on_version_mismatch=on_version_mismatch,
            schedule=spec,
        )
        if spec is not None:
            job.validate_input(spec.input)  # a schedule whose runs could never start is refused now
        return job

    return decorate


#: The longest debounce or rate window (a year): beyond that it is a mistake, not a limit.
_LONGEST_FLOW_WINDOW = 365 * 24 * 3600.0


def _positive_seconds(name: str, what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= _LONGEST_FLOW_WINDOW:
        raise ValidationError(
            f"job {name!r}: {what} must be a number of seconds above 0 and at most a year, not {value!r}"
        )
    return float(value)


def _flow_control(
    name: str, max_concurrent: Any, rate_limit: Any, debounce: Any
) -> tuple[int | None, tuple[int, float] | None, float | None]:
    """``define_job``'s flow-control options, checked (``ValidationError`` naming the job)."""
    if max_concurrent is not None and (
        isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int) or max_concurrent < 1
    ):
        raise ValidationError(f"job {name!r}: max_concurrent must be a positive int, not {max_concurrent!r}")
    rate: tuple[int, float] | None = None
    if rate_limit is not None:
        if not isinstance(rate_limit, tuple | list) or len(rate_limit) != 2:
            raise ValidationError(f"job {name!r}: rate_limit must be (count, seconds), not {rate_limit!r}")
        count, seconds = rate_limit
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValidationError(f"job {name!r}: rate_limit's count must be a positive int, not {count!r}")
        rate = (count, _positive_seconds(name, "rate_limit's window", seconds))
    delay = None if debounce is None else _positive_seconds(name, "debounce", debounce)
    return max_concurrent, rate, delay
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
