"""Parity of our SAM 2.1 image path with Meta's ``SAM2ImagePredictor`` (sam2==1.1.0) on the same weights.

Seeded random weights in the official ``{"model": state_dict}`` format (``testsupport.sam2_checkpoints``):
a small custom configuration (256-px input, every kind of Hiera block, a window that needs padding) for
most cases, the released tiny configuration at full size, base+ and large under ``slow``. Masks must agree
to IoU >= 0.99, low-res logits within ``LOGIT_ATOL`` and predicted IoUs within ``SCORE_ATOL``
(``testsupport.parity``); the embeddings within 1e-4 (small) / 1e-3 (full size) absolute. Every compared
prediction has some mask neither empty nor full. The small configuration and tiny run under both
``FastPaths`` presets: ``FAST`` (what the backend serves) and ``REFERENCE`` (Meta's order of operations).
"""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
import torch

import model
from model import FAST, REFERENCE, sam2_checkpoint
from model.hiera import max_pool_2x2
from model.sam2_checkpoint import Sam2Config, load_with_config
from testsupport.checkpoints import make_image
from testsupport.parity import assert_same
from testsupport.sam2_checkpoints import SMALL, checkpoint, reference_predictor, small_checkpoint, state_dict

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")]

SIZES = [(300, 400), (480, 200), (256, 256), (37, 50), (4, 60)]
SMALL_CONFIG = Sam2Config(num_heads=SMALL["num_heads"], global_att_blocks=SMALL["global_att_blocks"],
                          window_spec=SMALL["window_spec"], image_size=SMALL["image_size"])


PRESETS = pytest.mark.parametrize("preset", [FAST, REFERENCE], ids=["fast", "reference"])


@pytest.fixture(scope="module", params=[FAST, REFERENCE], ids=["fast", "reference"])
def small(tmp_path_factory, request):
    path, reference = small_checkpoint(tmp_path_factory.mktemp("sam2"), seed=3)
    ours = load_with_config(path, SMALL_CONFIG, device="cpu", fast_paths=request.param)
    assert ours.fast_paths == request.param
    return model.Predictor(ours), reference_predictor(reference)


def prompts(h: int, w: int) -> dict[str, dict]:
    point = np.array([[w * 0.45, h * 0.55]])
    box = np.array([w * 0.1, h * 0.2, w * 0.8, h * 0.9])
    return {
        "one point, three masks": dict(points=point, labels=np.array([1])),
        "points with a negative": dict(points=np.array([[w * 0.3, h * 0.4], [w * 0.7, h * 0.6], [w * 0.5, h * 0.2]]),
                                       labels=np.array([1, 1, 0])),
        "box": dict(box=box, multimask=False),
        "box + negative point": dict(points=point, labels=np.array([0]), box=box, multimask=False),
        "box + points, three masks": dict(points=point, labels=np.array([1]), box=box),
        "one point, one mask": dict(points=point, labels=np.array([1]), multimask=False),
    }


def compare(ours: model.Predictor, embedding: model.Embedding, reference, prompt: dict) -> model.Prediction:
    multimask = prompt.get("multimask", True)
    result = ours.predict(embedding, prompt.get("points"), prompt.get("labels"), box=prompt.get("box"),
                          mask_input=prompt.get("mask_input"), multimask=multimask)
    masks, scores, logits = reference.predict(prompt.get("points"), prompt.get("labels"), box=prompt.get("box"),
                                              mask_input=prompt.get("mask_input"), multimask_output=multimask)
    assert_same(result, masks.astype(bool), scores, logits)
    return result


def assert_embedding_matches(embedding: model.Embedding, reference, atol: float) -> None:
    features = reference._features
    torch.testing.assert_close(embedding.features, features["image_embed"], atol=atol, rtol=0)
    assert len(embedding.high_res) == 2
    for ours, theirs in zip(embedding.high_res, features["high_res_feats"], strict=True):
        torch.testing.assert_close(ours, theirs, atol=atol, rtol=0)
        assert ours.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-linear", "plain-linear"])
