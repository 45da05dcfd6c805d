"""Mask decoder: image embedding + prompt embeddings -> mask logits and predicted IoU per mask.

Keys follow Meta's ``MaskDecoder``. Differences in mechanics, not in results: the image embedding and
its positional encoding are broadcast over the prompt batch instead of copied per prompt, and only the
masks asked for are computed. With the ``pixel_block_upscaling`` fast path (``model.fast_paths``) the
upscaling runs channels-last as matmuls in pixel-block order (``masks_in_pixel_blocks``); without it,
Meta's ``output_upscaling`` on the feature map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.common import LayerNorm2d, activate, linear_in_halves
from model.fast_paths import UsesFastPaths
from model.transformer import TwoWayTransformer


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int,
                 sigmoid_output: bool = False) -> None:
        super().__init__()
        self.num_layers = num_layers
        dims = [hidden_dim] * (num_layers - 1)
        pairs = zip([input_dim, *dims], [*dims, output_dim], strict=True)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in pairs)
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return torch.sigmoid(x) if self.sigmoid_output else x

    def forward_in_halves(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` with the last layer's sum in two fixed halves (``model.common.linear_in_halves``): SAM 2's
        two-way blocks use this MLP where SAM's use ``MLPBlock``, and call the same method."""
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        last = self.layers[-1]
        assert isinstance(last, nn.Linear)
        x = linear_in_halves(x, last)
        return torch.sigmoid(x) if self.sigmoid_output else x


class MaskDecoder(UsesFastPaths, nn.Module):
    def __init__(self, *, transformer_dim: int, transformer: TwoWayTransformer, num_multimask_outputs: int = 3,
                 activation: type[nn.Module] = nn.GELU, iou_head_depth: int = 3,
                 iou_head_hidden_dim: int = 256) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                sparse_prompt_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor,
                multimask_output: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res mask logits (B, K, 4h, 4w) and IoU predictions (B, K); K = 3 if multimask else 1.

        ``image_embeddings`` and ``image_pe`` are (1, C, h, w) and shared by the B prompts.
        """
        masks, iou_pred = self.forward_deferred(image_embeddings, image_pe, sparse_prompt_embeddings,
                                                dense_prompt_embeddings, multimask_output)
        return masks.all(), iou_pred

    def forward_deferred(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                         sparse_prompt_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor,
                         multimask_output: bool) -> tuple[DeferredMasks, torch.Tensor]:
        """``forward``, with the masks made later and only those asked for (``DeferredMasks``)."""
        keep = slice(1, None) if multimask_output else slice(0, 1)
        return self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                                  keep)

    def predict_masks(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                      sparse_prompt_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor,
                      keep: slice = slice(None)) -> tuple[DeferredMasks, torch.Tensor]:
        """Masks (still to be made) and IoU predictions of the mask tokens selected by ``keep`` (all by default).

        Only the kept masks are computed: Meta computes all four and drops one or three.
        """
        bs = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(bs, -1, -1), sparse_prompt_embeddings], dim=1)
        # The sum is written channels-last (token-major), the layout the transformer works in, so the
        # transformer's flatten + transpose of it is a view rather than another copy of every token.
        image, dense = image_embeddings.permute(0, 2, 3, 1), dense_prompt_embeddings.permute(0, 2, 3, 1)
        shared = self.fast_paths.shared_decoder_image and image.shape[0] == 1 and _same_for_all(dense)
        if shared:  # one image for all prompts until the first image update (model.fast_paths)
            dense = dense[:1]
        src = image.new_empty(torch.broadcast_shapes(image.shape, dense.shape),
                              dtype=torch.result_type(image, dense))
        src = torch.add(image, dense, out=src).permute(0, 3, 1, 2)
        if src.shape[0] != bs and not shared:
            src = src.expand(bs, -1, -1, -1)
        pos_src = image_pe if shared else image_pe.expand(bs, -1, -1, -1)
        _, _, h, w = src.shape

        hs, src = self.transformer(src, pos_src, tokens)
        if src.shape[0] != bs:  # a transformer without layers leaves the shared image as it was
            src = src.expand(bs, -1, -1)
        iou_pred = self.iou_prediction_head(hs[:, 0, :])[:, keep]
        mask_tokens_out = hs[:, 1:1 + self.num_mask_tokens, :]

        indexes = range(self.num_mask_tokens)[keep]
        hyper_in = torch.stack([self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in indexes], dim=1)
        return DeferredMasks(self, hyper_in, src, (h, w)), iou_pred

    def masks(self, hyper_in: torch.Tensor, tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Masks (B, K, 4h, 4w) from hypernetwork outputs (B, K, C/8) and the transformer's image (B, h*w, C)."""
        if self.fast_paths.pixel_block_upscaling:
            return self.masks_in_pixel_blocks(hyper_in, tokens, size)
        (bs, _, _), (h, w) = tokens.shape, size
        upscaled = self.output_upscaling(tokens.transpose(1, 2).reshape(bs, -1, h, w))
        b, c, h, w = upscaled.shape
        return (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)

    # --- the pixel_block_upscaling fast path (model.fast_paths) --------------------------------------

    def masks_in_pixel_blocks(self, hyper_in: torch.Tensor, tokens: torch.Tensor,
                              size: tuple[int, int]) -> torch.Tensor:
        """Masks (B, K, 4h, 4w) from hypernetwork outputs (B, K, C/8) and image tokens (B, h*w, C).

        The same as Meta's ``output_upscaling`` on the (h, w) feature map and a product with the
        hypernetwork outputs, but a transposed convolution whose kernel equals its stride writes each
        output pixel once, so it is one matmul on channels-last pixels; everything after each matmul
        (LayerNorm over channels, GELU, the next such convolution) acts on each pixel alone, so the pixels
        stay in pixel-block order (y, x, a, b, c, d) for pixel (4y + 2a + c, 4x + 2b + d), and only the K
        masks are shuffled into image order. On CPU this is several times faster than the convolution
        kernels.
        """
        up1, norm, act1, up2, act2 = upscaling_layers(self.output_upscaling)
        in_place = self.fast_paths.in_place_activations
        x = conv_transpose_2x2(tokens, up1)
        x = activate(act1, F.layer_norm(x, (norm.weight.shape[0],), norm.weight, norm.bias, norm.eps), in_place)
        upscaled = activate(act2, conv_transpose_2x2(x, up2), in_place)  # (B, h*w*16, C/8)
        (bs, k, _), (h, w) = hyper_in.shape, size
        masks = (hyper_in @ upscaled.transpose(1, 2)).reshape(bs, k, h, w, 2, 2, 2, 2)
        return masks.permute(0, 1, 2, 4, 6, 3, 5, 7).reshape(bs, k, 4 * h, 4 * w)


