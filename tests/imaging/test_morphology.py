"""medseg.imaging: the one Dice (and its empty-mask policy), components, morphology in mm,
atomic writes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medseg.imaging import (
    ball_structure,
    binary_closing,
    binary_opening,
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


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.5, 1.0, 2.0)])
def test_distance_transform_morphology_equals_scipy_with_a_ball(spacing):
    rng = np.random.default_rng(1)
    mask = (ndimage.gaussian_filter(rng.random((24, 24, 16)), 2) > 0.5).astype(np.uint8)
    ball = ball_structure(2.0, spacing)
    opened = ndimage.binary_opening(mask, structure=ball)
    np.testing.assert_array_equal(binary_opening(mask, radius_mm=2.0, spacing=spacing), opened)
    closed = ndimage.binary_closing(np.pad(mask, 8), structure=ball)[8:-8, 8:-8, 8:-8] | (mask > 0)
    np.testing.assert_array_equal(binary_closing(mask, radius_mm=2.0, spacing=spacing), closed)
