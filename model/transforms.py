"""Image and coordinate transforms around the network, without torchvision.

Meta resizes with ``torchvision.transforms.functional.resize(to_pil_image(image), size)``: for a uint8
PIL image that is ``PIL.Image.resize`` with bilinear filtering. Calling Pillow directly gives the same
bytes; the tests check it pixel for pixel.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model import edge_masks
from model.fast_paths import FAST, FastPaths


def preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(h, w) after scaling so the longer side is ``long_side``; rounded as Meta rounds it."""
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB from RGB, grayscale (HxW or HxWx1) or RGBA input; ValueError otherwise."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"the image must be a numpy array, not {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"the image must be uint8, not {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"the image must be HxW, HxWx3 or HxWx4, not {'x'.join(map(str, image.shape))}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError("the image is empty")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.shape[2] == 4:
        image = image[:, :, :3]
    return np.ascontiguousarray(image)


def resize_longest_side(image: np.ndarray, long_side: int) -> np.ndarray:
    """Resize HxWx3 uint8 so its longer side is ``long_side`` (bilinear, Pillow, as Meta does)."""
    h, w = preprocess_shape(image.shape[0], image.shape[1], long_side)
    if (h, w) == image.shape[:2]:
        return image if image.flags.writeable else image.copy()
    # np.array, not np.asarray: a writable copy that torch.from_numpy accepts without a warning.
    return np.array(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))


def scale_coords(coords: torch.Tensor, original_size: tuple[int, int], input_size: tuple[int, int]) -> torch.Tensor:
    """Map xy pixel coordinates of the original image (..., 2) into the resized image."""
    scale = torch.tensor([input_size[1] / original_size[1], input_size[0] / original_size[0]],
                         dtype=torch.float64, device=coords.device)
    return (coords.to(torch.float64) * scale).to(torch.float32)


def normalize_and_pad(image: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, h, w) uint8 -> (B, 3, size, size) float, normalised, zero-padded right and bottom."""
    x = (image - mean) / std
    h, w = x.shape[-2:]
    return F.pad(x, (0, size - w, 0, size - h))


def postprocess_masks(masks: torch.Tensor, image_size: int, input_size: tuple[int, int],
                      original_size: tuple[int, int], fast_paths: FastPaths = FAST,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Low-res logits (B, K, h, w) -> logits at the original image size (B, K, H, W).

    Meta upsamples to the padded encoder input (image_size x image_size), crops the padding and
    resizes to the original size, both bilinear without corner alignment. The policy's
    ``composed_thumbnail_resize`` and ``cropped_upsample`` fast paths (``model.fast_paths``) compute the
    same with less work: the first for an original much smaller than the encoder input, the second,
    bit for bit, otherwise. ``out`` (float32, (B, K, H, W)) may receive the final resize, to reuse memory
    (``model.scratch``); the result is returned either way and is ``out`` only when it was written there.
    """
    if fast_paths.composed_thumbnail_resize and 3 * original_size[0] * original_size[1] < input_size[0] * input_size[1]:
        return composed_resize(masks, image_size, input_size, original_size)
    upsampled = _upsample_to_input(masks, image_size, input_size, fast_paths)
    if fast_paths.cropped_upsample:
        if tuple(input_size) == tuple(original_size):
            return upsampled
        if out is not None and out.shape == (*upsampled.shape[:2], *original_size) and out.dtype == upsampled.dtype:
            # F.interpolate's own kernel (size given, no scale factors), writing into ``out``.
            return torch.ops.aten.upsample_bilinear2d.out(upsampled, list(original_size), False, None, None, out=out)
    return F.interpolate(upsampled, original_size, mode="bilinear", align_corners=False)


def _upsample_to_input(masks: torch.Tensor, image_size: int, input_size: tuple[int, int],
                       fast_paths: FastPaths) -> torch.Tensor:
    """Meta's first resize: low-res logits upsampled to the padded encoder input, cropped to the resized image
    (only the rows and columns kept, with ``cropped_upsample``)."""
    if fast_paths.cropped_upsample:
        return upsample_cropped(masks.float(), image_size, input_size)
    upsampled = F.interpolate(masks.float(), (image_size, image_size), mode="bilinear", align_corners=False)
    return upsampled[..., :input_size[0], :input_size[1]]


def postprocess_masks_above_zero(masks: torch.Tensor, image_size: int, input_size: tuple[int, int],
                                 original_size: tuple[int, int], fast_paths: FastPaths = FAST) -> torch.Tensor | None:
    """``postprocess_masks(...) > 0`` by the ``edge_only_masks`` fast path (``model.edge_masks``): logits only
    along the masks' edges. None where that path does not apply (the small originals that
    ``composed_thumbnail_resize`` serves, too many edge pixels): the caller then thresholds ``postprocess_masks``.
    """
    if fast_paths.composed_thumbnail_resize and 3 * original_size[0] * original_size[1] < input_size[0] * input_size[1]:
        return None
    h, w = masks.shape[-2:]
    two_resizes = tuple(input_size) != tuple(original_size)
    if edge_masks.mostly_edges(masks) or (
            two_resizes and original_size[0] * original_size[1] < edge_masks.MIN_UPSCALE * input_size[0] * input_size[1]):
        return None  # before the first resize is spent: the full resize will be cheaper
    if not two_resizes:  # the upsample to the encoder input is the last resize
        ratios = (_upsample_ratio(h, image_size), _upsample_ratio(w, image_size))
        return edge_masks.resized_masks(masks, (input_size[0], input_size[1]), ratios)
    upsampled = _upsample_to_input(masks, image_size, input_size, fast_paths)
    ratios = (edge_masks.size_ratio(input_size[0], original_size[0]),
              edge_masks.size_ratio(input_size[1], original_size[1]))
    return edge_masks.resized_masks(upsampled, (original_size[0], original_size[1]), ratios)


