"""Decodes under concurrency: one intra-op thread each (two for a lone one), at most one per core, masks identical
to alone."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from backend.prompts import ObjectPrompt
from backend.segmenter import Segmenter
from model import runtime
from model.checkpoint import load
from model.embedding import Embedding
from model.predictor import Predictor
from model.runtime import DecodeSlots, cpu_cores, idle_cores, use_threads
from testsupport.checkpoints import make_image
from testsupport.mobilesam_checkpoints import make_mobile_sam_checkpoint


def test_slots_bound_concurrency_and_use_one_thread_each() -> None:
    slots = DecodeSlots("cpu", 2, lone_threads=1)
    running, peak, threads = [0], [0], []
    lock = threading.Lock()

    def decode() -> None:
        with slots():
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
                threads.append(torch.get_num_threads())
            time.sleep(0.02)
            with lock:
                running[0] -= 1

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: decode(), range(16)))
    assert peak[0] == 2 and set(threads) == {1}


def test_default_is_one_slot_per_core_and_gpus_are_not_limited() -> None:
    assert DecodeSlots("cpu").slots == cpu_cores()
    gpu = DecodeSlots("cuda", 1)
    with gpu(), gpu():  # no gate on a GPU: nested use does not block
        pass


def test_use_threads_is_per_thread() -> None:
    seen = {}

    def worker(n: int) -> None:
        use_threads(n)
        time.sleep(0.05)
        seen[n] = torch.get_num_threads()

    workers = [threading.Thread(target=worker, args=(n,)) for n in (1, 2)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert seen == {1: 1, 2: 2}


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory: pytest.TempPathFactory) -> Segmenter:
    path = make_mobile_sam_checkpoint(Path(tmp_path_factory.mktemp("ckpt")) / "mobile.pt", "small", seed=1)
    segmenter = Segmenter(path, "cpu", decode_slots=2)
    segmenter.load()
    return segmenter


def prompt(x: float, y: float) -> ObjectPrompt:
    return ObjectPrompt(label="x", points=np.array([[x, y]], np.float32), point_labels=np.array([1], np.int32),
                        box=None, source_ids=(), from_name="tag")


def test_concurrent_clicks_give_the_masks_they_give_alone(segmenter: Segmenter) -> None:
    embeddings = [segmenter.embed(make_image(120, 160, seed), f"image-{seed}") for seed in range(4)]
    jobs = [(i % 4, prompt(20 + 13 * i, 15 + 9 * i)) for i in range(8)]
    alone = [segmenter.segment(embeddings[e], p) for e, p in jobs]
    torch.set_num_threads(2)  # the process default: decodes must not depend on it
    for _ in range(2):
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda job: segmenter.segment(embeddings[job[0]], job[1]), jobs))
        for a, b in zip(alone, together, strict=True):
            np.testing.assert_array_equal(a.mask, b.mask)
            assert a.score == b.score


def test_a_lone_decode_on_an_idle_machine_spreads_and_the_others_wait_for_it(monkeypatch) -> None:
    monkeypatch.setattr(runtime, "LONE_DECODE_COOLDOWN_S", 0.3)
    idle = [1]
    slots = DecodeSlots("cpu", 2, lone_threads=2, idle=lambda: idle[0])
    inside, release = threading.Event(), threading.Event()
    seen: list[int] = []

    def lone() -> None:
        with slots():
            seen.append(torch.get_num_threads())
            inside.set()
            release.wait(5)

    first = threading.Thread(target=lone)
    first.start()
    assert inside.wait(5) and seen == [2]
    second_done = threading.Event()

    def second() -> None:
        with slots():
            seen.append(torch.get_num_threads())
        second_done.set()

    threading.Thread(target=second).start()
    assert not second_done.wait(0.1), "a decode waits while a lone one holds both cores"
    release.set()
    first.join()
    assert second_done.wait(5) and seen == [2, 1], "a decode that had to wait is part of a burst: one thread"
    with slots():
        assert torch.get_num_threads() == 1, "right after a crowd: one thread, though alone"
    time.sleep(0.35)
    with slots():
        assert torch.get_num_threads() == 2, "alone again on an idle machine after the cool-down: two threads again"
    idle[0] = 0  # another process computes: one thread, however alone
    with slots():
        assert torch.get_num_threads() == 1
    assert DecodeSlots("cpu", 2, lone_threads=1, idle=lambda: 8).lone_threads == 1
    assert DecodeSlots("cpu", 1, lone_threads=2).lone_threads == 1


def test_idle_cores_reads_the_runnable_threads() -> None:
    assert 0 <= idle_cores() < cpu_cores()  # the calling thread itself is running


@pytest.fixture(scope="module")
def full_size_decoder(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    """MobileSAM at full size: the decoder meets 64 x 64 = 4096 image tokens, as with every official checkpoint."""
    path = make_mobile_sam_checkpoint(Path(tmp_path_factory.mktemp("vit_t")) / "mobile.pt", "vit_t", seed=2)
    return Predictor(load(path, device="cpu"))


def test_one_thread_or_two_give_the_same_bits(full_size_decoder: Predictor) -> None:
    """Random weights (masks of salt and pepper, logits everywhere near 0): clicks, a negative click, many
    points (Meta's unfolded attention), a box, a second round and a chunk of 16 boxes, each decoded on one
    thread and on two."""
    predictor = full_size_decoder
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(1, 256, 64, 64, generator=generator).contiguous(memory_format=torch.channels_last)
    embedding = Embedding(features=features, original_size=(768, 1024), input_size=(768, 1024),
                          fingerprint=predictor.sam.fingerprint)
    many = np.stack([np.linspace(10, 1000, 20), np.linspace(700, 20, 20)], axis=1)
    first = predictor.predict(embedding, [[500.0, 300.0]], [1])
    requests = [dict(points=[[500.0, 300.0]], labels=[1], best_only=True),
                dict(points=[[100.0, 600.0], [130.0, 640.0]], labels=[1, 0]),
                dict(points=many, labels=np.ones(20)),
                dict(box=[100.0, 50.0, 800.0, 700.0], multimask=False),
                dict(points=[[500.0, 300.0]], labels=[1], mask_input=first.low_res_logits[:1], multimask=False)]
    boxes = np.array([[10.0 * i, 5.0 * i, 500.0 + 20 * i, 400.0 + 10 * i] for i in range(16)])
    results = {}
    for threads in (1, 2):
        use_threads(threads)
        results[threads] = ([predictor.predict(embedding, **request) for request in requests],
                            predictor.predict_boxes(embedding, boxes))
    use_threads(1)
    (one, one_boxes), (two, two_boxes) = results[1], results[2]
    for a, b in [*zip(one, two, strict=True), (one_boxes, two_boxes)]:
        np.testing.assert_array_equal(a.low_res_logits, b.low_res_logits)
        np.testing.assert_array_equal(a.scores, b.scores)
        np.testing.assert_array_equal(a.masks, b.masks)


def test_sam2_decodes_on_one_thread_or_two_give_the_same_bits(tmp_path: Path) -> None:
    """SAM 2.1 tiny's decoder (its high-resolution features too) on a random embedding: click, many points,
    box and a chunk of 16 boxes."""
    from testsupport.sam2_checkpoints import checkpoint

    predictor = Predictor(load(checkpoint(tmp_path, "sam2.1_hiera_tiny", seed=1)[0], device="cpu"))
    generator = torch.Generator().manual_seed(0)

    def channels_last(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).contiguous(memory_format=torch.channels_last)

    embedding = Embedding(features=channels_last(1, 256, 64, 64), original_size=(768, 1024), input_size=(1024, 1024),
                          fingerprint=predictor.sam.fingerprint,
                          high_res=(channels_last(1, 32, 256, 256), channels_last(1, 64, 128, 128)))
    many = np.stack([np.linspace(10, 1000, 20), np.linspace(700, 20, 20)], axis=1)
    boxes = np.array([[10.0 * i, 5.0 * i, 500.0 + 20 * i, 400.0 + 10 * i] for i in range(16)])
    results = {}
    for threads in (1, 2):
        use_threads(threads)
        results[threads] = [predictor.predict(embedding, [[500.0, 300.0]], [1], best_only=True),
                            predictor.predict(embedding, many, np.ones(20)),
                            predictor.predict(embedding, box=[100.0, 50.0, 800.0, 700.0], multimask=False),
                            predictor.predict_boxes(embedding, boxes)]
    use_threads(1)
    for a, b in zip(results[1], results[2], strict=True):
        np.testing.assert_array_equal(a.low_res_logits, b.low_res_logits)
        np.testing.assert_array_equal(a.masks, b.masks)
