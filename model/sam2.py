"""``Sam2``: the image path of a SAM 2 / SAM 2.1 checkpoint (encoder, prompt encoder, mask decoder), plus
SAM 2's own pre- and post-processing. Built by ``model.load`` (see ``model.sam2_checkpoint``).

State-dict keys are Meta's ``SAM2Base`` keys of the image path: ``image_encoder.*``, ``sam_prompt_encoder.*``,
``sam_mask_decoder.*`` and ``no_mem_embed``. The video-memory modules of the checkpoint are not built.

SAM 2's image predictor differs from SAM's around the networks, and ``Predictor`` follows it through the
methods here:

* preprocessing: the image is resized to the square input (``image_size`` x ``image_size``) without
  keeping its aspect ratio (bilinear with antialiasing on [0, 1] floats, as torchvision's ``Resize`` on a
  tensor), then normalised with the ImageNet mean and std; there is no padding;
* prompts: coordinates are divided by the original width / height and multiplied by ``image_size``, in
  float32 as Meta does;
* the encoder's output is three maps: the stride-16 image embedding with ``no_mem_embed`` added (the
  "no memory" state of an image), and the stride-4 / stride-8 features projected by the decoder's
  ``conv_s0`` / ``conv_s1``;
* postprocessing: the low-res logits are resized bilinearly straight to the original size. Meta's
  optional hole filling / sprinkle removal is off by default in its image predictor (and needs a CUDA
  extension), so it is not done here. The low-res logits handed back are clamped to [-32, 32], as Meta's are.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import edge_masks
from model.fast_paths_model import FastPathsModel
from model.sam2_image_encoder import ImageEncoder
from model.sam2_mask_decoder import Sam2MaskDecoder
from model.sam2_prompt_encoder import Sam2PromptEncoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LOW_RES_CLAMP = 32.0


class Sam2(FastPathsModel):
    # ``encode`` is ``ImageEncoder.forward`` as ``encode_image`` calls it:
    # (x, s0 weight, s0 bias, s1 weight, s1 bias, no_mem_embed) -> [s0, s1, embedding].
    encode: Callable[[Tensor, Tensor, Tensor | None, Tensor, Tensor | None, Tensor], list[Tensor]]

    def __init__(self, image_encoder: ImageEncoder, prompt_encoder: Sam2PromptEncoder, mask_decoder: Sam2MaskDecoder,
                 image_size: int, name: str = "sam2_custom", fingerprint: str = "") -> None:
        super().__init__(image_encoder, image_size, name, fingerprint, IMAGENET_MEAN, IMAGENET_STD)
        self.sam_prompt_encoder = prompt_encoder
        self.sam_mask_decoder = mask_decoder
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, mask_decoder.transformer_dim))
        self._start_fast_paths()

    @property
    def prompt_encoder(self) -> Sam2PromptEncoder:
        return self.sam_prompt_encoder

    @property
    def mask_decoder(self) -> Sam2MaskDecoder:
        return self.sam_mask_decoder

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """HxWx3 uint8 RGB -> (1, 3, S, S) float input: to [0, 1], resized to S x S, normalised."""
        rgb = rgb if rgb.flags.writeable else rgb.copy()  # torch warns on read-only arrays (decoded images)
        x = torch.from_numpy(rgb).to(self.device).permute(2, 0, 1).unsqueeze(0).float().div_(255)
        size = (self.image_size, self.image_size)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.pixel_mean) / self.pixel_std

    def encode_image(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Input (B, 3, S, S) -> image embedding (B, C, S/16, S/16) and (s0, s1) high-res features, as the
        decoder uses them (see ``model.sam2_image_encoder`` for the folded projections)."""
        decoder = self.sam_mask_decoder
        s0, s1, embedding = self.encode(x, decoder.conv_s0.weight.flatten(1), decoder.conv_s0.bias,
                                        decoder.conv_s1.weight.flatten(1), decoder.conv_s1.bias,
                                        self.no_mem_embed.flatten())
        return embedding, (s0, s1)

    def transform_coords(self, coords: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """xy pixels of the original image (..., 2) -> pixels of the S x S input, in float32 as Meta."""
        h, w = original_size
        coords = coords.to(torch.float32)
        scale = coords.new_tensor([w, h])
        return coords / scale * self.image_size

    def postprocess(self, low_res: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """Low-res logits (B, K, h, w) -> logits at the original size (B, K, H, W), bilinear.

        Each mask is resized as its own one-channel image: the same interpolation (equal up to float
        rounding, 1e-6; the ``per_mask_resize`` fast path), but PyTorch's CPU kernel takes a path for one channel that is 3x faster than its
        path for K = 3 channels (which converts memory formats around the resize).
        """
        if not self._fast_paths.per_mask_resize:  # Meta's: all K masks as one K-channel image
            return F.interpolate(low_res.float(), tuple(original_size), mode="bilinear", align_corners=False)
        b, k, h, w = low_res.shape
        masks = F.interpolate(low_res.float().reshape(b * k, 1, h, w), tuple(original_size), mode="bilinear",
                              align_corners=False)
        return masks.view(b, k, *masks.shape[-2:])

    def postprocess_above_zero(self, low_res: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor | None:
        """``postprocess(...) > 0`` by the ``edge_only_masks`` fast path (``model.edge_masks``), or None where it
        does not apply (too many edge pixels): the caller then thresholds ``postprocess``."""
        h, w = low_res.shape[-2:]
        if edge_masks.mostly_edges(low_res):
            return None
        ratios = (edge_masks.size_ratio(h, original_size[0]), edge_masks.size_ratio(w, original_size[1]))
        return edge_masks.resized_masks(low_res, (original_size[0], original_size[1]), ratios)
