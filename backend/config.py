"""Backend settings, read once from environment variables.

Why environment variables: the backend runs under docker-compose, gunicorn and scripts alike, and Label
Studio's own ML-backend examples configure themselves this way, so users already know LABEL_STUDIO_URL,
BASIC_AUTH_USER, WORKERS, ... Every variable, its default and its meaning is listed in
docs/configuration.md; keep the two in step.

Why official checkpoint names come from ``model.download``: ``SAM_CHECKPOINT=vit_b`` must find the very file
``sam-backend download vit_b`` writes, so both read the one table. It is imported when a name is resolved, not
with this module: importing the settings must never pull in the model package (the CLI starts fast and
gunicorn's arbiter reads its settings from here without loading torch).

Why validate everything here: a typo such as ``SAM_DEVICE=gpu`` should stop the server at start with one
line naming the variable, not surface as a stack trace on the first click. An empty value counts as unset
(docker-compose passes ``VAR=`` for variables that are declared but not given).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from backend.limits import IMAGE_MAX_BYTES, IMAGE_MAX_PIXELS, IMAGE_TIMEOUT_S
from backend.request_limits import RequestLimits

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "fp32", "bf16", "fp16")  # what each means: model.runtime.DTYPES (a test keeps the two equal)
OUTPUTS = ("auto", "brush", "bitmask", "polygon")
BATCH_MODES = ("boxes", "points", "everything", "off")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class SettingsError(ValueError):
    """An environment variable has a value the backend cannot use; the message names the variable."""

    def __init__(self, variable: str, value: str, expected: str) -> None:
        super().__init__(f"{variable}={value!r} is invalid: {expected}")
        self.variable = variable


def parse_label_map(text: str, variable: str = "SAM_LABEL_MAP") -> dict[str, str]:
    """Parse ``"kp_label=brush_label;other=Other"`` into a dict (labels are case-sensitive, spaces trimmed).

    It lets a smart tool labelled "Click" produce masks labelled "Car" when the two tags use different
    label sets. Empty entries (``a=b;;``) are skipped; an entry without ``=`` or with an empty side is an
    error, because silently ignoring it would send masks to the wrong label.
    """
    mapping: dict[str, str] = {}
    for entry in text.split(";"):
        if not entry.strip():
            continue
        source, sep, target = entry.partition("=")
        source, target = source.strip(), target.strip()
        if not sep or not source or not target:
            raise SettingsError(variable, text, f"entry {entry.strip()!r} is not of the form "
                                                "smart_label=output_label (entries separated by ';')")
        mapping[source] = target
    return mapping


@dataclass(frozen=True)
class Settings:
    """Everything the backend can be configured with. Defaults serve a local CPU run."""

    # -- names Label Studio users know from HumanSignal's ML-backend examples
    label_studio_url: str = ""  # where task images under /data/... are downloaded from
    label_studio_api_key: str = ""  # legacy token or personal access token (JWT refresh token)
    basic_auth_user: str = ""
    basic_auth_pass: str = ""
    model_dir: Path = Path("models")
    workers: int = 1
    threads: int = 4
    timeout_s: int = 600
    log_level: str = "INFO"
    port: int = 9090
    host: str = "0.0.0.0"
    # -- the HTTP server (backend/http_worker.py): what a client may hold before a thread takes its request
    max_request_bytes: int = 20 * 2**20  # the largest request body; Label Studio's batches with drafts fit
    request_read_timeout_s: float = 30.0  # the whole request (head and body) must arrive by then
    max_connections: int = 1000  # per worker; the oldest still-incomplete one is dropped for a new one
    # -- the model
    sam_checkpoint: str = "vit_b"  # a path, or an official name (model.download) resolved in model_dir
    sam_device: str = "auto"  # auto | cpu | cuda | cuda:N
    sam_dtype: str = "auto"  # auto | fp32 | bf16 | fp16
    sam_compile: bool = False
    sam_torch_threads: int = 0  # 0 = PyTorch's default
    sam_decode_slots: int = 0  # decodes at once on a CPU, one intra-op thread each; 0 = one per core
    sam_lone_decode_threads: int = 2  # threads of a click alone on an idle CPU; 1 = always one
    sam_encode_batch: int = 0  # images per encoder run in bulk jobs; 0 = auto (model.runtime.encode_batch_size)
    # -- task images
    local_files_root: Path | None = None
    image_timeout_s: float = IMAGE_TIMEOUT_S
    image_max_bytes: int = IMAGE_MAX_BYTES
    image_max_pixels: int = IMAGE_MAX_PIXELS
    sam_image_hosts: str = "public"  # hosts images may come from besides Label Studio (backend.urls.HostPolicy)
    sam_image_proxy: bool = False  # use HTTP_PROXY / HTTPS_PROXY for downloads (backend.guarded_http says why not)
    image_identities: int = 10_000  # task images whose identity is remembered (backend.image_identity); 0: off
    image_uploads_immutable: bool = True  # Label Studio /data/upload/ files are never rewritten in place
    # -- embedding cache
    redis_url: str = ""  # empty: no Redis, memory cache only
    sam_cache_memory_mb: int | None = None  # None: sized for the device (model.runtime.default_cache_bytes)
    sam_cache_ttl_s: int = 7 * 24 * 3600
    # -- what predictions look like
    sam_output: str = "auto"  # auto | brush | bitmask | polygon
    sam_label_map: tuple[tuple[str, str], ...] = field(default=())
    sam_batch_mode: str = "boxes"  # boxes | points | everything | off
    sam_batch_budget_s: float = 80.0  # a batch /predict answers by then (Label Studio waits 100 s)
    # -- warm-up: encode task images before the first click
    sam_warmup: bool = True
    sam_warmup_max_queue: int = 1000  # warm-ups waiting at most; more tasks are encoded on their first click
    # -- what one request may cost (backend.request_limits, which says why these defaults): a 413 above each
    sam_max_json_depth: int = RequestLimits.max_json_depth
    sam_max_tasks: int = RequestLimits.max_tasks
    sam_max_boxes_per_task: int = RequestLimits.max_boxes_per_task
    sam_max_click_regions: int = RequestLimits.max_click_regions
    sam_max_click_points: int = RequestLimits.max_click_points
    sam_max_click_objects: int = RequestLimits.max_click_objects
    sam_setup_projects: int = RequestLimits.setup_projects
    sam_setup_memory_mb: int = RequestLimits.setup_memory_mb

    @property
    def request_limits(self) -> RequestLimits:
        """The SAM_MAX_* and SAM_SETUP_* settings, as the checks of ``backend.request_limits`` take them."""
        return RequestLimits(
            max_json_depth=self.sam_max_json_depth, max_tasks=self.sam_max_tasks,
            max_boxes_per_task=self.sam_max_boxes_per_task, max_click_regions=self.sam_max_click_regions,
            max_click_points=self.sam_max_click_points, max_click_objects=self.sam_max_click_objects,
            setup_projects=self.sam_setup_projects, setup_memory_mb=self.sam_setup_memory_mb,
        )
    # -- refinement: a click that extends an earlier one starts from its mask logits (backend.refinement)
    sam_refine: bool = True
    sam_refine_memory_mb: int = 64

    @property
    def label_map(self) -> dict[str, str]:
        """SAM_LABEL_MAP as a dict (stored as pairs so that Settings stays hashable)."""
        return dict(self.sam_label_map)

    @property
    def basic_auth(self) -> tuple[str, str] | None:
        """(user, password) when Basic auth is configured, else None."""
        return (self.basic_auth_user, self.basic_auth_pass) if self.basic_auth_user else None

    @property
    def cache_memory_bytes(self) -> int | None:
        """The in-process cache bound, or None to size it for the device the model runs on."""
        return None if self.sam_cache_memory_mb is None else self.sam_cache_memory_mb * 1024 * 1024

    @property
    def device(self) -> str | None:
        """SAM_DEVICE as the model takes it: None for auto (CUDA when available, else the CPU)."""
        return None if self.sam_device == "auto" else self.sam_device

    @property
    def checkpoint_name(self) -> str | None:
        """The official name (``model.download.CHECKPOINTS``: vit_b, vit_t, ...) SAM_CHECKPOINT gives, else None."""
        from model.download import official_name

        return official_name(self.sam_checkpoint)

    @property
    def checkpoint_path(self) -> Path:
        """The checkpoint file: MODEL_DIR/<official file> for an official name, else SAM_CHECKPOINT as a path.

        A bare file name that is not an official name is looked up in MODEL_DIR too, so
        ``SAM_CHECKPOINT=my_finetune.pth`` works next to the official files.
        """
        from model.download import CHECKPOINTS

        name = self.checkpoint_name
        if name is not None:
            return self.model_dir / CHECKPOINTS[name].filename
        path = Path(self.sam_checkpoint).expanduser()
        if not path.is_absolute() and len(path.parts) == 1 and not path.exists():
            return self.model_dir / path
        return path

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Read and validate every variable; raises SettingsError naming the first bad one."""
        env = _Env(environ)
        user, password = env.text("BASIC_AUTH_USER"), env.text("BASIC_AUTH_PASS")
        if bool(user) != bool(password):
            missing = "BASIC_AUTH_PASS" if user else "BASIC_AUTH_USER"
            raise SettingsError(missing, "", "BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together")
        local_root = env.text("LOCAL_FILES_ROOT") or env.text("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT")
        return cls(
            label_studio_url=env.url("LABEL_STUDIO_URL"),
            label_studio_api_key=env.text("LABEL_STUDIO_API_KEY"),
            basic_auth_user=user,
            basic_auth_pass=password,
            model_dir=model_dir_from_env(environ),
            workers=env.integer("WORKERS", cls.workers, minimum=1),
            threads=env.integer("THREADS", cls.threads, minimum=1),
            timeout_s=env.integer("TIMEOUT", cls.timeout_s, minimum=0),
            log_level=env.choice("LOG_LEVEL", cls.log_level, LOG_LEVELS, upper=True),
            port=env.integer("PORT", cls.port, minimum=1, maximum=65535),
            host=env.text("HOST", cls.host),
            max_request_bytes=int(env.number("MAX_REQUEST_MB", cls.max_request_bytes / 2**20, positive=True) * 2**20),
            request_read_timeout_s=env.number("REQUEST_READ_TIMEOUT_S", cls.request_read_timeout_s, positive=True),
            max_connections=env.integer("MAX_CONNECTIONS", cls.max_connections, minimum=10),
            sam_checkpoint=env.text("SAM_CHECKPOINT", cls.sam_checkpoint),
            sam_device=env.device("SAM_DEVICE", cls.sam_device),
            sam_dtype=env.choice("SAM_DTYPE", cls.sam_dtype, DTYPES),
            sam_compile=env.flag("SAM_COMPILE", cls.sam_compile),
            sam_torch_threads=env.integer("SAM_TORCH_THREADS", cls.sam_torch_threads, minimum=0),
            sam_decode_slots=env.integer("SAM_DECODE_SLOTS", cls.sam_decode_slots, minimum=0, maximum=1024),
            sam_lone_decode_threads=env.integer("SAM_LONE_DECODE_THREADS", cls.sam_lone_decode_threads, minimum=1,
                                                maximum=64),
            sam_encode_batch=0 if env.text("SAM_ENCODE_BATCH").lower() in ("", "auto")
            else env.integer("SAM_ENCODE_BATCH", 1, minimum=1, maximum=64),
            local_files_root=Path(local_root).expanduser() if local_root else None,
            image_timeout_s=env.number("IMAGE_TIMEOUT_S", cls.image_timeout_s, positive=True),
            image_max_bytes=int(env.number("IMAGE_MAX_MB", cls.image_max_bytes / 2**20, positive=True) * 2**20),
            image_max_pixels=env.integer("IMAGE_MAX_PIXELS", cls.image_max_pixels, minimum=1),
            sam_image_hosts=env.image_hosts("SAM_IMAGE_HOSTS", cls.sam_image_hosts),
            sam_image_proxy=env.flag("SAM_IMAGE_PROXY", cls.sam_image_proxy),
            image_identities=env.integer("IMAGE_IDENTITIES", cls.image_identities, minimum=0, maximum=10_000_000),
            image_uploads_immutable=env.flag("IMAGE_UPLOADS_IMMUTABLE", cls.image_uploads_immutable),
            redis_url=env.redis_url("REDIS_URL"),
            sam_cache_memory_mb=None if env.text("SAM_CACHE_MEMORY_MB").lower() in ("", "auto")
            else env.integer("SAM_CACHE_MEMORY_MB", 0, minimum=0),
            sam_cache_ttl_s=env.integer("SAM_CACHE_TTL_S", cls.sam_cache_ttl_s, minimum=0),
            sam_output=env.choice("SAM_OUTPUT", cls.sam_output, OUTPUTS),
            sam_label_map=tuple(parse_label_map(env.text("SAM_LABEL_MAP")).items()),
            sam_batch_mode=env.choice("SAM_BATCH_MODE", cls.sam_batch_mode, BATCH_MODES),
            sam_batch_budget_s=env.number("SAM_BATCH_BUDGET_S", cls.sam_batch_budget_s, positive=True),
            sam_warmup=env.flag("SAM_WARMUP", cls.sam_warmup),
            sam_warmup_max_queue=env.integer("SAM_WARMUP_MAX_QUEUE", cls.sam_warmup_max_queue, minimum=1),
            sam_max_json_depth=env.integer("SAM_MAX_JSON_DEPTH", cls.sam_max_json_depth, minimum=8),
            sam_max_tasks=env.integer("SAM_MAX_TASKS", cls.sam_max_tasks, minimum=1),
            sam_max_boxes_per_task=env.integer("SAM_MAX_BOXES_PER_TASK", cls.sam_max_boxes_per_task, minimum=1),
            sam_max_click_regions=env.integer("SAM_MAX_CLICK_REGIONS", cls.sam_max_click_regions, minimum=1),
            sam_max_click_points=env.integer("SAM_MAX_CLICK_POINTS", cls.sam_max_click_points, minimum=1),
            sam_max_click_objects=env.integer("SAM_MAX_CLICK_OBJECTS", cls.sam_max_click_objects, minimum=1),
            sam_setup_projects=env.integer("SAM_SETUP_PROJECTS", cls.sam_setup_projects, minimum=1),
            sam_setup_memory_mb=env.integer("SAM_SETUP_MEMORY_MB", cls.sam_setup_memory_mb, minimum=1),
            sam_refine=env.flag("SAM_REFINE", cls.sam_refine),
            sam_refine_memory_mb=env.integer("SAM_REFINE_MEMORY_MB", cls.sam_refine_memory_mb, minimum=1),
        )


