"""Hiera, the image trunk of SAM 2 / SAM 2.1, for inference.

Parameter names follow Meta's ``sam2.modeling.backbones.hieradet`` (``patch_embed.proj``, ``pos_embed``,
``pos_embed_window``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.layers.{0,1},proj}``), so the
``image_encoder.trunk.*`` entries of ``sam2.1_hiera_*.pt`` load with ``strict=True``.

Hiera is a four-stage ViT: a 7x7 stride-4 patch embedding, then blocks of windowed (or, in a few, global)
self-attention without relative positions. The first block of stages 2-4 halves the grid by max-pooling
the queries 2x2 (inside each window) and the shortcut, and widens the channels. The trunk returns the last
block of every stage: four feature maps at strides 4, 8, 16 and 32.

Every module runs Meta's order of operations (``sam2.modeling.backbones.hieradet``, channels-last as
Meta's is, attention through ``F.scaled_dot_product_attention`` as Meta's is) unless a switch of its
``FastPaths`` says otherwise: ``cached_position_embedding`` (``Hiera``), ``channels_last_patch_embed``
(``PatchEmbed``), ``hiera_residual_writes`` and ``hiera_mlp_chunk_elements`` (``MultiScaleBlock``),
``strided_max_pool`` (``max_pool_2x2``), ``contiguous_attention_heads`` (``MultiScaleAttention``),
``fused_linear`` (``linear``) and ``in_place_activations``. What each does and why it pays is said once, in
``model.fast_paths``; each is equal to Meta's up to float rounding or exactly.

Padding follows Meta: a grid that is not a multiple of the window is zero-padded after ``norm1``, and the
padded tokens take part in the attention of their window (their keys and values are the projections'
biases), exactly as the weights were trained.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from model.common import gelu as exact_gelu
from model.fast_paths import FastPaths, UsesFastPaths

# Attention over at least this many keys gets contiguous q / k / v (see MultiScaleAttention.forward).
_CONTIGUOUS_ATTENTION_TOKENS = 1024


class PatchEmbed(UsesFastPaths, nn.Module):
    """Image to tokens: a 7x7 convolution of stride 4, output channels-last (B, H/4, W/4, C)."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 96, kernel_size: int = 7, stride: int = 4,
                 padding: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast_paths.channels_last_patch_embed:
            # A channels-last input makes the convolution write channels-last: the permute is then a view.
            x = x.contiguous(memory_format=torch.channels_last)
        return self.proj(x).permute(0, 2, 3, 1)


def _fused_linear_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


# Whether this PyTorch has oneDNN's fused linear (bias and GELU in the product), which ``fused_linear`` uses.
_FUSED_LINEAR = _fused_linear_available()


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def linear(x: torch.Tensor, layer: nn.Linear, policy: FastPaths, gelu: bool = False) -> torch.Tensor:
    """``layer(x)``, followed by the exact GELU when ``gelu``: with ``fused_linear``, fused on CPU where oneDNN
    offers it (not under ``torch.compile``, which fuses on its own and lowers this op only for frozen weights)."""
    if (policy.fused_linear and _FUSED_LINEAR and x.device.type == "cpu" and x.dtype == torch.float32
            and not _autocast_on("cpu") and not _compiling()):
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), layer.weight, layer.bias,
                                                  "gelu" if gelu else "none", [], "none" if gelu else "")
    y = layer(x)
    return exact_gelu(y, policy.in_place_activations) if gelu else y


class HieraMLP(UsesFastPaths, nn.Module):
    """Linear, GELU, linear (keys ``layers.0`` / ``layers.1``, Meta's ``MLP`` with two layers)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.layers = nn.ModuleList([nn.Linear(dim, hidden_dim), nn.Linear(hidden_dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lin1, lin2 = cast("Iterable[nn.Linear]", self.layers)
        return linear(linear(x, lin1, self.fast_paths, gelu=True), lin2, self.fast_paths)


def max_pool_2x2_reference(x: torch.Tensor) -> torch.Tensor:
    """Meta's ``do_pool``: ``nn.MaxPool2d(2, 2)`` on the channels-first permute of (B, H, W, C), permuted back."""
    return F.max_pool2d(x.permute(0, 3, 1, 2), kernel_size=2, stride=2).permute(0, 2, 3, 1)


