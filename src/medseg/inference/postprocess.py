"""Postprocessing of label maps."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import ndimage


def keep_largest_component(
    label: np.ndarray, *, classes: Iterable[int] | None = None
) -> np.ndarray:
    """Keep only the largest connected component (full connectivity) of each class; the rest becomes 0."""
    out = label.copy()
    values = [int(v) for v in np.unique(label) if v != 0] if classes is None else list(classes)
    structure = ndimage.generate_binary_structure(label.ndim, label.ndim)
    for value in values:
        mask = label == value
        components, n = ndimage.label(mask, structure=structure)
        if n <= 1:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        out[mask & (components != int(np.argmax(sizes)))] = 0
    return out


def fill_holes(label: np.ndarray, *, classes: Iterable[int] | None = None) -> np.ndarray:
    """Fill enclosed background holes of each class (in 3D, holes enclosed in the volume)."""
    out = label.copy()
    values = [int(v) for v in np.unique(label) if v != 0] if classes is None else list(classes)
    for value in values:
        filled = ndimage.binary_fill_holes(label == value)
        out[filled & (out == 0)] = value
    return out


# --- postprocessing operations (issue 4): morphology, components by count or mm^3, thresholds ---


def _class_values(label: np.ndarray, classes: Iterable[int] | None) -> list[int]:
    return [int(v) for v in np.unique(label) if v != 0] if classes is None else list(classes)


def _full_connectivity(ndim: int, connectivity: int | None) -> int:
    """cc3d's connectivity: the full neighbourhood (8 in 2D, 26 in 3D) unless given."""
    allowed = (4, 8) if ndim == 2 else (6, 18, 26)
    if connectivity is None:
        return allowed[-1]
    if connectivity not in allowed:
        from medseg.errors import MedsegError

        raise MedsegError(
            f"connectivity {connectivity} is not one of {allowed} for a {ndim}D label map"
        )
    return connectivity


def ball_structure(
    radius_mm: float, spacing: tuple[float, ...] | None = None, *, ndim: int | None = None
) -> np.ndarray:
    """A boolean ellipsoid of ``radius_mm`` in physical units on a grid of ``spacing``.

    Anisotropic voxels give fewer voxels along the coarse axes, so the element
    is round in millimetres. At least the centre voxel and its face
    neighbours along axes where the radius reaches one voxel are included.
    """
    from medseg.errors import MedsegError

    if spacing is None:
        spacing = (1.0,) * (ndim or 3)
    if radius_mm <= 0:
        raise MedsegError(f"radius must be positive (got {radius_mm} mm)")
    half = [int(np.floor(radius_mm / s + 1e-9)) for s in spacing]
    grids = np.meshgrid(
        *[np.arange(-h, h + 1) * s for h, s in zip(half, spacing, strict=True)], indexing="ij"
    )
    return sum(g**2 for g in grids) <= radius_mm**2 + 1e-9


def _spacing_for(
    label: np.ndarray, radius_mm: float, spacing: tuple[float, ...] | None
) -> tuple[float, ...]:
    from medseg.errors import MedsegError

    if radius_mm <= 0:
        raise MedsegError(f"radius must be positive (got {radius_mm} mm)")
    return tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * label.ndim


def _erode(mask: np.ndarray, radius_mm: float, spacing: tuple[float, ...]) -> np.ndarray:
    """Erosion by the ball ``{d <= radius_mm}``: keep voxels farther than the radius from background.

    Euclidean distance transforms make the cost independent of the radius (a
    40-voxel ball on an ultrasound image would otherwise take seconds).
    Outside the array counts as background, as in ``scipy.ndimage.binary_erosion``.
    """
    if not mask.any():
        return mask
    padded = np.pad(mask, 1)
    dist = ndimage.distance_transform_edt(padded, sampling=spacing)
    return (dist > radius_mm + 1e-9)[tuple(slice(1, -1) for _ in mask.shape)]


def _dilate(mask: np.ndarray, radius_mm: float, spacing: tuple[float, ...]) -> np.ndarray:
    """Dilation by the ball ``{d <= radius_mm}`` (distance to the mask within the radius)."""
    if not mask.any():
        return mask
    return ndimage.distance_transform_edt(~mask, sampling=spacing) <= radius_mm + 1e-9


def binary_opening(
    label: np.ndarray,
    *,
    radius_mm: float = 1.0,
    spacing: tuple[float, ...] | None = None,
    classes: Iterable[int] | None = None,
) -> np.ndarray:
    """Morphological opening of each class with a ball of ``radius_mm`` (removes thin spurs).

    Parameters
    ----------
    label
        Label map (2D or 3D, ITK axis order).
    radius_mm
        Radius of the structuring element in mm (voxels when ``spacing`` is None).
    spacing
        Voxel size in mm per axis.
    classes
        Classes to open (default: every non-zero value).

    Returns
    -------
    numpy.ndarray
        A copy where voxels removed by the opening are 0.
    """
    spacing = _spacing_for(label, radius_mm, spacing)
    out = label.copy()
    for value in _class_values(label, classes):
        mask = label == value
        opened = _dilate(_erode(mask, radius_mm, spacing), radius_mm, spacing)
        out[mask & ~opened] = 0
    return out


