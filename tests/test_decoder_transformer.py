"""Our two-way transformer against Meta's ``TwoWayTransformer`` at the official width (256, 8 heads).

The small test checkpoints have a 64-wide decoder, where the image-side projections are never folded into
the tokens (``Attention.folds_image_side``), so the folded forms are tested here, at the width the official
checkpoints have, on both sides of the boundary where folding stops paying: a click and a box (7 tokens),
16 tokens (the last count folded with 8 heads over 128 channels), and 17 and 40 tokens (Meta's order), under
both ``FastPaths`` presets.
"""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling.transformer import TwoWayTransformer as ReferenceTransformer

from model import FAST, REFERENCE
from model.fast_paths import apply
from model.transformer import TwoWayTransformer
from testsupport.checkpoints import randomize

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GRID = 32  # image tokens per side: 1024 tokens, a quarter of the official 64 x 64, same arithmetic per token


@pytest.fixture(scope="module")
def transformers() -> tuple[TwoWayTransformer, ReferenceTransformer]:
    reference = randomize(ReferenceTransformer(depth=2, embedding_dim=256, num_heads=8, mlp_dim=2048), seed=4)
    ours = TwoWayTransformer(depth=2, embedding_dim=256, num_heads=8, mlp_dim=2048)
    ours.load_state_dict(reference.state_dict())
    return ours.eval(), reference.eval()


def inputs(batch: int, n_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 256, GRID, GRID, generator=generator)
    image_pe = torch.randn(1, 256, GRID, GRID, generator=generator)
    tokens = torch.randn(batch, n_tokens, 256, generator=generator)
    return image, image_pe, tokens


@pytest.mark.parametrize("preset", [FAST, REFERENCE], ids=["fast", "reference"])
@pytest.mark.parametrize("n_tokens", [7, 16, 17, 40])
@pytest.mark.parametrize("batch", [1, 3])
def test_transformer_matches_reference(transformers, n_tokens, batch, preset):
    ours, reference = transformers
    apply(ours, preset, "cpu")
    image, image_pe, tokens = inputs(batch, n_tokens, seed=n_tokens + batch)
    assert ours.layers[0].cross_attn_image_to_token.folds_image_side(n_tokens) == (n_tokens <= 16)
    with torch.inference_mode():
        queries, keys = ours(image, image_pe, tokens)
        expected_queries, expected_keys = reference(image, image_pe.expand(batch, -1, -1, -1), tokens)
    torch.testing.assert_close(queries, expected_queries, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(keys, expected_keys, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("n_tokens", [7, 16])
def test_folded_attention_equals_meta_order(transformers, n_tokens):
    """Each folded form against the same module's forward in Meta's order (project, attend, project back)."""
    attention = transformers[0].final_attn_token_to_image
    generator = torch.Generator().manual_seed(n_tokens)
    image = torch.randn(2, GRID * GRID, 256, generator=generator)
    image_values = torch.randn(2, GRID * GRID, 256, generator=generator)
    tokens = torch.randn(2, n_tokens, 256, generator=generator)
    token_values = torch.randn(2, n_tokens, 256, generator=generator)
    with torch.inference_mode():
        attention.fast_paths = REFERENCE
        tokens_to_image = attention(tokens, image, image_values)
        image_to_tokens = attention(image, tokens, token_values)
        attention.fast_paths = FAST
        torch.testing.assert_close(attention.tokens_to_image_folded(tokens, image, image_values),
                                   tokens_to_image, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(attention.image_to_tokens_folded(image, tokens, token_values),
                                   image_to_tokens, atol=2e-5, rtol=1e-5)
        # The policy's dispatch picks the folded forms for these token counts.
        assert torch.equal(attention(tokens, image, image_values),
                           attention.tokens_to_image_folded(tokens, image, image_values))
        assert torch.equal(attention(image, tokens, token_values),
                           attention.image_to_tokens_folded(image, tokens, token_values))


@pytest.mark.parametrize("preset", [FAST, REFERENCE], ids=["fast", "reference"])
@pytest.mark.parametrize("n_tokens", [7, 17])
def test_an_image_shared_by_the_batch_equals_its_copies(transformers, n_tokens, preset):
    """One (1, C, h, w) image for 3 prompts (``shared_decoder_image``) against Meta's transformer on 3 copies:
    the folded forms' single products and, past the folding boundary, the broadcast in Meta's order."""
    ours, reference = transformers
    apply(ours, preset, "cpu")
    image, image_pe, tokens = inputs(1, n_tokens, seed=50 + n_tokens)
    tokens = torch.cat([tokens, tokens.flip(1), 2 * tokens])
    with torch.inference_mode():
        queries, keys = ours(image, image_pe, tokens)
        expected_queries, expected_keys = reference(image.expand(3, -1, -1, -1), image_pe.expand(3, -1, -1, -1),
                                                    tokens)
    assert keys.shape == expected_keys.shape
    torch.testing.assert_close(queries, expected_queries, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(keys, expected_keys, atol=2e-5, rtol=1e-5)
