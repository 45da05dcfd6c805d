"""Masks -> Label Studio regions, checked with Label Studio's own RLE decoder and the fixtures' config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface

from backend.errors import LabelConfigError
from backend.label_config import LabelConfig, parse_label_config
from backend.results import brush_region, mask_regions, new_region_id, polygon_regions, prediction
from testsupport.backend import brush_mask

H, W = 240, 320
POLYGON_CONFIG = """<View><Image name="photo" value="$image"/>
  <PolygonLabels name="outline" toName="photo"><Label value="Object"/></PolygonLabels></View>"""


@pytest.fixture(scope="module")
def config(fixtures_dir: Path) -> LabelConfig:
    body = json.loads((fixtures_dir / "predict_interactive_keypoint_api.json").read_text())["body"]
    return parse_label_config(body["label_config"])


def disc(cx: float = 160, cy: float = 120, r: float = 50) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2


def test_brush_region_decodes_to_the_mask_in_label_studio(config: LabelConfig) -> None:
    mask = disc()
    region = brush_region(mask, "Object", np.float32(0.93), config)
    assert {k: v for k, v in region.items() if k not in ("value", "id")} == {
        "type": "brushlabels", "from_name": "brush", "to_name": "image", "original_width": W,
        "original_height": H, "image_rotation": 0, "score": pytest.approx(0.93),
    }
    assert type(region["score"]) is float
    assert region["value"]["format"] == "rle" and region["value"]["brushlabels"] == ["Object"]
    assert all(isinstance(v, int) and 0 <= v <= 255 for v in region["value"]["rle"])
    np.testing.assert_array_equal(brush_mask(region), mask)
    json.dumps(region)  # plain JSON types only


def test_brush_region_size_comes_from_the_mask(config: LabelConfig) -> None:
    mask = np.zeros((7, 5), dtype=np.uint8)
    mask[2:4, 1:3] = 1
    region = brush_region(mask, "Object", 0.5, config, region_id="fixed")
    assert (region["original_width"], region["original_height"], region["id"]) == (5, 7, "fixed")
    np.testing.assert_array_equal(brush_mask(region), mask.astype(bool))


def test_region_ids_are_short_and_distinct() -> None:
    ids = {new_region_id() for _ in range(200)}
    assert len(ids) == 200 and all(len(i) == 10 and i.isalnum() for i in ids)


def test_brush_needs_a_brush_tag() -> None:
    with pytest.raises(LabelConfigError, match="BrushLabels"):
        brush_region(disc(), "Object", 0.9, parse_label_config(POLYGON_CONFIG))


@pytest.mark.parametrize("mask", [np.zeros((0, 4)), np.zeros((3, 4, 2)), np.zeros(5)])
def test_bad_masks(config: LabelConfig, mask: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        brush_region(mask, "Object", 0.9, config)


def test_mask_regions_follow_the_output_setting(config: LabelConfig) -> None:
    [region] = mask_regions(disc(), "Object", 0.8, config, "auto")
    assert region["type"] == "brushlabels"
    assert mask_regions(disc(), "Object", 0.8, config, "brush")[0]["type"] == "brushlabels"
    with pytest.raises(LabelConfigError, match="SAM_OUTPUT=polygon needs a <PolygonLabels>"):
        mask_regions(disc(), "Object", 0.8, config, "polygon")


def test_prediction_score_is_the_mean_of_its_regions(config: LabelConfig) -> None:
    regions = [brush_region(disc(), "Object", s, config) for s in (0.5, 1.0)]
    assert prediction(regions, "sam-vit_b-abc") == {"result": regions, "score": 0.75,
                                                   "model_version": "sam-vit_b-abc"}
    assert prediction([], "v") == {"result": [], "score": 0.0, "model_version": "v"}


def test_label_studio_sdk_accepts_the_prediction(fixtures_dir: Path, config: LabelConfig) -> None:
    """Label Studio's own validator, on the project's real config, accepts what we answer."""
    body = json.loads((fixtures_dir / "predict_interactive_keypoint_api.json").read_text())["body"]
    interface = LabelInterface(body["label_config"])
    answer = prediction(mask_regions(disc(), "Object", 0.9, config), "v1")
    assert interface.validate_prediction(answer, return_errors=True) == []
    wrong = prediction(mask_regions(disc(), "Car", 0.9, config), "v1")  # the oracle does catch mistakes
    assert interface.validate_prediction(wrong, return_errors=True) != []


# -- polygons (the outline tracer lives in backend.polygons)


def test_polygon_regions_one_per_part_in_percent() -> None:
    config = parse_label_config(POLYGON_CONFIG)
    mask = np.zeros((H, W), dtype=bool)
    mask[60:180, 80:160] = True  # a rectangle: x 25-50 %, y 25-75 %
    mask[20:40, 240:300] = True  # a second part
    regions = polygon_regions(mask, "Object", 0.7, config)
    assert len(regions) == 2
    for region in regions:
        assert region["type"] == "polygonlabels" and region["from_name"] == "outline"
        assert region["to_name"] == "photo" and region["image_rotation"] == 0
        assert (region["original_width"], region["original_height"], region["score"]) == (W, H, 0.7)
        assert region["value"]["closed"] is True and region["value"]["polygonlabels"] == ["Object"]
        points = np.asarray(region["value"]["points"])
        assert points.ndim == 2 and points.shape[1] == 2 and len(points) >= 3
        assert points.min() >= 0 and points.max() <= 100
    boxes = sorted((np.asarray(r["value"]["points"]).min(0).tolist(), np.asarray(r["value"]["points"]).max(0)
                    .tolist()) for r in regions)
    (lo, hi) = boxes[0]
    np.testing.assert_allclose(lo, [25, 25], atol=0.5)
    np.testing.assert_allclose(hi, [50, 75], atol=0.5)
    assert mask_regions(mask, "Object", 0.7, config)[0]["type"] == "polygonlabels"  # auto -> polygon
    answer = prediction(regions, "v1")
    assert LabelInterface(POLYGON_CONFIG).validate_prediction(answer, return_errors=True) == []
    assert polygon_regions(np.zeros((H, W), bool), "Object", 0.7, config) == []
