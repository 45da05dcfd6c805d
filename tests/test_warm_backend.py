"""`sam-backend warm --backend URL`: the command returns when the encodes it started have finished, not before.

A real `sam-backend serve` (gunicorn, one worker) downloads task images from a stand-in Label Studio that sends
each file 1.5 s late, so an encode queue of two images takes seconds; the command posts the tasks to the
backend's /webhook and follows its warm-up gauge on /metrics.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from backend.config import Settings
from backend.label_studio import Project
from backend.project_warmup import WarmError, warm_through_backend
from testsupport.backend import (
    FIXTURE_IMAGES,
    SETUP_TOKEN,
    fixture_body,
    make_tiny_checkpoint,
    running_label_studio,
    start_server,
)

DELAY_S = 1.5


def project() -> Project:
    config = fixture_body("setup.json")["schema"]
    tasks = [{"id": i, "data": {"image": url}} for i, url in enumerate(FIXTURE_IMAGES, start=1)]
    return Project(id=1, label_config=config, value_key="image", tasks=tasks)


def test_warm_through_a_backend_waits_for_its_encodes(tmp_path: Path) -> None:
    checkpoint = make_tiny_checkpoint(tmp_path / "sam_tiny.pth", seed=2)
    with running_label_studio() as label_studio:
        label_studio.delay_s = DELAY_S
        server = start_server(checkpoint, tmp_path / "serve.log", SAM_WARMUP="true",
                              LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=SETUP_TOKEN)
        try:
            server.wait_loaded()
            started = time.monotonic()
            queued = warm_through_backend(Settings(), project(), server.url, progress=False)
            took = time.monotonic() - started
            assert queued == len(FIXTURE_IMAGES) == 2
            assert server.metric("sam_backend_encoder_seconds_count") == 2, "returned before the encodes finished"
            assert server.metric("sam_backend_warmup_queue_depth") == 0
            assert took >= DELAY_S * queued * 0.9, took
            # --no-wait returns at once, while the backend still downloads the images (cached: no encode then).
            started = time.monotonic()
            assert warm_through_backend(Settings(), project(), server.url, wait=False, progress=False) == 2
            assert time.monotonic() - started < DELAY_S
        finally:
            server.stop()


def test_a_backend_that_goes_away_is_reported() -> None:
    with pytest.raises(WarmError, match="could not reach the backend"):
        warm_through_backend(Settings(), project(), "http://127.0.0.1:9", progress=False)
    with running_label_studio() as not_a_backend, pytest.raises(WarmError, match="HTTP 405"):  # 405 on /webhook
        warm_through_backend(Settings(), project(), not_a_backend.url, progress=False)
