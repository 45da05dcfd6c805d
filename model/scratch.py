"""Reusable scratch tensors for the full-size logits of a click, which live only until they are thresholded.

A click's mask is made as float logits at the original image size and then thresholded; the logits are
thrown away at once. At 4000x3000 they are 48 MB, above glibc's largest mmap threshold (32 MiB), so every
click got fresh pages from the kernel and faulted in all 12,000 of them while the resize wrote them: the
resize to 4000x3000 took 68 ms on fresh memory and 35 ms into a reused tensor (one thread, Intel Xeon), the
same numbers either way. ``ScratchTensors`` keeps a few such tensors for the next click instead.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

import torch

# The most bytes kept between clicks: two 12-megapixel logit maps (one per decode slot of a 2-core machine)
# with room to spare, small beside the embedding cache.
DEFAULT_MAX_BYTES = 256 << 20


class ScratchTensors:
    """A pool of float32 tensors handed out one per user at a time and kept for reuse up to ``max_bytes``.

    Thread-safe: concurrent decodes each get a tensor of their own. A tensor is only kept if it fits the
    budget beside the others; the largest are dropped first, so a rare huge image does not pin its memory.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def take(self, shape: tuple[int, ...], device: torch.device) -> Iterator[torch.Tensor]:
        """A float32 tensor of ``shape`` on ``device`` (contents undefined) for the duration of the block."""
        numel = math.prod(shape)
        buffer = self._pop(numel, device)
        if buffer is None:
            buffer = torch.empty(numel, dtype=torch.float32, device=device)
        try:
            yield buffer[:numel].view(shape)
        finally:
            self._push(buffer)

    @property
    def kept_bytes(self) -> int:
        with self._lock:
            return self._kept_bytes()

    def _kept_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._free)

    def _pop(self, numel: int, device: torch.device) -> torch.Tensor | None:
        with self._lock:
            # The smallest that fits (the list is kept sorted by size): big ones stay for big images. By
            # index, never list.remove, which would compare tensors element by element.
            for index, tensor in enumerate(self._free):
                if tensor.numel() >= numel and tensor.device == device:
                    return self._free.pop(index)
            return None

    def _push(self, buffer: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buffer)
            self._free.sort(key=torch.Tensor.numel)
            while self._free and self._kept_bytes() > self.max_bytes:
                self._free.pop()  # the largest
