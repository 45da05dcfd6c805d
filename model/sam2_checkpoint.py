"""SAM 2 / SAM 2.1 checkpoints: recognise them, infer the architecture, build ``Sam2``.

Supported files: Meta's ``sam2.1_hiera_{tiny,small,base_plus,large}.pt`` and ``sam2_hiera_*.pt`` (a
``{"model": state_dict}`` of the whole video model), and Ultralytics' ``sam2.1_{t,s,b,l}.pt`` /
``sam2_{t,s,b,l}.pt``: Ultralytics' builder (``ultralytics/models/sam/build.py``) loads ``torch.load(f)``,
or its ``["model"]`` when that is a dict, strictly into a ``SAM2Model`` whose modules carry Meta's names,
so the state dict is Meta's layout (every key and shape of its tiny model equals Meta's: recorded in
``tests/fixtures/ultralytics-sam2.1_t-keys.json``); like Meta's, a 2.1 file has SAM 2.1's three extra
video tensors, which Ultralytics builds when the file name contains ``sam2.1``. Outputs equal Ultralytics'
``SAM2Predictor`` on a square image (``tests/test_sam2_ultralytics.py``; no released file can be downloaded
here, so that is checked on files made by Ultralytics' builder).

What the tensors show: the Hiera width (``patch_embed``), the blocks per stage (a width change, i.e. a
``proj`` in a block, starts a stage), the size of the background position table, the first window size
(``pos_embed_window``), the neck and decoder widths, object-score token and head. What they do not show
(heads, the windows of later stages, the global-attention blocks, the image size) is the same in every
release for a given (width, stages) pair, so it is looked up in ``RELEASES``. Anything else needs an
explicit ``Sam2Config`` (``load_with_config``), because a guess would give wrong masks silently.

The video-memory weights are skipped; every other key must be one the image path uses (``strict``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from model.fast_paths import FAST, FastPaths
from model.hiera import Hiera
from model.sam2 import Sam2
from model.sam2_image_encoder import FpnNeck, ImageEncoder
from model.sam2_mask_decoder import Sam2MaskDecoder, sam2_transformer
from model.sam2_prompt_encoder import Sam2PromptEncoder
from model.transformer import DECODER_HEADS

TRUNK = "image_encoder.trunk."
# Modules of SAM2Base that only the video predictor uses.
VIDEO_ONLY = ("memory_attention.", "memory_encoder.", "maskmem_tpos_enc", "no_mem_pos_enc", "mask_downsample.",
              "obj_ptr_proj.", "obj_ptr_tpos_proj.", "no_obj_ptr", "no_obj_embed_spatial")
# SAM 2.1 added these (signed, projected temporal encodings of object pointers; a spatial no-object
# embedding): their presence tells a 2.1 file from a 2.0 one. The image path is the same in both.
SAM2_1_ONLY = ("no_obj_embed_spatial", "obj_ptr_tpos_proj.weight")
# Every SAM 2 / 2.1 release: (Hiera width, blocks per stage) -> name, first heads, global blocks, windows.
RELEASES: dict[tuple[int, tuple[int, ...]], tuple[str, int, tuple[int, ...], tuple[int, ...]]] = {
    (96, (1, 2, 7, 2)): ("hiera_tiny", 1, (5, 7, 9), (8, 4, 14, 7)),
    (96, (1, 2, 11, 2)): ("hiera_small", 1, (7, 10, 13), (8, 4, 14, 7)),
    (112, (2, 3, 16, 3)): ("hiera_base_plus", 2, (12, 16, 20), (8, 4, 14, 7)),
    (144, (2, 6, 36, 4)): ("hiera_large", 2, (23, 33, 43), (8, 4, 16, 8)),
}
IMAGE_SIZE = 1024


@dataclass(frozen=True)
class Sam2Config:
    """What a SAM 2 checkpoint does not record. ``num_heads`` are the first stage's (doubled per stage)."""

    num_heads: int
    global_att_blocks: tuple[int, ...]
    window_spec: tuple[int, ...]
    image_size: int = IMAGE_SIZE
    name: str = "sam2_custom"


def is_sam2(state_dict: dict[str, torch.Tensor]) -> bool:
    """A SAM 2 / 2.1 state dict (Hiera trunk, ``sam_mask_decoder``)?"""
    return TRUNK + "patch_embed.proj.weight" in state_dict and "sam_mask_decoder.iou_token.weight" in state_dict


def _error(path: str | os.PathLike, reason: str) -> Exception:
    from model.checkpoint import CheckpointError

    return CheckpointError(path, reason)


def _shape(sd: dict[str, torch.Tensor], key: str, path: str | os.PathLike) -> tuple[int, ...]:
    if key not in sd:
        raise _error(path, f"unknown SAM 2 architecture: {key} is missing")
    return tuple(sd[key].shape)


def _indexes(sd: dict[str, torch.Tensor], prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pattern.match(k))})


def hiera_shape(sd: dict[str, torch.Tensor], path: str | os.PathLike) -> tuple[int, tuple[int, ...], tuple[int, int], int]:
    """(width, blocks per stage, background position table size, first window) read off the tensors."""
    embed_dim = _shape(sd, TRUNK + "patch_embed.proj.weight", path)[0]
    blocks = _indexes(sd, TRUNK + "blocks.")
    if not blocks or blocks != list(range(len(blocks))):
        raise _error(path, "unknown SAM 2 architecture: image_encoder.trunk.blocks.* missing or not numbered 0..n-1")
    starts = [i for i in blocks if f"{TRUNK}blocks.{i}.proj.weight" in sd]
    bounds = [0, *starts, len(blocks)]
    stages = tuple(b - a for a, b in zip(bounds, bounds[1:], strict=False))
    _, _, bh, bw = _shape(sd, TRUNK + "pos_embed", path)
    window = _shape(sd, TRUNK + "pos_embed_window", path)[-1]
    return embed_dim, stages, (bh, bw), window


