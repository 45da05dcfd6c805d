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


def legacy(ls: FakeLabelStudio, **kwargs: object) -> ImageFetcher:
    return ImageFetcher(label_studio_url=ls.url, label_studio_token=ls.legacy_token, **kwargs)


def authorizations(ls: FakeLabelStudio, prefix: str) -> list[str | None]:
    return [seen.authorization for seen in ls.seen if seen.path.startswith(prefix)]

