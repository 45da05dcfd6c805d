"""``load()``: read a SAM checkpoint, infer its architecture from keys and shapes, build ``Sam``.

The user never names the architecture: the ViT width, depth, heads, window size, global-attention
blocks and image size are all visible in the tensors (``rel_pos_h`` of a global block spans the
whole grid, a windowed one only its window). MobileSAM is recognised by its TinyViT keys.

Supported files: Meta's ``sam_vit_{b,l,h}_*.pth`` (a plain state dict), Ultralytics' ``sam_b.pt`` /
``sam_l.pt`` / ``mobile_sam.pt`` (also a plain state dict in Meta's key layout: Ultralytics' own
builder calls ``load_state_dict(torch.load(f))``), MobileSAM's ``mobile_sam.pt``, and training
checkpoints that wrap the state dict as ``{"model": sd}`` or ``{"state_dict": sd}``. SAM 2 / SAM 2.1
files (Meta's ``sam2.1_hiera_*.pt``, ``{"model": sd}`` with a Hiera trunk, and Ultralytics' ``sam2.1_t.pt``
etc., the same state dict plain or under ``"model"``) are recognised and built by ``model.sam2_checkpoint``.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from model import runtime, sam2_checkpoint
from model.fast_paths import FAST, FastPaths
from model.image_encoder import ImageEncoderViT
from model.mask_decoder import MaskDecoder
from model.prompt_encoder import PromptEncoder
from model.sam import Sam
from model.sam2 import Sam2
from model.transformer import DECODER_HEADS, TwoWayTransformer

# Meta's official encoder configurations: (embed_dim, depth, num_heads, global blocks).
OFFICIAL_VITS = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}
ENC = "image_encoder."
_SamT = TypeVar("_SamT", bound="Sam | Sam2")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with the file and what was expected."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def load(path: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
         compile: bool = False, fast_paths: FastPaths = FAST) -> Sam | Sam2:
    """Build a ready-to-use ``Sam`` (or ``Sam2``; eval mode, on ``device``) from a checkpoint file.

    ``fast_paths``: which speed tricks the model uses (``model.fast_paths``, SAM 2's included); ``REFERENCE``
    runs Meta's order of operations everywhere. ``Sam.set_fast_paths`` / ``Sam2.set_fast_paths`` change it later.
    """
    runtime.resolve_dtype(runtime.resolve_device(device), dtype)  # a bad device fails before the file is read
    state_dict, fingerprint = read_state_dict(path)
    sam: Sam | Sam2
    # SAM 2 / 2.1 (model/sam2_checkpoint.py): its own architecture inference; the video-memory weights dropped.
    if sam2_checkpoint.is_sam2(state_dict):
        sam, state_dict = sam2_checkpoint.build(state_dict, path)
    else:
        sam = build(state_dict, path)
    return finish(sam, state_dict, fingerprint, path, device, dtype, compile, fast_paths)


def finish(sam: _SamT, state_dict: dict[str, torch.Tensor], fingerprint: str, path: str | os.PathLike,
           device: str | torch.device | None, dtype: torch.dtype | None, compile: bool,
           fast_paths: FastPaths = FAST) -> _SamT:
    """Load the weights strictly into the built model, then set identity, dtype, fast paths, device, eval mode."""
    target = runtime.resolve_device(device)
    autocast_dtype = runtime.resolve_dtype(target, dtype)
    try:
        sam.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(path, f"the weights do not fit the inferred {sam.name} architecture: "
                                    f"{' '.join(str(exc).split())}") from None
    sam.fingerprint = fingerprint
    sam.dtype = autocast_dtype
    sam.set_fast_paths(fast_paths)
    sam.eval().requires_grad_(False).to(target)
    sam.__dict__["encode"] = runtime.maybe_compile(sam.image_encoder, compile)
    return sam


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict of a checkpoint file and the file's fingerprint (sha256, first 16 hex chars).

    The file is read once: the bytes are hashed and then unpickled from memory, so the fingerprint
    always describes exactly the weights that were loaded.
    """
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(path, "no such file (a SAM checkpoint such as sam_vit_b_01ec64.pth was expected)")
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read: {exc.strerror or exc}") from None
    fingerprint = hashlib.sha256(data).hexdigest()[:16]
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):
            raise CheckpointError(path, "it contains pickled Python objects (a whole model saved with "
                                        "torch.save(model)?), which are not loaded for safety; re-save just the "
                                        "weights with torch.save(model.state_dict(), path)") from None
        raise CheckpointError(path, f"not a PyTorch checkpoint, or truncated / damaged ({_cause(exc)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as exc:
        raise CheckpointError(path, f"not a PyTorch checkpoint, or truncated / damaged ({_cause(exc)})") from None
    del data
    return unwrap(obj, path), fingerprint


def _cause(exc: BaseException) -> str:
    """The first sentence of what PyTorch's loader says went wrong, without its advice.

    Its unpickling errors run to a dozen lines and suggest ``weights_only=False``, which would execute
    code from the file: wrong advice for a file that is plainly not a checkpoint, and too long for the
    one-line error a server shows.
    """
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    text = " ".join(text.split())
    return text.split(". ", 1)[0].rstrip(".") or type(exc).__name__


def unwrap(obj: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The SAM state dict inside a loaded object: plain, ``{"model": sd}`` or ``{"state_dict": sd}``."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(path, "not a SAM checkpoint: a state dict of tensors was expected")
    state_dict = {k.removeprefix("module."): v for k, v in obj.items()}
    decoders = ("mask_decoder.iou_token.weight", "sam_mask_decoder.iou_token.weight")  # SAM, SAM 2
    if not any(k.startswith(ENC) for k in state_dict) or not any(k in state_dict for k in decoders):
        raise CheckpointError(path, "not a SAM checkpoint: no image_encoder.* / mask_decoder.* weights")
    return state_dict


def _shape(sd: dict[str, torch.Tensor], key: str, path: str | os.PathLike) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(path, f"unknown SAM architecture: {key} is missing")
    return tuple(sd[key].shape)


def _indexes(sd: dict[str, torch.Tensor], prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pattern.match(k))})


