"""Task image fetching: from a task's image reference to the image's bytes.

Label Studio tasks point at their images in several ways, and each needs its own handling
(``docs/label-studio-protocol.md``, "Task image URLs and access"):

- ``/data/upload/<project>/<file>`` and ``/data/local-files/?d=<path>`` live on Label Studio and need its
  token. With ``local_files_root`` (a co-located install sharing Label Studio's disk) they are read from
  disk when the file is there, which skips an HTTP round trip per image.
- ``s3://``, ``gs://``, ``azure-blob://`` (and ``azure-spi://``) go through Label Studio's
  ``/tasks/<id>/presign/`` endpoint, which redirects to a signed URL on the cloud host.
- Other ``http(s)://`` URLs are downloaded directly; ``data:`` URIs are decoded in place.

Where Label Studio is and which token it takes is the ``LabelStudioClient``'s business
(``backend.label_studio``); the bounded download, and the token going to Label Studio's origin only, are
``backend.http_download``'s; the pixels are ``backend.image_decode``'s. Every failure is an ``ImageError``
(the task or configuration must change, 422) or an ``ImageAccessError`` (the source refused or could not
be reached, 502) whose message tells the annotator or the admin what to fix.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, unquote_to_bytes, urlsplit

from backend.errors import ImageError
from backend.http_download import Downloaded, Downloader, redact, too_big, url_scheme
from backend.image_decode import TaskImage
from backend.image_identity import ImageIdentities, Revalidation, file_stamp, is_upload, remembered
from backend.label_studio import LabelStudioClient, LabelStudioClients
from backend.limits import IMAGE_MAX_BYTES, IMAGE_MAX_PIXELS, IMAGE_TIMEOUT_S
from backend.urls import DEFAULT_IMAGE_HOSTS, HostPolicy, UnsafeUrl

if TYPE_CHECKING:
    from backend.config import Settings

# Storage URI schemes Label Studio resolves through /tasks/<id>/presign/ (S3, GCS, Azure Blob with an
# account key or a service principal).
CLOUD_SCHEMES = ("s3", "gs", "azure-blob", "azure-spi")


class ImageFetcher:
    """Fetches task images; one per app, shared by all request threads.

    ``label_studio`` is this process's Label Studio client, for request threads: from the environment, or
    from POST /setup (``set_label_studio``). A queued job fetches with a client of its own
    (``label_studio_for``), so no job changes what request threads use.
    """

    def __init__(
        self,
        *,
        label_studio_url: str | None = None,
        label_studio_token: str | None = None,
        local_files_root: str | os.PathLike[str] | None = None,
        timeout_s: float = IMAGE_TIMEOUT_S,
        max_bytes: int = IMAGE_MAX_BYTES,
        max_pixels: int = IMAGE_MAX_PIXELS,
        image_hosts: HostPolicy | str = DEFAULT_IMAGE_HOSTS,
        identities: ImageIdentities | None = None,
        use_proxies: bool = False,
    ) -> None:
        if timeout_s <= 0 or max_bytes <= 0 or max_pixels <= 0:
            raise ValueError("timeout_s, max_bytes and max_pixels must be positive")
        self.http = Downloader(timeout_s, max_bytes, image_hosts, use_proxies)
        self.label_studio_clients = LabelStudioClients(label_studio_url, label_studio_token, self.http)
        self.root: Path | None = None
        if local_files_root:
            root = Path(os.path.realpath(local_files_root))
            if root == Path(root.anchor):
                raise ValueError("LOCAL_FILES_ROOT must not be the file system root: it would expose every file")
            self.root = root
        self.timeout_s = float(timeout_s)
        self.max_bytes = int(max_bytes)
        self.max_pixels = int(max_pixels)
        self.label_studio: LabelStudioClient = self.label_studio_clients.client()
        self.identities = identities if identities is not None else ImageIdentities(0)

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageFetcher:
        """Build from the backend's settings (each attribute named after its environment variable)."""
        return cls(
            label_studio_url=settings.label_studio_url,
            label_studio_token=settings.label_studio_api_key,
            local_files_root=settings.local_files_root,
            timeout_s=settings.image_timeout_s,
            max_bytes=settings.image_max_bytes,
            max_pixels=settings.image_max_pixels,
            image_hosts=settings.sam_image_hosts,
            identities=ImageIdentities(settings.image_identities, settings.image_uploads_immutable),
            use_proxies=settings.sam_image_proxy,
        )

    def close(self) -> None:
        self.http.close()

    def set_label_studio(self, url: str | None, token: str | None) -> None:
        """Take Label Studio's hostname and access token from POST /setup.

        Called after every /health check; the cached access token survives unless the URL or token in
        effect changes (values the environment overrides do not count).
        """
        self.label_studio = self.label_studio_clients.client(url, token)

    def label_studio_for(self, url: str | None, token: str | None) -> LabelStudioClient:
        """The client for a queued job, from the URL and token its producer knew (the environment wins).

        A process that never received Label Studio's /setup (``sam-backend worker``) can fetch that way. A
        job that carries neither uses this process's client.
        """
        if not token and (not url or url.strip().rstrip("/") == self.label_studio.url):
            return self.label_studio  # this process's client: its token (environment or /setup) included
        return self.label_studio_clients.client(url, token)

    # ----------------------------------------------------------------------------------------------------

    def fetch(self, task: dict[str, Any], value_key: str,
              label_studio: LabelStudioClient | None = None) -> TaskImage:
        """The image of ``task["data"][value_key]`` (the ``$image`` variable of the label config).

        ``label_studio`` is the client to fetch Label Studio's images with; None: this process's. An image
        whose identity is remembered and still current (``backend.image_identity``) comes back without its
        bytes, as a ``RememberedImage``.
        """
        value = self._image_reference(task, value_key)
        ls = label_studio if label_studio is not None else self.label_studio
        if value[:5].lower() == "data:" or len(value) > _MAX_REMEMBERED_REFERENCE:
            image = self._fetch(task, value, ls, Revalidation())
            assert image is not None
            return image
        scope = ls.url or ""
        known = self.identities.recall(value, scope)

        def load() -> bytes:
            image = self._fetch(task, value, ls, Revalidation())
            assert image is not None
            return image.data

        def forget() -> None:
            self.identities.forget(value, scope)

        if known is not None and known.immutable:
            return remembered(known, self.max_pixels, load, forget)
        revalidation = Revalidation(request=dict(known.validators) if known else {},
                                    stamp=known.stamp if known else None)
        image = self._fetch(task, value, ls, revalidation)
        if image is None:
            assert known is not None
            return remembered(known, self.max_pixels, load, forget)
        self.identities.remember(value, scope, image, revalidation, is_upload(value, ls.is_label_studio(value)))
        return image

    def _fetch(self, task: dict[str, Any], value: str, ls: LabelStudioClient,
               revalidation: Revalidation) -> TaskImage | None:
        """The image's bytes by the route its reference takes; None when ``revalidation`` says unchanged."""
        deadline = self.http.deadline()
        scheme = url_scheme(value)
        content_type = None
        untrusted = False  # a URL the task names on a host the admin did not name: failures all read alike
        if value[:5].lower() == "data:":
            data = _decode_data_uri(value, self.max_bytes)
            source = f"{value.partition(',')[0]},... ({len(data)} bytes)"
        elif scheme in CLOUD_SCHEMES:
            source = value
            presign = ls.presign_url(task.get("id"), value)
            data, content_type = self.http.get(presign, ls, deadline, display=value, revalidation=revalidation)
        elif scheme in ("http", "https"):
            source = redact(value)
            local = self._local_file(value) if ls.is_label_studio(value) else None
            if local is not None:
                data = self._read_local(local, source, revalidation)
            else:
                untrusted = not ls.is_label_studio(value) and not self.http.trusts(value)
                data, content_type = self._download(value, ls, deadline, untrusted, source, revalidation)
        elif scheme is not None:
            raise ImageError(
                f"The task image '{redact(value)}' uses the scheme '{scheme}://', which the backend cannot "
                f"download: use http(s)://, a Label Studio /data/... path, or one of {', '.join(CLOUD_SCHEMES)}."
            )
        elif value.startswith("//"):
            raise ImageError(
                f"The task image '{redact(value)}' has no scheme (a protocol-relative URL): write it with "
                "http:// or https://."
            )
        elif value.startswith("/"):
            source = value
            local = self._local_file(value)
            if local is not None:
                data = self._read_local(local, source, revalidation)
            else:
                data, content_type = self.http.get(ls.base_url(value) + value, ls, deadline, revalidation=revalidation)
        else:
            guess = f" Did you mean http://{value}?" if re.match(r"^[\w.-]+\.\w+(:\d+)?/", value) else ""
            raise ImageError(
                f"The task image '{value}' is not a URL: it has no scheme. Use http(s)://host/path, a Label "
                f"Studio path (/data/upload/..., /data/local-files/?d=...), s3://... or a data: URI.{guess}"
            )
        if revalidation.not_modified:
            return None
        image = TaskImage(data=data, sha256=hashlib.sha256(data).hexdigest(), source=source,
                          content_type=content_type, max_pixels=self.max_pixels)
        try:
            image.size  # noqa: B018 - reads the header: a file that is not an image fails here, not on first use
        except ImageError as error:
            raise (_unusable(source, error) if untrusted else error) from None
        return image

    def _download(self, url: str, ls: LabelStudioClient, deadline: float, untrusted: bool,
                  source: str, revalidation: Revalidation | None = None) -> Downloaded:
        """``Downloader.get``; for an untrusted host every failure but a malformed URL gets one message."""
        try:
            return self.http.get(url, ls, deadline, revalidation=revalidation)
        except UnsafeUrl:
            raise
        except ImageError as error:
            if untrusted:
                raise _unusable(source, error) from None
            raise

    @staticmethod
    def _image_reference(task: dict[str, Any], value_key: str) -> str:
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

    # ----------------------------------------------------------------------------------------------------
    # Disk

    def _local_file(self, url: str) -> Path | None:
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
            if "\0" in candidate:
                raise ImageError(f"The task image path {relative!r} is not a file name.")
            # realpath resolves symbolic links first: a link under the root that points elsewhere is outside it.
            full = Path(os.path.realpath(os.path.join(self.root, candidate.lstrip("/"))))
            if os.path.commonpath([full, self.root]) != str(self.root):
                raise ImageError(f"The task image path {relative!r} points outside LOCAL_FILES_ROOT.")
            if full.is_file():
                return full
        return None

    def _read_local(self, path: Path, source: str, revalidation: Revalidation) -> bytes:
        """A file under the local root; nothing read when its stamp is the one remembered."""
        try:
            stamp = file_stamp(path)
        except OSError:
            stamp = None
        if stamp is not None and stamp == revalidation.stamp:
            revalidation.not_modified = True
            return b""
        data = self._read_file(path, source)
        revalidation.stamp = stamp if stamp is not None and stamp == _stamp_or_none(path) else None
        return data

    def _read_file(self, path: Path, source: str) -> bytes:
        try:
            size = path.stat().st_size
            if size > self.max_bytes:
                raise ImageError(too_big(f"The image {source}", self.max_bytes))
            return path.read_bytes()
        except OSError as exc:
            raise ImageError(f"The image {source} could not be read from {path}: {exc.strerror}.") from None


