"""Warm-up queue mechanics: through rq on a real Redis, and in process when there is no Redis."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend import warmup
from backend.warmup import QUEUE_NAME, Warmer, WarmupJob
from testsupport.processes import RedisServer


class RecordingEncoder:
    def __init__(self) -> None:
        self.seen: list[str] = []
        self.threads: set[str] = set()
        self.event = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, job: WarmupJob) -> bool:
        with self._lock:
            self.seen.append(job.image_ref)
            self.threads.add(threading.current_thread().name)
        self.event.set()
        return True

    def wait_for(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.seen) >= count:
                    return
            time.sleep(0.02)
        raise AssertionError(f"only {len(self.seen)} of {count} warm-up jobs ran: {self.seen}")


@pytest.fixture
def encoder() -> Iterator[RecordingEncoder]:
    recording = RecordingEncoder()
    warmup.bind_encoder(recording)
    yield recording


def job(task_id: int, url: str | None = None) -> WarmupJob:
    return WarmupJob(task={"id": task_id, "data": {"image": url or f"/data/upload/1/{task_id}.png"}},
                     value_key="image", label_studio_url="http://ls:8080")


def test_payload_round_trip_keeps_only_what_a_worker_needs() -> None:
    original = WarmupJob(task={"id": 3, "data": {"image": "x.png"}, "annotations": [{"big": "draft"}]},
                         value_key="image", label_studio_url="http://ls")
    payload = original.to_payload()
    assert set(payload) == {"task", "value_key", "label_studio_url"}, "no token in a job"
    restored = WarmupJob.from_payload(payload)
    assert restored.task == {"id": 3, "data": {"image": "x.png"}}
    assert restored.image_ref == "x.png" and restored.label_studio_url == "http://ls"
    # A job an older version queued with a token: the token is dropped, not used.
    older = WarmupJob.from_payload({**payload, "label_studio_token": "s3cr3t-t0ken"})
    assert "s3cr3t-t0ken" not in repr(older) and "label_studio_token" not in older.to_payload()


def test_in_process_queue_encodes_in_the_background(encoder: RecordingEncoder) -> None:
    warmer = Warmer(redis_url=None, encoder=encoder)
    try:
        started = time.monotonic()
        assert warmer.submit([job(1), job(2), job(3)]) == 3
        assert time.monotonic() - started < 0.5, "submit must not wait for encoding"
        encoder.wait_for(3)
        assert sorted(encoder.seen) == ["/data/upload/1/1.png", "/data/upload/1/2.png", "/data/upload/1/3.png"]
        assert encoder.threads == {"warmup-local"}
    finally:
        warmer.stop()


def test_same_image_is_queued_once_while_pending(encoder: RecordingEncoder) -> None:
    warmer = Warmer(redis_url=None)  # no encoder, so no consumer: jobs stay pending
    assert warmer.submit([job(1), job(1), job(2, url="/data/upload/1/1.png")]) == 1
    assert warmer.depth() == 1


def test_jobs_without_an_image_are_skipped(encoder: RecordingEncoder) -> None:
    warmer = Warmer(redis_url=None)
    assert warmer.submit([WarmupJob(task={"id": 1, "data": {}}, value_key="image")]) == 0


def test_jobs_go_through_the_shared_rq_queue(encoder: RecordingEncoder, redis_server: RedisServer) -> None:
    import redis
    from rq import Queue

    connection = redis.Redis.from_url(redis_server.url)
    Queue(QUEUE_NAME, connection=connection).empty()
    producer = Warmer(redis_url=redis_server.url, consume=False)
    depths: list[int] = []
    producer.on_depth = depths.append
    assert producer.submit([job(11), job(12)]) == 2
    assert producer.submit([job(11)]) == 0, "an image already queued is not queued again"
    assert Queue(QUEUE_NAME, connection=connection).count == 2
    assert depths[-1] == 2 and producer.depth() == 2
    assert encoder.seen == []

    consumer = Warmer(redis_url=redis_server.url, encoder=encoder)  # another process, in effect: only Redis is shared
    consumer.start()
    try:
        encoder.wait_for(2)
        assert sorted(encoder.seen) == ["/data/upload/1/11.png", "/data/upload/1/12.png"]
        assert "warmup-rq" in encoder.threads
        deadline = time.monotonic() + 5
        while producer.depth() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert producer.depth() == 0
        # Once done, the image can be queued again (e.g. the cache entry expired meanwhile).
        assert producer.submit([job(11)]) == 1
        encoder.wait_for(3)
    finally:
        consumer.stop()


def test_redis_down_falls_back_to_this_process(encoder: RecordingEncoder, tmp_path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    warmer = Warmer(redis_url=server.url, encoder=encoder)
    server.stop()
    try:
        assert warmer.submit([job(21)]) == 1
        encoder.wait_for(1)
        assert "warmup-local" in encoder.threads
    finally:
        warmer.stop()


def test_the_queue_is_capped_with_one_log_line(encoder: RecordingEncoder, caplog: pytest.LogCaptureFixture) -> None:
    warmer = Warmer(redis_url=None, max_queue=5)  # no consumer: jobs stay queued
    with caplog.at_level(logging.DEBUG, logger="backend.warmup"):
        assert warmer.submit([job(i) for i in range(300)]) == 5
        assert warmer.submit([job(1000)]) == 0
    assert warmer.depth() == 5
    lines = [r.getMessage() for r in caplog.records if r.name == "backend.warmup" and r.levelno >= logging.INFO]
    assert len(lines) == 2 and "295 of 300 task(s) not queued" in lines[0] and "SAM_WARMUP_MAX_QUEUE=5" in lines[0]
    assert all(r.exc_info is None for r in caplog.records)


def test_the_cap_counts_the_shared_queue(encoder: RecordingEncoder, redis_server: RedisServer) -> None:
    import redis
    from rq import Queue

    Queue(QUEUE_NAME, connection=redis.Redis.from_url(redis_server.url)).empty()
    producer = Warmer(redis_url=redis_server.url, consume=False, max_queue=3)
    assert producer.submit([job(40 + i) for i in range(10)]) == 3
    other = Warmer(redis_url=redis_server.url, consume=False, max_queue=3)  # another process: same queue
    assert other.submit([job(60)]) == 0
    Queue(QUEUE_NAME, connection=redis.Redis.from_url(redis_server.url)).empty()


def test_a_stalled_redis_costs_one_timeout_not_one_per_task(encoder: RecordingEncoder, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """SIGSTOP: Redis accepts connections and never answers, the worst case for a client without timeouts."""
    server = RedisServer(tmp_path)
    server.start()
    warmer = Warmer(redis_url=server.url, consume=False)
    assert warmer.submit([job(70)]) == 1  # connected and working
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        with caplog.at_level(logging.INFO, logger="backend.warmup"):
            started = time.monotonic()
            assert warmer.submit([job(71 + i) for i in range(50)]) == 50  # into this process's queue
            first = time.monotonic() - started
            started = time.monotonic()
            assert warmer.submit([job(200)]) == 1
            second = time.monotonic() - started
        assert first < warmup.REDIS_TIMEOUT_S * 3 + 1, f"submit waited {first:.1f} s on a stalled Redis"
        assert second < 0.2, f"Redis was tried again at once ({second:.1f} s)"
        lines = [r for r in caplog.records if r.name == "backend.warmup"]
        assert len(lines) == 1 and "Redis queue unavailable" in lines[0].getMessage()
        assert warmer.depth() == 51
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
        server.stop()
