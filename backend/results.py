"""Masks and scores -> Label Studio result regions and predictions.

A brush region's RLE must decode to exactly original_width x original_height in the image's unrotated
frame (the browser decodes it into a buffer of the image's natural size), so both sizes come from the mask
itself, never from what the request claimed, and ``image_rotation`` is always 0: masks are computed on the
unrotated image (see ``backend.prompts``).

A bitmask region (BitmaskLabels) is a PNG data URL of the same natural size (``backend.bitmask``), black on
transparent as Label Studio's editor writes it.

Which output a project gets follows SAM_OUTPUT and its label config (``LabelConfig.output_tag``): auto
gives BrushLabels when the config has them, else BitmaskLabels, else PolygonLabels.
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Sequence
from typing import Any, TypedDict

import numpy as np

from backend import bitmask, rle
from backend.fast_json import RleList
from backend.label_config import ControlTag, LabelConfig

_ID_ALPHABET = string.ascii_letters + string.digits

Region = dict[str, Any]  # one Label Studio result region, as JSON


class Prediction(TypedDict):
    """One entry of /predict's ``results``."""

    result: list[Region]
    score: float  # the mean of the regions' scores, 0 when there are none
    model_version: str


def new_region_id() -> str:
    """A 10-character random id, the form Label Studio gives its own regions."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(10))


def brush_region(mask: np.ndarray, label: str, score: float, config: LabelConfig, *,
                 tag: ControlTag | None = None, region_id: str | None = None) -> Region:
    """One ``brushlabels`` region for a (H, W) mask. ``tag`` defaults to the config's BrushLabels."""
    mask = _check_mask(mask)
    value = {"format": "rle", "rle": RleList(rle.encode_array(mask)), "brushlabels": [label]}
    return _region("brushlabels", tag or config.output_tag("brush"), config, mask.shape, value, score, region_id)


def bitmask_region(mask: np.ndarray, label: str, score: float, config: LabelConfig, *,
                   tag: ControlTag | None = None, region_id: str | None = None) -> Region:
    """One ``bitmasklabels`` region for a (H, W) mask: the stored form of Label Studio's BitmaskLabels tag."""
    mask = _check_mask(mask)
    value = {"imageDataURL": bitmask.encode(mask), "bitmasklabels": [label]}
    return _region("bitmasklabels", tag or config.output_tag("bitmask"), config, mask.shape, value, score, region_id)


def polygon_regions(mask: np.ndarray, label: str, score: float, config: LabelConfig, *,
                    tag: ControlTag | None = None, **polygon_options: Any) -> list[Region]:
    """``polygonlabels`` regions for a (H, W) mask: one per connected part, points in percent, closed.

    A mask with several parts becomes several regions (Label Studio polygons have one outline each), all
    with the same score. An empty mask gives no region. ``polygon_options`` go to
    ``backend.polygons.mask_to_polygons`` (e.g. simplification tolerance).
    """
    # Imported here: tracing outlines needs OpenCV, which brush-only deployments never load.
    from backend import polygons

    mask = _check_mask(mask)
    tag = tag or config.output_tag("polygon")
    return [_region("polygonlabels", tag, config, mask.shape,
                    {"points": [[float(x), float(y)] for x, y in outline], "closed": True, "polygonlabels": [label]},
                    score)
            for outline in polygons.mask_to_polygons(mask, **polygon_options)]


def mask_regions(mask: np.ndarray, label: str, score: float, config: LabelConfig,
                 output: str = "auto") -> list[Region]:
    """The regions for one mask in the form SAM_OUTPUT (auto | brush | bitmask | polygon) and the config ask for."""
    tag = config.output_tag(output)
    if tag.kind == "BrushLabels":
        return [brush_region(mask, label, score, config, tag=tag)]
    if tag.kind == "BitmaskLabels":
        return [bitmask_region(mask, label, score, config, tag=tag)]
    return polygon_regions(mask, label, score, config, tag=tag)


def prediction(regions: Sequence[Region], model_version: str) -> Prediction:
    """One entry of /predict's ``results``: the regions, their mean score (0 when none) and the model."""
    scores = [float(region["score"]) for region in regions if "score" in region]
    return {
        "result": list(regions),
        "score": float(np.mean(scores)) if scores else 0.0,
        "model_version": model_version,
    }


def _region(kind: str, tag: ControlTag, config: LabelConfig, shape: tuple[int, ...], value: dict[str, Any],
            score: float, region_id: str | None = None) -> Region:
    """A region of the output tag, in the shape every mask form shares: ids, names, the image size, the score."""
    height, width = shape
    return {
        "id": region_id or new_region_id(),
        "type": kind,
        "from_name": tag.name,
        "to_name": _to_name(tag, config),
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": value,
        "score": float(score),
    }


def _to_name(tag: ControlTag, config: LabelConfig) -> str:
    """The Image name a region points to: the tag's toName (the first, if it names several images)."""
    return tag.to_name.split(",")[0].strip() or config.image.name


def _check_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.shape[0] == 0 or mask.shape[1] == 0:
        raise ValueError(f"a mask must be a non-empty (H, W) array, got shape {mask.shape}")
    return mask.astype(bool, copy=False)
