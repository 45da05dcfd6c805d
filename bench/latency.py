"""Click latency of the real backend over HTTP, as Label Studio's annotators see it.

For each model it starts ``tests.image_server.FakeLabelStudio`` (Label Studio's token-checked
``/data/upload``) and a real ``sam-backend serve`` (gunicorn, 1 worker, THREADS >= annotators) on a seeded
random checkpoint in the official format, then drives it with the request bodies Label Studio 1.23.2 sends
(the recorded fixtures with our images and click positions). For every model x image size x number of
concurrent annotators (each on images of their own, all starting together) it times three scenarios:

* cold click: the first click on an image the backend has never seen (image download + encoder + decoder);
* warm click: ``--clicks`` later clicks on the same image (the embedding cache makes them decoder-only),
  closed-loop: each annotator sends the next click as soon as the last is answered, so every annotator
  always has a click in flight (the stress case);
* warm paced (with ``--pace SECONDS``): ``--pace-clicks`` warm clicks per annotator, each after a seeded
  think time of 0.5-1.5 x SECONDS, as a person placing points clicks (a fast annotator: about once a second);
* warm-up then click: the /predict with ``context: null`` that Label Studio sends when an annotator opens a
  task, then a wait, then the first click. ``--warmup-wait metrics`` (default) polls /metrics until the
  encoder has run once per opened image (the wait is reported: it is the think time an annotator needs for
  the first click to be warm); ``--warmup-wait SECONDS`` waits a fixed think time instead.

Every click is one positive keypoint (the UI's click body), so the scenarios do the same decoder work
and differ only in whether the embedding was there. Client times are wall-clock times of the whole HTTP
request. Server times come from the backend's own /metrics, read before and after each phase: the mean and
the bucket-interpolated p50 (``~``) of ``sam_backend_request_seconds`` (the /predict request), and of
``sam_backend_decoder_seconds`` / ``sam_backend_encoder_seconds``, plus the encodes that ran in the phase.

    .venv/bin/python -m bench.latency                                  # defaults: about 15 min on 2 CPU cores
    .venv/bin/python -m bench.latency --models vit_t --sizes 1024x768 --annotators 1 --clicks 20
    .venv/bin/python -m bench.latency --checkpoint vit_b=/models/sam_vit_b_01ec64.pth --device cuda --json out.json

Cold and warm-up clicks cost one encode each, and a ViT-B encode takes 5-40 s on a shared 2-core CPU, so
ViT-B makes one per annotator (with 1 annotator p50 = p95 = that one sample; the output says so) and runs 1
and 4 annotators; MobileSAM makes at least 3 per cell and runs 1, 4 and 8. ``--cold-rounds`` and
``--annotators`` override both. Goals, checked on the last lines: on a warm cache the server
time of a click is dominated by the decoder, with a MobileSAM click <= 100 ms p50 at 1024x768 (1 annotator,
2-core CPU); after the warm-up the first click costs no more than a warm click (judged with 25 % room for
timing noise). Weights are random: masks are meaningless, only times are.

``--masks smooth,speckled`` (default both) picks the weights: speckled are the plain random ones (masks of
salt-and-pepper, brush RLEs of 0.3-1.4 MB), smooth are ``testsupport.smooth_checkpoints`` (one blob per click,
RLEs of a few KB, as real weights give). For each model, masks and size the run also times Meta's bare
``SamPredictor.predict`` (``segment_anything`` / ``mobile_sam``, the same weights, image and clicks, in this
process while the server is idle): the in-run yardstick. With several annotators every warm click's mask is
checked against the same request sent alone afterwards. Goals on the last lines: the warm click's p50 at
1024x768 <= 0.6 x Meta's predict, at 4000x3000 <= 1.0 x; with 8 annotators the warm p95 <= 3 x one annotator's,
every mask identical to the one sent alone. ``--pace`` adds the same comparison for paced annotators.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import hashlib
import io
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests

from testsupport.backend import SAM_BACKEND
from testsupport.image_server import CloudStorage, FakeLabelStudio
from testsupport.paths import FIXTURES_DIR

FIXTURES = Path(os.environ.get("SAM_FIXTURES_DIR", FIXTURES_DIR))
MODELS = ("vit_t", "vit_b")
MODEL_TITLES = {"vit_t": "MobileSAM", "vit_b": "ViT-B"}
SIZES = {"1024x768": (1024, 768), "4000x3000": (4000, 3000)}
ANNOTATORS = (1, 4, 8)
# Every annotator of a cold or warm-up phase costs one encode, and a ViT-B encode takes 5-40 s on a busy 2-core
# CPU: by default ViT-B runs without the 8-annotator cells (--annotators 1,4,8 asks for them).
DEFAULT_ANNOTATORS = {"vit_b": (1, 4)}
# First clicks (cold, warm-up+click) per cell by default: rounds of one per annotator until there are this many.
# One for ViT-B (an encode each); three elsewhere, so the 1-annotator cells do not rest on a single sample.
DEFAULT_FIRST_CLICKS = {"vit_b": 1}
FIRST_CLICKS = 3
TOKEN = "benchtoken0123456789abcdef"  # the legacy token the fake Label Studio accepts
PROJECT = 9
SEED = 0
CLICK_TIMEOUT_S = 600.0  # a cold ViT-B click behind 7 others on a busy CPU takes minutes
GOAL_WARM_CLICK_S = 0.100  # MobileSAM warm click p50 at 1024x768
GOAL_FIRST_CLICK_RATIO = 1.25  # "no more than a warm click", with room for timing noise
MASKS = ("smooth", "speckled")
GOAL_META_RATIO = {"1024x768": 0.6, "4000x3000": 1.0}  # warm click p50 / Meta's bare predict p50
GOAL_CONCURRENT_P95_RATIO = 3.0  # 8 annotators' warm p95 / one annotator's
META_ROUNDS = 3  # Meta's predict: each warm click's point this many times


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class BenchError(Exception):
    """A failure that ends the run with one clear line (no traceback)."""


# ------------------------------------------------------------------------------------------------------------
# images: distinct JPEGs (a distinct sha256 = an image the backend has never seen), made before the timing
class Images:
    """Photo-like JPEGs of one size; every index gives different bytes, made once and reused across models.

    JPEG because that is what 4000x3000 camera pictures are; quality 90 keeps them at a few MB. Each server
    starts with an empty cache, so reusing the same bytes for the next model is still a cold image for it.
    """

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self._base: np.ndarray | None = None
        self._made: dict[int, bytes] = {}

    def base(self) -> np.ndarray:
        if self._base is None:
            from testsupport.checkpoints import make_image

            self._base = make_image(self.height, self.width, seed=SEED)
        return self._base

    def jpeg(self, index: int) -> bytes:
        if index not in self._made:
            from PIL import Image

            array = self.base().copy()
            rng = np.random.default_rng(1000 + index)
            side = max(16, min(self.width, self.height) // 6)
            y, x = rng.integers(0, self.height - side), rng.integers(0, self.width - side)
            array[y:y + side, x:x + side] = rng.integers(0, 256, 3, dtype=np.uint8)  # an object of its own
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, "JPEG", quality=90)
            self._made[index] = buffer.getvalue()
        return self._made[index]


# ------------------------------------------------------------------------------------------------------------
# Label Studio's request bodies
def fixture_body(name: str) -> dict[str, Any]:
    path = FIXTURES / name
    try:
        return json.loads(path.read_text())["body"]
    except OSError as error:
        raise BenchError(f"cannot read the recorded Label Studio request {path} ({error.strerror}); set "
                         "SAM_FIXTURES_DIR to the folder of the label-studio-1.23.2 fixtures") from None


@dataclass(frozen=True)
class Bodies:
    """Templates of the three requests, from the recorded Label Studio 1.23.2 fixtures."""

    setup: dict[str, Any]
    click: dict[str, Any]
    open_task: dict[str, Any]

    @classmethod
    def load(cls) -> Bodies:
        click = fixture_body("predict_interactive_keypoint_ui_click.json")
        click["tasks"][0]["predictions"] = []  # a recorded 320x240 mask: not part of our images
        batch = fixture_body("predict_batch_two_tasks.json")
        batch["tasks"] = batch["tasks"][:1]  # opening one task: that task, no context
        return cls(fixture_body("setup.json"), click, batch)

    def task(self, template: dict[str, Any], task_id: int, image_path: str) -> dict[str, Any]:
        task = copy.deepcopy(template)
        task.update(id=task_id, inner_id=task_id, project=PROJECT, data={"image": image_path})
        return task

    def click_body(self, task_id: int, image_path: str, size: tuple[int, int], x: float, y: float) -> dict[str, Any]:
        body = copy.deepcopy(self.click)
        body["tasks"] = [self.task(self.click["tasks"][0], task_id, image_path)]
        (region,) = body["params"]["context"]["result"]
        region.update(original_width=size[0], original_height=size[1], id=f"kp{task_id}x{x:.0f}y{y:.0f}")
        region["value"].update(x=x, y=y)
        return body

    def open_body(self, task_id: int, image_path: str) -> dict[str, Any]:
        body = copy.deepcopy(self.open_task)
        body["tasks"] = [self.task(self.open_task["tasks"][0], task_id, image_path)]
        body["params"]["context"] = None
        return body


def click_point(index: int) -> tuple[float, float]:
    """A keypoint in percent, different for every click, well inside the image."""
    rng = np.random.default_rng(index)
    return float(rng.uniform(10, 90)), float(rng.uniform(10, 90))


# ------------------------------------------------------------------------------------------------------------
# /metrics
Snapshot = dict[str, dict[str, Any]]  # histogram name -> {"buckets": [(le, cumulative)], "sum", "count"}
HISTOGRAMS = {"request": "sam_backend_request_seconds", "decoder": "sam_backend_decoder_seconds",
              "encoder": "sam_backend_encoder_seconds"}
WARMUP_JOBS = "sam_backend_warmup_jobs"  # counter of warm-up jobs queued, by source


def parse_metrics(text: str) -> Snapshot:
    """The three histograms of interest (request: the /predict endpoint only) and the warm-up jobs queued."""
    from prometheus_client.parser import text_string_to_metric_families

    found: Snapshot = {"warmup_jobs": {"count": 0.0}}
    for family in text_string_to_metric_families(text):
        if family.name == WARMUP_JOBS:
            found["warmup_jobs"]["count"] = sum(s.value for s in family.samples if s.name.endswith("_total"))
            continue
        key = next((k for k, name in HISTOGRAMS.items() if family.name == name), None)
        if key is None:
            continue
        buckets: list[tuple[float, float]] = []
        total = count = 0.0
        for sample in family.samples:
            if key == "request" and sample.labels.get("endpoint") != "/predict":
                continue
            if sample.name.endswith("_bucket"):
                buckets.append((float(sample.labels["le"]), sample.value))
            elif sample.name.endswith("_sum"):
                total = sample.value
            elif sample.name.endswith("_count"):
                count = sample.value
        found[key] = {"buckets": sorted(buckets), "sum": total, "count": count}
    return found


def histogram_delta(windows: list[tuple[Snapshot, Snapshot]], key: str) -> dict[str, Any]:
    """What the histogram recorded inside the (before, after) windows: count, mean, p50/p95 from the buckets."""
    empty = {"buckets": [], "sum": 0.0, "count": 0.0}
    buckets: dict[float, float] = {}
    total = count = 0.0
    for before, after in windows:
        new, old = after.get(key, empty), before.get(key, empty)
        old_buckets = dict(old["buckets"])
        for le, value in new["buckets"]:
            buckets[le] = buckets.get(le, 0.0) + value - old_buckets.get(le, 0.0)
        total += new["sum"] - old["sum"]
        count += new["count"] - old["count"]
    ordered = sorted(buckets.items())
    n = int(round(count))
    return {"count": n, "mean_s": total / n if n else None, "p50_s": bucket_quantile(ordered, 0.5),
            "p95_s": bucket_quantile(ordered, 0.95)}


def bucket_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus' histogram_quantile: linear inside the bucket that holds the rank (an estimate)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(le):
                return lower  # beyond the largest finite bucket: its bound is all we know
            inside = cumulative - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = le, cumulative
    return lower


# ------------------------------------------------------------------------------------------------------------
# the server
class Server:
    """``sam-backend serve`` in its own process group, so gunicorn's master and worker die together."""

    def __init__(self, checkpoint: Path, threads: int, device: str, torch_threads: int, log_path: Path,
                 redis_url: str | None) -> None:
        self.log_path = log_path
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SAM_", "BASIC_AUTH_", "LABEL_STUDIO_", "REDIS_URL", "WORKERS", "THREADS"))}
        env.update(SAM_TORCH_THREADS=str(torch_threads), LOG_LEVEL="info", REDIS_URL=redis_url or "")
        with log_path.open("wb") as sink:
            self.process = subprocess.Popen(
                [str(SAM_BACKEND), "serve", "--host", "127.0.0.1", "--port", str(port), "--checkpoint",
                 str(checkpoint), "--device", device, "--workers", "1", "--threads", str(threads)],
                env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
            )
        _RUNNING.add(self)

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise BenchError(f"the server exited with status {self.process.returncode}; the end of its log "
                             f"({self.log_path}):\n{self.log_tail()}")

    def wait_loaded(self, timeout_s: float) -> dict[str, Any]:
        """Wait for /health to say the model is loaded (it loads in the background after the fork)."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_alive()
            try:
                health = requests.get(self.url + "/health", timeout=5).json()
                if health.get("model_error"):
                    raise BenchError(f"the server could not load the model: {health['model_error']}")
                if health.get("model_loaded"):
                    return health
            except (requests.ConnectionError, requests.Timeout, ValueError):
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"the model was not loaded within {timeout_s:.0f} s; server log:\n{self.log_tail()}")
            time.sleep(0.2)

    def metrics(self) -> Snapshot:
        response = requests.get(self.url + "/metrics", timeout=30)
        response.raise_for_status()
        return parse_metrics(response.text)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL: a benchmark stopped mid-phase must not wait out gunicorn's graceful 30 s."""
        _RUNNING.discard(self)
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                pass


