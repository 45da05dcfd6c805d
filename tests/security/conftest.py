"""What the security tests share: a tiny checkpoint, the token-checking Label Studio stand-in and its cloud host,
``sam-backend serve`` processes started with a given environment, and the request bodies Label Studio sends.

Every server here is a real ``sam-backend serve`` (gunicorn) subprocess: what is asserted is what reaches the
stand-in hosts over real HTTP (``CloudStorage.leaks``: any Authorization header that reached a host other than
Label Studio) and what the server answers and logs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from testsupport.backend import (
    ServerProcess,
    fixture_body,
    running_label_studio,
    start_server,
    tiny_checkpoint_fixture,
)

Serve = Callable[..., ServerProcess]


checkpoint = tiny_checkpoint_fixture(seed=5)


@pytest.fixture(scope="module")
def label_studio() -> Iterator[Any]:
    """``FakeLabelStudio`` (legacy token ``SETUP_TOKEN``) with ``.cloud``; no token may ever reach the cloud."""
    with running_label_studio() as server:
        yield server
        assert server.cloud.leaks == [], "the Label Studio token reached a host other than Label Studio"


@pytest.fixture(scope="module")
def serve(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    """``serve(name, **env)``: a ``sam-backend serve`` with that environment, stopped at the end of the module."""
    started: list[ServerProcess] = []
    logs = tmp_path_factory.mktemp("logs")

    def start(name: str, **env: str) -> ServerProcess:
        server = start_server(checkpoint, logs / f"{name}.log", threads=4, **env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def click_body(image: str, task_id: int = 7) -> dict[str, Any]:
    """Label Studio's smart-keypoint /predict (one click in the middle) on a task whose image is ``image``."""
    body = copy.deepcopy(fixture_body("predict_interactive_keypoint_api.json"))
    task = body["tasks"][0]
    task["id"] = task_id
    task["data"]["image"] = image
    task["predictions"] = []
    return body


def open_body(image: str, task_id: int = 7) -> dict[str, Any]:
    """What Label Studio sends when an annotator opens a task: /predict with no context."""
    body = copy.deepcopy(fixture_body("predict_batch_two_tasks.json"))
    body["tasks"] = body["tasks"][:1]
    body["tasks"][0]["id"] = task_id
    body["tasks"][0]["data"]["image"] = image
    body["params"] = {"context": None}
    return body


def tasks_created(images: list[str], first_id: int = 1000) -> dict[str, Any]:
    """Label Studio's TASKS_CREATED webhook for tasks with these images."""
    config = fixture_body("predict_interactive_keypoint_api.json")["label_config"]
    return {"action": "TASKS_CREATED", "project": {"id": 4, "label_config": config},
            "tasks": [{"id": first_id + i, "data": {"image": image}} for i, image in enumerate(images)]}
