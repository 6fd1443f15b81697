"""Review thresholds and failure recall on hand-made cases."""

from __future__ import annotations

import pytest

from medseg.calibration import choose_review, recall_at_fraction, review_threshold, spearman


def test_threshold_reaches_the_target_recall():
    scores = [0.9, 0.8, 0.1, 0.7, 0.2, 0.3]
    failed = [True, True, False, True, False, False]
    assert review_threshold(scores, failed, target_recall=1.0) == 0.7
    assert review_threshold(scores, failed, target_recall=0.5) == 0.8  # 2 of 3 failures
    assert recall_at_fraction(scores, failed, fraction=0.34) == pytest.approx(2 / 3)


def test_choose_review_picks_the_score_that_ranks_dice():
    cases = []
    for i in range(20):
        dice = 0.5 + i * 0.02
        cases.append(
            {"dice": dice, "dice_gap": 1 - dice, "entropy_ratio": (i * 7) % 5, "mi_ratio": 0.0}
        )
    qc = choose_review(cases, target_recall=1.0, failure_quantile=0.1)
    assert qc["score"] == "dice_gap"
    assert qc["spearman"]["dice_gap"] == pytest.approx(-1.0)
    assert qc["failures"] == 2 and qc["recall"] == 1.0
    assert qc["flagged_fraction"] == pytest.approx(0.1)
    assert spearman([1, 2, 3], [1, 1, 1]) != spearman([1, 2, 3], [1, 1, 1])  # NaN: constant