_RUNNING: set[Server] = set()


@atexit.register
def _stop_servers() -> None:
    """Whatever ends the run (an error, Ctrl-C, SIGTERM), no server is left behind."""
    for server in list(_RUNNING):
        server.stop()


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # the same clean stop as Ctrl-C


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------------------------
# checkpoints
def make_checkpoint(name: str, directory: Path, masks: str = "speckled") -> Path:
    """A seeded random checkpoint of an official architecture in its official file format (reused if there).

    ``masks`` "smooth": ``testsupport.smooth_checkpoints`` (one blob per click) instead of plain random weights.
    """
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    suffix = "_smooth" if masks == "smooth" else "_random"
    path = directory / (f"mobile_sam{suffix}.pt" if name == "vit_t" else f"sam_{name}{suffix}.pth")
    if path.is_file():
        return path
    log(f"making a random {MODEL_TITLES.get(name, name)} checkpoint at {path} ...")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    partial = path.with_suffix(".partial")
    try:
        if masks == "smooth" and name in ("vit_t", "vit_b"):
            from testsupport.smooth_checkpoints import make_smooth_checkpoint

            make_smooth_checkpoint(partial, name, SEED)
        elif name == "vit_t":
            from testsupport.mobilesam_checkpoints import make_mobile_sam_checkpoint

            make_mobile_sam_checkpoint(partial, "vit_t", SEED)
        elif name == "vit_b":
            from testsupport.checkpoints import official_sam, save

            save(official_sam("vit_b", SEED), partial)
        else:
            raise BenchError(f"no random checkpoint recipe for {name!r}: pass --checkpoint {name}=PATH")
    finally:
        torch.set_num_threads(threads)
    partial.rename(path)
    return path


