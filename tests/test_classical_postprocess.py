"""Postprocessing operations of medseg.inference.postprocess added for issue 4."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.inference.postprocess import (
    ball_structure,
    binary_closing,
    binary_opening,
    keep_largest_components,
    remove_small_components,
    threshold_probabilities,
    tune_threshold,
)


def test_ball_structure_is_round_in_mm():
    ball = ball_structure(2.0, (0.5, 1.0, 2.0))
    assert ball.shape == (9, 5, 3)
    assert ball[4, 2, 1] and ball[0, 2, 1] and ball[4, 2, 0] and not ball[0, 0, 0]


def test_opening_removes_a_thin_spur_and_closing_fills_a_gap():
    label = np.zeros((30, 30), np.uint8)
    label[5:20, 5:20] = 1
    label[20:28, 12] = 1  # one voxel wide spur
    opened = binary_opening(label, radius_mm=1.0, spacing=(1.0, 1.0))
    assert opened[21:28, 12].sum() == 0 and opened[8:17, 8:17].all()
    gap = np.zeros((30, 30), np.uint8)
    gap[5:25, 5:14] = 2
    gap[5:25, 15:25] = 2  # a one-voxel slit between two halves
    closed = binary_closing(gap, radius_mm=1.0, spacing=(1.0, 1.0))
    assert closed[6:24, 14].all() and closed.max() == 2
    # With 0.25 mm voxels the same 1 mm radius is 4 voxels: a 3-voxel slit closes.
    gap[5:25, 13:16] = 0
    assert not binary_closing(gap, radius_mm=1.0, spacing=(1.0, 1.0))[10, 14]
    assert binary_closing(gap, radius_mm=1.0, spacing=(0.25, 0.25))[10, 14]


def test_keep_k_largest_components_per_class():
    label = np.zeros((12, 12, 4), np.uint8)
    label[0:2, 0:2, 0] = 1  # 4
    label[5:8, 0:3, 0] = 1  # 9
    label[0:4, 8:12, 0] = 1  # 16
    label[10:12, 10:12, 2] = 2
    out = keep_largest_components(label, k=2)
    assert (out == 1).sum() == 25 and (out == 2).sum() == 4
    assert (keep_largest_components(label, k=1, classes=[1]) == 1).sum() == 16
    with pytest.raises(MedsegError, match="k must be"):
        keep_largest_components(label, k=0)
    with pytest.raises(MedsegError, match="connectivity"):
        keep_largest_components(label, connectivity=8)


def test_remove_small_components_by_mm3():
    label = np.zeros((10, 10), np.uint8)
    label[0:2, 0:2] = 1  # 4 voxels
    label[4:9, 4:9] = 1  # 25 voxels
    assert (remove_small_components(label, min_volume_mm3=5, spacing=(1.0, 1.0)) > 0).sum() == 25
    # 4 voxels of 1.5 x 1.0 mm = 6 mm^2 survive a 5 mm^2 limit
    assert (remove_small_components(label, min_volume_mm3=5, spacing=(1.5, 1.0)) > 0).sum() == 29


def test_tune_threshold_finds_the_separating_value():
    rng = np.random.default_rng(0)
    refs = [rng.random((20, 20)) > 0.5 for _ in range(3)]
    probs = [
        np.where(r, rng.uniform(0.62, 1.0, r.shape), rng.uniform(0, 0.58, r.shape)) for r in refs
    ]
    best, scores = tune_threshold(probs, refs, thresholds=np.arange(1, 20) / 20)
    assert best == 0.6 and scores[0.6] == 1.0 and scores[0.5] < 1.0
    np.testing.assert_array_equal(threshold_probabilities(probs[0], best), refs[0])
    with pytest.raises(MedsegError, match="shape"):
        tune_threshold([np.zeros((2, 2))], [np.zeros((3, 3))])


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.5, 1.0, 2.0)])
def test_distance_transform_morphology_equals_scipy_with_a_ball(spacing):
    from scipy import ndimage

    rng = np.random.default_rng(1)
    mask = (ndimage.gaussian_filter(rng.random((24, 24, 16)), 2) > 0.5).astype(np.uint8)
    ball = ball_structure(2.0, spacing)
    opened = ndimage.binary_opening(mask, structure=ball)
    np.testing.assert_array_equal(binary_opening(mask, radius_mm=2.0, spacing=spacing), opened)
    closed = ndimage.binary_closing(np.pad(mask, 8), structure=ball)[8:-8, 8:-8, 8:-8] | (mask > 0)
    np.testing.assert_array_equal(binary_closing(mask, radius_mm=2.0, spacing=spacing), closed)
