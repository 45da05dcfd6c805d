"""The prediction use case: a project's label config + tasks + the editor's context -> Label Studio predictions.

This is what ``/predict`` means, apart from HTTP (``backend.app`` parses and checks the JSON, then calls
``Predictions.predict``). Two kinds of call reach it:

- interactive: an annotator used a smart tool, so the context holds its keypoints / rectangles for one task;
  every object (one per label, ``backend.prompts``) becomes a mask under an output label;
- batch ("Retrieve predictions", or a task being opened): no context, one entry per task, made as
  SAM_BATCH_MODE says: ``boxes`` (a mask per rectangle the task already has), ``points`` (a mask per label of
  the latest annotation's keypoints), ``everything`` (SAM's automatic mask generator) or ``off`` (nothing),
  within a time budget (SAM_BATCH_BUDGET_S) that keeps the answer inside Label Studio's 100 s.

The per-task step (``Predictions.predict_task``) and the stream that fetches images ahead of the model
(``predict_tasks``) are shared with ``sam-backend preannotate`` (``backend.preannotate``), which runs the
same batch modes over a whole project and writes the predictions through Label Studio's API.

Output labels. A mask gets the label of the output tag (BrushLabels / PolygonLabels) that matches the smart
label (``backend.prompts.resolve_output_label``). A click must use a label of its own smart tool: the
annotator picked it there, so anything else means the request and the label config disagree (422). A stored
rectangle (an annotation, or a detector's prediction) is taken with whatever label it carries.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from backend.config import Settings
from backend.errors import BackendError, BadRequest, LabelConfigError
from backend.label_config import ControlTag, LabelConfig
from backend.prompts import KEYPOINT, RECTANGLE, ObjectPrompt, parse_prompts, resolve_output_label
from backend.results import Prediction, Region, mask_regions, prediction

if TYPE_CHECKING:
    from backend.image_decode import TaskImage
    from backend.image_fetch import ImageFetcher
    from backend.refinement import Refinements
    from backend.segmenter import Mask, Segmenter
    from model import Embedding

log = logging.getLogger(__name__)

Task = dict[str, Any]  # a Label Studio task as JSON: "id", "data", "annotations", "predictions"
PREFETCH = 4  # images downloaded ahead of the model in a batch


class Predictions:
    """Predictions for one project's label config, with this process's model and image access."""

    def __init__(self, config: LabelConfig, settings: Settings, segmenter: Segmenter, images: ImageFetcher,
                 refinements: Refinements | None = None) -> None:
        self.config = config
        self.settings = settings
        self.segmenter = segmenter
        self.images = images
        self.refinements = refinements  # None: every click predicted from its prompts alone (SAM_REFINE=false)
        self.output = config.output_tag(settings.sam_output)

    def predict(self, tasks: Sequence[Task], regions: object, deadline: float | None = None,
                project: object = None) -> list[Prediction | list[Prediction]]:
        """The ``results`` of /predict: one prediction for the smart regions of the first task when there are
        any (an interactive click), else one entry per task (a batch, answered by ``deadline``)."""
        if regions:
            return [self.interactive(tasks[0], regions)]
        return self.batch(tasks, deadline, project)

    def check_limits(self, tasks: Sequence[Task], regions: object) -> None:
        """Refuse (413) a request above a limit of ``Settings.request_limits`` before any image or warm-up.

        A click's regions are counted; a batch's tasks each by what their mode prompts with.
        """
        if regions:
            self.settings.request_limits.check_prompts(regions)
            return
        for index, task in enumerate(tasks):
            self.check_task(task, self.settings.sam_batch_mode, f"tasks[{index}]")

    def check_task(self, task: Task, mode: str, where: str = "the task") -> None:
        """Refuse (413) a task whose prompts in ``mode`` are above a limit of ``Settings.request_limits``."""
        limits = self.settings.request_limits
        if mode == "boxes":
            limits.check_boxes(len(task_rectangles(task)), where)
        elif mode == "points":
            limits.check_prompts(task_keypoints(task), f"the keypoints of {where}")

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
            mask = self.segment_click(embedding, image.sha256, prompt, task.get("id"))
            result.extend(self._regions(mask.mask, label, mask.score))
        log.info("task %s: %d object(s) from %d region(s)", task.get("id"), len(prompts), len(regions))
        return prediction(result, self.version)

    def segment_click(self, embedding: Embedding, image_sha256: str, prompt: ObjectPrompt, task_id: object) -> Mask:
        """One object of a click, refined from the earlier answer its prompt extends (``backend.refinement``)."""
        if self.refinements is None:
            return self.segmenter.segment(embedding, prompt)
        earlier = self.refinements.earlier(embedding.fingerprint, image_sha256, prompt)
        mask = self.segmenter.segment(embedding, prompt, mask_input=earlier)
        if mask.low_res_logits is not None:
            self.refinements.remember(embedding.fingerprint, image_sha256, prompt, mask.low_res_logits, task=task_id)
        return mask

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
    def batch(self, tasks: Sequence[Task], deadline: float | None = None,
              project: object = None) -> list[Prediction | list[Prediction]]:
        """Exactly one entry per task, in order (Label Studio stores nothing on a count mismatch).

        Tasks run one after the other in a worker thread, their images downloaded ahead (``predict_tasks``),
        until ``deadline`` (``time.monotonic()``; None: no limit). Label Studio gives the whole call 100 s and
        then stores nothing at all, so at the deadline the answer goes out with what is done: every task left
        gets ``[]``, an entry with no prediction in it, which Label Studio accepts and stores nothing for. A
        left task has no prediction of this model version, so "Retrieve predictions" again, or
        ``sam-backend preannotate``, picks it up; the log says how many were left and the command.
        SAM_BATCH_MODE=off answers ``[]`` for every task (warm-up only).

        A task with nothing to prompt with (no rectangles in ``boxes``, no keypoints in ``points``) gets
        ``[]`` too, and so does a task whose image or regions fail (logged): the other tasks still get theirs,
        and the failed one stays without a prediction, so a later run tries it again. When no task gave a
        mask and one failed, that first error is the answer, so a wrong token or URL is not silent.
        """
        options = BatchOptions(mode=self.settings.sam_batch_mode)
        if options.mode == "off":
            return [[] for _ in tasks]
        results: list[Prediction | list[Prediction] | None] = [None] * len(tasks)
        outcomes: queue.Queue[tuple[int, Prediction | list[Prediction] | BaseException]] = queue.Queue()
        stop = threading.Event()

        def work() -> None:
            try:
                stream = predict_tasks(self, tasks, options, self._image, stop=stop)
                for index, (task, outcome) in enumerate(stream):
                    # Nothing to prompt with (no rectangles, no keypoints): no prediction, so that a later
                    # batch, after a detector's boxes or an annotator's clicks arrived, still does the task.
                    # A prediction without regions is no prediction either: Label Studio would store
                    # {"result": []} as an empty model answer in the task's list (``stored_answer``).
                    outcomes.put((index, stored_answer(outcome) if self.needs_image(task, options) else []))
            except BaseException as error:  # noqa: BLE001 - handed to the request thread, which raises it
                outcomes.put((-1, error))

        thread = threading.Thread(target=work, name="batch-predict", daemon=True)
        thread.start()
        first_error: BackendError | None = None
        answered = 0
        while answered < len(tasks):
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                index, outcome = outcomes.get(timeout=left)
            except queue.Empty:
                break
            if isinstance(outcome, BaseException):
                # A failure of the model (503: it is not there) or of the code fails the whole batch.
                if index < 0 or not isinstance(outcome, BackendError) or outcome.status == 503:
                    stop.set()
                    raise outcome
                first_error = first_error or outcome
                log.warning("task %s: no prediction: %s", tasks[index].get("id"), outcome.message)
                outcome = []
            results[index] = outcome
            answered += 1
        stop.set()
        if answered < len(tasks):
            self._log_left(tasks, results, project)
        if first_error is not None and not any(isinstance(r, dict) and r["result"] for r in results):
            raise first_error
        return [r if r is not None else [] for r in results]

    def _log_left(self, tasks: Sequence[Task], results: Sequence[object], project: object) -> None:
        left = [task.get("id") for task, result in zip(tasks, results, strict=True) if result is None]
        project_id = project_id_of(project, tasks)
        command = f"sam-backend preannotate --project {project_id if project_id is not None else '<id>'}"
        shown = ", ".join(str(i) for i in left[:20]) + (", ..." if len(left) > 20 else "")
        log.warning("batch /predict: the time budget (SAM_BATCH_BUDGET_S=%g s) ran out with %d of %d tasks "
                    "left without a prediction (tasks %s); Label Studio stores nothing for them. Finish them "
                    "with `%s`, or run Retrieve predictions on them again.", self.settings.sam_batch_budget_s,
                    len(left), len(tasks), shown, command)

    def needs_image(self, task: Task, options: BatchOptions) -> bool:
        """Whether the task's prediction in this mode needs its image (a task with no prompts does not)."""
        if options.mode == "boxes":
            return bool(task_rectangles(task))
        if options.mode == "points":
            return bool(task_keypoints(task))
        return options.mode == "everything"

    def predict_task(self, task: Task, options: BatchOptions, image: TaskImage | None = None,
                     embedding: Embedding | None = None) -> Prediction:
        """One task's prediction in a batch mode: the per-task step of the batch /predict and of
        ``sam-backend preannotate``. ``image`` is the task's image when the caller fetched it already, and
        ``embedding`` its embedding when the caller encoded it with others (``predict_tasks``)."""
        if options.mode == "boxes":
            return self._boxes(task, image, embedding)
        if options.mode == "points":
            return self._points(task, image, embedding)
        if options.mode == "everything":
            return self._everything(task, options, image, embedding)
        return prediction([], self.version)

    def _embedding(self, image: TaskImage, embedding: Embedding | None) -> Embedding:
        return embedding if embedding is not None else self.segmenter.embed(image.decode, image.sha256)

    def _boxes(self, task: Task, image: TaskImage | None = None, embedding: Embedding | None = None) -> Prediction:
        """Each rectangle of the latest annotation (else of a prediction) -> a mask, 16 boxes per decoder call."""
        rectangles = task_rectangles(task)
        if not rectangles:
            return prediction([], self.version)
        self.check_task(task, "boxes", f"task {task.get('id')}")
        image = image or self._image(task)
        labels: list[str] = []
        boxes: list[np.ndarray] = []
        for region in rectangles:
            prompt = parse_prompts([region], image.size)[0]
            assert prompt.box is not None  # a rectangle region always gives a box
            labels.append(self._output_label(prompt.label, self._tag("RectangleLabels", region.get("from_name"))))
            boxes.append(prompt.box)
        embedding = self._embedding(image, embedding)
        result: list[Region] = []
        # Each mask becomes regions before the next chunk of boxes is decoded (Segmenter.box_masks).
        for mask, label in zip(self.segmenter.box_masks(embedding, np.stack(boxes)), labels, strict=True):
            result.extend(self._regions(mask.mask, label, mask.score))
        return prediction(result, self.version)

    def _points(self, task: Task, image: TaskImage | None = None, embedding: Embedding | None = None) -> Prediction:
        """The keypoints of the latest annotation, one object per label as in a click -> a mask each."""
        keypoints = task_keypoints(task)
        if not keypoints:
            return prediction([], self.version)
        self.check_task(task, "points", f"task {task.get('id')}")
        image = image or self._image(task)
        prompts = parse_prompts(keypoints, image.size)
        embedding = self._embedding(image, embedding)
        result: list[Region] = []
        for prompt in prompts:
            label = self._output_label(prompt.label, self._tag("KeyPointLabels", prompt.from_name))
            mask = self.segmenter.segment(embedding, prompt)
            result.extend(self._regions(mask.mask, label, mask.score))
        return prediction(result, self.version)

    def _tag(self, kind: str, name: object) -> ControlTag | None:
        return next((t for t in self.config.smart_tools if t.kind == kind and t.name == name), None)

    def everything_label(self, options: BatchOptions) -> str:
        """The label every "segment everything" mask gets: ``options.label``, else the output tag's first."""
        if not self.output.labels:
            raise LabelConfigError(f"the {self.output.kind} tag {self.output.name!r} has no labels")
        if options.label is None:
            return self.output.labels[0]
        if options.label not in self.output.labels:
            raise LabelConfigError(f"the label {options.label!r} is not a label of the {self.output.kind} tag "
                                   f"{self.output.name!r} (its labels: {list(self.output.labels)})")
        return options.label

    def _everything(self, task: Task, options: BatchOptions, image: TaskImage | None = None,
                    embedding: Embedding | None = None) -> Prediction:
        """Every object SAM finds (the automatic mask generator), filtered and capped by ``options``."""
        label = self.everything_label(options)
        image = image or self._image(task)
        embedding = self._embedding(image, embedding)
        masks = self.segmenter.segment_everything(image.array, embedding=embedding)
        kept = [m for m in masks if m.score >= options.min_score
                and (options.min_area <= 0 or int(m.mask.sum()) >= options.min_area)]
        kept.sort(key=lambda m: m.score, reverse=True)
        if options.max_masks is not None:
            kept = kept[:options.max_masks]
        result: list[Region] = []
        for mask in kept:
            result.extend(self._regions(mask.mask, label, mask.score))
        return prediction(result, self.version)

    # ----------------------------------------------------------------------------------------------------
    def _image(self, task: Task) -> TaskImage:
        return self.images.fetch(task, self.config.image.value_key)

    def _regions(self, mask: np.ndarray, label: str, score: float) -> list[Region]:
        return mask_regions(mask, label, score, self.config, self.settings.sam_output)


