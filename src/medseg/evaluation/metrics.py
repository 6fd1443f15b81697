"""Metrics of label maps: overlap (Dice, IoU, precision, ...), surface distances and lesion counts.

Empty masks. A class can be absent from the prediction, the reference, or
both. medseg never hides this: every row carries ``empty_reference`` and
``empty_prediction`` flags, and the value of each metric follows one of two
written policies (``empty=`` keyword):

``"nan"`` (default, nnU-Net's)
    A metric whose formula is defined keeps its value (Dice is 0 when exactly
    one mask is empty, NSD likewise, specificity as counted); a metric that is
    undefined (0/0, or a distance to a surface that does not exist) is NaN.
    Both empty: Dice, IoU, precision, recall, distances and NSD are NaN.
    Summaries ignore NaN but count the empty cases.
``"penalty"`` (BraTS-style)
    Both empty is a perfect answer: Dice, IoU, precision, recall, NSD and
    boundary IoU are 1, distances 0. Exactly one empty is the worst answer:
    overlap scores 0, distances ``max_distance_mm`` (default: the diagonal of
    the image in mm, as BraTS's 373.13 mm is for its 240x240x155 grid).

Under both policies the relative volume difference is NaN when the reference
is empty (there is nothing to be relative to).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from medseg.errors import MedsegError
from medseg.evaluation.distances import (
    assd_from_distances,
    boundary_iou,
    bounding_box,
    compute_surface_distances,
    hausdorff_from_distances,
    masd_from_distances,
    nsd_from_distances,
)
from medseg.imaging.overlap import dice_from_counts

# Voxels per chunk when counting label pairs, to bound temporary memory on large volumes.
_CHUNK = 1 << 24
# Largest label value counted with one joint histogram (K * K bins).
_MAX_HISTOGRAM_LABEL = 1023


def _check_shapes(pred: np.ndarray, ref: np.ndarray) -> None:
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")


def confusion_counts(pred: np.ndarray, ref: np.ndarray, label: int) -> tuple[int, int, int, int]:
    """True/false positives and negatives of one class.

    Parameters
    ----------
    pred, ref
        Label maps of the same shape.
    label
        The class value.

    Returns
    -------
    tuple of int
        ``(tp, fp, fn, tn)`` in voxels.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    _check_shapes(pred, ref)
    in_pred = pred == label
    in_ref = ref == label
    tp = int(np.count_nonzero(in_pred & in_ref))
    predicted = int(np.count_nonzero(in_pred))
    reference = int(np.count_nonzero(in_ref))
    fp = predicted - tp
    fn = reference - tp
    return tp, fp, fn, int(pred.size) - tp - fp - fn


def iou_from_counts(tp: int, fp: int, fn: int) -> float:
    """IoU (Jaccard) ``tp / (tp + fp + fn)``; NaN when the class is empty in both masks."""
    denominator = tp + fp + fn
    return float("nan") if denominator == 0 else tp / denominator


def compute_dice(pred: np.ndarray, ref: np.ndarray, *, labels: Iterable[int]) -> dict[int, float]:
    """Dice coefficient per class.

    Parameters
    ----------
    pred, ref
        Label maps of the same shape.
    labels
        Class values to score (a mapping's keys work too).

    Returns
    -------
    dict
        ``{label: dice}``: NaN when the class is absent from both masks
        (nnU-Net's convention), 0 when it is absent from just one of them.
    """
    return {
        int(label): dice_from_counts(*confusion_counts(pred, ref, int(label))[:3])
        for label in labels
    }


def compute_iou(pred: np.ndarray, ref: np.ndarray, *, labels: Iterable[int]) -> dict[int, float]:
    """Intersection over union (Jaccard index) per class.

    Parameters
    ----------
    pred, ref
        Label maps of the same shape.
    labels
        Class values to score (a mapping's keys work too).

    Returns
    -------
    dict
        ``{label: iou}``: NaN when the class is absent from both masks
        (nnU-Net's convention), 0 when it is absent from just one of them.
    """
    return {
        int(label): iou_from_counts(*confusion_counts(pred, ref, int(label))[:3])
        for label in labels
    }


