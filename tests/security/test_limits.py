"""Every request has a bounded cost: against a real ``sam-backend serve``, each request that asks for more than a
limit is answered 413 quickly, and the worker's resident memory (read from /proc) does not grow with it; every
malformed body named in the limits work is a 400 JSON naming the bad field.

The server is gunicorn with a tiny seeded checkpoint; images come from the token-checking fake Label Studio.
The oversized requests are those that cost gigabytes or minutes before the limits (10 000 keypoints,
1 000 labels in one click, 400 /setup calls with distinct projects), at the default limits.
"""

from __future__ import annotations

import copy
import json
import socket
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from testsupport.backend import (
    ServerProcess,
    fixture_body,
    interactive_body,
    make_tiny_checkpoint,
    running_label_studio,
    start_server,
)
from testsupport.proc import tree_rss_bytes

MiB = 2**20
FAST_S = 3.0  # a refusal costs its JSON parse; generous for a loaded 2-core machine


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("limits")
    checkpoint = make_tiny_checkpoint(tmp / "sam_tiny.pth", seed=3)
    with running_label_studio() as label_studio:
        served = start_server(checkpoint, tmp / "server.log", SAM_SETUP_MEMORY_MB="4")
        try:
            setup = fixture_body("setup.json")
            setup["hostname"] = label_studio.url
            assert served.post("/setup", json=setup).status_code == 200
            served.wait_loaded()
            # one real click first, so that the model, the image path and the allocator are warm
            assert served.post("/predict", json=fixture_body("predict_interactive_keypoint_api.json")).status_code == 200
            yield served
        finally:
            served.stop()


def rss(server: ServerProcess) -> int:
    return tree_rss_bytes(server.process.pid)


def keypoint(i: int, label: str = "Object") -> dict[str, Any]:
    return {"id": f"kp{i}", "from_name": "kp", "to_name": "image", "type": "keypointlabels", "is_positive": True,
            "original_width": 320, "original_height": 240, "image_rotation": 0,
            "value": {"x": 10 + i % 80, "y": 10 + i % 70, "width": 0.26, "keypointlabels": [label]}}


def rectangle(i: int) -> dict[str, Any]:
    return {"id": f"r{i}", "from_name": "rect", "to_name": "image", "type": "rectanglelabels",
            "original_width": 320, "original_height": 240, "image_rotation": 0,
            "value": {"x": i % 50, "y": i % 40, "width": 20, "height": 20, "rotation": 0,
                      "rectanglelabels": ["Object"]}}


def batch_task(task_id: int, rectangles: int = 0) -> dict[str, Any]:
    return {"id": task_id, "data": {"image": "/data/upload/4/d94949cd-blue_circle.png"},
            "annotations": [{"id": 1, "result": [rectangle(i) for i in range(rectangles)]}] if rectangles else [],
            "predictions": []}


def batch(tasks: list[dict[str, Any]]) -> dict[str, Any]:
    body = copy.deepcopy(fixture_body("predict_batch_two_tasks.json"))
    body["tasks"] = tasks
    return body


OVER_LIMITS = {
    "10 000 keypoints in one click": (lambda: interactive_body([keypoint(i) for i in range(10_000)]), "SAM_MAX_CLICK_REGIONS"),
    "999 keypoints in one click": (lambda: interactive_body([keypoint(i) for i in range(999)]), "SAM_MAX_CLICK_POINTS"),
    "1 000 labels in one click": (lambda: interactive_body([keypoint(i, f"L{i}") for i in range(1_000)]),
                                  "SAM_MAX_CLICK_OBJECTS"),
    "1 001 regions in one click": (lambda: interactive_body([{"type": "brushlabels", "value": {}}] * 1_001),
                                   "SAM_MAX_CLICK_REGIONS"),
    "a batch task with 1 001 rectangles": (lambda: batch([batch_task(1, rectangles=1_001)]),
                                           "SAM_MAX_BOXES_PER_TASK"),
    "10 001 tasks in one batch": (lambda: batch([batch_task(i) for i in range(10_001)]), "SAM_MAX_TASKS"),
}


@pytest.mark.parametrize("name", list(OVER_LIMITS))
def test_a_request_over_a_limit_is_a_fast_413_with_bounded_memory(server: ServerProcess, name: str) -> None:
    make, variable = OVER_LIMITS[name]
    data = json.dumps(make()).encode()
    before = rss(server)
    started = time.monotonic()
    response = server.post("/predict", data=data, headers={"Content-Type": "application/json"})
    elapsed = time.monotonic() - started
    grown = rss(server) - before
    assert response.status_code == 413, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    assert variable in response.json()["message"]
    assert elapsed < FAST_S, f"{name}: refused after {elapsed:.1f} s"
    # the body itself is held while it is parsed; nothing in proportion to the work it asked for
    assert grown < 40 * MiB + 4 * len(data), f"{name}: the worker grew by {grown / MiB:.0f} MiB"
    assert server.get("/health").status_code == 200


def test_the_limits_let_real_work_through(server: ServerProcess) -> None:
    """At the limits, not above them: a click with many keypoints of one label, and a 40-rectangle task whose
    boxes go through the decoder in chunks."""
    response = server.post("/predict", json=interactive_body([keypoint(i) for i in range(500)]))
    assert response.status_code == 200, response.text
    response = server.post("/predict", json=batch([batch_task(1, rectangles=40)]))
    assert response.status_code == 200, response.text
    assert len(response.json()["results"][0]["result"]) == 40


