"""SAM on image files outside Label Studio: ``sam-backend predict`` and ``sam-backend auto-annotate``.

``predict`` takes prompts as Ultralytics' ``SAM(...)(image, points=..., labels=..., bboxes=...)`` does, so a
command line from its docs reads the same here:

- points ``(N, 2)``: N objects of one point each; ``(N, k, 2)``: N objects of k points each. On the command
  line each ``--points`` value is one object, its points joined by ``;`` (``--points 10,20 30,40`` is two
  objects, ``--points "10,20;30,40"`` one object of two points);
- labels: 1 (foreground) or 0 (background) for each point, written like the points (``--labels 1 0``,
  ``--labels "1;0"``); all 1 when left out;
- boxes ``(N, 4)`` xyxy in pixels: N objects; with points too, box i and points i are one object.

A lone click asks SAM for three candidates and keeps the best by predicted IoU (SAM's ambiguity rule,
``backend.prompts.asks_three_masks``); anything more specific gives one mask. ``--everything`` runs the
automatic mask generator instead. Each image gets a PNG per mask, an overlay PNG to look at and a JSON with
the scores, boxes and prompts.

``auto-annotate`` turns YOLO detection labels (``class cx cy w h``, normalised) into YOLO segmentation labels
(``class x1 y1 x2 y2 ...``, normalised polygon), the files Ultralytics' ``auto_annotate`` writes: one line per
box, the class kept, 16 boxes per decoder call. With ``--detector`` the boxes come from an
Ultralytics YOLO model instead (the optional ``ultralytics`` extra, imported only then).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from backend.errors import BackendError
from backend.image_decode import decode_image
from backend.prompts import asks_three_masks

if TYPE_CHECKING:
    from backend.segmenter import Segmenter
    from model import Embedding

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
PALETTE = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
                    (220, 190, 255)], dtype=np.float32)


class InputError(ValueError):
    """A prompt, a file or an option the command cannot use; the message says which and why (exit 2)."""


@dataclass(frozen=True)
class ObjectPrompt:
    """One object: points (k, 2) with labels (k,), and/or a box (4,), in image pixels."""

    points: np.ndarray | None
    labels: np.ndarray | None
    box: np.ndarray | None

    @property
    def multimask(self) -> bool:
        return asks_three_masks(0 if self.points is None else len(self.points), self.box is not None)

    def to_json(self) -> dict[str, Any]:
        return {"points": None if self.points is None else self.points.tolist(),
                "labels": None if self.labels is None else self.labels.astype(int).tolist(),
                "box": None if self.box is None else self.box.tolist()}


def _numbers(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise InputError(f"{what} {text!r}: expected numbers") from None
    if not all(math.isfinite(v) for v in values):
        raise InputError(f"{what} {text!r}: expected finite numbers")
    return values


def parse_objects(points: Sequence[str] = (), labels: Sequence[str] = (),
                  boxes: Sequence[Sequence[float]] = ()) -> list[ObjectPrompt]:
    """Command-line prompts -> one ``ObjectPrompt`` per object (see the module docstring)."""
    point_groups: list[np.ndarray] = []
    for text in points:
        group = []
        for part in text.split(";"):
            xy = _numbers(part, "--points value")
            if len(xy) != 2:
                raise InputError(f"--points value {part!r}: a point is x,y")
            group.append(xy)
        point_groups.append(np.asarray(group, dtype=np.float32))
    label_groups: list[np.ndarray] = []
    for text in labels:
        values = [_numbers(part, "--labels value") for part in text.split(";")]
        flat = [v for part in values for v in part]
        if any(v not in (0.0, 1.0) for v in flat):
            raise InputError(f"--labels value {text!r}: labels are 1 (foreground) or 0 (background)")
        label_groups.append(np.asarray(flat, dtype=np.int32))
    if label_groups:
        if not point_groups:
            raise InputError("--labels needs --points")
        if len(label_groups) == 1 and len(point_groups) > 1 and len(label_groups[0]) == len(point_groups):
            label_groups = [label_groups[0][i:i + 1] for i in range(len(point_groups))]  # (N,) labels of (N,2)
        if [len(g) for g in label_groups] != [len(g) for g in point_groups]:
            raise InputError(f"--labels must give one label per point: {len(point_groups)} object(s) of "
                             f"{[len(g) for g in point_groups]} point(s), labels {[g.tolist() for g in label_groups]}")
    else:
        label_groups = [np.ones(len(g), dtype=np.int32) for g in point_groups]
    box_list = []
    for box in boxes:
        corners = np.asarray(box, dtype=np.float32)
        if corners.shape != (4,) or not np.isfinite(corners).all():
            raise InputError(f"--box {list(box)}: a box is x0 y0 x1 y1")
        if corners[2] <= corners[0] or corners[3] <= corners[1]:
            raise InputError(f"--box {corners.tolist()}: x1 must be > x0 and y1 > y0")
        box_list.append(corners)
    if point_groups and box_list and len(point_groups) != len(box_list):
        raise InputError(f"{len(box_list)} box(es) and {len(point_groups)} point object(s): with both, box i and "
                         "points i are one object, so give as many of each")
    count = max(len(point_groups), len(box_list))
    return [ObjectPrompt(point_groups[i] if point_groups else None, label_groups[i] if point_groups else None,
                         box_list[i] if box_list else None) for i in range(count)]


def _check_in_image(prompt: ObjectPrompt, size: tuple[int, int], name: str) -> None:
    height, width = size
    if prompt.points is not None:
        outside = (prompt.points[:, 0] < 0) | (prompt.points[:, 0] > width) | (prompt.points[:, 1] < 0) \
            | (prompt.points[:, 1] > height)
        if outside.any():
            raise InputError(f"{name} is {width}x{height}: point {prompt.points[outside][0].tolist()} is outside it")
    if prompt.box is not None:
        x0, y0, x1, y1 = prompt.box
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            raise InputError(f"{name} is {width}x{height}: box {prompt.box.tolist()} is outside it")


def read_image(path: Path) -> np.ndarray:
    """HxWx3 RGB as a viewer shows it (EXIF orientation applied); InputError for anything unreadable."""
    try:
        return decode_image(path.read_bytes(), str(path))
    except OSError as error:
        raise InputError(f"{path}: {error.strerror or error}") from None
    except BackendError as error:
        raise InputError(error.message) from None


def overlay(image: np.ndarray, masks: Sequence[np.ndarray]) -> np.ndarray:
    """The image with each mask tinted in its own colour and outlined."""
    out = image.astype(np.float32)
    for index, mask in enumerate(masks):
        colour = PALETTE[index % len(PALETTE)]
        out[mask] = 0.45 * out[mask] + 0.55 * colour
        edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
        out[edge] = colour
    return out.clip(0, 255).astype(np.uint8)


def mask_box(mask: np.ndarray) -> list[int] | None:
    """[x0, y0, x1, y1] in pixels, inclusive-exclusive; None for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return None
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


