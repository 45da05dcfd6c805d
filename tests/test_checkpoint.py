"""``model.load``: wrappers, architecture inference, fingerprints, and one clear error per bad file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything import build_sam_vit_b, build_sam_vit_h, build_sam_vit_l

import model
from model.checkpoint import CheckpointError, vit_config, vit_name
from testsupport.checkpoints import make_image, reference_sam, save, small_checkpoint

CONFIGS = [
    dict(embed_dim=64, depth=2, num_heads=4, global_attn_indexes=(1,), window_size=4, img_size=256),
    dict(embed_dim=96, depth=3, num_heads=3, global_attn_indexes=(0, 2), window_size=5, img_size=256),
    dict(embed_dim=128, depth=4, num_heads=8, global_attn_indexes=(3,), window_size=7, img_size=512,
         patch_size=32),
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return small_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=2)[0]


@pytest.mark.parametrize("preset", [model.FAST, model.REFERENCE], ids=["fast", "reference"])
@pytest.mark.parametrize("config", CONFIGS)
def test_architecture_is_inferred_from_the_tensors(tmp_path, config, preset):
    reference = reference_sam(seed=4, **config)
    path = save(reference, tmp_path / "custom.pth")
    sam = model.load(path, device="cpu", fast_paths=preset)
    inferred = vit_config(torch.load(path, weights_only=True), path)
    for key, value in config.items():
        assert inferred[key] == value, key
    assert sam.name == "custom" and sam.image_size == config["img_size"]
    image = make_image(40, 70, seed=1)
    embedding = model.Predictor(sam).embed(image)
    from segment_anything import SamPredictor

    meta = SamPredictor(reference)
    meta.set_image(image)
    torch.testing.assert_close(embedding.features, meta.features, atol=1e-4, rtol=0)


@pytest.mark.parametrize("builder, name", [(build_sam_vit_b, "vit_b"), (build_sam_vit_l, "vit_l"),
                                           (build_sam_vit_h, "vit_h")])
def test_official_configurations_are_named(builder, name):
    with torch.device("meta"):
        state_dict = builder().state_dict()
    assert vit_name(vit_config(state_dict, "official.pth")) == name


@pytest.mark.parametrize("wrapper", ["model", "state_dict"])
def test_wrapped_state_dicts_load(tmp_path, checkpoint, wrapper):
    state_dict = torch.load(checkpoint, weights_only=True)
    path = tmp_path / f"wrapped_{wrapper}.pth"
    torch.save({wrapper: state_dict, "epoch": 7, "lr": 1e-4}, path)
    plain = model.Predictor(model.load(checkpoint, device="cpu"))
    wrapped = model.Predictor(model.load(path, device="cpu"))
    image = make_image(80, 100)
    a = plain.predict(plain.embed(image), [[50, 40]], [1])
    b = wrapped.predict(wrapped.embed(image), [[50, 40]], [1])
    np.testing.assert_array_equal(a.low_res_logits, b.low_res_logits)


def test_data_parallel_prefix_is_stripped(tmp_path, checkpoint):
    state_dict = torch.load(checkpoint, weights_only=True)
    path = tmp_path / "ddp.pth"
    torch.save({"module." + k: v for k, v in state_dict.items()}, path)
    assert model.load(path, device="cpu").name == "custom"


def test_fingerprint_is_the_file_sha256_prefix_and_stable(tmp_path, checkpoint):
    expected = hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:16]
    assert model.load(checkpoint, device="cpu").fingerprint == expected
    assert model.load(checkpoint, device="cpu").fingerprint == expected
    other, _ = small_checkpoint(tmp_path, seed=8)
    assert model.load(other, device="cpu").fingerprint != expected


def expect_error(path: Path, match: str) -> CheckpointError:
    with pytest.raises(CheckpointError, match=match) as info:
        model.load(path, device="cpu")
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)
    # One line for a server's error answer, and never the advice to unpickle untrusted code.
    assert "\n" not in str(info.value) and "weights_only" not in str(info.value)
    return info.value


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.pth", "no such file")


def test_truncated_file(tmp_path, checkpoint):
    data = checkpoint.read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    expect_error(path, "truncated")


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint\n" * 10, bytes(range(256)) * 40])
def test_garbage_file(tmp_path, content):
    path = tmp_path / "garbage.pth"
    path.write_bytes(content)
    expect_error(path, "not a PyTorch checkpoint")


def test_non_sam_state_dict(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 2)).state_dict(), path)
    expect_error(path, "not a SAM checkpoint")
    torch.save({"weights": [1, 2, 3]}, path)
    expect_error(path, "not a SAM checkpoint")


def test_pickled_module_explains_what_to_do(tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    error = expect_error(path, "pickled Python objects")
    assert "state_dict()" in str(error)


def test_unknown_architecture(tmp_path, checkpoint):
    state_dict = torch.load(checkpoint, weights_only=True)
    hiera = {k.replace("image_encoder.blocks.", "image_encoder.trunk.blocks."): v for k, v in state_dict.items()}
    hiera = {k: v for k, v in hiera.items() if not k.startswith("image_encoder.patch_embed")}
    path = tmp_path / "hiera.pth"
    torch.save(hiera, path)
    expect_error(path, "unknown SAM architecture")
    # Right keys, a tensor of the wrong shape: still one CheckpointError, not a RuntimeError.
    broken = dict(state_dict)
    broken["mask_decoder.output_hypernetworks_mlps.0.layers.0.weight"] = torch.zeros(3, 3)
    torch.save(broken, path)
    expect_error(path, "do not fit")


def test_dtype_argument(checkpoint):
    assert model.load(checkpoint, device="cpu").dtype is None
    assert model.load(checkpoint, device="cpu", dtype=torch.float32).dtype is None
    sam = model.load(checkpoint, device="cpu", dtype=torch.bfloat16)
    assert sam.dtype == torch.bfloat16
    fp32 = model.Predictor(model.load(checkpoint, device="cpu"))
    bf16 = model.Predictor(sam)
    image = make_image(90, 120, seed=3)
    a = fp32.predict(fp32.embed(image), [[60, 45]], [1], multimask=False)
    b = bf16.predict(bf16.embed(image), [[60, 45]], [1], multimask=False)
    assert b.low_res_logits.dtype == np.float32
    agree = np.logical_and(a.masks, b.masks).sum() / max(1, np.logical_or(a.masks, b.masks).sum())
    assert agree > 0.9
    with pytest.raises(ValueError):
        model.load(checkpoint, device="cpu", dtype=torch.int8)


def test_set_threads():
    from model import runtime

    previous = torch.get_num_threads()
    try:
        runtime.set_threads(1)
        assert torch.get_num_threads() == 1
        with pytest.raises(ValueError):
            runtime.set_threads(0)
    finally:
        torch.set_num_threads(previous)


def test_cuda_request_without_cuda_is_a_clear_error(checkpoint):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA"):
        model.load(checkpoint, device="cuda")


@pytest.mark.slow
def test_compiled_encoder_gives_the_same_embedding(checkpoint):
    compiled = model.load(checkpoint, device="cpu", compile=True)
    assert "encode" not in dict(compiled.named_modules())  # state-dict keys stay Meta's
    assert set(compiled.state_dict()) == set(model.load(checkpoint, device="cpu").state_dict())
    plain = model.Predictor(model.load(checkpoint, device="cpu"))
    image = make_image(70, 90, seed=5)
    torch.testing.assert_close(model.Predictor(compiled).embed(image).features, plain.embed(image).features,
                               atol=1e-4, rtol=0)
