"""`sam-backend predict` and `sam-backend auto-annotate` on generated images, with a tiny seeded checkpoint.

The commands run as a user runs them (subprocesses, settings from the environment); their masks are compared
with `model.Predictor`'s for the same prompts.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.offline import InputError, parse_objects, read_yolo_boxes, yolo_polygon
from testsupport.backend import SAM_BACKEND, make_tiny_checkpoint, png_bytes, scene


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("offline") / "sam_tiny.pth", seed=4)


@pytest.fixture(scope="module")
def predictor(checkpoint: Path):
    import torch

    from model import Predictor, load

    torch.set_num_threads(1)
    return Predictor(load(checkpoint, device="cpu", dtype=torch.float32))


def run(checkpoint: Path, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAM_", "LABEL_STUDIO_", "REDIS_URL"))}
    env.update({"SAM_CHECKPOINT": str(checkpoint), "SAM_DEVICE": "cpu", "SAM_TORCH_THREADS": "1",
                "OMP_NUM_THREADS": "1", **settings})
    return subprocess.run([str(SAM_BACKEND), *args], env=env, capture_output=True, text=True, timeout=300)


def write_scene(path: Path, seed: int, size: tuple[int, int] = (320, 240)) -> np.ndarray:
    pixels = scene(seed, size=size)
    path.write_bytes(png_bytes(pixels))
    return pixels


# ------------------------------------------------------------------------------------------------- prompts


def test_prompts_follow_ultralytics_shapes() -> None:
    two = parse_objects(["10,20", "30,40"])  # (N, 2): N objects of one point
    assert [o.points.tolist() for o in two] == [[[10, 20]], [[30, 40]]]
    assert [o.labels.tolist() for o in two] == [[1], [1]] and all(o.multimask for o in two)
    grouped = parse_objects(["10,20;30,40", "50,60;70,80"], ["1;0", "1;1"])  # (N, k, 2)
    assert [o.points.shape for o in grouped] == [(2, 2), (2, 2)]
    assert [o.labels.tolist() for o in grouped] == [[1, 0], [1, 1]] and not any(o.multimask for o in grouped)
    assert [o.labels.tolist() for o in parse_objects(["1,2", "3,4"], ["1,0"])] == [[1], [0]]  # labels (N,)
    boxes = parse_objects(boxes=[[0, 0, 10, 10], [5, 5, 20, 20]])
    assert [o.box.tolist() for o in boxes] == [[0, 0, 10, 10], [5, 5, 20, 20]] and boxes[0].points is None
    both = parse_objects(["5,5"], boxes=[[0, 0, 10, 10]])
    assert both[0].points.tolist() == [[5, 5]] and both[0].box is not None and not both[0].multimask


@pytest.mark.parametrize("points, labels, boxes, needle", [
    (["10"], [], [], "x,y"),
    (["a,b"], [], [], "numbers"),
    (["1,2"], ["2"], [], "labels are 1"),
    (["1,2;3,4"], ["1"], [], "one label per point"),
    ([], ["1"], [], "needs --points"),
    ([], [], [[5, 5, 1, 1]], "x1 must be > x0"),
    (["1,2", "3,4"], [], [[0, 0, 5, 5]], "as many of each"),
    (["nan,1"], [], [], "finite"),
])
def test_bad_prompts_are_clear_errors(points, labels, boxes, needle: str) -> None:
    with pytest.raises(InputError, match=needle):
        parse_objects(points, labels, boxes)


# ------------------------------------------------------------------------------------------------- predict


@pytest.mark.parametrize("encode_batch", ["1", "2"])
def test_predict_writes_masks_overlay_and_json_equal_to_the_predictor(checkpoint: Path, predictor,
                                                                      tmp_path: Path, encode_batch: str) -> None:
    """Also with two images per encoder run (SAM_ENCODE_BATCH=2, a GPU's way, forced here on the CPU)."""
    images = [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"]
    pixels = [write_scene(images[0], 1), write_scene(images[1], 2, size=(200, 300)), write_scene(images[2], 3)]
    out = tmp_path / "out"
    result = run(checkpoint, "predict", *map(str, images), "--points", "100,120", "50,60;70,80", "--labels", "1",
                 "1;0", "--out", str(out), "--quiet", SAM_ENCODE_BATCH=encode_batch)
    assert result.returncode == 0, result.stderr
    for path, image in zip(images, pixels, strict=True):
        report = json.loads((out / f"{path.stem}.json").read_text())
        assert (report["width"], report["height"]) == (image.shape[1], image.shape[0])
        assert len(report["masks"]) == 2 and report["model_version"].startswith("custom-")
        embedding = predictor.embed(image)
        prompts = [(np.array([[100, 120]]), np.array([1]), True), (np.array([[50, 60], [70, 80]]), np.array([1, 0]),
                                                                   False)]
        for record, (coords, labels, multimask) in zip(report["masks"], prompts, strict=True):
            mask = np.asarray(Image.open(out / record["file"])) > 0
            expected = predictor.predict(embedding, points=coords, labels=labels, multimask=multimask,
                                         best_only=True)
            np.testing.assert_array_equal(mask, expected.masks[0])
            assert record["score"] == pytest.approx(float(expected.scores[0]), abs=1e-5)
            assert record["area"] == int(mask.sum()) and record["prompt"]["points"] == coords.tolist()
            if mask.any():
                ys, xs = np.nonzero(mask)
                assert record["box"] == [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        overlay = np.asarray(Image.open(out / report["overlay"]))
        assert overlay.shape == image.shape and not np.array_equal(overlay, image)


def test_predict_boxes_and_bad_input(checkpoint: Path, predictor, tmp_path: Path) -> None:
    image = write_scene(tmp_path / "c.png", 3)
    out = tmp_path / "out"
    result = run(checkpoint, "predict", str(tmp_path / "c.png"), "--box", "20", "30", "200", "180", "--box", "0",
                 "0", "100", "100", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "c.json").read_text())
    expected = predictor.predict_boxes(predictor.embed(image), np.array([[20, 30, 200, 180], [0, 0, 100, 100]]))
    for record, mask in zip(report["masks"], expected.masks, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(out / record["file"])) > 0, mask)

    outside = run(checkpoint, "predict", str(tmp_path / "c.png"), "--points", "999,10", "--out", str(out))
    assert outside.returncode == 2 and "outside" in outside.stderr and "Traceback" not in outside.stderr
    (tmp_path / "notes.png").write_text("not an image")
    broken = run(checkpoint, "predict", str(tmp_path / "notes.png"), "--points", "1,1", "--out", str(out))
    assert broken.returncode == 2 and "notes.png" in broken.stderr and "Traceback" not in broken.stderr
    nothing = run(checkpoint, "predict", str(tmp_path / "c.png"))
    assert nothing.returncode == 2 and "--everything" in nothing.stderr


# ------------------------------------------------------------------------------------------- auto-annotate


def test_auto_annotate_writes_one_polygon_line_per_box(checkpoint: Path, predictor, tmp_path: Path) -> None:
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    boxes = {"one": [(0, 0.5, 0.5, 0.4, 0.5), (3, 0.25, 0.3, 0.3, 0.3)], "two": [(7, 0.6, 0.6, 0.5, 0.6)],
             "three": [(1, 0.5, 0.5, 0.2, 0.2), (2, 0.2, 0.2, 0.2, 0.2), (5, 0.8, 0.8, 0.3, 0.3)]}
    pixels = {}
    for seed, (name, rows) in enumerate(boxes.items()):
        pixels[name] = write_scene(images / f"{name}.png", 10 + seed, size=(320, 240) if seed % 2 else (256, 256))
        (labels / f"{name}.txt").write_text("".join(" ".join(str(v) for v in row) + "\n" for row in rows))
    write_scene(images / "unlabelled.jpg", 20)
    (labels / "bad.txt").write_text("0 0.5 0.5 0.2\n1 1.5 0.5 0.2 0.2\n4 0.5 0.5 0.2 0.2\n")
    write_scene(images / "bad.png", 21)

    result = run(checkpoint, "auto-annotate", str(images), "--boxes", str(labels), "--quiet")
    assert result.returncode == 1, result.stdout + result.stderr  # the bad label lines are failures
    out = tmp_path / "images_auto_annotate_labels"
    assert "skipped 1 image(s) without a label file: unlabelled.jpg" in result.stdout
    assert "bad.txt:1: not 'class cx cy w h'" in result.stdout and "bad.txt:2: cx cy w h must be" in result.stdout
    assert len((out / "bad.txt").read_text().splitlines()) == 1, "the good line of a file with bad ones is kept"
    for name, rows in boxes.items():
        lines = (out / f"{name}.txt").read_text().splitlines()
        assert len(lines) == len(rows), lines
        height, width = pixels[name].shape[:2]
        pixel_boxes = np.array([[(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width,
                                 (cy + h / 2) * height] for _, cx, cy, w, h in rows], np.float32)
        masks = predictor.predict_boxes(predictor.embed(pixels[name]), pixel_boxes).masks
        for line, row, mask, box in zip(lines, rows, masks, pixel_boxes, strict=True):
            cls, *coords = line.split()
            assert int(cls) == row[0], "the class is kept"
            values = [float(v) for v in coords]
            assert len(values) >= 6 and len(values) % 2 == 0
            assert all(0.0 <= v <= 1.0 for v in values), line
            assert values == pytest.approx(yolo_polygon(mask, box)[0], abs=1e-6)
    assert "polygon line(s)" in result.stdout


def test_yolo_labels_and_polygons() -> None:
    boxes, problems = read_yolo_boxes_from("0 0.5 0.5 0.5 0.5\n\n2 0.1 0.1 0.4 0.4\nx 1 2 3 4\n9 0.5 0.5 0 0.1\n")
    assert [(c, b.tolist()) for c, b in boxes] == [(0, [25.0, 50.0, 75.0, 150.0]), (2, [0.0, 0.0, 30.0, 60.0])]
    assert len(problems) == 2
    mask = np.zeros((200, 100), bool)
    mask[50:150, 25:75] = True
    polygon, empty = yolo_polygon(mask, np.array([25, 50, 75, 150]))
    assert not empty and sorted(set(polygon[0::2])) == [0.25, 0.75] and sorted(set(polygon[1::2])) == [0.25, 0.75]
    polygon, empty = yolo_polygon(np.zeros((200, 100), bool), np.array([25, 50, 75, 150]))
    assert empty and polygon == [0.25, 0.25, 0.75, 0.25, 0.75, 0.75, 0.25, 0.75]


def read_yolo_boxes_from(text: str):
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "labels.txt"
        path.write_text(text)
        return read_yolo_boxes(path, (200, 100))


def test_detector_needs_the_optional_extra(checkpoint: Path, tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("ultralytics") is not None:
        pytest.skip("ultralytics is installed here")
    (tmp_path / "images").mkdir()
    result = run(checkpoint, "auto-annotate", str(tmp_path / "images"), "--detector", "yolo11x.pt")
    assert result.returncode == 2 and "pip install" in result.stderr and "Traceback" not in result.stderr


def test_auto_annotate_with_a_real_ultralytics_yolo_detector(checkpoint: Path, predictor, tmp_path: Path) -> None:
    """`--detector` with an Ultralytics YOLO (yolo11n built from its yaml, seeded random weights, saved as a .pt
    as a trained one is): a polygon line per detected box, in the detector's order, with its class, the mask
    Predictor gives for that box. At --conf 0.0001 random weights detect hundreds of boxes per image, so the
    boxes also go through the decoder in chunks."""
    import importlib.util

    if importlib.util.find_spec("ultralytics") is None:
        pytest.skip("ultralytics is not installed (an optional extra)")
    import torch
    from ultralytics import YOLO

    torch.manual_seed(0)
    weights = tmp_path / "yolo11n_random.pt"
    YOLO("yolo11n.yaml").save(str(weights))
    images = tmp_path / "images"
    images.mkdir()
    pixels = {f"scene{i}": write_scene(images / f"scene{i}.png", 30 + i) for i in range(2)}
    result = run(checkpoint, "auto-annotate", str(images), "--detector", str(weights), "--conf", "0.0001",
                 "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr
    detector = YOLO(str(weights))
    out = tmp_path / "images_auto_annotate_labels"
    total = 0
    for name, image in pixels.items():
        found = detector(image[:, :, ::-1].copy(), conf=0.0001, verbose=False)[0].boxes
        classes, boxes = found.cls.cpu().numpy().astype(int), found.xyxy.cpu().numpy().astype(np.float32)
        lines = (out / f"{name}.txt").read_text().splitlines()
        assert len(lines) == len(boxes) > 16, f"{name}: {len(lines)} lines for {len(boxes)} boxes"
        masks = predictor.predict_boxes(predictor.embed(image), boxes).masks
        for line, cls, mask, box in zip(lines, classes, masks, boxes, strict=True):
            label, *coords = line.split()
            assert int(label) == cls
            assert [float(v) for v in coords] == pytest.approx(yolo_polygon(mask, box)[0], abs=1e-6)
        total += len(lines)
    assert f"{total} polygon line(s)" in result.stdout
