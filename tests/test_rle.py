"""Brush RLE against Label Studio's own SDK: byte-identical encoding, decoding of any rle-pack stream.

The oracle is ``label_studio_sdk.converter.brush`` (mask2rle / encode_rle / decode_rle), the code Label
Studio's exporters use. Masks come from seeded numpy generators: blobs with ragged edges, noise, stripes,
checkerboards, and the edge cases the format has (runs over 65,536 values, single pixels at either end).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, encode_rle, mask2rle

from backend import rle


def sdk_encode(mask: np.ndarray) -> list[int]:
    """What Label Studio's SDK writes for the mask, in the 0/255 form the browser shows."""
    return mask2rle((np.asarray(mask) != 0).astype(np.uint8) * 255)


def sdk_decode(data: list[int], height: int, width: int) -> np.ndarray:
    return decode_rle(data).reshape(height, width, 4)[:, :, 3] != 0


def blobs(rng: np.random.Generator, height: int, width: int, count: int = 3) -> np.ndarray:
    """A few filled polygons with jittered radii: object-like masks with ragged edges."""
    canvas = np.zeros((height, width), np.uint8)
    for _ in range(count):
        centre = rng.uniform((0, 0), (width, height))
        radius = rng.uniform(0.1, 0.5) * min(height, width)
        angles = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        radii = radius * (1 + 0.25 * rng.standard_normal(96).cumsum() / 10) * rng.uniform(0.9, 1.1, 96)
        points = np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], 1)
        cv2.fillPoly(canvas, [np.round(points).astype(np.int32)], 1)
    return canvas.astype(bool)


