"""The two-way transformer of the mask decoder: prompt tokens and image tokens attend to each other.

Keys follow Meta's ``TwoWayTransformer``; attention runs through ``F.scaled_dot_product_attention``,
except image tokens attending to the few prompt tokens on the CPU (see ``Attention.attend``). The two
projections of the same image tokens in each block run as one matmul (see ``TwoWayAttentionBlock``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.common import MLPBlock


class Attention(nn.Module):
    """Multi-head attention whose q/k/v projections may shrink the width by ``downsample_rate``."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(f"{num_heads} heads do not divide the attention width {self.internal_dim}")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.out_proj(self.attend(self.q_proj(q), self.k_proj(k), self.v_proj(v)))

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attention of projected q (B, Nq, D) over projected k, v (B, Nk, D) -> (B, Nq, D), heads merged.

        Many queries over a handful of keys (the 4096 image tokens over the ~7 prompt tokens) is the
        worst case of PyTorch's CPU attention kernels: a softmax over 7 values per row, 32768 times,
        costs more than all the arithmetic. There the heads are laid block-diagonally instead, so that
        scores and output are one matmul each and the softmax runs along the long axis of the query
        tokens. The zeros off the diagonal add nothing, so the result is the same up to float rounding.
        """
        heads = self.num_heads
        if q.device.type == "cpu" and k.shape[1] * heads <= _FEW_KEYS and q.shape[1] >= _MANY_QUERIES:
            b, n_k, width = k.shape
            head_dim = width // heads
            eye = torch.eye(heads, dtype=k.dtype, device=k.device).view(1, heads, 1, heads, 1)
            # (B, heads * Nk, D): row (h, j) holds key j's head-h slice in head h's columns, zeros elsewhere.
            k_blocks = (k.reshape(b, n_k, heads, head_dim).transpose(1, 2).unsqueeze(3) * eye)
            v_blocks = (v.reshape(b, n_k, heads, head_dim).transpose(1, 2).unsqueeze(3) * eye)
            scores = (k_blocks.reshape(b, heads * n_k, width) @ q.transpose(1, 2)).mul_(head_dim**-0.5)
            weights = scores.reshape(b, heads, n_k, -1).softmax(dim=2).reshape(b, heads * n_k, -1)
            return weights.transpose(1, 2) @ v_blocks.reshape(b, heads * n_k, width)
        out = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v))
        b, _, n, _ = out.shape
        return out.transpose(1, 2).reshape(b, n, self.internal_dim)


# Where ``Attention.attend`` lays the heads block-diagonally: at most this many (key, head) pairs, and
# at least this many queries. The block form multiplies by zeros ``heads`` times over, cheap only there.
_FEW_KEYS = 256
_MANY_QUERIES = 256


class TwoWayAttentionBlock(nn.Module):
    """Self-attention of the tokens, tokens -> image, MLP on the tokens, image -> tokens."""

    def __init__(self, embedding_dim: int, num_heads: int, mlp_dim: int = 2048,
                 activation: type[nn.Module] = nn.ReLU, attention_downsample_rate: int = 2,
                 skip_first_layer_pe: bool = False) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> tuple[Tensor, Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        q = queries + query_pe
        k = keys + key_pe
        # The image tokens k are the keys of token -> image and the queries of image -> token: both
        # projections in one matmul (twice as wide, better use of the CPU), split after.
        to_image, to_token = self.cross_attn_token_to_image, self.cross_attn_image_to_token
        weight = torch.cat([to_image.k_proj.weight, to_token.q_proj.weight])
        bias = torch.cat([to_image.k_proj.bias, to_token.q_proj.bias])
        k_to_image, q_to_token = F.linear(k, weight, bias).split([to_image.internal_dim, to_token.internal_dim], -1)
        attended = to_image.attend(to_image.q_proj(q), k_to_image, to_image.v_proj(keys))
        queries = self.norm2(queries + to_image.out_proj(attended))

        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        attended = to_token.attend(q_to_token, to_token.k_proj(q), to_token.v_proj(queries))
        keys = self.norm4(keys + to_token.out_proj(attended))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int,
                 activation: type[nn.Module] = nn.ReLU, attention_downsample_rate: int = 2) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(embedding_dim, num_heads, mlp_dim, activation, attention_downsample_rate,
                                 skip_first_layer_pe=(i == 0))
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor) -> tuple[Tensor, Tensor]:
        """image_embedding, image_pe (B, C, h, w); point_embedding (B, N, C) -> tokens, image tokens."""
        # Token-major and contiguous once here, so the adds and projections below run on dense memory.
        keys = image_embedding.flatten(2).transpose(1, 2).contiguous()
        key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        q = queries + point_embedding
        k = keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys
