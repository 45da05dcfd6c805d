"""Test helpers of the HTTP service: a tiny seeded SAM checkpoint, the fixtures' images, an app.

The checkpoint is Meta's own ``segment_anything`` modules in a tiny configuration (128 px input, a 2-block
32-wide ViT, a 32-wide decoder), randomly initialised from a seed by ``tests.checkpoints`` and saved as a
plain state dict, the format of the official files. ``model.load`` infers the architecture from it like from a real one, an
encode takes milliseconds on a CPU, and the masks are whatever those random weights give: tests compare
the backend's masks with ``model.Predictor``'s for the same prompt, never with a hand-made expectation.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from tests.conftest import FIXTURES_DIR

# The images the recorded Label Studio requests point at, with their size as Label Studio saw it.
FIXTURE_IMAGES = {
    "/data/upload/4/d94949cd-blue_circle.png": "blue_circle",
    "/data/upload/4/ab0e8e49-red_square.png": "red_square",
}
IMAGE_SIZE = (320, 240)  # W, H: original_width / original_height in the fixtures
SETUP_TOKEN = "harnesstoken0123456789abcdef"  # the access_token of setup.json


def make_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A seeded random SAM checkpoint in Meta's state-dict format, small enough for millisecond encodes."""
    from tests.checkpoints import reference_sam, save

    sam = reference_sam(embed_dim=32, depth=2, num_heads=2, img_size=128, prompt_dim=32, decoder_mlp_dim=64,
                        iou_hidden=32, seed=seed)
    return save(sam, path)


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


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def fixture_body(name: str) -> dict[str, Any]:
    """The JSON body of a recorded Label Studio request."""
    return json.loads((FIXTURES_DIR / name).read_text())["body"]


def fixture_names(prefix: str = "") -> list[str]:
    return sorted(p.name for p in FIXTURES_DIR.glob(f"{prefix}*.json"))


def basic_auth_header(user: str, password: str) -> dict[str, str]:
    import base64

    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}



def start_label_studio() -> Any:
    """``tests.image_server.FakeLabelStudio`` serving the fixtures' images under their /data/upload paths,
    refusing requests without ``Token <the access_token of setup.json>``. Close with ``.close()`` and
    ``.cloud.close()``."""
    from tests.image_server import CloudStorage, FakeLabelStudio

    server = FakeLabelStudio(CloudStorage(), legacy_token=SETUP_TOKEN)
    for url_path, kind in FIXTURE_IMAGES.items():
        server.files[url_path.rsplit("/", 1)[-1]] = (png_bytes(draw_image(kind)), "image/png")
    server.files["not-an-image.png"] = server.files["notes.txt"]
    return server
