"""``Predictor.embed_batch``: the embeddings of several images in one encoder run equal ``embed`` one at a time.

On the tiny test configurations of SAM 1 (ViT), MobileSAM (TinyViT) and SAM 2.1 (Hiera), under both
``FastPaths`` presets (the encoders' fast paths differ between them), on images of different sizes and
aspects in one batch: the features (and SAM 2's high-resolution features) agree within ``FEATURE_ATOL``
(a batched matrix product sums in another order), the sizes are each image's own, and the masks that
boxes and clicks give on them are equal.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import model
from model import FAST, REFERENCE
from model.sam2_checkpoint import Sam2Config, load_with_config
from testsupport.checkpoints import make_image, small_checkpoint
from testsupport.mobilesam_checkpoints import make_mobile_sam_checkpoint
from testsupport.sam2_checkpoints import SMALL
from testsupport.sam2_checkpoints import small_checkpoint as sam2_small_checkpoint

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")]

FEATURE_ATOL = 1e-4
SIZES = [(120, 200), (256, 256), (300, 90)]


def _load(kind: str, directory, preset) -> model.Sam | model.Sam2:
    if kind == "sam":
        return model.load(small_checkpoint(directory, seed=5)[0], device="cpu", fast_paths=preset)
    if kind == "mobile_sam":
        return model.load(make_mobile_sam_checkpoint(directory / "mobile.pt", "small", seed=5), device="cpu",
                          fast_paths=preset)
    path = sam2_small_checkpoint(directory, seed=5)[0]
    config = Sam2Config(num_heads=SMALL["num_heads"], global_att_blocks=SMALL["global_att_blocks"],
                        window_spec=SMALL["window_spec"], image_size=SMALL["image_size"])
    return load_with_config(path, config, device="cpu", fast_paths=preset)


@pytest.mark.parametrize("preset", [FAST, REFERENCE], ids=["fast", "reference"])
@pytest.mark.parametrize("kind", ["sam", "mobile_sam", "sam2"])
def test_a_batch_embeds_as_one_image_at_a_time(tmp_path, kind, preset):
    predictor = model.Predictor(_load(kind, tmp_path, preset))
    images = [make_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    batched = predictor.embed_batch(images)
    assert len(batched) == len(images)
    for image, together in zip(images, batched, strict=True):
        alone = predictor.embed(image)
        assert together.original_size == alone.original_size == image.shape[:2]
        assert together.input_size == alone.input_size and together.fingerprint == alone.fingerprint
        assert together.features.shape == alone.features.shape and together.features.shape[0] == 1
        torch.testing.assert_close(together.features, alone.features, atol=FEATURE_ATOL, rtol=0)
        assert len(together.high_res) == len(alone.high_res) == (2 if kind == "sam2" else 0)
        for a, b in zip(together.high_res, alone.high_res, strict=True):
            torch.testing.assert_close(a, b, atol=FEATURE_ATOL, rtol=0)
        h, w = image.shape[:2]
        boxes = np.array([[w * 0.1, h * 0.1, w * 0.6, h * 0.7], [w * 0.4, h * 0.3, w * 0.95, h * 0.9]])
        np.testing.assert_array_equal(predictor.predict_boxes(together, boxes).masks,
                                      predictor.predict_boxes(alone, boxes).masks)
        click = dict(points=[[w * 0.5, h * 0.5]], labels=[1])
        np.testing.assert_array_equal(predictor.predict(together, **click).masks,
                                      predictor.predict(alone, **click).masks)


def test_an_empty_batch_embeds_nothing(tmp_path):
    predictor = model.Predictor(_load("sam", tmp_path, FAST))
    assert predictor.embed_batch([]) == []
