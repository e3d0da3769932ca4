"""JSON as Go's encoding/json reads a request body: no NaN or Infinity, no number beyond a float64, and a
bounded nesting depth, so a body can only ever be refused (400), never crash a handler.

Go stops at 10,000 levels; here the bound is lower because Python code downstream (validation, templates, the
JSON-schema grammar) recurses once or more per level and Python's stack holds about 1,000 frames.

The number of values is bounded too, and counted before parsing: an empty array is 2 bytes of JSON and about 80
of Python, so 8 MiB of `[],[],...` would take 200 MiB and close to a second of parsing that nothing interrupts.
"""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any

MAX_DEPTH = 100
"""Arrays and objects nested deeper than this are refused; real requests (JSON schemas, tool arguments) nest
a few levels."""


MAX_VALUES = 250_000
"""Arrays, objects and their elements, at most; real requests hold far fewer (a 128k-token `context` fits)."""


class InvalidJSON(ValueError):
    """A body that is not JSON as Go reads it; the message is one line."""


def _constant(name: str) -> Any:
    raise InvalidJSON(f"{name} is not a JSON value")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InvalidJSON(f"number {text[:40]} is out of range")
    return value


def _int(text: str) -> int:
    # Go reads every JSON number as a float64: an integer of 310 digits or more is out of its range, and Python
    # code that turns one into a float downstream (keep_alive, options) would fail with OverflowError.
    if len(text.lstrip("-")) > 309 or abs(value := int(text)) > sys.float_info.max:
        raise InvalidJSON(f"number {text[:40]}… is out of range")
    return value


def text(data: bytes | bytearray) -> str:
    """A body's text: UTF-8, as Go's encoding/json reads it (no other encoding, no encoded surrogate halves)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidJSON(f"not UTF-8: {exc}") from exc


def loads(data: str | bytes | bytearray) -> Any:
    """`data` parsed; InvalidJSON for anything Go's encoding/json refuses, nested deeper than MAX_DEPTH, or of
    more than MAX_VALUES values."""
    data = data if isinstance(data, str) else text(data)
    if _values(data) > MAX_VALUES:
        raise InvalidJSON(f"more than {MAX_VALUES:,} values")
    try:
        value = json.loads(data, parse_constant=_constant, parse_float=_float, parse_int=_int)
    except RecursionError as exc:
        raise InvalidJSON(f"nested more than {MAX_DEPTH} levels deep") from exc
    except InvalidJSON:
        raise
    except json.JSONDecodeError as exc:
        raise InvalidJSON(str(exc)) from exc
    except ValueError as exc:  # Python refuses to convert integers of more than 4,300 digits
        raise InvalidJSON("a number is out of range") from exc
    _check_depth(value)
    if _SURROGATE_ESCAPE.search(data):
        value = _without_lone_surrogates(value)
    return value


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def _values(raw: str) -> int:
    """About the number of values in `raw`: containers, plus the commas between their elements. Counted on the
    whole text first (at C speed), and again with the strings emptied only when that is over MAX_VALUES (a
    prompt full of commas)."""
    count = raw.count(",") + raw.count("[") + raw.count("{")
    if count <= MAX_VALUES:
        return count
    bare = _STRING.sub('""', raw)
    return bare.count(",") + bare.count("[") + bare.count("{")


# Valid pairs decode to one character; what is left of \ud800-\udfff after parsing is a lone half, which Go
# reads as U+FFFD and which Python could not even encode as UTF-8 later (a 500 in the tokenizer).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _without_lone_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_without_lone_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_without_lone_surrogates(k): _without_lone_surrogates(v) for k, v in value.items()}
    return value


def _check_depth(value: Any) -> None:
    # Iterative: the point is to refuse what would make recursive code fail.
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > MAX_DEPTH:
                    raise InvalidJSON(f"nested more than {MAX_DEPTH} levels deep")
                stack.append((child, depth + 1))
