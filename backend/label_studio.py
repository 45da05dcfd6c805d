"""The Label Studio API client: where Label Studio is, how to authenticate to it, what the backend reads.

Everything the backend asks of Label Studio goes through a ``LabelStudioClient``: task images under
``/data/...`` and the ``/tasks/<id>/presign/`` redirects of cloud images (``backend.image_fetch``), and
the API that ``sam-backend warm`` and bulk jobs read (a project, its tasks). The client owns the URL and
the token, where each came from (so messages say which setting to change), the Authorization header, and
the origin check that decides which URLs get the token at all: only Label Studio's origin (scheme, host
and port), checked at every redirect hop by ``backend.http_download``.

The URL and token come from the environment (``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``: explicit
configuration), from POST /setup, or from a queued job that carries what its producer knew.
``LabelStudioClients`` resolves them: the environment wins field by field, because Label Studio's own
idea of its hostname (often http://localhost:8080) is frequently wrong from where the backend runs.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import requests
from tqdm import tqdm

from backend.errors import ImageAccessError, ImageError
from backend.http_download import Downloader, origin, remaining, request_failed, url_scheme
from backend.image_identity import Revalidation
from backend.label_config import parse_label_config

log = logging.getLogger(__name__)

# Refresh an access token this long before its `exp`, so it does not expire between check and use.
ACCESS_TOKEN_MARGIN_S = 30.0
# Lifetime assumed for an access token without `exp`; a 401 refreshes it earlier anyway.
ACCESS_TOKEN_DEFAULT_TTL_S = 300.0
# Tasks per page when listing a project (GET /api/tasks).
PAGE_SIZE = 100
# Clients kept per (URL, token) in effect: /setup and jobs name a handful at most; the bound keeps request
# bodies from growing the process without limit.
MAX_CLIENTS = 8


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


@dataclass(frozen=True)
class Project:
    """What warming or pre-annotating a project needs: its label config, image field and tasks."""

    id: int
    label_config: str
    value_key: str
    tasks: list[dict[str, Any]]


class LabelStudioClient:
    """One Label Studio: its URL, its token and the token's kind, and the requests the backend makes to it.

    Legacy tokens are sent as ``Token <key>``. Personal access tokens are JWT refresh tokens, which Label
    Studio does not accept on data URLs: they are exchanged at ``/api/token/refresh/`` for a short-lived
    access token sent as ``Bearer``. The access token is cached until shortly before its ``exp`` and
    refreshed on a 401; a lock makes threads that need one at the same time share one refresh.
    """

    def __init__(self, url: str | None, token: str | None, *, http: Downloader,
                 url_source: str = "LABEL_STUDIO_URL", token_source: str = "LABEL_STUDIO_API_KEY",
                 unused_key: bool = False) -> None:
        self.url = url.strip().rstrip("/") if url else None
        self.unused_key = unused_key  # LABEL_STUDIO_API_KEY is set but, without LABEL_STUDIO_URL, never sent
        self.url_source = url_source
        self.token = token.strip() if token else None
        self.token_source = token_source
        self.http = http
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
        self.origin = origin(self.url) if self.url else None
        self._lock = threading.Lock()
        self._access: str | None = self.token if self.kind == "access" else None
        self._access_exp = self.token_exp or float("inf")

    # ----------------------------------------------------------------------------------------------------
    # Where the token goes

    def is_label_studio(self, url: str) -> bool:
        """Whether ``url`` is on Label Studio's origin: the only place the token is ever sent."""
        return self.origin is not None and origin(url) == self.origin

    def base_url(self, value: str) -> str:
        """The Label Studio URL for a relative reference (``value``, named in the error), or a clear error."""
        if not self.url:
            raise ImageError(
                f"The task image '{value}' must be fetched through Label Studio, but the backend does not know "
                "where Label Studio is: set LABEL_STUDIO_URL (e.g. http://label-studio:8080) and LABEL_STUDIO_API_KEY "
                "in the backend's environment."
            )
        if url_scheme(self.url) is None or origin(self.url) is None:
            raise ImageError(
                f"The Label Studio URL '{self.url}' (from {self.url_source}) must be a plain http:// or "
                "https:// URL with a host and an optional port, e.g. http://label-studio:8080."
            )
        return self.url

    def presign_url(self, task_id: object, uri: str) -> str:
        """Label Studio's URL that redirects to a signed URL for the cloud object ``uri`` of the task."""
        if isinstance(task_id, str) and task_id.isdigit():
            task_id = int(task_id)
        if not isinstance(task_id, int) or isinstance(task_id, bool):
            raise ImageError(
                f"The task image {uri} is in cloud storage, which Label Studio signs per task, but the task "
                "has no id."
            )
        fileuri = base64.urlsafe_b64encode(uri.encode()).decode()
        return f"{self.base_url(uri)}/tasks/{task_id}/presign/?fileuri={fileuri}"

    # ----------------------------------------------------------------------------------------------------
    # Authentication

    def headers(self, deadline: float) -> dict[str, str]:
        """The Authorization header for a request to Label Studio (none without a token)."""
        if self.kind == "none":
            return {}
        if self.kind == "legacy":
            return {"Authorization": f"Token {self.token}"}
        return {"Authorization": f"Bearer {self._access_token(deadline)}"}

    def can_refresh(self) -> bool:
        return self.kind == "refresh"

    def forget_access_token(self, header: str) -> None:
        """Drop the cached access token that Label Studio just refused, unless another thread replaced it."""
        with self._lock:
            if self._access is not None and header == f"Bearer {self._access}":
                self._access = None

    def _access_token(self, deadline: float) -> str:
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
            timeout = remaining(deadline, url)
            with self.http.guard.hop(deadline) as hop:
                try:
                    response = self.http.session.post(url, json={"refresh": self.token}, timeout=timeout,
                                                      allow_redirects=False)
                except requests.RequestException as exc:
                    raise request_failed(exc, url, timeout, self, hop.fired) from None
                with response:
                    if hop.fired:
                        raise request_failed(requests.Timeout(), url, timeout, self, True)
                    access = self._refresh_answer(response, url)
            self._access = access
            self._access_exp = _exp(_jwt_claims(access)) or time.time() + ACCESS_TOKEN_DEFAULT_TTL_S
            log.info("exchanged the personal access token for an access token at %s", url)
            return access

    def _refresh_answer(self, response: requests.Response, url: str) -> str:
        """The access token from a /api/token/refresh/ answer, or the error that says why there is none."""
        status = response.status_code
        if status in (401, 403):
            raise ImageAccessError(
                f"Label Studio refused the personal access token from {self.token_source} at {url} (HTTP {status}): "
                "it is expired, revoked or from another Label Studio. Create a new one in Label Studio > Account & "
                "Settings > Personal Access Token, or use a legacy token."
            )
        if status == 404:
            raise ImageAccessError(
                f"Label Studio at {self.url} has no token refresh endpoint ({url} answered 404): this version does "
                "not know personal access tokens. Set LABEL_STUDIO_API_KEY to the legacy token (Account & Settings)."
            )
        if status != 200:
            raise ImageAccessError(f"Label Studio answered HTTP {status} when refreshing the access token at {url}.")
        try:
            access = response.json().get("access")
        except (ValueError, AttributeError):
            access = None
        if not isinstance(access, str) or not access:
            raise ImageAccessError(f"Label Studio's answer at {url} has no access token: is {self.url} Label Studio?")
        return access

    def refused(self, status: int, url: str) -> ImageAccessError:
        """The message for a 401/403 from Label Studio: which token was sent, and what to change."""
        where = f"Label Studio refused {'the request' if '/api/' in url else 'the image'} {url} (HTTP {status})"
        if self.kind == "none" and self.unused_key:
            message = (
                f"{where}: no token was sent. LABEL_STUDIO_API_KEY is set, but it is only ever sent to "
                "LABEL_STUDIO_URL, which is unset: set LABEL_STUDIO_URL to this Label Studio's URL."
            )
        elif self.kind == "none":
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

    # ----------------------------------------------------------------------------------------------------
    # The API

    def get_json(self, path: str, params: dict[str, Any] | None = None) -> Any:
        """GET a Label Studio API path as JSON, with the same token handling and limits as task images.

        So a token that works for images works for the API, with the same messages when it does not.
        """
        url = self.base_url(path) + path + (f"?{urlencode(params)}" if params else "")
        data, _ = self.http.get(url, self, self.http.deadline())
        try:
            return json.loads(data)
        except ValueError:
            raise ImageAccessError(f"Label Studio answered {url} with something that is not JSON: is "
                                   f"{self.url} (from {self.url_source}) really Label Studio?") from None

    def clock(self, path: str) -> str | None:
        """Label Studio's own time now: the ``Date`` header of its answer to GET ``path`` (an RFC 9110 date,
        whole seconds), or None when the answer has none. Timestamps compared with the ``created_at`` Label
        Studio writes must come from its clock, never this machine's, which may be off."""
        seen = Revalidation()
        self.http.get(self.base_url(path) + path, self, self.http.deadline(), revalidation=seen)
        return seen.date

    def iter_tasks(self, project_id: int, page_size: int = PAGE_SIZE,
                   fields: str | None = None) -> Iterator[dict[str, Any]]:
        """Every task of the project, page by page (``GET /api/tasks``: ``{"tasks": [...], "total": N}``).

        ``fields="all"`` adds each task's ``annotations`` and ``predictions`` (with their results).
        """
        page, seen = 1, 0
        while True:
            params: dict[str, Any] = {"project": project_id, "page": page, "page_size": page_size}
            if fields:
                params["fields"] = fields
            try:
                body = self.get_json("/api/tasks", params)
            except ImageAccessError as error:
                if page > 1 and error.upstream_status == 404:  # past the last page
                    return
                raise
            tasks = body.get("tasks", []) if isinstance(body, dict) else body
            total = body.get("total") if isinstance(body, dict) else None
            yield from tasks
            seen += len(tasks)
            if len(tasks) < page_size or (total is not None and seen >= total):
                return
            page += 1

    def task(self, task_id: int) -> dict[str, Any]:
        """One task with its ``annotations`` and ``predictions`` (``GET /api/tasks/<id>``)."""
        task = self.get_json(f"/api/tasks/{int(task_id)}")
        if not isinstance(task, dict) or "data" not in task:
            raise ImageAccessError(f"Label Studio did not answer task {task_id} with a task")
        return task

    def create_prediction(self, task_id: int, result: list[Any], score: float | None,
                          model_version: str) -> dict[str, Any]:
        """Store a prediction on a task (``POST /api/predictions``, answered 201 with the prediction)."""
        body = {"task": int(task_id), "result": result, "score": score, "model_version": model_version}
        created = self.send_json("POST", "/api/predictions", body)
        if not isinstance(created, dict) or "id" not in created:
            raise ImageAccessError(f"Label Studio did not answer the prediction for task {task_id} with one")
        return created

    def delete_prediction(self, prediction_id: int) -> None:
        """Delete one prediction (``DELETE /api/predictions/<id>``, 204); one already gone is no error."""
        try:
            self.send_json("DELETE", f"/api/predictions/{int(prediction_id)}")
        except ImageAccessError as error:
            if error.upstream_status != 404:
                raise

    def send_json(self, method: str, path: str, body: Any = None) -> Any:
        """``method`` (POST, PATCH, DELETE) on a Label Studio API path with a JSON body; the answer's JSON.

        The token is sent as for ``get_json``, a refreshable token is refreshed once on a 401, and a refusal
        says which token was sent. Any other answer from 400 up is an ``ImageAccessError`` with the status
        and Label Studio's own explanation (its ``detail`` and ``validation_errors``).
        """
        url = self.base_url(path) + path
        deadline = self.http.deadline()
        retried = False
        while True:
            headers = self.headers(deadline)
            timeout = remaining(deadline, url)
            with self.http.guard.hop(deadline) as hop:
                try:
                    response = self.http.session.request(method, url, json=body, headers=headers,
                                                         timeout=timeout, allow_redirects=False)
                    content = response.content  # read inside the deadline: a dripping answer is cut
                except requests.RequestException as exc:
                    raise request_failed(exc, url, timeout, self, hop.fired) from None
                if hop.fired:  # an answer cut at the deadline can look complete
                    raise request_failed(requests.Timeout(), url, timeout, self, True)
            with response:
                status = response.status_code
                if status == 401 and self.can_refresh() and not retried:
                    self.forget_access_token(headers.get("Authorization", ""))
                    retried = True
                    continue
                if status in (401, 403):
                    raise self.refused(status, url)
                if status >= 300:
                    raise ImageAccessError(f"Label Studio answered {method} {url} with HTTP {status}: "
                                           f"{_explanation(response)}", upstream_status=status)
                if not content:
                    return None
                try:
                    return response.json()
                except ValueError:
                    raise ImageAccessError(f"Label Studio answered {method} {url} with something that is not "
                                           f"JSON: is {self.url} (from {self.url_source}) really Label Studio?"
                                           ) from None

    def read_project(self, project_id: int, progress: bool = False) -> Project:
        """The project's label config, image field and tasks (id and data only); ``progress`` shows a bar."""
        project = self.get_json(f"/api/projects/{project_id}")
        if not isinstance(project, dict) or "label_config" not in project:
            raise ImageAccessError(f"Label Studio did not answer project {project_id} with a project")
        value_key = parse_label_config(project["label_config"]).image.value_key
        tasks = []
        with tqdm(total=project.get("task_number"), desc=f"listing project {project_id}", unit="task",
                  disable=not progress) as bar:
            for task in self.iter_tasks(project_id):
                tasks.append({"id": task.get("id"), "data": task.get("data", {})})
                bar.update(1)
        return Project(id=project_id, label_config=project["label_config"], value_key=value_key, tasks=tasks)


