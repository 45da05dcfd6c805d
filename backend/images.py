"""Task image access: from a task's image reference to the RGB pixels the annotator sees.

Label Studio tasks point at their images in several ways, and each needs its own handling
(``label-studio-ml-protocol.md``, "Task image URLs and access"):

- ``/data/upload/<project>/<file>`` and ``/data/local-files/?d=<path>`` live on Label Studio and need its
  token. With ``local_files_root`` (a co-located install sharing Label Studio's disk) they are read from
  disk when the file is there, which skips an HTTP round trip per image.
- ``s3://``, ``gs://``, ``azure-blob://`` (and ``azure-spi://``) go through Label Studio's
  ``/tasks/<id>/presign/`` endpoint, which redirects to a signed URL on the cloud host.
- Other ``http(s)://`` URLs are downloaded directly; ``data:`` URIs are decoded in place.

The token only ever goes to the Label Studio origin (scheme, host and port), checked at every redirect
hop: the Label Studio token sent to public hosts is a known complaint about ML backends. Every failure
is an ``ImageError`` (the task or configuration must change, 422) or an ``ImageAccessError`` (the source
refused or could not be reached, 502) whose message tells the annotator or the admin what to fix.

Decoding applies the EXIF orientation, because the browser shows the image rotated and our masks must
match what the annotator sees, and converts every mode Pillow reads to HxWx3 uint8 RGB: transparency is
composited over white (what a viewer shows on a light page, and it gives transparent areas one flat
colour instead of whatever RGB values hide under alpha 0), 16-bit images are scaled to 8 bits.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import http.cookiejar
import io
import json
import logging
import os
import re
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, unquote_to_bytes, urlencode, urljoin, urlsplit, urlunsplit

import numpy as np
import requests
import urllib3.exceptions
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from backend.errors import ImageAccessError, ImageError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_BYTES = 100 * 1024 * 1024
# Pillow's own default for Image.MAX_IMAGE_PIXELS (about 89.5 megapixels, 268 MB once decoded to RGB).
# Pillow itself refuses images above twice its global limit before we can look at them.
DEFAULT_MAX_PIXELS = 89_478_485

# Storage URI schemes Label Studio resolves through /tasks/<id>/presign/ (S3, GCS, Azure Blob with an
# account key or a service principal).
CLOUD_SCHEMES = ("s3", "gs", "azure-blob", "azure-spi")

# What a browser shows in Label Studio's <Image> (plus TIFF, for 16-bit scientific images). Other Pillow
# plugins stay closed: EPS would run Ghostscript on task data, and exotic decoders widen the attack surface.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "AVIF", "ICO")

MAX_REDIRECTS = 5
# Refresh an access token this long before its `exp`, so it does not expire between check and use.
ACCESS_TOKEN_MARGIN_S = 30.0
# Lifetime assumed for an access token without `exp`; a 401 refreshes it earlier anyway.
ACCESS_TOKEN_DEFAULT_TTL_S = 300.0
CHUNK_BYTES = 64 * 1024
USER_AGENT = "sam-label-studio-backend (image fetcher)"

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}
_DOCKER_HINT = (
    " If the backend runs in Docker, 'localhost' there is the container itself: use an address the "
    "container can reach (the Label Studio service name in docker-compose, or http://host.docker.internal:8080)."
)


@dataclass(frozen=True)
class TaskImage:
    """One task image: its bytes, decoded only when pixels are needed.

    A click on an image whose embedding is cached needs the image's size (for the prompt's pixels) and the
    hash of its bytes (the cache key), not its pixels: decoding a 4000x3000 JPEG costs more than the decoder.
    """

    data: bytes
    sha256: str  # of the downloaded bytes: the embedding-cache key
    source: str  # the URL or path it came from, for messages and logs
    content_type: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS

    @cached_property
    def array(self) -> np.ndarray:
        """HxWx3 uint8 RGB as the browser shows it (EXIF orientation applied)."""
        return decode_image(self.data, self.source, self.max_pixels, self.content_type)

    @cached_property
    def size(self) -> tuple[int, int]:
        """(height, width) as the browser shows it, read from the header unless already decoded."""
        if "array" in self.__dict__:
            return self.array.shape[0], self.array.shape[1]
        return image_size(self.data, self.source, self.max_pixels, self.content_type)

    def decode(self) -> np.ndarray:
        return self.array


# --------------------------------------------------------------------------------------------------------
# URLs and tokens


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the default port filled in: the unit the token is scoped to."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        port = {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


def _redact(url: str, keep_query: bool = True) -> str:
    """The URL without credentials (user:password@), and without the query when it may hold a signature."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query if keep_query else "", ""))


