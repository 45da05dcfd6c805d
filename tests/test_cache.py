"""The embedding cache against a real redis-server: tiers, single flight, outages, foreign values."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter

import pytest
import redis
import torch

from backend.cache import EmbeddingCache, cache_key
from model import Embedding
from testsupport.processes import RedisServer

FINGERPRINT = "a1b2c3d4e5f60718"


def make_embedding(seed: int, fingerprint: str = FINGERPRINT) -> Embedding:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(1, 32, 16, 16, generator=generator)
    return Embedding(features=features, original_size=(300, 400), input_size=(192, 256), fingerprint=fingerprint)


class RecordingMetrics:
    def __init__(self) -> None:
        self.events: Counter[str] = Counter()

    def cache_hit(self, tier: str) -> None:
        self.events[f"hit:{tier}"] += 1

    def cache_miss(self) -> None:
        self.events["miss"] += 1

    def redis_error(self, operation: str) -> None:
        self.events["redis_error"] += 1


class CountingEncoder:
    """Stands for the image encoder: counts calls and can be slow, to widen race windows."""

    def __init__(self, seed: int = 0, delay_s: float = 0.0) -> None:
        self.calls = 0
        self.seed = seed
        self.delay_s = delay_s
        self._lock = threading.Lock()

    def __call__(self) -> Embedding:
        with self._lock:
            self.calls += 1
        time.sleep(self.delay_s)
        return make_embedding(self.seed)


def unique_sha(request: pytest.FixtureRequest) -> str:
    return request.node.name.encode().hex()[:64].ljust(64, "0")


def assert_same(a: Embedding, b: Embedding) -> None:
    assert a.original_size == b.original_size and a.input_size == b.input_size
    torch.testing.assert_close(a.features.float(), b.features.float(), atol=2e-3, rtol=2e-3)


def test_memory_tier_is_bounded_in_bytes() -> None:
    one = make_embedding(0).nbytes
    cache = EmbeddingCache(memory_bytes=int(one * 2.5))
    for i in range(5):
        cache.get_or_compute(FINGERPRINT, f"{i:064x}", CountingEncoder(i))
    assert len(cache.memory) == 2
    assert cache.memory.nbytes <= one * 2.5
    assert cache.contains(FINGERPRINT, f"{4:064x}") == "memory"
    assert cache.contains(FINGERPRINT, f"{0:064x}") is None


def test_memory_hit_runs_no_encoder() -> None:
    metrics = RecordingMetrics()
    cache = EmbeddingCache(memory_bytes=1 << 30, metrics=metrics)
    encoder = CountingEncoder()
    first = cache.get_or_compute(FINGERPRINT, "f" * 64, encoder)
    second = cache.get_or_compute(FINGERPRINT, "f" * 64, encoder)
    assert encoder.calls == 1 and first is second
    assert metrics.events == Counter({"miss": 1, "hit:memory": 1})


def test_other_model_or_other_image_is_a_different_key() -> None:
    cache = EmbeddingCache(memory_bytes=1 << 30)
    encoder = CountingEncoder()
    cache.get_or_compute(FINGERPRINT, "a" * 64, encoder)
    cache.get_or_compute("0" * 16, "a" * 64, encoder)
    cache.get_or_compute(FINGERPRINT, "b" * 64, encoder)
    assert encoder.calls == 3


def test_single_flight_concurrent_first_clicks_encode_once() -> None:
    metrics = RecordingMetrics()
    cache = EmbeddingCache(memory_bytes=1 << 30, metrics=metrics)
    encoder = CountingEncoder(delay_s=0.3)
    results: list[Embedding] = []
    barrier = threading.Barrier(8)

    def click() -> None:
        barrier.wait()
        results.append(cache.get_or_compute(FINGERPRINT, "c" * 64, encoder))

    threads = [threading.Thread(target=click) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert encoder.calls == 1
    assert len(results) == 8 and all(r is results[0] for r in results)
    assert metrics.events["miss"] == 1


def test_single_flight_propagates_the_failure_to_every_waiter() -> None:
    cache = EmbeddingCache(memory_bytes=1 << 30)

    def failing() -> Embedding:
        time.sleep(0.2)
        raise RuntimeError("encoder exploded")

    errors: list[BaseException] = []

    def click() -> None:
        try:
            cache.get_or_compute(FINGERPRINT, "d" * 64, failing)
        except RuntimeError as error:
            errors.append(error)

    threads = [threading.Thread(target=click) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(errors) == 4
    # Nothing poisoned: the next call computes afresh.
    assert cache.get_or_compute(FINGERPRINT, "d" * 64, CountingEncoder()).original_size == (300, 400)


def test_two_processes_share_through_redis(redis_server: RedisServer, request: pytest.FixtureRequest) -> None:
    sha = unique_sha(request)
    metrics_b = RecordingMetrics()
    process_a = EmbeddingCache(memory_bytes=1 << 30, redis_url=redis_server.url)
    process_b = EmbeddingCache(memory_bytes=1 << 30, redis_url=redis_server.url, metrics=metrics_b)
    encoder_a, encoder_b = CountingEncoder(seed=1), CountingEncoder(seed=2)
    from_a = process_a.get_or_compute(FINGERPRINT, sha, encoder_a)
    from_b = process_b.get_or_compute(FINGERPRINT, sha, encoder_b)
    assert encoder_a.calls == 1 and encoder_b.calls == 0
    assert metrics_b.events == Counter({"hit:redis": 1})
    assert_same(from_a, from_b)
    ttl = redis.Redis.from_url(redis_server.url).ttl(cache_key(FINGERPRINT, sha))
    assert 0 < ttl <= 7 * 24 * 3600


def test_processes_wait_for_the_one_encoding(redis_server: RedisServer, request: pytest.FixtureRequest) -> None:
    """Cross-process single flight: B finds A's lock and waits for A's value instead of encoding."""
    sha = unique_sha(request)
    process_a = EmbeddingCache(memory_bytes=1 << 30, redis_url=redis_server.url)
    process_b = EmbeddingCache(memory_bytes=1 << 30, redis_url=redis_server.url)
    encoder_a, encoder_b = CountingEncoder(seed=1, delay_s=0.5), CountingEncoder(seed=2)
    thread = threading.Thread(target=process_a.get_or_compute, args=(FINGERPRINT, sha, encoder_a))
    thread.start()
    time.sleep(0.15)
    from_b = process_b.get_or_compute(FINGERPRINT, sha, encoder_b)
    thread.join()
    assert encoder_a.calls == 1 and encoder_b.calls == 0
    assert_same(from_b, make_embedding(1))


def test_foreign_model_value_is_not_used(redis_server: RedisServer, request: pytest.FixtureRequest) -> None:
    sha = unique_sha(request)
    client = redis.Redis.from_url(redis_server.url)
    client.set(cache_key(FINGERPRINT, sha), make_embedding(9, fingerprint="ffffffffffffffff").to_bytes())
    cache = EmbeddingCache(memory_bytes=1 << 30, redis_url=redis_server.url)
    encoder = CountingEncoder(seed=3)
    embedding = cache.get_or_compute(FINGERPRINT, sha, encoder)
    assert encoder.calls == 1
    assert embedding.fingerprint == FINGERPRINT
    assert Embedding.from_bytes(client.get(cache_key(FINGERPRINT, sha))).fingerprint == FINGERPRINT


def test_corrupt_value_is_recomputed(redis_server: RedisServer, request: pytest.FixtureRequest) -> None:
    sha = unique_sha(request)
    client = redis.Redis.from_url(redis_server.url)
    good = make_embedding(4).to_bytes()
    for corrupt in (b"not an embedding", good[: len(good) // 2]):
        client.set(cache_key(FINGERPRINT, sha), corrupt)
        cache = EmbeddingCache(memory_bytes=1 << 30, redis_url=redis_server.url)
        encoder = CountingEncoder(seed=4)
        assert_same(cache.get_or_compute(FINGERPRINT, sha, encoder), make_embedding(4))
        assert encoder.calls == 1


def test_redis_down_keeps_clicks_working(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    server = RedisServer(tmp_path)
    server.start()
    metrics = RecordingMetrics()
    cache = EmbeddingCache(memory_bytes=1 << 30, redis_url=server.url, metrics=metrics)
    cache.get_or_compute(FINGERPRINT, "1" * 64, CountingEncoder())
    server.stop()
    with caplog.at_level("WARNING", logger="backend.cache"):
        started = time.monotonic()
        for i in range(5):
            encoder = CountingEncoder()
            assert cache.get_or_compute(FINGERPRINT, f"{i + 2:064x}", encoder) is not None
            assert encoder.calls == 1
        elapsed = time.monotonic() - started
    assert cache.get_or_compute(FINGERPRINT, "1" * 64, CountingEncoder()) is not None  # memory hit
    outage_lines = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(outage_lines) == 1, "one warning per outage, not one per click"
    assert metrics.events["redis_error"] >= 1
    assert elapsed < 5.0, "a dead Redis must not cost a timeout on every click"


def test_no_redis_configured_is_memory_only() -> None:
    cache = EmbeddingCache(memory_bytes=1 << 30, redis_url=None)
    assert cache.redis is None
    cache.get_or_compute(FINGERPRINT, "e" * 64, CountingEncoder())
    assert cache.contains(FINGERPRINT, "e" * 64) == "memory"


def test_redis_full_keeps_clicks_working(tmp_path) -> None:
    """A Redis at maxmemory with noeviction refuses writes with OOM: the click still gets its embedding."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        client = redis.Redis.from_url(server.url)
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", 1)  # any write is over the limit
        metrics = RecordingMetrics()
        cache = EmbeddingCache(memory_bytes=1 << 30, redis_url=server.url, metrics=metrics)
        encoder = CountingEncoder()
        assert cache.get_or_compute(FINGERPRINT, "9" * 64, encoder) is not None
        assert encoder.calls == 1 and metrics.events["redis_error"] >= 1
        assert cache.get_or_compute(FINGERPRINT, "9" * 64, encoder) is not None and encoder.calls == 1
    finally:
        server.stop()


def test_slow_redis_costs_one_timeout_not_one_per_click(tmp_path) -> None:
    """A Redis that stops answering (paused, not gone) is given up on after one socket timeout."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        cache = EmbeddingCache(memory_bytes=1 << 30, redis_url=server.url)
        cache.get_or_compute(FINGERPRINT, "7" * 64, CountingEncoder())
        server.process.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        for i in range(4):
            assert cache.get_or_compute(FINGERPRINT, f"{i + 100:064x}", CountingEncoder()) is not None
        assert time.monotonic() - started < 3.0
    finally:
        server.process.send_signal(signal.SIGCONT)
        server.stop()
