"""The one Dice: of two masks, of each class of two label maps, or from confusion counts.

Policy for a class that is empty in both maps: ``empty`` (NaN by default, nnU-Net's
convention); a class empty in just one of them scores 0.
"""

from __future__ import annotations

import numpy as np

NAN = float("nan")


def dice_from_counts(tp: int, fp: int, fn: int, *, empty: float | None = NAN) -> float | None:
    """Dice ``2 tp / (2 tp + fp + fn)`` from voxel counts.

    Parameters
    ----------
    tp, fp, fn
        True positives, false positives and false negatives (voxels).
    empty
        The value when the class is empty in both masks (``2 tp + fp + fn == 0``).

    Returns
    -------
    float or None
        The Dice coefficient, or ``empty``.
    """
    denominator = 2 * tp + fp + fn
    return empty if denominator == 0 else 2.0 * tp / denominator


def dice(pred: np.ndarray, ref: np.ndarray, *, empty: float | None = NAN) -> float | None:
    """Dice of two masks of the same shape (any non-zero voxel is inside).

    Parameters
    ----------
    pred, ref
        Masks (boolean, or label maps where non-zero means foreground).
    empty
        The value when both masks are empty (default NaN).

    Returns
    -------
    float or None
        ``2 |P & R| / (|P| + |R|)``, or ``empty``.
    """
    p = np.asarray(pred, dtype=bool)
    r = np.asarray(ref, dtype=bool)
    if p.shape != r.shape:
        raise ValueError(f"prediction shape {p.shape} differs from reference shape {r.shape}")
    tp = int(np.count_nonzero(p & r))
    predicted, reference = int(np.count_nonzero(p)), int(np.count_nonzero(r))
    return dice_from_counts(tp, predicted - tp, reference - tp, empty=empty)


def dice_per_class(
    pred: np.ndarray, ref: np.ndarray, num_classes: int, *, empty: float = NAN
) -> np.ndarray:
    """Dice of each foreground class ``1 .. num_classes - 1`` of two label maps.

    Parameters
    ----------
    pred, ref
        Label maps of the same shape.
    num_classes
        Number of classes, background (0) included.
    empty
        The value of a class absent from both maps (default NaN).

    Returns
    -------
    numpy.ndarray
        ``num_classes - 1`` float64 scores, class 1 first.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    out = np.full(num_classes - 1, empty, dtype=np.float64)
    for c in range(1, num_classes):
        out[c - 1] = dice(pred == c, ref == c, empty=empty)
    return out
