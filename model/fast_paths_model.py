"""``FastPathsModel``: what a whole model (``Sam``, ``Sam2``) does with its ``FastPaths`` policy.

One policy per model, resolved again for the model's device whenever it moves (a GPU drops the CPU-only
tricks), and handed to every module under it that reads one (``UsesFastPaths``). Kept apart from
``model.fast_paths`` because the policy itself must import without torch (the CLI's ``download`` starts fast).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from typing_extensions import Self

from model.fast_paths import FAST, FastPaths, apply


class FastPathsModel(torch.nn.Module):
    """Base of the whole models: ``fast_paths``, ``set_fast_paths``, and the policy re-applied on ``.to()``."""

    # Registered by the subclass; its device is the model's.
    pixel_mean: torch.Tensor

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
