"""medseg.imaging: the one Dice (and its empty-mask policy), components, morphology in mm,
atomic writes."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.imaging import (
    check_connectivity,
    components_by_size,
    fill_holes,
    keep_largest_component,
    keep_largest_components,
    remove_small_components,
)


def test_components_by_size_labels_largest_first():
    mask = np.zeros((10, 10), np.uint8)
    mask[0:2, 0:2] = 1  # 4
    mask[5:9, 5:9] = 1  # 16
    mask[0:3, 6:9] = 1  # 9
    labels = components_by_size(mask)
    assert labels.dtype == np.int32
    assert [(labels == i).sum() for i in (1, 2, 3)] == [16, 9, 4]


def test_connectivity_is_checked_against_the_dimension():
    assert check_connectivity(3) == 26 and check_connectivity(2) == 8
    assert check_connectivity(3, 6) == 6
    with pytest.raises(MedsegError, match="connectivity"):
        check_connectivity(2, 26)


def test_keep_largest_component_and_fill_holes_by_construction():
    label = np.zeros((12, 12), dtype=np.uint8)
    label[1:8, 1:8] = 1
    label[3:5, 3:5] = 0  # a hole
    label[10:12, 10:12] = 1  # a small island
    label[9, 0:3] = 2
    kept = keep_largest_component(label)
    assert kept[10:12, 10:12].sum() == 0 and (kept == 2).sum() == 3 and kept[3, 3] == 0
    filled = fill_holes(kept)
    assert (filled[1:8, 1:8] == 1).all() and (filled == 1).sum() == 49


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