# ------------------------------------------------------------------------------------------------------------
# the annotators
@dataclass
class Sample:
    seconds: float
    status: int
    error: str | None = None
    mask: str | None = None  # a digest of the first region's RLE: "the same mask" across requests
    nbytes: int = 0  # the response body


@dataclass
class Row:
    """One scenario of one model x size x annotators: client times and what /metrics saw meanwhile."""

    model: str
    size: str
    annotators: int
    scenario: str
    client_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    server: dict[str, Any] = field(default_factory=dict)  # request / decoder / encoder histogram deltas
    waits: list[dict[str, Any]] = field(default_factory=list)  # warm-up: how they waited before the first click
    open_s: list[float] = field(default_factory=list)  # warm-up: the no-context /predict of opening the task
    identical: list[int] = field(default_factory=lambda: [0, 0])  # concurrent masks equal to alone: [same, checked]
    nbytes: list[int] = field(default_factory=list)  # response sizes

    def p(self, q: float) -> float | None:
        return percentile(self.client_s, q)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.asarray(values), q * 100, method="linear"))


class Annotator:
    """One person in the editor: a keep-alive connection like the browser's path through Label Studio."""

    def __init__(self, server: Server, bodies: Bodies) -> None:
        self.server, self.bodies = server, bodies
        self.session = requests.Session()

    def post(self, path: str, body: dict[str, Any]) -> Sample:
        started = time.perf_counter()
        try:
            response = self.session.post(self.server.url + path, json=body, timeout=CLICK_TIMEOUT_S)
        except requests.RequestException as error:
            return Sample(time.perf_counter() - started, 0, f"{type(error).__name__}: {error}")
        seconds = time.perf_counter() - started
        if response.status_code != 200:
            return Sample(seconds, response.status_code, _error_text(response))
        try:
            results = response.json().get("results") or []
        except (ValueError, AttributeError):
            return Sample(seconds, response.status_code, f"HTTP 200 with a body that is not the JSON of "
                                                         f"/predict: {response.text[:200]!r}")
        if path == "/predict" and body["params"].get("context") and not (results and results[0].get("result")):
            return Sample(seconds, response.status_code, "a click got no region back")
        mask = None
        if results and results[0].get("result"):
            rle = results[0]["result"][0].get("value", {}).get("rle")
            mask = hashlib.sha256(json.dumps(rle).encode()).hexdigest()[:16] if rle is not None else None
        return Sample(seconds, response.status_code, mask=mask, nbytes=len(response.content))


