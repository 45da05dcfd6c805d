"""No stored clutter: opening a task warms its image up, and a task with nothing to predict gets no prediction.

Label Studio 1.23.2 (``ml/models.py`` ``_get_predictions_from_ml_backend``) stores every entry of ``results``
that is a dict with a ``result`` key, ``{"result": []}`` included (an empty model answer listed on the task),
and nothing for an entry that is ``[]``; an empty ``results`` list is logged as an error. So the answer for a
task with nothing to predict is ``[]`` in its place.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backend.app import create_app
from backend.config import Settings
from backend.errors import BadRequest
from backend.predictions import stored_answer
from backend.segmenter import Segmenter
from testsupport.backend import (
    FIXTURE_IMAGES,
    draw_image,
    fixture_body,
    png_bytes,
    running_label_studio,
    tiny_checkpoint_fixture,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


checkpoint = tiny_checkpoint_fixture(seed=6)


@pytest.fixture(scope="module")
def server() -> Iterator[Any]:
    with running_label_studio() as server:
        yield server


def client_for(checkpoint: Path, server: Any, segmenter: Segmenter | None = None, **settings: Any) -> Any:
    app = create_app(Settings(sam_checkpoint=str(checkpoint), sam_device="cpu", image_timeout_s=5.0, **settings),
                     segmenter)
    setup = fixture_body("setup.json")
    setup["hostname"] = server.url
    assert app.test_client().post("/setup", json=setup).status_code == 200
    return app.test_client()


def test_opening_a_task_with_nothing_to_predict_stores_nothing_and_warms_its_image(checkpoint: Path,
                                                                                     server: Any) -> None:
    client = client_for(checkpoint, server)
    body = fixture_body("predict_batch_two_tasks.json")
    body["tasks"] = body["tasks"][:1]  # what Label Studio sends when an annotator opens a task
    response = client.post("/predict", json=body)
    assert response.status_code == 200 and response.get_json()["results"] == [[]]
    backend = client.application.extensions["sam_backend"]
    sha = hashlib.sha256(png_bytes(draw_image(FIXTURE_IMAGES[body["tasks"][0]["data"]["image"]]))).hexdigest()
    deadline = time.monotonic() + 60
    while not backend.segmenter.cache.contains(backend.segmenter.fingerprint, sha) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert backend.segmenter.cache.contains(backend.segmenter.fingerprint, sha), "opening a task warms it up"


def test_a_batch_prediction_without_regions_is_no_prediction(checkpoint: Path, server: Any) -> None:
    """SAM_BATCH_MODE=everything where the generator keeps no mask: ``[]`` per task, not ``{"result": []}``."""
    from model import MaskGenerator, load

    options = {"points_per_side": 2, "pred_iou_thresh": 1.0, "stability_score_thresh": 1.0}
    body = fixture_body("predict_batch_two_tasks.json")
    sam = load(checkpoint, device="cpu")
    for task in body["tasks"]:
        assert MaskGenerator(sam, **options).generate(draw_image(FIXTURE_IMAGES[task["data"]["image"]])) == []
    segmenter = Segmenter(checkpoint, "cpu", everything_options=options)
    client = client_for(checkpoint, server, segmenter, sam_batch_mode="everything", sam_warmup=False)
    response = client.post("/predict", json=body)
    assert response.status_code == 200 and response.get_json()["results"] == [[], []]


def test_stored_answer() -> None:
    kept = {"result": [{"id": "a"}], "score": 0.5, "model_version": "v"}
    assert stored_answer(kept) is kept
    assert stored_answer({"result": [], "score": 0.0, "model_version": "v"}) == []
    error = BadRequest("x")
    assert stored_answer(error) is error
