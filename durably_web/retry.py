"""Step retry policies: how often a failing step is tried again, and after how long.

The delay before a retry is not slept in memory: the engine persists it as the
run's wake-up time (the run becomes 'waiting'), so it survives a kill and any
worker may carry out the retry once it is due.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from .errors import CancelledError, LeaseLostError, NonRetryableError, StepError, ValidationError

# Never worth retrying: the run is stopped, or the step was used wrongly / its result is unstorable.
_NEVER_RETRIED = (NonRetryableError, CancelledError, LeaseLostError, StepError)


def _positive_seconds(name: str, value: Any) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValidationError(f"RetryPolicy.{name} must be a non-negative number of seconds, not {value!r}")
    return float(value)


def _exception_types(name: str, value: Any) -> tuple[type[BaseException], ...]:
    if isinstance(value, type):
        value = (value,)
    if not isinstance(value, tuple) or not all(
        isinstance(t, type) and issubclass(t, BaseException) for t in value
    ):
        raise ValidationError(f"RetryPolicy.{name} must be a tuple of exception types, not {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a failing step is retried.

    ``max_attempts`` counts every attempt (1: never retried). The delay before
    attempt ``n`` (n ≥ 2) is ``initial_delay * backoff ** (n - 2)``, capped at
    ``max_delay``, then spread by ±``jitter`` (a fraction: 0.1 is ±10 %). An
    exception is retried when it is an instance of ``retry_on`` and of none of
    ``no_retry_on``; ``NonRetryableError`` (and durably-web's own ``StepError``,
    ``CancelledError``, ``LeaseLostError``) never are.
    """

    max_attempts: int = 3
    initial_delay: float = 1.0
    backoff: float = 2.0
    max_delay: float = 300.0
    jitter: float = 0.0
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    no_retry_on: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_attempts, bool)
            or not isinstance(self.max_attempts, int)
            or self.max_attempts < 1
        ):
            raise ValidationError(f"RetryPolicy.max_attempts must be an int ≥ 1, not {self.max_attempts!r}")
        for name in ("initial_delay", "max_delay"):
            object.__setattr__(self, name, _positive_seconds(name, getattr(self, name)))
        for name in ("backoff", "jitter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValidationError(f"RetryPolicy.{name} must be a number, not {value!r}")
        if self.backoff < 1:
            raise ValidationError(f"RetryPolicy.backoff must be ≥ 1, not {self.backoff!r}")
        if not 0 <= self.jitter <= 1:
            raise ValidationError(f"RetryPolicy.jitter must be between 0 and 1, not {self.jitter!r}")
        object.__setattr__(self, "retry_on", _exception_types("retry_on", self.retry_on))
        object.__setattr__(self, "no_retry_on", _exception_types("no_retry_on", self.no_retry_on))

    def should_retry(self, exc: BaseException, attempt: int) -> bool:
        """Whether attempt number ``attempt``, which raised ``exc``, is followed by another."""
        if attempt >= self.max_attempts or isinstance(exc, _NEVER_RETRIED):
            return False
        return isinstance(exc, self.retry_on) and not isinstance(exc, self.no_retry_on)

    def delay_before(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before attempt number ``attempt`` (≥ 2)."""
        exponent = max(0, attempt - 2)
        try:
            base = self.initial_delay * self.backoff**exponent
        except OverflowError:
            base = self.max_delay
        base = min(base, self.max_delay)
        if self.jitter:
            spread = (rng or random).uniform(-self.jitter, self.jitter)
            base = max(0.0, base * (1 + spread))
        return base


#: The policy when neither the job nor the step gives one: today's behaviour, no retry.
NO_RETRY = RetryPolicy(max_attempts=1, initial_delay=0.0)
