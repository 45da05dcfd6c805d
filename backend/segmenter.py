"""The bridge from task images and prompts to masks: model lifecycle, embedding cache, SAM's rules.

The model is loaded in a background thread (never at import, never in a request that must be fast), so
``/health`` and ``/setup`` answer in milliseconds while a multi-GB checkpoint is read. Nothing here takes
a lock that a running encode holds: the state that ``/health`` reads is a few attributes written once.

``model.Predictor`` is stateless (no ``set_image``), so any number of request threads share one model
and decode against their own embeddings: one annotator can never get a mask computed on another
annotator's image. Embeddings come from ``EmbeddingCache`` keyed by (model fingerprint, image sha256),
so the encoder runs once per image and every later click pays only for the decoder.

SAM's own rules for ambiguity: a single click is ambiguous (part, object, whole), so it asks for three
masks and keeps the one with the best predicted IoU; several prompts (more clicks, a box) define the
object well enough for one mask, which is what Meta's predictor recommends.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from backend.config import Settings
from backend.errors import BadRequest, ModelError
from backend.metrics import Metrics

if TYPE_CHECKING:  # backend.cache imports model and so torch: only when the segmenter is built
    from backend.cache import EmbeddingCache

log = logging.getLogger(__name__)

# How long a /predict waits for a model that is still loading before answering 503.
DEFAULT_READY_WAIT_S = 60.0


@dataclass(frozen=True)
class Mask:
    """One object's mask in original image pixels and SAM's predicted IoU for it."""

    mask: np.ndarray  # (H, W) bool
    score: float


class Segmenter:
    """Owns the SAM model of this process: loading it, encoding images through the cache, decoding prompts.

    ``loader`` turns (checkpoint, device) into a ``model.Sam``; tests and tools can pass their own.
    """

    def __init__(self, checkpoint: str | Path | None, device: str | None = None, *,
                 cache: EmbeddingCache | None = None, metrics: Metrics | None = None,
                 ready_wait_s: float = DEFAULT_READY_WAIT_S, load_options: dict[str, Any] | None = None,
                 torch_threads: int = 0, loader: Callable[[str, str | None], Any] | None = None,
                 everything_options: dict[str, Any] | None = None) -> None:
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.device = device
        self.load_options = dict(load_options or {})
        self.torch_threads = torch_threads
        self.everything_options = dict(everything_options or {})  # MaskGenerator arguments (grid, thresholds)
        self.metrics = metrics if metrics is not None else Metrics()
        if cache is None:
            from backend.cache import EmbeddingCache

            cache = EmbeddingCache(memory_bytes=256 * 2**20, metrics=self.metrics)
        self.cache = cache
        self.ready_wait_s = ready_wait_s
        self._loader = loader
        self._ready = threading.Event()
        self._start_lock = threading.Lock()  # only guards starting the loader thread, never held during a load
        self._thread: threading.Thread | None = None
        self._sam: Any = None
        self._predictor: Any = None
        self._mask_generator_cls: Any = None
        self.load_error: str | None = None
        self.load_seconds: float | None = None

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics | None = None) -> Segmenter:
        """The segmenter SAM_CHECKPOINT, SAM_DEVICE, SAM_DTYPE, SAM_COMPILE and the cache settings describe."""
        from backend.cache import EmbeddingCache

        metrics = metrics if metrics is not None else Metrics()
        device = None if settings.sam_device == "auto" else settings.sam_device
        memory = settings.cache_memory_bytes
        cache = EmbeddingCache(default_cache_bytes(device) if memory is None else memory,
                               settings.redis_url or None, ttl_s=settings.sam_cache_ttl_s, metrics=metrics)
        return cls(settings.checkpoint_path, device,
                   cache=cache, metrics=metrics, torch_threads=settings.sam_torch_threads,
                   load_options={"dtype": settings.sam_dtype, "compile": settings.sam_compile})

    # ----------------------------------------------------------------------------------------------------
    # lifecycle
    @property
    def loaded(self) -> bool:
        return self._predictor is not None

    @property
    def loading(self) -> bool:
        return self._thread is not None and not self._ready.is_set()

    @property
    def model_name(self) -> str | None:
        return self._sam.name if self._sam is not None else None

    @property
    def fingerprint(self) -> str:
        """The loaded model's checkpoint fingerprint, the embedding-cache key (waits for the model)."""
        self.predictor()
        return self._sam.fingerprint

    @property
    def model_version(self) -> str:
        """``<name>-<fingerprint[:8]>`` once loaded; before that the checkpoint's file name.

        ``/setup`` must answer within Label Studio's 3 s without loading (or hashing) a multi-GB file, so
        until the model is ready the version is provisional. Label Studio calls /setup after every /health,
        so it picks up the final version as soon as the model is loaded.
        """
        if self._sam is not None:
            return f"{self._sam.name}-{self._sam.fingerprint[:8]}"
        return f"sam-{self.checkpoint.stem}" if self.checkpoint else "sam-unconfigured"

    def start_loading(self, device: str | None = None) -> None:
        """Load the model in a background thread; does nothing if a load was already started."""
        with self._start_lock:
            if self._thread is not None:
                return
            if device is not None:
                self.device = device
            self._thread = threading.Thread(target=self._load, name="sam-model-loader", daemon=True)
            self._thread.start()

    def load(self, device: str | None = None) -> None:
        """Load the model in this thread (the CLI and tests); raises ModelError if it cannot be loaded."""
        self.start_loading(device)
        assert self._thread is not None
        self._thread.join()
        if self.load_error is not None:
            raise ModelError(self.load_error)

    def _load(self) -> None:
        start = time.perf_counter()
        try:
            if self.checkpoint is None or not self.checkpoint.is_file():
                raise ModelError(missing_checkpoint_message(self.checkpoint))
            sam = self._loader(str(self.checkpoint), self.device) if self._loader else self._default_load()
            from model import Predictor

            predictor = Predictor(sam)
            try:
                from model import MaskGenerator
            except ImportError:  # "segment everything" is optional
                MaskGenerator = None  # noqa: N806
            self._sam = sam
            self._mask_generator_cls = MaskGenerator
            self.cache.device = sam.device
            self._predictor = predictor
            self.load_seconds = time.perf_counter() - start
            self.metrics.model_load_seconds.set(self.load_seconds)
            self.metrics.model_loaded.set(1)
            log.info("model %s loaded from %s on %s in %.1f s", self.model_version, self.checkpoint,
                     sam.device, self.load_seconds)
        except Exception as error:  # any failure becomes a 503 with the reason; the server stays up
            message = error.message if isinstance(error, ModelError) else f"{type(error).__name__}: {error}"
            self.load_error = f"the model could not be loaded: {message}"
            log.error("%s", self.load_error, exc_info=not isinstance(error, ModelError))
        finally:
            self._ready.set()

    def _default_load(self) -> Any:
        import torch

        from model import load

        assert self.checkpoint is not None
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        options = dict(self.load_options)
        dtypes = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        options["dtype"] = dtypes[options.get("dtype", "auto")]
        return load(self.checkpoint, device=self.device, **options)

    def predictor(self) -> Any:
        """The ready predictor; starts a load if nobody did, waits for it (bounded), else 503."""
        if self._predictor is not None:
            return self._predictor
        self.start_loading()
        if not self._ready.wait(self.ready_wait_s):
            raise ModelError(f"model is loading (still loading after {self.ready_wait_s:.0f} s); try again shortly")
        if self._predictor is None:
            raise ModelError(self.load_error or "the model could not be loaded")
        return self._predictor

    # ----------------------------------------------------------------------------------------------------
    # inference
    def embed(self, image: np.ndarray | Callable[[], np.ndarray], image_sha256: str) -> Any:
        """The image's embedding, from the cache or computed (and timed) by the encoder.

        ``image`` may be a function that decodes it: a cached embedding then costs no decoding at all.
        """
        predictor = self.predictor()

        def compute() -> Any:
            pixels = image() if callable(image) else image
            with self.metrics.time_encoder():
                return predictor.embed(pixels)

        return self.cache.get_or_compute(self._sam.fingerprint, image_sha256, compute)

    def segment(self, embedding: Any, points: np.ndarray | None = None, labels: np.ndarray | None = None,
                box: np.ndarray | None = None) -> Mask:
        """One object's mask from its clicks and/or box (original image pixels)."""
        predictor = self.predictor()
        n_points = 0 if points is None else len(points)
        if n_points == 0 and box is None:
            raise BadRequest("an object needs at least one keypoint or one rectangle")
        height, width = embedding.original_size
        if points is not None:
            _check_points(points, width, height)
        if box is not None:
            _check_box(box, width, height)
        single_click = n_points == 1 and box is None
        with self.metrics.time_decoder():
            prediction = predictor.predict(embedding, points=points, labels=labels, box=box,
                                           multimask=single_click, best_only=True)
        return Mask(mask=prediction.masks[0], score=float(prediction.scores[0]))

    def segment_boxes(self, embedding: Any, boxes: np.ndarray) -> list[Mask]:
        """One mask per box (xyxy pixels), in one decoder call."""
        predictor = self.predictor()
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        if len(boxes) == 0:
            return []
        height, width = embedding.original_size
        for box in boxes:
            _check_box(box, width, height)
        with self.metrics.time_decoder():
            prediction = predictor.predict_boxes(embedding, boxes)
        return [Mask(mask=m, score=float(s)) for m, s in zip(prediction.masks, prediction.scores, strict=True)]

    @property
    def can_segment_everything(self) -> bool:
        return self._mask_generator_cls is not None

    def segment_everything(self, image: np.ndarray, **options: Any) -> list[Mask]:
        """Every object SAM finds on a grid of points (Meta's automatic mask generator).

        ``options`` (over ``everything_options``) are MaskGenerator arguments. It decodes points_per_side**2
        prompts per image: seconds on a GPU, minutes on a CPU, which is why boxes is the default batch mode.
        """
        self.predictor()
        if self._mask_generator_cls is None:
            raise ModelError("this build has no automatic mask generator; use SAM_BATCH_MODE=boxes or off", 501)
        records = self._mask_generator_cls(self._sam, **{**self.everything_options, **options}).generate(image)
        return [Mask(mask=np.asarray(r["segmentation"], dtype=bool), score=float(r["predicted_iou"]))
                for r in records]


