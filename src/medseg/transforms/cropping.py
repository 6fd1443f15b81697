"""Bounding boxes, cropping and padding of channel-first arrays."""

from __future__ import annotations

import numpy as np

BBox = tuple[tuple[int, int], ...]  # (start, stop) per spatial axis


def nonzero_bbox(channels: np.ndarray) -> BBox:
    """Bounding box of voxels that are nonzero in any channel of ``(C, *spatial)``.

    An all-zero array gives the full extent, so nothing is cropped away.
    """
    mask = np.any(channels != 0, axis=0)
    if not mask.any():
        return tuple((0, n) for n in mask.shape)
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append((int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def crop(array: np.ndarray, bbox: BBox) -> np.ndarray:
    """Crop the trailing spatial axes of ``array`` to ``bbox``."""
    lead = (slice(None),) * (array.ndim - len(bbox))
    return array[lead + tuple(slice(a, b) for a, b in bbox)]


def pad_to_shape(
    array: np.ndarray, shape: tuple[int, ...], *, value: float = 0
) -> tuple[np.ndarray, BBox]:
    """Pad the trailing axes symmetrically to at least ``shape``; return the array and where the input sits."""
    spatial = array.shape[array.ndim - len(shape) :]
    before = [max(0, (s - n) // 2) for s, n in zip(shape, spatial)]
    after = [max(0, s - n - b) for s, n, b in zip(shape, spatial, before)]
    if not any(before) and not any(after):
        return array, tuple((0, n) for n in spatial)
    widths = [(0, 0)] * (array.ndim - len(shape)) + list(zip(before, after))
    padded = np.pad(array, widths, mode="constant", constant_values=value)
    return padded, tuple((b, b + n) for b, n in zip(before, spatial))