def present_values(array: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an integer label map (a histogram when the range is small)."""
    array = np.asarray(array)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.dtype.kind in "biu":
        low, high = int(array.min()), int(array.max())
        if low >= 0 and high < 1 << 16:
            return np.flatnonzero(np.bincount(array.ravel(), minlength=high + 1)).astype(np.int64)
    return np.unique(array).astype(np.int64)


def label_overlaps(
    pred: np.ndarray, ref: np.ndarray, values: Iterable[int]
) -> dict[int, tuple[int, int, int]]:
    """Overlap counts of several classes in one pass over integer label maps.

    Parameters
    ----------
    pred, ref
        Integer label maps of the same shape.
    values
        Class values to count.

    Returns
    -------
    dict
        ``{value: (tp, predicted_voxels, reference_voxels)}``.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    _check_shapes(pred, ref)
    values = sorted({int(v) for v in values})
    if not values:
        return {}
    lows = [int(a.min()) for a in (pred, ref) if a.size]
    highs = [int(a.max()) for a in (pred, ref) if a.size]
    if not lows or min(lows) < 0 or max(highs) > _MAX_HISTOGRAM_LABEL:
        out = {}
        for value in values:
            tp, fp, fn, _ = confusion_counts(pred, ref, value)
            out[value] = (tp, tp + fp, tp + fn)
        return out
    n_bins = max(max(highs), max(values)) + 1
    joint = np.zeros(n_bins * n_bins, dtype=np.int64)
    flat_pred, flat_ref = pred.ravel(), ref.ravel()
    for start in range(0, flat_pred.size, _CHUNK):
        pair_index = flat_pred[start : start + _CHUNK].astype(np.int64) * n_bins
        pair_index += flat_ref[start : start + _CHUNK]
        joint += np.bincount(pair_index, minlength=n_bins * n_bins)
    matrix = joint.reshape(n_bins, n_bins)  # [pred value, ref value]
    return {
        v: (int(matrix[v, v]), int(matrix[v, :].sum()), int(matrix[:, v].sum())) for v in values
    }


# ---------------------------------------------------------------- all metrics of one class

EMPTY_POLICIES = ("nan", "penalty")
OVERLAP_METRICS = (
    "dice",
    "iou",
    "precision",
    "recall",
    "specificity",
    "volume_similarity",
    "abs_volume_difference_mm3",
    "rel_volume_difference",
)
DISTANCE_METRICS = ("hd", "hd95", "assd", "masd", "nsd", "boundary_iou")
# Metrics where a higher value is better (the rest: lower is better).
HIGHER_IS_BETTER = frozenset(
    {
        "dice",
        "iou",
        "precision",
        "recall",
        "specificity",
        "volume_similarity",
        "nsd",
        "boundary_iou",
    }
)
NAN = float("nan")


def check_empty_policy(empty: str) -> str:
    """Return ``empty`` if it is a known policy, else raise :class:`MedsegError`."""
    if empty not in EMPTY_POLICIES:
        raise MedsegError(f"empty-mask policy {empty!r} is not one of {', '.join(EMPTY_POLICIES)}")
    return empty


def _ratio(numerator: float, denominator: float) -> float:
    return NAN if denominator == 0 else numerator / denominator


def overlap_scores(
    tp: int, fp: int, fn: int, tn: int, *, voxel_volume: float = 1.0, empty: str = "nan"
) -> dict[str, float]:
    """Overlap metrics of one class from its confusion counts.

    Parameters
    ----------
    tp, fp, fn, tn
        Voxel counts.
    voxel_volume
        mm^3 (mm^2 in 2D) per voxel, for the volume differences.
    empty
        ``"nan"`` or ``"penalty"``: see the module docstring.

    Returns
    -------
    dict
        ``dice, iou, precision, recall, specificity, volume_similarity``
        (``1 - |V_pred - V_ref| / (V_pred + V_ref)``), ``abs_volume_difference_mm3``
        and ``rel_volume_difference`` (``(V_pred - V_ref) / V_ref``, signed).
    """
    predicted, reference = tp + fp, tp + fn
    scores = {
        "dice": dice_from_counts(tp, fp, fn),
        "iou": _ratio(float(tp), tp + fp + fn),
        "precision": _ratio(float(tp), predicted),
        "recall": _ratio(float(tp), reference),
        "specificity": _ratio(float(tn), tn + fp),
        "volume_similarity": _ratio(float(2 * tp + fp + fn - abs(fp - fn)), 2 * tp + fp + fn),
        "abs_volume_difference_mm3": abs(predicted - reference) * voxel_volume,
        "rel_volume_difference": _ratio(float(predicted - reference), reference),
    }
    if check_empty_policy(empty) == "penalty":
        both_empty = predicted == 0 and reference == 0
        for key in ("dice", "iou", "precision", "recall", "volume_similarity", "specificity"):
            if math.isnan(scores[key]):
                scores[key] = 1.0 if both_empty else 0.0
    return scores


def distance_scores(
    pred: np.ndarray,
    ref: np.ndarray,
    *,
    spacing: Sequence[float],
    percentile: float = 95.0,
    tolerance_mm: float = 2.0,
    boundary_width_mm: float | None = None,
    empty: str = "nan",
    max_distance_mm: float | None = None,
    with_boundary_iou: bool = True,
) -> dict[str, float]:
    """Surface-distance metrics of two binary masks (see :mod:`medseg.evaluation.distances`).

    Parameters
    ----------
    pred, ref
        Boolean masks of the same shape (already cropped is fine: distances
        do not depend on the crop as long as it holds both masks).
    spacing
        Voxel size in mm per array axis.
    percentile
        Of the robust Hausdorff distance reported as ``hd95``.
    tolerance_mm
        Of the normalized surface Dice ``nsd``.
    boundary_width_mm
        Band width of the boundary IoU (default: ``tolerance_mm``).
    empty, max_distance_mm
        The empty-mask policy and its penalty distance (default: the diagonal
        of the arrays' extent in mm).
    with_boundary_iou
        False skips the boundary IoU (NaN), which costs two distance transforms.

    Returns
    -------
    dict
        ``hd, hd95, assd, masd`` in mm, ``nsd`` and ``boundary_iou`` in [0, 1].
    """
    check_empty_policy(empty)
    sd = compute_surface_distances(pred, ref, spacing=spacing)
    width = tolerance_mm if boundary_width_mm is None else boundary_width_mm
    if sd.empty_reference or sd.empty_prediction:
        both = sd.empty_reference and sd.empty_prediction
        if empty == "penalty":
            if max_distance_mm is None:
                max_distance_mm = float(np.linalg.norm(np.multiply(np.shape(pred), spacing)))
            far = 0.0 if both else float(max_distance_mm)
            score = 1.0 if both else 0.0
            return dict(hd=far, hd95=far, assd=far, masd=far, nsd=score, boundary_iou=score)
        score = NAN if both else 0.0
        return dict(hd=NAN, hd95=NAN, assd=NAN, masd=NAN, nsd=score, boundary_iou=score)
    return {
        "hd": hausdorff_from_distances(sd),
        "hd95": hausdorff_from_distances(sd, percentile=percentile),
        "assd": assd_from_distances(sd),
        "masd": masd_from_distances(sd),
        "nsd": nsd_from_distances(sd, tolerance_mm=tolerance_mm),
        "boundary_iou": (
            boundary_iou(pred, ref, spacing=spacing, width_mm=width) if with_boundary_iou else NAN
        ),
    }


def label_boxes(array: np.ndarray, values: Iterable[int]) -> dict[int, tuple[slice, ...]]:
    """Bounding box of each class present in an integer label map, in one pass.

    Classes that are absent are left out.
    """
    from scipy import ndimage

    array = np.asarray(array)
    values = [int(v) for v in values]
    if array.dtype.kind in "iu" and array.size and int(array.min()) >= 0:
        wanted = [v for v in values if v > 0]
        top = int(array.max())
        boxes = ndimage.find_objects(array) if top > 0 else []
        out = {v: boxes[v - 1] for v in wanted if v <= top and boxes[v - 1] is not None}
        if 0 in values and (array == 0).any():
            out[0] = tuple(slice(0, s) for s in array.shape)
        return out
    out = {}
    for v in values:
        box = bounding_box(array == v)
        if box is not None:
            out[v] = box
    return out


def _union_box(a: tuple[slice, ...] | None, b: tuple[slice, ...] | None) -> tuple[slice, ...]:
    if a is None or b is None:
        return a if b is None else b  # type: ignore[return-value]
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


def compute_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    *,
    labels: Iterable[int],
    spacing: Sequence[float] | None = None,
    distances: bool = True,
    percentile: float = 95.0,
    tolerance_mm: float = 2.0,
    boundary_width_mm: float | None = None,
    empty: str = "nan",
    max_distance_mm: float | None = None,
    with_boundary_iou: bool = True,
) -> dict[int, dict[str, float | bool]]:
    """Every overlap and distance metric of several classes of two label maps.

    Parameters
    ----------
    pred, ref
        Integer label maps (2D or 3D) of the same shape, in the same axis
        order as ``spacing``.
    labels
        Class values to score (a mapping's keys work too).
    spacing
        Voxel size in mm per axis (default 1 mm: pass it, distances depend on it).
    distances
        Also compute ``hd, hd95, assd, masd, nsd, boundary_iou``.
    percentile, tolerance_mm, boundary_width_mm
        See :func:`distance_scores`.
    empty, max_distance_mm
        The empty-mask policy (``"nan"`` or ``"penalty"``, see the module docstring).
    with_boundary_iou
        False skips the boundary IoU (NaN).

    Returns
    -------
    dict
        ``{label: {metric: value, ..., "tp": int, "fp": int, "fn": int, "tn": int,
        "empty_reference": bool, "empty_prediction": bool}}``.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    _check_shapes(pred, ref)
    check_empty_policy(empty)
    spacing = tuple(float(s) for s in (spacing if spacing is not None else (1.0,) * pred.ndim))
    values = [int(v) for v in labels]
    voxel_volume = float(np.prod(spacing))
    if max_distance_mm is None:
        max_distance_mm = float(np.linalg.norm(np.multiply(pred.shape, spacing)))
    overlaps = label_overlaps(pred, ref, values)
    boxes_pred = label_boxes(pred, values) if distances else {}
    boxes_ref = label_boxes(ref, values) if distances else {}
    out: dict[int, dict[str, float | bool]] = {}
    for value in values:
        tp, predicted, reference = overlaps[value]
        fp, fn = predicted - tp, reference - tp
        tn = int(pred.size) - tp - fp - fn
        row: dict[str, float | bool] = dict(
            overlap_scores(tp, fp, fn, tn, voxel_volume=voxel_volume, empty=empty)
        )
        if distances:
            box = _union_box(boxes_pred.get(value), boxes_ref.get(value))
            crop_pred = pred[box] == value if box is not None else np.zeros((1,) * pred.ndim, bool)
            crop_ref = ref[box] == value if box is not None else np.zeros((1,) * pred.ndim, bool)
            row.update(
                distance_scores(
                    crop_pred,
                    crop_ref,
                    spacing=spacing,
                    percentile=percentile,
                    tolerance_mm=tolerance_mm,
                    boundary_width_mm=boundary_width_mm,
                    empty=empty,
                    max_distance_mm=max_distance_mm,
                    with_boundary_iou=with_boundary_iou,
                )
            )
        row.update(tp=tp, fp=fp, fn=fn, tn=tn)
        row["empty_reference"] = reference == 0
        row["empty_prediction"] = predicted == 0
        out[value] = row
    return out


def _one_metric(name: str, pred: np.ndarray, ref: np.ndarray, **options) -> dict[int, float]:
    """One column of :func:`compute_metrics` per class."""
    rows = compute_metrics(pred, ref, **options)
    return {value: float(row[name]) for value, row in rows.items()}


def compute_hausdorff(
    pred: np.ndarray,
    ref: np.ndarray,
    *,
    labels: Iterable[int],
    spacing: Sequence[float],
    percentile: float = 100.0,
    empty: str = "nan",
) -> dict[int, float]:
    """(Percentile) Hausdorff distance in mm per class, surfaces as in surface-distance.

    ``percentile=95`` gives HD95 (area-weighted, per direction, then the larger).
    Empty masks: NaN under ``empty="nan"``, see the module docstring.
    """
    return _one_metric(
        "hd95", pred, ref, labels=labels, spacing=spacing, percentile=percentile, empty=empty
    )


def compute_hd95(
    pred: np.ndarray,
    ref: np.ndarray,
    *,
    labels: Iterable[int],
    spacing: Sequence[float],
    empty: str = "nan",
) -> dict[int, float]:
    """95th-percentile Hausdorff distance in mm per class (see :func:`compute_hausdorff`)."""
    return compute_hausdorff(
        pred, ref, labels=labels, spacing=spacing, percentile=95.0, empty=empty
    )


def compute_assd(
    pred: np.ndarray,
    ref: np.ndarray,
    *,
    labels: Iterable[int],
    spacing: Sequence[float],
    empty: str = "nan",
) -> dict[int, float]:
    """Average symmetric surface distance in mm per class (both surfaces pooled, area-weighted)."""
    return _one_metric("assd", pred, ref, labels=labels, spacing=spacing, empty=empty)


def compute_masd(
    pred: np.ndarray,
    ref: np.ndarray,
    *,
    labels: Iterable[int],
    spacing: Sequence[float],
    empty: str = "nan",
) -> dict[int, float]:
    """Mean average surface distance in mm per class (mean of the two directed means)."""
    return _one_metric("masd", pred, ref, labels=labels, spacing=spacing, empty=empty)


def compute_nsd(
    pred: np.ndarray,
    ref: np.ndarray,
    *,
    labels: Iterable[int],
    spacing: Sequence[float],
    tolerance_mm: float,
    empty: str = "nan",
) -> dict[int, float]:
    """Normalized surface Dice at ``tolerance_mm`` per class (surface-distance's surface Dice)."""
    return _one_metric(
        "nsd", pred, ref, labels=labels, spacing=spacing, tolerance_mm=tolerance_mm, empty=empty
    )


def compute_boundary_iou(
    pred: np.ndarray,
    ref: np.ndarray,
    *,
    labels: Iterable[int],
    spacing: Sequence[float],
    width_mm: float,
    empty: str = "nan",
) -> dict[int, float]:
    """Boundary IoU per class: IoU of the inner bands ``width_mm`` wide (Cheng et al. 2021)."""
    return _one_metric(
        "boundary_iou",
        pred,
        ref,
        labels=labels,
        spacing=spacing,
        boundary_width_mm=width_mm,
        empty=empty,
    )


def compute_overlap(
    pred: np.ndarray, ref: np.ndarray, *, labels: Iterable[int], spacing=None, empty: str = "nan"
) -> dict[int, dict[str, float]]:
    """All overlap metrics per class (:data:`OVERLAP_METRICS`), no distances."""
    rows = compute_metrics(pred, ref, labels=labels, spacing=spacing, distances=False, empty=empty)
    return {v: {k: float(row[k]) for k in OVERLAP_METRICS} for v, row in rows.items()}


# ---------------------------------------------------------------- lesion-wise detection


def lesion_counts(
    pred: np.ndarray,
    ref: np.ndarray,
    *,
    connectivity: int | None = None,
    min_overlap: float = 0.0,
) -> dict[str, int | float]:
    """Lesion-wise detection counts of two binary masks (connected components matched).

    A reference lesion is detected (TP) when the predicted foreground covers
    more than ``min_overlap`` of its voxels (default: any voxel); otherwise it
    is a false negative. A predicted component that covers no reference lesion
    that way is a false positive.

    Parameters
    ----------
    pred, ref
        Boolean masks of the same shape (2D or 3D).
    connectivity
        Face/edge/corner neighbourhood of the components: 26 (default 3D),
        18, 6; 8 (default 2D) or 4.
    min_overlap
        Fraction of a reference lesion that must be covered, in [0, 1).

    Returns
    -------
    dict
        ``n_reference_lesions, n_predicted_lesions, lesion_tp, lesion_fp,
        lesion_fn`` and ``lesion_f1`` (``2 TP / (2 TP + FP + FN)``, NaN when
        both masks have no lesion).
    """
    import cc3d

    pred, ref = np.asarray(pred).astype(bool), np.asarray(ref).astype(bool)
    _check_shapes(pred, ref)
    if connectivity is None:
        connectivity = 26 if pred.ndim == 3 else 8
    ref_cc, n_ref = cc3d.connected_components(ref, connectivity=connectivity, return_N=True)
    pred_cc, n_pred = cc3d.connected_components(pred, connectivity=connectivity, return_N=True)
    ref_cc, pred_cc = np.asarray(ref_cc, np.int64), np.asarray(pred_cc, np.int64)
    # covered[i]: reference voxels of lesion i under any predicted foreground
    covered = np.bincount(ref_cc[pred], minlength=n_ref + 1)[1:]
    sizes = np.bincount(ref_cc.ravel(), minlength=n_ref + 1)[1:]
    detected = covered > min_overlap * sizes
    tp = int(np.count_nonzero(detected))
    # a predicted component is a true positive when it touches a detected reference lesion
    pairs = (ref_cc > 0) & (pred_cc > 0)
    hit = np.zeros(n_pred + 1, dtype=bool)
    if pairs.any():
        touched = np.stack([pred_cc[pairs], ref_cc[pairs]], axis=1)
        good = touched[detected[touched[:, 1] - 1]]
        hit[np.unique(good[:, 0])] = True
    fp = int(n_pred - np.count_nonzero(hit[1:]))
    fn = int(n_ref - tp)
    return {
        "n_reference_lesions": int(n_ref),
        "n_predicted_lesions": int(n_pred),
        "lesion_tp": tp,
        "lesion_fp": fp,
        "lesion_fn": fn,
        "lesion_f1": _ratio(2.0 * tp, 2 * tp + fp + fn),
    }
