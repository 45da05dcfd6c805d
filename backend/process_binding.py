"""What an rq job function finds in the process that dequeued it: the handler bound there, once.

rq calls a job function by its import path, in whichever process dequeued the job, so the function cannot be
handed this process's model; the consumer that starts in a process binds its handler here first (one model per
process). A job dequeued before that (the model still loading) waits for it, bounded.
"""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class ProcessBinding(Generic[T]):
    """One handler per process, set by ``bind`` and awaited by the job functions of one queue."""

    def __init__(self, jobs: str) -> None:
        self._jobs = jobs  # what the jobs are, for the error: "warm-up", "pre-annotation"
        self._value: T | None = None
        self._ready = threading.Event()

    def bind(self, value: T) -> None:
        self._value = value
        self._ready.set()

    def wait(self, timeout_s: float = 600.0) -> T:
        """The bound handler; RuntimeError when none is bound within ``timeout_s``."""
        if not self._ready.wait(timeout=timeout_s) or self._value is None:
            raise RuntimeError(f"no model loaded in this process to run {self._jobs} jobs")
        return self._value
