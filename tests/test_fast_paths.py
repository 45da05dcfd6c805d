"""The speed-trick policy: its presets, how it reaches the modules, and a ``model`` package that imports lazily."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields, replace

import pytest

from testsupport.paths import REPO_ROOT


@pytest.mark.parametrize("statement", ["import model.download", "from model import download",
                                       "from model import FAST, REFERENCE, FastPaths"])
def test_the_download_module_and_the_policy_do_not_import_torch(statement):
    """The CLI's ``download`` must start without torch, which takes seconds to import."""
    code = f"{statement}; import sys; assert 'torch' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=60)


def test_public_names_are_importable():
    import model
    from model import (  # noqa: F401
        FAST,
        REFERENCE,
        CheckpointError,
        Embedding,
        FastPaths,
        MaskGenerator,
        Prediction,
        Predictor,
        Sam,
        load,
    )

    assert model.runtime.resolve_device("cpu").type == "cpu"  # submodules are attributes too
    with pytest.raises(AttributeError):
        model.no_such_name  # noqa: B018


def test_presets():
    from model import FAST, REFERENCE, FastPaths

    assert FastPaths() == FAST
    for field in fields(FastPaths):
        assert not getattr(REFERENCE, field.name), f"REFERENCE leaves {field.name} on"
        assert getattr(FAST, field.name), f"FAST leaves {field.name} off"
    with pytest.raises(ValueError, match="mlp_chunk_elements"):
        FastPaths(mlp_chunk_elements=-1)


def test_device_resolution():
    from model import FAST, REFERENCE
    from model.fast_paths import GPU_ATTENTION_BIAS_ELEMENTS

    assert FAST.for_device("cpu") == FAST
    gpu = FAST.for_device("cuda:0")
    assert not gpu.window_bands and gpu.mlp_chunk_elements == 0
    assert gpu.attention_bias_elements == GPU_ATTENTION_BIAS_ELEMENTS
    assert gpu.fused_attention and gpu.folded_decoder_attention and gpu.in_place_activations
    assert REFERENCE.for_device("cuda") == REFERENCE


def test_the_policy_reaches_every_module_that_reads_one(tmp_path):
    import torch

    import model
    from model.fast_paths import UsesFastPaths
    from testsupport.checkpoints import small_checkpoint

    path, _ = small_checkpoint(tmp_path, seed=1)
    sam = model.load(path, device="cpu", fast_paths=model.REFERENCE)
    readers = [m for m in sam.modules() if isinstance(m, UsesFastPaths)]
    assert len(readers) > 10
    assert sam.fast_paths == model.REFERENCE and all(m.fast_paths == model.REFERENCE for m in readers)
    policy = replace(model.FAST, window_bands=False)
    sam.set_fast_paths(policy)
    assert sam.fast_paths == policy and all(m.fast_paths == policy for m in readers)
    sam.to(torch.float32)  # every move re-resolves the policy for the device
    assert all(m.fast_paths == policy for m in readers)


def test_the_policy_reaches_every_sam2_module(tmp_path):
    """SAM 2.1 (Hiera, its neck, the decoder and SAM's transformer inside it) reads the same policy."""
    import torch

    import model
    from model.fast_paths import UsesFastPaths
    from model.hiera import HieraMLP, MultiScaleAttention, MultiScaleBlock, PatchEmbed
    from model.sam2_checkpoint import Sam2Config, load_with_config
    from model.sam2_image_encoder import FpnNeck
    from model.sam2_mask_decoder import Sam2MaskDecoder
    from model.transformer import Attention
    from testsupport.sam2_checkpoints import SMALL, small_checkpoint

    path, _ = small_checkpoint(tmp_path, seed=1)
    config = Sam2Config(num_heads=SMALL["num_heads"], global_att_blocks=SMALL["global_att_blocks"],
                        window_spec=SMALL["window_spec"], image_size=SMALL["image_size"])
    sam = load_with_config(path, config, device="cpu", fast_paths=model.REFERENCE)
    readers = [m for m in sam.modules() if isinstance(m, UsesFastPaths)]
    kinds = {type(m) for m in readers}
    assert {PatchEmbed, MultiScaleAttention, MultiScaleBlock, HieraMLP, FpnNeck, Sam2MaskDecoder, Attention} <= kinds
    assert sam.fast_paths == model.REFERENCE and all(m.fast_paths == model.REFERENCE for m in readers)
    policy = replace(model.FAST, strided_max_pool=False)
    sam.set_fast_paths(policy)
    assert sam.fast_paths == policy and all(m.fast_paths == policy for m in readers)
    sam.to(torch.float32)  # every move re-resolves the policy for the device
    assert all(m.fast_paths == policy for m in readers)


def test_the_whole_models_identity_has_one_home(tmp_path):
    """Name, fingerprint, input size, dtype, normalisation, ``encode`` and the repr come from
    ``FastPathsModel``: a new model family gets all of them by calling its constructor, and SAM and SAM 2.1
    read them alike."""
    import torch

    import model
    from model.fast_paths_model import FastPathsModel
    from model.sam2 import Sam2
    from testsupport.checkpoints import small_checkpoint

    class Plain(FastPathsModel):
        def __init__(self) -> None:
            super().__init__(torch.nn.Identity(), 64, "plain", "0123abcd", (1.0, 2.0, 3.0), (4.0, 5.0, 6.0))
            self._start_fast_paths()

    plain = Plain()
    assert repr(plain) == "Plain(name='plain', fingerprint='0123abcd', device=cpu, dtype=fp32)"
    assert plain.encode is plain.image_encoder and plain.image_size == 64 and plain.mask_threshold == 0.0
    assert plain.pixel_std.flatten().tolist() == [4.0, 5.0, 6.0] and plain.state_dict() == {}
    assert plain.fast_paths == model.FAST.for_device("cpu")
    sam = model.load(small_checkpoint(tmp_path, seed=1)[0], device="cpu")
    assert repr(sam).startswith(f"Sam(name={sam.name!r}, fingerprint={sam.fingerprint!r}, device=cpu")
    for kind in (type(sam), Sam2):  # nothing of the base's restated
        assert not {"mask_threshold", "__repr__"} & set(vars(kind)), kind


def test_sam2_cpu_tricks_are_dropped_off_the_cpu():
    from model import FAST

    gpu = FAST.for_device("cuda")
    assert gpu.hiera_mlp_chunk_elements == 0
    assert gpu.hiera_residual_writes and gpu.folded_neck_projections and gpu.contiguous_attention_heads