def _error_text(response: requests.Response) -> str:
    try:
        message = response.json().get("message")
    except ValueError:
        message = None
    return f"HTTP {response.status_code}: {message or response.text[:200]}"


def together(count: int, work: Callable[[int, threading.Barrier], Any]) -> list[Any]:
    """Run ``work(i, barrier)`` for i in range(count) on threads of their own; the barrier lines them up."""
    barrier = threading.Barrier(count)
    pool = ThreadPoolExecutor(max_workers=count)
    try:
        return list(pool.map(lambda i: work(i, barrier), range(count)))
    finally:
        # On Ctrl-C / SIGTERM do not wait for clicks in flight: stopping the server ends them.
        pool.shutdown(wait=False, cancel_futures=True)


class Cell:
    """The three scenarios for one model x size x number of annotators on one running server."""

    def __init__(self, model: str, size_name: str, count: int, server: Server, bodies: Bodies, images: Images,
                 fake_ls: FakeLabelStudio, next_image: Iterator[int], args: argparse.Namespace,
                 title: str | None = None) -> None:
        self.model, self.size_name, self.count = model, size_name, count
        self.title = title or MODEL_TITLES.get(model, model)
        self.tasks: list[tuple[int, str]] = []
        self.server, self.bodies, self.images, self.fake_ls = server, bodies, images, fake_ls
        self.next_image, self.args = next_image, args
        self.size = (images.width, images.height)
        self.annotators = [Annotator(server, bodies) for _ in range(count)]
        self.rounds = cold_rounds(model, count, args)

    def publish(self) -> list[tuple[int, str]]:
        """One never-seen image per annotator, uploaded to the fake Label Studio: (task id, /data path).

        Named as Label Studio names an upload (``<8 hex>-<file name>``, its ``upload_name_generator``), so the
        backend treats it as Label Studio's immutable upload it is, as it does in production.
        """
        tasks = []
        for _ in range(self.count):
            index = next(self.next_image)
            prefix = hashlib.sha256(f"upload-{index}".encode()).hexdigest()[:8]
            name = f"{prefix}-{self.size_name}-{index}.jpg"
            self.fake_ls.files[name] = (self.images.jpeg(index), "image/jpeg")
            tasks.append((100_000 + index, f"/data/upload/{PROJECT}/{name}"))
        return tasks

    def click(self, who: int, task: tuple[int, str], point_index: int) -> Sample:
        x, y = click_point(point_index)
        return self.annotators[who].post("/predict", self.bodies.click_body(task[0], task[1], self.size, x, y))

    def first_clicks(self, tasks: list[tuple[int, str]]) -> list[Sample]:
        """Every annotator clicks once on their task, all at the same moment."""

        def first(i: int, gate: threading.Barrier) -> Sample:
            gate.wait()
            return self.click(i, tasks[i], 0)

        return together(self.count, first)

    @contextmanager
    def measured(self, row: Row, windows: list[tuple[Snapshot, Snapshot]]) -> Iterator[None]:
        """Add what /metrics records meanwhile to ``row.server`` (over all ``windows`` of the row so far)."""
        before = self.server.metrics()
        yield
        windows.append((before, self.server.metrics()))
        row.server = {key: histogram_delta(windows, key) for key in HISTOGRAMS}

    def row(self, scenario: str) -> Row:
        return Row(self.title, self.size_name, self.count, scenario)

    @staticmethod
    def add(row: Row, samples: list[Sample]) -> None:
        for sample in samples:
            if sample.error is None:
                row.client_s.append(sample.seconds)
                row.nbytes.append(sample.nbytes)
            else:
                row.errors.append(sample.error)

    def run(self) -> list[Row]:
        cold, warm = self.row("cold"), self.row("warm")
        tasks: list[tuple[int, str]] = []
        with self.measured(cold, []):
            for _ in range(self.rounds):
                tasks = self.publish()
                self.add(cold, self.first_clicks(tasks))
        self.server.check_alive()

        def warm_clicks(i: int, gate: threading.Barrier) -> list[Sample]:
            gate.wait()
            return [self.click(i, tasks[i], k) for k in range(1, self.args.clicks + 1)]

        with self.measured(warm, []):
            concurrent = together(self.count, warm_clicks)
            for samples in concurrent:
                self.add(warm, samples)
        self.server.check_alive()
        self.tasks = tasks
        rows = [cold, warm]
        paced: list[list[Sample]] = []
        if self.args.pace is not None:
            rows.append(row := self.row("warm paced"))
            with self.measured(row, []):
                paced = together(self.count, lambda i, gate: self.paced_clicks(i, tasks[i], gate))
                for samples in paced:
                    self.add(row, samples)
            self.server.check_alive()
        if self.count > 1:  # the same clicks again, one at a time: the masks must not depend on the company
            alone: dict[tuple[int, int], Sample] = {}
            for checked, runs in ((warm, concurrent), (rows[-1], paced)):
                for i, samples in enumerate(runs):
                    for k, sample in enumerate(samples):
                        point = k % self.args.clicks + 1
                        if (i, point) not in alone:
                            alone[i, point] = self.click(i, tasks[i], point)
                        checked.identical[1] += 1
                        checked.identical[0] += int(sample.mask is not None and alone[i, point].mask == sample.mask)
        if self.args.warmup:
            rows.append(self.warmup_then_click())
        return rows

    def paced_clicks(self, who: int, task: tuple[int, str], gate: threading.Barrier) -> list[Sample]:
        """``--pace-clicks`` warm clicks of one annotator, each after a think time, as a person places points.

        Think times are uniform in 0.5-1.5 x ``--pace`` seconds, seeded per annotator (the same in every
        run), and come before each click, so the annotators drift apart as people do instead of clicking
        in step. The points are those of the closed-loop warm clicks, so each mask can be checked against
        the same click sent alone.
        """
        think = np.random.default_rng([SEED, self.count, who]).uniform(0.5, 1.5, self.args.pace_clicks)
        gate.wait()
        samples = []
        for k in range(self.args.pace_clicks):
            time.sleep(float(think[k]) * self.args.pace)
            samples.append(self.click(who, task, k % self.args.clicks + 1))
        return samples

    def warmup_then_click(self) -> Row:
        row = self.row("warm-up+click")
        windows: list[tuple[Snapshot, Snapshot]] = []  # the clicks only: not the opening nor the wait
        opened = self.server.metrics()
        for _ in range(self.rounds):
            tasks = self.publish()
            started = time.perf_counter()

            def open_task(i: int, gate: threading.Barrier, tasks: list[tuple[int, str]] = tasks) -> Sample:
                gate.wait()
                return self.annotators[i].post("/predict", self.bodies.open_body(*tasks[i]))

            for sample in together(self.count, open_task):
                if sample.error is None:
                    row.open_s.append(sample.seconds)
                else:
                    row.errors.append(f"opening the task: {sample.error}")
            row.waits.append(self.wait_for_warmup(opened, started))
            with self.measured(row, windows):
                self.add(row, self.first_clicks(tasks))
            opened = self.server.metrics()
        return row

    def wait_for_warmup(self, before: Snapshot, started: float) -> dict[str, Any]:
        """Wait as an annotator would before the first click: until the encodes finished, or a think time.

        A server that queued no warm-up job for the opened tasks (SAM_WARMUP off, an older backend) is not
        waited for: the click goes at once and shows what the annotator would get.
        """
        now = self.server.metrics()
        queued = int(now["warmup_jobs"]["count"] - before["warmup_jobs"]["count"])
        if queued == 0:
            return {"mode": "none-queued", "seconds": time.perf_counter() - started, "queued": 0}
        if self.args.warmup_wait != "metrics":
            time.sleep(max(0.0, float(self.args.warmup_wait) - (time.perf_counter() - started)))
            return {"mode": "think", "seconds": time.perf_counter() - started, "queued": queued}
        encodes_before = before.get("encoder", {}).get("count", 0.0)
        deadline = started + self.args.warmup_timeout
        while True:
            done = self.server.metrics().get("encoder", {}).get("count", 0.0) - encodes_before
            if done >= self.count:
                return {"mode": "metrics", "seconds": time.perf_counter() - started, "queued": queued,
                        "encodes": int(done)}
            if time.perf_counter() > deadline:
                return {"mode": "metrics-timeout", "seconds": time.perf_counter() - started, "queued": queued,
                        "encodes": int(done)}
            self.server.check_alive()
            time.sleep(0.05)