def model_dir_from_env(environ: Mapping[str, str] = os.environ) -> Path:
    """MODEL_DIR (default ``models``): read alone too, by ``sam-backend download``, which needs no other setting."""
    return Path(_Env(environ).text("MODEL_DIR", str(Settings.model_dir))).expanduser()


def missing_checkpoint_message(path: Path | None) -> str:
    """What to do when there is no checkpoint file: the most common first-run failure."""
    from model.download import CHECKPOINTS

    where = f"no checkpoint file at {path}" if path else "no checkpoint configured"
    return (f"{where}. Set SAM_CHECKPOINT to a checkpoint file or to an official name ({', '.join(CHECKPOINTS)}) "
            "found in MODEL_DIR, or pass --checkpoint to `sam-backend serve`; "
            "`sam-backend download vit_b --dir MODEL_DIR` fetches an official checkpoint.")


class _Env:
    """Typed reads of one environment mapping; each failure names its variable."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ

    def text(self, name: str, default: str = "") -> str:
        value = self.environ.get(name, "").strip()
        return value if value else default

    def integer(self, name: str, default: int, minimum: int | None = None, maximum: int | None = None) -> int:
        raw = self.text(name)
        if not raw:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(name, raw, "expected a whole number") from None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            bounds = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise SettingsError(name, raw, f"expected a whole number {bounds}")
        return value

    def number(self, name: str, default: float, positive: bool = False) -> float:
        raw = self.text(name)
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(name, raw, "expected a number") from None
        if value != value or value in (float("inf"), float("-inf")) or (positive and value <= 0):
            raise SettingsError(name, raw, "expected a finite number" + (" above 0" if positive else ""))
        return value

    def flag(self, name: str, default: bool) -> bool:
        raw = self.text(name)
        if not raw:
            return default
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise SettingsError(name, raw, "expected one of 1/0, true/false, yes/no")

    def choice(self, name: str, default: str, choices: tuple[str, ...], upper: bool = False) -> str:
        raw = self.text(name)
        if not raw:
            return default
        value = raw.upper() if upper else raw.lower()
        if value not in choices:
            raise SettingsError(name, raw, "expected one of " + ", ".join(choices))
        return value

    def device(self, name: str, default: str) -> str:
        raw = self.text(name)
        if not raw:
            return default
        value = raw.lower()
        if value in DEVICES:
            return value
        prefix, _, index = value.partition(":")
        if prefix == "cuda" and index.isdigit():
            return value
        raise SettingsError(name, raw, "expected auto, cpu, cuda or cuda:N")

    def url(self, name: str) -> str:
        raw = self.text(name)
        if not raw:
            return ""
        if not raw.lower().startswith(("http://", "https://")):
            raise SettingsError(name, raw, "expected a URL starting with http:// or https://, "
                                           "e.g. http://label-studio:8080")
        return raw.rstrip("/")

    def image_hosts(self, name: str, default: str) -> str:
        raw = self.text(name, default)
        from backend.urls import HostPolicy  # light (stdlib and urllib3), imported where it is needed

        try:
            HostPolicy.parse(raw)
        except ValueError as error:
            raise SettingsError(name, raw, f"{error}; e.g. 'public, minio:9000, *.corp.example, 10.0.0.0/8'") from None
        return raw

    def redis_url(self, name: str) -> str:
        raw = self.text(name)
        if raw and not raw.lower().startswith(("redis://", "rediss://", "unix://")):
            raise SettingsError(name, raw, "expected a redis://, rediss:// or unix:// URL (empty: no Redis)")
        return raw
