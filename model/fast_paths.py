"""Which of the engine's speed tricks a model uses: one frozen policy, set once per model.

Every module of ``model/`` has a plain forward in the order of operations of Meta's
``segment_anything/modeling`` (MobileSAM's for TinyViT). The tricks below sit beside those forwards as
their own functions or methods, and the module picks one by reading the ``FastPaths`` it was given; no
module looks at module constants or at ``x.device`` to decide. ``REFERENCE`` switches every trick off,
``FAST`` (the default of ``model.load``) switches them all on. Both compute the same function: the tests
run Meta's reference against each preset.

    sam = model.load(path, fast_paths=model.REFERENCE)   # or later: sam.set_fast_paths(model.FAST)

A policy is device independent; ``FastPaths.for_device`` says what it means on one device, and
``Sam.set_fast_paths`` (and every move of the model to another device) hands that resolved policy to the
modules, once. The CPU-only tricks are the ones about caches and page faults, which a GPU does not have
(SAM 2's too: ``hiera_mlp_chunk_elements``), and ``edge_only_masks``, which trades one fast GPU kernel for
several small ones.

Why each trick pays (measured on a 2-core Xeon with glibc's malloc; ``bench/engine.py`` times the whole):

Memory that stays mapped (``window_bands``, ``mlp_chunk_elements``, ``in_place_activations``, and the
one bias buffer of ``attention_bias_elements``). On a CPU, glibc's allocator hands a freed block of tens
of MiB back to the operating system, and the next tensor of that size is new memory again, whose first
touch costs a page fault per 4 KiB. A ViT-B layer at 1024 px makes several such tensors (the MLP's
hidden layer is 4096 x 3072 floats, 48 MiB); faulting them in can cost more than the arithmetic that fills
them: an out-of-place GELU of that hidden layer took 4x as long as the same GELU in place. Working in
pieces of a few MiB keeps each intermediate in the last-level cache between the producer and the consumer
and in memory the allocator reuses; computing an activation in place writes memory already mapped. All
three change nothing but rounding (the matmuls block differently) or nothing at all (in place). Without
them a ViT-B encode takes 9% more CPU time under glibc, a MobileSAM one 17% more. Under a malloc that keeps
freed memory mapped (tcmalloc, which the Docker image preloads) there are no such faults and they gain at
most a few percent, but cost nothing either, so they stay on (``bench/allocator.py`` measures both).

* ``fused_attention``: attention as one ``F.scaled_dot_product_attention`` call (scale, bias, softmax and
  the product with v in one kernel) instead of Meta's explicit ``softmax(q k^T * scale + bias) v`` with
  the full attention matrix in memory. In the ViT the decomposed relative-position terms become an
  additive bias built in chunks (``attention_bias_elements``), and windowed blocks run ``qkv`` and
  ``proj`` on the unpadded grid: both are per-token linear maps, and a zero-padded token maps to qkv's
  bias, so the padding is filled with that bias instead of being projected. On a CPU this is where most of
  the encoder's speed-up comes from.
* ``attention_bias_elements``: the most elements one chunk of the ViT's attention bias may have (fp32:
  16 MiB, about an L2 plus a share of L3). A global block of ViT-H at 1024 px would otherwise build
  16 x 4096 x 4096 floats (1 GiB) and stream them through memory twice; a chunk is consumed from cache
  right after it is written, into one buffer reused by all chunks. On a GPU the concern is kernel launches,
  not caches, so the budget is raised there to at least ``GPU_ATTENTION_BIAS_ELEMENTS``. 0: one chunk.
* ``window_bands`` (CPU): windowed ViT blocks attend one band of window rows at a time. Windows never
  straddle bands (both start at row 0), so it is the same computation with every intermediate (qkv, the
  padded windows, the output) a tenth of the size.
* ``mlp_chunk_elements`` (CPU): ``MLPBlock`` runs at most this many hidden activations at once, in chunks
  of rows (each token's feed-forward is independent of the others). 0: all rows at once.
* ``in_place_activations``: GELU and ReLU on an intermediate nobody else holds are computed in place.
  Same kernel, same numbers.
* ``folded_decoder_attention``: in the mask decoder's cross attention, the few prompt tokens (7 for a
  click) meet 4096 image tokens. Meta projects every image token to q, k or v and projects the output
  back; each of those maps is linear, so it can be moved to the token side of the product: the image
  tokens then meet ``heads x tokens`` vectors (56 for a click) instead of 128-wide projections, less than
  half the arithmetic for the same function (``model.transformer.Attention.tokens_to_image_folded`` and
  ``image_to_tokens_folded``). The image's residual update then accumulates that product onto the image in
  one ``baddbmm`` with the output bias folded into the pushed vectors (``Attention.add_image_to_tokens``):
  two passes fewer over the (B, 4096, 256) image per layer, 10% of a grid batch.
* ``shared_decoder_image``: a batch of prompts without mask inputs (the grid of "segment everything", or
  several boxes) starts the two-way transformer from one and the same image; Meta copies it per prompt.
  Until the first layer's image -> token update the image side stays one (1, 4096, 256) tensor: its keys
  with their positions are added once, and its products with the prompts' folded query vectors (and the
  attention weights' products with it) are one tall matmul for the whole batch instead of a batched one
  over B copies. For 64 grid points that skips four passes over 64 x 4096 x 256 floats (268 MB each),
  memory traffic rather than arithmetic on a CPU. The same sums in another blocking: rounding only.
* ``iou_before_masks``: the automatic mask generator keeps a mask only if its predicted IoU passes, and
  the IoU head reads the IoU token alone; so the decoder's masks wait (``model.mask_decoder.DeferredMasks``)
  until the scores are known, and only prompts with a passing mask are upscaled. The upscaling (two
  transposed convolutions to 256 x 256 x 32 per prompt, the products with the hypernetwork outputs) was a
  third of a grid batch's time, and with Meta's 0.88 threshold most prompts keep nothing. Same numbers.
  A click answered with the best of its three candidates likewise makes only that candidate's mask.
* ``pixel_block_upscaling``: the decoder's two transposed convolutions (kernel = stride = 2) write each
  output pixel once, so each is one matmul on channels-last pixels; everything between them acts on each
  pixel alone, so the pixels stay in pixel-block order and only the K final masks are shuffled into image
  order, 16x fewer values than the 32-channel features (``model.mask_decoder.MaskDecoder.upscale``).
* ``composed_thumbnail_resize``: for an original image much smaller than the encoder input, Meta's
  upsample to the padded input, crop and resize compose into one filter of at most 3 taps per axis,
  applied to the low-res logits: nothing of encoder-input size is made (``model.transforms``).
* ``edge_only_masks`` (CPU): a click's or a box's mask is its logits resized to the image and thresholded at 0;
  bilinear weights are never negative, so a pixel whose source logits all have one sign has that sign, and only
  the pixels along the mask's edges need a value (``model.edge_masks``). At 4000 x 3000 the full-size logits
  (48 MB) are never made. Decided pixels are exact; an edge pixel differs only if its logit is within rounding
  of 0. On a GPU the full resize is one fast kernel, so the path is off there.
* ``cropped_upsample``: otherwise Meta's two resizes, bit for bit, but the first computes only the rows
  and columns that survive the crop (a quarter of the 1024 x 1024 intermediate for a landscape photo).

SAM 2 / SAM 2.1 (``model.hiera``, ``model.sam2_image_encoder``, ``model.sam2_mask_decoder``, ``model.sam2``)
read the same policy (``Sam2.set_fast_paths``, ``model.load(..., fast_paths=)``). Their mask decoder is
SAM's transformer, so ``folded_decoder_attention`` applies as above; ``pixel_block_upscaling`` runs SAM 2's
upscaling (with its high-resolution features added through block-order views) as matmuls, and
``in_place_activations`` covers Hiera's GELU and the decoder's. Meta's Hiera itself already calls
``F.scaled_dot_product_attention``, so that is no trick there. Hiera's own tricks (``model.hiera``):

* ``fused_linear`` (CPU, fp32, outside autocast and ``torch.compile``): oneDNN's linear with the bias (and
  the GELU) fused into the product. Hiera's early stages are products with a short inner dimension (96
  or 192 channels) and a long output, where PyTorch's addmm spends as long writing the bias into the
  output and reading it back as on the arithmetic: 1.3-1.6x faster, the same numbers up to rounding.
* ``hiera_residual_writes``: a block writes shortcut + attention into one fresh tensor, reading the
  attention windows through a 6-d view (Meta merges them back into a grid first, one more copy of the
  activations), and adds the MLP's output to it in place.
* ``hiera_mlp_chunk_elements`` (CPU, with ``hiera_residual_writes``): the most hidden activations of a
  Hiera MLP at once (fp32: 32 MiB), the residual added chunk by chunk. Larger than the ViT's chunks on
  purpose: smaller chunks save ~5% of CPU time on an idle machine, but each is a parallel region whose
  threads must all get a core, and on a loaded 2-core machine (load 5) the encoder then ran 1.3x slower.
* ``strided_max_pool``: a 2x2 max pool as two ``maximum`` passes over strided channels-last views;
  Meta permutes to channels-first and back around ``nn.MaxPool2d``, 4-7x slower. The same maxima.
* ``contiguous_attention_heads``: for 1024 keys or more (the global blocks), q, k and v are copied to
  contiguous heads before SDPA, whose CPU kernel then runs 8-15% faster, more than the copy costs.
* ``cached_position_embedding``: the position embedding (a bicubic resize of the background table plus
  the tiled window table) is computed once per grid size and added in place; Meta recomputes it per image.
* ``channels_last_patch_embed``: the 7x7 patch convolution reads a channels-last input, so it writes
  the channels-last tokens directly instead of a channels-first map that is then permuted.
* ``folded_neck_projections``: the image predictor's ``conv_s0`` / ``conv_s1`` (and the ``no_mem_embed``
  bias) are 1x1 maps after the neck's 1x1 lateral convolutions, so each pair is folded into one: the
  256 x 256 level goes from the trunk's 96 channels straight to 32 (``model.sam2_image_encoder``).
* ``per_mask_resize``: the low-res logits are resized to the image one mask at a time: PyTorch's CPU
  kernel takes a path for one channel that is 3x faster than its path for three (equal within 1e-6).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Chunk budget of the ViT's attention bias off the CPU: 64 M elements is 4 chunks per ViT-B global block.
GPU_ATTENTION_BIAS_ELEMENTS = 1 << 26


def _chunk_budgets() -> tuple[str, ...]:
    """The fields of ``FastPaths`` that are chunk budgets (int, 0 = off) rather than switches (bool)."""
    return tuple(f.name for f in fields(FastPaths) if f.type in ("int", int))


@dataclass(frozen=True)
class FastPaths:
    """One switch (or chunk budget, 0 = off) per speed trick; see the module docstring for each."""

    fused_attention: bool = True
    attention_bias_elements: int = 1 << 22
    window_bands: bool = True
    mlp_chunk_elements: int = 1 << 22
    in_place_activations: bool = True
    folded_decoder_attention: bool = True
    pixel_block_upscaling: bool = True
    shared_decoder_image: bool = True
    iou_before_masks: bool = True
    composed_thumbnail_resize: bool = True
    edge_only_masks: bool = True
    cropped_upsample: bool = True
    # SAM 2 / 2.1 (see the module docstring)
    fused_linear: bool = True
    hiera_residual_writes: bool = True
    hiera_mlp_chunk_elements: int = 1 << 23
    strided_max_pool: bool = True
    contiguous_attention_heads: bool = True
    cached_position_embedding: bool = True
    channels_last_patch_embed: bool = True
    folded_neck_projections: bool = True
    per_mask_resize: bool = True

    def __post_init__(self) -> None:
        for name in _chunk_budgets():
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (off) or more, not {getattr(self, name)}")

    def for_device(self, device: torch.device | str) -> FastPaths:
        """This policy as it applies on ``device``: what the modules read.

        The CPU's cache and page-fault workarounds (bands, MLP chunks) are dropped elsewhere, and the
        attention-bias budget is raised to what suits a GPU.
        """
        device_type = device if isinstance(device, str) else device.type
        if device_type.split(":")[0] == "cpu":
            return self
        budget = self.attention_bias_elements and max(self.attention_bias_elements, GPU_ATTENTION_BIAS_ELEMENTS)
        return replace(self, window_bands=False, mlp_chunk_elements=0, attention_bias_elements=budget,
                       hiera_mlp_chunk_elements=0, edge_only_masks=False)


# Every trick on: what the backend serves.
FAST = FastPaths()
# Every trick off: Meta's order of operations everywhere, the plainest code. Derived from the fields, so that a
# trick added to FastPaths is off here without a second list to keep in step.
_OFF: dict[str, Any] = {f.name: 0 if f.name in _chunk_budgets() else False for f in fields(FastPaths)}
REFERENCE = FastPaths(**_OFF)


class UsesFastPaths:
    """Mixin of the modules that have a fast path: the resolved policy they read (``FAST`` until set)."""

    fast_paths: FastPaths = FAST


def apply(module: torch.nn.Module, policy: FastPaths, device: torch.device | str) -> FastPaths:
    """Hand ``policy``, resolved for ``device``, to every module under ``module`` that reads one."""
    resolved = policy.for_device(device)
    for child in module.modules():
        if isinstance(child, UsesFastPaths):
            child.fast_paths = resolved
    return resolved