def pool(x: torch.Tensor, policy: FastPaths) -> torch.Tensor:
    """2x2 max pooling of (B, H, W, C), by ``strided_max_pool`` or Meta's way: the same maxima."""
    return max_pool_2x2(x) if policy.strided_max_pool else max_pool_2x2_reference(x)


def max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """2x2 max pooling of stride 2 over (B, H, W, C) channels-last, floor mode (a trailing odd row or column
    is dropped, as ``nn.MaxPool2d(2, 2)`` drops it). Two ``maximum`` passes over strided views: each reads
    whole runs of channels, where a reduction over the reshaped 2x2 axes ran 4-7x slower."""
    h, w = x.shape[1:3]
    x = x[:, : h - h % 2, : w - w % 2]
    rows = torch.maximum(x[:, 0::2], x[:, 1::2])
    return torch.maximum(rows[:, :, 0::2], rows[:, :, 1::2])


def window_unpartition(windows: torch.Tensor, window_size: int, pad_hw: tuple[int, int],
                       hw: tuple[int, int]) -> torch.Tensor:
    """Meta's inverse of ``window_partition``: (B * windows, ws, ws, C) -> (B, H, W, C), padding cropped."""
    (hp, wp), (h, w) = pad_hw, hw
    b = windows.shape[0] // (hp * wp // window_size // window_size)
    x = windows.reshape(b, hp // window_size, wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w, :] if hp > h or wp > w else x


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * windows, ws, ws, C), zero-padding H and W up to a multiple of ws; and (Hp, Wp)."""
    b, h, w, c = x.shape
    pad_h, pad_w = -h % window_size, -w % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window_size, window_size, wp // window_size, window_size, c)
    return x.transpose(2, 3).reshape(-1, window_size, window_size, c), (hp, wp)


class MultiScaleAttention(UsesFastPaths, nn.Module):
    """Self-attention whose queries may be max-pooled 2x2 (the first block of a stage). Keys ``qkv``, ``proj``."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_pool: bool = False) -> None:
        super().__init__()
        self.dim, self.dim_out, self.num_heads = dim, dim_out, num_heads
        self.q_pool = q_pool
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, dim) -> (B, H', W', dim_out); H' = H // 2 when queries are pooled."""
        b, h, w, _ = x.shape
        heads, policy = self.num_heads, self.fast_paths
        qkv = linear(x, self.qkv, policy)  # (B, H, W, 3 * dim_out)
        q, k, v = qkv.view(b, h * w, 3, heads, -1).unbind(2)  # (B, N, heads, hd) strided views
        if self.q_pool:
            q = pool(qkv[..., : self.dim_out], policy)  # q of every head: Meta's q.reshape(B, H, W, -1)
            h, w = q.shape[1:3]
            q = q.reshape(b, h * w, heads, -1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if policy.contiguous_attention_heads and k.shape[2] >= _CONTIGUOUS_ATTENTION_TOKENS:
            # Long sequences (the global blocks): SDPA's CPU kernel reads contiguous heads 8-15% faster,
            # more than the copy costs; for the windows' 16-196 tokens the copy costs more than it saves.
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = F.scaled_dot_product_attention(q, k, v)
        # (B, heads, N', hd) -> (B, N', heads * hd): a view for one head, a copy otherwise.
        out = out.transpose(1, 2).reshape(b, h, w, self.dim_out)
        return linear(out, self.proj, policy)


class MultiScaleBlock(UsesFastPaths, nn.Module):
    """Pre-norm block: (windowed) attention with optional query pooling, then an MLP.

    Keys ``norm1``, ``attn``, ``norm2``, ``mlp``, and ``proj`` (the shortcut's projection) when the width
    changes.
    """

    def __init__(self, dim: int, dim_out: int, num_heads: int, mlp_ratio: float = 4.0, q_stride: bool = False,
                 window_size: int = 0) -> None:
        super().__init__()
        self.dim, self.dim_out = dim, dim_out
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.window_size = window_size
        self.q_stride = q_stride
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, q_pool=q_stride)
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        self.mlp = HieraMLP(dim_out, int(dim_out * mlp_ratio))
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, dim) -> (B, H', W', dim_out). Returns a new tensor; x is left untouched."""
        if not self.fast_paths.hiera_residual_writes:
            return self.forward_reference(x)
        x = self._attention_residual(x)
        return self._mlp_residual_(x)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Meta's ``MultiScaleBlock.forward``: unpartitioned windows, then two out-of-place residual adds."""
        policy = self.fast_paths
        shortcut = x
        x = self.norm1(x)
        if self.dim != self.dim_out:
            shortcut = linear(x, self.proj, policy)
            if self.q_stride:
                shortcut = pool(shortcut, policy)
        window_size = self.window_size
        h, w = x.shape[1:3]
        pad_hw = (h, w)
        if window_size > 0:
            x, pad_hw = window_partition(x, window_size)
        x = self.attn(x)
        if self.q_stride:
            window_size //= 2
            h, w = shortcut.shape[1:3]
            pad_hw = (h + -h % window_size, w + -w % window_size) if window_size else (h, w)
        if self.window_size > 0:
            x = window_unpartition(x, window_size, pad_hw, (h, w))
        x = shortcut + x
        return x + self.mlp(self.norm2(x))

    def _attention_residual(self, x: torch.Tensor) -> torch.Tensor:
        """shortcut + attention, as a new tensor (B, H', W', dim_out)."""
        ws = self.window_size
        b, h, w, _ = x.shape
        h_out, w_out = (h // 2, w // 2) if self.q_stride else (h, w)
        out = x.new_empty(b, h_out, w_out, self.dim_out)
        if ws == 0:
            xn = self.norm1(x)
            torch.add(self._shortcut(x, xn), self.attn(xn), out=out)
        else:
            self._windowed(x, out)
        return out

    def _shortcut(self, x: torch.Tensor, xn: torch.Tensor) -> torch.Tensor:
        if self.dim == self.dim_out:
            return x
        shortcut = linear(xn, self.proj, self.fast_paths)
        return pool(shortcut, self.fast_paths) if self.q_stride else shortcut

    def _windowed(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """Windowed attention plus shortcut of x (B, H, W, dim), written into ``out`` (B, H', W', dim_out)."""
        ws = self.window_size
        xn = self.norm1(x)
        shortcut = self._shortcut(x, xn)
        windows, _ = window_partition(xn, ws)
        attended = self.attn(windows)  # (B * windows, ws', ws', dim_out)
        if self.q_stride:
            ws //= 2
        b, h, w, c = shortcut.shape
        nh, nw = -(-h // ws), -(-w // ws)
        # Window (i, j), pixel (r, s) is grid pixel (i * ws + r, j * ws + s): the residual add reads the
        # windows through this 6-d view and writes the grid, so they are never merged back on their own.
        grid = attended.view(b, nh, nw, ws, ws, c).transpose(2, 3)
        if (nh * ws, nw * ws) == (h, w):
            torch.add(shortcut.view(b, nh, ws, nw, ws, c), grid, out=out.view(b, nh, ws, nw, ws, c))
        else:  # padded windows: crop the padding off the merged grid
            torch.add(shortcut, grid.reshape(b, nh * ws, nw * ws, c)[:, :h, :w], out=out)

    def _mlp_residual_(self, x: torch.Tensor) -> torch.Tensor:
        """x += mlp(norm2(x)) in place (x is the fresh tensor of ``_attention_residual``).

        On CPU, in chunks of rows: each token's MLP is independent of the others, so only float rounding
        changes, and the hidden activations stay in memory the allocator reuses; the residual add happens
        chunk by chunk, so no full-size MLP output is ever concatenated.
        """
        budget = self.fast_paths.hiera_mlp_chunk_elements
        rows = max(1, budget // self.mlp.hidden_dim)
        flat = x.view(-1, x.shape[-1])
        if not budget or flat.shape[0] <= rows:
            return x.add_(self.mlp(self.norm2(x)))
        for start in range(0, flat.shape[0], rows):
            part = flat[start:start + rows]
            part.add_(self.mlp(self.norm2(part)))
        return x


class Hiera(UsesFastPaths, nn.Module):
    """The trunk: (B, 3, S, S) normalised image -> the last block's output of every stage, channels-last
    (B, S/4 * 2^-i, S/4 * 2^-i, C * 2^i) for stages i = 0..3 (highest resolution first)."""

    def __init__(self, embed_dim: int = 96, num_heads: int = 1, q_pool: int = 3, stages: tuple[int, ...] = (2, 3, 16, 3),
                 dim_mul: float = 2.0, head_mul: float = 2.0,
                 window_pos_embed_bkg_spatial_size: tuple[int, int] = (14, 14),
                 window_spec: tuple[int, ...] = (8, 4, 14, 7),
                 global_att_blocks: tuple[int, ...] = (12, 16, 20), mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if len(stages) != len(window_spec):
            raise ValueError(f"{len(stages)} stages but {len(window_spec)} window sizes")
        self.window_spec = tuple(window_spec)
        self.stages = tuple(stages)
        self.global_att_blocks = tuple(global_att_blocks)
        self.stage_ends = [sum(stages[:i]) - 1 for i in range(1, len(stages) + 1)]
        self.q_pool_blocks = [end + 1 for end in self.stage_ends[:-1]][:q_pool]
        self.patch_embed = PatchEmbed(embed_dim=embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *window_pos_embed_bkg_spatial_size))
        self.pos_embed_window = nn.Parameter(torch.zeros(1, embed_dim, window_spec[0], window_spec[0]))
        self.blocks = nn.ModuleList()
        block_dims: list[int] = []
        stage = 0
        for i in range(sum(stages)):
            dim_out = embed_dim
            # The first block of a stage still uses the previous stage's window (Meta's convention).
            window_size = 0 if i in self.global_att_blocks else self.window_spec[stage]
            if i - 1 in self.stage_ends:
                dim_out = int(embed_dim * dim_mul)
                num_heads = int(num_heads * head_mul)
                stage += 1
            self.blocks.append(MultiScaleBlock(embed_dim, dim_out, num_heads, mlp_ratio,
                                               q_stride=i in self.q_pool_blocks, window_size=window_size))
            block_dims.append(dim_out)
            embed_dim = dim_out
        self.channel_list = [block_dims[i] for i in self.stage_ends[::-1]]
        self._pos_cache: tuple[tuple, torch.Tensor] | None = None

    def position_embedding(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        """(1, h, w, C): the background table resized bicubically to the grid, plus the window table tiled.

        Cached per grid size, device and dtype; the key includes the tables' in-place versions, so
        ``load_state_dict`` (which copies into them) invalidates it.
        """
        key = (h, w, like.device, like.dtype, self.pos_embed._version, self.pos_embed_window._version,
               self.pos_embed.data_ptr(), self.pos_embed_window.data_ptr())
        if self._pos_cache is not None and self._pos_cache[0] == key:
            return self._pos_cache[1]
        window = self.pos_embed_window
        pos = F.interpolate(self.pos_embed, size=(h, w), mode="bicubic")
        reps = [a // b for a, b in zip(pos.shape, window.shape, strict=True)]
        pos = (pos + window.tile(reps)).permute(0, 2, 3, 1).to(like.dtype).contiguous()
        self._pos_cache = (key, pos)
        return pos

    def position_embedding_reference(self, h: int, w: int) -> torch.Tensor:
        """Meta's ``_get_pos_embed``: (1, h, w, C), computed anew."""
        window = self.pos_embed_window
        pos = F.interpolate(self.pos_embed, size=(h, w), mode="bicubic")
        pos = pos + window.tile([a // b for a, b in zip(pos.shape, window.shape, strict=True)])
        return pos.permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)
        if self.fast_paths.cached_position_embedding:
            x = x.add_(self.position_embedding(x.shape[1], x.shape[2], x))  # the convolution's fresh output
        else:
            x = x + self.position_embedding_reference(x.shape[1], x.shape[2])
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.stage_ends:
                outputs.append(x)
        return outputs
