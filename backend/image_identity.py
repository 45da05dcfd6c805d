"""What a task image is, remembered per URL, so that a warm click does not download the image again.

A click needs the image's embedding-cache key (the sha256 of its bytes) and its size as the browser shows
it (EXIF orientation applied), not its bytes: re-downloading a 4000x3000 JPEG per click only to hash it
costs more than the decoder. ``ImageIdentities`` remembers, per image reference, the ``Identity`` the last
download gave, and says when it may be used without the bytes:

* the host gave validators (``ETag``, or a ``Last-Modified`` at least a minute older than the response's
  ``Date``, RFC 9110's rule for a strong date): the next fetch is a conditional GET, and only a 304 reuses
  the identity; any 200 is a new download (Label Studio's ``/data/local-files`` sends an ETag of the
  file's mtime and size, and answers 304; S3 / GCS / Azure answer the presigned URL's conditional GET);
* the image is a file under ``LOCAL_FILES_ROOT``: reused while its ``stat`` (inode, size, mtime and
  ctime in nanoseconds) is unchanged;
* the image is a Label Studio upload (``/data/upload/<project>/<8 hex>-<name>`` on Label Studio's
  origin, or as a path): Label Studio names every upload with a fresh random prefix and never writes over
  one, so the URL names one content for good; it sends no validators for uploads. ``IMAGE_UPLOADS_IMMUTABLE
  =false`` turns this off (then uploads are downloaded on every click).

Anything else (no validators, data: URIs) is downloaded and hashed every time, as before. A reused identity
comes back as a ``RememberedImage``: the size and key without bytes; if the pixels are needed after all (the
embedding was evicted), it downloads them and refuses to decode bytes whose sha256 is not the remembered one
(the image changed after the check), so an embedding is never stored under another image's key.
"""

from __future__ import annotations

import email.utils
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from urllib.parse import urlsplit

import numpy as np

from backend.errors import ImageAccessError
from backend.image_decode import TaskImage, decode_image
from backend.lru import SizedLRU

__all__ = ["Identity", "ImageIdentities", "RememberedImage", "Revalidation", "file_stamp", "is_upload"]

# Label Studio's upload_name_generator: UPLOAD_DIR/<project id>/<uuid4()[:8]>-<file name>
_UPLOAD = re.compile(r"^/data/upload/\d+/[0-9a-f]{8}-[^/]+$")
# RFC 9110 8.8.2.2: a Last-Modified is a strong validator only if it is at least 60 s before the Date.
_STRONG_DATE_S = 60.0
# An ETag is kept (and sent back) only up to this length: hosts' tags are tens of characters (S3's an MD5 in
# quotes, Label Studio's mtime and size), and a host must not make each remembered image cost its header's
# 64 KiB. A longer tag counts as no validator: the image is downloaded on every click, as without the memo.
_MAX_ETAG = 256


@dataclass
class Revalidation:
    """One download's conditional headers in, and what the answer said out (``Downloader.get``).

    ``request``: If-None-Match / If-Modified-Since to send (empty: a plain GET that only records the
    validators). ``not_modified``: the host answered 304 (or the local file's stamp is unchanged).
    """

    request: dict[str, str] = field(default_factory=dict)
    not_modified: bool = False
    etag: str | None = None
    last_modified: str | None = None
    date: str | None = None
    stamp: tuple[int, ...] | None = None  # a local file's stat (file_stamp), when read from disk

    def record(self, headers: Mapping[str, str]) -> None:
        """Keep the validators of the final response's headers (a requests ``CaseInsensitiveDict``)."""
        get = headers.get
        self.etag, self.last_modified, self.date = get("ETag"), get("Last-Modified"), get("Date")

    def validators(self) -> dict[str, str]:
        """The conditional headers the recorded answer allows for the next fetch, {} when none are safe."""
        if self.etag and len(self.etag) <= _MAX_ETAG:
            return {"If-None-Match": self.etag}
        if self.last_modified and self.date:
            modified = _http_date(self.last_modified)
            date = _http_date(self.date)
            if modified is not None and date is not None and date - modified >= _STRONG_DATE_S:
                return {"If-Modified-Since": self.last_modified}
        return {}


