"""``Predictor``: stateless image embedding and prompt decoding on one ``Sam``.

Meta's ``SamPredictor`` keeps the current image in the object (``set_image``), so one predictor
shared by several request threads can answer a click with a mask computed on someone else's image.
Here the embedding is a value the caller holds and passes back: a ``Predictor`` has no per-image
state, and any number of threads may use it with different embeddings at the same time.

Coordinates are pixels of the ORIGINAL image everywhere; the mapping into the encoder's frame
happens inside, as Meta's ``predict`` does it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import numpy.typing as npt
import torch

from model import runtime
from model.embedding import Embedding
from model.sam import Sam
from model.sam2 import LOW_RES_CLAMP, Sam2
from model.scratch import ScratchTensors
from model.transforms import (
    as_rgb,
    normalize_and_pad,
    postprocess_masks,
    postprocess_masks_above_zero,
    resize_longest_side,
    scale_coords,
)


@dataclass(frozen=True)
class Prediction:
    masks: np.ndarray  # (K, H, W) bool, original image size
    scores: np.ndarray  # (K,) float32 predicted IoU
    low_res_logits: np.ndarray  # (K, 4h, 4w) float32: 256x256 for official checkpoints


def _array(value: object, name: str, shape: tuple[int | None, ...]) -> np.ndarray:
    """``value`` as a finite float64 array of ``shape`` (None = any length), else ValueError."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric") from exc
    if array.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, array.shape, strict=False)):
        want = "x".join("N" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must have shape {want}, not {'x'.join(map(str, array.shape)) or 'scalar'}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must be finite")
    return array


class Predictor:
    def __init__(self, sam: Sam | Sam2) -> None:
        self.sam = sam
        self.device = sam.device
        self._sam2 = isinstance(sam, Sam2)  # SAM 2 / 2.1: its own pre/post-processing and decoder inputs
        # The positional encoding of the embedding grid does not depend on the prompt: compute it once.
        with torch.inference_mode():
            # Channels-last: the decoder reads it token-major, so each click then skips a transposing copy.
            pe = sam.prompt_encoder.get_dense_pe().to(self.device)
            self._dense_pe = pe.contiguous(memory_format=torch.channels_last)
        self._mask_input_size = sam.prompt_encoder.mask_input_size
        self._scratch = ScratchTensors()  # full-size logits of clicks, reused (model.scratch)

    def embed(self, image: np.ndarray) -> Embedding:
        """Run the image encoder on an HxWx3 uint8 RGB image (grayscale and RGBA are converted)."""
        return self.embed_batch([image])[0]

    def embed_batch(self, images: Sequence[np.ndarray]) -> list[Embedding]:
        """The embedding of each image (HxWx3 uint8 RGB; grayscale and RGBA are converted), with one encoder
        run on all of them.

        A GPU runs the encoder on four images in about the time of fewer than four single runs; a CPU core
        is already busy with one, so there batching gains nothing (``SAM_ENCODE_BATCH`` says when it is used).
        Images of any sizes stack: each is resized and padded to the encoder's square input on its own, and
        each embedding keeps its own original and input sizes and its own memory (a copy, not a view that
        would keep the whole batch alive in the cache). The features equal those of each image encoded alone
        up to float rounding (a batched matrix product sums in another order).
        """
        rgbs = [as_rgb(image) for image in images]
        if not rgbs:
            return []
        if isinstance(self.sam, Sam2):
            return self._embed_sam2_batch(rgbs)
        resized = [resize_longest_side(rgb, self.sam.image_size) for rgb in rgbs]
        with runtime.autocast(self.device, self.sam.dtype):
            x = torch.cat([normalize_and_pad(torch.from_numpy(r).to(self.device).permute(2, 0, 1).unsqueeze(0).float(),
                                             self.sam.pixel_mean, self.sam.pixel_std, self.sam.image_size)
                           for r in resized])
            features = self.sam.encode(x).float()
        return [Embedding(features=features[i:i + 1].clone(memory_format=torch.channels_last),
                          original_size=(rgb.shape[0], rgb.shape[1]), input_size=(r.shape[0], r.shape[1]),
                          fingerprint=self.sam.fingerprint)
                for i, (rgb, r) in enumerate(zip(rgbs, resized, strict=True))]

    def _embed_sam2_batch(self, rgbs: list[np.ndarray]) -> list[Embedding]:
        """SAM 2's ``embed_batch``: every image resized to the square, unpadded input, one encoder run; each
        embedding carries the decoder's high-resolution features too."""
        assert isinstance(self.sam, Sam2)
        with torch.inference_mode():
            x = torch.cat([self.sam.preprocess(rgb) for rgb in rgbs])
        with runtime.autocast(self.device, self.sam.dtype):
            features, high_res = self.sam.encode_image(x)
        channels_last = torch.channels_last
        return [Embedding(features=features[i:i + 1].float().clone(memory_format=channels_last),
                          original_size=(rgb.shape[0], rgb.shape[1]), input_size=(self.sam.image_size,) * 2,
                          fingerprint=self.sam.fingerprint,
                          high_res=tuple(t[i:i + 1].float().clone(memory_format=channels_last) for t in high_res))
                for i, rgb in enumerate(rgbs)]

    def predict(self, embedding: Embedding, points: object = None, labels: object = None, box: object = None,
                mask_input: object = None, multimask: bool = True, best_only: bool = False) -> Prediction:
        """Masks for one object from any mix of points (N,2) xy + labels (N,) 1/0, a box (4,) xyxy and
        the low-res logits of an earlier round ((1,h,w) or (h,w)). K = 3 masks if multimask, else 1.

        ``best_only`` keeps only the candidate with the highest predicted IoU (K = 1) and picks it before
        upsampling: on a 4000x3000 image the upsampling of masks nobody wants is most of a click's time."""
        coords_t = labels_t = box_t = mask_t = None
        if points is not None or labels is not None:
            if points is None or labels is None:
                raise ValueError("points and labels must be given together")
            coords = _array(points, "points", (None, 2))
            label_array = _array(labels, "labels", (coords.shape[0],))
            if not np.isin(label_array, (0, 1)).all():
                raise ValueError("labels must be 1 (foreground) or 0 (background)")
            if coords.shape[0] == 0:
                raise ValueError("points is empty")
            coords_t = torch.from_numpy(coords).unsqueeze(0)
            labels_t = torch.from_numpy(label_array.astype(np.int64)).unsqueeze(0)
        if box is not None:
            box_t = torch.from_numpy(_array(box, "box", (4,))).unsqueeze(0)
        if mask_input is not None:
            h, w = self._mask_input_size
            mask = _array(mask_input, "mask_input", (1, h, w) if np.ndim(cast(npt.ArrayLike, mask_input)) == 3 else (h, w))
            mask_t = torch.from_numpy(mask.astype(np.float32)).reshape(1, 1, h, w)
        if coords_t is None and box_t is None and mask_t is None:
            raise ValueError("give at least one prompt: points, a box or mask_input")
        masks, scores, low_res = self.predict_torch(embedding, coords_t, labels_t, box_t, mask_t, multimask,
                                                    best_only=best_only)
        return Prediction(masks=masks[0].cpu().numpy(), scores=scores[0].float().cpu().numpy(),
                          low_res_logits=low_res[0].float().cpu().numpy())

    def predict_boxes(self, embedding: Embedding, boxes: object) -> Prediction:
        """One mask per box (N,4) xyxy, all in one decoder call.

        Boxes are unambiguous prompts, so each gets the decoder's single-mask output (Meta's
        ``multimask_output=False``), as Meta does for batched boxes.
        """
        box_array = _array(boxes, "boxes", (None, 4))
        h, w = embedding.original_size
        if box_array.shape[0] == 0:
            lh, lw = self._mask_input_size
            return Prediction(masks=np.zeros((0, h, w), bool), scores=np.zeros(0, np.float32),
                              low_res_logits=np.zeros((0, lh, lw), np.float32))
        masks, scores, low_res = self.predict_torch(embedding, boxes=torch.from_numpy(box_array), multimask=False)
        return Prediction(masks=masks[:, 0].cpu().numpy(), scores=scores[:, 0].float().cpu().numpy(),
                          low_res_logits=low_res[:, 0].float().cpu().numpy())

    def predict_torch(self, embedding: Embedding, point_coords: torch.Tensor | None = None,
                      point_labels: torch.Tensor | None = None, boxes: torch.Tensor | None = None,
                      mask_input: torch.Tensor | None = None, multimask: bool = True,
                      return_logits: bool = False,
                      best_only: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched decoding, B prompts on one embedding; coordinates in original image pixels.

        point_coords (B,N,2), point_labels (B,N), boxes (B,4), mask_input (B,1,4h,4w). Returns masks
        (B,K,H,W) (bool, or float logits if ``return_logits``), IoU predictions (B,K) and low-res
        logits (B,K,4h,4w), all on the model's device. ``best_only``: K = 1, the candidate with the
        highest predicted IoU of each prompt, chosen before upsampling.
        """
        device = self.device
        with runtime.autocast(device, self.sam.dtype):
            low_res, iou = self.decode_low_res(embedding, point_coords, point_labels, boxes, mask_input, multimask,
                                               best_only=best_only)
            if best_only and low_res.shape[1] > 1:
                rows = torch.arange(low_res.shape[0], device=low_res.device)
                best = iou.argmax(dim=1)
                low_res, iou = low_res[rows, best].unsqueeze(1), iou[rows, best].unsqueeze(1)
            if return_logits:
                masks = self.upsample_logits(embedding, low_res)
            elif (edge_only := self.masks_above_zero(embedding, low_res)) is not None:
                masks = edge_only
            elif isinstance(self.sam, Sam2):  # SAM 2 resizes straight to the original size, into new memory
                masks = self.upsample_logits(embedding, low_res) > self.sam.mask_threshold
            else:  # the full-size logits live only until thresholded: their memory is reused (model.scratch)
                with self._scratch.take((*low_res.shape[:2], *embedding.original_size), low_res.device) as out:
                    masks = self.upsample_logits(embedding, low_res, out=out) > self.sam.mask_threshold
            if isinstance(self.sam, Sam2):  # the low-res logits handed back are clamped, as SAM 2's predictor does
                low_res = low_res.clamp(-LOW_RES_CLAMP, LOW_RES_CLAMP)
        return masks, iou.float(), low_res

    def decode_low_res(self, embedding: Embedding, point_coords: torch.Tensor | None = None,
                       point_labels: torch.Tensor | None = None, boxes: torch.Tensor | None = None,
                       mask_input: torch.Tensor | None = None, multimask: bool = True,
                       best_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder alone: low-res logits (B,K,4h,4w) float32 and IoU predictions (B,K), before any
        upsampling; ``predict_torch``'s arguments. Callers that filter masks by their predicted IoU (the
        automatic mask generator) upsample only the survivors with ``upsample_logits``.

        ``best_only``: SAM 1 with ``iou_before_masks`` makes only the mask of each prompt's best candidate (K = 1,
        its IoU alone); otherwise all K are returned and the caller picks."""
        if embedding.fingerprint != self.sam.fingerprint:
            raise ValueError(f"the embedding was made by model {embedding.fingerprint!r}, "
                             f"not by this one ({self.sam.fingerprint!r})")
        device = self.device
        original, resized = embedding.original_size, embedding.input_size
        points = None
        if point_coords is not None and point_labels is None:
            raise ValueError("point_labels must be given with point_coords")
        if point_coords is not None and point_labels is not None and not self._sam2:
            coords = scale_coords(point_coords.to(device), original, resized)
            points = (coords, point_labels.to(device=device, dtype=torch.int64))
        if boxes is not None and not self._sam2:
            boxes = scale_coords(boxes.to(device).reshape(-1, 2, 2), original, resized).reshape(-1, 4)
        if mask_input is not None:
            mask_input = mask_input.to(device=device, dtype=torch.float32)
        with runtime.autocast(device, self.sam.dtype):
            if isinstance(self.sam, Sam2):
                low_res, iou = self._decode_sam2(embedding, point_coords, point_labels, boxes, mask_input, multimask)
            else:
                sparse, dense = self.sam.prompt_encoder(points, boxes, mask_input)
                masks, iou = self.sam.mask_decoder.forward_deferred(embedding.features.to(device), self._dense_pe,
                                                                    sparse, dense, multimask)
                if best_only and iou.shape[1] > 1 and self.sam.fast_paths.iou_before_masks:
                    best = iou.argmax(dim=1)
                    low_res, iou = masks.best(best), iou.gather(1, best.unsqueeze(1))
                else:
                    low_res = masks.all()
        return low_res.float(), iou

    def decode_scores_first(self, embedding: Embedding, point_coords: torch.Tensor, point_labels: torch.Tensor,
                            multimask: bool = True) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """IoU predictions (B, K) of point prompts now, their low-res logits later: the function returned maps
        int64 rows of the flattened (B * K) outputs to their logits (M, 4h, 4w) float32, and makes only those
        (the ``iou_before_masks`` fast path). Otherwise, and for SAM 2, every mask is made here."""
        if isinstance(self.sam, Sam2) or not self.sam.fast_paths.iou_before_masks:
            low_res, iou = self.decode_low_res(embedding, point_coords=point_coords, point_labels=point_labels,
                                               multimask=multimask)
            flat = low_res.flatten(0, 1)
            return iou, lambda rows: flat[rows]
        if embedding.fingerprint != self.sam.fingerprint:
            raise ValueError(f"the embedding was made by model {embedding.fingerprint!r}, "
                             f"not by this one ({self.sam.fingerprint!r})")
        device, dtype = self.device, self.sam.dtype
        coords = scale_coords(point_coords.to(device), embedding.original_size, embedding.input_size)
        points = (coords, point_labels.to(device=device, dtype=torch.int64))
        with runtime.autocast(device, dtype):
            sparse, dense = self.sam.prompt_encoder(points, None, None)
            masks, iou = self.sam.mask_decoder.forward_deferred(embedding.features.to(device), self._dense_pe,
                                                                sparse, dense, multimask)

        def rows(selected: torch.Tensor) -> torch.Tensor:
            with runtime.autocast(device, dtype):
                return masks.rows(selected.to(device)).float()

        return iou, rows

    def upsample_logits(self, embedding: Embedding, low_res: torch.Tensor,
                        out: torch.Tensor | None = None) -> torch.Tensor:
        """Low-res logits (B,K,4h,4w) -> logits (B,K,H,W) at the embedded image's original size, written into
        ``out`` when the resize can (see ``postprocess_masks``)."""
        if isinstance(self.sam, Sam2):  # SAM 2 resizes straight to the original size
            return self.sam.postprocess(low_res, embedding.original_size)
        return postprocess_masks(low_res, self.sam.image_size, embedding.input_size, embedding.original_size,
                                 self.sam.fast_paths, out=out)

    def masks_above_zero(self, embedding: Embedding, low_res: torch.Tensor) -> torch.Tensor | None:
        """The masks (B,K,H,W) bool at the original size by the ``edge_only_masks`` fast path (``model.edge_masks``),
        without the full-size logits; None where the path is off or does not apply (the caller thresholds
        ``upsample_logits``)."""
        if not (self.sam.fast_paths.edge_only_masks and self.sam.mask_threshold == 0 and low_res.device.type == "cpu"):
            return None
        if isinstance(self.sam, Sam2):
            return self.sam.postprocess_above_zero(low_res, embedding.original_size)
        return postprocess_masks_above_zero(low_res, self.sam.image_size, embedding.input_size,
                                            embedding.original_size, self.sam.fast_paths)

    def _decode_sam2(self, embedding: Embedding, point_coords: torch.Tensor | None, point_labels: torch.Tensor | None,
                     boxes: torch.Tensor | None, mask_input: torch.Tensor | None,
                     multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM 2's prompt frame and order (box corners as points 2 / 3 first) and its decoder inputs."""
        if not embedding.high_res:
            raise ValueError("the embedding has no high-resolution features: it was not made by a SAM 2 model")
        device, original = self.device, embedding.original_size
        sam = self.sam
        assert isinstance(sam, Sam2)
        coords = labels = None
        if point_coords is not None and point_labels is not None:
            coords = sam.transform_coords(point_coords.to(device), original)
            labels = point_labels.to(device=device, dtype=torch.int64)
        if boxes is not None:
            boxes = sam.transform_coords(boxes.to(device).reshape(-1, 2, 2), original).reshape(-1, 4)
        sparse, dense = sam.prompt_encoder.embed_prompts(coords, labels, boxes, mask_input)
        high_res = tuple(t.to(device) for t in embedding.high_res)
        return sam.mask_decoder(embedding.features.to(device), self._dense_pe, sparse, dense, high_res, multimask)
