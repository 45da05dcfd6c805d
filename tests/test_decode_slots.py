"""Decodes under concurrency: one intra-op thread each, at most one per core, masks identical to alone."""

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
from model.runtime import DecodeSlots, cpu_cores, use_threads
from testsupport.checkpoints import make_image
from testsupport.mobilesam_checkpoints import make_mobile_sam_checkpoint


def test_slots_bound_concurrency_and_use_one_thread_each() -> None:
    slots = DecodeSlots("cpu", 2)
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
