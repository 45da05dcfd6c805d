"""``sam-backend``: run the backend (``serve``), fetch official checkpoints (``download``), warm and
pre-annotate projects (``warm``, ``preannotate``, ``worker``).

``serve`` turns its options into the environment variables of ``backend.config`` and execs gunicorn with
the package's gunicorn settings (``backend/gunicorn_conf.py``), so there is exactly one way settings reach the
server, whether it runs from this command, docker-compose or a bare ``gunicorn -c gunicorn.conf.py``. It checks the checkpoint
before starting, because a server that boots and then answers every click with "no checkpoint" is a worse
first experience than one line saying how to get the file.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from backend.config import Settings, SettingsError, missing_checkpoint_message, model_dir_from_env

if TYPE_CHECKING:
    from backend.segmenter import Segmenter

# The settings ship inside the package, so a plain `pip install .` serves like a checkout does.
GUNICORN_CONF = "python:backend.gunicorn_conf"


def _serve(args: argparse.Namespace) -> int:
    overrides = {"HOST": args.host, "PORT": args.port, "SAM_CHECKPOINT": args.checkpoint,
                 "SAM_DEVICE": args.device, "WORKERS": args.workers, "THREADS": args.threads}
    env = dict(os.environ)
    env.update({name: str(value) for name, value in overrides.items() if value is not None})
    settings = _settings_or_exit(env)
    if settings is None:
        return 2
    missing = not settings.checkpoint_path.is_file()
    if missing and args.download and settings.checkpoint_name \
            and _fetch_checkpoint(settings.checkpoint_name, settings.model_dir) is None:
        return 1
    if not settings.checkpoint_path.is_file():
        print(f"sam-backend: {missing_checkpoint_message(settings.checkpoint_path)}", file=sys.stderr)
        return 2
    gunicorn = shutil.which("gunicorn", path=str(Path(sys.executable).parent)) or shutil.which("gunicorn")
    if gunicorn is None:
        print("sam-backend: gunicorn is not installed in this environment (pip install gunicorn)", file=sys.stderr)
        return 2
    argv = [gunicorn, "--config", GUNICORN_CONF]
    os.execve(gunicorn, argv, env)
    return 0  # not reached


def _fetch_checkpoint(name: str, directory: Path) -> Path | None:
    """Download an official checkpoint (or a URL) into ``directory``; None after printing why it failed."""
    import requests

    from model.download import DownloadError, fetch, manual_download_hint

    try:
        return fetch(name, directory)
    except ValueError as error:  # not a name or URL we know: nothing to download by hand either
        print(f"sam-backend: could not download {name}: {error}", file=sys.stderr)
        return None
    except (DownloadError, OSError, requests.RequestException) as error:
        print(f"sam-backend: could not download {name}: {error}\n{manual_download_hint(name, directory)}",
              file=sys.stderr)
        return None


def _download(args: argparse.Namespace) -> int:
    path = _fetch_checkpoint(args.name, args.dir)
    if path is None:
        return 1
    print(path)
    return 0


def _settings_or_exit(environ: Mapping[str, str] = os.environ) -> Settings | None:
    """The settings, or None after printing which variable is wrong."""
    try:
        return Settings.from_env(environ)
    except SettingsError as error:
        print(f"sam-backend: {error}", file=sys.stderr)
        return None


def _warm(args: argparse.Namespace) -> int:
    from backend.errors import BackendError
    from backend.project_warmup import warm_project

    settings = _settings_or_exit()
    if settings is None:
        return 2
    logging.basicConfig(level=settings.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        queued = warm_project(settings, args.project, backend_url=args.backend, local=args.local,
                              wait=not args.no_wait, progress=not args.quiet)
    except BackendError as error:
        print(f"sam-backend: {error.message}", file=sys.stderr)
        return 1
    if args.no_wait and not args.local:
        print(f"project {args.project}: {queued} image(s) queued for warm-up; the encodes run in the background")
    else:
        print(f"project {args.project}: {queued} image(s) queued for warm-up; the warm-up queue has drained")
    return 0


def _worker(args: argparse.Namespace) -> int:
    from backend.errors import BackendError
    from backend.image_fetch import ImageFetcher
    from backend.preannotate import QUEUE_NAME as PREANNOTATE_QUEUE
    from backend.preannotate import Preannotator, bind_preannotator
    from backend.segmenter import Segmenter
    from backend.warmup import make_encoder, run_worker

    settings = _settings_or_exit()
    if settings is None:
        return 2
    if not settings.redis_url:
        print("sam-backend: the worker consumes the shared warm-up queue: set REDIS_URL to the backend's Redis",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    segmenter = Segmenter.from_settings(settings)
    try:
        segmenter.load()
    except BackendError as error:
        print(f"sam-backend: {error.message}", file=sys.stderr)
        return 2
    fetcher = ImageFetcher.from_settings(settings)
    bind_preannotator(Preannotator(settings, segmenter, fetcher))
    run_worker(settings.redis_url, make_encoder(segmenter, fetcher), burst=args.burst, also=[PREANNOTATE_QUEUE])
    return 0


def _preannotate(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from backend.preannotate import Options, PreannotateError, Run, preannotate_project, resume_command

    settings = _settings_or_exit()
    if settings is None:
        return 2
    logging.basicConfig(level=logging.WARNING if not args.verbose else settings.log_level,
                        format="%(levelname)s %(name)s: %(message)s")
    options = Options(mode=args.mode, min_score=args.min_score, min_area=args.min_area, max_masks=args.max_masks,
                      label=args.label, overwrite=args.overwrite or args.overwrite_since is not None,
                      overwrite_since=args.overwrite_since)
    run = Run(settings, args.project, options, local=not args.no_local, chunk=args.chunk,
              progress=not args.quiet, prelabel=args.prelabel)
    try:
        with logging_redirect_tqdm():  # log lines above the progress bar, not through it
            summary = preannotate_project(run)
    except PreannotateError as error:
        print(f"sam-backend: {error.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sam-backend: interrupted; continue where it stopped with: {resume_command(run)}", file=sys.stderr)
        return 130
    except Exception:
        if run.options.overwrite_since is not None:
            print(f"sam-backend: the run failed; continue it with: {resume_command(run)}", file=sys.stderr)
        raise
    if summary.failed:
        print(f"sam-backend: {summary.failed} task(s) failed; once their cause is fixed, run them with: "
              f"{resume_command(run)}", file=sys.stderr)
        return 1
    return 0


def _model_or_exit(args: argparse.Namespace) -> Segmenter | None:
    """The model of an offline command (SAM_CHECKPOINT / SAM_DEVICE, or --checkpoint / --device), loaded."""
    from backend.errors import BackendError
    from backend.segmenter import Segmenter

    env = dict(os.environ)
    env.update({name: value for name, value in (("SAM_CHECKPOINT", args.checkpoint), ("SAM_DEVICE", args.device))
                if value})
    settings = _settings_or_exit(env)
    if settings is None:
        return None
    segmenter = Segmenter.from_settings(settings)
    try:
        segmenter.load()
    except BackendError as error:
        print(f"sam-backend: {error.message}", file=sys.stderr)
        return None
    return segmenter


def _predict(args: argparse.Namespace) -> int:
    from backend.offline import InputError, parse_objects, predict_images

    try:
        prompts = parse_objects(args.points or (), args.labels or (), args.box or ())
        if not prompts and not args.everything:
            raise InputError("give prompts (--points, --box) or --everything")
        if prompts and args.everything:
            raise InputError("--everything takes no prompts: give one or the other")
        missing = [str(p) for p in args.images if not p.is_file()]
        if missing:
            raise InputError(f"no such image file: {', '.join(missing)}")
    except InputError as error:
        print(f"sam-backend: {error}", file=sys.stderr)
        return 2
    segmenter = _model_or_exit(args)
    if segmenter is None:
        return 2
    try:
        results = predict_images(segmenter, args.images, prompts, args.out, everything=args.everything,
                                 progress=not args.quiet)
    except InputError as error:
        print(f"sam-backend: {error}", file=sys.stderr)
        return 2
    for result in results:
        print(f"{result.image}: {result.masks} mask(s), {result.json_path}")
    return 0


def _auto_annotate(args: argparse.Namespace) -> int:
    from backend.offline import InputError, auto_annotate, yolo_detector

    out = args.out or args.images.parent / f"{args.images.name}_auto_annotate_labels"
    try:
        if (args.boxes is None) == (args.detector is None):
            raise InputError("give the boxes: --boxes LABELS_DIR (YOLO detection labels) or --detector WEIGHTS")
        detector = yolo_detector(args.detector, args.conf) if args.detector else None
        segmenter = _model_or_exit(args)
        if segmenter is None:
            return 2
        summary = auto_annotate(segmenter, args.images, out, labels_dir=args.boxes, detector=detector,
                                progress=not args.quiet)
    except InputError as error:
        print(f"sam-backend: {error}", file=sys.stderr)
        return 2
    for line in summary.lines_of(out):
        print(line)
    return 1 if summary.failures else 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {value}")
    return value


def _timestamp(text: str) -> str:
    from backend.overwrite_since import parse_timestamp

    try:
        parse_timestamp(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text.strip()


def build_parser() -> argparse.ArgumentParser:
    from model.download import CHECKPOINTS  # the official names, for the help texts

    names = ", ".join(CHECKPOINTS)
    parser = argparse.ArgumentParser(
        prog="sam-backend",
        description="Segment Anything as a Label Studio ML backend. Every setting can also be given as an "
                    "environment variable (docs/configuration.md); options override them.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve", help="run the HTTP server (gunicorn with backend/gunicorn_conf.py)",
        description="Run the backend under gunicorn. The model loads in the background after start; "
                    "/health answers at once and /predict waits for the model.",
    )
    defaults = Settings()
    serve.add_argument("--host", help=f"address to listen on (HOST, default {defaults.host})")
    serve.add_argument("--port", type=int, help=f"port to listen on (PORT, default {defaults.port})")
    serve.add_argument("--checkpoint", help=f"checkpoint file, or an official name found in MODEL_DIR: {names} "
                                            f"(SAM_CHECKPOINT, default {defaults.sam_checkpoint})")
    serve.add_argument("--device", help=f"auto, cpu, cuda or cuda:N (SAM_DEVICE, default {defaults.sam_device})")
    serve.add_argument("--workers", type=int,
                       help=f"worker processes, one per GPU (WORKERS, default {defaults.workers})")
    serve.add_argument("--threads", type=int,
                       help=f"request threads per worker (THREADS, default {defaults.threads})")
    serve.add_argument("--download", action="store_true",
                       help="when --checkpoint is an official name and the file is not in MODEL_DIR, download "
                            "it first (sha256-checked, with progress)")
    serve.set_defaults(handler=_serve)

    download = commands.add_parser("download", help="download an official checkpoint",
                                   description="Download an official SAM / MobileSAM checkpoint (its "
                                               "sha256 is checked) and print where it is; an already "
                                               "downloaded, verified file is not fetched again.")
    download.add_argument("name", help=f"an official name ({names}) or an http(s) URL of a checkpoint")
    download.add_argument("--dir", type=Path, default=None,
                          help=f"where to put it (MODEL_DIR, default ./{defaults.model_dir})")
    download.set_defaults(handler=_download)

    warm = commands.add_parser(
        "warm", help="encode every image of a Label Studio project ahead of the annotators",
        description="List the project's tasks through Label Studio's API (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY) "
                    "and queue one warm-up encode per task: on the shared Redis queue (REDIS_URL), consumed by "
                    "every backend process and `sam-backend worker`; or, without Redis, by posting the tasks "
                    "to a running backend's /webhook (--backend).")
    warm.add_argument("--project", type=int, required=True, help="the Label Studio project id")
    warm.add_argument("--backend", help="URL of a running backend to warm (used when REDIS_URL is not set)")
    warm.add_argument("--local", action="store_true",
                      help="also encode in this process (loads the model; needs REDIS_URL)")
    warm.add_argument("--no-wait", action="store_true", help="queue and return without waiting for the encodes")
    warm.add_argument("--quiet", action="store_true", help="no progress bars")
    warm.set_defaults(handler=_warm)

    preannotate = commands.add_parser(
        "preannotate", help="SAM predictions for every task of a Label Studio project, written through its API",
        description="Read the project's tasks through Label Studio's API (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY), "
                    "compute each task's masks and store them as predictions of this model's version. Tasks "
                    "that already have one are skipped, so a second run writes nothing and an interrupted run "
                    "continues where it stopped. With REDIS_URL the tasks go through the shared queue, consumed "
                    "by `sam-backend worker` processes and by this command. Exit status: 0 all done, 1 some "
                    "tasks failed (listed), 2 nothing could start (the message says what to fix).")
    preannotate.add_argument("--project", type=int, required=True, help="the Label Studio project id")
    preannotate.add_argument("--mode", choices=("boxes", "points", "everything"), default="boxes",
                             help="boxes: a mask per rectangle of the latest annotation, else of the latest "
                                  "prediction (e.g. a detector's); points: a mask per label of the latest "
                                  "annotation's keypoints; everything: SAM's automatic mask generator "
                                  "(default: boxes)")
    preannotate.add_argument("--min-score", type=float, default=0.0,
                             help="everything: keep masks with a predicted IoU of at least this (default 0)")
    preannotate.add_argument("--min-area", type=int, default=0,
                             help="everything: keep masks of at least this many pixels (default 0)")
    preannotate.add_argument("--max-masks", type=_positive_int, default=None,
                             help="everything: keep the best N masks of an image (default: all)")
    preannotate.add_argument("--label", help="everything: the label of the masks (default: the output tag's first)")
    preannotate.add_argument("--overwrite", action="store_true",
                             help="replace this model version's predictions instead of skipping those tasks; the "
                                  "command prints the line that continues the run if it stops")
    preannotate.add_argument("--overwrite-since", type=_timestamp, metavar="TIME",
                             help="continue an --overwrite run that started at TIME (ISO 8601 on Label Studio's "
                                  "clock, as the run printed): this version's predictions created since are kept")
    preannotate.add_argument("--no-local", action="store_true",
                             help="with REDIS_URL: only queue the tasks and follow them; `sam-backend worker` "
                                  "processes compute them (this command loads no model)")
    preannotate.add_argument("--chunk", type=_positive_int, default=8, help="tasks per queued job (default 8)")
    preannotate.add_argument("--prelabel", action="store_true",
                             help="make the project's editor pre-label with this model's predictions even when "
                                  "it shows another model version now (an empty choice is set anyway)")
    preannotate.add_argument("--quiet", action="store_true", help="no progress bar")
    preannotate.add_argument("--verbose", action="store_true", help="log each task (LOG_LEVEL)")
    preannotate.set_defaults(handler=_preannotate)

    model_help = f"checkpoint file or official name in MODEL_DIR: {names} (SAM_CHECKPOINT)"
    predict = commands.add_parser(
        "predict", help="masks for image files from points, boxes or segment-everything (Ultralytics' prompts)",
        description="Masks for image files, with Ultralytics' prompt conventions: each --points value is one "
                    "object, its points joined by ';' (--points 10,20 30,40: two objects; --points '10,20;30,40': "
                    "one object of two points); --labels gives 1 (foreground) / 0 (background) per point, written "
                    "the same way (default all 1); each --box x0 y0 x1 y1 is one object (with points too, box i "
                    "and points i are one object). Pixels of the image as a viewer shows it. Writes, per image, "
                    "<name>_mask_<i>.png, <name>_overlay.png and <name>.json (scores, boxes, prompts).")
    predict.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    predict.add_argument("--points", nargs="+", metavar="X,Y[;X,Y...]", help="one value per object")
    predict.add_argument("--labels", nargs="+", metavar="L[;L...]", help="1 or 0 per point, as --points")
    predict.add_argument("--box", nargs=4, type=float, action="append", metavar=("X0", "Y0", "X1", "Y1"),
                         help="a box prompt; repeat for more objects")
    predict.add_argument("--everything", action="store_true", help="SAM's automatic mask generator, no prompts")
    predict.add_argument("--out", type=Path, default=Path("sam-predictions"),
                         help="output folder (default ./sam-predictions)")
    predict.add_argument("--checkpoint", help=model_help)
    predict.add_argument("--device", help="auto, cpu, cuda or cuda:N (SAM_DEVICE)")
    predict.add_argument("--quiet", action="store_true", help="no progress bar")
    predict.set_defaults(handler=_predict)

    auto = commands.add_parser(
        "auto-annotate", help="YOLO detection labels (or a YOLO detector) -> SAM masks -> YOLO segmentation labels",
        description="For each image of IMAGES_DIR, the boxes of its YOLO label file in --boxes (class cx cy w h, "
                    "normalised) become SAM masks, written as YOLO segmentation labels (class x1 y1 x2 y2 ..., "
                    "normalised polygon of the mask's largest part), one line per box, in --out: the files "
                    "Ultralytics' auto_annotate writes. With --detector the boxes come from an Ultralytics YOLO "
                    "model instead (pip install 'sam-label-studio-backend[ultralytics]').")
    auto.add_argument("images", type=Path, metavar="IMAGES_DIR")
    auto.add_argument("--boxes", type=Path, metavar="LABELS_DIR", help="YOLO detection labels, <image stem>.txt")
    auto.add_argument("--detector", metavar="WEIGHTS", help="an Ultralytics YOLO model, e.g. yolo11x.pt")
    auto.add_argument("--conf", type=float, default=0.25, help="the detector's confidence threshold (default 0.25)")
    auto.add_argument("--out", type=Path, help="output folder (default IMAGES_DIR_auto_annotate_labels beside it)")
    auto.add_argument("--checkpoint", help=model_help)
    auto.add_argument("--device", help="auto, cpu, cuda or cuda:N (SAM_DEVICE)")
    auto.add_argument("--quiet", action="store_true", help="no progress bar")
    auto.set_defaults(handler=_auto_annotate)

    worker = commands.add_parser(
        "worker", help="consume the shared warm-up and pre-annotation queues with a model of its own "
                       "(needs REDIS_URL)",
        description="Load the model (SAM_CHECKPOINT, SAM_DEVICE, ...) and run jobs of the shared Redis queues: "
                    "warm-up encodes into the shared embedding cache, and the tasks `sam-backend preannotate` "
                    "queues. Run one per GPU, on any machine that reaches the same Redis, Label Studio and "
                    "task images.")
    worker.add_argument("--burst", action="store_true", help="stop when the queue is empty")
    worker.set_defaults(handler=_worker)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "dir", "unset") is None:
        args.dir = model_dir_from_env()
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
