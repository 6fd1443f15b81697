"""Overlap metrics on label maps: confusion counts, Dice and IoU.

Empty-mask convention (nnU-Net's): when a class is absent from both the
prediction and the reference, Dice and IoU are undefined and reported as NaN;
summaries ignore those NaN values but count the empty cases. A class absent
from the reference but present in the prediction (or the other way round)
scores 0.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

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


def dice_from_counts(tp: int, fp: int, fn: int) -> float:
    """Dice ``2 tp / (2 tp + fp + fn)``; NaN when the class is empty in both masks."""
    denominator = 2 * tp + fp + fn
    return float("nan") if denominator == 0 else 2.0 * tp / denominator


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
