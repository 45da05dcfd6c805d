"""Label Studio's newer interactive flow (the editor's ``ml-interactive``), next to the smart-tool protocol.

The newer editor (``web/libs/editor/src/ml-interactive/``, behind the feature flag
``fflag_feat_bros_951_ml_backend_short``; not in the editor Label Studio 1.23.2 ships, see
docs/label-studio-protocol.md) talks to the same ``/predict`` through the same Django proxy
(``POST /api/ml/<id>/interactive-annotating`` -> ``params.context``), but says different things:

- ``context.event == "capabilities"``: which prompts (``point``, ``box``) and target tags the backend drives;
  the answer's ``result[0].value`` is ``{"prompts": [...], "targets": [{"tag", "output"}], "model_info"}``;
- ``context.event == "prewarm"``: the annotator started; here it queues the task image's warm-up encode;
- ``context.event == "release"``: the annotator left the task; here it drops the task's refinement state;
- no event (or ``"predict"``): ``context.result`` holds either points (``keypointlabels`` regions whose
  ``value`` has ``x``, ``y`` in percent and ``positive``, no label, no ``from_name``) or one box
  (``rectanglelabels`` with ``x``, ``y``, ``width``, ``height`` in percent); the editor reads
  ``result[0].value.imageDataURL`` and takes PNG pixels with red > 127 as the object.

Which protocol a request speaks is decided by what it carries (``speaks_interactive_flow``): an ``event``, or
prompt regions with ``value.positive`` or without ``from_name``. The smart-tool requests of Label Studio 1.23.2
always carry ``from_name`` and ``is_positive`` on the region, never ``value.positive``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from backend import bitmask
from backend.errors import BadRequest
from backend.predictions import Predictions
from backend.prompts import KEYPOINT, RECTANGLE, ObjectPrompt, _box, _point
from backend.refinement import Refinements
from backend.results import Region, new_region_id, prediction

log = logging.getLogger(__name__)

EVENTS = ("capabilities", "prewarm", "release", "predict")
PROMPT_LABEL = ""  # the flow's prompts carry no label: the annotator picks it in the editor
PROMPT_SOURCE = "ml-interactive"  # from_name of its prompts, so refinement never mixes them with smart-tool clicks
TARGETS = ({"tag": "BitmaskLabels", "output": "mask"}, {"tag": "PolygonLabels", "output": "polygon"},
           {"tag": "RectangleLabels", "output": "bbox"})


def speaks_interactive_flow(context: Mapping[str, Any] | None) -> bool:
    """Whether a /predict context comes from the newer interactive flow rather than a smart tool."""
    if not context:
        return False
    if context.get("event") is not None:
        return True
    regions = context.get("result")
    if not isinstance(regions, list):
        return False
    for region in regions:
        if isinstance(region, dict) and region.get("type") in (KEYPOINT, RECTANGLE):
            value = region.get("value")
            if "from_name" not in region or (isinstance(value, dict) and "positive" in value):
                return True
    return False


class InteractiveFlow:
    """Answers the newer flow's events with this process's model, warm-up queue and refinement store."""

    def __init__(self, predictions: Predictions, warm_up: Callable[[list[dict[str, Any]]], int],
                 refinements: Refinements | None) -> None:
        self.predictions = predictions
        self.warm_up = warm_up
        self.refinements = refinements

    def answer(self, tasks: Sequence[dict[str, Any]], context: Mapping[str, Any]) -> list[Any]:
        """The ``results`` of /predict for one event: one entry, as the proxy hands ``results[0]`` on."""
        event = context.get("event") or "predict"
        if not isinstance(event, str) or event not in EVENTS:
            raise BadRequest(f"context.event {event!r} is not supported by this backend (it serves still images: "
                             f"{', '.join(EVENTS)}); video tracking events are not")
        task = tasks[0]
        if event == "capabilities":
            return [self._ack("capabilities", self.capabilities())]
        if event == "prewarm":
            queued = self.warm_up([task])
            log.info("task %s: prewarm, %d image(s) queued for warm-up", task.get("id"), queued)
            return [self._ack("prewarm_ack", {"status": "ok", "queued": queued})]
        if event == "release":
            dropped = self.refinements.release(task.get("id")) if self.refinements is not None else 0
            log.info("task %s: release, %d refinement entr%s dropped", task.get("id"), dropped,
                     "y" if dropped == 1 else "ies")
            return [self._ack("release_ack", {"status": "released"})]
        return [self.predict(task, context.get("result"))]

    def capabilities(self) -> dict[str, Any]:
        model = self.predictions.segmenter
        return {"prompts": ["point", "box"], "targets": [dict(target) for target in TARGETS],
                "model_info": {"name": "Segment Anything", "version": model.model_version}}

    def predict(self, task: dict[str, Any], regions: object) -> Any:
        """Points or a box -> one mask as a PNG data URL (white on transparent: red > 127 is the object).

        How many regions and points a click may carry is bounded once for both protocols, before either is
        chosen (``Predictions.check_limits``: ``SAM_MAX_CLICK_REGIONS``, ``SAM_MAX_CLICK_POINTS``).
        """
        predictions = self.predictions
        if regions is not None and not isinstance(regions, list):
            raise BadRequest("'params.context.result' must be a list of prompt regions")
        if not regions:
            return prediction([], predictions.version)  # the editor goes back to prompting
        image = predictions.images.fetch(task, predictions.config.image.value_key)
        prompt = parse_flow_prompt(regions, image.size)
        embedding = predictions.segmenter.embed(image.decode, image.sha256)
        mask = predictions.segment_click(embedding, image.sha256, prompt, task.get("id"))
        height, width = mask.mask.shape
        tag = predictions.config.output_tag(predictions.settings.sam_output)
        region: Region = {
            "id": new_region_id(),
            "type": "bitmask",
            "from_name": tag.name,
            "to_name": tag.to_name.split(",")[0].strip() or predictions.config.image.name,
            "original_width": int(width),
            "original_height": int(height),
            "image_rotation": 0,
            "value": {"imageDataURL": bitmask.encode(mask.mask, bitmask.FOREGROUND_WHITE),
                      "width": int(width), "height": int(height)},
            "score": float(mask.score),
        }
        log.info("task %s: interactive flow, %d point(s)%s", task.get("id"), len(prompt.points),
                 " and a box" if prompt.box is not None else "")
        return prediction([region], predictions.version)

    def _ack(self, kind: str, value: dict[str, Any]) -> Any:
        return prediction([{"id": new_region_id(), "type": kind, "value": value}], self.predictions.version)


def parse_flow_prompt(regions: Sequence[object], image_size: tuple[int, int]) -> ObjectPrompt:
    """The flow's regions -> one object's prompt in image pixels (the same bounds rules as smart clicks)."""
    height, width = int(image_size[0]), int(image_size[1])
    points: list[tuple[float, float]] = []
    labels: list[int] = []
    box: np.ndarray | None = None
    for index, region in enumerate(regions):
        where = f"region {index}"
        if not isinstance(region, dict) or not isinstance(region.get("value"), dict):
            raise BadRequest(f"{where} must be an object with a 'value' object")
        value = region["value"]
        kind = region.get("type")
        if kind == KEYPOINT:
            points.append(_point(value, where, height, width))
            labels.append(_positive(value, where))
        elif kind == RECTANGLE:
            if box is not None:
                raise BadRequest(f"{where}: a second box; the interactive flow prompts with one box")
            box = _box(value, where, height, width)
        else:
            raise BadRequest(f"{where} has type {kind!r}; expected keypointlabels (a point) or rectanglelabels (a box)")
    if not points and box is None:
        raise BadRequest("context.result has no point or box to segment")
    return ObjectPrompt(label=PROMPT_LABEL, points=np.asarray(points, np.float32).reshape(-1, 2),
                        point_labels=np.asarray(labels, np.int32), box=box,
                        source_ids=tuple(f"#{i}" for i in range(len(regions))), from_name=PROMPT_SOURCE)


def _positive(value: Mapping[str, object], where: str) -> int:
    flag = value.get("positive", True)
    if not isinstance(flag, bool):
        raise BadRequest(f"{where}: value.positive must be true or false, got {flag!r}")
    return int(flag)
