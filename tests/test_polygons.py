"""Mask -> Label Studio polygon outlines: exact pixel-edge corners, parts, specks, holes, fidelity.

Polygons are rasterised back two ways: the way Label Studio's canvas shows them (a pixel is in when its
centre is inside the outline, even-odd rule) to check exactness, and with ``cv2.fillPoly`` for IoU.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from backend.polygons import MIN_AREA_PX, mask_to_polygons


def to_pixels(polygon: list[tuple[float, float]], height: int, width: int) -> np.ndarray:
    """Percent points back to pixel-edge coordinates."""
    return np.array(polygon, dtype=np.float64) / 100.0 * np.array([width, height])


def centres_inside(polygons: list, height: int, width: int) -> np.ndarray:
    """Pixels whose centre lies inside any polygon (even-odd crossing test, per polygon)."""
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    result = np.zeros((height, width), bool)
    for polygon in polygons:
        points = to_pixels(polygon, height, width)
        inside = np.zeros((height, width), bool)
        for (x1, y1), (x2, y2) in zip(points, np.roll(points, -1, axis=0), strict=True):
            if y1 == y2:
                continue
            crosses = (y1 > ys) != (y2 > ys)
            inside ^= crosses & (xs < (x2 - x1) * (ys - y1) / (y2 - y1) + x1)
        result |= inside
    return result


def fill_poly(polygons: list, height: int, width: int, supersample: int = 4) -> np.ndarray:
    """cv2.fillPoly of the outlines by pixel coverage: filled on a 4x finer grid, a pixel is in when at
    least half of it is covered (fillPoly itself takes pixel-centre vertices and fills inclusively)."""
    canvas = np.zeros((height * supersample, width * supersample), np.uint8)
    shift = 4
    for polygon in polygons:
        centre = (to_pixels(polygon, height, width) * supersample - 0.5) * (1 << shift)
        cv2.fillPoly(canvas, [np.round(centre).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=shift)
    coverage = canvas.reshape(height, supersample, width, supersample).mean(axis=(1, 3))
    return coverage >= 0.5


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with every background region not connected to the border (4-connected) filled."""
    padded = np.pad(mask, 1).astype(np.uint8)
    flood = padded.copy()
    cv2.floodFill(flood, None, (0, 0), 2, flags=4)
    return (flood != 2)[1:-1, 1:-1]


def blob(rng: np.random.Generator, height: int, width: int, centre: tuple[float, float], radius: float
         ) -> np.ndarray:
    """An object-like part: a star-shaped polygon with smoothly varying, jittered radius."""
    angles = np.linspace(0, 2 * np.pi, 120, endpoint=False)
    wobble = np.convolve(np.tile(rng.standard_normal(120), 3), np.ones(9) / 9, "same")[120:240]
    radii = radius * (1 + 0.2 * wobble) * rng.uniform(0.97, 1.03, 120)
    points = np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], 1)
    canvas = np.zeros((height, width), np.uint8)
    cv2.fillPoly(canvas, [np.round(points).astype(np.int32)], 1)
    return canvas.astype(bool)


def test_a_square_gives_its_four_pixel_edge_corners_in_percent() -> None:
    mask = np.zeros((100, 200), bool)
    mask[20:40, 50:90] = True  # rows 20-39, columns 50-89: edges y 20..40, x 50..90
    (polygon,) = mask_to_polygons(mask)
    assert sorted(polygon) == [(25.0, 20.0), (25.0, 40.0), (45.0, 20.0), (45.0, 40.0)]
    assert np.array_equal(centres_inside([polygon], 100, 200), mask)
    assert iou(fill_poly([polygon], 100, 200), mask) == 1.0


@pytest.mark.parametrize(("row", "col"), [(0, 0), (47, 63), (7, 3)])
def test_a_one_pixel_mask_gives_that_pixel_square(row: int, col: int) -> None:
    mask = np.zeros((48, 64), bool)
    mask[row, col] = True
    (polygon,) = mask_to_polygons(mask)
    corners = to_pixels(polygon, 48, 64)
    assert sorted(map(tuple, corners)) == [(col, row), (col, row + 1), (col + 1, row), (col + 1, row + 1)]
    assert np.array_equal(centres_inside([polygon], 48, 64), mask)


@pytest.mark.parametrize("mask", [np.zeros((30, 40), bool), np.zeros((30, 40), np.uint8), np.zeros((1, 1))])
def test_an_empty_mask_gives_no_polygon(mask: np.ndarray) -> None:
    assert mask_to_polygons(mask) == []


