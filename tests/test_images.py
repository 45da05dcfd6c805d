"""Task image access against real HTTP servers that check tokens like Label Studio does."""

from __future__ import annotations

import base64
import hashlib
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from backend.errors import BackendError, ImageAccessError, ImageError
from backend.images import ImageFetcher, TaskImage, decode_image
from backend.project_warmup import iter_tasks
from testsupport.image_server import (
    SIXTEEN_BIT_VALUES,
    CloudStorage,
    FakeLabelStudio,
    bomb_png,
    personal_access_token,
    rgb_array,
    sample_files,
)
from testsupport.processes import free_port


@pytest.fixture(scope="module")
def cloud() -> Iterator[CloudStorage]:
    server = CloudStorage()
    yield server
    server.close()


@pytest.fixture()
def ls(cloud: CloudStorage) -> Iterator[FakeLabelStudio]:
    server = FakeLabelStudio(cloud)
    yield server
    server.close()
    assert cloud.leaks == [], "the Label Studio token reached a host other than Label Studio"


def task(value: object, task_id: int = 7, key: str = "image") -> dict:
    return {"id": task_id, "data": {key: value}, "annotations": [], "predictions": []}


def file_bytes(name: str) -> bytes:
    return sample_files()[name][0]


def legacy(ls: FakeLabelStudio, **kwargs: object) -> ImageFetcher:
    return ImageFetcher(label_studio_url=ls.url, label_studio_token=ls.legacy_token, **kwargs)


def authorizations(ls: FakeLabelStudio, prefix: str) -> list[str | None]:
    return [seen.authorization for seen in ls.seen if seen.path.startswith(prefix)]


# ------------------------------------------------------------------------------------------------------
# Label Studio uploads and local files, legacy tokens


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


def test_absolute_label_studio_url_gets_the_token(ls: FakeLabelStudio) -> None:
    legacy(ls).fetch(task(f"{ls.url}/data/upload/4/rgb.png"), "image")
    assert authorizations(ls, "/data/upload/") == [f"Token {ls.legacy_token}"]


def test_legacy_tokens_disabled_says_how_to_enable_them(ls: FakeLabelStudio) -> None:
    ls.legacy_enabled = False
    with pytest.raises(ImageAccessError) as caught:
        legacy(ls).fetch(task("/data/upload/4/rgb.png"), "image")
    message = caught.value.message
    assert caught.value.status == 502
    assert "HTTP 401" in message and "legacy token from LABEL_STUDIO_API_KEY" in message
    assert "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true" in message and "personal access token" in message


def test_wrong_and_missing_token(ls: FakeLabelStudio) -> None:
    with pytest.raises(ImageAccessError, match="legacy token"):
        ImageFetcher(label_studio_url=ls.url, label_studio_token="wrong").fetch(task("/data/upload/4/rgb.png"), "image")
    with pytest.raises(ImageAccessError, match="has no Label Studio token. Set LABEL_STUDIO_API_KEY"):
        ImageFetcher(label_studio_url=ls.url).fetch(task("/data/upload/4/rgb.png"), "image")


def test_not_found_in_label_studio(ls: FakeLabelStudio) -> None:
    with pytest.raises(ImageAccessError, match="not found \\(HTTP 404\\).*LOCAL_FILES_DOCUMENT_ROOT"):
        legacy(ls).fetch(task("/data/local-files/?d=local/missing.png"), "image")


# ------------------------------------------------------------------------------------------------------
# Personal access tokens (JWT refresh tokens)


def test_personal_access_token_is_exchanged_once_and_sent_as_bearer(ls: FakeLabelStudio) -> None:
    fetcher = ImageFetcher(label_studio_url=ls.url, label_studio_token=ls.personal_token)
    for _ in range(3):
        fetcher.fetch(task("/data/upload/4/rgb.png"), "image")
    assert ls.refreshes == 1
    sent = authorizations(ls, "/data/upload/")
    assert len(sent) == 3 and len(set(sent)) == 1
    assert sent[0].startswith("Bearer ") and ls.personal_token not in sent[0]


def test_access_token_refreshed_after_401(ls: FakeLabelStudio) -> None:
    fetcher = ImageFetcher(label_studio_url=ls.url, label_studio_token=ls.personal_token)
    fetcher.fetch(task("/data/upload/4/rgb.png"), "image")
    ls.revoke_access_tokens()
    fetcher.fetch(task("/data/upload/4/rgb.png"), "image")
    assert ls.refreshes == 2
    first, refused, retried = authorizations(ls, "/data/upload/")
    assert first == refused != retried


