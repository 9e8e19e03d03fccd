"""JSON in and out, exact for integers of any size.

orjson is fast but holds an integer in 64 bits: it reads a larger one as a
float (2**64 arrives as ``1.8446744073709552e+19``) and refuses to write one.
An integer out of its range has at least 19 digits, so a line with a run of
19 digits is read again by the standard library's ``json``, whose integers
have no size limit, once orjson has accepted it (so both accept the same
lines, with the same errors).  Such integers come out as :class:`BigInt`,
which :func:`dumps` has orjson write exactly, digit for digit; everything
else is written by orjson as always.  Any other line costs one C-level scan
of its bytes more than orjson alone (docs/protocol.md, "Numbers").
"""

from __future__ import annotations

import json
from typing import Any

import orjson

# Digits to "1", every other byte to "0": a run of 19 digits becomes _RUN.
_DIGITS = bytes(49 if 48 <= b <= 57 else 48 for b in range(256))
_RUN = b"1" * 19  # -2**63 - 1 has 19 digits; every integer with fewer fits orjson
_LOW, _HIGH = -(2**63), 2**64 - 1  # what orjson reads and writes exactly
MAX_DEPTH = 254  # levels of arrays and objects orjson writes (it reads up to 1023)


class BigInt(int):
    """An integer orjson cannot hold: :func:`dumps` writes it through orjson.Fragment."""

    __slots__ = ()


def _integer(text: str) -> int:
    value = int(text)
    return value if _LOW <= value <= _HIGH else BigInt(value)


def loads(data: bytes) -> Any:
    """Decode a request; raises orjson.JSONDecodeError (a ValueError) for invalid JSON."""
    value = orjson.loads(data)
    if type(value) is dict and "id" not in value:
        # What a push sends on (commands.payload's choice): a string is sent as
        # it is, so nothing a big integer could change goes anywhere.
        text = value["data"] if "data" in value else value.get("percent")
        if type(text) is str:
            return value
    if data.translate(_DIGITS).find(_RUN) < 0:
        return value
    try:
        return json.loads(data.decode("utf-8"), parse_int=_integer)
    except RecursionError:
        # json nests less deeply than orjson (Python's recursion limit).
        raise orjson.JSONDecodeError("nested too deeply for its long numbers", "", 0) from None


def _fragment(value: Any) -> orjson.Fragment:
    if isinstance(value, BigInt):
        return orjson.Fragment(int.__repr__(value))
    raise TypeError(f"{type(value).__name__} is not JSON")


def dumps(value: Any) -> bytes:
    """Compact JSON, as orjson writes it; integers beyond 64 bits (from :func:`loads`) exactly."""
    try:
        return orjson.dumps(value)
    except TypeError:  # a BigInt, which orjson writes only through default
        return orjson.dumps(value, default=_fragment, option=orjson.OPT_PASSTHROUGH_SUBCLASS)
