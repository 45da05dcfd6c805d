"""Parity of our engine with Meta's ``SamPredictor`` on the same (seeded random) weights and images.

Masks must agree to IoU >= 0.99, low-res logits within LOGIT_ATOL, predicted IoU within SCORE_ATOL (tests/parity.py).
Each compared prediction must also be non-trivial (some mask neither empty nor full), otherwise two
all-empty masks would "agree" without proving anything. Our engine runs under both ``FastPaths`` presets:
``FAST`` (what the backend serves) and ``REFERENCE`` (Meta's order of operations everywhere).
"""

from __future__ import annotations

import os
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from segment_anything.utils.transforms import ResizeLongestSide

import model
from model import FAST, REFERENCE
from model.transforms import resize_longest_side
from testsupport.checkpoints import make_image, reference_sam, small_checkpoint, vit_b_checkpoint
from testsupport.parity import assert_same

# (height, width): landscape, portrait, square, tiny, a 1-pixel-high strip.
SIZES = [(300, 400), (480, 200), (256, 256), (37, 50), (1, 40)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")
PRESETS = pytest.mark.parametrize("preset", [FAST, REFERENCE], ids=["fast", "reference"])


@pytest.fixture(scope="module")
def small_checkpoint_file(tmp_path_factory):
    return small_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=3)


@pytest.fixture(scope="module", params=[FAST, REFERENCE], ids=["fast", "reference"])
def small(small_checkpoint_file, request):
    path, reference = small_checkpoint_file
    return model.Predictor(model.load(path, device="cpu", fast_paths=request.param)), SamPredictor(reference)


@pytest.mark.parametrize("size", [(300, 400), (480, 200), (37, 50), (1, 40), (1000, 777), (256, 256)])
def test_resize_is_identical_to_reference(size):
    image = make_image(*size, seed=size[0])
    for long_side in (256, 1024):
        expected = ResizeLongestSide(long_side).apply_image(image)
        np.testing.assert_array_equal(resize_longest_side(image, long_side), expected)


@pytest.mark.parametrize("size", SIZES)
def test_prompts_match_reference(small, size):
    ours, reference = small
    h, w = size
    image = make_image(h, w, seed=h + w)
    embedding = ours.embed(image)
    reference.set_image(image)
    assert embedding.original_size == (h, w)
    assert embedding.input_size == reference.input_size
    torch.testing.assert_close(embedding.features, reference.features, atol=1e-4, rtol=0)

    one = np.array([[w * 0.45, h * 0.55]])
    several = np.array([[w * 0.3, h * 0.4], [w * 0.7, h * 0.6], [w * 0.5, h * 0.2]])
    several_labels = np.array([1, 1, 0])
    box = np.array([w * 0.1, h * 0.2, w * 0.8, h * 0.9])

    # A single click, three candidate masks.
    first = ours.predict(embedding, one, np.array([1]))
    assert_same(first, *reference.predict(one, np.array([1])))
    # Several points including a negative one, single mask.
    assert_same(ours.predict(embedding, several, several_labels, multimask=False),
                *reference.predict(several, several_labels, multimask_output=False))
    # A box alone, and a box with points.
    assert_same(ours.predict(embedding, box=box, multimask=False),
                *reference.predict(box=box, multimask_output=False))
    assert_same(ours.predict(embedding, several, several_labels, box=box),
                *reference.predict(several, several_labels, box=box))
    # Second round: the best first-round low-res logits go back in as mask input.
    best = first.low_res_logits[np.argmax(first.scores)][None]
    assert_same(ours.predict(embedding, several, several_labels, mask_input=best, multimask=False),
                *reference.predict(several, several_labels, mask_input=best, multimask_output=False))