@dataclass(frozen=True)
class Identity:
    """What serving a cached embedding needs from one image, and how to tell it is still current."""

    sha256: str
    size: tuple[int, int]
    content_type: str | None
    source: str
    validators: dict[str, str]  # conditional headers for the next fetch ({}: none)
    stamp: tuple[int, ...] | None  # local file stat
    immutable: bool  # a Label Studio upload: no check needed


class ImageIdentities:
    """A bounded LRU of ``Identity`` per image reference, shared by the request threads."""

    def __init__(self, entries: int = 10_000, immutable_uploads: bool = True) -> None:
        self.entries = int(entries)
        self.immutable_uploads = immutable_uploads
        self._known: SizedLRU[tuple[str, str], Identity] = SizedLRU(max(self.entries, 0), size=lambda _: 1)

    def recall(self, reference: str, scope: str) -> Identity | None:
        """The identity last seen for ``reference`` fetched through ``scope`` (the Label Studio URL)."""
        if self.entries <= 0:
            return None
        return self._known.get((scope, reference))

    def remember(self, reference: str, scope: str, image: TaskImage, revalidation: Revalidation,
                 upload: bool) -> None:
        """Keep what this download says about the image, if anything makes it safe to reuse; else forget."""
        if self.entries <= 0:
            return
        validators = revalidation.validators()
        immutable = upload and self.immutable_uploads
        if not (validators or revalidation.stamp or immutable):
            self.forget(reference, scope)
            return
        identity = Identity(image.sha256, image.size, image.content_type, image.source, validators,
                            revalidation.stamp, immutable)
        self._known.put((scope, reference), identity)

    def forget(self, reference: str, scope: str) -> None:
        self._known.pop((scope, reference))

    def __len__(self) -> int:
        return len(self._known)


@dataclass(frozen=True)
class RememberedImage(TaskImage):
    """A ``TaskImage`` known by its identity: key and size without the bytes (``data`` is empty).

    ``load`` downloads the bytes again (unconditionally) if pixels are needed; they must hash to
    ``sha256``, else ``forget`` is called and the request fails with a 502 asking to retry.
    """

    known_size: tuple[int, int] = (0, 0)
    load: Callable[[], bytes] | None = None
    forget: Callable[[], None] | None = None

    @cached_property
    def size(self) -> tuple[int, int]:
        return self.known_size

    @cached_property
    def array(self) -> np.ndarray:
        import hashlib

        assert self.load is not None
        data = self.load()
        if hashlib.sha256(data).hexdigest() != self.sha256:
            if self.forget is not None:
                self.forget()
            raise ImageAccessError(f"The image {self.source} changed while it was being read: try again.")
        return decode_image(data, self.source, self.max_pixels, self.content_type)


def remembered(identity: Identity, max_pixels: int, load: Callable[[], bytes],
               forget: Callable[[], None]) -> RememberedImage:
    return RememberedImage(data=b"", sha256=identity.sha256, source=identity.source,
                           content_type=identity.content_type, max_pixels=max_pixels,
                           known_size=identity.size, load=load, forget=forget)


def is_upload(reference: str, on_label_studio: bool) -> bool:
    """Whether the reference is a Label Studio upload (see module doc): on its origin, or a bare path."""
    if reference.startswith("/"):
        return bool(_UPLOAD.match(urlsplit(reference).path)) and not urlsplit(reference).query
    parts = urlsplit(reference)
    return on_label_studio and not parts.query and bool(_UPLOAD.match(parts.path))


def file_stamp(path: str | os.PathLike[str]) -> tuple[int, ...]:
    """What changes whenever a file's content may have: inode, device, size, mtime and ctime (ns)."""
    stat = os.stat(path)
    return stat.st_ino, stat.st_dev, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def _http_date(value: str) -> float | None:
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return parsed.timestamp()
