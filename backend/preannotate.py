"""``sam-backend preannotate --project N``: SAM predictions for every task of a Label Studio project.

"Retrieve predictions" sends the selected tasks in one /predict that Label Studio gives 100 s; a project of
thousands of images needs a job that runs as long as it takes, survives interruptions and spreads over
machines. This one reads the project through Label Studio's API, computes each task's prediction with the
batch modes of ``/predict`` (``Predictions.predict_task``: ``boxes``, ``points``, ``everything``) and writes
it back with ``POST /api/predictions`` under this model's ``model_version``, so the masks show in the Data
Manager and the editor like any model's.

Resumable and idempotent. Label Studio is the record: a task that has a prediction of this model version is
done and is skipped, so a second run writes nothing and a run that was stopped continues where it stopped
(a prediction is one POST: a task is written or it is not). A task with nothing to prompt with (no
rectangles for ``boxes``, no keypoints for ``points``) is skipped and gets no prediction, so a later run in
another mode, or after a detector's boxes arrive, still does it. ``overwrite`` deletes this version's
predictions of a task, then writes the new one, for every task; the run's start on Label Studio's clock
(``backend.overwrite_since``) is its record: a task with a prediction of this version created since then is
done, so an interrupted overwrite run resumed with ``overwrite_since`` (the command prints the exact command
line) continues where it stopped too.

Where it runs:
- without Redis, in this process: the tasks page through ``GET /api/tasks?fields=all`` (annotations and
  predictions included) into ``predict_tasks``, which downloads the next images while the model works;
- with ``REDIS_URL``, tasks go in chunks on the rq queue ``sam-backend-preannotate``, consumed by
  ``sam-backend worker`` (any machine that reaches the Redis, Label Studio and the images) and by the command
  itself unless ``local=False``. A worker claims each task in Redis (``SET NX`` with a TTL its heartbeat
  renews) before it reads the task afresh and computes, so two workers never write the same task, even when
  two commands queued it twice. Each outcome goes back to the command on a Redis list of its run; a task that
  was claimed elsewhere is queued again until its claim is released or has expired (a worker that died).
  Every Redis call of a run (claims, run records, outcome lists) is bounded by ``REDIS_TIMEOUT_S`` for the
  connect and for each answer: a stalled Redis (accepting connections, never answering) stops the command or
  fails the worker's job with "Redis at ... did not answer within N s" instead of hanging them.

The embedding cache (memory, and Redis when there is one) is used as by clicks: an image already encoded
by a warm-up or a click costs no encoder run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shlex
import socket
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from backend.config import Settings
from backend.errors import BackendError, ImageAccessError, ImageError
from backend.http_download import redact
from backend.label_config import LabelConfig, parse_label_config
from backend.overwrite_since import CLOCK_RESOLUTION_S, parse_timestamp, start_from_date_header, written_since
from backend.predictions import BatchOptions, Predictions, Task, predict_tasks
from backend.process_binding import ProcessBinding

if TYPE_CHECKING:
    from backend.image_fetch import ImageFetcher
    from backend.label_studio import LabelStudioClient
    from backend.results import Prediction
    from backend.segmenter import Segmenter

log = logging.getLogger(__name__)

MODES = ("boxes", "points", "everything")
QUEUE_NAME = "sam-backend-preannotate"
CLAIM_PREFIX = "sam-backend:preannotate-claim:"
OUTCOMES_PREFIX = "sam-backend:preannotate-outcomes:"
CLAIM_TTL_S = 60  # a claim of a worker that died is free after this; live workers renew theirs
OUTCOMES_TTL_S = 24 * 3600
JOB_TIMEOUT_S = 24 * 3600  # a chunk of "everything" on a CPU can take an hour; a dead worker is not a timeout
CHUNK = 8  # tasks per queued job: images of a chunk are downloaded ahead of the model
PAGE_SIZE = 100
REDIS_TIMEOUT_S = 10.0  # connect and answer limit of a run's Redis calls; above the 1 s BLPOP wait for outcomes
LOST_CHECK_S = 5.0  # how often the command looks for jobs that ended without reporting all their tasks

# Failure classes, for the summary: what went wrong, and so what to fix.
FAILURE_HINTS = {
    "image": "the task's image could not be fetched or read",
    "prompt": "the task's regions or labels do not fit the label config",
    "task": "the task could not be read from Label Studio",
    "write": "Label Studio did not store the prediction",
    "error": "an unexpected error (the log has the traceback)",
    "lost": "the worker that had the task stopped before it was done",
}


# Why a task with no prompt is skipped, not given an empty prediction: a later run (in another mode, or after
# a detector's boxes arrive) can still do it, and the editor shows no empty model answer.
NOTHING_TO_SEGMENT = {
    "boxes": "no rectangles in the latest annotation or prediction",
    "points": "no keypoints in the latest annotation",
}


class PreannotateError(BackendError):
    """The run cannot start as asked; the message says what to change (the command exits 2)."""

    status = 400


@dataclass(frozen=True)
class Options:
    """What ``preannotate`` does for each task (the command's options)."""

    mode: str = "boxes"  # boxes | points | everything
    min_score: float = 0.0  # everything: keep masks with a predicted IoU at least this
    min_area: int = 0  # everything: keep masks of at least this many pixels
    max_masks: int | None = None  # everything: the best N masks (None: all)
    label: str | None = None  # everything: the output label (None: the output tag's first)
    overwrite: bool = False  # replace this model version's predictions instead of skipping the task
    # overwrite: the run's start on Label Studio's clock (ISO 8601); this version's predictions created since
    # then were written by this run and are kept (backend.overwrite_since). None: read when the run starts.
    overwrite_since: str | None = None

    def batch(self) -> BatchOptions:
        return BatchOptions(mode=self.mode, min_score=self.min_score, min_area=self.min_area,
                            max_masks=self.max_masks, label=self.label)


@dataclass(frozen=True)
class Outcome:
    """What happened to one task. ``status``: done, skipped, failed, or busy (claimed by another worker)."""

    task_id: int
    status: str
    reason: str = ""  # failed: a FAILURE_HINTS key; skipped: why
    message: str = ""
    regions: int = 0
    worker: str = ""
    version: str = ""  # the model version of the prediction written

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> Outcome:
        return cls(**json.loads(text))


@dataclass
class Summary:
    """The counts and the failures of a run, and the lines that report them."""

    total: int = 0
    done: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    failures: dict[str, list[Outcome]] = field(default_factory=lambda: defaultdict(list))
    regions: int = 0
    workers: Counter[str] = field(default_factory=Counter)
    versions: Counter[str] = field(default_factory=Counter)

    @property
    def failed(self) -> int:
        return sum(len(items) for items in self.failures.values())

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def add(self, outcome: Outcome) -> None:
        if outcome.status == "done":
            self.done += 1
            self.regions += outcome.regions
            self.workers[outcome.worker] += 1
            self.versions[outcome.version] += 1
        elif outcome.status == "skipped":
            self.skipped[outcome.reason] += 1
        else:
            self.failures[outcome.reason or "error"].append(outcome)

    def lines(self, project_id: int, version: str | None, mode: str, seconds: float) -> list[str]:
        rate = self.done / seconds if seconds > 0 else 0.0
        version = version or ", ".join(v for v in self.versions if v) or "of the workers"
        lines = [f"project {project_id}, model {version}, mode {mode}: {self.done} done, "
                 f"{self.skipped_total} skipped, {self.failed} failed in {seconds:.1f} s "
                 f"({rate:.2f} images/s, {self.regions} regions written)"]
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"  skipped {count}: {reason}")
        for reason, outcomes in sorted(self.failures.items()):
            ids = ", ".join(str(o.task_id) for o in outcomes[:20]) + (", ..." if len(outcomes) > 20 else "")
            lines.append(f"  failed {len(outcomes)} ({reason}: {FAILURE_HINTS.get(reason, reason)}): tasks {ids}")
            for outcome in outcomes[:3]:
                lines.append(f"    task {outcome.task_id}: {outcome.message}")
        if len(self.workers) > 1:
            split = ", ".join(f"{worker} {count}" for worker, count in self.workers.most_common())
            lines.append(f"  written by: {split}")
        return lines