# ------------------------------------------------------------------------------------------------------------
# the run
def run_model(model: str, checkpoint: Path, args: argparse.Namespace, bodies: Bodies,
              images: dict[str, Images], workdir: Path, masks: str = "speckled") -> list[Row]:
    title = f"{MODEL_TITLES.get(model, model)}/{masks}"
    fake_ls = FakeLabelStudio(CloudStorage(), legacy_token=TOKEN)
    threads = max(4, max(annotator_counts(model, args)))
    server = Server(checkpoint, threads, args.device, args.torch_threads, workdir / f"server-{model}-{masks}.log",
                    args.redis_url)
    rows: list[Row] = []
    try:
        log(f"{MODEL_TITLES.get(model, model)}: starting sam-backend serve (1 worker, {threads} threads) on "
            f"{checkpoint} ...")
        health = server.wait_loaded(args.load_timeout)
        setup = copy.deepcopy(bodies.setup)
        setup.update(hostname=fake_ls.url, access_token=TOKEN)
        response = requests.post(server.url + "/setup", json=setup, timeout=30)
        if response.status_code != 200:
            raise BenchError(f"/setup was refused: {_error_text(response)}")
        log(f"  model {health['model_version']} loaded; load average {_load()}")
        counter = iter(range(10**9))
        for size_name in args.sizes:
            for count in annotator_counts(model, args):
                started = time.perf_counter()
                cell = Cell(model, size_name, count, server, bodies, images[size_name], fake_ls, counter, args,
                            title=title)
                cell_rows = cell.run()
                if count == annotator_counts(model, args)[0] and args.meta:
                    cell_rows.extend(meta_predict_rows(model, checkpoint, title, size_name, images[size_name],
                                                       cell.tasks[0], args))
                for row in cell_rows:
                    log("  " + format_row(row))
                log(f"  ({time.perf_counter() - started:.0f} s, load average {_load()})")
                rows.extend(cell_rows)
    finally:
        server.stop()
        fake_ls.close()
        fake_ls.cloud.close()
    return rows


_REFERENCES: dict[Path, Any] = {}


def reference_predictor(model: str, checkpoint: Path) -> Any:
    """Meta's ``SamPredictor`` (MobileSAM's for vit_t) holding the checkpoint's weights, built once per file."""
    if checkpoint not in _REFERENCES:
        if model == "vit_t":
            from mobile_sam import SamPredictor, sam_model_registry
        else:
            from segment_anything import SamPredictor, sam_model_registry  # type: ignore[no-redef]
        _REFERENCES.clear()  # one at a time: a ViT-B reference is 375 MB
        _REFERENCES[checkpoint] = SamPredictor(sam_model_registry[model](checkpoint=str(checkpoint)).eval())
    return _REFERENCES[checkpoint]


