"""End to end: a real Label Studio 1.23.2 talking to a real `sam-backend serve` over HTTP.

What only this test can show: Label Studio accepts the backend (health, setup, model_version), forwards the
smart tools' regions to it, takes our brush result back as the suggestion the browser shows, and stores
"Retrieve predictions" answers as one prediction per task. The masks are compared pixel for pixel with
``model.Predictor`` on the same checkpoint and the same image, so a wrong coordinate conversion, a
transposed RLE or a mask of the wrong orientation fails here even when every part passes its own tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from testsupport.label_studio import LabelStudio, SamBackend
from testsupport.labeling import LABEL, Reference, SceneImage, assert_same_mask, decode_brush, label_config

pytestmark = pytest.mark.e2e

# ------------------------------------------------------------------------------------------------------------
# images


def _scene(width: int, height: int, seed: int) -> Image.Image:
    """A textured background with an ellipse and a rectangle: something with edges for the model to see."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(noise + np.array([40, 90, 60], dtype=np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse([width * 0.3, height * 0.3, width * 0.7, height * 0.7], fill=(220, 40, 40))
    draw.rectangle([width * 0.05, height * 0.05, width * 0.25, height * 0.2], fill=(30, 30, 210))
    return image


def make_images(directory: Path) -> list[SceneImage]:
    """A landscape PNG, an upright portrait JPEG, and a JPEG stored landscape with EXIF orientation 6 (the
    phone-camera case: the browser shows it portrait, so the mask must be portrait too)."""
    directory.mkdir(parents=True, exist_ok=True)
    landscape = directory / "landscape.png"
    _scene(320, 240, seed=1).save(landscape)
    portrait = directory / "portrait.jpg"
    _scene(192, 256, seed=2).save(portrait, quality=92)
    rotated = directory / "exif_rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    _scene(256, 160, seed=3).save(rotated, quality=92, exif=exif)
    images = []
    for path in (landscape, portrait, rotated):
        with Image.open(path) as image:
            pixels = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
        images.append(SceneImage(path, pixels))
    assert images[2].pixels.shape[:2] == (256, 160)  # displayed portrait although stored landscape
    return images


# ------------------------------------------------------------------------------------------------------------
# Label Studio regions, as the smart tools send them (percent of the displayed image)


def keypoint_region(image: SceneImage, x_px: float, y_px: float, region_id: str = "kp1",
                    positive: bool = True) -> dict[str, Any]:
    return {
        "id": region_id, "from_name": "kp", "to_name": "image", "type": "keypointlabels", "origin": "manual",
        "original_width": image.width, "original_height": image.height, "image_rotation": 0,
        "is_positive": positive,
        "value": {"x": 100.0 * x_px / image.width, "y": 100.0 * y_px / image.height, "width": 0.26,
                  "labels": [LABEL], "keypointlabels": [LABEL]},
    }


def rectangle_region(image: SceneImage, box: tuple[float, float, float, float], region_id: str = "rc1",
                     from_name: str = "rect") -> dict[str, Any]:
    x0, y0, x1, y1 = box
    return {
        "id": region_id, "from_name": from_name, "to_name": "image", "type": "rectanglelabels",
        "origin": "manual", "original_width": image.width, "original_height": image.height,
        "image_rotation": 0,
        "value": {"x": 100.0 * x0 / image.width, "y": 100.0 * y0 / image.height,
                  "width": 100.0 * (x1 - x0) / image.width, "height": 100.0 * (y1 - y0) / image.height,
                  "rotation": 0, "labels": [LABEL], "rectanglelabels": [LABEL]},
    }


