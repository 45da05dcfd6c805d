"""Segment everything with SAM 2.1: our ``MaskGenerator`` against Meta's ``SAM2AutomaticMaskGenerator``.

Both run on the same seeded random weights (the small configuration of ``testsupport.sam2_checkpoints``)
and the same image; the records must match one to one (mask IoU >= 0.99, close scores, same boxes,
prompts and crops).

Random weights need adjustments to make masks follow the image, as in ``test_mask_generator``: the
decoder's transposed convolutions get smoothed kernels (each kernel's mean over its 2x2 taps), and the
high-resolution projections ``conv_s0`` / ``conv_s1`` are scaled by 1/50 (at full strength their random
stride-4 texture scatters every mask over the whole image, so every box is the image and NMS keeps one;
the predictor parity tests run them at full strength). Stability offset 0.01, as random logits are small.
"""

from __future__ import annotations

import pytest
import torch

from model import MaskGenerator
from model.sam2_checkpoint import Sam2Config, load_with_config
from testsupport.images import shapes_image
from testsupport.parity import assert_same_records
from testsupport.sam2_checkpoints import SMALL, reference_mask_generator, save, small_checkpoint

pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning"),
              pytest.mark.usefixtures("one_torch_thread")]

BASE = dict(points_per_side=8, pred_iou_thresh=0.3, stability_score_thresh=0.2, stability_score_offset=0.01)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory):
    path, reference = small_checkpoint(tmp_path_factory.mktemp("amg2"), seed=0)
    decoder = reference.sam_mask_decoder
    with torch.no_grad():
        for index in (0, 3):  # the two ConvTranspose2d layers of output_upscaling
            weight = decoder.output_upscaling[index].weight
            weight.copy_(weight.mean(dim=(2, 3), keepdim=True).expand_as(weight))
        for conv in (decoder.conv_s0, decoder.conv_s1):
            conv.weight.mul_(0.02)
            conv.bias.mul_(0.02)
    save(reference, path)
    config = Sam2Config(num_heads=SMALL["num_heads"], global_att_blocks=SMALL["global_att_blocks"],
                        window_spec=SMALL["window_spec"], image_size=SMALL["image_size"])
    return reference, load_with_config(path, config, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("options", [{}, {"crop_n_layers": 1}, {"crop_n_layers": 1, "crop_n_points_downscale_factor": 2}],
                         ids=["image", "crops", "crops+downscale"])
def test_generate_matches_meta(models, options: dict) -> None:
    reference, sam = models
    image = shapes_image(128, 160)
    config = {**BASE, **options}
    theirs = reference_mask_generator(reference, **config).generate(image)
    ours = MaskGenerator(sam, **config).generate(image)
    assert len(theirs) >= 5, "the configuration should keep a real number of masks"
    assert_same_records(ours, theirs, point_atol=1e-4)
    if options.get("crop_n_layers"):
        assert len({tuple(r["crop_box"]) for r in ours}) > 1, "masks of the smaller crops should survive"


def test_defaults_are_sam2s(models) -> None:
    reference, sam = models
    ours, theirs = MaskGenerator(sam), reference_mask_generator(reference)
    for name in ("pred_iou_thresh", "stability_score_thresh", "stability_score_offset", "box_nms_thresh",
                 "crop_n_layers", "crop_nms_thresh", "crop_overlap_ratio", "points_per_batch"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.pred_iou_thresh == 0.8
    assert len(ours.point_grids[0]) == len(theirs.point_grids[0]) == 32 * 32


def test_small_region_clean_up_runs(models) -> None:
    _, sam = models
    records = MaskGenerator(sam, **BASE, min_mask_region_area=30).generate(shapes_image(128, 160))
    assert records and all(r["segmentation"].shape == (128, 160) for r in records)
