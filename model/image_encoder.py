"""SAM's ViT image encoder (ViT-B/L/H and custom sizes) in Meta's ``ImageEncoderViT`` layout.

State-dict keys are identical to Meta's so ``sam_vit_*.pth`` load with ``strict=True``. What differs
is how attention runs: Meta multiplies q and k by hand, adds the decomposed relative-position terms to
the full attention matrix and applies softmax in separate passes. Here the relative-position terms are
turned into an additive float bias and handed to ``F.scaled_dot_product_attention`` together with q, k
and v, so the fused kernel does scale, bias, softmax and the product with v in one go. On CPU that is
where most of the encoder speed-up comes from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.common import LayerNorm2d, MLPBlock

# Upper bound on elements of one attention-bias chunk (fp32: 16 MiB, about an L2 + share of L3). A global
# block of ViT-H at 1024 px would otherwise need 16 heads x 4096 x 4096 floats = 1 GiB at once, and on
# CPU a bias that has left the cache before SDPA reads it costs more than the attention itself.
_MAX_BIAS_ELEMENTS = 1 << 22
# On a GPU the concern is kernel launches, not caches: 64 M elements is 4 chunks per ViT-B global block.
_MAX_BIAS_ELEMENTS_GPU = 1 << 26
# Windowed blocks on CPU run one band of window rows at a time (see Attention.forward).
_WINDOW_BANDS = True


class PatchEmbed(nn.Module):
    """Image to patch tokens: a strided convolution, output channels-last (B, H, W, C)."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position embeddings for every (query, key) pair along one axis: (q_size, k_size, C).

    The table is linearly resampled when it was trained for another size, as in Meta's code.
    """
    max_rel_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_rel_dist:
        resized = F.interpolate(rel_pos.t().unsqueeze(0).float(), size=max_rel_dist, mode="linear")
        rel_pos = resized.squeeze(0).t().to(rel_pos.dtype)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative.long()]


class Attention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) grid with decomposed relative positions."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, use_rel_pos: bool = True,
                 input_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("relative positions need the input size of the attention grid")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor, window_size: int = 0) -> torch.Tensor:
        """Self-attention over x (B, H, W, C), within non-overlapping windows if ``window_size`` > 0.

        Meta partitions the normalised input into windows (zero padding at the bottom / right edge)
        and runs qkv and proj per window. Both are per-token linear maps, so here they run on the
        unpadded grid and only q, k, v are partitioned; a zero input maps to qkv's bias, so the
        padding is filled with that bias and the result is the same.
        """
        if window_size == 0:
            return self.proj(self.attend(self.qkv(x)))
        if x.device.type == "cpu" and _WINDOW_BANDS and x.shape[1] > window_size:
            # One band of window rows at a time: windows never straddle bands (both start at row 0), so
            # this is the same computation, with every intermediate (qkv, padded windows, output) a
            # tenth of the size: small enough to stay in cache and in memory the allocator reuses,
            # where the whole grid's 38-45 MiB tensors were mapped and faulted in afresh each block.
            bands = [self._windowed(x[:, top:top + window_size], window_size)
                     for top in range(0, x.shape[1], window_size)]
            return torch.cat(bands, dim=1)
        return self._windowed(x, window_size)

    def _windowed(self, x: torch.Tensor, window_size: int) -> torch.Tensor:
        """Windowed attention over x (B, H, W, C), qkv and proj included."""
        h, w = x.shape[1:3]
        qkv = self.qkv(x)
        fill = self.qkv.bias if self.qkv.bias is not None else qkv.new_zeros(qkv.shape[-1])
        qkv, padded = window_partition(qkv, window_size, fill)
        out = window_unpartition(self.attend(qkv), window_size, padded, (h, w))
        return self.proj(out)

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """Attention from fused projections (B, H, W, 3C) -> (B, H, W, C), before ``proj``."""
        b, h, w, _ = qkv.shape
        n = h * w
        # (B, heads, N, head_dim) views into qkv: SDPA reads strided inputs, no copy needed.
        q, k, v = (t.transpose(1, 2) for t in qkv.reshape(b, n, 3, self.num_heads, -1).unbind(2))
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v)
            return out.transpose(1, 2).reshape(b, h, w, -1)
        rh = get_rel_pos(h, h, self.rel_pos_h).to(q.dtype)
        rw = get_rel_pos(w, w, self.rel_pos_w).to(q.dtype)
        # Chunks over windows, heads and query rows keep each bias small enough to be consumed from
        # cache right after it is written: a global block of ViT-B at 1024 px would otherwise stream
        # 12 x 4096 x 4096 floats (805 MB) through memory twice.
        out = q.new_empty(b, n, self.num_heads, q.shape[-1])
        out_heads = out.transpose(1, 2)
        # One bias buffer reused by all chunks: a fresh 16 MB tensor per chunk goes back to the OS on
        # free and costs its page faults again on the next chunk, as much time as building the bias.
        buffer: torch.Tensor | None = None
        budget = _MAX_BIAS_ELEMENTS if q.device.type == "cpu" else _MAX_BIAS_ELEMENTS_GPU
        per_window = self.num_heads * n * n
        step_b = max(1, budget // per_window)
        step_h = self.num_heads if step_b > 1 else max(1, budget // (n * n))
        rows_per = h if n * n <= budget else max(1, budget // (w * n))
        for b0 in range(0, b, step_b):
            for h0 in range(0, self.num_heads, step_h):
                for r0 in range(0, h, rows_per):
                    r1 = min(h, r0 + rows_per)
                    idx = (slice(b0, b0 + step_b), slice(h0, h0 + step_h))
                    qs = q[idx][:, :, r0 * w:r1 * w]
                    bias, buffer = _decomposed_bias(qs, rh[r0:r1], rw, w, buffer)
                    out_heads[idx + (slice(r0 * w, r1 * w),)] = F.scaled_dot_product_attention(
                        qs, k[idx], v[idx], attn_mask=bias)
        return out.reshape(b, h, w, -1)


def _decomposed_bias(q: torch.Tensor, rh: torch.Tensor, rw: torch.Tensor, w: int,
                     buffer: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive attention bias (B, heads, rows*w, H*W) for queries q (B, heads, rows*w, C), written
    into ``buffer`` (grown when too small); returns the bias and the buffer.

    Meta adds ``q . R_h[qh, kh]`` and ``q . R_w[qw, kw]`` to the logits; each depends on one key axis
    only, so both are computed small and broadcast into the bias. The broadcast runs on flat 3-d
    views: from the einsum's strided 5-d output it is an order of magnitude slower on CPU.
    """
    b, heads, _, c = q.shape
    r_q = q.reshape(b, heads, -1, w, c)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh).reshape(-1, rh.shape[1], 1)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw).reshape(-1, 1, rw.shape[1])
    numel = rel_h.shape[0] * rh.shape[1] * rw.shape[1]
    if buffer is None or buffer.numel() < numel:
        buffer = q.new_empty(numel)
    bias = torch.add(rel_h, rel_w, out=buffer[:numel].view(-1, rh.shape[1], rw.shape[1]))
    return bias.view(b, heads, r_q.shape[2] * w, -1), buffer


