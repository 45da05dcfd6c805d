"""Time "segment everything" (``model.MaskGenerator``) against Meta's ``SamAutomaticMaskGenerator``.

Both run on the same seeded random weights of a small custom SAM (the test configuration, upscaling
kernels smoothed as in tests/test_mask_generator.py so that masks are local and NMS has work to do) and
the same synthetic image, with Meta's default 32 x 32 grid. The encoder is small here on purpose: the
point of this script is the part the generator owns (3072 decoded masks, filtering, RLE, NMS), not the
encoder, which bench/engine.py times. Runs are interleaved so load from other processes falls on both.
It also times our NMS against ``torchvision.ops.batched_nms`` on N random boxes, checking that the kept
indices are identical.

    .venv/bin/python -m bench.mask_generator --runs 3
    .venv/bin/python -m bench.mask_generator --device cuda --size 768 1024

Target: the generator no slower than Meta's with identical records (the last line says whether met).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator
from torchvision.ops import batched_nms as tv_batched_nms

from model import MaskGenerator, load
from model.nms import batched_nms
from testsupport.checkpoints import small_checkpoint
from testsupport.images import shapes_image

CONFIG = dict(points_per_side=32, pred_iou_thresh=0.3, stability_score_thresh=0.2, stability_score_offset=0.01)


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def bench_generator(device: str, size: tuple[int, int], runs: int, crop_n_layers: int) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        _, reference = small_checkpoint(Path(tmp), seed=0)
        with torch.no_grad():
            for index in (0, 3):
                weight = reference.mask_decoder.output_upscaling[index].weight
                weight.copy_(weight.mean(dim=(2, 3), keepdim=True).expand_as(weight))
        path = Path(tmp) / "sam.pth"
        torch.save(reference.state_dict(), path)
        sam = load(path, device=device, dtype=torch.float32)
    reference.to(device)
    image = shapes_image(*size)
    config = {**CONFIG, "crop_n_layers": crop_n_layers}
    ours_t, theirs_t = [], []
    ours = theirs = []
    for _ in range(runs + 1):  # the first run warms up both
        t, theirs = _timed(lambda: SamAutomaticMaskGenerator(reference, **config).generate(image))
        theirs_t.append(t)
        t, ours = _timed(lambda: MaskGenerator(sam, **config).generate(image))
        ours_t.append(t)
    same = len(ours) == len(theirs) and all(
        np.array_equal(a["segmentation"], b["segmentation"]) for a, b in zip(ours, theirs, strict=True))
    if not same:  # the same masks in another order (equal scores), or masks a few pixels apart?
        matched = [max(_iou(a["segmentation"], b["segmentation"]) for b in theirs) for a in ours] if theirs else []
        print(f"  not identical in order: {len(ours)} vs {len(theirs)} masks; each of ours against Meta's closest: "
              f"min IoU {min(matched, default=1.0):.5f}, {sum(m == 1.0 for m in matched)} identical")
    ours_s, theirs_s = statistics.median(ours_t[1:]), statistics.median(theirs_t[1:])
    print(f"generate {size[1]}x{size[0]} crop_n_layers={crop_n_layers} on {device}: {len(ours)} masks, "
          f"ours {ours_s:.2f} s, Meta {theirs_s:.2f} s ({theirs_s / ours_s:.2f}x), identical masks: {same}")
    return same and ours_s <= theirs_s * 1.05


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def bench_nms(device: str, runs: int) -> None:
    generator = torch.Generator().manual_seed(0)
    for n in (100, 1000, 3000):
        xy = torch.rand(n, 2, generator=generator) * 1000
        boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=generator) * 300], dim=1).to(device)
        scores = torch.rand(n, generator=generator).to(device)
        idxs = torch.zeros(n, dtype=torch.int64, device=device)
        ours_t, tv_t = [], []
        for _ in range(runs + 1):
            t, kept = _timed(lambda: batched_nms(boxes, scores, idxs, 0.7))  # noqa: B023
            ours_t.append(t)
            t, expected = _timed(lambda: tv_batched_nms(boxes, scores, idxs, 0.7))  # noqa: B023
            tv_t.append(t)
        print(f"nms n={n} on {device}: ours {1e3 * statistics.median(ours_t[1:]):.1f} ms, torchvision "
              f"{1e3 * statistics.median(tv_t[1:]):.1f} ms, kept {len(kept)}, identical: {torch.equal(kept, expected)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, nargs=2, default=(384, 512), metavar=("H", "W"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--crop-n-layers", type=int, default=0)
    args = parser.parse_args()
    bench_nms(args.device, args.runs)
    met = bench_generator(args.device, tuple(args.size), args.runs, args.crop_n_layers)
    print(f"target (no slower than Meta, identical masks): {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