def _unusable(source: str, error: ImageError) -> ImageError:
    """One message for every way an untrusted host can fail, so that anonymous callers cannot tell a closed
    port from a refused host or a page that is not an image; the reason goes to the log line only."""
    return ImageError(
        f"The image {source} could not be used: its host is not among the allowed image hosts (SAM_IMAGE_HOSTS), "
        "could not be reached in time, answered with an error, or did not send an image. The backend's log "
        "names the reason: fix the URL, or have the backend's admin allow the host in SAM_IMAGE_HOSTS.",
        detail=error.message,
    )


# References longer than this (long signed URLs are ~2 KB) are not remembered: the key would cost more than it saves.
_MAX_REMEMBERED_REFERENCE = 4096


def _stamp_or_none(path: Path) -> tuple[int, ...] | None:
    """The file's stamp after reading it: a file that changed while being read is not remembered."""
    try:
        return file_stamp(path)
    except OSError:
        return None


def _decode_data_uri(value: str, max_bytes: int) -> bytes:
    header, comma, payload = value.partition(",")
    if not comma:
        raise ImageError("The task image is a data: URI without a ',' before its data.")
    if header.lower().endswith(";base64"):
        payload = "".join(unquote(payload).split())
        if len(payload) * 3 // 4 > max_bytes:
            raise ImageError(too_big("The data: URI image", max_bytes))
        try:
            return base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("The task image is a data: URI whose base64 data is invalid.") from None
    data = unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise ImageError(too_big("The data: URI image", max_bytes))
    return data