def _same_for_all(dense: torch.Tensor) -> bool:
    """Whether the dense prompt embeddings (B, h, w, C) are one map for every prompt: no mask input gives
    one embedding expanded over the batch (stride 0), which is the only case looked for."""
    return dense.shape[0] == 1 or dense.stride(0) == 0


class DeferredMasks:
    """The masks of one decoder call, made when asked for: all of them, or those of a few outputs.

    The predicted IoU reads the IoU token alone, so a caller that filters by it (the automatic mask
    generator, ``iou_before_masks`` in ``model.fast_paths``) can skip the upscaling of every prompt whose
    masks all fail: per prompt the two transposed convolutions and the products with the hypernetwork
    outputs are a third of the decoder's time.
    """

    def __init__(self, decoder: MaskDecoder, hyper_in: torch.Tensor, tokens: torch.Tensor,
                 size: tuple[int, int]) -> None:
        self.decoder, self.hyper_in, self.tokens, self.size = decoder, hyper_in, tokens, size

    def all(self) -> torch.Tensor:
        """Low-res logits (B, K, 4h, 4w) of every prompt."""
        return self.decoder.masks(self.hyper_in, self.tokens, self.size)

    def best(self, best: torch.Tensor) -> torch.Tensor:
        """Low-res logits (B, 1, 4h, 4w) of output ``best[b]`` (int64, (B,)) of each prompt, made alone: a click
        answered with the best of three pays one product with the upscaled image and one shuffle into image
        order instead of three."""
        rows = torch.arange(self.hyper_in.shape[0], device=self.hyper_in.device)
        hyper_in = self.hyper_in[rows, best].unsqueeze(1)
        return self.decoder.masks(hyper_in, self.tokens, self.size)

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Low-res logits (M, 4h, 4w) of ``rows`` (int64) of the flattened (B * K) outputs, in that order.

        Each prompt with a row asked for is upscaled once, for all its K masks.
        """
        k = self.hyper_in.shape[1]
        if len(rows) == 0:
            h, w = self.size
            return self.hyper_in.new_empty(0, 4 * h, 4 * w)
        prompts, inverse = torch.unique(torch.div(rows, k, rounding_mode="floor"), return_inverse=True)
        masks = self.decoder.masks(self.hyper_in[prompts], self.tokens[prompts], self.size)
        return masks[inverse, rows % k]


# A decoder's ``output_upscaling``: transposed convolution, LayerNorm2d, activation, transposed convolution, activation.
UpscalingLayers = tuple[nn.ConvTranspose2d, LayerNorm2d, nn.Module, nn.ConvTranspose2d, nn.Module]


def upscaling_layers(output_upscaling: nn.Sequential) -> UpscalingLayers:
    """The layers of ``output_upscaling``, typed (they stay in one Sequential for Meta's key names)."""
    up1, norm, act1, up2, act2 = output_upscaling
    assert isinstance(up1, nn.ConvTranspose2d) and isinstance(up2, nn.ConvTranspose2d)
    assert isinstance(norm, LayerNorm2d)
    return up1, norm, act1, up2, act2


def conv_transpose_2x2(x: torch.Tensor, conv: nn.ConvTranspose2d) -> torch.Tensor:
    """``conv`` (kernel 2, stride 2, no padding) on channels-last pixels x (B, N, Cin) -> (B, 4N, Cout).

    Output pixel 4n + 2a + b is input pixel n's kernel position (a, b): pixel-block order.
    """
    c_in, c_out = conv.weight.shape[:2]
    weight = conv.weight.permute(2, 3, 1, 0).reshape(4 * c_out, c_in)  # rows in (a, b, Cout) order
    bias = None if conv.bias is None else conv.bias.repeat(4)
    return F.linear(x, weight, bias).reshape(x.shape[0], 4 * x.shape[1], c_out)
