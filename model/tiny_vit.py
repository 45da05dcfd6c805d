"""MobileSAM's image encoder: TinyViT-5M with SAM's neck, for inference.

Parameter and buffer names follow ``mobile_sam.modeling.tiny_vit_sam`` exactly, so the ``image_encoder.*``
entries of MobileSAM's ``mobile_sam.pt`` (and of Ultralytics' file of the same name, which has the same
layout) load with ``strict=True``. The computation is the reference's, rearranged for speed:

* convolution + BatchNorm pairs run as one convolution with the BatchNorm folded in, always with the
  running statistics: this module never trains, so ``train()`` cannot silently switch to batch statistics;
* the learned relative-position biases are gathered at every forward: the reference caches them in
  ``eval()``, and that cache is stale when weights are loaded after ``eval()`` (as its own
  ``build_sam_vit_t`` does);
* feature maps carry their height and width, so nothing is tied to a 1024 input (the reference hardcodes
  a 64 x 64 output grid).

Zero-padded window borders are layer-normalised and attended to exactly as in the reference: they are
part of the numerics the weights were trained with. Two of the model's ``FastPaths`` apply here
(``model.fast_paths``): ``fused_attention`` (window attention through ``F.scaled_dot_product_attention``
with the biases as an additive float mask) and ``in_place_activations``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from model.common import LayerNorm2d, activate, gelu
from model.fast_paths import UsesFastPaths

# SAM's input side. Not recorded in the weights; the encoder itself works at any multiple of 16.
_MOBILE_SAM_IMAGE_SIZE = 1024
# MobileSAM's released encoder, as ``tiny_vit_config_from_state_dict`` reports it.
MOBILE_SAM_VIT_T = {
    "img_size": 1024, "in_chans": 3, "num_classes": 1000,
    "embed_dims": [64, 128, 160, 320], "depths": [2, 2, 6, 2],
    "num_heads": [None, 4, 5, 10], "window_sizes": [None, 7, 14, 7],
    "mlp_ratio": 4.0, "mbconv_expand_ratio": 4.0, "local_conv_size": 3, "out_chans": 256,
}


class Conv2dBN(nn.Module):
    """A bias-free convolution followed by BatchNorm, evaluated as one convolution.

    Keys ``c.weight`` and ``bn.*`` as in the reference's ``Conv2d_BN``. Folding costs a few thousand
    multiplications per call and saves a full pass over the activations, which matters most in the
    first, high-resolution stage.
    """

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int = 1, stride: int = 1,
                 groups: int = 1) -> None:
        super().__init__()
        self.c = nn.Conv2d(in_chans, out_chans, kernel_size, stride, kernel_size // 2, groups=groups,
                           bias=False)
        self.bn = nn.BatchNorm2d(out_chans)
        self._pointwise = kernel_size == 1 and stride == 1 and groups == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        # Always the running statistics (never None: the BatchNorm tracks them, as it is built above).
        assert bn.running_var is not None and bn.running_mean is not None
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        weight = self.c.weight * scale[:, None, None, None]
        bias = bn.bias - bn.running_mean * scale
        if self._pointwise:
            # A 1x1 convolution is a matrix product over channels: on the channels-last activations
            # that is one GEMM, where PyTorch's CPU convolution would take its slow im2col path.
            return F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias).permute(0, 3, 1, 2)
        return F.conv2d(x, weight, bias, self.c.stride, self.c.padding, groups=self.c.groups)


class PatchEmbed(UsesFastPaths, nn.Module):
    """Two stride-2 3x3 convolutions: (B, 3, H, W) -> (B, C, H/4, W/4). ``seq.1`` is the activation."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            Conv2dBN(in_chans, embed_dim // 2, 3, 2),
            nn.GELU(),
            Conv2dBN(embed_dim // 2, embed_dim, 3, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq[2](activate(self.seq[1], self.seq[0](x), self.fast_paths.in_place_activations))


class MBConv(UsesFastPaths, nn.Module):
    """Inverted residual block (1x1 expand, 3x3 depthwise, 1x1 project) of the convolutional stage."""

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden, 1)
        self.conv2 = Conv2dBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = Conv2dBN(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_place = self.fast_paths.in_place_activations
        y = gelu(self.conv1(x), in_place)
        y = gelu(self.conv2(y), in_place)
        return gelu(x + self.conv3(y), in_place)


class PatchMerging(UsesFastPaths, nn.Module):
    """Channel change (and, except before the last stage, 2x downsampling) between stages, on (B, C, H, W)."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = Conv2dBN(dim, out_dim, 1)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_place = self.fast_paths.in_place_activations
        x = gelu(self.conv1(x), in_place)
        x = gelu(self.conv2(x), in_place)
        return self.conv3(x)


def attention_bias_index(window_size: int) -> torch.Tensor:
    """(N, N) index into the per-head bias table for the N = window_size**2 tokens of a window.

    The reference numbers the offsets (|dy|, |dx|) in the order it first meets them scanning token pairs
    row-major; the first query token (0, 0) already meets every offset, in row-major order, so offset
    (a, b) has number a * window_size + b.
    """
    coords = torch.arange(window_size)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = (ys[:, None] - ys[None, :]).abs()
    dx = (xs[:, None] - xs[None, :]).abs()
    return dy * window_size + dx


class Attention(UsesFastPaths, nn.Module):
    """Multi-head self-attention inside one window, with a learned bias per head and relative offset."""

    attention_bias_idxs: torch.Tensor  # buffer (N, N), registered in __init__

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        # Not in the checkpoint (the reference registers it non-persistent): rebuilt from the window size.
        self.register_buffer("attention_bias_idxs", attention_bias_index(window_size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C) tokens of B windows -> (B, N, C)."""
        b, n, c = x.shape
        # The reference lays qkv out per head as [q | k | v], not as [all q | all k | all v].
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        bias = self.attention_biases[:, self.attention_bias_idxs]
        if self.fast_paths.fused_attention:
            # A 4-d (1, heads, N, N) mask: with a 3-d one PyTorch's CPU dispatch falls back from the fused
            # kernel to the unfused math path, about 4x slower here.
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0).to(q.dtype))
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale + bias
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(UsesFastPaths, nn.Module):
    """Pre-norm feed-forward block (the LayerNorm lives inside it in TinyViT)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu(self.fc1(self.norm(x)), self.fast_paths.in_place_activations))


class TinyViTBlock(nn.Module):
    """Window attention, a depthwise 3x3 convolution, then the MLP; on channels-last (B, H, W, C)."""

    def __init__(self, dim: int, num_heads: int, window_size: int, mlp_ratio: float,
                 local_conv_size: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.attn = Attention(dim, num_heads, window_size)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(dim, dim, local_conv_size, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws = self.window_size
        pad_b, pad_r = (-h) % ws, (-w) % ws
        y = F.pad(x, (0, 0, 0, pad_r, 0, pad_b)) if pad_b or pad_r else x
        ph, pw = h + pad_b, w + pad_r
        nh, nw = ph // ws, pw // ws
        y = y.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        y = self.attn(y)
        y = y.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
        x = x + y[:, :h, :w]
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)


class ConvLayer(nn.Module):
    """Stage 0: MBConv blocks then the patch merging into stage 1, on (B, C, H, W)."""

    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class BasicLayer(nn.Module):
    """An attention stage: TinyViT blocks then the patch merging into the next stage, (B, C, H, W) in/out."""

    def __init__(self, dim: int, depth: int, num_heads: int | None, window_size: int | None,
                 mlp_ratio: float, local_conv_size: int, downsample: PatchMerging | None) -> None:
        super().__init__()
        if depth and (num_heads is None or window_size is None):
            raise ValueError("an attention stage with blocks needs num_heads and window_size")
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, num_heads, window_size, mlp_ratio, local_conv_size)  # type: ignore[arg-type]
            for _ in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocks:
            x = x.permute(0, 2, 3, 1)
            for block in self.blocks:
                x = block(x)
            x = x.permute(0, 3, 1, 2)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nn.Module):
    """MobileSAM's image encoder: (B, 3, S, S) normalised, padded images -> (B, out_chans, S/16, S/16).

    Stage 0 is convolutional; the others are attention stages. Every stage but the last ends in a patch
    merging that halves the resolution, except the one before the last stage (MobileSAM keeps the 1/16
    grid there so the output matches SAM's 64 x 64 embedding). ``num_heads[0]`` and ``window_sizes[0]``
    are ignored (stage 0 has no attention) and may be None.

    ``norm_head`` and ``head`` are TinyViT's ImageNet classifier. SAM never runs them, but MobileSAM's
    checkpoint holds their weights, so they exist here to keep ``strict=True`` loading possible.
    """

    def __init__(
        self,
        img_size: int = _MOBILE_SAM_IMAGE_SIZE,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int | None] = (2, 4, 5, 10),
        window_sizes: Sequence[int | None] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        stages = len(depths)
        if stages < 2 or not len(embed_dims) == len(num_heads) == len(window_sizes) == stages:
            raise ValueError("embed_dims, depths, num_heads and window_sizes need one entry per stage (>= 2)")
        self.img_size = img_size
        self.embed_dims = tuple(embed_dims)
        self.depths = tuple(depths)

        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        self.layers = nn.ModuleList()
        for i in range(stages):
            downsample = None
            if i < stages - 1:
                stride = 1 if i == stages - 2 else 2
                downsample = PatchMerging(embed_dims[i], embed_dims[i + 1], stride)
            if i == 0:
                layer: nn.Module = ConvLayer(embed_dims[0], depths[0], mbconv_expand_ratio, downsample)
            else:
                layer = BasicLayer(embed_dims[i], depths[i], num_heads[i], window_sizes[i], mlp_ratio,
                                   local_conv_size, downsample)
            self.layers.append(layer)

        self.norm_head = nn.LayerNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last throughout: oneDNN runs the 1x1 and depthwise convolutions in that layout
        # several times faster than in NCHW, and the attention stages' (B, H, W, C) view of it is free.
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))
        for layer in self.layers:
            x = layer(x)
        return self.neck(x).contiguous()


def tiny_vit_name(config: Mapping[str, object]) -> str:
    """"vit_t" for MobileSAM's released encoder configuration, "custom" for any other TinyViT."""
    return "vit_t" if dict(config) == MOBILE_SAM_VIT_T else "custom"


def _tensor(state_dict: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    try:
        return state_dict[key]
    except KeyError:
        raise ValueError(f"not a MobileSAM TinyViT state dict: key {key!r} is missing") from None


def _count(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of consecutive children ``prefix0.``, ``prefix1.``, ... present in the keys."""
    indices = set()
    for key in state_dict:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                indices.add(int(head))
    count = 0
    while count in indices:
        count += 1
    if count != len(indices):
        raise ValueError(f"not a MobileSAM TinyViT state dict: {prefix}N keys are not numbered 0..N-1")
    return count


def tiny_vit_config_from_state_dict(state_dict: Mapping[str, torch.Tensor],
                                    prefix: str = "image_encoder.") -> dict:
    """``TinyViT`` constructor arguments recovered from the keys and shapes of a checkpoint.

    Everything the weights determine is read from them, so custom (smaller or larger) TinyViTs load as
    well as MobileSAM's own. Two things are not in the weights: ``img_size`` (SAM's 1024; the encoder
    itself is resolution-agnostic) and the heads / window size of stage 0, which has no attention (None).
    Raises ValueError, naming the key, when the state dict is not a TinyViT's.
    """
    sd = state_dict
    p = prefix
    stem = _tensor(sd, f"{p}patch_embed.seq.0.c.weight")
    stages = _count(sd, f"{p}layers.")
    if stages < 2:
        raise ValueError(f"not a MobileSAM TinyViT state dict: {stages} stage(s) under {p}layers.")

    embed_dims = [_tensor(sd, f"{p}patch_embed.seq.2.c.weight").shape[0]]
    for i in range(stages - 1):
        embed_dims.append(_tensor(sd, f"{p}layers.{i}.downsample.conv1.c.weight").shape[0])
    depths = [_count(sd, f"{p}layers.{i}.blocks.") for i in range(stages)]

    num_heads: list[int | None] = [None]
    window_sizes: list[int | None] = [None]
    mlp_ratio: float | None = None
    local_conv_size: int | None = None
    for i in range(1, stages):
        if not depths[i]:
            num_heads.append(None)
            window_sizes.append(None)
            continue
        block = f"{p}layers.{i}.blocks.0."
        heads, offsets = _tensor(sd, f"{block}attn.attention_biases").shape
        window = math.isqrt(offsets)
        if window * window != offsets:
            raise ValueError(f"{block}attn.attention_biases has {offsets} offsets, not a square window")
        num_heads.append(heads)
        window_sizes.append(window)
        if mlp_ratio is None:
            mlp_ratio = _tensor(sd, f"{block}mlp.fc1.weight").shape[0] / embed_dims[i]
            local_conv_size = _tensor(sd, f"{block}local_conv.c.weight").shape[-1]

    mbconv_expand_ratio = 4.0
    if depths[0]:
        mbconv_expand_ratio = _tensor(sd, f"{p}layers.0.blocks.0.conv1.c.weight").shape[0] / embed_dims[0]
    head = sd.get(f"{p}head.weight")
    return {
        "img_size": _MOBILE_SAM_IMAGE_SIZE,
        "in_chans": stem.shape[1],
        "num_classes": 0 if head is None else head.shape[0],
        "embed_dims": embed_dims,
        "depths": depths,
        "num_heads": num_heads,
        "window_sizes": window_sizes,
        "mlp_ratio": 4.0 if mlp_ratio is None else mlp_ratio,
        "mbconv_expand_ratio": mbconv_expand_ratio,
        "local_conv_size": 3 if local_conv_size is None else local_conv_size,
        "out_chans": _tensor(sd, f"{p}neck.0.weight").shape[0],
    }