def test_encoder_levels_match_meta(small, fused):
    """Trunk stages and the neck's levels (before the decoder's projections) equal Meta's backbone, with
    oneDNN's fused linear (where this PyTorch has it) and with plain ``F.linear``, the other paths as the
    preset sets them."""
    ours, reference = small
    preset = ours.sam.fast_paths
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    ours.sam.set_fast_paths(replace(preset, fused_linear=fused and preset.fused_linear))
    try:
        with torch.inference_mode():
            expected = reference.model.image_encoder(x)["backbone_fpn"]
            trunk = reference.model.image_encoder.trunk(x)
            our_trunk = ours.sam.image_encoder.trunk(x)
            got = ours.sam.image_encoder(x)
    finally:
        ours.sam.set_fast_paths(preset)
    for a, b in zip(our_trunk, trunk, strict=True):
        torch.testing.assert_close(a.permute(0, 3, 1, 2), b, atol=1e-5, rtol=0)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", SIZES)
def test_prompts_match_reference(small, size):
    ours, reference = small
    h, w = size
    image = make_image(h, w, seed=h + w)
    embedding = ours.embed(image)
    reference.set_image(image)
    assert embedding.original_size == (h, w) and embedding.input_size == (256, 256)
    assert_embedding_matches(embedding, reference, atol=1e-4)
    for prompt in prompts(h, w).values():
        compare(ours, embedding, reference, prompt)


def test_second_round_with_mask_input(small):
    ours, reference = small
    image = make_image(300, 400, seed=9)
    embedding = ours.embed(image)
    reference.set_image(image)
    point = np.array([[170.0, 140.0]])
    first = compare(ours, embedding, reference, dict(points=point, labels=np.array([1])))
    best = int(np.argmax(first.scores))
    logits = first.low_res_logits[best:best + 1]
    assert np.abs(logits).max() <= 32.0  # clamped as Meta clamps the logits it hands back
    second = dict(points=np.array([[170.0, 140.0], [300.0, 60.0]]), labels=np.array([1, 0]), mask_input=logits,
                  multimask=False)
    compare(ours, embedding, reference, second)
    compare(ours, embedding, reference, dict(mask_input=logits, multimask=False))


def test_batched_boxes(small):
    ours, reference = small
    image = make_image(240, 320, seed=4)
    embedding = ours.embed(image)
    reference.set_image(image)
    boxes = np.array([[20, 30, 200, 180], [100, 10, 310, 230], [0, 0, 160, 120]], dtype=np.float64)
    result = ours.predict_boxes(embedding, boxes)
    masks, scores, logits = reference.predict(box=boxes, multimask_output=False)
    assert_same(result, masks[:, 0].astype(bool), scores[:, 0], logits[:, 0])


def test_single_mask_falls_back_to_the_best_multimask_output(small, monkeypatch):
    """SAM 2's decoder replaces an unstable single mask by the best of the three: force that branch."""
    ours, reference = small
    image = make_image(200, 260, seed=5)
    embedding = ours.embed(image)
    reference.set_image(image)
    monkeypatch.setattr(ours.sam.mask_decoder, "dynamic_multimask_stability_thresh", 1.5)
    monkeypatch.setattr(reference.model.sam_mask_decoder, "dynamic_multimask_stability_thresh", 1.5)
    single = compare(ours, embedding, reference, dict(points=np.array([[90.0, 120.0]]), labels=np.array([1]),
                                                      multimask=False))
    three = ours.predict(embedding, [[90.0, 120.0]], [1])
    assert single.scores[0] == pytest.approx(three.scores.max(), abs=1e-6)


def test_best_only_picks_the_reference_best(small):
    ours, reference = small
    image = make_image(180, 240, seed=6)
    embedding = ours.embed(image)
    reference.set_image(image)
    masks, scores, logits = reference.predict(np.array([[120.0, 90.0]]), np.array([1]))
    best = int(np.argmax(scores))
    result = ours.predict(embedding, [[120.0, 90.0]], [1], best_only=True)
    assert_same(result, masks[best:best + 1].astype(bool), scores[best:best + 1], logits[best:best + 1])


