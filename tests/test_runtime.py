"""``model.runtime``'s device policy as the server uses it: worker GPUs, dtype names, threads, cache size."""

from __future__ import annotations

import pytest
import torch

from model import runtime


@pytest.mark.parametrize("device, slot, gpus, expected", [
    (None, 0, 2, "cuda:0"), (None, 3, 2, "cuda:1"), ("cuda", 2, 3, "cuda:2"),  # one worker per GPU
    (None, 1, 1, None), ("cuda", 1, 1, "cuda"), (None, 1, 0, None),  # one GPU or none: as set
    ("cpu", 1, 2, "cpu"), ("cuda:1", 0, 2, "cuda:1"),  # the CPU or a pinned GPU: as set
])
def test_worker_device(monkeypatch: pytest.MonkeyPatch, device: str | None, slot: int, gpus: int,
                       expected: str | None) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert runtime.worker_device(device, slot) == expected


def test_dtype_names() -> None:
    assert [runtime.dtype_from_name(name) for name in ("auto", "fp32", "bf16", "fp16")] == \
        [None, torch.float32, torch.bfloat16, torch.float16]
    with pytest.raises(ValueError, match="fp8"):
        runtime.dtype_from_name("fp8")


def test_configure_threads_keeps_the_default_for_zero() -> None:
    previous = torch.get_num_threads()
    try:
        runtime.configure_threads(0)
        assert torch.get_num_threads() == previous
        runtime.configure_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)


def test_default_cache_bytes_on_the_cpu() -> None:
    assert 256 << 20 <= runtime.default_cache_bytes("cpu") <= 2 << 30
