"""Prometheus metrics of one backend process.

Each app gets its own ``CollectorRegistry`` instead of prometheus_client's global one: tests (and a
process that builds more than one app) can create apps repeatedly without "duplicated timeseries"
errors, and ``/metrics`` shows exactly what this app measured. Under gunicorn every worker is its own
process with its own registry; the default deployment is one worker per GPU (usually one), so the
numbers ``/metrics`` shows are the whole server's.

What is measured is what an operator needs to tell a slow image encoder from a slow network or a
slow decoder: requests by endpoint and status, request latency, encoder and decoder seconds, and
how long the model took to load; plus the embedding cache's hits, misses and Redis failures
(``backend.cache.CacheMetrics``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Request latency spans a /health (milliseconds) to a CPU batch of ViT-H encodes (minutes).
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# An encode is ~5 ms on a big GPU and ~10-60 s on a small CPU.
ENCODER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
# A decode is launch overhead on a GPU and tens of milliseconds on a CPU.
# The upper buckets are for many concurrent clicks on 4000x3000 images on a small CPU.
DECODER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The counters and histograms of one app, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "sam_backend_requests", "HTTP requests answered, by endpoint and status code.",
            ["endpoint", "status"], registry=self.registry,
        )
        self.request_seconds = Histogram(
            "sam_backend_request_seconds", "Time to answer an HTTP request, by endpoint.",
            ["endpoint"], buckets=REQUEST_BUCKETS, registry=self.registry,
        )
        self.encoder_seconds = Histogram(
            "sam_backend_encoder_seconds", "Time to compute one image embedding (cache misses only).",
            buckets=ENCODER_BUCKETS, registry=self.registry,
        )
        self.decoder_seconds = Histogram(
            "sam_backend_decoder_seconds", "Time of one mask-decoder call (one object or one batch of boxes).",
            buckets=DECODER_BUCKETS, registry=self.registry,
        )
        self.model_load_seconds = Gauge(
            "sam_backend_model_load_seconds", "Seconds the last model load took (0 until loaded).",
            registry=self.registry,
        )
        self.model_loaded = Gauge(
            "sam_backend_model_loaded", "1 once the model is loaded and serving, else 0.",
            registry=self.registry,
        )
        self.cache_hits = Counter(
            "sam_backend_embedding_cache_hits", "Embeddings found in a cache tier (memory or redis).",
            ["tier"], registry=self.registry,
        )
        self.cache_misses = Counter(
            "sam_backend_embedding_cache_misses", "Embeddings that had to be computed by the encoder.",
            registry=self.registry,
        )
        self.warmup_queue_depth = Gauge(
            "sam_backend_warmup_queue_depth",
            "Warm-up jobs not finished (waiting or running): the shared Redis queue plus this process's own.",
            registry=self.registry,
        )
        self.warmup_jobs = Counter(
            "sam_backend_warmup_jobs", "Warm-up jobs queued by this process, by source (webhook, open, cli).",
            ["source"], registry=self.registry,
        )
        self.redis_errors = Counter(
            "sam_backend_redis_errors", "Redis operations of the embedding cache that failed.",
            ["operation"], registry=self.registry,
        )

    # backend.cache.CacheMetrics
    def cache_hit(self, tier: str) -> None:
        self.cache_hits.labels(tier=tier).inc()

    def cache_miss(self) -> None:
        self.cache_misses.inc()

    def redis_error(self, operation: str) -> None:
        self.redis_errors.labels(operation=operation).inc()

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.request_seconds.labels(endpoint=endpoint).observe(seconds)

    @contextmanager
    def time_encoder(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.encoder_seconds.observe(time.perf_counter() - start)

    @contextmanager
    def time_decoder(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.decoder_seconds.observe(time.perf_counter() - start)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of this registry and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
