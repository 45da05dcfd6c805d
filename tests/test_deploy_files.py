"""The deployment files: linted by the tools people use on them, and checked for the mistakes that bite.

There is no Docker daemon on the test machines, so the image is not built here. What can be checked is
checked: hadolint on the Dockerfile, the Compose specification's JSON schema on both compose files, and
the few settings whose absence only shows up in the field ("localhost" inside Docker, a Redis without an
eviction policy, a GPU file that reserves no GPU, a backend variable with a typo that the backend would
never read).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from testsupport.paths import REPO_ROOT
from testsupport.processes import free_port

DOCKERFILE = REPO_ROOT / "Dockerfile"
COMPOSE = REPO_ROOT / "docker-compose.yml"
COMPOSE_GPU = REPO_ROOT / "docker-compose.gpu.yml"
VENV_BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(VENV_BIN)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; install the test extra: pip install -e '.[test]'")
    return path


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def _compose(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def _final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile_instructions()
    return instructions[max(i for i, (key, _) in enumerate(instructions) if key == "FROM"):]


def _backend_variables() -> set[str]:
    """Every environment variable the backend reads: Settings.from_env plus the gunicorn settings."""
    source = (REPO_ROOT / "backend" / "config.py").read_text() + (REPO_ROOT / "backend" / "gunicorn_conf.py").read_text()
    return set(re.findall(r"""["']([A-Z][A-Z0-9_]+)["']""", source))


def test_hadolint_passes() -> None:
    result = _run([_tool("hadolint"), "--failure-threshold", "info", str(DOCKERFILE)])
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU], ids=lambda p: p.name)
def test_compose_files_follow_the_compose_specification(path: Path) -> None:
    result = _run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)])
    assert result.returncode == 0, f"check-jsonschema {path.name}:\n{result.stdout}{result.stderr}"


def test_dockerfile_runs_the_backend_as_a_non_root_user_with_a_healthcheck() -> None:
    instructions = _dockerfile_instructions()
    keywords = dict(_final_stage())
    assert keywords["USER"] not in ("root", "0", "0:0"), keywords["USER"]
    assert keywords["EXPOSE"] == "9090"
    assert "/health" in keywords["HEALTHCHECK"]
    assert keywords["CMD"] == '["sam-backend", "serve"]'
    assert "/models" in keywords["VOLUME"]
    base = next(rest for key, rest in instructions if key == "ARG" and rest.startswith("BASE_IMAGE="))
    assert base == "BASE_IMAGE=python:3.11-slim"
    # CPU wheels unless the CUDA index is asked for, so a CPU image does not carry GBs of CUDA libraries.
    assert any(key == "ARG" and rest.endswith("/whl/cpu") for key, rest in instructions)