@dataclass(frozen=True)
class BatchOptions:
    """What a batch prediction does for each task (SAM_BATCH_MODE, or ``sam-backend preannotate``'s options).

    ``mode``: ``boxes`` (a mask per rectangle the task has), ``points`` (a mask per label of the latest
    annotation's keypoints), ``everything`` (SAM's automatic mask generator) or ``off`` (nothing).
    For ``everything``: keep masks whose predicted IoU is at least ``min_score`` and with at least
    ``min_area`` pixels, the best ``max_masks`` of them (None: all), labelled ``label`` (None: the output
    tag's first label).
    """

    mode: str = "boxes"
    min_score: float = 0.0
    min_area: int = 0
    max_masks: int | None = None
    label: str | None = None


def predict_tasks(predictions: Predictions, tasks: Iterable[Task], options: BatchOptions,
                  fetch: Callable[[Task], TaskImage], *, prefetch: int = PREFETCH,
                  stop: threading.Event | None = None) -> Iterator[tuple[Task, Prediction | BackendError]]:
    """Each task's prediction (or the ``BackendError`` that stopped it), in order, images fetched ahead.

    ``prefetch`` threads download (and, when the encoder will need them, decode) the images of the next
    tasks while this thread runs the model on the current one, so a slow image host and the CPU or GPU work
    at the same time. With an encode batch above 1 (``Segmenter.encode_batch``: SAM_ENCODE_BATCH, 4 on a
    GPU), the images of the next tasks are encoded together when the first of them is due
    (``Segmenter.embed_many``; cached ones are not encoded again) while the images of the batch after
    download. ``fetch`` gets a task's image (a job passes one bound to its Label Studio). Errors that are not
    ``BackendError`` (a bug, a model failure) are raised. ``stop`` ends the stream early; the task under way
    finishes first.
    """
    segmenter = predictions.segmenter
    cache = segmenter.cache
    fingerprint: str | None = None
    batch_size: int | None = None  # read when the first image is due: it waits for the model's device

    def load(task: Task) -> TaskImage:
        image = fetch(task)
        nonlocal fingerprint
        if fingerprint is None:
            fingerprint = segmenter.fingerprint
        if options.mode == "everything" or not cache.contains(fingerprint, image.sha256):
            image.array  # noqa: B018 - decoded here, in a download thread, while the model works on another task
        return image

    # (sequence number, task, its image download, or None when it needs no image)
    pending: collections.deque[tuple[int, Task, Future[TaskImage] | None]] = collections.deque()
    embeddings: dict[int, Embedding] = {}  # encoded together with an earlier task's image, by sequence number
    iterator = enumerate(tasks)
    with ThreadPoolExecutor(max_workers=max(1, prefetch), thread_name_prefix="image-prefetch") as pool:
        try:
            while True:
                ahead = prefetch if batch_size is None else max(prefetch, 2 * batch_size)
                while len(pending) <= ahead:
                    item = next(iterator, None)
                    if item is None:
                        break
                    seq, task = item
                    wanted = predictions.needs_image(task, options)
                    pending.append((seq, task, pool.submit(load, task) if wanted else None))
                if not pending or (stop is not None and stop.is_set()):
                    return
                seq, task, future = pending[0]
                if future is not None and seq not in embeddings:
                    if batch_size is None:
                        batch_size = segmenter.encode_batch
                        continue  # fill the look-ahead the batch size asks for first
                    if batch_size > 1:
                        embeddings.update(_encode_together(predictions, options, pending, batch_size))
                pending.popleft()
                try:
                    image = future.result() if future is not None else None
                    yield task, predictions.predict_task(task, options, image, embeddings.pop(seq, None))
                except BackendError as error:
                    yield task, error
        finally:
            for _, _, future in pending:
                if future is not None:
                    future.cancel()


