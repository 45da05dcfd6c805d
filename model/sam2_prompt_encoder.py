"""SAM 2's prompt encoder: SAM's, with box corners encoded as labelled points.

The weights and keys are those of SAM's ``PromptEncoder`` (``pe_layer``, ``point_embeddings.0-3``,
``not_a_point_embed``, ``mask_downscaling``, ``no_mask_embed``). What differs is how SAM 2's image
predictor feeds it: a box becomes two points labelled 2 (top-left) and 3 (bottom-right) placed *before*
the clicks, and the point list is always closed by one padding point (label -1), box or no box. SAM's
predictor instead encoded boxes separately and padded only box-less prompts. The token sequence, and so
the masks, depend on that order.
"""

from __future__ import annotations

import torch

from model.prompt_encoder import PromptEncoder


class Sam2PromptEncoder(PromptEncoder):
    point_labels = 4  # 0 negative, 1 positive, 2 / 3 a box's top-left / bottom-right corner

    def embed_prompts(self, coords: torch.Tensor | None, labels: torch.Tensor | None, boxes: torch.Tensor | None,
                      masks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse (B, N, C) and dense (B, C, h, w) embeddings the way SAM 2's image predictor builds them.

        coords (B, N, 2) xy and labels (B, N) of the clicks, boxes (B, 4) xyxy, all in input-frame pixels;
        masks (B, 1, 4h, 4w) low-res logits. The dense embedding is an expanded view without a mask.
        """
        points: tuple[torch.Tensor, torch.Tensor] | None = None
        if coords is not None:
            if labels is None:
                raise ValueError("labels must be given with coords")
            points = (coords, labels)
        if boxes is not None:
            corners = boxes.reshape(-1, 2, 2)
            corner_labels = torch.tensor([[2, 3]], dtype=torch.int64, device=boxes.device).expand(corners.shape[0], 2)
            if points is not None:
                points = (torch.cat([corners, points[0].to(corners.dtype)], dim=1),
                          torch.cat([corner_labels, points[1].to(torch.int64)], dim=1))
            else:
                points = (corners, corner_labels)
        # No separate boxes: every point list gets its padding point, as in SAM 2's predictor.
        return self(points, None, masks)
