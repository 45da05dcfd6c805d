"""Test helpers of the HTTP service: a tiny seeded SAM checkpoint, the fixtures' images, an app.

The checkpoint is Meta's own ``segment_anything`` modules in a tiny configuration (128 px input, a 2-block
32-wide ViT, a 32-wide decoder), randomly initialised from a seed by ``testsupport.checkpoints`` and saved as a
plain state dict, the format of the official files. ``model.load`` infers the architecture from it like from a real one, an
encode takes milliseconds on a CPU, and the masks are whatever those random weights give: tests compare
the backend's masks with ``model.Predictor``'s for the same prompt, never with a hand-made expectation.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import requests
from PIL import Image, ImageDraw

from testsupport.paths import FIXTURES_DIR
from testsupport.processes import free_port, stop_process_group

# The images the recorded Label Studio requests point at, with their size as Label Studio saw it.
FIXTURE_IMAGES = {
    "/data/upload/4/d94949cd-blue_circle.png": "blue_circle",
    "/data/upload/4/ab0e8e49-red_square.png": "red_square",
}
IMAGE_SIZE = (320, 240)  # W, H: original_width / original_height in the fixtures
SETUP_TOKEN = "harnesstoken0123456789abcdef"  # the access_token of setup.json


def make_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A seeded random SAM checkpoint in Meta's state-dict format, small enough for millisecond encodes."""
    from testsupport.checkpoints import reference_sam, save

    sam = reference_sam(embed_dim=32, depth=2, num_heads=2, img_size=128, prompt_dim=32, decoder_mlp_dim=64,
                        iou_hidden=32, seed=seed)
    return save(sam, path)


def tiny_checkpoint_fixture(seed: int) -> Any:
    """A module-scoped fixture of ``make_tiny_checkpoint(seed)``, made once per test module.

    A module names it by assigning it (``checkpoint = tiny_checkpoint_fixture(seed=3)``); the seed stays the
    module's own, since its tests' prompts were chosen on that checkpoint's masks.
    """
    import pytest

    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
        return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "sam_tiny.pth", seed=seed)

    return fixture


def brush_mask(region: dict[str, Any]) -> np.ndarray:
    """The (H, W) bool mask of a brush region as Label Studio's editor paints it: the SDK's own RLE decoder,
    the alpha channel of an RGBA buffer of the region's ``original_height`` x ``original_width``."""
    from label_studio_sdk.converter.brush import decode_rle

    height, width = region["original_height"], region["original_width"]
    flat = np.asarray(decode_rle(region["value"]["rle"]))
    assert flat.size == height * width * 4, f"RLE holds {flat.size} values, a {width}x{height} RGBA buffer needs " \
                                            f"{height * width * 4}"
    return flat.reshape(height, width, 4)[:, :, 3] > 0


def draw_image(kind: str, size: tuple[int, int] = IMAGE_SIZE) -> np.ndarray:
    """The picture a fixture names: a blue disc or a red square on a light textured background."""
    width, height = size
    rng = np.random.default_rng(7)
    background = (200 + rng.integers(0, 40, size=(height, width, 3))).astype(np.uint8)
    img = Image.fromarray(background)
    draw = ImageDraw.Draw(img)
    cx, cy, r = width // 2, height // 2, min(width, height) // 4
    if kind == "blue_circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(20, 40, 220))
    elif kind == "red_square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=(220, 30, 30))
    else:
        raise ValueError(kind)
    return np.asarray(img)