def _encode_together(predictions: Predictions, options: BatchOptions,
                     pending: Iterable[tuple[int, Task, Future[TaskImage] | None]],
                     batch_size: int) -> dict[int, Embedding]:
    """The embeddings of the first ``batch_size`` pending tasks with an image, encoded together
    (``Segmenter.embed_many``), by sequence number. A task whose image or prompts fail is left out: it fails
    on its own turn with its own error. Should the batch fail, nothing is returned and each task encodes alone.
    """
    chosen: list[tuple[int, TaskImage]] = []
    for seq, task, future in pending:
        if len(chosen) >= batch_size:
            break
        if future is None:
            continue
        try:
            image = future.result()
            predictions.check_task(task, options.mode)
        except BackendError:
            continue
        chosen.append((seq, image))
    if len(chosen) < 2:
        return {}
    try:
        found = predictions.segmenter.embed_many([(image.decode, image.sha256) for _, image in chosen])
    except BackendError as error:
        log.warning("encoding %d images together failed (%s): each is encoded on its own", len(chosen),
                    error.message)
        return {}
    return {seq: embedding for (seq, _), embedding in zip(chosen, found, strict=True)}


def stored_answer(outcome: Prediction | BackendError) -> Prediction | list[Prediction] | BackendError:
    """A batch entry as Label Studio should store it: ``[]`` (nothing stored) for a prediction without regions.

    Label Studio 1.23.2 (``ml/models.py`` ``_get_predictions_from_ml_backend``) stores every dict entry that
    has a ``result`` key, an empty one included, and nothing for an entry that is an empty list.
    """
    if isinstance(outcome, dict) and not outcome["result"]:
        return []
    return outcome


