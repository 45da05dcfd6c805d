"""The Label Studio client against a real HTTP server that checks tokens like Label Studio does.

Which token is sent, how, and where: legacy tokens, personal access tokens exchanged for access tokens,
the token only on Label Studio's origin, the environment winning over /setup and over a queued job's
values, and the API that ``sam-backend warm`` reads.
"""

from __future__ import annotations

import hashlib
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from backend.errors import ImageAccessError, ImageError
from backend.image_decode import TaskImage
from backend.label_studio import MAX_CLIENTS
from backend.warmup import WarmupJob, make_encoder
from testsupport.image_access import authorizations, file_bytes, image_fetcher, legacy, task
from testsupport.image_server import CloudStorage, FakeLabelStudio, personal_access_token, rgb_array
from testsupport.processes import free_port

# ------------------------------------------------------------------------------------------------------
# Legacy tokens


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
        image_fetcher(label_studio_url=ls.url, label_studio_token="wrong").fetch(task("/data/upload/4/rgb.png"), "image")
    with pytest.raises(ImageAccessError, match="has no Label Studio token. Set LABEL_STUDIO_API_KEY"):
        image_fetcher(label_studio_url=ls.url).fetch(task("/data/upload/4/rgb.png"), "image")


# ------------------------------------------------------------------------------------------------------
# Personal access tokens (JWT refresh tokens)


def test_personal_access_token_is_exchanged_once_and_sent_as_bearer(ls: FakeLabelStudio) -> None:
    fetcher = image_fetcher(label_studio_url=ls.url, label_studio_token=ls.personal_token)
    for _ in range(3):
        fetcher.fetch(task("/data/upload/4/rgb.png"), "image")
    assert ls.refreshes == 1
    sent = authorizations(ls, "/data/upload/")
    assert len(sent) == 3 and len(set(sent)) == 1
    assert sent[0].startswith("Bearer ") and ls.personal_token not in sent[0]


def test_access_token_refreshed_after_401(ls: FakeLabelStudio) -> None:
    fetcher = image_fetcher(label_studio_url=ls.url, label_studio_token=ls.personal_token)
    fetcher.fetch(task("/data/upload/4/rgb.png"), "image")
    ls.revoke_access_tokens()
    fetcher.fetch(task("/data/upload/4/rgb.png"), "image")
    assert ls.refreshes == 2
    first, refused, retried = authorizations(ls, "/data/upload/")
    assert first == refused != retried


def test_access_token_refreshed_before_its_exp(ls: FakeLabelStudio) -> None:
    ls.access_ttl_s = 5  # inside the refresh margin: every use needs a new one
    fetcher = image_fetcher(label_studio_url=ls.url, label_studio_token=ls.personal_token)
    fetcher.fetch(task("/data/upload/4/rgb.png"), "image")
    fetcher.fetch(task("/data/upload/4/rgb.png"), "image")
    assert ls.refreshes == 2
    assert authorizations(ls, "/data/upload/") == [seen for seen in authorizations(ls, "/data/upload/")
                                                   if seen and seen.startswith("Bearer ")]


def test_expired_personal_access_token_fails_before_any_request(ls: FakeLabelStudio) -> None:
    fetcher = image_fetcher(label_studio_url=ls.url, label_studio_token=personal_access_token(exp_in_s=-60))
    with pytest.raises(ImageAccessError, match="personal access token in LABEL_STUDIO_API_KEY expired on"):
        fetcher.fetch(task("/data/upload/4/rgb.png"), "image")
    assert ls.seen == []


def test_revoked_personal_access_token(ls: FakeLabelStudio) -> None:
    fetcher = image_fetcher(label_studio_url=ls.url, label_studio_token=personal_access_token())
    with pytest.raises(ImageAccessError, match="refused the personal access token.*expired, revoked"):
        fetcher.fetch(task("/data/upload/4/rgb.png"), "image")
    assert [seen.path for seen in ls.seen] == ["/api/token/refresh/"]


def test_threads_share_one_refresh(ls: FakeLabelStudio) -> None:
    fetcher = image_fetcher(label_studio_url=ls.url, label_studio_token=ls.personal_token)
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
# The token goes to Label Studio's origin only


