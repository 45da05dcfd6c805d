"""The Label Studio token goes to Label Studio's origin as the HTTP client itself connects, and nowhere else.

Odd URLs whose parsers disagree (``urllib.parse`` reads ``http://other\\@label-studio/x`` as a URL on
label-studio, urllib3 connects to ``other``) are refused before any request, at the first hop and at every
redirect; queued jobs in Redis never hold the token. Checked against a real ``sam-backend serve``, the
token-checking Label Studio stand-in and a cloud host that records any Authorization header reaching it.
"""

from __future__ import annotations

import contextlib
import time
import zlib
from typing import Any
from urllib.parse import quote

import pytest
import redis
import urllib3.util

from backend.urls import UnsafeUrl, parse_url
from testsupport.backend import SETUP_TOKEN, ServerProcess, fixture_body
from testsupport.processes import RedisServer

from .conftest import Serve, click_body, open_body, tasks_created

UPLOAD = "/data/upload/4/d94949cd-blue_circle.png"

# ------------------------------------------------------------------------------------------------------
# The parse


ODD_URLS = {
    "backslash before @": "http://other.example\\@label-studio:8080/x.png",
    "backslash in the host": "http://other.example\\label-studio/x.png",
    "user and password": "http://user:pass@label-studio:8080/x.png",
    "empty user": "http://@label-studio:8080/x.png",
    "tab in the host": "http://label-\tstudio:8080/x.png",
    "newline in the path": "http://label-studio:8080/x\n.png",
    "NUL": "http://label-studio:8080/x\x00.png",
    "leading space": " http://label-studio:8080/x.png",
    "decimal IPv4": "http://2130706433/x.png",
    "short IPv4": "http://127.1/x.png",
    "hex IPv4": "http://0x7f.0.0.1/x.png",
    "octal IPv4": "http://0177.0.0.1/x.png",
    "percent in the host": "http://label%2Dstudio/x.png",
    "non-ASCII host": "http://label-stüdio/x.png",
    "fullwidth host": "http://ｌabel-studio/x.png",
    "port out of range": "http://label-studio:65536/x.png",
    "port with sign": "http://label-studio:+80/x.png",
    "IPv6 zone": "http://[fe80::1%25eth0]/x.png",
    "file scheme": "file:///etc/passwd",
    "gopher scheme": "gopher://label-studio:70/x",
    "no host": "http:///x.png",
    "too long": "http://label-studio/" + "a" * 9000,
}


@pytest.mark.parametrize("case", list(ODD_URLS))
def test_urls_parsers_could_read_differently_are_refused(case: str) -> None:
    with pytest.raises(UnsafeUrl, match="is refused: .*Write it as http"):
        parse_url(ODD_URLS[case])


@pytest.mark.parametrize("url", [
    "http://label-studio:8080/data/upload/4/a.png", "https://Bucket.S3.amazonaws.com/k/a%20b.png?X-Amz-Signature=ab",
    "http://127.0.0.1:9/x", "http://[::1]:8080/x", "https://xn--bcher-kva.example/x y.png", "http://host./x",
    "http://host/a\\b?c=\\d#e@f",
])
def test_plain_urls_parse_as_the_http_client_connects(url: str) -> None:
    parsed = parse_url(url)
    client = urllib3.util.parse_url(url)
    assert (parsed.scheme, parsed.host, parsed.port) == (
        client.scheme, (client.host or "").strip("[]").lower(), client.port or {"http": 80, "https": 443}[parsed.scheme])


# ------------------------------------------------------------------------------------------------------
# A served backend


@pytest.fixture(scope="module")
def server(serve: Serve, label_studio: Any, redis_server: RedisServer) -> ServerProcess:
    """Label Studio's URL and legacy token from the environment; the cloud host allowed by name (so that
    redirects through it are followed); warm-up jobs on Redis."""
    backend = serve("tokens", LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=SETUP_TOKEN,
                    REDIS_URL=redis_server.url, SAM_IMAGE_HOSTS=f"127.0.0.1:{label_studio.cloud.port}")
    backend.wait_loaded()
    return backend


def _smuggled(label_studio: Any, separator: str = "\\@") -> str:
    """A URL ``urllib.parse`` reads as Label Studio's and urllib3 as the cloud host's."""
    return f"http://127.0.0.1:{label_studio.cloud.port}{separator}127.0.0.1:{label_studio.port}{UPLOAD}"


def _variants(label_studio: Any) -> dict[str, str]:
    cloud = label_studio.cloud.url
    return {
        "backslash": _smuggled(label_studio),
        "userinfo": f"http://user:{SETUP_TOKEN}@127.0.0.1:{label_studio.port}{UPLOAD}",
        "userinfo to the cloud": f"http://127.0.0.1:{label_studio.port}@127.0.0.1:{label_studio.cloud.port}/public/rgb.png",
        "redirect to backslash": f"{cloud}/redirect?to={quote(_smuggled(label_studio), safe='')}",
        "redirect to userinfo": f"{cloud}/redirect?to={quote(f'http://u:p@127.0.0.1:{label_studio.port}{UPLOAD}', safe='')}",
        "redirect with a tab": f"{cloud}/redirect?to={quote(_smuggled(label_studio, chr(9)), safe='')}",
    }


@pytest.mark.parametrize("variant", ["backslash", "userinfo", "userinfo to the cloud", "redirect to backslash",
                                     "redirect to userinfo", "redirect with a tab"])
