"""Embeddings shared between real server processes through a real Redis, warm-up, and many annotators at once.

Each server is a real ``sam-backend serve`` (gunicorn) with a tiny seeded checkpoint; task images come from
the token-checking fake Label Studio. What is asserted is read off each server's own /metrics: which cache
tier answered and how many times the encoder ran.
"""

from __future__ import annotations

import copy
import threading
import time
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

HITS = "sam_backend_embedding_cache_hits_total"
MISSES = "sam_backend_embedding_cache_misses_total"
ENCODES = "sam_backend_encoder_seconds_count"
REDIS_ERRORS = "sam_backend_redis_errors_total"


@pytest.fixture(scope="module")
def label_studio() -> Iterator[Any]:
    with running_label_studio() as server:
        for seed in range(12):
            server.files[f"scene{seed}.png"] = (png_bytes(scene(seed)), "image/png")
        yield server


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "sam_tiny.pth", seed=11)


@pytest.fixture
def servers(checkpoint: Path, label_studio: Any, tmp_path: Path) -> Iterator[Any]:
    """Start connected servers with ``servers(name, threads=4, **env)``; all are stopped after the test,
    whatever fails, so no server outlives its test to consume the next test's queue."""
    started: list[ServerProcess] = []

    def start(name: str, threads: int = 4, **env: str) -> ServerProcess:
        server = start_server(checkpoint, tmp_path / f"{name}.log", threads=threads, **env)
        started.append(server)
        return connect(server, label_studio)

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def fresh_redis(redis_server: RedisServer) -> RedisServer:
    redis.Redis.from_url(redis_server.url).flushdb()
    return redis_server


def connect(server: ServerProcess, label_studio: Any) -> ServerProcess:
    body = fixture_body("setup.json")
    body["hostname"] = label_studio.url
    assert server.post("/setup", json=body).status_code == 200
    server.wait_loaded()
    return server


def click_body(image: str, x: float = 50.0, y: float = 50.0, task_id: int = 7) -> dict[str, Any]:
    """Label Studio's smart-keypoint /predict for ``/data/upload/4/<image>`` at (x %, y %)."""
    body = copy.deepcopy(fixture_body("predict_interactive_keypoint_api.json"))
    task = body["tasks"][0]
    task["id"] = task_id
    task["data"]["image"] = f"/data/upload/4/{image}"
    task["predictions"] = []
    region = body["params"]["context"]["result"][0]
    region["value"]["x"], region["value"]["y"] = x, y
    return body


def open_body(image: str, task_id: int = 7) -> dict[str, Any]:
    """What Label Studio sends when an annotator opens a task: /predict with no context."""
    body = copy.deepcopy(fixture_body("predict_batch_two_tasks.json"))
    body["tasks"] = body["tasks"][:1]
    body["tasks"][0]["id"] = task_id
    body["tasks"][0]["data"]["image"] = f"/data/upload/4/{image}"
    return body


def mask_of(response: Any) -> np.ndarray:
    assert response.status_code == 200, response.text
    return brush_mask(response.json())


