"""The bridge's value coding (durably_web/storage/sqlite/wasm_connection.py), under CPython.

The bridge itself runs in Chromium (tests/browser/test_bridge_smoke.py); what Python puts
into the parameters' JSON text is tested here.
"""

from __future__ import annotations

import json
import math
from types import MappingProxyType

import pytest

from durably_web.storage.sqlite.wasm_connection import WasmSqliteError, decode_rows, encode_params


def test_plain_values_are_written_as_they_are() -> None:
    params = {"s": "é 🎉", "n": None, "i": -(2**53 - 1), "j": 2**53 - 1, "k": 1767225600000}
    expected = '{"s":"é 🎉","n":null,"i":-9007199254740991,"j":9007199254740991,"k":1767225600000}'
    assert encode_params(params) == expected


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (2**53, {"$i": str(2**53)}),
        (-(2**63), {"$i": str(-(2**63))}),
        (2.0, {"$f": 2.0}),
        (1.5, 1.5),
        (math.inf, {"$f": "inf"}),
        (-math.inf, {"$f": "-inf"}),
        (True, True),
        (b"\x00\xff", {"$b": "AP8="}),
    ],
)
def test_values_json_cannot_carry_exactly_get_a_marker(value: object, encoded: object) -> None:
    # Next to plain values, before or after them: every parameter is coded.
    assert json.loads(encode_params({"a": "x", "v": value, "z": 1}) or "") == {"a": "x", "v": encoded, "z": 1}


def test_nan_and_other_mappings() -> None:
    assert json.loads(encode_params({"v": math.nan}) or "") == {"v": {"$f": "nan"}}
    assert encode_params(MappingProxyType({"a": 1})) == '{"a":1}'
    assert encode_params({}) is None and encode_params(None) is None


def test_an_unsupported_parameter_is_a_misuse_error() -> None:
    with pytest.raises(WasmSqliteError) as info:
        encode_params({"a": "x", "v": object()})
    assert info.value.name == "SQLITE_MISUSE"


def test_result_rows_decode_their_markers() -> None:
    assert decode_rows('{"c": ["a", "b"], "r": [[1, "x"], [null, 2.5]], "x": 0}') == [
        {"a": 1, "b": "x"},
        {"a": None, "b": 2.5},
    ]
    flagged = '{"c": ["a"], "r": [[{"$i": "9007199254740993"}], [{"$f": 2}], [{"$b": "AP8="}]], "x": 1}'
    assert decode_rows(flagged) == [{"a": 2**53 + 1}, {"a": 2.0}, {"a": b"\x00\xff"}]
