"""gunicorn settings for a plain ``gunicorn -c gunicorn.conf.py`` run from a checkout.

The settings live in the package (``backend/gunicorn_conf.py``) so that an installed backend has them too;
``sam-backend serve`` uses ``python:backend.gunicorn_conf`` directly.
"""

from backend.gunicorn_conf import *  # noqa: F403
from backend.gunicorn_conf import post_worker_init, pre_fork  # noqa: F401  (hooks gunicorn looks up by name)