@dataclass
class PredictResult:
    image: Path
    json_path: Path
    masks: int


def predict_images(segmenter: Segmenter, images: Sequence[Path], prompts: Sequence[ObjectPrompt], out: Path, *,
                   everything: bool = False, everything_options: dict[str, Any] | None = None,
                   progress: bool = True) -> list[PredictResult]:
    """Masks for each image (the same prompts on each), written under ``out``; InputError for bad input."""
    if not prompts and not everything:
        raise InputError("give prompts (--points, --box) or --everything")
    if prompts and everything:
        raise InputError("--everything takes no prompts: give one or the other")
    out.mkdir(parents=True, exist_ok=True)
    results = []
    bar = tqdm(images, desc="predicting", unit="image", disable=not progress)
    for path, pixels, embedding in _read_and_embed(segmenter, images, prompts, encode=not everything):
        size = (int(pixels.shape[0]), int(pixels.shape[1]))
        records: list[dict[str, Any]] = []
        masks: list[np.ndarray] = []
        if everything:
            for found in segmenter.segment_everything(pixels, **(everything_options or {})):
                masks.append(found.mask)
                records.append({"score": found.score})
        else:
            predictor = segmenter.predictor()
            assert embedding is not None
            for prompt in prompts:
                prediction = predictor.predict(embedding, points=prompt.points, labels=prompt.labels,
                                               box=prompt.box, multimask=prompt.multimask, best_only=True)
                masks.append(prediction.masks[0])
                records.append({"score": float(prediction.scores[0]), "prompt": prompt.to_json()})
        stem = path.stem
        for index, (mask, record) in enumerate(zip(masks, records, strict=True)):
            name = f"{stem}_mask_{index}.png"
            Image.fromarray(mask.astype(np.uint8) * 255).save(out / name)
            record.update({"file": name, "box": mask_box(mask), "area": int(mask.sum())})
        Image.fromarray(overlay(pixels, masks)).save(out / f"{stem}_overlay.png")
        json_path = out / f"{stem}.json"
        json_path.write_text(json.dumps({"image": str(path), "width": size[1], "height": size[0],
                                         "model_version": segmenter.model_version,
                                         "mode": "everything" if everything else "prompts",
                                         "overlay": f"{stem}_overlay.png", "masks": records}, indent=2))
        results.append(PredictResult(path, json_path, len(masks)))
        bar.update(1)
    bar.close()
    return results


