"""Time our brush RLE (``backend.rle``) against Label Studio's SDK encoder and decoder.

Realistic masks: a few filled objects with ragged edges (what SAM returns), at 4000 x 3000 and
1024 x 768. Each row is the median of several runs; the SDK side is the pure-Python reference
(``label_studio_sdk.converter.brush.mask2rle`` / ``decode_rle``) on the same mask. Every run checks that
the bytes are identical and that the decoded masks round-trip, so a speed-up never hides a mismatch.
``--worst`` adds a salt-and-pepper 4000 x 3000 mask (about 6 million runs), ours only: the reference
needs minutes there.

    .venv/bin/python -m bench.rle --runs 5 --sdk-runs 3

Target: encode at least 10x faster than mask2rle on the 4000 x 3000 mask. Polygon outlines of the same
masks (``backend.polygons``) are timed too, for the cost of SAM_OUTPUT=polygon.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import cv2
import numpy as np
from label_studio_sdk.converter.brush import decode_rle, mask2rle

from backend import polygons, rle


def object_mask(height: int, width: int, seed: int = 0, objects: int = 4) -> np.ndarray:
    """Filled polygons of 360 jittered vertices each: smooth outlines with pixel-level raggedness."""
    rng = np.random.default_rng(seed)
    canvas = np.zeros((height, width), np.uint8)
    for _ in range(objects):
        centre = rng.uniform((0.2 * width, 0.2 * height), (0.8 * width, 0.8 * height))
        radius = rng.uniform(0.08, 0.3) * min(height, width)
        angles = np.linspace(0, 2 * np.pi, 360, endpoint=False)
        wobble = np.convolve(np.tile(rng.standard_normal(360), 3), np.ones(15) / 15, "same")[360:720]
        radii = radius * (1 + 0.3 * wobble) + rng.uniform(-3, 3, 360)
        points = np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], 1)
        cv2.fillPoly(canvas, [np.round(points).astype(np.int32)], 1)
    return canvas.astype(bool)


def median_seconds(function: Callable[[], object], runs: int) -> float:
    function()  # warm-up: lookup tables, allocator
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sdk_decode(data: list[int], height: int, width: int) -> np.ndarray:
    return decode_rle(data).reshape(height, width, 4)[:, :, 3] != 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs of ours per row")
    parser.add_argument("--sdk-runs", type=int, default=3, help="timed runs of the SDK per row")
    parser.add_argument("--worst", action="store_true", help="add a ~6M-run noise mask (ours only)")
    args = parser.parse_args()

    print(f"{'mask':<22}{'runs':>10}{'bytes':>10}  {'op':<8}{'ours ms':>10}{'SDK ms':>10}{'SDK/ours':>10}")
    for height, width in ((3000, 4000), (768, 1024)):
        mask = object_mask(height, width)
        encoded = rle.encode(mask)
        reference = mask2rle(mask.astype(np.uint8) * 255)
        if encoded != reference:
            raise SystemExit(f"encode differs from mask2rle on the {width}x{height} mask")
        if not (np.array_equal(rle.decode(encoded, height, width), mask)
                and np.array_equal(sdk_decode(encoded, height, width), mask)):
            raise SystemExit(f"decode does not round-trip the {width}x{height} mask")
        runs = int(np.count_nonzero(mask.ravel()[1:] != mask.ravel()[:-1])) + 1
        label = f"{width}x{height} objects"
        rows = [
            ("encode", lambda m=mask: rle.encode(m), lambda m=mask: mask2rle(m.astype(np.uint8) * 255)),
            ("decode", lambda e=encoded, h=height, w=width: rle.decode(e, h, w),
             lambda e=encoded, h=height, w=width: sdk_decode(e, h, w)),
        ]
        for op, ours, sdk in rows:
            ours_s, sdk_s = median_seconds(ours, args.runs), median_seconds(sdk, args.sdk_runs)
            print(f"{label:<22}{runs:>10}{len(encoded):>10}  {op:<8}{ours_s * 1e3:>10.1f}{sdk_s * 1e3:>10.1f}"
                  f"{sdk_s / ours_s:>10.1f}")
        polygon_s = median_seconds(lambda m=mask: polygons.mask_to_polygons(m), args.runs)
        print(f"{label:<22}{'':>10}{'':>10}  {'polygon':<8}{polygon_s * 1e3:>10.1f}{'-':>10}{'-':>10}")

    if args.worst:
        noise = np.random.default_rng(1).random((3000, 4000)) < 0.5
        runs = int(np.count_nonzero(noise.ravel()[1:] != noise.ravel()[:-1])) + 1
        encoded = rle.encode(noise)
        if not np.array_equal(rle.decode(encoded, 3000, 4000), noise):
            raise SystemExit("decode does not round-trip the noise mask")
        for op, ours in (("encode", lambda: rle.encode(noise)), ("decode", lambda: rle.decode(encoded, 3000, 4000))):
            ours_s = median_seconds(ours, max(1, args.runs // 2))
            print(f"{'4000x3000 noise':<22}{runs:>10}{len(encoded):>10}  {op:<8}{ours_s * 1e3:>10.1f}"
                  f"{'-':>10}{'-':>10}")


if __name__ == "__main__":
    main()
