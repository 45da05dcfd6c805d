"""The geometry and mask arithmetic of "segment everything": point grids, crops, scores, boxes, RLE.

Each function reproduces one step of Meta's ``segment_anything.utils.amg`` with the same numbers (the
same integer rounding of crop sizes, the same int16/int32 sums in the stability score, the same box
convention), because the automatic mask generator must keep exactly the masks Meta keeps. They are pure
functions over torch tensors and numpy arrays so that each can be tested on its own.

Masks wait for the end of a run as uncompressed COCO run-length encodings (column-major runs,
starting with a run of zeros): a 1500x2000 binary mask is 3 MB, its RLE a few hundred integers, and a
large image can hold hundreds of candidate masks before the last NMS.
"""

from __future__ import annotations

import math
from itertools import product
from typing import Any

import numpy as np
import torch

Box = list[int]  # xyxy in pixels
Rle = dict[str, Any]  # {"size": [h, w], "counts": [zeros, ones, zeros, ...]} column-major


def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n*n, 2) xy points in [0, 1], cell centres of an n x n grid, row by row (x varies fastest)."""
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> list[np.ndarray]:
    """One grid per crop layer; layer i has ``int(n_per_side / scale_per_layer**i)`` points a side."""
    return [build_point_grid(int(n_per_side / (scale_per_layer**i))) for i in range(n_layers + 1)]


def generate_crop_boxes(im_size: tuple[int, int], n_layers: int,
                        overlap_ratio: float) -> tuple[list[Box], list[int]]:
    """Crop boxes (xyxy) and their layer index: the whole image, then (2**i)**2 overlapping crops in layer i.

    The overlap is a fraction of the short side, halved with every layer; crops are listed column by
    column (x0 outer, y0 inner), which is the order Meta processes them in.
    """
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    boxes: list[Box] = [[0, 0, im_w, im_h]]
    layers = [0]

    def crop_len(orig_len: int, n_crops: int, overlap: int) -> int:
        return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

    for i_layer in range(n_layers):
        n_crops_per_side = 2 ** (i_layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n_crops_per_side))
        crop_w = crop_len(im_w, n_crops_per_side, overlap)
        crop_h = crop_len(im_h, n_crops_per_side, overlap)
        x0s = [int((crop_w - overlap) * i) for i in range(n_crops_per_side)]
        y0s = [int((crop_h - overlap) * i) for i in range(n_crops_per_side)]
        for x0, y0 in product(x0s, y0s):
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layers.append(i_layer + 1)
    return boxes, layers


def stability_score(logits: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    """IoU of the mask thresholded at ``mask_threshold + offset`` with the one at ``- offset``.

    The first mask lies inside the second, so the IoU is a ratio of pixel counts. Counting with an
    int16 partial sum per row, as Meta does, avoids an int64 copy of every logit map (rows are
    shorter than 32768 pixels). An empty low mask gives NaN, which no threshold keeps.
    """
    inner = (logits > (mask_threshold + offset)).sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)
    outer = (logits > (mask_threshold - offset)).sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)
    return inner / outer


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(..., H, W) bool masks -> (..., 4) int64 xyxy boxes with inclusive right/bottom; [0,0,0,0] if empty.

    Inclusive edges (a one-pixel mask at x=5 gives x1=x2=5) are Meta's convention, and NMS scores
    overlap on these boxes, so we keep it.
    """
    if masks.numel() == 0:
        return torch.zeros(*masks.shape[:-2], 4, dtype=torch.int64, device=masks.device)
    shape = masks.shape
    h, w = shape[-2:]
    flat = masks.reshape(-1, h, w)

    def edges(present: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        coords = present * torch.arange(length, device=present.device)[None, :]
        last = coords.max(dim=-1).values
        first = (coords + length * (~present)).min(dim=-1).values
        return first, last

    top, bottom = edges(flat.any(dim=-1), h)
    left, right = edges(flat.any(dim=-2), w)
    empty = (right < left) | (bottom < top)
    boxes = torch.stack([left, top, right, bottom], dim=-1) * (~empty).unsqueeze(-1)
    return boxes.reshape(*shape[:-2], 4)


def is_box_near_crop_edge(boxes: torch.Tensor, crop_box: Box, orig_box: Box,
                          atol: float = 20.0) -> torch.Tensor:
    """(N,) bool: the box (crop coordinates) touches an edge of the crop that is not an image edge.

    Such a mask is probably an object cut by the crop; the crop that holds all of it will find it.
    """
    crop = torch.as_tensor(crop_box, dtype=torch.float, device=boxes.device)
    orig = torch.as_tensor(orig_box, dtype=torch.float, device=boxes.device)
    boxes = uncrop_boxes(boxes, crop_box).float()
    near_crop_edge = torch.isclose(boxes, crop[None, :], atol=atol, rtol=0)
    near_image_edge = torch.isclose(boxes, orig[None, :], atol=atol, rtol=0)
    return torch.any(near_crop_edge & ~near_image_edge, dim=1)


def uncrop_boxes(boxes: torch.Tensor, crop_box: Box) -> torch.Tensor:
    """(N, 4) xyxy boxes from crop to image coordinates."""
    x0, y0 = crop_box[:2]
    return boxes + torch.tensor([[x0, y0, x0, y0]], device=boxes.device)


def uncrop_points(points: torch.Tensor, crop_box: Box) -> torch.Tensor:
    """(N, 2) xy points from crop to image coordinates."""
    x0, y0 = crop_box[:2]
    return points + torch.tensor([[x0, y0]], device=points.device)


def uncrop_masks(masks: torch.Tensor, crop_box: Box, orig_h: int, orig_w: int) -> torch.Tensor:
    """(N, h, w) crop masks -> (N, orig_h, orig_w) image masks, zero outside the crop."""
    x0, y0, x1, y1 = crop_box
    if (x0, y0, x1, y1) == (0, 0, orig_w, orig_h):
        return masks
    pad_x, pad_y = orig_w - (x1 - x0), orig_h - (y1 - y0)
    return torch.nn.functional.pad(masks, (x0, pad_x - x0, y0, pad_y - y0), value=0)


def masks_to_rle(masks: torch.Tensor) -> list[Rle]:
    """(N, H, W) bool masks -> uncompressed COCO RLEs, in one pass over all masks.

    Runs are counted in column-major order and the first run is of zeros (so a mask whose first pixel
    is set starts with a 0 count), which is what pycocotools and Meta's records expect.
    """
    n, h, w = masks.shape
    flat = masks.permute(0, 2, 1).flatten(1)
    changes = (flat[:, 1:] != flat[:, :-1]).nonzero().cpu().numpy()
    first = flat[:, 0].cpu().numpy()
    per_mask = np.bincount(changes[:, 0], minlength=n) if len(changes) else np.zeros(n, dtype=np.int64)
    starts = np.split(changes[:, 1] + 1, np.cumsum(per_mask)[:-1])
    rles = []
    for i in range(n):
        bounds = np.concatenate([[0], starts[i], [h * w]])
        counts = np.diff(bounds).tolist()
        rles.append({"size": [h, w], "counts": ([0] + counts) if first[i] else counts})
    return rles


def rle_to_mask(rle: Rle) -> np.ndarray:
    """Uncompressed RLE -> (H, W) bool mask, C-contiguous."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    values = np.arange(len(counts)) % 2 == 1
    return np.ascontiguousarray(np.repeat(values, counts).reshape(w, h).T)


def rle_area(rle: Rle) -> int:
    """Number of set pixels: the sum of the odd runs."""
    return int(sum(rle["counts"][1::2]))


def box_xyxy_to_xywh(box: np.ndarray | torch.Tensor) -> list:
    """One xyxy box -> [x, y, w, h] as Python numbers (the record format)."""
    x0, y0, x1, y1 = (v.item() if hasattr(v, "item") else v for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
    """Fill holes (``mode="holes"``) or drop islands (``"islands"``) smaller than ``area_thresh`` pixels.

    Returns the mask and whether it changed. When every island is small the largest one is kept, so a
    mask never becomes empty. 8-connectivity, as Meta. cv2 is imported here, not at module level,
    because only this optional clean-up needs it and ``import model`` stays light.
    """
    import cv2

    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    holes = mode == "holes"
    working = (holes ^ mask).astype(np.uint8)
    n_labels, regions, stats, _ = cv2.connectedComponentsWithStats(working, connectivity=8)
    sizes = stats[:, -1][1:]  # row 0 is the background
    small = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
    if not small:
        return mask, False
    fill = [0, *small]
    if not holes:
        fill = [i for i in range(n_labels) if i not in fill]
        if not fill:
            fill = [int(np.argmax(sizes)) + 1]
    return np.isin(regions, fill), True