# ------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module", params=["sam", "sam2.1"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Meta's formats, seeded random weights. SAM: a tiny configuration, encodes take milliseconds on a CPU.
    SAM 2.1: the released hiera-tiny architecture (what a served SAM 2.1 file must be), a few seconds an encode."""
    directory = tmp_path_factory.mktemp("checkpoint")
    if request.param == "sam2.1":
        from testsupport.sam2_checkpoints import checkpoint as sam2_checkpoint

        return sam2_checkpoint(directory, "sam2.1_hiera_tiny", seed=7)[0]
    from testsupport.backend import make_tiny_checkpoint

    return make_tiny_checkpoint(directory / "sam_tiny.pth", seed=7)


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> Reference:
    return Reference(checkpoint)


@dataclass(frozen=True)
class Project:
    id: int
    ml_backend: int
    images: list[SceneImage]
    tasks: list[dict[str, Any]]  # in the order of `images`


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, label_studio: LabelStudio,
            sam_backend: SamBackend) -> Project:
    """A project with the three images uploaded through Label Studio and our backend connected to it."""
    images = make_images(tmp_path_factory.mktemp("images"))
    project_id = label_studio.create_project("SAM e2e", label_config())
    tasks = label_studio.upload_images(project_id, [image.path for image in images])
    by_name = {}
    for task in tasks:
        stored = task["data"]["image"]
        by_name[next(image.path.name for image in images if stored.endswith(image.path.name))] = task
    ml = label_studio.add_ml_backend(project_id, sam_backend.url)
    assert ml.get("state") in ("CO", "TR", "PR"), f"Label Studio did not connect the backend: {ml}"
    return Project(project_id, ml["id"], images, [by_name[image.path.name] for image in images])


# ------------------------------------------------------------------------------------------------------------
# tests


def test_label_studio_connects_the_backend(label_studio: LabelStudio, sam_backend: SamBackend,
                                           project: Project) -> None:
    """Adding the backend runs /health and /setup; Label Studio then lists it as connected and interactive."""
    ml = label_studio.request("GET", f"/api/ml/{project.ml_backend}")
    assert ml["state"] == "CO", ml
    assert ml["is_interactive"] is True, ml
    assert ml["url"].rstrip("/") == sam_backend.url, ml


@pytest.mark.parametrize("prompt", ["keypoint", "rectangle", "keypoint_and_rectangle", "keypoint_and_negative"])
def test_interactive_annotating_returns_the_predictor_mask(label_studio: LabelStudio, project: Project,
                                                           reference: Reference, prompt: str) -> None:
    """A smart keypoint, a smart rectangle, and both: Label Studio hands back our brush mask, which equals
    model.Predictor's mask for the same prompt, at the displayed size of every image (EXIF included). An
    Alt-click (is_positive false) must reach SAM as a negative point."""
    for image, task in zip(project.images, project.tasks, strict=True):
        # Whole-pixel positions on exact percentages keep the percent -> pixel round trip exact.
        point = (image.width // 2, image.height // 2)
        box = (image.width // 4, image.height // 4, 3 * image.width // 4, 3 * image.height // 4)
        regions, points, positive, expected_box = [], None, None, None
        if "keypoint" in prompt:
            regions.append(keypoint_region(image, *point))
            points, positive = [point], [True]
        earlier = None
        if "negative" in prompt:
            # The Alt-click after a click: Label Studio resends the first keypoint with the new one, and the
            # backend refines from the first click's answer (SAM_REFINE), so that click comes first here.
            first = label_studio.interactive_annotating(project.ml_backend, task["id"], list(regions))
            assert "errors" not in first, f"{image.path.name}: {first}"
            earlier = reference.logits(image, points=points, positive=positive)
            negative = (image.width // 8, image.height // 8)
            regions.append(keypoint_region(image, *negative, region_id="kp2", positive=False))
            points, positive = [point, negative], [True, False]
        if "rectangle" in prompt:
            regions.append(rectangle_region(image, box))
            expected_box = box
        answer = label_studio.interactive_annotating(project.ml_backend, task["id"], regions)
        assert "errors" not in answer, f"{image.path.name}: {answer}"
        result = answer["data"]["result"]
        brushes = [region for region in result if region["type"] == "brushlabels"]
        assert len(brushes) == 1, f"{image.path.name}: expected one brush region, got {result}"
        got = decode_brush(brushes[0], image)
        assert got.any(), f"{image.path.name}: empty mask"
        assert_same_mask(got, reference.mask(image, points=points, box=expected_box, positive=positive,
                                             refined_from=earlier),
                         f"{prompt} on {image.path.name}")


def test_interactive_annotating_reports_bad_regions(label_studio: LabelStudio, project: Project,
                                                    sam_backend: SamBackend) -> None:
    """A rectangle with no area is refused as bad input (4xx), and Label Studio reports an error rather than
    an empty suggestion. Label Studio 1.23.2 replaces any 4xx/5xx body with requests' own text ("400 Client
    Error: BAD REQUEST for url: ..."), so the backend's message itself only reaches its log; the status
    is what tells the annotator's admin it was the input, not a crash."""
    image, task = project.images[0], project.tasks[0]
    flat = rectangle_region(image, (10, 10, 10, 10))
    answer = label_studio.interactive_annotating(project.ml_backend, task["id"], [flat])
    assert "data" not in answer and answer.get("errors"), answer
    text = json.dumps(answer["errors"])
    assert "400 Client Error" in text or "422 Client Error" in text, text
    log = sam_backend.log.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]