@dataclass(frozen=True)
class ProjectInfo:
    """What a worker needs of a project: its id and parsed label config."""

    id: int
    label_config: LabelConfig
    task_number: int | None = None


def read_project(client: LabelStudioClient, project_id: int) -> ProjectInfo:
    """The project's label config through the API, or an error that says what to fix (token, id, config)."""
    try:
        project = client.get_json(f"/api/projects/{int(project_id)}")
    except ImageAccessError as error:
        if error.upstream_status == 404:
            raise PreannotateError(f"Label Studio at {client.url} has no project {project_id} that the token's user "
                                   "can see: check the project id (the number in the project's URL).") from None
        raise PreannotateError(error.message) from None
    except ImageError as error:  # no or a malformed Label Studio URL
        raise PreannotateError(error.message) from None
    if not isinstance(project, dict) or not isinstance(project.get("label_config"), str):
        raise PreannotateError(f"Label Studio did not answer project {project_id} with a project")
    try:
        config = parse_label_config(project["label_config"])
    except BackendError as error:
        raise PreannotateError(f"project {project_id}'s label config does not fit: {error.message}") from None
    task_number = project.get("task_number")
    return ProjectInfo(int(project_id), config, task_number if isinstance(task_number, int) else None)


# ----------------------------------------------------------------------------------------------------------
# the work on tasks: one home for in-process runs and queue workers


