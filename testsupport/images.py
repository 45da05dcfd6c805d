"""Synthetic images whose content the tests and benchmarks can reason about."""

from __future__ import annotations

import numpy as np


def shapes_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Dark background, a few filled discs and rectangles of random colours, light noise."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 20.0, dtype=np.float32)
    yy, xx = np.mgrid[0:height, 0:width]
    for k in range(8):
        color = rng.uniform(0, 255, 3)
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        r = rng.uniform(0.06, 0.16) * min(height, width)
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r if k % 2 else (abs(yy - cy) < r) & (abs(xx - cx) < 1.4 * r)
        image[inside] = color
    image += rng.normal(0, 2, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)
