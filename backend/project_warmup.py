"""``sam-backend warm --project N``: encode every image of a Label Studio project ahead of the annotators.

The command reads the project's label config (to know which task field holds the image) and its tasks
through Label Studio's API, with the same URL and token handling as task images, then hands one warm-up
job per task to where the servers will find the result:

- with ``REDIS_URL``: jobs go on the shared rq queue; every backend process consumes it, and ``--local``
  makes this command consume it too (it loads the model itself — useful on a GPU box next to CPU-only
  servers). The embeddings land in Redis, where every server looks first.
- with ``--backend URL`` and no Redis: the tasks are posted to that backend's ``/webhook`` as Label
  Studio's own ``TASKS_CREATED`` event, and that server warms its in-process cache; the command then
  follows the backend's ``sam_backend_warmup_queue_depth`` on ``/metrics`` (jobs waiting or running) until
  it reaches 0, so it does not exit while the encodes it started still run. Without Redis each gunicorn
  worker keeps its own queue and cache, so with WORKERS > 1 the gauge is the answering worker's.

Progress bars show the listing, the queueing and (``--wait``, the default) the encoding.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import requests
from tqdm import tqdm

from backend.config import Settings
from backend.errors import BackendError
from backend.image_fetch import ImageFetcher
from backend.label_studio import Project
from backend.warmup import Warmer, WarmupJob

log = logging.getLogger(__name__)

WEBHOOK_CHUNK = 50
BACKEND_POLL_S = 0.5
DEPTH_METRIC = "sam_backend_warmup_queue_depth"


class WarmError(BackendError):
    """The project cannot be warmed as asked; the message says what to change."""

    status = 400


def warm_project(settings: Settings, project_id: int, *, backend_url: str | None = None, local: bool = False,
                 wait: bool = True, progress: bool = True) -> int:
    """Queue (and by default wait for) the encoding of every image of the project; returns the jobs queued."""
    if not settings.redis_url and not backend_url:
        raise WarmError(
            "warming a project needs somewhere to keep the embeddings that the servers can see: set REDIS_URL "
            "(the same Redis as the backend servers), or pass --backend http://<backend>:9090 to have a running "
            "backend warm its own cache.")
    fetcher = ImageFetcher.from_settings(settings)
    project = fetcher.label_studio.read_project(project_id, progress)
    if not project.tasks:
        log.warning("project %s has no tasks", project_id)
        return 0
    if settings.redis_url:
        return _warm_through_redis(settings, project, fetcher, local=local, wait=wait, progress=progress)
    assert backend_url is not None
    return warm_through_backend(settings, project, backend_url, wait=wait, progress=progress)


def warm_through_backend(settings: Settings, project: Project, backend_url: str, *, wait: bool = True,
                         progress: bool = True) -> int:
    """The project's tasks posted to a running backend's /webhook, then (``wait``) its warm-up followed to the end."""
    queued = _post_to_backend(settings, project, backend_url, progress)
    if wait:
        _wait_for_backend(settings, backend_url, queued, progress)
    return queued


def _jobs(project: Project, settings: Settings) -> list[WarmupJob]:
    # No token in the jobs: each consumer uses its own LABEL_STUDIO_API_KEY (backend.warmup).
    return [WarmupJob(task=task, value_key=project.value_key, label_studio_url=settings.label_studio_url or None)
            for task in project.tasks]


def _warm_through_redis(settings: Settings, project: Project, fetcher: ImageFetcher, *, local: bool, wait: bool,
                        progress: bool) -> int:
    warmer = Warmer(redis_url=settings.redis_url, consume=False)
    queued = warmer.submit(_jobs(project, settings))
    log.info("queued %d of %d tasks of project %s for warm-up", queued, len(project.tasks), project.id)
    if local:
        from backend.segmenter import Segmenter
        from backend.warmup import make_encoder

        segmenter = Segmenter.from_settings(settings)
        segmenter.load()
        Warmer(redis_url=settings.redis_url, encoder=make_encoder(segmenter, fetcher)).start()
    if wait or local:
        _wait_for_queue(warmer, queued, progress)
    return queued


def _wait_for_queue(warmer: Warmer, queued: int, progress: bool) -> None:
    """Follow the shared queue until it is empty (whoever consumes it)."""
    with tqdm(total=queued, desc="encoding", unit="image", disable=not progress) as bar:
        done = 0
        while True:
            depth = warmer.depth() + warmer.running()
            now_done = max(0, queued - depth)
            bar.update(now_done - done)
            done = now_done
            if depth == 0:
                return
            time.sleep(0.5)


def _wait_for_backend(settings: Settings, backend_url: str, queued: int, progress: bool,
                      poll_s: float = BACKEND_POLL_S) -> None:
    """Follow the backend's unfinished warm-up jobs (``/metrics``) until none is left; WarmError if it goes away."""
    url = backend_url.rstrip("/") + "/metrics"
    with tqdm(total=queued, desc="encoding", unit="image", disable=not progress) as bar:
        done = 0
        while True:
            left = _backend_depth(url, settings)
            now_done = max(0, queued - left)
            bar.update(max(0, now_done - done))
            done = max(done, now_done)
            if left == 0:
                return
            time.sleep(poll_s)


def _backend_depth(url: str, settings: Settings) -> int:
    try:
        response = requests.get(url, auth=settings.basic_auth, timeout=10)
    except requests.RequestException as error:
        raise WarmError(f"lost the backend at {url} while its warm-up ran ({error}); the encodes it had "
                        "queued go on there if it is still up") from None
    if response.status_code != 200:
        raise WarmError(f"the backend at {url} answered HTTP {response.status_code} while its warm-up ran; "
                        "the encodes it had queued go on in the background")
    for line in response.text.splitlines():
        if line.startswith(DEPTH_METRIC + " "):
            return int(float(line.split()[1]))
    raise WarmError(f"the backend at {url} reports no {DEPTH_METRIC} (SAM_WARMUP off there?); "
                    "cannot follow its warm-up")


def _post_to_backend(settings: Settings, project: Project, backend_url: str, progress: bool) -> int:
    """Post the tasks to the backend's /webhook; returns how many images it queued (its answers' ``queued``)."""
    auth = settings.basic_auth
    url = backend_url.rstrip("/") + "/webhook"
    queued = 0
    with tqdm(total=len(project.tasks), desc="sending to backend", unit="task", disable=not progress) as bar:
        for start in range(0, len(project.tasks), WEBHOOK_CHUNK):
            chunk = project.tasks[start:start + WEBHOOK_CHUNK]
            body: dict[str, Any] = {"action": "TASKS_CREATED", "tasks": chunk,
                    "project": {"id": project.id, "label_config": project.label_config}}
            try:
                response = requests.post(url, json=body, auth=auth, timeout=30)
            except requests.RequestException as error:
                raise WarmError(f"could not reach the backend at {url}: {error}") from None
            if response.status_code != 200:
                raise WarmError(f"the backend at {url} answered HTTP {response.status_code}: {response.text[:300]}")
            answer = response.json() if response.headers.get("Content-Type", "").startswith("application/json") else {}
            count = answer.get("queued") if isinstance(answer, dict) else None
            queued += count if isinstance(count, int) and not isinstance(count, bool) else len(chunk)
            bar.update(len(chunk))
    return queued
