"""Segment everything: our NMS against torchvision, our pipeline against Meta's SamAutomaticMaskGenerator.

Both generators run on the same seeded random weights and the same image; the records must match one to
one (mask IoU >= 0.99, close scores, same boxes, prompts and crops).

Random weights need two adjustments to make a meaningful test. Their mask decoder's transposed
convolutions paint the same random 4x4 pattern into every embedding cell, so every mask has a pixel in
every part of the image, every box is the whole image and NMS leaves a single mask. We give both models
the same smoothed upscaling kernels (each kernel's mean over its 2x2 taps), which makes masks follow the
image content: objects get their own boxes, crops keep masks away from their inner edges. And random
logits are small, so the stability offset is 0.05 instead of 1.0 (at 1.0 every stability score is 0).
"""

from __future__ import annotations

from dataclasses import replace
from fractions import Fraction

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.utils import amg as meta_amg
from torchvision.ops import batched_nms as tv_batched_nms

from model import FAST, REFERENCE, MaskGenerator, amg, load
from model.nms import batched_nms, nms
from testsupport.checkpoints import small_checkpoint
from testsupport.images import shapes_image
from testsupport.parity import assert_same_records

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ---------------------------------------------------------------------------------------------- NMS


def _random_boxes(generator: torch.Generator, n: int, span: int = 60) -> torch.Tensor:
    """Integer-valued boxes on a small canvas, so many pairs overlap and many IoUs repeat exactly."""
    xy = torch.randint(0, span, (n, 2), generator=generator).float()
    wh = torch.randint(1, span // 2, (n, 2), generator=generator).float()
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("seed", range(6))
def test_batched_nms_matches_torchvision_with_ties(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(40):
        n = int(torch.randint(0, 300, (1,), generator=generator))
        boxes = _random_boxes(generator, n)
        scores = torch.randint(0, 4, (n,), generator=generator).float()  # many tied scores
        if n > 8:  # exact duplicates with equal scores: only the tie order decides which one survives
            boxes[n // 2:n // 2 + 3] = boxes[:3].clone()
            scores[n // 2:n // 2 + 3] = scores[:3].clone()
        categories = torch.randint(0, 3, (n,), generator=generator)
        threshold = float(torch.rand(1, generator=generator))
        expected = tv_batched_nms(boxes, scores, categories, threshold)
        assert torch.equal(batched_nms(boxes, scores, categories, threshold), expected)
        single = torch.zeros(n, dtype=torch.int64)
        assert torch.equal(batched_nms(boxes, scores, None, threshold), tv_batched_nms(boxes, scores, single,
                                                                                        threshold))


def test_nms_threshold_is_strict_and_compared_in_double() -> None:
    # IoU of these two boxes is exactly 0.5: not "greater than" 0.5, so both stay.
    boxes = torch.tensor([[0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    scores = torch.tensor([1.0, 0.5])
    assert nms(boxes, scores, 0.5).tolist() == [0, 1]
    assert nms(boxes, scores, 0.4999).tolist() == [0]
    # 0.7 rounds down in float32: a float32 comparison would differ from torchvision's double one.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 7.0]])
    for threshold in (0.7, np.nextafter(0.7, 0), np.nextafter(np.float32(0.7), 1).item()):
        expected = tv_batched_nms(boxes, scores, torch.zeros(2), threshold)
        assert torch.equal(nms(boxes, scores, threshold), expected)


def test_batched_nms_large_input_keeps_torchvisions_set() -> None:
    # Above 1000 boxes torchvision switches to a per-category loop whose final sort is not stable, so
    # the order of equal scores may differ; the kept set and the score order may not.
    generator = torch.Generator().manual_seed(7)
    boxes = _random_boxes(generator, 2500, span=400)
    scores = torch.randint(0, 50, (2500,), generator=generator).float()
    categories = torch.randint(0, 2, (2500,), generator=generator)
    ours = batched_nms(boxes, scores, categories, 0.5)
    expected = tv_batched_nms(boxes, scores, categories, 0.5)
    assert sorted(ours.tolist()) == sorted(expected.tolist())
    assert torch.equal(scores[ours], scores[expected])


def test_nms_edge_cases() -> None:
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []
    # Integer boxes are accepted (Meta's boxes are int64); degenerate boxes never suppress (0/0 IoU).
    boxes = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 5, 5]])
    assert nms(boxes, torch.tensor([0.9, 0.8, 0.1]), 0.5).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="shape"):
        nms(torch.zeros(3, 5), torch.zeros(3), 0.5)
    with pytest.raises(ValueError, match="scores"):
        nms(torch.zeros(3, 4), torch.zeros(2), 0.5)

# ---------------------------------------------------------------------------------- amg helpers


def test_amg_helpers_match_meta() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 37, 53, generator=generator)
    logits[0] = -1  # an empty mask
    logits[1] = 1  # a full one (its RLE starts with a 0-length run)
    masks = logits > 0

    ours = amg.masks_to_rle(masks)
    assert ours == meta_amg.mask_to_rle_pytorch(masks)
    for rle, mask in zip(ours, masks, strict=True):
        np.testing.assert_array_equal(amg.rle_to_mask(rle), mask.numpy())
        assert amg.rle_area(rle) == meta_amg.area_from_rle(rle) == int(mask.sum())

    assert torch.equal(amg.masks_to_boxes(masks), meta_amg.batched_mask_to_box(masks))
    torch.testing.assert_close(amg.stability_score(logits, 0.0, 0.3),
                               meta_amg.calculate_stability_score(logits, 0.0, 0.3), equal_nan=True)
    for size, layers, ratio in (((96, 128), 1, 512 / 1500), ((1080, 1920), 2, 0.3), ((50, 31), 3, 0.1)):
        assert amg.generate_crop_boxes(size, layers, ratio) == meta_amg.generate_crop_boxes(size, layers, ratio)
    for got, expected in zip(amg.build_all_layer_point_grids(9, 2, 2),
                             meta_amg.build_all_layer_point_grids(9, 2, 2), strict=True):
        np.testing.assert_array_equal(got, expected)

    rng = np.random.default_rng(0)
    mask = rng.random((40, 40)) > 0.7
    for mode in ("holes", "islands"):
        got, changed = amg.remove_small_regions(mask, 5, mode)
        expected, expected_changed = meta_amg.remove_small_regions(mask, 5, mode)
        np.testing.assert_array_equal(got, expected)
        assert changed == expected_changed

# ------------------------------------------------------------------------------ generator parity


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory):
    """Meta's reference Sam and ours, loaded from one checkpoint file (see the module docstring)."""
    _, reference = small_checkpoint(tmp_path_factory.mktemp("amg"), seed=0)
    with torch.no_grad():
        for index in (0, 3):  # the two ConvTranspose2d layers of output_upscaling
            weight = reference.mask_decoder.output_upscaling[index].weight
            weight.copy_(weight.mean(dim=(2, 3), keepdim=True).expand_as(weight))
    path = tmp_path_factory.mktemp("amg") / "sam_smoothed.pth"
    torch.save(reference.state_dict(), path)
    return reference, load(path, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return shapes_image(128, 160)


BASE = dict(points_per_side=8, pred_iou_thresh=0.3, stability_score_thresh=0.2, stability_score_offset=0.01)


@pytest.mark.parametrize("options", [
    {},
    {"crop_n_layers": 1},
    {"min_mask_region_area": 100},
    {"crop_n_layers": 1, "min_mask_region_area": 100, "crop_n_points_downscale_factor": 2},
], ids=["image", "crops", "small-regions", "crops+small-regions"])
@pytest.mark.parametrize("preset", [FAST, REFERENCE, replace(FAST, iou_before_masks=False),
                                    replace(FAST, shared_decoder_image=False)],
                         ids=["fast", "reference", "fast-masks-first", "fast-image-per-prompt"])
def test_generate_matches_meta(models, image: np.ndarray, options: dict, preset) -> None:
    reference, sam = models
    config = {**BASE, **options}
    theirs = SamAutomaticMaskGenerator(reference, **config).generate(image)
    sam.set_fast_paths(preset)
    try:
        ours = MaskGenerator(sam, **config).generate(image)
    finally:
        sam.set_fast_paths(FAST)
    assert len(theirs) >= 5, "the configuration should keep a real number of masks"
    assert_same_records(ours, theirs, point_atol=1e-6)
    if options.get("crop_n_layers"):
        assert len({tuple(r["crop_box"]) for r in ours}) > 1, "masks of the smaller crops should survive"


def test_generate_record_types(models, image: np.ndarray) -> None:
    _, sam = models
    records = MaskGenerator(sam, **BASE, points_per_batch=7).generate(image)
    assert records
    record = records[0]
    assert set(record) == {"segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score",
                           "crop_box"}
    assert record["segmentation"].shape == image.shape[:2] and record["segmentation"].flags.c_contiguous
    assert all(isinstance(v, int) for v in record["bbox"] + record["crop_box"] + [record["area"]])
    assert isinstance(record["predicted_iou"], float) and isinstance(record["stability_score"], float)
    assert record["crop_box"] == [0, 0, image.shape[1], image.shape[0]]
    # The batch size is a memory knob only.
    assert_same_records(records, MaskGenerator(sam, **BASE).generate(image), point_atol=1e-6)


def test_generate_grayscale_and_nothing_kept(models, image: np.ndarray) -> None:
    _, sam = models
    gray = image.mean(axis=2).astype(np.uint8)
    assert isinstance(MaskGenerator(sam, **BASE).generate(gray), list)
    assert MaskGenerator(sam, **{**BASE, "pred_iou_thresh": 1.0}).generate(image) == []


@pytest.mark.parametrize("options, message", [
    ({"points_per_side": 0}, "points_per_side"),
    ({"points_per_batch": 2.5}, "points_per_batch"),
    ({"pred_iou_thresh": 1.5}, "pred_iou_thresh"),
    ({"box_nms_thresh": float("nan")}, "box_nms_thresh"),
    ({"crop_overlap_ratio": 1.0}, "crop_overlap_ratio"),
    ({"crop_n_layers": -1}, "crop_n_layers"),
    ({"min_mask_region_area": -3}, "min_mask_region_area"),
    ({"points_per_side": 2, "crop_n_layers": 2, "crop_n_points_downscale_factor": 2}, "no point"),
])
def test_bad_options_are_clear_errors(models, options: dict, message: str) -> None:
    _, sam = models
    with pytest.raises(ValueError, match=message):
        MaskGenerator(sam, **options)


def test_any_real_number_is_an_option(models) -> None:
    """Thresholds are checked as numbers.Real: a Fraction or a numpy float is as good as a float."""
    _, sam = models
    MaskGenerator(sam, pred_iou_thresh=Fraction(9, 10), stability_score_offset=np.float32(0.5))
    with pytest.raises(ValueError, match="box_nms_thresh"):
        MaskGenerator(sam, box_nms_thresh=Fraction(3, 2))


@pytest.mark.parametrize("bad", [
    [[0, 1], [2, 3]],
    np.zeros((10, 10, 3), dtype=np.float32),
    np.zeros((10, 10, 2), dtype=np.uint8),
    np.zeros((0, 10, 3), dtype=np.uint8),
])
def test_bad_images_are_clear_errors(models, bad) -> None:
    _, sam = models
    with pytest.raises(ValueError, match="image"):
        MaskGenerator(sam, **BASE).generate(bad)


def test_a_given_embedding_replaces_the_whole_image_encode(models, image: np.ndarray) -> None:
    """A cached embedding of the image gives the same records as encoding it inside ``generate``; crops
    are still encoded on their own; an embedding of another image is refused."""
    from model import Predictor

    _, sam = models
    embedding = Predictor(sam).embed(image)
    for options in ({}, {"crop_n_layers": 1}):
        generator = MaskGenerator(sam, **BASE, **options)
        assert_same_records(generator.generate(image, embedding=embedding), generator.generate(image), point_atol=1e-6)
    with pytest.raises(ValueError, match="embedding"):
        MaskGenerator(sam, **BASE).generate(image[:64], embedding=embedding)


def test_scores_first_makes_the_masks_asked_for(models, image: np.ndarray) -> None:
    """``decode_scores_first``: the IoU predictions and, for any rows, the very logits ``decode_low_res`` gives."""
    from model import Predictor

    _, sam = models
    predictor = Predictor(sam)
    embedding = predictor.embed(image)
    coords = torch.as_tensor(amg.build_point_grid(3) * [[160, 128]])[:, None, :]
    labels = torch.ones(len(coords), 1, dtype=torch.int)
    low_res, iou = predictor.decode_low_res(embedding, point_coords=coords, point_labels=labels)
    scores, masks_of = predictor.decode_scores_first(embedding, coords, labels)
    torch.testing.assert_close(scores, iou)
    rows = torch.tensor([25, 0, 4, 5, 26, 4])
    torch.testing.assert_close(masks_of(rows), low_res.flatten(0, 1)[rows], atol=1e-5, rtol=1e-5)
    assert masks_of(torch.zeros(0, dtype=torch.int64)).shape == (0, *low_res.shape[2:])
