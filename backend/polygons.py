"""Masks -> Label Studio PolygonLabels outlines, in percent of the image's width and height.

Outlines follow pixel EDGES, not pixel centres. Label Studio draws a polygon over the image in continuous
coordinates where pixel (x, y) covers [x, x+1) x [y, y+1), so a square of pixels from column 50 to 89 must
become the edges x = 50 and x = 90; tracing pixel centres (what ``cv2.findContours`` returns) would shrink
every part by half a pixel on each side, which costs small objects a visible share of their area. The exact
edge outline comes from tracing the mask upsampled 2x (nearest): there a boundary pixel's coordinate u is
even on a part's left/top side and odd on its right/bottom side, and ceil(u / 2) is the pixel edge in both
cases. The outline is then simplified with Douglas-Peucker (``cv2.approxPolyDP``) at ``tolerance_px``.

Several parts: one polygon per 8-connected part, largest first. Parts enclosing less than ``min_area_px``
pixels are dropped as specks (SAM leaves stray islands of a few pixels; each would become a separate region
for the annotator to delete), except that the largest part is always kept, so a genuinely tiny object still
gets its outline.

Holes are filled: each part gives its outer outline only. A Label Studio polygon is one ring with no holes,
and the alternative, a "keyhole" outline that walks in to each hole along a zero-width bridge and out again,
renders correctly but is a trap to edit (dragging a bridge vertex tears the ring open) and is an invalid,
self-touching polygon to the COCO/shapely tools projects export to. SAM's holes are mostly pinholes anyway;
projects that need true holes should use BrushLabels, which our brush output reproduces exactly.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from backend.rle import foreground

__all__ = ["MIN_AREA_PX", "mask_to_polygons"]

MIN_AREA_PX = 25.0  # a 5x5 patch: about the smallest thing an annotator sees and clicks at 100 % zoom

Polygon = list[tuple[float, float]]


def mask_to_polygons(mask: np.ndarray, tolerance_px: float = 1.0, min_area_px: float = MIN_AREA_PX
                     ) -> list[Polygon]:
    """Outer outlines of the mask's parts as (x, y) points in percent (0-100), largest part first.

    ``tolerance_px`` is the largest distance, in pixels, the simplified outline may stray from the exact
    pixel-edge outline (0 keeps every corner of the staircase). Parts enclosing less than ``min_area_px``
    pixels (holes included) are dropped, except the largest. An empty mask gives ``[]``. Raises ValueError
    for a mask that is not 2-D binary, or a negative / non-finite tolerance or area.
    """
    pixels = foreground(mask)
    for name, value in (("tolerance_px", tolerance_px), ("min_area_px", min_area_px)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    height, width = pixels.shape
    outlines = sorted(_outlines(pixels), key=lambda pair: -pair[0])
    polygons = []
    for rank, (area, outline) in enumerate(outlines):
        if rank > 0 and area < min_area_px:
            break
        points = _simplify(outline, float(tolerance_px))
        scale = np.array([100.0 / width, 100.0 / height])
        polygons.append([(float(x), float(y)) for x, y in points * scale])
    return polygons


def _outlines(pixels: np.ndarray) -> list[tuple[float, np.ndarray]]:
    """(enclosed area, outline) of each 8-connected part; outlines are (N, 2) int pixel-edge (x, y)."""
    rows = np.flatnonzero(pixels.any(axis=1))
    if rows.size == 0:
        return []
    cols = np.flatnonzero(pixels.any(axis=0))
    top, left = int(rows[0]), int(cols[0])
    # A 1-pixel margin keeps outlines off the image border, where contour tracing has no outside to see.
    crop = np.pad(pixels[top:rows[-1] + 1, left:cols[-1] + 1], 1).astype(np.uint8)
    doubled = cv2.resize(crop, (crop.shape[1] * 2, crop.shape[0] * 2), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(doubled, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    offset = np.array([left - 1, top - 1])
    result = []
    for contour in contours:
        edges = (contour[:, 0, :] + 1) // 2 + offset  # ceil(u / 2): pixel edge, back in image coordinates
        moved = np.any(edges != np.roll(edges, 1, axis=0), axis=1)
        edges = edges[moved] if moved.any() else edges[:1]
        area = abs(float(cv2.contourArea(edges.astype(np.float32))))
        result.append((area, edges))
    return result


def _simplify(outline: np.ndarray, tolerance_px: float) -> np.ndarray:
    """Douglas-Peucker within `tolerance_px`, never below 3 points (Label Studio needs a polygon).

    A thin part (a 1-pixel-wide line) can collapse to 2 points at the asked tolerance; the tolerance is
    then halved until the outline keeps an area, down to the exact outline, which has at least 4 corners.
    """
    points = outline.astype(np.float32).reshape(-1, 1, 2)
    while tolerance_px > 1e-3:
        simplified = cv2.approxPolyDP(points, tolerance_px, closed=True).reshape(-1, 2)
        if simplified.shape[0] >= 3:
            return simplified.astype(np.float64)
        tolerance_px /= 2
    return _drop_collinear(outline).astype(np.float64)


def _drop_collinear(outline: np.ndarray) -> np.ndarray:
    """The outline without points that lie on a straight line between their neighbours."""
    before = outline - np.roll(outline, 1, axis=0)
    after = np.roll(outline, -1, axis=0) - outline
    turns = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0] != 0
    return outline[turns] if turns.sum() >= 3 else outline
