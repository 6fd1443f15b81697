"""Morphology of label maps with structuring elements in millimetres, and hole filling."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage

from medseg.errors import MedsegError


def class_values(label: np.ndarray, classes: Iterable[int] | None = None) -> list[int]:
    """``classes`` as a list, or every non-zero value of ``label`` when it is None."""
    return [int(v) for v in np.unique(label) if v != 0] if classes is None else list(classes)


def check_radius(radius_mm: float) -> float:
    """Return ``radius_mm`` if it is positive, else raise :class:`MedsegError`."""
    if radius_mm <= 0:
        raise MedsegError(f"radius must be positive (got {radius_mm} mm)")
    return radius_mm


def ball_structure(
    radius_mm: float, spacing: Sequence[float] | None = None, *, ndim: int | None = None
) -> np.ndarray:
    """A boolean ellipsoid of ``radius_mm`` in physical units on a grid of ``spacing``.

    Anisotropic voxels give fewer voxels along the coarse axes, so the element
    is round in millimetres. At least the centre voxel and its face
    neighbours along axes where the radius reaches one voxel are included.
    """
    if spacing is None:
        spacing = (1.0,) * (ndim or 3)
    check_radius(radius_mm)
    half = [int(np.floor(radius_mm / s + 1e-9)) for s in spacing]
    grids = np.meshgrid(
        *[np.arange(-h, h + 1) * s for h, s in zip(half, spacing, strict=True)], indexing="ij"
    )
    return sum(g**2 for g in grids) <= radius_mm**2 + 1e-9


def _spacing_for(
    label: np.ndarray, radius_mm: float, spacing: Sequence[float] | None
) -> tuple[float, ...]:
    check_radius(radius_mm)
    return tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * label.ndim


def erode(mask: np.ndarray, radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
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


def dilate(mask: np.ndarray, radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Dilation by the ball ``{d <= radius_mm}`` (distance to the mask within the radius)."""
    if not mask.any():
        return mask
    return ndimage.distance_transform_edt(~mask, sampling=spacing) <= radius_mm + 1e-9


def binary_opening(
    label: np.ndarray,
    *,
    radius_mm: float = 1.0,
    spacing: Sequence[float] | None = None,
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
    for value in class_values(label, classes):
        mask = label == value
        opened = dilate(erode(mask, radius_mm, spacing), radius_mm, spacing)
        out[mask & ~opened] = 0
    return out


def binary_closing(
    label: np.ndarray,
    *,
    radius_mm: float = 1.0,
    spacing: Sequence[float] | None = None,
    classes: Iterable[int] | None = None,
) -> np.ndarray:
    """Morphological closing of each class with a ball of ``radius_mm`` (bridges small gaps).

    Only background voxels are added, so classes never overwrite each other.
    The image border is padded so the closing does not erode objects touching it.
    """
    spacing = _spacing_for(label, radius_mm, spacing)
    pad = [(int(radius_mm / s) + 1,) * 2 for s in spacing]
    out = label.copy()
    for value in class_values(label, classes):
        mask = np.pad(label == value, pad)
        closed = erode(dilate(mask, radius_mm, spacing), radius_mm, spacing)
        closed = closed[tuple(slice(p, p + n) for (p, _), n in zip(pad, label.shape, strict=True))]
        out[closed & (out == 0)] = value
    return out


def dilate_classes(label: np.ndarray, *, radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Dilate every class by ``radius_mm`` into background voxels only (lower values first)."""
    check_radius(radius_mm)
    out = label.copy()
    for value in class_values(label):
        out[dilate(label == value, radius_mm, spacing) & (out == 0)] = value
    return out


def erode_classes(label: np.ndarray, *, radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Erode every class by ``radius_mm`` (removed voxels become 0)."""
    check_radius(radius_mm)
    out = label.copy()
    for value in class_values(label):
        mask = label == value
        out[mask & ~erode(mask, radius_mm, spacing)] = 0
    return out


def fill_holes(label: np.ndarray, *, classes: Iterable[int] | None = None) -> np.ndarray:
    """Fill enclosed background holes of each class (in 3D, holes enclosed in the volume)."""
    out = label.copy()
    for value in class_values(label, classes):
        filled = ndimage.binary_fill_holes(label == value)
        out[filled & (out == 0)] = value
    return out
