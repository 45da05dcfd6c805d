"""The Label Studio ML-backend HTTP protocol on Flask (application factory).

This module is HTTP only: routes, Basic auth, JSON bodies and JSON errors. What a /predict means (prompts,
masks, output labels, batch modes) is ``backend.predictions``; which GPU a worker gets is ``model.runtime``.

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
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException

from backend import fast_json
from backend.config import Settings
from backend.errors import BackendError, BadRequest, Unauthorized
from backend.interactive_flow import InteractiveFlow, speaks_interactive_flow
from backend.json_body import parse_object
from backend.label_config import LabelConfig, ProjectConfigs, parse_label_config
from backend.metrics import Metrics
from backend.predictions import Predictions
from backend.refinement import Refinements
from backend.request_limits import RequestLimits
from backend.segmenter import Segmenter
from backend.warmup import Warmer, WarmupJob, make_encoder

if TYPE_CHECKING:  # imported by create_app, so that importing the routes stays light
    from backend.image_fetch import ImageFetcher

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
    fetcher: ImageFetcher
    metrics: Metrics
    warmer: Warmer | None = None  # None when SAM_WARMUP is off
    refinements: Refinements | None = None  # None when SAM_REFINE is off
    projects: ProjectConfigs = field(default_factory=lambda: ProjectConfigs(  # the label configs /setup brought
        RequestLimits.setup_projects, RequestLimits.setup_memory_mb * 2**20))

    def warm_up(self, tasks: list[dict[str, Any]], label_config: LabelConfig, source: str) -> int:
        """Queue background encodes of the tasks' images; never raises, never waits for an encode."""
        if self.warmer is None:
            return 0
        # The Label Studio in effect here (environment, else /setup), so a worker that never saw /setup can find
        # it; never the token, which jobs do not carry (backend.warmup).
        url = self.fetcher.label_studio.url
        jobs = [WarmupJob(task=task, value_key=label_config.image.value_key, label_studio_url=url)
                for task in tasks if isinstance(task, dict)]
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
                        on_depth=metrics.warmup_queue_depth.set, max_queue=settings.sam_warmup_max_queue)
    limits = settings.request_limits
    refinements = Refinements(settings.sam_refine_memory_mb * 2**20) if settings.sam_refine else None
    backend = Backend(settings=settings, segmenter=segmenter, fetcher=fetcher, metrics=metrics, warmer=warmer,
                      refinements=refinements,
                      projects=ProjectConfigs(limits.setup_projects, limits.setup_memory_mb * 2**20))

    app = Flask(__name__)
    app.json = _OrderedJSON(app)
    app.extensions[EXTENSION] = backend
    app.register_blueprint(api)
    app.before_request(_start_request)
    app.before_request(_check_basic_auth)
    app.after_request(_count_request)
    app.register_error_handler(BackendError, _backend_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    return app


class _OrderedJSON(DefaultJSONProvider):
    """JSON with keys in the order the backend builds them (Label Studio's own order), not sorted; brush
    RLEs written from their arrays (``backend.fast_json``), the rest by the stdlib as before."""

    sort_keys = False

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return fast_json.dumps(obj, lambda value: super(_OrderedJSON, self).dumps(value, **kwargs))


def start_model_loading(app: Flask, slot: int = 0) -> None:
    """Start loading the app's model in the background (gunicorn's post_worker_init calls this).

    Worker ``slot`` (0..WORKERS-1) picks the GPU when there are several (``model.runtime.worker_device``).
    """
    from model.runtime import worker_device

    backend: Backend = app.extensions[EXTENSION]
    backend.segmenter.start_loading(worker_device(backend.segmenter.device, slot))
    if backend.warmer is not None:
        backend.warmer.start()  # this process consumes the shared warm-up queue with its model


def _backend() -> Backend:
    backend: Backend = current_app.extensions[EXTENSION]
    return backend


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
    log.warning("%s %s -> %d %s: %s%s", request.method, request.path, error.status, type(error).__name__,
                error.message, f" [{error.detail}]" if error.detail else "")
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
    """The body as a checked JSON object (``backend.json_body``); a body that cannot be read is a 400 too."""
    try:
        data = request.get_data(cache=True)
    except HTTPException:
        raise
    except Exception as error:  # noqa: BLE001 - only the client's bytes can fail here: gunicorn's ParseException
        # for bad chunked encoding (not an OSError), NoMoreData for a truncated body
        raise BadRequest(f"the request body could not be read ({type(error).__name__}: {error})") from None
    return parse_object(data, _backend().settings.request_limits.max_json_depth)


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
    if schema is not None and not isinstance(schema, str):
        raise BadRequest(f"'schema' must be the label config XML as a string, got {type(schema).__name__}")
    if schema is not None:
        parse_label_config(schema)
        backend.projects.put(str(body.get("project")), schema)
    hostname, token = body.get("hostname"), body.get("access_token")
    if hostname is not None and not isinstance(hostname, str):
        raise BadRequest("'hostname' must be the Label Studio URL as a string")
    if token is not None and not isinstance(token, str):
        raise BadRequest("'access_token' must be a string")
    if hostname or token:
        backend.fetcher.set_label_studio(hostname or None, token or None)
    return jsonify({"model_version": backend.segmenter.model_version})


@api.post("/predict")
def predict() -> Response:
    """Check the body, queue warm-ups when a task is opened, answer with ``backend.predictions``."""
    backend = _backend()
    # Label Studio waits 100 s for the whole call: a batch answers by this deadline with what is done.
    deadline = time.monotonic() + backend.settings.sam_batch_budget_s
    body = _json_body()
    tasks = body.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise BadRequest("'tasks' must be a non-empty list of Label Studio tasks")
    backend.settings.request_limits.check_tasks(tasks)
    _check_tasks(tasks)
    label_config = body.get("label_config")
    if label_config is not None and not isinstance(label_config, str):
        raise BadRequest(f"'label_config' must be the label config XML as a string, got {type(label_config).__name__}")
    config = parse_label_config(label_config)
    params = body.get("params") or {}
    if not isinstance(params, dict):
        raise BadRequest("'params' must be an object")
    context = params.get("context")
    if context is not None and not isinstance(context, dict):
        raise BadRequest("'params.context' must be an object or null")
    regions = (context or {}).get("result")
    predictions = Predictions(config, backend.settings, backend.segmenter, backend.fetcher, backend.refinements)
    predictions.check_limits(tasks, regions)
    if speaks_interactive_flow(context):  # the editor's newer ml-interactive flow: events, points or a box
        flow = InteractiveFlow(predictions, lambda opened: backend.warm_up(opened, config, source="prewarm"),
                               backend.refinements)
        return jsonify({"results": flow.answer(tasks, context or {}), "model_version": backend.segmenter.model_version})
    if not regions:
        # Label Studio sends this when an annotator opens a task (and for "Retrieve predictions"): start
        # encoding now, so that the first click finds the embedding ready.
        backend.warm_up(tasks, config, source="open" if len(tasks) == 1 else "batch")
    results = predictions.predict(tasks, regions, deadline=deadline, project=body.get("project"))
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


def _check_tasks(tasks: list[Any], where: str = "tasks") -> None:
    for index, task in enumerate(tasks):
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise BadRequest(f"'{where}[{index}]' must be an object with a 'data' object")


def _warm_created_tasks(backend: Backend, body: dict[str, Any]) -> int:
    tasks = body.get("tasks")
    if tasks is not None and not isinstance(tasks, list):
        raise BadRequest("'tasks' of a TASKS_CREATED event must be a list of tasks")
    if tasks:
        backend.settings.request_limits.check_tasks(tasks)
        _check_tasks(tasks)
    project = body.get("project")
    if not isinstance(project, dict):
        project = {}
    xml = project.get("label_config")
    if not isinstance(xml, str) or not xml:
        xml = backend.projects.for_project_id(project.get("id"))
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