def project_id_of(project: object, tasks: Sequence[Task] = ()) -> int | None:
    """The Label Studio project id of a /predict body's ``project`` ("<id>.<created-ts>"), else of its tasks."""
    text = str(project).split(".")[0] if project is not None else ""
    if text.isdigit():
        return int(text)
    ids = {t.get("project") for t in tasks if isinstance(t, dict)}
    only = ids.pop() if len(ids) == 1 else None
    return only if isinstance(only, int) and not isinstance(only, bool) else None


def task_rectangles(task: Task) -> list[Region]:
    """The rectanglelabels regions of the task's latest annotation, else of its latest prediction that has any.

    Annotations win because they are what a person drew or accepted; cancelled (skipped) ones are ignored.
    """
    annotations = _newest_first(task.get("annotations"))
    if annotations:
        found = _regions_of(annotations[0], RECTANGLE)
        if found:
            return found
    for item in _newest_first(task.get("predictions")):
        found = _regions_of(item, RECTANGLE)
        if found:
            return found
    return []


def task_keypoints(task: Task) -> list[Region]:
    """The keypointlabels regions of the task's latest annotation (cancelled ones ignored)."""
    annotations = _newest_first(task.get("annotations"))
    return _regions_of(annotations[0], KEYPOINT) if annotations else []


def _regions_of(item: dict[str, Any], kind: str) -> list[Region]:
    result = item.get("result")
    return [r for r in result if isinstance(r, dict) and r.get("type") == kind] if isinstance(result, list) else []


def _newest_first(items: object) -> list[dict[str, Any]]:
    if not isinstance(items, list):
        return []
    found = [i for i in items if isinstance(i, dict) and not i.get("was_cancelled")]
    return sorted(found, key=lambda i: (str(i.get("updated_at") or i.get("created_at") or ""),
                                        _sortable_id(i.get("id"))), reverse=True)


def _sortable_id(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
