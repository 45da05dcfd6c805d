"""Task image fetching against real HTTP servers: every kind of image reference, the local root, the limits."""

from __future__ import annotations

import base64
import hashlib
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from backend.errors import BackendError, ImageAccessError, ImageError
from backend.image_decode import TaskImage
from backend.image_fetch import ImageFetcher
from testsupport.image_access import authorizations, file_bytes, image_fetcher, legacy, task
from testsupport.image_server import CloudStorage, FakeLabelStudio, rgb_array

# ------------------------------------------------------------------------------------------------------
# Label Studio uploads and local files


def test_upload_with_legacy_token(ls: FakeLabelStudio) -> None:
    image = legacy(ls).fetch(task("/data/upload/4/rgb.png"), "image")
    assert isinstance(image, TaskImage)
    np.testing.assert_array_equal(image.array, rgb_array())
    assert image.array.dtype == np.uint8 and image.array.shape == (48, 64, 3)
    assert image.sha256 == hashlib.sha256(file_bytes("rgb.png")).hexdigest()
    assert image.source == "/data/upload/4/rgb.png"
    assert authorizations(ls, "/data/upload/") == [f"Token {ls.legacy_token}"]


def test_connections_are_pooled(ls: FakeLabelStudio) -> None:
    fetcher = legacy(ls)
    for _ in range(3):
        fetcher.fetch(task("/data/upload/4/rgb.png"), "image")
    assert len({seen.client_port for seen in ls.seen}) == 1


def test_local_files_url_and_dollar_key(ls: FakeLabelStudio) -> None:
    image = legacy(ls).fetch(task("/data/local-files/?d=local/gray.png"), "$image")
    assert image.array.shape == (8, 32, 3)
    assert authorizations(ls, "/data/local-files/") == [f"Token {ls.legacy_token}"]


def test_not_found_in_label_studio(ls: FakeLabelStudio) -> None:
    with pytest.raises(ImageAccessError, match="not found \\(HTTP 404\\).*LOCAL_FILES_DOCUMENT_ROOT"):
        legacy(ls).fetch(task("/data/local-files/?d=local/missing.png"), "image")


# ------------------------------------------------------------------------------------------------------
# Cloud storage via presign


@pytest.mark.parametrize("scheme", ["s3", "gs", "azure-blob"])
def test_cloud_uri_is_presigned_and_the_signed_host_gets_no_token(
        ls: FakeLabelStudio, cloud: CloudStorage, scheme: str) -> None:
    uri = f"{scheme}://bucket-{scheme}/rgb.png"
    before = len(cloud.seen)
    image = legacy(ls).fetch(task(uri, task_id=42), "image")
    np.testing.assert_array_equal(image.array, rgb_array())
    assert image.source == uri
    fileuri = base64.urlsafe_b64encode(uri.encode()).decode()
    assert [(seen.path, seen.authorization) for seen in ls.seen] == [
        (f"/tasks/42/presign/?fileuri={fileuri}", f"Token {ls.legacy_token}")]
    signed = cloud.seen[before:]
    assert [seen.path.split("?")[0] for seen in signed] == [f"/bucket-{scheme}/rgb.png"]
    assert signed[0].authorization is None


def test_presign_with_personal_access_token(ls: FakeLabelStudio, cloud: CloudStorage) -> None:
    fetcher = image_fetcher(label_studio_url=ls.url, label_studio_token=ls.personal_token)
    fetcher.fetch(task("s3://bucket/exif.jpg"), "image")
    assert authorizations(ls, "/tasks/")[0].startswith("Bearer ")


def test_expired_signed_url_keeps_the_signature_out_of_the_message(ls: FakeLabelStudio) -> None:
    ls.sign_badly = True
    with pytest.raises(ImageAccessError, match="HTTP 403.*signed URL Label Studio made has expired") as caught:
        legacy(ls).fetch(task("s3://bucket/rgb.png"), "image")
    assert "Signature" not in caught.value.message and "/bucket/rgb.png" in caught.value.message


def test_presign_unknown_file_and_task_without_id(ls: FakeLabelStudio) -> None:
    with pytest.raises(ImageAccessError, match="not found \\(HTTP 404\\).*source cloud storage"):
        legacy(ls).fetch(task("s3://bucket/nothing.png"), "image")
    with pytest.raises(ImageError, match="has no id"):
        legacy(ls).fetch({"data": {"image": "gs://bucket/rgb.png"}}, "image")


# ------------------------------------------------------------------------------------------------------
# data: URIs


