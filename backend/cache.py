"""The embedding cache: the encoder runs once per image per model.

SAM's image encoder costs seconds on a CPU; its decoder costs milliseconds. Every click after the first on
an image should only pay for the decoder, on every worker process and every machine. So embeddings live in
two tiers:

- memory: an LRU in this process bounded in bytes (embeddings stay on the model's device, ready to decode);
- Redis (optional): shared by every process, values in the compact byte form of ``Embedding.to_bytes``
  (fp16), with a TTL. Redis should run with ``maxmemory`` and ``maxmemory-policy allkeys-lru``.

Keys name the model fingerprint (checkpoint hash), the sha256 of the image bytes and a preprocessing
version, so the same picture in two tasks or two projects is encoded once, and a changed image or another
model never gets a stale embedding.

Single flight: concurrent requests for one key compute it once in this process (the others wait for that
result), and, with Redis, a short lock lets other processes wait for the value instead of encoding too.

Redis is an accelerator, never a dependency: when it is down, slow or full, clicks go on from the memory
tier, the log gets one warning per outage and ``sam_backend_redis_errors_total`` counts the failures.
A corrupt or foreign value in Redis is detected, deleted and recomputed.

One embedding, one mask: every tier hands out the same values. Redis holds fp16 (``Embedding.to_bytes``),
so a freshly computed embedding is rounded through fp16 before anyone uses it
(``Embedding.at_stored_precision``): the process that encoded the image, a process that read it from Redis
and a process restarted since all decode from identical tensors, and a click gives the identical mask on
every worker. Without the rounding the fp32 copy of the encoding process and the fp16 copy of the others
gave masks 1-19 pixels apart for the same click (docs/architecture.md, "The embedding cache", has the
measurements behind fp16 rather than fp32 in Redis).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from backend.config import Settings
from backend.lru import SizedLRU
from model import Embedding

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Bump when image preprocessing or the embedding byte format changes meaning: old values stop matching.
PREPROCESSING_VERSION = 1
KEY_PREFIX = "sam-backend:embedding"


class CacheMetrics(Protocol):
    """What the cache reports; ``backend.metrics`` implements it with Prometheus counters."""

    def cache_hit(self, tier: str) -> None: ...
    def cache_miss(self) -> None: ...
    def redis_error(self, operation: str) -> None: ...


class _NoMetrics:
    def cache_hit(self, tier: str) -> None:
        pass

    def cache_miss(self) -> None:
        pass

    def redis_error(self, operation: str) -> None:
        pass


def cache_key(fingerprint: str, image_sha256: str) -> str:
    return f"{KEY_PREFIX}:v{PREPROCESSING_VERSION}:{fingerprint}:{image_sha256}"


class MemoryTier:
    """A thread-safe LRU of embeddings bounded by their size in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: SizedLRU[str, Embedding] = SizedLRU(max_bytes, size=lambda embedding: embedding.nbytes)

    def get(self, key: str) -> Embedding | None:
        return self._items.get(key)

    def put(self, key: str, embedding: Embedding) -> None:
        self._items.put(key, embedding)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._items.total


class RedisTier:
    """Embedding bytes in Redis; every failure is absorbed, counted, and logged once per outage.

    After a failure the tier stays off for ``retry_after_s`` so that a dead Redis costs one connect timeout
    per interval, not one per click.
    """

    def __init__(self, url: str, ttl_s: int, metrics: CacheMetrics, *, socket_timeout_s: float = 0.5,
                 retry_after_s: float = 15.0) -> None:
        import redis

        self.url = url
        self.ttl_s = ttl_s
        self.metrics = metrics
        self.retry_after_s = retry_after_s
        self._client = redis.Redis.from_url(
            url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s,
            health_check_interval=30,
        )
        self._down_until = 0.0
        self._outage_logged = False
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, operation: str, error: Exception) -> None:
        self.metrics.redis_error(operation)
        with self._lock:
            self._down_until = time.monotonic() + self.retry_after_s
            first = not self._outage_logged
            self._outage_logged = True
        if first:
            log.warning("Redis at %s failed (%s: %s); serving embeddings from memory only, retrying every %.0f s",
                        self.url, operation, error, self.retry_after_s)

    def _succeeded(self) -> None:
        if self._outage_logged:
            with self._lock:
                recovered, self._outage_logged = self._outage_logged, False
            if recovered:
                log.warning("Redis at %s is reachable again", self.url)

    def _call(self, operation: str, fn: Callable[[], Any], default: Any = None) -> Any:
        if not self.available:
            return default
        try:
            result = fn()
        except Exception as error:  # redis.RedisError, OSError, OOM replies: all mean "no Redis now"
            self._failed(operation, error)
            return default
        self._succeeded()
        return result

    def get(self, key: str) -> bytes | None:
        return self._call("get", lambda: self._client.get(key))

    def put(self, key: str, value: bytes) -> None:
        self._call("set", lambda: self._client.set(key, value, ex=self.ttl_s or None))  # 0: no expiry

    def delete(self, key: str) -> None:
        self._call("delete", lambda: self._client.delete(key))

    def exists(self, key: str) -> bool:
        return bool(self._call("exists", lambda: self._client.exists(key), default=False))

    def try_lock(self, key: str, ttl_s: float) -> bool | None:
        """True: we hold the lock; False: another process does; None: Redis is unavailable."""
        return self._call("lock", lambda: bool(self._client.set(key, b"1", nx=True, px=int(ttl_s * 1000))))

    def unlock(self, key: str) -> None:
        self.delete(key)


