"""Binary masks at the image's size from the decoder's logits, with logits computed only along the mask's edges.

A mask is a bilinear resize of low-resolution logits, thresholded at 0. Bilinear weights are never negative and
at least one of them is positive, so an output pixel whose source pixels are all positive is in the mask and one
whose source pixels are all at most 0 is not, whatever the weights. Only the pixels whose sources disagree, bands a
few pixels wide along the mask's edges, need their value. At 4000x3000 this replaces a resize into 12 million
floats (48 MB written, then read again by the threshold) with byte-wide logic on the source grid, copies of whole
mask rows, and the values of some ten thousand edge pixels. This is the ``edge_only_masks`` fast path
(``model.fast_paths``).

Exactness. The pixels decided by their sources' signs equal the full computation's, bit for bit, provided the
sources are the kernel's own. PyTorch's source position ``scale * (i + 0.5) - 0.5`` is float32 arithmetic, fused
into one rounding where the kernel is built with FMA (as the x86-64 kernels are, which is what is computed
here); so that a build without it cannot pick another tap, a position within ``TAP_MARGIN`` of a whole number
is given three source rows (or columns) instead of two, and the sign test covers all of them. "Positive" means above
``POSITIVE_FLOOR``, so no product of a weight and a source underflows to 0. The edge pixels' values are computed
here in float32 in the kernel's order of operations. They can differ from PyTorch's in the last bit, which changes
a pixel only where its logit is within rounding of 0: the same latitude as the other rounding-only fast paths.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

# Sources above this count as positive: the smallest weight of a decided pixel's largest tap is 1/4, so the
# product stays a normal float32 (above 1.2e-38) and positive.
POSITIVE_FLOOR = 1e-30
# Source positions this close to a whole number get the taps on both sides (see the module docstring).
TAP_MARGIN = 1e-3
# Past this share of edge pixels the full resize is cheaper (an edge pixel costs about 25 times a resized one).
# Object masks have 0.1-1%; the salt-and-pepper masks of random weights 15-90%.
EDGE_SHARE_LIMIT = 0.02
# The path pays only where an output cell (the pixels reading one source window) holds several pixels: below
# this many output pixels per source pixel the full resize is cheaper (1500x1000 from 1024x683 is 2.1).
MIN_UPSCALE = 4.0

# A source pixel's state bits, AND-ed over a cell's sources: both 0 make an edge cell.
_ALL_POSITIVE, _ALL_NOT_POSITIVE = 1, 2


@dataclass(frozen=True)
class AxisTaps:
    """How one axis of the output reads the source, as PyTorch's bilinear kernel does (align_corners=False).

    ``index0``/``index1``/``weight1``: the two taps of each output position and the second's weight, as the kernel
    computes them. ``groups``: runs of consecutive outputs that read the same window of source positions, each
    given by its window (``window_start``, ``window_length`` of 1 to 3 positions), its first output and its count.
    """

    index0: torch.Tensor
    index1: torch.Tensor
    weight1: torch.Tensor
    window_start: torch.Tensor
    window_length: torch.Tensor
    group_first: torch.Tensor
    group_count: torch.Tensor
    group_of_output: torch.Tensor


@functools.lru_cache(maxsize=64)
def axis_taps(out_len: int, in_len: int, ratio: float) -> AxisTaps:
    """The taps of ``out_len`` outputs over ``in_len`` sources with the kernel's ``ratio`` (in/out or 1/factor)."""
    ratio32 = np.float32(ratio)
    # The kernel's ``ratio * (i + 0.5f) - 0.5f`` is compiled into one fused multiply-add: one rounding to
    # float32 of the exact value, which float64 holds (a 24-bit ratio times a 16-bit index).
    exact = float(ratio32) * (np.arange(out_len, dtype=np.float64) + 0.5) - 0.5
    position = np.maximum(exact.astype(np.float32), np.float32(0.0))
    index0 = np.minimum(position.astype(np.int64), in_len - 1)
    weight1 = np.clip(position - index0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    index1 = np.minimum(index0 + 1, in_len - 1)
    first = np.minimum(np.floor(np.maximum(exact - TAP_MARGIN, 0.0)).astype(np.int64), in_len - 1)
    last = np.minimum(np.floor(np.maximum(exact + TAP_MARGIN, 0.0)).astype(np.int64) + 1, in_len - 1)
    first = np.minimum(first, index0)  # the kernel's own taps always lie inside the window
    last = np.maximum(last, index1)
    length = last - first + 1
    key = first * 4 + length
    starts = np.concatenate(([0], np.flatnonzero(np.diff(key)) + 1))
    counts = np.diff(np.append(starts, out_len))

    def tensor(values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(values))

    return AxisTaps(index0=tensor(index0), index1=tensor(index1), weight1=tensor(weight1),
                    window_start=tensor(first[starts]), window_length=tensor(length[starts]),
                    group_first=tensor(starts), group_count=tensor(counts),
                    group_of_output=tensor(np.repeat(np.arange(starts.size), counts)))


def resized_mask(logits: torch.Tensor, size: tuple[int, int], ratios: tuple[float, float]) -> torch.Tensor | None:
    """``F.interpolate(logits[None, None], size, mode="bilinear", align_corners=False)[0, 0] > 0`` for one (h, w)
    float32 map on the CPU, with the kernel's ``ratios`` per axis (in/out for a size, 1/factor for a scale factor).

    None when the output has fewer than ``MIN_UPSCALE`` pixels per source pixel or more than ``EDGE_SHARE_LIMIT``
    of its pixels are edge pixels: the caller then resizes in full.
    The work is on cells, the blocks of output pixels that read the same source window (a source pixel's
    worth): the full-size mask is made once, by copying each cell's verdict out to its block.
    """
    height, width = logits.shape
    if size[0] * size[1] < MIN_UPSCALE * height * width:
        return None
    rows = axis_taps(size[0], height, ratios[0])
    cols = axis_taps(size[1], width, ratios[1])
    state = (logits > POSITIVE_FLOOR).to(torch.uint8) * _ALL_POSITIVE | (logits <= 0).to(torch.uint8) * _ALL_NOT_POSITIVE
    # The state AND-ed over each row group's window of source rows, then over each column group's.
    cells = _window_and(_window_and(state, rows.window_start, rows.window_length, dim=0),
                        cols.window_start, cols.window_length, dim=1)  # (row groups, column groups)
    edges = cells == 0
    edge_pixels = int(rows.group_count.double() @ edges.double() @ cols.group_count.double())
    if edge_pixels > EDGE_SHARE_LIMIT * size[0] * size[1]:
        return None
    inside = (cells & _ALL_POSITIVE).bool().numpy()
    # Columns first, then whole rows: numpy's take copies rows as blocks (torch's index_select on dim 1 of a
    # byte tensor goes element by element, 3x slower).
    mask = torch.from_numpy(inside.take(cols.group_of_output.numpy(), axis=1).take(rows.group_of_output.numpy(),
                                                                                 axis=0))
    if edge_pixels:
        y, x = _edge_pixels(edges, rows, cols)
        mask[y, x] = _bilinear_at(logits, rows, cols, y, x) > 0
    return mask


def _window_and(state: torch.Tensor, start: torch.Tensor, length: torch.Tensor, dim: int) -> torch.Tensor:
    """For each window i, ``state`` AND-ed over positions start[i] .. start[i] + length[i] - 1 along ``dim``.

    Windows of 1, 2 and 3 positions are made for every start (the last position repeated past the end, which a
    window never reaches) and each window picked from them by one index_select.
    """
    n = state.shape[dim]
    last = state.narrow(dim, n - 1, 1)
    padded = torch.cat([state, last, last], dim=dim)
    one = padded.narrow(dim, 0, n)
    two = one & padded.narrow(dim, 1, n)
    three = two & padded.narrow(dim, 2, n)
    table = torch.cat([one, two, three], dim=dim)
    return table.index_select(dim, (length - 1) * n + start)


def _edge_pixels(edges: torch.Tensor, rows: AxisTaps, cols: AxisTaps) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (y, x) of every pixel of the edge cells: cell (g, c) is its row group's rows times its column
    group's columns, in row-major order within the cell."""
    group, column_group = edges.nonzero(as_tuple=True)
    first_y, count_y = rows.group_first[group], rows.group_count[group]
    first_x, count_x = cols.group_first[column_group], cols.group_count[column_group]
    pixels = count_y * count_x
    total = int(pixels.sum())
    cell = torch.repeat_interleave(torch.arange(len(pixels)), pixels, output_size=total)
    within = torch.arange(total) - (torch.cumsum(pixels, 0) - pixels)[cell]
    width = count_x[cell]
    return first_y[cell] + torch.div(within, width, rounding_mode="floor"), first_x[cell] + within % width


def _bilinear_at(logits: torch.Tensor, rows: AxisTaps, cols: AxisTaps, y: torch.Tensor,
                 x: torch.Tensor) -> torch.Tensor:
    """The bilinear resize at output pixels (y, x), in float32 and the kernel's order: rows of columns."""
    width = logits.shape[1]
    flat = logits.reshape(-1)
    y0, y1, wy = rows.index0[y] * width, rows.index1[y] * width, rows.weight1[y]
    x0, x1, wx = cols.index0[x], cols.index1[x], cols.weight1[x]
    wx0, wy0 = 1 - wx, 1 - wy
    top = flat[y0 + x0] * wx0 + flat[y0 + x1] * wx
    bottom = flat[y1 + x0] * wx0 + flat[y1 + x1] * wx
    return top * wy0 + bottom * wy


def resized_masks(logits: torch.Tensor, size: tuple[int, int], ratios: tuple[float, float]) -> torch.Tensor | None:
    """``resized_mask`` of every map of (B, K, h, w) logits -> (B, K, H, W) bool; None as soon as one map has too
    many edge pixels (the caller then resizes all of them in full)."""
    b, k = logits.shape[:2]
    if b * k == 1:
        mask = resized_mask(logits[0, 0].float().contiguous(), size, ratios)
        return None if mask is None else mask.view(1, 1, *size)
    out = torch.empty((b, k, *size), dtype=torch.bool)
    for i in range(b):
        for j in range(k):
            mask = resized_mask(logits[i, j].float().contiguous(), size, ratios)
            if mask is None:
                return None
            out[i, j] = mask
    return out


def mostly_edges(logits: torch.Tensor) -> bool:
    """Whether (B, K, h, w) logits change sign so often that resizing them would give more than
    ``EDGE_SHARE_LIMIT`` edge pixels: a cheap test on the source grid, before a first resize is spent on them.

    A 2x2 block of source logits with both signs makes an edge cell; resized, about a quarter of such a block's
    area lies along the edge (0.8% of low-res blocks gave 0.2% edge pixels at 4000x3000).
    """
    positive = logits > 0
    right = positive[..., :, 1:] != positive[..., :, :-1]
    down = positive[..., 1:, :] != positive[..., :-1, :]
    mixed = right[..., 1:, :] | right[..., :-1, :] | down[..., :, 1:] | down[..., :, :-1]
    return bool(mixed.float().mean(dim=(-2, -1)).max() > 4 * EDGE_SHARE_LIMIT)


def size_ratio(in_len: int, out_len: int) -> float:
    """The kernel's ratio for a resize given by its output size: in/out in float32."""
    return float(np.float32(in_len) / np.float32(out_len))