def test_access_token_refreshed_before_its_exp(ls: FakeLabelStudio) -> None:
    ls.access_ttl_s = 5  # inside the refresh margin: every use needs a new one
    fetcher = ImageFetcher(label_studio_url=ls.url, label_studio_token=ls.personal_token)
    fetcher.fetch(task("/data/upload/4/rgb.png"), "image")
    fetcher.fetch(task("/data/upload/4/rgb.png"), "image")
    assert ls.refreshes == 2
    assert authorizations(ls, "/data/upload/") == [seen for seen in authorizations(ls, "/data/upload/")
                                                   if seen and seen.startswith("Bearer ")]


def test_expired_personal_access_token_fails_before_any_request(ls: FakeLabelStudio) -> None:
    fetcher = ImageFetcher(label_studio_url=ls.url, label_studio_token=personal_access_token(exp_in_s=-60))
    with pytest.raises(ImageAccessError, match="personal access token in LABEL_STUDIO_API_KEY expired on"):
        fetcher.fetch(task("/data/upload/4/rgb.png"), "image")
    assert ls.seen == []


def test_revoked_personal_access_token(ls: FakeLabelStudio) -> None:
    fetcher = ImageFetcher(label_studio_url=ls.url, label_studio_token=personal_access_token())
    with pytest.raises(ImageAccessError, match="refused the personal access token.*expired, revoked"):
        fetcher.fetch(task("/data/upload/4/rgb.png"), "image")
    assert [seen.path for seen in ls.seen] == ["/api/token/refresh/"]


