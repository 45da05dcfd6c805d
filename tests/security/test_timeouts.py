"""Every blocking call has a timeout: an image download ends at IMAGE_TIMEOUT_S however the host sends, and a
stalled Redis (SIGSTOP: connections accepted, nothing answered) leaves task opens and webhooks answering.

Against a real ``sam-backend serve`` with a Redis of its own, so the test can stop it without touching the
session's Redis.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from backend.errors import ImageAccessError
from testsupport.backend import SETUP_TOKEN, ServerProcess, fixture_body
from testsupport.image_access import image_fetcher, task
from testsupport.processes import RedisServer

from .conftest import Serve, click_body, open_body, tasks_created

TIMEOUT_S = 2.0
UPLOAD = "/data/upload/4/d94949cd-blue_circle.png"


@pytest.mark.parametrize("every", [0.2, 0.004])
def test_a_host_dripping_its_headers_is_cut_at_the_deadline(label_studio: Any, every: float) -> None:
    """No socket read waits long, the headers alone take 2-90 s. Cut at 1 s: inside the status line (0.2 s a
    byte), or inside the headers (4 ms a byte), where the cut headers look like a complete answer."""
    fetcher = image_fetcher(timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(ImageAccessError, match="Timed out after 1.0 s"):
        fetcher.fetch(task(f"{label_studio.cloud.url}/drip?every={every}"), "image")
    assert time.monotonic() - started < 1.8


def test_a_name_lookup_that_hangs_is_cut_at_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """getaddrinfo has no timeout of its own; a resolver that never answers is stood in for by one that sleeps."""
    real = socket.getaddrinfo

    def hanging(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "hanging-dns.example":
            time.sleep(5)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    started = time.monotonic()
    with pytest.raises(ImageAccessError, match="Timed out"):
        image_fetcher(timeout_s=1.0, image_hosts="*").fetch(task("http://hanging-dns.example/x.png"), "image")
    assert time.monotonic() - started < 1.8


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("stalled-redis"))
    server.start()
    yield server
    if server.process is not None:
        os.kill(server.process.pid, signal.SIGCONT)
    server.stop()


@pytest.fixture(scope="module")
def server(serve: Serve, label_studio: Any, own_redis: RedisServer) -> ServerProcess:
    backend = serve("timeouts", LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=SETUP_TOKEN,
                    REDIS_URL=own_redis.url, IMAGE_TIMEOUT_S=str(TIMEOUT_S),
                    SAM_IMAGE_HOSTS=f"127.0.0.1:{label_studio.cloud.port}")
    backend.wait_loaded()
    return backend


def timed(server: ServerProcess, path: str, body: dict[str, Any]) -> tuple[Any, float]:
    started = time.monotonic()
    response = server.post(path, json=body)
    return response, time.monotonic() - started


def test_a_dripping_image_host_is_answered_at_image_timeout_s(server: ServerProcess, label_studio: Any) -> None:
    response, took = timed(server, "/predict", click_body(f"{label_studio.cloud.url}/drip?every=0.2"))
    assert response.status_code == 502 and "Timed out after 2.0 s" in response.json()["message"], response.text
    assert took < TIMEOUT_S + 1.5, f"answered after {took:.1f} s with IMAGE_TIMEOUT_S={TIMEOUT_S}"


def test_a_stalled_redis_leaves_task_opens_and_webhooks_answering(server: ServerProcess, own_redis: RedisServer,
                                                                  label_studio: Any) -> None:
    setup = fixture_body("setup.json")
    setup["hostname"] = label_studio.url
    assert server.post("/setup", json=setup).status_code == 200
    response, _ = timed(server, "/predict", open_body(UPLOAD, task_id=1))  # Redis working: queued there
    assert response.status_code == 200
    log_before = server.log.read_text(errors="replace")
    assert own_redis.process is not None
    os.kill(own_redis.process.pid, signal.SIGSTOP)
    try:
        opened, open_s = timed(server, "/predict", open_body("/data/upload/4/ab0e8e49-red_square.png", task_id=2))
        webhook, webhook_s = timed(server, "/webhook",
                                   tasks_created([f"/data/upload/4/stalled-{i}.png" for i in range(300)]))
        health, _health_s = server.get("/health"), 0.0
        again, again_s = timed(server, "/predict", open_body("/data/upload/4/other.png", task_id=3))
    finally:
        os.kill(own_redis.process.pid, signal.SIGCONT)
    timings = f"open {open_s:.2f} s, webhook {webhook_s:.2f} s, again {again_s:.2f} s"
    # One Redis timeout (1 s) at most per request, and none while Redis is known to be down; the rest of the
    # allowance is for a loaded machine.
    assert opened.status_code == 200 and open_s < 3.0, timings
    assert webhook.status_code == 200 and webhook_s < 3.0, timings
    assert again.status_code == 200 and again_s < 2.0, timings
    assert health.status_code == 200
    log = server.log.read_text(errors="replace")[len(log_before):]
    assert log.count("Redis queue unavailable") == 1, f"{timings}\n{log}"
    assert "Traceback" not in log, log
