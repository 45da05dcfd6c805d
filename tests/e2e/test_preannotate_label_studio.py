"""`sam-backend preannotate` and the batch /predict budget against a real Label Studio 1.23.2.

What only the real server shows: that its task API hands the command what it needs (annotations and
predictions of every task, page by page), that `POST /api/predictions` stores what the command writes so
that the Data Manager lists it under our model version, that its project setting makes the editor show it,
and that an entry `[]` in a batch /predict answer stores nothing for that task.

Each test builds its own project of scene images in a Label Studio local-files storage: tasks with a
detector's rectangle prediction, tasks with an annotation of two rectangles, tasks with an annotation of
keypoints (two labels, a negative click), and one task whose image file does not exist. Masks are decoded with
Label Studio's own RLE decoder and compared pixel for pixel with `model.Predictor` on the same checkpoint.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from backend.prompts import asks_three_masks
from testsupport import labeling
from testsupport.backend import SAM_BACKEND, brush_mask, make_tiny_checkpoint, png_bytes, scene
from testsupport.label_studio import LabelStudio, SamBackend
from testsupport.processes import RedisServer, stop_process_group

pytestmark = pytest.mark.e2e

LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image"><Label value="Car"/><Label value="Person"/></BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Car"/><Label value="Person"/></KeyPointLabels>
  <RectangleLabels name="rect" toName="image" smart="true"><Label value="Car"/><Label value="Person"/></RectangleLabels>
</View>"""
SIZES = ((320, 240), (240, 320), (400, 200))


@dataclass
class Planned:
    """One task as built: its image and the prompts SAM should get for it."""

    image: np.ndarray
    name: str
    kind: str  # detector | boxes | points | broken
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    points: dict[str, list[tuple[int, int, int]]] = field(default_factory=dict)  # label -> (x, y, positive)
    task_id: int = 0


def rectangle(width: int, height: int, box: tuple[int, int, int, int], label: str, index: int) -> dict[str, Any]:
    x0, y0, x1, y1 = box
    return {"id": f"r{index}", "type": "rectanglelabels", "from_name": "rect", "to_name": "image",
            "original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"x": 100 * x0 / width, "y": 100 * y0 / height, "width": 100 * (x1 - x0) / width,
                      "height": 100 * (y1 - y0) / height, "rotation": 0, "rectanglelabels": [label]}}


def keypoint(width: int, height: int, x: int, y: int, label: str, positive: bool, index: int) -> dict[str, Any]:
    return {"id": f"k{index}", "type": "keypointlabels", "from_name": "kp", "to_name": "image",
            "original_width": width, "original_height": height, "image_rotation": 0, "is_positive": positive,
            "value": {"x": 100 * x / width, "y": 100 * y / height, "width": 0.5, "keypointlabels": [label]}}


@dataclass
class Project:
    id: int
    planned: list[Planned]

    def by_task(self) -> dict[int, Planned]:
        return {p.task_id: p for p in self.planned}