def _jwt_claims(token: str) -> dict[str, Any] | None:
    """The claims of a JWT-shaped token (three base64url parts, JSON header and payload), unverified.

    Only the shape and `exp` / `token_type` matter here: Label Studio verifies the signature.
    """
    parts = token.split(".")
    if len(parts) != 3 or not all(parts[:2]):
        return None
    try:
        decoded = [json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))) for part in parts[:2]]
    except (ValueError, binascii.Error):
        return None
    header, claims = decoded
    if not isinstance(header, dict) or not isinstance(claims, dict):
        return None
    return claims


def _exp(claims: dict[str, Any] | None) -> float | None:
    value = (claims or {}).get("exp")
    return float(value) if isinstance(value, int | float) else None


class _LabelStudio:
    """Where Label Studio is and how to authenticate to it: the URL, the token and its kind.

    Legacy tokens are sent as ``Token <key>``. Personal access tokens are JWT refresh tokens, which Label
    Studio does not accept on data URLs: they are exchanged at ``/api/token/refresh/`` for a short-lived
    access token sent as ``Bearer``. The access token is cached until shortly before its ``exp`` and
    refreshed on a 401; a lock makes threads that need one at the same time share one refresh.
    """

    def __init__(self, url: str | None, token: str | None, url_source: str, token_source: str) -> None:
        self.url = url.strip().rstrip("/") if url else None
        self.url_source = url_source
        self.token = token.strip() if token else None
        self.token_source = token_source
        claims = _jwt_claims(self.token) if self.token else None
        if not self.token:
            self.kind = "none"
        elif claims is None:
            self.kind = "legacy"
        elif claims.get("token_type") == "access":
            self.kind = "access"
        else:
            self.kind = "refresh"
        self.token_exp = _exp(claims)
        self.origin = _origin(self.url) if self.url else None
        self._lock = threading.Lock()
        self._access: str | None = self.token if self.kind == "access" else None
        self._access_exp = self.token_exp or float("inf")

    def base_url(self, value: str) -> str:
        """The Label Studio URL for a relative image reference, or a clear error."""
        if not self.url:
            raise ImageError(
                f"The task image '{value}' must be fetched through Label Studio, but the backend does not know "
                "where Label Studio is: set LABEL_STUDIO_URL (e.g. http://label-studio:8080) and LABEL_STUDIO_API_KEY "
                "in the backend's environment."
            )
        if not _SCHEME.match(self.url) or _origin(self.url)[0] not in ("http", "https"):
            raise ImageError(
                f"The Label Studio URL '{self.url}' (from {self.url_source}) must start with http:// or "
                "https://, e.g. http://label-studio:8080."
            )
        return self.url

    def headers(self, session: requests.Session, deadline: float) -> dict[str, str]:
        """The Authorization header for a request to Label Studio (none without a token)."""
        if self.kind == "none":
            return {}
        if self.kind == "legacy":
            return {"Authorization": f"Token {self.token}"}
        return {"Authorization": f"Bearer {self._access_token(session, deadline)}"}

    def can_refresh(self) -> bool:
        return self.kind == "refresh"

    def forget_access_token(self, header: str) -> None:
        """Drop the cached access token that Label Studio just refused, unless another thread replaced it."""
        with self._lock:
            if self._access is not None and header == f"Bearer {self._access}":
                self._access = None

    def _access_token(self, session: requests.Session, deadline: float) -> str:
        with self._lock:
            if self._access is not None and time.time() < self._access_exp - ACCESS_TOKEN_MARGIN_S:
                return self._access
            if self.kind == "access":
                raise ImageAccessError(
                    f"The access token in {self.token_source} has expired and cannot be refreshed: set "
                    "LABEL_STUDIO_API_KEY to a personal access token (a refresh token, Label Studio > Account & "
                    "Settings > Personal Access Token) or to a legacy token."
                )
            if self.token_exp is not None and self.token_exp < time.time():
                expired = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.token_exp))
                raise ImageAccessError(
                    f"The personal access token in {self.token_source} expired on {expired}: create a new one in "
                    "Label Studio (Account & Settings > Personal Access Token) and set LABEL_STUDIO_API_KEY to it."
                )
            url = f"{self.base_url('/api/token/refresh/')}/api/token/refresh/"
            timeout = _remaining(deadline, url)
            try:
                response = session.post(url, json={"refresh": self.token}, timeout=timeout, allow_redirects=False)
            except requests.RequestException as exc:
                raise _request_failed(exc, url, timeout, self) from None
            with response:
                access = _refresh_answer(response, url, self)
            self._access = access
            self._access_exp = _exp(_jwt_claims(access)) or time.time() + ACCESS_TOKEN_DEFAULT_TTL_S
            log.info("exchanged the personal access token for an access token at %s", url)
            return access

    def refused(self, status: int, url: str) -> ImageAccessError:
        """The message for a 401/403 from Label Studio: which token was sent, and what to change."""
        where = f"Label Studio refused the image {url} (HTTP {status})"
        if self.kind == "none":
            message = (
                f"{where}: the backend has no Label Studio token. Set LABEL_STUDIO_API_KEY to a personal access "
                "token (Label Studio > Account & Settings > Personal Access Token) or a legacy token."
            )
        elif self.kind == "legacy":
            message = (
                f"{where} with the legacy token from {self.token_source} (sent as 'Authorization: Token ...'). "
                "Check the token belongs to a user of this Label Studio, and that legacy tokens are enabled "
                "(Organization > Access Token Settings, or LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true), or set "
                "LABEL_STUDIO_API_KEY to a personal access token instead."
            )
        else:
            message = (
                f"{where} with an access token obtained from the personal access token in {self.token_source} "
                "(sent as 'Authorization: Bearer ...'). Check the token belongs to a user with access to this "
                "project, and that personal access tokens are enabled (Organization > Access Token Settings)."
            )
        return ImageAccessError(message, upstream_status=status)


