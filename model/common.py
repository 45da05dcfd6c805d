"""Small building blocks shared by the encoder, the prompt encoder and the mask decoder.

Parameter names follow Meta's ``segment_anything.modeling.common`` so official checkpoints load with
``strict=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.fast_paths import UsesFastPaths


def gelu_(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU of x in place (exact erf form by default)."""
    return torch.ops.aten.gelu_(x, approximate=approximate)


def activate(act: nn.Module, x: torch.Tensor, in_place: bool) -> torch.Tensor:
    """``act(x)``; with ``in_place``, GELU and ReLU overwrite x, which the caller no longer needs.

    The ``in_place_activations`` fast path (``model.fast_paths``): same kernel, same numbers.
    """
    if in_place and isinstance(act, nn.GELU):
        return gelu_(x, act.approximate)
    if in_place and isinstance(act, nn.ReLU):
        return x.relu_()
    return act(x)


def gelu(x: torch.Tensor, in_place: bool) -> torch.Tensor:
    """Exact GELU of x, in place when ``in_place`` (x is an intermediate nobody else holds)."""
    return gelu_(x) if in_place else F.gelu(x)


def matmul_in_halves(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for a (M, K) and b (K, N), K even, summed as two fixed halves of K: one batched product of two.

    With few rows and a long K the math library divides the sum over K between its threads, so the result
    depended on the thread count (``model.runtime.DecodeSlots`` gives a lone click two threads and a click in a
    crowd one). A batched product of two is divided by batch entry, each half summed by one thread whatever the
    count: the same bits on one thread or two. ``b`` may be a transposed view (a weight's ``.T``): no copy.
    """
    half = a.shape[1] // 2
    a_halves = torch.stack([a[:, :half], a[:, half:]])
    b_halves = b.as_strided((2, half, b.shape[1]), (half * b.stride(0), b.stride(0), b.stride(1)),
                            b.storage_offset())
    parts = torch.bmm(a_halves, b_halves)
    return parts[0] + parts[1]


def linear_in_halves(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """``linear(x)`` for x (..., K) with the sum over K in two fixed halves (``matmul_in_halves``; odd K: plain)."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[1] % 2:
        return linear(x)
    out = matmul_in_halves(flat, linear.weight.T)
    if linear.bias is not None:
        out = out.add_(linear.bias)
    return out.view(*x.shape[:-1], linear.out_features)


class MLPBlock(UsesFastPaths, nn.Module):
    """Two linear layers with an activation between them (the transformer feed-forward block)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (..., C) -> (..., C)."""
        budget = self.fast_paths.mlp_chunk_elements
        rows = max(1, budget // self.lin1.out_features)
        if budget and x.numel() // x.shape[-1] > rows:
            return self.forward_chunked(x, rows)
        return self.lin2(activate(self.act, self.lin1(x), self.fast_paths.in_place_activations))

    def forward_in_halves(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` with the second layer's sum over the hidden width in two fixed halves
        (``matmul_in_halves``): the mask decoder's MLP on its few prompt tokens, whose bits must not depend on
        the thread count (on 26 tokens, or 16 boxes' 112, two threads summed the 2048 terms in another order)."""
        hidden = activate(self.act, self.lin1(x), self.fast_paths.in_place_activations)
        return linear_in_halves(hidden, self.lin2)

    def forward_chunked(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """``forward`` on ``rows`` tokens at a time: the ``mlp_chunk_elements`` fast path.

        Plain module calls per chunk (not matmuls into a preallocated output), so autocast applies
        exactly as it does to the whole.
        """
        flat = x.reshape(-1, x.shape[-1])
        in_place = self.fast_paths.in_place_activations
        chunks = [self.lin2(activate(self.act, self.lin1(flat[start:start + rows]), in_place))
                  for start in range(0, flat.shape[0], rows)]
        return torch.cat(chunks).view(*x.shape[:-1], self.lin2.out_features)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor.

    Meta computes mean and variance by hand; we hand the channels-last view to ``F.layer_norm``,
    which is one fused kernel instead of six element-wise passes and gives the same result up to
    float rounding.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)
