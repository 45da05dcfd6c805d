"""The pieces of `sam-backend preannotate` that need no Label Studio: claims on a real Redis, the summary,
the command line's refusals. The whole command runs against a real Label Studio in
tests/e2e/test_preannotate_label_studio.py."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import redis

from backend import preannotate
from backend.config import Settings
from backend.overwrite_since import parse_timestamp, start_from_date_header, written_since
from backend.preannotate import (
    Claims,
    Options,
    Outcome,
    PreannotateError,
    Preannotator,
    Run,
    RunRecord,
    Summary,
    bind_preannotator,
    has_prediction,
    preannotate_project,
    resume_command,
    run_job,
)
from backend.process_binding import ProcessBinding
from backend.segmenter import Segmenter
from testsupport.backend import SAM_BACKEND, SETUP_TOKEN, make_tiny_checkpoint, running_label_studio
from testsupport.image_access import image_fetcher
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


# ------------------------------------------------------------------------------------------------------
# A stalled Redis (paused: connections accepted, nothing answered) is an error, not a hang

CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="brush" toName="image"><Label value="Object"/></BrushLabels></View>"""


def within(seconds: float, call: Callable[[], Any]) -> BaseException | Any:
    """``call()``'s result or exception, in a daemon thread given ``seconds``: a hang fails the test, not the run."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(call())
        except BaseException as error:  # noqa: BLE001 - handed to the test as is
            outcome.append(error)
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still waiting after {seconds} s"
    return outcome[0]


@pytest.fixture()
def stalled_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Settings, Any]]:
    """Settings naming a Label Studio with project 1 and a Redis that stalls once the block starts; a run's
    Redis calls get 1 s."""
    monkeypatch.setattr(preannotate, "REDIS_TIMEOUT_S", 1.0)
    server = RedisServer(tmp_path)
    server.start()
    try:
        with running_label_studio() as ls, server.stalled():
            ls.projects[1] = {"id": 1, "label_config": CONFIG, "task_number": 1}
            ls.tasks = [{"id": 1, "data": {"image": "/data/upload/4/d94949cd-blue_circle.png"}}]
            yield Settings(label_studio_url=ls.url, label_studio_api_key=SETUP_TOKEN, redis_url=server.url,
                           sam_checkpoint=str(make_tiny_checkpoint(tmp_path / "sam_tiny.pth", seed=3)),
                           sam_device="cpu"), ls
    finally:
        server.stop()


def test_a_stalled_redis_stops_the_command_with_a_clear_error(stalled_run: tuple[Settings, Any]) -> None:
    settings, ls = stalled_run
    run = Run(settings, 1, local=False, progress=False, echo=lambda line: None)
    fetcher = image_fetcher(label_studio_url=ls.url, label_studio_token=SETUP_TOKEN)
    started = time.monotonic()
    error = within(20, lambda: preannotate_project(run, fetcher=fetcher))
    assert isinstance(error, PreannotateError), error
    assert f"Redis at {settings.redis_url} (REDIS_URL) did not answer within 1 s" in error.message
    assert time.monotonic() - started < 5


def test_a_stalled_redis_fails_a_workers_job_with_a_clear_error(stalled_run: tuple[Settings, Any],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker's claims, run record and outcome list are on the stalled Redis: the job fails, it does not hang."""
    settings, ls = stalled_run
    monkeypatch.setattr(preannotate, "_preannotator", ProcessBinding("pre-annotation"))
    fetcher = image_fetcher(label_studio_url=ls.url, label_studio_token=SETUP_TOKEN)
    bind_preannotator(Preannotator(settings, Segmenter.from_settings(settings), fetcher))
    payload = {"run": "stalled", "project": 1, "tasks": [1], "options": asdict(Options()),
               "redis_url": settings.redis_url, "label_studio_url": ls.url}
    started = time.monotonic()
    error = within(20, lambda: run_job(payload))
    assert isinstance(error, RuntimeError), error
    assert str(error) == f"Redis at {settings.redis_url} (REDIS_URL) did not answer within 1 s"
    assert time.monotonic() - started < 5
@pytest.mark.parametrize("date", [None, "", "garbage", "Mon, 99 Foo 2026 25:61:61 GMT"])
def test_an_overwrite_run_without_a_readable_date_from_label_studio_stops_with_a_message(date: str | None) -> None:
    """A missing or forged Date header stops the run before any write, saying what to give instead."""
    from types import SimpleNamespace

    from backend.preannotate import _start_overwrite

    said: list[str] = []
    run = SimpleNamespace(options=Options(overwrite=True), echo=said.append)
    client = SimpleNamespace(url="http://ls:8080", clock=lambda path: date)
    with pytest.raises(PreannotateError) as raised:
        _start_overwrite(run, client, SimpleNamespace(id=7))
    assert "no readable Date header" in raised.value.message and "--overwrite-since" in raised.value.message
    assert said == [] and run.options.overwrite_since is None


def test_an_overwrite_run_starts_the_second_after_label_studios_date() -> None:
    """Label Studio's Date header has whole seconds: the start is the next one, so no older prediction is
    taken for this run's (the run then waits out that second before its first write)."""
    assert start_from_date_header("Mon, 30 Nov 2026 22:15:04 GMT") == "2026-11-30T22:15:05Z"
    since = parse_timestamp("2026-11-30T22:15:05Z")
    version = "vit_b-12345678"

    def made(created_at: object, model_version: str = version) -> dict[str, object]:
        return {"id": 1, "model_version": model_version, "created_at": created_at, "result": []}

    assert written_since(made("2026-11-30T22:15:05.000001Z"), version, since)
    assert written_since(made("2026-11-30T22:15:05Z"), version, since)
    assert written_since(made("2026-11-30T23:15:06+01:00"), version, since), "any zone compares by instant"
    assert not written_since(made("2026-11-30T22:15:04.999999Z"), version, since)
    assert not written_since(made("2026-11-30T22:16:00Z", "detector-v1"), version, since)
    for unreadable in (None, "", "yesterday", 17):
        assert not written_since(made(unreadable), version, since), "unreadable counts as older: replaced"
    task = {"id": 3, "predictions": [made("2026-11-30T22:10:00Z"), made("2026-11-30T22:16:00Z", "other")]}
    assert has_prediction(task, version) and not has_prediction(task, version, since)


@pytest.mark.parametrize("text", ["2026-11-30T22:15:05", "30/11/2026", "", "2026-13-01T00:00:00Z"])
def test_a_start_without_a_zone_or_unreadable_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_timestamp(text)


def test_the_resume_command_repeats_the_run_with_its_start() -> None:
    run = Run(Settings(), 7, Options(mode="everything", min_score=0.9, max_masks=50, label="Big car",
                                     overwrite=True, overwrite_since="2026-11-30T22:15:05Z"), chunk=4, prelabel=True)
    assert resume_command(run) == ("sam-backend preannotate --project 7 --mode everything --min-score 0.9 "
                                   "--min-area 0 --max-masks 50 --label 'Big car' --overwrite --overwrite-since "
                                   "2026-11-30T22:15:05Z --chunk 4 --prelabel")
    assert resume_command(Run(Settings(), 7)) == "sam-backend preannotate --project 7"
