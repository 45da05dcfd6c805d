"""Refinement from the previous mask: our clicks against Meta's ``SamPredictor`` run through the same clicks with
its best low-res logits fed back as ``mask_input`` (Meta's iterative-prompting recipe), on seeded weights.

The clicks go through /predict as Label Studio sends them: every click resends the interaction's earlier
keypoints. The store itself (``backend.refinement``) is checked for its keys, its byte budget and release.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from segment_anything import SamPredictor

from backend import bitmask
from backend.app import create_app
from backend.config import Settings
from backend.prompts import ObjectPrompt, parse_prompts
from backend.refinement import Refinements
from backend.segmenter import Segmenter
from testsupport.backend import FIXTURE_IMAGES, draw_image, fixture_body, png_bytes, running_label_studio
from testsupport.checkpoints import small_checkpoint
from testsupport.parity import LOGIT_ATOL, MASK_IOU, SCORE_ATOL, iou

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BitmaskLabels name="mask" toName="image"><Label value="Object"/></BitmaskLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Object"/></KeyPointLabels>
  <RectangleLabels name="rect" toName="image" smart="true"><Label value="Object"/></RectangleLabels>
</View>"""
CLICKS = [(50.0, 50.0, True), (15.0, 20.0, False), (62.0, 58.0, True), (80.0, 75.0, False)]  # percent, polarity


def prompt(points: list[tuple[float, float]], labels: list[int], box: tuple[float, ...] | None = None,
           label: str = "Object") -> ObjectPrompt:
    return ObjectPrompt(label=label, points=np.asarray(points, np.float32).reshape(-1, 2),
                        point_labels=np.asarray(labels, np.int32), box=None if box is None else np.asarray(box, np.float32),
                        source_ids=(), from_name="kp")


# ----------------------------------------------------------------------------------------------------------
# the store
def test_a_prompt_finds_the_longest_earlier_prompt_it_extends() -> None:
    store = Refinements(max_bytes=10 * 2**20)
    one, two = np.full((8, 8), 1.0, np.float32), np.full((8, 8), 2.0, np.float32)
    store.remember("model", "image", prompt([(1, 2)], [1]), one, task=7)
    store.remember("model", "image", prompt([(1, 2), (3, 4)], [1, 0]), two, task=7)
    found = store.earlier("model", "image", prompt([(1, 2), (3, 4), (5, 6)], [1, 0, 1]))
    assert found is not None and found[0, 0] == 2.0
    found = store.earlier("model", "image", prompt([(1, 2), (9, 9)], [1, 1]))
    assert found is not None and found[0, 0] == 1.0
    # Anything that is not an extension finds nothing: another model, image, label, polarity, order, box.
    for fingerprint, image, p in [
        ("other", "image", prompt([(1, 2), (3, 4)], [1, 0])),
        ("model", "other", prompt([(1, 2), (3, 4)], [1, 0])),
        ("model", "image", prompt([(1, 2), (3, 4)], [1, 0], label="Car")),
        ("model", "image", prompt([(1, 2), (3, 4)], [0, 0])),
        ("model", "image", prompt([(3, 4), (1, 2)], [1, 1])),
        ("model", "image", prompt([(1, 2), (3, 4)], [1, 0], box=(0, 0, 5, 5))),
        ("model", "image", prompt([(1, 2)], [1])),  # the same prompt again is not an extension
    ]:
        assert store.earlier(fingerprint, image, p) is None, (fingerprint, image, p.points, p.point_labels)
    box = (0.0, 0.0, 10.0, 10.0)
    store.remember("model", "image", prompt([], [], box=box), one)
    assert store.earlier("model", "image", prompt([(4, 4)], [1], box=box)) is not None


def test_memory_is_bounded_least_recently_used_first_and_released_per_task() -> None:
    logits = np.zeros((16, 16), np.float32)  # 1 KiB
    store = Refinements(max_bytes=3 * logits.nbytes)
    for i in range(3):
        store.remember("m", "i", prompt([(i, 0)], [1]), logits, task=i % 2)
    assert store.earlier("m", "i", prompt([(0, 0), (5, 5)], [1, 1])) is not None  # touches entry 0
    store.remember("m", "i", prompt([(3, 0)], [1]), logits, task=5)
    assert len(store) == 3 and store.nbytes == 3 * logits.nbytes
    assert store.earlier("m", "i", prompt([(1, 0), (5, 5)], [1, 1])) is None, "the least recently used went"
    assert store.earlier("m", "i", prompt([(0, 0), (5, 5)], [1, 1])) is not None
    assert store.release(0) == 2 and len(store) == 1 and store.nbytes == logits.nbytes
    Refinements(max_bytes=100).remember("m", "i", prompt([(0, 0)], [1]), logits)  # bigger than the budget: kept out


def test_settings() -> None:
    assert Settings.from_env({}).sam_refine is True and Settings.from_env({}).sam_refine_memory_mb == 64
    settings = Settings.from_env({"SAM_REFINE": "false", "SAM_REFINE_MEMORY_MB": "8"})
    assert settings.sam_refine is False and settings.sam_refine_memory_mb == 8


# ----------------------------------------------------------------------------------------------------------
# parity through /predict
@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    return small_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=5)


@pytest.fixture(scope="module")
def server() -> Iterator[Any]:
    with running_label_studio() as server:
        yield server


def client_for(path: Path, server: Any, **settings: Any) -> Any:
    app = create_app(Settings(sam_checkpoint=str(path), sam_device="cpu", image_timeout_s=5.0, sam_warmup=False,
                              **settings))
    setup = fixture_body("setup.json")
    setup["hostname"] = server.url
    assert app.test_client().post("/setup", json=setup).status_code == 200
    return app.test_client()


