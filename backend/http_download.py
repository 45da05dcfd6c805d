"""Bounded HTTP downloads, and the messages that say why one failed.

Task images and Label Studio's API are read the same way: a GET with a deadline for the whole transfer
and a limit on the body, redirects followed by hand so that each hop is checked, and the Label Studio
token attached only on hops to Label Studio's origin (``LabelStudioClient.is_label_studio``): the Label
Studio token sent to public hosts is a known complaint about ML backends. One ``Downloader`` (one pooled
session) serves an image fetcher and every Label Studio client it hands out.

Every failure is an ``ImageError`` (the task or configuration must change, 422) or an
``ImageAccessError`` (the source refused or could not be reached, 502) whose message names the URL
(without credentials, and without the query of a signed URL) and what to fix.
"""

from __future__ import annotations

import http.cookiejar
import ipaddress
import re
import socket
import time
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import urljoin, urlsplit, urlunsplit

import requests
import urllib3.exceptions

from backend.errors import ImageAccessError, ImageError
from backend.guarded_http import GuardedSession, ProxySession, lookup
from backend.urls import DEFAULT_IMAGE_HOSTS, HostPolicy, UnsafeUrl, Url, parse_url

if TYPE_CHECKING:
    from backend.image_identity import Revalidation
    from backend.label_studio import LabelStudioClient

MAX_REDIRECTS = 5
CHUNK_BYTES = 64 * 1024
USER_AGENT = "sam-label-studio-backend (image fetcher)"

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}
_DOCKER_HINT = (
    " If the backend runs in Docker, 'localhost' there is the container itself: use an address the "
    "container can reach (the Label Studio service name in docker-compose, or http://host.docker.internal:8080)."
)


# --------------------------------------------------------------------------------------------------------
# URLs


def url_scheme(value: str) -> str | None:
    """The lower-cased scheme of ``scheme://...``, or None when the value does not start with one."""
    match = _SCHEME.match(value)
    return match.group(1).lower() if match else None


def origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) with the default port filled in, as the HTTP client will connect: the unit the
    token is scoped to. None for a URL ``backend.urls.parse_url`` refuses (it never gets the token)."""
    try:
        return parse_url(url).origin
    except UnsafeUrl:
        return None


def redact(url: str, keep_query: bool = True) -> str:
    """The URL without credentials (user:password@), and without the query when it may hold a signature."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query if keep_query else "", ""))


# --------------------------------------------------------------------------------------------------------
# The download


class Downloaded(NamedTuple):
    data: bytes
    content_type: str | None


