"""Connected components and morphology on label images, with sizes in mm (wrapping
:mod:`medseg.imaging`, which works on bare arrays)."""

from __future__ import annotations

from medseg.classical.common import check_connectivity
from medseg.errors import MedsegError
from medseg.imaging.components import (
    components_by_size,
    keep_largest_components,
    remove_small_components,
)
from medseg.imaging.morphology import (
    binary_closing,
    binary_opening,
    dilate_classes,
    erode_classes,
    fill_holes,
)
from medseg.io.image import Image

__all__ = ["connected_components", "filter_components", "morphology"]

OPERATIONS = ("opening", "closing", "fill_holes", "dilation", "erosion")


def connected_components(mask: Image, *, connectivity: int = 26) -> Image:
    """Label the connected parts of a mask ``1..n`` (int32), largest first."""
    conn = check_connectivity(mask.ndim, connectivity)
    return mask.with_array(components_by_size(mask.array, connectivity=conn))


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
        out = remove_small_components(
            out, min_volume_mm3=min_volume_mm3, spacing=label.spacing, connectivity=connectivity
        )
    if keep_largest is not None:
        out = keep_largest_components(out, k=keep_largest, connectivity=connectivity)
    return label.with_array(out)


def morphology(label: Image, operation: str, *, radius_mm: float = 1.0) -> Image:
    """Opening, closing, dilation or erosion of every class with a ball of ``radius_mm``, or fill holes."""
    if operation == "opening":
        return label.with_array(
            binary_opening(label.array, radius_mm=radius_mm, spacing=label.spacing)
        )
    if operation == "closing":
        return label.with_array(
            binary_closing(label.array, radius_mm=radius_mm, spacing=label.spacing)
        )
    if operation == "fill_holes":
        return label.with_array(fill_holes(label.array))
    if operation == "dilation":
        return label.with_array(
            dilate_classes(label.array, radius_mm=radius_mm, spacing=label.spacing)
        )
    if operation == "erosion":
        return label.with_array(
            erode_classes(label.array, radius_mm=radius_mm, spacing=label.spacing)
        )
    raise MedsegError(f"unknown morphology {operation!r} (choose from {', '.join(OPERATIONS)})")
