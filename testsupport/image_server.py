"""Real HTTP stand-ins for Label Studio's image endpoints and for a cloud storage host.

``FakeLabelStudio`` behaves like Label Studio 1.23 where the image fetcher meets it:

- ``/data/upload/<project>/<file>`` and ``/data/local-files/?d=<path>`` answer 401 without
  ``Authorization: Token <legacy token>`` (only while legacy tokens are enabled) or
  ``Authorization: Bearer <access token it issued, not expired>``;
- ``POST /api/token/refresh/`` ``{"refresh": <personal access token>}`` -> ``{"access": <JWT>}``; the
  personal access token is a JWT refresh token with ``exp``;
- ``GET /tasks/<id>/presign/?fileuri=<base64url(uri)>`` (authenticated) -> 302 to a signed URL on the
  ``CloudStorage`` server.

``CloudStorage`` is any other host: it serves signed object URLs and plain public URLs, and answers 400
(and records a leak) whenever a request carries an ``Authorization`` header, because the Label Studio
token must never reach it. It also has a slow endpoint, a trickling one, one that drips its headers a byte
at a time, one without Content-Length and redirects, for timeouts, size limits and redirect handling.

The sample images are made with Pillow here, so tests know exactly what pixels to expect.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import io
import json
import struct
import sys
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
from PIL import Image

# ------------------------------------------------------------------------------------------------------
# Sample images


def png(array_or_image: np.ndarray | Image.Image) -> bytes:
    img = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return buffer.getvalue()


def rgb_array() -> np.ndarray:
    """48x64 RGB with every pixel distinct enough to catch a transposed or flipped result."""
    y, x = np.mgrid[0:48, 0:64]
    return np.stack([x * 4, y * 5, (x + y) % 256], axis=2).astype(np.uint8)


def exif_rotated_jpeg() -> bytes:
    """40 wide x 20 high, left half red, right half blue, stored with EXIF orientation 6.

    Orientation 6 means "rotate 90 degrees clockwise to display": the browser shows 20 wide x 40 high
    with red on top and blue below.
    """
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20] = (255, 0, 0)
    array[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def gray_png() -> bytes:
    return png(np.tile(np.arange(0, 256, 8, dtype=np.uint8), (8, 1)))


def rgba_png() -> bytes:
    """Three columns of 4: transparent green (shows white), opaque red, half-transparent black."""
    array = np.zeros((4, 12, 4), np.uint8)
    array[:, 0:4] = (0, 255, 0, 0)
    array[:, 4:8] = (255, 0, 0, 255)
    array[:, 8:12] = (0, 0, 0, 128)
    return png(Image.fromarray(array, "RGBA"))


def palette_png() -> bytes:
    """A palette image whose index 0 is transparent: left half transparent, right half blue."""
    img = Image.new("P", (8, 4), 0)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (4, 0, 8, 4))
    buffer = io.BytesIO()
    img.save(buffer, "PNG", transparency=0)
    return buffer.getvalue()


SIXTEEN_BIT_VALUES = np.array([[0, 257 * 128, 65535, 1000]], np.uint16)


def sixteen_bit_png() -> bytes:
    return png(Image.fromarray(SIXTEEN_BIT_VALUES))


def cmyk_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height black pixels: a few KB on the wire, gigabytes decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    rows_per_block = max(1, (1 << 22) // len(row))
    parts = []
    for start in range(0, height, rows_per_block):
        parts.append(compressor.compress(row * min(rows_per_block, height - start)))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


@functools.lru_cache(maxsize=1)
def sample_files() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, Content-Type) served by both servers (made once: the bomb takes a moment)."""
    rgb = png(rgb_array())
    return {
        "rgb.png": (rgb, "image/png"),
        "exif.jpg": (exif_rotated_jpeg(), "image/jpeg"),
        "gray.png": (gray_png(), "image/png"),
        "rgba.png": (rgba_png(), "image/png"),
        "palette.png": (palette_png(), "image/png"),
        "16bit.png": (sixteen_bit_png(), "image/png"),
        "cmyk.jpg": (cmyk_jpeg(), "image/jpeg"),
        "bomb.png": (bomb_png(14_000, 14_000), "image/png"),
        "truncated.png": (rgb[: len(rgb) // 2], "image/png"),
        "notes.txt": (b"these are not the pixels you are looking for\n", "text/plain"),
        "login.html": (b"<!DOCTYPE html><html><body>Please log in</body></html>", "text/html"),
    }


# ------------------------------------------------------------------------------------------------------
# JWTs


_SECRET = b"fake-label-studio-signing-key"


def make_jwt(claims: dict) -> str:
    """An HS256 JWT, shaped like Label Studio's (simplejwt) tokens."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + b64(json.dumps(claims).encode())
    signature = hmac.new(_SECRET, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


def personal_access_token(exp_in_s: float = 3600.0) -> str:
    return make_jwt({"token_type": "refresh", "exp": int(time.time() + exp_in_s), "jti": uuid.uuid4().hex,
                     "user_id": 1})


# ------------------------------------------------------------------------------------------------------
# Servers


@dataclass(frozen=True)
class Seen:
    """One request a server received."""

    method: str
    path: str
    authorization: str | None
    client_port: int  # one port for several requests = a reused (pooled) connection


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """Clients that hang up early (size limits, timeouts) are expected here, not errors."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so the fetcher's connection pool is exercised
    # Headers and body are two writes: without TCP_NODELAY each answer on a kept-alive connection waits
    # ~40 ms for the client's delayed ACK, which would hide any timing the tests or benchmarks look at.
    disable_nagle_algorithm = True
    owner: FakeServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's name
        pass

    def send(self, status: int, body: bytes = b"", content_type: str = "application/json",
             headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, status: int, payload: dict) -> None:
        self.send(status, json.dumps(payload).encode())

    def _record(self) -> None:
        self.owner.seen.append(Seen(self.command, self.path, self.headers.get("Authorization"), self.client_address[1]))

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self._record()
        self.owner.handle_get(self)

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        self._record()
        length = int(self.headers.get("Content-Length") or 0)
        self.owner.handle_post(self, self.rfile.read(length))


def strong_etag(data: bytes) -> str:
    return '"' + hashlib.md5(data).hexdigest() + '"'  # S3's ETag of a single-part upload


def weak_etag(data: bytes) -> str:
    return 'W/"' + hashlib.sha256(data).hexdigest()[:16] + '"'


class FakeServer:
    """A threaded HTTP server on a free 127.0.0.1 port; ``seen`` lists the requests it got."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.bodies: list[str] = []
        self.files = dict(sample_files())
        self.delay_s = 0.0  # each file is sent this late: a slow image host
        handler = type("Handler", (_Handler,), {"owner": self})
        self._server = _Server(("127.0.0.1", 0), handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def handle_get(self, request: _Handler) -> None:
        request.send_json(404, {"detail": "Not found."})

    def handle_post(self, request: _Handler, body: bytes) -> None:
        request.send_json(405, {"detail": "Method not allowed."})

    def send_file(self, request: _Handler, name: str, etag: str | None = None) -> None:
        """The file, or 304 when ``etag`` (``weak_etag`` / ``strong_etag``) matches the request's If-None-Match.

        ``bodies`` lists the paths answered with the file's bytes (a 304 is not one).
        """
        if name not in self.files:
            request.send_json(404, {"detail": "Not found."})
            return
        data, content_type = self.files[name]
        tag = etag and (weak_etag(data) if etag == "weak" else strong_etag(data))
        if tag and tag in (request.headers.get("If-None-Match") or ""):
            request.send(304, b"", content_type, {"ETag": tag})
            return
        if self.delay_s:
            time.sleep(self.delay_s)
        self.bodies.append(request.path)
        request.send(200, data, content_type, {"ETag": tag} if tag else None)


class CloudStorage(FakeServer):
    """Any host other than Label Studio: it must never receive an Authorization header."""

    def __init__(self) -> None:
        super().__init__()
        self.leaks: list[Seen] = []

    @staticmethod
    def signature(key: str) -> str:
        return hmac.new(_SECRET, key.encode(), hashlib.sha256).hexdigest()[:16]

    def signed_url(self, bucket: str, key: str) -> str:
        return f"{self.url}/{bucket}/{key}?X-Amz-Signature={self.signature(f'{bucket}/{key}')}"

    def handle_get(self, request: _Handler) -> None:
        if request.headers.get("Authorization") is not None:
            self.leaks.append(self.seen[-1])
            request.send_json(400, {"detail": "Authorization header sent to a foreign host."})
            return
        parts = urlsplit(request.path)
        query = parse_qs(parts.query)
        segments = parts.path.strip("/").split("/")
        if segments[0] == "public" and len(segments) == 2:
            self.send_file(request, segments[1])
        elif segments[0] == "slow":
            time.sleep(float(query.get("s", ["3"])[0]))
            self.send_file(request, "rgb.png")
        elif segments[0] == "trickle":
            self._trickle(request)
        elif segments[0] == "drip":
            self._drip(request, float(query.get("every", ["0.5"])[0]))
        elif segments[0] == "unsized":
            self._unsized(request, int(query["n"][0]))
        elif segments[0] == "redirect":
            request.send(302, headers={"Location": unquote(query["to"][0])})
        elif len(segments) == 2 and query.get("X-Amz-Signature") == [self.signature("/".join(segments))]:
            self.send_file(request, segments[1], etag="strong")  # S3 / GCS / Azure send one and answer 304
        else:
            request.send_json(403, {"detail": "Signature does not match."})

    @staticmethod
    def _trickle(request: _Handler) -> None:
        """Headers at once, then 100 bytes every 50 ms: every read is quick, the whole is slow."""
        request.send_response(200)
        request.send_header("Content-Type", "image/png")
        request.send_header("Content-Length", "100000")
        request.end_headers()
        try:
            for _ in range(1000):
                request.wfile.write(b"\0" * 100)
                request.wfile.flush()
                time.sleep(0.05)
        except OSError:
            pass  # the client gave up, as it should

    @staticmethod
    def _drip(request: _Handler, every_s: float) -> None:
        """The status line and headers one byte every ``every_s``, then an image: no read ever waits long,
        and the headers alone take minutes. Only a deadline on the whole download cuts it."""
        body = sample_files()["rgb.png"][0]
        head = (f"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nX-Padding: {'p' * 400}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        request.close_connection = True
        try:
            for byte in head:
                request.wfile.write(bytes([byte]))
                request.wfile.flush()
                time.sleep(every_s)
            request.wfile.write(body)
        except OSError:
            pass  # the client gave up, as it should

    @staticmethod
    def _unsized(request: _Handler, size: int) -> None:
        """A body without Content-Length (ends when the connection closes): the size is only known by reading."""
        request.send_response(200)
        request.send_header("Content-Type", "image/png")
        request.send_header("Connection", "close")
        request.end_headers()
        request.close_connection = True
        try:
            for start in range(0, size, 65536):
                request.wfile.write(b"\0" * min(65536, size - start))
        except OSError:
            pass


class FakeLabelStudio(FakeServer):
    """Label Studio's data, token and presign endpoints with its authentication rules."""

    def __init__(self, cloud: CloudStorage, legacy_token: str = "legacy0123456789abcdef") -> None:
        super().__init__()
        self.cloud = cloud
        self.legacy_token = legacy_token
        self.legacy_enabled = True
        self.sign_badly = False  # presign answers with a signature the cloud host refuses (an expired URL)
        self.personal_token = personal_access_token()
        self.access_ttl_s = 300.0
        self.refreshes = 0
        self._access: dict[str, float] = {}
        self._lock = threading.Lock()
        # /data/local-files/?d=<key> serves files under these names (the d value relative to its root)
        self.local_files = {f"local/{name}": name for name in self.files}
        # GET /api/tasks?project=&page=&page_size= pages through these, as a bare list (the older form,
        # without "total") and with DRF's 404 "Invalid page." past the last page, as Label Studio does.
        self.tasks: list[dict] = []
        # GET /api/projects/<id> answers these (id, label_config, task_number), 404 for any other id.
        self.projects: dict[int, dict] = {}

    def revoke_access_tokens(self) -> None:
        with self._lock:
            self._access.clear()

    def _authorized(self, request: _Handler) -> bool:
        kind, _, value = (request.headers.get("Authorization") or "").partition(" ")
        if kind == "Token":
            return self.legacy_enabled and hmac.compare_digest(value, self.legacy_token)
        if kind == "Bearer":
            with self._lock:
                return self._access.get(value, 0.0) > time.time()
        return False

    def handle_get(self, request: _Handler) -> None:
        parts = urlsplit(request.path)
        path = unquote(parts.path)
        if not path.startswith(("/data/", "/tasks/", "/api/tasks", "/api/projects/")):
            super().handle_get(request)
            return
        if not self._authorized(request):
            request.send_json(401, {"detail": "Authentication credentials were not provided."})
            return
        if path.rstrip("/") == "/api/tasks":
            self._task_page(request, parse_qs(parts.query))
            return
        if path.startswith("/api/projects/"):
            key = path.rstrip("/").rsplit("/", 1)[-1]
            project = self.projects.get(int(key)) if key.isdigit() else None
            if project is None:
                request.send_json(404, {"detail": "Not found."})
            else:
                request.send_json(200, project)
            return
        if path.startswith("/data/upload/"):
            self.send_file(request, path.rsplit("/", 1)[-1])
        elif path.rstrip("/") == "/data/local-files":
            d = parse_qs(parts.query).get("d", [""])[-1]
            # Label Studio 1.23 sends W/"<mtime>-<size>" for local files and answers If-None-Match with 304.
            self.send_file(request, self.local_files.get(d, ""), etag="weak")
        elif path.startswith("/tasks/") and path.endswith("/presign/"):
            self._presign(request, parse_qs(parts.query).get("fileuri", [""])[0])
        else:
            super().handle_get(request)

    def _task_page(self, request: _Handler, query: dict[str, list[str]]) -> None:
        page, size = int(query.get("page", ["1"])[0]), int(query.get("page_size", ["30"])[0])
        chunk = self.tasks[(page - 1) * size:page * size]
        if page > 1 and not chunk:
            request.send_json(404, {"detail": "Invalid page."})
            return
        request.send(200, json.dumps(chunk).encode())

    def _presign(self, request: _Handler, fileuri: str) -> None:
        try:
            uri = base64.urlsafe_b64decode(fileuri + "=" * (-len(fileuri) % 4)).decode()
        except ValueError:
            request.send_json(400, {"detail": "Bad fileuri."})
            return
        scheme, _, rest = uri.partition("://")
        bucket, _, key = rest.partition("/")
        if scheme not in ("s3", "gs", "azure-blob", "azure-spi") or key not in self.files:
            request.send_json(404, {"detail": f"No storage holds {uri}."})
            return
        location = self.cloud.signed_url(bucket, key)
        if self.sign_badly:
            location = location.replace("Signature=", "Signature=expired")
        request.send(302, headers={"Location": location})

    def handle_post(self, request: _Handler, body: bytes) -> None:
        if urlsplit(request.path).path != "/api/token/refresh/":
            super().handle_post(request, body)
            return
        try:
            refresh = json.loads(body).get("refresh")
        except (ValueError, AttributeError):
            refresh = None
        if refresh != self.personal_token:
            request.send_json(401, {"detail": "Token is invalid or expired", "code": "token_not_valid"})
            return
        exp = time.time() + self.access_ttl_s
        access = make_jwt({"token_type": "access", "exp": int(exp), "jti": uuid.uuid4().hex, "user_id": 1})
        with self._lock:
            self.refreshes += 1
            self._access[access] = exp
        request.send_json(200, {"access": access})
