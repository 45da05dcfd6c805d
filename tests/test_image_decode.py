"""Task image decoding: the pixel-bomb guard, orientation, colour modes, size from the header alone."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from backend.errors import ImageError
from backend.image_decode import decode_image
from backend.image_fetch import ImageFetcher
from backend.limits import IMAGE_MAX_PIXELS
from testsupport.image_access import file_bytes, task
from testsupport.image_server import SIXTEEN_BIT_VALUES, CloudStorage, bomb_png

# ------------------------------------------------------------------------------------------------------
# Limits: pixels


def test_decompression_bomb(cloud: CloudStorage) -> None:
    data = file_bytes("bomb.png")
    assert len(data) < 100_000
    with pytest.raises(ImageError, match=f"196000000 pixels.*limit is {IMAGE_MAX_PIXELS} pixels"):
        ImageFetcher(image_hosts="127.0.0.1").fetch(task(f"{cloud.url}/public/bomb.png"), "image")  # beyond Pillow's own limit
    small_bomb = bomb_png(5000, 4000)  # below Pillow's limit: our own check refuses it before decoding
    with pytest.raises(ImageError, match="5000x4000 = 20000000 pixels, more than the limit of 1000000"):
        decode_image(small_bomb, "small-bomb.png", max_pixels=1_000_000)


# ------------------------------------------------------------------------------------------------------
# Decoding: orientation and colour modes


def fetch_public(cloud: CloudStorage, name: str) -> np.ndarray:
    return ImageFetcher(image_hosts="127.0.0.1").fetch(task(f"{cloud.url}/public/{name}"), "image").array


def test_exif_orientation_is_applied(cloud: CloudStorage) -> None:
    array = fetch_public(cloud, "exif.jpg")
    assert array.shape == (40, 20, 3)  # stored 40 wide x 20 high, shown rotated
    np.testing.assert_allclose(array[5, 10], (255, 0, 0), atol=12)
    np.testing.assert_allclose(array[35, 10], (0, 0, 255), atol=12)


@pytest.mark.parametrize("name", ["exif.jpg", "rgb.png", "gray.png", "rgba.png"])
def test_size_comes_from_the_header_without_decoding(cloud: CloudStorage, name: str) -> None:
    """A click on a cached image needs its size and hash, not its pixels: fetch must not decode."""
    image = ImageFetcher(image_hosts="127.0.0.1").fetch(task(f"{cloud.url}/public/{name}"), "image")
    assert "array" not in image.__dict__, "fetch decoded the image"
    assert image.size == image.array.shape[:2]


def test_grayscale_palette_and_cmyk(cloud: CloudStorage) -> None:
    gray = fetch_public(cloud, "gray.png")
    np.testing.assert_array_equal(gray[..., 0], np.tile(np.arange(0, 256, 8, dtype=np.uint8), (8, 1)))
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    palette = fetch_public(cloud, "palette.png")
    assert (palette[:, :4] == 255).all() and (palette[:, 4:] == (0, 0, 255)).all()
    np.testing.assert_allclose(fetch_public(cloud, "cmyk.jpg"), np.full((8, 8, 3), (255, 0, 0)), atol=3)


def test_rgba_is_composited_over_white(cloud: CloudStorage) -> None:
    array = fetch_public(cloud, "rgba.png")
    assert array.shape == (4, 12, 3) and array.dtype == np.uint8
    assert (array[:, 0:4] == 255).all()  # transparent green shows the white page
    assert (array[:, 4:8] == (255, 0, 0)).all()
    assert (np.abs(array[:, 8:12].astype(int) - 127) <= 1).all()  # half-transparent black


def test_sixteen_bit_is_scaled_to_eight(cloud: CloudStorage) -> None:
    array = fetch_public(cloud, "16bit.png")
    expected = np.rint(SIXTEEN_BIT_VALUES / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(array[..., 0], expected)
    np.testing.assert_array_equal(expected, [[0, 128, 255, 4]])


@pytest.mark.parametrize(("name", "pattern"), [
    ("notes.txt", "is not an image the backend can read \\(Content-Type text/plain\\)"),
    ("login.html", "it is a web page, often a login or error page"),
    ("truncated.png", "could not be decoded"),
])
def test_not_an_image(cloud: CloudStorage, name: str, pattern: str) -> None:
    with pytest.raises(ImageError, match=pattern) as caught:
        fetch_public(cloud, name)
    assert type(caught.value) is ImageError and caught.value.status == 422


def tiff(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "TIFF")
    return buffer.getvalue()


def test_float_and_32_bit_tiff() -> None:
    fractions = np.array([[0.0, 0.5, 1.0]], np.float32)
    np.testing.assert_array_equal(decode_image(tiff(Image.fromarray(fractions, "F")), "f.tif")[..., 0], [[0, 128, 255]])
    wide = np.array([[0, 257 * 10, 65535]], np.int32)
    np.testing.assert_array_equal(decode_image(tiff(Image.fromarray(wide, "I")), "i.tif")[..., 1], [[0, 10, 255]])
    sixteen = Image.fromarray(SIXTEEN_BIT_VALUES)
    np.testing.assert_array_equal(decode_image(tiff(sixteen), "16.tif")[..., 2], [[0, 128, 255, 4]])


def test_formats_outside_the_browser_set_are_not_opened() -> None:
    """EPS would hand task data to Ghostscript; it is refused as 'not an image' instead."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto showpage\n"
    with pytest.raises(ImageError, match="not an image the backend can read. Readable formats: PNG, JPEG"):
        decode_image(eps, "drawing.eps")
