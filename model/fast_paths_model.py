"""``FastPathsModel``: what every whole model (``Sam``, ``Sam2``) is besides its modules.

Its identity (name, checkpoint fingerprint, input size, autocast dtype), its input normalisation, the encoder
entry point ``embed()`` calls, and its ``FastPaths`` policy: one policy per model, resolved again for the
model's device whenever it moves (a GPU drops the CPU-only tricks), and handed to every module under it that
reads one (``UsesFastPaths``). One home for these, so the two model families cannot drift apart in what
``model.checkpoint`` and the backend read off a model. Kept apart from ``model.fast_paths`` because the
policy itself must import without torch (the CLI's ``download`` starts fast).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from typing_extensions import Self

from model.fast_paths import FAST, FastPaths, apply


class FastPathsModel(torch.nn.Module):
    """Base of the whole models: identity, normalisation, ``encode``, and the fast-paths policy.

    The subclass calls ``super().__init__`` first (which registers ``image_encoder`` as the first child, as
    Meta's models do), adds its own modules, and ends with ``_start_fast_paths()``.
    """

    mask_threshold: float = 0.0
    # Buffers and the encoder entry point kept in __dict__: declared here, since nn.Module's __getattr__
    # would type them as "Tensor | Module". The pixel mean's device is the model's.
    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor
    encode: Callable[..., Any]

    def __init__(self, image_encoder: torch.nn.Module, image_size: int, name: str, fingerprint: str,
                 pixel_mean: tuple[float, ...], pixel_std: tuple[float, ...]) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        # Not saved (persistent=False): state-dict keys stay Meta's, which do not hold them either.
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)
        self.image_size = image_size
        self.name = name
        self.fingerprint = fingerprint
        self.dtype: torch.dtype | None = None  # autocast dtype (model.checkpoint sets it); None: fp32
        # What embed() calls: the image encoder, or its torch.compile wrapper (model.checkpoint). Kept outside
        # the module tree so the state dict keeps Meta's key names.
        self.__dict__["encode"] = image_encoder

    def __repr__(self) -> str:
        dtype = "fp32" if self.dtype is None else str(self.dtype).removeprefix("torch.")
        return (f"{type(self).__name__}(name={self.name!r}, fingerprint={self.fingerprint!r}, device={self.device}, "
                f"dtype={dtype})")

    def _start_fast_paths(self) -> None:
        """``FAST`` until set; called at the end of the subclass's ``__init__``, once its buffers exist."""
        self._policy = FAST
        self._fast_paths = apply(self, FAST, self.device)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def fast_paths(self) -> FastPaths:
        """The speed tricks in force: the policy last set, as it applies on this model's device."""
        return self._fast_paths

    def set_fast_paths(self, policy: FastPaths) -> None:
        """Use ``policy`` (``model.FAST``, ``model.REFERENCE`` or any ``FastPaths``) from now on.

        Every module with a fast path reads the policy resolved for the model's device; moving the model
        to another device resolves it again. Set it before the model serves, not while other threads run it.
        """
        self._policy = policy
        self._fast_paths = apply(self, policy, self.device)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Self:
        """What every ``to()`` / ``cuda()`` / ``cpu()`` goes through: re-decide the device-dependent paths."""
        module = super()._apply(fn, recurse)
        self.set_fast_paths(self._policy)
        return module
