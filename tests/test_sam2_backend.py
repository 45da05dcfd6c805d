"""A SAM 2.1 checkpoint served end to end: ``SAM_CHECKPOINT`` names a file of the released tiny architecture
(seeded random weights, Meta's format), Label Studio's recorded interactive request goes through the Flask
app, and the brush masks it returns are ``model.Predictor``'s for the same prompts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from backend.app import create_app
from backend.config import Settings
from backend.prompts import parse_prompts
from testsupport.backend import (
    FIXTURE_IMAGES,
    IMAGE_SIZE,
    brush_mask,
    draw_image,
    fixture_body,
    running_label_studio,
)
from testsupport.sam2_checkpoints import checkpoint

pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning"),
              pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def sam2_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path, _ = checkpoint(tmp_path_factory.mktemp("sam2"), "sam2.1_hiera_tiny", seed=4)
    return path.rename(path.with_name("sam2.1_hiera_tiny.pt"))


def test_names_resolve_to_meta_files(tmp_path: Path) -> None:
    settings = Settings(sam_checkpoint="sam2.1_hiera_base_plus", model_dir=tmp_path)
    assert settings.checkpoint_name == "sam2.1_hiera_base_plus"
    assert settings.checkpoint_path == tmp_path / "sam2.1_hiera_base_plus.pt"


def test_interactive_request_gives_the_predictors_masks(sam2_file: Path) -> None:
    from model import Predictor, load

    oracle = Predictor(load(sam2_file, device="cpu"))
    body = fixture_body("predict_interactive_keypoint_ui_click.json")
    with running_label_studio() as server:
        app = create_app(Settings(sam_checkpoint=str(sam2_file), sam_device="cpu", image_timeout_s=5.0))
        client = app.test_client()
        setup = fixture_body("setup.json")
        setup["hostname"] = server.url
        assert client.post("/setup", json=setup).status_code == 200
        response = client.post("/predict", json=body)
    assert response.status_code == 200, response.json
    prediction = response.json["results"][0]
    assert prediction["model_version"] == f"sam2.1_hiera_tiny-{oracle.sam.fingerprint[:8]}"

    image = draw_image(FIXTURE_IMAGES[body["tasks"][0]["data"]["image"]])
    embedding = oracle.embed(image).at_stored_precision()  # what every cache tier serves
    prompts = parse_prompts(body["params"]["context"]["result"], image.shape[:2])
    assert len(prompts) == len(prediction["result"]) >= 1
    for prompt, region in zip(prompts, prediction["result"], strict=True):
        out = oracle.predict(embedding, points=prompt.point_coords, labels=prompt.point_labels, multimask=True)
        expected = out.masks[int(np.argmax(out.scores))]
        assert (region["original_width"], region["original_height"]) == IMAGE_SIZE
        np.testing.assert_array_equal(brush_mask(region), expected)
        assert 0.0 < region["score"] <= 1.0  # SAM 2's predicted IoU is a sigmoid
