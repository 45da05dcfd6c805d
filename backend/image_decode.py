"""Task image decoding: from image bytes to the RGB pixels the annotator sees.

Decoding applies the EXIF orientation, because the browser shows the image rotated and our masks must
match what the annotator sees, and converts every mode Pillow reads to HxWx3 uint8 RGB: transparency is
composited over white (what a viewer shows on a light page, and it gives transparent areas one flat
colour instead of whatever RGB values hide under alpha 0), 16-bit images are scaled to 8 bits.

The pixel count is checked on the header before anything is decompressed (a few-KB PNG can claim
gigapixels), and the size a click needs is read from the header alone. Every failure is an
``ImageError`` (422) that names the image and says what is wrong with it.
"""

from __future__ import annotations

import contextlib
import io
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from backend.errors import ImageError
from backend.limits import IMAGE_MAX_PIXELS

# What a browser shows in Label Studio's <Image> (plus TIFF, for 16-bit scientific images). Other Pillow
# plugins stay closed: EPS would run Ghostscript on task data, and exotic decoders widen the attack surface.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "AVIF", "ICO")


@dataclass(frozen=True)
class TaskImage:
    """One task image: its bytes, decoded only when pixels are needed.

    A click on an image whose embedding is cached needs the image's size (for the prompt's pixels) and the
    hash of its bytes (the cache key), not its pixels: decoding a 4000x3000 JPEG costs more than the decoder.
    """

    data: bytes
    sha256: str  # of the downloaded bytes: the embedding-cache key
    source: str  # the URL or path it came from, for messages and logs
    content_type: str | None = None
    max_pixels: int = IMAGE_MAX_PIXELS

    @cached_property
    def array(self) -> np.ndarray:
        """HxWx3 uint8 RGB as the browser shows it (EXIF orientation applied)."""
        return decode_image(self.data, self.source, self.max_pixels, self.content_type)

    @cached_property
    def size(self) -> tuple[int, int]:
        """(height, width) as the browser shows it, read from the header unless already decoded."""
        if "array" in self.__dict__:
            return self.array.shape[0], self.array.shape[1]
        return image_size(self.data, self.source, self.max_pixels, self.content_type)

    def decode(self) -> np.ndarray:
        """The pixels, as a callable: ``Segmenter.embed`` decodes only on a cache miss."""
        return self.array


def decode_image(data: bytes, source: str, max_pixels: int = IMAGE_MAX_PIXELS,
                 content_type: str | None = None) -> np.ndarray:
    """Image bytes -> HxWx3 uint8 RGB as the browser shows them (EXIF orientation applied)."""
    with _open_image(data, source, max_pixels, content_type) as img:
        return _to_rgb(ImageOps.exif_transpose(img))


# EXIF orientations that turn the stored image by 90 degrees (the browser swaps width and height).
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def image_size(data: bytes, source: str, max_pixels: int = IMAGE_MAX_PIXELS,
               content_type: str | None = None) -> tuple[int, int]:
    """(height, width) of the image as the browser shows it, from the header alone (no decompression)."""
    with _open_image(data, source, max_pixels, content_type) as img:
        width, height = img.size
        if img.getexif().get(ExifTags.Base.Orientation, 1) in _TRANSPOSING_ORIENTATIONS:
            width, height = height, width
        return height, width


@contextlib.contextmanager
def _open_image(data: bytes, source: str, max_pixels: int, content_type: str | None) -> Iterator[Image.Image]:
    """The opened image, with every decoding failure turned into an ImageError that names the image.

    The pixel count is checked on the header, before anything is decompressed: a few-KB PNG can claim
    gigapixels (a decompression bomb).
    """
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(_too_many_pixels(source, width, height, max_pixels))
            yield img
    except Image.DecompressionBombError as exc:
        size = re.findall(r"\d+", str(exc))
        pixels = f" ({size[0]} pixels)" if size else ""
        raise ImageError(
            f"The image {source} is too large{pixels}: the limit is {max_pixels} pixels (IMAGE_MAX_PIXELS), "
            "and Pillow's own limit is twice Image.MAX_IMAGE_PIXELS."
        ) from None
    except UnidentifiedImageError:
        raise ImageError(_not_an_image(data, source, content_type)) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise ImageError(f"The image {source} could not be decoded (truncated or corrupt file?): {exc}") from None


def _too_many_pixels(source: str, width: int, height: int, max_pixels: int) -> str:
    return (
        f"The image {source} is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels} "
        "(IMAGE_MAX_PIXELS): downscale it, or raise the limit if the machine has the memory."
    )


def _not_an_image(data: bytes, source: str, content_type: str | None) -> str:
    head = data[:64].decode("utf-8", "replace").strip().lower()
    message = f"{source} is not an image the backend can read"
    if content_type:
        message += f" (Content-Type {content_type})"
    if head.startswith(("<!doctype html", "<html")) or "html" in (content_type or ""):
        message += ": it is a web page, often a login or error page; check the URL points at the image file itself"
    elif not data:
        message += ": it is empty"
    return f"{message}. Readable formats: {', '.join(IMAGE_FORMATS)}."


_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Any Pillow mode -> HxWx3 uint8 RGB; see the module docstring for transparency and 16 bits."""
    if img.mode in _SIXTEEN_BIT or img.mode in ("I", "F"):
        gray = _to_8bit(np.asarray(img), img.mode)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    if img.mode != "RGB":
        try:
            img = img.convert("RGB")
        except ValueError as exc:
            raise ImageError(f"Images in colour mode {img.mode} are not supported: {exc}") from None
    return np.array(img, dtype=np.uint8)


def _to_8bit(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit (and 32-bit integer / float) gray -> 8 bits.

    16-bit modes scale 0..65535 to 0..255 (v / 257, rounded). 32-bit integer and float images are taken as
    16-bit when any value exceeds 255 (16-bit PNG / TIFF data Pillow widened); float images within 0..1 as
    fractions of white; anything else as 8-bit already.
    """
    values = np.nan_to_num(values.astype(np.float64))
    peak = values.max() if values.size else 0.0
    if mode in _SIXTEEN_BIT or peak > 255:
        values = np.clip(values, 0, 65535) / 257.0
    elif mode == "F" and peak <= 1.0:
        values = values * 255.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)