def test_embedding_round_trips_through_bytes(small):
    ours, _ = small
    image = make_image(150, 220, seed=7)
    embedding = ours.embed(image)
    data = embedding.to_bytes()
    back = model.Embedding.from_bytes(data, device="cpu")
    assert back.original_size == embedding.original_size and back.input_size == embedding.input_size
    assert back.fingerprint == embedding.fingerprint and len(back.high_res) == 2
    for a, b in zip((back.features, *back.high_res), (embedding.features, *embedding.high_res), strict=True):
        assert a.shape == b.shape and a.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(a, b, atol=2e-2, rtol=1e-3)
    assert back.nbytes == embedding.nbytes == 4 * sum(t.numel() for t in (back.features, *back.high_res))
    assert back.to_bytes() == data
    a, b = ours.predict(embedding, [[100, 70]], [1]), ours.predict(back, [[100, 70]], [1])
    for k in range(3):
        union = np.logical_or(a.masks[k], b.masks[k]).sum()
        assert np.logical_and(a.masks[k], b.masks[k]).sum() / union >= 0.99
    with pytest.raises(ValueError, match="checksum"):
        damaged = bytearray(data)
        damaged[-10] ^= 0xFF
        model.Embedding.from_bytes(bytes(damaged))


def test_sam1_embedding_is_refused(small):
    ours, _ = small
    sam1_like = model.Embedding(features=torch.zeros(1, 64, 16, 16), original_size=(10, 10), input_size=(256, 256),
                                fingerprint=ours.sam.fingerprint)
    with pytest.raises(ValueError, match="high-resolution"):
        ours.predict(sam1_like, [[1, 1]], [1])