class Preannotator:
    """Computes and writes the predictions of tasks with this process's model (one per process)."""

    def __init__(self, settings: Settings, segmenter: Segmenter, fetcher: ImageFetcher) -> None:
        self.settings = settings
        self.segmenter = segmenter
        self.fetcher = fetcher
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self._projects: dict[tuple[str | None, int], ProjectInfo] = {}
        self._lock = threading.Lock()

    @property
    def version(self) -> str:
        return self.segmenter.model_version

    def project(self, client: LabelStudioClient, project_id: int) -> ProjectInfo:
        """The project's label config, read once per process and Label Studio."""
        key = (client.url, int(project_id))
        with self._lock:
            known = self._projects.get(key)
        if known is None:
            known = read_project(client, project_id)
            with self._lock:
                self._projects[key] = known
        return known

    def run(self, client: LabelStudioClient, project: ProjectInfo, tasks: Iterable[Task], options: Options,
            claims: Claims | None = None, written: RunRecord | None = None) -> Iterator[Outcome]:
        """One outcome per task. With ``claims`` (a queue worker), ``tasks`` hold ids only: each is claimed,
        then read afresh from Label Studio, so whether it is done is decided after the claim. ``written``
        records the tasks this run wrote, so that ``overwrite`` replaces a task's prediction once per run even
        when the task was queued again."""
        predictions = Predictions(project.label_config, self.settings, self.segmenter, self.fetcher)
        batch = options.batch()
        if options.mode == "everything":
            predictions.everything_label(batch)  # a wrong --label stops the run before any task
        version = self.version
        since = parse_timestamp(options.overwrite_since) if options.overwrite and options.overwrite_since else None
        notes: list[Outcome] = []  # outcomes decided before the model (skipped, busy, unreadable)

        def todo() -> Iterator[Task]:
            for listed in tasks:
                task_id = listed.get("id")
                if not isinstance(task_id, int):
                    continue
                if claims is not None:
                    if not claims.claim(task_id):
                        notes.append(Outcome(task_id, "busy", "claimed by another worker", worker=self.worker))
                        continue
                    try:
                        task = client.task(task_id)
                    except ImageError as error:
                        claims.release(task_id)
                        notes.append(Outcome(task_id, "failed", "task", error.message, worker=self.worker))
                        continue
                else:
                    task = listed
                if written is not None and written.has(task_id):
                    if claims is not None:
                        claims.release(task_id)
                    notes.append(Outcome(task_id, "skipped", "written by this run already", worker=self.worker))
                    continue
                skip = None
                if not options.overwrite and has_prediction(task, version):
                    skip = f"already had a prediction of {version}"
                elif since is not None and has_prediction(task, version, since):
                    skip = "written by this run already"
                elif not predictions.needs_image(task, batch):  # boxes / points and the task has none
                    skip = NOTHING_TO_SEGMENT[options.mode]
                if skip is not None:
                    if claims is not None:
                        claims.release(task_id)
                    notes.append(Outcome(task_id, "skipped", skip, worker=self.worker))
                    continue
                yield task

        value_key = project.label_config.image.value_key
        stream = predict_tasks(predictions, todo(), batch,
                               lambda task: self.fetcher.fetch(task, value_key, label_studio=client))
        for task, result in stream:
            yield from _drain(notes)
            task_id = int(task["id"])
            try:
                outcome = self._write(client, task, result, options, version)
                if written is not None and outcome.status == "done":
                    written.add(task_id)
                yield outcome
            finally:
                if claims is not None:
                    claims.release(task_id)
        yield from _drain(notes)

    def _write(self, client: LabelStudioClient, task: Task, result: Prediction | BackendError, options: Options,
               version: str) -> Outcome:
        task_id = int(task["id"])
        if isinstance(result, BackendError):
            reason = "image" if isinstance(result, ImageError) else "prompt" if result.status < 500 else "error"
            log.warning("task %s: no prediction: %s", task_id, result.message)
            return Outcome(task_id, "failed", reason, result.message, worker=self.worker)
        try:
            if options.overwrite:
                for old in task.get("predictions") or []:
                    if isinstance(old, dict) and old.get("model_version") == version and isinstance(old.get("id"), int):
                        client.delete_prediction(old["id"])
            client.create_prediction(task_id, result["result"], result["score"], version)
        except ImageError as error:
            log.warning("task %s: Label Studio did not store the prediction: %s", task_id, error.message)
            return Outcome(task_id, "failed", "write", error.message, worker=self.worker)
        log.info("task %s: %d region(s) written as %s", task_id, len(result["result"]), version)
        return Outcome(task_id, "done", regions=len(result["result"]), worker=self.worker, version=version)


