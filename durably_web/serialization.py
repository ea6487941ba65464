"""Turning step results, inputs and outputs into JSON text and back, keeping their types.

A value's type comes from an explicit ``type=``, else the callable's return
annotation. Without either, only plain JSON values (None, bool, int, float,
str, lists and str-keyed dicts of those) are accepted, and the round trip is
checked, so a replayed value always equals the first one and has its type.
"""

from __future__ import annotations

import functools
import inspect
import json
import types
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter
from pydantic import ValidationError as PydanticValidationError

from .errors import StepError

_NO_TYPE: Any = object()
_NONE_TYPE = type(None)


@functools.lru_cache(maxsize=512)
def adapter_for(tp: Any) -> TypeAdapter[Any]:
    return TypeAdapter(tp)


@dataclass(frozen=True, slots=True)
class UnresolvedAnnotation:
    """A return annotation that could not be evaluated; the value is then stored untyped."""

    annotation: str
    callable_name: str
    reason: str


def _is_untyped(tp: Any) -> bool:
    return tp is _NO_TYPE or type(tp) is UnresolvedAnnotation


@functools.lru_cache(maxsize=2048)
def return_type_of(fn: Any) -> Any:
    """The declared return type of a callable (awaited type for coroutines), ``_NO_TYPE``,
    or an :class:`UnresolvedAnnotation` saying which annotation could not be evaluated."""
    target = fn
    while isinstance(target, functools.partial):
        target = target.func
    if not (inspect.isfunction(target) or inspect.ismethod(target)):
        target = getattr(target, "__call__", target)  # noqa: B004 - callable objects
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # some annotation does not evaluate: try the return annotation alone
        return _return_type_alone(target)
    tp = hints.get("return", _NO_TYPE)
    if tp is Any:
        return _NO_TYPE
    return tp


def _return_type_alone(target: Any) -> Any:
    try:
        raw = getattr(target, "__annotations__", {}).get("return", _NO_TYPE)
    except Exception:  # Python 3.14 evaluates annotations lazily, on access
        raw = _annotation_source(target)
    if raw is _NO_TYPE:
        return _NO_TYPE  # a parameter's annotation failed; there is no return annotation
    text = raw if isinstance(raw, str) else getattr(raw, "__qualname__", repr(raw))
    namespace = getattr(inspect.unwrap(target), "__globals__", {})
    shim = types.SimpleNamespace(__annotations__={"return": raw}, __globals__=namespace)
    try:
        tp = typing.get_type_hints(shim)["return"]
    except Exception as exc:
        name = getattr(target, "__qualname__", None) or type(target).__qualname__
        return UnresolvedAnnotation(text, name, f"{type(exc).__name__}: {exc}")
    return _NO_TYPE if tp is Any else tp


def _annotation_source(target: Any) -> Any:
    try:
        import annotationlib  # type: ignore[import-not-found,unused-ignore]  # Python >= 3.14
    except ImportError:
        return _NO_TYPE
    try:
        found = annotationlib.get_annotations(target, format=annotationlib.Format.STRING)
    except Exception:
        return _NO_TYPE
    return found.get("return", _NO_TYPE)


def _is_plain_json(value: Any) -> bool:
    kind = type(value)
    if value is None or kind is str or kind is bool or kind is int or kind is float:
        return True
    if kind is list:
        return all(_is_plain_json(item) for item in value)
    if kind is dict:
        return all(type(k) is str and _is_plain_json(v) for k, v in value.items())
    # An int subclass that stores as its int and means nothing more (step.attempt, an
    # AttemptNumber), unlike an IntEnum, which would not come back as itself.
    return getattr(kind, "_stored_as_int", False) is True


def encode(value: Any, tp: Any, *, what: str) -> tuple[str, Any]:
    """Return ``(json_text, round_tripped_value)``; raise :class:`StepError` if it cannot persist."""
    if value is None and (_is_untyped(tp) or tp is _NONE_TYPE or tp is None):
        return "null", None
    if _is_untyped(tp):
        try:
            plain = _is_plain_json(value)
        except RecursionError:
            raise StepError(f"{what} returned a value nested too deeply to be stored") from None
        if not plain:
            kind = type(value).__qualname__
            if type(tp) is UnresolvedAnnotation:
                raise StepError(
                    f"{what} returned a {kind}, which is not a plain JSON value, and the return "
                    f"annotation {tp.annotation!r} of {tp.callable_name}() could not be resolved "
                    f"({tp.reason}). Annotations are evaluated in the callable's module globals "
                    "(under 'from __future__ import annotations' they are strings), so a class "
                    f"defined inside a function is not found there: pass type={tp.annotation} to "
                    "step.run(), or define the class at module level"
                )
            raise StepError(
                f"{what} returned a {kind}, which is not a plain JSON value; "
                "annotate the callable's return type or pass type=... so it can be stored and "
                "replayed with the same type"
            )
        try:
            # ensure_ascii keeps lone surrogates storable as \u escapes
            text = json.dumps(value, allow_nan=False, separators=(",", ":"))
        except (ValueError, RecursionError) as exc:  # NaN / infinity, too deep
            raise StepError(f"{what} returned a value that cannot be stored as JSON: {exc}") from exc
        return text, json.loads(text)
    adapter = adapter_for(tp)
    try:
        # No serializer warnings: a value that does not fit the type (a list for a tuple
        # field, a str for an int) is judged by the round trip below, not by a warning.
        raw = adapter.dump_json(value, warnings=False)
        return raw.decode(), adapter.validate_json(raw)
    except PydanticValidationError as exc:
        raise StepError(f"{what} returned a value that does not round-trip as {tp!r}: {exc}") from exc
    except Exception as exc:  # serializer errors: unsupported types, surrogates, cycles
        raise StepError(f"{what} returned a value that cannot be stored as {tp!r}: {exc}") from exc


def decode(text: str | None, tp: Any) -> Any:
    if text is None:
        return None
    if _is_untyped(tp):
        return json.loads(text)
    return adapter_for(tp).validate_json(text)