def window_partition(x: torch.Tensor, window_size: int,
                     fill: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Split (B, H, W, C) into (B * windows, ws, ws, C), padding H and W up to a multiple of ws with
    ``fill`` (C,) or zeros."""
    b, h, w, c = x.shape
    pad_h = (window_size - h % window_size) % window_size
    pad_w = (window_size - w % window_size) % window_size
    if pad_h or pad_w:
        padded = x.new_empty(b, h + pad_h, w + pad_w, c)
        padded[:] = 0 if fill is None else fill
        padded[:, :h, :w] = x
        x = padded
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window_size, window_size, wp // window_size, window_size, c)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)
    return windows, (hp, wp)


def window_unpartition(windows: torch.Tensor, window_size: int, padded_hw: tuple[int, int],
                       hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of ``window_partition``: back to (B, H, W, C) without the padding."""
    hp, wp = padded_hw
    h, w = hw
    b = windows.shape[0] // ((hp // window_size) * (wp // window_size))
    x = windows.view(b, hp // window_size, wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    if hp > h or wp > w:
        x = x[:, :h, :w, :]
    return x


class Block(nn.Module):
    """Pre-norm transformer block; windowed attention when ``window_size`` > 0, else global."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 use_rel_pos: bool = True, window_size: int = 0,
                 input_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, use_rel_pos=use_rel_pos,
                              input_size=input_size if window_size == 0 else (window_size, window_size))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), self.window_size)
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT(nn.Module):
    """ViT backbone + neck: (B, 3, S, S) normalised, padded image -> (B, out_chans, S/p, S/p)."""

    def __init__(self, img_size: int = 1024, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, out_chans: int = 256,
                 qkv_bias: bool = True, use_abs_pos: bool = True, use_rel_pos: bool = True,
                 window_size: int = 14, global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed: nn.Parameter | None = None
        if use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, use_rel_pos,
                  window_size=0 if i in global_attn_indexes else window_size, input_size=(grid, grid))
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))
