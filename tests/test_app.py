"""The HTTP service through Flask's test client: every recorded Label Studio body, bad input, auth, load states.

Real parts throughout: a seeded tiny SAM checkpoint loaded by ``model.load``, task images served over HTTP
by a server that refuses requests without the token Label Studio sent to /setup, and the masks compared
with ``model.Predictor``'s for the same prompt after decoding the brush RLE with Label Studio's own
``decode_rle``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle

from backend.app import create_app
from backend.config import Settings
from backend.prompts import parse_prompts
from backend.segmenter import Segmenter
from testsupport.backend import (
    FIXTURE_IMAGES,
    IMAGE_SIZE,
    basic_auth_header,
    draw_image,
    fixture_body,
    fixture_names,
    make_tiny_checkpoint,
    running_label_studio,
)

INTERACTIVE = fixture_names("predict_interactive")
BLUE_CIRCLE = "/data/upload/4/d94949cd-blue_circle.png"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "sam_tiny.pth", seed=3)


@pytest.fixture(scope="module")
def image_server() -> Iterator[Any]:
    with running_label_studio() as server:
        yield server


@pytest.fixture(scope="module")
def oracle(checkpoint: Path) -> Any:
    """``model.Predictor`` on the same checkpoint: the masks the backend must return."""
    from model import Predictor, load

    return Predictor(load(checkpoint, device="cpu"))


def make_settings(checkpoint: Path, **overrides: Any) -> Settings:
    return Settings(sam_checkpoint=str(checkpoint), sam_device="cpu", image_timeout_s=5.0, **overrides)


def setup_body(server: Any) -> dict[str, Any]:
    body = fixture_body("setup.json")
    body["hostname"] = server.url
    return body


@pytest.fixture(scope="module")
def app(checkpoint: Path, image_server: Any) -> Any:
    app = create_app(make_settings(checkpoint))
    assert app.test_client().post("/setup", json=setup_body(image_server)).status_code == 200
    return app


@pytest.fixture()
def client(app: Any) -> Any:
    return app.test_client()


def decoded_masks(prediction: dict[str, Any]) -> list[np.ndarray]:
    """The (H, W) bool masks of a prediction's brush regions, decoded the way Label Studio does."""
    masks = []
    for region in prediction["result"]:
        assert region["type"] == "brushlabels"
        width, height = region["original_width"], region["original_height"]
        flat = np.asarray(decode_rle(region["value"]["rle"]))
        assert flat.size == width * height * 4
        masks.append(flat.reshape(height, width, 4)[:, :, 3] > 0)
    return masks


def expected_masks(oracle: Any, body: dict[str, Any]) -> list[np.ndarray]:
    """What model.Predictor gives for the prompts of an interactive body (best of 3 for a lone click), from
    the embedding at the precision every cache tier serves."""
    image = draw_image(FIXTURE_IMAGES[body["tasks"][0]["data"]["image"]])
    embedding = oracle.embed(image).at_stored_precision()
    masks = []
    for prompt in parse_prompts(body["params"]["context"]["result"], image.shape[:2]):
        out = oracle.predict(embedding, points=prompt.point_coords,
                             labels=prompt.point_labels if len(prompt.points) else None, box=prompt.box,
                             multimask=prompt.multimask)
        masks.append(out.masks[int(np.argmax(out.scores))])
    return masks


# ----------------------------------------------------------------------------------------------------------
# the recorded Label Studio requests
def test_health_and_setup_never_load_the_model(checkpoint: Path, image_server: Any) -> None:
    app = create_app(make_settings(checkpoint))
    client = app.test_client()
    segmenter = app.extensions["sam_backend"].segmenter
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json == {"status": "UP", "model_class": "SegmentAnything", "model_loaded": False,
                           "model_version": "sam-sam_tiny"}
    assert client.get("/").json["status"] == "UP"
    setup = client.post("/setup", json=setup_body(image_server))
    assert setup.status_code == 200
    assert setup.json == {"model_version": "sam-sam_tiny"}
    assert not segmenter.loaded and not segmenter.loading