def _read_and_embed(segmenter: Segmenter, images: Sequence[Path], prompts: Sequence[ObjectPrompt], *,
                    encode: bool) -> Iterator[tuple[Path, np.ndarray, Embedding | None]]:
    """Each image, its prompts checked against it, and (``encode``) its embedding: ``Segmenter.encode_batch``
    images per encoder run (SAM_ENCODE_BATCH: 4 on a GPU, 1 on a CPU)."""
    size = segmenter.encode_batch if encode else 1
    for start in range(0, len(images), size):
        group = [(path, read_image(path)) for path in images[start:start + size]]
        for path, pixels in group:
            for prompt in prompts:
                _check_in_image(prompt, (int(pixels.shape[0]), int(pixels.shape[1])), str(path))
        if not encode:
            yield from ((path, pixels, None) for path, pixels in group)
            continue
        predictor = segmenter.predictor()
        embeddings = predictor.embed_batch([pixels for _, pixels in group])
        yield from ((path, pixels, embedding) for (path, pixels), embedding in zip(group, embeddings, strict=True))


# ----------------------------------------------------------------------------------------------------------
# auto-annotate: YOLO boxes -> YOLO-seg polygons

Detection = tuple[int, np.ndarray]  # (class id, xyxy pixels)
Detector = Callable[[np.ndarray], list[Detection]]


@dataclass
class AutoAnnotateSummary:
    images: int = 0
    boxes: int = 0
    lines: int = 0
    empty_masks: int = 0  # written as the box's outline
    no_labels: list[str] = field(default_factory=list)  # images without a label file (skipped)
    failures: list[str] = field(default_factory=list)  # "what: why"

    def lines_of(self, out: Path) -> list[str]:
        lines = [f"{self.images} image(s), {self.boxes} box(es) -> {self.lines} polygon line(s) in {out}"
                 f"{f' ({self.empty_masks} empty mask(s) written as their box)' if self.empty_masks else ''}"]
        if self.no_labels:
            lines.append(f"  skipped {len(self.no_labels)} image(s) without a label file: "
                         + ", ".join(self.no_labels[:10]) + (", ..." if len(self.no_labels) > 10 else ""))
        if self.failures:
            lines.append(f"  failed {len(self.failures)}:")
            lines.extend(f"    {failure}" for failure in self.failures[:20])
        return lines


def read_yolo_boxes(path: Path, size: tuple[int, int]) -> tuple[list[Detection], list[str]]:
    """The boxes of a YOLO detection label file in pixels, and a message per line that is not one."""
    height, width = size
    boxes: list[Detection] = []
    problems: list[str] = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            values = [float(v) for v in parts]
        except ValueError:
            values = []
        if len(values) != 5 or not all(math.isfinite(v) for v in values) or values[0] != int(values[0]) \
                or values[0] < 0:
            problems.append(f"{path}:{number}: not 'class cx cy w h' ({line.strip()[:60]!r})")
            continue
        cls, cx, cy, w, h = values
        if not (0 <= cx <= 1 and 0 <= cy <= 1 and 0 < w <= 1 and 0 < h <= 1):
            problems.append(f"{path}:{number}: cx cy w h must be normalised to [0, 1] ({line.strip()[:60]!r})")
            continue
        box = np.array([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height])
        box = np.clip(box, 0, [width, height, width, height]).astype(np.float32)
        if box[2] - box[0] < 1 or box[3] - box[1] < 1:
            problems.append(f"{path}:{number}: the box is less than a pixel wide or high")
            continue
        boxes.append((int(cls), box))
    return boxes, problems


