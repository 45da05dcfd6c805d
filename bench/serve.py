"""Does /health stay within Label Studio's 1 s while clients misbehave? This worker beside gunicorn's gthread.

Label Studio gives ``/health`` 1 s (``ML_TIMEOUT_HEALTH``) and marks the backend disconnected otherwise. This
script starts ``sam-backend serve`` (THREADS=4, a tiny seeded checkpoint, REQUEST_READ_TIMEOUT_S=30 as
deployed) once with the backend's worker (``backend.http_worker.BufferingWorker``) and once with gunicorn's
``gthread`` (``GUNICORN_CMD_ARGS=--worker-class gthread``), and in each scenario asks ``/health`` every 0.1 s
for a few seconds, each on a new connection with a 1 s timeout, as Label Studio does:

- ``quiet``: nothing else;
- ``50 partial``: 50 connections that sent part of a request (line, headers or body) and stopped;
- ``50 idle``: 50 connections that sent nothing;
- ``threads busy``: THREADS + 1 batch ``/predict`` (segment everything on a 1024 x 1024 image) in flight.

It prints, per scenario and worker, the share of /health calls answered within 1 s and the median and
worst time of those answered, then the load average. Timings are of this machine under its load at the
time; the share answered is what matters.

    .venv/bin/python -m bench.serve [--seconds 4]
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path

import numpy as np
import requests

from testsupport.backend import ServerProcess, fixture_body, make_tiny_checkpoint, png_bytes, start_server
from testsupport.raw_http import connect

WORKERS = {"BufferingWorker": {}, "gthread": {"GUNICORN_CMD_ARGS": "--worker-class gthread"}}
PARTIAL = [b"POST /predi", b"POST /predict HTTP/1.1\r\nHost: b\r\nContent-Ty",
           b"POST /predict HTTP/1.1\r\nHost: b\r\nContent-Length: 5000\r\n\r\n{"]
THREADS = 4


def _health_calls(url: str, seconds: float) -> list[float | None]:
    """Seconds per /health call (None: no answer within 1 s), every 0.1 s for ``seconds``."""
    times: list[float | None] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        try:
            ok = requests.get(url + "/health", timeout=1.0, headers={"Connection": "close"}).status_code == 200
            times.append(time.perf_counter() - started if ok else None)
        except requests.RequestException:
            times.append(None)
        time.sleep(0.1)
    return times


@contextmanager
def _held(url: str, payloads: list[bytes]) -> Iterator[None]:
    socks = []
    for payload in payloads:
        sock = connect(url)
        if payload:
            sock.sendall(payload)
        socks.append(sock)
    try:
        yield
    finally:
        for sock in socks:
            sock.close()


@contextmanager
def _busy(url: str) -> Iterator[None]:
    image = np.full((1024, 1024, 3), 200, dtype=np.uint8)
    image[200:600, 300:700] = (200, 30, 30)
    body = fixture_body("predict_batch_two_tasks.json")
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()
    body["tasks"] = [dict(task, data={"image": uri}) for task in body["tasks"]] * 2

    def predict() -> None:
        with suppress(requests.RequestException):
            requests.post(url + "/predict", json=body, timeout=300)

    threads = [threading.Thread(target=predict) for _ in range(THREADS + 1)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    try:
        yield
    finally:
        for thread in threads:
            thread.join(300)


def _scenarios(url: str) -> dict[str, Callable[[], AbstractContextManager[None]]]:
    return {
        "quiet": lambda: _held(url, []),
        "50 partial": lambda: _held(url, [PARTIAL[i % 3] for i in range(50)]),
        "50 idle": lambda: _held(url, [b""] * 50),
        "threads busy": lambda: _busy(url),
    }


def _summary(times: list[float | None]) -> str:
    answered = [t for t in times if t is not None]
    share = f"{len(answered)}/{len(times)}"
    if not answered:
        return f"{share:>7} answered{'':>22}"
    return f"{share:>7} answered, p50 {statistics.median(answered) * 1000:6.1f} ms, max {max(answered) * 1000:6.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="how long /health is asked per scenario")
    args = parser.parse_args()
    results: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_tiny_checkpoint(Path(tmp) / "sam_tiny.pth", seed=5)
        for worker, env in WORKERS.items():
            server: ServerProcess = start_server(checkpoint, Path(tmp) / f"{worker}.log", threads=THREADS,
                                                 SAM_BATCH_MODE="everything", SAM_WARMUP="false", **env)
            try:
                server.wait_loaded()
                for name, scenario in _scenarios(server.url).items():
                    with scenario():
                        results.setdefault(name, {})[worker] = _summary(_health_calls(server.url, args.seconds))
            finally:
                server.stop()
    print(f"/health (1 s timeout, every 0.1 s for {args.seconds:g} s), THREADS={THREADS}, 1 worker, tiny model")
    print(f"{'scenario':<14} | " + " | ".join(f"{worker:<48}" for worker in WORKERS))
    for name, row in results.items():
        print(f"{name:<14} | " + " | ".join(f"{row[worker]:<48}" for worker in WORKERS))
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    socket.setdefaulttimeout(30)
    main()
