"""``Embedding`` bytes: compact, self-describing, and refusing anything they did not write."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import model
from model.embedding import MAGIC, Embedding
from testsupport.checkpoints import make_image, small_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    path, _ = small_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=6)
    return model.Predictor(model.load(path, device="cpu"))


def official_sized() -> Embedding:
    features = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(0))
    return Embedding(features=features, original_size=(480, 640), input_size=(768, 1024),
                     fingerprint="0123456789abcdef")


def test_round_trip_is_compact_and_close():
    embedding = official_sized()
    data = embedding.to_bytes()
    assert data.startswith(MAGIC)
    assert len(data) < 256 * 64 * 64 * 2 + 128  # fp16 payload plus a small header: ~2 MiB
    assert embedding.nbytes == 256 * 64 * 64 * 4
    back = Embedding.from_bytes(data)
    assert back.original_size == (480, 640) and back.input_size == (768, 1024)
    assert back.fingerprint == "0123456789abcdef"
    assert back.features.dtype == torch.float32 and back.features.shape == (1, 256, 64, 64)
    torch.testing.assert_close(back.features, embedding.features, atol=2e-3, rtol=1e-3)
    # Token-major in memory, as the decoder reads it; a channels-first source round-trips the same.
    assert back.features.is_contiguous(memory_format=torch.channels_last)
    assert Embedding.from_bytes(data).to_bytes() == data


def test_masks_from_restored_bytes_match(predictor):
    image = make_image(200, 150, seed=2)
    embedding = predictor.embed(image)
    assert embedding.features.is_contiguous(memory_format=torch.channels_last)
    restored = Embedding.from_bytes(embedding.to_bytes(), device="cpu")
    a = predictor.predict(embedding, [[70, 90]], [1])
    b = predictor.predict(restored, [[70, 90]], [1])
    for k in range(3):
        union = np.logical_or(a.masks[k], b.masks[k]).sum()
        assert union == 0 or np.logical_and(a.masks[k], b.masks[k]).sum() / union >= 0.99
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-2)


@pytest.mark.parametrize("damage", ["truncate", "flip", "magic", "version", "empty", "extra", "not bytes"])
def test_foreign_or_damaged_bytes_raise_value_error(damage):
    data = bytearray(official_sized().to_bytes())
    if damage == "truncate":
        data = data[:-100]
    elif damage == "flip":
        data[5000] ^= 0xFF
    elif damage == "magic":
        data[0:6] = b"PNG\r\n\x1a"
    elif damage == "version":
        data[6] = 99
    elif damage == "empty":
        data = b""
    elif damage == "extra":
        data += b"\0"
    with pytest.raises(ValueError):
        Embedding.from_bytes(12345 if damage == "not bytes" else bytes(data))