def click_body(clicks: list[tuple[float, float, bool]]) -> dict[str, Any]:
    body = fixture_body("predict_interactive_keypoint_api.json")
    body["label_config"] = CONFIG
    template = body["params"]["context"]["result"][0]
    regions = []
    for index, (x, y, positive) in enumerate(clicks):
        region = {**template, "id": f"kp{index}", "is_positive": positive}
        region["value"] = {**template["value"], "x": x, "y": y}
        regions.append(region)
    body["params"]["context"]["result"] = regions
    return body


def answer(client: Any, body: dict[str, Any]) -> tuple[np.ndarray, float]:
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.get_json()
    (region,) = response.get_json()["results"][0]["result"]
    return bitmask.decode(region["value"]["imageDataURL"]), float(region["score"])


def reference_rounds(meta: Any) -> Iterator[tuple[int, dict[str, Any], np.ndarray, float]]:
    """Meta's predictor (``SamPredictor`` or ``SAM2ImagePredictor``) through one interaction's clicks, its best
    low-res logits fed back as the next round's ``mask_input``: for each n, the body Label Studio sends with the
    first n clicks, and the reference's best mask and score for it."""
    image = draw_image(FIXTURE_IMAGES[click_body(CLICKS[:1])["tasks"][0]["data"]["image"]])
    meta.set_image(image)
    mask_input = None
    for n in range(1, len(CLICKS) + 1):
        body = click_body(CLICKS[:n])
        (p,) = parse_prompts(body["params"]["context"]["result"], image.shape[:2])
        masks, scores, logits = meta.predict(point_coords=p.points, point_labels=p.point_labels,
                                             mask_input=mask_input, multimask_output=mask_input is None)
        best = int(np.argmax(scores))
        mask_input = logits[best][None]
        assert 0.01 < masks[best].mean() < 0.99, f"click {n}: a trivial reference mask proves nothing"
        yield n, body, masks[best].astype(bool), float(scores[best])


def test_clicks_refine_like_metas_predictor_with_its_logits_fed_back(weights: tuple[Path, Any], server: Any) -> None:
    path, reference = weights
    ours, plain = client_for(path, server), client_for(path, server, sam_refine=False)
    differed = False
    for n, body, expected, expected_score in reference_rounds(SamPredictor(reference)):
        mask, score = answer(ours, body)
        assert iou(mask, expected) >= MASK_IOU, f"click {n}"
        assert abs(score - expected_score) <= SCORE_ATOL, f"click {n}: {score} vs {expected_score}"
        unrefined_mask, unrefined_score = answer(plain, body)
        differed |= abs(unrefined_score - score) > 100 * SCORE_ATOL or iou(unrefined_mask, mask) < MASK_IOU
    assert differed, "feeding the logits back must change some answer, or this test proves nothing"


def test_stored_logits_are_metas_low_res_logits(weights: tuple[Path, Any], server: Any) -> None:
    """The logits kept for the next click equal those Meta's predictor hands back for the same rounds."""
    path, reference = weights
    app_client = client_for(path, server)
    store = app_client.application.extensions["sam_backend"].refinements
    fingerprint = app_client.application.extensions["sam_backend"].segmenter.fingerprint
    body = click_body(CLICKS[:2])
    image = draw_image(FIXTURE_IMAGES[body["tasks"][0]["data"]["image"]])
    meta = SamPredictor(reference)
    meta.set_image(image)
    answer(app_client, click_body(CLICKS[:1]))
    answer(app_client, body)
    (p,) = parse_prompts(body["params"]["context"]["result"], image.shape[:2])
    masks, scores, logits = meta.predict(point_coords=p.points[:1], point_labels=p.point_labels[:1])
    masks, scores, logits = meta.predict(point_coords=p.points, point_labels=p.point_labels,
                                         mask_input=logits[int(np.argmax(scores))][None], multimask_output=False)
    sha = hashlib.sha256(png_bytes(image)).hexdigest()
    longer = prompt([*map(tuple, p.points), (1.0, 1.0)], [*p.point_labels, 1])
    stored = store.earlier(fingerprint, sha, longer)
    assert stored is not None, "the second click's answer is kept under the image's sha256"
    np.testing.assert_allclose(stored, logits[0], atol=LOGIT_ATOL, rtol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_sam2_clicks_refine_like_sam2_image_predictor(tmp_path: Path, server: Any) -> None:
    """The same through a SAM 2.1 model (a small custom configuration) against ``SAM2ImagePredictor``."""
    from model.sam2_checkpoint import Sam2Config, load_with_config
    from testsupport.sam2_checkpoints import SMALL, reference_predictor
    from testsupport.sam2_checkpoints import small_checkpoint as sam2_small_checkpoint

    path, reference = sam2_small_checkpoint(tmp_path, seed=3)
    config = Sam2Config(num_heads=SMALL["num_heads"], global_att_blocks=SMALL["global_att_blocks"],
                        window_spec=SMALL["window_spec"], image_size=SMALL["image_size"])
    segmenter = Segmenter(path, "cpu", loader=lambda file, device: load_with_config(file, config, device=device))
    app = create_app(Settings(sam_checkpoint=str(path), sam_device="cpu", image_timeout_s=5.0, sam_warmup=False),
                     segmenter)
    setup = fixture_body("setup.json")
    setup["hostname"] = server.url
    assert app.test_client().post("/setup", json=setup).status_code == 200
    client = app.test_client()
    for n, body, expected, expected_score in reference_rounds(reference_predictor(reference)):
        mask, score = answer(client, body)
        assert iou(mask, expected) >= MASK_IOU, f"click {n}"
        assert abs(score - expected_score) <= SCORE_ATOL, f"click {n}: {score} vs {expected_score}"
