"""A seeded, structure-aware fuzz of the recorded Label Studio 1.23.2 requests against a real served backend.

Each case takes one recorded body (tests/fixtures/label-studio-1.23.2/), picks one value anywhere in it and
mutates it: deleted, swapped for another JSON type, a huge / negative / non-finite number, a 401-digit
integer, a lone surrogate or an oversized string, nesting thousands of levels deep, a list grown a
thousandfold. It goes over real HTTP to ``sam-backend serve`` (gunicorn, a tiny seeded model, images from
the fake Label Studio). Whatever the mutation: no 500, every answer JSON, and /health answers within Label
Studio's 1 s budget the whole time (a thread polls it while the fuzz runs).

Reproduce one case from its seed: ``Mutation(random.Random(SEED + case))`` applied to the same fixture.
"""

from __future__ import annotations

import copy
import json
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from testsupport.backend import (
    ServerProcess,
    fixture_body,
    fixture_names,
    make_tiny_checkpoint,
    running_label_studio,
    start_server,
)
from testsupport.paths import FIXTURES_DIR

SEED = 20261130
CASES = 600
HEALTH_BUDGET_S = 1.0  # Label Studio's ML_TIMEOUT_HEALTH
MAX_GROWN_BYTES = 4_000_000
RAW = "__fuzz_raw_json__"  # a string value replaced by raw JSON text after dumping (NaN, 401 digits, depth)
Path = tuple[str | int, ...]


def fixture_request(name: str) -> tuple[str, dict[str, Any]]:
    recorded = json.loads((FIXTURES_DIR / name).read_text())
    return recorded["path"], recorded["body"]


def recorded_requests() -> list[tuple[str, dict[str, Any]]]:
    """Every recorded request, plus the recorded webhook as the TASKS_CREATED event of its task (an import),
    the one event whose tasks the backend reads."""
    requests_ = [fixture_request(name) for name in fixture_names()]
    path, event = fixture_request("webhook_annotation_created.json")
    created = {"action": "TASKS_CREATED", "project": event["project"], "tasks": [event["task"]]}
    return [*requests_, (path, created)]


def value_paths(value: Any, prefix: Path = ()) -> list[Path]:
    """Every value's path; only the first three items of a list, so that RLE runs do not drown the rest."""
    found: list[Path] = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += value_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value[:3]):
            found += value_paths(item, (*prefix, index))
    return found


def parent_of(body: Any, path: Path) -> Any:
    for step in path[:-1]:
        body = body[step]
    return body