def test_retrieve_predictions_stores_one_brush_prediction_per_task(
        tmp_path_factory: pytest.TempPathFactory, label_studio: LabelStudio, sam_backend: SamBackend,
        reference: Reference) -> None:
    """Bulk pre-annotation: tasks that carry rectangle predictions (from a detector, say) get SAM masks
    through the Data Manager's "Retrieve predictions", stored under our backend's model_version."""
    images = make_images(tmp_path_factory.mktemp("batch-images"))
    project_id = label_studio.create_project("SAM e2e batch", label_config())
    tasks = label_studio.upload_images(project_id, [image.path for image in images])
    image_of_task = {}
    boxes = {}
    for task in tasks:
        image = next(image for image in images if task["data"]["image"].endswith(image.path.name))
        box = (image.width // 5, image.height // 5, 4 * image.width // 5, 4 * image.height // 5)
        label_studio.request("POST", "/api/predictions", json={
            "task": task["id"], "model_version": "detector-v1", "score": 0.5,
            "result": [rectangle_region(image, box, region_id=f"det{task['id']}")],
        })
        image_of_task[task["id"]] = image
        boxes[task["id"]] = box
    ml = label_studio.add_ml_backend(project_id, sam_backend.url)
    assert ml.get("state") == "CO", ml

    label_studio.retrieve_predictions(project_id)

    ours = [p for p in label_studio.predictions(project_id) if p["model_version"] == reference.model_version]
    versions = sorted({p["model_version"] for p in label_studio.predictions(project_id)})
    assert sorted(p["task"] for p in ours) == sorted(image_of_task), (
        f"expected one prediction per task with model_version {reference.model_version!r}; "
        f"Label Studio holds versions {versions}; backend log:\n{sam_backend.log.read_text()[-3000:]}")
    for prediction in ours:
        image = image_of_task[prediction["task"]]
        brushes = [region for region in prediction["result"] if region["type"] == "brushlabels"]
        assert len(brushes) == 1, prediction["result"]
        got = decode_brush(brushes[0], image)
        expected = reference.predictor.predict_boxes(reference.embedding(image),
                                                     np.asarray([boxes[prediction["task"]]], np.float32))
        assert_same_mask(got, expected.masks[0], f"box prediction on {image.path.name}")


def test_retrieve_predictions_masks_every_rectangle_of_an_annotation_on_local_files(
        label_studio: LabelStudio, sam_backend: SamBackend, reference: Reference) -> None:
    """Tasks imported as JSON with Label Studio local-files URLs and an annotation holding two rectangles:
    the backend downloads each image through Label Studio with its token and returns one mask per
    rectangle, in order, equal to model.Predictor.predict_boxes on both boxes at once."""
    folder = label_studio.files_dir / "local-batch"
    images = make_images(folder)
    project_id = label_studio.create_project("SAM e2e local files", label_config())
    label_studio.add_local_storage(project_id, folder)
    boxes_of = {}
    tasks = []
    for image in images:
        w, h = image.width, image.height
        boxes = [(w // 10, h // 10, w // 2, h // 2), (w // 3, h // 3, 9 * w // 10, 9 * h // 10)]
        boxes_of[image.path.name] = boxes
        tasks.append({
            "data": {"image": f"/data/local-files/?d={folder.name}/{image.path.name}"},
            "annotations": [{"result": [rectangle_region(image, box, region_id=f"r{i}")
                                        for i, box in enumerate(boxes)]}],
        })
    label_studio.import_tasks(project_id, tasks)
    ml = label_studio.add_ml_backend(project_id, sam_backend.url)
    assert ml.get("state") == "CO", ml

    label_studio.retrieve_predictions(project_id)

    image_of_task = {task["id"]: next(image for image in images if task["data"]["image"].endswith(image.path.name))
                     for task in label_studio.tasks(project_id)}
    ours = [p for p in label_studio.predictions(project_id) if p["model_version"] == reference.model_version]
    assert sorted(p["task"] for p in ours) == sorted(image_of_task), (
        f"expected one prediction per task; backend log:\n{sam_backend.log.read_text()[-3000:]}")
    for prediction in ours:
        image = image_of_task[prediction["task"]]
        brushes = [region for region in prediction["result"] if region["type"] == "brushlabels"]
        assert len(brushes) == 2, prediction["result"]
        expected = reference.predictor.predict_boxes(reference.embedding(image),
                                                     np.asarray(boxes_of[image.path.name], np.float32))
        for index, region in enumerate(brushes):
            assert_same_mask(decode_brush(region, image), expected.masks[index],
                             f"rectangle {index} of the annotation on {image.path.name}")
    # The backend has no local root configured: every image came through Label Studio, token and all. Label
    # Studio's local-files answers carry an ETag, so a later look at an image the backend already knows is a
    # conditional GET answered 304 Not Modified (backend.image_identity); each image was sent whole once.
    served = [line for line in label_studio.log.read_text(errors="replace").splitlines()
              if '"GET /data/local-files/' in line]
    assert served and all('HTTP/1.1" 200 ' in line or 'HTTP/1.1" 304 ' in line for line in served), served
    for image in images:
        assert any(f'/{image.path.name} HTTP/1.1" 200 ' in line for line in served), (image.path.name, served)
