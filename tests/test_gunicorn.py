"""The real server: ``sam-backend serve`` (gunicorn + gunicorn.conf.py) on a free port, driven over HTTP.

What only a real server shows: the CLI's settings reach the worker through the environment, the model
loads after the fork in a background thread while /health already answers, the recorded Label Studio
requests come back with brush RLE that Label Studio's own decoder turns into the image's W*H*4 buffer and
the same mask ``model.Predictor`` gives, and bad requests leave the worker serving.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from label_studio_sdk.converter.brush import decode_rle

from backend.prompts import parse_prompts
from tests.backend_helpers import (
    FIXTURE_IMAGES,
    IMAGE_SIZE,
    draw_image,
    fixture_body,
    fixture_names,
    make_tiny_checkpoint,
    start_label_studio,
)
from tests.conftest import free_port

SAM_BACKEND = Path(sys.executable).parent / "sam-backend"


class Server:
    def __init__(self, process: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.process, self.url, self.log = process, url, log

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=60, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.post(self.url + path, timeout=60, **kwargs)


@pytest.fixture(scope="module")
def label_studio() -> Iterator[Any]:
    server = start_label_studio()
    yield server
    server.close()
    server.cloud.close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "sam_tiny.pth", seed=5)


def server_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SAM_", "BASIC_AUTH_", "LABEL_STUDIO_", "REDIS_URL", "WORKERS", "THREADS"))}
    env.update({"SAM_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1", "LOG_LEVEL": "info"}, **extra)
    return env


@pytest.fixture(scope="module")
def server(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    log = tmp_path_factory.mktemp("gunicorn") / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [str(SAM_BACKEND), "serve", "--host", "127.0.0.1", "--port", str(port), "--checkpoint", str(checkpoint),
             "--device", "cpu", "--workers", "1", "--threads", "4"],
            env=server_env(), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )
    server = Server(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 90
    while True:
        if process.poll() is not None:
            pytest.fail(f"sam-backend serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            if server.get("/health").status_code == 200:
                break
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the server did not answer /health within 90 s:\n{log.read_text()}")
        time.sleep(0.2)
    yield server
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="module")
def oracle(checkpoint: Path) -> Any:
    import torch

    from model import Predictor, load

    torch.set_num_threads(1)
    return Predictor(load(checkpoint, device="cpu"))


@pytest.fixture(scope="module")
def connected(server: Server, label_studio: Any) -> Server:
    body = fixture_body("setup.json")
    body["hostname"] = label_studio.url
    response = server.post("/setup", json=body)
    assert response.status_code == 200 and "model_version" in response.json()
    return server


def wait_loaded(server: Server, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        health = server.get("/health").json()
        if health["model_loaded"] or time.monotonic() > deadline:
            return health
        time.sleep(0.1)


def test_health_is_fast_and_the_model_loads_after_the_fork(server: Server) -> None:
    started = time.perf_counter()
    response = server.get("/health")
    assert time.perf_counter() - started < 1.0  # Label Studio's ML_TIMEOUT_HEALTH
    assert response.json()["status"] == "UP" and response.json()["model_class"] == "SegmentAnything"
    health = wait_loaded(server)
    assert health["model_loaded"] is True, health  # post_worker_init loaded it without any /predict
    assert health["model_version"].startswith("custom-")
    assert "backend.segmenter: model custom-" in server.log.read_text()


@pytest.mark.parametrize("name", fixture_names("predict_interactive"))
def test_interactive_fixtures_decode_to_predictor_masks(connected: Server, oracle: Any, name: str) -> None:
    body = fixture_body(name)
    response = connected.post("/predict", json=body)
    assert response.status_code == 200, response.text
    (prediction,) = response.json()["results"]
    assert prediction["model_version"] == f"custom-{oracle.sam.fingerprint[:8]}"
    image = draw_image(FIXTURE_IMAGES[body["tasks"][0]["data"]["image"]])
    embedding = oracle.embed(image)
    prompts = parse_prompts(body["params"]["context"]["result"], image.shape[:2])
    assert len(prediction["result"]) == len(prompts)
    width, height = IMAGE_SIZE
    for region, prompt in zip(prediction["result"], prompts, strict=True):
        assert (region["original_width"], region["original_height"]) == (width, height)
        flat = np.asarray(decode_rle(region["value"]["rle"]), dtype=np.uint8)
        assert flat.size == width * height * 4
        mask = flat.reshape(height, width, 4)[:, :, 3] > 0
        out = oracle.predict(embedding, points=prompt.point_coords,
                             labels=prompt.point_labels if len(prompt.points) else None, box=prompt.box,
                             multimask=prompt.multimask)
        best = int(np.argmax(out.scores))
        np.testing.assert_array_equal(mask, out.masks[best])
        assert region["score"] == pytest.approx(float(out.scores[best]), abs=1e-5)


def test_batch_fixture_gives_one_prediction_per_task(connected: Server) -> None:
    response = connected.post("/predict", json=fixture_body("predict_batch_two_tasks.json"))
    assert response.status_code == 200
    assert len(response.json()["results"]) == 2


def test_bad_requests_get_json_errors_and_the_worker_keeps_serving(connected: Server) -> None:
    malformed = connected.post("/predict", data=b'{"tasks": [', headers={"Content-Type": "application/json"})
    assert malformed.status_code == 400 and malformed.json()["status"] == 400
    body = fixture_body("predict_interactive_keypoint_api.json")
    body["params"]["context"]["result"][0]["value"]["x"] = 180.0
    outside = connected.post("/predict", json=body)
    assert outside.status_code == 400 and "outside" in outside.json()["message"]
    missing = connected.get("/nowhere")
    assert missing.status_code == 404 and missing.headers["Content-Type"].startswith("application/json")
    assert connected.post("/predict", json=fixture_body("predict_interactive_keypoint_api.json")).status_code == 200
    assert connected.process.poll() is None
    log = connected.log.read_text()
    assert "backend.app: POST /predict -> 400 BadRequest" in log  # one readable line per refused request
    assert "Traceback" not in log


def test_metrics_over_http(connected: Server) -> None:
    connected.post("/predict", json=fixture_body("predict_interactive_keypoint_api.json"))
    response = connected.get("/metrics")
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
    text = response.text
    for name in ("sam_backend_requests_total", "sam_backend_request_seconds_bucket", "sam_backend_encoder_seconds_count",
                 "sam_backend_decoder_seconds_count", "sam_backend_model_load_seconds"):
        assert name in text


def test_serve_without_a_checkpoint_says_how_to_get_one(tmp_path: Path) -> None:
    result = subprocess.run([str(SAM_BACKEND), "serve", "--checkpoint", str(tmp_path / "none.pth")],
                            env=server_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "none.pth" in result.stderr and "SAM_CHECKPOINT" in result.stderr and "Traceback" not in result.stderr


def test_serve_with_a_bad_setting_names_it() -> None:
    result = subprocess.run([str(SAM_BACKEND), "serve", "--device", "gpu"], env=server_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "SAM_DEVICE" in result.stderr


def test_basic_auth_on_a_real_server(checkpoint: Path, tmp_path: Path) -> None:
    port = free_port()
    with (tmp_path / "auth.log").open("wb") as sink:
        process = subprocess.Popen(
            [str(SAM_BACKEND), "serve", "--host", "127.0.0.1", "--port", str(port), "--checkpoint", str(checkpoint),
             "--device", "cpu", "--threads", "2"],
            env=server_env(BASIC_AUTH_USER="ann", BASIC_AUTH_PASS="s3cret"), stdout=sink,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}/health"
        deadline = time.monotonic() + 90
        while True:
            try:
                anonymous = requests.get(url, timeout=10)
                break
            except requests.ConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "auth.log").read_text()
                time.sleep(0.2)
        assert anonymous.status_code == 401 and anonymous.json()["status"] == 401
        assert requests.get(url, auth=("ann", "wrong"), timeout=10).status_code == 401
        assert requests.get(url, auth=("ann", "s3cret"), timeout=10).status_code == 200
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def test_download_fetches_a_checkpoint_url_into_the_model_dir(checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("model.download")
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(checkpoint.parent))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/{checkpoint.name}"
        result = subprocess.run([str(SAM_BACKEND), "download", url, "--dir", str(tmp_path / "models")],
                                env=server_env(), capture_output=True, text=True, timeout=120)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert result.returncode == 0, result.stderr
    saved = Path(result.stdout.strip().splitlines()[-1])
    assert saved == tmp_path / "models" / checkpoint.name
    assert saved.read_bytes() == checkpoint.read_bytes()
    refused = subprocess.run([str(SAM_BACKEND), "download", "no_such_model", "--dir", str(tmp_path)],
                             env=server_env(), capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "no_such_model" in refused.stderr and "Traceback" not in refused.stderr
