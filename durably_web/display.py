"""Make stored text safe to print on a terminal.

Labels, inputs, log lines, step names and error messages come from users and
jobs; printed raw, an ESC or C1 byte in them is a terminal command (colours,
cursor moves, rewriting earlier lines, even an OSC 52 clipboard write), and a
bidi override makes text read differently from what it is. Every piece of
stored data the command line prints goes through :func:`printable` (or
:func:`printable_json` for JSON), which shows such characters as visible
escapes instead:

* C0 controls, DEL and C1 controls as ``\\x1b``, ``\\x7f``, ``\\x9b``; carriage return,
  newline and tab as ``\\r``, ``\\n``, ``\\t`` (with ``multiline``, newline and tab are
  kept, for tracebacks);
* bidi embeddings, overrides, isolates and marks, and the line/paragraph
  separators, as ``\\u202e``;
* lone surrogates (which cannot even be encoded) as ``\\udcff``.

Backslashes are left as they are (a literal ``\\x1b`` typed into a label looks
like an escaped ESC): the aim is that nothing reaches the terminal as a
command, while paths and tracebacks stay readable. Everything else, including
emoji with their zero-width joiners, passes through unchanged.
"""

from __future__ import annotations

import re

__all__ = ["printable", "printable_json"]

_BIDI_AND_SEPARATORS = "\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_UNSAFE = re.compile(f"[\x00-\x1f\x7f-\x9f{_BIDI_AND_SEPARATORS}\ud800-\udfff]")
_UNSAFE_MULTILINE = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{_BIDI_AND_SEPARATORS}\ud800-\udfff]")
# In JSON text, C0 controls are already escaped by json.dumps (\u001b); the rest are not.
_UNSAFE_IN_JSON = re.compile(f"[\x7f-\x9f{_BIDI_AND_SEPARATORS}\ud800-\udfff]")


_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _visible(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def printable(text: object, *, multiline: bool = False) -> str:
    """``str(text)`` with every character that could act on a terminal shown as an escape.

    With ``multiline``, newlines and tabs are kept (for tracebacks and multi-line
    messages); otherwise they are escaped too, so one value stays on one line.
    """
    value = text if isinstance(text, str) else str(text)
    return (_UNSAFE_MULTILINE if multiline else _UNSAFE).sub(_visible, value)


def printable_json(json_text: str) -> str:
    """JSON text (as ``json.dumps(..., ensure_ascii=False)`` writes it) that is still the
    same JSON but terminal-safe: the characters ``json.dumps`` leaves raw (DEL, C1
    controls, bidi controls, lone surrogates) become ``\\uXXXX`` escapes.

    Valid because those characters can only occur inside JSON strings.
    """
    return _UNSAFE_IN_JSON.sub(_json_escape, json_text)
