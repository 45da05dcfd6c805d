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


def assert_same_records(ours: list[dict], theirs: list[dict], point_atol: float) -> None:
    """Segment-everything records against the reference's, matched one to one by mask IoU.

    ``point_atol``: how far the grid point may be (Meta's SAM 2 generator keeps its points in float32).
    """
    assert len(ours) == len(theirs)
    unmatched = list(range(len(ours)))
    for record in theirs:
        ious = [iou(ours[i]["segmentation"], record["segmentation"]) for i in unmatched]
        best = int(np.argmax(ious))
        assert ious[best] >= MASK_IOU, f"no mask of ours matches the reference's mask at {record['bbox']}"
        mine = ours[unmatched.pop(best)]
        assert mine["segmentation"].shape == record["segmentation"].shape
        assert mine["segmentation"].dtype == bool
        assert abs(mine["area"] - record["area"]) <= 0.01 * record["area"]
        assert isinstance(mine["area"], int)
        np.testing.assert_allclose(mine["bbox"], record["bbox"], atol=1)
        assert abs(mine["predicted_iou"] - record["predicted_iou"]) <= 1e-3
        assert abs(mine["stability_score"] - record["stability_score"]) <= 2e-2
        np.testing.assert_allclose(mine["point_coords"], record["point_coords"], atol=point_atol)
        assert mine["crop_box"] == [int(v) for v in record["crop_box"]]