class Downloader:
    """GETs bounded in time (``timeout_s`` for the whole transfer) and size (``max_bytes`` of body).

    Owns one ``requests.Session``: its connections are pooled across request threads, it keeps no cookies
    (cookies from one host must never ride along to another, and Label Studio needs none), and it does not
    retry (a retry would restart the clock the deadline promises). The environment's HTTP(S) proxies are
    used only with ``use_proxies`` (SAM_IMAGE_PROXY): a proxy would connect on to hosts the allow-list never
    sees (``backend.guarded_http``).
    """

    def __init__(self, timeout_s: float, max_bytes: int, hosts: HostPolicy | str = DEFAULT_IMAGE_HOSTS,
                 use_proxies: bool = False) -> None:
        self.timeout_s = float(timeout_s)
        self.max_bytes = int(max_bytes)
        self.hosts = hosts if isinstance(hosts, HostPolicy) else HostPolicy.parse(hosts)
        self.session = ProxySession(use_proxies)
        self.session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        self.session.headers["User-Agent"] = USER_AGENT
        self.guard = GuardedSession(self.session)

    def close(self) -> None:
        self.session.close()

    def deadline(self) -> float:
        """The ``time.monotonic()`` by which a transfer starting now must be done."""
        return time.monotonic() + self.timeout_s

    def get(self, url: str, label_studio: LabelStudioClient, deadline: float,
            display: str | None = None, revalidation: Revalidation | None = None) -> Downloaded:
        """GET with redirects followed by hand, the token attached only on hops to Label Studio.

        ``display`` names the download in messages instead of the URL (a cloud URI instead of its presign
        URL). A 401 from Label Studio on a refreshable token drops the cached access token and tries once more.
        ``revalidation`` (``backend.image_identity``): its conditional headers go on every hop, and the final
        answer's validators are recorded in it; a 304 then returns no bytes with ``not_modified`` set.
        """
        signed = False
        retried = False
        hops = 0
        while True:
            target = parse_url(url)  # UnsafeUrl (422) at any hop: parsers that disagree never get a request
            to_label_studio = label_studio.origin == target.origin
            shown = redact(url, keep_query=not signed)
            policy = self._policy(target, to_label_studio, display or shown)
            if policy is not None and target.ip is None and self.session.proxy_for(url):
                self._check_before_proxy(target, policy, display or shown, deadline)
            headers = label_studio.headers(deadline) if to_label_studio else {}
            if revalidation is not None:
                headers = {**headers, **revalidation.request}
            timeout = remaining(deadline, display or shown)
            with self.guard.hop(deadline, policy) as hop:
                try:
                    response = self.session.get(url, headers=headers, stream=True, allow_redirects=False,
                                                timeout=timeout)
                except requests.RequestException as exc:
                    if hop.refused is not None:
                        raise self._refused(target, display or shown, hop.refused.addresses) from None
                    if hop.fired:
                        raise self._deadline_passed(display or shown) from None
                    raise request_failed(exc, shown, timeout, label_studio) from None
                with response:
                    if hop.fired:  # headers cut short at the deadline can look complete: never trust them
                        raise self._deadline_passed(display or shown)
                    status = response.status_code
                    if status in (301, 302, 303, 307, 308) and "Location" in response.headers:
                        hops += 1
                        if hops > MAX_REDIRECTS:
                            raise ImageAccessError(f"Too many redirects downloading {display or shown}.")
                        next_url = urljoin(url, response.headers["Location"])
                        # A redirect from Label Studio to another host is a signed URL: keep its query out of
                        # messages. The next hop is parsed and checked afresh: the token goes only where the
                        # client itself will connect, and only to Label Studio's origin.
                        signed = signed or (to_label_studio and not label_studio.is_label_studio(next_url))
                        url = next_url
                        continue
                    if status == 401 and to_label_studio and label_studio.can_refresh() and not retried:
                        label_studio.forget_access_token(headers.get("Authorization", ""))
                        retried = True
                        continue
                    if revalidation is not None:
                        revalidation.record(response.headers)
                        if status == 304 and revalidation.request:
                            revalidation.not_modified = True
                            return Downloaded(b"", response.headers.get("Content-Type"))
                    if status != 200:
                        raise _status_error(status, shown, label_studio, signed)
                    try:
                        body = self._read_body(response, display or shown, deadline, timeout)
                    except ImageAccessError:
                        if hop.fired:
                            raise self._deadline_passed(display or shown) from None
                        raise
                    if hop.fired:  # a body without Content-Length cut at the deadline reads as a short one
                        raise self._deadline_passed(display or shown)
                    return Downloaded(body, response.headers.get("Content-Type"))

    def trusts(self, url: str) -> bool:
        """Whether ``url``'s host is one the admin named in SAM_IMAGE_HOSTS (not merely admitted as public)."""
        try:
            return self.hosts.trusts(parse_url(url))
        except UnsafeUrl:
            return False

    def _policy(self, target: Url, to_label_studio: bool, shown: str) -> HostPolicy | None:
        """The allow-list the connection's addresses must pass, None when the host is trusted by name."""
        if to_label_studio or self.hosts.trusts(target):
            return None
        ip = target.ip
        if ip is not None and not self.hosts.admits(ip, target.port):
            raise self._refused(target, shown, [str(ip)])
        return self.hosts

    def _check_before_proxy(self, target: Url, policy: HostPolicy, shown: str, deadline: float) -> None:
        """Resolve and judge the target's name here, since through a proxy the connection only sees the proxy."""
        try:
            addresses = lookup(target.host, target.port, deadline)
        except TimeoutError:
            raise self._deadline_passed(shown) from None
        except socket.gaierror:
            raise ImageAccessError(f"Could not connect to {shown} (the host name does not resolve).") from None
        if not addresses or not all(policy.admits(ipaddress.ip_address(a.split("%")[0]), target.port)
                                    for a in addresses):
            raise self._refused(target, shown, addresses)

    def _refused(self, target: Url, shown: str, addresses: list[str]) -> ImageError:
        where = target.host if target.ip is not None else f"{target.host} ({', '.join(addresses)})"
        host = f"[{target.host}]" if ":" in target.host else target.host
        return ImageError(
            f"The image host of {shown} is not allowed: {where} is not a public address and not in "
            f"SAM_IMAGE_HOSTS ({self.hosts.text or 'empty'}). If the backend should read images from it, add "
            f"'{host}' (or '{host}:{target.port}') to SAM_IMAGE_HOSTS."
        )

    def _deadline_passed(self, shown: str) -> ImageAccessError:
        return ImageAccessError(
            f"Timed out after {self.timeout_s:.1f} s downloading {shown}: it arrives too slowly. Raise the "
            "download limit (IMAGE_TIMEOUT_S) or serve the image closer to the backend."
        )

    def _read_body(self, response: requests.Response, shown: str, deadline: float, timeout: float) -> bytes:
        """The body, streamed: refused past ``max_bytes`` or past the deadline, whatever the server claims.

        ``read1`` returns what has arrived (up to a chunk) instead of waiting for a full chunk, so a host
        that trickles bytes meets the deadline check between reads.
        """
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            raise ImageError(too_big(f"The image {shown}", self.max_bytes))
        raw = response.raw
        read = raw.read1 if hasattr(raw, "read1") else raw.read
        chunks: list[bytes] = []
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
                raise ImageError(too_big(f"The image {shown}", self.max_bytes))
            if time.monotonic() > deadline:
                raise ImageAccessError(
                    f"Timed out after {self.timeout_s:.1f} s downloading {shown}: it arrives too slowly. "
                    "Raise the download limit (IMAGE_TIMEOUT_S) or serve the image closer to the backend."
                )
            chunks.append(chunk)


