"""What anonymous callers can make the backend fetch, and what they learn from it.

SAM_IMAGE_HOSTS (default ``public``) keeps task URLs away from the backend's own network; a refused host, a
closed port, an error page and a file that is not an image all read alike to the caller (the reason is in
the server's log line only); a TASKS_CREATED webhook queues at most SAM_WARMUP_MAX_QUEUE warm-ups; symbolic
links under LOCAL_FILES_ROOT cannot lead out of it. Against a real ``sam-backend serve``.
"""

from __future__ import annotations

import http.server
import ipaddress
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backend.config import Settings, SettingsError
from backend.errors import ImageError
from backend.urls import HostPolicy, parse_url
from testsupport.backend import SETUP_TOKEN, ServerProcess, png_bytes, scene
from testsupport.image_access import image_fetcher, task
from testsupport.processes import free_port

from .conftest import Serve, click_body, tasks_created

# ------------------------------------------------------------------------------------------------------
# The allow-list itself


def test_the_default_admits_public_addresses_only() -> None:
    policy = HostPolicy.parse(Settings().sam_image_hosts)
    for address in ("8.8.8.8", "52.216.0.1", "2a00:1450:4001::1"):
        assert policy.admits(ipaddress.ip_address(address), 443)
    for address in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
                    "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1", "224.0.0.1"):
        assert not policy.admits(ipaddress.ip_address(address), 80), address


def test_entries_name_hosts_suffixes_networks_and_ports() -> None:
    policy = HostPolicy.parse("minio:9000, *.corp.example 10.0.0.0/8,[::1]:8080")
    assert policy.trusts(parse_url("http://minio:9000/b/k")) and not policy.trusts(parse_url("http://minio/b/k"))
    assert policy.trusts(parse_url("https://img.corp.example/a")) and not policy.trusts(parse_url("https://corp.example/a"))
    assert not policy.trusts(parse_url("https://evilcorp.example/a"))
    assert policy.trusts(parse_url("http://10.9.8.7/a")) and policy.admits(ipaddress.ip_address("10.9.8.7"), 1)
    assert policy.trusts(parse_url("http://[::1]:8080/a")) and not policy.trusts(parse_url("http://[::1]:8081/a"))
    assert not policy.admits(ipaddress.ip_address("8.8.8.8"), 80), "without 'public' public hosts are refused"
    assert HostPolicy.parse("none").rules == ()


@pytest.mark.parametrize("value", ["minio:99999", "http://minio", "minio/8", "*.", "a..b", "-x"])
def test_bad_entries_stop_the_start_naming_the_variable(value: str) -> None:
    with pytest.raises(SettingsError, match="SAM_IMAGE_HOSTS"):
        Settings.from_env({"SAM_IMAGE_HOSTS": value})


def test_a_name_that_resolves_inside_is_refused_before_any_connection(label_studio: Any) -> None:
    """'localhost' is a name, so the check runs on what it resolves to: 127.0.0.1, not public."""
    cloud = label_studio.cloud
    before = len(cloud.seen)
    with pytest.raises(ImageError, match="could not be used") as refused:
        image_fetcher(image_hosts="public").fetch(task(f"http://localhost:{cloud.port}/public/rgb.png"), "image")
    assert "not a public address" in (refused.value.detail or "") and len(cloud.seen) == before


class ForwardProxy:
    """An HTTP forward proxy stand-in: records each absolute URL asked of it and answers with a PNG, as a proxy
    that can reach the target would."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                proxy.seen.append(self.path)
                body = png_bytes(scene(1, (96, 72)))
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's name
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture()
def forward_proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[ForwardProxy]:
    """The environment's HTTP_PROXY / HTTPS_PROXY point at a ``ForwardProxy``, with no NO_PROXY exceptions."""
    proxy = ForwardProxy()
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(name, proxy.url)
    yield proxy
    proxy.server.shutdown()
    proxy.server.server_close()


def test_the_environments_proxy_is_not_a_way_around_the_allow_list(forward_proxy: ForwardProxy,
                                                                    label_studio: Any) -> None:
    """Through a proxy the connection sees only the proxy's address: by default the environment's proxy is not
    used, and with SAM_IMAGE_PROXY on a name is resolved and judged before the proxy is asked."""
    inside = task(f"http://localhost:{label_studio.cloud.port}/public/rgb.png")
    for use_proxies in (False, True):
        with pytest.raises(ImageError, match="could not be used") as refused:
            image_fetcher(image_hosts="public", use_proxies=use_proxies).fetch(inside, "image")
        assert "not a public address" in (refused.value.detail or ""), use_proxies
    assert forward_proxy.seen == [], "the proxy was asked for an internal host"
    assert Settings().sam_image_proxy is False and Settings.from_env({"SAM_IMAGE_PROXY": "on"}).sam_image_proxy
    # Enabled, a host the admin named goes through the proxy (which resolves it: here a name only it knows).
    named = image_fetcher(image_hosts="images.example", use_proxies=True)
    assert named.fetch(task("http://images.example/a.png"), "image").size == (72, 96)
    assert forward_proxy.seen == ["http://images.example/a.png"]