def has_prediction(task: Task, version: str, since: datetime | None = None) -> bool:
    """Whether the task has a prediction of ``version`` (created at or after ``since``, when given): the
    record that it is done."""
    found = task.get("predictions")
    if not isinstance(found, list):
        return False
    if since is not None:
        return any(written_since(p, version, since) for p in found)
    return any(isinstance(p, dict) and p.get("model_version") == version for p in found)


def _drain(notes: list[Outcome]) -> Iterator[Outcome]:
    while notes:
        yield notes.pop(0)


# ----------------------------------------------------------------------------------------------------------
# claims: one worker per task at a time, across processes and machines

_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
_RENEW = ("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('expire', KEYS[1], ARGV[2]) "
          "else return 0 end")


class RunRecord:
    """The tasks one run has written, in a Redis set that expires with the run's outcomes."""

    def __init__(self, redis: Any, run_id: str) -> None:
        self.redis = redis
        self.key = f"{OUTCOMES_PREFIX}{run_id}:written"

    def has(self, task_id: int) -> bool:
        return bool(self.redis.sismember(self.key, task_id))

    def add(self, task_id: int) -> None:
        pipe = self.redis.pipeline()
        pipe.sadd(self.key, task_id)
        pipe.expire(self.key, OUTCOMES_TTL_S)
        pipe.execute()


class Claims:
    """Per-task claims in Redis: ``SET NX`` with a TTL, renewed by a heartbeat while held, released by owner.

    A key names the Label Studio, the project, the task and the model version, so runs of another model or
    another Label Studio never wait on each other.
    """

    def __init__(self, redis: Any, label_studio_url: str | None, project_id: int, version: str,
                 ttl_s: int = CLAIM_TTL_S) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        where = hashlib.sha1((label_studio_url or "").encode()).hexdigest()[:8]
        self.prefix = f"{CLAIM_PREFIX}{where}:{project_id}:{version}:"
        self._held: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._renew, name="preannotate-claims", daemon=True)
        self._heartbeat.start()

    def claim(self, task_id: int) -> bool:
        if not self.redis.set(self.prefix + str(task_id), self.owner, nx=True, ex=self.ttl_s):
            return False
        with self._lock:
            self._held.add(task_id)
        return True

    def release(self, task_id: int) -> None:
        with self._lock:
            self._held.discard(task_id)
        with contextlib.suppress(Exception):  # the claim expires on its own
            self.redis.eval(_RELEASE, 1, self.prefix + str(task_id), self.owner)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            held = list(self._held)
        for task_id in held:
            self.release(task_id)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            with self._lock:
                held = list(self._held)
            for task_id in held:
                with contextlib.suppress(Exception):
                    self.redis.eval(_RENEW, 1, self.prefix + str(task_id), self.owner, self.ttl_s)


