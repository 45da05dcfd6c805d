"""SAM 2.1 tiny on an Ultralytics-format file: what each SAM 2 fast path buys, and ours against Ultralytics.

One seeded random ``sam2.1_t.pt`` in Ultralytics' format (``testsupport.ultralytics_sam2_files``: from
Ultralytics' own builder when ``ultralytics`` is installed, else from the recorded key names and shapes)
and one 1024 x 1024 synthetic image (square, so Ultralytics' letterbox and Meta's stretch agree). One run
prints side by side, medians over ``--runs`` after one warm-up, the configurations interleaved run by run
so that load from other processes falls on all alike:

* the encoder (``embed``) and one click (``predict``, single mask, at the image size) under ``FAST``,
  under ``FAST`` with one SAM 2 switch off at a time, and under ``REFERENCE`` (Meta's order throughout);
* Ultralytics' ``SAM2Predictor`` on the same file (``set_image``; the prompt path through its public
  ``SAM.predict`` would encode again, so its click is ``_inference_features`` plus the same bilinear resize),
  with the IoU of its mask and ours.

    .venv/bin/python -m bench.ulsam2 --runs 3 --threads 2

Weights are random: only speed and agreement mean anything.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import model
from model import FAST, REFERENCE
from testsupport.checkpoints import make_image
from testsupport.ultralytics_sam2_files import file_name, fixture_state_dict, save, ultralytics_model

SIDE = 1024
SWITCHES = ("fused_linear", "hiera_residual_writes", "hiera_mlp_chunk_elements", "strided_max_pool",
            "contiguous_attention_heads", "cached_position_embedding", "channels_last_patch_embed",
            "folded_neck_projections", "per_mask_resize", "pixel_block_upscaling", "folded_decoder_attention",
            "in_place_activations")
POINT = np.array([[SIDE * 0.45, SIDE * 0.55]])


def make_file(directory: Path) -> tuple[Path, bool]:
    """The benchmark's file, and whether Ultralytics' builder made it."""
    try:
        state_dict = ultralytics_model("t", "sam2.1", seed=7).state_dict()
        built = True
    except ImportError:
        state_dict, built = fixture_state_dict(seed=7), False
    return save(state_dict, directory / file_name("t")), built


def ultralytics_runner(path: Path, bgr: np.ndarray) -> tuple[Callable[[], None], Callable[[], np.ndarray]] | None:
    try:
        from ultralytics.models.sam.predict import SAM2Predictor
    except ImportError:
        return None
    predictor = SAM2Predictor(overrides=dict(model=str(path), imgsz=SIDE, device="cpu", verbose=False, conf=0.0,
                                             task="segment", mode="predict", save=False))

    def encode() -> None:
        predictor.reset_image()
        predictor.set_image(bgr)

    def click() -> np.ndarray:
        points, labels, _ = predictor._prepare_prompts((SIDE, SIDE), (SIDE, SIDE), None, POINT[None], np.array([[1]]))
        with torch.inference_mode():
            logits, _ = predictor._inference_features(predictor.features, points, labels, None, False)
            masks = F.interpolate(logits[None].float(), (SIDE, SIDE), mode="bilinear", align_corners=False)[0]
        return (masks > 0).numpy()

    encode()
    return encode, click


def median_ms(samples: list[float]) -> str:
    return f"{1000 * statistics.median(samples):8.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    image = make_image(SIDE, SIDE, seed=9)
    with tempfile.TemporaryDirectory() as tmp:
        path, built = make_file(Path(tmp))
        sam = model.load(path, device="cpu")
        ours = model.Predictor(sam)
        policies = {"FAST": FAST, **{f"FAST, {name} off": replace(FAST, **{name: type(getattr(FAST, name))(0)})
                                     for name in SWITCHES}, "REFERENCE": REFERENCE}
        ultra = ultralytics_runner(path, np.ascontiguousarray(image[..., ::-1]))
        encode_times: dict[str, list[float]] = {name: [] for name in policies}
        click_times: dict[str, list[float]] = {name: [] for name in policies}
        masks: dict[str, np.ndarray] = {}
        if ultra is not None:
            encode_times["Ultralytics SAM2Predictor"], click_times["Ultralytics SAM2Predictor"] = [], []
        for run in range(args.runs + 1):  # run 0 is the warm-up
            for name, policy in policies.items():
                sam.set_fast_paths(policy)
                start = time.perf_counter()
                embedding = ours.embed(image)
                middle = time.perf_counter()
                result = ours.predict(embedding, POINT, [1], multimask=False)
                end = time.perf_counter()
                masks[name] = result.masks[0]
                if run:
                    encode_times[name].append(middle - start)
                    click_times[name].append(end - middle)
            if ultra is not None:
                encode, click = ultra
                start = time.perf_counter()
                encode()
                middle = time.perf_counter()
                masks["Ultralytics SAM2Predictor"] = click()[0]
                end = time.perf_counter()
                if run:
                    encode_times["Ultralytics SAM2Predictor"].append(middle - start)
                    click_times["Ultralytics SAM2Predictor"].append(end - middle)
    fast = statistics.median(encode_times["FAST"])
    print(f"SAM 2.1 tiny, Ultralytics-format file ({'Ultralytics builder' if built else 'recorded keys'}), "
          f"{SIDE}x{SIDE} image, CPU, {args.threads} threads, median of {args.runs}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'configuration':44s} {'encode ms':>9s} {'vs FAST':>8s} {'click ms':>9s} {'mask IoU vs FAST':>17s}")
    for name in encode_times:
        a, b = masks[name], masks["FAST"]
        iou = np.logical_and(a, b).sum() / max(1, np.logical_or(a, b).sum())
        ratio = statistics.median(encode_times[name]) / fast
        print(f"{name:44s} {median_ms(encode_times[name]):>9s} {ratio:7.2f}x {median_ms(click_times[name]):>9s} "
              f"{iou:17.4f}")


if __name__ == "__main__":
    main()
