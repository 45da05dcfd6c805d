"""gunicorn settings for the SAM backend (`sam-backend serve` runs gunicorn with this file).

Why it looks like this:
- One worker per GPU, threads inside it (WORKERS, default 1; THREADS, default 4). A SAM model is
  hundreds of MB to 2.5 GB of weights plus activations; every extra worker is another copy of them on
  the same GPU, which is how the "CUDA out of memory with several workers" reports happen. Threads
  share one model and one embedding cache: the predictor is stateless, so concurrent annotators never
  see each other's images, and PyTorch releases the GIL while it computes.
- Never ``preload_app`` with CUDA. Preloading imports the app in the arbiter and forks it; a CUDA
  context does not survive fork() (children fail with "Cannot re-initialize CUDA in forked
  subprocess" or hang), and a model loaded in the arbiter would be duplicated copy-on-write into
  every worker anyway. So the app is imported in each worker and the model is loaded there, after
  the fork, in ``post_worker_init``.
- The model loads in a background thread, so the worker answers ``/health`` and ``/setup`` within
  milliseconds while a multi-GB checkpoint is read (Label Studio gives /health 1 s and /setup 3 s,
  and marks the backend disconnected otherwise). A ``/predict`` that arrives during the load waits
  for it, bounded, then answers 503 "model is loading".
- Requests are read whole by the worker's event loop before a thread takes them
  (``backend.http_worker.BufferingWorker``, gthread's process model otherwise): with gthread itself, 4 clients
  that send half a request, or 50 idle connections, held every request thread for a minute and /health
  went unanswered. The read deadline, the body cap and the connection bound are REQUEST_READ_TIMEOUT_S,
  MAX_REQUEST_MB and MAX_CONNECTIONS; malformed HTTP is answered as JSON there, not with gunicorn's HTML.
- ``timeout`` is generous: on a CPU one ViT-H encode takes tens of seconds and a batch predict of many
  tasks longer. With gthread workers the timeout only fires when the worker's main loop is stuck, not
  while a request thread computes, but a small value would still kill a worker whose load is slow.

Every value an operator sets (HOST, PORT, WORKERS, THREADS, TIMEOUT, LOG_LEVEL) comes from
``Settings.from_env``, the one reader of the environment, so the same file serves docker-compose,
scripts/serve and the tests with the defaults and validation docs/configuration.md lists. A bad value stops
gunicorn at start with the line naming the variable. ``backend.config`` imports nothing of the model, so the
arbiter never loads torch.
"""

from __future__ import annotations

from typing import Any

from backend.config import Settings

_settings = Settings.from_env()

wsgi_app = "backend.app:create_app()"
bind = [f"{_settings.host}:{_settings.port}"]
workers = _settings.workers
threads = _settings.threads
# gthread's process model, but requests are read whole in the event loop before a thread takes them, with a
# deadline and a size cap (backend/http_worker.py): slow or idle clients cannot hold the request threads.
worker_class = "backend.http_worker.BufferingWorker"
# The hard stop on connections per worker (accepting pauses there); the worker itself keeps the ones still
# being read to MAX_CONNECTIONS by dropping the oldest, so this only bites when as many more wait for a thread.
worker_connections = 2 * _settings.max_connections
timeout = _settings.timeout_s
graceful_timeout = 30
keepalive = 5
preload_app = False  # see the module docstring: CUDA does not survive fork()
loglevel = _settings.log_level.lower()
accesslog = "-"
errorlog = "-"
capture_output = True

# Our own loggers (backend.*, model.*) go to stderr beside gunicorn's, with their names, at LOG_LEVEL:
# the one log line per refused request and the model-load line are what an operator looks for.
_LEVEL = loglevel.upper()
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "root": {"level": _LEVEL, "handlers": ["error_console"]},
    "loggers": {
        "gunicorn.error": {"level": _LEVEL, "handlers": ["error_console"], "propagate": False},
        "gunicorn.access": {"level": "INFO", "handlers": ["console"], "propagate": False},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "generic", "stream": "ext://sys.stdout"},
        "error_console": {"class": "logging.StreamHandler", "formatter": "generic", "stream": "ext://sys.stderr"},
    },
    "formatters": {
        "generic": {"format": "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s",
                    "datefmt": "[%Y-%m-%d %H:%M:%S %z]", "class": "logging.Formatter"},
    },
}


def pre_fork(server: Any, worker: Any) -> None:
    """Give each worker a stable slot (0..WORKERS-1), reused when a worker is replaced.

    Runs in the arbiter before the fork, so the attribute is inherited by the child. The slot picks
    the GPU of that worker when there are several.
    """
    taken = {getattr(w, "sam_slot", None) for w in server.WORKERS.values()}
    worker.sam_slot = next(slot for slot in range(len(taken) + 1) if slot not in taken)


def post_worker_init(worker: Any) -> None:
    """Start loading the model in this worker, in a background thread (after the fork)."""
    from backend.app import start_model_loading

    start_model_loading(worker.wsgi, slot=getattr(worker, "sam_slot", 0))