# ----------------------------------------------------------------------------------------------------------
# the shared queue: jobs are chunks of task ids; this process's Preannotator runs them

_preannotator: ProcessBinding[Preannotator] = ProcessBinding("pre-annotation")


def bind_preannotator(preannotator: Preannotator) -> None:
    """Make this process able to run jobs of the preannotate queue (``sam-backend worker``, the command)."""
    _preannotator.bind(preannotator)


def connect(redis_url: str) -> Any:
    """The Redis connection of a run or a worker's job, every call bounded by ``REDIS_TIMEOUT_S``."""
    import redis

    return redis.Redis.from_url(redis_url, socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S)


def redis_failed(redis_url: str, error: Exception) -> str:
    """What to tell about a Redis call that failed: a stall in words, the URL without its password."""
    import redis

    where = f"Redis at {redact(redis_url)} (REDIS_URL)"
    if isinstance(error, redis.TimeoutError):
        return f"{where} did not answer within {REDIS_TIMEOUT_S:g} s"
    return f"{where} cannot be reached: {error}"


def run_job(payload: dict[str, Any]) -> int:
    """The rq job function: claim, compute and write each task of the chunk; report each outcome to its run."""
    import redis

    runner = _preannotator.wait()
    connection = connect(payload["redis_url"])
    # The token is this worker's own (LABEL_STUDIO_API_KEY): payloads never carry it (backend.warmup says why).
    client = runner.fetcher.label_studio_for(payload.get("label_studio_url"), None)
    options = Options(**payload["options"])
    outcomes_key = OUTCOMES_PREFIX + payload["run"]
    task_ids: list[int] = [int(i) for i in payload["tasks"]]
    reported: set[int] = set()

    def report(outcome: Outcome) -> None:
        reported.add(outcome.task_id)
        pipe = connection.pipeline()
        pipe.rpush(outcomes_key, outcome.to_json())
        pipe.expire(outcomes_key, OUTCOMES_TTL_S)
        pipe.execute()

    claims: Claims | None = None
    try:
        project = runner.project(client, int(payload["project"]))
        claims = Claims(connection, client.url, project.id, runner.version)
        written = RunRecord(connection, payload["run"])
        for outcome in runner.run(client, project, ({"id": i} for i in task_ids), options, claims, written):
            report(outcome)
    except redis.RedisError as error:  # no outcome can go back either: the job fails, the command requeues
        message = redis_failed(payload["redis_url"], error)
        log.error("pre-annotation job of project %s stopped: %s", payload.get("project"), message)
        raise RuntimeError(message) from None
    except Exception as error:  # the whole chunk failed (project unreadable, a bug): say so for each task
        message = error.message if isinstance(error, BackendError) else f"{type(error).__name__}: {error}"
        log.exception("pre-annotation job of project %s failed: %s", payload.get("project"), message)
        for task_id in task_ids:
            if task_id not in reported:
                report(Outcome(task_id, "failed", "error", message, worker=runner.worker))
    finally:
        if claims is not None:
            claims.close()
    return len(reported)


# ----------------------------------------------------------------------------------------------------------
# the command


@dataclass
class Run:
    """One ``preannotate`` invocation: where, what, how it reports."""

    settings: Settings
    project_id: int
    options: Options = field(default_factory=Options)
    local: bool = True
    chunk: int = CHUNK
    progress: bool = True
    prelabel: bool = False  # make the project show this model's predictions in the editor
    echo: Callable[[str], None] = print


