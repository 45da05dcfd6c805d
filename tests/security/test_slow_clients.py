"""Slow and idle clients against a real ``sam-backend serve``: they cannot keep /health from answering.

Label Studio gives /health 1 s and marks the backend disconnected otherwise. With gunicorn's gthread worker,
4 connections that sent half a request (THREADS=4) or 50 idle ones held every request thread for a minute.
Here each case opens its connections, checks /health answers within the second throughout, and checks every
held connection is cut at REQUEST_READ_TIMEOUT_S (2 s here), with a 408 JSON to those that sent something
and one log line for the lot.
"""

from __future__ import annotations

import base64
import re
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import requests

from testsupport.backend import (
    ServerProcess,
    fixture_body,
    make_tiny_checkpoint,
    png_bytes,
    start_server,
)
from testsupport.raw_http import connect, exchange, parse_responses, read_until_closed, rss_bytes, worker_pid

READ_TIMEOUT_S = 2.0
MAX_REQUEST_MB = 2
THREADS = 2
MAX_CONNECTIONS = 60
HEALTH_BUDGET_S = 1.0  # Label Studio's ML_TIMEOUT_HEALTH

# What a slow client may have sent when it stops: part of the request line, part of the headers, part of a body.
PARTIAL = [
    b"POST /predi",
    b"POST /predict HTTP/1.1\r\nHost: backend\r\nContent-Type: applica",
    b"POST /predict HTTP/1.1\r\nHost: backend\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
    b'{"tasks": [',
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("slow")
    checkpoint = make_tiny_checkpoint(directory / "sam_tiny.pth", seed=5)
    try:
        server = start_server(checkpoint, directory / "server.log", threads=THREADS,
                              REQUEST_READ_TIMEOUT_S=str(READ_TIMEOUT_S), MAX_REQUEST_MB=str(MAX_REQUEST_MB),
                              MAX_CONNECTIONS=str(MAX_CONNECTIONS), SAM_BATCH_MODE="everything", SAM_WARMUP="false")
    except RuntimeError as error:
        pytest.fail(str(error))
    server.wait_loaded()
    yield server
    server.stop()


def _health_times_while(server: ServerProcess, held: list[socket.socket], seconds: float) -> list[float]:
    """/health timed every 0.1 s for ``seconds``, a new connection each time (Label Studio's way)."""
    times = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        response = requests.get(server.url + "/health", timeout=5, headers={"Connection": "close"})
        times.append(time.perf_counter() - started)
        assert response.status_code == 200 and response.json()["status"] == "UP"
        time.sleep(0.1)
    return times


def _cut_within(sock: socket.socket, seconds: float) -> bytes:
    """What the server sent before closing ``sock``; fails if it is still open after ``seconds``."""
    data = read_until_closed(sock, seconds)
    sock.settimeout(0.2)
    try:
        assert sock.recv(1) == b"", "the connection is still open past the read deadline"
    except (TimeoutError, ConnectionResetError) as error:
        if isinstance(error, TimeoutError):
            raise AssertionError("the connection is still open past the read deadline") from None
    return data


def _log_lines(server: ServerProcess, needle: str) -> list[str]:
    return [line for line in server.log.read_text().splitlines() if needle in line]


def _sweep_counts(lines: list[str]) -> tuple[int, int]:
    """(with part of a request, that sent nothing), summed over the worker's sweep lines."""
    counts = [re.search(r"\((\d+) with part of a request, (\d+) that sent nothing\)", line) for line in lines]
    return sum(int(m.group(1)) for m in counts if m), sum(int(m.group(2)) for m in counts if m)


def _log_lines_after(server: ServerProcess, needle: str, skip: int, closed: int) -> list[str]:
    """The sweep lines after the first ``skip``, once they account for ``closed`` connections: the worker
    writes its line just after closing them, so a client can see the close first."""
    deadline = time.monotonic() + 3
    while True:
        lines = _log_lines(server, needle)[skip:]
        if sum(int(line.split("closed ")[1].split(" ")[0]) for line in lines) >= closed or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


@pytest.mark.parametrize("count", [4, 50])
def test_partial_requests_neither_starve_health_nor_outlive_the_deadline(server: ServerProcess, count: int) -> None:
    lines_before = len(_log_lines(server, "past the"))
    held = []
    for index in range(count):
        sock = connect(server.url)
        sock.sendall(PARTIAL[index % len(PARTIAL)])
        held.append(sock)
    opened = time.monotonic()
    times = _health_times_while(server, held, READ_TIMEOUT_S - 0.3)
    assert max(times) < HEALTH_BUDGET_S, times
    for sock in held:
        answer = _cut_within(sock, opened + READ_TIMEOUT_S + 2.5 - time.monotonic())
        (response,) = parse_responses(answer)
        assert response.status == 408 and response.json()["status"] == 408
        assert "REQUEST_READ_TIMEOUT_S" in response.json()["message"]
        sock.close()
    assert time.monotonic() - opened >= READ_TIMEOUT_S - 0.1  # cut at the deadline, not before
    new_lines = _log_lines_after(server, "past the", lines_before, count)
    assert sum(int(line.split("closed ")[1].split(" ")[0]) for line in new_lines) == count
    assert len(new_lines) <= 3  # one line per sweep, not one per connection or byte
    assert _sweep_counts(new_lines) == (count, 0)


def test_idle_connections_neither_starve_health_nor_outlive_the_deadline(server: ServerProcess) -> None:
    lines_before = len(_log_lines(server, "past the"))
    held = [connect(server.url) for _ in range(50)]
    opened = time.monotonic()
    times = _health_times_while(server, held, READ_TIMEOUT_S - 0.3)
    assert max(times) < HEALTH_BUDGET_S, times
    for sock in held:
        assert _cut_within(sock, opened + READ_TIMEOUT_S + 2.5 - time.monotonic()) == b""  # nothing asked
        sock.close()
    assert _sweep_counts(_log_lines_after(server, "past the", lines_before, 50)) == (0, 50)


def test_a_request_trickled_within_the_deadline_is_served(server: ServerProcess) -> None:
    request = b"GET /health HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n"
    with connect(server.url) as sock:
        for start in range(0, len(request), 8):
            sock.sendall(request[start:start + 8])
            time.sleep(0.02)
        (response,) = parse_responses(read_until_closed(sock, 5))
    assert response.status == 200 and response.json()["status"] == "UP"


def test_a_body_over_the_cap_is_refused_at_its_head_without_reading_it(server: ServerProcess) -> None:
    started = time.perf_counter()
    (response,) = exchange(server.url, b"POST /predict HTTP/1.1\r\nHost: backend\r\nContent-Type: application/json\r\n"
                                       b"Content-Length: 209715200\r\n\r\n", timeout=5)
    assert time.perf_counter() - started < 1.0
    assert response.status == 413 and response.headers["content-type"] == "application/json"
    assert response.json()["status"] == 413 and "MAX_REQUEST_MB" in response.json()["message"]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_over_cap_body_sent_anyway_does_not_grow_the_worker(server: ServerProcess, chunked: bool) -> None:
    """The client writes 64 MiB before it reads (as requests does): it sees the 413, the worker stays small."""
    worker = worker_pid(server.process.pid)
    before = rss_bytes(worker)
    size = 64 * 2**20
    if chunked:
        head = b"POST /predict HTTP/1.1\r\nHost: backend\r\nTransfer-Encoding: chunked\r\n\r\n"
        piece = b"%x\r\n" % 2**20 + b"x" * 2**20 + b"\r\n"
    else:
        head = b"POST /predict HTTP/1.1\r\nHost: backend\r\nContent-Length: %d\r\n\r\n" % size
        piece = b"x" * 2**20
    sock = connect(server.url)
    sent = 0

    def send() -> None:
        nonlocal sent
        try:
            sock.sendall(head)
            for _ in range(size // 2**20):
                sock.sendall(piece)
                sent += len(piece)
        except OSError:
            pass  # the server stopped reading after its answer: what a real client sees too

    writer = threading.Thread(target=send)
    started = time.perf_counter()
    writer.start()
    answer = read_until_closed(sock, 10)
    writer.join(10)
    sock.close()
    (response,) = parse_responses(answer)
    assert response.status == 413 and response.json()["status"] == 413
    assert time.perf_counter() - started < 5
    grown = rss_bytes(worker) - before
    assert grown < MAX_REQUEST_MB * 2**20 + 8 * 2**20, f"the worker grew by {grown / 2**20:.1f} MiB"
    assert server.get("/health").status_code == 200


def _everything_body(seed: int) -> dict[str, object]:
    """A batch /predict that keeps a request thread computing for seconds: segment everything on 1024 x 1024."""
    image = np.full((1024, 1024, 3), 200, dtype=np.uint8)  # flat but for a square: a PNG of a few KiB
    image[100 + seed * 50:400 + seed * 50, 300:700] = (200, 30, 30)
    body = fixture_body("predict_batch_two_tasks.json")
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()
    body["tasks"] = [dict(task, data={"image": uri}) for task in body["tasks"]] * 2  # four tasks, one image
    return body


def test_health_answers_while_every_request_thread_computes(server: ServerProcess) -> None:
    bodies = [_everything_body(seed) for seed in range(THREADS + 1)]
    finished: list[float] = []

    def predict(body: dict[str, object]) -> None:
        assert requests.post(server.url + "/predict", json=body, timeout=120).status_code == 200
        finished.append(time.monotonic())

    workers = [threading.Thread(target=predict, args=(body,)) for body in bodies]
    for worker in workers:
        worker.start()
    time.sleep(0.3)
    polls: list[tuple[float, float]] = []  # (when it was asked, how long it took)
    while len(finished) < len(bodies) and len(polls) < 100:
        asked = time.monotonic()
        polls.extend((asked, t) for t in _health_times_while(server, [], 0.01))
    for worker in workers:
        worker.join(120)
    assert len(finished) == len(bodies)
    busy = [took for asked, took in polls if asked < min(finished)]  # every request thread was computing
    assert len(busy) >= 3, f"the predictions ended too early to show anything: {polls}"
    assert max(busy) < HEALTH_BUDGET_S, busy


def test_connections_over_the_bound_close_the_oldest_incomplete_ones(server: ServerProcess) -> None:
    held = []
    for _ in range(MAX_CONNECTIONS + 5):
        sock = connect(server.url)
        sock.sendall(PARTIAL[1])
        held.append(sock)
        time.sleep(0.005)  # accepted in this order
    assert max(_health_times_while(server, held, 0.5)) < HEALTH_BUDGET_S
    oldest = [parse_responses(read_until_closed(sock, 3)) for sock in held[:5]]
    assert all(len(r) == 1 and r[0].status == 503 and "MAX_CONNECTIONS" in r[0].json()["message"] for r in oldest)
    for sock in held:
        sock.close()


def test_bytes_held_for_incomplete_requests_are_bounded(server: ServerProcess) -> None:
    """Four requests of MAX_REQUEST_MB may be in memory at once; a fifth that would cross that gets 503."""
    size = MAX_REQUEST_MB * 2**20 - 1024
    held = []
    for _ in range(5):
        sock = connect(server.url)
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: b\r\nContent-Length: %d\r\n\r\n" % size + b"x" * (size - 10))
        held.append(sock)
        time.sleep(0.2)
    (refused,) = parse_responses(read_until_closed(held[-1], 3))
    assert refused.status == 503 and refused.headers["retry-after"] == "5"
    assert server.get("/health").status_code == 200
    for sock in held:
        sock.close()