def test_predict_boxes_matches_reference_predict_torch(small):
    ours, reference = small
    image = make_image(360, 500, seed=7)
    embedding = ours.embed(image)
    reference.set_image(image)
    boxes = np.array([[10, 20, 300, 340], [200, 50, 480, 200], [0, 0, 499, 359], [120, 100, 160, 150]], float)
    boxes_t = reference.transform.apply_boxes_torch(torch.as_tensor(boxes, dtype=torch.float), (360, 500))
    with torch.no_grad():
        masks, scores, logits = reference.predict_torch(None, None, boxes=boxes_t, multimask_output=False)
    result = ours.predict_boxes(embedding, boxes)
    assert result.masks.shape == (4, 360, 500)
    assert_same(result, masks[:, 0].numpy(), scores[:, 0].numpy(), logits[:, 0].numpy())
    empty = ours.predict_boxes(embedding, np.zeros((0, 4)))
    assert empty.masks.shape == (0, 360, 500) and empty.scores.shape == (0,)


def test_best_only_is_the_reference_candidate_with_the_highest_score(small):
    """A single click keeps the best of 3 by predicted IoU; picking it before upsampling changes nothing."""
    ours, reference = small
    image = make_image(360, 500, seed=9)
    embedding = ours.embed(image)
    reference.set_image(image)
    for point in ([[250.0, 180.0]], [[40.0, 300.0]], [[480.0, 20.0]]):
        masks, scores, logits = reference.predict(np.array(point), np.array([1]), multimask_output=True)
        best = int(np.argmax(scores))
        result = ours.predict(embedding, np.array(point), np.array([1]), multimask=True, best_only=True)
        assert result.masks.shape == (1, 360, 500)
        assert_same(result, masks[best:best + 1], scores[best:best + 1], logits[best:best + 1])


def test_grayscale_and_rgba_are_converted(small):
    ours, _ = small
    rgb = make_image(120, 90, seed=11)
    gray = rgb[:, :, 1]
    from_gray = ours.embed(gray).features
    torch.testing.assert_close(from_gray, ours.embed(np.repeat(gray[:, :, None], 3, axis=2)).features)
    rgba = np.concatenate([rgb, np.full((120, 90, 1), 77, np.uint8)], axis=2)
    torch.testing.assert_close(ours.embed(rgba).features, ours.embed(rgb).features)


@pytest.mark.parametrize("image", [np.zeros((10, 10, 2), np.uint8), np.zeros((10, 10, 3), np.float32),
                                   np.zeros((0, 10, 3), np.uint8), "not an image"])
def test_bad_images_raise_value_error(small, image):
    with pytest.raises(ValueError):
        small[0].embed(image)


def test_bad_prompts_raise_value_error(small):
    ours, _ = small
    embedding = ours.embed(make_image(64, 64))
    for kwargs in [dict(), dict(points=[[1, 2]]), dict(points=[[1, 2]], labels=[2]),
                   dict(points=[[1, 2, 3]], labels=[1]), dict(box=[1, 2, 3]), dict(box=[0, 0, np.nan, 4]),
                   dict(mask_input=np.zeros((1, 10, 10))), dict(points="abc", labels=[1])]:
        with pytest.raises(ValueError):
            ours.predict(embedding, **kwargs)


def test_embedding_of_another_model_is_rejected(small, tmp_path):
    path, _ = small_checkpoint(tmp_path, seed=99)
    other = model.Predictor(model.load(path, device="cpu"))
    embedding = other.embed(make_image(50, 60))
    with pytest.raises(ValueError, match="made by model"):
        small[0].predict(embedding, [[10, 10]], [1])


