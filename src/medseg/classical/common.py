"""Helpers shared by the classical methods and the filters: input checks and mm-to-voxel
conversions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medseg.errors import MedsegError
from medseg.imaging.components import check_connectivity as imaging_connectivity
from medseg.io.image import Image


def as_image(image: Image | np.ndarray, *, name: str = "image") -> Image:
    """The input as an :class:`Image` (a bare array gets 1 mm spacing), checked to be non-empty."""
    if not isinstance(image, Image):
        array = np.asarray(image)
        if array.ndim not in (2, 3):
            raise MedsegError(f"{name} must be 2D or 3D, got an array of shape {array.shape}")
        image = Image(array, (1.0,) * array.ndim)
    if image.array.size == 0:
        raise MedsegError(f"{name} is empty (shape {image.shape})")
    if image.array.dtype.kind not in "biuf":
        raise MedsegError(f"{name} has non-numeric voxels ({image.array.dtype})")
    return image


def as_mask(mask: Image | np.ndarray | None, image: Image) -> np.ndarray | None:
    """A boolean mask matching ``image`` (None stays None)."""
    if mask is None:
        return None
    array = mask.array if isinstance(mask, Image) else np.asarray(mask)
    if tuple(array.shape) != image.shape:
        raise MedsegError(f"mask shape {tuple(array.shape)} differs from the image's {image.shape}")
    array = array > 0
    if not array.any():
        raise MedsegError("mask is empty (no voxel inside it)")
    return array


def values(image: Image, mask: np.ndarray | None) -> np.ndarray:
    """Voxel intensities (inside ``mask``) as float64."""
    data = image.array if mask is None else image.array[mask]
    return np.asarray(data, dtype=np.float64).ravel()


def window_voxels(size_mm: float | Sequence[float], spacing: Sequence[float]) -> tuple[int, ...]:
    """An odd window size in voxels per axis that spans ``size_mm`` millimetres (at least 3)."""
    sizes = np.broadcast_to(np.asarray(size_mm, dtype=float), (len(spacing),))
    if np.any(sizes <= 0):
        raise MedsegError(f"window size must be positive (got {size_mm} mm)")
    out = []
    for size, s in zip(sizes, spacing, strict=True):
        n = int(round(size / s))
        n = max(3, n + (1 - n % 2))  # odd, so the window is centred on the voxel
        out.append(n)
    return tuple(out)


def radius_voxels(radius_mm: float, spacing: Sequence[float]) -> tuple[int, ...]:
    """A radius in voxels per axis for ``radius_mm`` millimetres (at least 1)."""
    if radius_mm <= 0:
        raise MedsegError(f"radius must be positive (got {radius_mm} mm)")
    return tuple(max(1, int(round(radius_mm / s))) for s in spacing)


def check_connectivity(ndim: int, connectivity: int) -> int:
    """Validate a neighbourhood: 4/8 in 2D, 6/18/26 in 3D (6 and 26 are mapped in 2D to 4 and 8)."""
    if ndim == 2:
        connectivity = {6: 4, 18: 8, 26: 8}.get(connectivity, connectivity)
    return imaging_connectivity(ndim, connectivity)


def mask_image(image: Image, mask: np.ndarray, *, value: int = 1) -> Image:
    """A uint8 label image with ``image``'s geometry."""
    return image.with_array((np.asarray(mask) > 0).astype(np.uint8) * np.uint8(value))
