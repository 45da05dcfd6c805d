"""``sam-backend``: run the backend (``serve``) and fetch official checkpoints (``download``).

``serve`` turns its options into the environment variables of ``backend.config`` and execs gunicorn with
the repository's gunicorn.conf.py, so there is exactly one way settings reach the server, whether it runs
from this command, docker-compose or a bare ``gunicorn -c gunicorn.conf.py``. It checks the checkpoint
before starting, because a server that boots and then answers every click with "no checkpoint" is a worse
first experience than one line saying how to get the file.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from backend.config import OFFICIAL_CHECKPOINTS, Settings, SettingsError
from backend.segmenter import missing_checkpoint_message

GUNICORN_CONF = Path(__file__).resolve().parent.parent / "gunicorn.conf.py"


def _serve(args: argparse.Namespace) -> int:
    overrides = {"HOST": args.host, "PORT": args.port, "SAM_CHECKPOINT": args.checkpoint,
                 "SAM_DEVICE": args.device, "WORKERS": args.workers, "THREADS": args.threads}
    env = dict(os.environ)
    env.update({name: str(value) for name, value in overrides.items() if value is not None})
    try:
        settings = Settings.from_env(env)
    except SettingsError as error:
        print(f"sam-backend: {error}", file=sys.stderr)
        return 2
    if not settings.checkpoint_path.is_file():
        print(f"sam-backend: {missing_checkpoint_message(settings.checkpoint_path)}", file=sys.stderr)
        return 2
    if not GUNICORN_CONF.is_file():
        print(f"sam-backend: {GUNICORN_CONF} is missing; run from a checkout of the repository "
              "(pip install -e .)", file=sys.stderr)
        return 2
    gunicorn = shutil.which("gunicorn", path=str(Path(sys.executable).parent)) or shutil.which("gunicorn")
    if gunicorn is None:
        print("sam-backend: gunicorn is not installed in this environment (pip install gunicorn)", file=sys.stderr)
        return 2
    os.chdir(GUNICORN_CONF.parent)
    argv = [gunicorn, "--config", str(GUNICORN_CONF)]
    os.execve(gunicorn, argv, env)
    return 0  # not reached


def _download(args: argparse.Namespace) -> int:
    import requests

    from model.download import DownloadError, fetch

    try:
        path = fetch(args.name, args.dir)
    except (DownloadError, ValueError, OSError, requests.RequestException) as error:
        print(f"sam-backend: could not download {args.name}: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _has_download() -> bool:
    """Whether model/download.py exists, found without importing ``model`` (and torch) for --help."""
    spec = importlib.util.find_spec("model")
    locations = spec.submodule_search_locations if spec is not None else None
    return any((Path(location) / "download.py").is_file() for location in locations or ())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sam-backend",
        description="Segment Anything as a Label Studio ML backend. Every setting can also be given as an "
                    "environment variable (docs/configuration.md); options override them.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve", help="run the HTTP server (gunicorn with gunicorn.conf.py)",
        description="Run the backend under gunicorn. The model loads in the background after start; "
                    "/health answers at once and /predict waits for the model.",
    )
    serve.add_argument("--host", help="address to listen on (HOST, default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port to listen on (PORT, default 9090)")
    serve.add_argument("--checkpoint", help="checkpoint file, or an official name found in MODEL_DIR: "
                                            + ", ".join(OFFICIAL_CHECKPOINTS) + " (SAM_CHECKPOINT, default vit_b)")
    serve.add_argument("--device", help="auto, cpu, cuda or cuda:N (SAM_DEVICE, default auto)")
    serve.add_argument("--workers", type=int, help="worker processes, one per GPU (WORKERS, default 1)")
    serve.add_argument("--threads", type=int, help="request threads per worker (THREADS, default 4)")
    serve.set_defaults(handler=_serve)

    if _has_download():
        download = commands.add_parser("download", help="download an official checkpoint",
                                       description="Download an official SAM / MobileSAM checkpoint (its "
                                                   "sha256 is checked) and print where it is; an already "
                                                   "downloaded, verified file is not fetched again.")
        download.add_argument("name", help="an official name (" + ", ".join(OFFICIAL_CHECKPOINTS)
                              + ", sam_b, sam_l, ultralytics_mobile_sam) or an http(s) URL of a checkpoint")
        download.add_argument("--dir", type=Path, default=None,
                              help="where to put it (MODEL_DIR, default ./models)")
        download.set_defaults(handler=_download)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "dir", "unset") is None:
        args.dir = Path(os.environ.get("MODEL_DIR") or "models")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
