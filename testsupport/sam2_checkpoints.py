"""Seeded random SAM 2 / SAM 2.1 checkpoints in the official format, built with Meta's own ``sam2`` package.

No real weights exist on the test machines, so parity tests build Meta's ``SAM2Base`` from the official
Hydra configurations (``sam2.1_hiera_{t,s,b+,l}.yaml`` inside the installed ``sam2`` package, with
overrides for small custom configurations), give every parameter a seeded random value, and save
``{"model": state_dict}`` exactly as ``sam2.1_hiera_*.pt`` are saved. The video-memory modules are in the
file too, as in the official files; the image path must ignore them.

``randomize`` gives every parameter a value that changes the output (default initialisation leaves
position embeddings, LayerNorm affines, ``no_mem_embed`` at 0 / 1 / tiny values, so a dropped term would go
unnoticed), with scales chosen so that mask logits straddle zero.

The image predictor is Meta's ``SAM2ImagePredictor``; it hard-codes the backbone feature sizes of a
1024-px model, so ``reference_predictor`` sets them from the model's image size (the only change made
to Meta's objects, needed for the small fast-test configurations).
"""

from __future__ import annotations

from pathlib import Path

import torch

# Short names of the official configurations -> config file inside the sam2 package.
CONFIGS = {
    "sam2.1_hiera_tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_small": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_base_plus": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_large": "configs/sam2.1/sam2.1_hiera_l.yaml",
    "sam2_hiera_tiny": "configs/sam2/sam2_hiera_t.yaml",
    "sam2_hiera_small": "configs/sam2/sam2_hiera_s.yaml",
    "sam2_hiera_base_plus": "configs/sam2/sam2_hiera_b+.yaml",
    "sam2_hiera_large": "configs/sam2/sam2_hiera_l.yaml",
}

# A small SAM 2.1 for fast tests: 256-px input, a 4-stage Hiera of 1+1+2+1 blocks (q-pooling at every
# stage change, windowed and global blocks, a window that needs padding), 64-d decoder. The decoder's
# transformer width follows the neck's d_model.
SMALL = {
    "image_size": 256,
    "embed_dim": 16,
    "num_heads": 1,
    "stages": (1, 1, 2, 1),
    "global_att_blocks": (3,),
    "window_spec": (8, 4, 6, 4),
    "window_pos_embed_bkg_spatial_size": (4, 4),
    "d_model": 64,
}


def _overrides(config: dict) -> list[str]:
    """Hydra overrides for a custom configuration (keys of ``SMALL``; any subset)."""
    def lst(values) -> str:
        return "[" + ",".join(str(v) for v in values) + "]"

    out = []
    trunk = "++model.image_encoder.trunk."
    if "image_size" in config:
        out.append(f"++model.image_size={config['image_size']}")
    for key in ("embed_dim", "num_heads"):
        if key in config:
            out.append(f"{trunk}{key}={config[key]}")
    for key in ("stages", "global_att_blocks", "window_spec", "window_pos_embed_bkg_spatial_size"):
        if key in config:
            out.append(f"{trunk}{key}={lst(config[key])}")
    if "embed_dim" in config:
        dim = config["embed_dim"]
        out.append(f"++model.image_encoder.neck.backbone_channel_list={lst([8 * dim, 4 * dim, 2 * dim, dim])}")
    if "d_model" in config:
        out.append(f"++model.image_encoder.neck.d_model={config['d_model']}")
    return out


def reference_sam2(name: str = "sam2.1_hiera_tiny", seed: int = 0, **config) -> torch.nn.Module:
    """Meta's ``SAM2Base`` of an official configuration (optionally overridden), random weights, eval mode.

    Built the way ``build_sam2`` builds it for the image predictor (``apply_postprocessing=True``: the
    decoder falls back to the best multimask output when the single mask is unstable).
    """
    from sam2.build_sam import build_sam2

    torch.manual_seed(seed)
    sam = build_sam2(CONFIGS[name], ckpt_path=None, device="cpu", mode="eval",
                     hydra_overrides_extra=_overrides(config))
    return randomize(sam, seed)


def randomize(sam: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter of a reference ``SAM2Base`` a seeded random value (in place)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sam.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            leaf = name.rsplit(".", 1)[-1]
            if "pos_embed" in name:
                param.copy_(0.5 * noise)
            elif name == "no_mem_embed":
                param.copy_(0.3 * noise)
            elif leaf == "weight" and param.ndim == 1:  # LayerNorm / LayerNorm2d scales
                param.copy_(1.0 + 0.1 * noise)
            elif isinstance(_module(sam, name), torch.nn.Embedding) or param.ndim < 2 and leaf != "bias":
                param.copy_(noise)
            elif leaf == "bias":
                param.copy_(0.05 * noise)
            else:
                fan_in = max(1, param[0].numel())
                param.copy_(noise / fan_in**0.5)
    return sam.eval()


def _module(root: torch.nn.Module, param_name: str) -> torch.nn.Module | None:
    path = param_name.rsplit(".", 1)[0] if "." in param_name else ""
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        return None


def save(sam: torch.nn.Module, path: Path) -> Path:
    """Save as the official files are saved: ``{"model": state_dict}``."""
    torch.save({"model": sam.state_dict()}, path)
    return path


def checkpoint(directory: Path, name: str = "sam2.1_hiera_tiny", seed: int = 0,
               **config) -> tuple[Path, torch.nn.Module]:
    """A checkpoint file of ``name`` (optionally overridden by ``config``) and the reference model."""
    sam = reference_sam2(name, seed, **config)
    suffix = "_custom" if config else ""
    return save(sam, Path(directory) / f"{name}{suffix}_{seed}.pt"), sam


def small_checkpoint(directory: Path, seed: int = 0, **config) -> tuple[Path, torch.nn.Module]:
    """A tiny custom SAM 2.1 checkpoint (``SMALL``, updated by ``config``) and its reference model."""
    return checkpoint(directory, "sam2.1_hiera_tiny", seed, **{**SMALL, **config})


def reference_predictor(sam: torch.nn.Module, **kwargs):
    """Meta's ``SAM2ImagePredictor`` on ``sam``, with its feature sizes set from the model's image size."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    predictor = SAM2ImagePredictor(sam, **kwargs)
    size = sam.image_size
    predictor._bb_feat_sizes = [(size // 4, size // 4), (size // 8, size // 8), (size // 16, size // 16)]
    return predictor


def state_dict(name: str) -> dict[str, torch.Tensor]:
    """The state dict of an official configuration, untrained (for architecture detection tests)."""
    from sam2.build_sam import build_sam2

    return build_sam2(CONFIGS[name], ckpt_path=None, device="cpu", mode="eval").state_dict()


def reference_mask_generator(sam: torch.nn.Module, **kwargs):
    """Meta's ``SAM2AutomaticMaskGenerator`` on ``sam``, its predictor's feature sizes set as above."""
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    generator = SAM2AutomaticMaskGenerator(sam, **kwargs)
    size = sam.image_size
    generator.predictor._bb_feat_sizes = [(size // 4, size // 4), (size // 8, size // 8), (size // 16, size // 16)]
    return generator
