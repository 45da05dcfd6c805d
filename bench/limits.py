"""What a request costs with and without the limits, and what the embedding cache's precision costs and buys.

Two tables, one run:

1. Embedding precision. For MobileSAM, SAM 2.1 tiny and ViT-B (official architectures, seeded random weights:
   no real checkpoint is available here, so the mask agreement is indicative, not a quality claim), each
   image's embedding in memory at fp32 and in the byte form Redis holds (fp16), and the masks of the same
   clicks decoded from the fp32 embedding and from the fp16 one: how many differ and by how much. The last
   column checks the fix: the in-process copy rounded through fp16 (``Embedding.at_stored_precision``) against
   the one read back from the bytes, which must agree exactly.
2. Request limits. The requests that cost gigabytes or minutes before the limits, sent to two real
   ``sam-backend serve`` processes with a tiny model: one with the default limits, one with every limit
   raised out of reach (what the backend did before). Status, seconds and the growth of the worker's resident
   memory (/proc) per request.
3. Boxes in chunks. 100 boxes of one batch task on a 4000x3000 image through the decoder in one call, and
   ``BOX_CHUNK`` at a time as ``Segmenter.box_masks`` does: peak resident memory (a fresh process per variant).

    .venv/bin/python -m bench.limits [--images 2] [--clicks 20] [--skip-vit-b] [--only precision|chunks|limits]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests

from testsupport.backend import (
    fixture_body,
    interactive_body,
    make_tiny_checkpoint,
    running_label_studio,
    start_server,
)
from testsupport.proc import tree_rss_bytes

MiB = 2**20
UNBOUNDED = {name: str(10**9) for name in ("SAM_MAX_TASKS", "SAM_MAX_BOXES_PER_TASK", "SAM_MAX_CLICK_REGIONS",
                                           "SAM_MAX_CLICK_POINTS", "SAM_MAX_CLICK_OBJECTS", "SAM_SETUP_PROJECTS",
                                           "SAM_SETUP_MEMORY_MB")}


# ------------------------------------------------------------------------------------------------------------
# 1. embedding precision
def checkpoints(directory: Path, vit_b: bool) -> list[tuple[str, Path]]:
    from testsupport import checkpoints as sam_ckpt
    from testsupport import sam2_checkpoints
    from testsupport.mobilesam_checkpoints import make_mobile_sam_checkpoint

    made = [("MobileSAM (vit_t)", make_mobile_sam_checkpoint(directory / "mobile_sam.pt", "vit_t", seed=1)),
            ("SAM 2.1 hiera_tiny", sam2_checkpoints.checkpoint(directory, "sam2.1_hiera_tiny", seed=1)[0])]
    if vit_b:
        made.append(("SAM ViT-B", sam_ckpt.vit_b_checkpoint(directory, seed=1)[0]))
    return made


def precision_row(name: str, path: Path, images: int, clicks: int) -> dict[str, Any]:
    import torch

    from model import Embedding, Predictor, load
    from testsupport.checkpoints import make_image

    predictor = Predictor(load(path, device="cpu", dtype=torch.float32))
    rng = np.random.default_rng(0)
    differ, total, worst_px, worst_iou, rounded_vs_bytes = 0, 0, 0, 1.0, 0
    fp32_bytes = fp16_bytes = 0
    for index in range(images):
        image = make_image(480, 640, seed=index)
        full = predictor.embed(image)
        stored = full.at_stored_precision()
        data = full.to_bytes()
        read = Embedding.from_bytes(data)
        fp32_bytes, fp16_bytes = full.nbytes, len(data)
        for _ in range(clicks):
            point = np.array([[rng.uniform(0, 640), rng.uniform(0, 480)]], np.float32)
            label = np.array([1], np.int32)
            a = predictor.predict(full, points=point, labels=label, best_only=True).masks[0]
            b = predictor.predict(stored, points=point, labels=label, best_only=True).masks[0]
            c = predictor.predict(read, points=point, labels=label, best_only=True).masks[0]
            pixels = int((a != b).sum())
            union = int((a | b).sum())
            total += 1
            differ += pixels > 0
            worst_px = max(worst_px, pixels)
            worst_iou = min(worst_iou, (int((a & b).sum()) / union) if union else 1.0)
            rounded_vs_bytes += int((b != c).sum())
    return {"model": name, "fp32 MiB": fp32_bytes / MiB, "fp16 MiB": fp16_bytes / MiB, "clicks": total,
            "masks differ fp32/fp16": differ, "max px": worst_px, "min IoU": worst_iou,
            "px rounded vs Redis": rounded_vs_bytes}


# ------------------------------------------------------------------------------------------------------------
# 2. request limits
def keypoint(i: int, label: str = "Object") -> dict[str, Any]:
    return {"id": f"kp{i}", "from_name": "kp", "to_name": "image", "type": "keypointlabels", "is_positive": True,
            "value": {"x": 5 + i % 90, "y": 5 + (i * 7) % 90, "width": 0.26, "keypointlabels": [label]}}


def rectangles_task(count: int) -> dict[str, Any]:
    body = copy.deepcopy(fixture_body("predict_batch_two_tasks.json"))
    regions = [{"id": f"r{i}", "from_name": "rect", "to_name": "image", "type": "rectanglelabels",
                "value": {"x": i % 60, "y": (3 * i) % 60, "width": 30, "height": 30, "rotation": 0,
                          "rectanglelabels": ["Object"]}} for i in range(count)]
    body["tasks"] = body["tasks"][:1]
    body["tasks"][0]["annotations"] = [{"id": 1, "result": regions}]
    return body


def many_tasks(count: int) -> dict[str, Any]:
    body = copy.deepcopy(fixture_body("predict_batch_two_tasks.json"))
    body["tasks"] = [{"id": i, "data": {"image": f"/data/upload/4/img{i}.png"}} for i in range(count)]
    return body


def many_labels(count: int) -> dict[str, Any]:
    """A click with ``count`` labels, each a label of the smart tool and of the brush (so each is a mask)."""
    body = interactive_body([keypoint(i, f"L{i}") for i in range(count)])
    labels = "".join(f'<Label value="L{i}"/>' for i in range(count))
    body["label_config"] = ('<View><Image name="image" value="$image"/>'
                            f'<BrushLabels name="brush" toName="image">{labels}</BrushLabels>'
                            f'<KeyPointLabels name="kp" toName="image" smart="true">{labels}</KeyPointLabels></View>')
    return body


REQUESTS = {
    "click, 10 000 keypoints": lambda: interactive_body([keypoint(i) for i in range(10_000)]),
    "click, 1 000 labels": lambda: many_labels(1_000),
    "batch task, 1 500 rectangles": lambda: rectangles_task(1_500),
    "batch, 20 000 tasks": lambda: many_tasks(20_000),
}


def setup_flood(server: Any, calls: int = 400, size: int = 1_500_000) -> tuple[int, float]:
    """``calls`` /setup with distinct projects and ``size``-character configs (the observed +590 MB)."""
    statuses = set()
    started = time.monotonic()
    for i in range(calls):
        schema = ("<View><!-- " + str(i) + "x" * size + ' --><Image name="image" value="$image"/>'
                  '<BrushLabels name="b" toName="image"><Label value="O"/></BrushLabels></View>')
        statuses.add(server.post("/setup", json={"project": f"{10_000 + i}.1", "schema": schema}).status_code)
    return max(statuses), time.monotonic() - started


def limits_table() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, running_label_studio() as label_studio:
        checkpoint = make_tiny_checkpoint(Path(tmp) / "sam_tiny.pth", seed=2)
        servers = {"limits (defaults)": start_server(checkpoint, Path(tmp) / "limited.log"),
                   "unbounded": start_server(checkpoint, Path(tmp) / "unbounded.log", **UNBOUNDED)}
        try:
            for server in servers.values():
                setup = fixture_body("setup.json")
                setup["hostname"] = label_studio.url
                server.post("/setup", json=setup)
                server.wait_loaded()
                server.post("/predict", json=fixture_body("predict_interactive_keypoint_api.json"))
            for name, make in REQUESTS.items():
                data = json.dumps(make()).encode()
                row: dict[str, Any] = {"request": f"{name} ({len(data) / 1024:.0f} KiB)"}
                for label, server in servers.items():
                    before = tree_rss_bytes(server.process.pid)
                    started = time.monotonic()
                    response = requests.post(server.url + "/predict", data=data, timeout=600,
                                             headers={"Content-Type": "application/json"})
                    seconds = time.monotonic() - started
                    grown = (tree_rss_bytes(server.process.pid) - before) / MiB
                    row[label] = f"{response.status_code} {seconds:6.2f} s {grown:+7.1f} MiB " \
                                 f"({len(response.content) / MiB:.1f} MiB answer)"
                rows.append(row)
            row = {"request": "400 x /setup, distinct projects, 1.5 MB configs"}
            for label, server in servers.items():
                before = tree_rss_bytes(server.process.pid)
                status, seconds = setup_flood(server)
                grown = (tree_rss_bytes(server.process.pid) - before) / MiB
                row[label] = f"{status} {seconds:6.2f} s {grown:+7.1f} MiB"
            rows.append(row)
        finally:
            for server in servers.values():
                server.stop()
    return rows


# ------------------------------------------------------------------------------------------------------------
# 3. boxes in chunks
def boxes_peak(checkpoint: str, boxes: int, chunk: int) -> tuple[float, float]:
    """Peak resident MiB above the embedded state and seconds for ``boxes`` boxes on a 4000x3000 image, decoded
    ``chunk`` at a time and each chunk's masks made regions (what ``Predictions._boxes`` does)."""
    import resource

    from backend.results import mask_regions
    from backend.segmenter import Segmenter
    from testsupport.checkpoints import make_image

    segmenter = Segmenter(checkpoint, "cpu")
    segmenter.load()
    image = make_image(3000, 4000, seed=3)
    embedding = segmenter.predictor().embed(image)
    from backend.label_config import parse_label_config

    config = parse_label_config(fixture_body("setup.json")["schema"])
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 3000, (boxes, 2))
    xyxy = np.concatenate([corners, corners + rng.uniform(100, 1000, (boxes, 2))], 1).astype(np.float32)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.monotonic()
    regions = []
    for start in range(0, boxes, chunk):
        for mask in segmenter.segment_boxes(embedding, xyxy[start:start + chunk]):
            regions.extend(mask_regions(mask.mask, "Object", mask.score, config, "brush"))
    seconds = time.monotonic() - started
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline, seconds


