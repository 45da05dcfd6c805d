"""The two-way transformer of the mask decoder: prompt tokens and image tokens attend to each other.

Keys and the order of operations follow Meta's ``TwoWayTransformer``. ``Attention.forward`` picks, once per
call and by the model's ``FastPaths``, between Meta's attention, the same through SDPA (``fused_attention``)
and, where the few prompt tokens meet the 4096 image tokens, the forms with the image side's projections
folded into the tokens (``folded_decoder_attention``, explained in ``model.fast_paths``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.common import MLPBlock, matmul_in_halves
from model.fast_paths import UsesFastPaths

# Heads of the decoder's two-way transformer: not visible in any tensor shape; every SAM and SAM 2 release uses 8.
DECODER_HEADS = 8


class Attention(UsesFastPaths, nn.Module):
    """Multi-head attention whose q/k/v projections may shrink the width by ``downsample_rate``."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(f"{num_heads} heads do not divide the attention width {self.internal_dim}")
        self.head_dim = self.internal_dim // num_heads
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _separate_heads(self, x: Tensor) -> Tensor:
        """(B, N, internal_dim) -> (B, heads, N, head_dim)."""
        b, n, _ = x.shape
        return x.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def _recombine_heads(self, x: Tensor) -> Tensor:
        """(B, heads, N, head_dim) -> (B, N, internal_dim)."""
        b, _, n, _ = x.shape
        return x.transpose(1, 2).reshape(b, n, self.internal_dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Queries (B, Nq, C) attend to keys (B, Nk, C) with values (B, Nk, C) -> (B, Nq, C)."""
        policy = self.fast_paths
        if policy.folded_decoder_attention and q.shape[1] > k.shape[1]:
            return self.image_to_tokens_folded(q, k, v)
        if policy.folded_decoder_attention and q.shape[1] < k.shape[1] and self.folds_image_side(q.shape[1]):
            return self.tokens_to_image_folded(q, k, v)
        if q.shape[0] != k.shape[0]:  # an image shared by the batch (shared_decoder_image) meets many prompts
            batch = max(q.shape[0], k.shape[0])
            q, k, v = (x.expand(batch, -1, -1) for x in (q, k, v))
        q = self._separate_heads(self.q_proj(q))
        k = self._separate_heads(self.k_proj(k))
        v = self._separate_heads(self.v_proj(v))
        if policy.fused_attention:
            return self.out_proj(self._recombine_heads(F.scaled_dot_product_attention(q, k, v)))
        attn = q @ k.permute(0, 1, 3, 2)
        attn = attn / math.sqrt(self.head_dim)
        attn = torch.softmax(attn, dim=-1)
        return self.out_proj(self._recombine_heads(attn @ v))

    # --- the folded_decoder_attention fast path (model.fast_paths) -----------------------------------

    def folds_image_side(self, n_tokens: int) -> bool:
        """Whether the folded forms cost less than Meta's for ``n_tokens`` prompt tokens.

        Folded, the image tokens meet ``heads x n_tokens`` vectors of ``embedding_dim`` twice; in Meta's
        order they go through two ``embedding_dim x internal_dim`` projections. A click or a box has 7
        tokens (56 with 8 heads against 128); only prompts of a dozen points or more are cheaper
        the usual way.
        """
        return self.num_heads * n_tokens <= self.internal_dim

    def tokens_to_image_folded(self, tokens: Tensor, image_keys: Tensor, image_values: Tensor) -> Tensor:
        """Prompt tokens (B, Nt, C) attending to image tokens: keys and values (B, N, C) -> (B, Nt, C).

        For head h with key weights Wk_h and bias bk_h, the scores ``q_h . (Wk_h x + bk_h)`` are
        ``(Wk_h^T q_h) . x`` plus a constant per row, which softmax ignores; and since each row of weights
        sums to one, the output ``sum_n a_n (Wv_h x_n + bv_h)`` is ``Wv_h (sum_n a_n x_n) + bv_h``.
        """
        b, n_t, _ = tokens.shape
        heads, head_dim, width = self.num_heads, self.head_dim, self.embedding_dim
        q = self.q_proj(tokens).view(b, n_t, heads, head_dim) * head_dim**-0.5
        pulled = torch.einsum("bthd,hdc->bhtc", q, self.k_proj.weight.view(heads, head_dim, width))
        scores = _scores(image_keys, pulled.reshape(b, heads * n_t, width))  # (B, heads * Nt, N)
        mixed = _mix(scores.softmax(dim=-1), image_values)  # (B, heads * Nt, C)
        out = torch.einsum("bhtc,hdc->bthd", mixed.view(b, heads, n_t, width),
                           self.v_proj.weight.view(heads, head_dim, width))
        return self.out_proj(out.reshape(b, n_t, self.internal_dim) + self.v_proj.bias)

    def image_to_tokens_folded(self, image_queries: Tensor, tokens_keys: Tensor, tokens_values: Tensor) -> Tensor:
        """Image tokens (B, N, C) attending to prompt tokens: keys and values (B, Nt, C) -> (B, N, C).

        The score of image token x with token key k_h is ``(Wq_h x + bq_h) . k_h = x . (Wq_h^T k_h) +
        bq_h . k_h``, and the output ``Wo (concat_h sum_t a_ht v_ht) + bo`` is ``sum_h sum_t a_ht (Wo_h
        v_ht) + bo``: both projections of the image side become products with ``heads x Nt`` vectors. The
        softmax over the few keys runs along the image axis, where it vectorises (a softmax of 7 values
        per row, 32768 rows, costs more than the arithmetic).
        """
        if not self.folds_image_side(tokens_keys.shape[1]):
            return self._image_to_many_tokens(image_queries, tokens_keys, tokens_values)
        weights, pushed = self._folded_image_to_tokens_parts(image_queries, tokens_keys, tokens_values)
        out = weights.transpose(1, 2) @ pushed  # (B, N, C)
        return out.add_(self.out_proj.bias)

    def add_image_to_tokens(self, image: Tensor, image_queries: Tensor, tokens_keys: Tensor,
                            tokens_values: Tensor) -> Tensor:
        """``image + self(image_queries, tokens_keys, tokens_values)``: the image's residual update.

        Folded (``folded_decoder_attention``), the attention output is a product of the weights with
        ``heads x Nt`` pushed vectors, and the residual is that product accumulated onto the image (one
        ``baddbmm``) rather than a tensor of the image's size written and added in two more passes. The
        output bias rides along in the pushed vectors: each head's weights over the tokens sum to one, so
        adding ``bias / heads`` to every pushed vector adds the bias once. Rounding only.
        """
        n_t = tokens_keys.shape[1]
        if not (self.fast_paths.folded_decoder_attention and self.folds_image_side(n_t)):
            return image + self(image_queries, tokens_keys, tokens_values)
        weights, pushed = self._folded_image_to_tokens_parts(image_queries, tokens_keys, tokens_values)
        pushed = pushed + self.out_proj.bias / self.num_heads
        batch = weights.shape[0]
        return torch.baddbmm(image.expand(batch, -1, -1), weights.transpose(1, 2), pushed)

    def _folded_image_to_tokens_parts(self, image_queries: Tensor, tokens_keys: Tensor,
                                      tokens_values: Tensor) -> tuple[Tensor, Tensor]:
        """The folded image -> tokens attention as weights (B, heads * Nt, N) and pushed vectors
        (B, heads * Nt, C): the output without its bias is ``weights^T @ pushed``."""
        b, n_t, _ = tokens_keys.shape
        heads, head_dim, width = self.num_heads, self.head_dim, self.embedding_dim
        k = self.k_proj(tokens_keys).view(b, n_t, heads, head_dim) * head_dim**-0.5
        v = self.v_proj(tokens_values).view(b, n_t, heads, head_dim)
        pulled = torch.einsum("bthd,hdc->bhtc", k, self.q_proj.weight.view(heads, head_dim, width))
        offset = torch.einsum("bthd,hd->bht", k, self.q_proj.bias.view(heads, head_dim))
        scores = _scores(image_queries, pulled.reshape(b, heads * n_t, width))  # (B, heads * Nt, N)
        scores = scores.view(b, heads, n_t, -1).add_(offset.unsqueeze(-1))
        weights = scores.softmax(dim=2).view(b, heads * n_t, -1)
        pushed = torch.einsum("bthd,chd->bhtc", v, self.out_proj.weight.view(width, heads, head_dim))
        return weights, pushed.reshape(b, heads * n_t, width)

    def _image_to_many_tokens(self, image_queries: Tensor, tokens_keys: Tensor, tokens_values: Tensor) -> Tensor:
        """Image tokens attending to prompt tokens too many to fold: Meta's projections, with the scores
        laid out (B, heads, Nt, N) so that the softmax over the tokens still runs along the image axis."""
        q = self._separate_heads(self.q_proj(image_queries))
        k = self._separate_heads(self.k_proj(tokens_keys)) * self.head_dim**-0.5
        v = self._separate_heads(self.v_proj(tokens_values))
        weights = (k @ q.transpose(2, 3)).softmax(dim=2)
        return self.out_proj(self._recombine_heads(weights.transpose(2, 3) @ v))


def _scores(image: Tensor, vectors: Tensor) -> Tensor:
    """Dot products of few vectors (B, M, C) with every image token (B', N, C) -> (B, M, N), contiguous.

    Computed as image @ vectors^T and transposed after: MKL runs the tall product with both operands in
    their stored order about 1.5x faster than vectors @ image^T, which reads the image transposed, and
    transposing the small result back costs a tenth of that. An image shared by the whole batch (B' = 1,
    the ``shared_decoder_image`` fast path) meets all B x M vectors in one product: a broadcast batched
    product would first copy the image B times.
    """
    if image.shape[0] == 1 and vectors.shape[0] > 1:
        b, m, c = vectors.shape
        flat = image[0] @ vectors.reshape(b * m, c).T  # (N, B * M)
        return flat.T.reshape(b, m, -1)
    return (image @ vectors.transpose(1, 2)).transpose(1, 2).contiguous()


# Up to this many weight rows (16 boxes of 7 tokens x 8 heads), ``_mix`` sums in two fixed halves; taller
# products are divided between threads by rows, which keeps each sum whole.
_SPLIT_ROWS = 1024


def _mix(weights: Tensor, image: Tensor) -> Tensor:
    """Weights (B, M, N) times image tokens (B', N, C) -> (B, M, C); one product when the image is shared.

    A product of few rows (a click's 56, a chunk of boxes) sums over the 4096 image tokens, and is summed in
    two fixed halves (``matmul_in_halves``) so that the thread count does not change its bits; about 0.1 ms
    more per product on one thread.
    """
    b, m, n = weights.shape
    if image.shape[0] == 1 and b * m <= _SPLIT_ROWS and n % 2 == 0:
        return matmul_in_halves(weights.reshape(b * m, n), image[0]).view(b, m, -1)
    if image.shape[0] == 1 and b > 1:
        return (weights.reshape(b * m, n) @ image[0]).view(b, m, -1)
    return weights @ image


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
        # Self attention of the tokens.
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            attn_out = self.self_attn(q=q, k=q, v=queries)
            queries = queries + attn_out
        queries = self.norm1(queries)

        # Tokens attending to the image. The image's keys with their positions serve both cross attentions:
        # the image does not change in between (Meta adds them twice).
        q = queries + query_pe
        k = keys + key_pe
        attn_out = self.cross_attn_token_to_image(q=q, k=k, v=keys)
        queries = queries + attn_out
        queries = self.norm2(queries)

        # MLP on the tokens.
        mlp_out = self.mlp.forward_in_halves(queries)  # the same bits on one thread or two
        queries = queries + mlp_out
        queries = self.norm3(queries)

        # The image attending to the tokens.
        q = queries + query_pe
        keys = self.cross_attn_image_to_token.add_image_to_tokens(keys, image_queries=k, tokens_keys=q,
                                                                  tokens_values=queries)
        keys = self.norm4(keys)
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
        """image_embedding, image_pe (B, C, h, w); point_embedding (B, N, C) -> tokens, image tokens.

        ``image_embedding`` and ``image_pe`` may also be (1, C, h, w) and shared by the B prompts: the first
        layer's image side then runs once for all of them, and the image becomes B images only where the
        first layer's image update makes it so (the ``shared_decoder_image`` fast path).
        """
        # Token-major and contiguous once here, so the adds and products below run on dense memory.
        keys = image_embedding.flatten(2).transpose(1, 2).contiguous()
        key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        q = queries + point_embedding
        k = keys + key_pe
        attn_out = self.final_attn_token_to_image(q=q, k=k, v=keys)
        queries = queries + attn_out
        queries = self.norm_final_attn(queries)
        return queries, keys
