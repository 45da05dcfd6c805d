"""Where and how the networks run: device choice, autocast dtype, CPU threads, torch.compile.

This is the one home of the device policy, for the engine and for the server around it: which GPU a server
worker gets, what a dtype setting means, how many CPU threads PyTorch uses, and how much of the device's memory
the embedding cache may take. The backend passes its settings (plain strings and numbers) in and keeps no
torch logic of its own, so nothing of torch is imported before the model loads.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

import torch

# The dtype settings (SAM_DTYPE) and the autocast dtype each asks for; "auto" lets resolve_dtype pick by device.
DTYPES: dict[str, torch.dtype | None] = {
    "auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
}

_P = ParamSpec("_P")
_R = TypeVar("_R")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` means the GPU when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for but CUDA is not available")
    return device


def dtype_from_name(name: str) -> torch.dtype | None:
    """The dtype a setting names ("auto" | "fp32" | "bf16" | "fp16"), in the form ``load(dtype=...)`` takes."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: expected one of {', '.join(DTYPES)}") from None


def worker_device(device: str | None, slot: int) -> str | None:
    """The device of server worker ``slot`` (0, 1, ...) when ``device`` is the setting (None: auto).

    With several GPUs and an unpinned CUDA choice (auto or "cuda"), worker ``slot`` gets GPU ``slot % count``:
    one worker per GPU, each with its own model. Anything else (the CPU, a pinned ``cuda:N``, a single GPU) is
    kept as it is.
    """
    if device not in (None, "cuda"):
        return device
    count = torch.cuda.device_count()
    return f"cuda:{slot % count}" if count > 1 else device


def resolve_dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype | None:
    """The autocast dtype, or ``None`` for plain fp32.

    ``None`` picks bf16 on CUDA (tensor cores, no overflow worries) and fp32 on CPU, where bf16
    matmuls are slower than fp32 on most CPUs and masks would drift from the reference.
    """
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else None
    if dtype == torch.float32:
        return None
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, not {dtype}")
    return dtype


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Autocast to ``dtype`` on ``device`` (no-op for fp32), always under inference mode."""
    with torch.inference_mode():
        if dtype is None:
            yield
        else:
            with torch.autocast(device_type=device.type, dtype=dtype):
                yield


def set_threads(n: int) -> None:
    """Use ``n`` CPU threads for intra-op parallelism (matmuls, convolutions, attention)."""
    if n < 1:
        raise ValueError(f"the thread count must be at least 1, not {n}")
    torch.set_num_threads(n)


def configure_threads(n: int) -> None:
    """Apply a thread-count setting: ``n`` threads, or PyTorch's own default (the physical cores) for 0."""
    if n:
        set_threads(n)


# Images per encoder run in bulk work when SAM_ENCODE_BATCH is auto: a GPU runs four 1024x1024 images in one
# pass faster than four passes; a CPU core is busy with one image already (``bench.bulk --encode-batch``).
GPU_ENCODE_BATCH = 4


def encode_batch_size(device: torch.device | str, configured: int = 0) -> int:
    """Images per encoder run for a model on ``device``: ``configured``, or by device when it is 0 (auto)."""
    if configured > 0:
        return configured
    return GPU_ENCODE_BATCH if torch.device(device).type == "cuda" else 1


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def use_threads(n: int) -> None:
    """Run this thread's next ops on ``n`` intra-op threads (a no-op when it already does).

    PyTorch's count is per thread for its OpenMP pool (``set_num_threads`` sets the calling thread's
    and the default for threads that have not run an op yet), so request threads with different roles
    can each say what they need right before they compute.
    """
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


# A decode alone on an otherwise idle CPU may spread over this many cores. The decoder is hundreds of small
# parallel regions: two threads take a MobileSAM click at 1024x768 from 35 to 22-25 ms, and more would mostly
# add synchronisation.
LONE_DECODE_THREADS = 2
# After a decode found another running, decodes keep one thread for this long: clicks are coming in bursts, where
# one decode per core gets more through, and a lone two-thread decode would make the next ones wait.
LONE_DECODE_COOLDOWN_S = 1.0


