"""One embedding, one mask: a click gives the identical mask on every worker, whichever cache tier served it.

Two real ``sam-backend serve`` processes share one real Redis. Every reference mask is the answer to its click
sent alone to process A, which encodes each image (its memory tier). Then 8 annotators x 8 images x 10 clicks
go at once to A and B alternately, B reading every embedding from Redis; then A is restarted on an emptied
Redis (it encodes again) while B serves from its memory. Every mask must equal its reference pixel for pixel:
before the cache rounded its own encodes to Redis' fp16, A's fp32 copy and B's fp16 copy gave masks 1-19 px
apart.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from testsupport.backend import (
    ServerProcess,
    brush_mask,
    fixture_body,
    make_tiny_checkpoint,
    png_bytes,
    running_label_studio,
    scene,
    start_server,
)
from testsupport.processes import RedisServer

ENCODES = "sam_backend_encoder_seconds_count"
REDIS_HITS = ("sam_backend_embedding_cache_hits_total", 'tier="redis"')
ANNOTATORS, CLICKS = 8, 10
Click = tuple[int, int]


@pytest.fixture(scope="module")
def label_studio() -> Iterator[Any]:
    with running_label_studio() as server:
        for seed in range(ANNOTATORS):
            server.files[f"same{seed}.png"] = (png_bytes(scene(100 + seed)), "image/png")
        yield server


@pytest.fixture
def start(label_studio: Any, redis_server: RedisServer, tmp_path: Path) -> Iterator[Any]:
    checkpoint = make_tiny_checkpoint(tmp_path / "sam_tiny.pth", seed=17)
    redis.Redis.from_url(redis_server.url).flushdb()
    started: list[ServerProcess] = []

    def launch(name: str) -> ServerProcess:
        server = start_server(checkpoint, tmp_path / f"{name}.log", threads=8, REDIS_URL=redis_server.url,
                              SAM_WARMUP="false")
        started.append(server)
        setup = fixture_body("setup.json")
        setup["hostname"] = label_studio.url
        assert server.post("/setup", json=setup).status_code == 200
        server.wait_loaded()
        return server

    yield launch
    for server in started:
        server.stop()


def click_body(image: str, x: float, y: float, task_id: int) -> dict[str, Any]:
    """The recorded smart-keypoint /predict, on ``/data/upload/4/<image>`` at (x %, y %)."""
    body = copy.deepcopy(fixture_body("predict_interactive_keypoint_api.json"))
    task = body["tasks"][0]
    task["id"], task["data"]["image"], task["predictions"] = task_id, f"/data/upload/4/{image}", []
    region = body["params"]["context"]["result"][0]
    region["value"]["x"], region["value"]["y"] = x, y
    return body


def mask_of(response: Any) -> np.ndarray:
    assert response.status_code == 200, response.text
    return brush_mask(response.json())


def clicks() -> dict[Click, dict[str, Any]]:
    return {(annotator, k): click_body(f"same{annotator}.png", x=8 + 9 * k, y=12 + 7 * k, task_id=300 + annotator)
            for annotator in range(ANNOTATORS) for k in range(CLICKS)}


def all_at_once(servers: list[ServerProcess], bodies: dict[Click, dict[str, Any]]) -> dict[Click, np.ndarray]:
    """Each annotator a thread, its clicks sent to the servers in turn; all threads start together."""
    masks: dict[Click, np.ndarray] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(ANNOTATORS)

    def annotate(annotator: int) -> None:
        try:
            barrier.wait()
            for k in range(CLICKS):
                server = servers[(annotator + k) % len(servers)]
                masks[annotator, k] = mask_of(server.post("/predict", json=bodies[annotator, k]))
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=annotate, args=(a,)) for a in range(ANNOTATORS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]
    return masks


def assert_identical(got: dict[Click, np.ndarray], want: dict[Click, np.ndarray], what: str) -> None:
    differ = {click: int((got[click] != want[click]).sum()) for click in want if not np.array_equal(got[click],
                                                                                                   want[click])}
    assert not differ, f"{what}: {len(differ)} of {len(want)} masks differ from the same click sent alone " \
                       f"(pixels per click: {dict(list(differ.items())[:8])})"


def test_a_click_gives_one_mask_on_every_worker_and_after_a_restart(start: Any, redis_server: RedisServer) -> None:
    bodies = clicks()
    a, b = start("a"), start("b")
    alone = {click: mask_of(a.post("/predict", json=body)) for click, body in bodies.items()}
    assert a.metric(ENCODES) == ANNOTATORS

    # A from its memory, B from Redis, at once
    assert_identical(all_at_once([a, b], bodies), alone, "A (memory) and B (Redis)")
    assert b.metric(ENCODES) == 0 and b.metric(*REDIS_HITS) == ANNOTATORS

    # A restarted with Redis emptied: it encodes every image again; B still serves its memory copies
    a.stop()
    redis.Redis.from_url(redis_server.url).flushdb()
    a2 = start("a2")
    assert_identical(all_at_once([a2, b], bodies), alone, "restarted A (encoded again) and B (memory)")
    assert a2.metric(ENCODES) == ANNOTATORS and b.metric(ENCODES) == 0

    # and a third process that only reads what the restarted A stored
    c = start("c")
    assert_identical(all_at_once([c], bodies), alone, "C (Redis, written by the restarted A)")
    assert c.metric(ENCODES) == 0
