"""A real Label Studio 1.23.2 and a real `sam-backend serve`, each in its own process, for e2e tests and benchmarks.

Why a real Label Studio rather than recorded requests: the recorded bodies in the shared fixtures tell us
what Label Studio sends, but only Label Studio itself can tell us whether it accepts what we answer (result
shape, one prediction per task, a model_version it stores, an RLE the browser decodes). Label Studio lives
in its own virtualenv (.venv-labelstudio, made by scripts/test) because its pins differ from ours; it is
started once per test session on a free port with a fresh data directory, so tests never see a user's
Label Studio or each other's leftovers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests

from testsupport.backend import SAM_BACKEND
from testsupport.paths import REPO_ROOT
from testsupport.processes import free_port, stop_process_group, wait_healthy

LABEL_STUDIO_BIN = REPO_ROOT / ".venv-labelstudio" / "bin" / "label-studio"
LABEL_STUDIO_START_TIMEOUT_S = 300.0  # ~30 s idle; 155 s seen on a loaded 2-core machine (fresh SQLite migrations)
BACKEND_START_TIMEOUT_S = 120.0
USERNAME = "e2e@example.com"
PASSWORD = "e2e-password-0123"
# A legacy API token: Label Studio creates the first user with it, and the backend sends it as `Token <key>`.
API_TOKEN = "e2etoken0123456789abcdef0123456789abcdef"


class LabelStudio:
    """One Label Studio server process plus the few API calls the tests need.

    Every call checks its status and fails the test with Label Studio's own answer, because a bare
    "400 Bad Request" from deep inside a test says nothing about which field Label Studio disliked.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.data_dir = workdir / "data"
        self.files_dir = workdir / "files"  # LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT
        self.log = workdir / "label-studio.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {API_TOKEN}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("LABEL_STUDIO_", "HEARTEX_", "DJANGO_", "ML_TIMEOUT_"))}
        env.update({
            "LABEL_STUDIO_USERNAME": USERNAME,
            "LABEL_STUDIO_PASSWORD": PASSWORD,
            "LABEL_STUDIO_USER_TOKEN": API_TOKEN,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            # Both are needed for a backend on 127.0.0.1; Label Studio refuses loopback URLs otherwise.
            "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false",
            "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(self.files_dir),
            "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir),
            # No outside network here, and none wanted from a test.
            "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "", "COLLECT_ANALYTICS": "false",
            "LATEST_VERSION_CHECK": "false",
            # Label Studio gives /health 1 s and /setup 3 s. On a shared 2-core CI machine a healthy backend
            # can miss that while another process hogs the CPU, and Label Studio then silently skips it.
            # Response times are measured in bench/, not asserted here.
            "ML_TIMEOUT_HEALTH": "10",
            "ML_TIMEOUT_SETUP": "30",
        })
        return env

    def start(self, timeout: float = LABEL_STUDIO_START_TIMEOUT_S) -> None:
        if not LABEL_STUDIO_BIN.exists():
            pytest.fail(f"Label Studio 1.23.2 is not installed at {LABEL_STUDIO_BIN.parent.parent}; "
                        "run scripts/test once, it creates .venv-labelstudio "
                        "(pip install 'label-studio==1.23.2' in its own virtualenv)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.files_dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [str(LABEL_STUDIO_BIN), "start", "--no-browser", "--internal-host", "127.0.0.1",
                 "-p", str(self.port)],
                env=self.environment(), cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        wait_healthy(f"{self.url}/health", self.process, self.log, "Label Studio", timeout)

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)
            self.process = None

    # -- API

    def request(self, method: str, path: str, expect: tuple[int, ...] = (200, 201), **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", 300)
        response = self.session.request(method, f"{self.url}{path}", **kwargs)
        if response.status_code not in expect:
            pytest.fail(f"Label Studio {method} {path} answered {response.status_code}: {response.text[:2000]}")
        return response.json() if response.content else None

    def create_project(self, title: str, label_config: str) -> int:
        return self.request("POST", "/api/projects", json={"title": title, "label_config": label_config})["id"]

    def upload_images(self, project: int, paths: list[Path]) -> list[dict[str, Any]]:
        """Upload image files (one multipart field per file); Label Studio makes one task per file."""
        handles = [path.open("rb") for path in paths]
        try:
            files = {f"file{i}": (path.name, handle) for i, (path, handle) in enumerate(zip(paths, handles, strict=True))}
            answer = self.request("POST", f"/api/projects/{project}/import", files=files)
        finally:
            for handle in handles:
                handle.close()
        assert answer["task_count"] == len(paths), answer
        return self.tasks(project)

    def import_tasks(self, project: int, tasks: list[dict[str, Any]]) -> None:
        answer = self.request("POST", f"/api/projects/{project}/import", json=tasks)
        assert answer["task_count"] == len(tasks), answer

    def add_local_storage(self, project: int, path: Path) -> dict[str, Any]:
        """A "Local files" source storage: Label Studio serves /data/local-files/?d=<path under the document
        root> only for folders some project of the user has such a storage for."""
        return self.request("POST", "/api/storages/localfiles", json={
            "project": project, "path": str(path), "title": path.name, "use_blob_urls": True})

    def tasks(self, project: int) -> list[dict[str, Any]]:
        answer = self.request("GET", "/api/tasks", params={"project": project, "page_size": 1000})
        return sorted(answer["tasks"], key=lambda task: task["id"])

    def add_ml_backend(self, project: int, url: str, title: str = "SAM") -> dict[str, Any]:
        """Connect an ML backend the way the UI's "Add Model" does (Label Studio calls /health and /setup)."""
        return self.request("POST", "/api/ml", json={"url": url, "project": project, "title": title,
                                                     "is_interactive": True})

    def interactive_annotating(self, ml_backend: int, task: int, regions: list[dict[str, Any]]) -> dict[str, Any]:
        """What the smart tools do in the browser: Label Studio forwards `regions` as `context.result`."""
        return self.request("POST", f"/api/ml/{ml_backend}/interactive-annotating",
                            json={"task": task, "context": {"result": regions}})

    def retrieve_predictions(self, project: int) -> dict[str, Any]:
        """The Data Manager's "Retrieve predictions" action on every task of the project."""
        return self.request("POST", "/api/dm/actions",
                            params={"id": "retrieve_tasks_predictions", "project": project},
                            json={"selectedItems": {"all": True, "excluded": []}})

    def predictions(self, project: int) -> list[dict[str, Any]]:
        return self.request("GET", "/api/predictions", params={"project": project})


class SamBackend:
    """`sam-backend serve` on a free port, exactly as a user starts it, configured only by environment."""

    def __init__(self, workdir: Path, checkpoint: Path, label_studio: LabelStudio) -> None:
        self.workdir = workdir
        self.checkpoint = checkpoint
        self.label_studio = label_studio
        self.port = free_port()
        self.log = workdir / "sam-backend.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("SAM_", "LABEL_STUDIO_", "REDIS_"))}
        env.update({
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "SAM_CHECKPOINT": str(self.checkpoint),
            "SAM_DEVICE": "cpu",
            "SAM_DTYPE": "fp32",
            "SAM_TORCH_THREADS": "1",
            "SAM_BATCH_MODE": "boxes",
            "SAM_OUTPUT": "brush",
            "MODEL_DIR": str(self.workdir),
            "LABEL_STUDIO_URL": self.label_studio.url,
            "LABEL_STUDIO_API_KEY": API_TOKEN,
            "WORKERS": "1",
            "THREADS": "4",
            "LOG_LEVEL": "INFO",
        })
        return env

    def start(self, timeout: float = BACKEND_START_TIMEOUT_S) -> None:
        command = [str(SAM_BACKEND), "serve"] if SAM_BACKEND.exists() else [sys.executable, "-m", "backend.cli", "serve"]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(command, env=self.environment(), cwd=REPO_ROOT,
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        wait_healthy(f"{self.url}/health", self.process, self.log, "sam-backend serve", timeout)

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)
            self.process = None