def scene(seed: int, size: tuple[int, int] = (320, 240)) -> np.ndarray:
    """A distinct picture per seed: a few coloured shapes on a textured background."""
    rng = np.random.default_rng(seed)
    width, height = size
    img = Image.fromarray((150 + rng.integers(0, 60, size=(height, width, 3))).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width - 60)), int(rng.integers(0, height - 60))
        x1, y1 = x0 + int(rng.integers(30, 120)), y0 + int(rng.integers(30, 100))
        colour = tuple(int(c) for c in rng.integers(0, 255, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    return np.asarray(img)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def fixture_body(name: str) -> dict[str, Any]:
    """The JSON body of a recorded Label Studio request."""
    return json.loads((FIXTURES_DIR / name).read_text())["body"]


def interactive_body(regions: list[dict[str, Any]]) -> dict[str, Any]:
    """The recorded smart-keypoint /predict with ``regions`` as its ``context.result``."""
    body = copy.deepcopy(fixture_body("predict_interactive_keypoint_api.json"))
    body["params"]["context"]["result"] = regions
    return body


def fixture_names(prefix: str = "") -> list[str]:
    return sorted(p.name for p in FIXTURES_DIR.glob(f"{prefix}*.json"))


def basic_auth_header(user: str, password: str) -> dict[str, str]:
    import base64

    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}



@contextlib.contextmanager
def running_label_studio() -> Iterator[Any]:
    """``start_label_studio()``, with it and its cloud server closed afterwards."""
    server = start_label_studio()
    try:
        yield server
    finally:
        server.close()
        server.cloud.close()


def start_label_studio() -> Any:
    """``testsupport.image_server.FakeLabelStudio`` serving the fixtures' images under their /data/upload paths,
    refusing requests without ``Token <the access_token of setup.json>``. Close with ``.close()`` and
    ``.cloud.close()``."""
    from testsupport.image_server import CloudStorage, FakeLabelStudio

    server = FakeLabelStudio(CloudStorage(), legacy_token=SETUP_TOKEN)
    for url_path, kind in FIXTURE_IMAGES.items():
        server.files[url_path.rsplit("/", 1)[-1]] = (png_bytes(draw_image(kind)), "image/png")
    server.files["not-an-image.png"] = server.files["notes.txt"]
    return server


# ------------------------------------------------------------------------------------------------------------
# a real server: `sam-backend serve` (gunicorn) as a subprocess on a free port
SAM_BACKEND = Path(sys.executable).parent / "sam-backend"


def server_env(**extra: str) -> dict[str, str]:
    """This environment without any backend setting of the developer's shell, one torch thread, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SAM_", "BASIC_AUTH_", "LABEL_STUDIO_", "REDIS_URL", "WORKERS", "THREADS"))}
    env.update({"SAM_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1", "LOG_LEVEL": "info"}, **extra)
    return env


def metric_sample(url: str, name: str, labels: str = "") -> float:
    """One sample of a backend's /metrics, e.g. ``("sam_backend_embedding_cache_hits_total", 'tier="redis"')``;
    0 when absent."""
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in requests.get(f"{url}/metrics", timeout=30).text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample == wanted:
            return float(value)
    return 0.0


class ServerProcess:
    """A running ``sam-backend serve``; ``stop()`` takes its whole process group down."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.process, self.url, self.log = process, url, log

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=60, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.post(self.url + path, timeout=60, **kwargs)

    def metric(self, name: str, labels: str = "") -> float:
        return metric_sample(self.url, name, labels)

    def wait_loaded(self, timeout: float = 90.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            health = self.get("/health").json()
            if health["model_loaded"] or time.monotonic() > deadline:
                return health
            time.sleep(0.1)

    def stop(self) -> None:
        stop_process_group(self.process, timeout=30)


def start_server(checkpoint: Path, log: Path, *, threads: int = 4, timeout: float = 90.0,
                 **env: str) -> ServerProcess:
    """``sam-backend serve`` on a free port with ``env`` on top of ``server_env()``; waits for /health."""
    port = free_port()
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [str(SAM_BACKEND), "serve", "--host", "127.0.0.1", "--port", str(port), "--checkpoint", str(checkpoint),
             "--device", "cpu", "--workers", "1", "--threads", str(threads)],
            env=server_env(**env), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"sam-backend serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            if server.get("/health").status_code in (200, 401):
                return server
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s:\n{log.read_text()}")
        time.sleep(0.2)