def big_config(i: int, size: int) -> str:
    """A valid label config of about ``size`` characters, distinct per ``i``."""
    padding = f"<!-- project {i} " + "x" * size + " -->"
    return ("<View>" + padding + '<Image name="image" value="$image"/>'
            '<BrushLabels name="brush" toName="image"><Label value="Object"/></BrushLabels></View>')


def test_setup_memory_is_bounded_by_an_lru(server: ServerProcess) -> None:
    """400 /setup calls with distinct projects and 200 KB configs (80 MB in all) leave the worker within its
    SAM_SETUP_MEMORY_MB (4 here) of where it was; the newest project's config is kept, the oldest dropped."""
    before = rss(server)
    for i in range(400):
        answer = server.post("/setup", json={"project": f"{1000 + i}.1795707904", "schema": big_config(i, 200_000)})
        assert answer.status_code == 200, answer.text
    grown = rss(server) - before
    assert grown < 40 * MiB, f"400 /setup calls grew the worker by {grown / MiB:.0f} MiB"

    def created(project_id: int) -> int:
        event = {"action": "TASKS_CREATED", "project": {"id": project_id},
                 "tasks": [{"id": 1, "data": {"image": "/data/upload/4/d94949cd-blue_circle.png"}}]}
        answer = server.post("/webhook", json=event)
        assert answer.status_code == 200, answer.text
        return int(answer.json()["queued"])

    assert created(1000) == 0, "the first project's config outlived 400 newer ones"
    assert created(1399) == 1, "the newest project's config was not kept"


# ------------------------------------------------------------------------------------------------------------
# malformed bodies: 400 JSON naming what is wrong
def with_label(label: str) -> bytes:
    body = interactive_body([keypoint(0)])
    body["params"]["context"]["result"][0]["value"]["keypointlabels"] = ["PLACEHOLDER"]
    return json.dumps(body).replace('"PLACEHOLDER"', label).encode()


def huge_x() -> bytes:
    body = interactive_body([keypoint(0)])
    return json.dumps(body).replace('"x": 10', '"x": ' + "9" * 401).encode()


def nested(depth: int) -> bytes:
    text = json.dumps(batch([batch_task(1)]))
    return text.replace('"annotations": []', '"annotations": ' + "[" * depth + "]" * depth).encode()


def webhook_task_data_number() -> bytes:
    event = {"action": "TASKS_CREATED", "project": {"id": 4, "label_config": fixture_body("setup.json")["schema"]},
             "tasks": [{"id": 1, "data": 5}]}
    return json.dumps(event).encode()


MALFORMED = {
    "deep nesting (100 000 levels)": ("/predict", lambda: nested(100_000), "nested too deeply"),
    "nesting beyond SAM_MAX_JSON_DEPTH": ("/predict", lambda: nested(80), "tasks[0].annotations"),
    "a 401-digit coordinate": ("/predict", huge_x, "params.context.result[0].value.x"),
    "a lone surrogate in a label": ("/predict", lambda: with_label('"\\ud800"'), "keypointlabels[0]"),
    "NaN": ("/predict", lambda: json.dumps(interactive_body([keypoint(0)])).replace('"y": 10', '"y": NaN').encode(),
            "value.y"),
    "1e999": ("/predict", lambda: json.dumps(interactive_body([keypoint(0)])).replace('"y": 10', '"y": 1e999').encode(),
              "value.y"),
    "a webhook task whose data is a number": ("/webhook", webhook_task_data_number, "tasks[0]"),
    "a body that is an array": ("/predict", lambda: b"[1, 2]", "JSON object"),
    "a body that is not JSON": ("/setup", lambda: b"{'project': 1}", "not valid JSON"),
    "a body that is not UTF-8": ("/setup", lambda: b'{"project": "\xff"}', "UTF-8"),
    "an empty body": ("/predict", lambda: b"", "empty"),
    "a task without data": ("/predict", lambda: json.dumps(batch([{"id": 1}])).encode(), "tasks[0]"),
    "a label config that is a number": ("/predict", lambda: json.dumps({**batch([batch_task(1)]), "label_config": 5})
                                        .encode(), "'label_config'"),
    "a /setup schema that is a list": ("/setup", lambda: b'{"project": "4.1", "schema": ["<View/>"]}', "'schema'"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_body_is_a_400_naming_the_field(server: ServerProcess, name: str) -> None:
    path, make, named = MALFORMED[name]
    started = time.monotonic()
    response = server.post(path, data=make(), headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    assert named in response.json()["message"], response.json()
    assert time.monotonic() - started < FAST_S
    lines = [line for line in server.log.read_text().splitlines() if "-> 400" in line]
    assert lines, "a 400 leaves one log line"


def test_a_bad_chunked_body_is_a_400(server: ServerProcess) -> None:
    """Transfer-Encoding: chunked with a chunk size that is not hexadecimal."""
    parts = urlsplit(server.url)
    request = (f"POST /predict HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
               "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\n{\"tas\r\nzz\r\nks\": []}\r\n0\r\n\r\n")
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(request.encode())
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    status_line = received.split(b"\r\n", 1)[0]
    assert b" 400 " in status_line, received[:500]
    assert b"text/html" not in received.lower()
    assert server.get("/health").status_code == 200


def test_the_server_keeps_serving(server: ServerProcess) -> None:
    response = server.post("/predict", json=fixture_body("predict_interactive_keypoint_api.json"))
    assert response.status_code == 200
    assert requests.get(server.url + "/health", timeout=1).json()["status"] == "UP"
    assert "Traceback" not in server.log.read_text()


def test_rss_helper_sees_the_worker(server: ServerProcess) -> None:
    """The memory checks above read gunicorn's master and worker: a tiny model's worker is tens of MiB."""
    assert rss(server) > 50 * MiB

