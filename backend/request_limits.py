"""What one request may cost: the limits, and the checks that refuse a request above them before any work.

Why limits at all: a click or a batch is a few kilobytes of JSON, but what it asks for is not. Each label of a
click is a decoder run and a full-size mask in the answer, each keypoint a token in the decoder's attention,
each rectangle of a batch task a full-size mask, each task of a batch a queued warm-up encode. Unbounded,
one small request could take gigabytes or minutes and stall every other annotator on the worker (observed:
1 000 labels in one click took 84 s and a 517 MB answer; 10 000 keypoints +2.6 GB).

Why these defaults: each is far above what a labelling team sends (Label Studio sends the smart regions of
one label per click, typically 1-20 keypoints and one rectangle; a crowded image has a few hundred boxes;
"Retrieve predictions" sends the selected tasks, and the batch budget finishes a few hundred per call on a
CPU anyway) and far below what hurts the server. docs/configuration.md gives each the same reasons.

Every check here counts list lengths and reads a few keys: it allocates nothing in proportion to what it
refuses, so a refused request costs what its JSON parse cost. ``LimitExceeded`` (413) names the setting to
raise, so an administrator with a real need can.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from backend.errors import LimitExceeded

KEYPOINT = "keypointlabels"  # the two prompt region types (backend.prompts, which imports the settings too)
RECTANGLE = "rectanglelabels"


@dataclass(frozen=True)
class RequestLimits:
    """The per-request limits; ``backend.config.Settings`` reads each from the variable ``VARIABLES`` names."""

    max_json_depth: int = 64  # nesting of a JSON body; Label Studio's deepest is about 8
    max_tasks: int = 10_000  # tasks in one /predict (or one TASKS_CREATED webhook)
    max_boxes_per_task: int = 1_000  # rectangles one batch task turns into masks
    max_click_regions: int = 1_000  # regions in params.context.result
    max_click_points: int = 500  # keypoints in one click (or one batch task in SAM_BATCH_MODE=points)
    max_click_objects: int = 32  # distinct labels (= objects = masks) in one click
    setup_projects: int = 256  # label configs kept from /setup (least recently used dropped)
    setup_memory_mb: int = 16  # and at most this many MiB of them

    VARIABLES: ClassVar[dict[str, str]] = {
        "max_json_depth": "SAM_MAX_JSON_DEPTH",
        "max_tasks": "SAM_MAX_TASKS",
        "max_boxes_per_task": "SAM_MAX_BOXES_PER_TASK",
        "max_click_regions": "SAM_MAX_CLICK_REGIONS",
        "max_click_points": "SAM_MAX_CLICK_POINTS",
        "max_click_objects": "SAM_MAX_CLICK_OBJECTS",
        "setup_projects": "SAM_SETUP_PROJECTS",
        "setup_memory_mb": "SAM_SETUP_MEMORY_MB",
    }

    def check_tasks(self, tasks: Sequence[object]) -> None:
        """A /predict's or a webhook's task list."""
        _at_most(len(tasks), self.max_tasks, "tasks in one request", "max_tasks",
                 hint="select fewer tasks, or pre-annotate the project with `sam-backend preannotate --project N`")

    def check_boxes(self, count: int, where: str) -> None:
        """The rectangles one task turns into masks."""
        _at_most(count, self.max_boxes_per_task, f"rectangles in {where}", "max_boxes_per_task")

    def check_prompts(self, regions: object, where: str = "params.context.result") -> None:
        """The smart regions of a click (or a task's keypoints in a batch): regions, keypoints, objects.

        Malformed regions are left to ``backend.prompts``, which names what is wrong with them; only their
        number is looked at here.
        """
        if not isinstance(regions, list):
            return
        _at_most(len(regions), self.max_click_regions, f"regions in {where}", "max_click_regions")
        points = 0
        labels: set[str] = set()
        for region in regions:
            if not isinstance(region, dict):
                continue
            kind = region.get("type")
            if kind not in (KEYPOINT, RECTANGLE):
                continue
            points += kind == KEYPOINT
            label = _first_label(region.get("value"), kind)
            if label is not None:
                labels.add(label)
        _at_most(len(labels), self.max_click_objects, f"labels (one object each) in {where}", "max_click_objects",
                 hint="send the objects in separate requests")
        _at_most(points, self.max_click_points, f"keypoints in {where}", "max_click_points")


def _first_label(value: Any, kind: str) -> str | None:
    """The label ``backend.prompts`` groups a region by (the first of value.<type>, else value.labels)."""
    if not isinstance(value, dict):
        return None
    labels = value.get(kind) or value.get("labels")
    if isinstance(labels, list) and labels and isinstance(labels[0], str):
        return labels[0]
    return None


def _at_most(count: int, limit: int, what: str, field: str, hint: str = "") -> None:
    if count > limit:
        variable = RequestLimits.VARIABLES[field]
        raise LimitExceeded(f"{count} {what}: this backend takes at most {limit} ({variable})"
                            + (f"; {hint}" if hint else ""))