def vit_config(sd: dict[str, torch.Tensor], path: str | os.PathLike) -> dict[str, Any]:
    """ImageEncoderViT arguments read off the tensors of a ViT checkpoint."""
    embed_dim, in_chans, patch, _ = _shape(sd, ENC + "patch_embed.proj.weight", path)
    _, grid, grid_w, _ = _shape(sd, ENC + "pos_embed", path)
    if grid != grid_w:
        raise CheckpointError(path, f"unknown SAM architecture: non-square position grid {grid}x{grid_w}")
    blocks = _indexes(sd, ENC + "blocks.")
    if not blocks or blocks != list(range(len(blocks))):
        raise CheckpointError(path, "unknown SAM architecture: image_encoder.blocks.* are missing or not numbered 0..n-1")
    _, head_dim = _shape(sd, ENC + "blocks.0.attn.rel_pos_h", path)
    if embed_dim % head_dim:
        raise CheckpointError(path, f"unknown SAM architecture: head size {head_dim} does not divide width {embed_dim}")
    global_blocks, windows = [], set()
    for i in blocks:
        size = (_shape(sd, f"{ENC}blocks.{i}.attn.rel_pos_h", path)[0] + 1) // 2
        if size == grid:
            global_blocks.append(i)
        else:
            windows.add(size)
    if len(windows) > 1:
        raise CheckpointError(path, f"unknown SAM architecture: several window sizes {sorted(windows)}")
    mlp_dim = _shape(sd, ENC + "blocks.0.mlp.lin1.weight", path)[0]
    out_chans = _shape(sd, ENC + "neck.0.weight", path)[0]
    return dict(img_size=grid * patch, patch_size=patch, in_chans=in_chans, embed_dim=embed_dim, depth=len(blocks),
                num_heads=embed_dim // head_dim, mlp_ratio=mlp_dim / embed_dim, out_chans=out_chans,
                qkv_bias=ENC + "blocks.0.attn.qkv.bias" in sd, window_size=windows.pop() if windows else 0,
                global_attn_indexes=tuple(global_blocks))


