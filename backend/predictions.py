"""The prediction use case: a project's label config + tasks + the editor's context -> Label Studio predictions.

This is what ``/predict`` means, apart from HTTP (``backend.app`` parses and checks the JSON, then calls
``Predictions.predict``). Two kinds of call reach it:

- interactive: an annotator used a smart tool, so the context holds its keypoints / rectangles for one task;
  every object (one per label, ``backend.prompts``) becomes a mask under an output label;
- batch ("Retrieve predictions", or a task being opened): no context, one prediction per task, made as
  SAM_BATCH_MODE says: ``boxes`` (a mask per rectangle the task already has), ``everything`` (SAM's automatic
  mask generator) or ``off`` (empty predictions).

Output labels. A mask gets the label of the output tag (BrushLabels / PolygonLabels) that matches the smart
label (``backend.prompts.resolve_output_label``). A click must use a label of its own smart tool: the
annotator picked it there, so anything else means the request and the label config disagree (422). A stored
rectangle (an annotation, or a detector's prediction) is taken with whatever label it carries.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from backend.config import Settings
from backend.errors import BackendError, BadRequest, LabelConfigError
from backend.label_config import ControlTag, LabelConfig
from backend.prompts import KEYPOINT, RECTANGLE, parse_prompts, resolve_output_label
from backend.results import Prediction, Region, mask_regions, prediction

if TYPE_CHECKING:
    from backend.image_decode import TaskImage
    from backend.image_fetch import ImageFetcher
    from backend.segmenter import Segmenter

log = logging.getLogger(__name__)

Task = dict[str, Any]  # a Label Studio task as JSON: "id", "data", "annotations", "predictions"


class Predictions:
    """Predictions for one project's label config, with this process's model and image access."""

    def __init__(self, config: LabelConfig, settings: Settings, segmenter: Segmenter, images: ImageFetcher) -> None:
        self.config = config
        self.settings = settings
        self.segmenter = segmenter
        self.images = images
        self.output = config.output_tag(settings.sam_output)

    def predict(self, tasks: Sequence[Task], regions: object) -> list[Prediction]:
        """The ``results`` of /predict: one prediction for the smart regions of the first task when there are
        any (an interactive click), else one per task (a batch)."""
        if regions:
            return [self.interactive(tasks[0], regions)]
        return self.batch(tasks)

    @property
    def version(self) -> str:
        """Read when a prediction is made: the first /predict may be the one that loaded the model."""
        return self.segmenter.model_version

    # ----------------------------------------------------------------------------------------------------
    # interactive
    def interactive(self, task: Task, regions: object) -> Prediction:
        """The smart regions of one task -> one prediction with a mask per object."""
        if not isinstance(regions, list):
            raise BadRequest("'params.context.result' must be a list of regions")
        tools: dict[str, ControlTag] = {}
        for region in regions:
            if isinstance(region, dict) and region.get("type") in (KEYPOINT, RECTANGLE):
                tool = self._tool_for(region)
                tools.setdefault(tool.name, tool)
        image = self._image(task)
        prompts = parse_prompts(regions, image.size)
        if not prompts:
            raise BadRequest("the context has no keypoint or rectangle regions to segment")
        labels = [self._clicked_label(p.label, tools.get(p.from_name)) for p in prompts]
        embedding = self.segmenter.embed(image.decode, image.sha256)
        result: list[Region] = []
        for prompt, label in zip(prompts, labels, strict=True):
            mask = self.segmenter.segment(embedding, prompt)
            result.extend(self._regions(mask.mask, label, mask.score))
        log.info("task %s: %d object(s) from %d region(s)", task.get("id"), len(prompts), len(regions))
        return prediction(result, self.version)

    def _tool_for(self, region: dict[str, Any]) -> ControlTag:
        """The smart tool a context region came from; a region of another tag is a config mismatch."""
        name = region.get("from_name")
        tool = self.config.smart_tool(name) if isinstance(name, str) else None
        if tool is None:
            smart = [t.name for t in self.config.smart_tools] or ["none"]
            raise LabelConfigError(f"the region comes from tag {name!r}, which is not a smart KeyPointLabels or "
                                   f"RectangleLabels of this label config (smart tags: {', '.join(smart)}); "
                                   "add smart=\"true\" to the tag")
        return tool

    def _clicked_label(self, clicked: str, tool: ControlTag | None) -> str:
        """The output label for a click: its label must be one of its smart tool's (see the module docstring)."""
        if tool is not None and tool.labels and clicked not in tool.labels:
            raise LabelConfigError(f"label {clicked!r} is not a label of the smart tag {tool.name!r} "
                                   f"(its labels: {list(tool.labels)})")
        return self._output_label(clicked, tool)

    def _output_label(self, label: str, tool: ControlTag | None) -> str:
        return resolve_output_label(label, self.output.labels, self.settings.label_map,
                                    tool.labels if tool is not None else ())

    # ----------------------------------------------------------------------------------------------------
    # batch
    def batch(self, tasks: Sequence[Task]) -> list[Prediction]:
        """Exactly one prediction per task, in order (Label Studio stores nothing on a count mismatch).

        A task whose image fails gets an empty prediction (logged) so the other tasks still get theirs;
        when every task fails, the first error is the answer, so a wrong token or URL is not silent.
        """
        mode = self.settings.sam_batch_mode
        if mode == "off":
            return [prediction([], self.version) for _ in tasks]
        results: list[Prediction] = []
        first_error: BackendError | None = None
        for task in tasks:
            try:
                results.append(self._boxes(task) if mode == "boxes" else self._everything(task))
            except BackendError as error:
                if error.status == 503:  # the model is not there: no task can succeed
                    raise
                first_error = first_error or error
                log.warning("task %s: no prediction: %s", task.get("id"), error.message)
                results.append(prediction([], self.version))
        if first_error is not None and all(not r["result"] for r in results):
            raise first_error
        return results

    def _boxes(self, task: Task) -> Prediction:
        """SAM_BATCH_MODE=boxes: each rectangle of the latest annotation (else of a prediction) -> a mask."""
        rectangles = task_rectangles(task)
        if not rectangles:
            return prediction([], self.version)
        image = self._image(task)
        labels: list[str] = []
        boxes: list[np.ndarray] = []
        for region in rectangles:
            prompt = parse_prompts([region], image.size)[0]
            assert prompt.box is not None  # a rectangle region always gives a box
            labels.append(self._output_label(prompt.label, self._rectangle_tag(region.get("from_name"))))
            boxes.append(prompt.box)
        embedding = self.segmenter.embed(image.decode, image.sha256)
        masks = self.segmenter.segment_boxes(embedding, np.asarray(boxes, dtype=np.float32))
        result: list[Region] = []
        for mask, label in zip(masks, labels, strict=True):
            result.extend(self._regions(mask.mask, label, mask.score))
        return prediction(result, self.version)

    def _rectangle_tag(self, name: object) -> ControlTag | None:
        return next((t for t in self.config.smart_tools if t.kind == "RectangleLabels" and t.name == name), None)

    def _everything(self, task: Task) -> Prediction:
        """SAM_BATCH_MODE=everything: every object SAM finds, labelled with the output tag's first label."""
        if not self.output.labels:
            raise LabelConfigError(f"the {self.output.kind} tag {self.output.name!r} has no labels")
        image = self._image(task)
        label = self.output.labels[0]
        result: list[Region] = []
        for mask in self.segmenter.segment_everything(image.array):
            result.extend(self._regions(mask.mask, label, mask.score))
        return prediction(result, self.version)

    # ----------------------------------------------------------------------------------------------------
    def _image(self, task: Task) -> TaskImage:
        return self.images.fetch(task, self.config.image.value_key)

    def _regions(self, mask: np.ndarray, label: str, score: float) -> list[Region]:
        return mask_regions(mask, label, score, self.config, self.settings.sam_output)


def task_rectangles(task: Task) -> list[Region]:
    """The rectanglelabels regions of the task's latest annotation, else of its latest prediction that has any.

    Annotations win because they are what a person drew or accepted; cancelled (skipped) ones are ignored.
    """
    def rects(item: dict[str, Any]) -> list[Region]:
        result = item.get("result")
        return [r for r in result or [] if isinstance(r, dict) and r.get("type") == RECTANGLE]

    def newest_first(items: object) -> list[dict[str, Any]]:
        if not isinstance(items, list):
            return []
        found = [i for i in items if isinstance(i, dict) and not i.get("was_cancelled")]
        return sorted(found, key=lambda i: (str(i.get("updated_at") or i.get("created_at") or ""),
                                            i.get("id") or 0), reverse=True)

    annotations = newest_first(task.get("annotations"))
    if annotations:
        found = rects(annotations[0])
        if found:
            return found
    for item in newest_first(task.get("predictions")):
        found = rects(item)
        if found:
            return found
    return []
