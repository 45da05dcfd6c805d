"""Masks from logits computed only along their edges (``model.edge_masks``, the ``edge_only_masks`` fast path):
the same pixels as thresholding the full resize, which is what Meta's code does."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import model
from model import FAST, edge_masks
from model.transforms import postprocess_masks, postprocess_masks_above_zero
from testsupport.checkpoints import make_image
from testsupport.smooth_checkpoints import make_smooth_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def blobs(height: int, width: int, seed: int, scale: float = 6.0) -> torch.Tensor:
    """Object-like logits: a bicubic resize of a coarse random grid (a few blobs, long smooth edges)."""
    coarse = torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(seed))
    return (F.interpolate(coarse, (height, width), mode="bicubic", align_corners=False)[0, 0] * scale).contiguous()


def resized(logits: torch.Tensor, size: tuple[int, int], scale_factor: float | None = None) -> torch.Tensor:
    """PyTorch's bilinear resize of one map, by size or by scale factor (then cropped to ``size``)."""
    if scale_factor is not None:
        up = F.interpolate(logits[None, None], scale_factor=scale_factor, mode="bilinear", align_corners=False)
        return up[0, 0, :size[0], :size[1]]
    return F.interpolate(logits[None, None], size, mode="bilinear", align_corners=False)[0, 0]


def assert_thresholded(mask: torch.Tensor | None, reference: torch.Tensor) -> None:
    """``mask`` is ``reference > 0``, but for edge pixels whose logit is within rounding of 0: the path computes
    those in float32 in an order of its own (one pixel in 36 million of noise, at 1.3e-8)."""
    assert mask is not None and mask.dtype == torch.bool and mask.shape == reference.shape
    differing = mask != (reference > 0)
    assert bool((reference[differing].abs() < 1e-6).all())
    assert differing.sum() <= 2


@pytest.mark.parametrize("source, size", [((768, 1024), (3000, 4000)), ((683, 1024), (3000, 4500)),
                                          ((256, 256), (1111, 1333)), ((1024, 577), (3840, 2160)),
                                          ((7, 9), (100, 37)), ((1, 40), (9, 500)), ((40, 1), (500, 9))])
def test_a_resize_to_a_size_gives_the_thresholded_pixels(source, size, monkeypatch) -> None:
    """Every edge pixel computed here (the share limit lifted, noise too): the arithmetic is the kernel's."""
    monkeypatch.setattr(edge_masks, "EDGE_SHARE_LIMIT", 1.0)
    for seed in range(3):
        noise = torch.randn(source, generator=torch.Generator().manual_seed(seed))
        for logits in (blobs(*source, seed=seed), noise):
            ratios = (edge_masks.size_ratio(source[0], size[0]), edge_masks.size_ratio(source[1], size[1]))
            assert_thresholded(edge_masks.resized_mask(logits, size, ratios), resized(logits, size))


def test_the_upsample_to_the_encoder_input_by_a_scale_factor_gives_the_thresholded_pixels(monkeypatch) -> None:
    """The first of Meta's two resizes: x4 by scale factor, cropped to the resized image."""
    monkeypatch.setattr(edge_masks, "EDGE_SHARE_LIMIT", 1.0)
    for seed in range(3):
        logits = blobs(256, 256, seed=seed)
        for size in ((768, 1024), (1024, 1024), (577, 1024), (1024, 300)):
            mask = edge_masks.resized_mask(logits, size, (0.25, 0.25))
            assert_thresholded(mask, resized(logits, size, scale_factor=4.0))


def test_zeros_tiny_values_and_exact_taps_are_decided_like_the_kernel(monkeypatch) -> None:
    """Logits of exactly 0 (not in the mask), of -0.0, and positives too small to survive a weight; and sizes
    whose source positions land on whole numbers (a tap the kernel may round either way)."""
    logits = blobs(64, 64, seed=5)
    logits[10:20, 10:20] = 0.0
    logits[30:34, 30:34] = -0.0
    logits[40:44, 5:9] = 1e-38
    logits[50:52, 50:60] = 1e-35
    monkeypatch.setattr(edge_masks, "EDGE_SHARE_LIMIT", 1.0)
    for size in ((640, 640), (256, 320), (448, 192), (1000, 999)):
        ratios = (edge_masks.size_ratio(64, size[0]), edge_masks.size_ratio(64, size[1]))
        assert_thresholded(edge_masks.resized_mask(logits, size, ratios), resized(logits, size))


def test_speckled_logits_and_small_upscales_are_left_to_the_full_resize() -> None:
    noise = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    assert edge_masks.mostly_edges(noise[None, None])
    assert edge_masks.resized_mask(noise, (1024, 1024), (0.25, 0.25)) is None  # too many edge pixels
    smooth = blobs(683, 1024, seed=1)
    assert not edge_masks.mostly_edges(smooth[None, None])
    ratios = (edge_masks.size_ratio(683, 1000), edge_masks.size_ratio(1024, 1500))
    assert edge_masks.resized_mask(smooth, (1000, 1500), ratios) is None  # 2.1 pixels per source pixel