def meta_predict_rows(model: str, checkpoint: Path, title: str, size_name: str, images: Images,
                      task: tuple[int, str], args: argparse.Namespace) -> list[Row]:
    """Meta's bare ``predict`` on the image and points the warm clicks used (``set_image`` untimed).

    Two rows: "meta predict" with PyTorch's default intra-op threads (the cores), as Meta's predictor runs
    out of the box, the yardstick of the goals; "meta 1 thr" with one thread, as our decodes run. On a
    machine that other processes load, the default's OpenMP threads wait for each other, and the one-thread
    row is the steadier reference. The two alternate click by click, so both see the same load.
    """
    import torch
    from PIL import Image

    rows = {0: Row(title, size_name, 1, "meta predict"), 1: Row(title, size_name, 1, "meta 1 thr")}
    name = task[1].rsplit("/", 1)[-1]
    index = int(name.rsplit("-", 1)[-1].split(".")[0])
    image = np.asarray(Image.open(io.BytesIO(images.jpeg(index))).convert("RGB"))
    predictor = reference_predictor(model, checkpoint)
    default_threads = torch.get_num_threads()
    try:
        with torch.inference_mode():
            predictor.set_image(image)
            height, width = image.shape[:2]
            for _ in range(META_ROUNDS):
                for k in range(1, args.clicks + 1):
                    x, y = click_point(k)
                    point = np.array([[x / 100 * width, y / 100 * height]])
                    for threads, row in rows.items():
                        torch.set_num_threads(threads or default_threads)
                        started = time.perf_counter()
                        predictor.predict(point_coords=point, point_labels=np.array([1]), multimask_output=True)
                        row.client_s.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(default_threads)
    return list(rows.values())


def annotator_counts(model: str, args: argparse.Namespace) -> list[int]:
    """--annotators when given, else the model's default (fewer for ViT-B, whose encodes take seconds)."""
    return args.annotators or list(DEFAULT_ANNOTATORS.get(model, ANNOTATORS))


def cold_rounds(model: str, count: int, args: argparse.Namespace) -> int:
    """--cold-rounds when given, else enough rounds for the model's number of first clicks per cell."""
    return args.cold_rounds or math.ceil(DEFAULT_FIRST_CLICKS.get(model, FIRST_CLICKS) / count)


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def _ms(seconds: float | None, approx: bool = False) -> str:
    if seconds is None:
        return "-"
    return f"{'~' if approx else ''}{seconds * 1000:.0f}"


HEADER = (f"{'model':<9} {'size':<9} {'ann':>3} {'scenario':<13} {'n':>3} {'p50 ms':>8} {'p95 ms':>8} "
          f"{'srv mean':>8} {'srv p50':>8} {'dec mean':>8} {'dec p50':>8} {'enc':>3} {'enc mean':>8}  notes")


def format_row(row: Row) -> str:
    request, decoder, encoder = (row.server.get(k, {}) for k in ("request", "decoder", "encoder"))
    notes = []
    if row.waits:
        labels = {"metrics": "waited for the encodes", "metrics-timeout": "encodes NOT done after",
                  "think": "fixed think time", "none-queued": "NO warm-up queued, clicked after"}
        modes = sorted({w["mode"] for w in row.waits}, key=list(labels).index)
        seconds = sorted(w["seconds"] for w in row.waits)
        low, high = f"{seconds[0]:.1f}", f"{seconds[-1]:.1f}"
        span = low if low == high else f"{low}-{high}"
        notes.append(f"{' / '.join(labels[m] for m in modes)} {span} s; opening p50 "
                     f"{_ms(percentile(row.open_s, 0.5))} ms")
    if len(row.client_s) == 1:
        notes.append("1 sample")
    if row.nbytes:
        notes.append(f"response p50 {np.median(row.nbytes) / 1024:.0f} KiB")
    if row.identical[1]:
        notes.append(f"masks identical to alone {row.identical[0]}/{row.identical[1]}")
    if row.errors:
        notes.append(f"{len(row.errors)} errors: {row.errors[0]}")
    return (f"{row.model:<9} {row.size:<9} {row.annotators:>3} {row.scenario:<13} {len(row.client_s):>3} "
            f"{_ms(row.p(0.5)):>8} {_ms(row.p(0.95)):>8} {_ms(request.get('mean_s')):>8} "
            f"{_ms(request.get('p50_s'), True):>8} {_ms(decoder.get('mean_s')):>8} "
            f"{_ms(decoder.get('p50_s'), True):>8} {encoder.get('count', 0):>3} {_ms(encoder.get('mean_s')):>8}  "
            + "; ".join(notes)).rstrip()


def _identical_verdict(row: Row) -> str:
    """Whether every concurrent mask of ``row`` equalled the same request sent alone, with no errors."""
    same = row.identical[0] == row.identical[1] and not row.errors
    return f"masks identical to alone {row.identical[0]}/{row.identical[1]} {'MET' if same else 'NOT MET'}"


