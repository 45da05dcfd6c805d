"""The Label Studio ML-backend HTTP protocol on Flask (application factory).

``create_app`` builds an app around one ``Segmenter`` (the model of this process), one ``ImageFetcher``
and one ``Metrics`` registry; nothing is loaded at import. The model is loaded in the background: by
gunicorn's ``post_worker_init`` (``start_model_loading``), or by the first /predict if nobody started it.

Label Studio's timeouts shape the endpoints (docs/label-studio-protocol.md):
``/health`` gets 1 s and ``/setup`` 3 s, so both only read a few attributes and never wait for the
model; ``/predict`` gets 100 s, so it may wait (bounded) for a model that is still loading, then 503.

Errors are JSON, always: a ``BackendError`` becomes its status and readable message (Label Studio shows
it to the annotator) and one log line; anything unexpected becomes a 500 JSON whose log line carries the
traceback. Flask's own 404 / 405 / 413 pages are rendered as JSON too. The server keeps serving.
"""

from __future__ import annotations

import hmac
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from backend.config import Settings
from backend.errors import BackendError, BadRequest, LabelConfigError, Unauthorized
from backend.label_config import LabelConfig, parse_label_config
from backend.metrics import Metrics
from backend.prompts import RECTANGLE, parse_prompts, resolve_output_label
from backend.results import mask_regions, prediction
from backend.segmenter import Segmenter
from backend.warmup import Warmer, WarmupJob, make_encoder

log = logging.getLogger(__name__)

EXTENSION = "sam_backend"
MODEL_CLASS = "SegmentAnything"
TRAIN_MESSAGE = ("This backend serves Segment Anything as published and is not trained from annotations; "
                 "nothing was started. Interactive masks improve with more clicks, not with training.")

api = Blueprint("sam_backend", __name__)


@dataclass
class Backend:
    """What the routes of one app share: settings, the model, image access and metrics."""

    settings: Settings
    segmenter: Segmenter
    fetcher: Any  # backend.image_fetch.ImageFetcher
    metrics: Metrics
    warmer: Warmer | None = None  # None when SAM_WARMUP is off
    projects: dict[str, str] = field(default_factory=dict)  # project id -> label config seen in /setup
    label_studio: tuple[str | None, str | None] = (None, None)  # hostname + token from /setup, for warm-up jobs

    def warm_up(self, tasks: list[dict[str, Any]], label_config: LabelConfig, source: str) -> int:
        """Queue background encodes of the tasks' images; never raises, never waits for an encode."""
        if self.warmer is None:
            return 0
        url, token = self.label_studio
        jobs = [WarmupJob(task=task, value_key=label_config.image.value_key, label_studio_url=url,
                          label_studio_token=token) for task in tasks if isinstance(task, dict)]
        queued = self.warmer.submit(jobs)
        if queued:
            self.metrics.warmup_jobs.labels(source=source).inc(queued)
        return queued


