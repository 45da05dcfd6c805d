"""What refinement adds to a click: the second click of an object decoded from its points alone (SAM_REFINE=false)
against the same click refined from the first answer's logits (the store lookup, ``mask_input``, remembering).

A seeded random ViT-B (official architecture; weights change masks, not times) embeds one 1024x768 image once;
then both forms run alternately through the backend's own path (``Predictions.segment_click``), medians printed
side by side with the load average.

    .venv/bin/python -m bench.refinement --runs 30
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from backend.config import Settings
from backend.label_config import parse_label_config
from backend.predictions import Predictions
from backend.prompts import ObjectPrompt
from backend.refinement import Refinements
from backend.segmenter import Segmenter
from testsupport.checkpoints import make_image, official_sam, save

CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="brush" toName="image"><Label value="Object"/></BrushLabels></View>"""


def prompt(n: int) -> ObjectPrompt:
    points = np.array([[512.0, 384.0], [200.0, 150.0], [700.0, 500.0]], np.float32)[:n]
    return ObjectPrompt(label="Object", points=points, point_labels=np.array([1, 0, 1], np.int32)[:n], box=None,
                        source_ids=(), from_name="kp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    with tempfile.TemporaryDirectory() as directory:
        path = save(official_sam("vit_b", seed=1), Path(directory) / "sam_vit_b_random.pth")
        segmenter = Segmenter(path, "cpu")
        segmenter.load()
    embedding = segmenter.embed(make_image(768, 1024, seed=1), "bench-image")
    plain = Predictions(parse_label_config(CONFIG), Settings(), segmenter, images=None)  # type: ignore[arg-type]
    refined = Predictions(parse_label_config(CONFIG), Settings(), segmenter, images=None,  # type: ignore[arg-type]
                          refinements=Refinements(64 * 2**20))
    refined.segment_click(embedding, "bench-image", prompt(1), task_id=1)  # the first click's answer, kept
    times: dict[str, list[float]] = {"points only (SAM_REFINE=false)": [], "refined from click 1 (SAM_REFINE=true)": []}
    for _ in range(args.runs):
        for name, predictions in zip(times, (plain, refined), strict=True):
            start = time.perf_counter()
            predictions.segment_click(embedding, "bench-image", prompt(2), task_id=1)
            times[name].append(time.perf_counter() - start)
    store = refined.refinements
    assert store is not None
    lookup = []
    for _ in range(1000):
        start = time.perf_counter()
        store.earlier(embedding.fingerprint, "bench-image", prompt(3))
        lookup.append(time.perf_counter() - start)
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, torch threads {torch.get_num_threads()}")
    print(f"{'second click of an object, 1024x768, vit_b decoder':<52} {'median ms':>10} {'p90 ms':>8}")
    for name, samples in times.items():
        print(f"{name:<52} {statistics.median(samples) * 1000:>10.1f} {np.percentile(samples, 90) * 1000:>8.1f}")
    print(f"{'store lookup of a 3-point prompt (of which ms)':<52} {statistics.median(lookup) * 1000:>10.3f}")
    print(f"store: {len(store)} entries, {store.nbytes / 1024:.0f} KiB")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
