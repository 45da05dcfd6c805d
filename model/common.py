"""Small building blocks shared by the encoder, the prompt encoder and the mask decoder.

Parameter names follow Meta's ``segment_anything.modeling.common`` so official checkpoints load with
``strict=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Upper bound on the elements of the hidden activations an MLP holds at once on CPU (fp32: 16 MiB).
_MLP_CHUNK_ELEMENTS = 1 << 22


def gelu_(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU of x in place (exact erf form by default); see ``activate_`` for why in place."""
    return torch.ops.aten.gelu_(x, approximate=approximate)


def activate_(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(x)``, computed in place on x (which the caller no longer needs) for GELU and ReLU.

    A fresh output of tens of MiB is new memory for the allocator to map, and on the CPU its first
    touch costs a page fault per 4 KiB: an out-of-place GELU of ViT-B's (4096, 3072) hidden layer took
    4x as long as the same GELU in place, which reads and writes memory already mapped. Same kernel,
    same numbers.
    """
    if isinstance(act, nn.GELU):
        return gelu_(x, act.approximate)
    if isinstance(act, nn.ReLU):
        return x.relu_()
    return act(x)


class MLPBlock(nn.Module):
    """Two linear layers with an activation between them (the transformer feed-forward block)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (..., C) -> (..., C). On CPU, many tokens go through in chunks of rows.

        Each token's feed-forward is independent of the others, so chunking changes numbers only by
        float rounding (the matmuls block differently). It keeps the hidden activations (ViT-B at
        1024 px: 4096 x 3072 floats, 48 MiB) small enough to stay in the last-level cache between the
        two matmuls and in memory the allocator reuses, instead of mapping and faulting in a fresh
        48 MiB block per layer and writing it out to DRAM and back.
        """
        rows = max(1, _MLP_CHUNK_ELEMENTS // self.lin1.out_features)
        if x.device.type != "cpu" or x.numel() // x.shape[-1] <= rows:
            return self.lin2(activate_(self.act, self.lin1(x)))
        flat = x.reshape(-1, x.shape[-1])
        # Plain module calls per chunk (not matmuls into a preallocated output), so autocast applies
        # exactly as it does to the whole.
        chunks = [self.lin2(activate_(self.act, self.lin1(flat[start:start + rows])))
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
