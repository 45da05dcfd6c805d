"""The smooth-mask checkpoints: one connected blob around each click, RLE of real-weight size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from testsupport.checkpoints import make_image
from testsupport.smooth_checkpoints import blob_report, make_smooth_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory):
    import model

    path = make_smooth_checkpoint(Path(tmp_path_factory.mktemp("smooth")) / "smooth.pt", "small", seed=3)
    return model.Predictor(model.load(path, device="cpu"))


@pytest.fixture(scope="module")
def embedding(predictor):
    return predictor.embed(make_image(768, 1024, seed=1))


@pytest.mark.parametrize("click", [(512, 384), (100, 120), (900, 650), (20, 740)])
def test_one_blob_around_each_click_and_rle_of_a_few_kilobytes(predictor, embedding, click) -> None:
    from backend import rle

    prediction = predictor.predict(embedding, np.array([click]), np.array([1]), multimask=True)
    for mask in blob_report(prediction.masks, click)["masks"]:
        assert mask["holds_click"] and mask["components"] == 1
        assert 0.02 < mask["area"] < 0.6
    areas = prediction.masks.reshape(3, -1).sum(1)
    assert (np.diff(areas) > 0).all(), "the three candidates are nested small / medium / large"
    best = predictor.predict(embedding, np.array([click]), np.array([1]), best_only=True).masks[0]
    assert len(rle.encode(best)) < 8_000  # random weights: 100k-300k numbers


def test_a_negative_click_carves_the_blob(predictor, embedding) -> None:
    alone = predictor.predict(embedding, np.array([(350, 380)]), np.array([1]), best_only=True).masks[0]
    carved = predictor.predict(embedding, np.array([(350, 380), (520, 380)]), np.array([1, 0]),
                               best_only=True).masks[0]
    assert alone[380, 520] and not carved[380, 520] and carved[380, 250]
    assert carved.sum() < alone.sum()


def test_masks_follow_the_click_and_the_image_changes_the_embedding(predictor, embedding) -> None:
    other = predictor.embed(make_image(768, 1024, seed=2))
    assert not np.array_equal(other.features.numpy(), embedding.features.numpy())
    left = predictor.predict(embedding, np.array([(200, 384)]), np.array([1]), best_only=True).masks[0]
    right = predictor.predict(embedding, np.array([(800, 384)]), np.array([1]), best_only=True).masks[0]
    assert not (left & right).any()