def goals(rows: list[Row]) -> list[str]:
    """The click-latency goals (warm click time, first click after warm-up), judged on the rows that measure them."""
    lines = []
    for row in rows:
        if (row.model.split("/")[0], row.size, row.annotators, row.scenario) == ("MobileSAM", "1024x768", 1, "warm"):
            request, decoder = row.server["request"], row.server["decoder"]
            share = (decoder["mean_s"] / request["mean_s"]) if request["mean_s"] and decoder["mean_s"] else None
            p50 = row.p(0.5)
            met = p50 is not None and p50 <= GOAL_WARM_CLICK_S
            lines.append(f"goal: {row.model} warm click at 1024x768, 1 annotator: client p50 {_ms(p50)} ms "
                         f"(server mean {_ms(request['mean_s'])} ms, decoder mean {_ms(decoder['mean_s'])} ms = "
                         f"{share * 100:.0f}% of it) -> <= {GOAL_WARM_CLICK_S * 1000:.0f} ms "
                         f"{'MET' if met else 'NOT MET'}" if share is not None else
                         f"goal: {row.model} warm click at 1024x768: client p50 {_ms(p50)} ms, no server times")
    warm = {(r.model, r.size, r.annotators): r for r in rows if r.scenario == "warm"}
    meta = {(r.model, r.size): r for r in rows if r.scenario == "meta predict"}
    for (model, size), reference in meta.items():
        ours, theirs = warm.get((model, size, 1)), reference.p(0.5)
        if ours is None or ours.p(0.5) is None or not theirs or size not in GOAL_META_RATIO:
            continue
        ratio = ours.p(0.5) / theirs
        verdict = "MET" if ratio <= GOAL_META_RATIO[size] else "NOT MET"
        lines.append(f"goal: {model} {size} warm click over HTTP p50 {_ms(ours.p(0.5))} ms vs Meta's bare predict "
                     f"p50 {_ms(theirs)} ms = x{ratio:.2f} (<= x{GOAL_META_RATIO[size]}) {verdict}")
    for (model, size, count), row in warm.items():
        single = warm.get((model, size, 1))
        if count != 8 or single is None or not single.p(0.95) or row.p(0.95) is None:
            continue
        ratio = row.p(0.95) / single.p(0.95)
        lines.append(f"goal: {model} {size} 8 annotators warm p95 {_ms(row.p(0.95))} ms vs 1 annotator "
                     f"{_ms(single.p(0.95))} ms = x{ratio:.2f} (<= x{GOAL_CONCURRENT_P95_RATIO}) "
                     f"{'MET' if ratio <= GOAL_CONCURRENT_P95_RATIO else 'NOT MET'}; {_identical_verdict(row)}")
    for row in rows:
        alone = warm.get((row.model, row.size, 1))
        paced_p95, single_p95 = row.p(0.95), alone.p(0.95) if alone is not None else None
        if row.scenario != "warm paced" or row.annotators == 1 or paced_p95 is None or not single_p95:
            continue
        ratio = paced_p95 / single_p95
        lines.append(f"paced: {row.model} {row.size} {row.annotators} annotators with think times warm p95 "
                     f"{_ms(paced_p95)} ms vs 1 annotator closed-loop {_ms(single_p95)} ms = x{ratio:.2f} "
                     f"(x{GOAL_CONCURRENT_P95_RATIO} is the goal's bound, judged on the closed-loop row); "
                     f"{_identical_verdict(row)}")
    for row in rows:
        if row.scenario != "warm-up+click":
            continue
        reference = warm.get((row.model, row.size, row.annotators))
        first, usual = row.p(0.5), reference.p(0.5) if reference else None
        if first is None or not usual:
            continue
        ratio = first / usual
        verdict = "MET" if ratio <= GOAL_FIRST_CLICK_RATIO else "NOT MET"
        lines.append(f"goal: first click after warm-up <= warm click (x{GOAL_FIRST_CLICK_RATIO} for noise): "
                     f"{row.model} {row.size} {row.annotators} ann: {_ms(first)} vs {_ms(usual)} ms p50 "
                     f"= x{ratio:.2f} {verdict}")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: vit_t,vit_b")
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated WxH (default {','.join(SIZES)})")
    parser.add_argument("--annotators", default=None,
                        help="comma-separated counts of concurrent annotators, each on images of their own "
                             f"(default {','.join(map(str, ANNOTATORS))}; for ViT-B "
                             f"{','.join(map(str, DEFAULT_ANNOTATORS['vit_b']))})")
    parser.add_argument("--clicks", type=int, default=5, help="warm clicks per annotator and image (default 5)")
    parser.add_argument("--cold-rounds", type=int, default=None,
                        help="cold clicks and warm-up+clicks per annotator, each an encode (default: ViT-B 1; "
                             f"others enough for {FIRST_CLICKS} per cell, so 3 rounds for 1 annotator)")
    parser.add_argument("--warmup-wait", default="metrics",
                        help="'metrics': poll /metrics until the warm-up encodes finished (default); or a fixed "
                             "think time in seconds between opening a task and the first click")
    parser.add_argument("--warmup-timeout", type=float, default=600.0,
                        help="most seconds to wait for warm-up encodes with --warmup-wait metrics")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="skip the warm-up+click scenario (for a backend without warm-up)")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="MODEL=PATH",
                        help="use this checkpoint for a model instead of a random one (repeatable)")
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="keep (and reuse) the random checkpoints here instead of a temporary folder")
    parser.add_argument("--device", default="cpu", help="SAM_DEVICE of the server: cpu, cuda, cuda:N, auto")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="SAM_TORCH_THREADS of the server (0: PyTorch's default, the core count)")
    parser.add_argument("--redis-url", default=None, help="REDIS_URL of the server (default: none, memory cache)")
    parser.add_argument("--load-timeout", type=float, default=300.0, help="seconds to wait for the model to load")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write every number here")
    parser.add_argument("--masks", default=",".join(MASKS),
                        help="comma-separated random weights: smooth (one blob per click, RLEs of a few KB, "
                             "testsupport.smooth_checkpoints), speckled (plain random, RLEs of 0.3-1.4 MB)")
    parser.add_argument("--pace", type=float, default=None, metavar="SECONDS",
                        help="also time paced annotators (a 'warm paced' row per cell): each waits a think time "
                             "(uniform 0.5-1.5 x SECONDS, seeded) before each warm click, as a person placing "
                             "points does (about 1 s for a fast annotator); the closed-loop warm row, with no "
                             "think time, is the stress case")
    parser.add_argument("--pace-clicks", type=int, default=10,
                        help="paced warm clicks per annotator with --pace (default 10)")
    parser.add_argument("--no-meta", dest="meta", action="store_false",
                        help="skip timing Meta's bare SamPredictor.predict (the yardstick)")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    args.masks = [m.strip() for m in args.masks.split(",") if m.strip()]
    if not args.masks or set(args.masks) - set(MASKS):
        parser.error(f"--masks: choose from {', '.join(MASKS)}")
    for size in args.sizes:
        try:
            width, height = (int(v) for v in size.lower().split("x"))
        except ValueError:
            parser.error(f"--sizes: {size!r} is not WIDTHxHEIGHT")
        if width < 64 or height < 64:
            parser.error(f"--sizes: {size!r} is too small (at least 64x64)")
    if args.annotators is not None:
        try:
            args.annotators = [int(v) for v in args.annotators.split(",") if v.strip()]
        except ValueError:
            parser.error(f"--annotators: {args.annotators!r} is not a list of whole numbers")
        if not args.annotators or min(args.annotators) < 1:
            parser.error("--annotators: counts must be 1 or more")
    if args.clicks < 1 or (args.cold_rounds is not None and args.cold_rounds < 1):
        parser.error("--clicks and --cold-rounds must be 1 or more")
    if args.pace is not None and (not math.isfinite(args.pace) or args.pace < 0):
        parser.error("--pace: a think time of 0 seconds or more")
    if args.pace_clicks < 1:
        parser.error("--pace-clicks must be 1 or more")
    if args.warmup_wait != "metrics":
        try:
            if float(args.warmup_wait) < 0:
                raise ValueError
        except ValueError:
            parser.error(f"--warmup-wait: {args.warmup_wait!r} is neither 'metrics' nor a number of seconds")
    checkpoints = {}
    for item in args.checkpoint:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            parser.error(f"--checkpoint {item!r}: expected MODEL=PATH of an existing file")
        checkpoints[name] = Path(path)
    args.checkpoints = checkpoints
    unknown = [m for m in args.models if m not in MODELS and m not in checkpoints]
    if unknown:
        parser.error(f"--models: no random checkpoint for {', '.join(unknown)} (known: {', '.join(MODELS)}); "
                     "pass --checkpoint MODEL=PATH")
    return args


