"""Our TinyViT against MobileSAM's reference ``TinyViT`` on the same (seeded random) weights.

Features are the neck's output (LayerNorm'd, unit scale): they must agree within FEATURE_ATOL in fp32.
The only differences are float rounding: BatchNorm folded into the convolutions, fused attention and
channels-last layouts; the features are compared under both ``FastPaths`` presets.
"""

from __future__ import annotations

import pytest
import torch
from mobile_sam.modeling.tiny_vit_sam import Attention as ReferenceAttention

from model import FAST, REFERENCE
from model.fast_paths import FastPaths, apply
from model.tiny_vit import TinyViT, attention_bias_index, tiny_vit_config_from_state_dict, tiny_vit_name
from testsupport.mobilesam_checkpoints import (
    SMALL_TINY_VIT,
    make_mobile_sam_checkpoint,
    randomize_,
    reference_sam,
    reference_tiny_vit,
)

FEATURE_ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_reference(config: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_(reference_tiny_vit(config), seed)


def ours_from(reference: torch.nn.Module, preset: FastPaths = FAST) -> TinyViT:
    state_dict = reference.state_dict()
    encoder = TinyViT(**tiny_vit_config_from_state_dict(state_dict, prefix=""))
    encoder.load_state_dict(state_dict, strict=True)
    apply(encoder, preset, "cpu")
    return encoder.eval()


@pytest.fixture(scope="module")
def small_pair() -> tuple[torch.nn.Module, TinyViT]:
    reference = random_reference("small", seed=1)
    return reference, ours_from(reference)


def images(batch: int, seed: int, size: int = 1024) -> torch.Tensor:
    """Normalised-image-like inputs: smooth structure plus noise, zero padding on the bottom right."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, 3, size // 64, size // 64, generator=generator)
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    x = x + 0.3 * torch.randn(batch, 3, size, size, generator=generator)
    x[:, :, size * 3 // 4:, :] = 0  # like a landscape image padded to a square
    return x


@pytest.mark.parametrize("config", ["vit_t", "small"])
def test_state_dict_keys_and_shapes_match_reference(config):
    reference = reference_tiny_vit(config)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    ours = TinyViT(**tiny_vit_config_from_state_dict(reference.state_dict(), prefix=""))
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected


@pytest.mark.parametrize("config", ["vit_t", "small"])
def test_non_persistent_bias_index_matches_reference(config):
    """``attention_bias_idxs`` is not in checkpoints: ours must rebuild exactly the reference's table."""
    reference = {k: v for k, v in reference_tiny_vit(config).named_buffers() if k.endswith("attention_bias_idxs")}
    ours = TinyViT(**tiny_vit_config_from_state_dict(reference_tiny_vit(config).state_dict(), prefix=""))
    ours_buffers = dict(ours.named_buffers())
    assert reference
    for key, index in reference.items():
        torch.testing.assert_close(ours_buffers[key], index, rtol=0, atol=0)
    assert not any("attention_bias_idxs" in k for k in ours.state_dict())


@pytest.mark.parametrize("window", [1, 2, 5, 7, 14])
def test_bias_index_formula(window):
    reference = ReferenceAttention(dim=8, key_dim=4, num_heads=2, attn_ratio=1, resolution=(window, window))
    torch.testing.assert_close(attention_bias_index(window), reference.attention_bias_idxs, rtol=0, atol=0)


def test_config_of_mobile_sam_vit_t():
    config = tiny_vit_config_from_state_dict(reference_sam("vit_t").state_dict())
    assert config == {
        "img_size": 1024, "in_chans": 3, "num_classes": 1000,
        "embed_dims": [64, 128, 160, 320], "depths": [2, 2, 6, 2],
        "num_heads": [None, 4, 5, 10], "window_sizes": [None, 7, 14, 7],
        "mlp_ratio": 4.0, "mbconv_expand_ratio": 4.0, "local_conv_size": 3, "out_chans": 256,
    }
    assert tiny_vit_name(config) == "vit_t"


def test_config_of_small_custom_tiny_vit():
    config = tiny_vit_config_from_state_dict(reference_sam("small").state_dict())
    expected = dict(SMALL_TINY_VIT, out_chans=256)
    expected["num_heads"] = [None, *SMALL_TINY_VIT["num_heads"][1:]]
    expected["window_sizes"] = [None, *SMALL_TINY_VIT["window_sizes"][1:]]
    assert config == expected
    assert tiny_vit_name(config) == "custom"


def test_config_errors_name_the_problem():
    state_dict = reference_tiny_vit("small").state_dict()
    with pytest.raises(ValueError, match="patch_embed.seq.0.c.weight"):
        tiny_vit_config_from_state_dict(state_dict)  # wrong prefix: the keys have none
    broken = {k: v for k, v in state_dict.items() if not k.startswith("layers.1.downsample.")}
    with pytest.raises(ValueError, match=r"layers\.1\.downsample\.conv1\.c\.weight"):
        tiny_vit_config_from_state_dict(broken, prefix="")
    skewed = dict(state_dict)
    skewed["layers.2.blocks.0.attn.attention_biases"] = torch.zeros(4, 80)
    with pytest.raises(ValueError, match="80 offsets"):
        tiny_vit_config_from_state_dict(skewed, prefix="")


@pytest.mark.parametrize("preset", [FAST, REFERENCE], ids=["fast", "reference"])
def test_features_match_reference_small(small_pair, preset):
    reference = small_pair[0]
    ours = ours_from(reference, preset)
    x = images(2, seed=0)
    with torch.inference_mode():
        expected = reference(x)
        actual = ours(x)
    assert actual.shape == (2, 256, 64, 64)
    assert expected.std() > 0.5  # the neck's LayerNorm keeps the scale near 1: a meaningful tolerance
    torch.testing.assert_close(actual, expected, atol=FEATURE_ATOL, rtol=0)
    # Batched images are encoded independently.
    with torch.inference_mode():
        torch.testing.assert_close(ours(x[1:]), actual[1:], atol=FEATURE_ATOL, rtol=0)


def test_train_mode_still_uses_running_statistics(small_pair):
    """Inference-only: ``train()`` must not switch BatchNorm to batch statistics or change the output."""
    _, ours = small_pair
    x = images(1, seed=4)
    with torch.inference_mode():
        expected = ours(x)
        ours.train()
        try:
            actual = ours(x)
        finally:
            ours.eval()
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)