def preannotate_project(run: Run, segmenter: Segmenter | None = None, fetcher: ImageFetcher | None = None) -> Summary:
    """Pre-annotate the project; returns the summary (already printed). PreannotateError: nothing started."""
    from backend.image_fetch import ImageFetcher

    settings = run.settings
    if run.options.mode not in MODES:
        raise PreannotateError(f"--mode must be one of {', '.join(MODES)}, not {run.options.mode!r}")
    if not settings.label_studio_url:
        raise PreannotateError("set LABEL_STUDIO_URL to Label Studio's address (e.g. http://label-studio:8080) and "
                               "LABEL_STUDIO_API_KEY to a token of a user who can see the project")
    if not settings.redis_url and not run.local:
        raise PreannotateError("--no-local needs REDIS_URL: without Redis the tasks can only run in this process")
    fetcher = fetcher or ImageFetcher.from_settings(settings)
    client = fetcher.label_studio
    project = read_project(client, run.project_id)  # checks URL, token and project before loading a model
    _check_output(project, settings, run.options)
    clock_read = _start_overwrite(run, client, project)
    preannotator: Preannotator | None = None
    if run.local:
        from backend.segmenter import Segmenter

        segmenter = segmenter or Segmenter.from_settings(settings)
        try:
            segmenter.load()
        except BackendError as error:
            raise PreannotateError(error.message) from None
        preannotator = Preannotator(settings, segmenter, fetcher)

    if clock_read is not None:  # nothing written within the second of the start (backend.overwrite_since)
        time.sleep(max(0.0, clock_read + CLOCK_RESOLUTION_S - time.monotonic()))
    started = time.monotonic()
    summary = Summary(total=project.task_number or 0)
    bar = tqdm(total=project.task_number, desc=f"pre-annotating project {project.id}", unit="task",
               disable=not run.progress, dynamic_ncols=True)
    try:
        if settings.redis_url:
            outcomes = _run_through_redis(run, client, project, preannotator, bar)
        else:
            assert preannotator is not None
            tasks = client.iter_tasks(project.id, page_size=PAGE_SIZE, fields="all")
            outcomes = preannotator.run(client, project, tasks, run.options)
        for outcome in outcomes:
            summary.add(outcome)
            bar.update(1)
            elapsed = time.monotonic() - started
            bar.set_postfix(done=summary.done, skipped=summary.skipped_total, failed=summary.failed,
                            images_per_s=f"{summary.done / elapsed:.2f}" if elapsed > 0 else "-", refresh=False)
    except ImageError as error:  # Label Studio failed under the listing: nothing more can be read
        raise PreannotateError(error.message) from None
    finally:
        bar.close()
    version = preannotator.version if preannotator is not None else None
    for line in summary.lines(project.id, version, run.options.mode, time.monotonic() - started):
        run.echo(line)
    if version is not None and (summary.done or run.prelabel):
        _show_in_editor(client, project.id, version, run)
    return summary


def _start_overwrite(run: Run, client: LabelStudioClient, project: ProjectInfo) -> float | None:
    """An overwrite run's start on Label Studio's clock, set in ``run.options`` (unless given, to resume), and
    the command that resumes the run, printed; returns when the clock was read (``time.monotonic()``)."""
    options = run.options
    if not options.overwrite:
        return None
    read_at = None
    if options.overwrite_since is None:
        try:
            date = client.clock(f"/api/projects/{project.id}")
        except ImageError as error:
            raise PreannotateError(error.message) from None
        read_at = time.monotonic()
        try:
            if date is None:
                raise ValueError("none was sent")
            start = start_from_date_header(date)
        except ValueError as error:
            raise PreannotateError(f"Label Studio at {client.url} sent no readable Date header ({error}), which "
                                   "an --overwrite run takes its start from: give the start with "
                                   "--overwrite-since (ISO 8601, UTC)") from None
        run.options = replace(options, overwrite_since=start)
    else:
        try:
            parse_timestamp(options.overwrite_since)
        except ValueError as error:
            raise PreannotateError(f"--overwrite-since: {error}") from None
    run.echo(f"overwrite run of project {project.id} from {run.options.overwrite_since} (Label Studio's clock); "
             f"if it stops, continue it with: {resume_command(run)}")
    return read_at


def resume_command(run: Run) -> str:
    """The command line that runs ``run`` again: with ``overwrite``, its start, so it continues the run."""
    options = run.options
    words = ["sam-backend", "preannotate", "--project", str(run.project_id)]
    if options.mode != "boxes":
        words += ["--mode", options.mode]
    if options.mode == "everything":
        words += ["--min-score", f"{options.min_score:g}", "--min-area", str(options.min_area)]
        if options.max_masks is not None:
            words += ["--max-masks", str(options.max_masks)]
        if options.label is not None:
            words += ["--label", options.label]
    if options.overwrite:
        words += ["--overwrite"] + (["--overwrite-since", options.overwrite_since] if options.overwrite_since else [])
    if not run.local:
        words.append("--no-local")
    if run.chunk != CHUNK:
        words += ["--chunk", str(run.chunk)]
    if run.prelabel:
        words.append("--prelabel")
    return shlex.join(words)


