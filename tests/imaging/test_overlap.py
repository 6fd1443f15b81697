"""medseg.imaging: the one Dice (and its empty-mask policy), components, morphology in mm,
atomic writes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medseg.evaluation.metrics import compute_dice
from medseg.imaging import (
    dice,
    dice_from_counts,
    dice_per_class,
)


def test_dice_by_construction_and_its_empty_policy():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True  # 8 voxels
    b[1:3] = True  # 8 voxels, 4 shared
    assert dice(a, b) == 0.5
    assert dice(a, a) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0  # empty in one mask: 0
    assert math.isnan(dice(np.zeros_like(a), np.zeros_like(a)))  # empty in both: NaN by default
    assert dice(np.zeros_like(a), np.zeros_like(a), empty=1.0) == 1.0
    assert dice(np.zeros_like(a), np.zeros_like(a), empty=None) is None
    assert dice(a.astype(np.uint8) * 3, b) == 0.5  # non-zero is inside
    assert math.isnan(dice_from_counts(0, 0, 0)) and dice_from_counts(2, 1, 1) == 4 / 6
    with pytest.raises(ValueError, match="shape"):
        dice(a, b[:3])


def test_dice_per_class_is_nan_for_a_class_absent_from_both():
    pred = np.array([[0, 1, 1], [2, 2, 0]])
    ref = np.array([[0, 1, 0], [2, 0, 0]])
    out = dice_per_class(pred, ref, 4)
    assert out.dtype == np.float64 and out.shape == (3,)
    assert out[0] == pytest.approx(2 / 3) and out[1] == pytest.approx(2 / 3)
    assert math.isnan(out[2])
    assert dice_per_class(pred, ref, 4, empty=1.0)[2] == 1.0


def _old_trainer_dice_per_class(pred, ref, num_classes):
    """training/trainer.py and ensembling/core.py before issue 16."""
    out = np.full(num_classes - 1, np.nan)
    for c in range(1, num_classes):
        p, r = pred == c, ref == c
        denom = p.sum() + r.sum()
        if denom:
            out[c - 1] = 2.0 * np.logical_and(p, r).sum() / denom
    return out


def _old_registration_dice_per_label(a, b):
    """registration/pipeline.py before issue 16."""
    out = {}
    for v in np.union1d(np.unique(a), np.unique(b)):
        if v == 0:
            continue
        denom = np.sum(a == v) + np.sum(b == v)
        out[str(int(v))] = float(2 * np.sum((a == v) & (b == v)) / denom)
    return out


def _old_selection_dice(pred, ref):
    """inference/postprocess_selection.py before issue 16."""
    denom = int(np.count_nonzero(pred)) + int(np.count_nonzero(ref))
    return float("nan") if denom == 0 else 2.0 * np.count_nonzero(pred & ref) / denom


@pytest.mark.parametrize("seed", range(5))
def test_the_one_dice_gives_the_numbers_of_every_copy_it_replaced(seed):
    rng = np.random.default_rng(seed)
    shape = (17, 13, 9) if seed % 2 else (31, 29)
    pred = rng.integers(0, 4, shape) * (rng.random(shape) < 0.3)
    ref = rng.integers(0, 4, shape) * (rng.random(shape) < 0.3)
    ref[ref == 3] = 0  # class 3 only in the prediction
    pred[pred == 3] = 0 if seed == 0 else 3  # and, for seed 0, in neither: NaN
    ours = dice_per_class(pred, ref, 5)  # class 4 is absent from both
    np.testing.assert_array_equal(ours, _old_trainer_dice_per_class(pred, ref, 5))
    evaluation = compute_dice(pred, ref, labels=range(1, 5))
    np.testing.assert_array_equal(ours, [evaluation[c] for c in range(1, 5)])
    old = _old_registration_dice_per_label(pred, ref)
    assert {k: dice(pred == int(k), ref == int(k)) for k in old} == old
    for c in range(1, 5):
        new, before = dice(pred == c, ref == c), _old_selection_dice(pred == c, ref == c)
        assert new == before or (math.isnan(new) and math.isnan(before))
