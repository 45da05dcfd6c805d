"""The pieces of `sam-backend preannotate` that need no Label Studio: claims on a real Redis, the summary,
the command line's refusals. The whole command runs against a real Label Studio in
tests/e2e/test_preannotate_label_studio.py."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
import redis

from backend.preannotate import Claims, Outcome, RunRecord, Summary
from testsupport.backend import SAM_BACKEND
from testsupport.processes import RedisServer


@pytest.fixture()
def connection(redis_server: RedisServer) -> redis.Redis:
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    return client


def test_a_task_is_claimed_by_one_worker_at_a_time(connection: redis.Redis) -> None:
    first = Claims(connection, "http://ls:8080", 7, "vit_b-12345678")
    second = Claims(connection, "http://ls:8080", 7, "vit_b-12345678")
    other_model = Claims(connection, "http://ls:8080", 7, "vit_t-87654321")
    try:
        assert first.claim(1)
        assert not second.claim(1), "a claimed task must not be claimed again"
        assert other_model.claim(1), "another model version's run is independent"
        second.release(1)  # not the owner: the claim stays
        assert not second.claim(1)
        first.release(1)
        assert second.claim(1)
    finally:
        for claims in (first, second, other_model):
            claims.close()
    assert not list(connection.scan_iter("sam-backend:preannotate-claim:*")), "close releases every claim"


def test_a_claim_lives_while_its_worker_does_and_expires_after(connection: redis.Redis) -> None:
    """The heartbeat renews a held claim past its TTL; a worker that died (no heartbeat) frees it by the TTL."""
    alive = Claims(connection, None, 1, "v", ttl_s=1)
    waiting = Claims(connection, None, 1, "v", ttl_s=1)
    try:
        assert alive.claim(5)
        time.sleep(2.0)
        assert not waiting.claim(5), "the heartbeat should have kept the claim"
        alive._stop.set()  # the worker dies: no more renewals, no release
        time.sleep(1.6)
        assert waiting.claim(5), "the claim of a dead worker must expire"
    finally:
        waiting.close()


def test_run_record_remembers_what_a_run_wrote(connection: redis.Redis) -> None:
    record = RunRecord(connection, "run-1")
    assert not record.has(3)
    record.add(3)
    assert record.has(3) and not RunRecord(connection, "run-2").has(3)
    assert 0 < connection.ttl(record.key) <= 24 * 3600


def test_summary_counts_and_explains() -> None:
    summary = Summary()
    for outcome in [Outcome(1, "done", regions=2, worker="a", version="v"),
                    Outcome(2, "done", regions=1, worker="b", version="v"),
                    Outcome(3, "skipped", "already had a prediction of v"),
                    Outcome(4, "failed", "image", "The image was not found (HTTP 404): /data/x.png"),
                    Outcome(5, "failed", "write", "Label Studio answered HTTP 400")]:
        summary.add(Outcome.from_json(outcome.to_json()))
    assert (summary.done, summary.skipped_total, summary.failed, summary.regions) == (2, 1, 2, 3)
    text = "\n".join(summary.lines(9, None, "boxes", 2.0))
    assert "project 9, model v, mode boxes: 2 done, 1 skipped, 2 failed in 2.0 s (1.00 images/s" in text
    assert "failed 1 (image: the task's image could not be fetched or read): tasks 4" in text
    assert "task 4: The image was not found" in text and "failed 1 (write:" in text
    assert "written by: a 1, b 1" in text


@pytest.mark.parametrize("args, env, needle", [
    (["--mode", "sideways"], {}, "invalid choice"),
    (["--max-masks", "0"], {}, "at least 1"),
    ([], {}, "LABEL_STUDIO_URL"),
    (["--no-local"], {"LABEL_STUDIO_URL": "http://127.0.0.1:9"}, "--no-local needs REDIS_URL"),
    ([], {"LABEL_STUDIO_URL": "http://127.0.0.1:9"}, "Could not connect to Label Studio"),
    ([], {"LABEL_STUDIO_URL": "ftp://x"}, "LABEL_STUDIO_URL"),
])
def test_the_command_refuses_what_cannot_work_in_one_line(args: list[str], env: dict[str, str], needle: str) -> None:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("SAM_", "LABEL_STUDIO_", "REDIS_URL"))}
    result = subprocess.run([str(SAM_BACKEND), "preannotate", "--project", "1", *args], env={**clean, **env},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result
    assert needle in result.stderr and "Traceback" not in result.stderr, result.stderr
