"""Classical methods: golden values from scikit-image and SimpleITK, ground truth by construction."""

from __future__ import annotations

import numpy as np

from medseg.classical import (
    connected_components,
    filter_components,
)
from medseg.io import Image


def test_component_filtering_uses_mm3():
    mask = np.zeros((20, 20, 10), np.uint8)
    mask[1:3, 1:3, 1:3] = 1  # 8 voxels
    mask[10:15, 10:15, 2:6] = 1  # 100 voxels
    fine = Image(mask, (1.0, 1.0, 1.0))
    coarse = Image(mask, (2.0, 2.0, 2.0))  # 8 mm^3 per voxel
    assert filter_components(fine, min_volume_mm3=50).array.sum() == 100
    assert filter_components(coarse, min_volume_mm3=50).array.sum() == 108
    labels = connected_components(fine, connectivity=6)
    assert (labels.array == 1).sum() == 100 and (labels.array == 2).sum() == 8
