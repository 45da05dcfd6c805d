"""Seeded random MobileSAM checkpoints in the official ``mobile_sam.pt`` format, built with the reference.

No real weights exist on the test machines, so parity is checked on random ones. Plain random weights
would leave parts of the network inert and hide bugs there, so ``randomize_`` gives every tensor a value
that exercises it:

* attention biases are zero-initialised in the reference: random here, so a wrong bias index shows;
* BatchNorm weights, biases and running statistics are random, so folding them into the convolution is
  tested (the reference initialises the last MBConv BatchNorm to zero, which would turn those blocks off);
* LayerNorm affine parameters and every bias are random, so no term can be dropped unnoticed;
* kernels are fan-in scaled so activations keep their size through depth, and mask logits straddle 0:
  masks are neither empty nor full (an empty mask matches any other empty mask, which would make IoU
  checks vacuous); ``random_reference_sam`` checks that.

The file holds ``model.state_dict()`` as ``torch.save`` writes it, exactly like MobileSAM's release.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from mobile_sam import sam_model_registry
from mobile_sam.modeling import MaskDecoder, PromptEncoder, Sam, TinyViT, TwoWayTransformer
from mobile_sam.modeling.common import LayerNorm2d as ReferenceLayerNorm2d
from mobile_sam.modeling.tiny_vit_sam import LayerNorm2d as TinyViTLayerNorm2d
from torch import nn

# A TinyViT small enough for unit tests that the reference still accepts: it fixes a 1024 input and a
# 64 x 64 output grid, and keeps the resolution before the last stage only when the last width is 320,
# 448 or 576. Window sizes 6 and 9 pad the 128 and 64 grids differently from MobileSAM's 7 and 14;
# mlp_ratio and mbconv_expand_ratio differ from 4 so that their inference from shapes is tested.
SMALL_TINY_VIT = {
    "img_size": 1024,
    "in_chans": 3,
    "num_classes": 10,
    "embed_dims": [16, 32, 64, 320],
    "depths": [1, 1, 2, 1],
    "num_heads": [1, 2, 4, 10],
    "window_sizes": [7, 6, 9, 7],
    "mlp_ratio": 2.0,
    "mbconv_expand_ratio": 2.0,
    "local_conv_size": 3,
}

CONFIGS = ("vit_t", "small")


def reference_tiny_vit(config: str) -> TinyViT:
    """The reference encoder of a named configuration, freshly initialised (call under a seed)."""
    if config == "vit_t":
        return sam_model_registry["vit_t"]().image_encoder
    if config == "small":
        return TinyViT(**SMALL_TINY_VIT, drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False)
    raise ValueError(f"unknown MobileSAM test configuration {config!r}; known: {CONFIGS}")


def reference_sam(config: str) -> Sam:
    """A reference MobileSAM (TinyViT + SAM's prompt encoder and decoder), freshly initialised."""
    if config == "vit_t":
        return sam_model_registry["vit_t"]()
    return Sam(
        image_encoder=reference_tiny_vit(config),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(64, 64),
                                     input_image_size=(1024, 1024), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give the weights seeded values that make every term matter (see module doc).

    Embeddings and the prompt encoder's Gaussian frequency matrix keep their (seeded) default
    initialisation: their scale relative to each other is what SAM's prompt encoding relies on.
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(like: torch.Tensor, std: float) -> torch.Tensor:
        return torch.randn(like.shape, generator=generator) * std

    def uniform(like: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return torch.rand(like.shape, generator=generator) * (high - low) + low

    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            fan_in = module.weight[0].numel()
            module.weight.copy_(normal(module.weight, fan_in**-0.5))
        elif isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(normal(module.running_mean, 0.1))
            module.running_var.copy_(uniform(module.running_var, 0.5, 1.5))
        if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm, ReferenceLayerNorm2d, TinyViTLayerNorm2d)):
            module.weight.copy_(uniform(module.weight, 0.5, 1.5))
        if getattr(module, "bias", None) is not None and isinstance(module.bias, torch.Tensor):
            module.bias.copy_(normal(module.bias, 0.05))
        if hasattr(module, "attention_biases"):
            module.attention_biases.copy_(normal(module.attention_biases, 1.0))
    # The reference caches gathered attention biases in eval(): refresh that cache after new weights.
    model.eval()
    return model


def random_reference_sam(config: str = "small", seed: int = 0) -> Sam:
    """A reference MobileSAM in eval mode with seeded random weights (see module doc)."""
    torch.manual_seed(seed)
    sam = randomize_(reference_sam(config), seed)
    _check_mask_logits_straddle_zero(sam, seed)
    return sam


@torch.no_grad()
def _check_mask_logits_straddle_zero(sam: Sam, seed: int) -> None:
    """Refuse weights whose masks would be empty or full: IoU parity on those proves nothing.

    With the fan-in scaled kernels and random norms of ``randomize_`` the upscaled embedding varies
    enough across the image that logits take both signs; this check keeps it that way if the
    initialisation or the reference ever changes.
    """
    logits = reference_logits(sam, sample_image(seed))
    positive = (logits > 0).flatten(1).float().mean(1)
    if not ((positive > 0.05) & (positive < 0.95)).any():
        shares = ", ".join(f"{p:.1%}" for p in positive.tolist())
        raise RuntimeError(f"seed {seed}: random MobileSAM masks have {shares} positive logits")


def sample_image(seed: int = 0, height: int = 480, width: int = 640) -> np.ndarray:
    """A seeded RGB uint8 image with structure (gradients and rectangles), not only noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 255 // (width + height)], -1)
    for _ in range(6):
        y0, x0 = rng.integers(0, height - 40), rng.integers(0, width - 40)
        h, w = rng.integers(30, height // 2), rng.integers(30, width // 2)
        image[y0:y0 + h, x0:x0 + w] = rng.integers(0, 256, 3)
    image = image + rng.integers(-12, 13, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def reference_logits(sam: Sam, image: np.ndarray) -> torch.Tensor:
    """Low-resolution multimask logits of the reference for one click in the image centre."""
    from mobile_sam import SamPredictor

    predictor = SamPredictor(sam)
    predictor.set_image(image)
    h, w = image.shape[:2]
    _, _, logits = predictor.predict(np.array([[w / 2, h / 2]]), np.array([1]), multimask_output=True)
    return torch.from_numpy(logits)


def make_mobile_sam_checkpoint(path: str | Path, config: str = "small", seed: int = 0) -> Path:
    """Write a seeded random MobileSAM checkpoint (``torch.save(state_dict)``) to ``path``."""
    path = Path(path)
    torch.save(random_reference_sam(config, seed).state_dict(), path)
    return path
