"""The deployment files: linted by the tools people use on them, and checked for the mistakes that bite.

There is no Docker daemon on the test machines, so the image is not built here. What can be checked is
checked: hadolint on the Dockerfile, the Compose specification's JSON schema on both compose files, and
the few settings whose absence only shows up in the field ("localhost" inside Docker, a Redis without an
eviction policy, a GPU file that reserves no GPU, a backend variable with a typo that the backend would
never read).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO_ROOT

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


def _backend_variables() -> set[str]:
    """Every environment variable the backend reads: Settings.from_env plus gunicorn.conf.py."""
    source = (REPO_ROOT / "backend" / "config.py").read_text() + (REPO_ROOT / "gunicorn.conf.py").read_text()
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
    final_stage = instructions[max(i for i, (k, _) in enumerate(instructions) if k == "FROM"):]
    keywords = dict(final_stage)
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