def test_data_uri() -> None:
    data = file_bytes("rgb.png")
    image = image_fetcher().fetch(task("data:image/png;base64," + base64.b64encode(data).decode()), "image")
    np.testing.assert_array_equal(image.array, rgb_array())
    assert image.sha256 == hashlib.sha256(data).hexdigest()
    assert image.source == f"data:image/png;base64,... ({len(data)} bytes)"
    with pytest.raises(ImageError, match="base64 data is invalid"):
        image_fetcher().fetch(task("data:image/png;base64,@@@not-base64@@@"), "image")
    with pytest.raises(ImageError, match="larger than the limit"):
        image_fetcher(max_bytes=100).fetch(task("data:image/png;base64," + base64.b64encode(data).decode()), "image")


# ------------------------------------------------------------------------------------------------------
# Local root (co-located installs)


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "disk.png").write_bytes(file_bytes("gray.png"))
    (tmp_path / "upload" / "4").mkdir(parents=True)
    (tmp_path / "upload" / "4" / "up.png").write_bytes(file_bytes("rgba.png"))
    (tmp_path.parent / "secret.png").write_bytes(file_bytes("rgb.png"))
    return tmp_path


def test_local_root_reads_from_disk_without_http(ls: FakeLabelStudio, root: Path) -> None:
    fetcher = legacy(ls, local_files_root=root)
    image = fetcher.fetch(task("/data/local-files/?d=local%2Fdisk.png"), "image")
    assert image.array.shape == (8, 32, 3)
    assert image.sha256 == hashlib.sha256(file_bytes("gray.png")).hexdigest()
    upload = fetcher.fetch(task("/data/upload/4/up.png"), "image")
    assert upload.array.shape == (4, 12, 3)
    absolute = fetcher.fetch(task(f"{ls.url}/data/upload/4/up.png"), "image")
    assert absolute.sha256 == upload.sha256
    assert ls.seen == []


def test_local_root_falls_back_to_http(ls: FakeLabelStudio, root: Path) -> None:
    image = legacy(ls, local_files_root=root).fetch(task("/data/local-files/?d=local/rgb.png"), "image")
    np.testing.assert_array_equal(image.array, rgb_array())
    assert authorizations(ls, "/data/local-files/") == [f"Token {ls.legacy_token}"]


def test_local_root_path_traversal_is_refused(ls: FakeLabelStudio, root: Path) -> None:
    fetcher = legacy(ls, local_files_root=root)
    for value in ["/data/local-files/?d=../secret.png", "/data/local-files/?d=local/../../secret.png",
                  "/data/upload/../../secret.png", "/data/upload/4/..%2F..%2F..%2Fsecret.png"]:
        with pytest.raises(ImageError, match="outside LOCAL_FILES_ROOT"):
            fetcher.fetch(task(value), "image")
    assert ls.seen == []


def test_local_root_symlinks_are_resolved_before_the_check(ls: FakeLabelStudio, root: Path, tmp_path: Path) -> None:
    """A link under the root to a file (or a folder) outside it is outside; a link that stays inside is fine."""
    import os

    os.symlink(tmp_path.parent / "secret.png", root / "local" / "escape.png")
    os.symlink(tmp_path.parent, root / "local" / "door")
    os.symlink(root / "local" / "disk.png", root / "local" / "alias.png")
    fetcher = legacy(ls, local_files_root=root)
    for value in ["/data/local-files/?d=local/escape.png", "/data/local-files/?d=local/door/secret.png"]:
        with pytest.raises(ImageError, match="outside LOCAL_FILES_ROOT"):
            fetcher.fetch(task(value), "image")
    assert fetcher.fetch(task("/data/local-files/?d=local/alias.png"), "image").array.shape == (8, 32, 3)
    assert ls.seen == []


def test_a_root_that_is_itself_a_link_still_serves_its_files(ls: FakeLabelStudio, root: Path, tmp_path: Path) -> None:
    import os

    link = tmp_path.parent / f"{tmp_path.name}-link"
    os.symlink(root, link)
    image = legacy(ls, local_files_root=link).fetch(task("/data/local-files/?d=local/disk.png"), "image")
    assert image.array.shape == (8, 32, 3) and ls.seen == []


def test_local_root_without_label_studio(root: Path) -> None:
    fetcher = image_fetcher(local_files_root=root)
    assert fetcher.fetch(task("/data/local-files/?d=local/disk.png"), "image").array.shape == (8, 32, 3)
    with pytest.raises(ImageError, match="does not know where Label Studio is: set LABEL_STUDIO_URL"):
        fetcher.fetch(task("/data/local-files/?d=local/elsewhere.png"), "image")


def test_filesystem_root_is_refused() -> None:
    with pytest.raises(ValueError, match="file system root"):
        image_fetcher(local_files_root="/")


# ------------------------------------------------------------------------------------------------------
# Settings


