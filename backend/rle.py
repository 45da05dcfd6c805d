"""Label Studio brush RLE: numpy masks <-> the "rle-pack" bit stream the brush tool stores.

The format (thi.ng ``rle-pack``, as Label Studio uses it) is a bit stream over the mask repeated into
four channels (RGBA, W*H*4 bytes of 0/255):

    header  count N (32 bits), word size - 1 (5 bits), four run-size classes, each size - 1 (4 bits)
    chunks  flag (1 = repeat, 0 = literal), class k (2 bits), count - 1 (sizes[k] bits),
            then one word (repeat) or count words (literal), until N values are produced
    padding zero bits to a byte boundary

``encode`` is byte-identical to the reference ``label_studio_sdk.converter.brush.mask2rle`` applied to the
0/255 uint8 form of the mask, including its quirks: runs longer than 65,536 are split into 65,536-long
repeats followed by the rest, and the padding is 1 to 8 zero bits (a whole zero byte when the stream already
ends on a byte boundary). The reference builds a Python string of '0'/'1' characters run by run; here every
step is a numpy operation over all runs at once, so a 4000x3000 mask costs milliseconds.

``decode`` reads any stream the format allows (other word sizes, other run-size classes, multi-word
literal chunks as the browser's encoder writes them), not only our own output. Chunks have data-dependent
lengths, so finding where each starts is inherently sequential; instead of walking chunk by chunk in Python
it computes, for every bit position, where a chunk starting there would end, and follows those links by
pointer doubling (``_chunk_starts``): log2(chunks) numpy passes per window of the stream.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

__all__ = ["decode", "decode_runs", "encode", "encode_array", "foreground"]

CHANNELS = 4
WORD_SIZE = 8
RUN_SIZES = (3, 4, 8, 16)
_HEADER_BITS = 32 + 5 + 4 * 4
_HEAD_BITS = 1 + 2 + 16  # a chunk's flag, size class and longest count field
_MAX_REPEAT = 1 << 16
_FOREGROUND = 255
# Bit positions examined per pointer-doubling pass of the decoder: big enough that the per-window numpy
# overhead is negligible, small enough that the jump tables (log2(window) of them) stay in cache.
_WINDOW_BITS = 1 << 16


def encode(mask: np.ndarray) -> list[int]:
    """The Label Studio brush RLE of a (H, W) mask: bool, 0/1 or 0/255 (any integer or float dtype).

    ``encode_array`` is the same as a uint8 array (what ``backend.fast_json`` writes without a loop).
    """
    return encode_array(mask).tolist()


def encode_array(mask: np.ndarray) -> np.ndarray:
    """The Label Studio brush RLE of a (H, W) mask as a uint8 array (see ``encode``).

    Foreground pixels are written as 255 in all four channels, so Label Studio's alpha channel shows them;
    the bytes equal ``mask2rle((mask != 0).astype(np.uint8) * 255)``. Raises ValueError for anything that
    is not a non-empty 2-D binary mask.
    """
    pixels = foreground(mask)
    height, width = pixels.shape
    num = height * width * CHANNELS
    if num >= 1 << 32:
        raise ValueError(f"mask of {height}x{width} pixels is too large for Label Studio RLE "
                         f"(fewer than 2**30 pixels: the value count is a 32-bit field)")
    flat = pixels.ravel()
    starts = np.concatenate(([0], np.flatnonzero(flat[1:] != flat[:-1]) + 1))
    lengths = np.diff(np.append(starts, flat.size)) * CHANNELS
    values = np.where(flat[starts], _FOREGROUND, 0)
    return _encode_runs(values, lengths, num)


def decode(rle: Sequence[int] | bytes | np.ndarray, height: int, width: int) -> np.ndarray:
    """The (height, width) bool mask of a Label Studio brush RLE: True where the alpha channel is not 0.

    Raises ValueError when ``rle`` is not a list of byte values, is truncated or corrupt, or does not
    hold exactly height * width * 4 values. Like the browser's decoder, a last chunk that runs past the
    value count is cut at the count.
    """
    for name, size in (("height", height), ("width", width)):
        if isinstance(size, bool) or not isinstance(size, int | np.integer) or size <= 0:
            raise ValueError(f"{name} must be a positive integer, got {size!r}")
    expected = int(height) * int(width) * CHANNELS
    num, run_values, run_lengths = decode_runs(rle, expected_count=expected)
    # Value i belongs to pixel i // 4; the alpha value of pixel p is value 4p + 3. A run covering values
    # [begin, end) therefore covers the alpha values of pixels [begin // 4, end // 4).
    ends = np.minimum(np.cumsum(run_lengths), num)
    begins = np.concatenate(([0], ends[:-1]))
    pixels = ends // CHANNELS - begins // CHANNELS
    alpha = np.repeat(run_values != 0, pixels)
    return alpha.reshape(int(height), int(width))


def decode_runs(rle: Sequence[int] | bytes | np.ndarray, expected_count: int | None = None
                ) -> tuple[int, np.ndarray, np.ndarray]:
    """The value count N of any rle-pack stream and its runs (values, lengths; lengths may total more
    than N when the last chunk overruns). ``np.repeat(values, lengths)[:N]`` is the decoded array.

    ``expected_count`` rejects a stream of another size before any work. Raises ValueError for bytes that
    are not a well-formed stream.
    """
    data = _as_bytes(rle)
    if data.size * 8 < _HEADER_BITS:
        raise ValueError(f"RLE is {data.size} bytes long: too short for its {_HEADER_BITS}-bit header")
    bits = _Bits(data)
    num = int(bits.read(np.array([0]), 32)[0])
    word_size = int(bits.read(np.array([32]), 5)[0]) + 1
    sizes = bits.read(37 + 4 * np.arange(4), 4).astype(np.int64) + 1
    if expected_count is not None and num != expected_count:
        raise ValueError(f"RLE holds {num} values where {expected_count} are expected "
                         f"({CHANNELS} per pixel): the size is wrong or this is not a brush RLE")
    if num == 0:
        return 0, np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)

    starts = _chunk_starts(bits, num, word_size, sizes)
    repeat, size, count = _chunk_fields(bits, starts, sizes)
    first_word = starts + 3 + size
    # Every chunk as runs: a repeat is one run of `count` values, a literal is `count` runs of one value.
    runs_per_chunk = np.where(repeat, 1, count)
    chunk_of_run = np.repeat(np.arange(starts.size), runs_per_chunk)
    first_run = np.cumsum(runs_per_chunk) - runs_per_chunk
    index_in_chunk = np.arange(chunk_of_run.size) - first_run[chunk_of_run]
    run_values = bits.read(first_word[chunk_of_run] + index_in_chunk * word_size, word_size)
    run_lengths = np.where(repeat[chunk_of_run], count[chunk_of_run], 1)
    return num, run_values, run_lengths


def foreground(mask: np.ndarray) -> np.ndarray:
    """The bool foreground of a binary (H, W) mask, or ValueError saying what is wrong with it.

    Shared by every mask output format, so brush and polygon outputs accept and reject the same masks.
    """
    if not isinstance(mask, np.ndarray):
        raise ValueError(f"mask must be a numpy array, got {type(mask).__name__}")
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (height, width), got shape {mask.shape}")
    if mask.size == 0:
        raise ValueError(f"mask has no pixels (shape {mask.shape})")
    if mask.dtype == np.bool_:
        return mask
    if not (np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating)):
        raise ValueError(f"mask must be bool or numeric, got dtype {mask.dtype}")
    selected = mask != 0
    values = mask[selected]
    if values.size and not (values.min() == values.max() and values[0] in (1, 255)):
        found = np.unique(mask)[:6].tolist()
        raise ValueError(f"mask must be binary (bool, 0/1 or 0/255), found values {found}")
    return selected


def _encode_runs(values: np.ndarray, lengths: np.ndarray, num: int) -> np.ndarray:
    """The stream bytes for runs of `values` (0-255) with `lengths` (>= 1), as the reference encodes them.

    The reference writes one chunk per run: a single value as a 1-word literal, longer runs as repeats in
    the smallest class that fits (3, 4, 8 or 16 count bits), runs over 65,536 as 65,536-long repeats then
    the rest. Each chunk here is one integer code of at most 27 bits, placed at its bit offset.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    values = np.asarray(values, dtype=np.uint64)
    long_run = lengths > 256
    if long_run.any():
        # A run over 256 is written as class-3 repeats (16-bit count field, even for a short rest):
        # ceil(length / 65536) of them, all 65,536 long but the last.
        pieces = np.where(long_run, (lengths - 1) // _MAX_REPEAT + 1, 1)
        last_piece = np.cumsum(pieces) - 1
        values = np.repeat(values, pieces)
        long_run = np.repeat(long_run, pieces)
        split = np.full(values.size, _MAX_REPEAT, dtype=np.int64)
        split[last_piece] = lengths - (pieces - 1) * _MAX_REPEAT
        lengths = split
    heads, head_bits = _chunk_heads()
    capped = np.minimum(lengths, 256)
    head = np.where(long_run, np.uint64(0b111 << 16) | (lengths - 1).astype(np.uint64), heads[capped])
    bits = np.where(long_run, 3 + RUN_SIZES[3], head_bits[capped])
    codes = head << np.uint64(WORD_SIZE) | values

    header_codes = np.array([num, WORD_SIZE - 1, _pack_sizes(RUN_SIZES)], dtype=np.uint64)
    header_bits = np.array([32, 5, 16], dtype=np.int64)
    return _pack_codes(np.concatenate((header_codes, codes)),
                       np.concatenate((header_bits, bits + WORD_SIZE)))


@functools.cache
def _chunk_heads() -> tuple[np.ndarray, np.ndarray]:
    """Flag, size class and count field the reference writes for a run of 1 to 256 values, and their bits.

    Index = run length. A single value is a literal (flag 0, class 0, count 1); longer runs are repeats in
    the smallest class whose count field holds length - 1.
    """
    length = np.arange(257, dtype=np.int64)
    size_class = (length > 8).astype(np.int64) + (length > 16) + (length > 256)
    flag = (length > 1).astype(np.int64)
    count_bits = np.asarray(RUN_SIZES, dtype=np.int64)[size_class]
    heads = ((flag << 2 | size_class) << count_bits) | np.maximum(length - 1, 0)
    return _frozen(heads.astype(np.uint64)), _frozen(3 + count_bits)


def _frozen(array: np.ndarray) -> np.ndarray:
    """A cached table shared by all threads: read-only, so no caller can corrupt it for the others."""
    array.flags.writeable = False
    return array


def _pack_sizes(sizes: Sequence[int]) -> int:
    """The 16-bit header field of the four run-size classes, each stored as size - 1 in 4 bits."""
    packed = 0
    for size in sizes:
        packed = packed << 4 | (size - 1)
    return packed


def _pack_codes(codes: np.ndarray, code_bits: np.ndarray) -> np.ndarray:
    """Concatenate variable-length codes (each at most 32 bits) into bytes, zero-padded like the reference.

    Codes go into big-endian 64-bit words: each code lies in the word of its offset, and the codes that
    cross a word boundary spill their low bits into the next word. Codes are in offset order, so the
    codes of one word are a contiguous slice and ``np.bitwise_or.reduceat`` merges them in one pass.
    """
    offsets = np.cumsum(code_bits) - code_bits
    total_bits = int(offsets[-1] + code_bits[-1])
    n_bytes = total_bits // 8 + 1  # the reference pads with 8 - total % 8 zero bits: 1 to 8
    word = offsets >> 6
    room = 64 - (offsets & 63) - code_bits  # free bits after the code in its word; < 0 when it spills
    fits = room >= 0
    head = np.where(fits, codes << np.where(fits, room, 0).astype(np.uint64),
                    codes >> np.where(fits, 0, -room).astype(np.uint64))
    words = np.zeros((total_bits >> 6) + 2, dtype=np.uint64)
    first = np.flatnonzero(np.concatenate(([True], word[1:] != word[:-1])))
    words[word[first]] = np.bitwise_or.reduceat(head, first)
    spill = np.flatnonzero(~fits)
    words[word[spill] + 1] |= codes[spill] << (64 + room[spill]).astype(np.uint64)
    return words.astype(">u8").view(np.uint8)[:n_bytes]


def _as_bytes(rle: Sequence[int] | bytes | np.ndarray) -> np.ndarray:
    """The stream as uint8, or ValueError when it is not a flat sequence of values 0-255."""
    if isinstance(rle, bytes | bytearray | memoryview):
        return np.frombuffer(bytes(rle), dtype=np.uint8)
    try:
        array = np.asarray(rle)
    except (TypeError, ValueError) as error:
        raise ValueError(f"RLE must be a list of integers 0-255: {error}") from None
    if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise ValueError(f"RLE must be a flat list of integers 0-255, got {array.dtype} of shape {array.shape}")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError("RLE must be a list of integers 0-255 (byte values)")
    return array.astype(np.uint8)


class _Bits:
    """Random access to the fields of a bit stream: the 64 bits from any bit position in one gather.

    ``words[i]`` is a big-endian uint64 view of bytes i..i+7 (an overlapping, unaligned strided view of
    the zero-padded stream), so the field at bit p is ``words[p // 8] << (p % 8)``, top-aligned.
    """

    def __init__(self, data: np.ndarray) -> None:
        self.total_bits = data.size * 8
        self.padded = np.concatenate((data, np.zeros(8, dtype=np.uint8)))
        self.words: np.ndarray = np.ndarray(shape=(data.size + 1,), dtype=">u8", buffer=self.padded, strides=(1,))

    def top(self, positions: np.ndarray) -> np.ndarray:
        """The 57 or more bits from each position, top-aligned in uint64 (only 57 are guaranteed)."""
        positions = np.asarray(positions, dtype=np.int64)
        return self.words[positions >> 3].astype(np.uint64) << (positions & 7).astype(np.uint64)

    def read(self, positions: np.ndarray, bits: int) -> np.ndarray:
        """The unsigned `bits`-bit (1-32) field at each position (zeros past the end)."""
        return self.top(positions) >> np.uint64(64 - bits)


@functools.lru_cache(maxsize=8)
def _chunk_table(word_size: int, sizes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Chunk length in bits and value count for every possible 19-bit chunk head (flag, class, count).

    A chunk's length depends only on its first 3 + 16 bits, so one table lookup replaces the shifts and
    masks per bit position the decoder would otherwise do.
    """
    head = np.arange(1 << _HEAD_BITS, dtype=np.int64)
    repeat = (head >> (_HEAD_BITS - 1)) & 1
    size = np.asarray(sizes, dtype=np.int64)[(head >> (_HEAD_BITS - 3)) & 3]
    count = ((head >> (_HEAD_BITS - 3 - size)) & ((1 << size) - 1)) + 1
    length = 3 + size + np.where(repeat == 1, word_size, count * word_size)
    return _frozen(length.astype(np.int32)), _frozen(count.astype(np.int32))


def _chunk_fields(bits: _Bits, positions: np.ndarray, sizes: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Of a chunk starting at each position: is it a repeat, its count field's bits, its value count."""
    head = (bits.top(positions) >> np.uint64(64 - _HEAD_BITS)).astype(np.int64)
    repeat = (head >> (_HEAD_BITS - 1)).astype(bool)
    size = sizes[(head >> (_HEAD_BITS - 3)) & 3]
    count = ((head >> (_HEAD_BITS - 3 - size)) & ((1 << size) - 1)) + 1
    return repeat, size, count


def _chunk_starts(bits: _Bits, num: int, word_size: int, sizes: np.ndarray) -> np.ndarray:
    """Bit positions of the chunks that produce the stream's `num` values, in order.

    Where the next chunk starts depends on the current one, so the chain of starts is found per window
    of bits by pointer doubling: jump[0][p] is where a chunk starting at p would end (or "outside"),
    jump[k] = jump[k-1] applied twice; expanding from the window's first chunk start through the tables
    from the coarsest down yields every start in the window. Raises ValueError for a truncated stream.
    """
    table_length, table_count = _chunk_table(word_size, tuple(int(size) for size in sizes))
    min_chunk = 3 + int(sizes.min()) + word_size
    total_bits = bits.total_bits
    found: list[np.ndarray] = []
    produced = 0
    entry = _HEADER_BITS
    while produced < num:
        if entry >= total_bits:
            raise ValueError(f"RLE is truncated: it ends after {produced} of its {num} values")
        span = min(_WINDOW_BITS, total_bits - entry)
        local = np.arange(span, dtype=np.intp)
        head = (bits.top(entry + local) >> np.uint64(64 - _HEAD_BITS)).astype(np.intp)
        lengths = table_length[head]
        outside = np.intp(span)
        jump = np.empty(span + 1, dtype=np.intp)
        np.minimum(local + np.minimum(lengths, outside), outside, out=jump[:span])
        jump[span] = outside  # "outside" maps to itself
        levels = max(1, int(np.ceil(np.log2(span / min_chunk + 1))))
        tables: list[np.ndarray] = [jump]
        for _ in range(levels - 1):
            tables.append(tables[-1][tables[-1]])
        chain: np.ndarray = np.zeros(1, dtype=np.intp)
        for table in reversed(tables):
            chain = np.stack((chain, table[chain]), axis=1).ravel()
        chain = chain[chain < outside]
        produced_here = np.cumsum(table_count[head[chain]], dtype=np.int64)
        done = int(np.searchsorted(produced_here, num - produced))  # the chunk reaching num, if here
        if done < chain.size:
            chain = chain[:done + 1]
            produced = num
        else:
            produced += int(produced_here[-1])
        found.append(entry + chain.astype(np.int64))
        last = int(chain[-1])
        entry = entry + last + int(lengths[last])
    if entry > total_bits:
        raise ValueError(f"RLE is truncated: its last chunk needs {entry} bits, the stream has {total_bits}")
    return np.concatenate(found)