@pytest.mark.parametrize("name", INTERACTIVE)
def test_interactive_fixture_gives_predictor_masks(client: Any, oracle: Any, name: str) -> None:
    body = fixture_body(name)
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.json
    results = response.json["results"]
    assert len(results) == 1
    prediction = results[0]
    assert prediction["model_version"] == f"custom-{oracle.sam.fingerprint[:8]}"
    masks = decoded_masks(prediction)
    expected = expected_masks(oracle, body)
    assert len(masks) == len(expected) >= 1
    for got, want in zip(masks, expected, strict=True):
        assert got.shape == (IMAGE_SIZE[1], IMAGE_SIZE[0])
        np.testing.assert_array_equal(got, want)
    for region in prediction["result"]:
        assert region["from_name"] == "brush" and region["to_name"] == "image"
        assert region["value"]["brushlabels"] == ["Object"]
        assert 0.0 <= region["score"] <= 1.5
    assert prediction["score"] == pytest.approx(np.mean([r["score"] for r in prediction["result"]]))


def test_batch_fixture_one_entry_per_task_in_order(client: Any) -> None:
    response = client.post("/predict", json=fixture_body("predict_batch_two_tasks.json"))
    assert response.status_code == 200
    results = response.json["results"]
    # The fixture's tasks have no rectangles yet: one entry each, [] (no prediction: Label Studio stores
    # nothing, so a later batch, once they have boxes, still does them).
    assert results == [[], []]


def rectangle(x: float, y: float, w: float, h: float, label: str = "Object") -> dict[str, Any]:
    return {"type": "rectanglelabels", "from_name": "rect", "to_name": "image", "original_width": 320,
            "original_height": 240, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [label]}}


def test_batch_boxes_from_latest_annotation_else_predictions(client: Any, oracle: Any) -> None:
    body = fixture_body("predict_batch_two_tasks.json")
    first, second = body["tasks"]
    first["annotations"] = [
        {"id": 1, "updated_at": "2026-11-26T10:00:00Z", "result": [rectangle(0, 0, 10, 10)]},
        {"id": 2, "updated_at": "2026-11-26T12:00:00Z", "result": [rectangle(25, 25, 50, 50),
                                                                    rectangle(10, 10, 30, 20)]},
    ]
    second["predictions"] = [{"id": 9, "result": [rectangle(30, 30, 40, 40)]}]
    body["tasks"].append({"id": 99, "data": {"image": "/data/upload/4/ab0e8e49-red_square.png"},
                          "annotations": [], "predictions": []})
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.json
    results = response.json["results"]
    assert [len(r["result"]) for r in results[:2]] == [2, 1] and results[2] == []
    for task, prediction, boxes in ((first, results[0], [[80, 60, 240, 180], [32, 24, 128, 72]]),
                                    (second, results[1], [[96, 72, 224, 168]])):
        image = draw_image(FIXTURE_IMAGES[task["data"]["image"]])
        want = oracle.predict_boxes(oracle.embed(image).at_stored_precision(), np.array(boxes, dtype=np.float32)).masks
        for got, expected in zip(decoded_masks(prediction), want, strict=True):
            np.testing.assert_array_equal(got, expected)


def test_a_batch_task_whose_image_fails_gets_no_prediction_and_the_others_theirs(client: Any) -> None:
    """The failed task stays without a prediction (``[]``), so a later batch or preannotate tries it again."""
    body = fixture_body("predict_batch_two_tasks.json")
    for task in body["tasks"]:
        task["annotations"] = [{"id": 1, "result": [rectangle(25, 25, 50, 50)]}]
    body["tasks"][0]["data"]["image"] = "/data/upload/4/nothing-here.png"
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.json
    first, second = response.json["results"]
    assert first == [] and len(second["result"]) == 1
    body["tasks"] = body["tasks"][:1]
    assert client.post("/predict", json=body).status_code == 502, "every task failed: the error is the answer"


def test_batch_mode_off_gives_an_entry_without_a_prediction_per_task(checkpoint: Path) -> None:
    """``[]`` per task: Label Studio counts one entry per task and stores nothing for it (warm-up only)."""
    client = create_app(make_settings(checkpoint, sam_batch_mode="off")).test_client()
    body = fixture_body("predict_batch_two_tasks.json")
    body["tasks"][0]["annotations"] = [{"id": 1, "result": [rectangle(25, 25, 50, 50)]}]
    response = client.post("/predict", json=body)
    assert response.status_code == 200
    assert response.json["results"] == [[], []]


