"""Ultralytics' SAM 2 / SAM 2.1 files (``sam2.1_{t,s,b,l}.pt``, ``sam2_{t,s,b,l}.pt``) load and give Meta's outputs.

Ultralytics' files are a state dict of the whole video model in Meta's key layout, plain or under
``"model"`` (``testsupport.ultralytics_sam2_files`` says where that is read from). The fast tests need no
``ultralytics``: they build a seeded file from the recorded key names and shapes of Ultralytics' tiny
model (``tests/fixtures/ultralytics-sam2.1_t-keys.json``) and compare ``model.load`` of it with Meta's
``sam2`` on the same weights. The tests that run Ultralytics' own builder and predictor are skipped when
``ultralytics`` (AGPL-3.0, never a runtime dependency) is not installed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import model
from model import sam2_checkpoint
from model.sam2 import Sam2
from testsupport.checkpoints import make_image
from testsupport.parity import LOGIT_ATOL, SCORE_ATOL, assert_same, iou
from testsupport.sam2_checkpoints import reference_predictor, reference_sam2, state_dict
from testsupport.ultralytics_sam2_files import (
    FIXTURE,
    file_name,
    fixture_state_dict,
    key_shapes,
    save,
    ultralytics_model,
)

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")]

SIDE = 1024  # Ultralytics letterboxes (keeps the aspect ratio), Meta stretches: the same only for a square input


def prompts(h: int, w: int) -> dict[str, dict]:
    """A point, points with a negative, a box: each as one object, single-mask output (Ultralytics' default)."""
    return {
        "point": dict(points=np.array([[w * 0.45, h * 0.55]]), labels=np.array([1])),
        "points + negative": dict(points=np.array([[w * 0.3, h * 0.4], [w * 0.7, h * 0.6], [w * 0.5, h * 0.2]]),
                                  labels=np.array([1, 1, 0])),
        "box": dict(box=np.array([w * 0.1, h * 0.2, w * 0.8, h * 0.9])),
    }


def test_fixture_is_meta_layout():
    """The recorded Ultralytics tiny state dict has exactly the keys and shapes of Meta's sam2.1_hiera_tiny."""
    recorded = json.loads(FIXTURE.read_text())["shapes"]
    assert recorded == key_shapes(state_dict("sam2.1_hiera_tiny"))


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "under-model"])
def test_fixture_file_is_recognised(tmp_path, wrap):
    path = save(fixture_state_dict(seed=1), tmp_path / file_name("t"), wrap=wrap)
    sam = model.load(path, device="cpu")
    assert isinstance(sam, Sam2) and sam.name == "sam2.1_hiera_tiny" and sam.image_size == 1024


def test_sam2_0_file_is_named_sam2(tmp_path):
    """``sam2_t.pt``: Ultralytics builds it without SAM 2.1's three video tensors; the image path is the same."""
    sd = {k: v for k, v in fixture_state_dict(seed=2).items() if k not in ("no_obj_embed_spatial",
                                                                              "obj_ptr_tpos_proj.weight",
                                                                              "obj_ptr_tpos_proj.bias")}
    sam = model.load(save(sd, tmp_path / file_name("t", "sam2")), device="cpu")
    assert sam.name == "sam2_hiera_tiny"


def test_fixture_file_matches_meta(tmp_path):
    """Masks, scores and low-res logits of the Ultralytics-format file equal Meta's sam2 on the same weights."""
    sd = fixture_state_dict(seed=5)
    reference_sam = reference_sam2("sam2.1_hiera_tiny")
    reference_sam.load_state_dict(sd, strict=True)
    ours = model.Predictor(model.load(save(sd, tmp_path / file_name("t")), device="cpu"))
    reference = reference_predictor(reference_sam)
    image = make_image(480, 640, seed=4)
    embedding = ours.embed(image)
    reference.set_image(image)
    torch.testing.assert_close(embedding.features, reference._features["image_embed"], atol=1e-3, rtol=0)
    for prompt in prompts(480, 640).values():
        result = ours.predict(embedding, prompt.get("points"), prompt.get("labels"), box=prompt.get("box"),
                              multimask=False)
        masks, scores, logits = reference.predict(prompt.get("points"), prompt.get("labels"), box=prompt.get("box"),
                                                  multimask_output=False)
        assert_same(result, masks.astype(bool), scores, logits)


# --- with Ultralytics itself ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ultralytics():
    return pytest.importorskip("ultralytics", reason="ultralytics is not installed (a test tool only)")