def test_weights_loaded_after_eval_are_used():
    """The reference caches attention biases in eval() and goes stale if weights arrive later; we must not."""
    source = random_reference("small", seed=2)
    ours = TinyViT(**tiny_vit_config_from_state_dict(source.state_dict(), prefix="")).eval()
    x = images(1, seed=5)
    with torch.inference_mode():
        before = ours(x)
        ours.load_state_dict(source.state_dict(), strict=True)
        after = ours(x)
        torch.testing.assert_close(after, source(x), atol=FEATURE_ATOL, rtol=0)
    assert (before - after).abs().max() > 0.1


def test_other_input_sizes_give_a_sixteenth_grid(small_pair):
    _, ours = small_pair
    with torch.inference_mode():
        assert ours(images(1, seed=6, size=512)).shape == (1, 256, 32, 32)


def test_bfloat16_autocast_runs_close_to_fp32(small_pair):
    """Under autocast the bias mask must follow the query dtype (SDPA rejects mixed dtypes)."""
    _, ours = small_pair
    x = images(1, seed=7, size=512)
    with torch.inference_mode():
        expected = ours(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            actual = ours(x)
    assert actual.dtype in (torch.bfloat16, torch.float32)
    error = (actual.float() - expected).abs().mean() / expected.abs().mean()
    assert error < 0.05


def test_mobile_sam_checkpoint_file_loads_strictly(tmp_path):
    path = make_mobile_sam_checkpoint(tmp_path / "mobile_sam.pt", config="small", seed=3)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    encoder_state = {k.removeprefix("image_encoder."): v for k, v in state_dict.items()
                     if k.startswith("image_encoder.")}
    encoder = TinyViT(**tiny_vit_config_from_state_dict(state_dict, prefix="image_encoder."))
    assert not encoder.load_state_dict(encoder_state, strict=True).missing_keys


@pytest.mark.slow
def test_features_match_reference_vit_t():
    reference = random_reference("vit_t", seed=0)
    ours = ours_from(reference)
    x = images(1, seed=1)
    with torch.inference_mode():
        expected = reference(x)
        for preset in (FAST, REFERENCE):
            apply(ours, preset, "cpu")
            actual = ours(x)
            assert actual.shape == (1, 256, 64, 64)
            torch.testing.assert_close(actual, expected, atol=FEATURE_ATOL, rtol=0)
