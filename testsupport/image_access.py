"""What the image-access tests share: a task around an image reference, the sample files' bytes, a fetcher
with the fake Label Studio's legacy token, and the Authorization headers the fake Label Studio saw.

The servers themselves are fixtures (``cloud``, ``ls``) in ``tests/conftest.py``.
"""

from __future__ import annotations

from backend.image_fetch import ImageFetcher
from testsupport.image_server import FakeLabelStudio, sample_files


def task(value: object, task_id: int = 7, key: str = "image") -> dict:
    return {"id": task_id, "data": {key: value}, "annotations": [], "predictions": []}


def file_bytes(name: str) -> bytes:
    return sample_files()[name][0]


# The test servers all listen on 127.0.0.1, which the default SAM_IMAGE_HOSTS ("public") refuses: the fetchers
# of the image-access tests name it, as an admin names an internal image server.
LOOPBACK = "127.0.0.1"


def image_fetcher(**kwargs: object) -> ImageFetcher:
    """An ``ImageFetcher`` that may read from the test servers on 127.0.0.1."""
    kwargs.setdefault("image_hosts", LOOPBACK)
    return ImageFetcher(**kwargs)  # type: ignore[arg-type]


def legacy(ls: FakeLabelStudio, **kwargs: object) -> ImageFetcher:
    return image_fetcher(label_studio_url=ls.url, label_studio_token=ls.legacy_token, **kwargs)


def authorizations(ls: FakeLabelStudio, prefix: str) -> list[str | None]:
    return [seen.authorization for seen in ls.seen if seen.path.startswith(prefix)]

