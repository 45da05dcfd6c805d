"""Seeded random SAM checkpoints in the official formats, built with Meta's own ``segment_anything``.

No real SAM weights exist on the test machines, so parity tests build Meta's reference model with
random weights, save its state dict exactly as the official files are saved, and compare our engine
loading that file against Meta's predictor holding the same weights.

Default initialisation leaves the relative-position tables, ``pos_embed`` and the LayerNorm affine
parameters at 0 / 1: a test would not notice if we dropped them. ``randomize`` gives every parameter
a random value so each one changes the output, with scales chosen so mask logits straddle zero
(masks neither empty nor full).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

PIXEL_MEAN = [123.675, 116.28, 103.53]
PIXEL_STD = [58.395, 57.12, 57.375]


def randomize(sam: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter of a reference ``Sam`` a seeded random value (in place)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sam.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            leaf = name.rsplit(".", 1)[-1]
            if "rel_pos" in name or name.endswith("pos_embed"):
                param.copy_(0.5 * noise)
            elif leaf == "weight" and param.ndim == 1:  # LayerNorm / LayerNorm2d scales
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith(("iou_token.weight", "mask_tokens.weight", "point_embeddings.0.weight",
                                "point_embeddings.1.weight", "point_embeddings.2.weight",
                                "point_embeddings.3.weight", "not_a_point_embed.weight", "no_mask_embed.weight")):
                param.copy_(noise)
            elif leaf == "bias":
                param.copy_(0.05 * noise)
            else:
                fan_in = max(1, param[0].numel()) if param.ndim > 1 else param.numel()
                param.copy_(noise / fan_in**0.5)
    return sam.eval()


def reference_sam(*, embed_dim: int = 64, depth: int = 2, num_heads: int = 4, global_attn_indexes: tuple = (1,),
                  window_size: int = 4, img_size: int = 256, patch_size: int = 16, mlp_ratio: float = 4.0,
                  prompt_dim: int = 64, mask_in_chans: int = 16, decoder_depth: int = 2, decoder_mlp_dim: int = 128,
                  iou_hidden: int = 64, seed: int = 0) -> Sam:
    """Meta's ``Sam`` with the given ViT configuration and random weights (eval mode)."""
    torch.manual_seed(seed)
    grid = img_size // patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=depth, embed_dim=embed_dim, img_size=img_size, mlp_ratio=mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=num_heads, patch_size=patch_size,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=global_attn_indexes, window_size=window_size,
            out_chans=prompt_dim,
        ),
        prompt_encoder=PromptEncoder(embed_dim=prompt_dim, image_embedding_size=(grid, grid),
                                     input_image_size=(img_size, img_size), mask_in_chans=mask_in_chans),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=decoder_depth, embedding_dim=prompt_dim, mlp_dim=decoder_mlp_dim,
                                          num_heads=8),
            transformer_dim=prompt_dim, iou_head_depth=3, iou_head_hidden_dim=iou_hidden,
        ),
        pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD,
    )
    return randomize(sam, seed)


OFFICIAL = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}


def official_sam(name: str = "vit_b", seed: int = 0) -> Sam:
    """Meta's ``Sam`` in an official configuration (1024 px, window 14, 256-d decoder), random weights."""
    return reference_sam(**OFFICIAL[name], window_size=14, img_size=1024, patch_size=16, prompt_dim=256,
                         mask_in_chans=16, decoder_depth=2, decoder_mlp_dim=2048, iou_hidden=256, seed=seed)


def save(sam: torch.nn.Module, path: Path, wrapper: str | None = None) -> Path:
    """Save the state dict as the official files do (``wrapper`` None), or as {"model"|"state_dict": sd}."""
    state_dict = sam.state_dict()
    torch.save(state_dict if wrapper is None else {wrapper: state_dict, "epoch": 3}, path)
    return path


def small_checkpoint(directory: Path, seed: int = 0, wrapper: str | None = None, **config) -> tuple[Path, Sam]:
    """A tiny custom-configuration checkpoint file and the reference model holding its weights."""
    sam = reference_sam(seed=seed, **config)
    return save(sam, Path(directory) / f"sam_small_{seed}.pth", wrapper), sam


def vit_b_checkpoint(directory: Path, seed: int = 0) -> tuple[Path, Sam]:
    """A full-size ViT-B checkpoint (~375 MB) with random weights and its reference model."""
    sam = official_sam("vit_b", seed)
    return save(sam, Path(directory) / "sam_vit_b_random.pth"), sam


def make_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A real-looking HxWx3 uint8 RGB test image: a colour gradient, a few filled shapes, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([255 * xx / max(width - 1, 1), 255 * yy / max(height - 1, 1),
                      np.full_like(xx, 128.0)], axis=-1)
    for _ in range(4):
        color = rng.uniform(0, 255, 3)
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        if rng.random() < 0.5:
            r = rng.uniform(0.1, 0.3) * min(height, width)
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        else:
            hh, hw = rng.uniform(0.1, 0.3) * height, rng.uniform(0.1, 0.3) * width
            inside = (abs(yy - cy) < hh) & (abs(xx - cx) < hw)
        image[inside] = color
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)
