"""Refinement: a click that adds to an earlier click's prompts starts from that answer's mask logits.

Meta's predictor refines iteratively: after each click it feeds the best low-res logits of the previous round
back as ``mask_input`` with the grown list of points, so a second (or negative) click corrects the mask it sees
instead of starting over. Label Studio does not keep that state: with every click it resends all the
interaction's regions (same tool, same label). This store keeps it on the backend side.

Keys are exact and safe: the model's fingerprint, the image's sha256, and the prompt itself (label, tool,
every point coordinate and polarity in order, the box), hashed. An answer is reused only for a prompt that
*extends* it: the same box and label, and the earlier points as the first points of the new ones. Anything
else (another image, model, label, a moved or removed point) finds nothing and is predicted from scratch, so
a stale entry can never leak into another object. Memory is bounded by bytes (an LRU over 256x256 float32
logits, 256 KiB each); entries can be dropped per task (the interactive flow's ``release`` event).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from backend.lru import SizedLRU
from backend.prompts import ObjectPrompt


@dataclass(frozen=True)
class _Entry:
    logits: np.ndarray  # (h, w) float32 low-res logits of the answer
    task: str  # the task it was made for: what ``release`` drops


class Refinements:
    """A byte-bounded LRU of the low-res logits of recent answers, keyed by (model, image, exact prompt)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._entries: SizedLRU[bytes, _Entry] = SizedLRU(max_bytes, size=lambda entry: entry.logits.nbytes)

    @property
    def nbytes(self) -> int:
        return self._entries.total

    def __len__(self) -> int:
        return len(self._entries)

    def earlier(self, fingerprint: str, image_sha256: str, prompt: ObjectPrompt) -> np.ndarray | None:
        """The logits of the longest earlier prompt this one extends (a proper prefix of its points), or None."""
        n = len(prompt.points)
        shortest = 0 if prompt.box is not None else 1  # a box alone is a prompt; no points and no box is not
        for k in range(n - 1, shortest - 1, -1):
            entry = self._entries.get(_key(fingerprint, image_sha256, prompt, k))
            if entry is not None:
                return entry.logits
        return None

    def remember(self, fingerprint: str, image_sha256: str, prompt: ObjectPrompt, logits: np.ndarray,
                 task: object = None) -> None:
        """Keep ``logits`` (h, w) as the answer to ``prompt``; the least recently used go past the budget."""
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        if logits.ndim != 2:
            return
        self._entries.put(_key(fingerprint, image_sha256, prompt, len(prompt.points)),
                          _Entry(logits=logits, task=str(task)))

    def release(self, task: object) -> int:
        """Drop every entry made for ``task``; returns how many."""
        name = str(task)
        return self._entries.pop_where(lambda _key, entry: entry.task == name)


def _key(fingerprint: str, image_sha256: str, prompt: ObjectPrompt, n_points: int) -> bytes:
    """The hash of (model, image, the prompt with its first ``n_points`` points): unambiguous, fixed size."""
    digest = hashlib.sha256()
    for text in (fingerprint, image_sha256, prompt.label, prompt.from_name):
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(4, "little") + encoded)
    digest.update(n_points.to_bytes(4, "little"))
    digest.update(np.ascontiguousarray(prompt.points[:n_points], dtype=np.float32).tobytes())
    digest.update(np.ascontiguousarray(prompt.point_labels[:n_points], dtype=np.int32).tobytes())
    if prompt.box is None:
        digest.update(b"\x00")
    else:
        digest.update(b"\x01" + np.ascontiguousarray(prompt.box, dtype=np.float32).tobytes())
    return digest.digest()
