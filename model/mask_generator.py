"""``MaskGenerator``: "segment everything", mask for mask what Meta's ``SamAutomaticMaskGenerator`` returns.

Pre-annotating a project without any clicks means prompting SAM with a grid of points and keeping the
good, distinct masks. Users compare our output with Meta's notebooks, so the pipeline is Meta's, step for
step and with the same numbers:

1. the image and, with ``crop_n_layers > 0``, overlapping crops of it (each embedded on its own);
2. a point grid per crop, decoded ``points_per_batch`` points at a time, three masks per point;
3. keep masks whose predicted IoU is ``> pred_iou_thresh`` and whose stability score is
   ``>= stability_score_thresh``; drop masks that touch a crop edge that is not an image edge;
4. box NMS within each crop (ranked by predicted IoU), then across crops (smaller crops win);
5. optionally fill small holes and drop small islands, then NMS again preferring untouched masks.

What differs is how, not what: the decoder is our ``Predictor.decode_scores_first`` on an ``Embedding`` (a
cached one can be passed in), NMS is our torch port (``model.nms``, no torchvision at runtime), and the work
at full image size is done only for masks that can still be kept. The predicted-IoU filter runs on the
decoder's scores before any mask exists: only prompts with a passing mask are upscaled to low-res logits at
all (``iou_before_masks`` in ``model.fast_paths``; with Meta's 0.88 most prompts keep nothing); the
stability score, boxes and crop-edge test run on the survivors' full-size logits, a chunk at a time; what passes waits as 256x256 low-res logits, and only the masks that
outlive NMS are made again at full size and run-length encoded (so a large image never holds hundreds of
full-size masks). Meta upsamples and encodes every one of the grid's masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch

from .amg import (
    Box,
    Rle,
    box_xyxy_to_xywh,
    build_all_layer_point_grids,
    generate_crop_boxes,
    is_box_near_crop_edge,
    masks_to_boxes,
    masks_to_rle,
    remove_small_regions,
    rle_area,
    rle_to_mask,
    stability_score,
    uncrop_boxes,
    uncrop_masks,
    uncrop_points,
)
from .embedding import Embedding
from .nms import batched_nms, box_area
from .predictor import Predictor
from .sam import Sam
from .sam2 import Sam2


@dataclass
class _Candidates:
    """Candidate masks as aligned columns, so one index selects the same masks in every column.

    ``points`` stay on the CPU in float64 (the grid's own precision, reported as ``point_coords``); the
    other tensors live on the model's device, where the scores are computed and NMS runs.
    """

    rles: list[Rle] = field(default_factory=list)
    boxes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 4, dtype=torch.int64))
    iou_preds: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    stability: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    points: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 2, dtype=torch.float64))
    crop_boxes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 4, dtype=torch.int64))

    def __len__(self) -> int:
        return len(self.rles)

    def select(self, keep: torch.Tensor) -> _Candidates:
        """The candidates picked by ``keep`` (bool mask or int64 indices), in that order."""
        keep_cpu = keep.cpu()
        indices = keep_cpu.nonzero().flatten() if keep_cpu.dtype == torch.bool else keep_cpu
        return _Candidates(
            rles=[self.rles[i] for i in indices.tolist()],
            boxes=self.boxes[keep.to(self.boxes.device)],
            iou_preds=self.iou_preds[keep.to(self.iou_preds.device)],
            stability=self.stability[keep.to(self.stability.device)],
            points=self.points[keep_cpu],
            crop_boxes=self.crop_boxes[keep.to(self.crop_boxes.device)],
        )

    @staticmethod
    def cat(parts: Sequence[_Candidates]) -> _Candidates:
        if not parts:
            return _Candidates()
        return _Candidates(
            rles=[rle for part in parts for rle in part.rles],
            boxes=torch.cat([part.boxes for part in parts]),
            iou_preds=torch.cat([part.iou_preds for part in parts]),
            stability=torch.cat([part.stability for part in parts]),
            points=torch.cat([part.points for part in parts]),
            crop_boxes=torch.cat([part.crop_boxes for part in parts]),
        )


# Full-size masks made at once: bounds memory (each is a float map of the crop, e.g. 12 MB at 4000x3000).
MASK_CHUNK = 64


@dataclass
class _Survivors:
    """Masks of one crop that passed the filters so far, as low-res logits (aligned columns, crop frame)."""

    low_res: torch.Tensor  # (N, 4h, 4w) float32
    boxes: torch.Tensor  # (N, 4) int64 xyxy, inclusive
    iou_preds: torch.Tensor
    stability: torch.Tensor
    points: torch.Tensor  # (N, 2) float64, on the CPU

    def __len__(self) -> int:
        return len(self.low_res)

    def select(self, keep: torch.Tensor) -> _Survivors:
        return _Survivors(low_res=self.low_res[keep], boxes=self.boxes[keep], iou_preds=self.iou_preds[keep],
                          stability=self.stability[keep], points=self.points[keep.cpu()])

    @staticmethod
    def cat(parts: Sequence[_Survivors]) -> _Survivors:
        return _Survivors(low_res=torch.cat([p.low_res for p in parts]), boxes=torch.cat([p.boxes for p in parts]),
                          iou_preds=torch.cat([p.iou_preds for p in parts]),
                          stability=torch.cat([p.stability for p in parts]),
                          points=torch.cat([p.points for p in parts]))


class MaskGenerator:
    """Masks for everything in an image, from a grid of single-point prompts (Meta's automatic generator).

    The arguments and their defaults are Meta's (chosen by Meta for ViT-H):

    - ``points_per_side``: the grid has ``points_per_side**2`` points on the whole image;
    - ``points_per_batch``: points decoded at once (more is faster on a GPU and uses more memory: each
      point holds three full-size float logit maps of its crop);
    - ``pred_iou_thresh``: keep masks whose predicted IoU is above it (0 keeps all); by default 0.88 for
      SAM and 0.8 for SAM 2 / 2.1, the defaults of Meta's ``SAM2AutomaticMaskGenerator`` (its other defaults
      are SAM's);
    - ``stability_score_thresh`` / ``stability_score_offset``: keep masks whose IoU between the masks
      thresholded at ``+offset`` and ``-offset`` logits is at least this (0 keeps all);
    - ``box_nms_thresh``: box IoU above which a lower-scored mask of the same crop is a duplicate;
    - ``crop_n_layers``: extra layers of crops, layer i has ``(2**i)**2`` crops (0: the image only);
    - ``crop_nms_thresh``: box IoU above which masks of different crops are duplicates;
    - ``crop_overlap_ratio``: overlap of first-layer crops as a fraction of the short image side;
    - ``crop_n_points_downscale_factor``: layer i uses ``points_per_side / factor**i`` points a side;
    - ``min_mask_region_area``: if > 0, fill holes and drop islands smaller than this many pixels (SAM's
      clean-up of the final masks, for SAM 2 too: Meta's SAM 2 generator instead hands this area to its
      predictor, which cleans the low-res logits with a CUDA-only extension and skips it elsewhere).

    Only Meta's ``"binary_mask"`` output mode exists here: ``segmentation`` is an (H, W) bool array. The
    RLE modes are left out because our callers (brush RLE, polygons) start from the binary mask.
    """

    def __init__(
        self,
        sam: Sam | Sam2,
        points_per_side: int = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float | None = None,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        min_mask_region_area: int = 0,
    ) -> None:
        if pred_iou_thresh is None:  # Meta's default of the model family (SAM 2's scores are sigmoids)
            pred_iou_thresh = 0.8 if isinstance(sam, Sam2) else 0.88
        _check_int("points_per_side", points_per_side, 1)
        _check_int("points_per_batch", points_per_batch, 1)
        _check_int("crop_n_layers", crop_n_layers, 0)
        _check_int("crop_n_points_downscale_factor", crop_n_points_downscale_factor, 1)
        _check_real("min_mask_region_area", min_mask_region_area, 0)
        for name, value in (("pred_iou_thresh", pred_iou_thresh),
                            ("stability_score_thresh", stability_score_thresh),
                            ("box_nms_thresh", box_nms_thresh), ("crop_nms_thresh", crop_nms_thresh)):
            _check_real(name, value, 0, 1)
        _check_real("stability_score_offset", stability_score_offset, 0)
        _check_real("crop_overlap_ratio", crop_overlap_ratio, 0, 1, high_open=True)
        if int(points_per_side / crop_n_points_downscale_factor**crop_n_layers) < 1:
            raise ValueError(f"points_per_side={points_per_side} leaves no point in crop layer {crop_n_layers} "
                             f"with crop_n_points_downscale_factor={crop_n_points_downscale_factor}")

        self.predictor = Predictor(sam)
        self.device = sam.device
        self.mask_threshold = float(sam.mask_threshold)
        self.point_grids = build_all_layer_point_grids(points_per_side, crop_n_layers,
                                                       crop_n_points_downscale_factor)
        self.points_per_batch = int(points_per_batch)
        self.pred_iou_thresh = float(pred_iou_thresh)
        self.stability_score_thresh = float(stability_score_thresh)
        self.stability_score_offset = float(stability_score_offset)
        self.box_nms_thresh = float(box_nms_thresh)
        self.crop_n_layers = int(crop_n_layers)
        self.crop_nms_thresh = float(crop_nms_thresh)
        self.crop_overlap_ratio = float(crop_overlap_ratio)
        self.min_mask_region_area = min_mask_region_area

    @torch.inference_mode()
    def generate(self, image: np.ndarray, embedding: Embedding | None = None) -> list[dict[str, Any]]:
        """Mask records for ``image`` (HxWx3 uint8 RGB; grayscale HxW and RGBA are converted).

        Each record is Meta's: ``segmentation`` (H, W) bool, ``area`` int, ``bbox`` [x, y, w, h] of the
        mask (inclusive pixel edges, Meta's convention), ``predicted_iou`` and ``stability_score``
        floats, ``point_coords`` [[x, y]] the prompt in image pixels, ``crop_box`` [x, y, w, h].
        ``embedding``: the whole image's, made by ``Predictor.embed`` with this model (e.g. from a cache), used
        for the whole-image crop instead of encoding it again. Raises ValueError for anything that is not such
        an image, or for an embedding of another image size or model.
        """
        _check_image(image)
        orig_size = (int(image.shape[0]), int(image.shape[1]))
        if embedding is not None and (embedding.original_size != orig_size
                                      or embedding.fingerprint != self.predictor.sam.fingerprint):
            raise ValueError(f"the embedding is of a {embedding.original_size} image by model "
                             f"{embedding.fingerprint!r}, not of this {orig_size} image by this model")
        crop_boxes, layers = generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        data = _Candidates.cat([self._process_crop(image, box, layer, orig_size, embedding if layer == 0 else None)
                                for box, layer in zip(crop_boxes, layers, strict=True)])

        if len(crop_boxes) > 1:
            # Between crops, prefer masks from smaller crops: they saw the object at a higher resolution.
            scores = 1 / box_area(data.crop_boxes)
            data = data.select(batched_nms(data.boxes.float(), scores, None, self.crop_nms_thresh))

        if self.min_mask_region_area > 0:
            data = self._remove_small_regions(data, self.min_mask_region_area,
                                              max(self.box_nms_thresh, self.crop_nms_thresh))
        return _records(data)

    def _process_crop(self, image: np.ndarray, crop_box: Box, layer: int,
                      orig_size: tuple[int, int], embedding: Embedding | None = None) -> _Candidates:
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1]
        crop_h, crop_w = crop.shape[:2]
        if embedding is None:
            embedding = self.predictor.embed(crop)
        points = self.point_grids[layer] * np.array([[crop_w, crop_h]], dtype=np.float64)

        data = _Survivors.cat([
            self._process_batch(embedding, points[i:i + self.points_per_batch], crop_box, orig_size)
            for i in range(0, len(points), self.points_per_batch)
        ])
        # Duplicates within the crop: several grid points land on the same object.
        data = data.select(batched_nms(data.boxes.float(), data.iou_preds, None, self.box_nms_thresh))

        # Only the masks that survived everything are made again at full size, and encoded.
        orig_h, orig_w = orig_size
        rles: list[Rle] = []
        for start in range(0, len(data), MASK_CHUNK):
            masks = self._masks(embedding, data.low_res[start:start + MASK_CHUNK])
            rles.extend(masks_to_rle(uncrop_masks(masks, crop_box, orig_h, orig_w)))
        return _Candidates(rles=rles, boxes=uncrop_boxes(data.boxes, crop_box), iou_preds=data.iou_preds,
                           stability=data.stability, points=uncrop_points(data.points, crop_box),
                           crop_boxes=torch.tensor([crop_box], dtype=torch.int64,
                                                   device=data.boxes.device).expand(len(data), 4))

    def _logits(self, embedding: Embedding, low_res: torch.Tensor) -> torch.Tensor:
        """(N, 4h, 4w) low-res logits -> (N, H, W) logits at the crop's size."""
        return self.predictor.upsample_logits(embedding, low_res[:, None])[:, 0]

    def _masks(self, embedding: Embedding, low_res: torch.Tensor) -> torch.Tensor:
        return self._logits(embedding, low_res) > self.mask_threshold

    def _process_batch(self, embedding: Embedding, points: np.ndarray, crop_box: Box,
                       orig_size: tuple[int, int]) -> _Survivors:
        """Decode a batch of grid points (three masks each) and keep what Meta's filters keep.

        The predicted-IoU filter needs no pixels, so it runs on the decoder's scores before any mask is
        made (with ``iou_before_masks``, not even the low-res logits of the rejected ones): only its
        survivors are brought to full size, where the stability score, the boxes and
        the crop-edge test need them. What survives is kept as low-res logits, a 256x256 map whatever the
        image size; the full-size masks are made again for the few that outlive NMS (``_process_crop``).
        """
        orig_h, orig_w = orig_size
        device = self.device
        coords = torch.as_tensor(points, device=device)[:, None, :]
        labels = torch.ones(len(points), 1, dtype=torch.int, device=device)
        iou_preds, masks_of = self.predictor.decode_scores_first(embedding, coords, labels, multimask=True)
        per_point = iou_preds.shape[1]
        iou_preds = iou_preds.flatten(0, 1).float()
        point_of = torch.as_tensor(np.repeat(points, per_point, axis=0))

        keep = iou_preds > self.pred_iou_thresh if self.pred_iou_thresh > 0.0 \
            else torch.ones_like(iou_preds, dtype=torch.bool)
        rows = keep.nonzero().flatten()
        low_res, iou_preds, point_of = masks_of(rows), iou_preds[keep], point_of[keep.cpu()]

        nothing = torch.zeros(0, dtype=torch.int64, device=low_res.device)
        parts = [_Survivors(low_res=low_res[nothing], boxes=torch.zeros(0, 4, dtype=torch.int64, device=device),
                            iou_preds=iou_preds[nothing], stability=iou_preds[nothing], points=point_of[:0])]
        for start in range(0, len(low_res), MASK_CHUNK):
            chunk = low_res[start:start + MASK_CHUNK]
            logits = self._logits(embedding, chunk)
            stability = stability_score(logits, self.mask_threshold, self.stability_score_offset)
            keep = stability >= self.stability_score_thresh if self.stability_score_thresh > 0.0 \
                else torch.ones_like(stability, dtype=torch.bool)
            masks = logits > self.mask_threshold
            del logits
            boxes = masks_to_boxes(masks[keep])
            del masks
            index = keep.nonzero().flatten()
            near = is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_w, orig_h])
            index, boxes = index[~near], boxes[~near]
            rows = index + start
            parts.append(_Survivors(low_res=low_res[rows], boxes=boxes, iou_preds=iou_preds[rows],
                                    stability=stability[index], points=point_of[rows.cpu()]))
        return _Survivors.cat(parts)

    @staticmethod
    def _remove_small_regions(data: _Candidates, min_area: float, nms_thresh: float) -> _Candidates:
        """Fill small holes and drop small islands, then NMS again, preferring masks left untouched.

        A cleaned mask can become a duplicate of another one; ranking untouched masks first (score 1
        against 0) keeps the mask the model produced over one we edited. Masks are decoded one at a
        time so memory stays at one full-size mask.
        """
        if len(data) == 0:
            return data
        rles, boxes, untouched = [], [], []
        for rle in data.rles:
            mask = rle_to_mask(rle)
            mask, filled = remove_small_regions(mask, min_area, "holes")
            mask, dropped = remove_small_regions(mask, min_area, "islands")
            changed = filled or dropped
            mask_t = torch.from_numpy(np.ascontiguousarray(mask))[None]
            rles.append(masks_to_rle(mask_t)[0] if changed else rle)
            boxes.append(masks_to_boxes(mask_t)[0])
            untouched.append(0.0 if changed else 1.0)
        new_boxes = torch.stack(boxes).to(data.boxes.device)
        keep = batched_nms(new_boxes.float(), torch.tensor(untouched), None, nms_thresh)
        data = _Candidates(rles=rles, boxes=new_boxes, iou_preds=data.iou_preds, stability=data.stability,
                           points=data.points, crop_boxes=data.crop_boxes)
        return data.select(keep)


def _records(data: _Candidates) -> list[dict[str, Any]]:
    boxes = data.boxes.cpu().numpy()
    iou_preds = data.iou_preds.cpu().numpy()
    stability = data.stability.cpu().numpy()
    points = data.points.cpu().numpy()
    crop_boxes = data.crop_boxes.cpu().numpy()
    return [
        {
            "segmentation": rle_to_mask(rle),
            "area": rle_area(rle),
            "bbox": box_xyxy_to_xywh(boxes[i]),
            "predicted_iou": float(iou_preds[i]),
            "point_coords": [points[i].tolist()],
            "stability_score": float(stability[i]),
            "crop_box": box_xyxy_to_xywh(crop_boxes[i]),
        }
        for i, rle in enumerate(data.rles)
    ]


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_real(name: str, value: Any, low: float, high: float | None = None, high_open: bool = False) -> None:
    ok = isinstance(value, Real) and not isinstance(value, bool)
    if ok:
        number = float(value)  # every Real converts; np.isfinite of the value itself fails on a Fraction
        ok = np.isfinite(number) and number >= low
        if ok and high is not None:
            ok = number < high if high_open else number <= high
    if not ok:
        upper = "" if high is None else (f" and < {high}" if high_open else f" and <= {high}")
        raise ValueError(f"{name} must be a number >= {low}{upper}, got {value!r}")


def _check_image(image: Any) -> None:
    if not isinstance(image, np.ndarray):
        raise ValueError(f"the image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"the image must be uint8, got {image.dtype}")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise ValueError(f"the image must be HxW, HxWx3 or HxWx4, got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"the image is empty (shape {image.shape})")