@pytest.mark.parametrize("chunk", [64, 1 << 30])
def test_mlp_chunks_equal_the_whole_grid(small, chunk):
    """MLPs over chunks of rows (the CPU path, here one row at a time) against one pass over the grid."""
    ours, _ = small
    preset = ours.sam.fast_paths
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    try:
        with torch.inference_mode():
            ours.sam.set_fast_paths(replace(FAST, hiera_mlp_chunk_elements=chunk))
            chunked = ours.sam.image_encoder.trunk(x)
            ours.sam.set_fast_paths(replace(FAST, hiera_mlp_chunk_elements=0))
            whole = ours.sam.image_encoder.trunk(x)
    finally:
        ours.sam.set_fast_paths(preset)
    for a, b in zip(chunked, whole, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_stays_close_to_fp32(small, tmp_path, dtype):
    """The reduced-precision modes (CUDA's defaults; emulated here on the CPU) run the same path."""
    ours, _ = small
    path, _ = small_checkpoint(tmp_path, seed=3)
    low = model.Predictor(load_with_config(path, SMALL_CONFIG, device="cpu", dtype=dtype))
    image = make_image(300, 400, seed=1)
    exact, approx = ours.predict(ours.embed(image), [[200, 150]], [1]), low.predict(low.embed(image), [[200, 150]], [1])
    for a, b in zip(exact.masks, approx.masks, strict=True):
        assert np.logical_and(a, b).sum() / np.logical_or(a, b).sum() >= 0.98
    np.testing.assert_allclose(exact.scores, approx.scores, atol=2e-2)


@pytest.mark.parametrize("shape", [(1, 8, 8, 3), (2, 7, 9, 4), (1, 3, 5, 2)])
def test_max_pool_equals_torch(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.max_pool2d(x.permute(0, 3, 1, 2), 2, 2).permute(0, 2, 3, 1)
    assert torch.equal(max_pool_2x2(x), expected)


@pytest.mark.parametrize("name", ["sam2.1_hiera_tiny", "sam2.1_hiera_small", "sam2.1_hiera_base_plus",
                                  "sam2.1_hiera_large", "sam2_hiera_tiny", "sam2_hiera_small", "sam2_hiera_base_plus",
                                  "sam2_hiera_large"])
def test_official_configurations_are_detected(name):
    """Each released architecture, from a state dict of Meta's builder: named, built, loaded strictly."""
    sd = state_dict(name)
    sam, image_path = sam2_checkpoint.build(sd, name)
    assert sam.name == name and sam.image_size == 1024
    sam.load_state_dict(image_path, strict=True)
    assert set(sd) - set(image_path) and all(k.startswith(sam2_checkpoint.VIDEO_ONLY) for k in set(sd) - set(image_path))


def test_unknown_keys_and_custom_architectures_are_refused(tmp_path):
    sd = state_dict("sam2.1_hiera_tiny")
    path = tmp_path / "extra.pt"
    torch.save({"model": {**sd, "sam_mask_decoder.surprise": torch.zeros(1)}}, path)
    with pytest.raises(model.CheckpointError, match="do not fit"):
        model.load(path, device="cpu")
    path, _ = small_checkpoint(tmp_path, seed=1)
    with pytest.raises(model.CheckpointError, match="load_with_config"):
        model.load(path, device="cpu")


def check_official(tmp_path, name: str, sizes: list[tuple[int, int]], embed_atol: float,
                   preset: model.FastPaths = FAST) -> None:
    path, reference_sam = checkpoint(tmp_path, name, seed=11)
    sam = model.load(path, device="cpu", fast_paths=preset)
    assert sam.name == name and sam.image_size == 1024
    ours, reference = model.Predictor(sam), reference_predictor(reference_sam)
    for h, w in sizes:
        image = make_image(h, w, seed=h)
        embedding = ours.embed(image)
        reference.set_image(image)
        assert_embedding_matches(embedding, reference, atol=embed_atol)
        chosen = prompts(h, w)
        for key in ("one point, three masks", "box + negative point", "points with a negative"):
            result = compare(ours, embedding, reference, chosen[key])
            assert result.low_res_logits.shape[-2:] == (256, 256)


@PRESETS
def test_tiny_matches_reference(tmp_path, preset):
    check_official(tmp_path, "sam2.1_hiera_tiny", [(480, 640)], embed_atol=1e-3, preset=preset)


def test_reference_trunk_is_metas_bit_for_bit(tmp_path):
    """Under ``REFERENCE`` the Hiera trunk runs Meta's operations in Meta's order: the very same floats."""
    path, reference_sam = small_checkpoint(tmp_path, seed=4)
    ours = load_with_config(path, SMALL_CONFIG, device="cpu", fast_paths=REFERENCE)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        theirs = reference_sam.image_encoder.trunk(x)
        got = ours.image_encoder.trunk(x)
    for a, b in zip(got, theirs, strict=True):
        assert torch.equal(a.permute(0, 3, 1, 2), b)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sam2.1_hiera_base_plus", "sam2.1_hiera_large"])
def test_base_plus_and_large_match_reference(tmp_path, name):
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    check_official(tmp_path, name, [(600, 500)], embed_atol=1e-3)


def test_runtime_needs_none_of_the_reference_packages(tmp_path):
    """Loading and running a SAM 2.1 checkpoint imports neither sam2 nor Hydra nor torchvision."""
    import subprocess
    import sys

    path, _ = small_checkpoint(tmp_path, seed=8)
    code = f"""
import sys
import numpy as np
import model
from model.sam2_checkpoint import Sam2Config, load_with_config
config = Sam2Config(num_heads=1, global_att_blocks={SMALL['global_att_blocks']!r}, window_spec={SMALL['window_spec']!r},
                    image_size={SMALL['image_size']})
predictor = model.Predictor(load_with_config({str(path)!r}, config, device="cpu"))
predictor.predict(predictor.embed(np.zeros((40, 50, 3), np.uint8)), [[5, 5]], [1])
model.MaskGenerator(predictor.sam, points_per_side=2).generate(np.zeros((40, 50, 3), np.uint8))
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("sam2", "hydra", "omegaconf", "iopath", "torchvision"))
assert not loaded, loaded
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


@pytest.mark.slow
def test_compiled_encoder_equals_eager(small, tmp_path):
    """``compile=True`` (torch.compile of the image encoder, about a minute on a CPU) gives the same features."""
    ours, _ = small
    path, _ = small_checkpoint(tmp_path, seed=3)
    compiled = model.Predictor(load_with_config(path, SMALL_CONFIG, device="cpu", compile=True))
    image = make_image(200, 300, seed=1)
    eager, fast = ours.embed(image), compiled.embed(image)
    for a, b in zip((eager.features, *eager.high_res), (fast.features, *fast.high_res), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