def _explanation(response: requests.Response) -> str:
    """What Label Studio said about a refused request: its ``detail`` and ``validation_errors``, else the text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason
    if isinstance(body, dict):
        parts = [str(body[key]) for key in ("detail", "validation_errors") if body.get(key)]
        if parts:
            return "; ".join(parts)[:600]
    return json.dumps(body)[:300]


class LabelStudioClients:
    """The Label Studio clients of one process, by the URL and token in effect.

    The environment's values win field by field over those /setup or a job names. One client is kept per
    (URL, token) in effect, so a personal access token is exchanged once per process and not once per
    /health check or per job, and a job gets a client of its own without changing the one request threads
    use. All clients share one ``Downloader`` (one connection pool).
    """

    def __init__(self, url: str | None, token: str | None, http: Downloader) -> None:
        if url and not re.match(r"^https?://[^/]", url.strip(), re.IGNORECASE):
            raise ValueError(
                f"LABEL_STUDIO_URL must start with http:// or https:// (got {url!r}), e.g. http://label-studio:8080"
            )
        self.env_url = url.strip() if url else None
        self.env_token = token.strip() if token else None
        self.http = http
        self._clients: OrderedDict[tuple[str | None, str | None], LabelStudioClient] = OrderedDict()
        self._lock = threading.Lock()
        if self.env_token and not self.env_url:
            log.warning(
                "LABEL_STUDIO_API_KEY is set without LABEL_STUDIO_URL, so it is not used: it is sent nowhere, "
                "since only LABEL_STUDIO_URL says where Label Studio is (a hostname from POST /setup can come "
                "from anyone). Set LABEL_STUDIO_URL (e.g. http://label-studio:8080) to use it."
            )

    def client(self, url: str | None = None, token: str | None = None) -> LabelStudioClient:
        """The client for ``url`` and ``token`` (from /setup or a job) with the environment's values winning.

        The environment's token goes to the environment's URL only. Without ``LABEL_STUDIO_URL`` the URL comes
        from /setup, which any caller can reach, so ``LABEL_STUDIO_API_KEY`` is not used at all: the first
        caller of /setup must not be able to name a host of its own and receive the key with the next image
        fetch. A token that /setup itself sends goes with the hostname sent beside it, as Label Studio pairs them.
        """
        if self.env_url:
            url, token = self.env_url, self.env_token or token
        key = ((url.strip().rstrip("/") or None) if url else None, (token.strip() or None) if token else None)
        with self._lock:
            known = self._clients.get(key)
            if known is not None:
                self._clients.move_to_end(key)
                return known
            client = LabelStudioClient(
                *key, http=self.http,
                url_source="LABEL_STUDIO_URL" if self.env_url else "the hostname Label Studio sent to /setup",
                token_source=("LABEL_STUDIO_API_KEY" if self.env_url and self.env_token
                              else "the access_token Label Studio sent to /setup"),
                unused_key=bool(self.env_token and not self.env_url),
            )
            self._clients[key] = client
            if len(self._clients) > MAX_CLIENTS:
                self._clients.popitem(last=False)
            return client
