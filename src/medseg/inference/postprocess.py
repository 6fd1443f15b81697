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
