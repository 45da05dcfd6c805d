"""The /predict JSON writer: the same text (and so the same parsed JSON) as the stdlib, RLEs written vectorised."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from backend import rle
from backend.fast_json import RleList, array_text, dumps


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True, sort_keys=False)


@pytest.mark.parametrize("size", [0, 1, 7, 1000, 270_000])
def test_array_text_is_the_stdlib_text(size: int) -> None:
    values = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    values[: min(size, 256)] = np.arange(min(size, 256))  # every value's digits
    assert array_text(values) == compact(values.tolist())


def test_payloads_with_rles_are_byte_for_byte_the_stdlib_json() -> None:
    rng = np.random.default_rng(0)
    speckle = rle.encode_array(rng.random((300, 400)) > 0.5)
    blob = rle.encode_array(np.pad(np.ones((50, 60), bool), 40))
    payload = {
        "results": [{"result": [
            {"id": "ab\"c", "value": {"format": "rle", "rle": RleList(speckle), "brushlabels": ["Cat é"]}},
            {"id": "x", "value": {"format": "rle", "rle": RleList(blob), "brushlabels": ["rle-0"]}},
            {"value": {"points": [[1.5, 2.0], [3.25, 4.0]], "closed": True}, "score": 0.5},
        ], "score": 0.93, "model_version": "vit_t-1234"}],
        "model_version": "vit_t-1234", "nothing": None, "tuple": (1, 2),
    }
    text = dumps(payload, compact)
    assert text == compact(payload)
    assert json.loads(text) == json.loads(json.dumps(payload))
    assert json.loads(text)["results"][0]["result"][0]["value"]["rle"] == speckle.tolist()


def test_rle_lists_are_plain_lists_for_everyone_else() -> None:
    values = rle.encode_array(np.eye(20, dtype=bool))
    listed = RleList(values)
    assert listed == rle.encode(np.eye(20, dtype=bool)) and isinstance(listed, list)
    assert json.dumps({"rle": listed}) == json.dumps({"rle": values.tolist()})


def test_pretty_printing_encoders_are_left_alone() -> None:
    payload = {"rle": RleList(np.array([1, 2, 3], np.uint8))}
    pretty = dumps(payload, lambda value: json.dumps(value, indent=2))
    assert pretty == json.dumps({"rle": [1, 2, 3]}, indent=2)


def test_the_app_answers_with_it(tmp_path) -> None:
    from backend.app import create_app
    from backend.config import Settings

    app = create_app(Settings(sam_checkpoint=str(tmp_path / "none.pth"), sam_warmup=False))
    payload = {"rle": RleList(rle.encode_array(np.eye(64, dtype=bool))), "é": "x"}
    with app.app_context():
        text = app.json.response(payload).get_data(as_text=True)
    assert text.rstrip("\n") == compact(payload)
