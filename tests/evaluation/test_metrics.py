"""Metrics built by construction: known distances, known NSD, empty-mask policies, lesion counts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.evaluation import (
    EvaluationReport,
    compute_assd,
    compute_boundary_iou,
    compute_hausdorff,
    compute_hd95,
    compute_masd,
    compute_metrics,
    compute_nsd,
    compute_overlap,
    compute_surface_distances,
    evaluate_pairs,
    lesion_counts,
)
from medseg.evaluation.metrics import label_boxes
from medseg.io.image import Image


def sphere(shape, centre, radius_mm, spacing) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    squared = sum((g - c) ** 2 for g, c in zip(grids, centre))
    return (squared <= radius_mm**2).astype(np.uint8)


def box(shape, lower, upper, value=1) -> np.ndarray:
    array = np.zeros(shape, dtype=np.uint8)
    array[tuple(slice(a, b) for a, b in zip(lower, upper))] = value
    return array


# ---------------------------------------------------------------- distances by construction


@pytest.mark.parametrize("axis", [0, 2])
def test_two_spheres_a_known_distance_apart(axis):
    # A shape and its copy moved by k voxels along an axis are exactly k * spacing apart:
    # the extreme surface point opposite to the move is that far from the copy, no point more.
    spacing = (0.8, 1.1, 2.5)
    shape = (56, 34, 24)
    ref = sphere(shape, (14.0, 17.0, 25.0), 7.0, spacing)
    shift = 3 if axis == 0 else 2
    pred = np.roll(ref, shift, axis=axis)
    expected = shift * spacing[axis]
    assert compute_hausdorff(pred, ref, labels=[1], spacing=spacing)[1] == pytest.approx(expected)
    # every surfel of one has a copy exactly ``expected`` away on the other
    for metric in (compute_hd95, compute_assd, compute_masd):
        assert 0 < metric(pred, ref, labels=[1], spacing=spacing)[1] <= expected + 1e-9
    # disjoint spheres: HD is the distance of the centres (far pole to near pole)
    apart = np.roll(ref, 20, axis=0)
    assert not (apart & ref).any()
    assert compute_hausdorff(apart, ref, labels=[1], spacing=spacing)[1] == pytest.approx(20 * 0.8)


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.7, 1.3)])
def test_one_pixel_shift_gives_the_known_nsd(spacing):
    # An n x m rectangle moved one pixel along x: below one pixel of tolerance only the
    # coinciding contour elements count, which are the top and bottom edges' inner pixels
    # plus one corner element each; at one pixel of tolerance everything counts.
    n, m = 9, 6
    ref = box((20, 16), (4, 5), (4 + n, 5 + m))
    pred = np.roll(ref, 1, axis=0)
    sx, sy = spacing
    corner = math.hypot(sx, sy) / 2
    within = 2 * (n - 1) * sx + 2 * corner
    total = 2 * (n - 1) * sx + 2 * (m - 1) * sy + 4 * corner
    nsd = compute_nsd(pred, ref, labels=[1], spacing=spacing, tolerance_mm=0.5 * sx)[1]
    assert nsd == pytest.approx(within / total, abs=1e-12)
    square = box((20, 16), (4, 5), (10, 11))
    moved = np.roll(square, 1, axis=0)
    if spacing == (1.0, 1.0):  # a square: exactly half of each contour coincides
        assert compute_nsd(moved, square, labels=[1], spacing=spacing, tolerance_mm=0.5)[1] == (
            pytest.approx(0.5)
        )
    assert compute_nsd(pred, ref, labels=[1], spacing=spacing, tolerance_mm=sx)[1] == 1.0


def test_one_voxel_shift_3d_nsd_and_rounding_at_the_tolerance():
    spacing = (0.8, 1.2, 2.0)
    ref = box((16, 16, 12), (4, 4, 3), (11, 12, 8))
    pred = np.roll(ref, 2, axis=0)  # 1.6 mm along x: floating point gives 1.5999... or 1.6000...1
    assert compute_nsd(pred, ref, labels=[1], spacing=spacing, tolerance_mm=1.6)[1] == 1.0
    assert compute_nsd(pred, ref, labels=[1], spacing=spacing, tolerance_mm=1.59)[1] < 1.0


def test_surface_area_and_contour_length_of_a_box():
    # The surfel areas of a box add up to its marching-cubes surface: the faces at half a
    # voxel, with the edges and corners bevelled; the count is exact for any spacing.
    sx, sy, sz = 0.5, 1.0, 2.0
    a, b, c = 6, 5, 4
    cube = box((10, 9, 8), (2, 2, 2), (2 + a, 2 + b, 2 + c)).astype(bool)
    sd = compute_surface_distances(cube, cube, spacing=(sx, sy, sz))
    assert np.all(sd.ref_to_pred == 0)
    faces = 2 * ((a - 1) * (b - 1) * sx * sy + (a - 1) * (c - 1) * sx * sz)
    faces += 2 * (b - 1) * (c - 1) * sy * sz
    # edge bevels: a strip half a voxel across each of two faces, corners: small triangles
    edges = 4 * (a - 1) * sx * math.hypot(sy, sz) / 2
    edges += 4 * (b - 1) * sy * math.hypot(sx, sz) / 2
    edges += 4 * (c - 1) * sz * math.hypot(sx, sy) / 2
    corner_triangle = 0.5 * np.linalg.norm(np.cross([-sx / 2, sy / 2, 0], [-sx / 2, 0, sz / 2]))
    assert sd.ref_areas.sum() == pytest.approx(faces + edges + 8 * corner_triangle)
    square = box((8, 8), (2, 2), (5, 6)).astype(bool)
    sd2 = compute_surface_distances(square, square, spacing=(sx, sy))
    assert sd2.ref_areas.sum() == pytest.approx(
        2 * (3 - 1) * sx + 2 * (4 - 1) * sy + 4 * math.hypot(sx, sy) / 2
    )


def test_boundary_iou_limits():
    spacing = (1.0, 1.0, 2.0)
    ref = sphere((30, 30, 16), (15.0, 15.0, 15.0), 9.0, spacing)
    pred = np.roll(ref, 2, axis=0)
    wide = compute_boundary_iou(pred, ref, labels=[1], spacing=spacing, width_mm=100.0)[1]
    iou = compute_overlap(pred, ref, labels=[1], spacing=spacing)[1]["iou"]
    assert wide == pytest.approx(iou)  # a band wider than the object is the object
    narrow = compute_boundary_iou(pred, ref, labels=[1], spacing=spacing, width_mm=1.0)[1]
    assert 0 < narrow < iou  # boundaries disagree more than volumes
    same = compute_boundary_iou(ref, ref, labels=[1], spacing=spacing, width_mm=0.1)[1]
    assert same == 1.0  # the band is never empty, even thinner than a voxel


# ---------------------------------------------------------------- overlap


def test_overlap_metrics_by_hand():
    pred = np.array([[1, 1, 0, 0], [1, 0, 0, 0]])
    ref = np.array([[1, 0, 0, 0], [1, 1, 1, 0]])
    # tp 2, fp 1, fn 2, tn 3; voxel 0.5 x 2 = 1 mm^2
    row = compute_metrics(pred, ref, labels=[1], spacing=(0.5, 2.0))[1]
    assert (row["tp"], row["fp"], row["fn"], row["tn"]) == (2, 1, 2, 3)
    assert row["dice"] == pytest.approx(4 / 7)
    assert row["iou"] == pytest.approx(2 / 5)
    assert row["precision"] == pytest.approx(2 / 3)
    assert row["recall"] == pytest.approx(2 / 4)
    assert row["specificity"] == pytest.approx(3 / 4)
    assert row["volume_similarity"] == pytest.approx(1 - 1 / 7)
    assert row["abs_volume_difference_mm3"] == pytest.approx(1.0)
    assert row["rel_volume_difference"] == pytest.approx(-1 / 4)


def test_label_boxes_match_numpy():
    rng = np.random.default_rng(3)
    array = np.zeros((20, 18, 9), dtype=np.uint8)
    for value in (1, 4, 7):
        lo = rng.integers(0, 8, size=3)
        array[tuple(slice(a, a + 5) for a in lo)] = value
    boxes = label_boxes(array, [1, 2, 4, 7])
    assert 2 not in boxes
    for value, found in boxes.items():
        index = np.nonzero(array == value)
        assert found == tuple(slice(int(i.min()), int(i.max()) + 1) for i in index)
    negative = array.astype(np.int16) - 1  # not for find_objects: the slow path
    assert label_boxes(negative, [0])[0] == boxes[1]


# ---------------------------------------------------------------- empty masks


def test_empty_policies_are_explicit():
    shape = (12, 12, 6)
    full = box(shape, (2, 2, 1), (8, 8, 4))
    empty = np.zeros(shape, np.uint8)
    diagonal = float(np.linalg.norm(np.multiply(shape, (1.0, 1.0, 2.0))))
    nan = compute_metrics(empty, empty, labels=[1], spacing=(1, 1, 2))[1]
    assert nan["empty_reference"] and nan["empty_prediction"]
    for key in ("dice", "iou", "precision", "recall", "hd", "hd95", "assd", "masd", "nsd"):
        assert math.isnan(nan[key]), key
    assert nan["abs_volume_difference_mm3"] == 0 and nan["specificity"] == 1.0

    missed = compute_metrics(empty, full, labels=[1], spacing=(1, 1, 2))[1]
    assert missed["empty_prediction"] and not missed["empty_reference"]
    assert missed["dice"] == 0.0 and missed["recall"] == 0.0 and missed["nsd"] == 0.0
    assert math.isnan(missed["precision"]) and math.isnan(missed["hd95"])
    assert missed["rel_volume_difference"] == -1.0

    both = compute_metrics(empty, empty, labels=[1], spacing=(1, 1, 2), empty="penalty")[1]
    assert both["dice"] == 1.0 and both["nsd"] == 1.0 and both["hd95"] == 0.0
    one = compute_metrics(full, empty, labels=[1], spacing=(1, 1, 2), empty="penalty")[1]
    assert one["dice"] == 0.0 and one["nsd"] == 0.0 and one["boundary_iou"] == 0.0
    assert one["hd"] == pytest.approx(diagonal) and one["assd"] == pytest.approx(diagonal)
    assert math.isnan(one["rel_volume_difference"])  # nothing to be relative to, any policy
    fixed = compute_metrics(
        full, empty, labels=[1], spacing=(1, 1, 2), empty="penalty", max_distance_mm=373.13
    )[1]
    assert fixed["hd95"] == 373.13
    with pytest.raises(MedsegError, match="policy 'zero'"):
        compute_metrics(full, empty, labels=[1], empty="zero")


def test_evaluate_pairs_reports_distances_policy_and_flags():
    spacing = (1.0, 1.0, 2.0)
    shape = (16, 16, 8)
    ref = box(shape, (2, 2, 2), (8, 8, 6)) + box(shape, (10, 10, 2), (14, 14, 6), value=2)
    pred = np.roll(ref, 1, axis=0)
    pred[pred == 2] = 0  # class 2 missed
    pairs = [("a", Image(pred, spacing), Image(ref, spacing))]
    report = evaluate_pairs(pairs, labels={1: "x", 2: "y", 3: "z"})
    rows = {r.label: r for r in report.cases}
    assert rows[1].hd == pytest.approx(1.0) and rows[1].nsd == 1.0
    assert rows[2].empty_prediction and math.isnan(rows[2].hd95) and rows[2].dice == 0
    assert rows[3].empty_reference and rows[3].empty_prediction and math.isnan(rows[3].dice)
    summary = report.summary
    assert summary["settings"]["empty_policy"] == "nan"
    assert summary["per_class"]["1"]["hd95"]["median"] == pytest.approx(1.0)
    assert summary["per_class"]["1"]["nsd"]["p5"] == 1.0
    assert summary["n_empty"] == {"reference": 1, "prediction": 2, "both": 1}
    again = EvaluationReport.from_json(report.to_json())
    assert again.cases == report.cases

    penalty = evaluate_pairs(pairs, labels={1: "x", 2: "y", 3: "z"}, empty="penalty")
    rows = {r.label: r for r in penalty.cases}
    assert rows[3].dice == 1.0 and rows[3].hd95 == 0.0 and rows[3].empty_reference
    assert rows[2].hd95 == pytest.approx(np.linalg.norm(np.multiply(shape, spacing)))
    overlap_only = evaluate_pairs(pairs, labels={1: "x"}, distances=False)
    assert (
        math.isnan(overlap_only.cases[0].hd)
        and "hd95" not in overlap_only.summary["per_class"]["1"]
    )


def test_evaluate_pairs_resamples_only_when_asked():
    ref = Image(box((10, 10, 6), (2, 2, 1), (7, 7, 5)), (1.0, 1.0, 2.0))
    fine = Image(np.repeat(ref.array, 2, axis=2), (1.0, 1.0, 1.0), origin=(0.0, 0.0, -0.5))
    with pytest.raises(MedsegError, match="case c: prediction shape"):
        evaluate_pairs([("c", fine, ref)], labels=[1])
    report = evaluate_pairs([("c", fine, ref)], labels=[1], resample=True)
    assert report.cases[0].dice == 1.0


# ---------------------------------------------------------------- lesions


def test_lesion_counts_by_construction():
    shape = (30, 30, 10)
    ref = box(shape, (2, 2, 2), (6, 6, 6)) | box(shape, (12, 12, 2), (16, 16, 6))
    ref |= box(shape, (22, 22, 2), (26, 26, 6))  # three reference lesions
    pred = box(shape, (3, 3, 3), (5, 5, 5)) | box(shape, (12, 12, 2), (13, 13, 3))  # 2 found
    pred |= box(shape, (2, 22, 2), (4, 26, 4))  # one false positive, far from any lesion
    counts = lesion_counts(pred, ref)
    assert counts == {
        "n_reference_lesions": 3,
        "n_predicted_lesions": 3,
        "lesion_tp": 2,
        "lesion_fp": 1,
        "lesion_fn": 1,
        "lesion_f1": pytest.approx(4 / 6),
    }
    # the 1-voxel touch of lesion 2 is not enough once 10 % overlap is required
    strict = lesion_counts(pred, ref, min_overlap=0.1)
    assert strict["lesion_tp"] == 1 and strict["lesion_fn"] == 2 and strict["lesion_fp"] == 2
    # diagonal neighbours are one lesion with 26-connectivity, two with 6
    diagonal = np.zeros((4, 4, 4), bool)
    diagonal[1, 1, 1] = diagonal[2, 2, 2] = True
    assert lesion_counts(diagonal, diagonal)["n_reference_lesions"] == 1
    assert lesion_counts(diagonal, diagonal, connectivity=6)["n_reference_lesions"] == 2
    report = evaluate_pairs(
        [("a", Image(pred, (1, 1, 1)), Image(ref, (1, 1, 1)))], labels=[1], lesions=True
    )
    assert report.cases[0].lesion_fn == 1
    assert report.summary["per_class"]["1"]["total_lesion_fp"] == 1