def wait_for(condition: Any, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_a_click_on_process_b_after_process_a_is_a_redis_hit(servers: Any, fresh_redis: RedisServer) -> None:
    env = {"REDIS_URL": fresh_redis.url, "SAM_WARMUP": "false"}
    a, b = servers("a", **env), servers("b", **env)
    from_a = mask_of(a.post("/predict", json=click_body("scene1.png")))
    assert a.metric(ENCODES) == 1 and a.metric(MISSES) == 1
    from_b = mask_of(b.post("/predict", json=click_body("scene1.png")))
    assert b.metric(ENCODES) == 0, "process B ran its encoder although A had shared the embedding"
    assert b.metric(HITS, 'tier="redis"') == 1 and b.metric(MISSES) == 0
    assert (from_a == from_b).all()  # A rounds its own copy to the precision B reads from Redis
    mask_of(b.post("/predict", json=click_body("scene1.png", x=30)))
    assert b.metric(HITS, 'tier="memory"') == 1 and b.metric(ENCODES) == 0


def test_same_picture_in_another_task_is_not_encoded_again(servers: Any, label_studio: Any) -> None:
    label_studio.files["scene2-copy.png"] = label_studio.files["scene2.png"]
    server = servers("s", SAM_WARMUP="false")
    mask_of(server.post("/predict", json=click_body("scene2.png", task_id=1)))
    mask_of(server.post("/predict", json=click_body("scene2-copy.png", task_id=2)))
    assert server.metric(ENCODES) == 1


def test_redis_stopped_mid_session_clicks_keep_answering(servers: Any, tmp_path: Path) -> None:
    own_redis = RedisServer(tmp_path)
    own_redis.start()
    try:
        server = servers("s", REDIS_URL=own_redis.url, SAM_WARMUP="false")
        mask_of(server.post("/predict", json=click_body("scene3.png")))
        own_redis.stop()
        for image in ("scene3.png", "scene4.png", "scene4.png", "scene5.png"):
            response = server.post("/predict", json=click_body(image))
            assert response.status_code == 200, response.text
        failures = sum(server.metric(REDIS_ERRORS, f'operation="{operation}"') for operation in ("get", "exists", "lock"))
        assert failures >= 1
        warnings = [line for line in server.log.read_text().splitlines() if "serving embeddings from memory" in line]
        assert len(warnings) == 1, warnings
    finally:
        own_redis.stop()


def test_opening_a_task_makes_the_first_click_warm(servers: Any) -> None:
    server = servers("s")
    started = time.monotonic()
    response = server.post("/predict", json=open_body("scene6.png"))
    assert response.status_code == 200 and len(response.json()["results"]) == 1
    assert time.monotonic() - started < 5
    wait_for(lambda: server.metric(ENCODES) == 1, what="the background encode")
    mask_of(server.post("/predict", json=click_body("scene6.png")))
    assert server.metric(ENCODES) == 1 and server.metric(HITS, 'tier="memory"') >= 1
    assert server.metric("sam_backend_warmup_jobs_total", 'source="open"') == 1


def test_imported_tasks_are_warmed_through_the_shared_queue(servers: Any, fresh_redis: RedisServer) -> None:
    env = {"REDIS_URL": fresh_redis.url}
    a, b = servers("a", **env), servers("b", **env)
    event = copy.deepcopy(fixture_body("webhook_annotation_created.json"))
    event["action"] = "TASKS_CREATED"
    event["tasks"] = [{"id": 100 + i, "data": {"image": f"/data/upload/4/scene{i}.png"}} for i in (7, 8, 9)]
    answer = a.post("/webhook", json=event)
    assert answer.status_code == 200 and answer.json()["queued"] == 3
    wait_for(lambda: a.metric(ENCODES) + b.metric(ENCODES) == 3, what="three warm-up encodes")
    for i in (7, 8, 9):
        mask_of(b.post("/predict", json=click_body(f"scene{i}.png", task_id=100 + i)))
    assert a.metric(ENCODES) + b.metric(ENCODES) == 3, "a click after warm-up ran the encoder again"


def test_eight_annotators_interleaved_each_get_their_own_masks(servers: Any) -> None:
    """8 threads x 8 images x 10 clicks against one server with 8 threads: every mask equals the mask the same
    request gets when sent alone."""
    server = servers("s", threads=8, SAM_WARMUP="false")
    clicks = {(annotator, k): click_body(f"scene{annotator}.png", x=10 + 8 * k, y=20 + 6 * k,
                                         task_id=200 + annotator)
              for annotator in range(8) for k in range(10)}
    concurrent: dict[tuple[int, int], np.ndarray] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def annotate(annotator: int) -> None:
        try:
            barrier.wait()
            for k in range(10):
                concurrent[annotator, k] = mask_of(server.post("/predict", json=clicks[annotator, k]))
        except BaseException as error:  # reported below, with the others
            errors.append(error)

    threads = [threading.Thread(target=annotate, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert server.metric(ENCODES) == 8, "one encode per image, whatever the interleaving"
    for key, body in clicks.items():
        alone = mask_of(server.post("/predict", json=body))
        assert np.array_equal(concurrent[key], alone), f"annotator {key[0]}, click {key[1]} got another mask"
