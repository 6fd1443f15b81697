"""medseg.imaging: the one Dice (and its empty-mask policy), components, morphology in mm,
atomic writes."""

from __future__ import annotations

import math
import os
import stat

import numpy as np
import pytest
from scipy import ndimage

from medseg.errors import MedsegError
from medseg.evaluation.metrics import compute_dice
from medseg.imaging import (
    atomic_path,
    ball_structure,
    binary_closing,
    binary_opening,
    check_connectivity,
    components_by_size,
    dice,
    dice_from_counts,
    dice_per_class,
    fill_holes,
    keep_largest_component,
    keep_largest_components,
    remove_small_components,
    write_bytes_atomic,
    write_text_atomic,
)

# --- Dice ---


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


# --- components ---


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


# --- morphology ---


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


# --- atomic writes ---


def test_atomic_path_renames_into_place_with_the_usual_permissions(tmp_path):
    target = tmp_path / "sub" / "out.nii.gz"
    with atomic_path(target, suffix=".nii.gz") as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".tmp-")
        assert tmp.name.endswith(".nii.gz") and not target.exists()
        tmp.write_bytes(b"data")
    assert target.read_bytes() == b"data"
    assert list(target.parent.iterdir()) == [target]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = write_text_atomic("old", tmp_path / "a.txt")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    assert write_bytes_atomic(b"new", target).read_bytes() == b"new"
