"""ECE and reliability: golden values by construction (hand-computed), never from the code."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.evaluation.calibration_metrics import (
    Reliability,
    expected_calibration_error,
    folder_calibration,
    foreground_bbox_mask,
)
from medseg.inference.uncertainty import write_probabilities
from medseg.io import Image


def two_class(confidence: list[float], correct: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """(2, N) probabilities predicting class 1 with ``confidence``; labels right or wrong."""
    conf = np.asarray(confidence, dtype=np.float64)
    probs = np.stack([1 - conf, conf])
    labels = np.where(np.asarray(correct), 1, 0)
    return probs, labels


def test_perfectly_calibrated_predictor_has_zero_ece():
    # in every bin the accuracy equals the confidence exactly: 70% of the 0.7 voxels right...
    confidence, correct = [], []
    for conf, n in ((0.55, 200), (0.7, 1000), (0.9, 1000), (0.99, 500)):
        right = int(round(conf * n))
        confidence += [conf] * n
        correct += [True] * right + [False] * (n - right)
    probs, labels = two_class(confidence, correct)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_random_calibrated_predictor_has_ece_near_zero():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.5, 1.0, 400_000)
    correct = rng.random(conf.size) < conf  # right with exactly the stated probability
    probs, labels = two_class(conf.tolist(), correct.tolist())
    assert expected_calibration_error(probs, labels) < 0.005


def test_over_confident_predictor_matches_the_hand_computed_ece():
    # 400 voxels at 0.95 with 300 right (acc 0.75, gap 0.20) and 600 at 0.65 with 300 right
    # (acc 0.5, gap 0.15): ECE = (400 * 0.20 + 600 * 0.15) / 1000 = 0.17
    confidence = [0.95] * 400 + [0.65] * 600
    correct = [True] * 300 + [False] * 100 + [True] * 300 + [False] * 300
    probs, labels = two_class(confidence, correct)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.17, abs=1e-9)
    rel = Reliability(15)
    rel.add(probs, labels)
    rows = [r for r in rel.curve() if r["count"]]
    assert [r["count"] for r in rows] == [600, 400]
    assert rows[1]["accuracy"] == pytest.approx(0.75) and rows[1]["confidence"] == pytest.approx(
        0.95
    )


def test_bbox_mask_and_folder_calibration(tmp_path):
    ref = np.zeros((10, 10, 6), dtype=np.uint8)
    ref[2:5, 3:7, 1:4] = 1
    box = foreground_bbox_mask(ref)
    assert box.sum() == 3 * 4 * 3 and box[2:5, 3:7, 1:4].all()
    probs = np.zeros((2, *ref.shape), dtype=np.float32)
    probs[1] = np.where(ref == 1, 0.8, 0.1)
    probs[0] = 1 - probs[1]
    image = Image(np.zeros(ref.shape, np.float32), (1.0, 1.0, 2.0))
    write_probabilities(probs, image, tmp_path / "a_probabilities.nii.gz")
    summary, pooled = folder_calibration({"a": tmp_path / "a_probabilities.nii.gz"}, {"a": ref})
    # inside the box every voxel is class 1 with confidence 0.8, all right: gap 0.2
    assert summary["ece_bbox"] == pytest.approx(0.2, abs=1e-3)
    # outside: confidence 0.9, all right (gap 0.1); whole = (36 * 0.2 + 564 * 0.1) / 600
    assert summary["ece_whole"] == pytest.approx((36 * 0.2 + 564 * 0.1) / 600, abs=1e-3)
    assert summary["bins"] == 15 and pooled["bbox"].total == 36


def test_evaluate_folders_reports_ece_and_a_reliability_diagram(tmp_path):
    from medseg.evaluation import evaluate_folders
    from medseg.io import write_image

    ref = np.zeros((10, 10, 6), dtype=np.uint8)
    ref[2:5, 3:7, 1:4] = 1
    probs = np.zeros((2, *ref.shape), dtype=np.float32)
    probs[1] = np.where(ref == 1, 0.8, 0.1)
    probs[0] = 1 - probs[1]
    image = Image(ref, (1.0, 1.0, 1.0))
    write_image(image, tmp_path / "refs" / "a.nii.gz")
    write_image(image, tmp_path / "pred" / "a.nii.gz")
    write_probabilities(probs, image, tmp_path / "pred" / "a_probabilities.npz")
    report = evaluate_folders(tmp_path / "pred", tmp_path / "refs", output_dir=tmp_path / "ev")
    assert report.summary["calibration"]["ece_bbox"] == pytest.approx(0.2, abs=1e-3)
    html = (tmp_path / "ev" / "report.html").read_text()
    assert "Calibration" in html and "reliability diagram" in html
