"""Job versions for safe deploys: what a run records, and what a worker may resume.

A run records the version of its job that started it (``Run.version``). Without an explicit
``define_job(version=...)`` the version is a hash of the handler's compiled code, computed
by :func:`code_version`.

Why the code object and not the source text: ``inspect.getsource`` needs the ``.py`` file
next to the code, which is missing for handlers defined in a notebook cell, by ``exec`` of
a string, in a zipped app or in Pyodide when the code came in through ``runPython``. The
code object is always there. Its hash is stable across processes of one interpreter version
(the bytecode, constants and names of the same source are the same), and ignores what does
not change behaviour: the file name and line numbers (a comment added above the handler,
or another checkout path on the next host, keep the version). It differs between Python
versions (their bytecode differs): a fleet running mixed interpreters sets
``version=`` explicitly. It covers the handler's own body with the functions, lambdas and
classes defined inside it, not the module-level functions it calls: a change there wants
an explicit version.
"""

from __future__ import annotations

import hashlib
import types
from collections.abc import Callable, Iterator
from typing import Any, Literal

VersionMismatchPolicy = Literal["leave", "continue", "fail"]
#: ``on_version_mismatch`` values: "leave" (the default) leaves a run started by another
#: version for a worker of that version (the claim query passes over it); "continue" resumes
#: it with this worker's code; "fail" fails it with ``VersionMismatchError``.
VERSION_MISMATCH_POLICIES: tuple[str, ...] = ("leave", "continue", "fail")

#: Hex digits of the code hash kept as the version (48 bits: collisions between the handful
#: of versions of one job that are alive at once are out of reach).
_HASH_DIGITS = 12
MAX_VERSION_LENGTH = 64


def code_version(handler: Callable[..., Any]) -> str:
    """A stable hash of ``handler``'s code (see the module docstring for what it covers)."""
    code = getattr(handler, "__code__", None)
    if not isinstance(code, types.CodeType):
        raise TypeError(f"cannot compute a code version of {handler!r}: it has no code object")
    digest = hashlib.sha256()
    for part in _code_parts(code):
        digest.update(part.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return digest.hexdigest()[:_HASH_DIGITS]


def _code_parts(code: types.CodeType) -> Iterator[str]:
    yield code.co_code.hex()
    yield repr((code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags))
    yield repr(code.co_names)
    yield repr(code.co_varnames)
    yield repr(code.co_freevars)
    yield repr(code.co_cellvars)
    for const in code.co_consts:
        yield from _const_parts(const)


def _const_parts(const: Any) -> Iterator[str]:
    if isinstance(const, types.CodeType):
        yield "code"
        yield from _code_parts(const)
    elif isinstance(const, frozenset):
        # A set literal (``x in {"a", "b"}``) is a frozenset constant whose iteration order
        # follows string hashing, which is randomised per process: sorted, it is stable.
        yield "frozenset"
        yield from sorted("".join(_const_parts(item)) for item in const)
    elif isinstance(const, tuple):
        yield "tuple"
        for item in const:
            yield from _const_parts(item)
    else:
        yield f"{type(const).__name__}:{const!r}"