def _check_output(project: ProjectInfo, settings: Settings, options: Options) -> None:
    """The project's output tag for SAM_OUTPUT, and ``--label`` among its labels, before any work starts."""
    try:
        tag = project.label_config.output_tag(settings.sam_output)
    except BackendError as error:
        raise PreannotateError(f"project {project.id}: {error.message}") from None
    if options.label is not None and options.label not in tag.labels:
        raise PreannotateError(f"--label {options.label!r} is not a label of the project's {tag.kind} tag "
                               f"{tag.name!r} (its labels: {list(tag.labels)})")
    if options.mode == "everything" and not tag.labels:
        raise PreannotateError(f"project {project.id}: the {tag.kind} tag {tag.name!r} has no labels")


def _show_in_editor(client: LabelStudioClient, project_id: int, version: str, run: Run) -> None:
    """The editor pre-labels a task with the predictions of the project's ``model_version`` only: set it to
    ours when it is empty (or with ``prelabel``), else say how to switch."""
    try:
        current = client.get_json(f"/api/projects/{project_id}").get("model_version") or ""
        if current == version:
            return
        if not current or run.prelabel:
            client.send_json("PATCH", f"/api/projects/{project_id}", {"model_version": version})
            run.echo(f"  the editor now pre-labels tasks with {version} (the project's model version"
                     + (f", was {current})" if current else ")"))
        else:
            run.echo(f"  the editor pre-labels tasks with {current!r}: choose {version} in the project's Settings > "
                     "Annotation > Prelabeling, or run again with --prelabel")
    except (ImageError, AttributeError) as error:
        log.warning("could not read or set project %s's model version: %s", project_id, error)


def _run_through_redis(run: Run, client: LabelStudioClient, project: ProjectInfo, preannotator: Preannotator | None,
                       bar: Any) -> Iterator[Outcome]:
    """Queue the project's tasks in chunks, consume the queue here too (unless not local), and yield each
    task's outcome as the workers report it; tasks claimed elsewhere are queued again until settled."""
    import redis

    settings = run.settings
    connection = connect(settings.redis_url)
    try:
        connection.ping()
    except redis.RedisError as error:
        raise PreannotateError(redis_failed(settings.redis_url, error)) from None
    try:
        yield from _queue_and_follow(run, connection, client, project, preannotator, bar)
    except redis.RedisError as error:
        raise PreannotateError(f"{redis_failed(settings.redis_url, error)}; the run stopped. What was written "
                               "stays in Label Studio: run the same command again to continue.") from None


def _queue_and_follow(run: Run, connection: Any, client: LabelStudioClient, project: ProjectInfo,
                      preannotator: Preannotator | None, bar: Any) -> Iterator[Outcome]:
    from rq import Queue

    settings = run.settings
    queue = Queue(QUEUE_NAME, connection=connection, default_timeout=JOB_TIMEOUT_S)
    run_id = uuid.uuid4().hex
    outcomes_key = OUTCOMES_PREFIX + run_id

    def enqueue(ids: Sequence[int]) -> list[tuple[str, list[int]]]:
        jobs = []
        for start in range(0, len(ids), max(1, run.chunk)):
            chunk = list(ids[start:start + max(1, run.chunk)])
            payload = {"run": run_id, "project": project.id, "tasks": chunk, "options": asdict(run.options),
                       "redis_url": settings.redis_url, "label_studio_url": client.url}
            job = queue.enqueue(run_job, payload, job_timeout=JOB_TIMEOUT_S, result_ttl=600,
                                failure_ttl=24 * 3600, description=f"pre-annotate {len(chunk)} task(s) of project "
                                                                   f"{project.id}")
            jobs.append((job.id, chunk))
        return jobs

    ids = [int(t["id"]) for t in client.iter_tasks(project.id, page_size=PAGE_SIZE) if isinstance(t.get("id"), int)]
    bar.reset(total=len(ids))
    jobs = enqueue(ids)
    log.info("queued %d task(s) of project %s in %d job(s) on %s (run %s)", len(ids), project.id, len(jobs),
             QUEUE_NAME, run_id)
    consumer = _LocalConsumer(settings.redis_url, preannotator) if preannotator is not None else None
    pending = set(ids)
    attempts: Counter[int] = Counter()
    busy_since: dict[int, float] = {}
    last_progress = last_check = time.monotonic()
    warned = False
    try:
        while pending:
            item = connection.blpop([outcomes_key], timeout=1)
            now = time.monotonic()
            if item is not None:
                outcome = Outcome.from_json(item[1])
                if outcome.task_id not in pending:
                    continue
                last_progress = now
                if outcome.status == "busy":  # another worker holds it: ask again once it may be free
                    busy_since.setdefault(outcome.task_id, now)
                    continue
                pending.discard(outcome.task_id)
                busy_since.pop(outcome.task_id, None)
                yield outcome
                continue
            due = [t for t, since in busy_since.items() if now - since >= 1.0 * 2 ** min(attempts[t], 5)]
            if due:
                for task_id in due:
                    attempts[task_id] += 1
                    del busy_since[task_id]
                jobs += enqueue(due)
            if now - last_check >= LOST_CHECK_S:
                last_check = now
                for outcome in _lost(queue, jobs, pending, busy_since, attempts, enqueue):
                    pending.discard(outcome.task_id)
                    yield outcome
            if not warned and now - last_progress > 30 and consumer is None and _workers(connection) == 0:
                warned = True
                bar.write(f"no worker consumes the queue {QUEUE_NAME}: start `sam-backend worker` with the same "
                          "REDIS_URL, or run without --no-local")
    finally:
        if consumer is not None:
            consumer.stop()


