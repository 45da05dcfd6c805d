"""``Embedding``: what the image encoder made of one image, and its compact, self-describing bytes.

The byte form exists for caches shared between processes (Redis): fp16 halves the size (2 MiB for
256x64x64) at a cost far below the decoder's sensitivity, and the header lets a reader reject bytes
of another format version, another model, or a damaged payload instead of decoding garbage.

Layout (little endian)::

    magic  b"SAMEMB"  | version u16 | fingerprint 16 ascii bytes (zero padded)
    original H, W u32 | input h, w u32 | C, h, w u32 | payload length u64 | crc32 of payload u32
    payload: C*h*w float16
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

MAGIC = b"SAMEMB"
VERSION = 1
_HEADER = struct.Struct("<6sH16s7IQI")


@dataclass(frozen=True)
class Embedding:
    # (1, C, h, w) on the model's device, channels-last in memory: the decoder reads it token-major
    # (h*w tokens of C channels), so every click would otherwise start with a transposing copy.
    features: torch.Tensor
    original_size: tuple[int, int]  # (H, W) of the image given to embed()
    input_size: tuple[int, int]  # (h, w) after resizing the longest side
    fingerprint: str  # Sam.fingerprint of the model that made it

    @property
    def nbytes(self) -> int:
        """Bytes held in memory by the features (what byte-bounded caches count)."""
        return self.features.numel() * self.features.element_size()

    def to_bytes(self) -> bytes:
        _, c, h, w = self.features.shape
        payload = self.features.detach().to("cpu", torch.float16).contiguous().numpy().tobytes()
        fingerprint = self.fingerprint.encode("ascii")
        if len(fingerprint) > 16:
            raise ValueError(f"fingerprint {self.fingerprint!r} is longer than 16 characters")
        header = _HEADER.pack(MAGIC, VERSION, fingerprint, *self.original_size, *self.input_size, c, h, w,
                              len(payload), zlib.crc32(payload))
        return header + payload

    @classmethod
    def from_bytes(cls, data: bytes, device: str | torch.device | None = None) -> Embedding:
        """Decode ``to_bytes()`` output; ValueError for anything else (foreign, truncated, corrupt)."""
        data = bytes(data) if isinstance(data, (bytearray, memoryview)) else data
        if not isinstance(data, bytes):
            raise ValueError(f"embedding bytes expected, got {type(data).__name__}")
        if len(data) < _HEADER.size or not data.startswith(MAGIC):
            raise ValueError("not an embedding: the header is missing")
        magic, version, fingerprint, oh, ow, ih, iw, c, h, w, length, crc = _HEADER.unpack_from(data)
        if version != VERSION:
            raise ValueError(f"embedding format version {version} is not supported (this reader: {VERSION})")
        payload = data[_HEADER.size:]
        if length != c * h * w * 2 or len(payload) != length:
            raise ValueError(f"embedding payload is {len(payload)} bytes, the header says {c}x{h}x{w} fp16")
        if zlib.crc32(payload) != crc:
            raise ValueError("embedding payload is corrupt (checksum mismatch)")
        if min(oh, ow, ih, iw) < 1:
            raise ValueError("embedding header has an empty image size")
        array = np.frombuffer(payload, dtype=np.float16).reshape(1, c, h, w)
        features = torch.from_numpy(array.astype(np.float32)).contiguous(memory_format=torch.channels_last)
        if device is not None:
            features = features.to(device)
        return cls(features=features, original_size=(oh, ow), input_size=(ih, iw),
                   fingerprint=fingerprint.rstrip(b"\0").decode("ascii"))