def _upsample_ratio(low_res_len: int, image_size: int) -> float:
    """The kernel's ratio of the upsample to the encoder input: 1/factor where ``upsample_cropped`` passes an
    integer scale factor, in/out where the size is given (equal for official checkpoints, 256 -> 1024)."""
    if image_size % low_res_len == 0:
        return float(np.float32(1.0 / (image_size // low_res_len)))
    return edge_masks.size_ratio(low_res_len, image_size)


# --- the cropped_upsample and composed_thumbnail_resize fast paths (model.fast_paths) ------------------


def upsample_cropped(masks: torch.Tensor, image_size: int, input_size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(masks, (image_size, image_size))[..., :input_h, :input_w]`` without the cropped part.

    With an integer scale factor s, output pixel i reads input pixels floor((i + 0.5) / s - 0.5) and
    the next one, so the first input_h output rows need only the first ceil(input_h / s) + 1 input rows:
    resizing those by the same factor gives the same numbers (PyTorch uses 1/s as the scale either way).
    """
    h, w = masks.shape[-2:]
    if image_size % h or image_size % w:  # a non-integer factor: resize all, as Meta does
        upsampled = F.interpolate(masks, (image_size, image_size), mode="bilinear", align_corners=False)
        return upsampled[..., :input_size[0], :input_size[1]]
    factor_h, factor_w = image_size // h, image_size // w
    rows = min(h, -(-input_size[0] // factor_h) + 1)
    cols = min(w, -(-input_size[1] // factor_w) + 1)
    upsampled = F.interpolate(masks[..., :rows, :cols], scale_factor=(float(factor_h), float(factor_w)),
                              mode="bilinear", align_corners=False)
    return upsampled[..., :input_size[0], :input_size[1]]


def composed_resize(masks: torch.Tensor, image_size: int, input_size: tuple[int, int],
                     original_size: tuple[int, int]) -> torch.Tensor:
    """Meta's upsample, crop and resize as one filter per axis, read straight from the low-res logits."""
    rows, row_weights = _composed_taps(original_size[0], input_size[0], image_size, masks.shape[-2], masks.device)
    cols, col_weights = _composed_taps(original_size[1], input_size[1], image_size, masks.shape[-1], masks.device)
    b, k, h, w = masks.shape
    # Columns first, on the small low-res grid; then whole rows are gathered, which is a fast copy.
    # Both gathers run on dim 1 of a 2-D / 3-D view, where PyTorch's index_select has its fast paths;
    # on the last dims of the 4-D tensor it went element by element (this function ran 3x slower).
    flat = masks.float().reshape(b * k * h, w)
    x = flat.index_select(1, cols[:, 0]).mul_(col_weights[:, 0])
    for t in range(1, cols.shape[1]):
        x.addcmul_(flat.index_select(1, cols[:, t]), col_weights[:, t])
    x = x.reshape(b * k, h, cols.shape[0])
    out = x.index_select(1, rows[:, 0]).mul_(row_weights[:, 0, None])
    for t in range(1, rows.shape[1]):
        out.addcmul_(x.index_select(1, rows[:, t]), row_weights[:, t, None])
    return out.reshape(b, k, rows.shape[0], cols.shape[0])


def _bilinear_matrix(out_len: int, in_len: int) -> np.ndarray:
    """(out_len, in_len) matrix of PyTorch's bilinear resize along one axis (align_corners=False)."""
    # Source positions in float32 arithmetic, as PyTorch's CPU kernel computes them: in float64 the
    # fractions differ by up to ~1e-4 at a few thousand pixels, visible in the logits.
    scale = np.float32(in_len) / np.float32(out_len)
    src = scale * (np.arange(out_len, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0)).astype(np.float64)
    i0 = np.minimum(src.astype(np.int64), in_len - 1)
    i1 = np.minimum(i0 + 1, in_len - 1)
    frac = src - i0
    matrix = np.zeros((out_len, in_len))
    np.add.at(matrix, (np.arange(out_len), i0), 1.0 - frac)
    np.add.at(matrix, (np.arange(out_len), i1), frac)
    return matrix


@functools.lru_cache(maxsize=256)
def _composed_taps(out_len: int, crop_len: int, mid_len: int, in_len: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Indexes and weights (out_len, taps) of: resize in_len -> mid_len, keep crop_len, resize -> out_len."""
    composed = _bilinear_matrix(out_len, crop_len) @ _bilinear_matrix(mid_len, in_len)[:crop_len]
    nonzero = composed != 0
    taps = max(1, int(nonzero.sum(axis=1).max()))
    index = np.argsort(~nonzero, axis=1, kind="stable")[:, :taps]
    weight = np.take_along_axis(composed, index, axis=1)
    return (torch.from_numpy(index).to(device), torch.from_numpy(weight.astype(np.float32)).to(device))
