"""Connected components and morphology on label images, with sizes in mm (wrapping
:mod:`medseg.inference.postprocess`, which works on bare arrays)."""

from __future__ import annotations

import cc3d
import numpy as np

from medseg.classical._common import check_connectivity
from medseg.errors import MedsegError
from medseg.inference import postprocess as pp
from medseg.io.image import Image

__all__ = ["connected_components", "filter_components", "morphology"]

OPERATIONS = ("opening", "closing", "fill_holes", "dilation", "erosion")


def connected_components(mask: Image, *, connectivity: int = 26) -> Image:
    """Label the connected parts of a mask ``1..n`` (int32), largest first."""
    conn = check_connectivity(mask.ndim, connectivity)
    labels = cc3d.connected_components((mask.array > 0).astype(np.uint8), connectivity=conn)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    order = np.argsort(-sizes[1:], kind="stable") + 1
    lut = np.zeros(sizes.size, dtype=np.int32)
    lut[order] = np.arange(1, order.size + 1)
    return mask.with_array(lut[labels])


def filter_components(
    label: Image,
    *,
    min_volume_mm3: float | None = None,
    keep_largest: int | None = None,
    connectivity: int | None = None,
) -> Image:
    """Remove components smaller than ``min_volume_mm3`` and/or keep the ``keep_largest`` per class."""
    out = label.array
    if min_volume_mm3 is not None:
        out = pp.remove_small_components(
            out, min_volume_mm3=min_volume_mm3, spacing=label.spacing, connectivity=connectivity
        )
    if keep_largest is not None:
        out = pp.keep_largest_components(out, k=keep_largest, connectivity=connectivity)
    return label.with_array(out)


def morphology(label: Image, operation: str, *, radius_mm: float = 1.0) -> Image:
    """Opening, closing, dilation or erosion of every class with a ball of ``radius_mm``, or fill holes."""
    if operation == "opening":
        return label.with_array(
            pp.binary_opening(label.array, radius_mm=radius_mm, spacing=label.spacing)
        )
    if operation == "closing":
        return label.with_array(
            pp.binary_closing(label.array, radius_mm=radius_mm, spacing=label.spacing)
        )
    if operation == "fill_holes":
        return label.with_array(pp.fill_holes(label.array))
    if operation in ("dilation", "erosion"):
        if radius_mm <= 0:
            raise MedsegError(f"radius must be positive (got {radius_mm} mm)")
        out = label.array.copy()
        for value in [int(v) for v in np.unique(label.array) if v != 0]:
            mask = label.array == value
            if operation == "dilation":
                out[pp._dilate(mask, radius_mm, label.spacing) & (out == 0)] = value
            else:
                out[mask & ~pp._erode(mask, radius_mm, label.spacing)] = 0
        return label.with_array(out)
    raise MedsegError(f"unknown morphology {operation!r} (choose from {', '.join(OPERATIONS)})")