@dataclass
class _Flight:
    """One in-process computation that other threads wait on."""

    done: threading.Event = field(default_factory=threading.Event)
    result: Embedding | None = None
    error: BaseException | None = None


class EmbeddingCache:
    """Memory LRU -> Redis -> compute, once per key.

    ``lock_wait_s`` bounds how long a process waits for another process that holds the Redis lock for the
    same key before it computes the embedding itself: a crashed peer costs at most that long.
    """

    def __init__(self, memory_bytes: int, redis_url: str | None = None, ttl_s: int = Settings.sam_cache_ttl_s,
                 metrics: CacheMetrics | None = None, device: torch.device | str | None = None,
                 lock_wait_s: float = 120.0) -> None:
        self.metrics: CacheMetrics = metrics or _NoMetrics()
        self.memory = MemoryTier(memory_bytes)
        self.redis = RedisTier(redis_url, ttl_s, self.metrics) if redis_url else None
        self.device = device
        self.lock_wait_s = lock_wait_s
        self._flights: dict[str, _Flight] = {}
        self._flights_lock = threading.Lock()

    def contains(self, fingerprint: str, image_sha256: str) -> str | None:
        """Which tier already holds this embedding ("memory", "redis") or None; computes nothing."""
        key = cache_key(fingerprint, image_sha256)
        if key in self.memory:
            return "memory"
        if self.redis is not None and self.redis.exists(key):
            return "redis"
        return None

    def get_or_compute(self, fingerprint: str, image_sha256: str,
                       compute: Callable[[], Embedding]) -> Embedding:
        key = cache_key(fingerprint, image_sha256)
        embedding = self.memory.get(key)
        if embedding is not None:
            self.metrics.cache_hit("memory")
            return embedding

        with self._flights_lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            assert flight.result is not None  # the leader sets a result or an error before ``done``
            self.metrics.cache_hit("memory")
            return flight.result

        try:
            result = flight.result = self._load_or_compute(key, fingerprint, compute)
            self.memory.put(key, result)
            return result
        except BaseException as error:
            flight.error = error
            raise
        finally:
            with self._flights_lock:
                del self._flights[key]
            flight.done.set()

    def _load_or_compute(self, key: str, fingerprint: str, compute: Callable[[], Embedding]) -> Embedding:
        if self.redis is None:
            self.metrics.cache_miss()
            return compute().at_stored_precision()

        embedding = self._from_redis(key, fingerprint)
        if embedding is not None:
            return embedding

        lock_key = key + ":lock"
        deadline = time.monotonic() + self.lock_wait_s
        while True:
            locked = self.redis.try_lock(lock_key, self.lock_wait_s)
            if locked is not False:  # we hold it, or Redis is gone: compute here
                break
            time.sleep(0.05)
            embedding = self._from_redis(key, fingerprint)
            if embedding is not None:
                return embedding
            if time.monotonic() >= deadline:
                log.warning("waited %.0f s for another process to encode %s; encoding here", self.lock_wait_s, key)
                locked = False
                break

        self.metrics.cache_miss()
        try:
            embedding = compute().at_stored_precision()
            self.redis.put(key, embedding.to_bytes())
            return embedding
        finally:
            if locked:
                self.redis.unlock(lock_key)

    def _from_redis(self, key: str, fingerprint: str) -> Embedding | None:
        assert self.redis is not None
        data = self.redis.get(key)
        if data is None:
            return None
        try:
            embedding = Embedding.from_bytes(data, device=self.device)
        except ValueError as error:
            log.warning("discarding a corrupt embedding in Redis under %s: %s", key, error)
            self.redis.delete(key)
            return None
        if embedding.fingerprint != fingerprint:
            log.warning("discarding an embedding in Redis under %s made by model %s, not %s",
                        key, embedding.fingerprint, fingerprint)
            self.redis.delete(key)
            return None
        self.metrics.cache_hit("redis")
        return embedding