class Mutation:
    """One structure-aware change of one value, chosen by ``rng``; ``apply`` gives the body's bytes."""

    SWAPS: tuple[Any, ...] = (None, True, False, 0, 1, -1, 1.5, "", "x", [], {}, [1, 2], {"a": 1}, [None], [[]])
    NUMBERS: tuple[Any, ...] = (-1, -100, 0, 1e308, -1e308, 1e-320, 2**63, -(2**63) - 1, 2**64, 101, 1e6,
                                "NaN", "Infinity", "-Infinity", "1e999", "9" * 401, "-" + "9" * 401)
    STRINGS: tuple[str, ...] = ("", "\ud800", "a\udfffb", "x" * 200_000, "../../../etc/passwd", "\x00",
                                "http://127.0.0.1:1/nothing.png", "data:image/png;base64,AAAA", "s3://bucket/k",
                                "/data/upload/4/nope.png", "<View><Image/></View>", "é" * 1000)

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def apply(self, body: dict[str, Any]) -> tuple[bytes, str]:
        body = copy.deepcopy(body)
        paths = value_paths(body)
        # the values the backend reads (regions, task data, results) weigh more than task metadata
        weights = [4 if any(step in ("context", "result", "data", "value", "tasks") for step in p) else 1
                   for p in paths]
        path = self.rng.choices(paths, weights)[0]
        parent, key = parent_of(body, path), path[-1]
        kind = self.rng.choice(("delete", "swap", "number", "string", "deep", "oversize", "swap", "number"))
        raw = None
        if kind == "delete":
            del parent[key]
        elif kind == "swap":
            parent[key] = self.rng.choice(self.SWAPS)
        elif kind == "number":
            number = self.rng.choice(self.NUMBERS)
            if isinstance(number, str):
                parent[key], raw = RAW, number
            else:
                parent[key] = number
        elif kind == "string":
            parent[key] = self.rng.choice(self.STRINGS)
        elif kind == "deep":
            depth = self.rng.choice((65, 1_000, 100_000))
            parent[key], raw = RAW, "[" * depth + "]" * depth
        else:  # oversize: the value repeated, as a list, or its list grown (to a few MB: beyond that the byte
            # cap in front of the application answers, not the application)
            value = parent[key]
            count = min(self.rng.choice((1_000, 20_000)), max(2, MAX_GROWN_BYTES // len(json.dumps(value))))
            if isinstance(parent, list):
                parent.extend([value] * count)
            else:
                parent[key] = [value] * count
        data = json.dumps(body)
        if raw is not None:
            data = data.replace(json.dumps(RAW), raw, 1)
        return data.encode(), f"{kind} at {'.'.join(map(str, path))}"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    checkpoint = make_tiny_checkpoint(tmp / "sam_tiny.pth", seed=5)
    with running_label_studio() as label_studio:
        server = start_server(checkpoint, tmp / "server.log")
        try:
            setup = fixture_body("setup.json")
            setup["hostname"] = label_studio.url
            assert server.post("/setup", json=setup).status_code == 200
            server.wait_loaded()
            yield server, setup
        finally:
            server.stop()


class HealthWatch:
    """Polls /health in a thread while the fuzz runs; keeps the slowest answer and any failure."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.slowest = 0.0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            started = time.monotonic()
            try:
                ok = requests.get(self.url + "/health", timeout=5).status_code == 200
            except requests.RequestException as error:
                self.failures.append(str(error))
                continue
            self.slowest = max(self.slowest, time.monotonic() - started)
            if not ok:
                self.failures.append("/health did not answer 200")


def test_mutated_label_studio_requests_never_get_a_500(served: tuple[ServerProcess, dict[str, Any]]) -> None:
    server, setup = served
    recorded = recorded_requests()
    outcomes: dict[int, int] = {}
    failures: list[str] = []
    started = time.monotonic()
    with HealthWatch(server.url) as health:
        for case in range(CASES):
            rng = random.Random(SEED + case)
            path, body = rng.choice(recorded)
            data, what = Mutation(rng).apply(body)
            try:
                response = requests.post(server.url + path, data=data, timeout=60,
                                         headers={"Content-Type": "application/json"})
            except requests.RequestException as error:
                failures.append(f"case {case} ({path}, {what}): no answer: {error}")
                continue
            outcomes[response.status_code] = outcomes.get(response.status_code, 0) + 1
            if response.status_code >= 500 and response.status_code not in (502, 503):
                failures.append(f"case {case} ({path}, {what}): {response.status_code} {response.text[:300]}")
            elif not response.headers.get("Content-Type", "").startswith("application/json"):
                failures.append(f"case {case} ({path}, {what}): not JSON: {response.text[:200]}")
            if path == "/setup":  # a mutated hostname or token would starve the cases after it of images
                server.post("/setup", json=setup)
    elapsed = time.monotonic() - started
    assert not failures, f"{len(failures)} failures, {outcomes}:\n" + "\n".join(failures[:20])
    assert not health.failures, health.failures[:5]
    assert health.slowest < HEALTH_BUDGET_S, f"/health took {health.slowest:.2f} s during the fuzz"
    assert outcomes.get(200, 0) > 20 and outcomes.get(400, 0) > 50, outcomes  # both paths were exercised
    assert "Traceback" not in server.log.read_text()
    print(f"{CASES} cases in {elapsed:.0f} s: {dict(sorted(outcomes.items()))}; slowest /health "
          f"{health.slowest * 1000:.0f} ms")
