"""What "the same as the reference" means for masks, shared by the ViT and MobileSAM parity tests."""

from __future__ import annotations

import numpy as np

import model

MASK_IOU = 0.99
LOGIT_ATOL = 1e-3
SCORE_ATOL = 1e-4


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def assert_same(ours: model.Prediction, masks: np.ndarray, scores: np.ndarray, logits: np.ndarray) -> None:
    """Our prediction against the reference's masks, scores and low-res logits for the same prompt.

    The reference masks must not all be trivial (empty or full), or agreeing would prove nothing.
    """
    assert ours.masks.shape == masks.shape and ours.masks.dtype == np.bool_
    fractions = masks.reshape(masks.shape[0], -1).mean(axis=1)
    assert ((fractions > 0.01) & (fractions < 0.99)).any(), f"trivial reference masks {fractions}"
    for k in range(masks.shape[0]):
        assert iou(ours.masks[k], masks[k]) >= MASK_IOU, f"mask {k}"
    np.testing.assert_allclose(ours.low_res_logits, logits, atol=LOGIT_ATOL, rtol=0)
    np.testing.assert_allclose(ours.scores, scores, atol=SCORE_ATOL, rtol=0)
