"""End to end through the real labeling UI: headless Chromium on Label Studio 1.23.2, our `sam-backend serve` behind it.

The API-level e2e tests post the regions a smart tool would send; this one lets Label Studio's own editor
send them. An annotator's session, step by step: log in, open the task, turn Auto-Annotation on, click with
the smart keypoint tool, see the suggestion drawn, Alt-click a negative point, accept, drag a smart
rectangle, accept, submit. Every suggestion's mask (as Label Studio handed it to the editor) and the
submitted annotation read back through the API are compared pixel for pixel with ``model.Predictor``'s
masks for the prompts the editor really sent. A failure keeps a screenshot, the page's HTML and its console
under the folder its message names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from testsupport.browser import LabelingPage, Suggestion, chromium
from testsupport.label_studio import PASSWORD, USERNAME, LabelStudio, SamBackend
from testsupport.labeling import LABEL, Reference, SceneImage, assert_same_mask, decode_brush, label_config

pytestmark = pytest.mark.e2e

CONTROLS = ["brush", "kp", "rect"]  # the control tags of label_config(), in their order


def scene_image(directory: Path) -> SceneImage:
    """A textured background, a red disc in the middle and a blue block top left: edges for the model."""
    width, height = 320, 240
    rng = np.random.default_rng(11)
    pixels = (rng.integers(0, 60, size=(height, width, 3)) + np.array([40, 90, 60])).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse([96, 72, 224, 168], fill=(220, 40, 40))
    draw.rectangle([16, 12, 80, 48], fill=(30, 30, 210))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "scene.png"
    image.save(path)
    return SceneImage(path, np.asarray(image))


def points_of(request: dict[str, Any], image: SceneImage) -> tuple[list[tuple[float, float]], list[bool]]:
    """The keypoints the editor sent, in image pixels (percent of the displayed size, the protocol's rule)."""
    regions = [r for r in request["context"]["result"] if r["type"] == "keypointlabels"]
    points = [(r["value"]["x"] / 100.0 * image.width, r["value"]["y"] / 100.0 * image.height) for r in regions]
    return points, [bool(r["is_positive"]) for r in regions]


def box_of(request: dict[str, Any], image: SceneImage) -> tuple[float, float, float, float]:
    (region,) = [r for r in request["context"]["result"] if r["type"] == "rectanglelabels"]
    value = region["value"]
    assert value.get("rotation", 0) == 0, value
    x0, y0 = value["x"] / 100.0 * image.width, value["y"] / 100.0 * image.height
    x1, y1 = x0 + value["width"] / 100.0 * image.width, y0 + value["height"] / 100.0 * image.height
    left, top, right, bottom = (float(v) for v in np.round(np.array([x0, y0, x1, y1]), 6))
    return left, top, right, bottom


def suggested_mask(suggestion: Suggestion, image: SceneImage) -> np.ndarray:
    """The one brush region Label Studio handed the editor, decoded as the browser decodes it."""
    brushes = [r for r in suggestion.response["data"]["result"] if r["type"] == "brushlabels"]
    assert len(brushes) == 1, suggestion.response
    return decode_brush(brushes[0], image)


def assert_drawn(ui: LabelingPage, mask: np.ndarray, what: str, samples: int = 60) -> None:
    """The suggestion on screen is this mask: its layer is opaque inside it and clear outside, sampled at pixels
    a pixel away from the mask's edge (the editor scales the mask to the screen with smoothing) that are on
    screen."""
    padded = np.pad(mask, 1, mode="edge")
    window = [padded[1 + dy:1 + dy + mask.shape[0], 1 + dx:1 + dx + mask.shape[1]]
              for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    inside, outside = np.logical_and.reduce(window), ~np.logical_or.reduce(window)
    rng = np.random.default_rng(0)
    for region, opaque in ((inside, True), (outside, False)):
        ys, xs = np.nonzero(region)
        assert len(ys), f"{what}: no pixel {'inside' if opaque else 'outside'} the mask to sample"
        pick = rng.choice(len(ys), size=min(samples, len(ys)), replace=False)
        pixels = [(int(xs[i]), int(ys[i])) for i in pick]
        shown = [(p, a) for p, a in zip(pixels, ui.suggestion_alpha(pixels), strict=True) if a is not None]
        assert len(shown) >= len(pixels) // 2, f"{what}: most sampled pixels are off screen: {pixels}"
        wrong = [p for p, a in shown if (a > 0) != opaque]
        assert not wrong, (f"{what}: the screen shows {'no mask' if opaque else 'mask'} at image pixels {wrong[:10]} "
                           f"({len(wrong)} of {len(shown)} sampled on screen {'inside' if opaque else 'outside'} the mask)")


def assert_near(got: float, expected: float, tolerance: float, what: str) -> None:
    assert abs(got - expected) <= tolerance, f"{what}: {got} sent, {expected} clicked (tolerance {tolerance})"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from testsupport.backend import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint") / "sam_tiny.pth", seed=7)


def test_annotator_session_in_chromium(tmp_path: Path, label_studio: LabelStudio, sam_backend: SamBackend,
                                       checkpoint: Path) -> None:
    image = scene_image(tmp_path / "images")
    project = label_studio.create_project("SAM in the browser", label_config())
    (task,) = label_studio.upload_images(project, [image.path])
    ml = label_studio.add_ml_backend(project, sam_backend.url)
    assert ml.get("state") == "CO", f"Label Studio did not connect the backend: {ml}"
    reference = Reference(checkpoint)
    pixel = 100.0 / min(image.width, image.height)  # one image pixel, in percent: the click tolerance

    with chromium() as context:
        ui = LabelingPage(context, label_studio.url, CONTROLS, tmp_path / "browser-artifacts")
        with ui.artifacts_on_failure("session"):
            ui.login(USERNAME, PASSWORD)
            ui.open_task(project, task["id"])
            ui.enable_auto_annotation()
            ui.choose_smart_tool("key-point-tool")

            # A click: one positive keypoint where we clicked; SAM's best of three for an ambiguous click.
            first = ui.click_point(0.5, 0.5, "kp", LABEL)
            (region,) = first.request["context"]["result"]
            assert region["type"] == "keypointlabels" and region["is_positive"] is True, region
            assert (region["original_width"], region["original_height"]) == (image.width, image.height), region
            assert_near(region["value"]["x"], 50.0, pixel, "click x")
            assert_near(region["value"]["y"], 50.0, pixel, "click y")
            points, positive = points_of(first.request, image)
            clicked = suggested_mask(first, image)
            assert_same_mask(clicked, reference.mask(image, points=points, positive=positive), "the click")
            earlier = reference.logits(image, points=points, positive=positive)  # the Alt-click refines from it
            assert_drawn(ui, clicked, "the click")

            # Alt-click: the same keypoint again plus a negative one, one refined mask.
            second = ui.click_point(0.15, 0.85, "kp", LABEL, negative=True)
            points, positive = points_of(second.request, image)
            assert positive == [True, False], second.request
            assert_near(100.0 * points[1][0] / image.width, 15.0, pixel, "Alt-click x")
            assert_near(100.0 * points[1][1] / image.height, 85.0, pixel, "Alt-click y")
            refined = reference.mask(image, points=points, positive=positive, refined_from=earlier)
            assert_same_mask(suggested_mask(second, image), refined, "click + Alt-click")
            assert_drawn(ui, refined, "click + Alt-click")
            ui.accept_suggestions()
            assert ui.regions() == ["brushregion"], ui.regions()

            # A smart rectangle: only the rectangle goes (the accepted keypoints are gone), one mask.
            ui.choose_smart_tool("rectangle-tool")
            third = ui.drag_rectangle((0.05, 0.05), (0.3, 0.25), "rect", LABEL)
            assert [r["type"] for r in third.request["context"]["result"]] == ["rectanglelabels"], third.request
            box = box_of(third.request, image)
            dragged = (0.05 * image.width, 0.05 * image.height, 0.3 * image.width, 0.25 * image.height)
            for corner, (got, expected) in enumerate(zip(box, dragged, strict=True)):
                assert_near(got, expected, 1.5, f"rectangle coordinate {corner} (px)")
            boxed = reference.mask(image, box=box)
            assert_same_mask(suggested_mask(third, image), boxed, "smart rectangle")
            assert_drawn(ui, boxed, "smart rectangle")
            ui.accept_suggestions()
            assert ui.regions() == ["brushregion", "brushregion"], ui.regions()

            stored = ui.submit()

    # What Label Studio stored, read back through its API: the two accepted masks, nothing else.
    (annotation,) = label_studio.request("GET", f"/api/tasks/{task['id']}/annotations/")
    assert annotation["id"] == stored["id"], (annotation["id"], stored["id"])
    result = annotation["result"]
    assert [r["type"] for r in result] == ["brushlabels", "brushlabels"], result
    masks = [decode_brush(region, image) for region in result]
    assert_same_mask(masks[0], refined, "stored mask of click + Alt-click")
    assert_same_mask(masks[1], boxed, "stored mask of the smart rectangle")
    for suggestion in (first, second, third):
        assert suggestion.click_to_drawn_ms > 0, suggestion.click_to_drawn_ms
    log = sam_backend.log.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