def test_no_odd_url_delivers_the_token_to_another_host(server: ServerProcess, label_studio: Any, variant: str) -> None:
    cloud = label_studio.cloud
    seen_before = [s for s in cloud.seen if not s.path.startswith("/redirect")]
    label_studio_before = len(label_studio.seen)
    response = server.post("/predict", json=click_body(_variants(label_studio)[variant]))
    assert response.status_code == 422, response.text
    assert "is refused" in response.json()["message"] and "Write it as http" in response.json()["message"]
    assert cloud.leaks == []
    assert [s for s in cloud.seen if not s.path.startswith("/redirect")] == seen_before, "the odd URL was requested"
    assert len(label_studio.seen) == label_studio_before


def test_the_token_goes_to_label_studio_and_is_dropped_on_the_signed_redirect(server: ServerProcess,
                                                                                label_studio: Any) -> None:
    cloud = label_studio.cloud
    before = len(cloud.seen)
    response = server.post("/predict", json=click_body("s3://bucket/rgb.png", task_id=8))
    assert response.status_code == 200, response.text
    presign = [s for s in label_studio.seen if s.path.startswith("/tasks/8/presign/")]
    assert presign and presign[-1].authorization == f"Token {SETUP_TOKEN}"
    signed = cloud.seen[before:]
    assert len(signed) == 1 and signed[0].path.startswith("/bucket/rgb.png?X-Amz-Signature=")
    assert signed[0].authorization is None and cloud.leaks == []


def test_a_redirect_to_label_studio_is_reparsed_and_gets_the_token_there_only(server: ServerProcess,
                                                                                label_studio: Any) -> None:
    target = quote(f"{label_studio.url}{UPLOAD}", safe="")
    response = server.post("/predict", json=click_body(f"{label_studio.cloud.url}/redirect?to={target}", task_id=9))
    assert response.status_code == 200, response.text
    assert [s.authorization for s in label_studio.seen if s.path == UPLOAD][-1] == f"Token {SETUP_TOKEN}"
    assert label_studio.cloud.leaks == []


def _redis_holds(connection: redis.Redis, secret: bytes) -> list[str]:
    """The keys whose value (a string, hash, list or set member; zlib-compressed or not) contains ``secret``."""
    found = []
    for key in connection.scan_iter(count=1000):
        kind = connection.type(key)
        values: list[bytes] = []
        if kind == b"string":
            values = [connection.get(key) or b""]
        elif kind == b"hash":
            values = [v for pair in connection.hgetall(key).items() for v in pair]
        elif kind == b"list":
            values = connection.lrange(key, 0, -1)
        elif kind in (b"set", b"zset"):
            values = list(connection.smembers(key)) if kind == b"set" else connection.zrange(key, 0, -1)
        for value in values:
            plain = [value]
            with contextlib.suppress(zlib.error):
                plain.append(zlib.decompress(value))
            if any(secret in v for v in plain):
                found.append(key.decode(errors="replace"))
    return found


def test_warm_up_jobs_in_redis_hold_no_token(server: ServerProcess, label_studio: Any,
                                             redis_server: RedisServer) -> None:
    connection = redis.Redis.from_url(redis_server.url)
    # /setup with Label Studio's own token too: neither token may reach Redis.
    setup = fixture_body("setup.json")
    setup["hostname"] = label_studio.url
    assert server.post("/setup", json=setup).status_code == 200
    images = [f"/data/upload/4/token-check-{i}.png" for i in range(5)]
    for name in images:
        label_studio.files[name.rsplit("/", 1)[-1]] = label_studio.files["d94949cd-blue_circle.png"]
    response = server.post("/webhook", json=tasks_created(images[:4]))
    assert response.status_code == 200 and response.json()["queued"] == 4
    assert server.post("/predict", json=open_body(images[4], task_id=2000)).status_code == 200
    secrets = [SETUP_TOKEN.encode(), setup["access_token"].encode()]
    assert not [key for secret in secrets for key in _redis_holds(connection, secret)]
    # The jobs ran with the server's own token (the images were fetched with it), and their records in Redis
    # (finished jobs stay a minute) still hold no token.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        fetched = {s.path for s in label_studio.seen if s.authorization == f"Token {SETUP_TOKEN}"}
        if all(name in fetched for name in images):
            break
        time.sleep(0.2)
    assert all(name in fetched for name in images)
    assert not [key for secret in secrets for key in _redis_holds(connection, secret)]


def test_without_label_studio_url_the_key_goes_to_no_host_a_setup_names(serve: Serve, label_studio: Any) -> None:
    """LABEL_STUDIO_API_KEY without LABEL_STUDIO_URL: anyone may call /setup, so a hostname it names (here the
    recording cloud host) must not receive the key with the next image fetch; start-up says what to set.
    Label Studio's own /setup, which sends its hostname and its token together, works as before."""
    backend = serve("key-without-url", LABEL_STUDIO_API_KEY=SETUP_TOKEN)
    backend.wait_loaded()
    cloud = label_studio.cloud
    assert backend.post("/setup", json={"hostname": cloud.url}).status_code == 200
    before = len(cloud.seen)
    response = backend.post("/predict", json=click_body(UPLOAD, task_id=21))
    assert response.status_code == 502 and "set LABEL_STUDIO_URL" in response.json()["message"], response.text
    asked = cloud.seen[before:]
    assert [s.path for s in asked] == [UPLOAD], "the image was asked of the host /setup named"
    assert [s.authorization for s in asked] == [None] and cloud.leaks == []
    assert "LABEL_STUDIO_API_KEY is set without LABEL_STUDIO_URL, so it is not used" in backend.log.read_text()
    setup = fixture_body("setup.json")
    setup["hostname"] = label_studio.url
    assert backend.post("/setup", json=setup).status_code == 200
    response = backend.post("/predict", json=click_body(UPLOAD, task_id=22))
    assert response.status_code == 200, response.text
    assert [s.authorization for s in label_studio.seen if s.path == UPLOAD][-1] == f"Token {setup['access_token']}"