def test_dockerfile_copies_only_what_exists_and_is_not_ignored() -> None:
    ignored = {line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", ".venv-*", "*.pth"} <= ignored
    for key, rest in _dockerfile_instructions():
        if key == "COPY" and "--from=" not in rest:
            for source in rest.split()[:-1]:
                assert (REPO_ROOT / source).exists(), f"COPY {source}: no such file in the repository"
                assert source not in ignored, f"COPY {source}: excluded by .dockerignore"


def test_compose_wires_label_studio_backend_and_redis_together() -> None:
    services = _compose(COMPOSE)["services"]
    assert services["label-studio"]["image"] == "heartexlabs/label-studio:1.23.2"
    studio = services["label-studio"]["environment"]
    assert studio["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    assert studio["LABEL_STUDIO_ML_BLOCK_LOCAL_IP"] == "false"
    backend = services["sam-backend"]
    env = backend["environment"]
    # Inside Docker, localhost is the backend's own container: the most common cause of 401s / timeouts.
    assert env["LABEL_STUDIO_URL"] == "http://label-studio:8080"
    assert not any("localhost" in str(value) or "127.0.0.1" in str(value) for value in env.values())
    assert env["REDIS_URL"].startswith("redis://redis:")
    assert env["MODEL_DIR"] == "/models" and any(v.endswith(":/models") for v in backend["volumes"])
    assert backend["build"]["context"] == "."
    redis_command = " ".join(services["redis"]["command"])
    assert "--maxmemory-policy allkeys-lru" in redis_command and "--maxmemory " in redis_command


def test_compose_sets_only_variables_the_backend_reads() -> None:
    known = _backend_variables()
    for path in (COMPOSE, COMPOSE_GPU):
        env = _compose(path)["services"]["sam-backend"].get("environment", {})
        unknown = sorted(set(env) - known)
        assert not unknown, f"{path.name}: the backend reads no variable named {unknown}"


def test_gpu_override_reserves_an_nvidia_gpu_and_selects_cuda() -> None:
    backend = _compose(COMPOSE_GPU)["services"]["sam-backend"]
    devices = backend["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "cuda" in backend["environment"]["SAM_DEVICE"]
    assert "/whl/cu" in backend["build"]["args"]["TORCH_INDEX_URL"]


def test_the_image_layout_serves_with_the_default_settings(tmp_path: Path) -> None:
    """Rebuild the runtime stage's file layout and environment outside Docker (no daemon here) and run its
    CMD and HEALTHCHECK: catches a file the server needs that the image does not copy, an ENV that points
    nowhere, or a default SAM_CHECKPOINT that MODEL_DIR cannot resolve.

    The stage's venv is stood in for by this test environment; the checkpoint is a tiny random one saved
    under the official ViT-B file name, as a user would drop the real one into the models volume.
    """
    from testsupport.backend import make_tiny_checkpoint

    stage = _final_stage()
    app = tmp_path / "app"
    workdir = next(rest for key, rest in stage if key == "WORKDIR")
    assert workdir == "/app"
    for key, rest in stage:
        if key == "COPY" and "--from=" not in rest:
            *sources, destination = rest.split()
            for source in sources:
                target = app / destination / Path(source).name if destination.endswith("/") else app / destination
                target.parent.mkdir(parents=True, exist_ok=True)
                copy = shutil.copytree if (REPO_ROOT / source).is_dir() else shutil.copy2
                copy(REPO_ROOT / source, target)
    image_env: dict[str, str] = {}
    for key, rest in stage:
        if key == "ENV":
            image_env.update(pair.split("=", 1) for pair in rest.split())
    models = tmp_path / "models"
    models.mkdir()
    assert image_env["MODEL_DIR"] == "/models" and image_env["SAM_CHECKPOINT"] == "vit_b"
    make_tiny_checkpoint(models / "sam_vit_b_01ec64.pth")

    port = free_port()
    env = {name: value for name, value in os.environ.items() if name not in ("PYTHONPATH",)}
    env.update(image_env)
    env.update({"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(app),
                "MODEL_DIR": str(models), "HOST": "127.0.0.1", "PORT": str(port), "SAM_TORCH_THREADS": "1"})
    where = subprocess.run([sys.executable, "-c", "import backend.cli as c; print(c.GUNICORN_CONF)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.strip() == "python:backend.gunicorn_conf", where.stdout + where.stderr
    command = json.loads(dict(stage)["CMD"])
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, health = time.monotonic() + 120, {}
        while time.monotonic() < deadline and not health.get("model_loaded"):
            assert process.poll() is None, f"{command} exited with {process.returncode}:\n{log.read_text()}"
            with contextlib.suppress(requests.RequestException):
                health = requests.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
            assert "model_error" not in health, health
            time.sleep(0.5)
        assert health.get("model_loaded"), f"no model after 120 s: {health}\n{log.read_text()[-3000:]}"
        healthcheck = json.loads(dict(stage)["HEALTHCHECK"].split(" CMD ", 1)[1])
        assert healthcheck[0] == "python"
        probe = subprocess.run([sys.executable, *healthcheck[1:]], env=env, capture_output=True, text=True,
                               timeout=30)
        assert probe.returncode == 0, probe.stderr
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
