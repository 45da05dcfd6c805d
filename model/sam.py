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
    # ``encode`` is the image encoder as ``Predictor.embed`` calls it: (B, 3, S, S) input -> embedding.
    encode: Callable[[torch.Tensor], torch.Tensor]

    def __init__(self, image_encoder: nn.Module, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder,
                 image_size: int, name: str = "custom", fingerprint: str = "",
                 pixel_mean: tuple[float, ...] = PIXEL_MEAN, pixel_std: tuple[float, ...] = PIXEL_STD) -> None:
        super().__init__(image_encoder, image_size, name, fingerprint, pixel_mean, pixel_std)
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self._start_fast_paths()
