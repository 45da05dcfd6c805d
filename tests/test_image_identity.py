"""Remembered image identities: a warm click downloads no image bytes, a changed image is never served stale.

Real HTTP servers (``testsupport.image_server``) that answer conditional GETs the way Label Studio 1.23's
local files (weak ETag of mtime and size) and S3 (strong ETag) do, and count the bodies they send.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from backend.errors import ImageAccessError
from backend.image_decode import TaskImage
from backend.image_fetch import ImageFetcher
from backend.image_identity import ImageIdentities, RememberedImage, Revalidation, is_upload
from testsupport.image_access import file_bytes, task
from testsupport.image_server import CloudStorage, FakeLabelStudio, png

UPLOAD = "/data/upload/4/0a1b2c3d-rgb.png"


def fetcher(ls: FakeLabelStudio, **kwargs: Any) -> ImageFetcher:
    identities = ImageIdentities(100, immutable_uploads=kwargs.pop("immutable_uploads", True))
    return ImageFetcher(label_studio_url=ls.url, label_studio_token=ls.legacy_token, identities=identities, image_hosts="127.0.0.1",
                        **kwargs)


def other_png(seed: int) -> bytes:
    return png(np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8))


def test_local_files_are_revalidated_with_their_etag_and_send_no_bytes_when_unchanged(ls: FakeLabelStudio) -> None:
    images = fetcher(ls)
    first = images.fetch(task("/data/local-files/?d=local/rgb.png"), "image")
    assert isinstance(first, TaskImage) and not isinstance(first, RememberedImage)
    second = images.fetch(task("/data/local-files/?d=local/rgb.png"), "image")
    assert isinstance(second, RememberedImage)
    assert (second.sha256, second.size) == (first.sha256, first.size)
    assert len(ls.bodies) == 1, "the second fetch was answered 304"
    np.testing.assert_array_equal(second.array, first.array)  # pixels on demand: a full download
    assert len(ls.bodies) == 2


def test_a_changed_image_at_the_same_url_is_downloaded_again(ls: FakeLabelStudio) -> None:
    images = fetcher(ls)
    first = images.fetch(task("/data/local-files/?d=local/rgb.png"), "image")
    ls.files["rgb.png"] = (other_png(1), "image/png")
    second = images.fetch(task("/data/local-files/?d=local/rgb.png"), "image")
    assert not isinstance(second, RememberedImage)
    assert second.sha256 == hashlib.sha256(other_png(1)).hexdigest() != first.sha256


def test_presigned_cloud_images_are_revalidated_at_the_cloud_host(ls: FakeLabelStudio, cloud: CloudStorage) -> None:
    images = fetcher(ls)
    bodies = len(cloud.bodies)
    first = images.fetch(task("s3://bucket/rgb.png"), "image")
    second = images.fetch(task("s3://bucket/rgb.png"), "image")
    assert isinstance(second, RememberedImage) and second.sha256 == first.sha256
    assert len(cloud.bodies) == bodies + 1
    assert cloud.leaks == []


def test_label_studio_uploads_are_not_requested_again(ls: FakeLabelStudio) -> None:
    ls.files["0a1b2c3d-rgb.png"] = ls.files["rgb.png"]
    images = fetcher(ls)
    first = images.fetch(task(UPLOAD), "image")
    requests_before = len(ls.seen)
    second = images.fetch(task(ls.url + UPLOAD), "image")  # the same file by its full URL: another reference
    third = images.fetch(task(UPLOAD), "image")
    assert isinstance(third, RememberedImage) and third.sha256 == first.sha256 == second.sha256
    assert third.size == (48, 64)
    assert len(ls.seen) == requests_before + 1


def test_uploads_are_downloaded_every_time_when_not_immutable(ls: FakeLabelStudio) -> None:
    ls.files["0a1b2c3d-rgb.png"] = ls.files["rgb.png"]
    images = fetcher(ls, immutable_uploads=False)
    for _ in range(2):
        assert not isinstance(images.fetch(task(UPLOAD), "image"), RememberedImage)
    assert ls.bodies.count(UPLOAD) == 2


def test_hosts_without_validators_are_downloaded_every_time(ls: FakeLabelStudio, cloud: CloudStorage) -> None:
    images = fetcher(ls)
    for reference in ("/data/upload/4/rgb.png", f"{cloud.url}/public/rgb.png"):
        for _ in range(2):
            assert not isinstance(images.fetch(task(reference), "image"), RememberedImage)
    assert ls.bodies.count("/data/upload/4/rgb.png") == 2
    assert cloud.bodies.count("/public/rgb.png") == 2


def test_local_root_files_are_not_read_again_until_they_change(ls: FakeLabelStudio, tmp_path: Path) -> None:
    (tmp_path / "upload" / "4").mkdir(parents=True)
    path = tmp_path / "upload" / "4" / "0a1b2c3d-photo.png"
    path.write_bytes(file_bytes("rgb.png"))
    images = fetcher(ls, local_files_root=tmp_path, immutable_uploads=False)
    first = images.fetch(task(UPLOAD.replace("rgb", "photo")), "image")
    assert isinstance(images.fetch(task(UPLOAD.replace("rgb", "photo")), "image"), RememberedImage)
    path.write_bytes(other_png(2))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = images.fetch(task(UPLOAD.replace("rgb", "photo")), "image")
    assert not isinstance(changed, RememberedImage) and changed.sha256 != first.sha256
    assert ls.seen == []


def test_a_remembered_image_that_changed_before_its_pixels_were_read_is_refused(ls: FakeLabelStudio) -> None:
    ls.files["0a1b2c3d-rgb.png"] = ls.files["rgb.png"]
    images = fetcher(ls)
    images.fetch(task(UPLOAD), "image")
    stale = images.fetch(task(UPLOAD), "image")
    ls.files["0a1b2c3d-rgb.png"] = (other_png(3), "image/png")  # rewritten in place, against Label Studio's rules
    with pytest.raises(ImageAccessError, match="changed while it was being read"):
        stale.array  # noqa: B018
    fresh = images.fetch(task(UPLOAD), "image")
    assert fresh.sha256 == hashlib.sha256(other_png(3)).hexdigest()


def test_exif_orientation_is_part_of_the_remembered_size(ls: FakeLabelStudio) -> None:
    images = fetcher(ls)
    first = images.fetch(task("/data/local-files/?d=local/exif.jpg"), "image")
    second = images.fetch(task("/data/local-files/?d=local/exif.jpg"), "image")
    assert isinstance(second, RememberedImage) and second.size == first.size == first.array.shape[:2]


def test_data_uris_and_disabled_identities_are_never_remembered(ls: FakeLabelStudio) -> None:
    uri = "data:image/png;base64," + base64.b64encode(file_bytes("rgb.png")).decode()
    images = fetcher(ls)
    assert not isinstance(images.fetch(task(uri), "image"), RememberedImage)
    assert len(images.identities) == 0
    off = ImageFetcher(label_studio_url=ls.url, label_studio_token=ls.legacy_token, image_hosts="127.0.0.1")
    for _ in range(2):
        assert not isinstance(off.fetch(task("/data/local-files/?d=local/rgb.png"), "image"), RememberedImage)


def test_last_modified_counts_only_when_a_minute_older_than_the_answer() -> None:
    fresh = Revalidation()
    fresh.record({"Last-Modified": "Mon, 30 Nov 2026 10:00:00 GMT", "Date": "Mon, 30 Nov 2026 10:00:30 GMT"})
    assert fresh.validators() == {}
    old = Revalidation()
    old.record({"Last-Modified": "Mon, 30 Nov 2026 10:00:00 GMT", "Date": "Mon, 30 Nov 2026 10:01:00 GMT"})
    assert old.validators() == {"If-Modified-Since": "Mon, 30 Nov 2026 10:00:00 GMT"}
    tagged = Revalidation()
    tagged.record({"ETag": '"abc"', "Last-Modified": "garbage"})
    assert tagged.validators() == {"If-None-Match": '"abc"'}
    huge = Revalidation()  # a host's 60 KB tag would make every remembered image cost that much: not a validator
    huge.record({"ETag": '"' + "a" * 60_000 + '"'})
    assert huge.validators() == {}


def test_what_counts_as_a_label_studio_upload() -> None:
    assert is_upload("/data/upload/12/0a1b2c3d-cat photo.jpg", on_label_studio=False)
    assert is_upload("http://ls:8080/data/upload/12/0a1b2c3d-cat.jpg", on_label_studio=True)
    assert not is_upload("http://other/data/upload/12/0a1b2c3d-cat.jpg", on_label_studio=False)
    assert not is_upload("/data/upload/12/cat.jpg", on_label_studio=False)
    assert not is_upload("/data/upload/12/0a1b2c3d-cat.jpg?v=2", on_label_studio=False)
    assert not is_upload("/data/upload/12/sub/0a1b2c3d-cat.jpg", on_label_studio=False)


# ------------------------------------------------------------------------------------------------------------
# through the app: clicks on a cached image


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from testsupport.backend import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "sam_tiny.pth", seed=3)


def click_body(image: str, x: float = 40.0, y: float = 50.0) -> dict[str, Any]:
    from testsupport.backend import fixture_body

    body = copy.deepcopy(fixture_body("predict_interactive_keypoint_ui_click.json"))
    body["tasks"][0]["data"]["image"] = image
    region = body["params"]["context"]["result"][0]
    region["value"]["x"], region["value"]["y"] = x, y
    return body


def test_warm_clicks_download_nothing_and_a_changed_image_gets_its_own_mask(
        tiny_checkpoint: Path, one_torch_thread: None) -> None:
    from backend.app import create_app
    from backend.config import Settings
    from model import Predictor, load
    from testsupport.backend import brush_mask, draw_image, fixture_body, running_label_studio

    def mask_of(response: Any) -> np.ndarray:
        return brush_mask(response.json)

    with running_label_studio() as server:
        settings = Settings(sam_checkpoint=str(tiny_checkpoint), sam_device="cpu", image_timeout_s=5.0)
        client = create_app(settings).test_client()
        setup = fixture_body("setup.json")
        setup["hostname"] = server.url
        assert client.post("/setup", json=setup).status_code == 200
        upload = "/data/upload/4/d94949cd-blue_circle.png"
        local = "/data/local-files/?d=local/scene.png"
        server.files["scene.png"] = (png(draw_image("red_square")), "image/png")
        server.local_files["local/scene.png"] = "scene.png"
        for image in (upload, local):
            first = client.post("/predict", json=click_body(image))
            assert first.status_code == 200, first.json
            bodies = len(server.bodies)
            for _ in range(3):
                again = client.post("/predict", json=click_body(image))
                assert again.status_code == 200
                np.testing.assert_array_equal(mask_of(again), mask_of(first))
            assert len(server.bodies) == bodies, f"a warm click on {image} downloaded the image"

        # The same local-files URL, new pixels: the host's ETag changes, so the click downloads and encodes it.
        changed = draw_image("blue_circle")
        server.files["scene.png"] = (png(changed), "image/png")
        response = client.post("/predict", json=click_body(local))
        assert response.status_code == 200
        oracle = Predictor(load(tiny_checkpoint, device="cpu"))
        height, width = changed.shape[:2]
        point = np.array([[40.0 / 100 * width, 50.0 / 100 * height]])
        expected = oracle.predict(oracle.embed(changed), point, np.array([1]), best_only=True).masks[0]
        stale = mask_of(client.post("/predict", json=click_body(upload)))  # unrelated: the upload still served
        assert stale.shape == expected.shape
        assert (mask_of(response) != expected).mean() < 0.001

