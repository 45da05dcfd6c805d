"""Label Studio's newer interactive flow (``ml-interactive``) through /predict, from its recorded request shapes.

Label Studio 1.23.2's editor does not ship this flow, so the bodies are built exactly as its source builds
them (``useBackendInference.ts`` / ``api.ts``: ``{"task": id, "context": {...}}`` posted to
``/api/ml/<id>/interactive-annotating``) and as 1.23.2's proxy forwards any context (the recorded smart-tool body
with ``params.context`` replaced). Answers are read the way the editor reads them: the capabilities from
``result[0].value``, a mask from ``result[0].value.imageDataURL`` with red > 127 as the object.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from backend import bitmask
from backend.app import create_app
from backend.config import Settings
from backend.interactive_flow import speaks_interactive_flow
from testsupport.backend import (
    FIXTURE_IMAGES,
    draw_image,
    fixture_body,
    fixture_names,
    png_bytes,
    running_label_studio,
    tiny_checkpoint_fixture,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = """<View>
  <Image name="image" value="$image" smoothing="false"/>
  <BitmaskLabels name="mask" toName="image"><Label value="Object"/></BitmaskLabels>
</View>"""
W, H = 320, 240


checkpoint = tiny_checkpoint_fixture(seed=4)


@pytest.fixture(scope="module")
def oracle(checkpoint: Path) -> Any:
    from model import Predictor, load

    return Predictor(load(checkpoint, device="cpu"))


@pytest.fixture(scope="module")
def app(checkpoint: Path) -> Iterator[Any]:
    with running_label_studio() as server:
        app = create_app(Settings(sam_checkpoint=str(checkpoint), sam_device="cpu", image_timeout_s=5.0))
        setup = fixture_body("setup.json")
        setup["hostname"] = server.url
        assert app.test_client().post("/setup", json=setup).status_code == 200
        yield app


@pytest.fixture()
def client(app: Any) -> Any:
    return app.test_client()


def body_with(context: dict[str, Any]) -> dict[str, Any]:
    """What Label Studio's proxy posts for ``{"task": 7, "context": context}``."""
    body = fixture_body("predict_interactive_keypoint_api.json")
    body["label_config"] = CONFIG
    body["params"]["context"] = context
    return body


def points(*clicks: tuple[float, float, bool]) -> dict[str, Any]:
    """useBackendInference's ``predict``: pixel prompts -> percent keypoints with value.positive."""
    return {"result": [{"type": "keypointlabels", "value": {"x": x / W * 100, "y": y / H * 100, "positive": positive}}
                       for x, y, positive in clicks]}


def box(x: float, y: float, width: float, height: float) -> dict[str, Any]:
    return {"result": [{"type": "rectanglelabels", "value": {"x": x / W * 100, "y": y / H * 100,
                                                             "width": width / W * 100, "height": height / H * 100}}]}


def first_value(response: Any) -> dict[str, Any]:
    assert response.status_code == 200, response.get_json()
    return response.get_json()["results"][0]["result"][0]["value"]


def the_image() -> np.ndarray:
    return draw_image(FIXTURE_IMAGES[fixture_body("predict_interactive_keypoint_api.json")["tasks"][0]["data"]["image"]])


def test_recorded_smart_tool_requests_keep_the_smart_tool_protocol() -> None:
    for name in fixture_names("predict_interactive"):
        assert not speaks_interactive_flow(fixture_body(name)["params"]["context"]), name
    assert speaks_interactive_flow({"event": "capabilities"}) and speaks_interactive_flow(points((1, 1, True)))
    assert speaks_interactive_flow(box(1, 1, 5, 5)) and not speaks_interactive_flow(None)


def test_capabilities_as_the_editor_reads_them(client: Any) -> None:
    value = first_value(client.post("/predict", json=body_with({"event": "capabilities"})))
    assert isinstance(value["prompts"], list) and isinstance(value["targets"], list)  # api.ts fetchCapabilities
    assert set(value["prompts"]) == {"point", "box"}
    assert {"tag": "BitmaskLabels", "output": "mask"} in value["targets"]
    assert isinstance(value["model_info"]["version"], str) and value["model_info"]["version"]