def default_cache_bytes(device: str | None) -> int:
    """The in-process embedding cache bound for SAM_CACHE_MEMORY_MB=auto.

    Embeddings stay on the model's device, ready to decode. On a GPU they share its memory with the model's
    activations, so a tenth of it (at most 4 GiB, ~1000 embeddings) leaves the encoder room; on a CPU a
    twentieth of the RAM (256 MiB to 2 GiB, ~60 to 500 embeddings) keeps a laptop usable.
    """
    import torch

    if (device or "cuda").startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device or "cuda").index or 0
        return min(torch.cuda.get_device_properties(index).total_memory // 10, 4 << 30)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 << 30
    return max(256 << 20, min(ram // 20, 2 << 30))


def missing_checkpoint_message(path: Path | None) -> str:
    """What to do when there is no checkpoint file: the most common first-run failure."""
    where = f"no checkpoint file at {path}" if path else "no checkpoint configured"
    return (f"{where}. Set SAM_CHECKPOINT to a checkpoint file or to an official name (vit_b, vit_l, vit_h, "
            "vit_t) found in MODEL_DIR, or pass --checkpoint to `sam-backend serve`; "
            "`sam-backend download vit_b --dir MODEL_DIR` fetches an official checkpoint.")


def _check_points(points: np.ndarray, width: int, height: int) -> None:
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if not np.isfinite(points).all():
        raise BadRequest("a keypoint has a coordinate that is not a number")
    outside = (points[:, 0] < 0) | (points[:, 0] > width) | (points[:, 1] < 0) | (points[:, 1] > height)
    if outside.any():
        x, y = points[np.argmax(outside)]
        raise BadRequest(f"keypoint ({x:.1f}, {y:.1f}) px lies outside the {width}x{height} image")


def _check_box(box: np.ndarray, width: int, height: int) -> None:
    box = np.asarray(box, dtype=np.float64).reshape(4)
    if not np.isfinite(box).all():
        raise BadRequest("a rectangle has a coordinate that is not a number")
    x0, y0, x1, y1 = box
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise BadRequest(f"rectangle ({x0:.1f}, {y0:.1f})-({x1:.1f}, {y1:.1f}) px has no area")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise BadRequest(f"rectangle ({x0:.1f}, {y0:.1f})-({x1:.1f}, {y1:.1f}) px lies outside the "
                         f"{width}x{height} image")
