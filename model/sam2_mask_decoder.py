"""SAM 2's mask decoder: SAM's two-way transformer and hypernetworks, plus the high-resolution path.

Keys follow Meta's ``sam2.modeling.sam.mask_decoder.MaskDecoder``: SAM's (``transformer``, ``iou_token``,
``mask_tokens``, ``output_upscaling``, ``output_hypernetworks_mlps``, ``iou_prediction_head``) and
SAM 2's own: ``conv_s0`` / ``conv_s1`` (applied once per image by the encoder path, see
``model.sam2_image_encoder``), ``obj_score_token`` and ``pred_obj_score_head``. The transformer's MLPs are
keyed ``mlp.layers.{0,1}`` in SAM 2 (``mlp.lin1/lin2`` in SAM): same function, other names.

What of SAM 2.1's extras reaches the image predictor's outputs, and what does not:

* ``obj_score_token`` is one more token in the transformer, so it changes every mask: it is used.
  ``pred_obj_score_head`` reads that token's output into an object score, which only the video
  predictor acts on (it blanks the masks of frames without the object): its weights are loaded, not run;
* the IoU head ends in a sigmoid (``iou_prediction_use_sigmoid``): scores lie in (0, 1);
* high-resolution features: the upscaled mask embedding gets the stride-8 features added after the first
  transposed convolution and the stride-4 features after the second;
* single-mask output with a fallback (``dynamic_multimask_via_stability``, as ``build_sam2`` builds every
  model): when the single-mask token's logits are unstable (IoU of the masks at +0.05 and -0.05 below
  0.98), the best of the three multimask outputs by predicted IoU is returned instead;
* ``use_multimask_token_for_obj_ptr`` only chooses which token becomes the video memory's object pointer:
  it has no effect here.

Mechanics are those of our SAM decoder (``model.mask_decoder``): the image embedding is broadcast over
the prompt batch instead of copied; with the ``pixel_block_upscaling`` fast path (``model.fast_paths``) the
upscaling runs as matmuls on channels-last pixels in pixel-block order and the K masks are shuffled into
image order once at the end, the high-resolution features added through a permuted view of their
(channels-last) storage, so that order costs no copy of them; without it, Meta's ``output_upscaling`` on
the feature map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.common import LayerNorm2d, activate
from model.fast_paths import UsesFastPaths
from model.mask_decoder import MLP, conv_transpose_2x2, upscaling_layers
from model.transformer import TwoWayTransformer


def sam2_transformer(embedding_dim: int, depth: int = 2, num_heads: int = 8, mlp_dim: int = 2048) -> TwoWayTransformer:
    """SAM's two-way transformer with SAM 2's MLP key names (``layers.0`` / ``layers.1``, ReLU)."""
    transformer = TwoWayTransformer(depth=depth, embedding_dim=embedding_dim, num_heads=num_heads, mlp_dim=mlp_dim)
    for layer in transformer.layers:
        layer.mlp = MLP(embedding_dim, mlp_dim, embedding_dim, 2)
    return transformer


class Sam2MaskDecoder(UsesFastPaths, nn.Module):
    def __init__(self, *, transformer_dim: int, transformer: TwoWayTransformer, num_multimask_outputs: int = 3,
                 iou_head_depth: int = 3, iou_head_hidden_dim: int = 256, iou_prediction_use_sigmoid: bool = True,
                 pred_obj_scores: bool = True, pred_obj_scores_mlp: bool = True,
                 dynamic_multimask_via_stability: bool = True, dynamic_multimask_stability_delta: float = 0.05,
                 dynamic_multimask_stability_thresh: float = 0.98) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.pred_obj_scores = pred_obj_scores
        if pred_obj_scores:
            self.obj_score_token = nn.Embedding(1, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.conv_s0 = nn.Conv2d(transformer_dim, transformer_dim // 8, kernel_size=1)
        self.conv_s1 = nn.Conv2d(transformer_dim, transformer_dim // 4, kernel_size=1)
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth,
                                       sigmoid_output=iou_prediction_use_sigmoid)
        if pred_obj_scores:
            self.pred_obj_score_head = (MLP(transformer_dim, transformer_dim, 1, 3) if pred_obj_scores_mlp
                                        else nn.Linear(transformer_dim, 1))
        self.dynamic_multimask_via_stability = dynamic_multimask_via_stability
        self.dynamic_multimask_stability_delta = dynamic_multimask_stability_delta
        self.dynamic_multimask_stability_thresh = dynamic_multimask_stability_thresh

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse_prompt_embeddings: torch.Tensor,
                dense_prompt_embeddings: torch.Tensor, high_res_features: tuple[torch.Tensor, torch.Tensor],
                multimask_output: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res mask logits (B, K, 4h, 4w) and IoU predictions (B, K); K = 3 if multimask, else 1.

        ``image_embeddings``, ``image_pe`` (1, C, h, w) and ``high_res_features`` (s0 (1, C/8, 4h, 4w),
        s1 (1, C/4, 2h, 2w), already through ``conv_s0`` / ``conv_s1``) are shared by the B prompts.
        """
        if multimask_output:
            return self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                                      high_res_features, slice(1, None))
        if not self.dynamic_multimask_via_stability:
            return self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                                      high_res_features, slice(0, 1))
        masks, iou = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                                        high_res_features, slice(None))
        return self._dynamic_multimask_via_stability(masks, iou)

    def _dynamic_multimask_via_stability(self, masks: torch.Tensor, iou: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The single-mask output (token 0), or the best multimask output where token 0's mask is unstable."""
        rows = torch.arange(masks.shape[0], device=masks.device)
        best = iou[:, 1:].argmax(dim=-1) + 1
        single = masks[:, 0].flatten(1)
        delta = self.dynamic_multimask_stability_delta
        inner = (single > delta).sum(-1).float()
        outer = (single > -delta).sum(-1).float()
        stability = torch.where(outer > 0, inner / outer, 1.0)
        choice = torch.where(stability >= self.dynamic_multimask_stability_thresh, torch.zeros_like(best), best)
        return masks[rows, choice].unsqueeze(1), iou[rows, choice].unsqueeze(1)

    def predict_masks(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                      sparse_prompt_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor,
                      high_res_features: tuple[torch.Tensor, torch.Tensor],
                      keep: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks and IoU predictions of the mask tokens selected by ``keep`` (all four by default)."""
        bs = sparse_prompt_embeddings.shape[0]
        weights = [self.iou_token.weight, self.mask_tokens.weight]
        first = 0
        if self.pred_obj_scores:
            weights.insert(0, self.obj_score_token.weight)
            first = 1
        output_tokens = torch.cat(weights, dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(bs, -1, -1), sparse_prompt_embeddings.to(output_tokens.dtype)],
                           dim=1)
        # The sum is written channels-last (token-major), the layout the transformer works in.
        image, dense = image_embeddings.permute(0, 2, 3, 1), dense_prompt_embeddings.permute(0, 2, 3, 1)
        src = image.new_empty(torch.broadcast_shapes(image.shape, dense.shape), dtype=torch.result_type(image, dense))
        src = torch.add(image, dense, out=src).permute(0, 3, 1, 2)
        if src.shape[0] != bs:
            src = src.expand(bs, -1, -1, -1)
        pos_src = image_pe.expand(bs, -1, -1, -1)
        _, _, h, w = src.shape

        hs, src = self.transformer(src, pos_src, tokens)
        iou_pred = self.iou_prediction_head(hs[:, first, :])[:, keep]
        mask_tokens_out = hs[:, first + 1:first + 1 + self.num_mask_tokens, :]
        if not self.fast_paths.pixel_block_upscaling:
            return self.masks_reference(src, h, w, high_res_features, mask_tokens_out, keep), iou_pred

        upscaled = self.upscale(src, h, w, high_res_features)  # (B, h*w*16, C/8), pixel-block order
        indexes = range(self.num_mask_tokens)[keep]
        hyper_in = torch.stack([self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in indexes], dim=1)
        masks = (hyper_in @ upscaled.transpose(1, 2)).reshape(bs, len(indexes), h, w, 2, 2, 2, 2)
        # Pixel (4y + 2a + c, 4x + 2b + d) sits at block (y, x, a, b, c, d): one shuffle, of K masks only.
        masks = masks.permute(0, 1, 2, 4, 6, 3, 5, 7).reshape(bs, len(indexes), 4 * h, 4 * w)
        return masks, iou_pred

    def masks_reference(self, tokens: torch.Tensor, h: int, w: int,
                        high_res_features: tuple[torch.Tensor, torch.Tensor], mask_tokens_out: torch.Tensor,
                        keep: slice) -> torch.Tensor:
        """Meta's order: ``act1(ln1(dc1(src) + s1))``, ``act2(dc2(.) + s0)`` on the (B, C, h, w) feature map,
        then the hypernetwork outputs times the flattened map (only the kept masks' products)."""
        up1, norm, act1, up2, act2 = upscaling_layers(self.output_upscaling)
        s0, s1 = high_res_features
        bs = tokens.shape[0]
        src = tokens.transpose(1, 2).reshape(bs, -1, h, w)
        upscaled = act1(norm(up1(src) + s1))
        upscaled = act2(up2(upscaled) + s0)
        indexes = range(self.num_mask_tokens)[keep]
        hyper_in = torch.stack([self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in indexes], dim=1)
        b, c, hh, ww = upscaled.shape
        return (hyper_in @ upscaled.view(b, c, hh * ww)).view(b, -1, hh, ww)

    def upscale(self, tokens: torch.Tensor, h: int, w: int,
                high_res_features: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Image tokens (B, h*w, C) -> upscaled mask embedding (B, 16*h*w, C/8), channels last, pixel-block order.

        Meta: ``act1(ln1(dc1(src) + s1))`` then ``act2(dc2(.) + s0)``. A kernel-2 stride-2 transposed
        convolution writes each output pixel once, so each is one matmul; everything between acts on each
        pixel alone. The high-resolution maps are added through views that read them in block order.
        """
        up1, norm, act1, up2, act2 = upscaling_layers(self.output_upscaling)
        s0, s1 = high_res_features
        b = tokens.shape[0]
        x = conv_transpose_2x2(tokens, up1)  # (B, 4hw, C/4): pixel (2y + a, 2x + b) at (y, x, a, b)
        c4 = x.shape[-1]
        s1_blocks = s1.permute(0, 2, 3, 1).reshape(s1.shape[0], h, 2, w, 2, c4).transpose(2, 3)
        x.view(b, h, w, 2, 2, c4).add_(s1_blocks.to(x.dtype))
        in_place = self.fast_paths.in_place_activations
        x = activate(act1, F.layer_norm(x, (c4,), norm.weight, norm.bias, norm.eps), in_place)
        x = conv_transpose_2x2(x, up2)  # (B, 16hw, C/8): pixel (4y + 2a + c, 4x + 2b + d) at (y, x, a, b, c, d)
        c8 = x.shape[-1]
        s0_blocks = s0.permute(0, 2, 3, 1).reshape(s0.shape[0], h, 2, 2, w, 2, 2, c8).permute(0, 1, 4, 2, 5, 3, 6, 7)
        x.view(b, h, w, 2, 2, 2, 2, c8).add_(s0_blocks.to(x.dtype))
        return activate(act2, x, in_place)

