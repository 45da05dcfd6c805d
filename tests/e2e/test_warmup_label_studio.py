"""Warm-up against a real Label Studio 1.23.2: imports, `sam-backend warm --project N`, then warm clicks.

What only the real server shows: that Label Studio's own TASKS_CREATED webhook reaches the backend with
what it needs, and that its task and project API answer the warm command the way it expects.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from backend.cache import KEY_PREFIX
from testsupport.backend import SAM_BACKEND, make_tiny_checkpoint, metric_sample, png_bytes, scene
from testsupport.label_studio import API_TOKEN, LabelStudio, SamBackend
from testsupport.labeling import label_config
from testsupport.processes import RedisServer

pytestmark = pytest.mark.e2e



class Backend(SamBackend):
    """The e2e backend with extra settings (Redis, warm-up)."""

    def __init__(self, workdir: Path, checkpoint: Path, label_studio: LabelStudio, **extra: str) -> None:
        super().__init__(workdir, checkpoint, label_studio)
        self.extra = extra

    def environment(self) -> dict[str, str]:
        return {**super().environment(), **self.extra}

    def metric(self, name: str, labels: str = "") -> float:
        return metric_sample(self.url, name, labels)


def write_images(folder: Path, seeds: range) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in seeds:
        path = folder / f"warm_scene_{seed}.png"
        path.write_bytes(png_bytes(scene(seed, size=(360, 270))))
        paths.append(path)
    return paths


def click(task: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"original_width": 360, "original_height": 270, "image_rotation": 0, "id": "k1", "from_name": "kp",
             "to_name": "image", "type": "keypointlabels", "origin": "manual", "is_positive": True,
             "value": {"x": 40.0, "y": 55.0, "width": 0.3, "keypointlabels": ["Object"]}}]


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.25)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("warm-ckpt") / "sam_tiny.pth", seed=21)


def test_imported_tasks_are_encoded_before_the_first_click(
        label_studio: LabelStudio, checkpoint: Path, tmp_path: Path) -> None:
    """Label Studio's TASKS_CREATED webhook warms the backend; the first click then runs no encoder."""
    backend = Backend(tmp_path, checkpoint, label_studio, SAM_WARMUP="true")
    backend.start()
    try:
        project = label_studio.create_project("warm-up on import", label_config())
        ml = label_studio.add_ml_backend(project, backend.url)
        tasks = label_studio.upload_images(project, write_images(tmp_path / "images", range(30, 33)))
        wait_for(lambda: backend.metric("sam_backend_encoder_seconds_count") == 3, 120,
                 "three encodes started by Label Studio's TASKS_CREATED webhook")
        assert backend.metric("sam_backend_warmup_jobs_total", 'source="webhook"') == 3
        answer = label_studio.interactive_annotating(ml["id"], tasks[0]["id"], click(tasks[0]))
        assert "data" in answer, answer
        assert backend.metric("sam_backend_encoder_seconds_count") == 3, "the first click ran the encoder"
    finally:
        backend.stop()


def test_warm_command_fills_redis_for_every_task(
        label_studio: LabelStudio, checkpoint: Path, redis_server: RedisServer, tmp_path: Path) -> None:
    """`sam-backend warm --project N --local` lists the project through Label Studio's API and encodes each
    image into Redis; a backend started afterwards answers the first click from Redis."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    project = label_studio.create_project("warm command", label_config())
    tasks = label_studio.upload_images(project, write_images(tmp_path / "images", range(40, 44)))
    env = Backend(tmp_path, checkpoint, label_studio, REDIS_URL=redis_server.url).environment()
    result = subprocess.run([str(SAM_BACKEND), "warm", "--project", str(project), "--local"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"project {project}: 4 image(s) queued" in result.stdout
    assert "encoding" in result.stderr, "the command shows progress"
    keys = [k for k in client.scan_iter(f"{KEY_PREFIX}:*") if not k.endswith(b":lock")]
    assert len(keys) == 4

    backend = Backend(tmp_path / "server", checkpoint, label_studio, REDIS_URL=redis_server.url, SAM_WARMUP="false")
    (tmp_path / "server").mkdir()
    backend.start()
    try:
        ml = label_studio.add_ml_backend(project, backend.url)
        answer = label_studio.interactive_annotating(ml["id"], tasks[1]["id"], click(tasks[1]))
        assert "data" in answer, answer
        assert backend.metric("sam_backend_encoder_seconds_count") == 0
        assert backend.metric("sam_backend_embedding_cache_hits_total", 'tier="redis"') == 1
    finally:
        backend.stop()


def test_warm_command_without_redis_posts_to_a_backend(
        label_studio: LabelStudio, checkpoint: Path, tmp_path: Path) -> None:
    backend = Backend(tmp_path, checkpoint, label_studio, SAM_WARMUP="true")
    backend.start()
    try:
        project = label_studio.create_project("warm through backend", label_config())
        label_studio.upload_images(project, write_images(tmp_path / "images", range(50, 52)))
        env = {k: v for k, v in backend.environment().items() if k != "REDIS_URL"}
        result = subprocess.run([str(SAM_BACKEND), "warm", "--project", str(project), "--backend", backend.url,
                                 "--quiet"], env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        wait_for(lambda: backend.metric("sam_backend_encoder_seconds_count") == 2, 120, "two encodes")
    finally:
        backend.stop()


def test_warm_command_with_a_wrong_token_says_which(label_studio: LabelStudio, checkpoint: Path,
                                                   tmp_path: Path) -> None:
    env = Backend(tmp_path, checkpoint, label_studio).environment()
    env.update({"LABEL_STUDIO_API_KEY": "0" * len(API_TOKEN), "REDIS_URL": "redis://127.0.0.1:1/0"})
    result = subprocess.run([str(SAM_BACKEND), "warm", "--project", "1"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert "LABEL_STUDIO_API_KEY" in result.stderr and "Traceback" not in result.stderr
