"""Masks as PNG data URLs: the value of Label Studio's BitmaskLabels regions and of the newer interactive flow.

Two readers, two conventions (both read from Label Studio's editor sources, see docs/label-studio-protocol.md):

- a stored ``bitmasklabels`` region (``BitmaskRegion`` in the editor) is drawn from ``value.imageDataURL``
  by its **alpha** channel, at the PNG's own size, which must be the image's natural size; the editor itself
  serialises black pixels on a transparent background, so that is what ``FOREGROUND_BLACK`` writes;
- the editor's ``ml-interactive`` flow reads the answer's PNG by its **red** channel (red > 127 is the
  object), so its masks are written white (``FOREGROUND_WHITE``) on the same transparent background, which
  also satisfies the alpha reader.

The PNG is a two-entry palette image with the background entry transparent: one bit per pixel before
compression, a few kB for a typical mask, where an RGBA PNG would be 32 bits per pixel.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np

from backend.limits import IMAGE_MAX_PIXELS

PREFIX = "data:image/png;base64,"
FOREGROUND_BLACK = (0, 0, 0)  # what Label Studio's editor writes for a BitmaskLabels region
FOREGROUND_WHITE = (255, 255, 255)  # red > 127: the ml-interactive flow's foreground
MAX_DATA_URL_CHARS = 64 * 1024 * 1024  # decode() refuses more: a PNG data URL is never near this for a mask


def encode(mask: np.ndarray, foreground: tuple[int, int, int] = FOREGROUND_BLACK) -> str:
    """A ``data:image/png;base64,...`` URL of a (H, W) mask: ``foreground`` where True, transparent elsewhere."""
    from PIL import Image

    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.shape[0] == 0 or mask.shape[1] == 0:
        raise ValueError(f"a mask must be a non-empty (H, W) array, got shape {mask.shape}")
    height, width = mask.shape
    indices = np.ascontiguousarray(mask, dtype=bool).view(np.uint8)  # 0 / 1: palette indices, no copy
    image = Image.frombuffer("P", (width, height), indices.tobytes(), "raw", "P", 0, 1)
    # Index 0 = background (transparent black), index 1 = foreground (opaque).
    image.putpalette([0, 0, 0, *foreground], rawmode="RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=0, bits=1, optimize=False, compress_level=6)
    return PREFIX + base64.b64encode(buffer.getvalue()).decode("ascii")


def decode(data_url: str, *, channel: str = "alpha", max_pixels: int = IMAGE_MAX_PIXELS) -> np.ndarray:
    """The (H, W) bool mask of a PNG data URL as an editor reads it: ``alpha`` > 0 (a stored BitmaskLabels
    region) or ``red`` > 127 (the ml-interactive flow). ValueError for anything that is not such a PNG."""
    from PIL import Image

    if not isinstance(data_url, str) or not data_url.startswith(PREFIX):
        raise ValueError("a bitmask must be a 'data:image/png;base64,' URL")
    if len(data_url) > MAX_DATA_URL_CHARS:
        raise ValueError(f"the bitmask data URL is longer than {MAX_DATA_URL_CHARS} characters")
    try:
        data = base64.b64decode(data_url[len(PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the bitmask data URL is not valid base64") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "PNG":
                raise ValueError(f"the bitmask is a {image.format} image, not a PNG")
            width, height = image.size
            if width * height > max_pixels:
                raise ValueError(f"the bitmask has {width}x{height} pixels, more than {max_pixels}")
            rgba = np.asarray(image.convert("RGBA"))
    except (OSError, SyntaxError) as error:  # PIL's errors for truncated or corrupt files
        raise ValueError(f"the bitmask is not a readable PNG: {error}") from None
    if channel == "alpha":
        return rgba[:, :, 3] > 0
    if channel == "red":
        return rgba[:, :, 0] > 127
    raise ValueError(f"unknown channel {channel!r}: expected alpha or red")