@pytest.mark.parametrize("input_size, original_size", [((768, 1024), (768, 1024)), ((768, 1024), (3000, 4000)),
                                                       ((1024, 577), (3840, 2160)), ((1024, 1024), (2048, 2048))])
def test_postprocess_above_zero_equals_thresholding_meta_postprocess(input_size, original_size, monkeypatch) -> None:
    monkeypatch.setattr(edge_masks, "EDGE_SHARE_LIMIT", 1.0)  # equality is the point here, not when it pays
    low_res = torch.stack([torch.stack([blobs(256, 256, seed=s + k) for k in range(3)]) for s in range(2)])
    ours = postprocess_masks_above_zero(low_res, 1024, input_size, original_size, FAST)
    assert ours is not None and ours.shape == (2, 3, *original_size)
    reference = postprocess_masks(low_res, 1024, input_size, original_size, FAST)
    for b in range(2):
        for k in range(3):
            assert_thresholded(ours[b, k], reference[b, k])


def test_postprocess_above_zero_declines_where_the_full_resize_is_cheaper() -> None:
    low_res = blobs(256, 256, seed=2)[None, None]
    assert postprocess_masks_above_zero(low_res, 1024, (768, 1024), (300, 400), FAST) is None  # thumbnail
    assert postprocess_masks_above_zero(low_res, 1024, (683, 1024), (1000, 1500), FAST) is None  # 2.1x
    speckled = torch.randn(1, 1, 256, 256, generator=torch.Generator().manual_seed(3))
    assert postprocess_masks_above_zero(speckled, 1024, (768, 1024), (3000, 4000), FAST) is None


@pytest.fixture(scope="module")
def smooth_predictor(tmp_path_factory: pytest.TempPathFactory) -> model.Predictor:
    path = make_smooth_checkpoint(Path(tmp_path_factory.mktemp("smooth")) / "smooth.pt", "small", seed=3)
    return model.Predictor(model.load(path, device="cpu"))


def test_clicks_and_boxes_on_a_large_image_give_the_masks_of_the_full_resize(smooth_predictor) -> None:
    """Object-like masks on a 4000x3000 photo: the path is taken, and its masks are those with it switched off."""
    predictor, sam = smooth_predictor, smooth_predictor.sam
    embedding = predictor.embed(make_image(3000, 4000, seed=2))
    clicks = [(np.array([[1600.0, 1650.0]]), np.array([1])),
              (np.array([[800.0, 500.0], [900.0, 600.0]]), np.array([1, 0]))]
    low_res = predictor.decode_low_res(embedding, torch.tensor(clicks[0][0][None]), torch.tensor(clicks[0][1][None]))[0]
    assert predictor.masks_above_zero(embedding, low_res) is not None, "the smooth masks take the edge path"
    try:
        fast = [predictor.predict(embedding, points, labels, best_only=True).masks for points, labels in clicks]
        fast_boxes = predictor.predict_boxes(embedding, np.array([[100.0, 100.0, 2000.0, 1500.0]])).masks
        sam.set_fast_paths(replace(FAST, edge_only_masks=False))
        assert predictor.masks_above_zero(embedding, low_res) is None
        full = [predictor.predict(embedding, points, labels, best_only=True).masks for points, labels in clicks]
        full_boxes = predictor.predict_boxes(embedding, np.array([[100.0, 100.0, 2000.0, 1500.0]])).masks
    finally:
        sam.set_fast_paths(FAST)
    assert any(mask.any() and not mask.all() for mask in fast)
    for ours, reference in zip(fast, full, strict=True):
        np.testing.assert_array_equal(ours, reference)
    np.testing.assert_array_equal(fast_boxes, full_boxes)


def test_the_path_is_off_on_a_gpu() -> None:
    assert FAST.edge_only_masks and not FAST.for_device("cuda").edge_only_masks


def test_sam2_resizes_straight_to_the_image_and_thresholds_the_same(tmp_path, monkeypatch) -> None:
    """SAM 2's one resize (low-res logits to the original size), by the path and in full."""
    from model.sam2_checkpoint import Sam2Config, load_with_config
    from testsupport.sam2_checkpoints import SMALL, small_checkpoint

    monkeypatch.setattr(edge_masks, "EDGE_SHARE_LIMIT", 1.0)
    path, _ = small_checkpoint(tmp_path, seed=3)
    config = Sam2Config(num_heads=SMALL["num_heads"], global_att_blocks=SMALL["global_att_blocks"],
                        window_spec=SMALL["window_spec"])
    sam = load_with_config(path, config, device="cpu")
    low_res = torch.stack([blobs(256, 256, seed=k) for k in range(3)])[None]
    for size in ((3000, 4000), (1080, 1920)):
        ours = sam.postprocess_above_zero(low_res, size)
        reference = sam.postprocess(low_res, size)
        assert ours is not None and ours.shape == (1, 3, *size)
        for k in range(3):
            assert_thresholded(ours[0, k], reference[0, k])
    monkeypatch.undo()
    assert sam.postprocess_above_zero(torch.randn(1, 1, 256, 256), (3000, 4000)) is None  # speckled