def test_absolute_label_studio_url_gets_the_token(ls: FakeLabelStudio) -> None:
    legacy(ls).fetch(task(f"{ls.url}/data/upload/4/rgb.png"), "image")
    assert authorizations(ls, "/data/upload/") == [f"Token {ls.legacy_token}"]


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
    fetcher = image_fetcher(label_studio_url=f"http://127.0.0.1:{ls.port}/", label_studio_token="secret")
    fetcher.fetch(task(f"http://127.0.0.1:{cloud.port}/public/gray.png"), "image")  # would 400 on a leak


# ------------------------------------------------------------------------------------------------------
# Configuration: environment, /setup, bad values


def test_setup_supplies_what_the_environment_lacks(ls: FakeLabelStudio) -> None:
    fetcher = image_fetcher()
    with pytest.raises(ImageError, match="set LABEL_STUDIO_URL"):
        fetcher.fetch(task("/data/upload/4/rgb.png"), "image")
    fetcher.set_label_studio(ls.url, ls.legacy_token)
    fetcher.fetch(task("/data/upload/4/rgb.png"), "image")
    fetcher.set_label_studio(ls.url, "stale-token-from-setup")
    with pytest.raises(ImageAccessError, match="legacy token from the access_token Label Studio sent to /setup"):
        fetcher.fetch(task("/data/upload/4/rgb.png"), "image")


def test_environment_wins_over_setup(ls: FakeLabelStudio) -> None:
    fetcher = image_fetcher(label_studio_url=ls.url, label_studio_token=ls.personal_token)
    fetcher.set_label_studio("http://localhost:8080", "setup-legacy-token")
    fetcher.fetch(task("/data/upload/4/rgb.png"), "image")
    fetcher.set_label_studio("http://localhost:8080", "setup-legacy-token")  # every /health + /setup
    fetcher.fetch(task("/data/upload/4/rgb.png"), "image")
    fetcher.set_label_studio("http://other:8080", "another-token")  # overridden anyway: keeps the access token
    fetcher.fetch(task("/data/upload/4/rgb.png"), "image")
    assert ls.refreshes == 1
    assert all(sent.startswith("Bearer ") for sent in authorizations(ls, "/data/upload/"))


def test_bad_label_studio_urls() -> None:
    with pytest.raises(ValueError, match="must start with http:// or https://"):
        image_fetcher(label_studio_url="label-studio:8080")
    fetcher = image_fetcher(label_studio_token="x")
    fetcher.set_label_studio("localhost:8080", "x")
    with pytest.raises(ImageError, match="'localhost:8080' \\(from the hostname Label Studio sent to /setup\\) must"):
        fetcher.fetch(task("/data/upload/4/rgb.png"), "image")


def test_connection_refused_names_the_url_and_the_docker_hint() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    fetcher = image_fetcher(label_studio_url=url, label_studio_token="x", timeout_s=5)
    with pytest.raises(ImageAccessError) as caught:
        fetcher.fetch(task("/data/upload/4/rgb.png"), "image")
    message = caught.value.message
    assert f"Could not connect to Label Studio at {url} (from LABEL_STUDIO_URL)" in message
    assert "Docker" in message and "Set LABEL_STUDIO_URL" in message
    with pytest.raises(ImageAccessError, match=f"Could not connect to {url}/public/x.png"):
        image_fetcher().fetch(task(f"{url}/public/x.png"), "image")


# ------------------------------------------------------------------------------------------------------
# Queued jobs: a client of their own


class CachedSegmenter:
    """A segmenter whose cache holds every image: the encoder only fetches."""

    fingerprint = "test"
    cache = SimpleNamespace(contains=lambda fingerprint, sha256: True)


def test_a_job_fetches_with_its_own_client_and_leaves_the_process_client_alone(ls: FakeLabelStudio) -> None:
    """A `sam-backend worker` never gets /setup: the job names Label Studio, the token is the worker's own, and
    the job's client serves that job, not the request threads."""
    fetcher = image_fetcher(label_studio_url=ls.url, label_studio_token=ls.legacy_token)
    fetcher.set_label_studio(None, None)
    encode = make_encoder(CachedSegmenter(), fetcher)  # type: ignore[arg-type]
    job = WarmupJob(task=task("/data/upload/4/rgb.png"), value_key="image", label_studio_url=ls.url)
    assert encode(job) is False  # fetched (the fake cache already holds it)
    assert authorizations(ls, "/data/upload/") == [f"Token {ls.legacy_token}"]
    bare = image_fetcher()
    job_client = bare.label_studio_for(ls.url, None)
    assert job_client.url == ls.url and bare.label_studio.url is None
    with pytest.raises(ImageError, match="set LABEL_STUDIO_URL"):
        bare.fetch(task("/data/upload/4/rgb.png"), "image")


