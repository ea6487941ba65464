"""Job definitions: a name, an input model, an output model and an async handler."""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import TypeAdapter
from pydantic import ValidationError as PydanticValidationError

from .errors import ValidationError
from .retry import RetryPolicy
from .serialization import adapter_for

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
    """
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise ValidationError(f"job {name!r}: retry must be a RetryPolicy, not {retry!r}")
    if not isinstance(name, str) or not JOB_NAME_PATTERN.match(name):
        raise ValidationError(
            f"invalid job name {name!r}: use 1-128 letters, digits and _ . : - / "
            "starting with a letter or digit"
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
            schedule=spec,
        )
        if spec is not None:
            job.validate_input(spec.input)  # a schedule whose runs could never start is refused now
        return job

    return decorate