def pattern(kind: str, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    rows, cols = np.indices((height, width))
    if kind == "blobs":
        return blobs(rng, height, width, int(rng.integers(1, 5)))
    if kind == "noise":
        return rng.random((height, width)) < rng.uniform(0.05, 0.95)
    if kind == "hstripes":
        return (rows // int(rng.integers(1, 6))) % 2 == 0
    if kind == "vstripes":
        return (cols // int(rng.integers(1, 6))) % 2 == 0
    if kind == "checker":
        cell = int(rng.integers(1, 4))
        return (rows // cell + cols // cell) % 2 == 1
    raise AssertionError(kind)


KINDS = ("blobs", "noise", "hstripes", "vstripes", "checker")


@pytest.mark.parametrize("kind", KINDS)
def test_encode_is_byte_identical_to_the_sdk_on_random_masks(kind: str) -> None:
    rng = np.random.default_rng(sum(map(ord, kind)))
    for _ in range(12):
        height, width = (int(v) for v in rng.integers(1, 160, size=2))
        mask = pattern(kind, rng, height, width)
        expected = sdk_encode(mask)
        assert rle.encode(mask) == expected, (kind, height, width)
        assert np.array_equal(rle.decode(expected, height, width), mask)


def test_encode_is_byte_identical_on_a_medium_noise_mask_spanning_many_decoder_windows() -> None:
    mask = np.random.default_rng(1).random((240, 320)) < 0.5  # ~38,000 runs, ~540,000 bits
    expected = sdk_encode(mask)
    assert rle.encode(mask) == expected
    assert np.array_equal(rle.decode(expected, 240, 320), mask)


def test_encode_and_decode_a_large_object_mask() -> None:
    mask = blobs(np.random.default_rng(2), 1500, 2000, count=5)
    encoded = rle.encode(mask)
    assert encoded == sdk_encode(mask)
    assert np.array_equal(rle.decode(encoded, 1500, 2000), mask)
    assert np.array_equal(sdk_decode(encoded, 1500, 2000), mask)


@pytest.mark.parametrize(("height", "width"), [(1, 1), (1, 17), (23, 1), (7, 13), (1, 70_000), (300, 301)])
def test_edge_masks_of_odd_sizes(height: int, width: int) -> None:
    rng = np.random.default_rng(height * 1000 + width)
    empty = np.zeros((height, width), bool)
    full = np.ones((height, width), bool)
    first, last, middle = empty.copy(), empty.copy(), empty.copy()
    first[0, 0] = True
    last[-1, -1] = True
    middle[height // 2, width // 2] = True
    for mask in (empty, full, first, last, middle, ~first, ~last, rng.random((height, width)) < 0.5):
        encoded = rle.encode(mask)
        assert encoded == sdk_encode(mask)
        assert np.array_equal(rle.decode(encoded, height, width), mask)
        if mask.size <= 100_000:
            assert np.array_equal(sdk_decode(encoded, height, width), mask)


@pytest.mark.parametrize("run_pixels", [64, 65, 16_383, 16_384, 16_385, 32_768, 32_769, 50_000])
def test_runs_around_the_65536_value_split(run_pixels: int) -> None:
    """A run of p pixels is 4p values: 16,384 pixels is exactly one 65,536-value repeat."""
    width = 97
    mask = np.zeros(run_pixels + 2 * width, bool)
    mask[width:width + run_pixels] = True
    mask = np.pad(mask, (0, -mask.size % width)).reshape(-1, width)
    encoded = rle.encode(mask)
    assert encoded == sdk_encode(mask)
    assert np.array_equal(rle.decode(encoded, *mask.shape), mask)
    assert np.array_equal(sdk_decode(encoded, *mask.shape), mask)


@pytest.mark.parametrize(("dtype", "on"), [(np.bool_, True), (np.uint8, 1), (np.uint8, 255), (np.int32, 1),
                                         (np.int64, 255), (np.float32, 1), (np.float64, 255)])
def test_binary_masks_of_any_dtype_encode_as_0_255(dtype: type, on: int) -> None:
    mask = blobs(np.random.default_rng(3), 40, 50)
    typed = (mask * on).astype(dtype)
    assert rle.encode(typed) == sdk_encode(mask)


def test_the_general_run_encoder_matches_the_sdk_including_single_value_literals() -> None:
    """Brush masks never have single values (4 channels), but the chunk writer handles them like the SDK."""
    rng = np.random.default_rng(4)
    for _ in range(40):
        values = rng.integers(0, 256, int(rng.integers(1, 300))).astype(np.uint8)
        array = np.repeat(values, rng.choice([1, 1, 2, 9, 17, 300, 70_000], values.size))
        starts = np.concatenate(([0], np.flatnonzero(array[1:] != array[:-1]) + 1))
        lengths = np.diff(np.append(starts, array.size))
        expected = encode_rle(array)
        assert rle._encode_runs(array[starts], lengths, array.size).tolist() == expected
        num, run_values, run_lengths = rle.decode_runs(expected)
        assert num == array.size
        assert np.array_equal(np.repeat(run_values, run_lengths)[:num], array)


class BitWriter:
    """A plain rle-pack writer for tests: any word size, any run-size classes, multi-word literals."""

    def __init__(self) -> None:
        self.bits: list[str] = []

    def write(self, value: int, size: int) -> None:
        self.bits.append(format(value, f"0{size}b"))

    def to_bytes(self, pad: int = 0) -> list[int]:
        stream = "".join(self.bits)
        stream += "0" * ((-len(stream)) % 8 + 8 * pad)
        return [int(stream[i:i + 8], 2) for i in range(0, len(stream), 8)]


def random_stream(rng: np.random.Generator, word_size: int, sizes: list[int], num: int
                  ) -> tuple[list[int], np.ndarray]:
    """A valid stream of `num` values written with random repeat and literal chunks, and those values."""
    writer = BitWriter()
    writer.write(num, 32)
    writer.write(word_size - 1, 5)
    for size in sizes:
        writer.write(size - 1, 4)
    values: list[np.ndarray] = []
    produced = 0
    while produced < num:
        k = int(rng.integers(4))
        count = int(rng.integers(1, min(1 << sizes[k], num - produced) + 1))
        writer.write(int(rng.integers(2)), 1)
        repeat = writer.bits[-1] == "1"
        writer.write(k, 2)
        writer.write(count - 1, sizes[k])
        words = rng.integers(0, 1 << word_size, 1 if repeat else count)
        for word in words:
            writer.write(int(word), word_size)
        values.append(np.repeat(words, count) if repeat else words)
        produced += count
    return writer.to_bytes(), np.concatenate(values)


def test_decode_reads_streams_the_sdk_encoder_never_writes() -> None:
    """Other word sizes and size classes and multi-word literals (the browser's encoder writes these)."""
    rng = np.random.default_rng(5)
    for trial in range(60):
        word_size = int(rng.integers(1, 9))
        sizes = [int(s) for s in rng.integers(1, 17, 4)]
        num = int(rng.integers(1, 3000)) if trial else 1
        data, expected = random_stream(rng, word_size, sizes, num)
        got_num, run_values, run_lengths = rle.decode_runs(data)
        decoded = np.repeat(run_values, run_lengths)[:got_num]
        assert got_num == num
        assert np.array_equal(decoded, expected), (word_size, sizes)
        assert np.array_equal(decode_rle(data), expected.astype(np.uint8))


def test_decode_handles_a_literal_chunk_longer_than_a_decoder_window() -> None:
    writer = BitWriter()
    for value, size in ((4 * 65_536, 32), (7, 5), (15, 4), (15, 4), (15, 4), (15, 4)):
        writer.write(value, size)
    rng = np.random.default_rng(6)
    alpha = rng.random(65_536) < 0.5
    pixels = np.repeat(np.where(alpha, 255, 0), 4)
    for start in range(0, pixels.size, 65_536):  # four literal chunks of 65,536 words each
        writer.write(0, 1)
        writer.write(3, 2)
        writer.write(65_535, 16)
        for word in pixels[start:start + 65_536]:
            writer.write(int(word), 8)
    assert np.array_equal(rle.decode(writer.to_bytes(), 256, 256), alpha.reshape(256, 256))


def test_decode_cuts_a_last_chunk_that_runs_past_the_count_like_the_browser() -> None:
    writer = BitWriter()
    for value, size in ((8, 32), (7, 5), (2, 4), (3, 4), (7, 4), (15, 4)):
        writer.write(value, size)
    writer.write(0b1_10, 3)  # repeat, class 2 (8 bits): 200 values of 255 where 8 remain
    writer.write(199, 8)
    writer.write(255, 8)
    data = writer.to_bytes()
    assert np.array_equal(rle.decode(data, 1, 2), np.ones((1, 2), bool))
    assert np.array_equal(decode_rle(data), np.full(8, 255, np.uint8))


def test_decode_accepts_bytes_and_numpy_arrays() -> None:
    mask = blobs(np.random.default_rng(7), 30, 40)
    encoded = rle.encode(mask)
    for form in (bytes(encoded), np.array(encoded, np.uint8), np.array(encoded, np.int64), tuple(encoded)):
        assert np.array_equal(rle.decode(form, 30, 40), mask)


@pytest.mark.parametrize(("mask", "message"), [
    (np.zeros((2, 3, 4), bool), "2-D"),
    (np.zeros((0, 5), bool), "no pixels"),
    (np.array([[0, 1, 2]], np.uint8), "binary"),
    (np.array([[0, 1, 255]], np.uint8), "binary"),
    (np.array([[0.0, 0.5]], np.float32), "binary"),
    (np.array([["a", "b"]]), "bool or numeric"),
    ([[0, 1]], "numpy array"),
])
def test_encode_rejects_what_is_not_a_binary_mask(mask: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rle.encode(mask)  # type: ignore[arg-type]


def test_decode_rejects_corrupt_or_mismatched_streams() -> None:
    mask = np.random.default_rng(8).random((20, 30)) < 0.5
    encoded = rle.encode(mask)
    with pytest.raises(ValueError, match="expected"):
        rle.decode(encoded, 30, 20 + 1)
    with pytest.raises(ValueError, match="truncated"):
        rle.decode(encoded[: len(encoded) // 2], 20, 30)
    with pytest.raises(ValueError, match="truncated"):
        rle.decode(encoded[:-3], 20, 30)
    with pytest.raises(ValueError, match="header"):
        rle.decode(encoded[:5], 20, 30)
    with pytest.raises(ValueError, match="0-255"):
        rle.decode([*encoded[:-1], 256], 20, 30)
    with pytest.raises(ValueError, match="0-255"):
        rle.decode([0.5, 1.5], 20, 30)
    with pytest.raises(ValueError, match="0-255"):
        rle.decode("not an rle", 20, 30)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="0-255"):
        rle.decode([[1, 2], [3, 4]], 20, 30)
    with pytest.raises(ValueError, match="width"):
        rle.decode(encoded, 20, 0)
    with pytest.raises(ValueError, match="height"):
        rle.decode(encoded, 2.5, 30)  # type: ignore[arg-type]
