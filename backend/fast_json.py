"""JSON for /predict answers whose brush RLEs are 100k+ numbers, written without a Python loop per number.

A brush RLE is a list of byte values (``backend.rle``): a speckled 4000x3000 mask gives ~270k of them, and
the stdlib encoder behind Flask's ``jsonify`` spends 14-28 ms turning them into text one Python int at a
time, a third of a warm click. ``RleList`` is the list ``results.brush_region`` puts in a region (a real
``list``: tests, the Label Studio client and the stdlib encoder read it as usual) that also keeps the
uint8 array it came from; ``dumps`` writes every ``RleList`` of a payload from that array in one vectorised
pass and lets the stdlib encode the rest, so the text is byte-for-byte what ``json.dumps`` gives.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["RleList", "array_text", "dumps"]

# Each value's decimal digits right-aligned in 3 bytes, and its text's width with the comma (2..4 bytes).
_DIGITS = np.zeros((256, 3), dtype=np.uint8)
_WIDTHS = np.zeros(256, dtype=np.int64)
for _value in range(256):
    _text = str(_value).encode()
    _DIGITS[_value, 3 - len(_text):] = np.frombuffer(_text, dtype=np.uint8)
    _WIDTHS[_value] = len(_text) + 1
_COMMA = ord(",")


class RleList(list[int]):
    """A brush RLE as the list of ints Label Studio expects, plus the uint8 array it was made from."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=np.uint8)
        super().__init__(array.tolist())
        self.array = array


def array_text(values: np.ndarray) -> str:
    """``json.dumps(values.tolist(), separators=(",", ":"))``-equivalent text of a uint8 array, vectorised.

    The stdlib's default separator ``", "`` is not used: Flask's provider writes compact JSON
    (``separators=(",", ":")``) unless it pretty-prints, and ``dumps`` checks which one is in force.
    """
    values = np.asarray(values, dtype=np.uint8).ravel()
    if values.size == 0:
        return "[]"
    # Every value's text ends at its comma: write the commas, then the last, middle and first digits of
    # the values that have them, each as one scatter (no per-value work in Python).
    widths = _WIDTHS[values]
    ends = np.cumsum(widths)
    out = np.empty(int(ends[-1]), dtype=np.uint8)
    out[ends - 1] = _COMMA
    out[ends - 2] = _DIGITS[values, 2]
    two = widths > 2
    out[ends[two] - 3] = _DIGITS[values[two], 1]
    three = widths > 3
    out[ends[three] - 4] = _DIGITS[values[three], 0]
    return "[" + out[:-1].tobytes().decode("ascii") + "]"


def dumps(obj: Any, encode: Callable[[Any], str]) -> str:
    """``encode(obj)`` with each ``RleList`` in it written by ``array_text``.

    ``encode`` is the stdlib-based encoder in force (Flask's provider); the RLEs are swapped for unique
    placeholder strings, the rest encoded by it, and the placeholders replaced by the arrays' text. When
    ``encode`` does not write compact separators (pretty-printing, a debug setting) nothing is swapped.
    """
    arrays: list[np.ndarray] = []
    nonce = secrets.token_hex(8)

    def swap(value: Any) -> Any:
        if isinstance(value, RleList):
            arrays.append(value.array)
            return f"rle-{nonce}-{len(arrays) - 1}"
        if isinstance(value, dict):
            return {key: swap(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [swap(item) for item in value]
        return value

    skeleton = swap(obj)
    if not arrays or encode([0, 1]) != "[0,1]":
        return encode(obj)
    text = encode(skeleton)
    for index, array in enumerate(arrays):
        text = text.replace(f'"rle-{nonce}-{index}"', array_text(array), 1)
    return text
