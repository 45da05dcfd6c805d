"""A request body -> a JSON object every later step can trust the primitive values of, or a 400 naming the field.

Why a check of its own after ``json.loads``: Python's parser accepts what the rest of the backend cannot take.
``NaN`` / ``Infinity`` / ``1e999`` become non-finite floats, a 401-digit integer becomes an int that
``float()`` refuses with OverflowError, ``"\\ud800"`` becomes a lone surrogate that UTF-8 encoding (logs,
answers) refuses with UnicodeEncodeError, and nesting a few thousand levels deep makes the parser itself raise
RecursionError. Each of those surfaced as a 500 somewhere downstream. Here they become one 400 each, with the
path to the value (``tasks[0].data.image``), before anything else reads the body.

Cost: one pass over the parsed values, iterative (no recursion), with a C-speed path for the long lists of
small integers that Label Studio's brush RLE fills bodies with, so a click carrying megabytes of saved masks
pays milliseconds for it.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from backend.errors import BadRequest

INT_BOUND = 2**63  # integers beyond a signed 64-bit value are nobody's id, coordinate or RLE count
_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins valid pairs, so any left is lone


def parse_object(data: bytes, max_depth: int) -> dict[str, Any]:
    """The body as a JSON object; BadRequest (400) saying what is wrong and where."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise BadRequest(f"the request body is not UTF-8 text (invalid byte at offset {error.start})") from None
    if not text.strip():
        raise BadRequest("the request body is empty: it must be a JSON object (Content-Type: application/json)")
    try:
        body = json.loads(text)
    except RecursionError:
        raise BadRequest(f"the request body is nested too deeply (at most {max_depth} levels)") from None
    except ValueError as error:  # JSONDecodeError, and integers beyond Python's digit limit
        raise BadRequest(f"the request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {_kind(body)}")
    check_values(body, max_depth)
    return body


def check_values(root: object, max_depth: int) -> None:
    """BadRequest for the first value deeper than ``max_depth``, non-finite, too large, or with a lone surrogate."""
    stack: list[tuple[object, str, int]] = [(root, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, dict):
            if depth >= max_depth:
                raise BadRequest(f"{_where(path)} is nested too deeply (at most {max_depth} levels)")
            for key, item in value.items():
                if _SURROGATE.search(key):
                    raise BadRequest(f"{_where(path)} has a key with an unpaired UTF-16 surrogate: {key!r}")
                if isinstance(item, (dict, list, str, float, int)):
                    stack.append((item, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(value, list):
            if depth >= max_depth:
                raise BadRequest(f"{_where(path)} is nested too deeply (at most {max_depth} levels)")
            if value and _all_small_ints(value):
                continue
            for index, item in enumerate(value):
                if isinstance(item, (dict, list, str, float, int)):
                    stack.append((item, f"{path}[{index}]", depth + 1))
        elif isinstance(value, str):
            if _SURROGATE.search(value):
                raise BadRequest(f"{_where(path)} has an unpaired UTF-16 surrogate: {value[:80]!r}")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise BadRequest(f"{_where(path)} must be a finite number, got {value!r}")
        elif isinstance(value, int) and not isinstance(value, bool) and not -INT_BOUND <= value <= INT_BOUND:
            raise BadRequest(f"{_where(path)} is an integer of {len(str(abs(value)))} digits, beyond any value "
                             "this backend takes")


def _all_small_ints(values: list[Any]) -> bool:
    """A list of plain ints within the bound (RLE, points): checked with C loops, not item by item."""
    if set(map(type, values)) != {int}:
        return False
    return min(values) >= -INT_BOUND and max(values) <= INT_BOUND


def _where(path: str) -> str:
    return f"'{path}'" if path else "the request body"


def _kind(value: object) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
            type(None): "null"}.get(type(value), type(value).__name__)
