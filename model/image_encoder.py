"""SAM's ViT image encoder (ViT-B/L/H and custom sizes) in Meta's ``ImageEncoderViT`` layout.

State-dict keys are identical to Meta's so ``sam_vit_*.pth`` load with ``strict=True``. ``Block`` and
``Attention.forward`` are Meta's order of operations; ``Attention.forward_fused`` beside them is the
``fused_attention`` fast path (SDPA with the relative-position terms as an additive bias built in chunks,
windows of the unpadded grid, bands of window rows), explained in ``model.fast_paths``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.common import LayerNorm2d, MLPBlock
from model.fast_paths import UsesFastPaths


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


def add_decomposed_rel_pos(attn: torch.Tensor, q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                           q_size: tuple[int, int], k_size: tuple[int, int]) -> torch.Tensor:
    """Meta's decomposed relative positions: attention logits (B, q_h*q_w, k_h*k_w) plus ``q . R_h`` and
    ``q . R_w``, each of which depends on one key axis only."""
    (q_h, q_w), (k_h, k_w) = q_size, k_size
    rh = get_rel_pos(q_h, k_h, rel_pos_h)
    rw = get_rel_pos(q_w, k_w, rel_pos_w)
    b, _, dim = q.shape
    r_q = q.reshape(b, q_h, q_w, dim)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
    attn = attn.view(b, q_h, q_w, k_h, k_w) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
    return attn.view(b, q_h * q_w, k_h * k_w)


class Attention(UsesFastPaths, nn.Module):
    """Multi-head self-attention over a (B, H, W, C) grid with decomposed relative positions."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, use_rel_pos: bool = True,
                 input_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("relative positions need the input size of the attention grid")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Meta's attention over each (H, W) grid of x (B, H, W, C): windows are partitioned by the caller."""
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.num_heads, h * w, -1).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.use_rel_pos:
            attn = add_decomposed_rel_pos(attn, q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
        attn = attn.softmax(dim=-1)
        x = (attn @ v).view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(x)

    # --- the fused_attention fast path (model.fast_paths) ---------------------------------------------

    def forward_fused(self, x: torch.Tensor, window_size: int) -> torch.Tensor:
        """The same as Meta's windowed or global attention of a block, on the whole grid x (B, H, W, C).

        qkv and proj run on the unpadded grid, and only q, k, v are partitioned into windows (the
        padding is filled with qkv's bias, which is what a zero input maps to); with ``window_bands``,
        one band of window rows at a time.
        """
        if window_size == 0:
            return self.proj(self._attend(self.qkv(x)))
        if self.fast_paths.window_bands and x.shape[1] > window_size:
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
        out = window_unpartition(self._attend(qkv), window_size, padded, (h, w))
        return self.proj(out)

    def _attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """SDPA from fused projections (B, H, W, 3C) -> (B, H, W, C), before ``proj``.

        The relative-position bias is built in chunks over windows, heads and query rows of at most
        ``attention_bias_elements``, all written into one buffer.
        """
        b, h, w, _ = qkv.shape
        n = h * w
        # (B, heads, N, head_dim) views into qkv: SDPA reads strided inputs, no copy needed.
        q, k, v = (t.transpose(1, 2) for t in qkv.reshape(b, n, 3, self.num_heads, -1).unbind(2))
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v)
            return out.transpose(1, 2).reshape(b, h, w, -1)
        rh = get_rel_pos(h, h, self.rel_pos_h).to(q.dtype)
        rw = get_rel_pos(w, w, self.rel_pos_w).to(q.dtype)
        out = q.new_empty(b, n, self.num_heads, q.shape[-1])
        out_heads = out.transpose(1, 2)
        buffer: torch.Tensor | None = None
        per_window = self.num_heads * n * n
        budget = self.fast_paths.attention_bias_elements or b * per_window
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
    """``add_decomposed_rel_pos``'s terms as an additive bias (B, heads, rows*w, H*W) for queries q
    (B, heads, rows*w, C), written into ``buffer`` (grown when too small); returns the bias and the buffer.

    The broadcast runs on flat 3-d views: from the einsum's strided 5-d output it is an order of
    magnitude slower on CPU.
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


class Block(UsesFastPaths, nn.Module):
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
        shortcut = x
        x = self.norm1(x)
        if self.fast_paths.fused_attention:
            x = self.attn.forward_fused(x, self.window_size)
        else:
            if self.window_size > 0:
                h, w = x.shape[1], x.shape[2]
                x, pad_hw = window_partition(x, self.window_size)
            x = self.attn(x)
            if self.window_size > 0:
                x = window_unpartition(x, self.window_size, pad_hw, (h, w))
        x = shortcut + x
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
