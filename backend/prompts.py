"""Smart regions from Label Studio (``params.context.result``) -> one SAM prompt per object, in pixels.

Coordinates. Label Studio sends keypoints and rectangles in percent (0-100) of the image as the browser shows
it (EXIF orientation applied): ``x_px = x / 100 * W``, ``y_px = y / 100 * H``. W and H are the size of the
image we actually fetched (the caller passes them); ``original_width`` / ``original_height`` in the region
are only compared with it and a disagreement is logged, because percentages stay right whatever size the
browser saw, while pixel sizes from another rendition of the image would not.

Image rotation. ``image_rotation`` (0/90/180/270) is the rotation the annotator applied in the editor's
view (the rotate control of ``<Image rotateControl="true">``). Label Studio's frontend implements it as a
transform of the whole Konva stage (``Image.rotate`` changes ``rotation``, ``stageTranslate`` and the CSS
transform of the picture) and keeps every region in the stage's own, unrotated frame: ``convertXToPerc``
divides by ``stageWidth``, which is always ``naturalWidth * zoom``. So a region's percentages refer to the
unrotated image for every ``image_rotation`` and the mapping to pixels is the same for all four values; the
mask we return is likewise in the unrotated frame (the brush decoder fills a naturalWidth x naturalHeight
buffer). Values that are not a multiple of 90 are rejected.

Rectangles. ``x``, ``y`` are the top-left corner, ``width`` / ``height`` the size, ``rotation`` degrees
clockwise on screen around the top-left corner (Konva's convention, y pointing down). SAM takes axis-aligned
boxes, so a rotated rectangle becomes the axis-aligned bounding box of its four corners, clipped to the image.

Grouping. All smart regions with the same label form one object (its points and its box), objects come in
the order their label first appears. Several rectangles of one label: the last one in the list (the last
drawn) is the box, as one SAM prompt holds one box.

SAM's ambiguity rule (``asks_three_masks``, the one place it is written): one point and no box is ambiguous
(part, object or whole?), so it asks for three candidate masks and the segmenter keeps the one with the best
predicted IoU; anything more is specific enough for one mask, as in Meta's predictor guidance.

Image bounds (``_point``, ``_box``, the one place they are checked: the segmenter takes these prompts as they
are). A click up to ``POINT_TOLERANCE_PX`` outside the image is clamped onto its edge, so that a click on the
very edge pixel works even when percentages and rounding put it a fraction of a pixel beyond; further out is a
400. A rectangle is clipped to the image; one with nothing left inside, or less than a pixel wide or high, is a
400.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from backend.errors import BadRequest, LabelConfigError

log = logging.getLogger(__name__)

POINT_TOLERANCE_PX = 1.0  # clicks this far outside the image are clamped onto its edge, not refused
KEYPOINT = "keypointlabels"
RECTANGLE = "rectanglelabels"


def asks_three_masks(n_points: int, has_box: bool) -> bool:
    """SAM's ambiguity rule: a lone click (one point, no box) asks for three candidate masks, of which the best by
    predicted IoU is kept; several points, or a box, define the object well enough for one mask."""
    return n_points == 1 and not has_box


@dataclass(frozen=True, eq=False)
class ObjectPrompt:
    """The prompt for one object, in pixels of the original image (what ``Predictor.predict`` takes).

    Made by ``parse_prompts``, which has checked it against the image: at least one point or a box, points on
    the image, a box inside it.
    """

    label: str
    points: np.ndarray  # (N, 2) float32 x, y; N may be 0
    point_labels: np.ndarray  # (N,) int32, 1 = positive, 0 = negative
    box: np.ndarray | None  # (4,) float32 x0, y0, x1, y1
    source_ids: tuple[str, ...]  # ids of the regions this object was built from
    from_name: str = ""  # the smart tool's name of the first region (for logs and metrics)

    def __post_init__(self) -> None:
        if len(self.points) == 0 and self.box is None:
            raise ValueError("an object prompt needs at least one point or a box")

    @property
    def multimask(self) -> bool:
        """Whether SAM is asked for three candidates (``asks_three_masks``)."""
        return asks_three_masks(len(self.points), self.box is not None)

    @property
    def point_coords(self) -> np.ndarray | None:
        """``points`` or None when there are none (the predictor's convention)."""
        return self.points if len(self.points) else None

    @property
    def point_coord_labels(self) -> np.ndarray | None:
        """``point_labels`` or None when there are no points (the predictor's convention)."""
        return self.point_labels if len(self.points) else None


def parse_prompts(regions: object, image_size: tuple[int, int]) -> list[ObjectPrompt]:
    """Turn ``context.result`` into prompts; ``image_size`` is the real (H, W) of the task image.

    Returns an empty list when there is nothing to prompt with (no context, or only unknown region types).
    Raises BadRequest naming the region and the field for malformed or impossible regions.
    """
    if regions is None:
        return []
    if not isinstance(regions, list):
        raise BadRequest(f"context.result must be a list of regions, got {type(regions).__name__}")
    height, width = int(image_size[0]), int(image_size[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"image_size must be a positive (H, W), got {image_size!r}")

    groups: dict[str, _Group] = {}
    size_logged = False
    for index, region in enumerate(regions):
        where = _describe(region, index)
        if not isinstance(region, dict):
            raise BadRequest(f"{where} is not an object")
        kind = region.get("type")
        if not isinstance(kind, str) or not kind:
            raise BadRequest(f"{where} has no 'type'")
        if kind not in (KEYPOINT, RECTANGLE):
            log.info("ignoring %s of type %r: only keypointlabels and rectanglelabels are prompts", where, kind)
            continue
        value = region.get("value")
        if not isinstance(value, dict):
            raise BadRequest(f"{where} has no 'value' object")
        _check_rotation(region, where)
        if not size_logged:
            size_logged = _log_size_mismatch(region, height, width)
        label = _label(value, kind, where)
        group = groups.setdefault(label, _Group(label, str(region.get("from_name", ""))))
        group.ids.append(str(region.get("id", f"#{index}")))
        if kind == KEYPOINT:
            group.points.append(_point(value, where, height, width))
            group.labels.append(_polarity(region, where))
        else:
            group.box = _box(value, where, height, width)
    return [group.prompt() for group in groups.values()]


def resolve_output_label(clicked_label: str, output_labels: Sequence[str],
                         label_map: Mapping[str, str] | None = None,
                         tool_labels: Sequence[str] = ()) -> str:
    """The BrushLabels / PolygonLabels label a mask gets for a smart-tool label. Rules, first match wins:

    1. the output tag has the clicked label itself;
    2. SAM_LABEL_MAP maps it (``"kp_label=brush_label;..."``; the target must exist in the output tag);
    3. exactly one output label equals it case-insensitively;
    4. the output tag has exactly one label;
    otherwise LabelConfigError listing both label sets, because guessing would put masks under the wrong
    class silently (the "smart tool does nothing" complaint).
    """
    outputs = list(output_labels)
    if clicked_label in outputs:
        return clicked_label
    if label_map and clicked_label in label_map:
        target = label_map[clicked_label]
        if target in outputs:
            return target
        raise LabelConfigError(f"SAM_LABEL_MAP maps {clicked_label!r} to {target!r}, but the output tag has no "
                               f"label {target!r}; its labels are {outputs}.")
    folded = [label for label in outputs if label.casefold() == clicked_label.casefold()]
    if len(folded) == 1:
        return folded[0]
    if len(outputs) == 1:
        return outputs[0]
    tools = list(tool_labels) or [clicked_label]
    raise LabelConfigError(
        f"The smart tool label {clicked_label!r} has no matching label in the BrushLabels/PolygonLabels tag. "
        f"Smart tool labels: {tools}; output labels: {outputs}. Give both tags the same <Label value=...>, "
        f"or set SAM_LABEL_MAP, e.g. SAM_LABEL_MAP=\"{clicked_label}={outputs[0] if outputs else 'Object'}\"."
    )


class _Group:
    """The regions of one label while they are collected."""

    def __init__(self, label: str, from_name: str) -> None:
        self.label = label
        self.from_name = from_name
        self.points: list[tuple[float, float]] = []
        self.labels: list[int] = []
        self.box: np.ndarray | None = None
        self.ids: list[str] = []

    def prompt(self) -> ObjectPrompt:
        points = np.asarray(self.points, dtype=np.float32).reshape(-1, 2)
        return ObjectPrompt(
            label=self.label,
            points=points,
            point_labels=np.asarray(self.labels, dtype=np.int32),
            box=self.box,
            source_ids=tuple(self.ids),
            from_name=self.from_name,
        )


def _describe(region: object, index: int) -> str:
    if isinstance(region, dict) and region.get("id") is not None:
        return f"region {index} (id {region['id']!r})"
    return f"region {index}"


def _number(value: Mapping[str, object], key: str, where: str, default: float | None = None) -> float:
    raw = value.get(key, default)
    if raw is None:
        raise BadRequest(f"{where} has no value.{key}")
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
        raise BadRequest(f"{where}: value.{key} must be a finite number, got {raw!r}")
    return float(raw)


def _label(value: Mapping[str, object], kind: str, where: str) -> str:
    labels = value.get(kind) or value.get("labels")
    if not isinstance(labels, list) or not labels or not isinstance(labels[0], str) or not labels[0]:
        raise BadRequest(f"{where} has no label: expected value.{kind} = [\"<label>\"]")
    return labels[0]


def _polarity(region: Mapping[str, object], where: str) -> int:
    """1 for a positive click, 0 for an Alt-click. A missing flag is positive: a plain click is one."""
    flag = region.get("is_positive", True)
    if flag is None:
        return 1
    if not isinstance(flag, bool):
        raise BadRequest(f"{where}: is_positive must be true or false, got {flag!r}")
    return int(flag)


def _check_rotation(region: Mapping[str, object], where: str) -> None:
    rotation = region.get("image_rotation", 0)
    if rotation is None:
        return
    if isinstance(rotation, bool) or not isinstance(rotation, (int, float)) or not math.isfinite(rotation) \
            or rotation % 90 != 0:
        raise BadRequest(f"{where}: image_rotation must be 0, 90, 180 or 270, got {rotation!r}")


def _log_size_mismatch(region: Mapping[str, object], height: int, width: int) -> bool:
    """Log once per request when the browser's image size differs from the fetched image."""
    sent = (region.get("original_height"), region.get("original_width"))
    if sent[0] is None and sent[1] is None:
        return False
    if sent != (height, width):
        log.warning("region image size %sx%s (W x H) differs from the task image %dx%d; percentages are "
                    "applied to the task image", sent[1], sent[0], width, height)
        return True
    return False


def _point(value: Mapping[str, object], where: str, height: int, width: int) -> tuple[float, float]:
    x = _number(value, "x", where) / 100.0 * width
    y = _number(value, "y", where) / 100.0 * height
    tol = POINT_TOLERANCE_PX
    if not (-tol <= x <= width + tol and -tol <= y <= height + tol):
        raise BadRequest(f"{where}: the point ({x:.1f}, {y:.1f}) px lies outside the {width}x{height} image")
    return min(max(x, 0.0), float(width)), min(max(y, 0.0), float(height))


def _box(value: Mapping[str, object], where: str, height: int, width: int) -> np.ndarray:
    x0 = _number(value, "x", where) / 100.0 * width
    y0 = _number(value, "y", where) / 100.0 * height
    w = _number(value, "width", where) / 100.0 * width
    h = _number(value, "height", where) / 100.0 * height
    if w <= 0 or h <= 0:
        raise BadRequest(f"{where}: the rectangle has zero or negative size ({w:.1f} x {h:.1f} px)")
    angle = math.radians(_number(value, "rotation", where, default=0.0))
    cos, sin = math.cos(angle), math.sin(angle)
    corners = np.array([[0.0, 0.0], [w, 0.0], [w, h], [0.0, h]])
    xs = x0 + corners[:, 0] * cos - corners[:, 1] * sin
    ys = y0 + corners[:, 0] * sin + corners[:, 1] * cos
    # Round away float noise so that e.g. a 90 degree turn gives exact pixel edges.
    box = np.round(np.array([xs.min(), ys.min(), xs.max(), ys.max()]), 6)
    if not np.isfinite(box).all():  # finite percentages so large that pixels overflow (1e300 %)
        raise BadRequest(f"{where}: the rectangle's coordinates are far outside the {width}x{height} image")
    box = np.clip(box, 0.0, [width, height, width, height])
    if box[2] - box[0] <= 0 or box[3] - box[1] <= 0:
        raise BadRequest(f"{where}: the rectangle lies outside the {width}x{height} image")
    if box[2] - box[0] < 1 or box[3] - box[1] < 1:
        raise BadRequest(f"{where}: the rectangle ({box[0]:.1f}, {box[1]:.1f})-({box[2]:.1f}, {box[3]:.1f}) px "
                         "has no area inside the image (less than a pixel wide or high)")
    return box.astype(np.float32)