def test_from_settings(ls: FakeLabelStudio, tmp_path: Path) -> None:
    settings = SimpleNamespace(label_studio_url=ls.url, label_studio_api_key=ls.legacy_token,
                               local_files_root=str(tmp_path), image_timeout_s=4.0, image_max_bytes=100_000,
                               image_max_pixels=3000, sam_image_hosts="public", image_identities=0,
                               image_uploads_immutable=True, sam_image_proxy=True)
    fetcher = ImageFetcher.from_settings(settings)
    assert (fetcher.timeout_s, fetcher.max_bytes, fetcher.max_pixels, fetcher.root) == (4.0, 100_000, 3000, tmp_path)
    assert fetcher.http.session.use_proxies
    assert fetcher.fetch(task("/data/upload/4/gray.png"), "image").array.shape == (8, 32, 3)
    with pytest.raises(ImageError, match="64x48 = 3072 pixels, more than the limit of 3000"):
        fetcher.fetch(task("/data/upload/4/rgb.png"), "image")


def test_from_the_real_settings(ls: FakeLabelStudio, root: Path) -> None:
    from backend.config import Settings

    settings = Settings.from_env({"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.personal_token,
                                  "LOCAL_FILES_ROOT": str(root), "IMAGE_TIMEOUT_S": "7", "IMAGE_MAX_MB": "2",
                                  "IMAGE_MAX_PIXELS": "5000000", "SAM_IMAGE_HOSTS": "127.0.0.1"})
    fetcher = ImageFetcher.from_settings(settings)
    assert (fetcher.timeout_s, fetcher.max_bytes, fetcher.max_pixels, fetcher.root) == (7.0, 2 * 2**20, 5_000_000, root)
    assert fetcher.fetch(task("/data/local-files/?d=local/disk.png"), "image").array.shape == (8, 32, 3)
    assert fetcher.fetch(task("s3://bucket/rgb.png"), "image").array.shape == (48, 64, 3)
    assert ls.refreshes == 1


# ------------------------------------------------------------------------------------------------------
# Bad task data


@pytest.mark.parametrize(("value", "pattern"), [
    ("example.com/a.png", "has no scheme.*Did you mean http://example.com/a.png"),
    ("images/a.png", "has no scheme"),
    ("ftp://example.com/a.png", "scheme 'ftp://'"),
    ("file:///etc/passwd", "scheme 'file://'"),
    ("//example.com/a.png", "protocol-relative URL"),
    ("", "should be an image URL"),
    (None, "should be an image URL"),
])
def test_bad_image_references(value: object, pattern: str) -> None:
    with pytest.raises(ImageError, match=pattern) as caught:
        image_fetcher().fetch(task(value), "image")
    assert caught.value.status == 422


def test_missing_data_key_lists_the_keys() -> None:
    with pytest.raises(ImageError, match="no data field 'image'.*Its data fields are: photo, text"):
        image_fetcher().fetch({"id": 3, "data": {"photo": "x", "text": "y"}}, "image")
    with pytest.raises(ImageError, match="no 'data' object"):
        image_fetcher().fetch({"id": 3}, "image")


# ------------------------------------------------------------------------------------------------------
# Limits: time, bytes; failures


def test_timeout_on_a_silent_host(cloud: CloudStorage) -> None:
    start = time.monotonic()
    with pytest.raises(ImageAccessError, match="Timed out after 0.5 s"):
        image_fetcher(timeout_s=0.5).fetch(task(f"{cloud.url}/slow?s=3"), "image")
    assert time.monotonic() - start < 2.5


def test_timeout_on_a_trickling_host(cloud: CloudStorage) -> None:
    start = time.monotonic()
    with pytest.raises(ImageAccessError, match="Timed out.*arrives too slowly"):
        image_fetcher(timeout_s=0.5).fetch(task(f"{cloud.url}/trickle"), "image")
    assert time.monotonic() - start < 2.5


def test_size_limit_by_content_length_and_by_streaming(cloud: CloudStorage) -> None:
    fetcher = image_fetcher(max_bytes=50_000)
    with pytest.raises(ImageError, match="larger than the limit of 50000 bytes") as caught:
        fetcher.fetch(task(f"{cloud.url}/trickle"), "image")  # Content-Length 100000: refused at once
    assert caught.value.status == 422
    with pytest.raises(ImageError, match="larger than the limit of 50000 bytes"):
        fetcher.fetch(task(f"{cloud.url}/unsized?n=10000000"), "image")


def test_size_limit_on_disk(root: Path) -> None:
    with pytest.raises(ImageError, match="larger than the limit of 10 bytes"):
        image_fetcher(local_files_root=root, max_bytes=10).fetch(task("/data/local-files/?d=local/disk.png"), "image")


def test_every_failure_is_a_backend_error(cloud: CloudStorage) -> None:
    """A foreign host's refusal is an upstream failure (502) with the status in the message."""
    with pytest.raises(BackendError) as caught:
        image_fetcher().fetch(task(f"{cloud.url}/bucket/rgb.png?X-Amz-Signature=forged"), "image")
    assert caught.value.status == 502 and "HTTP 403" in caught.value.message