def test_threads_with_different_embeddings_get_their_own_masks(small):
    """One Predictor, several threads, each on its own image: results equal the sequential ones."""
    ours, _ = small
    images = [make_image(200 + 40 * i, 300 - 30 * i, seed=i) for i in range(4)]
    embeddings = [ours.embed(image) for image in images]
    point = np.array([[60.0, 80.0]])
    expected = [ours.predict(e, point, [1]) for e in embeddings]
    results: dict[int, list] = {i: [] for i in range(4)}

    def work(i: int) -> None:
        for _ in range(5):
            results[i].append(ours.predict(embeddings[i], point, [1]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # A mix-up would give another image's numbers; what concurrency may change is float rounding: a
    # BLAS call that finds the other cores busy splits its sums differently (1 thread against 2 already
    # moves logits by ~1e-6 in the last bits).
    for i in range(4):
        for got in results[i]:
            np.testing.assert_array_equal(got.masks, expected[i].masks)
            np.testing.assert_allclose(got.scores, expected[i].scores, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got.low_res_logits, expected[i].low_res_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_vit_b_matches_reference(tmp_path):
    """Both presets against Meta on each image: Meta's encoder runs once per image."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))  # Meta's reference encoder dominates this test
    path, reference = vit_b_checkpoint(tmp_path, seed=5)
    sam = model.load(path, device="cpu")
    assert sam.name == "vit_b" and sam.image_size == 1024
    ours, meta = model.Predictor(sam), SamPredictor(reference)
    for h, w in [(480, 640), (700, 300)]:
        image = make_image(h, w, seed=h)
        meta.set_image(image)
        for preset in (FAST, REFERENCE):
            sam.set_fast_paths(preset)
            embedding = ours.embed(image)
            torch.testing.assert_close(embedding.features, meta.features, atol=1e-3, rtol=0)
            point = np.array([[w * 0.4, h * 0.6]])
            first = ours.predict(embedding, point, np.array([1]))
            assert first.low_res_logits.shape == (3, 256, 256)
            assert_same(first, *meta.predict(point, np.array([1])))
            box = np.array([w * 0.2, h * 0.1, w * 0.9, h * 0.7])
            assert_same(ours.predict(embedding, point, np.array([0]), box=box, multimask=False),
                        *meta.predict(point, np.array([0]), box=box, multimask_output=False))


@pytest.mark.parametrize("budget", [300, 5000])
def test_chunked_attention_bias_gives_the_same_embedding(small_checkpoint_file, budget):
    """Tiny bias budgets force the per-head and per-row chunking that full-size global blocks use."""
    path, reference = small_checkpoint_file
    ours = model.Predictor(model.load(path, device="cpu", fast_paths=replace(FAST, attention_bias_elements=budget)))
    image = make_image(150, 220, seed=4)
    meta = SamPredictor(reference)
    meta.set_image(image)
    torch.testing.assert_close(ours.embed(image).features, meta.features, atol=1e-4, rtol=0)


@pytest.mark.parametrize("input_size, original_size", [((768, 1024), (480, 640)), ((1024, 421), (700, 288)),
                                                       ((1024, 1024), (1024, 1024)), ((20, 1024), (1, 50)),
                                                       ((1024, 740), (37, 27)), ((768, 1024), (1500, 2000)),
                                                       ((768, 1024), (768, 1024)), ((577, 1024), (1080, 1920)),
                                                       ((1024, 768), (4000, 3000)), ((1024, 1), (3000, 2))])
@PRESETS
def test_postprocess_matches_meta(input_size, original_size, preset):
    from model.transforms import postprocess_masks

    logits = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 3
    ours = postprocess_masks(logits, 1024, input_size, original_size, preset)
    meta = reference_sam(img_size=1024, depth=1, global_attn_indexes=(0,))
    reference = meta.postprocess_masks(logits, input_size, original_size)
    torch.testing.assert_close(ours, reference, atol=1e-3, rtol=0)
    assert ((ours > 0) != (reference > 0)).float().mean() < 1e-5
    if 3 * original_size[0] * original_size[1] >= input_size[0] * input_size[1]:
        assert torch.equal(ours, reference), "Meta's two resizes on a cropped input are bit for bit Meta's"
    if preset == REFERENCE:
        assert torch.equal(ours, reference), "the reference preset is Meta's code"


def test_windowed_blocks_in_bands_equal_the_whole_grid(tmp_path):
    """Bands of window rows (the CPU path) against one pass over the grid, where the last band is padded.

    A 512-px input with 32-px patches is a 16x16 grid; windows of 7 leave a 2-row last band.
    """
    path, reference = small_checkpoint(tmp_path, seed=6, img_size=512, patch_size=32, window_size=7,
                                       global_attn_indexes=(1,))
    sam = model.load(path, device="cpu")
    x = torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        banded = sam.image_encoder(x)
        sam.set_fast_paths(replace(FAST, window_bands=False))
        whole = sam.image_encoder(x)
        sam.set_fast_paths(REFERENCE)
        meta_order = sam.image_encoder(x)
        expected = reference.image_encoder(x)
    torch.testing.assert_close(banded, whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(banded, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(meta_order, expected, atol=1e-4, rtol=0)
