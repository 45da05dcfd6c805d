"""SAM 2's image encoder: the Hiera trunk and its feature-pyramid neck.

Keys follow Meta's ``sam2.modeling.backbones.image_encoder`` (``trunk.*``, ``neck.convs.N.conv.*``). The
neck projects each of the trunk's four stages to ``d_model`` channels with a 1x1 convolution; the two
lowest-resolution levels are summed top-down (nearest 2x upsampling), the two highest are used as they
are, and the lowest level is then dropped (Meta's ``scalp=1``). Nothing else of Meta's neck is needed by
the image predictor: its sine position encodings feed only the video memory.

The image predictor then projects levels 0 and 1 once more, with the mask decoder's ``conv_s0`` /
``conv_s1`` (1x1 convolutions to d_model/8 and d_model/4 channels), and adds ``no_mem_embed`` to level 2.
Two 1x1 convolutions in a row are one 1x1 convolution, so ``forward`` takes those projections and, with
the ``folded_neck_projections`` fast path (``model.fast_paths``), folds them into the neck's: level 0
(256 x 256 at 1024 px) goes straight from the trunk's 96 channels to 32, never through the 256-channel map
Meta computes and then shrinks (a quarter of Meta's neck time). Without it they run after the neck, as
Meta runs them.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from model.fast_paths import UsesFastPaths
from model.hiera import Hiera

# Neck settings of every released SAM 2 / 2.1 model (not recorded in the weights).
FPN_TOP_DOWN_LEVELS = (2, 3)
SCALP = 1


class FpnNeck(UsesFastPaths, nn.Module):
    """1x1 lateral convolutions (``convs.0`` for the trunk's last stage ... ``convs.3`` for its first) and
    a nearest-neighbour top-down sum on ``fpn_top_down_levels``."""

    def __init__(self, d_model: int, backbone_channel_list: list[int],
                 fpn_top_down_levels: tuple[int, ...] = FPN_TOP_DOWN_LEVELS) -> None:
        super().__init__()
        self.d_model = d_model
        self.backbone_channel_list = list(backbone_channel_list)
        self.convs = nn.ModuleList(nn.Sequential(OrderedDict(conv=nn.Conv2d(dim, d_model, kernel_size=1)))
                                   for dim in backbone_channel_list)
        self.fpn_top_down_levels = tuple(fpn_top_down_levels)

    def lateral(self, level: int, x: torch.Tensor, project: tuple[torch.Tensor, torch.Tensor] | None = None,
                extra_bias: torch.Tensor | None = None) -> torch.Tensor:
        """The 1x1 convolution of ``level`` on channels-last x (B, H, W, Cin) -> (B, H, W, d_model), as a
        matrix product; ``project`` (weight (Cout, d_model), bias) is folded in after it, ``extra_bias``
        (d_model,) added to the bias."""
        conv = cast(nn.Conv2d, self.convs[len(self.convs) - 1 - level].conv)
        weight, bias = conv.weight.flatten(1), conv.bias
        assert bias is not None  # the lateral convolutions are built with biases
        # The folding is done in fp32 even under autocast: a few thousand products, and the folded weights
        # should be as exact as the two convolutions they replace.
        with torch.autocast(x.device.type, enabled=False):
            if extra_bias is not None:
                bias = bias.float() + extra_bias.float()
            if project is not None:
                p_weight, p_bias = project
                weight, bias = p_weight.float() @ weight.float(), p_weight.float() @ bias.float() + p_bias.float()
        return F.linear(x, weight.to(x.dtype), bias.to(x.dtype))

    def forward(self, xs: list[torch.Tensor],
                projections: tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
                embed_bias: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Trunk stages (highest resolution first, channels-last) -> the kept levels as (B, C, H, W) views of
        channels-last tensors, highest resolution first. ``projections`` for levels 0 and 1 and
        ``embed_bias`` for the last kept level, when given, are folded in (see the module docstring)."""
        n = len(self.convs) - 1
        kept = n + 1 - SCALP
        fold = self.fast_paths.folded_neck_projections
        out: list[torch.Tensor] = []  # lowest resolution first
        previous = None
        for level in range(n, -1, -1):
            project = projections[level] if projections is not None and level < len(projections) else None
            bias = embed_bias if level == kept - 1 else None
            lateral = self.lateral(level, xs[level], project, bias) if fold else self.lateral(level, xs[level])
            if level in self.fpn_top_down_levels and previous is not None:
                b, h, w, c = previous.shape
                lateral.view(b, h, 2, w, 2, c).add_(previous.view(b, h, 1, w, 1, c).to(lateral.dtype))
            previous = lateral
            if not fold:  # Meta's order: the image predictor's projection and bias after the neck
                if project is not None:
                    lateral = F.linear(lateral, project[0].to(lateral.dtype), _cast(project[1], lateral))
                if bias is not None:
                    lateral = lateral + bias.to(lateral.dtype)
            out.append(lateral)
        return [o.permute(0, 3, 1, 2) for o in out[::-1][:kept]]


def _cast(tensor: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(like.dtype)


class ImageEncoder(nn.Module):
    """Hiera trunk + FPN neck: (B, 3, S, S) normalised image -> feature levels at strides 4, 8, 16."""

    def __init__(self, trunk: Hiera, neck: FpnNeck) -> None:
        super().__init__()
        self.trunk = trunk
        self.neck = neck
        if trunk.channel_list != neck.backbone_channel_list:
            raise ValueError(f"trunk channels {trunk.channel_list} do not match the neck's "
                             f"{neck.backbone_channel_list}")

    def forward(self, x: torch.Tensor, s0_weight: torch.Tensor | None = None, s0_bias: torch.Tensor | None = None,
                s1_weight: torch.Tensor | None = None, s1_bias: torch.Tensor | None = None,
                embed_bias: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Without the optional tensors: Meta's ``backbone_fpn`` (d_model channels at every level). With the
        decoder's ``conv_s0`` / ``conv_s1`` (weights as (Cout, d_model) matrices) and ``no_mem_embed``:
        what the image predictor keeps, [s0 (B, d/8, S/4, S/4), s1 (B, d/4, S/8, S/8), embedding (B, d, S/16,
        S/16)]. Plain tensors rather than modules, so that ``torch.compile`` of this module sees them as inputs."""
        projections = None
        if s0_weight is not None:
            projections = ((s0_weight, s0_bias), (s1_weight, s1_bias))
        return self.neck(self.trunk(x), projections, embed_bias)