def _refresh_answer(response: requests.Response, url: str, ls: _LabelStudio) -> str:
    """The access token from a /api/token/refresh/ answer, or the error that says why there is none."""
    status = response.status_code
    if status in (401, 403):
        raise ImageAccessError(
            f"Label Studio refused the personal access token from {ls.token_source} at {url} (HTTP {status}): "
            "it is expired, revoked or from another Label Studio. Create a new one in Label Studio > Account & "
            "Settings > Personal Access Token, or use a legacy token."
        )
    if status == 404:
        raise ImageAccessError(
            f"Label Studio at {ls.url} has no token refresh endpoint ({url} answered 404): this version does "
            "not know personal access tokens. Set LABEL_STUDIO_API_KEY to the legacy token (Account & Settings)."
        )
    if status != 200:
        raise ImageAccessError(f"Label Studio answered HTTP {status} when refreshing the access token at {url}.")
    try:
        access = response.json().get("access")
    except (ValueError, AttributeError):
        access = None
    if not isinstance(access, str) or not access:
        raise ImageAccessError(f"Label Studio's answer at {url} has no access token: is {ls.url} Label Studio?")
    return access


# --------------------------------------------------------------------------------------------------------
# HTTP failures


def _remaining(deadline: float, url: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise ImageAccessError(f"Timed out downloading {url}: the image took longer than the download limit.")
    return left


def _is_timeout(exc: BaseException) -> bool:
    if isinstance(exc, requests.Timeout):
        return True
    # requests reports a read timeout in the middle of a streamed body as a ConnectionError.
    return any(isinstance(arg, urllib3.exceptions.TimeoutError) for arg in getattr(exc, "args", ()))


def _request_failed(exc: requests.RequestException, url: str, timeout: float, ls: _LabelStudio | None) -> ImageError:
    """Translate a requests exception into a message about the URL, not about the code."""
    host = urlsplit(url).hostname or ""
    is_label_studio = ls is not None and ls.origin == _origin(url)
    if _is_timeout(exc):
        return ImageAccessError(
            f"Timed out after {timeout:.1f} s downloading {url}: the host did not answer in time. Check it is "
            "reachable from the backend, or raise the download limit (IMAGE_TIMEOUT_S)."
        )
    if isinstance(exc, requests.exceptions.SSLError):
        return ImageAccessError(f"TLS error connecting to {url}: {exc}. Check the certificate of {host}.")
    if isinstance(exc, requests.ConnectionError):
        hint = _DOCKER_HINT if host in _LOCAL_HOSTS or host.startswith("127.") else ""
        what = f"Label Studio at {ls.url} (from {ls.url_source})" if is_label_studio and ls else url
        if is_label_studio:
            hint += " Set LABEL_STUDIO_URL to the address the backend can reach Label Studio at."
        reason = "the host name does not resolve" if "NameResolution" in repr(exc) else "connection refused or reset"
        return ImageAccessError(f"Could not connect to {what} ({reason}).{hint}")
    if isinstance(exc, requests.exceptions.InvalidURL | requests.exceptions.MissingSchema |
                  requests.exceptions.InvalidSchema):
        return ImageError(f"The image URL {url} is not a valid URL: {exc}")
    return ImageAccessError(f"Downloading {url} failed: {exc}")


def _read_failed(exc: Exception, url: str, timeout: float) -> ImageAccessError:
    """A failure in the middle of a body: a stalled, cut or badly encoded download."""
    if _is_timeout(exc):
        return ImageAccessError(
            f"Timed out after {timeout:.1f} s downloading {url}: the host stopped sending. Check it is reachable "
            "from the backend, or raise the download limit (IMAGE_TIMEOUT_S)."
        )
    if isinstance(exc, urllib3.exceptions.DecodeError):
        return ImageAccessError(f"The download of {url} could not be decompressed (bad Content-Encoding): {exc}")
    return ImageAccessError(f"The connection broke while downloading {url}: {exc}")


def _status_error(status: int, url: str, ls: _LabelStudio | None, signed: bool) -> ImageError:
    if ls is not None and ls.origin == _origin(url) and status in (401, 403):
        return ls.refused(status, url)
    if status in (401, 403):
        why = (
            "the signed URL Label Studio made has expired or the storage credentials in Label Studio are wrong"
            if signed
            else "the URL needs credentials, and the backend sends its Label Studio token to Label Studio only"
        )
        return ImageAccessError(f"The image host refused {url} (HTTP {status}): {why}.", upstream_status=status)
    if status == 404:
        hint = ""
        if "/data/local-files" in url:
            hint = (
                " Check the file exists under Label Studio's LOCAL_FILES_DOCUMENT_ROOT and that local files "
                "serving is enabled (LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true)."
            )
        elif "/presign/" in url:
            hint = " Check the project has a source cloud storage that contains this file."
        return ImageAccessError(f"The image was not found (HTTP 404): {url}.{hint}", upstream_status=404)
    return ImageAccessError(f"The image host answered HTTP {status} for {url}.", upstream_status=status)


# --------------------------------------------------------------------------------------------------------
# Decoding


def decode_image(data: bytes, source: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                 content_type: str | None = None) -> np.ndarray:
    """Image bytes -> HxWx3 uint8 RGB as the browser shows them (EXIF orientation applied)."""
    with _open_image(data, source, max_pixels, content_type) as img:
        return _to_rgb(ImageOps.exif_transpose(img))


# EXIF orientations that turn the stored image by 90 degrees (the browser swaps width and height).
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def image_size(data: bytes, source: str, max_pixels: int = DEFAULT_MAX_PIXELS,
               content_type: str | None = None) -> tuple[int, int]:
    """(height, width) of the image as the browser shows it, from the header alone (no decompression)."""
    with _open_image(data, source, max_pixels, content_type) as img:
        width, height = img.size
        if img.getexif().get(ExifTags.Base.Orientation, 1) in _TRANSPOSING_ORIENTATIONS:
            width, height = height, width
        return height, width


@contextlib.contextmanager
def _open_image(data: bytes, source: str, max_pixels: int, content_type: str | None) -> Iterator[Image.Image]:
    """The opened image, with every decoding failure turned into an ImageError that names the image.

    The pixel count is checked on the header, before anything is decompressed: a few-KB PNG can claim
    gigapixels (a decompression bomb).
    """
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(_too_many_pixels(source, width, height, max_pixels))
            yield img
    except Image.DecompressionBombError as exc:
        size = re.findall(r"\d+", str(exc))
        pixels = f" ({size[0]} pixels)" if size else ""
        raise ImageError(
            f"The image {source} is too large{pixels}: the limit is {max_pixels} pixels (IMAGE_MAX_PIXELS), "
            "and Pillow's own limit is twice Image.MAX_IMAGE_PIXELS."
        ) from None
    except UnidentifiedImageError:
        raise ImageError(_not_an_image(data, source, content_type)) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise ImageError(f"The image {source} could not be decoded (truncated or corrupt file?): {exc}") from None


def _too_many_pixels(source: str, width: int, height: int, max_pixels: int) -> str:
    return (
        f"The image {source} is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels} "
        "(IMAGE_MAX_PIXELS): downscale it, or raise the limit if the machine has the memory."
    )


def _not_an_image(data: bytes, source: str, content_type: str | None) -> str:
    head = data[:64].decode("utf-8", "replace").strip().lower()
    message = f"{source} is not an image the backend can read"
    if content_type:
        message += f" (Content-Type {content_type})"
    if head.startswith(("<!doctype html", "<html")) or "html" in (content_type or ""):
        message += ": it is a web page, often a login or error page; check the URL points at the image file itself"
    elif not data:
        message += ": it is empty"
    return f"{message}. Readable formats: {', '.join(IMAGE_FORMATS)}."


_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Any Pillow mode -> HxWx3 uint8 RGB; see the module docstring for transparency and 16 bits."""
    if img.mode in _SIXTEEN_BIT or img.mode in ("I", "F"):
        gray = _to_8bit(np.asarray(img), img.mode)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    if img.mode != "RGB":
        try:
            img = img.convert("RGB")
        except ValueError as exc:
            raise ImageError(f"Images in colour mode {img.mode} are not supported: {exc}") from None
    return np.array(img, dtype=np.uint8)


def _to_8bit(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit (and 32-bit integer / float) gray -> 8 bits.

    16-bit modes scale 0..65535 to 0..255 (v / 257, rounded). 32-bit integer and float images are taken as
    16-bit when any value exceeds 255 (16-bit PNG / TIFF data Pillow widened); float images within 0..1 as
    fractions of white; anything else as 8-bit already.
    """
    values = np.nan_to_num(values.astype(np.float64))
    peak = values.max() if values.size else 0.0
    if mode in _SIXTEEN_BIT or peak > 255:
        values = np.clip(values, 0, 65535) / 257.0
    elif mode == "F" and peak <= 1.0:
        values = values * 255.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _decode_data_uri(value: str, max_bytes: int) -> bytes:
    header, comma, payload = value.partition(",")
    if not comma:
        raise ImageError("The task image is a data: URI without a ',' before its data.")
    if header.lower().endswith(";base64"):
        payload = "".join(unquote(payload).split())
        if len(payload) * 3 // 4 > max_bytes:
            raise ImageError(_too_big("The data: URI image", max_bytes))
        try:
            return base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("The task image is a data: URI whose base64 data is invalid.") from None
    data = unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise ImageError(_too_big("The data: URI image", max_bytes))
    return data


def _too_big(what: str, max_bytes: int) -> str:
    return (
        f"{what} is larger than the limit of {max_bytes} bytes ({max_bytes / 2**20:.1f} MiB, IMAGE_MAX_MB): "
        "use a smaller file or raise the limit."
    )


# --------------------------------------------------------------------------------------------------------
# The fetcher


class ImageFetcher:
    """Fetches and decodes task images; one per app, shared by all request threads.

    The Label Studio URL and token come from the environment (explicit configuration) or from POST /setup
    (``set_label_studio``); the environment wins field by field, because Label Studio's own idea of its
    hostname (often http://localhost:8080) is frequently wrong from where the backend runs.
    """

    def __init__(
        self,
        *,
        label_studio_url: str | None = None,
        label_studio_token: str | None = None,
        local_files_root: str | os.PathLike[str] | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if timeout_s <= 0 or max_bytes <= 0 or max_pixels <= 0:
            raise ValueError("timeout_s, max_bytes and max_pixels must be positive")
        if label_studio_url and not re.match(r"^https?://[^/]", label_studio_url.strip(), re.IGNORECASE):
            raise ValueError(
                f"LABEL_STUDIO_URL must start with http:// or https:// (got {label_studio_url!r}), "
                "e.g. http://label-studio:8080"
            )
        self.root: Path | None = None
        if local_files_root:
            root = Path(os.path.abspath(local_files_root))
            if root == Path(root.anchor):
                raise ValueError("LOCAL_FILES_ROOT must not be the file system root: it would expose every file")
            self.root = root
        self.timeout_s = float(timeout_s)
        self.max_bytes = int(max_bytes)
        self.max_pixels = int(max_pixels)
        self._env_url = label_studio_url.strip() if label_studio_url else None
        self._env_token = label_studio_token.strip() if label_studio_token else None
        self._setup: tuple[str | None, str | None] | None = None
        self._lock = threading.Lock()
        self._ls = self._make_label_studio(None, None)
        if self._env_token and not self._env_url:
            log.warning(
                "LABEL_STUDIO_API_KEY is set without LABEL_STUDIO_URL: the token will go to whatever hostname "
                "POST /setup names. Set LABEL_STUDIO_URL so it only goes where you say."
            )
        self.session = requests.Session()
        # Cookies from one host must never ride along to another, and Label Studio needs none.
        self.session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        self.session.headers["User-Agent"] = USER_AGENT
        adapter = requests.adapters.HTTPAdapter(pool_connections=16, pool_maxsize=32, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    @classmethod
    def from_settings(cls, settings: Any) -> ImageFetcher:
        """Build from ``backend.config.Settings`` (attributes named after the environment variables)."""
        return cls(
            label_studio_url=settings.label_studio_url,
            label_studio_token=settings.label_studio_api_key,
            local_files_root=settings.local_files_root,
            timeout_s=settings.image_timeout_s,
            max_bytes=settings.image_max_bytes,
            max_pixels=settings.image_max_pixels,
        )

    def close(self) -> None:
        self.session.close()

    def _make_label_studio(self, url: str | None, token: str | None) -> _LabelStudio:
        return _LabelStudio(
            url=self._env_url or url,
            token=self._env_token or token,
            url_source="LABEL_STUDIO_URL" if self._env_url else "the hostname Label Studio sent to /setup",
            token_source="LABEL_STUDIO_API_KEY" if self._env_token else "the access_token Label Studio sent to /setup",
        )

    def set_label_studio(self, url: str | None, token: str | None) -> None:
        """Take Label Studio's hostname and access token from POST /setup.

        Called after every /health check; the cached access token survives unless the URL or token in
        effect changes (values the environment overrides do not count).
        """
        with self._lock:
            if (url, token) == self._setup:
                return
            self._setup = (url, token)
            candidate = self._make_label_studio(url, token)
            if (candidate.url, candidate.token) != (self._ls.url, self._ls.token):
                self._ls = candidate

    # ----------------------------------------------------------------------------------------------------

    def fetch(self, task: dict, value_key: str) -> TaskImage:
        """The image of ``task["data"][value_key]`` (the ``$image`` variable of the label config)."""
        value = self._image_reference(task, value_key)
        ls = self._ls
        deadline = time.monotonic() + self.timeout_s
        scheme_match = _SCHEME.match(value)
        scheme = scheme_match.group(1).lower() if scheme_match else None
        content_type = None
        if value[:5].lower() == "data:":
            data = _decode_data_uri(value, self.max_bytes)
            source = f"{value.partition(',')[0]},... ({len(data)} bytes)"
        elif scheme in CLOUD_SCHEMES:
            source = value
            presign = self._presign_url(task, value, ls)
            data, content_type = self._download(presign, ls, deadline, display=value)
        elif scheme in ("http", "https"):
            source = _redact(value)
            local = self._local_file(value, ls) if ls.origin == _origin(value) else None
            if local is not None:
                data = self._read_file(local, source)
            else:
                data, content_type = self._download(value, ls, deadline)
        elif scheme is not None:
            raise ImageError(
                f"The task image '{_redact(value)}' uses the scheme '{scheme}://', which the backend cannot "
                f"download: use http(s)://, a Label Studio /data/... path, or one of {', '.join(CLOUD_SCHEMES)}."
            )
        elif value.startswith("//"):
            raise ImageError(
                f"The task image '{_redact(value)}' has no scheme (a protocol-relative URL): write it with "
                "http:// or https://."
            )
        elif value.startswith("/"):
            source = value
            local = self._local_file(value, ls)
            if local is not None:
                data = self._read_file(local, source)
            else:
                data, content_type = self._download(ls.base_url(value) + value, ls, deadline)
        else:
            guess = f" Did you mean http://{value}?" if re.match(r"^[\w.-]+\.\w+(:\d+)?/", value) else ""
            raise ImageError(
                f"The task image '{value}' is not a URL: it has no scheme. Use http(s)://host/path, a Label "
                f"Studio path (/data/upload/..., /data/local-files/?d=...), s3://... or a data: URI.{guess}"
            )
        image = TaskImage(data=data, sha256=hashlib.sha256(data).hexdigest(), source=source,
                          content_type=content_type, max_pixels=self.max_pixels)
        image.size  # noqa: B018 - reads the header: a file that is not an image fails here, not on first use
        return image

    def label_studio_json(self, path: str, params: dict[str, Any] | None = None) -> Any:
        """GET a Label Studio API path as JSON, with the same URL, token and limits as task images.

        ``sam-backend warm`` lists a project's tasks and reads its label config this way, so a token that
        works for images works for the API, with the same messages when it does not.
        """
        ls = self._ls
        url = ls.base_url(path) + path + (f"?{urlencode(params)}" if params else "")
        data, _ = self._download(url, ls, time.monotonic() + self.timeout_s)
        try:
            return json.loads(data)
        except ValueError:
            raise ImageAccessError(f"Label Studio answered {url} with something that is not JSON: is "
                                   f"{ls.url} (from {ls.url_source}) really Label Studio?") from None

    @staticmethod
    def _image_reference(task: dict, value_key: str) -> str:
        data = task.get("data") if isinstance(task, dict) else None
        task_id = task.get("id") if isinstance(task, dict) else None
        if not isinstance(data, dict):
            raise ImageError(f"Task {task_id} has no 'data' object, so it has no image.")
        key = value_key.lstrip("$")
        if key not in data:
            keys = ", ".join(sorted(map(str, data))) or "none"
            raise ImageError(
                f"Task {task_id} has no data field '{key}', which the label config's <Image value=\"${key}\"> "
                f"reads. Its data fields are: {keys}. Fix the task data or the label config."
            )
        value = data[key]
        if not isinstance(value, str) or not value.strip():
            raise ImageError(f"Task {task_id}'s data field '{key}' should be an image URL, not {value!r:.80}.")
        return value.strip()

    def _presign_url(self, task: dict, uri: str, ls: _LabelStudio) -> str:
        task_id = task.get("id")
        if isinstance(task_id, str) and task_id.isdigit():
            task_id = int(task_id)
        if not isinstance(task_id, int) or isinstance(task_id, bool):
            raise ImageError(
                f"The task image {uri} is in cloud storage, which Label Studio signs per task, but the task "
                "has no id."
            )
        fileuri = base64.urlsafe_b64encode(uri.encode()).decode()
        return f"{ls.base_url(uri)}/tasks/{task_id}/presign/?fileuri={fileuri}"

    # ----------------------------------------------------------------------------------------------------
    # Disk

    def _local_file(self, url: str, ls: _LabelStudio) -> Path | None:
        """The file behind a Label Studio /data/... URL under ``local_files_root``, if it exists there.

        ``/data/local-files/?d=<path>`` maps to ``<root>/<path>`` (the root is Label Studio's
        LOCAL_FILES_DOCUMENT_ROOT); ``/data/upload/<project>/<file>`` to ``<root>/upload/...`` or
        ``<root>/media/upload/...`` (the root is Label Studio's data directory).
        """
        if self.root is None:
            return None
        parts = urlsplit(url)
        path = unquote(parts.path)
        if path.rstrip("/") == "/data/local-files":
            values = parse_qs(parts.query, keep_blank_values=True).get("d")
            relative = values[-1] if values else ""
            if not relative:
                raise ImageError(f"The task image {url} is a Label Studio local file URL without a ?d= path.")
            candidates = [relative]
        elif path.startswith("/data/upload/"):
            relative = path[len("/data/upload/"):]
            candidates = [f"upload/{relative}", f"media/upload/{relative}"]
        else:
            return None
        for candidate in candidates:
            full = Path(os.path.abspath(os.path.join(self.root, candidate.lstrip("/"))))
            if os.path.commonpath([full, self.root]) != str(self.root):
                raise ImageError(f"The task image path {relative!r} points outside LOCAL_FILES_ROOT.")
            if full.is_file():
                return full
        return None

    def _read_file(self, path: Path, source: str) -> bytes:
        try:
            size = path.stat().st_size
            if size > self.max_bytes:
                raise ImageError(_too_big(f"The image {source}", self.max_bytes))
            return path.read_bytes()
        except OSError as exc:
            raise ImageError(f"The image {source} could not be read from {path}: {exc.strerror}.") from None

    # ----------------------------------------------------------------------------------------------------
    # HTTP

    def _download(self, url: str, ls: _LabelStudio, deadline: float,
                  display: str | None = None) -> tuple[bytes, str | None]:
        """GET with redirects followed by hand, the token attached only on hops to Label Studio."""
        signed = False
        retried = False
        hops = 0
        while True:
            to_label_studio = ls.origin is not None and _origin(url) == ls.origin
            shown = _redact(url, keep_query=not signed)
            headers = ls.headers(self.session, deadline) if to_label_studio else {}
            timeout = _remaining(deadline, display or shown)
            try:
                response = self.session.get(url, headers=headers, stream=True, allow_redirects=False,
                                            timeout=timeout)
            except requests.RequestException as exc:
                raise _request_failed(exc, shown, timeout, ls) from None
            with response:
                status = response.status_code
                if status in (301, 302, 303, 307, 308) and "Location" in response.headers:
                    hops += 1
                    if hops > MAX_REDIRECTS:
                        raise ImageAccessError(f"Too many redirects downloading {display or shown}.")
                    next_url = urljoin(url, response.headers["Location"])
                    # A redirect from Label Studio to another host is a signed URL: keep its query out of messages.
                    signed = signed or (to_label_studio and _origin(next_url) != ls.origin)
                    url = next_url
                    continue
                if status == 401 and to_label_studio and ls.can_refresh() and not retried:
                    ls.forget_access_token(headers.get("Authorization", ""))
                    retried = True
                    continue
                if status != 200:
                    raise _status_error(status, shown, ls, signed)
                return self._read_body(response, display or shown, deadline, timeout), response.headers.get(
                    "Content-Type")

    def _read_body(self, response: requests.Response, shown: str, deadline: float, timeout: float) -> bytes:
        """The body, streamed: refused past ``max_bytes`` or past the deadline, whatever the server claims.

        ``read1`` returns what has arrived (up to a chunk) instead of waiting for a full chunk, so a host
        that trickles bytes meets the deadline check between reads.
        """
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            raise ImageError(_too_big(f"The image {shown}", self.max_bytes))
        raw = response.raw
        read = raw.read1 if hasattr(raw, "read1") else raw.read
        chunks = []
        total = 0
        while True:
            try:
                chunk = read(CHUNK_BYTES, decode_content=True)
            except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
                raise _read_failed(exc, shown, timeout) from None
            if not chunk:
                return b"".join(chunks)
            total += len(chunk)
            if total > self.max_bytes:
                raise ImageError(_too_big(f"The image {shown}", self.max_bytes))
            if time.monotonic() > deadline:
                raise ImageAccessError(
                    f"Timed out after {self.timeout_s:.1f} s downloading {shown}: it arrives too slowly. "
                    "Raise the download limit (IMAGE_TIMEOUT_S) or serve the image closer to the backend."
                )
            chunks.append(chunk)
