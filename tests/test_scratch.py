"""Reused full-size logits (``model.scratch``): the same masks, the memory kept within its budget."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import load
from model.predictor import Predictor
from model.scratch import ScratchTensors
from model.transforms import postprocess_masks
from testsupport.checkpoints import make_image
from testsupport.mobilesam_checkpoints import make_mobile_sam_checkpoint


def test_a_returned_tensor_is_handed_out_again() -> None:
    pool = ScratchTensors()
    cpu = torch.device("cpu")
    with pool.take((2, 3, 4), cpu) as first:
        pointer = first.data_ptr()
        assert first.shape == (2, 3, 4) and first.dtype == torch.float32
    with pool.take((1, 1, 4, 5), cpu) as again:  # smaller: a view of the same memory
        assert again.data_ptr() == pointer and again.shape == (1, 1, 4, 5)
    assert pool.kept_bytes == 24 * 4


def test_the_smallest_tensor_that_fits_is_taken_among_others() -> None:
    pool = ScratchTensors()
    cpu = torch.device("cpu")
    with pool.take((10,), cpu) as small, pool.take((1000,), cpu) as large, pool.take((100,), cpu) as middle:
        pointers = small.data_ptr(), middle.data_ptr(), large.data_ptr()
    for numel, pointer in zip((50, 500, 5), pointers[1:] + pointers[:1], strict=True):
        with pool.take((numel,), cpu) as tensor:
            assert tensor.data_ptr() == pointer
    assert pool.kept_bytes == 1110 * 4


def test_concurrent_users_get_tensors_of_their_own() -> None:
    pool = ScratchTensors()
    cpu = torch.device("cpu")
    inside, pointers = threading.Barrier(2), []

    def use() -> None:
        with pool.take((1000,), cpu) as tensor:
            pointers.append(tensor.data_ptr())
            inside.wait(timeout=10)

    workers = [threading.Thread(target=use) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(set(pointers)) == 2 and pool.kept_bytes == 2 * 1000 * 4


def test_the_budget_drops_the_largest_first() -> None:
    pool = ScratchTensors(max_bytes=1000 * 4)
    cpu = torch.device("cpu")
    with pool.take((600,), cpu), pool.take((300,), cpu), pool.take((200,), cpu):
        pass
    assert pool.kept_bytes == (300 + 200) * 4


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    path = make_mobile_sam_checkpoint(Path(tmp_path_factory.mktemp("ckpt")) / "mobile.pt", "small", seed=3)
    return Predictor(load(path, device="cpu"))


def test_click_masks_are_the_thresholded_logits_and_reuse_memory(predictor: Predictor) -> None:
    """A click on an image larger than the encoder input: the final resize writes into reused memory, also
    after clicks on an image of the encoder's size (whose logits need no final resize) left a smaller tensor."""
    small = predictor.embed(make_image(768, 1024, seed=4))
    predictor.predict(small, points=[[100.0, 200.0]], labels=[1], best_only=True)
    embedding = predictor.embed(make_image(1200, 1600, seed=5))
    for point in ((400.0, 300.0), (1250.0, 900.0)):
        coords, labels = torch.tensor([[point]], dtype=torch.float64), torch.tensor([[1]])
        masks, _, low_res = predictor.predict_torch(embedding, coords, labels, best_only=True)
        logits = postprocess_masks(low_res, predictor.sam.image_size, embedding.input_size, embedding.original_size)
        assert masks.dtype == torch.bool and masks.shape == (1, 1, 1200, 1600)
        assert torch.equal(masks, logits > predictor.sam.mask_threshold)
        assert np.array_equal(predictor.predict(embedding, points=[point], labels=[1], best_only=True).masks,
                              masks[0].numpy())
    assert predictor._scratch.kept_bytes == (768 * 1024 + 1200 * 1600) * 4
