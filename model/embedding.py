"""``Embedding``: what the image encoder made of one image, and its compact, self-describing bytes.

The byte form exists for caches shared between processes (Redis): fp16 halves the size (2 MiB for
256x64x64) at a cost far below the decoder's sensitivity, and the header lets a reader reject bytes
of another format version, another model, or a damaged payload instead of decoding garbage.

Layout (little endian), version 1 (SAM: one feature map; still written for it, so that older readers
sharing a cache keep reading SAM embeddings)::

    magic  b"SAMEMB"  | version u16 | fingerprint 16 ascii bytes (zero padded)
    original H, W u32 | input h, w u32 | C, h, w u32 | payload length u64 | crc32 of payload u32
    payload: C*h*w float16

Version 2 (SAM 2: the embedding and its high-resolution feature maps)::

    magic  b"SAMEMB"  | version u16 | fingerprint 16 ascii bytes (zero padded)
    original H, W u32 | input h, w u32 | tensor count n u32 | payload length u64 | crc32 of payload u32
    n x (C, h, w) u32: the embedding first, then the high-resolution maps
    payload: the n tensors as float16, one after the other
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, replace

import numpy as np
import torch

MAGIC = b"SAMEMB"
VERSION = 1
VERSION_HIGH_RES = 2
_HEADER = struct.Struct("<6sH16s7IQI")
_HEADER_V2 = struct.Struct("<6sH16s5IQI")
_SHAPE = struct.Struct("<3I")


@dataclass(frozen=True)
class Embedding:
    # (1, C, h, w) on the model's device, channels-last in memory: the decoder reads it token-major
    # (h*w tokens of C channels), so every click would otherwise start with a transposing copy.
    features: torch.Tensor
    original_size: tuple[int, int]  # (H, W) of the image given to embed()
    input_size: tuple[int, int]  # (h, w) after resizing the longest side
    fingerprint: str  # Sam.fingerprint of the model that made it
    # SAM 2 only: the decoder's high-resolution inputs, (1, C/8, 4h, 4w) and (1, C/4, 2h, 2w), channels-last.
    high_res: tuple[torch.Tensor, ...] = ()

    @property
    def nbytes(self) -> int:
        """Bytes held in memory by the features (what byte-bounded caches count)."""
        return sum(t.numel() * t.element_size() for t in (self.features, *self.high_res))

    def at_stored_precision(self) -> Embedding:
        """This embedding with the values ``from_bytes(to_bytes())`` would give: fp16-rounded, fp32, channels-last.

        A cache that serves some readers from the bytes (another process, after a restart) and some from the
        computed tensors hands every reader this form, so that one image gives one mask everywhere.
        """
        return replace(self, features=_stored(self.features), high_res=tuple(_stored(t) for t in self.high_res))

    def to_bytes(self) -> bytes:
        fingerprint = self.fingerprint.encode("ascii")
        if len(fingerprint) > 16:
            raise ValueError(f"fingerprint {self.fingerprint!r} is longer than 16 characters")
        if self.high_res:
            return self._to_bytes_v2(fingerprint)
        _, c, h, w = self.features.shape
        payload = self.features.detach().to("cpu", torch.float16).contiguous().numpy().tobytes()
        header = _HEADER.pack(MAGIC, VERSION, fingerprint, *self.original_size, *self.input_size, c, h, w,
                              len(payload), zlib.crc32(payload))
        return header + payload

    def _to_bytes_v2(self, fingerprint: bytes) -> bytes:
        tensors = (self.features, *self.high_res)
        shapes = b"".join(_SHAPE.pack(*t.shape[1:]) for t in tensors)
        payload = b"".join(t.detach().to("cpu", torch.float16).contiguous().numpy().tobytes() for t in tensors)
        header = _HEADER_V2.pack(MAGIC, VERSION_HIGH_RES, fingerprint, *self.original_size, *self.input_size,
                                 len(tensors), len(payload), zlib.crc32(payload))
        return header + shapes + payload

    @classmethod
    def from_bytes(cls, data: bytes, device: str | torch.device | None = None) -> Embedding:
        """Decode ``to_bytes()`` output; ValueError for anything else (foreign, truncated, corrupt)."""
        data = bytes(data) if isinstance(data, (bytearray, memoryview)) else data
        if not isinstance(data, bytes):
            raise ValueError(f"embedding bytes expected, got {type(data).__name__}")
        if len(data) < _HEADER.size or not data.startswith(MAGIC):
            raise ValueError("not an embedding: the header is missing")
        version = struct.unpack_from("<H", data, len(MAGIC))[0]
        if version == VERSION_HIGH_RES:
            return cls._from_bytes_v2(data, device)
        if version != VERSION:
            raise ValueError(f"embedding format version {version} is not supported "
                             f"(this reader: {VERSION}, {VERSION_HIGH_RES})")
        magic, version, fingerprint, oh, ow, ih, iw, c, h, w, length, crc = _HEADER.unpack_from(data)
        payload = data[_HEADER.size:]
        if length != c * h * w * 2 or len(payload) != length:
            raise ValueError(f"embedding payload is {len(payload)} bytes, the header says {c}x{h}x{w} fp16")
        if zlib.crc32(payload) != crc:
            raise ValueError("embedding payload is corrupt (checksum mismatch)")
        if min(oh, ow, ih, iw) < 1:
            raise ValueError("embedding header has an empty image size")
        return cls(features=_tensor(payload, (c, h, w), device), original_size=(oh, ow), input_size=(ih, iw),
                   fingerprint=fingerprint.rstrip(b"\0").decode("ascii"))

    @classmethod
    def _from_bytes_v2(cls, data: bytes, device: str | torch.device | None) -> Embedding:
        if len(data) < _HEADER_V2.size:
            raise ValueError("not an embedding: the header is missing")
        _, _, fingerprint, oh, ow, ih, iw, count, length, crc = _HEADER_V2.unpack_from(data)
        if not 1 <= count <= 8 or len(data) < _HEADER_V2.size + count * _SHAPE.size:
            raise ValueError(f"embedding header is damaged ({count} tensors)")
        shapes = [_SHAPE.unpack_from(data, _HEADER_V2.size + i * _SHAPE.size) for i in range(count)]
        payload = data[_HEADER_V2.size + count * _SHAPE.size:]
        sizes = [2 * c * h * w for c, h, w in shapes]
        if length != sum(sizes) or len(payload) != length:
            raise ValueError(f"embedding payload is {len(payload)} bytes, the header says {shapes} fp16")
        if zlib.crc32(payload) != crc:
            raise ValueError("embedding payload is corrupt (checksum mismatch)")
        if min(oh, ow, ih, iw) < 1:
            raise ValueError("embedding header has an empty image size")
        offsets = np.cumsum([0, *sizes])
        tensors = [_tensor(payload[offsets[i]:offsets[i + 1]], shape, device) for i, shape in enumerate(shapes)]
        return cls(features=tensors[0], original_size=(oh, ow), input_size=(ih, iw),
                   fingerprint=fingerprint.rstrip(b"\0").decode("ascii"), high_res=tuple(tensors[1:]))


def _tensor(payload: bytes, shape: tuple[int, int, int], device: str | torch.device | None) -> torch.Tensor:
    """fp16 bytes of one (C, h, w) map -> (1, C, h, w) float32, channels-last, on ``device``."""
    array = np.frombuffer(payload, dtype=np.float16).reshape(1, *shape)
    tensor = torch.from_numpy(array.astype(np.float32)).contiguous(memory_format=torch.channels_last)
    return tensor if device is None else tensor.to(device)


def _stored(tensor: torch.Tensor) -> torch.Tensor:
    """A map as ``_tensor`` reads it back from the bytes: rounded to fp16, then fp32, channels-last."""
    rounded = tensor.detach().to(torch.float16).to(torch.float32)
    return rounded.contiguous(memory_format=torch.channels_last)