def test_two_blobs_give_two_polygons_largest_first() -> None:
    rng = np.random.default_rng(0)
    small = blob(rng, 240, 320, (70, 80), 30)
    large = blob(rng, 240, 320, (220, 140), 60)
    polygons = mask_to_polygons(small | large)
    assert len(polygons) == 2
    assert iou(fill_poly(polygons[:1], 240, 320), large) >= 0.95
    assert iou(fill_poly(polygons[1:], 240, 320), small) >= 0.95


def test_a_ring_gives_its_outer_outline_with_the_hole_filled() -> None:
    rows, cols = np.indices((200, 200))
    distance = np.hypot(rows - 100, cols - 100)
    disk, hole = distance < 60, distance < 25
    polygons = mask_to_polygons(disk & ~hole)
    assert len(polygons) == 1
    filled = fill_poly(polygons, 200, 200)
    assert iou(filled, disk) >= 0.97
    assert filled[hole].all()


def test_specks_are_dropped_but_the_largest_part_is_always_kept() -> None:
    rng = np.random.default_rng(1)
    mask = blob(rng, 120, 160, (80, 60), 30)
    mask[5:8, 5:8] = True  # 9 px speck
    mask[110:115, 150:155] = True  # 25 px: at the threshold, kept
    polygons = mask_to_polygons(mask)
    assert len(polygons) == 2 and MIN_AREA_PX == 25
    assert len(mask_to_polygons(mask, min_area_px=0)) == 3
    assert len(mask_to_polygons(mask, min_area_px=10_000)) == 1
    speck_only = np.zeros((50, 50), bool)
    speck_only[10:12, 10:12] = True
    assert len(mask_to_polygons(speck_only)) == 1


def test_tolerance_zero_reproduces_the_mask_exactly_with_holes_filled() -> None:
    rng = np.random.default_rng(2)
    for trial in range(6):
        mask = rng.random((40, 50)) < 0.55 if trial % 2 else np.zeros((40, 50), bool)
        if trial % 2 == 0:
            for _ in range(4):
                mask |= blob(rng, 40, 50, tuple(rng.uniform((0, 0), (50, 40))), rng.uniform(3, 15))
        polygons = mask_to_polygons(mask, tolerance_px=0, min_area_px=0)
        assert np.array_equal(centres_inside(polygons, 40, 50) if len(polygons) == 1 else
                              np.logical_or.reduce([centres_inside([p], 40, 50) for p in polygons]),
                              fill_holes(mask)), trial


@pytest.mark.parametrize("radius", [12, 25, 60, 150])
def test_simplified_outlines_of_realistic_shapes_keep_iou_at_least_095(radius: float) -> None:
    rng = np.random.default_rng(int(radius))
    for _ in range(3):
        centre = tuple(rng.uniform((radius, radius), (640 - radius, 480 - radius)))
        mask = blob(rng, 480, 640, centre, radius)
        polygons = mask_to_polygons(mask)
        assert len(polygons) >= 1
        assert iou(fill_poly(polygons, 480, 640), mask) >= 0.95
        assert iou(centres_inside(polygons[:1], 480, 640), mask) >= 0.95
        exact = sum(len(p) for p in mask_to_polygons(mask, tolerance_px=0))
        assert sum(len(p) for p in polygons) < exact  # simplification removed staircase corners


def test_points_are_percent_floats_and_every_polygon_has_an_area() -> None:
    mask = np.zeros((90, 70), bool)
    mask[10, 5:60] = True  # a 1-pixel line: Douglas-Peucker alone would leave 2 points
    mask[30:80, 20] = True
    mask[60:89, 40:69] = np.random.default_rng(3).random((29, 29)) < 0.7
    for polygon in mask_to_polygons(mask, tolerance_px=2.0, min_area_px=0):
        assert len(polygon) >= 3
        assert abs(cv2.contourArea(np.array(polygon, np.float32))) > 0
        for x, y in polygon:
            assert type(x) is float and type(y) is float
            assert 0.0 <= x <= 100.0 and 0.0 <= y <= 100.0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mask": np.zeros((2, 3, 3), bool)}, "2-D"),
    ({"mask": np.array([[0, 2]], np.uint8)}, "binary"),
    ({"mask": np.ones((4, 4), bool), "tolerance_px": -1}, "tolerance_px"),
    ({"mask": np.ones((4, 4), bool), "tolerance_px": float("nan")}, "tolerance_px"),
    ({"mask": np.ones((4, 4), bool), "min_area_px": "10"}, "min_area_px"),
])
def test_bad_input_is_a_clear_value_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mask_to_polygons(**kwargs)