def to_json(rows: list[Row], args: argparse.Namespace, loads: dict[str, str], seconds: float) -> dict[str, Any]:
    return {
        "environment": {"python": platform.python_version(), "cpus": os.cpu_count(), "device": args.device,
                        "torch_threads": args.torch_threads, "redis_url": bool(args.redis_url),
                        "load_average": loads, "seconds": round(seconds, 1)},
        "settings": {"models": args.models, "sizes": args.sizes,
                     "annotators": {model: annotator_counts(model, args) for model in args.models},
                     "clicks": args.clicks, "cold_rounds": args.cold_rounds, "warmup_wait": args.warmup_wait},
        "rows": [{**asdict(row), "client_p50_s": row.p(0.5), "client_p95_s": row.p(0.95)} for row in rows],
        "goals": goals(rows),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    started = time.perf_counter()
    loads = {"start": _load()}
    log(f"load average at start: {loads['start']} ({os.cpu_count()} CPUs)")
    rows: list[Row] = []
    try:
        if not SAM_BACKEND.is_file():
            raise BenchError(f"{SAM_BACKEND} is missing: install the project in this environment (pip install -e .)")
        bodies = Bodies.load()
        images = {name: Images(*(int(v) for v in name.lower().split("x"))) for name in args.sizes}
        with tempfile.TemporaryDirectory(prefix="sam-latency-") as tmp:
            workdir = Path(tmp)
            checkpoint_dir = args.checkpoint_dir or workdir
            for model in args.models:
                for masks in (["given"] if model in args.checkpoints else args.masks):
                    checkpoint = args.checkpoints.get(model) or make_checkpoint(model, checkpoint_dir, masks)
                    rows.extend(run_model(model, checkpoint, args, bodies, images, workdir, masks))
    except BenchError as error:
        log(f"latency: {error}")
        return 1
    except KeyboardInterrupt:
        log("latency: interrupted")
        return 130
    loads["end"] = _load()
    seconds = time.perf_counter() - started
    print(f"# click latency over HTTP: sam-backend serve, 1 worker, device {args.device}, "
          f"SAM_TORCH_THREADS={args.torch_threads}, {os.cpu_count()} CPUs; load average {loads['start']} at start, "
          f"{loads['end']} at end; {seconds / 60:.1f} min")
    rounds = (f"{args.cold_rounds} per annotator" if args.cold_rounds else
              ", ".join(f"{MODEL_TITLES.get(m, m)} {DEFAULT_FIRST_CLICKS.get(m, FIRST_CLICKS)}+ per cell"
                        for m in args.models))
    print(f"# {args.clicks} warm clicks per annotator; cold clicks and warm-up+clicks: {rounds} (each costs an "
          "encode, so few: n=1 means p50 = p95 = one sample); annotators "
          + ", ".join(f"{MODEL_TITLES.get(m, m)} {','.join(map(str, annotator_counts(m, args)))}"
                      for m in args.models)
          + ("" if args.annotators else " (ViT-B without 8 by default: its encodes take seconds each)"))
    print("# ms; p50/p95: client wall time; srv: /predict request time on the server, dec: decoder, enc: encodes "
          "in the phase (from /metrics; ~ = interpolated from histogram buckets)")
    print(HEADER)
    for row in rows:
        print(format_row(row))
    for line in goals(rows):
        print(line)
    if args.json:
        args.json.write_text(json.dumps(to_json(rows, args, loads, seconds), indent=2) + "\n")
        log(f"numbers written to {args.json}")
    failed = sum(len(row.errors) for row in rows)
    if failed:
        log(f"latency: {failed} request(s) failed; see the notes column")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
