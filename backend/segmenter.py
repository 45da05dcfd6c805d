"""The bridge from task images and prompts to masks: model lifecycle, embedding cache, SAM's rules.

The model is loaded in a background thread (never at import, never in a request that must be fast), so
``/health`` and ``/setup`` answer in milliseconds while a multi-GB checkpoint is read. Nothing here takes
a lock that a running encode holds: the state that ``/health`` reads is a few attributes written once.

``model.Predictor`` is stateless (no ``set_image``), so any number of request threads share one model
and decode against their own embeddings: one annotator can never get a mask computed on another
annotator's image. Embeddings come from ``EmbeddingCache`` keyed by (model fingerprint, image sha256),
so the encoder runs once per image and every later click pays only for the decoder.

Prompts arrive as ``backend.prompts.ObjectPrompt``, already checked against the image; the prompt says
whether SAM answers with three candidates (a lone click), of which the segmenter keeps the best by predicted
IoU. Where the model runs (device, dtype, threads, cache size) is ``model.runtime``'s policy: this module
passes the settings through and imports nothing of torch until the model loads.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from backend.config import Settings, missing_checkpoint_message
from backend.errors import ModelError
from backend.metrics import Metrics
from backend.prompts import ObjectPrompt

if TYPE_CHECKING:  # these import model and so torch: only when the segmenter is built or loads
    from backend.cache import EmbeddingCache
    from model import Embedding, Predictor, Sam
    from model.runtime import DecodeSlots
    from model.sam2 import Sam2

log = logging.getLogger(__name__)

# How long a /predict waits for a model that is still loading before answering 503.
DEFAULT_READY_WAIT_S = 60.0
# Boxes per decoder call in ``box_masks``: each box's mask and logits are full-size until the caller has
# turned the mask into what it keeps (regions, a polygon).
BOX_CHUNK = 16


@dataclass(frozen=True)
class Mask:
    """One object's mask in original image pixels and SAM's predicted IoU for it."""

    mask: np.ndarray  # (H, W) bool
    score: float
    low_res_logits: np.ndarray | None = None  # (h, w) float32 for a click's mask: the next click's mask_input


class Segmenter:
    """Owns the SAM model of this process: loading it, encoding images through the cache, decoding prompts.

    ``loader`` turns (checkpoint, device) into a ``model.Sam``; tests and tools can pass their own. Without
    one, ``model.load`` reads the checkpoint with ``dtype`` (a SAM_DTYPE value), ``compile`` and
    ``torch_threads`` (0: PyTorch's default).
    """

    def __init__(self, checkpoint: str | Path | None, device: str | None = None, *,
                 cache: EmbeddingCache | None = None, metrics: Metrics | None = None,
                 ready_wait_s: float = DEFAULT_READY_WAIT_S, dtype: str = "auto", compile: bool = False,
                 torch_threads: int = 0, loader: Callable[[str, str | None], Sam | Sam2] | None = None,
                 everything_options: dict[str, Any] | None = None, decode_slots: int = 0, lone_decode_threads: int = 2,
                 encode_batch: int = 0) -> None:
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.device = device
        self.dtype = dtype
        self.compile = compile
        self.torch_threads = torch_threads
        self.decode_slots = decode_slots  # model.runtime.DecodeSlots: 0 = one per CPU core
        self.lone_decode_threads = lone_decode_threads  # a click alone on an idle CPU (DecodeSlots)
        self._decode_gate: DecodeSlots | None = None
        self._encode_batch = encode_batch  # SAM_ENCODE_BATCH: 0 = by device once the model is loaded
        self._encoder_threads = torch_threads
        self.everything_options = dict(everything_options or {})  # MaskGenerator arguments (grid, thresholds)
        self.metrics = metrics if metrics is not None else Metrics()
        if cache is None:
            from backend.cache import EmbeddingCache
            from model.runtime import default_cache_bytes

            cache = EmbeddingCache(default_cache_bytes(device), metrics=self.metrics)
        self.cache = cache
        self.ready_wait_s = ready_wait_s
        self._loader = loader
        self._ready = threading.Event()
        self._start_lock = threading.Lock()  # only guards starting the loader thread, never held during a load
        self._thread: threading.Thread | None = None
        self._predictor: Predictor | None = None
        self.load_error: str | None = None
        self.load_seconds: float | None = None

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics | None = None) -> Segmenter:
        """The segmenter SAM_CHECKPOINT, SAM_DEVICE, SAM_DTYPE, SAM_COMPILE and the cache settings describe."""
        from backend.cache import EmbeddingCache
        from model.runtime import default_cache_bytes

        metrics = metrics if metrics is not None else Metrics()
        memory = settings.cache_memory_bytes
        cache = EmbeddingCache(default_cache_bytes(settings.device) if memory is None else memory,
                               settings.redis_url or None, ttl_s=settings.sam_cache_ttl_s, metrics=metrics)
        return cls(settings.checkpoint_path, settings.device, cache=cache, metrics=metrics,
                   dtype=settings.sam_dtype, compile=settings.sam_compile, torch_threads=settings.sam_torch_threads,
                   decode_slots=settings.sam_decode_slots, lone_decode_threads=settings.sam_lone_decode_threads,
                   encode_batch=settings.sam_encode_batch)

    # ----------------------------------------------------------------------------------------------------
    # lifecycle
    @property
    def loaded(self) -> bool:
        return self._predictor is not None

    @property
    def loading(self) -> bool:
        return self._thread is not None and not self._ready.is_set()

    @property
    def fingerprint(self) -> str:
        """The loaded model's checkpoint fingerprint, the embedding-cache key (waits for the model)."""
        return self.predictor().sam.fingerprint

    @property
    def model_version(self) -> str:
        """``<name>-<fingerprint[:8]>`` once loaded; before that the checkpoint's file name.

        ``/setup`` must answer within Label Studio's 3 s without loading (or hashing) a multi-GB file, so
        until the model is ready the version is provisional. Label Studio calls /setup after every /health,
        so it picks up the final version as soon as the model is loaded.
        """
        if self._predictor is not None:
            sam = self._predictor.sam
            return f"{sam.name}-{sam.fingerprint[:8]}"
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
            from model.runtime import DecodeSlots, cpu_cores, encode_batch_size

            predictor = Predictor(sam)
            self._decode_gate = DecodeSlots(sam.device, self.decode_slots, self.lone_decode_threads)
            self._encoder_threads = self.torch_threads or cpu_cores()
            self._encode_batch = encode_batch_size(sam.device, self._encode_batch)
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

    def _default_load(self) -> Sam | Sam2:
        from model import load
        from model.runtime import configure_threads, dtype_from_name

        assert self.checkpoint is not None
        configure_threads(self.torch_threads)
        return load(self.checkpoint, device=self.device, dtype=dtype_from_name(self.dtype), compile=self.compile)

    def predictor(self) -> Predictor:
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
    def embed(self, image: np.ndarray | Callable[[], np.ndarray], image_sha256: str) -> Embedding:
        """The image's embedding, from the cache or computed (and timed) by the encoder.

        ``image`` may be a function that decodes it: a cached embedding then costs no decoding at all.
        """
        predictor = self.predictor()

        def compute() -> Embedding:
            pixels = _pixels(image)
            self._encoder_threads_in_this_thread()
            with self.metrics.time_encoder():
                return predictor.embed(pixels)

        return self.cache.get_or_compute(predictor.sam.fingerprint, image_sha256, compute)

    @property
    def encode_batch(self) -> int:
        """Images per encoder run in bulk work (``embed_many``): SAM_ENCODE_BATCH, else by device (waits for
        the model, whose device decides)."""
        self.predictor()
        return max(1, self._encode_batch)

    def embed_many(self, images: Sequence[tuple[np.ndarray | Callable[[], np.ndarray], str]]) -> list[Embedding]:
        """``embed`` of each (image, sha256), the ones not in the cache encoded ``encode_batch`` at a time.

        Bulk work hands the images of its next tasks here, so a GPU encodes them in one run each batch; the
        embeddings go through the cache as ``embed``'s do (stored, and at the cache's precision), and an
        image already cached (a warm-up, a click, a repeated image) is not encoded again.
        """
        predictor = self.predictor()
        fingerprint = predictor.sam.fingerprint
        size = self.encode_batch
        computed: dict[str, Embedding] = {}
        missing: dict[str, np.ndarray | Callable[[], np.ndarray]] = {}
        for image, sha256 in images:
            if sha256 not in missing and not self.cache.contains(fingerprint, sha256):
                missing[sha256] = image
        if size > 1 and len(missing) > 1:
            shas = list(missing)
            self._encoder_threads_in_this_thread()
            for start in range(0, len(shas), size):
                chunk = shas[start:start + size]
                pixels = [_pixels(missing[sha]) for sha in chunk]
                with self.metrics.time_encoder():
                    computed.update(zip(chunk, predictor.embed_batch(pixels), strict=True))
        result = []
        for image, sha256 in images:
            ready = computed.get(sha256)
            result.append(self.embed(image, sha256) if ready is None
                          else self.cache.get_or_compute(fingerprint, sha256, functools.partial(_same, ready)))
        return result

    def _decode_slot(self) -> contextlib.AbstractContextManager[None]:
        """A decode's share of the CPU (``model.runtime.DecodeSlots``): waits for a free core."""
        return self._decode_gate() if self._decode_gate is not None else contextlib.nullcontext()

    def _encoder_threads_in_this_thread(self) -> None:
        """Encodes use every core (or SAM_TORCH_THREADS): this thread may have decoded on one before."""
        if self._decode_gate is not None and self._decode_gate.cpu:
            from model.runtime import use_threads

            use_threads(self._encoder_threads)

    def segment(self, embedding: Embedding, prompt: ObjectPrompt, mask_input: np.ndarray | None = None) -> Mask:
        """One object's mask from its prompt (original image pixels): the best of three for a lone click.

        ``mask_input``: an earlier round's low-res logits (``backend.refinement``), Meta's iterative clicks.
        """
        predictor = self.predictor()
        with self._decode_slot(), self.metrics.time_decoder():
            prediction = predictor.predict(embedding, points=prompt.point_coords, labels=prompt.point_coord_labels,
                                           box=prompt.box, mask_input=mask_input, multimask=prompt.multimask,
                                           best_only=True)
        return Mask(mask=prediction.masks[0], score=float(prediction.scores[0]),
                    low_res_logits=prediction.low_res_logits[0])

    def segment_boxes(self, embedding: Embedding, boxes: np.ndarray) -> list[Mask]:
        """One mask per box (xyxy pixels, inside the image as ``backend.prompts`` made them), in one decoder call."""
        predictor = self.predictor()
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        if len(boxes) == 0:
            return []
        with self._decode_slot(), self.metrics.time_decoder():
            prediction = predictor.predict_boxes(embedding, boxes)
        return [Mask(mask=m, score=float(s)) for m, s in zip(prediction.masks, prediction.scores, strict=True)]

    def box_masks(self, embedding: Embedding, boxes: np.ndarray) -> Iterator[Mask]:
        """``segment_boxes`` for any number of boxes, ``BOX_CHUNK`` per decoder call, each mask handed on
        before the next call: hundreds of rectangles (a task's, a low-confidence detector's) hold the memory
        of ``BOX_CHUNK`` full-size masks and logits, not of all of them (300 at 4000x3000: 14 GB of logits)."""
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        for start in range(0, len(boxes), BOX_CHUNK):
            yield from self.segment_boxes(embedding, boxes[start:start + BOX_CHUNK])

    def segment_everything(self, image: np.ndarray, embedding: Embedding | None = None,
                           **options: Any) -> list[Mask]:
        """Every object SAM finds on a grid of points (Meta's automatic mask generator).

        ``options`` (over ``everything_options``) are MaskGenerator arguments. ``embedding`` is the image's
        (from ``embed``, so the cache's), used for the whole-image pass instead of encoding again. It decodes
        points_per_side**2 prompts per image: seconds on a GPU, minutes on a CPU, which is why boxes is the
        default batch mode.
        """
        from model import MaskGenerator

        sam = self.predictor().sam
        generator = MaskGenerator(sam, **{**self.everything_options, **options})
        self._encoder_threads_in_this_thread()  # a long whole-image job: all cores, like an encode
        with self.metrics.time_decoder():
            records = generator.generate(image, embedding=embedding)
        return [Mask(mask=np.asarray(r["segmentation"], dtype=bool), score=float(r["predicted_iou"]))
                for r in records]


def _pixels(image: np.ndarray | Callable[[], np.ndarray]) -> np.ndarray:
    """An image, or the function that decodes it (called only when the encoder needs the pixels)."""
    return image() if callable(image) else image


def _same(embedding: Embedding) -> Embedding:
    return embedding
