"""jsoncodec: the json fallback reads and writes exactly what orjson would, plus big integers."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pushsvc import jsoncodec

# What orjson holds exactly: integers from -2**63 to 2**64 - 1.
small_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
scalars = (
    st.none()
    | st.booleans()
    | small_ints
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)
any_ints = st.recursive(
    st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20,
)


@settings(max_examples=300)
@given(values)
def test_the_long_number_path_reads_and_writes_what_orjson_does(value) -> None:
    """A run of 19 digits (here in a string) sends a line through json: same value, same bytes."""
    line = orjson.dumps([value, "1" * 19])
    assert jsoncodec.loads(line) == orjson.loads(line)
    assert jsoncodec.dumps(jsoncodec.loads(line)) == line


@settings(max_examples=300)
@given(any_ints)
def test_integers_of_any_size_round_trip_exactly(value) -> None:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    assert jsoncodec.loads(text) == value
    assert jsoncodec.dumps(jsoncodec.loads(text)) == text


def test_what_orjson_refuses_is_still_refused() -> None:
    """The long-number path reads a line only after orjson accepted it."""
    digits = "1" * 30
    for bad in (
        f'{{"a":{digits},"b":1e400}}',  # infinity
        f'{{"a":{digits},"b":NaN}}',  # json alone would accept NaN
        f'["{digits}","\\ud800"]',  # a lone surrogate
        f"[{digits},]",
    ):
        with pytest.raises(orjson.JSONDecodeError):
            jsoncodec.loads(bad.encode())
    with pytest.raises(orjson.JSONDecodeError):
        jsoncodec.loads(b'["' + digits.encode() + b'\xff"]')  # invalid UTF-8


def test_deep_nesting_beyond_json_is_a_decode_error() -> None:
    depth = 1000  # orjson reads it; json (Python's recursion limit) cannot
    line = ("[" * depth + "1" * 20 + "]" * depth).encode()
    with pytest.raises(orjson.JSONDecodeError, match="nested too deeply"):
        jsoncodec.loads(line)


def test_only_decoded_big_integers_are_written() -> None:
    assert jsoncodec.dumps({"n": jsoncodec.BigInt(2**64)}) == b'{"n":18446744073709551616}'
    with pytest.raises(TypeError):
        jsoncodec.dumps({"n": object()})
