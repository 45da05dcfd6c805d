"""The shared building blocks' speed mechanics change no result: in-place activations, chunked MLPs."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from model import FAST, REFERENCE
from model.common import MLPBlock, activate, gelu, gelu_

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Chunks of 10 rows of MLPBlock(32, 96): 99 tokens leave a short last one.
TEN_ROWS = replace(FAST, mlp_chunk_elements=10 * 96)


@pytest.mark.parametrize("act", [nn.GELU(), nn.GELU(approximate="tanh"), nn.ReLU(), nn.Sigmoid()])
def test_in_place_activation_is_the_module(act):
    x = torch.randn(3, 50, 7, generator=torch.Generator().manual_seed(0))
    expected = act(x)
    assert torch.equal(activate(act, x.clone(), in_place=True), expected)
    assert torch.equal(activate(act, x.clone(), in_place=False), expected)
    assert torch.equal(gelu_(x.clone()), nn.functional.gelu(x))
    assert torch.equal(gelu(x.clone(), in_place=True), gelu(x, in_place=False))


@pytest.mark.parametrize("act", [nn.GELU, nn.ReLU])
def test_mlp_in_row_chunks_equals_the_whole(act):
    torch.manual_seed(0)
    mlp = MLPBlock(32, 96, act).eval()
    x = torch.randn(1, 9, 11, 32)  # 99 tokens: chunks of 10 leave a short last one
    with torch.inference_mode():
        whole = mlp(x)
        mlp.fast_paths = TEN_ROWS
        chunked = mlp(x)
        mlp.fast_paths = REFERENCE
        meta_order = mlp(x)
        reference = mlp.lin2(act()(mlp.lin1(x)))
    assert chunked.shape == x.shape
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(chunked, reference, atol=1e-6, rtol=1e-5)
    assert torch.equal(meta_order, reference), "the reference preset is Meta's MLPBlock"


def test_chunked_mlp_under_cpu_bf16_autocast():
    """SAM_DTYPE=bf16 on a CPU: the chunked path autocasts like the whole, same dtype and values."""
    torch.manual_seed(1)
    mlp = MLPBlock(32, 96).eval()
    x = torch.randn(1, 9, 11, 32)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        whole = mlp(x)
        mlp.fast_paths = TEN_ROWS
        chunked = mlp(x)
    assert chunked.dtype == whole.dtype == torch.bfloat16
    torch.testing.assert_close(chunked, whole)
