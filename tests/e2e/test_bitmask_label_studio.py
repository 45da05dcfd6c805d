"""End to end with a real Label Studio 1.23.2: BitmaskLabels masks stored and suggested, the newer interactive flow
forwarded by Label Studio's own proxy, and no prediction stored for a task with nothing to predict.

Masks are read the way the editor reads them (alpha > 0 for a stored BitmaskLabels region, red > 127 for the
ml-interactive answer) and compared pixel for pixel with ``model.Predictor`` on the same checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from backend import bitmask
from testsupport.backend import tiny_checkpoint_fixture
from testsupport.label_studio import LabelStudio, SamBackend

pytestmark = pytest.mark.e2e

CONFIG = """<View>
  <Image name="image" value="$image" smoothing="false"/>
  <BitmaskLabels name="mask" toName="image"><Label value="Object"/></BitmaskLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Object"/></KeyPointLabels>
  <RectangleLabels name="rect" toName="image" smart="true"><Label value="Object"/></RectangleLabels>
</View>"""
W, H = 320, 240


class BitmaskBackend(SamBackend):
    def environment(self) -> dict[str, str]:
        return {**super().environment(), "SAM_OUTPUT": "bitmask"}


checkpoint = tiny_checkpoint_fixture(seed=11)


@pytest.fixture(scope="module")
def sam_backend_class() -> type[SamBackend]:
    return BitmaskBackend


def scene(path: Path, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 60, size=(H, W, 3), dtype=np.uint8) + np.uint8(50), "RGB")
    ImageDraw.Draw(image).ellipse([W * 0.3, H * 0.3, W * 0.7, H * 0.7], fill=(220, 40, 40))
    image.save(path)
    return np.asarray(image)


def test_bitmask_predictions_suggestions_and_the_interactive_flow(tmp_path: Path, label_studio: LabelStudio,
                                                                  sam_backend: SamBackend, checkpoint: Path) -> None:
    import torch

    from model import Predictor, load

    torch.set_num_threads(1)
    sam = load(checkpoint, device="cpu", dtype=torch.float32)
    predictor = Predictor(sam)
    version = f"{sam.name}-{sam.fingerprint[:8]}"
    pixels = [scene(tmp_path / "a.png", 1), scene(tmp_path / "b.png", 2)]
    project = label_studio.create_project("SAM bitmask e2e", CONFIG)
    tasks = label_studio.upload_images(project, [tmp_path / "a.png", tmp_path / "b.png"])
    with_box, without = (tasks if tasks[0]["data"]["image"].endswith("a.png") else tasks[::-1])
    box = (64, 48, 256, 192)
    label_studio.request("POST", "/api/predictions", json={
        "task": with_box["id"], "model_version": "detector-v1", "score": 0.5,
        "result": [{"id": "det", "type": "rectanglelabels", "from_name": "rect", "to_name": "image",
                    "original_width": W, "original_height": H, "image_rotation": 0,
                    "value": {"x": 20.0, "y": 20.0, "width": 60.0, "height": 60.0, "rotation": 0,
                              "rectanglelabels": ["Object"]}}]})
    ml = label_studio.add_ml_backend(project, sam_backend.url)
    assert ml.get("state") == "CO", ml
    embedding = predictor.embed(pixels[0]).at_stored_precision()  # as the cache serves it

    # Retrieve predictions: a stored BitmaskLabels region for the task with a box, nothing for the other.
    label_studio.retrieve_predictions(project)
    ours = [p for p in label_studio.predictions(project) if p["model_version"] == version]
    assert [p["task"] for p in ours] == [with_box["id"]], (ours, sam_backend.log.read_text()[-3000:])
    (region,) = ours[0]["result"]
    assert region["type"] == "bitmasklabels" and region["value"]["bitmasklabels"] == ["Object"], region
    expected = predictor.predict_boxes(embedding, np.asarray([box], np.float32)).masks[0]
    assert np.array_equal(bitmask.decode(region["value"]["imageDataURL"]), expected)

    # A smart keypoint: the suggestion is a BitmaskLabels region too.
    click = {"id": "kp1", "type": "keypointlabels", "from_name": "kp", "to_name": "image", "original_width": W,
             "original_height": H, "image_rotation": 0, "is_positive": True,
             "value": {"x": 50.0, "y": 50.0, "width": 0.5, "keypointlabels": ["Object"]}}
    answer = label_studio.interactive_annotating(ml["id"], with_box["id"], [click])
    (suggested,) = answer["data"]["result"]
    out = predictor.predict(embedding, points=[[160, 120]], labels=[1], multimask=True, best_only=True)
    assert suggested["type"] == "bitmasklabels"
    assert np.array_equal(bitmask.decode(suggested["value"]["imageDataURL"]), out.masks[0])

    # The newer flow's requests pass through 1.23.2's proxy unchanged: capabilities, then a point.
    def flow(context: dict[str, Any]) -> dict[str, Any]:
        return label_studio.request("POST", f"/api/ml/{ml['id']}/interactive-annotating",
                                    json={"task": with_box["id"], "context": context})

    capabilities = flow({"event": "capabilities"})["data"]["result"][0]["value"]
    assert {"tag": "BitmaskLabels", "output": "mask"} in capabilities["targets"], capabilities
    value = flow({"result": [{"type": "keypointlabels", "value": {"x": 50.0, "y": 50.0, "positive": True}}]})
    assert np.array_equal(bitmask.decode(value["data"]["result"][0]["value"]["imageDataURL"], channel="red"),
                          out.masks[0])
    assert flow({"event": "release"})["data"]["result"][0]["value"]["status"] == "released"
    assert without["id"] not in {p["task"] for p in label_studio.predictions(project)}


def test_label_studio_accepts_the_readme_config(label_studio: LabelStudio) -> None:
    """The README's ready-to-paste config (buttons with html and hint) passes Label Studio's own validation."""
    import re

    from testsupport.paths import REPO_ROOT

    config = re.search(r"```xml\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.S)
    assert config is not None
    project = label_studio.create_project("README config", config.group(1))
    stored = label_studio.request("GET", f"/api/projects/{project}")["label_config"]
    assert 'html="Object · click"' in stored and 'smart="true"' in stored