def binary_closing(
    label: np.ndarray,
    *,
    radius_mm: float = 1.0,
    spacing: tuple[float, ...] | None = None,
    classes: Iterable[int] | None = None,
) -> np.ndarray:
    """Morphological closing of each class with a ball of ``radius_mm`` (bridges small gaps).

    Only background voxels are added, so classes never overwrite each other.
    The image border is padded so the closing does not erode objects touching it.
    """
    spacing = _spacing_for(label, radius_mm, spacing)
    pad = [(int(radius_mm / s) + 1,) * 2 for s in spacing]
    out = label.copy()
    for value in _class_values(label, classes):
        mask = np.pad(label == value, pad)
        closed = _erode(_dilate(mask, radius_mm, spacing), radius_mm, spacing)
        closed = closed[tuple(slice(p, p + n) for (p, _), n in zip(pad, label.shape, strict=True))]
        out[closed & (out == 0)] = value
    return out


def keep_largest_components(
    label: np.ndarray,
    *,
    k: int = 1,
    classes: Iterable[int] | None = None,
    connectivity: int | None = None,
) -> np.ndarray:
    """Keep the ``k`` largest connected components of each class; the rest becomes 0.

    ``connectivity`` is 4/8 in 2D or 6/18/26 in 3D (default: full, as
    :func:`keep_largest_component`).
    """
    import cc3d

    from medseg.errors import MedsegError

    if k < 1:
        raise MedsegError(f"k must be at least 1 (got {k})")
    conn = _full_connectivity(label.ndim, connectivity)
    out = label.copy()
    for value in _class_values(label, classes):
        mask = label == value
        kept = cc3d.largest_k(mask, k=k, connectivity=conn, binary_image=True) > 0
        out[mask & ~kept] = 0
    return out


def remove_small_components(
    label: np.ndarray,
    *,
    min_volume_mm3: float,
    spacing: tuple[float, ...] | None = None,
    classes: Iterable[int] | None = None,
    connectivity: int | None = None,
) -> np.ndarray:
    """Set to 0 the components of each class smaller than ``min_volume_mm3``.

    The volume of a component is its voxel count times the voxel volume from
    ``spacing`` (mm^2 for 2D images; voxels when ``spacing`` is None).
    """
    import cc3d

    from medseg.errors import MedsegError

    if min_volume_mm3 < 0:
        raise MedsegError(f"min_volume_mm3 must not be negative (got {min_volume_mm3})")
    voxel = float(np.prod(spacing)) if spacing is not None else 1.0
    # A component survives when voxels * voxel >= min_volume, i.e. voxels >= ceil(min / voxel).
    min_voxels = int(np.ceil(min_volume_mm3 / voxel - 1e-9))
    conn = _full_connectivity(label.ndim, connectivity)
    out = label.copy()
    for value in _class_values(label, classes):
        mask = label == value
        kept = cc3d.dust(mask, threshold=min_voxels, connectivity=conn, binary_image=True)
        out[mask & ~kept.astype(bool)] = 0
    return out


def threshold_probabilities(probability: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Binary mask (uint8) of ``probability >= threshold``."""
    return (np.asarray(probability) >= threshold).astype(np.uint8)


def tune_threshold(
    probabilities: Iterable[np.ndarray],
    references: Iterable[np.ndarray],
    *,
    thresholds: Iterable[float] | None = None,
) -> tuple[float, dict[float, float]]:
    """The probability threshold that maximizes the pooled Dice over validation cases.

    Parameters
    ----------
    probabilities
        Foreground probability maps, one per case.
    references
        Binary reference masks of the same shapes.
    thresholds
        Candidates (default 0.05, 0.10, ..., 0.95).

    Returns
    -------
    best, scores
        The best threshold (the smallest one on ties) and the Dice of each candidate,
        computed from true/false positives summed over all cases.
    """
    from medseg.errors import MedsegError

    candidates = sorted(
        float(t) for t in (thresholds if thresholds is not None else np.arange(1, 20) / 20)
    )
    if not candidates:
        raise MedsegError("no candidate thresholds given")
    tp = np.zeros(len(candidates))
    fp = np.zeros(len(candidates))
    fn = np.zeros(len(candidates))
    n = 0
    for prob, ref in zip(probabilities, references, strict=True):
        prob, ref = np.asarray(prob, dtype=float), np.asarray(ref) > 0
        if prob.shape != ref.shape:
            raise MedsegError(
                f"probability map shape {prob.shape} differs from reference {ref.shape}"
            )
        n += 1
        for i, t in enumerate(candidates):
            pred = prob >= t
            tp[i] += np.count_nonzero(pred & ref)
            fp[i] += np.count_nonzero(pred & ~ref)
            fn[i] += np.count_nonzero(~pred & ref)
    if n == 0:
        raise MedsegError("no cases given to tune the threshold on")
    denom = 2 * tp + fp + fn
    dice = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 1.0)
    scores = {t: float(d) for t, d in zip(candidates, dice, strict=True)}
    return candidates[int(np.argmax(dice))], scores