def idle_cores() -> int:
    """Cores with nothing to run at this moment beside the calling thread, from the kernel's count of runnable
    threads (the fourth field of /proc/loadavg, which counts the caller itself).

    Machine-wide, so in a container it also counts other containers' threads, which only makes the answer more
    cautious. 0 where it cannot be read (not Linux): a decode then keeps one thread.
    """
    try:
        with open("/proc/loadavg", "rb") as loadavg:
            running = int(loadavg.read().split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return 0
    return max(0, cpu_cores() - running)


class DecodeSlots:
    """Decodes share the CPU: at most ``slots`` intra-op threads at once (default: one per core), one per decode,
    except that a decode alone on an idle machine spreads over ``lone_threads``.

    Eight annotators' clicks on two cores, each decode asking PyTorch for every core, oversubscribe them
    (16 busy threads on 2 cores, OpenMP barriers spinning): a warm click's p50 rose from ~100 ms alone to
    ~860 ms. One thread per decode and one decode per core keeps every core busy with exactly one
    decode, so N concurrent clicks take about N x one decode / cores. On GPU nothing is limited: kernels queue
    on the device.

    A click that finds no other decode running and the other cores idle (``idle_cores``: no encode, no other
    process computing) takes ``lone_threads`` of the slots: on a 2-core Intel Xeon a MobileSAM click at
    1024x768 then takes 22-25 ms instead of 35. Decodes arriving meanwhile wait for it (tens of ms), then take
    one thread each, since waiting means a burst, where one decode per core gets through more clicks per second
    (and for ``LONE_DECODE_COOLDOWN_S`` after a decode found another running, none spreads); they do not join
    it, because a parallel region whose threads do not all have a core stalls: with two busy processes on
    the cores, two-thread decodes took 1.1 s against 35 ms on one thread (OpenMP's threads spin at every barrier
    for the one the scheduler took away). The machine is checked only when the decode starts; a load that starts
    during a decode's 25 ms is not seen.

    The thread count never changes a mask: the decoder's two long sums (the mix of the 4096 image tokens,
    ``model.transformer._mix``, and its token MLP's 2048-wide second layer) go in two fixed halves
    (``model.common.matmul_in_halves``), and its other products sum over 256 values or fewer, which the math
    library does not divide between threads; ``tests/test_decode_slots.py`` checks the outputs of one and two
    threads bit for bit.

    Decoding concurrent clicks on different images together, as one batch in one decoder call, does not
    raise clicks per second on a CPU: on one thread a batch of 8 took 65 ms per click against 36 ms for
    the same 8 one by one (a batch of 2: 47 ms per click; same outputs). Nothing is shared between clicks
    on different images, since the decoder's work is on each image's 4096 tokens, and a batch multiplies
    the working set (4 MB per activation per click) out of the caches.
    """

    def __init__(self, device: torch.device | str, slots: int = 0, lone_threads: int = LONE_DECODE_THREADS,
                 idle: Callable[[], int] = idle_cores) -> None:
        self.cpu = torch.device(device).type == "cpu"
        self.slots = slots if slots > 0 else cpu_cores()
        self.lone_threads = max(1, min(lone_threads, self.slots))
        self._idle = idle
        self._free = self.slots
        self._changed = threading.Condition()
        self._crowded_until = 0.0  # time.monotonic() before which no decode spreads (LONE_DECODE_COOLDOWN_S)

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if not self.cpu:
            yield
            return
        threads = self._take()
        try:
            use_threads(threads)
            yield
        finally:
            with self._changed:
                self._free += threads
                self._changed.notify_all()

    def _take(self) -> int:
        """Slots for one decode, waiting for a free one: ``lone_threads`` when it is alone on an idle machine."""
        with self._changed:
            now = time.monotonic()
            if self._free < self.slots:
                self._crowded_until = now + LONE_DECODE_COOLDOWN_S
            elif self.lone_threads > 1 and now >= self._crowded_until and self._idle() >= self.lone_threads - 1:
                self._free -= self.lone_threads
                return self.lone_threads
            while self._free < 1:
                self._changed.wait()
            self._free -= 1
            return 1


def default_cache_bytes(device: str | None) -> int:
    """The in-process embedding cache bound when none is configured, for a model on ``device`` (None: auto).

    Embeddings stay on the model's device, ready to decode. On a GPU they share its memory with the model's
    activations, so a tenth of it (at most 4 GiB, ~1000 embeddings) leaves the encoder room; on a CPU a
    twentieth of the RAM (256 MiB to 2 GiB, ~60 to 500 embeddings) keeps a laptop usable.
    """
    if (device or "cuda").startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device or "cuda").index or 0
        return min(torch.cuda.get_device_properties(index).total_memory // 10, 4 << 30)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 << 30
    return max(256 << 20, min(ram // 20, 2 << 30))


def maybe_compile(module: Callable[_P, _R], enabled: bool) -> Callable[_P, _R]:
    """``torch.compile(module)`` when enabled; the state dict of ``module`` itself is untouched."""
    if not enabled:
        return module
    return torch.compile(module, dynamic=False)