def _lost(queue: Any, jobs: list[tuple[str, list[int]]], pending: set[int], busy: dict[int, float],
          attempts: Counter[int], enqueue: Callable[[Sequence[int]], list[tuple[str, list[int]]]]
          ) -> Iterator[Outcome]:
    """Tasks of jobs that ended without reporting them (a worker killed mid-job): queued again, twice at most."""
    from rq.job import Job, JobStatus

    ended = (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED, JobStatus.FINISHED)
    still: list[tuple[str, list[int]]] = []
    retry: list[int] = []
    for job_id, chunk_ids in jobs:
        waiting = [t for t in chunk_ids if t in pending and t not in busy]
        if not waiting:
            continue
        try:
            status = Job.fetch(job_id, connection=queue.connection).get_status(refresh=True)
        except Exception:  # the job is gone (expired): treat as ended
            status = JobStatus.FAILED
        if status not in ended:
            still.append((job_id, chunk_ids))
            continue
        if status == JobStatus.FINISHED:  # its outcomes may still be on their way: look again next round
            still.append((job_id, chunk_ids))
            continue
        for task_id in waiting:
            attempts[task_id] += 1
            if attempts[task_id] > 2:
                yield Outcome(task_id, "failed", "lost", f"job {job_id} ended ({status}) without this task")
            else:
                retry.append(task_id)
    jobs[:] = still
    if retry:
        jobs.extend(enqueue(retry))


def _workers(connection: Any) -> int:
    from rq import Queue, Worker

    try:
        return len(Worker.all(queue=Queue(QUEUE_NAME, connection=connection)))
    except Exception:
        return 0


class _LocalConsumer:
    """The command's own consumer of the queue: an rq worker in a thread, with this process's model.

    It has a connection of its own: rq raises its worker connection's read timeout to its own (minutes, for
    its blocking waits), which must not become the command's.
    """

    def __init__(self, redis_url: str, preannotator: Preannotator) -> None:
        import redis
        from rq import Queue

        from backend.warmup import ThreadWorker

        connection = redis.Redis.from_url(redis_url, socket_connect_timeout=REDIS_TIMEOUT_S)
        queue = Queue(QUEUE_NAME, connection=connection, default_timeout=JOB_TIMEOUT_S)
        bind_preannotator(preannotator)
        self._stop = threading.Event()
        self._worker_factory = lambda: ThreadWorker([queue], connection=connection)
        self._thread = threading.Thread(target=self._consume, name="preannotate-local", daemon=True)
        self._thread.start()

    def _consume(self) -> None:
        while not self._stop.is_set():
            try:
                self._worker_factory().work(burst=True, logging_level="WARNING")
            except Exception as error:
                log.warning("the local pre-annotation consumer failed (%s); retrying", error)
            self._stop.wait(0.5)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