def keypoint(x: float, y: float, label: str = "Object", positive: bool = True) -> dict[str, Any]:
    return {"type": "keypointlabels", "from_name": "kp", "to_name": "image", "original_width": 320,
            "original_height": 240, "image_rotation": 0, "is_positive": positive,
            "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": [label]}}


def test_batch_mode_points_masks_the_keypoints_of_the_latest_annotation(checkpoint: Path, image_server: Any,
                                                                      oracle: Any) -> None:
    """SAM_BATCH_MODE=points: the latest annotation's keypoints, one object per label as in a click."""
    client = create_app(make_settings(checkpoint, sam_batch_mode="points")).test_client()
    client.post("/setup", json=setup_body(image_server))
    body = fixture_body("predict_batch_two_tasks.json")
    first, second = body["tasks"]
    first["annotations"] = [{"id": 1, "updated_at": "2026-11-26T12:00:00Z",
                             "result": [keypoint(50, 50), keypoint(60, 55), keypoint(5, 5, positive=False)]}]
    second["annotations"] = [{"id": 2, "result": [rectangle(25, 25, 50, 50)]}]  # no keypoints: nothing
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.json
    results = response.json["results"]
    assert len(results[0]["result"]) == 1 and results[1] == []
    image = draw_image(FIXTURE_IMAGES[first["data"]["image"]])
    want = oracle.predict(oracle.embed(image).at_stored_precision(), points=np.array([[160, 120], [192, 132], [16, 12]], np.float32),
                          labels=np.array([1, 1, 0]), multimask=False).masks[0]
    np.testing.assert_array_equal(decoded_masks(results[0])[0], want)


