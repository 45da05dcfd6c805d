"""Greedy box non-maximum suppression in plain torch, with torchvision's exact semantics.

Meta's automatic mask generator calls ``torchvision.ops.batched_nms`` three times (within a crop, across
crops, after small-region clean-up) and two of those calls rank by scores full of ties (``1 / crop area``
and ``0 / 1``). Which duplicate survives therefore depends on how ties are broken, so we reproduce
torchvision's rules, not just the idea of NMS:

- boxes are visited in descending score order, ties in index order (a stable sort);
- a box is dropped when its IoU with a kept, higher-ranked box is strictly greater than the threshold;
- the IoU is computed in the boxes' own floating dtype as ``inter / (area_i + area_j - inter)`` and
  compared with the threshold in double precision, as torchvision's kernel does (comparing in float32
  would round the threshold and flip boxes that sit exactly on it);
- the kept indices come back in the order they were visited (descending score).

The pairwise IoUs are computed on the boxes' device in row blocks, so memory stays at ``block x N`` and
the greedy pass runs on small boolean rows on the CPU.
"""

from __future__ import annotations

import numpy as np
import torch

# Rows of the IoU matrix computed at once: bounds the memory to _BLOCK_ROWS x N.
_BLOCK_ROWS = 1024


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of (N, 4) xyxy boxes, ``(x2 - x1) * (y2 - y1)`` in the boxes' dtype (no +1 pixel)."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of the boxes kept by greedy NMS, in descending score order (``torchvision.ops.nms``)."""
    return batched_nms(boxes, scores, None, iou_threshold)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor | None,
                iou_threshold: float) -> torch.Tensor:
    """NMS applied independently per category (``torchvision.ops.batched_nms``).

    Boxes of different categories never suppress each other. ``idxs`` None means one category.
    Returns int64 indices into ``boxes`` on the boxes' device, in descending score order.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {tuple(boxes.shape)}")
    n = boxes.shape[0]
    if scores.shape != (n,):
        raise ValueError(f"scores must have shape ({n},), got {tuple(scores.shape)}")
    if idxs is not None and idxs.shape != (n,):
        raise ValueError(f"idxs must have shape ({n},), got {tuple(idxs.shape)}")
    device = boxes.device
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    if not boxes.is_floating_point():
        boxes = boxes.float()

    order = torch.sort(scores.to(device), descending=True, stable=True).indices
    sorted_boxes = boxes[order]
    areas = box_area(sorted_boxes)
    coords = tuple(sorted_boxes[:, k].contiguous() for k in range(4))
    sorted_idxs = idxs.to(device)[order] if idxs is not None else None

    removed = np.zeros(n, dtype=bool)
    keep: list[int] = []
    for start in range(0, n, _BLOCK_ROWS):
        stop = min(start + _BLOCK_ROWS, n)
        over = _overlaps(coords, areas, start, stop, iou_threshold)
        if sorted_idxs is not None:
            over &= sorted_idxs[start:stop, None] == sorted_idxs[None, start:]
        over_np = over.cpu().numpy()
        for row in range(stop - start):
            i = start + row
            if removed[i]:
                continue
            keep.append(i)
            # Columns of this block start at `start`; only boxes ranked below i can be suppressed by it.
            np.logical_or(removed[i + 1:], over_np[row, row + 1:], out=removed[i + 1:])
    return order[torch.as_tensor(keep, dtype=torch.int64, device=device)]


def _overlaps(coords: tuple[torch.Tensor, ...], areas: torch.Tensor, start: int, stop: int,
              iou_threshold: float) -> torch.Tensor:
    """Boolean (stop - start, N - start) matrix: IoU(row box, column box) > threshold.

    Rows are boxes ``start:stop`` and columns boxes ``start:`` of the score-sorted list; ``coords`` are
    the contiguous x1, y1, x2, y2 columns. The arithmetic mirrors torchvision's kernel operation for
    operation so that results agree to the last bit.
    """
    x1, y1, x2, y2 = coords
    rows, cols = slice(start, stop), slice(start, None)
    width = torch.minimum(x2[rows, None], x2[None, cols]).sub_(torch.maximum(x1[rows, None], x1[None, cols]))
    height = torch.minimum(y2[rows, None], y2[None, cols]).sub_(torch.maximum(y1[rows, None], y1[None, cols]))
    inter = width.clamp_(min=0).mul_(height.clamp_(min=0))
    union = (areas[rows, None] + areas[None, cols]).sub_(inter)
    return inter.div_(union).double() > iou_threshold
