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
import typing
from typing import Any

from pydantic import TypeAdapter
from pydantic import ValidationError as PydanticValidationError

from .errors import StepError

_NO_TYPE: Any = object()
_NONE_TYPE = type(None)


@functools.lru_cache(maxsize=512)
def adapter_for(tp: Any) -> TypeAdapter[Any]:
    return TypeAdapter(tp)


@functools.lru_cache(maxsize=2048)
def return_type_of(fn: Any) -> Any:
    """The declared return type of a callable (awaited type for coroutines), or ``_NO_TYPE``."""
    target = fn
    while isinstance(target, functools.partial):
        target = target.func
    if not (inspect.isfunction(target) or inspect.ismethod(target)):
        target = getattr(target, "__call__", target)  # noqa: B004 - callable objects
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable forward refs: behave as unannotated
        return _NO_TYPE
    tp = hints.get("return", _NO_TYPE)
    if tp is Any:
        return _NO_TYPE
    return tp


def _is_plain_json(value: Any) -> bool:
    kind = type(value)
    if value is None or kind is str or kind is bool or kind is int or kind is float:
        return True
    if kind is list:
        return all(_is_plain_json(item) for item in value)
    if kind is dict:
        return all(type(k) is str and _is_plain_json(v) for k, v in value.items())
    return False


def encode(value: Any, tp: Any, *, what: str) -> tuple[str, Any]:
    """Return ``(json_text, round_tripped_value)``; raise :class:`StepError` if it cannot persist."""
    if value is None and (tp is _NO_TYPE or tp is _NONE_TYPE or tp is None):
        return "null", None
    if tp is _NO_TYPE:
        try:
            plain = _is_plain_json(value)
        except RecursionError:
            raise StepError(f"{what} returned a value nested too deeply to be stored") from None
        if not plain:
            raise StepError(
                f"{what} returned a {type(value).__qualname__}, which is not a plain JSON value; "
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
        raw = adapter.dump_json(value)
        return raw.decode(), adapter.validate_json(raw)
    except PydanticValidationError as exc:
        raise StepError(f"{what} returned a value that does not round-trip as {tp!r}: {exc}") from exc
    except Exception as exc:  # serializer errors: unsupported types, surrogates, cycles
        raise StepError(f"{what} returned a value that cannot be stored as {tp!r}: {exc}") from exc


def decode(text: str | None, tp: Any) -> Any:
    if text is None:
        return None
    if tp is _NO_TYPE:
        return json.loads(text)
    return adapter_for(tp).validate_json(text)
