"""Seeded checkpoints in the official formats whose masks look like real SAM's: one smooth blob per click.

Random weights (``checkpoints.py``, ``mobilesam_checkpoints.py``) give speckled masks: their brush RLE is
0.3-1.4 MB where real weights give a few KB, so any measurement of response size, JSON encoding or
browser rendering on them is off by two orders of magnitude. These checkpoints keep the encoder random
(it costs what a real one costs) and shape the mask decoder by hand so that:

* the image embedding is a constant vector plus a small image-dependent part (the neck's last
  LayerNorm: a small random scale, a fixed bias), so masks barely depend on the image but embeddings of
  different images still differ;
* in the first two-way block, every image position attends to the point tokens with a logit that is a
  radial kernel of its distance to the click: the prompt encoder's first ``_FREQUENCIES`` random Fourier
  frequencies are replaced by ones of equal magnitude at evenly spaced angles, so
  ``PE(p) . PE(c) = sum_j cos(2 pi f_j . (p - c))`` is about ``J0(2 pi |f| |p - c|)``: peaked at the
  click, below a third of the peak everywhere else (under every mask token's threshold);
* the value each point token hands to the image is +1 (positive click) or -1 (negative click) along one
  direction ``u`` of the token space (frequencies with zero magnitude, so the positional encoding is 0
  there), so positive clicks grow a blob and negative clicks carve one out;
* the upscaling is nearest-neighbour (each transposed-convolution tap the same) and reads that one
  direction against a constant channel, so the LayerNorms keep its magnitude; the hypernetworks and the
  IoU head are constants: the four mask tokens threshold the same bump at four levels (nested blobs,
  like SAM's whole / part / subpart), and the IoU head prefers the middle one.

Everything else (box corners, mask prompts) is inert: a box alone gives an empty mask. The files are
the reference model's ``state_dict()`` as ``torch.save`` writes it, like Meta's and MobileSAM's releases.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from testsupport import checkpoints, mobilesam_checkpoints

__all__ = ["CONFIGS", "smooth_reference_sam", "make_smooth_checkpoint", "shape_smooth_", "blob_report"]

CONFIGS = ("vit_t", "vit_b", "small")

_FREQUENCIES = 8          # Fourier frequencies the click kernel uses (one head holds 8 sin + 8 cos)
_FREQUENCY = 0.6          # their magnitude, in cycles per unit of SAM's [-1, 1] coordinates: blobs of
                          # 5-25 % of the image; the kernel's second lobe (0.3 of the peak) stays under
                          # every threshold
_U_FREQUENCIES = (8, 9)   # frequencies set to 0: their sin is 0 everywhere, free for the label direction
_KERNEL_SCALE = 0.83      # query / key projection gain of the kernel attention
_LABEL = 6.0              # size of the label direction in the point embeddings
_NEGATIVE = 0.5           # a negative click subtracts half what a positive one adds: it trims, not erases
_VALUE = 0.4              # gain of the value the point tokens hand to the image
_CONSTANT = 3.0           # size of the constant part of the image embedding
_CONTENT = 0.02           # scale of the image-dependent part of the image embedding
# Mask token thresholds on the upscaled bump (0..1): token 0 is the single-mask output, 1-3 SAM's three
# candidates (small, medium, large); IoU scores make token 2 the best of three.
_THRESHOLDS = (0.8, 0.92, 0.8, 0.6)
_SCORES = (0.9, 0.8, 0.95, 0.85)
_MASK_GAIN = 12.0


def smooth_reference_sam(config: str = "vit_t", seed: int = 0) -> nn.Module:
    """A reference ``Sam`` (Meta's for ``vit_b``, MobileSAM's for ``vit_t`` / ``small``) with smooth masks."""
    if config == "vit_b":
        sam = checkpoints.official_sam("vit_b", seed)
    elif config in ("vit_t", "small"):
        torch.manual_seed(seed)
        sam = mobilesam_checkpoints.randomize_(mobilesam_checkpoints.reference_sam(config), seed)
    else:
        raise ValueError(f"unknown smooth checkpoint configuration {config!r}; known: {CONFIGS}")
    return shape_smooth_(sam, seed)


def make_smooth_checkpoint(path: str | Path, config: str = "vit_t", seed: int = 0) -> Path:
    """Write a smooth-mask checkpoint (``torch.save(state_dict)``, the official layout) to ``path``."""
    path = Path(path)
    torch.save(smooth_reference_sam(config, seed).state_dict(), path)
    return path


@torch.no_grad()
def shape_smooth_(sam: nn.Module, seed: int = 0) -> nn.Module:
    """Shape a reference SAM's neck, prompt encoder and mask decoder in place (see module doc)."""
    generator = torch.Generator().manual_seed(seed + 1)
    decoder, prompt = sam.mask_decoder, sam.prompt_encoder
    dim = decoder.transformer_dim
    half = dim // 2
    if dim != 256:
        raise ValueError(f"smooth weights need the official 256-d decoder, not {dim}")
    selected = [*range(_FREQUENCIES), *(half + j for j in range(_FREQUENCIES))]
    u = torch.zeros(dim)
    u[_U_FREQUENCIES[0]], u[_U_FREQUENCIES[1]] = 1 / math.sqrt(2), -1 / math.sqrt(2)
    reserved = torch.zeros(dim, dtype=torch.bool)
    reserved[selected] = True
    reserved[list(_U_FREQUENCIES)] = True
    reserved[_image_direction(dim) != 0] = True

    # Positional encoding: evenly spaced directions of one magnitude, and two zero frequencies.
    gaussian = prompt.pe_layer.positional_encoding_gaussian_matrix
    angles = torch.arange(_FREQUENCIES) * math.pi / _FREQUENCIES
    gaussian[0, :_FREQUENCIES] = _FREQUENCY * torch.cos(angles)
    gaussian[1, :_FREQUENCIES] = _FREQUENCY * torch.sin(angles)
    gaussian[:, list(_U_FREQUENCIES)] = 0.0

    # Image embedding: constant + small content, nothing in the kernel or label dimensions.
    neck_norm = sam.image_encoder.neck[3]
    constant = torch.randn(dim, generator=generator)
    constant[reserved] = 0.0
    constant -= constant[~reserved].mean() * (~reserved).float()
    neck_norm.bias.copy_(constant * _CONSTANT / constant.norm())
    scale = torch.randn(dim, generator=generator) * _CONTENT
    scale[reserved] = 0.0
    neck_norm.weight.copy_(scale)
    prompt.no_mask_embed.weight.zero_()
    last_mask_conv = prompt.mask_downscaling[-1]
    last_mask_conv.weight.zero_()
    last_mask_conv.bias.zero_()

    # Token embeddings: the labels along +-u; everything else off the kernel and label dimensions.
    for index, embedding in enumerate(prompt.point_embeddings):
        embedding.weight.copy_(_token(generator, dim, reserved))
        if index in (0, 1):
            embedding.weight.copy_((_LABEL if index else -_NEGATIVE * _LABEL) * u)
    prompt.not_a_point_embed.weight.copy_(_token(generator, dim, reserved))
    decoder.iou_token.weight.copy_(_token(generator, dim, reserved))
    for row in range(decoder.mask_tokens.weight.shape[0]):
        decoder.mask_tokens.weight[row].copy_(_token(generator, dim, reserved))

    transformer = decoder.transformer
    for index, block in enumerate(transformer.layers):
        _silence(block.cross_attn_token_to_image.out_proj)
        _silence(block.mlp.lin2)
        for norm in (block.norm1, block.norm2, block.norm3, block.norm4):
            norm.weight.fill_(1.0)
            norm.bias.zero_()
        if index == 0:
            _identity_self_attention(block.self_attn)
            _kernel_attention(block.cross_attn_image_to_token, selected, u)
        else:
            _silence(block.self_attn.out_proj)
            _silence(block.cross_attn_image_to_token.out_proj)
    _silence(transformer.final_attn_token_to_image.out_proj)

    # Upscaling: nearest neighbour, reading the label direction against a constant channel.
    direction = _image_direction(dim)
    up1, norm, _, up2, _ = decoder.output_upscaling
    up1.weight.zero_()
    up1.bias.zero_()
    up1.weight[:, 0] = direction[:, None, None] * 0.1
    up1.bias[0], up1.bias[1] = 0.2, 1.0
    norm.weight.fill_(1.0)
    norm.bias.zero_()
    up2.weight.zero_()
    up2.bias.zero_()
    up2.weight[0, 0] = 1.0
    up2.bias[1] = 1.0
    constant_channel = torch.nn.functional.gelu(torch.tensor(1.0)).item()
    low, high = _bump_range(sam)
    for token, mlp in enumerate(decoder.output_hypernetworks_mlps):
        last = mlp.layers[-1]
        last.weight.zero_()
        last.bias.zero_()
        threshold = low + _THRESHOLDS[token] * (high - low)
        last.bias[0] = _MASK_GAIN / (high - low)
        last.bias[1] = -_MASK_GAIN / (high - low) * threshold / constant_channel
    head = decoder.iou_prediction_head.layers[-1]
    head.weight.zero_()
    head.bias.copy_(torch.tensor(_SCORES[: head.bias.numel()]))
    return sam.eval()