def test_the_environments_key_goes_nowhere_without_the_environments_url(ls: FakeLabelStudio) -> None:
    """LABEL_STUDIO_API_KEY without LABEL_STUDIO_URL: neither a /setup hostname nor a job's URL gets the key
    (anyone may call /setup); the refusal says which setting is missing. /setup's own token still works."""
    fetcher = image_fetcher(label_studio_token=ls.legacy_token)
    fetcher.set_label_studio(ls.url, None)
    with pytest.raises(ImageAccessError, match="no token was sent.*set LABEL_STUDIO_URL"):
        fetcher.fetch(task("/data/upload/4/rgb.png"), "image")
    with pytest.raises(ImageAccessError, match="no token was sent"):
        fetcher.fetch(task("/data/upload/4/rgb.png"), "image", label_studio=fetcher.label_studio_for(ls.url, None))
    assert authorizations(ls, "/data/upload/") == [None, None]
    fetcher.set_label_studio(ls.url, "setup-token")
    assert fetcher.label_studio.token == "setup-token"
    assert fetcher.label_studio.token_source == "the access_token Label Studio sent to /setup"


def test_job_clients_keep_their_access_token_and_the_environment_wins(ls: FakeLabelStudio) -> None:
    fetcher = image_fetcher()
    for _ in range(3):
        client = fetcher.label_studio_for(ls.url, ls.personal_token)
        fetcher.fetch(task("/data/upload/4/rgb.png"), "image", label_studio=client)
    assert ls.refreshes == 1
    assert fetcher.label_studio_for(None, None) is fetcher.label_studio
    configured = image_fetcher(label_studio_url=ls.url, label_studio_token=ls.legacy_token)
    assert configured.label_studio_for("http://localhost:8080", "setup-token") is configured.label_studio
    partial = image_fetcher(label_studio_url=ls.url).label_studio_for("http://localhost:8080", ls.legacy_token)
    assert (partial.url, partial.url_source) == (ls.url, "LABEL_STUDIO_URL")
    assert partial.token_source == "the access_token Label Studio sent to /setup"



def test_clients_from_request_values_are_bounded() -> None:
    """/setup bodies name the URL and token: a stream of new ones must not grow the process without limit."""
    clients = image_fetcher().label_studio_clients
    first = clients.client("http://ls-0:8080", "token")
    assert clients.client("http://ls-0:8080/", " token ") is first  # the same values in effect
    for i in range(1, MAX_CLIENTS + 1):
        clients.client(f"http://ls-{i}:8080", "token")
    assert clients.client("http://ls-0:8080", "token") is not first

# ------------------------------------------------------------------------------------------------------
# Label Studio's API, as `sam-backend warm --project` reads it


def test_api_errors_carry_the_upstream_status(ls: FakeLabelStudio) -> None:
    with pytest.raises(ImageAccessError) as missing:
        legacy(ls).label_studio.get_json("/api/nothing-here")
    assert missing.value.upstream_status == 404 and missing.value.status == 502
    with pytest.raises(ImageAccessError) as refused:
        image_fetcher(label_studio_url=ls.url, label_studio_token="wrong-token").label_studio.get_json(
            "/api/tasks")
    assert refused.value.upstream_status == 401


@pytest.mark.parametrize("count", [0, 3, 4, 9])
def test_task_pages_end_at_label_studios_invalid_page(ls: FakeLabelStudio, count: int) -> None:
    """A bare-list task API has no total: the listing ends at a short page or at the 404 after a full one."""
    ls.tasks = [task(f"/data/upload/1/{i}.png", task_id=i) for i in range(count)]
    listed = list(legacy(ls).label_studio.iter_tasks(1, page_size=3))
    assert [t["id"] for t in listed] == list(range(count))
    pages = [seen.path for seen in ls.seen if seen.path.startswith("/api/tasks")]
    assert len(pages) == count // 3 + 1