def official_config(sd: dict[str, torch.Tensor], path: str | os.PathLike) -> Sam2Config:
    """The release whose Hiera the tensors show; CheckpointError for any other."""
    embed_dim, stages, _, window = hiera_shape(sd, path)
    release = RELEASES.get((embed_dim, stages))
    if release is None or release[3][0] != window:
        raise _error(path, f"unknown SAM 2 architecture: Hiera width {embed_dim}, stages {list(stages)}, first window "
                           f"{window} is none of the released tiny / small / base+ / large (a custom Hiera needs "
                           "model.sam2_checkpoint.load_with_config)")
    stem, heads, global_blocks, windows = release
    version = "sam2.1" if all(k in sd for k in SAM2_1_ONLY) else "sam2"
    return Sam2Config(num_heads=heads, global_att_blocks=global_blocks, window_spec=windows, name=f"{version}_{stem}")


def image_path_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries the image path uses: everything but the video-memory modules."""
    return {k: v for k, v in sd.items() if not k.startswith(VIDEO_ONLY)}


def build(sd: dict[str, torch.Tensor], path: str | os.PathLike,
          config: Sam2Config | None = None) -> tuple[Sam2, dict[str, torch.Tensor]]:
    """An untrained ``Sam2`` whose shapes match the state dict, and the state dict of its image path."""
    if config is None:
        config = official_config(sd, path)
    embed_dim, stages, background, window = hiera_shape(sd, path)
    if config.window_spec[0] != window or len(config.window_spec) != len(stages):
        raise _error(path, f"SAM 2 configuration: windows {list(config.window_spec)} do not fit the checkpoint's "
                           f"{len(stages)} stages with first window {window}")
    trunk = Hiera(embed_dim=embed_dim, num_heads=config.num_heads, q_pool=len(stages) - 1, stages=stages,
                  window_pos_embed_bkg_spatial_size=background, window_spec=config.window_spec,
                  global_att_blocks=config.global_att_blocks)
    necks = _indexes(sd, "image_encoder.neck.convs.")
    d_model = _shape(sd, "image_encoder.neck.convs.0.conv.weight", path)[0]
    channels = [_shape(sd, f"image_encoder.neck.convs.{i}.conv.weight", path)[1] for i in necks]
    if channels != trunk.channel_list:
        raise _error(path, f"unknown SAM 2 architecture: neck inputs {channels}, trunk outputs {trunk.channel_list}")
    encoder = ImageEncoder(trunk, FpnNeck(d_model, channels))

    grid = config.image_size // 16
    prompt_dim = _shape(sd, "sam_prompt_encoder.point_embeddings.0.weight", path)[1]
    mask_in_chans = _shape(sd, "sam_prompt_encoder.mask_downscaling.3.weight", path)[0]
    prompt_encoder = Sam2PromptEncoder(embed_dim=prompt_dim, image_embedding_size=(grid, grid),
                                       input_image_size=(config.image_size, config.image_size),
                                       mask_in_chans=mask_in_chans)
    dec = "sam_mask_decoder."
    transformer_dim = _shape(sd, dec + "iou_token.weight", path)[1]
    if "sam_mask_decoder.conv_s0.weight" not in sd:
        raise _error(path, "unsupported SAM 2 architecture: no high-resolution features in the mask decoder "
                           "(every release has sam_mask_decoder.conv_s0)")
    if prompt_dim != transformer_dim or d_model != transformer_dim:
        raise _error(path, f"unknown SAM 2 architecture: neck {d_model}, prompt {prompt_dim}, decoder {transformer_dim} wide")
    transformer = sam2_transformer(
        transformer_dim, depth=len(_indexes(sd, dec + "transformer.layers.")), num_heads=DECODER_HEADS,
        mlp_dim=_shape(sd, dec + "transformer.layers.0.mlp.layers.0.weight", path)[0])
    mask_decoder = Sam2MaskDecoder(
        transformer_dim=transformer_dim, transformer=transformer,
        num_multimask_outputs=_shape(sd, dec + "mask_tokens.weight", path)[0] - 1,
        iou_head_depth=len(_indexes(sd, dec + "iou_prediction_head.layers.")),
        iou_head_hidden_dim=_shape(sd, dec + "iou_prediction_head.layers.0.weight", path)[0],
        pred_obj_scores=dec + "obj_score_token.weight" in sd,
        pred_obj_scores_mlp=dec + "pred_obj_score_head.layers.0.weight" in sd)
    sam = Sam2(encoder, prompt_encoder, mask_decoder, image_size=config.image_size, name=config.name)
    return sam, image_path_state_dict(sd)


def load_with_config(path: str | os.PathLike, config: Sam2Config, device: str | torch.device | None = None,
                     dtype: torch.dtype | None = None, compile: bool = False, fast_paths: FastPaths = FAST) -> Sam2:
    """``model.load`` for a SAM 2 checkpoint of a custom architecture, described by ``config``."""
    from model import checkpoint

    state_dict, fingerprint = checkpoint.read_state_dict(path)
    if not is_sam2(state_dict):
        raise _error(path, "not a SAM 2 checkpoint: no image_encoder.trunk.* / sam_mask_decoder.* weights")
    sam, state_dict = build(state_dict, path, config)
    return checkpoint.finish(sam, state_dict, fingerprint, path, device, dtype, compile, fast_paths)