def _token(generator: torch.Generator, dim: int, reserved: torch.Tensor) -> torch.Tensor:
    """A random zero-mean token embedding with nothing in the kernel and label dimensions."""
    token = torch.randn(dim, generator=generator)
    token[reserved] = 0.0
    token[~reserved] -= token[~reserved].mean()
    return token


def _silence(linear: nn.Linear) -> None:
    """A residual branch that adds nothing."""
    linear.weight.zero_()
    linear.bias.zero_()


def _identity_self_attention(attention: nn.Module) -> None:
    """Token self-attention that hands each token back itself: sharp self-similarity, identity values."""
    dim = attention.q_proj.weight.shape[1]
    internal = attention.q_proj.weight.shape[0]
    eye = torch.eye(internal, dim)
    attention.q_proj.weight.copy_(eye * 4.0)
    attention.k_proj.weight.copy_(eye * 4.0)
    attention.v_proj.weight.copy_(eye)
    attention.out_proj.weight.copy_(torch.eye(dim, internal))
    for linear in (attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj):
        linear.bias.zero_()


def _image_direction(dim: int) -> torch.Tensor:
    """The direction (in the image token space) the point tokens write along: zero-mean, unit length."""
    direction = torch.zeros(dim)
    direction[-2], direction[-1] = 1 / math.sqrt(2), -1 / math.sqrt(2)
    return direction


