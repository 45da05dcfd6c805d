"""BitmaskLabels output: PNG data URLs as Label Studio's editor reads them, through /predict for clicks and batches.

The masks are compared with ``model.Predictor``'s on the same seeded tiny checkpoint after decoding the PNG the
way the editor does (alpha > 0 for a stored BitmaskLabels region).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from backend import bitmask
from backend.app import create_app
from backend.config import Settings, SettingsError
from backend.label_config import parse_label_config
from backend.prompts import parse_prompts
from backend.results import mask_regions
from testsupport.backend import (
    FIXTURE_IMAGES,
    draw_image,
    fixture_body,
    make_tiny_checkpoint,
    running_label_studio,
)

BITMASK_CONFIG = """<View>
  <Image name="image" value="$image" smoothing="false"/>
  <BitmaskLabels name="mask" toName="image"><Label value="Object"/></BitmaskLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Object"/></KeyPointLabels>
  <RectangleLabels name="rect" toName="image" smart="true"><Label value="Object"/></RectangleLabels>
</View>"""


# ----------------------------------------------------------------------------------------------------------
# the encoding
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (240, 320), (97, 61)])
def test_round_trip_alpha_and_red(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    mask = rng.random(shape) > 0.5
    stored = bitmask.encode(mask)
    assert stored.startswith("data:image/png;base64,")
    assert np.array_equal(bitmask.decode(stored), mask)
    assert not bitmask.decode(stored, channel="red").any(), "Label Studio's own form is black on transparent"
    white = bitmask.encode(mask, bitmask.FOREGROUND_WHITE)
    assert np.array_equal(bitmask.decode(white, channel="red"), mask)
    assert np.array_equal(bitmask.decode(white), mask)


def test_png_is_the_natural_size_with_transparent_background() -> None:
    mask = np.zeros((40, 70), bool)
    mask[10:20, 30:50] = True
    data = base64.b64decode(bitmask.encode(mask).split(",", 1)[1])
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.size == (70, 40)
        rgba = np.asarray(image.convert("RGBA"))
    assert (rgba[mask] == [0, 0, 0, 255]).all() and (rgba[~mask][:, 3] == 0).all()


@pytest.mark.parametrize("bad", ["", "data:image/jpeg;base64,AAAA", "data:image/png;base64,@@@",
                                 "data:image/png;base64," + base64.b64encode(b"not a png").decode()])
def test_decode_refuses_what_is_not_a_png_data_url(bad: str) -> None:
    with pytest.raises(ValueError):
        bitmask.decode(bad)


def test_decode_bounds_the_pixels() -> None:
    with pytest.raises(ValueError, match="more than"):
        bitmask.decode(bitmask.encode(np.ones((50, 50), bool)), max_pixels=100)


def test_label_config_and_setting() -> None:
    config = parse_label_config(BITMASK_CONFIG)
    assert config.bitmask is not None and config.output_tag().kind == "BitmaskLabels"
    assert config.output_tag("bitmask") is config.bitmask
    region = mask_regions(np.eye(4, dtype=bool), "Object", 0.5, config)[0]
    assert region["type"] == "bitmasklabels" and region["from_name"] == "mask" and region["to_name"] == "image"
    assert set(region["value"]) == {"imageDataURL", "bitmasklabels"} and region["value"]["bitmasklabels"] == ["Object"]
    assert Settings.from_env({"SAM_OUTPUT": "bitmask"}).sam_output == "bitmask"
    with pytest.raises(SettingsError):
        Settings.from_env({"SAM_OUTPUT": "png"})
    brush_config = parse_label_config(fixture_body("predict_interactive_keypoint_api.json")["label_config"])
    assert brush_config.output_tag().kind == "BrushLabels"
    with pytest.raises(Exception, match="BitmaskLabels"):
        brush_config.output_tag("bitmask")


# ----------------------------------------------------------------------------------------------------------
# through /predict
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "sam_tiny.pth", seed=3)


@pytest.fixture(scope="module")
def oracle(checkpoint: Path) -> Any:
    from model import Predictor, load

    return Predictor(load(checkpoint, device="cpu"))


@pytest.fixture(scope="module")
def client(checkpoint: Path) -> Iterator[Any]:
    with running_label_studio() as server:
        app = create_app(Settings(sam_checkpoint=str(checkpoint), sam_device="cpu", image_timeout_s=5.0,
                                  sam_warmup=False))
        setup = fixture_body("setup.json")
        setup["hostname"] = server.url
        assert app.test_client().post("/setup", json=setup).status_code == 200
        yield app.test_client()


def with_bitmask_config(body: dict[str, Any]) -> dict[str, Any]:
    body["label_config"] = BITMASK_CONFIG
    return body


@pytest.mark.parametrize("name", ["predict_interactive_keypoint_api.json", "predict_interactive_rectangle_api.json"])
def test_a_click_answers_a_bitmask_equal_to_the_predictors_mask(client: Any, oracle: Any, name: str) -> None:
    body = with_bitmask_config(fixture_body(name))
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.get_json()
    (region,) = response.get_json()["results"][0]["result"]
    assert region["type"] == "bitmasklabels" and region["from_name"] == "mask"
    assert (region["original_width"], region["original_height"]) == (320, 240)
    image = draw_image(FIXTURE_IMAGES[body["tasks"][0]["data"]["image"]])
    (prompt,) = parse_prompts(body["params"]["context"]["result"], image.shape[:2])
    out = oracle.predict(oracle.embed(image).at_stored_precision(), points=prompt.point_coords,
                         labels=prompt.point_labels if len(prompt.points) else None, box=prompt.box,
                         multimask=prompt.multimask)
    expected = out.masks[int(np.argmax(out.scores))]
    assert np.array_equal(bitmask.decode(region["value"]["imageDataURL"]), expected)


def test_batch_boxes_answer_bitmasks(client: Any, oracle: Any) -> None:
    body = with_bitmask_config(fixture_body("predict_batch_two_tasks.json"))
    box = {"x": 20.0, "y": 15.0, "width": 50.0, "height": 60.0, "rotation": 0, "rectanglelabels": ["Object"]}
    body["tasks"][0]["annotations"] = [{"id": 1, "result": [
        {"id": "r1", "type": "rectanglelabels", "from_name": "rect", "to_name": "image", "original_width": 320,
         "original_height": 240, "image_rotation": 0, "value": box}]}]
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.get_json()
    first, second = response.get_json()["results"]
    assert second == [], "a task with nothing to prompt with gets no prediction"
    (region,) = first["result"]
    image = draw_image(FIXTURE_IMAGES[body["tasks"][0]["data"]["image"]])
    expected = oracle.predict_boxes(oracle.embed(image).at_stored_precision(), np.array([[64.0, 36.0, 224.0, 180.0]], np.float32))
    assert np.array_equal(bitmask.decode(region["value"]["imageDataURL"]), expected.masks[0])


def test_preannotate_per_task_step_writes_bitmasks(checkpoint: Path, oracle: Any) -> None:
    """``sam-backend preannotate`` runs ``Predictions.predict_task``: the same builders give it bitmasks."""
    from backend.image_fetch import ImageFetcher
    from backend.predictions import BatchOptions, Predictions
    from backend.segmenter import Segmenter

    body = fixture_body("predict_batch_two_tasks.json")
    task = body["tasks"][1]
    task["annotations"] = [{"id": 3, "result": [
        {"id": "r2", "type": "rectanglelabels", "from_name": "rect", "to_name": "image", "original_width": 320,
         "original_height": 240, "image_rotation": 0,
         "value": {"x": 10.0, "y": 10.0, "width": 80.0, "height": 80.0, "rotation": 0, "rectanglelabels": ["Object"]}}]}]
    with running_label_studio() as server:
        fetcher = ImageFetcher(label_studio_url=server.url, label_studio_token=server.legacy_token)
        predictions = Predictions(parse_label_config(BITMASK_CONFIG), Settings(sam_device="cpu"),
                                  Segmenter(checkpoint, "cpu"), fetcher)
        result = predictions.predict_task(task, BatchOptions(mode="boxes"))
    (region,) = result["result"]
    assert region["type"] == "bitmasklabels" and region["from_name"] == "mask"
    image = draw_image(FIXTURE_IMAGES[task["data"]["image"]])
    expected = oracle.predict_boxes(oracle.embed(image).at_stored_precision(), np.array([[32.0, 24.0, 288.0, 216.0]], np.float32))
    assert np.array_equal(bitmask.decode(region["value"]["imageDataURL"]), expected.masks[0])
