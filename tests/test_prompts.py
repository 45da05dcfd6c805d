"""Smart regions -> prompts: the real Label Studio 1.23.2 bodies replayed, then every rule and bad input."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from backend.errors import BadRequest, LabelConfigError
from backend.label_config import parse_label_config
from backend.prompts import parse_prompts, resolve_output_label

SIZE = (240, 320)  # (H, W) of the fixtures' image


def _context(fixtures_dir: Path, name: str) -> list[dict]:
    return json.loads((fixtures_dir / name).read_text())["body"]["params"]["context"]["result"]


def keypoint(x: float, y: float, label: str = "Object", positive: bool | None = True, **extra) -> dict:
    region = {"type": "keypointlabels", "from_name": "kp", "to_name": "image", "original_width": 320,
              "original_height": 240, "image_rotation": 0,
              "value": {"x": x, "y": y, "width": 0.26, "keypointlabels": [label]}, **extra}
    if positive is not None:
        region["is_positive"] = positive
    return region


def rectangle(x: float, y: float, w: float, h: float, label: str = "Object", rotation: float = 0,
              **extra) -> dict:
    return {"type": "rectanglelabels", "from_name": "rect", "to_name": "image", "original_width": 320,
            "original_height": 240, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation, "rectanglelabels": [label]},
            **extra}


# -- the fixtures


def test_fixture_keypoint_api(fixtures_dir: Path) -> None:
    [prompt] = parse_prompts(_context(fixtures_dir, "predict_interactive_keypoint_api.json"), SIZE)
    assert prompt.label == "Object" and prompt.from_name == "kp" and prompt.source_ids == ("kp1",)
    np.testing.assert_array_equal(prompt.points, [[160.0, 120.0]])
    np.testing.assert_array_equal(prompt.point_labels, [1])
    assert prompt.box is None and prompt.multimask is True
    assert prompt.points.dtype == np.float32 and prompt.point_labels.dtype == np.int32


def test_fixture_ui_click(fixtures_dir: Path) -> None:
    """The click a browser really made: 49.938 % / 50.082 % of 320 x 240."""
    [prompt] = parse_prompts(_context(fixtures_dir, "predict_interactive_keypoint_ui_click.json"), SIZE)
    np.testing.assert_allclose(prompt.points, [[0.4993832236842105 * 320, 0.5008223684210525 * 240]], rtol=1e-6)
    assert prompt.source_ids == ("dmPnPdej0m",) and prompt.multimask is True


def test_fixture_rectangle_api(fixtures_dir: Path) -> None:
    [prompt] = parse_prompts(_context(fixtures_dir, "predict_interactive_rectangle_api.json"), SIZE)
    np.testing.assert_array_equal(prompt.box, [80, 60, 240, 180])
    assert prompt.points.shape == (0, 2) and prompt.point_coords is None and prompt.multimask is False


def test_fixture_keypoint_and_rectangle_make_one_object(fixtures_dir: Path) -> None:
    [prompt] = parse_prompts(_context(fixtures_dir, "predict_interactive_keypoint_and_rectangle_api.json"), SIZE)
    np.testing.assert_array_equal(prompt.points, [[160, 120]])
    np.testing.assert_array_equal(prompt.box, [80, 60, 240, 180])
    assert prompt.source_ids == ("kp1", "rc1") and prompt.multimask is False


def test_fixture_prompt_labels_resolve_against_the_fixture_config(fixtures_dir: Path) -> None:
    body = json.loads((fixtures_dir / "predict_interactive_keypoint_api.json").read_text())["body"]
    config = parse_label_config(body["label_config"])
    [prompt] = parse_prompts(body["params"]["context"]["result"], SIZE)
    assert resolve_output_label(prompt.label, config.output_tag().labels) == "Object"


def test_no_context() -> None:
    assert parse_prompts(None, SIZE) == [] and parse_prompts([], SIZE) == []


# -- polarity, grouping, multimask


def test_polarity_and_missing_flag_is_positive() -> None:
    [prompt] = parse_prompts([keypoint(10, 10), keypoint(20, 20, positive=False),
                              keypoint(30, 30, positive=None), keypoint(40, 40, is_positive=None)], SIZE)
    np.testing.assert_array_equal(prompt.point_labels, [1, 0, 1, 1])
    np.testing.assert_allclose(prompt.points, [[32, 24], [64, 48], [96, 72], [128, 96]])
    assert prompt.multimask is False


def test_one_object_per_label_in_order_of_first_appearance() -> None:
    prompts = parse_prompts([
        keypoint(10, 10, "Car", id="a"), rectangle(50, 50, 10, 10, "Tree", id="b"),
        keypoint(20, 20, "Car", positive=False, id="c"), keypoint(60, 60, "Tree", id="d"),
        keypoint(90, 90, "Sky", id="e"),
    ], SIZE)
    assert [p.label for p in prompts] == ["Car", "Tree", "Sky"]
    car, tree, sky = prompts
    assert car.source_ids == ("a", "c") and car.box is None and car.multimask is False
    np.testing.assert_array_equal(car.point_labels, [1, 0])
    assert tree.source_ids == ("b", "d") and tree.multimask is False
    np.testing.assert_array_equal(tree.box, [160, 120, 192, 144])
    np.testing.assert_array_equal(tree.points, [[192, 144]])
    assert sky.multimask is True


def test_last_rectangle_of_a_label_is_the_box() -> None:
    [prompt] = parse_prompts([rectangle(0, 0, 10, 10, id="r1"), rectangle(50, 50, 25, 25, id="r2")], SIZE)
    np.testing.assert_array_equal(prompt.box, [160, 120, 240, 180])
    assert prompt.source_ids == ("r1", "r2")


def test_generic_labels_field_is_accepted() -> None:
    region = keypoint(50, 50)
    region["value"] = {"x": 50, "y": 50, "labels": ["Car"]}
    assert parse_prompts([region], SIZE)[0].label == "Car"


# -- geometry


@pytest.mark.parametrize("rotation, box", [
    (0, [80, 60, 240, 180]),
    (90, [0, 60, 80, 220]),    # corners x in [-40, 80], y in [60, 220]; clipped at x = 0
    (180, [0, 0, 80, 60]),     # corners x in [-80, 80], y in [-60, 60]
    (270, [80, 0, 200, 60]),   # corners x in [80, 200], y in [-100, 60]
    (-90, [80, 0, 200, 60]),
    (360, [80, 60, 240, 180]),
])
def test_rotated_fixture_rectangle(rotation: float, box: list[float]) -> None:
    [prompt] = parse_prompts([rectangle(25, 25, 50, 50, rotation=rotation)], SIZE)
    np.testing.assert_allclose(prompt.box, box, atol=1e-4)


def test_rotated_rectangle_inside_the_image_is_not_clipped() -> None:
    # 80 x 60 px from (160, 24): at 90 degrees the corners are (160,24) (160,104) (100,104) (100,24)
    [prompt] = parse_prompts([rectangle(50, 10, 25, 25, rotation=90)], SIZE)
    np.testing.assert_allclose(prompt.box, [100, 24, 160, 104], atol=1e-4)
    [prompt] = parse_prompts([rectangle(50, 10, 25, 25, rotation=45)], SIZE)
    r = np.sqrt(0.5)
    np.testing.assert_allclose(prompt.box, [160 - 60 * r, 24, 160 + 80 * r, 24 + 140 * r], atol=1e-3)


@pytest.mark.parametrize("image_rotation", [0, 90, 180, 270])
def test_image_rotation_keeps_the_unrotated_frame(image_rotation: int) -> None:
    """Label Studio rotates the canvas, not the regions: the same percentages mean the same pixels."""
    prompts = parse_prompts([keypoint(25, 50, image_rotation=image_rotation),
                             rectangle(25, 25, 50, 50, image_rotation=image_rotation)], SIZE)
    np.testing.assert_array_equal(prompts[0].points, [[80, 120]])
    np.testing.assert_array_equal(prompts[0].box, [80, 60, 240, 180])


def test_percent_of_the_real_image_when_sizes_disagree(caplog: pytest.LogCaptureFixture) -> None:
    """A point at 25 %/50 % of a 400 x 300 image is (100, 150), whatever size the browser reported."""
    with caplog.at_level(logging.WARNING, logger="backend.prompts"):
        [prompt] = parse_prompts([keypoint(25, 50), keypoint(30, 30)], (300, 400))
    np.testing.assert_array_equal(prompt.points[0], [100, 150])
    assert len([r for r in caplog.records if "differs from the task image" in r.message]) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="backend.prompts"):
        parse_prompts([keypoint(25, 50)], SIZE)
    assert not caplog.records


def test_points_within_a_pixel_outside_are_clamped() -> None:
    # 100.2 % of 320 = 320.64 px: inside the 1 px tolerance; -0.3 % of 240 = -0.72 px
    [prompt] = parse_prompts([keypoint(100.2, -0.3), keypoint(100, 100)], SIZE)
    np.testing.assert_array_equal(prompt.points, [[320, 0], [320, 240]])


# -- bad input


@pytest.mark.parametrize("regions, message", [
    ({"result": []}, "must be a list"),
    (["kp"], "not an object"),
    ([{"value": {"x": 1, "y": 1}}], "no 'type'"),
    ([{"type": "keypointlabels", "id": "k9"}], r"region 0 \(id 'k9'\) has no 'value'"),
    ([keypoint(101, 50)], "outside the 320x240 image"),
    ([keypoint(50, -1)], "outside the 320x240 image"),
    ([keypoint("50", 50)], "value.x must be a finite number"),
    ([keypoint(50, None)], "has no value.y"),
    ([keypoint(float("nan"), 50)], "finite number"),
    ([keypoint(True, 50)], "finite number"),
    ([keypoint(50, 50, positive="no")], "is_positive must be true or false"),
    ([keypoint(50, 50, label="")], "has no label"),
    ([{**keypoint(50, 50), "value": {"x": 50, "y": 50}}], "has no label"),
    ([rectangle(10, 10, 0, 10)], "zero or negative size"),
    ([rectangle(10, 10, 10, -5)], "zero or negative size"),
    ([rectangle(10, 10, 10, "wide")], "value.height must be a finite number"),
    ([rectangle(10, 10, 10, 10, rotation="x")], "value.rotation"),
    ([rectangle(150, 10, 10, 10)], "rectangle lies outside"),
    ([rectangle(10, 10, 0.2, 10)], "less than a pixel"),
    ([rectangle(99.9, 10, 10, 10)], "less than a pixel"),
    ([keypoint(50, 50, image_rotation=45)], "image_rotation must be 0, 90, 180 or 270"),
])
def test_bad_regions_are_bad_requests(regions: object, message: str) -> None:
    with pytest.raises(BadRequest, match=message) as caught:
        parse_prompts(regions, SIZE)
    assert caught.value.status == 400


def test_unknown_region_types_are_ignored_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    brush = {"type": "brushlabels", "id": "b1", "value": {"format": "rle", "rle": [0], "brushlabels": ["A"]}}
    with caplog.at_level(logging.INFO, logger="backend.prompts"):
        prompts = parse_prompts([brush, keypoint(50, 50)], SIZE)
    assert [p.label for p in prompts] == ["Object"]
    assert any("brushlabels" in record.message for record in caplog.records)


def test_input_is_not_modified() -> None:
    regions = [keypoint(50, 50), rectangle(25, 25, 50, 50, rotation=90)]
    before = copy.deepcopy(regions)
    parse_prompts(regions, SIZE)
    assert regions == before


# -- output labels


def test_output_label_rules() -> None:
    outputs = ("Car", "Tree")
    assert resolve_output_label("Car", outputs) == "Car"  # 1. the same label
    assert resolve_output_label("Click", outputs, {"Click": "Tree"}) == "Tree"  # 2. SAM_LABEL_MAP
    assert resolve_output_label("Car", outputs, {"Car": "Tree"}) == "Car"  # an exact match wins over the map
    assert resolve_output_label("car", outputs) == "Car"  # 3. case-insensitive
    assert resolve_output_label("Anything", ("Object",)) == "Object"  # 4. the only output label
    assert resolve_output_label("OBJECT", ("Object", "OBJECT")) == "OBJECT"


def test_ambiguous_case_insensitive_match_is_an_error() -> None:
    with pytest.raises(LabelConfigError):
        resolve_output_label("object", ("Object", "OBJECT", "Thing"))


def test_label_map_target_must_exist() -> None:
    with pytest.raises(LabelConfigError, match="SAM_LABEL_MAP maps 'Click' to 'Bus'") as caught:
        resolve_output_label("Click", ("Car", "Tree"), {"Click": "Bus"})
    assert caught.value.status == 422


def test_no_match_lists_both_label_sets() -> None:
    with pytest.raises(LabelConfigError) as caught:
        resolve_output_label("Click", ("Car", "Tree"), tool_labels=("Click", "Point"))
    message = caught.value.message
    assert "['Click', 'Point']" in message and "['Car', 'Tree']" in message and "SAM_LABEL_MAP" in message
