"""Benchmark our SAM engine (``model.Predictor``) against Meta's reference ``SamPredictor``.

For MobileSAM (``vit_t``, reference ``mobile_sam``), ViT-B (reference ``segment_anything``) and SAM 2.1
Hiera tiny / base+ (``sam2.1_t``, ``sam2.1_b+``, reference ``sam2``'s ``SAM2ImagePredictor``) on the same
seeded random weights, saved in the official checkpoint formats, and the same 1024 x 768 synthetic image
(gradients, shapes, texture, noise), one run prints side by side:

* encoder time: reference ``set_image`` against our ``embed``; one-click decode time: reference
  ``predict(point, multimask_output=True)`` against our ``predict`` with the same point, both returning
  three masks at the original size. Medians over ``--runs`` encodes and ``--decode-runs`` decodes after
  one warm-up; reference and ours run interleaved, so load from other processes on a shared machine
  falls on both sides alike;
* one click as the backend answers it: the single best of the three candidates by predicted IoU at the
  original size. Meta has no cheaper way to get that mask than ``predict(multimask_output=True)`` and
  ``masks[argmax(scores)]``; ours is ``predict(..., best_only=True)``, which picks before upsampling.
  The IoU of the two chosen masks is checked and printed beside the times;
* how close both engines are to the machine's floor: the fp32 matmul throughput of one 4096x768x3072
  matmul at the run's thread count, and each encoder's achieved GFLOP/s (its FLOPs counted once with
  ``torch.utils.flop_counter`` on the reference encoder, not hard-coded);
* the mask agreement of the two at fp32 on several prompts (IoU of every mask, max |low-res logit| diff,
  and how many mask pixels differ);
* what each faster mode costs in agreement with our fp32 masks, and what it buys in time: bf16 and fp16
  autocast (where torch supports them on the device) and, with ``--compile``, ``torch.compile`` of the
  encoder (minutes of compiling on a small CPU, hence opt-in).

    .venv/bin/python -m bench.engine                      # both models, CPU, PyTorch's default threads
    .venv/bin/python -m bench.engine --models vit_t --runs 5 --decode-runs 50 --json /tmp/engine.json
    .venv/bin/python -m bench.engine --device cuda --compile
    .venv/bin/python -m bench.engine --fast-paths reference   # ours in Meta's order of operations

Goals on a 2-core CPU: the ViT-B encoder at least 2x faster than the reference at fp32 with identical
masks, the SAM 2.1 encoders at least 1.5x (Meta's Hiera already runs its attention through SDPA); the
one-click decode at least 2x faster. The last lines of the output say whether they are met. The FLOP
count of a SAM 2.1 encoder leaves out attention: torch's counter does not count SDPA on the CPU.
Weights are random, so the masks are not meaningful segmentations: only speed and agreement are.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

import model

MODELS = ("vit_t", "vit_b", "sam2.1_t", "sam2.1_b+")
# Bench names of the SAM 2.1 models -> the configuration (and ``Sam2.name``) they stand for.
SAM2_MODELS = {"sam2.1_t": "sam2.1_hiera_tiny", "sam2.1_b+": "sam2.1_hiera_base_plus"}
HEIGHT, WIDTH = 768, 1024
SEED = 0
GOAL_RATIO = 2.0
FAST_PATHS = {"fast": model.FAST, "reference": model.REFERENCE}
SAM2_ENCODER_GOAL_RATIO = 1.5
T = TypeVar("T")
# (masks (K, H, W) bool, low-res logits (K, h, w)) of each prompt, in order.
Outputs = list[tuple[np.ndarray, np.ndarray]]
# Masks "agree" at the parity tests' threshold. "Identical" allows what fp32 summation order alone does:
# a handful of pixels whose logit is within rounding of 0 may flip; the differing-pixel count says how many.
AGREE_IOU = 0.99
IDENTICAL_IOU = 0.999


@dataclass(frozen=True)
class Prompt:
    """One object's prompt in original image pixels, as Label Studio's smart tools send them."""

    name: str
    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    box: np.ndarray | None = None


@dataclass
class Agreement:
    """How far one set of predictions is from another on the same prompts (every mask of each)."""

    mean_iou: float
    min_iou: float
    max_logit_diff: float
    differing_pixels: int  # summed over every mask of every prompt; 0 = pixel-identical
    foreground: tuple[float, float]  # smallest and largest mask area share of the baseline, in [0, 1]


@dataclass(frozen=True)
class Timing:
    """Milliseconds of repeated calls: the median is what we report, the best is the least disturbed."""

    median_ms: float
    best_ms: float
    runs: int


@dataclass
class ModeResult:
    """A faster mode of our engine against our own fp32 engine."""

    mode: str
    encoder: Timing | None = None
    decode: Timing | None = None
    fp32_encoder: Timing | None = None  # our fp32 engine, timed interleaved with this mode
    fp32_decode: Timing | None = None
    first_encode_s: float | None = None  # the untimed warm-up; includes compiling for torch.compile
    agreement: Agreement | None = None
    skipped: str | None = None


@dataclass(frozen=True)
class Baseline:
    """Our fp32 engine on the benchmark image: what every faster mode is compared with."""

    predictor: model.Predictor
    embedding: model.Embedding
    outputs: Outputs


@dataclass
class ModelResult:
    """Everything measured for one model."""

    model: str
    reference_encoder: Timing
    ours_encoder: Timing
    reference_decode: Timing
    ours_decode: Timing
    agreement: Agreement
    reference_best: Timing  # one click, best of 3 by predicted IoU, as the backend answers it
    ours_best: Timing
    best_min_iou: float  # IoU of the two engines' chosen masks, lowest over the prompts
    encoder_gflop: float  # FLOPs of one encoder forward on a padded 1024x1024 input, in GFLOP
    modes: list[ModeResult] = field(default_factory=list)

    @property
    def encoder_ratio(self) -> float:
        return self.reference_encoder.median_ms / self.ours_encoder.median_ms

    @property
    def decode_ratio(self) -> float:
        return self.reference_decode.median_ms / self.ours_decode.median_ms

    @property
    def best_ratio(self) -> float:
        return self.reference_best.median_ms / self.ours_best.median_ms


# --- inputs -----------------------------------------------------------------------------------------------


def synthetic_image(height: int = HEIGHT, width: int = WIDTH, seed: int = SEED) -> np.ndarray:
    """A photo-like HxWx3 uint8 RGB image: shaded gradient background, textured shapes, sensor noise.

    Flat random noise would make every encoder path look alike; edges, textures and smooth regions give
    the mask decoder boundaries to disagree on, so the agreement numbers mean something.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = xx / width, yy / height
    image = np.stack([60 + 140 * u, 80 + 100 * v, 150 - 90 * u * v], axis=-1)
    image += 20 * np.sin(6 * np.pi * u + 2 * np.pi * v)[..., None]  # soft lighting bands
    for (cy, cx, ry, rx), colour, stripes in zip(object_ellipses(height, width), rng.uniform(0, 255, (3, 3)),
                                                 (0, 18, 7), strict=True):
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        texture = 25 * np.sin(2 * np.pi * (xx + yy) / stripes) if stripes else 0 * xx
        image[inside] = colour + texture[inside, None]
    y0, x0, y1, x1 = object_box(height, width)
    checker = ((yy[y0:y1, x0:x1] // 24 + xx[y0:y1, x0:x1] // 24) % 2)[..., None]
    image[y0:y1, x0:x1] = np.array([200.0, 60, 40]) * checker + np.array([40.0, 40, 160]) * (1 - checker)
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def object_ellipses(height: int, width: int) -> list[tuple[float, float, float, float]]:
    """(centre y, centre x, radius y, radius x) of the image's three elliptic objects."""
    return [(0.35 * height, 0.25 * width, 0.18 * height, 0.14 * width),
            (0.65 * height, 0.55 * width, 0.22 * height, 0.20 * width),
            (0.30 * height, 0.80 * width, 0.12 * height, 0.09 * width)]


def object_box(height: int, width: int) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1) of the image's checkered rectangle."""
    return int(0.72 * height), int(0.08 * width), int(0.95 * height), int(0.33 * width)


def prompts(height: int = HEIGHT, width: int = WIDTH) -> list[Prompt]:
    """Several prompts of the kinds annotators make: one click per object, click + negative click, boxes."""
    positive, negative = np.array([1]), np.array([1, 0])
    clicks = [Prompt(f"click {i + 1}", np.array([[cx, cy]]), positive)
              for i, (cy, cx, _, _) in enumerate(object_ellipses(height, width))]
    y0, x0, y1, x1 = object_box(height, width)
    cy, cx, ry, rx = object_ellipses(height, width)[1]
    return [
        *clicks,
        Prompt("background click", np.array([[0.9 * width, 0.1 * height]]), positive),
        Prompt("click + negative", np.array([[cx, cy], [cx + 0.5 * rx, cy]]), negative),
        Prompt("box", box=np.array([x0, y0, x1, y1], float)),
        Prompt("box + click", np.array([[cx, cy]]), positive, np.array([cx - rx, cy - ry, cx + rx, cy + ry])),
    ]


# --- models -----------------------------------------------------------------------------------------------


def reference_model(name: str, seed: int) -> torch.nn.Module:
    """Meta's (or MobileSAM's) ``Sam`` in the official configuration with seeded random weights."""
    if name == "vit_t":
        from testsupport.mobilesam_checkpoints import random_reference_sam

        return random_reference_sam("vit_t", seed)
    if name == "vit_b":
        from testsupport.checkpoints import official_sam

        return official_sam("vit_b", seed)
    if name in SAM2_MODELS:
        from testsupport.sam2_checkpoints import reference_sam2

        return reference_sam2(SAM2_MODELS[name], seed)
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def reference_predictor(name: str, sam: torch.nn.Module, device: str) -> object:
    """The reference ``SamPredictor`` of the model's own package, holding ``sam`` on ``device``."""
    if name in SAM2_MODELS:
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        return SAM2ImagePredictor(sam.to(device).eval())
    if name == "vit_t":
        from mobile_sam import SamPredictor
    else:
        from segment_anything import SamPredictor
    # eval() after the move: MobileSAM caches its gathered attention biases on the current device.
    return SamPredictor(sam.to(device).eval())


# --- measuring --------------------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(function: Callable[[], T], device: str) -> tuple[float, T]:
    """Seconds one call takes, with the GPU's queued work included, and what it returned."""
    synchronize(device)
    start = time.perf_counter()
    value = function()
    synchronize(device)
    return time.perf_counter() - start, value


def timings(functions: list[Callable[[], object]], runs: int, device: str, warm_up: bool = True) -> list[Timing]:
    """Time each function ``runs`` times, after one untimed warm-up call each unless the caller made it.

    Calls are interleaved (a, b, a, b, ...) so that a burst of load from another process slows both
    sides of a comparison rather than one of them.
    """
    if warm_up:
        for function in functions:
            function()
    samples: list[list[float]] = [[] for _ in functions]
    for _ in range(runs):
        for function, times in zip(functions, samples, strict=True):
            times.append(1000 * timed(function, device)[0])
    return [Timing(statistics.median(times), min(times), runs) for times in samples]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def agreement(baseline: Outputs, other: Outputs) -> Agreement:
    """Agreement of (masks (K,H,W), low-res logits (K,h,w)) pairs with the baseline's, prompt by prompt."""
    ious, diffs, differing, shares = [], [], 0, []
    for (masks, logits), (other_masks, other_logits) in zip(baseline, other, strict=True):
        ious += [iou(m, o) for m, o in zip(masks, other_masks, strict=True)]
        diffs.append(float(np.abs(logits - other_logits).max()))
        differing += int(np.count_nonzero(masks != other_masks))
        shares += [float(m.mean()) for m in masks]
    return Agreement(mean_iou=float(np.mean(ious)), min_iou=float(np.min(ious)), max_logit_diff=max(diffs),
                     differing_pixels=differing, foreground=(min(shares), max(shares)))


def ours_outputs(predictor: model.Predictor, embedding: model.Embedding,
                 prompt_list: list[Prompt]) -> Outputs:
    """Our masks and low-res logits for every prompt (three candidates each)."""
    results = []
    for p in prompt_list:
        prediction = predictor.predict(embedding, p.points, p.labels, box=p.box, multimask=True)
        results.append((prediction.masks, prediction.low_res_logits))
    return results


def reference_best(predictor: object, prompt: Prompt) -> np.ndarray:
    """The reference's best mask (H, W) by predicted IoU: all three at full size, then argmax."""
    masks, scores, _ = predictor.predict(prompt.points, prompt.labels, box=prompt.box, multimask_output=True)
    return masks[int(np.argmax(scores))]


def ours_best(predictor: model.Predictor, embedding: model.Embedding, prompt: Prompt) -> np.ndarray:
    """Our best mask (H, W) by predicted IoU, as the backend's click path asks for it."""
    return predictor.predict(embedding, prompt.points, prompt.labels, box=prompt.box, multimask=True,
                             best_only=True).masks[0]


def reference_outputs(predictor: object, prompt_list: list[Prompt]) -> Outputs:
    """The reference's masks and low-res logits for every prompt, on the image it was last given."""
    results = []
    for p in prompt_list:
        masks, _, logits = predictor.predict(p.points, p.labels, box=p.box, multimask_output=True)
        results.append((masks, logits))
    return results


# --- faster modes -----------------------------------------------------------------------------------------


def autocast_supported(device: str, dtype: torch.dtype) -> str | None:
    """``None`` when torch autocasts a matmul to ``dtype`` on ``device``, else why not."""
    device_type = torch.device(device).type
    try:
        with torch.autocast(device_type, dtype=dtype):
            out = torch.ones(4, 4, device=device) @ torch.ones(4, 4, device=device)
    except (RuntimeError, ValueError) as exc:
        return f"{dtype} autocast unavailable on {device_type}: {exc}"
    if out.dtype != dtype:
        return f"torch {torch.__version__} does not autocast to {dtype} on {device_type}"
    return None


def modes(device: str, compile_: bool, autocast: bool = True) -> list[tuple[str, torch.dtype, bool]]:
    """(label, dtype given to ``model.load``, compile) of every faster mode to try."""
    chosen = [("bf16 autocast", torch.bfloat16, False), ("fp16 autocast", torch.float16, False)] if autocast else []
    if compile_:
        # Compile the configuration that serves by default on this device: fp32 on CPU, bf16 on CUDA.
        default = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        label = "compile" + (" + bf16" if default == torch.bfloat16 else " fp32")
        chosen.append((label, default, True))
    return chosen


def measure_mode(label: str, dtype: torch.dtype, compile_: bool, checkpoint: Path, device: str,
                 image: np.ndarray, prompt_list: list[Prompt], baseline: Baseline,
                 runs: int, decode_runs: int, fast_paths: model.FastPaths = model.FAST) -> ModeResult:
    """Time one faster mode of our engine against our fp32 engine (interleaved) and compare their masks."""
    if dtype != torch.float32 and (why := autocast_supported(device, dtype)):
        return ModeResult(label, skipped=why)
    predictor = model.Predictor(model.load(checkpoint, device=device, dtype=dtype, compile=compile_,
                                           fast_paths=fast_paths))
    first, embedding = timed(lambda: predictor.embed(image), device)
    fp32, click = baseline.predictor, prompt_list[0]
    encoder, fp32_encoder = timings([lambda: predictor.embed(image), lambda: fp32.embed(image)], runs, device,
                                    warm_up=False)
    decode, fp32_decode = timings(
        [lambda: predictor.predict(embedding, click.points, click.labels),
         lambda: fp32.predict(baseline.embedding, click.points, click.labels)], decode_runs, device)
    return ModeResult(label, encoder=encoder, decode=decode, fp32_encoder=fp32_encoder, fp32_decode=fp32_decode,
                      first_encode_s=first,
                      agreement=agreement(baseline.outputs, ours_outputs(predictor, embedding, prompt_list)))


# --- one model --------------------------------------------------------------------------------------------


def encoder_runs(name: str, runs: int | None) -> int:
    """``--runs``, or the default: ViT-B takes seconds per encode on a small CPU, MobileSAM much less."""
    if runs is not None:
        return runs
    return {"vit_b": 3, "sam2.1_b+": 3, "sam2.1_t": 5}.get(name, 10)


def compare_with_reference(name: str, checkpoint: Path, reference_sam: torch.nn.Module, device: str,
                           image: np.ndarray, prompt_list: list[Prompt], runs: int, decode_runs: int,
                           log: Callable[[str], None],
                           fast_paths: model.FastPaths = model.FAST) -> tuple[ModelResult, Baseline]:
    """Reference against ours at fp32: times and agreement, plus our fp32 engine as the modes' baseline.

    Its own function so the reference is freed when it returns, before the faster modes load.
    """
    reference = reference_predictor(name, reference_sam, device)
    ours = model.Predictor(model.load(checkpoint, device=device, dtype=torch.float32, fast_paths=fast_paths))
    if ours.sam.name != SAM2_MODELS.get(name, name):
        raise SystemExit(f"our loader read the {name} checkpoint as {ours.sam.name}")
    click = prompt_list[0]
    log(f"{name}: encoder, {runs} runs each after a warm-up")
    embedding = ours.embed(image)  # the warm-ups; the timed calls leave the reference on this image too
    reference.set_image(image)
    ref_encoder, ours_encoder = timings([lambda: reference.set_image(image), lambda: ours.embed(image)], runs,
                                        device, warm_up=False)
    log(f"{name}: one-click decode, {decode_runs} runs each")
    ref_decode, ours_decode = timings(
        [lambda: reference.predict(click.points, click.labels, multimask_output=True),
         lambda: ours.predict(embedding, click.points, click.labels, multimask=True)], decode_runs, device)
    log(f"{name}: one click as the backend answers it (best of 3), {decode_runs} runs each")
    ref_best, our_best = timings([lambda: reference_best(reference, click), lambda: ours_best(ours, embedding, click)],
                                 decode_runs, device)
    best_min_iou = min(iou(reference_best(reference, p), ours_best(ours, embedding, p)) for p in prompt_list)
    baseline = ours_outputs(ours, embedding, prompt_list)
    result = ModelResult(name, ref_encoder, ours_encoder, ref_decode, ours_decode,
                         agreement(reference_outputs(reference, prompt_list), baseline), ref_best, our_best,
                         best_min_iou, encoder_gflop(reference_sam, device))
    return result, Baseline(ours, embedding, baseline)


def bench_model(name: str, device: str, runs: int, decode_runs: int, compile_: bool, directory: Path,
                log: Callable[[str], None], autocast: bool = True,
                fast_paths: model.FastPaths = model.FAST) -> ModelResult:
    """Reference against ours at fp32, then our faster modes, for one model."""
    log(f"{name}: building seeded random weights and the checkpoint file")
    reference_sam = reference_model(name, SEED)
    checkpoint = directory / f"{name}_random.pth"
    # The official formats: a plain state dict for SAM, {"model": state dict} for SAM 2.1.
    torch.save({"model": reference_sam.state_dict()} if name in SAM2_MODELS else reference_sam.state_dict(), checkpoint)
    image, prompt_list = synthetic_image(), prompts()
    result, baseline = compare_with_reference(name, checkpoint, reference_sam, device, image, prompt_list, runs,
                                              decode_runs, log, fast_paths)
    del reference_sam
    for label, dtype, compiled in modes(device, compile_, autocast):
        log(f"{name}: {label}")
        result.modes.append(measure_mode(label, dtype, compiled, checkpoint, device, image, prompt_list, baseline,
                                         runs, decode_runs, fast_paths))
    checkpoint.unlink()
    return result


# --- the machine's floor ----------------------------------------------------------------------------------


def encoder_gflop(sam: torch.nn.Module, device: str) -> float:
    """GFLOP of one image-encoder forward on the padded square input, counted by torch's FLOP counter.

    Counted on the reference encoder, whose arithmetic ours repeats; one untimed forward. A
    multiply-add counts as 2 FLOPs.
    """
    from torch.utils.flop_counter import FlopCounterMode

    size = getattr(sam.image_encoder, "img_size", None) or sam.image_size  # SAM 2's is on the model
    x = torch.zeros(1, 3, size, size, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        sam.forward_image(x) if hasattr(sam, "forward_image") else sam.image_encoder(x)
    return counter.get_total_flops() / 1e9


def matmul_gflops(device: str, m: int = 4096, k: int = 768, n: int = 3072, runs: int = 5) -> float:
    """Best-of-``runs`` fp32 GFLOP/s of an (m, k) x (k, n) matmul at the current thread count.

    The shape of ViT-B's MLP on one 64x64 window-less token grid: dense fp32 matmul is the floor both
    engines stand on, so their achieved GFLOP/s are read against this number.
    """
    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    a @ b
    best = min(timed(lambda: a @ b, device)[0] for _ in range(runs))
    return 2 * m * k * n / best / 1e9


# --- report -----------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def engine_version() -> str:
    """The commit the engine was measured at, marked when model/ has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "model"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "commit unknown"
    return f"commit {commit}" + (" + uncommitted model/ changes" if dirty else "")


def environment(device: str) -> str:
    """One line: what the numbers were measured on."""
    where = (f"GPU {torch.cuda.get_device_name(torch.device(device))}" if torch.device(device).type == "cuda"
             else f"CPU {cpu_model()}, {os.cpu_count()} cores")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {where}, "
            f"python {platform.python_version()}, {engine_version()}, load average {load}")


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def comparison_table(results: list[ModelResult]) -> list[str]:
    lines = ["| model | stage | reference ms | ours ms | reference/ours | best-of ratio | runs |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        backend = (f"one click as the backend answers it: best of 3 by predicted IoU, 1 mask at 1024x768 "
                   f"(reference: 3 masks then argmax; chosen masks' min IoU {r.best_min_iou:.6f})")
        for stage, ref, ours in (("encoder (set_image / embed)", r.reference_encoder, r.ours_encoder),
                                 ("one-click decode, 3 masks at 1024x768 (like for like)", r.reference_decode,
                                  r.ours_decode),
                                 (backend, r.reference_best, r.ours_best)):
            lines.append(f"| {r.model} | {stage} | {ref.median_ms:.1f} | {ours.median_ms:.1f} | "
                         f"{ref.median_ms / ours.median_ms:.2f}x | {ref.best_ms / ours.best_ms:.2f}x | {ours.runs} |")
    return lines


def floor_lines(results: list[ModelResult], matmul: float) -> list[str]:
    """The machine's fp32 matmul throughput and what each encoder achieves against it."""
    lines = [f"fp32 matmul throughput: {matmul:.0f} GFLOP/s (4096x768x3072, best of 5, "
             f"{torch.get_num_threads()} threads)"]
    for r in results:
        ref, ours = (r.encoder_gflop / (t.median_ms / 1000) for t in (r.reference_encoder, r.ours_encoder))
        uncounted = " (attention not counted)" if r.model in SAM2_MODELS else ""
        lines.append(f"{r.model} encoder: {r.encoder_gflop:.0f} GFLOP per image{uncounted}; achieved {ref:.0f} GFLOP/s "
                     f"reference, {ours:.0f} GFLOP/s ours ({ref / matmul:.0%} / {ours / matmul:.0%} of the matmul "
                     f"throughput)")
    return lines


def agreement_table(results: list[ModelResult]) -> list[str]:
    lines = ["| model | mask IoU mean | mask IoU min | max \\|logit diff\\| | differing pixels | mask area |",
             "|---|---:|---:|---:|---:|---|"]
    for r in results:
        a = r.agreement
        lines.append(f"| {r.model} | {a.mean_iou:.6f} | {a.min_iou:.6f} | {a.max_logit_diff:.2e} | "
                     f"{a.differing_pixels} | {a.foreground[0]:.0%}-{a.foreground[1]:.0%} |")
    return lines


def modes_table(results: list[ModelResult]) -> list[str]:
    """Each mode beside our fp32 engine timed in the same stretch of time (interleaved calls)."""
    lines = ["| model | mode | encoder ms | fp32 encoder ms | speed-up | decode ms | fp32 decode ms | speed-up | "
             "warm-up s | mask IoU mean | mask IoU min | max \\|logit diff\\| |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        for m in r.modes:
            if m.skipped or not (m.encoder and m.decode and m.fp32_encoder and m.fp32_decode and m.agreement):
                lines.append(f"| {r.model} | {m.mode} | skipped: {m.skipped} | | | | | | | | | |")
                continue
            a = m.agreement
            lines.append(f"| {r.model} | {m.mode} | {m.encoder.median_ms:.1f} | {m.fp32_encoder.median_ms:.1f} | "
                         f"{m.fp32_encoder.median_ms / m.encoder.median_ms:.2f}x | {m.decode.median_ms:.1f} | "
                         f"{m.fp32_decode.median_ms:.1f} | {m.fp32_decode.median_ms / m.decode.median_ms:.2f}x | "
                         f"{fmt(m.first_encode_s, '.1f')} | {a.mean_iou:.4f} | {a.min_iou:.4f} | "
                         f"{a.max_logit_diff:.2e} |")
    return lines


def verdict(reference: Timing, ours: Timing, masks_ok: bool, goal: float = GOAL_RATIO) -> str:
    """MET / NOT MET when the median and the best-of ratio agree; UNCLEAR when load noise splits them."""
    median, best = reference.median_ms / ours.median_ms, reference.best_ms / ours.best_ms
    numbers = f"median {median:.2f}x, best-of {best:.2f}x"
    if not masks_ok:
        return f"NOT MET: masks differ ({numbers})"
    if median >= goal and best >= goal:
        return f"MET ({numbers})"
    if median < goal and best < goal:
        return f"NOT MET ({numbers})"
    return f"UNCLEAR, the machine was too noisy to tell ({numbers})"


def goals(results: list[ModelResult]) -> list[str]:
    """The engine's goals (speed against the reference, same masks), met or not, in words."""
    lines = []
    for r in results:
        if r.model == "vit_b" or r.model in SAM2_MODELS:
            same = r.agreement.min_iou >= IDENTICAL_IOU
            goal = GOAL_RATIO if r.model == "vit_b" else SAM2_ENCODER_GOAL_RATIO
            lines.append(f"- {r.model} encoder >= {goal:g}x the reference at fp32 with identical masks "
                         f"(min IoU {r.agreement.min_iou:.6f}, {r.agreement.differing_pixels} differing pixels): "
                         f"{verdict(r.reference_encoder, r.ours_encoder, same, goal)}")
        lines.append(f"- {r.model} one-click decode >= {GOAL_RATIO:.0f}x the reference, 3 masks like for like: "
                     f"{verdict(r.reference_decode, r.ours_decode, r.agreement.min_iou >= AGREE_IOU)}")
        lines.append(f"  (one click as the backend answers it, best of 3: "
                     f"{verdict(r.reference_best, r.ours_best, r.best_min_iou >= AGREE_IOU)})")
    return lines


def report(results: list[ModelResult], env_before: str, env_after: str, prompt_count: int,
           matmul: float) -> str:
    lines = [f"Environment: {env_before}", f"Load average at the end: {env_after.rsplit('load average ', 1)[1]}",
             "", "Reference vs ours, fp32 (medians after one warm-up, interleaved):", ""]
    lines += comparison_table(results)
    lines += [""] + floor_lines(results, matmul)
    lines += ["", f"Mask agreement, reference vs ours at fp32 ({prompt_count} prompts x 3 masks):", ""]
    lines += agreement_table(results)
    if any(r.modes for r in results):
        lines += ["", f"Faster modes of ours vs ours at fp32 (interleaved medians; agreement on the same "
                  f"{prompt_count} prompts):", ""]
        lines += modes_table(results)
    lines += ["", "Goals:"] + goals(results)
    return "\n".join(lines)


def to_json(results: list[ModelResult], env_before: str, env_after: str, matmul: float) -> dict:
    models = []
    for r in results:
        entry = asdict(r)
        entry.update(encoder_ratio=r.encoder_ratio, decode_ratio=r.decode_ratio, best_ratio=r.best_ratio)
        models.append(entry)
    return {"environment": env_before, "environment_after": env_after, "image": [HEIGHT, WIDTH],
            "matmul_gflops": matmul, "models": models}


# --- command line -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ",".join(MODELS))
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = PyTorch's default)")
    parser.add_argument("--runs", type=int, default=None,
                        help="timed encodes per side and mode (default: 3 for vit_b and sam2.1_b+, 5 for sam2.1_t, "
                             "10 for vit_t)")
    parser.add_argument("--decode-runs", type=int, default=20, help="timed one-click decodes per side and mode")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes on a CPU)")
    parser.add_argument("--no-autocast", dest="autocast", action="store_false",
                        help="skip the bf16 / fp16 autocast modes (on a CPU without AVX-512 BF16 or AMX they "
                             "emulate the types and take minutes per encode)")
    parser.add_argument("--fast-paths", choices=sorted(FAST_PATHS), default="fast",
                        help="our engine's speed tricks: fast (what the backend serves) or reference (every one "
                             "off: Meta's order of operations)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the numbers here")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if unknown := [m for m in args.models if m not in MODELS]:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if args.runs is not None and args.runs < 1 or args.decode_runs < 1:
        parser.error("--runs and --decode-runs must be at least 1")
    if args.threads < 0:
        parser.error("--threads must be 0 (default) or more")
    try:
        model.runtime.resolve_device(args.device)
    except (RuntimeError, ValueError) as exc:
        parser.error(str(exc))
    return args


@contextmanager
def scratch_directory() -> Iterator[Path]:
    """A temporary folder for the checkpoint files (ViT-B's is ~375 MB), removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="sam-bench-") as directory:
        yield Path(directory)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # The reference MobileSAM imports timm's deprecated paths and re-registers timm's TinyViT names.
    warnings.filterwarnings("ignore", message="Importing from timm|Overwriting tiny_vit|`torch.jit.script`")
    if args.threads:
        model.runtime.set_threads(args.threads)

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    env_before = environment(args.device)
    log(env_before)
    matmul = matmul_gflops(args.device)
    log(f"fp32 matmul throughput {matmul:.0f} GFLOP/s")
    results = []
    with scratch_directory() as directory:
        for name in args.models:
            results.append(bench_model(name, args.device, encoder_runs(name, args.runs), args.decode_runs,
                                       args.compile, directory, log, args.autocast, FAST_PATHS[args.fast_paths]))
    env_after = environment(args.device)
    print(f"Our engine's fast paths: {args.fast_paths}; LD_PRELOAD: {os.environ.get('LD_PRELOAD') or 'none'}")
    print(report(results, env_before, env_after, len(prompts()), matmul))
    if args.json:
        args.json.write_text(json.dumps(to_json(results, env_before, env_after, matmul), indent=2) + "\n")
        log(f"numbers written to {args.json}")


if __name__ == "__main__":
    main()
