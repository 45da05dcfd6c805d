"""Settings.from_env: defaults, every variable read, and one clear error per bad value."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from backend.config import DTYPES, Settings, SettingsError, parse_label_map
from model.download import CHECKPOINTS

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_defaults_from_an_empty_environment() -> None:
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.port == 9090 and settings.host == "0.0.0.0"
    assert settings.sam_device == "auto" and settings.sam_dtype == "auto" and settings.sam_compile is False
    assert settings.redis_url == "" and settings.basic_auth is None
    assert settings.sam_output == "auto" and settings.sam_batch_mode == "boxes" and settings.label_map == {}
    assert settings.checkpoint_path == Path("models") / CHECKPOINTS["vit_b"].filename


def test_every_variable_is_read() -> None:
    env = {
        "LABEL_STUDIO_URL": "http://label-studio:8080/", "LABEL_STUDIO_API_KEY": "abc",
        "BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "p", "MODEL_DIR": "/data/models", "WORKERS": "2",
        "THREADS": "8", "TIMEOUT": "120", "LOG_LEVEL": "debug", "PORT": "9091", "HOST": "127.0.0.1",
        "SAM_CHECKPOINT": "mobile_sam", "SAM_DEVICE": "cuda:1", "SAM_DTYPE": "bf16", "SAM_COMPILE": "yes",
        "SAM_TORCH_THREADS": "3", "LOCAL_FILES_ROOT": "/data/files", "IMAGE_TIMEOUT_S": "2.5",
        "IMAGE_MAX_MB": "1.5", "IMAGE_MAX_PIXELS": "1000", "REDIS_URL": "redis://redis:6379/0",
        "SAM_CACHE_MEMORY_MB": "256", "SAM_CACHE_TTL_S": "60", "SAM_OUTPUT": "Polygon",
        "SAM_LABEL_MAP": "Click = Car; Tree=Plant;", "SAM_BATCH_MODE": "everything",
    }
    s = Settings.from_env(env)
    assert s.label_studio_url == "http://label-studio:8080"  # trailing slash dropped
    assert s.label_studio_api_key == "abc" and s.basic_auth == ("u", "p")
    assert (s.workers, s.threads, s.timeout_s, s.log_level, s.port, s.host) == (2, 8, 120, "DEBUG", 9091,
                                                                                "127.0.0.1")
    assert s.checkpoint_name == "vit_t" and s.checkpoint_path == Path("/data/models/mobile_sam.pt")
    assert (s.sam_device, s.sam_dtype, s.sam_compile, s.sam_torch_threads) == ("cuda:1", "bf16", True, 3)
    assert s.local_files_root == Path("/data/files")
    assert s.image_timeout_s == 2.5 and s.image_max_bytes == int(1.5 * 2**20) and s.image_max_pixels == 1000
    assert s.redis_url == "redis://redis:6379/0"
    assert s.sam_cache_memory_mb == 256 and s.cache_memory_bytes == 256 * 2**20 and s.sam_cache_ttl_s == 60
    assert s.sam_output == "polygon" and s.sam_batch_mode == "everything"
    assert s.label_map == {"Click": "Car", "Tree": "Plant"}
    hash(s)  # frozen and hashable: safe to share between threads


def test_empty_values_count_as_unset() -> None:
    assert Settings.from_env({"PORT": "", "SAM_DEVICE": " ", "REDIS_URL": ""}) == Settings()


def test_checkpoint_paths(tmp_path: Path) -> None:
    assert Settings.from_env({"SAM_CHECKPOINT": "VIT_H", "MODEL_DIR": str(tmp_path)}).checkpoint_path == \
        tmp_path / "sam_vit_h_4b8939.pth"
    custom = tmp_path / "mine.pth"
    assert Settings.from_env({"SAM_CHECKPOINT": str(custom)}).checkpoint_path == custom
    settings = Settings.from_env({"SAM_CHECKPOINT": "finetune.pth", "MODEL_DIR": str(tmp_path)})
    assert settings.checkpoint_name is None and settings.checkpoint_path == tmp_path / "finetune.pth"


@pytest.mark.parametrize("raw, expected", [("1", True), ("true", True), ("YES", True), ("on", True),
                                           ("0", False), ("False", False), ("no", False)])
def test_booleans(raw: str, expected: bool) -> None:
    assert Settings.from_env({"SAM_COMPILE": raw}).sam_compile is expected


@pytest.mark.parametrize("variable, value", [
    ("PORT", "http"), ("PORT", "70000"), ("WORKERS", "0"), ("THREADS", "2.5"), ("LOG_LEVEL", "loud"),
    ("SAM_DEVICE", "gpu"), ("SAM_DEVICE", "cuda:x"), ("SAM_DTYPE", "fp8"), ("SAM_COMPILE", "maybe"),
    ("SAM_TORCH_THREADS", "-1"), ("IMAGE_TIMEOUT_S", "0"), ("IMAGE_TIMEOUT_S", "nan"), ("IMAGE_MAX_MB", "x"),
    ("IMAGE_MAX_PIXELS", "0"), ("REDIS_URL", "localhost:6379"), ("SAM_CACHE_MEMORY_MB", "-5"),
    ("SAM_OUTPUT", "mask"), ("SAM_BATCH_MODE", "all"), ("SAM_ENCODE_BATCH", "0"), ("SAM_ENCODE_BATCH", "many"), ("SAM_LABEL_MAP", "Click"),
    ("SAM_LABEL_MAP", "Click=;"), ("LABEL_STUDIO_URL", "localhost:8080"),
])
def test_invalid_values_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({variable: value})
    assert caught.value.variable == variable
    assert str(caught.value).startswith(f"{variable}={value!r} is invalid: ")


def test_basic_auth_needs_both_halves() -> None:
    with pytest.raises(SettingsError, match="BASIC_AUTH_PASS"):
        Settings.from_env({"BASIC_AUTH_USER": "u"})
    with pytest.raises(SettingsError, match="BASIC_AUTH_USER"):
        Settings.from_env({"BASIC_AUTH_PASS": "p"})


def test_label_studio_local_files_variable_is_a_fallback() -> None:
    env = {"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": "/ls"}
    assert Settings.from_env(env).local_files_root == Path("/ls")
    assert Settings.from_env({**env, "LOCAL_FILES_ROOT": "/ours"}).local_files_root == Path("/ours")


def test_label_map_keeps_case_and_trims_spaces() -> None:
    assert parse_label_map(" a b = C ;;x=y") == {"a b": "C", "x": "y"}


def test_every_field_is_documented() -> None:
    """docs/configuration.md has a table row for each variable Settings reads."""
    doc = (REPO_ROOT / "docs" / "configuration.md").read_text()
    rows = set(re.findall(r"^\|\s*`([A-Z_]+)`", doc, flags=re.MULTILINE))
    source = (REPO_ROOT / "backend" / "config.py").read_text()
    read = set(re.findall(r'env\.\w+\("([A-Z_]+)"', source))
    assert len(read) >= len(fields(Settings)), "every Settings field comes from a variable"
    assert read <= rows, f"undocumented: {sorted(read - rows)}"


def test_official_checkpoint_names_match_the_download_table() -> None:
    """SAM_CHECKPOINT=vit_b must find the very file `sam-backend download vit_b` writes."""
    from model.download import resolve

    for name in CHECKPOINTS:
        assert Settings(sam_checkpoint=name).checkpoint_path == Path("models") / resolve(name).filename, name


def test_dtype_settings_are_the_runtime_dtypes() -> None:
    """SAM_DTYPE accepts exactly the names model.runtime gives a meaning to."""
    from model.runtime import DTYPES as RUNTIME_DTYPES

    assert tuple(RUNTIME_DTYPES) == DTYPES


def test_encode_batch_is_by_device_unless_set() -> None:
    """SAM_ENCODE_BATCH=auto: 4 images per encoder run on a GPU, 1 on a CPU (where batching measured slower)."""
    from model.runtime import encode_batch_size

    assert Settings.from_env({}).sam_encode_batch == Settings.from_env({"SAM_ENCODE_BATCH": "auto"}).sam_encode_batch == 0
    assert Settings.from_env({"SAM_ENCODE_BATCH": "8"}).sam_encode_batch == 8
    assert (encode_batch_size("cpu"), encode_batch_size("cuda:1"), encode_batch_size("cpu", 3)) == (1, 4, 3)


def test_cache_memory_is_sized_for_the_device_unless_set() -> None:
    from model.runtime import default_cache_bytes

    assert Settings.from_env({}).cache_memory_bytes is None
    assert Settings.from_env({"SAM_CACHE_MEMORY_MB": "auto"}).cache_memory_bytes is None
    assert Settings.from_env({"SAM_CACHE_MEMORY_MB": "0"}).cache_memory_bytes == 0
    assert 256 << 20 <= default_cache_bytes("cpu") <= 2 << 30


def test_device_setting_as_the_model_takes_it() -> None:
    assert Settings().device is None  # auto: the model picks CUDA when there is one
    assert Settings(sam_device="cuda:1").device == "cuda:1"


def test_model_dir_alone(tmp_path: Path) -> None:
    from backend.config import model_dir_from_env

    assert model_dir_from_env({}) == Path("models") == Settings.from_env({}).model_dir
    assert model_dir_from_env({"MODEL_DIR": str(tmp_path)}) == tmp_path


def _imports_torch(code: str) -> bool:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", f"{code}\nimport sys; print('torch' in sys.modules)"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=True)
    return result.stdout.strip().splitlines()[-1] == "True"


def test_importing_the_backend_loads_no_torch() -> None:
    """The CLI and gunicorn's arbiter import these; torch is loaded by the model, in the worker, only."""
    modules = ["config", "app", "segmenter", "predictions", "prompts", "results", "cli", "gunicorn_conf"]
    assert not _imports_torch("; ".join(f"import backend.{name}" for name in modules))


def test_checkpoint_names_load_no_torch() -> None:
    """Resolving SAM_CHECKPOINT and the CLI's help read model.download's table, which needs no torch."""
    if _imports_torch("import model.download"):
        pytest.skip("the model package still imports torch eagerly")
    assert not _imports_torch("from backend.config import Settings; Settings().checkpoint_path\n"
                              "from backend.cli import build_parser; build_parser()")
