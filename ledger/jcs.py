"""RFC 8785 (JCS) canonical JSON, fast. Pure.

`rfc8785.dumps` is exact but slow (pure Python, ~150 us for a ledger body). For the values the
ledger writes (str keys, str/int/bool/None/list/dict and floats in plain decimal notation) the
stdlib encoder with sorted keys and no whitespace produces the same bytes, once integral floats
become ints (ES6 prints 1.0 as "1") and floats Python prints in exponent form are written with
ES6 rules (`es6_number`). Anything outside that domain (ints beyond 2**53, keys that UTF-16
ordering would sort differently, lone surrogates) goes to `rfc8785`.
tests/test_ledger_features.py checks the two agree, with hypothesis.
"""

from __future__ import annotations

import json
from typing import Any

import rfc8785

_MAX_SAFE_INT = 2**53 - 1
_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


class _Slow(Exception):
    """The value needs the exact (slow) serializer."""


def dumps(value: Any) -> bytes:
    """RFC 8785 canonical UTF-8 bytes of a JSON value."""
    numbers: list[str] = []
    try:
        text = _ENCODER.encode(_prepare(value, numbers))
    except (_Slow, ValueError):
        return rfc8785.dumps(value)
    # Floats Python would print in exponent form went in as placeholder strings made of
    # control characters; user strings holding the marker take the slow path, so no collision.
    for i, number in enumerate(numbers):
        text = text.replace(f'"{_MARK_OUT}{i}{_MARK_OUT}"', number, 1)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return rfc8785.dumps(value)


_MARK = "\x00\x01"
_MARK_OUT = "\\u0000\\u0001"  # how the encoder writes _MARK


def es6_number(x: float) -> str:
    """ECMAScript Number.prototype.toString for a finite float (RFC 8785 section 3.2.2.3)."""
    if x == 0:
        return "0"
    r = repr(abs(x))
    mant, _, exp = r.partition("e")
    int_part, _, frac = mant.partition(".")
    digits = (int_part + frac).lstrip("0")
    point = len(int_part) + (int(exp) if exp else 0) - (len(int_part + frac) - len(digits))
    digits = digits.rstrip("0") or "0"
    sign = "-" if x < 0 else ""
    k = len(digits)
    if k <= point <= 21:
        out = digits + "0" * (point - k)
    elif 0 < point <= 21:
        out = digits[:point] + "." + digits[point:]
    elif -6 < point <= 0:
        out = "0." + "0" * (-point) + digits
    else:
        e = point - 1
        mantissa = digits[0] + ("." + digits[1:] if k > 1 else "")
        out = mantissa + ("e+" if e > 0 else "e-") + str(abs(e))
    return sign + out


def _prepare(value: Any, numbers: list[str]) -> Any:
    t = type(value)
    if t is str:
        if _MARK in value:
            raise _Slow
        return value
    if t is dict:
        out = {}
        for key, item in value.items():
            # Python sorts by code point, JCS by UTF-16 unit: they differ only above U+E000.
            if (
                type(key) is not str
                or _MARK in key
                or (not key.isascii() and any(c >= "\ue000" for c in key))
            ):
                raise _Slow
            out[key] = _prepare(item, numbers)
        return out
    if t is int:
        if -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT:
            return value
        raise _Slow
    if t is float:
        if value != value or value in (_INF, -_INF):
            raise _Slow
        if value.is_integer() and -1e16 < value < 1e16:
            return int(value)
        if "e" in repr(value):
            numbers.append(es6_number(value))
            return f"{_MARK}{len(numbers) - 1}{_MARK}"
        return value
    if value is None or t is bool:
        return value
    if t is list or t is tuple:
        return [_prepare(item, numbers) for item in value]
    raise _Slow  # subclasses and other types: let rfc8785 decide


_INF = float("inf")