def chunk_table(boxes: int = 100) -> list[dict[str, Any]]:
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from backend.segmenter import BOX_CHUNK

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = str(make_tiny_checkpoint(Path(tmp) / "sam_tiny.pth", seed=2))
        for chunk in (boxes, BOX_CHUNK):
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:  # a fresh peak per variant
                peak, seconds = pool.submit(boxes_peak, checkpoint, boxes, chunk).result()
            rows.append({"boxes per decoder call": chunk, "boxes": boxes, "peak RSS above the embedding": f"{peak:.0f} MiB",
                         "seconds": f"{seconds:.1f}"})
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    columns = list(rows[0])
    cells = [[f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for row in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--skip-vit-b", action="store_true", help="the ViT-B encoder takes seconds per image")
    parser.add_argument("--only", choices=("precision", "limits", "chunks"))
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}, "
          f"{os.cpu_count()} CPUs")
    if args.only in (None, "precision"):
        with tempfile.TemporaryDirectory() as tmp:
            rows = [precision_row(name, path, args.images, args.clicks)
                    for name, path in checkpoints(Path(tmp), vit_b=not args.skip_vit_b)]
        print("\nEmbedding precision (fp32 in memory vs fp16 in Redis; CPU, fp32 model, 640x480 images)")
        print_table(rows)
    if args.only in (None, "chunks"):
        print("\nBoxes of one batch task through the decoder (tiny model, 4000x3000 image, brush regions)")
        print_table(chunk_table())
    if args.only in (None, "limits"):
        print("\nRequest limits (tiny model, 320x240 image, gunicorn 1 worker x 4 threads)")
        print_table(limits_table())
    print(f"\nload average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")


if __name__ == "__main__":
    main()
