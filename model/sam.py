"""``Sam``: the image encoder, prompt encoder and mask decoder of one checkpoint, plus its identity.

Built by ``model.checkpoint.load``; state-dict keys match Meta's ``Sam`` (pixel mean/std are not
saved, as in Meta's code).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from model.fast_paths_model import FastPathsModel
from model.mask_decoder import MaskDecoder
from model.prompt_encoder import PromptEncoder

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class Sam(FastPathsModel):
    mask_threshold: float = 0.0
    # Buffers (registered in __init__) and the encoder entry point kept in __dict__: declared here, since
    # nn.Module's __getattr__ would type them as "Tensor | Module".
    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor
    encode: Callable[[torch.Tensor], torch.Tensor]

    def __init__(self, image_encoder: nn.Module, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder,
                 image_size: int, name: str = "custom", fingerprint: str = "",
                 pixel_mean: tuple[float, ...] = PIXEL_MEAN, pixel_std: tuple[float, ...] = PIXEL_STD) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)
        self.image_size = image_size
        self.name = name
        self.fingerprint = fingerprint
        self.dtype: torch.dtype | None = None
        # What embed() calls: the encoder itself, or its torch.compile wrapper. Kept outside the module
        # tree so the state dict keeps Meta's key names.
        self.__dict__["encode"] = image_encoder
        self._start_fast_paths()

    def __repr__(self) -> str:
        dtype = "fp32" if self.dtype is None else str(self.dtype).removeprefix("torch.")
        return f"Sam(name={self.name!r}, fingerprint={self.fingerprint!r}, device={self.device}, dtype={dtype})"