def vit_name(config: dict[str, Any]) -> str:
    """"vit_b" / "vit_l" / "vit_h" for Meta's configurations at 1024 px, else "custom"."""
    for name, (dim, depth, heads, global_blocks) in OFFICIAL_VITS.items():
        if (config["embed_dim"], config["depth"], config["num_heads"], config["global_attn_indexes"],
                config["img_size"], config["patch_size"], config["window_size"], config["mlp_ratio"],
                config["out_chans"]) == (dim, depth, heads, global_blocks, 1024, 16, 14, 4.0, 256):
            return name
    return "custom"


def build(sd: dict[str, torch.Tensor], path: str | os.PathLike) -> Sam:
    """An untrained ``Sam`` whose shapes match the state dict."""
    encoder: nn.Module
    if ENC + "patch_embed.seq.0.c.weight" in sd or any(k.startswith(ENC + "layers.") for k in sd):
        from model.tiny_vit import TinyViT, tiny_vit_config_from_state_dict, tiny_vit_name

        try:
            tiny_config = tiny_vit_config_from_state_dict(sd)
            encoder = TinyViT(**tiny_config)
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(path, f"unknown MobileSAM (TinyViT) architecture: {exc}") from None
        # TinyViT downsamples by 16 overall, like the ViT's patch embedding.
        image_size = getattr(encoder, "img_size", 1024)
        grid, name = image_size // 16, tiny_vit_name(tiny_config)
    elif ENC + "patch_embed.proj.weight" in sd:
        config = vit_config(sd, path)
        encoder = ImageEncoderViT(**config)
        image_size, grid, name = config["img_size"], config["img_size"] // config["patch_size"], vit_name(config)
    else:
        raise CheckpointError(path, "unknown SAM architecture: neither a ViT nor a TinyViT image encoder")

    prompt_dim = _shape(sd, "prompt_encoder.point_embeddings.0.weight", path)[1]
    mask_in_chans = _shape(sd, "prompt_encoder.mask_downscaling.3.weight", path)[0]
    transformer_dim = _shape(sd, "mask_decoder.iou_token.weight", path)[1]
    num_mask_tokens = _shape(sd, "mask_decoder.mask_tokens.weight", path)[0]
    depth = len(_indexes(sd, "mask_decoder.transformer.layers."))
    mlp_dim = _shape(sd, "mask_decoder.transformer.layers.0.mlp.lin1.weight", path)[0]
    internal = _shape(sd, "mask_decoder.transformer.final_attn_token_to_image.q_proj.weight", path)[0]
    iou_depth = len(_indexes(sd, "mask_decoder.iou_prediction_head.layers."))
    iou_hidden = _shape(sd, "mask_decoder.iou_prediction_head.layers.0.weight", path)[0]
    if transformer_dim % internal or internal % DECODER_HEADS or prompt_dim != transformer_dim:
        raise CheckpointError(path, f"unknown SAM architecture: decoder width {transformer_dim}, attention width "
                                    f"{internal}, prompt width {prompt_dim}")
    prompt_encoder = PromptEncoder(embed_dim=prompt_dim, image_embedding_size=(grid, grid),
                                   input_image_size=(image_size, image_size), mask_in_chans=mask_in_chans)
    transformer = TwoWayTransformer(depth=depth, embedding_dim=transformer_dim, num_heads=DECODER_HEADS,
                                    mlp_dim=mlp_dim, attention_downsample_rate=transformer_dim // internal)
    mask_decoder = MaskDecoder(transformer_dim=transformer_dim, transformer=transformer,
                               num_multimask_outputs=num_mask_tokens - 1, iou_head_depth=iou_depth,
                               iou_head_hidden_dim=iou_hidden)
    return Sam(encoder, prompt_encoder, mask_decoder, image_size=image_size, name=name)