def create_app(settings: Settings | None = None, segmenter: Segmenter | None = None) -> Flask:
    """The Flask app. ``settings`` default to the environment; ``segmenter`` to one built from settings."""
    from backend.image_fetch import ImageFetcher

    settings = settings if settings is not None else Settings.from_env()
    metrics = segmenter.metrics if segmenter is not None else Metrics()
    segmenter = segmenter if segmenter is not None else Segmenter.from_settings(settings, metrics)
    fetcher = ImageFetcher.from_settings(settings)
    warmer = None
    if settings.sam_warmup:
        warmer = Warmer(redis_url=settings.redis_url or None, encoder=make_encoder(segmenter, fetcher),
                        on_depth=metrics.warmup_queue_depth.set)
    backend = Backend(settings=settings, segmenter=segmenter, fetcher=fetcher, metrics=metrics, warmer=warmer)

    app = Flask(__name__)
    app.json.sort_keys = False
    app.extensions[EXTENSION] = backend
    app.register_blueprint(api)
    app.before_request(_start_request)
    app.before_request(_check_basic_auth)
    app.after_request(_count_request)
    app.register_error_handler(BackendError, _backend_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    return app


def start_model_loading(app: Flask, slot: int = 0) -> None:
    """Start loading the app's model in the background (gunicorn's post_worker_init calls this).

    With several GPUs and SAM_DEVICE auto or cuda, worker ``slot`` gets GPU ``slot % count``: one worker
    per GPU, as gunicorn.conf.py recommends.
    """
    backend: Backend = app.extensions[EXTENSION]
    device = backend.segmenter.device
    if device in (None, "cuda"):
        import torch

        count = torch.cuda.device_count()
        if count > 1:
            device = f"cuda:{slot % count}"
    backend.segmenter.start_loading(device)
    if backend.warmer is not None:
        backend.warmer.start()  # this process consumes the shared warm-up queue with its model


def _backend() -> Backend:
    return current_app.extensions[EXTENSION]


# ------------------------------------------------------------------------------------------------------------
# request plumbing: timing, auth, errors
def _start_request() -> None:
    g.sam_started = time.perf_counter()


def _check_basic_auth() -> None:
    expected = _backend().settings.basic_auth
    if expected is None:
        return
    auth = request.authorization
    if auth is None or auth.type != "basic":
        raise Unauthorized("this backend requires Basic auth: set the user and password of the ML backend "
                           "connection in Label Studio to BASIC_AUTH_USER / BASIC_AUTH_PASS")
    user_ok = hmac.compare_digest((auth.username or "").encode(), expected[0].encode())
    pass_ok = hmac.compare_digest((auth.password or "").encode(), expected[1].encode())
    if not (user_ok and pass_ok):
        raise Unauthorized("wrong Basic auth user or password")


def _count_request(response: Response) -> Response:
    started = g.get("sam_started")
    if started is not None:
        endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
        _backend().metrics.observe_request(endpoint, response.status_code, time.perf_counter() - started)
    return response


def _error_response(status: int, body: dict[str, Any]) -> Response:
    response = jsonify(body)
    response.status_code = status
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Basic realm="sam-backend"'
    return response


def _backend_error(error: BackendError) -> Response:
    log.warning("%s %s -> %d %s: %s", request.method, request.path, error.status, type(error).__name__,
                error.message)
    return _error_response(error.status, error.to_json())


def _http_error(error: HTTPException) -> Response:
    status = error.code or 500
    message = error.description or error.name
    log.warning("%s %s -> %d %s", request.method, request.path, status, error.name)
    return _error_response(status, {"error": error.name, "message": message, "status": status})


def _unexpected_error(error: Exception) -> Response:
    log.exception("%s %s -> 500: unexpected %s", request.method, request.path, type(error).__name__)
    return _error_response(500, {"error": "InternalServerError",
                                 "message": f"the backend failed unexpectedly ({type(error).__name__}: {error}); "
                                            "the server log has the details", "status": 500})


def _json_body() -> dict[str, Any]:
    body = request.get_json(silent=True, force=True)
    if body is None:
        raise BadRequest("the request body must be JSON (Content-Type: application/json)")
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


# ------------------------------------------------------------------------------------------------------------
# endpoints
@api.get("/")
@api.get("/health")
def health() -> Response:
    """Liveness for Label Studio (1 s budget): reads attributes only, never waits for the model."""
    segmenter = _backend().segmenter
    body: dict[str, Any] = {"status": "UP", "model_class": MODEL_CLASS, "model_loaded": segmenter.loaded,
                            "model_version": segmenter.model_version}
    if segmenter.load_error:
        body["model_error"] = segmenter.load_error
    return jsonify(body)


@api.post("/setup")
def setup() -> Response:
    """Keep Label Studio's URL and token for image downloads, validate the label config, name the model."""
    backend = _backend()
    body = _json_body()
    schema = body.get("schema")
    if schema is not None:
        parse_label_config(schema)
        backend.projects[str(body.get("project"))] = schema
    hostname, token = body.get("hostname"), body.get("access_token")
    if hostname is not None and not isinstance(hostname, str):
        raise BadRequest("'hostname' must be the Label Studio URL as a string")
    if token is not None and not isinstance(token, str):
        raise BadRequest("'access_token' must be a string")
    if hostname or token:
        backend.fetcher.set_label_studio(hostname or None, token or None)
        backend.label_studio = (hostname or None, token or None)
    return jsonify({"model_version": backend.segmenter.model_version})


@api.post("/predict")
def predict() -> Response:
    backend = _backend()
    body = _json_body()
    tasks = body.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise BadRequest("'tasks' must be a non-empty list of Label Studio tasks")
    for index, task in enumerate(tasks):
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise BadRequest(f"task {index} must be an object with a 'data' object")
    config = parse_label_config(body.get("label_config"))
    params = body.get("params") or {}
    if not isinstance(params, dict):
        raise BadRequest("'params' must be an object")
    context = params.get("context")
    if context is not None and not isinstance(context, dict):
        raise BadRequest("'params.context' must be an object or null")
    regions = (context or {}).get("result")
    if not regions:
        # Label Studio sends this when an annotator opens a task (and for "Retrieve predictions"): start
        # encoding now, so that the first click finds the embedding ready.
        backend.warm_up(tasks, config, source="open" if len(tasks) == 1 else "batch")
    predictor = Predictions(backend, config)
    # Interactive (smart-tool click): one task, one prediction. Batch (context null): one per task.
    results = [predictor.interactive(tasks[0], regions)] if regions else predictor.batch(tasks)
    return jsonify({"results": results, "model_version": backend.segmenter.model_version})


@api.post("/webhook")
def webhook() -> Response:
    """Label Studio's project events: accepted (200), whatever the action.

    ``TASKS_CREATED`` (an import) queues the warm-up of the new tasks' images. The label config, which says
    which task field holds the image, comes with the event's project, else from the project's /setup.
    """
    backend = _backend()
    body = _json_body()
    action = body.get("action")
    if action == "START_TRAINING":
        return jsonify({"status": "ok", "action": action, "message": TRAIN_MESSAGE})
    if action == "TASKS_CREATED":
        return jsonify({"status": "ok", "action": action, "queued": _warm_created_tasks(backend, body)})
    return jsonify({"status": "ok", "action": action})


def _warm_created_tasks(backend: Backend, body: dict[str, Any]) -> int:
    tasks = body.get("tasks")
    project = body.get("project") if isinstance(body.get("project"), dict) else {}
    xml = project.get("label_config")
    if not xml:
        xml = next((schema for key, schema in backend.projects.items()
                    if key.split(".")[0] == str(project.get("id"))), None)
    if not isinstance(tasks, list) or not xml:
        log.info("TASKS_CREATED without tasks or a label config: nothing to warm up")
        return 0
    try:
        config = parse_label_config(xml)
    except BackendError as error:
        log.info("TASKS_CREATED for a project this backend cannot serve (%s): nothing to warm up", error.message)
        return 0
    queued = backend.warm_up(tasks, config, source="webhook")
    log.info("TASKS_CREATED: %d task(s), %d image(s) queued for warm-up", len(tasks), queued)
    return queued


@api.get("/versions")
def versions() -> Response:
    version = _backend().segmenter.model_version
    return jsonify({"versions": [version], "model_version": version})


@api.post("/train")
def train() -> Response:
    """Label Studio's "Start training": answered 200 so the UI shows no error, with why nothing happens."""
    return jsonify({"status": "ok", "message": TRAIN_MESSAGE})


@api.get("/metrics")
def metrics() -> Response:
    data, content_type = _backend().metrics.render()
    return Response(data, content_type=content_type)


# ------------------------------------------------------------------------------------------------------------
# /predict
class Predictions:
    """One /predict call: tasks + the project's label config -> Label Studio predictions."""

    def __init__(self, backend: Backend, config: LabelConfig) -> None:
        self.backend = backend
        self.config = config
        self.settings = backend.settings
        self.segmenter = backend.segmenter
        self.output = config.output_tag(self.settings.sam_output)

    @property
    def version(self) -> str:
        """Read when a prediction is made: the first /predict may be the one that loaded the model."""
        return self.segmenter.model_version

    def _image(self, task: dict[str, Any]) -> Any:
        return self.backend.fetcher.fetch(task, self.config.image.value_key)

    def _regions(self, mask: Any, label: str, score: float) -> list[dict[str, Any]]:
        return mask_regions(mask, label, score, self.config, self.settings.sam_output)

    def _tool_for(self, region: dict[str, Any]) -> Any:
        """The smart tool a context region came from; a region of another tag is a config mismatch."""
        name = region.get("from_name")
        tool = self.config.smart_tool(name) if isinstance(name, str) else None
        if tool is None:
            smart = [t.name for t in self.config.smart_tools] or ["none"]
            raise LabelConfigError(f"the region comes from tag {name!r}, which is not a smart KeyPointLabels or "
                                   f"RectangleLabels of this label config (smart tags: {', '.join(smart)}); "
                                   "add smart=\"true\" to the tag")
        return tool

    def interactive(self, task: dict[str, Any], regions: Any) -> dict[str, Any]:
        """The smart regions of one task -> one prediction with a mask per object."""
        if not isinstance(regions, list):
            raise BadRequest("'params.context.result' must be a list of regions")
        tools = {}
        for region in regions:
            if isinstance(region, dict) and region.get("type") in ("keypointlabels", RECTANGLE):
                tool = self._tool_for(region)
                tools.setdefault(tool.name, tool)
        image = self._image(task)
        prompts = parse_prompts(regions, image.size)
        if not prompts:
            raise BadRequest("the context has no keypoint or rectangle regions to segment")
        labels = [self._output_label(p.label, tools.get(p.from_name)) for p in prompts]
        embedding = self.segmenter.embed(image.decode, image.sha256)
        result: list[dict[str, Any]] = []
        for prompt, label in zip(prompts, labels, strict=True):
            mask = self.segmenter.segment(embedding, prompt.point_coords,
                                          prompt.point_labels if len(prompt.points) else None, prompt.box)
            result.extend(self._regions(mask.mask, label, mask.score))
        log.info("task %s: %d object(s) from %d region(s)", task.get("id"), len(prompts), len(regions))
        return prediction(result, self.version)

    def _output_label(self, clicked: str, tool: Any) -> str:
        tool_labels = tool.labels if tool is not None else ()
        if tool is not None and tool.labels and clicked not in tool.labels:
            raise LabelConfigError(f"label {clicked!r} is not a label of the smart tag {tool.name!r} "
                                   f"(its labels: {list(tool.labels)})")
        return resolve_output_label(clicked, self.output.labels, self.settings.label_map, tool_labels)

    def batch(self, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Exactly one prediction per task, in order (Label Studio stores nothing on a count mismatch).

        A task whose image fails gets an empty prediction (logged) so the other tasks still get theirs;
        when every task fails, the first error is the answer, so a wrong token or URL is not silent.
        """
        mode = self.settings.sam_batch_mode
        if mode == "off":
            return [prediction([], self.version) for _ in tasks]
        results: list[dict[str, Any]] = []
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

    def _boxes(self, task: dict[str, Any]) -> dict[str, Any]:
        """SAM_BATCH_MODE=boxes: each rectangle of the latest annotation (else of a prediction) -> a mask."""
        rectangles = task_rectangles(task)
        if not rectangles:
            return prediction([], self.version)
        image = self._image(task)
        size = image.size
        labels, boxes = [], []
        for region in rectangles:
            prompt = parse_prompts([region], size)[0]
            tag = next((t for t in self._rectangle_tags() if t.name == region.get("from_name")), None)
            labels.append(resolve_output_label(prompt.label, self.output.labels, self.settings.label_map,
                                               tag.labels if tag is not None else ()))
            boxes.append(prompt.box)
        embedding = self.segmenter.embed(image.decode, image.sha256)
        masks = self.segmenter.segment_boxes(embedding, boxes)
        result: list[dict[str, Any]] = []
        for mask, label in zip(masks, labels, strict=True):
            result.extend(self._regions(mask.mask, label, mask.score))
        return prediction(result, self.version)

    def _rectangle_tags(self) -> list[Any]:
        return [t for t in self.config.smart_tools if t.kind == "RectangleLabels"]

    def _everything(self, task: dict[str, Any]) -> dict[str, Any]:
        """SAM_BATCH_MODE=everything: every object SAM finds, labelled with the output tag's first label."""
        if not self.output.labels:
            raise LabelConfigError(f"the {self.output.kind} tag {self.output.name!r} has no labels")
        image = self._image(task)
        label = self.output.labels[0]
        result: list[dict[str, Any]] = []
        for mask in self.segmenter.segment_everything(image.array):
            result.extend(self._regions(mask.mask, label, mask.score))
        return prediction(result, self.version)


def task_rectangles(task: dict[str, Any]) -> list[dict[str, Any]]:
    """The rectanglelabels regions of the task's latest annotation, else of its latest prediction that has any.

    Annotations win because they are what a person drew or accepted; cancelled (skipped) ones are ignored.
    """
    def rects(item: Any) -> list[dict[str, Any]]:
        result = item.get("result") if isinstance(item, dict) else None
        return [r for r in result or [] if isinstance(r, dict) and r.get("type") == RECTANGLE]

    def newest_first(items: Any) -> list[Any]:
        items = [i for i in items or [] if isinstance(i, dict) and not i.get("was_cancelled")]
        return sorted(items, key=lambda i: (str(i.get("updated_at") or i.get("created_at") or ""),
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
