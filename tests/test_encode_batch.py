"""Bulk work encodes the images of the next tasks together (SAM_ENCODE_BATCH) and predicts what it
predicts one image at a time.

``predict_tasks`` is the stream under ``sam-backend preannotate`` and the batch ``/predict``. Here it runs on a
CPU with the batch forced to 3 (the default there is 1), so the batched path runs without a GPU: real PNG
images of different sizes, a task whose image cannot be read, a task with nothing to prompt with and an image
whose embedding a click already cached, against the same tasks with a batch of 1.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from backend.config import Settings
from backend.errors import BackendError, ImageError
from backend.image_decode import TaskImage
from backend.image_fetch import ImageFetcher
from backend.label_config import parse_label_config
from backend.predictions import BatchOptions, Predictions, predict_tasks
from backend.segmenter import Segmenter
from testsupport.backend import make_tiny_checkpoint, png_bytes, scene

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image"><Label value="Object"/></BrushLabels>
  <RectangleLabels name="rect" toName="image" smart="true"><Label value="Object"/></RectangleLabels>
</View>"""
SIZES = [(320, 240), (200, 300), (640, 480), (320, 240), (150, 150), (400, 100), (320, 240), (256, 192)]
BROKEN = 4  # this task's image download fails
NO_BOXES = 6  # this task has no rectangle
CLICKED = 2  # this task's image was encoded by a click before the run


def rectangle(x: float, y: float, w: float, h: float, size: tuple[int, int]) -> dict[str, Any]:
    return {"id": f"r{x:g}", "type": "rectanglelabels", "from_name": "rect", "to_name": "image",
            "original_width": size[0], "original_height": size[1], "image_rotation": 0,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": ["Object"]}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth", seed=3)


@pytest.fixture(scope="module")
def images() -> dict[int, bytes]:
    return {i: png_bytes(scene(i, size)) for i, size in enumerate(SIZES)}


def tasks() -> list[dict[str, Any]]:
    made = []
    for i, size in enumerate(SIZES):
        regions = [] if i == NO_BOXES else [rectangle(10, 10, 50, 60, size), rectangle(40 + i, 30, 40, 50, size)]
        made.append({"id": 100 + i, "data": {"image": f"/data/upload/1/{i}.png"},
                     "annotations": [{"id": i, "result": regions}]})
    return made


def without_ids(prediction: dict[str, Any]) -> dict[str, Any]:
    """A prediction without its regions' random ids, which differ between two runs of the same masks."""
    return {**prediction, "result": [{k: v for k, v in r.items() if k != "id"} for r in prediction["result"]]}


def run(checkpoint: Path, images: dict[int, bytes], encode_batch: int) -> tuple[list[Any], list[int]]:
    """The stream's outcomes, and the number of images of each encoder run."""
    segmenter = Segmenter(checkpoint, "cpu", encode_batch=encode_batch)
    segmenter.load()
    predictor = segmenter.predictor()
    runs: list[int] = []
    embed_batch = predictor.embed_batch  # every encoder run goes through it (``embed`` is a batch of one)

    def several(batch: Any) -> Any:
        runs.append(len(batch))
        return embed_batch(batch)

    clicked = images[CLICKED]
    segmenter.embed(lambda: scene(CLICKED, SIZES[CLICKED]), hashlib.sha256(clicked).hexdigest())
    runs.clear()
    predictor.embed_batch = several  # type: ignore[method-assign]

    def fetch(task: dict[str, Any]) -> TaskImage:
        index = task["id"] - 100
        if index == BROKEN:
            raise ImageError("The image was not found (HTTP 404): /data/upload/1/4.png")
        data = images[index]
        return TaskImage(data=data, sha256=hashlib.sha256(data).hexdigest(), source=task["data"]["image"])

    predictions = Predictions(parse_label_config(CONFIG), Settings(sam_device="cpu"), segmenter, ImageFetcher())
    outcomes = [(task["id"], result.message if isinstance(result, BackendError) else without_ids(result))
                for task, result in predict_tasks(predictions, tasks(), BatchOptions(mode="boxes"), fetch)]
    return outcomes, runs


def test_a_batch_of_encodes_predicts_what_one_at_a_time_does(checkpoint: Path, images: dict[int, bytes]) -> None:
    alone, alone_runs = run(checkpoint, images, encode_batch=1)
    together, together_runs = run(checkpoint, images, encode_batch=3)
    assert [task_id for task_id, _ in together] == [100 + i for i in range(len(SIZES))], "every task, in order"
    assert together == alone
    assert "HTTP 404" in dict(together)[100 + BROKEN]
    assert all(dict(together)[100 + i]["result"] for i in range(len(SIZES)) if i not in (BROKEN, NO_BOXES))
    encoded = len(SIZES) - 3  # not the broken image, the task without boxes or the clicked image
    assert alone_runs == [1] * encoded
    assert sum(together_runs) == encoded, "each image encoded once, the cached one not at all"
    assert max(together_runs) == 3 and len(together_runs) < encoded, together_runs