def yolo_polygon(mask: np.ndarray, box: np.ndarray) -> tuple[list[float], bool]:
    """The largest part's outline as normalised x1 y1 x2 y2 ...; the box's corners for an empty mask."""
    from backend.polygons import mask_to_polygons

    height, width = mask.shape
    polygons = mask_to_polygons(mask)
    if polygons and len(polygons[0]) >= 3:
        return [round(min(max(v / 100.0, 0.0), 1.0), 6) for point in polygons[0] for v in point], False
    x0, y0, x1, y1 = (float(v) for v in box)
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    return [round(min(max(v, 0.0), 1.0), 6) for x, y in corners for v in (x / width, y / height)], True


def yolo_detector(weights: str, conf: float = 0.25) -> Detector:
    """Boxes from an Ultralytics YOLO model: the optional ``ultralytics`` extra, imported only here."""
    try:
        ultralytics = importlib.import_module("ultralytics")
    except ImportError:
        raise InputError("--detector needs Ultralytics: pip install 'sam-label-studio-backend[ultralytics]' "
                         "(or pip install ultralytics)") from None
    model = ultralytics.YOLO(weights)

    def detect(image: np.ndarray) -> list[Detection]:
        result = model(image[:, :, ::-1].copy(), conf=conf, verbose=False)[0]  # Ultralytics takes BGR arrays
        boxes = result.boxes
        return [(int(c), np.asarray(b, dtype=np.float32))
                for c, b in zip(boxes.cls.cpu().numpy(), boxes.xyxy.cpu().numpy(), strict=True)]

    return detect


def image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder of images")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def auto_annotate(segmenter: Segmenter, images_dir: Path, out: Path, *, labels_dir: Path | None = None,
                  detector: Detector | None = None, progress: bool = True) -> AutoAnnotateSummary:
    """YOLO boxes (label files, or a detector) -> SAM masks -> YOLO-seg label files in ``out``."""
    if (labels_dir is None) == (detector is None):
        raise InputError("give the boxes: --boxes LABELS_DIR (YOLO detection labels) or --detector WEIGHTS")
    if labels_dir is not None and not labels_dir.is_dir():
        raise InputError(f"{labels_dir} is not a folder of YOLO label files")
    images = image_files(images_dir)
    if not images:
        raise InputError(f"{images_dir} has no images ({', '.join(IMAGE_SUFFIXES)})")
    out.mkdir(parents=True, exist_ok=True)
    summary = AutoAnnotateSummary()
    for path in tqdm(images, desc="auto-annotating", unit="image", disable=not progress):
        try:
            pixels = read_image(path)
        except InputError as error:
            summary.failures.append(f"{path.name}: {error}")
            continue
        size = (int(pixels.shape[0]), int(pixels.shape[1]))
        if labels_dir is not None:
            label_file = labels_dir / f"{path.stem}.txt"
            if not label_file.is_file():
                summary.no_labels.append(path.name)
                continue
            detections, problems = read_yolo_boxes(label_file, size)
            summary.failures.extend(problems)
        else:
            assert detector is not None
            detections = detector(pixels)
        summary.images += 1
        summary.boxes += len(detections)
        lines = []
        if detections:
            embedding = segmenter.predictor().embed(pixels)
            # A detector at a low --conf gives hundreds of boxes: Segmenter.box_masks decodes them in chunks.
            masks = segmenter.box_masks(embedding, np.stack([box for _, box in detections]))
            for (cls, box), mask in zip(detections, masks, strict=True):
                polygon, empty = yolo_polygon(mask.mask, box)
                summary.empty_masks += empty
                lines.append(f"{cls} " + " ".join(f"{v:.6f}".rstrip("0").rstrip(".") if v else "0" for v in polygon))
        (out / f"{path.stem}.txt").write_text("".join(line + "\n" for line in lines))
        summary.lines += len(lines)
    return summary
