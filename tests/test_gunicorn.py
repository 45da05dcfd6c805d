"""The real server: ``sam-backend serve`` (gunicorn + gunicorn.conf.py) on a free port, driven over HTTP.

What only a real server shows: the CLI's settings reach the worker through the environment, the model
loads after the fork in a background thread while /health already answers, the recorded Label Studio
requests come back with brush RLE that Label Studio's own decoder turns into the image's W*H*4 buffer and
the same mask ``model.Predictor`` gives, and bad requests leave the worker serving.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from backend.prompts import parse_prompts
from testsupport.backend import (
    FIXTURE_IMAGES,
    IMAGE_SIZE,
    SAM_BACKEND,
    ServerProcess,
    brush_mask,
    draw_image,
    fixture_body,
    fixture_names,
    running_label_studio,
    server_env,
    start_server,
    tiny_checkpoint_fixture,
)


@pytest.fixture(scope="module")
def label_studio() -> Iterator[Any]:
    with running_label_studio() as server:
        yield server


checkpoint = tiny_checkpoint_fixture(seed=5)


@pytest.fixture(scope="module")
def server(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    try:
        server = start_server(checkpoint, tmp_path_factory.mktemp("gunicorn") / "server.log")
    except RuntimeError as error:
        pytest.fail(str(error))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def oracle(checkpoint: Path) -> Any:
    import torch

    from model import Predictor, load

    torch.set_num_threads(1)
    return Predictor(load(checkpoint, device="cpu"))


@pytest.fixture(scope="module")
def connected(server: ServerProcess, label_studio: Any) -> ServerProcess:
    body = fixture_body("setup.json")
    body["hostname"] = label_studio.url
    response = server.post("/setup", json=body)
    assert response.status_code == 200 and "model_version" in response.json()
    return server


def test_health_is_fast_and_the_model_loads_after_the_fork(server: ServerProcess) -> None:
    started = time.perf_counter()
    response = server.get("/health")
    assert time.perf_counter() - started < 1.0  # Label Studio's ML_TIMEOUT_HEALTH
    assert response.json()["status"] == "UP" and response.json()["model_class"] == "SegmentAnything"
    health = server.wait_loaded()
    assert health["model_loaded"] is True, health  # post_worker_init loaded it without any /predict
    assert health["model_version"].startswith("custom-")
    assert "backend.segmenter: model custom-" in server.log.read_text()
    assert "Using worker: backend.http_worker.BufferingWorker" in server.log.read_text()


@pytest.mark.parametrize("name", fixture_names("predict_interactive"))
def test_interactive_fixtures_decode_to_predictor_masks(connected: ServerProcess, oracle: Any, name: str) -> None:
    body = fixture_body(name)
    response = connected.post("/predict", json=body)
    assert response.status_code == 200, response.text
    (prediction,) = response.json()["results"]
    assert prediction["model_version"] == f"custom-{oracle.sam.fingerprint[:8]}"
    image = draw_image(FIXTURE_IMAGES[body["tasks"][0]["data"]["image"]])
    embedding = oracle.embed(image).at_stored_precision()  # what every cache tier serves
    prompts = parse_prompts(body["params"]["context"]["result"], image.shape[:2])
    assert len(prediction["result"]) == len(prompts)
    width, height = IMAGE_SIZE
    for region, prompt in zip(prediction["result"], prompts, strict=True):
        assert (region["original_width"], region["original_height"]) == (width, height)
        mask = brush_mask(region)
        out = oracle.predict(embedding, points=prompt.point_coords,
                             labels=prompt.point_labels if len(prompt.points) else None, box=prompt.box,
                             multimask=prompt.multimask)
        best = int(np.argmax(out.scores))
        np.testing.assert_array_equal(mask, out.masks[best])
        assert region["score"] == pytest.approx(float(out.scores[best]), abs=1e-5)


def test_batch_fixture_gives_one_prediction_per_task(connected: ServerProcess) -> None:
    response = connected.post("/predict", json=fixture_body("predict_batch_two_tasks.json"))
    assert response.status_code == 200
    assert len(response.json()["results"]) == 2


def test_bad_requests_get_json_errors_and_the_worker_keeps_serving(connected: ServerProcess) -> None:
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


def test_metrics_over_http(connected: ServerProcess) -> None:
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
    server = start_server(checkpoint, tmp_path / "auth.log", threads=2, BASIC_AUTH_USER="ann",
                          BASIC_AUTH_PASS="s3cret")
    try:
        anonymous = server.get("/health")
        assert anonymous.status_code == 401 and anonymous.json()["status"] == 401
        assert server.get("/health", auth=("ann", "wrong")).status_code == 401
        assert server.get("/health", auth=("ann", "s3cret")).status_code == 200
    finally:
        server.stop()


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


def test_gunicorn_settings_come_from_the_backend_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from backend import gunicorn_conf
    from backend.config import SettingsError

    monkeypatch.setenv("HOST", "0.0.0.0")
    monkeypatch.setenv("WORKERS", "3")
    monkeypatch.setenv("PORT", "9191")
    monkeypatch.setenv("LOG_LEVEL", "debug")
    try:
        monkeypatch.setenv("MAX_CONNECTIONS", "50")
        conf = importlib.reload(gunicorn_conf)
        assert (conf.workers, conf.bind, conf.loglevel) == (3, ["0.0.0.0:9191"], "debug")
        assert conf.worker_class == "backend.http_worker.BufferingWorker" and conf.worker_connections == 100
        for name, value in (("MAX_REQUEST_MB", "0"), ("REQUEST_READ_TIMEOUT_S", "soon"), ("MAX_CONNECTIONS", "5")):
            monkeypatch.setenv(name, value)
            with pytest.raises(SettingsError, match=name):
                importlib.reload(gunicorn_conf)
            monkeypatch.delenv(name)
        monkeypatch.setenv("WORKERS", "many")
        with pytest.raises(SettingsError, match="WORKERS"):
            importlib.reload(gunicorn_conf)
    finally:
        monkeypatch.undo()
        importlib.reload(gunicorn_conf)
