"""Image and coordinate transforms around the network, without torchvision.

Meta resizes with ``torchvision.transforms.functional.resize(to_pil_image(image), size)``: for a uint8
PIL image that is ``PIL.Image.resize`` with bilinear filtering. Calling Pillow directly gives the same
bytes; the tests check it pixel for pixel.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


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
    return np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))


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
                      original_size: tuple[int, int]) -> torch.Tensor:
    """Low-res logits (B, K, h, w) -> logits at the original image size (B, K, H, W).

    Upsample to the padded encoder input, crop the padding, resize to the original size; both
    resizes bilinear without corner alignment, as Meta's ``Sam.postprocess_masks``.
    """
    masks = F.interpolate(masks, (image_size, image_size), mode="bilinear", align_corners=False)
    masks = masks[..., : input_size[0], : input_size[1]]
    return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)
