"""Golden values from reference libraries (surface-distance, MONAI, medpy), and every documented disagreement.

Agreement: overlap metrics to 1e-6 (MONAI computes in float32) or 1e-12
(medpy); surface-distance's HD, HD95, average distance and NSD to 1e-9 on
random anisotropic shapes and real label maps; MONAI's ``use_subvoxels``
NSD to 1e-6 away from ties and image borders; MONAI's and medpy's
voxel-edge distances within one voxel diagonal.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from conftest import shared_dataset
from scipy import ndimage

from medseg.evaluation import compute_metrics, compute_surface_distances
from medseg.evaluation.distances import (
    assd_from_distances,
    hausdorff_from_distances,
    masd_from_distances,
    nsd_from_distances,
    surfel_area_table,
)

sd_lib = pytest.importorskip("surface_distance")
torch = pytest.importorskip("torch")
monai_metrics = pytest.importorskip("monai.metrics")
medpy_binary = pytest.importorskip("medpy.metric.binary")


def random_shape(rng, shape, threshold=0.52, sigma=2.5, margin=0) -> np.ndarray:
    mask = ndimage.gaussian_filter(rng.random(shape), sigma) > threshold
    if margin:
        inner = np.zeros(shape, bool)
        inner[tuple(slice(margin, -margin) for _ in shape)] = True
        mask &= inner
    return mask


def ellipsoid(shape, centre, radii) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1


def onehot(mask: np.ndarray):
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return torch.cat([1 - t, t], dim=1)


def deepmind(pred: np.ndarray, ref: np.ndarray, spacing, tolerance: float) -> dict:
    d = sd_lib.compute_surface_distances(ref.astype(bool), pred.astype(bool), spacing)
    forward, backward = sd_lib.compute_average_surface_distance(d)
    areas_ref, areas_pred = d["surfel_areas_gt"], d["surfel_areas_pred"]
    return {
        "hd": sd_lib.compute_robust_hausdorff(d, 100),
        "hd95": sd_lib.compute_robust_hausdorff(d, 95),
        "masd": (forward + backward) / 2,
        "assd": (
            (d["distances_gt_to_pred"] * areas_ref).sum()
            + (d["distances_pred_to_gt"] * areas_pred).sum()
        )
        / (areas_ref.sum() + areas_pred.sum()),
        "nsd": sd_lib.compute_surface_dice_at_tolerance(d, tolerance),
    }


def assert_matches_deepmind(pred, ref, spacing, tolerance, *, label=1):
    ours = compute_metrics(pred, ref, labels=[label], spacing=spacing, tolerance_mm=tolerance)
    theirs = deepmind(pred == label, ref == label, spacing, tolerance)
    for key, value in theirs.items():
        assert ours[label][key] == pytest.approx(value, abs=1e-9, rel=1e-9), key
    return ours[label]


# ---------------------------------------------------------------- surface-distance


def test_surfel_tables_equal_surface_distance():
    lookup = sd_lib.lookup_tables
    for spacing in [(1.0, 1.0, 1.0), (0.7, 1.3, 2.9), (3.0, 0.5, 0.5)]:
        expected = lookup.create_table_neighbour_code_to_surface_area(spacing)
        np.testing.assert_allclose(surfel_area_table(spacing), expected, atol=1e-12)
    for spacing in [(1.0, 1.0), (0.7, 1.3)]:
        expected = lookup.create_table_neighbour_code_to_contour_length(spacing)
        np.testing.assert_allclose(surfel_area_table(spacing), expected, atol=1e-12)


@pytest.mark.parametrize("ndim", [2, 3])
def test_random_anisotropic_shapes_match_surface_distance(ndim):
    rng = np.random.default_rng(ndim)
    for _ in range(4):
        shape = (28, 24, 18)[:ndim]
        pred, ref = random_shape(rng, shape), random_shape(rng, shape)
        spacing = tuple(rng.uniform(0.4, 3.0, ndim))
        tolerance = float(rng.uniform(0.5, 4.0))
        assert_matches_deepmind(pred.astype(np.uint8), ref.astype(np.uint8), spacing, tolerance)
        # and the directed-distance helpers agree with compute_metrics
        sd = compute_surface_distances(pred, ref, spacing=spacing)
        row = compute_metrics(pred, ref, labels=[1], spacing=spacing, tolerance_mm=tolerance)[1]
        assert row["hd"] == hausdorff_from_distances(sd)
        assert row["assd"] == assd_from_distances(sd) and row["masd"] == masd_from_distances(sd)
        assert row["nsd"] == nsd_from_distances(sd, tolerance_mm=tolerance)


# ---------------------------------------------------------------- MONAI


def test_monai_dice_and_subvoxel_nsd_agree():
    spacing = (0.9, 1.1, 2.2)
    shape = (36, 32, 20)
    ref = ellipsoid(shape, (17.3, 15.2, 9.6), (10.1, 8.3, 5.2))
    pred = ellipsoid(shape, (18.4, 15.0, 9.1), (9.2, 9.0, 4.8))
    ours = compute_metrics(pred, ref, labels=[1], spacing=spacing, tolerance_mm=1.7)[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dice = monai_metrics.compute_dice(onehot(pred), onehot(ref), include_background=False)
        nsd = monai_metrics.compute_surface_dice(
            onehot(pred), onehot(ref), class_thresholds=[1.7], spacing=spacing, use_subvoxels=True
        )
    assert ours["dice"] == pytest.approx(dice.item(), abs=1e-6)
    assert ours["nsd"] == pytest.approx(nsd.item(), abs=1e-6)


def test_monai_and_medpy_voxel_edge_distances_within_one_voxel_diagonal():
    # Documented difference: MONAI (without subvoxels) and medpy measure between the
    # centres of edge voxels (mask minus its erosion), each voxel counted once; medseg
    # measures between surface elements on the voxel corners, weighted by area.
    rng = np.random.default_rng(7)
    spacing = (0.8, 1.2, 2.5)
    diagonal = float(np.linalg.norm(spacing))
    for _ in range(3):
        shape = (32, 28, 18)
        pred, ref = random_shape(rng, shape, margin=2), random_shape(rng, shape, margin=2)
        ours = compute_metrics(pred, ref, labels=[1], spacing=spacing)[1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hd = monai_metrics.compute_hausdorff_distance(
                onehot(pred), onehot(ref), spacing=spacing
            ).item()
            hd95 = monai_metrics.compute_hausdorff_distance(
                onehot(pred), onehot(ref), spacing=spacing, percentile=95
            ).item()
        assert abs(ours["hd"] - hd) <= diagonal
        assert abs(ours["hd95"] - hd95) <= diagonal
        assert abs(ours["hd"] - medpy_binary.hd(pred, ref, spacing)) <= diagonal
        assert abs(ours["assd"] - medpy_binary.assd(pred, ref, spacing)) <= diagonal


def test_medpy_overlap_metrics_agree_exactly():
    rng = np.random.default_rng(11)
    pred, ref = random_shape(rng, (30, 26, 14)), random_shape(rng, (30, 26, 14))
    ours = compute_metrics(pred, ref, labels=[1], spacing=(1.0, 1.0, 3.0), distances=False)[1]
    assert ours["dice"] == pytest.approx(medpy_binary.dc(pred, ref), abs=1e-12)
    assert ours["iou"] == pytest.approx(medpy_binary.jc(pred, ref), abs=1e-12)
    assert ours["precision"] == pytest.approx(medpy_binary.precision(pred, ref), abs=1e-12)
    assert ours["recall"] == pytest.approx(medpy_binary.recall(pred, ref), abs=1e-12)
    assert ours["specificity"] == pytest.approx(
        medpy_binary.true_negative_rate(pred, ref), abs=1e-12
    )
    assert ours["rel_volume_difference"] == pytest.approx(medpy_binary.ravd(pred, ref), abs=1e-12)


# ---------------------------------------------------------------- documented disagreements


def test_medpy_pools_both_directions_before_the_95th_percentile():
    # A 12^3 cube, and the same cube plus a small blob far away. Per direction, the blob
    # is 7 % of the prediction's edge voxels, so the prediction->reference 95th percentile
    # lands on it (MONAI, surface-distance, medseg). Pooled with the reference's edge, it
    # is under 5 % and medpy's HD95 ignores the blob.
    ref = np.zeros((48, 20, 20), bool)
    ref[4:16, 4:16, 4:16] = True
    pred = ref.copy()
    pred[38:42, 8:12, 8:12] = True
    spacing = (1.0, 1.0, 1.0)
    ours = compute_metrics(pred, ref, labels=[1], spacing=spacing)[1]["hd95"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monai = monai_metrics.compute_hausdorff_distance(
            onehot(pred), onehot(ref), percentile=95
        ).item()
    medpy = medpy_binary.hd95(pred, ref, spacing)
    assert ours >= 22 and monai >= 22  # the blob is 23-26 mm from the cube
    assert medpy < 2


def test_monai_assumes_one_millimetre_without_spacing():
    ref = np.zeros((20, 20, 20), bool)
    ref[5:10, 5:10, 5:10] = True
    pred = np.roll(ref, 2, axis=2)
    spacing = (1.0, 1.0, 3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monai = monai_metrics.compute_hausdorff_distance(onehot(pred), onehot(ref)).item()
    assert monai == 2.0  # voxels, read as mm
    assert compute_metrics(pred, ref, labels=[1], spacing=spacing)[1]["hd"] == 6.0


def test_empty_masks_differ_between_libraries():
    full = np.zeros((10, 10, 10), bool)
    full[2:6, 2:6, 2:6] = True
    empty = np.zeros_like(full)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monai = monai_metrics.compute_hausdorff_distance(onehot(full), onehot(empty)).item()
    assert math.isinf(monai)  # MONAI: inf (or NaN, with a warning)
    with pytest.raises(RuntimeError):
        medpy_binary.hd(full, empty)  # medpy: an exception
    try:  # surface-distance: inf, or an error under NumPy 2 (np.Inf was removed)
        theirs = sd_lib.compute_robust_hausdorff(
            sd_lib.compute_surface_distances(empty, full, (1, 1, 1)), 95
        )
        assert math.isinf(theirs)
    except AttributeError:
        pass
    ours = compute_metrics(full, empty, labels=[1])[1]  # medseg: NaN, flagged, or a penalty
    assert math.isnan(ours["hd95"]) and ours["empty_reference"]
    assert compute_metrics(full, empty, labels=[1], empty="penalty")[1]["hd95"] > 0


def test_monai_counts_edge_voxels_unless_asked_for_subvoxels():
    # MONAI's default NSD counts boundary voxels, each once; with use_subvoxels=True it
    # weights surface elements by area as surface-distance and medseg do.
    spacing = (0.9, 1.1, 2.2)
    shape = (36, 32, 20)
    ref = ellipsoid(shape, (17.3, 15.2, 9.6), (10.1, 8.3, 5.2))
    pred = ellipsoid(shape, (18.4, 15.0, 9.1), (9.2, 9.0, 4.8))
    ours = compute_metrics(pred, ref, labels=[1], spacing=spacing, tolerance_mm=1.0)[1]["nsd"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        voxels, subvoxels = (
            monai_metrics.compute_surface_dice(
                onehot(pred), onehot(ref), class_thresholds=[1.0], spacing=spacing, use_subvoxels=s
            ).item()
            for s in (False, True)
        )
    assert ours == pytest.approx(subvoxels, abs=1e-6)
    assert abs(ours - voxels) > 0.01


def test_a_distance_equal_to_the_tolerance_counts_as_within():
    # With spacing (0.8, 1.2, 2.5) the 2 mm distance sqrt(1.6^2 + 1.2^2) comes out of a
    # k-d tree as 2.0000000000000004: medseg allows for that rounding, so its NSD at a
    # tie equals the distance-transform value of surface-distance and MONAI.
    rng = np.random.default_rng(1)
    shape, spacing = (40, 36, 30), (0.8, 1.2, 2.5)
    pred = random_shape(rng, shape, sigma=3, margin=3)
    ref = random_shape(rng, shape, sigma=3, margin=3)
    at_tie = assert_matches_deepmind(pred.astype(np.uint8), ref.astype(np.uint8), spacing, 2.0)
    below = compute_metrics(pred, ref, labels=[1], spacing=spacing, tolerance_mm=1.99)[1]
    assert at_tie["nsd"] > below["nsd"]


# ---------------------------------------------------------------- real label maps


@pytest.mark.integration
def test_hippocampus_labels_match_the_reference_libraries():
    from medseg.io.files import read_image

    root = shared_dataset("Task04_Hippocampus") / "labelsTr"
    for path in sorted(root.glob("*.nii.gz"))[:3]:
        ref = read_image(path)
        array = np.rint(ref.array).astype(np.uint8)
        # a realistic error: labels moved one voxel and one class eroded
        pred = np.roll(array, 1, axis=1)
        pred[(pred == 2) & ~ndimage.binary_erosion(pred == 2)] = 0
        for label in (1, 2):
            row = assert_matches_deepmind(pred, array, ref.spacing, 1.0, label=label)
            assert row["dice"] == pytest.approx(medpy_binary.dc(pred == label, array == label))


@pytest.mark.integration
def test_totalsegmentator_fast_model_against_reference_labels():
    from medseg.io.files import read_image

    root = shared_dataset("TotalSegmentator_example_CT")
    ref = read_image(root / "labelsTr" / "example_ct_sm.nii.gz")
    pred = read_image(root / "extras" / "example_ct_sm_seg_fast.nii.gz")
    assert ref.same_geometry(pred)
    labels = sorted(set(np.unique(ref.array).tolist()) & set(np.unique(pred.array).tolist()))
    labels = [v for v in labels if v]
    ours = compute_metrics(pred.array, ref.array, labels=labels, spacing=ref.spacing)
    checked = 0
    for label in labels[::4]:  # a sample keeps the test fast
        p, r = pred.array == label, ref.array == label
        theirs = deepmind(p, r, ref.spacing, 2.0)
        for key, value in theirs.items():
            assert ours[label][key] == pytest.approx(value, abs=1e-9, rel=1e-9), (label, key)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dice = monai_metrics.compute_dice(onehot(p), onehot(r), include_background=False)
        assert ours[label]["dice"] == pytest.approx(dice.item(), abs=1e-6)
        checked += 1
    assert checked >= 8
