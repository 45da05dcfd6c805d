"""Bulk pre-annotation throughput: images/s for ``boxes`` and ``everything``, ours against Meta's and Ultralytics'.

For each model (MobileSAM ``vit_t``, ``vit_b``) one seeded random checkpoint in the official format is loaded
by all three implementations, and each times the same per-image work on the same images:

- ``boxes``: encode the image, then one mask per box for ``--boxes`` boxes (ours: ``Predictor.embed`` +
  ``predict_boxes``, one decoder call; Meta: ``SamPredictor.set_image`` + ``predict_torch`` with the boxes
  batched; Ultralytics: ``SAM(checkpoint)(image, bboxes=boxes)``);
- ``everything``: the automatic mask generator with each implementation's defaults (32 x 32 points, predicted
  IoU > 0.88, stability >= 0.95; ours: ``MaskGenerator``, Meta: ``SamAutomaticMaskGenerator`` (MobileSAM's
  copy of it for vit_t), Ultralytics: ``SAM(checkpoint)(image)``).

Random weights change masks, not times, with one exception worth knowing: with Meta's thresholds they keep
few of the 3072 grid masks, as real weights keep a minority; the work per rejected mask is what differs
between the implementations. Each row prints images/s (the median over ``--runs`` images after one warm-up),
the masks of the last image, and the load average; ours' note says how much of its boxes time is the encoder.
``--encode-batch N`` adds a row for ours encoding N images per encoder run (``Predictor.embed_batch``, what
``SAM_ENCODE_BATCH`` does in bulk work), timed per image, alternating with the others. Implementations run alternately, image by image;
``boxes`` medians follow one warm-up image, ``everything`` (minutes per image on a CPU) times
``--everything-runs`` images after the ``boxes`` rows have paid the first-call costs.

Ultralytics (AGPL-3.0) is a benchmark peer only, never a dependency: ``pip install ultralytics`` into the venv
to include it; without it its column says so.

    .venv/bin/python -m bench.bulk                       # vit_t and vit_b, 1024x768, 2 runs
    .venv/bin/python -m bench.bulk --models vit_t --runs 3 --modes boxes
    .venv/bin/python -m bench.bulk --models vit_t --modes boxes --encode-batch 2   # batched encodes on this CPU
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from testsupport.checkpoints import make_image

IMPLEMENTATIONS = ("ours", "meta", "ultralytics")


def reference_model(name: str, seed: int = 0) -> torch.nn.Module:
    if name == "vit_t":
        from testsupport.mobilesam_checkpoints import random_reference_sam

        return random_reference_sam("vit_t", seed)
    from testsupport.checkpoints import official_sam

    return official_sam("vit_b", seed)


def boxes_for(image: np.ndarray, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = image.shape[:2]
    x0 = rng.uniform(0, 0.7 * w, count)
    y0 = rng.uniform(0, 0.7 * h, count)
    return np.stack([x0, y0, x0 + rng.uniform(0.1, 0.3) * w, y0 + rng.uniform(0.1, 0.3) * h], 1).astype(np.float32)


class Ours:
    def __init__(self, checkpoint: Path) -> None:
        from model import MaskGenerator, Predictor, load

        self.sam = load(checkpoint, device="cpu", dtype=torch.float32)
        self.predictor = Predictor(self.sam)
        self.generator = MaskGenerator(self.sam)

        self.encode_seconds: list[float] = []  # of each boxes call: the encoder's part

    def boxes(self, image: np.ndarray, boxes: np.ndarray) -> int:
        start = time.perf_counter()
        embedding = self.predictor.embed(image)
        self.encode_seconds.append(time.perf_counter() - start)
        return len(self.predictor.predict_boxes(embedding, boxes).masks)

    def boxes_batched(self, images: list[np.ndarray], boxes: list[np.ndarray]) -> int:
        """The boxes work of several images with one encoder run for all (``SAM_ENCODE_BATCH``)."""
        embeddings = self.predictor.embed_batch(images)
        return sum(len(self.predictor.predict_boxes(e, b).masks) for e, b in zip(embeddings, boxes, strict=True))

    def everything(self, image: np.ndarray) -> int:
        return len(self.generator.generate(image))


class Meta:
    def __init__(self, name: str, reference: torch.nn.Module) -> None:
        if name == "vit_t":
            from mobile_sam import SamAutomaticMaskGenerator, SamPredictor
        else:
            from segment_anything import SamAutomaticMaskGenerator, SamPredictor
        self.predictor = SamPredictor(reference)
        self.generator = SamAutomaticMaskGenerator(reference)

    @torch.no_grad()
    def boxes(self, image: np.ndarray, boxes: np.ndarray) -> int:
        self.predictor.set_image(image)
        transformed = self.predictor.transform.apply_boxes_torch(torch.from_numpy(boxes), image.shape[:2])
        masks, _, _ = self.predictor.predict_torch(None, None, boxes=transformed, multimask_output=False)
        return len(masks)

    def everything(self, image: np.ndarray) -> int:
        return len(self.generator.generate(image))


class Ultralytics:
    def __init__(self, name: str, checkpoint: Path, workdir: Path) -> None:
        from ultralytics import SAM

        # Ultralytics picks the architecture from the file name.
        target = workdir / ("mobile_sam.pt" if name == "vit_t" else "sam_b.pt")
        if not target.exists():
            target.symlink_to(checkpoint)
        self.model = SAM(str(target))

    def boxes(self, image: np.ndarray, boxes: np.ndarray) -> int:
        # conf=0: keep every box's mask, as the others do (SAM.predict's default conf of 0.25 drops masks whose
        # predicted IoU is lower, which random weights' often are)
        result = self.model(image[:, :, ::-1].copy(), bboxes=boxes.tolist(), conf=0.0, verbose=False)[0]
        return 0 if result.masks is None else len(result.masks)

    def everything(self, image: np.ndarray) -> int:
        result = self.model(image[:, :, ::-1].copy(), verbose=False)[0]
        return 0 if result.masks is None else len(result.masks)


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    start = time.perf_counter()
    count = fn()
    return time.perf_counter() - start, count


def bench_model(name: str, modes: list[str], size: tuple[int, int], runs: int, everything_runs: int,
                n_boxes: int, workdir: Path, encode_batch: int = 0
                ) -> list[tuple[str, str, str, float | None, int | None, str]]:
    print(f"{name}: building seeded random weights", flush=True)
    reference = reference_model(name).eval()
    checkpoint = workdir / f"{name}_random.pth"
    torch.save(reference.state_dict(), checkpoint)
    impls: dict[str, object] = {"ours": Ours(checkpoint), "meta": Meta(name, reference)}
    notes = {}
    if importlib.util.find_spec("ultralytics") is None:
        notes["ultralytics"] = "not installed (pip install ultralytics to compare)"
    else:
        try:
            impls["ultralytics"] = Ultralytics(name, checkpoint, workdir)
        except Exception as error:  # report, keep the other columns
            notes["ultralytics"] = f"could not load the checkpoint: {type(error).__name__}: {error}"[:200]
    rows = []
    for mode in modes:
        times: dict[str, list[float]] = {impl: [] for impl in impls}
        counts: dict[str, int] = {}
        # boxes: run 0 warms every implementation up; everything: a minute or more per image, so no warm-up
        # (the boxes rows ran first and paid the first-call costs).
        first = 0 if mode == "boxes" else 1
        batched = f"ours, encode batch {encode_batch}"
        if mode == "boxes" and encode_batch > 1:
            times[batched] = []
        ours = impls["ours"]
        assert isinstance(ours, Ours)
        ours.encode_seconds.clear()
        for run in range(first, (runs if mode == "boxes" else everything_runs) + 1):
            image = make_image(*size, seed=100 + run)
            boxes = boxes_for(image, n_boxes, run)
            if batched in times:  # encode_batch images per run, timed per image; ours alone right before
                images = [make_image(*size, seed=100 + run + 1000 * k) for k in range(encode_batch)]
                all_boxes = [boxes_for(i, n_boxes, run + k) for k, i in enumerate(images)]
                seconds, _ = timed(functools.partial(ours.boxes_batched, images, all_boxes))
                if run > 0:
                    times[batched].append(seconds / encode_batch)
                print(f"  {name} {mode} {batched} images {run}: {seconds / encode_batch:.2f} s/image", flush=True)
            for impl, runner in impls.items():
                try:
                    seconds, count = timed(lambda r=runner, i=image, b=boxes, m=mode: (
                        r.boxes(i, b) if m == "boxes" else r.everything(i)))
                except Exception as error:
                    notes[impl] = f"{mode} failed: {type(error).__name__}: {error}"[:200]
                    continue
                counts[impl] = count
                if run > 0:
                    times[impl].append(seconds)
                print(f"  {name} {mode} {impl} image {run}: {seconds:.2f} s, {count} masks", flush=True)
        if mode == "boxes" and ours.encode_seconds[1:]:
            notes["ours"] = f"encoder {statistics.median(ours.encode_seconds[1:]):.2f} s of it"
        for impl in (*IMPLEMENTATIONS, *([batched] if batched in times else [])):
            median = statistics.median(times[impl]) if times.get(impl) else None
            rows.append((name, mode, impl, median, counts.get(impl), notes.get(impl, "")))
        notes.pop("ours", None)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="vit_t,vit_b")
    parser.add_argument("--modes", default="boxes,everything")
    parser.add_argument("--size", type=int, nargs=2, default=(768, 1024), metavar=("H", "W"))
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--everything-runs", type=int, default=1,
                        help="images timed in the everything mode (minutes each on a CPU)")
    parser.add_argument("--boxes", type=int, default=5, help="boxes per image in the boxes mode")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    parser.add_argument("--encode-batch", type=int, default=0,
                        help="boxes: also time ours with this many images per encoder run (SAM_ENCODE_BATCH)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows += bench_model(name, args.modes.split(","), tuple(args.size), args.runs, args.everything_runs,
                                args.boxes, Path(tmp), args.encode_batch)
    load_after = os.getloadavg()
    print(f"\n{args.size[1]}x{args.size[0]}, {args.boxes} boxes per image, median of {args.runs} image(s) "
          f"(everything: {args.everything_runs}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{load_before[0]:.1f} -> {load_after[0]:.1f}")
    print("| model | mode | implementation | s/image | images/s | vs ours | masks (last image) | note |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    ours = {(m, mode): t for m, mode, impl, t, _, _ in rows if impl == "ours"}
    for model, mode, impl, seconds, count, note in rows:
        base = ours.get((model, mode))
        ratio = f"{seconds / base:.2f}x" if seconds and base else "—"
        print(f"| {model} | {mode} | {impl} | {f'{seconds:.2f}' if seconds else '—'} | "
              f"{f'{1 / seconds:.3f}' if seconds else '—'} | {ratio if impl != 'ours' else '1.00x'} | "
              f"{count if count is not None else '—'} | {note} |")


if __name__ == "__main__":
    main()
