"""Where and how the networks run: device choice, autocast dtype, CPU threads, torch.compile."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` means the GPU when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for but CUDA is not available")
    return device


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


def maybe_compile(module: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """``torch.compile(module)`` when enabled; the state dict of ``module`` itself is untouched."""
    if not enabled:
        return module
    return torch.compile(module, dynamic=False)
