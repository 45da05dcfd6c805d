"""Warm-up: encode task images before the annotator's first click.

Label Studio tells us about images before anyone clicks on them: it sends ``TASKS_CREATED`` to
``/webhook`` when tasks are imported, and calls ``/predict`` with no context when an annotator opens a
task. Both hand the task to ``Warmer.submit``, which answers at once; the encoding happens in the
background and lands in the embedding cache, so the first click costs no more than any other.

Where the work runs:
- with Redis (``REDIS_URL``), jobs go through an rq queue (``sam-backend-warmup``). Every backend process
  consumes it in a background thread with the model it already holds (one model per process, one GPU per
  process), and ``sam-backend worker`` runs dedicated consumers — on this machine or any other that
  reaches the same Redis. The embedding lands in Redis, so whichever process gets the click finds it.
- without Redis, or while Redis is unreachable, a thread of this process does the same from an
  in-process queue.

Each image is queued once at a time (a pending marker per image reference), so a project import that
Label Studio also reports task by task does not encode twice; the cache itself makes a repeated job a
cheap no-op.

What a job does not carry: the Label Studio token. A job sits in Redis, readable by anything that reaches
Redis, for as long as the queue is long; the consumer fetches with its own token (its environment, or
what Label Studio sent it with /setup). What the producer waits for is bounded: Redis calls time out
after ``REDIS_TIMEOUT_S``, a failed call sends the next ``REDIS_RETRY_S`` seconds of warm-ups to the
in-process queue without trying Redis again, and at most ``max_queue`` jobs wait, so an import of
thousands of tasks (or a forged webhook) cannot grow the queue or the log without bound.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from backend.errors import BackendError
from backend.process_binding import ProcessBinding

if TYPE_CHECKING:  # annotations only: the queue itself needs neither the model side nor image access
    from backend.image_fetch import ImageFetcher
    from backend.segmenter import Segmenter

log = logging.getLogger(__name__)

QUEUE_NAME = "sam-backend-warmup"
PENDING_PREFIX = "sam-backend:warmup-pending:"
PENDING_TTL_S = 3600
JOB_TIMEOUT_S = 900
# A task open waits this long at most for Redis (each call), and a failed call keeps warm-ups off Redis
# for REDIS_RETRY_S: a stalled Redis costs one timeout per that period, not one per task.
REDIS_TIMEOUT_S = 1.0
REDIS_RETRY_S = 10.0


@dataclass(frozen=True)
class WarmupJob:
    """One image to encode: the task (its id and data) and where its image URL is in the data.

    ``label_studio_url`` is the Label Studio the producer knew (not a secret); the token is never part of a
    job (see the module's docstring).
    """

    task: dict[str, Any]
    value_key: str
    label_studio_url: str | None = None

    @property
    def image_ref(self) -> str:
        return str(self.task.get("data", {}).get(self.value_key, ""))

    def to_payload(self) -> dict[str, Any]:
        return {"task": {"id": self.task.get("id"), "data": self.task.get("data", {})},
                "value_key": self.value_key, "label_studio_url": self.label_studio_url}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> WarmupJob:
        # A token in a job queued by an older version is ignored: the consumer uses its own.
        return cls(task=payload["task"], value_key=payload["value_key"],
                   label_studio_url=payload.get("label_studio_url"))


# What encodes one job: fetch the image, embed it through the cache. Returns True when the encoder ran,
# False when the embedding was already cached.
Encoder = Callable[[WarmupJob], bool]
# rq calls ``run_job`` by its import path, so the shared queue's jobs find this process's encoder here: the
# one of the Warmer that consumes the shared queue in this process (one model per process).
_encoder: ProcessBinding[Encoder] = ProcessBinding("warm-up")


def bind_encoder(encoder: Encoder) -> None:
    """Make this process able to run jobs of the shared queue with ``encoder``."""
    _encoder.bind(encoder)


def run_job(payload: dict[str, Any]) -> bool:
    """The rq job function: runs in whichever process dequeued the job."""
    job = WarmupJob.from_payload(payload)
    encoder = _encoder.wait()
    try:
        return encoder(job)
    except BackendError as error:
        # The task's image cannot be used (refused host, 404, not an image): a debug line, not a failed job with
        # a traceback, since a bad (or forged) import makes as many of these as it has tasks. The annotator's
        # first click on the task reports the problem with its message.
        log.debug("warm-up of task %s skipped: %s", job.task.get("id"), error.detail or error.message)
        return False
    finally:
        _clear_pending(job)


def make_encoder(segmenter: Segmenter, fetcher: ImageFetcher) -> Encoder:
    """The warm-up encoder of a process: fetch the task image, embed it through the segmenter's cache.

    A job carries the Label Studio URL the producer knew, so a process that never received Label Studio's
    /setup can still find it; the token is this process's own (``LABEL_STUDIO_API_KEY``, sent only with
    ``LABEL_STUDIO_URL`` set, or /setup's for the same URL). The environment of this process wins, as it
    does for /setup. The job fetches with a client for those values (``ImageFetcher.label_studio_for``) and
    leaves the client that this process's request threads use as it is.
    """

    def encode(job: WarmupJob) -> bool:
        label_studio = fetcher.label_studio_for(job.label_studio_url, None)
        image = fetcher.fetch(job.task, job.value_key, label_studio=label_studio)
        if segmenter.cache.contains(segmenter.fingerprint, image.sha256):
            return False
        segmenter.embed(image.decode, image.sha256)
        log.info("warmed up task %s (%s)", job.task.get("id"), image.source)
        return True

    return encode


def _pending_key(job: WarmupJob) -> str:
    return PENDING_PREFIX + hashlib.sha1(job.image_ref.encode()).hexdigest()


def _clear_pending(job: WarmupJob) -> None:
    """Drop the image's pending marker on the Redis the running rq job came from (none outside a job)."""
    from rq import get_current_job

    current = get_current_job()
    if current is not None:
        with contextlib.suppress(Exception):  # the marker expires on its own
            current.connection.delete(_pending_key(job))


class Warmer:
    """Accepts warm-up jobs without blocking and runs them in the background.

    ``max_queue``: jobs that may wait at once (SAM_WARMUP_MAX_QUEUE); None: no limit but the local queue's.
    """

    def __init__(self, redis_url: str | None = None, encoder: Encoder | None = None, consume: bool = True,
                 on_depth: Callable[[int], None] | None = None, max_queue: int | None = None) -> None:
        self.redis_url = redis_url
        self.encoder = encoder
        self.consume = consume and encoder is not None
        self.on_depth = on_depth
        self.max_queue = max_queue
        self._redis_down_until = 0.0
        self._local: queue.Queue[WarmupJob] = queue.Queue(maxsize=min(10_000, max_queue or 10_000))
        self._local_pending: set[str] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._local_running = 0
        self._stop = threading.Event()
        self._rq_queue = None
        self._redis = None
        if redis_url:
            import redis
            from rq import Queue

            # Short timeouts: a task open waits on this connection. rq's worker (the consumer thread) makes its
            # own copy with a timeout longer than its blocking pops.
            self._redis = redis.Redis.from_url(redis_url, socket_connect_timeout=REDIS_TIMEOUT_S,
                                               socket_timeout=REDIS_TIMEOUT_S)
            self._rq_queue = Queue(QUEUE_NAME, connection=self._redis, default_timeout=JOB_TIMEOUT_S)

    # -- producing ---------------------------------------------------------------------------------
    def submit(self, jobs: list[WarmupJob]) -> int:
        """Queue each job whose image is not already queued, up to ``max_queue`` waiting; return how many
        were queued. Never raises, and logs at most a line or two whatever the number of jobs."""
        self.start()
        jobs = [job for job in jobs if job.image_ref]
        redis_error: Exception | None = None
        if self.max_queue is None:
            room = len(jobs)
        else:
            waiting, redis_error = self._depth()
            room = max(0, self.max_queue - waiting)
        queued, failed = 0, 0
        for job in jobs[:room]:
            try:
                done, error = self._submit_one(job)
            except Exception as unexpected:  # the local queue is all that is left: never fail the request
                done, error, failed = False, None, failed + 1
                log.debug("could not queue warm-up of task %s: %s", job.task.get("id"), unexpected)
            queued += done
            redis_error = redis_error or error
        if redis_error is not None:
            log.warning("Redis queue unavailable (%s): warm-ups go to this process for the next %.0f s",
                        redis_error, REDIS_RETRY_S)
        if len(jobs) > room:
            log.warning("warm-up queue full (%d waiting, SAM_WARMUP_MAX_QUEUE=%s): %d of %d task(s) not queued; "
                        "they are encoded on their first click", waiting, self.max_queue, len(jobs) - room, len(jobs))
        if failed:
            log.warning("could not queue the warm-up of %d task(s)", failed)
        self._report_depth()
        return queued

    def _redis_usable(self) -> bool:
        return self._rq_queue is not None and time.monotonic() >= self._redis_down_until

    def _submit_one(self, job: WarmupJob) -> tuple[bool, Exception | None]:
        """(queued, the Redis error that sent it to the local queue)."""
        redis_error = None
        if self._redis_usable() and self._rq_queue is not None and self._redis is not None:
            try:
                if not self._redis.set(_pending_key(job), b"1", nx=True, ex=PENDING_TTL_S):
                    return False, None
                self._rq_queue.enqueue(run_job, job.to_payload(), job_timeout=JOB_TIMEOUT_S,
                                       result_ttl=60, failure_ttl=24 * 3600,
                                       description=f"warm-up of task {job.task.get('id')}")
                return True, None
            except Exception as error:
                self._redis_down_until = time.monotonic() + REDIS_RETRY_S
                redis_error = error
        return self._submit_local(job), redis_error

    def _submit_local(self, job: WarmupJob) -> bool:
        with self._lock:
            if job.image_ref in self._local_pending:
                return False
            self._local_pending.add(job.image_ref)
        try:
            self._local.put_nowait(job)
        except queue.Full:
            with self._lock:
                self._local_pending.discard(job.image_ref)
            log.debug("warm-up queue is full; task %s will be encoded on its first click", job.task.get("id"))
            return False
        return True

    def depth(self) -> int:
        """Jobs waiting: the shared queue's length plus this process's local queue."""
        return self._depth()[0]

    def _depth(self) -> tuple[int, Exception | None]:
        """(jobs waiting, the Redis error that left the shared queue uncounted)."""
        depth = self._local.qsize()
        if self._redis_usable() and self._rq_queue is not None:
            try:
                depth += self._rq_queue.count
            except Exception as error:
                self._redis_down_until = time.monotonic() + REDIS_RETRY_S
                return depth, error
        return depth, None

    def running(self) -> int:
        """Jobs being encoded right now: rq's started-job registry plus this process's local consumer."""
        running = self._local_running
        if self._redis_usable() and self._rq_queue is not None:
            with contextlib.suppress(Exception):
                running += self._rq_queue.started_job_registry.count
        return running

    def unfinished(self) -> int:
        """Jobs queued and not finished yet (waiting or running): 0 only once the last encode is done.

        This process's own jobs are counted by their pending markers, set when queued and cleared only after
        the encode, so a job just taken off the queue is never missed."""
        with self._lock:
            unfinished = len(self._local_pending)
        if self._rq_queue is not None:
            with contextlib.suppress(Exception):
                unfinished += self._rq_queue.count + self._rq_queue.started_job_registry.count
        return unfinished

    def _report_depth(self) -> None:
        if self.on_depth is not None:
            self.on_depth(self.unfinished())

    # -- consuming ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the background consumers of this process (idempotent; nothing when not consuming)."""
        with self._lock:
            if not self.consume or self._threads:
                return
            self._start_threads()

    def _start_threads(self) -> None:
        assert self.encoder is not None
        local = threading.Thread(target=self._consume_local, name="warmup-local", daemon=True)
        self._threads.append(local)
        if self._rq_queue is not None:
            bind_encoder(self.encoder)
            shared = threading.Thread(target=self._consume_shared, name="warmup-rq", daemon=True)
            self._threads.append(shared)
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)

    def _consume_local(self) -> None:
        encoder = self.encoder
        if encoder is None:  # a producer only: start() runs no consumers then
            return
        while not self._stop.is_set():
            try:
                job = self._local.get(timeout=0.5)
            except queue.Empty:
                continue
            self._local_running = 1
            try:
                encoder(job)
            except BackendError as error:
                log.debug("warm-up of task %s skipped: %s", job.task.get("id"), error.detail or error.message)
            except Exception as error:
                log.warning("warm-up of task %s failed: %s", job.task.get("id"), error)
            finally:
                self._local_running = 0
                with self._lock:
                    self._local_pending.discard(job.image_ref)
                self._report_depth()

    def _consume_shared(self) -> None:
        """An rq worker in a thread: no signal handlers (only the main thread may set them), timer timeouts.

        Each round drains the queue in burst mode, then the thread sleeps briefly: it stops within a second
        of ``stop()`` and notices new jobs within a second, at a few Redis commands per round. When Redis
        fails the round ends and the next one retries, while the local consumer keeps serving whatever
        ``submit`` queued locally in the meantime.
        """
        connection, rq_queue = self._redis, self._rq_queue
        if connection is None or rq_queue is None:  # no Redis: start() runs no shared consumer then
            return
        failures = 0
        while not self._stop.is_set():
            try:
                # rq retries a lost connection forever inside work(); check first so an outage ends the round.
                connection.ping()
                ThreadWorker([rq_queue], connection=connection).work(burst=True, logging_level="WARNING")
                failures = 0
            except Exception as error:
                failures += 1
                if failures == 1:
                    log.warning("warm-up worker cannot reach Redis (%s); retrying", error)
            self._report_depth()
            self._stop.wait(1.0 if failures == 0 else min(30.0, 2.0 ** failures))


def run_worker(redis_url: str, encoder: Encoder, burst: bool = False, also: Sequence[str] = ()) -> None:
    """A dedicated consumer of the shared queue in this process's main thread (``sam-backend worker``).

    ``also``: more queues to consume after this one (``backend.preannotate``'s), whose job functions find
    this process's model through their own binding. rq's own signal handling applies: Ctrl-C or SIGTERM
    finishes the current job, then stops.
    """
    import redis
    from rq import Queue, SimpleWorker

    connection = redis.Redis.from_url(redis_url, socket_connect_timeout=5.0)
    bind_encoder(encoder)
    queues = [Queue(name, connection=connection) for name in (QUEUE_NAME, *also)]
    worker = SimpleWorker(queues, connection=connection)
    worker.work(burst=burst, logging_level="INFO")


def _thread_worker_class() -> type:
    from rq import SimpleWorker
    from rq.timeouts import TimerDeathPenalty

    class _ThreadWorker(SimpleWorker):
        death_penalty_class = TimerDeathPenalty

        def _install_signal_handlers(self) -> None:
            pass

    return _ThreadWorker


def ThreadWorker(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 - a class factory, imported lazily
    return _thread_worker_class()(*args, **kwargs)