# --------------------------------------------------------------------------------------------------------
# Failures


def remaining(deadline: float, url: str) -> float:
    """Seconds left before ``deadline``, or the timeout error when none are."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise ImageAccessError(f"Timed out downloading {url}: the image took longer than the download limit.")
    return left


def too_big(what: str, max_bytes: int) -> str:
    return (
        f"{what} is larger than the limit of {max_bytes} bytes ({max_bytes / 2**20:.1f} MiB, IMAGE_MAX_MB): "
        "use a smaller file or raise the limit."
    )


def _is_timeout(exc: BaseException) -> bool:
    if isinstance(exc, requests.Timeout):
        return True
    # requests reports a read timeout in the middle of a streamed body as a ConnectionError.
    return any(isinstance(arg, urllib3.exceptions.TimeoutError) for arg in getattr(exc, "args", ()))


def _timed_out(url: str, timeout: float, what: str) -> ImageAccessError:
    return ImageAccessError(f"Timed out after {timeout:.1f} s downloading {url}: {what}. Check it is reachable "
                            "from the backend, or raise the download limit (IMAGE_TIMEOUT_S).")


def request_failed(exc: requests.RequestException, url: str, timeout: float,
                   label_studio: LabelStudioClient, deadline_passed: bool = False) -> ImageError:
    """Translate a requests exception into a message about the URL, not about the code.

    ``deadline_passed``: the watchdog cut the connection at the deadline (whatever the exception says).
    """
    host = urlsplit(url).hostname or ""
    if deadline_passed or _is_timeout(exc):
        return _timed_out(url, timeout, "the host did not answer in time")
    if isinstance(exc, requests.exceptions.SSLError):
        return ImageAccessError(f"TLS error connecting to {url}: {exc}. Check the certificate of {host}.")
    if isinstance(exc, requests.ConnectionError):
        hint = _DOCKER_HINT if host in _LOCAL_HOSTS or host.startswith("127.") else ""
        what = url
        if label_studio.is_label_studio(url):
            what = f"Label Studio at {label_studio.url} (from {label_studio.url_source})"
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
        return _timed_out(url, timeout, "the host stopped sending")
    if isinstance(exc, urllib3.exceptions.DecodeError):
        return ImageAccessError(f"The download of {url} could not be decompressed (bad Content-Encoding): {exc}")
    return ImageAccessError(f"The connection broke while downloading {url}: {exc}")


def _status_error(status: int, url: str, label_studio: LabelStudioClient, signed: bool) -> ImageError:
    if status in (401, 403) and label_studio.is_label_studio(url):
        return label_studio.refused(status, url)
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