# ------------------------------------------------------------------------------------------------------
# A served backend with the default allow-list


@pytest.fixture(scope="module")
def public_only(serve: Serve, label_studio: Any) -> ServerProcess:
    return serve("public", LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=SETUP_TOKEN)


def _probes(label_studio: Any) -> dict[str, str]:
    cloud = label_studio.cloud.url
    return {
        "closed port": f"http://127.0.0.1:{free_port()}/x.png",
        "open port, not an image": f"{cloud}/public/notes.txt",
        "open port, an error page": f"{cloud}/nothing-here",
        "open port, an image": f"{cloud}/public/rgb.png",
        "cloud metadata": "http://169.254.169.254/latest/meta-data/iam/",
        "private network": "http://10.255.255.1:6379/x.png",
        "localhost by name": f"http://localhost:{label_studio.cloud.port}/public/rgb.png",
    }


def test_internal_hosts_are_refused_with_one_message_that_reveals_no_port_state(public_only: ServerProcess,
                                                                                 label_studio: Any) -> None:
    cloud = label_studio.cloud
    before = len(cloud.seen)
    answers = {}
    for name, url in _probes(label_studio).items():
        started = time.monotonic()
        response = public_only.post("/predict", json=click_body(url))
        answers[name] = (response.status_code, response.json()["message"].replace(url, "<url>"),
                         time.monotonic() - started)
    assert {status for status, _, _ in answers.values()} == {422}, answers
    assert len({message for _, message, _ in answers.values()}) == 1, answers
    message = next(iter(answers.values()))[1]
    assert "SAM_IMAGE_HOSTS" in message and "log" in message
    assert all(took < 1.0 for _, _, took in answers.values()), answers  # refused before connecting: no timeouts
    assert len(cloud.seen) == before, "a refused host got a request"
    log = public_only.log.read_text(errors="replace")
    assert "not a public address and not in SAM_IMAGE_HOSTS" in log and "Traceback" not in log


def test_label_studio_s_own_origin_is_always_allowed(public_only: ServerProcess) -> None:
    public_only.wait_loaded()
    response = public_only.post("/predict", json=click_body("/data/upload/4/d94949cd-blue_circle.png"))
    assert response.status_code == 200, response.text


def test_a_webhook_queues_at_most_the_cap_and_logs_one_line(serve: Serve, label_studio: Any) -> None:
    """300 tasks on an allowed host: at most SAM_WARMUP_MAX_QUEUE warm-ups, so at most that many fetches."""
    cloud = label_studio.cloud
    server = serve("fan-out", LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=SETUP_TOKEN,
                   SAM_IMAGE_HOSTS=f"127.0.0.1:{cloud.port}", SAM_WARMUP_MAX_QUEUE="20")
    server.wait_loaded()
    before = len(cloud.seen)
    log_before = len(server.log.read_text(errors="replace"))
    response = server.post("/webhook", json=tasks_created([f"{cloud.url}/public/notes.txt?n={i}" for i in range(300)]))
    assert response.status_code == 200 and response.json()["queued"] == 20, response.text
    deadline = time.monotonic() + 30
    while len(cloud.seen) - before < 20 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    assert len(cloud.seen) - before == 20
    log = server.log.read_text(errors="replace")[log_before:]
    assert "Traceback" not in log
    lines = [line for line in log.splitlines() if "gunicorn.access" not in line]
    assert len(lines) == 2, lines  # the queue-full warning and the webhook's summary
    assert "280 of 300 task(s) not queued" in lines[0] and "SAM_WARMUP_MAX_QUEUE=20" in lines[0]


# ------------------------------------------------------------------------------------------------------
# LOCAL_FILES_ROOT


def test_a_symlink_out_of_local_files_root_is_refused(serve: Serve, label_studio: Any, tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.png").write_bytes(png_bytes(scene(3)))
    (root / "inside.png").write_bytes(png_bytes(scene(4)))
    os.symlink(outside / "secret.png", root / "escape.png")
    os.symlink(outside, root / "door")
    server = serve("local-root", LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=SETUP_TOKEN,
                   LOCAL_FILES_ROOT=str(root))
    server.wait_loaded()
    inside = server.post("/predict", json=click_body("/data/local-files/?d=inside.png"))
    assert inside.status_code == 200, inside.text
    for path in ("escape.png", "door/secret.png", "../outside/secret.png"):
        response = server.post("/predict", json=click_body(f"/data/local-files/?d={path}"))
        assert response.status_code == 422 and "outside LOCAL_FILES_ROOT" in response.json()["message"], response.text
