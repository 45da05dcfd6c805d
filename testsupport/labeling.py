"""An annotator's view of a labeling session, shared by the e2e tests and ``bench.browser``.

The labeling config recorded from Label Studio 1.23.2, a scene image as the browser shows it, the editor's own
decode of a brush answer, and the masks ``model.Predictor`` gives for the same prompts on the same checkpoint:
what a mask that Label Studio handed the editor is compared with, pixel for pixel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from backend.prompts import asks_three_masks
from testsupport.backend import brush_mask, fixture_body

LABEL = "Object"  # the one label of label_config()'s control tags


def label_config() -> str:
    """BrushLabels + smart KeyPointLabels + smart RectangleLabels: the config recorded from Label Studio."""
    return str(fixture_body("setup.json")["schema"])


@dataclass(frozen=True)
class SceneImage:
    path: Path
    pixels: np.ndarray  # HxWx3 uint8 RGB as the browser shows it (EXIF orientation applied)

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    @property
    def width(self) -> int:
        return self.pixels.shape[1]



class Reference:
    """What the backend should answer, computed with ``model.Predictor`` directly on the same checkpoint."""

    def __init__(self, checkpoint: Path) -> None:
        import torch

        from model import Predictor, load

        torch.set_num_threads(1)
        self.sam = load(checkpoint, device="cpu", dtype=torch.float32)
        self.predictor = Predictor(self.sam)
        self._embeddings: dict[Path, Any] = {}

    @property
    def model_version(self) -> str:
        return f"{self.sam.name}-{self.sam.fingerprint[:8]}"

    def embedding(self, image: SceneImage) -> Any:
        if image.path not in self._embeddings:
            self._embeddings[image.path] = self.predictor.embed(image.pixels).at_stored_precision()
        return self._embeddings[image.path]

    def mask(self, image: SceneImage, points: list[tuple[float, float]] | None = None,
             box: tuple[float, float, float, float] | None = None,
             positive: list[bool] | None = None, refined_from: np.ndarray | None = None) -> np.ndarray:
        """SAM's rule for one object (``asks_three_masks``): a single click is ambiguous, so the best of three by
        predicted IoU; anything more specific gives one mask. ``refined_from``: the low-res logits of the
        earlier click this one extends (``logits``), fed back as ``mask_input`` as the backend refines
        (``SAM_REFINE``) and as Meta's predictor does for iterative clicks."""
        return self._predict(image, points, box, positive, refined_from).masks[0]

    def logits(self, image: SceneImage, points: list[tuple[float, float]] | None = None,
               box: tuple[float, float, float, float] | None = None,
               positive: list[bool] | None = None, refined_from: np.ndarray | None = None) -> np.ndarray:
        """The low-res logits of that answer: what a later click that extends this one starts from."""
        return self._predict(image, points, box, positive, refined_from).low_res_logits[0]

    def _predict(self, image: SceneImage, points: list[tuple[float, float]] | None,
                 box: tuple[float, float, float, float] | None, positive: list[bool] | None,
                 refined_from: np.ndarray | None) -> Any:
        coords = np.asarray(points, dtype=np.float32).reshape(-1, 2) if points else None
        labels = None
        if coords is not None:
            labels = np.asarray(positive if positive is not None else [True] * len(coords), dtype=np.int32)
        box_array = np.asarray(box, dtype=np.float32) if box is not None else None
        multimask = asks_three_masks(0 if coords is None else len(coords), box is not None)
        return self.predictor.predict(self.embedding(image), points=coords, labels=labels, box=box_array,
                                      mask_input=refined_from, multimask=multimask, best_only=True)


def decode_brush(region: dict[str, Any], image: SceneImage) -> np.ndarray:
    """The mask the browser would paint: Label Studio's own decoder, alpha channel, displayed size."""
    assert region["type"] == "brushlabels", region
    assert region["from_name"] == "brush" and region["to_name"] == "image", region
    assert region["value"]["brushlabels"] == [LABEL], region
    assert (region["original_width"], region["original_height"]) == (image.width, image.height), region
    return brush_mask(region)


def assert_same_mask(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert got.shape == expected.shape, f"{what}: mask {got.shape} vs reference {expected.shape}"
    differ = int((got != expected).sum())
    assert differ == 0, (f"{what}: {differ} of {got.size} pixels differ from model.Predictor "
                         f"(backend {int(got.sum())} px set, reference {int(expected.sum())} px)")