def test_points_give_the_predictors_mask_and_later_clicks_refine(client: Any, oracle: Any) -> None:
    image = the_image()
    embedding = oracle.embed(image).at_stored_precision()
    first = first_value(client.post("/predict", json=body_with(points((160, 120, True)))))
    assert first["width"] == W and first["height"] == H
    out = oracle.predict(embedding, points=[[160, 120]], labels=[1], multimask=True, best_only=True)
    assert np.array_equal(bitmask.decode(first["imageDataURL"], channel="red"), out.masks[0])
    # The editor resends every prompt with each click: the second answer starts from the first's logits.
    second = first_value(client.post("/predict", json=body_with(points((160, 120, True), (40, 30, False)))))
    refined = oracle.predict(embedding, points=[[160, 120], [40, 30]], labels=[1, 0],
                             mask_input=out.low_res_logits[0], multimask=False)
    assert np.array_equal(bitmask.decode(second["imageDataURL"], channel="red"), refined.masks[0])


def test_a_box_gives_the_predictors_mask(client: Any, oracle: Any) -> None:
    value = first_value(client.post("/predict", json=body_with(box(60, 40, 150, 120))))
    out = oracle.predict(oracle.embed(the_image()).at_stored_precision(), box=[60, 40, 210, 160], multimask=False)
    assert np.array_equal(bitmask.decode(value["imageDataURL"], channel="red"), out.masks[0])


def test_prewarm_encodes_the_task_image_and_release_drops_its_refinements(app: Any, client: Any) -> None:
    backend = app.extensions["sam_backend"]
    backend.segmenter.load()
    cache, fingerprint = backend.segmenter.cache, backend.segmenter.fingerprint
    other = fixture_body("predict_batch_two_tasks.json")["tasks"][1]  # an image no other test of this module encodes
    sha = hashlib.sha256(png_bytes(draw_image(FIXTURE_IMAGES[other["data"]["image"]]))).hexdigest()
    assert not cache.contains(fingerprint, sha)

    def on_other(context: dict[str, Any]) -> dict[str, Any]:
        body = body_with(context)
        body["tasks"] = [other]
        return body

    ack = first_value(client.post("/predict", json=on_other({"event": "prewarm", "frame": 1, "window": 20,
                                                               "direction": "forward"})))
    assert ack["status"] == "ok" and ack["queued"] == 1
    deadline = time.monotonic() + 60
    while not cache.contains(fingerprint, sha) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cache.contains(fingerprint, sha), "prewarm starts the warm-up encode of the task's image"
    first_value(client.post("/predict", json=on_other(points((100, 100, True)))))
    first_value(client.post("/predict", json=body_with(points((100, 100, True)))))
    before = len(backend.refinements)
    assert first_value(client.post("/predict", json=on_other({"event": "release"})))["status"] == "released"
    assert len(backend.refinements) == before - 1, "release drops the released task's entries only"


def test_no_prompt_is_an_empty_answer(client: Any) -> None:
    response = client.post("/predict", json=body_with({"result": []} | {"event": "predict"}))
    assert response.status_code == 200 and response.get_json()["results"][0]["result"] == []


def test_regions_are_bounded_by_the_one_click_setting_whatever_the_protocol(client: Any) -> None:
    """SAM_MAX_CLICK_REGIONS (and SAM_MAX_CLICK_POINTS) bound the flow's clicks as they bound smart-tool clicks."""
    limits = Settings().request_limits
    many = [(5 + i % 300, 10 + i // 300, True) for i in range(250)]  # above any smaller, flow-only bound
    assert len(many) <= min(limits.max_click_regions, limits.max_click_points)
    assert first_value(client.post("/predict", json=body_with(points(*many))))["width"] == W
    too_many = points(*[(5, 10, True)] * (limits.max_click_regions + 1))
    response = client.post("/predict", json=body_with(too_many))
    assert response.status_code == 413 and "SAM_MAX_CLICK_REGIONS" in response.get_json()["message"]


@pytest.mark.parametrize("context, message", [
    ({"event": "track", "frame": 1, "max_frames": 10, "direction": "forward", "result": []}, "not supported"),
    ({"event": 7}, "not supported"),
    (points((10, 10, "yes")), "positive"),  # type: ignore[arg-type]
    ({"result": [box(1, 1, 5, 5)["result"][0], box(2, 2, 5, 5)["result"][0]]}, "one box"),
    ({"result": [*points((10, 10, True))["result"], {"type": "polygonlabels", "value": {"points": []}}]},
     "expected keypointlabels"),
    ({"result": [{"type": "keypointlabels", "value": {"x": 500, "y": 10, "positive": True}}]}, "outside"),
    ({"result": [{"type": "keypointlabels", "value": "x"}]}, "'value' object"),
])
def test_bad_flow_requests_are_400_json(client: Any, context: dict[str, Any], message: str) -> None:
    response = client.post("/predict", json=body_with(context))
    assert response.status_code == 400 and message in response.get_json()["message"], response.get_json()
    assert client.get("/health").status_code == 200
