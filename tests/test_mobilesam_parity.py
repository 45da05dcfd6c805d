"""MobileSAM end to end: ``model.load`` + ``model.Predictor`` against ``mobile_sam.SamPredictor``.

Both sides hold the same seeded random weights, ours read from a ``mobile_sam.pt``-format file. Masks
must agree to IoU >= MASK_IOU, low-res logits within LOGIT_ATOL, predicted IoU within SCORE_ATOL (tests/parity.py), the
image embedding within FEATURE_ATOL. Each compared reference mask set must be non-trivial (some mask
neither empty nor full), or two empty masks would "agree" without proving anything. Ours runs under both
``FastPaths`` presets, ``FAST`` and ``REFERENCE``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mobile_sam import SamPredictor

import model
from model import FAST, REFERENCE
from testsupport.mobilesam_checkpoints import make_mobile_sam_checkpoint, random_reference_sam, sample_image
from testsupport.parity import assert_same

FEATURE_ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pair(directory, config: str, seed: int, preset: model.FastPaths = FAST) -> tuple[model.Predictor, SamPredictor]:
    reference = random_reference_sam(config, seed)
    path = directory / "mobile_sam.pt"
    torch.save(reference.state_dict(), path)
    return model.Predictor(model.load(path, device="cpu", fast_paths=preset)), SamPredictor(reference)


@pytest.fixture(scope="module", params=[FAST, REFERENCE], ids=["fast", "reference"])
def small(tmp_path_factory, request) -> tuple[model.Predictor, SamPredictor]:
    return pair(tmp_path_factory.mktemp("mobilesam"), "small", seed=3, preset=request.param)


def check_prompts(ours: model.Predictor, reference: SamPredictor, image: np.ndarray) -> None:
    """Embedding, then every kind of interactive prompt, against the reference on the same image."""
    h, w = image.shape[:2]
    embedding = ours.embed(image)
    reference.set_image(image)
    assert embedding.input_size == reference.input_size
    torch.testing.assert_close(embedding.features, reference.features, atol=FEATURE_ATOL, rtol=0)

    one, positive = np.array([[w * 0.45, h * 0.55]]), np.array([1])
    several = np.array([[w * 0.3, h * 0.4], [w * 0.7, h * 0.6], [w * 0.5, h * 0.2]])
    several_labels = np.array([1, 1, 0])
    box = np.array([w * 0.1, h * 0.2, w * 0.8, h * 0.9])

    # One click: three candidate masks.
    first = ours.predict(embedding, one, positive)
    assert first.masks.shape == (3, h, w)
    assert_same(first, *reference.predict(one, positive))
    # Several points with a negative one.
    assert_same(ours.predict(embedding, several, several_labels, multimask=False),
                *reference.predict(several, several_labels, multimask_output=False))
    # A box, and a box with points.
    assert_same(ours.predict(embedding, box=box, multimask=False),
                *reference.predict(box=box, multimask_output=False))
    assert_same(ours.predict(embedding, several, several_labels, box=box),
                *reference.predict(several, several_labels, box=box))
    # Second round: the best first-round low-res logits go back in with the new clicks.
    best = first.low_res_logits[np.argmax(first.scores)][None]
    assert_same(ours.predict(embedding, several, several_labels, mask_input=best, multimask=False),
                *reference.predict(several, several_labels, mask_input=best, multimask_output=False))


@pytest.mark.parametrize("size", [(480, 640), (700, 300)])
def test_small_mobilesam_matches_reference(small, size):
    ours, reference = small
    check_prompts(ours, reference, sample_image(seed=size[0], height=size[0], width=size[1]))


def test_small_mobilesam_batched_boxes_match_reference(small):
    ours, reference = small
    image = sample_image(seed=7, height=360, width=500)
    embedding = ours.embed(image)
    reference.set_image(image)
    boxes = np.array([[10, 20, 300, 340], [200, 50, 480, 200], [0, 0, 499, 359]], float)
    boxes_t = reference.transform.apply_boxes_torch(torch.as_tensor(boxes, dtype=torch.float), (360, 500))
    with torch.no_grad():
        masks, scores, logits = reference.predict_torch(None, None, boxes=boxes_t, multimask_output=False)
    assert_same(ours.predict_boxes(embedding, boxes), masks[:, 0].numpy(), scores[:, 0].numpy(),
                logits[:, 0].numpy())


@pytest.mark.slow
def test_vit_t_matches_reference(tmp_path):
    ours, reference = pair(tmp_path, "vit_t", seed=5)
    assert ours.sam.name == "vit_t" and ours.sam.image_size == 1024
    for preset in (FAST, REFERENCE):
        ours.sam.set_fast_paths(preset)
        check_prompts(ours, reference, sample_image(seed=11, height=480, width=640))


def test_a_custom_tiny_vit_is_not_named_vit_t(tmp_path) -> None:
    """Only MobileSAM's released configuration is vit_t; model_version must not claim it for another one."""
    sam = model.load(make_mobile_sam_checkpoint(tmp_path / "small.pt", config="small"), device="cpu")
    assert sam.name == "custom"
    assert sam.prompt_encoder.image_embedding_size == (64, 64)
