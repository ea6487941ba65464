"""Durations as people type them: one parser for the command line and the HTTP API.

Accepted forms (the same everywhere a duration is read from text):

* a number of seconds: ``90``, ``1.5`` (a JSON number, or a string of digits);
* a number with a unit: ``90s``, ``15m``, ``12h``, ``30d``, ``1.5h`` (``s`` seconds,
  ``m`` minutes, ``h`` hours, ``d`` days; spaces around the number and unit are allowed,
  the unit is case-insensitive).

Negative values, exponents, ``inf`` and ``nan`` are refused. Pure: no I/O, no imports
from the rest of the package, so any layer may use it.
"""

from __future__ import annotations

import math
import re

__all__ = ["DURATION_FORMS", "DURATION_PATTERN", "UNIT_SECONDS", "parse_duration"]

#: Seconds per unit suffix ("" is plain seconds).
UNIT_SECONDS: dict[str, int] = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
#: The text form, as a regular expression (also published in the OpenAPI document).
DURATION_PATTERN = r"^\s*[0-9]+(\.[0-9]+)?\s*([sSmMhHdD])?\s*$"
#: One line for help texts and error messages.
DURATION_FORMS = "seconds (90, 1.5) or a number with s, m, h or d (90s, 15m, 12h, 30d, 1.5h)"

_TEXT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$", re.IGNORECASE | re.ASCII)


def parse_duration(value: str | int | float) -> float:
    """The number of seconds ``value`` stands for; ``ValueError`` saying the accepted forms if none.

    Numbers (not ``bool``) are seconds; strings take the forms in the module docstring.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}: use {DURATION_FORMS}")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"invalid duration {value!r}: must be a finite number of seconds, at least 0")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"invalid duration of type {type(value).__name__}: use {DURATION_FORMS}")
    match = _TEXT.match(value)
    if match is None:
        raise ValueError(f"invalid duration {value[:40]!r}: use {DURATION_FORMS}")
    seconds = float(match.group(1)) * UNIT_SECONDS[match.group(2).lower()]
    if not math.isfinite(seconds):  # a 400-digit number
        raise ValueError(f"invalid duration {value[:40]!r}: too large")
    return seconds
