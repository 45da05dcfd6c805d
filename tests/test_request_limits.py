"""The pieces behind bounded requests, without a server: the JSON body check, the counting limits, the /setup
store, the label-config parse cache, the settings that configure them, and the cache's one precision."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backend.config import Settings, SettingsError
from backend.errors import BadRequest, LimitExceeded
from backend.json_body import parse_object
from backend.label_config import CACHED_CONFIG_CHARS, ProjectConfigs, parse_label_config
from backend.request_limits import RequestLimits
from testsupport.backend import fixture_body, fixture_names


def refused(data: bytes, depth: int = 64) -> str:
    with pytest.raises(BadRequest) as caught:
        parse_object(data, depth)
    return caught.value.message


@pytest.mark.parametrize("name", fixture_names())
def test_every_recorded_body_passes_the_check(name: str) -> None:
    body = fixture_body(name)
    assert parse_object(json.dumps(body).encode(), 64) == body


@pytest.mark.parametrize(("data", "named"), [
    (b'{"a": {"b": [1, NaN]}}', "'a.b[1]' must be a finite number"),
    (b'{"a": [Infinity]}', "'a[0]' must be a finite number"),
    (b'{"a": 1e999}', "'a' must be a finite number"),
    (b'{"x": ' + b"9" * 401 + b"}", "'x' is an integer of 401 digits"),
    (b'{"x": [1, 2, -' + b"9" * 30 + b"]}", "'x[2]' is an integer of 30 digits"),
    (b'{"x": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b'{"label": "\\ud800"}', "'label' has an unpaired UTF-16 surrogate"),
    (b'{"\\udfff": 1}', "the request body has a key with an unpaired UTF-16 surrogate"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"t": ' + b"[" * 70 + b"]" * 70 + b"}", "'t[0][0]"),
    (b"[]", "must be a JSON object, got an array"),
    (b'"x"', "got a string"),
    (b"null", "got null"),
    (b"", "empty"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"{", "not valid JSON"),
])
def test_malformed_bodies_name_what_is_wrong(data: bytes, named: str) -> None:
    assert named in refused(data)


def test_valid_unicode_and_pairs_pass() -> None:
    body = parse_object('{"label": "\\ud83d\\ude00 Äpfel", "n": -12.5e3, "big": 9007199254740993}'.encode(), 64)
    assert body["label"] == "\U0001f600 Äpfel" and body["big"] == 9007199254740993


def test_long_lists_of_small_ints_take_the_fast_path_and_still_get_checked() -> None:
    rle = list(range(256)) * 4000
    parse_object(json.dumps({"rle": rle}).encode(), 64)
    assert "'rle[3]'" in refused(json.dumps({"rle": [1, 2, 3, 2**70, *rle]}).encode())
    assert "'rle[2]'" in refused(json.dumps({"rle": [1, 2, float("nan"), *rle]}).encode())


def keypoints(count: int, labels: int = 1) -> list[dict[str, object]]:
    return [{"type": "keypointlabels", "value": {"x": 1, "y": 1, "keypointlabels": [f"L{i % labels}"]}}
            for i in range(count)]


def test_the_click_limits_count_regions_points_and_labels() -> None:
    limits = RequestLimits(max_click_regions=10, max_click_points=5, max_click_objects=2)
    limits.check_prompts(keypoints(5, labels=2))
    with pytest.raises(LimitExceeded, match="6 keypoints .* at most 5 .SAM_MAX_CLICK_POINTS"):
        limits.check_prompts(keypoints(6))
    with pytest.raises(LimitExceeded, match="3 labels .*SAM_MAX_CLICK_OBJECTS"):
        limits.check_prompts(keypoints(3, labels=3))
    with pytest.raises(LimitExceeded, match="11 regions .*SAM_MAX_CLICK_REGIONS"):
        limits.check_prompts([{"type": "brushlabels"}] * 11)
    limits.check_prompts("not a list")  # malformed regions are backend.prompts' to name


def test_the_batch_limits() -> None:
    limits = RequestLimits(max_tasks=3, max_boxes_per_task=4)
    limits.check_tasks([{}] * 3)
    with pytest.raises(LimitExceeded, match="SAM_MAX_TASKS.*sam-backend preannotate") as caught:
        limits.check_tasks([{}] * 4)
    assert caught.value.status == 413
    with pytest.raises(LimitExceeded, match="5 rectangles in tasks\\[2\\]"):
        limits.check_boxes(5, "tasks[2]")


def test_settings_read_every_limit() -> None:
    settings = Settings.from_env({"SAM_MAX_TASKS": "50", "SAM_MAX_CLICK_POINTS": "7", "SAM_SETUP_MEMORY_MB": "2"})
    limits = settings.request_limits
    assert (limits.max_tasks, limits.max_click_points, limits.setup_memory_mb) == (50, 7, 2)
    assert Settings().request_limits == RequestLimits()
    with pytest.raises(SettingsError, match="SAM_MAX_CLICK_OBJECTS"):
        Settings.from_env({"SAM_MAX_CLICK_OBJECTS": "0"})
    with pytest.raises(SettingsError, match="SAM_MAX_JSON_DEPTH"):
        Settings.from_env({"SAM_MAX_JSON_DEPTH": "3"})  # below what Label Studio's bodies need


def test_project_configs_are_an_lru_bounded_in_entries_and_characters() -> None:
    store = ProjectConfigs(max_entries=3, max_chars=150)
    for i in range(5):
        store.put(f"{i}.17", f"<View>{i}</View>")
    assert len(store) == 3 and store.for_project_id(0) is None and store.for_project_id(4) == "<View>4</View>"
    store.for_project_id(2)  # used: now the newest
    store.put("9.1", "x" * 90)
    assert store.for_project_id(2) == "<View>2</View>" and store.for_project_id(3) is None
    assert len(store) == 3 and store.chars <= 150
    store.put("11.1", "z" * 100)  # over the characters: the oldest go until it fits
    assert store.for_project_id(4) is None and store.for_project_id(9) is None and store.chars <= 150
    assert store.for_project_id(2) == "<View>2</View>"  # read last: kept
    store.put("10.1", "y" * 151)  # larger than the whole store: not kept
    assert store.for_project_id(10) is None


def test_parsed_configs_are_reused_and_huge_ones_are_not_kept() -> None:
    xml = fixture_body("setup.json")["schema"]
    assert parse_label_config(xml) is parse_label_config(xml)
    labels = "".join(f'<Label value="L{i % 20_000}"/>' for i in range(40_000))
    huge = f'<View><Image name="i" value="$image"/><BrushLabels name="b" toName="i">{labels}</BrushLabels></View>'
    assert len(huge) > CACHED_CONFIG_CHARS
    config = parse_label_config(huge)
    assert config.output_tag().labels == tuple(f"L{i}" for i in range(20_000))  # de-duplicated, in order
    assert parse_label_config(huge) is not config


def test_every_tier_serves_the_precision_redis_stores() -> None:
    import torch

    from model import Embedding

    rng = np.random.default_rng(0)
    features = torch.from_numpy(rng.standard_normal((1, 8, 4, 4)).astype(np.float32) * 100)
    high_res = (torch.from_numpy(rng.standard_normal((1, 2, 16, 16)).astype(np.float32)),)
    for embedding in (Embedding(features, (30, 40), (12, 16), "abc"),
                      Embedding(features, (30, 40), (12, 16), "abc", high_res=high_res)):
        stored = embedding.at_stored_precision()
        read = Embedding.from_bytes(embedding.to_bytes())
        for ours, theirs in zip((stored.features, *stored.high_res), (read.features, *read.high_res), strict=True):
            assert ours.dtype == theirs.dtype == torch.float32
            assert torch.equal(ours, theirs)
            assert ours.is_contiguous(memory_format=torch.channels_last)
        assert stored.to_bytes() == embedding.to_bytes()
        assert not torch.equal(stored.features, embedding.features)  # it did round