@pytest.mark.parametrize("size", ["t", "s"])
def test_fixture_and_detection_match_ultralytics_builder(ultralytics, size):
    """Ultralytics' builder makes what the fixture records (tiny), and each release is detected by its shapes."""
    sd = ultralytics_model(size, "sam2.1").state_dict()
    if size == "t":
        assert key_shapes(sd) == json.loads(FIXTURE.read_text())["shapes"]
    sam, image_path = sam2_checkpoint.build(sd, file_name(size))
    assert sam.name == {"t": "sam2.1_hiera_tiny", "s": "sam2.1_hiera_small"}[size]
    sam.load_state_dict(image_path, strict=True)


def ultralytics_outputs(predictor, prompt: dict) -> tuple[np.ndarray, np.ndarray]:
    """Low-res logits (1, 256, 256) and score (1,) from Ultralytics' SAM2Predictor on its set image."""
    points, labels = prompt.get("points"), prompt.get("labels")
    if points is not None:  # (N, 2) would be N objects of one point each in Ultralytics: one object of N points
        points, labels = points[None], labels[None]
    box = prompt.get("box")
    points, labels, _ = predictor._prepare_prompts((SIDE, SIDE), (SIDE, SIDE), None if box is None else box[None],
                                                   points, labels)
    with torch.inference_mode():
        logits, scores = predictor._inference_features(predictor.features, points, labels, None, False)
    return logits.float().numpy(), scores.float().numpy()


@pytest.mark.parametrize("size", ["t", pytest.param("s", marks=pytest.mark.slow)])
def test_ours_match_ultralytics_predictor(ultralytics, tmp_path, size):
    """Our masks, scores and low-res logits on an Ultralytics-format file equal Ultralytics' SAM2 predictor's."""
    import cv2
    from ultralytics.models.sam import SAM
    from ultralytics.models.sam.predict import SAM2Predictor

    path = save(ultralytics_model(size, "sam2.1", seed=7).state_dict(), tmp_path / file_name(size))
    ours = model.Predictor(model.load(path, device="cpu"))
    assert ours.sam.name == {"t": "sam2.1_hiera_tiny", "s": "sam2.1_hiera_small"}[size]
    image = make_image(SIDE, SIDE, seed=9)
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    embedding = ours.embed(image)
    predictor = SAM2Predictor(overrides=dict(model=str(path), imgsz=SIDE, device="cpu", verbose=False, conf=0.0,
                                             task="segment", mode="predict", save=False))
    predictor.set_image(bgr)
    public = SAM(str(path))
    for name, prompt in prompts(SIDE, SIDE).items():
        result = ours.predict(embedding, prompt.get("points"), prompt.get("labels"), box=prompt.get("box"),
                              multimask=False)
        logits, scores = ultralytics_outputs(predictor, prompt)
        np.testing.assert_allclose(result.low_res_logits, logits, atol=LOGIT_ATOL, rtol=0, err_msg=name)
        np.testing.assert_allclose(result.scores, scores, atol=SCORE_ATOL, rtol=0, err_msg=name)
        # Ultralytics' public API: masks at the image size, the score as the box confidence.
        points, labels = prompt.get("points"), prompt.get("labels")
        box = prompt.get("box")
        [answer] = public.predict(bgr, points=None if points is None else points[None].tolist(),
                                  labels=None if labels is None else labels[None].tolist(),
                                  bboxes=None if box is None else box[None].tolist(), conf=0.0, device="cpu",
                                  verbose=False, save=False)
        theirs = answer.masks.data.numpy()
        assert theirs.shape == result.masks.shape and 0.01 < theirs.mean() < 0.99, name
        assert iou(result.masks[0], theirs[0]) >= 0.99, name
        np.testing.assert_allclose(result.scores, answer.boxes.conf.numpy(), atol=SCORE_ATOL, rtol=0, err_msg=name)


def test_download_table_knows_ultralytics_names():
    """``sam2.1_t`` ... ``sam2_l`` (and their file names) resolve to Ultralytics' release assets, no invented hash."""
    from model import download

    for version in ("sam2.1", "sam2"):
        for size in "tsbl":
            entry = download.resolve(f"{version}_{size}")
            assert entry.url == f"https://github.com/ultralytics/assets/releases/download/v8.4.0/{version}_{size}.pt"
            assert entry.filename == file_name(size, version) and entry.sha256 is None
            assert download.resolve(entry.filename) == entry