def _kernel_attention(attention: nn.Module, selected: list[int], u: torch.Tensor) -> None:
    """Image -> token attention whose logits are PE(p) . PE(click) and whose values are the click labels."""
    internal, dim = attention.q_proj.weight.shape
    heads = attention.num_heads
    per_head = internal // heads
    if per_head < len(selected):
        raise ValueError(f"{per_head} channels per head cannot hold {len(selected)} kernel dimensions")
    projection = torch.zeros(internal, dim)
    for head in range(heads):
        for row, column in enumerate(selected):
            projection[head * per_head + row, column] = _KERNEL_SCALE
    attention.q_proj.weight.copy_(projection)
    attention.k_proj.weight.copy_(projection)
    value = torch.zeros(internal, dim)
    value[0] = u
    attention.v_proj.weight.copy_(value)
    out = torch.zeros(dim, internal)
    out[:, 0] = _image_direction(dim) * _VALUE
    attention.out_proj.weight.copy_(out)
    for linear in (attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj):
        linear.bias.zero_()


def _bump_range(sam: nn.Module) -> tuple[float, float]:
    """The upscaled bump channel's lowest and highest value for one click on a constant embedding.

    The thresholds of the mask tokens are fractions of this range, so they stay right whatever the
    LayerNorms and GELUs between the attention and the masks make of the bump's height.
    """
    decoder, prompt = sam.mask_decoder, sam.prompt_encoder
    grid = prompt.image_embedding_size
    size = prompt.input_image_size
    embedding = sam.image_encoder.neck[3].bias.view(1, -1, 1, 1).expand(1, -1, *grid)
    centre = torch.tensor([[[size[1] / 2, size[0] / 2]]], dtype=torch.float32)
    sparse, dense = prompt(points=(centre, torch.ones(1, 1, dtype=torch.int)), boxes=None, masks=None)
    src = embedding + dense
    tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], 0).unsqueeze(0)
    tokens = torch.cat([tokens, sparse], 1)
    _, keys = decoder.transformer(src, prompt.get_dense_pe(), tokens)
    upscaled = decoder.output_upscaling(keys.transpose(1, 2).reshape(src.shape))[0, 0]
    return float(upscaled.min()), float(upscaled.max())


def blob_report(masks: np.ndarray, click_xy: tuple[float, float]) -> dict[str, object]:
    """Per (H, W) mask: area share, whether it holds the click, and its 4-connected component count.

    Components are counted on a 4x downsampled copy (by flood fill in numpy), which is enough to tell a
    blob from speckle.
    """
    reports = []
    for mask in np.asarray(masks, dtype=bool):
        small = mask[::4, ::4]
        x, y = int(click_xy[0]), int(click_xy[1])
        reports.append({
            "area": float(mask.mean()),
            "holds_click": bool(mask[min(y, mask.shape[0] - 1), min(x, mask.shape[1] - 1)]),
            "components": _components(small),
        })
    return {"masks": reports}


def _components(mask: np.ndarray) -> int:
    """Number of 4-connected foreground components (flood fill by repeated dilation)."""
    remaining = mask.copy()
    count = 0
    while remaining.any():
        seed = np.zeros_like(remaining)
        flat = int(np.flatnonzero(remaining)[0])
        seed.flat[flat] = True
        while True:
            grown = seed.copy()
            grown[1:] |= seed[:-1]
            grown[:-1] |= seed[1:]
            grown[:, 1:] |= seed[:, :-1]
            grown[:, :-1] |= seed[:, 1:]
            grown &= remaining
            if (grown == seed).all():
                break
            seed = grown
        remaining &= ~seed
        count += 1
    return count