def make_project(label_studio: LabelStudio, title: str, count: int = 30, broken: bool = True) -> Project:
    """``count`` tasks, a third each with a detector's rectangles, an annotation's rectangles, an annotation's
    keypoints; plus one task whose image is missing. Coordinates are whole pixels on exact percentages."""
    folder = label_studio.files_dir / re.sub(r"\W+", "-", title)
    folder.mkdir(parents=True, exist_ok=True)
    project_id = label_studio.create_project(title, LABEL_CONFIG)
    label_studio.add_local_storage(project_id, folder)
    planned: list[Planned] = []
    tasks = []
    for index in range(count):
        width, height = SIZES[index % len(SIZES)]
        pixels = scene(1000 + index, size=(width, height))
        name = f"scene_{index}.png"
        (folder / name).write_bytes(png_bytes(pixels))
        kind = ("detector", "boxes", "points")[index % 3]
        plan = Planned(pixels, name, kind)
        task: dict[str, Any] = {"data": {"image": f"/data/local-files/?d={folder.name}/{name}"}}
        if kind == "points":
            plan.points = {"Car": [(width // 2, height // 2, 1), (width // 4, height // 4, 0)],
                           "Person": [(width // 5, 4 * height // 5, 1)]}
            result = [keypoint(width, height, x, y, label, bool(positive), i)
                      for i, (label, x, y, positive) in enumerate(
                          (label, x, y, positive) for label, pts in plan.points.items() for x, y, positive in pts)]
            task["annotations"] = [{"result": result}]
        else:
            plan.boxes = [(width // 10, height // 10, width // 2, height // 2)]
            plan.labels = ["Car"]
            if kind == "boxes":
                plan.boxes.append((width // 4, height // 4, 9 * width // 10, 9 * height // 10))
                plan.labels.append("Person")
            result = [rectangle(width, height, box, label, i)
                      for i, (box, label) in enumerate(zip(plan.boxes, plan.labels, strict=True))]
            if kind == "detector":
                task["predictions"] = [{"model_version": "detector-v1", "score": 0.5, "result": result}]
            else:
                task["annotations"] = [{"result": result}]
        planned.append(plan)
        tasks.append(task)
    if broken:
        width, height = SIZES[0]
        planned.append(Planned(np.zeros((height, width, 3), np.uint8), "missing.png", "broken",
                               boxes=[(10, 10, 100, 100)], labels=["Car"]))
        tasks.append({"data": {"image": f"/data/local-files/?d={folder.name}/missing.png"},
                      "predictions": [{"model_version": "detector-v1",
                                       "result": [rectangle(width, height, (10, 10, 100, 100), "Car", 0)]}]})
    label_studio.import_tasks(project_id, tasks)
    for stored, plan in zip(label_studio.tasks(project_id), planned, strict=True):
        assert stored["data"]["image"].endswith("/" + plan.name), (stored, plan.name)
        plan.task_id = stored["id"]
    return Project(project_id, planned)


class Reference(labeling.Reference):
    """The masks `model.Predictor` gives for each planned task, on the same checkpoint."""

    def masks(self, plan: Planned) -> list[tuple[str, np.ndarray]]:
        embedding = self.predictor.embed(plan.image).at_stored_precision()  # as the cache serves it
        if plan.kind == "points":
            out = []
            for label, points in plan.points.items():
                coords = np.asarray([(x, y) for x, y, _ in points], np.float32)
                labels = np.asarray([p for _, _, p in points], np.int32)
                prediction = self.predictor.predict(embedding, points=coords, labels=labels,
                                                    multimask=asks_three_masks(len(coords), False))
                out.append((label, prediction.masks[int(np.argmax(prediction.scores))]))
            return out
        masks = self.predictor.predict_boxes(embedding, np.asarray(plan.boxes, np.float32)).masks
        return list(zip(plan.labels, masks, strict=True))


def decode(region: dict[str, Any], plan: Planned) -> np.ndarray:
    height, width = plan.image.shape[:2]
    assert region["type"] == "brushlabels" and region["from_name"] == "brush" and region["to_name"] == "image"
    assert (region["original_width"], region["original_height"]) == (width, height), region
    return brush_mask(region)


def assert_predictions_equal_predictor(label_studio: LabelStudio, project: Project, reference: Reference,
                                       kinds: tuple[str, ...]) -> None:
    """Exactly one prediction of our version per task of ``kinds``, none on the others, masks as Predictor's."""
    ours = [p for p in label_studio.predictions(project.id) if p["model_version"] == reference.model_version]
    per_task = Counter(p["task"] for p in ours)
    wanted = {plan.task_id for plan in project.planned if plan.kind in kinds}
    assert set(per_task) == wanted, f"predicted {sorted(per_task)}, wanted {sorted(wanted)}"
    assert set(per_task.values()) == {1}, f"tasks written more than once: {per_task}"
    plans = project.by_task()
    for prediction in ours:
        plan = plans[prediction["task"]]
        expected = reference.masks(plan)
        regions = prediction["result"]
        assert len(regions) == len(expected), (plan.kind, regions)
        for region, (label, mask) in zip(regions, expected, strict=True):
            assert region["value"]["brushlabels"] == [label]
            got = decode(region, plan)
            differ = int((got != mask).sum())
            assert differ == 0, f"{plan.kind} task {plan.task_id}: {differ} pixels differ from model.Predictor"
        assert prediction["score"] == pytest.approx(np.mean([r["score"] for r in regions]))


# ------------------------------------------------------------------------------------------------------------
# processes


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("preannotate-ckpt") / "sam_tiny.pth", seed=11)


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> Reference:
    return Reference(checkpoint)


def environment(label_studio: LabelStudio, checkpoint: Path, workdir: Path, **extra: str) -> dict[str, str]:
    env = SamBackend(workdir, checkpoint, label_studio).environment()
    env.update({"OMP_NUM_THREADS": "1", "LOG_LEVEL": "INFO"}, **extra)
    return env


def preannotate(env: dict[str, str], project: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SAM_BACKEND), "preannotate", "--project", str(project), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def done_count(stdout: str) -> int:
    match = re.search(r": (\d+) done, (\d+) skipped, (\d+) failed", stdout)
    assert match, stdout
    return int(match.group(1))


def written_tasks(log: str) -> set[int]:
    return {int(task) for task in re.findall(r"task (\d+): \d+ region\(s\) written", log)}


# ------------------------------------------------------------------------------------------------------------
# tests


def test_preannotate_writes_each_task_once_then_nothing(label_studio: LabelStudio, checkpoint: Path,
                                                       reference: Reference, tmp_path: Path) -> None:
    """boxes, then points, then boxes again: every task gets exactly one prediction of our model version,
    its masks equal to model.Predictor's for the same prompts; the broken image is reported and the rest
    are done; a run over a finished project writes nothing; the editor is set to show our predictions."""
    project = make_project(label_studio, "preannotate boxes and points")
    env = environment(label_studio, checkpoint, tmp_path)

    boxes = preannotate(env, project.id, "--mode", "boxes")
    assert boxes.returncode == 1, boxes.stderr  # the broken task failed
    assert done_count(boxes.stdout) == 20, boxes.stdout
    assert "skipped 10: no rectangles" in boxes.stdout, boxes.stdout
    broken = next(p.task_id for p in project.planned if p.kind == "broken")
    assert f"failed 1 (image: the task's image could not be fetched or read): tasks {broken}" in boxes.stdout
    assert "missing.png" in boxes.stdout and "Traceback" not in boxes.stderr
    assert "task/s" in boxes.stderr and "images_per_s" in boxes.stderr, "the progress bar shows rates"

    points = preannotate(env, project.id, "--mode", "points")
    assert points.returncode == 0 and done_count(points.stdout) == 10, points.stdout  # the broken task has no keypoints
    assert_predictions_equal_predictor(label_studio, project, reference, ("detector", "boxes", "points"))

    before = sorted(p["id"] for p in label_studio.predictions(project.id))
    again = preannotate(env, project.id, "--mode", "boxes", "--quiet")
    assert done_count(again.stdout) == 0 and "skipped 30: already had a prediction" in again.stdout, again.stdout
    assert sorted(p["id"] for p in label_studio.predictions(project.id)) == before, "a second run wrote something"

    # The imported detector predictions made "detector-v1" the project's prelabeling choice: the command
    # says so, and with --prelabel switches it, so the editor shows our masks.
    assert "the editor pre-labels tasks with 'detector-v1'" in boxes.stdout
    preannotate(env, project.id, "--prelabel", "--quiet")
    assert label_studio.request("GET", f"/api/projects/{project.id}")["model_version"] == reference.model_version
    task = label_studio.request("GET", f"/api/tasks/{project.planned[0].task_id}")
    assert reference.model_version in {p["model_version"] for p in task["predictions"]}


def test_overwrite_replaces_our_predictions_only(label_studio: LabelStudio, checkpoint: Path,
                                                 reference: Reference, tmp_path: Path) -> None:
    project = make_project(label_studio, "preannotate overwrite", count=6, broken=False)
    env = environment(label_studio, checkpoint, tmp_path)
    assert preannotate(env, project.id, "--quiet").returncode == 0
    first = {p["id"] for p in label_studio.predictions(project.id) if p["model_version"] == reference.model_version}
    result = preannotate(env, project.id, "--overwrite", "--quiet")
    assert result.returncode == 0 and done_count(result.stdout) == 4, result.stdout
    after = label_studio.predictions(project.id)
    ours = {p["id"] for p in after if p["model_version"] == reference.model_version}
    assert len(ours) == 4 and not ours & first, "the old predictions of our version are replaced"
    assert sum(p["model_version"] == "detector-v1" for p in after) == 2, "the detector's stay"


def test_a_killed_run_continues_where_it_stopped(label_studio: LabelStudio, checkpoint: Path,
                                                 reference: Reference, tmp_path: Path) -> None:
    """SIGKILL half-way (no chance to clean up), then the same command: every task written exactly once."""
    project = make_project(label_studio, "preannotate killed", broken=False)
    env = environment(label_studio, checkpoint, tmp_path)
    log = (tmp_path / "killed.log").open("wb")
    process = subprocess.Popen([str(SAM_BACKEND), "preannotate", "--project", str(project.id), "--quiet"], env=env,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while len(label_studio.predictions(project.id)) - 10 < 5:  # 10 detector predictions were imported
            assert process.poll() is None, (tmp_path / "killed.log").read_text()
            assert time.monotonic() < deadline, "no prediction written in time"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        stop_process_group(process)
        log.close()
    written = len(label_studio.predictions(project.id)) - 10
    assert 5 <= written < 20, f"the run was not interrupted half-way ({written} of 20 written)"

    result = preannotate(env, project.id, "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr
    assert done_count(result.stdout) == 20 - written, result.stdout
    assert f"skipped {written}: already had a prediction" in result.stdout, result.stdout
    assert_predictions_equal_predictor(label_studio, project, reference, ("detector", "boxes"))


def test_an_interrupted_overwrite_run_resumed_with_its_printed_command_writes_each_task_once(
        label_studio: LabelStudio, checkpoint: Path, reference: Reference, tmp_path: Path) -> None:
    """Ctrl-C half-way through --overwrite, then the command it printed: every task ends with exactly one
    prediction of our version, written by the overwrite run or its resumption, and none written twice."""
    project = make_project(label_studio, "preannotate overwrite resumed", broken=False)
    env = environment(label_studio, checkpoint, tmp_path)
    assert preannotate(env, project.id, "--quiet").returncode == 0
    old = {p["id"] for p in label_studio.predictions(project.id) if p["model_version"] == reference.model_version}
    assert len(old) == 20
    out, err = tmp_path / "overwrite.out", tmp_path / "overwrite.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen([str(SAM_BACKEND), "preannotate", "--project", str(project.id), "--overwrite",
                                    "--quiet", "--verbose"], env=env, stdout=stdout, stderr=stderr,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            ours = [p for p in label_studio.predictions(project.id) if p["model_version"] == reference.model_version]
            if sum(p["id"] not in old for p in ours) >= 5:
                break
            assert process.poll() is None, out.read_text() + err.read_text()
            assert time.monotonic() < deadline, "no prediction written in time"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)  # Ctrl-C
        assert process.wait(timeout=60) == 130, err.read_text()
    finally:
        stop_process_group(process)
    printed = re.search(r"if it stops, continue it with: (.+)", out.read_text())
    interrupted = re.search(r"interrupted; continue where it stopped with: (.+)", err.read_text())
    assert printed and interrupted, out.read_text() + err.read_text()
    assert printed.group(1) == interrupted.group(1)
    command = shlex.split(interrupted.group(1))
    assert command[:4] == ["sam-backend", "preannotate", "--project", str(project.id)]
    assert "--overwrite" in command and "--overwrite-since" in command, command
    first_run = written_tasks(err.read_text())
    assert 5 <= len(first_run) < 20, f"the run was not interrupted half-way ({len(first_run)} of 20 written)"

    result = subprocess.run([str(SAM_BACKEND), *command[1:], "--quiet", "--verbose"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    resumed = written_tasks(result.stderr)
    assert not resumed & first_run, f"tasks written twice: {sorted(resumed & first_run)}"
    assert len(first_run) + len(resumed) == 20 and done_count(result.stdout) == len(resumed), result.stdout
    assert f"skipped {len(first_run)}: written by this run already" in result.stdout, result.stdout
    ours = [p for p in label_studio.predictions(project.id) if p["model_version"] == reference.model_version]
    assert not {p["id"] for p in ours} & old, "an old prediction of our version was kept"
    assert_predictions_equal_predictor(label_studio, project, reference, ("detector", "boxes"))


def test_workers_sharing_redis_split_the_project(label_studio: LabelStudio, checkpoint: Path, reference: Reference,
                                                 redis_server: RedisServer, tmp_path: Path) -> None:
    """Two `preannotate` commands (each queueing every task and consuming the queue) and a `sam-backend
    worker` on one Redis: the work is split between the processes and no task is written twice."""
    project = make_project(label_studio, "preannotate shared", broken=False)
    env = environment(label_studio, checkpoint, tmp_path, REDIS_URL=redis_server.url)
    logs = {name: tmp_path / f"{name}.log" for name in ("worker", "first", "second")}
    commands = {"worker": [str(SAM_BACKEND), "worker"],
                "first": [str(SAM_BACKEND), "preannotate", "--project", str(project.id), "--chunk", "2", "--quiet",
                          "--verbose"],
                "second": [str(SAM_BACKEND), "preannotate", "--project", str(project.id), "--chunk", "2", "--quiet",
                           "--verbose"]}
    processes = {}
    try:
        for name, command in commands.items():
            with logs[name].open("wb") as sink:
                processes[name] = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                                   start_new_session=True)
        for name in ("first", "second"):
            assert processes[name].wait(timeout=300) == 0, logs[name].read_text()[-3000:]
    finally:
        for process in processes.values():
            stop_process_group(process)
    texts = {name: path.read_text() for name, path in logs.items()}
    assert done_count(texts["first"]) + done_count(texts["second"]) == 20, texts["first"] + texts["second"]
    writers = {name: written_tasks(text) for name, text in texts.items()}
    everyone = [task for tasks in writers.values() for task in tasks]
    assert len(everyone) == len(set(everyone)) == 20, f"a task was written twice: {writers}"
    assert sum(bool(tasks) for tasks in writers.values()) >= 2, f"one process did all the work: {writers}"
    assert_predictions_equal_predictor(label_studio, project, reference, ("detector", "boxes"))


def test_wrong_token_or_project_stops_at_once(label_studio: LabelStudio, checkpoint: Path, tmp_path: Path) -> None:
    env = environment(label_studio, checkpoint, tmp_path)
    wrong_token = preannotate({**env, "LABEL_STUDIO_API_KEY": "0" * 40}, 1)
    assert wrong_token.returncode == 2
    assert "LABEL_STUDIO_API_KEY" in wrong_token.stderr and "Traceback" not in wrong_token.stderr
    assert len(wrong_token.stderr.strip().splitlines()) == 1, wrong_token.stderr
    no_project = preannotate(env, 987654)
    assert no_project.returncode == 2 and "no project 987654" in no_project.stderr, no_project.stderr
    assert len(no_project.stderr.strip().splitlines()) == 1, no_project.stderr


class BudgetBackend(SamBackend):
    """`sam-backend serve` with a batch budget far smaller than the work, warm-up off."""

    def environment(self) -> dict[str, str]:
        return {**super().environment(), "SAM_BATCH_BUDGET_S": "0.5", "SAM_WARMUP": "false"}

    def wait_loaded(self, timeout: float = 120) -> None:
        import requests

        deadline = time.monotonic() + timeout
        while not requests.get(f"{self.url}/health", timeout=10).json()["model_loaded"]:
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.2)


def test_retrieve_predictions_within_its_budget_then_preannotate_finishes(
        label_studio: LabelStudio, checkpoint: Path, reference: Reference, tmp_path: Path) -> None:
    """"Retrieve predictions" on a backend whose budget is smaller than the work: Label Studio takes the answer
    (one entry per task, `[]` for the tasks left and for the tasks with no rectangles) and stores predictions
    for the finished tasks only, none empty; the backend's log names what was left and the command; that
    command then finishes the project."""
    project = make_project(label_studio, "budget", broken=False)
    backend = BudgetBackend(tmp_path, checkpoint, label_studio)
    backend.start()
    try:
        backend.wait_loaded()
        ml = label_studio.add_ml_backend(project.id, backend.url)
        assert ml.get("state") == "CO", ml
        label_studio.retrieve_predictions(project.id)
    finally:
        backend.stop()
    log = backend.log.read_text()
    ours = [p for p in label_studio.predictions(project.id) if p["model_version"] == reference.model_version]
    assert all(p["result"] for p in ours), "a task without a mask got a prediction"
    finished = {p["task"] for p in ours}
    assert len(finished) < 20
    match = re.search(r"ran out with (\d+) of 30 tasks left", log)
    assert match and int(match.group(1)) > 0, log[-3000:]
    assert f"sam-backend preannotate --project {project.id}" in log

    result = preannotate(environment(label_studio, checkpoint, tmp_path), project.id, "--quiet")
    assert result.returncode == 0 and done_count(result.stdout) == 20 - len(finished), result.stdout
    assert_predictions_equal_predictor(label_studio, project, reference, ("detector", "boxes"))