def test_batch_answers_within_its_budget_and_names_what_was_left(checkpoint: Path, image_server: Any,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A batch bigger than SAM_BATCH_BUDGET_S answers in time, one entry per task: a prediction for each task
    done, ``[]`` (nothing stored by Label Studio) for each task left; the log names them and the command."""
    # Every task names the same upload: with remembered identities only the first would be downloaded.
    settings = make_settings(checkpoint, sam_batch_budget_s=2.0, sam_warmup=False, image_identities=0)
    segmenter = Segmenter.from_settings(settings)
    segmenter.load()  # the budget is for the tasks: a model still loading would take it all on a busy machine
    client = create_app(settings, segmenter).test_client()
    client.post("/setup", json=setup_body(image_server))
    body = fixture_body("predict_batch_two_tasks.json")
    template = body["tasks"][0]
    body["tasks"] = [{**template, "id": 100 + i, "annotations": [{"id": i, "result": [rectangle(25, 25, 50, 50)]}]}
                     for i in range(24)]
    image_server.delay_s = 0.5  # 24 downloads, 4 at a time: 3 s of waiting alone
    try:
        with caplog.at_level(logging.WARNING, logger="backend.predictions"):
            started = time.monotonic()
            response = client.post("/predict", json=body)
            elapsed = time.monotonic() - started
    finally:
        image_server.delay_s = 0.0
    assert response.status_code == 200, response.json
    assert elapsed < 2.0 + 1.5, f"the batch took {elapsed:.1f} s with a 2 s budget"
    results = response.json["results"]
    assert len(results) == 24
    done = [r for r in results if r != []]
    assert 1 <= len(done) < 24, [len(r) if r == [] else "done" for r in results]
    assert all(len(r["result"]) == 1 and r["model_version"] for r in done)
    assert all(r == [] for r in results[len(done):]), "tasks are answered in order: the left ones are the last"
    message = next(r.getMessage() for r in caplog.records if "budget" in r.getMessage())
    assert f"{24 - len(done)} of 24 tasks left" in message
    assert "sam-backend preannotate --project 4" in message and "123" in message


def test_batch_mode_everything_gives_the_mask_generators_masks(checkpoint: Path, image_server: Any,
                                                              oracle: Any) -> None:
    from model import MaskGenerator

    options = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    segmenter = Segmenter(checkpoint, "cpu", everything_options=options)
    client = create_app(make_settings(checkpoint, sam_batch_mode="everything"), segmenter).test_client()
    client.post("/setup", json=setup_body(image_server))
    body = fixture_body("predict_batch_two_tasks.json")
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.json
    results = response.json["results"]
    assert len(results) == 2
    for task, prediction in zip(body["tasks"], results, strict=True):
        image = draw_image(FIXTURE_IMAGES[task["data"]["image"]])
        # the whole image's embedding as every cache tier serves it (fp16-rounded)
        records = MaskGenerator(oracle.sam, **options).generate(image, embedding=oracle.embed(image).at_stored_precision())
        masks = decoded_masks(prediction)
        assert len(masks) == len(records) >= 1
        for got, record in zip(masks, records, strict=True):
            np.testing.assert_array_equal(got, record["segmentation"])
        assert all(r["value"]["brushlabels"] == ["Object"] for r in prediction["result"])


def test_polygon_output(checkpoint: Path, image_server: Any) -> None:
    pytest.importorskip("backend.polygons")
    client = create_app(make_settings(checkpoint, sam_output="polygon")).test_client()
    client.post("/setup", json=setup_body(image_server))
    body = fixture_body("predict_interactive_rectangle_api.json")
    body["label_config"] = body["label_config"].replace("BrushLabels", "PolygonLabels")
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.json
    for region in response.json["results"][0]["result"]:
        assert region["type"] == "polygonlabels" and region["value"]["polygonlabels"] == ["Object"]


def test_webhook_versions_train_metrics(client: Any) -> None:
    webhook = client.post("/webhook", json=fixture_body("webhook_annotation_created.json"))
    assert webhook.status_code == 200 and webhook.json["action"] == "ANNOTATION_CREATED"
    assert client.post("/webhook", json={"action": "SOMETHING_NEW"}).status_code == 200
    training = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 4}})
    assert training.status_code == 200 and "not trained" in training.json["message"]
    train = client.post("/train", json={"annotations": [], "project": "4.1795707904"})
    assert train.status_code == 200 and "not trained" in train.json["message"]
    versions = client.get("/versions").json
    assert versions["versions"] == [versions["model_version"]]

    def sample(text: str, name: str) -> float:
        return float(text.split(f"\n{name} ")[1].split()[0])

    client.post("/predict", json=fixture_body("predict_interactive_keypoint_api.json"))
    before = client.get("/metrics").get_data(as_text=True)
    client.post("/predict", json=fixture_body("predict_interactive_keypoint_ui_click.json"))
    text = client.get("/metrics").get_data(as_text=True)
    assert 'sam_backend_requests_total{endpoint="/predict",status="200"}' in text
    assert 'sam_backend_request_seconds_bucket{endpoint="/predict",le="0.005"}' in text
    # A second click on the same image: the decoder runs, the encoder does not (the embedding is cached).
    assert sample(text, "sam_backend_encoder_seconds_count") == sample(before, "sam_backend_encoder_seconds_count") >= 1
    assert sample(text, "sam_backend_decoder_seconds_count") == sample(before, "sam_backend_decoder_seconds_count") + 1
    assert sample(text, "sam_backend_model_load_seconds") > 0


# ----------------------------------------------------------------------------------------------------------
# bad input: a clear 4xx JSON, one log line, and the server goes on serving
def interactive_with(**value: Any) -> dict[str, Any]:
    body = fixture_body("predict_interactive_keypoint_api.json")
    body["params"]["context"]["result"][0]["value"].update(value)
    return body


def body_with_image(url: str) -> dict[str, Any]:
    body = fixture_body("predict_interactive_keypoint_api.json")
    body["tasks"][0]["data"]["image"] = url
    return body


def unknown_label_body() -> dict[str, Any]:
    body = fixture_body("predict_interactive_keypoint_api.json")
    body["label_config"] = body["label_config"].replace(
        '<BrushLabels name="brush" toName="image"><Label value="Object" background="#FF0000"/></BrushLabels>',
        '<BrushLabels name="brush" toName="image"><Label value="Car"/><Label value="Dog"/></BrushLabels>')
    return body


def unknown_tag_body() -> dict[str, Any]:
    body = fixture_body("predict_interactive_keypoint_api.json")
    body["params"]["context"]["result"][0]["from_name"] = "no_such_tool"
    return body


def zero_box_body() -> dict[str, Any]:
    body = fixture_body("predict_interactive_rectangle_api.json")
    body["params"]["context"]["result"][0]["value"]["width"] = 0
    return body


def no_tasks_body() -> dict[str, Any]:
    body = fixture_body("predict_interactive_keypoint_api.json")
    del body["tasks"]
    return body


def closed_port() -> int:
    from testsupport.processes import free_port

    return free_port()


BAD_REQUESTS = {
    "malformed JSON": (b'{"tasks": [', 400, "JSON"),
    "JSON that is not an object": (b"[1, 2]", 400, "object"),
    "missing tasks": (no_tasks_body, 400, "tasks"),
    "empty tasks": (lambda: {**fixture_body("predict_batch_two_tasks.json"), "tasks": []}, 400, "tasks"),
    "no label config": (lambda: {**fixture_body("predict_batch_two_tasks.json"), "label_config": None}, 422,
                        "label config"),
    "unknown label": (unknown_label_body, 422, "Object"),
    "unknown tag": (unknown_tag_body, 422, "no_such_tool"),
    "keypoint outside the image": (lambda: interactive_with(x=150.0), 400, "outside"),
    "coordinate not a number": (lambda: interactive_with(y="middle"), 400, "value.y"),
    "zero-size box": (zero_box_body, 400, "size"),
    "image that is not an image": (lambda: body_with_image("/data/upload/4/not-an-image.png"), 422, "image"),
    "missing image file": (lambda: body_with_image("/data/upload/4/nothing-here.png"), 502, "404"),
    "image server down": (lambda: body_with_image(f"http://127.0.0.1:{closed_port()}/x.png"), 422, "127.0.0.1"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_a_json_error_and_the_server_keeps_serving(client: Any, case: str,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    payload, status, needle = BAD_REQUESTS[case]
    with caplog.at_level(logging.WARNING, logger="backend.app"):
        if isinstance(payload, bytes):
            response = client.post("/predict", data=payload, content_type="application/json")
        else:
            response = client.post("/predict", json=payload())
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json
    body = response.json
    assert body["status"] == status and needle.lower() in body["message"].lower()
    assert "Traceback" not in response.get_data(as_text=True)
    lines = [r for r in caplog.records if r.name == "backend.app"]
    assert len(lines) == 1 and str(status) in lines[0].getMessage() and lines[0].exc_info is None
    again = client.post("/predict", json=fixture_body("predict_interactive_keypoint_api.json"))
    assert again.status_code == 200 and len(again.json["results"][0]["result"]) == 1


def test_image_requests_carry_the_setup_token(checkpoint: Path, image_server: Any) -> None:
    client = create_app(make_settings(checkpoint)).test_client()
    body = fixture_body("predict_interactive_keypoint_api.json")
    setup = setup_body(image_server)
    client.post("/setup", json={**setup, "access_token": "wrong-token"})
    refused = client.post("/predict", json=body)
    assert refused.status_code in (401, 403, 502) and refused.is_json
    assert "token" in refused.json["message"].lower() or "401" in refused.json["message"]
    client.post("/setup", json=setup)
    assert client.post("/predict", json=body).status_code == 200
    assert any(seen.path == BLUE_CIRCLE and seen.authorization == "Token " + setup["access_token"]
               for seen in image_server.seen)


def test_setup_rejects_a_broken_label_config(client: Any) -> None:
    response = client.post("/setup", json={"project": "1.2", "schema": "<View><Image name='i' value='$i'/></View>"})
    assert response.status_code == 422 and "BrushLabels" in response.json["message"]
    assert client.post("/setup", data=b"not json", content_type="application/json").status_code == 400


def test_unknown_routes_and_methods_are_json(client: Any) -> None:
    missing = client.get("/nope")
    assert missing.status_code == 404 and missing.is_json and missing.json["status"] == 404
    wrong = client.get("/predict")
    assert wrong.status_code == 405 and wrong.is_json


class ExplodingSegmenter(Segmenter):
    def segment(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("decoder exploded")


def test_unexpected_exception_is_a_500_json_with_the_traceback_in_the_log(
        checkpoint: Path, image_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings(checkpoint)
    client = create_app(settings, ExplodingSegmenter(checkpoint, "cpu")).test_client()
    client.post("/setup", json=setup_body(image_server))
    with caplog.at_level(logging.ERROR, logger="backend.app"):
        response = client.post("/predict", json=fixture_body("predict_interactive_keypoint_api.json"))
    assert response.status_code == 500 and response.is_json
    assert "decoder exploded" in response.json["message"]
    assert "Traceback" not in response.get_data(as_text=True)
    assert any(r.exc_info and "decoder exploded" in str(r.exc_info[1]) for r in caplog.records)
    assert client.get("/health").status_code == 200


# ----------------------------------------------------------------------------------------------------------
# model load states and concurrency
def slow_loader(seconds: float) -> Any:
    from model import load

    def loader(path: str, device: str | None) -> Any:
        time.sleep(seconds)
        return load(path, device=device)

    return loader


def test_predict_during_load_answers_503_then_works(checkpoint: Path, image_server: Any) -> None:
    segmenter = Segmenter(checkpoint, "cpu", ready_wait_s=0.2, loader=slow_loader(1.5))
    client = create_app(make_settings(checkpoint), segmenter).test_client()
    client.post("/setup", json=setup_body(image_server))
    segmenter.start_loading()
    started = time.perf_counter()
    health = client.get("/health")
    assert time.perf_counter() - started < 0.5
    assert health.json["model_loaded"] is False
    busy = client.post("/predict", json=fixture_body("predict_interactive_keypoint_api.json"))
    assert busy.status_code == 503 and "model is loading" in busy.json["message"]
    segmenter.load()
    assert client.get("/health").json["model_loaded"] is True
    assert client.post("/predict", json=fixture_body("predict_interactive_keypoint_api.json")).status_code == 200


def test_predict_waits_for_a_model_that_finishes_loading(checkpoint: Path, image_server: Any) -> None:
    segmenter = Segmenter(checkpoint, "cpu", ready_wait_s=30, loader=slow_loader(0.5))
    client = create_app(make_settings(checkpoint), segmenter).test_client()
    client.post("/setup", json=setup_body(image_server))
    response = client.post("/predict", json=fixture_body("predict_interactive_keypoint_api.json"))
    assert response.status_code == 200  # nobody started the load: the first /predict did, and waited


def test_missing_checkpoint_is_a_503_that_says_how_to_get_one(tmp_path: Path, image_server: Any) -> None:
    client = create_app(make_settings(tmp_path / "absent.pth")).test_client()
    client.post("/setup", json=setup_body(image_server))
    response = client.post("/predict", json=fixture_body("predict_interactive_keypoint_api.json"))
    assert response.status_code == 503
    assert "SAM_CHECKPOINT" in response.json["message"] and "absent.pth" in response.json["message"]
    health = client.get("/health").json
    assert health["status"] == "UP" and health["model_loaded"] is False and "absent.pth" in health["model_error"]


class SlowEncoder(Segmenter):
    """Encodes like the real one after a pause, to hold a request inside the encoder."""

    encoding = threading.Event()

    def embed(self, image: np.ndarray, image_sha256: str) -> Any:
        self.encoding.set()
        time.sleep(2.0)
        return super().embed(image, image_sha256)


def test_health_answers_fast_while_an_image_is_encoded(checkpoint: Path, image_server: Any) -> None:
    segmenter = SlowEncoder(checkpoint, "cpu")
    segmenter.load()
    app = create_app(make_settings(checkpoint), segmenter)
    app.test_client().post("/setup", json=setup_body(image_server))
    answers: list[int] = []
    worker = threading.Thread(target=lambda: answers.append(
        app.test_client().post("/predict", json=fixture_body("predict_interactive_keypoint_api.json")).status_code))
    worker.start()
    assert segmenter.encoding.wait(10)
    for _ in range(3):
        started = time.perf_counter()
        assert app.test_client().get("/health").status_code == 200
        assert app.test_client().post("/setup", json=fixture_body("setup.json")).status_code == 200
        assert time.perf_counter() - started < 0.5
    assert worker.is_alive()  # the predict was still running while /health answered
    worker.join(30)
    assert answers == [200]


def test_concurrent_annotators_get_masks_of_their_own_images(app: Any, oracle: Any) -> None:
    """Eight threads clicking on two different images at once: nobody gets a mask of the other image."""
    bodies = []
    for index in range(8):
        body = fixture_body("predict_interactive_keypoint_api.json")
        if index % 2:
            body["tasks"][0]["data"]["image"] = "/data/upload/4/ab0e8e49-red_square.png"
        body["params"]["context"]["result"][0]["value"].update(x=30.0 + 5 * index, y=40.0 + 3 * index)
        bodies.append(body)
    answers: dict[int, Any] = {}
    start = threading.Barrier(len(bodies))

    def click(index: int) -> None:
        client = app.test_client()
        start.wait()
        answers[index] = client.post("/predict", json=bodies[index])

    threads = [threading.Thread(target=click, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for index, body in enumerate(bodies):
        assert answers[index].status_code == 200, answers[index].json
        (got,) = decoded_masks(answers[index].json["results"][0])
        (want,) = expected_masks(oracle, body)
        np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------------------------------------
# Basic auth
@pytest.mark.parametrize("route", ["/health", "/metrics", "/versions"])
def test_basic_auth_when_configured(checkpoint: Path, route: str) -> None:
    client = create_app(make_settings(checkpoint, basic_auth_user="ann", basic_auth_pass="s3cret")).test_client()
    anonymous = client.get(route)
    assert anonymous.status_code == 401 and anonymous.is_json
    assert anonymous.headers["WWW-Authenticate"].startswith("Basic")
    assert client.get(route, headers=basic_auth_header("ann", "wrong")).status_code == 401
    assert client.get(route, headers=basic_auth_header("bob", "s3cret")).status_code == 401
    assert client.get(route, headers=basic_auth_header("ann", "s3cret")).status_code == 200


def test_basic_auth_protects_predict_and_is_off_by_default(checkpoint: Path, image_server: Any) -> None:
    client = create_app(make_settings(checkpoint, basic_auth_user="ann", basic_auth_pass="s3cret")).test_client()
    body = fixture_body("predict_interactive_keypoint_api.json")
    assert client.post("/predict", json=body).status_code == 401
    auth = basic_auth_header("ann", "s3cret")
    assert client.post("/setup", json=setup_body(image_server), headers=auth).status_code == 200
    assert client.post("/predict", json=body, headers=auth).status_code == 200
    open_client = create_app(make_settings(checkpoint)).test_client()
    assert open_client.get("/health").status_code == 200


def test_everything_filters_caps_and_labels_the_generators_masks(checkpoint: Path, image_server: Any,
                                                                  oracle: Any) -> None:
    """The per-task step of `preannotate --mode everything`: masks below --min-score or --min-area go, the best
    --max-masks stay (by predicted IoU), all under --label; a label the output tag lacks is refused."""
    from backend.errors import LabelConfigError
    from backend.image_fetch import ImageFetcher
    from backend.label_config import parse_label_config
    from backend.predictions import BatchOptions, Predictions
    from model import MaskGenerator

    # box_nms_thresh 1: random weights give whole-image boxes, which NMS would reduce to one mask
    options = {"points_per_side": 6, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}
    settings = make_settings(checkpoint)
    segmenter = Segmenter(checkpoint, "cpu", everything_options=options)
    body = fixture_body("predict_batch_two_tasks.json")
    config = parse_label_config(body["label_config"].replace('<Label value="Object" background="#FF0000"/>',
                                                             '<Label value="Object"/><Label value="Thing"/>'))
    fetcher = ImageFetcher(label_studio_url=image_server.url, label_studio_token=image_server.legacy_token)
    predictions = Predictions(config, settings, segmenter, fetcher)
    task = body["tasks"][0]
    image = draw_image(FIXTURE_IMAGES[task["data"]["image"]])
    records = MaskGenerator(oracle.sam, **options).generate(image, embedding=oracle.embed(image).at_stored_precision())
    scores = sorted((r["predicted_iou"] for r in records), reverse=True)
    assert len(scores) >= 4, "the configuration should give a few masks"
    threshold = scores[len(scores) // 2]
    min_area = int(np.median([r["area"] for r in records]))
    want = sorted((r for r in records if r["predicted_iou"] >= threshold and r["area"] >= min_area),
                  key=lambda r: r["predicted_iou"], reverse=True)[:2]
    got = predictions.predict_task(task, BatchOptions(mode="everything", min_score=threshold, min_area=min_area,
                                                      max_masks=2, label="Thing"))
    assert [r["value"]["brushlabels"] for r in got["result"]] == [["Thing"]] * len(want)
    for mask, record in zip(decoded_masks(got), want, strict=True):
        np.testing.assert_array_equal(mask, record["segmentation"])
    with pytest.raises(LabelConfigError, match="Nothing"):
        predictions.predict_task(task, BatchOptions(mode="everything", label="Nothing"))