def test_threads_share_one_refresh(ls: FakeLabelStudio) -> None:
    fetcher = ImageFetcher(label_studio_url=ls.url, label_studio_token=ls.personal_token)
    results: list[TaskImage] = []
    errors: list[BaseException] = []

    def work(name: str) -> None:
        try:
            results.append(fetcher.fetch(task(f"/data/upload/4/{name}"), "image"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    names = ["rgb.png", "gray.png", "exif.jpg", "rgba.png"] * 2
    threads = [threading.Thread(target=work, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert ls.refreshes == 1
    by_source = {image.source.rsplit("/", 1)[-1]: image.sha256 for image in results}
    assert by_source == {name: hashlib.sha256(file_bytes(name)).hexdigest() for name in set(names)}


# ------------------------------------------------------------------------------------------------------
# Cloud storage via presign, and other hosts


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
    fetcher = ImageFetcher(label_studio_url=ls.url, label_studio_token=ls.personal_token)
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


def test_direct_url_never_gets_the_label_studio_token(ls: FakeLabelStudio, cloud: CloudStorage) -> None:
    before = len(cloud.seen)
    image = legacy(ls).fetch(task(f"{cloud.url}/public/rgb.png"), "image")
    np.testing.assert_array_equal(image.array, rgb_array())
    assert [seen.authorization for seen in cloud.seen[before:]] == [None]
    assert ls.seen == []


def test_redirects_carry_the_token_only_to_label_studio(ls: FakeLabelStudio, cloud: CloudStorage) -> None:
    from urllib.parse import quote

    target = quote(f"{ls.url}/data/upload/4/rgb.png", safe="")
    legacy(ls).fetch(task(f"{cloud.url}/redirect?to={target}"), "image")
    assert authorizations(ls, "/data/upload/") == [f"Token {ls.legacy_token}"]


def test_same_host_other_port_is_another_origin(ls: FakeLabelStudio, cloud: CloudStorage) -> None:
    fetcher = ImageFetcher(label_studio_url=f"http://127.0.0.1:{ls.port}/", label_studio_token="secret")
    fetcher.fetch(task(f"http://127.0.0.1:{cloud.port}/public/gray.png"), "image")  # would 400 on a leak


def test_data_uri() -> None:
    data = file_bytes("rgb.png")
    image = ImageFetcher().fetch(task("data:image/png;base64," + base64.b64encode(data).decode()), "image")
    np.testing.assert_array_equal(image.array, rgb_array())
    assert image.sha256 == hashlib.sha256(data).hexdigest()
    assert image.source == f"data:image/png;base64,... ({len(data)} bytes)"
    with pytest.raises(ImageError, match="base64 data is invalid"):
        ImageFetcher().fetch(task("data:image/png;base64,@@@not-base64@@@"), "image")
    with pytest.raises(ImageError, match="larger than the limit"):
        ImageFetcher(max_bytes=100).fetch(task("data:image/png;base64," + base64.b64encode(data).decode()), "image")


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


def test_local_root_without_label_studio(root: Path) -> None:
    fetcher = ImageFetcher(local_files_root=root)
    assert fetcher.fetch(task("/data/local-files/?d=local/disk.png"), "image").array.shape == (8, 32, 3)
    with pytest.raises(ImageError, match="does not know where Label Studio is: set LABEL_STUDIO_URL"):
        fetcher.fetch(task("/data/local-files/?d=local/elsewhere.png"), "image")


def test_filesystem_root_is_refused() -> None:
    with pytest.raises(ValueError, match="file system root"):
        ImageFetcher(local_files_root="/")


# ------------------------------------------------------------------------------------------------------
# Configuration: environment, /setup, bad values


def test_setup_supplies_what_the_environment_lacks(ls: FakeLabelStudio) -> None:
    fetcher = ImageFetcher()
    with pytest.raises(ImageError, match="set LABEL_STUDIO_URL"):
        fetcher.fetch(task("/data/upload/4/rgb.png"), "image")
    fetcher.set_label_studio(ls.url, ls.legacy_token)
    fetcher.fetch(task("/data/upload/4/rgb.png"), "image")
    fetcher.set_label_studio(ls.url, "stale-token-from-setup")
    with pytest.raises(ImageAccessError, match="legacy token from the access_token Label Studio sent to /setup"):
        fetcher.fetch(task("/data/upload/4/rgb.png"), "image")


def test_environment_wins_over_setup(ls: FakeLabelStudio) -> None:
    fetcher = ImageFetcher(label_studio_url=ls.url, label_studio_token=ls.personal_token)
    fetcher.set_label_studio("http://localhost:8080", "setup-legacy-token")
    fetcher.fetch(task("/data/upload/4/rgb.png"), "image")
    fetcher.set_label_studio("http://localhost:8080", "setup-legacy-token")  # every /health + /setup
    fetcher.fetch(task("/data/upload/4/rgb.png"), "image")
    fetcher.set_label_studio("http://other:8080", "another-token")  # overridden anyway: keeps the access token
    fetcher.fetch(task("/data/upload/4/rgb.png"), "image")
    assert ls.refreshes == 1
    assert all(sent.startswith("Bearer ") for sent in authorizations(ls, "/data/upload/"))


def test_from_settings(ls: FakeLabelStudio, tmp_path: Path) -> None:
    settings = SimpleNamespace(label_studio_url=ls.url, label_studio_api_key=ls.legacy_token,
                               local_files_root=str(tmp_path), image_timeout_s=4.0, image_max_bytes=100_000,
                               image_max_pixels=3000)
    fetcher = ImageFetcher.from_settings(settings)
    assert (fetcher.timeout_s, fetcher.max_bytes, fetcher.max_pixels, fetcher.root) == (4.0, 100_000, 3000, tmp_path)
    assert fetcher.fetch(task("/data/upload/4/gray.png"), "image").array.shape == (8, 32, 3)
    with pytest.raises(ImageError, match="64x48 = 3072 pixels, more than the limit of 3000"):
        fetcher.fetch(task("/data/upload/4/rgb.png"), "image")


def test_bad_label_studio_urls() -> None:
    with pytest.raises(ValueError, match="must start with http:// or https://"):
        ImageFetcher(label_studio_url="label-studio:8080")
    fetcher = ImageFetcher(label_studio_token="x")
    fetcher.set_label_studio("localhost:8080", "x")
    with pytest.raises(ImageError, match="'localhost:8080' \\(from the hostname Label Studio sent to /setup\\) must"):
        fetcher.fetch(task("/data/upload/4/rgb.png"), "image")


def test_connection_refused_names_the_url_and_the_docker_hint() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    fetcher = ImageFetcher(label_studio_url=url, label_studio_token="x", timeout_s=5)
    with pytest.raises(ImageAccessError) as caught:
        fetcher.fetch(task("/data/upload/4/rgb.png"), "image")
    message = caught.value.message
    assert f"Could not connect to Label Studio at {url} (from LABEL_STUDIO_URL)" in message
    assert "Docker" in message and "Set LABEL_STUDIO_URL" in message
    with pytest.raises(ImageAccessError, match=f"Could not connect to {url}/public/x.png"):
        ImageFetcher().fetch(task(f"{url}/public/x.png"), "image")


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
        ImageFetcher().fetch(task(value), "image")
    assert caught.value.status == 422


def test_missing_data_key_lists_the_keys() -> None:
    with pytest.raises(ImageError, match="no data field 'image'.*Its data fields are: photo, text"):
        ImageFetcher().fetch({"id": 3, "data": {"photo": "x", "text": "y"}}, "image")
    with pytest.raises(ImageError, match="no 'data' object"):
        ImageFetcher().fetch({"id": 3}, "image")


# ------------------------------------------------------------------------------------------------------
# Limits: time, bytes, pixels


def test_timeout_on_a_silent_host(cloud: CloudStorage) -> None:
    start = time.monotonic()
    with pytest.raises(ImageAccessError, match="Timed out after 0.5 s"):
        ImageFetcher(timeout_s=0.5).fetch(task(f"{cloud.url}/slow?s=3"), "image")
    assert time.monotonic() - start < 2.5


def test_timeout_on_a_trickling_host(cloud: CloudStorage) -> None:
    start = time.monotonic()
    with pytest.raises(ImageAccessError, match="Timed out.*arrives too slowly"):
        ImageFetcher(timeout_s=0.5).fetch(task(f"{cloud.url}/trickle"), "image")
    assert time.monotonic() - start < 2.5


def test_size_limit_by_content_length_and_by_streaming(cloud: CloudStorage) -> None:
    fetcher = ImageFetcher(max_bytes=50_000)
    with pytest.raises(ImageError, match="larger than the limit of 50000 bytes") as caught:
        fetcher.fetch(task(f"{cloud.url}/trickle"), "image")  # Content-Length 100000: refused at once
    assert caught.value.status == 422
    with pytest.raises(ImageError, match="larger than the limit of 50000 bytes"):
        fetcher.fetch(task(f"{cloud.url}/unsized?n=10000000"), "image")


def test_size_limit_on_disk(root: Path) -> None:
    with pytest.raises(ImageError, match="larger than the limit of 10 bytes"):
        ImageFetcher(local_files_root=root, max_bytes=10).fetch(task("/data/local-files/?d=local/disk.png"), "image")


def test_decompression_bomb(cloud: CloudStorage) -> None:
    data = file_bytes("bomb.png")
    assert len(data) < 100_000
    with pytest.raises(ImageError, match="196000000 pixels.*limit is 89478485 pixels"):
        ImageFetcher().fetch(task(f"{cloud.url}/public/bomb.png"), "image")  # beyond Pillow's own limit
    small_bomb = bomb_png(5000, 4000)  # below Pillow's limit: our own check refuses it before decoding
    with pytest.raises(ImageError, match="5000x4000 = 20000000 pixels, more than the limit of 1000000"):
        decode_image(small_bomb, "small-bomb.png", max_pixels=1_000_000)


# ------------------------------------------------------------------------------------------------------
# Decoding: orientation and colour modes


def fetch_public(cloud: CloudStorage, name: str) -> np.ndarray:
    return ImageFetcher().fetch(task(f"{cloud.url}/public/{name}"), "image").array


def test_exif_orientation_is_applied(cloud: CloudStorage) -> None:
    array = fetch_public(cloud, "exif.jpg")
    assert array.shape == (40, 20, 3)  # stored 40 wide x 20 high, shown rotated
    np.testing.assert_allclose(array[5, 10], (255, 0, 0), atol=12)
    np.testing.assert_allclose(array[35, 10], (0, 0, 255), atol=12)


@pytest.mark.parametrize("name", ["exif.jpg", "rgb.png", "gray.png", "rgba.png"])
def test_size_comes_from_the_header_without_decoding(cloud: CloudStorage, name: str) -> None:
    """A click on a cached image needs its size and hash, not its pixels: fetch must not decode."""
    image = ImageFetcher().fetch(task(f"{cloud.url}/public/{name}"), "image")
    assert "array" not in image.__dict__, "fetch decoded the image"
    assert image.size == image.array.shape[:2]


def test_grayscale_palette_and_cmyk(cloud: CloudStorage) -> None:
    gray = fetch_public(cloud, "gray.png")
    np.testing.assert_array_equal(gray[..., 0], np.tile(np.arange(0, 256, 8, dtype=np.uint8), (8, 1)))
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    palette = fetch_public(cloud, "palette.png")
    assert (palette[:, :4] == 255).all() and (palette[:, 4:] == (0, 0, 255)).all()
    np.testing.assert_allclose(fetch_public(cloud, "cmyk.jpg"), np.full((8, 8, 3), (255, 0, 0)), atol=3)


def test_rgba_is_composited_over_white(cloud: CloudStorage) -> None:
    array = fetch_public(cloud, "rgba.png")
    assert array.shape == (4, 12, 3) and array.dtype == np.uint8
    assert (array[:, 0:4] == 255).all()  # transparent green shows the white page
    assert (array[:, 4:8] == (255, 0, 0)).all()
    assert (np.abs(array[:, 8:12].astype(int) - 127) <= 1).all()  # half-transparent black


def test_sixteen_bit_is_scaled_to_eight(cloud: CloudStorage) -> None:
    array = fetch_public(cloud, "16bit.png")
    expected = np.rint(SIXTEEN_BIT_VALUES / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(array[..., 0], expected)
    np.testing.assert_array_equal(expected, [[0, 128, 255, 4]])


@pytest.mark.parametrize(("name", "pattern"), [
    ("notes.txt", "is not an image the backend can read \\(Content-Type text/plain\\)"),
    ("login.html", "it is a web page, often a login or error page"),
    ("truncated.png", "could not be decoded"),
])
def test_not_an_image(cloud: CloudStorage, name: str, pattern: str) -> None:
    with pytest.raises(ImageError, match=pattern) as caught:
        fetch_public(cloud, name)
    assert type(caught.value) is ImageError and caught.value.status == 422


def test_every_failure_is_a_backend_error(cloud: CloudStorage) -> None:
    """A foreign host's refusal is an upstream failure (502) with the status in the message."""
    with pytest.raises(BackendError) as caught:
        ImageFetcher().fetch(task(f"{cloud.url}/bucket/rgb.png?X-Amz-Signature=forged"), "image")
    assert caught.value.status == 502 and "HTTP 403" in caught.value.message


def tiff(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "TIFF")
    return buffer.getvalue()


def test_float_and_32_bit_tiff() -> None:
    fractions = np.array([[0.0, 0.5, 1.0]], np.float32)
    np.testing.assert_array_equal(decode_image(tiff(Image.fromarray(fractions, "F")), "f.tif")[..., 0], [[0, 128, 255]])
    wide = np.array([[0, 257 * 10, 65535]], np.int32)
    np.testing.assert_array_equal(decode_image(tiff(Image.fromarray(wide, "I")), "i.tif")[..., 1], [[0, 10, 255]])
    sixteen = Image.fromarray(SIXTEEN_BIT_VALUES)
    np.testing.assert_array_equal(decode_image(tiff(sixteen), "16.tif")[..., 2], [[0, 128, 255, 4]])


def test_formats_outside_the_browser_set_are_not_opened() -> None:
    """EPS would hand task data to Ghostscript; it is refused as 'not an image' instead."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto showpage\n"
    with pytest.raises(ImageError, match="not an image the backend can read. Readable formats: PNG, JPEG"):
        decode_image(eps, "drawing.eps")


def test_from_the_real_settings(ls: FakeLabelStudio, root: Path) -> None:
    from backend.config import Settings

    settings = Settings.from_env({"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.personal_token,
                                  "LOCAL_FILES_ROOT": str(root), "IMAGE_TIMEOUT_S": "7", "IMAGE_MAX_MB": "2",
                                  "IMAGE_MAX_PIXELS": "5000000"})
    fetcher = ImageFetcher.from_settings(settings)
    assert (fetcher.timeout_s, fetcher.max_bytes, fetcher.max_pixels, fetcher.root) == (7.0, 2 * 2**20, 5_000_000, root)
    assert fetcher.fetch(task("/data/local-files/?d=local/disk.png"), "image").array.shape == (8, 32, 3)
    assert fetcher.fetch(task("s3://bucket/rgb.png"), "image").array.shape == (48, 64, 3)
    assert ls.refreshes == 1


# ------------------------------------------------------------------------------------------------------
# Label Studio's API, as `sam-backend warm --project` reads it


def test_api_errors_carry_the_upstream_status(ls: FakeLabelStudio) -> None:
    with pytest.raises(ImageAccessError) as missing:
        legacy(ls).label_studio_json("/api/nothing-here")
    assert missing.value.upstream_status == 404 and missing.value.status == 502
    with pytest.raises(ImageAccessError) as refused:
        ImageFetcher(label_studio_url=ls.url, label_studio_token="wrong-token").label_studio_json("/api/tasks")
    assert refused.value.upstream_status == 401


@pytest.mark.parametrize("count", [0, 3, 4, 9])
def test_task_pages_end_at_label_studios_invalid_page(ls: FakeLabelStudio, count: int) -> None:
    """A bare-list task API has no total: the listing ends at a short page or at the 404 after a full one."""
    ls.tasks = [task(f"/data/upload/1/{i}.png", task_id=i) for i in range(count)]
    listed = list(iter_tasks(legacy(ls), project_id=1, page_size=3))
    assert [t["id"] for t in listed] == list(range(count))
    pages = [seen.path for seen in ls.seen if seen.path.startswith("/api/tasks")]
    assert len(pages) == count // 3 + 1
