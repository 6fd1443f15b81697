"""Connected components of masks and label maps: labelling, sizes, keep-largest, small-part removal."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import cc3d
import numpy as np
from scipy import ndimage

from medseg.errors import MedsegError
from medseg.imaging.morphology import class_values


def full_connectivity(ndim: int) -> int:
    """The full neighbourhood of cc3d: 8 in 2D, 26 in 3D."""
    return 8 if ndim == 2 else 26


def check_connectivity(ndim: int, connectivity: int | None = None) -> int:
    """A cc3d connectivity: 4/8 in 2D, 6/18/26 in 3D (None: the full neighbourhood).

    Raises :class:`MedsegError` for a value that does not fit ``ndim``.
    """
    allowed = (4, 8) if ndim == 2 else (6, 18, 26)
    if connectivity is None:
        return allowed[-1]
    if connectivity not in allowed:
        raise MedsegError(
            f"connectivity {connectivity} is not one of {allowed} for a {ndim}D label map"
        )
    return connectivity


def label_components(mask: np.ndarray, *, connectivity: int | None = None) -> np.ndarray:
    """Label the connected parts of a mask ``1..n`` in scan order (cc3d; 0 is background)."""
    conn = full_connectivity(mask.ndim) if connectivity is None else connectivity
    return cc3d.connected_components(np.asarray(mask).astype(np.uint8), connectivity=conn)


def component_sizes(components: np.ndarray) -> np.ndarray:
    """Voxels of each component of a labelling; index 0 (background) is set to 0."""
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return sizes


def components_by_size(mask: np.ndarray, *, connectivity: int | None = None) -> np.ndarray:
    """Label the connected parts of a mask ``1..n`` (int32), largest first (stable on ties)."""
    components = label_components(mask > 0, connectivity=connectivity)
    sizes = component_sizes(components)
    order = np.argsort(-sizes[1:], kind="stable") + 1
    lut = np.zeros(sizes.size, dtype=np.int32)
    lut[order] = np.arange(1, order.size + 1)
    return lut[components]


def keep_largest_component(
    label: np.ndarray, *, classes: Iterable[int] | None = None
) -> np.ndarray:
    """Keep only the largest connected component (full connectivity) of each class; the rest becomes 0."""
    out = label.copy()
    structure = ndimage.generate_binary_structure(label.ndim, label.ndim)
    for value in class_values(label, classes):
        mask = label == value
        components, n = ndimage.label(mask, structure=structure)
        if n <= 1:
            continue
        sizes = component_sizes(components)
        out[mask & (components != int(np.argmax(sizes)))] = 0
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
    if k < 1:
        raise MedsegError(f"k must be at least 1 (got {k})")
    conn = check_connectivity(label.ndim, connectivity)
    out = label.copy()
    for value in class_values(label, classes):
        mask = label == value
        kept = cc3d.largest_k(mask, k=k, connectivity=conn, binary_image=True) > 0
        out[mask & ~kept] = 0
    return out


def remove_small_components(
    label: np.ndarray,
    *,
    min_volume_mm3: float,
    spacing: Sequence[float] | None = None,
    classes: Iterable[int] | None = None,
    connectivity: int | None = None,
) -> np.ndarray:
    """Set to 0 the components of each class smaller than ``min_volume_mm3``.

    The volume of a component is its voxel count times the voxel volume from
    ``spacing`` (mm^2 for 2D images; voxels when ``spacing`` is None).
    """
    if min_volume_mm3 < 0:
        raise MedsegError(f"min_volume_mm3 must not be negative (got {min_volume_mm3})")
    voxel = float(np.prod(spacing)) if spacing is not None else 1.0
    # A component survives when voxels * voxel >= min_volume, i.e. voxels >= ceil(min / voxel).
    min_voxels = int(np.ceil(min_volume_mm3 / voxel - 1e-9))
    conn = check_connectivity(label.ndim, connectivity)
    out = label.copy()
    for value in class_values(label, classes):
        mask = label == value
        kept = cc3d.dust(mask, threshold=min_voxels, connectivity=conn, binary_image=True)
        out[mask & ~kept.astype(bool)] = 0
    return out
