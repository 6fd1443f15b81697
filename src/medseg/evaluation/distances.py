"""Surface distances in mm between binary masks, with surfaces defined as in DeepMind's surface-distance.

A mask's surface lives on the grid of voxel corners. Each corner looks at the
2x2 (2D) or 2x2x2 (3D) voxels around it; corners that see both foreground and
background are surface elements ("surfels"). Each surfel carries the length
(2D) or area (3D) of the marching-squares / marching-cubes surface inside
its cell, in mm, so that a finely curved surface counts what it measures, not
how many voxels touch it. The distance of a surfel to the other mask is the
Euclidean distance in mm to the nearest surfel of the other mask. This is the
definition of Nikolov et al. (2021, ``surface-distance``); the tests check
medseg against that library to 1e-9.

From the two directed lists of (distance, area):

- ``hd``: the largest distance in either direction;
- ``hd95`` (``percentile=95``): per direction, the smallest distance below which
  95 % of the surface *area* lies, then the larger of the two directions;
- ``assd``: area-weighted mean over both surfaces pooled;
- ``masd``: the mean of the two directed area-weighted means;
- ``nsd`` (normalized surface Dice at a tolerance in mm): the surface area of
  both masks that lies within the tolerance of the other, over the total area
  (a distance equal to the tolerance counts as within, floating-point rounding
  included: see :func:`_with_rounding`).

Where medseg differs from MONAI and medpy (each shown by a test in
``tests/evaluation/test_distances.py``): MONAI and medpy take the voxels at a
mask's edge (the mask minus its erosion) as the surface, each counted once,
and measure voxel-centre to voxel-centre; medpy pools both directions before
taking the 95th percentile; MONAI assumes 1 mm spacing unless given. Their
values therefore differ from the surface-based ones by up to about one voxel
diagonal, more on thin or jagged shapes.

Speed: distances come from a k-d tree over the surfel coordinates of the
other mask (exact nearest neighbours, the same numbers as a distance
transform) computed on the masks' joint bounding box only.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_LORENSEN_FALLBACK = 4  # corners set: beyond this, triangulate the complement (same surface)


@dataclass(frozen=True)
class SurfaceDistances:
    """Directed surface distances of a prediction and a reference, with surfel areas.

    Attributes
    ----------
    ref_to_pred, ref_areas
        For every reference surfel: its distance (mm) to the prediction's
        surface (``inf`` when the prediction has none) and its area (mm^2,
        length in mm for 2D).
    pred_to_ref, pred_areas
        The same from the prediction's side.
    """

    ref_to_pred: np.ndarray
    ref_areas: np.ndarray
    pred_to_ref: np.ndarray
    pred_areas: np.ndarray

    @property
    def empty_reference(self) -> bool:
        return self.ref_areas.size == 0

    @property
    def empty_prediction(self) -> bool:
        return self.pred_areas.size == 0


# ------------------------------------------------------------------ surfel tables


def _corner_offsets(ndim: int) -> list[tuple[int, ...]]:
    """Cell corners in code-bit order: the first corner is the most significant bit."""
    return list(itertools.product((0, 1), repeat=ndim))


@functools.lru_cache(maxsize=1)
def _unit_triangles_3d() -> tuple[tuple[np.ndarray, ...], ...]:
    """Marching-cubes triangles (unit voxel) for each of the 256 corner patterns."""
    from skimage import measure

    corners = _corner_offsets(3)
    triangles: list[np.ndarray] = [np.zeros((0, 3, 3))] * 256
    for code in range(1, 255):
        bits = [(code >> (7 - i)) & 1 for i in range(8)]
        # A surface separates inside from outside: its area must not depend on which side
        # is called foreground. Lorensen's table triangulates the side with fewer corners.
        if sum(bits) > _LORENSEN_FALLBACK:
            bits = [1 - b for b in bits]
        cell = np.zeros((2, 2, 2), dtype=np.float32)
        for corner, bit in zip(corners, bits):
            cell[corner] = bit
        vertices, faces, _, _ = measure.marching_cubes(cell, 0.5, method="lorensen")
        triangles[code] = vertices[faces]
    return tuple(triangles)


@functools.lru_cache(maxsize=64)
def surfel_area_table(spacing: tuple[float, ...]) -> np.ndarray:
    """Area (3D, mm^2) or length (2D, mm) of the surface in a cell, for every corner pattern.

    Parameters
    ----------
    spacing
        Voxel size in mm along each array axis.

    Returns
    -------
    numpy.ndarray
        ``table[code]`` for codes ``0 .. 2**(2**ndim) - 1``.
    """
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    if spacing_arr.size == 3:
        table = np.zeros(256)
        for code, tri in enumerate(_unit_triangles_3d()):
            if tri.size:
                tri = tri * spacing_arr
                cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
                table[code] = 0.5 * np.linalg.norm(cross, axis=1).sum()
        return table
    if spacing_arr.size == 2:
        # Marching squares: the contour joins the midpoints of the cell edges whose ends differ.
        corners = _corner_offsets(2)
        edges = [(0, 1), (0, 2), (1, 3), (2, 3)]  # pairs of corner indices
        table = np.zeros(16)
        for code in range(1, 15):
            bits = [(code >> (3 - i)) & 1 for i in range(4)]
            crossed = [
                (np.add(corners[a], corners[b]) / 2.0) * spacing_arr
                for a, b in edges
                if bits[a] != bits[b]
            ]
            if len(crossed) == 2:
                table[code] = float(np.linalg.norm(crossed[0] - crossed[1]))
            else:  # saddle: two segments, each cutting one corner off the cell
                half = spacing_arr / 2.0
                table[code] = 2.0 * float(np.hypot(*half))
        return table
    raise ValueError(f"surfaces need 2D or 3D masks, got {spacing_arr.size} spacing values")


# ------------------------------------------------------------------ surfels


def _neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """Corner-pattern code of every voxel corner of a (cropped) boolean mask.

    The result has one more element than ``mask`` along each axis: entry ``i``
    is the corner shared by voxels ``i - 1`` and ``i``.
    """
    padded = np.pad(mask.astype(np.uint8), 1)
    out_shape = tuple(s + 1 for s in mask.shape)
    codes = np.zeros(out_shape, dtype=np.uint8)
    corners = _corner_offsets(mask.ndim)
    n_bits = len(corners)
    for i, corner in enumerate(corners):
        window = tuple(slice(c, c + s) for c, s in zip(corner, out_shape))
        codes |= padded[window] << np.uint8(n_bits - 1 - i)
    return codes


def _surfels(mask: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Surfel coordinates (mm, crop frame) and areas of a boolean mask."""
    codes = _neighbour_codes(mask)
    full = (1 << (1 << mask.ndim)) - 1
    border = (codes != 0) & (codes != full)
    index = np.nonzero(border)
    points = np.stack(index, axis=1).astype(np.float64) * np.asarray(spacing, dtype=np.float64)
    areas = surfel_area_table(tuple(float(s) for s in spacing))[codes[index]]
    return points, areas


def _nearest(points: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Distance from each point to its nearest target (``inf`` without targets)."""
    if points.shape[0] == 0:
        return np.zeros(0)
    if targets.shape[0] == 0:
        return np.full(points.shape[0], np.inf)
    from scipy.spatial import cKDTree

    distances, _ = cKDTree(targets).query(points, k=1, workers=-1)
    return distances


def bounding_box(*masks: np.ndarray) -> tuple[slice, ...] | None:
    """Smallest box holding the foreground of all masks, or None when all are empty."""
    union = masks[0].astype(bool, copy=True)
    for m in masks[1:]:
        union |= m.astype(bool)
    if not union.any():
        return None
    box = []
    for axis in range(union.ndim):
        others = tuple(a for a in range(union.ndim) if a != axis)
        hit = np.flatnonzero(union.any(axis=others))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def compute_surface_distances(
    pred: np.ndarray, ref: np.ndarray, *, spacing: Sequence[float], crop: bool = True
) -> SurfaceDistances:
    """Directed surface distances between two binary masks (2D or 3D).

    Parameters
    ----------
    pred, ref
        Boolean (or 0/1) masks of the same shape.
    spacing
        Voxel size in mm along each array axis.
    crop
        Work on the joint bounding box (faster; the result is the same). Pass
        False when the masks are already cropped (with at least their bounding box).

    Returns
    -------
    SurfaceDistances
        Empty arrays for a mask without foreground; ``inf`` distances towards it.
    """
    pred, ref = np.asarray(pred).astype(bool), np.asarray(ref).astype(bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if len(spacing) != pred.ndim:
        raise ValueError(f"{len(spacing)} spacing values for a {pred.ndim}D mask")
    if crop:
        box = bounding_box(pred, ref)
        if box is None:
            empty = np.zeros(0)
            return SurfaceDistances(empty, empty, empty, empty)
        pred, ref = pred[box], ref[box]
    pred_points, pred_areas = _surfels(pred, spacing)
    ref_points, ref_areas = _surfels(ref, spacing)
    return SurfaceDistances(
        ref_to_pred=_nearest(ref_points, pred_points),
        ref_areas=ref_areas,
        pred_to_ref=_nearest(pred_points, ref_points),
        pred_areas=pred_areas,
    )


# ------------------------------------------------------------------ metrics from distances


def _with_rounding(tolerance_mm: float) -> float:
    """The tolerance plus float rounding, so a distance of exactly the tolerance counts as within.

    With spacing (0.8, 1.2, ...), the 2 mm distance sqrt(1.6^2 + 1.2^2) comes out of
    floating point as 2.0000000000000004 or 1.9999999999999998 depending on the order
    of operations (a k-d tree and a distance transform differ there). Without this, NSD
    at a tolerance on the lattice of distances would depend on the arithmetic.
    """
    return tolerance_mm * (1.0 + 1e-9) + 1e-12


def _area_percentile(distances: np.ndarray, areas: np.ndarray, percentile: float) -> float:
    """Smallest distance below which ``percentile`` % of the surface area lies."""
    if distances.size == 0:
        return float("inf")
    if percentile >= 100:
        return float(distances.max())
    order = np.argsort(distances, kind="stable")
    cumulative = np.cumsum(areas[order]) / areas.sum()
    index = int(np.searchsorted(cumulative, percentile / 100.0))
    return float(distances[order][min(index, distances.size - 1)])


def hausdorff_from_distances(sd: SurfaceDistances, *, percentile: float = 100.0) -> float:
    """(Percentile) Hausdorff distance in mm: the larger of the two directed values.

    Percentiles weight surfels by area (surface-distance's ``compute_robust_hausdorff``).
    ``inf`` when exactly one mask is empty, NaN when both are.
    """
    if sd.empty_reference and sd.empty_prediction:
        return float("nan")
    return max(
        _area_percentile(sd.ref_to_pred, sd.ref_areas, percentile),
        _area_percentile(sd.pred_to_ref, sd.pred_areas, percentile),
    )


def assd_from_distances(sd: SurfaceDistances) -> float:
    """Average symmetric surface distance (mm): area-weighted mean over both surfaces pooled."""
    total = sd.ref_areas.sum() + sd.pred_areas.sum()
    if sd.empty_reference or sd.empty_prediction:
        return float("nan") if total == 0 else float("inf")
    weighted = (sd.ref_to_pred * sd.ref_areas).sum() + (sd.pred_to_ref * sd.pred_areas).sum()
    return float(weighted / total)


def masd_from_distances(sd: SurfaceDistances) -> float:
    """Mean average surface distance (mm): mean of the two directed area-weighted means."""
    if sd.empty_reference or sd.empty_prediction:
        return float("nan") if sd.empty_reference and sd.empty_prediction else float("inf")
    forward = (sd.ref_to_pred * sd.ref_areas).sum() / sd.ref_areas.sum()
    backward = (sd.pred_to_ref * sd.pred_areas).sum() / sd.pred_areas.sum()
    return float((forward + backward) / 2.0)


def nsd_from_distances(sd: SurfaceDistances, *, tolerance_mm: float) -> float:
    """Normalized surface Dice at ``tolerance_mm``: NaN when both masks are empty, 0 when one is."""
    total = sd.ref_areas.sum() + sd.pred_areas.sum()
    if total == 0:
        return float("nan")
    limit = _with_rounding(tolerance_mm)
    within = (
        sd.ref_areas[sd.ref_to_pred <= limit].sum() + sd.pred_areas[sd.pred_to_ref <= limit].sum()
    )
    return float(within / total)


# ------------------------------------------------------------------ boundary IoU


def boundary_band(mask: np.ndarray, *, spacing: Sequence[float], width_mm: float) -> np.ndarray:
    """Foreground voxels within ``width_mm`` of the background (voxel centres, mm).

    Voxels with a face neighbour outside the mask (or outside the array) are
    always in the band, so the band is never empty for a non-empty mask, even
    when the width is below one voxel. The result equals thresholding the
    Euclidean distance transform of the mask (a test checks it), computed
    faster: candidates come from a box erosion (1D minimum filters), exact
    distances from a k-d tree over the background voxels that touch the mask
    (the nearest background voxel always does).
    """
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask, 1).astype(np.uint8)
    limit = _with_rounding(width_mm)
    # A background voxel within `limit` is at most floor(limit / s) voxels away per axis.
    eroded = padded
    for axis, step in enumerate(spacing):
        reach = int(np.floor(limit / float(step)))
        if reach > 0:
            eroded = ndimage.minimum_filter1d(
                eroded, 2 * reach + 1, axis=axis, mode="constant", cval=0
            )
    inside = padded.astype(bool)
    face = inside & ~ndimage.binary_erosion(inside)  # face neighbour outside
    candidates = inside & ~eroded.astype(bool) & ~face
    band = face
    if candidates.any():
        touching = ~inside & ndimage.maximum_filter(padded, size=3).astype(bool)
        scale = np.asarray(spacing, dtype=np.float64)
        targets = np.stack(np.nonzero(touching), axis=1) * scale
        points = np.nonzero(candidates)
        distance = _nearest(np.stack(points, axis=1) * scale, targets)
        keep = tuple(axis[distance <= limit] for axis in points)
        band = face.copy()
        band[keep] = True
    return band[tuple(slice(1, -1) for _ in range(mask.ndim))]


def boundary_iou(
    pred: np.ndarray, ref: np.ndarray, *, spacing: Sequence[float], width_mm: float
) -> float:
    """Boundary IoU (Cheng et al. 2021): IoU of the two masks' inner boundary bands.

    NaN when both masks are empty, 0 when exactly one is.
    """
    pred, ref = np.asarray(pred).astype(bool), np.asarray(ref).astype(bool)
    box = bounding_box(pred, ref)
    if box is None:
        return float("nan")
    band_pred = boundary_band(pred[box], spacing=spacing, width_mm=width_mm)
    band_ref = boundary_band(ref[box], spacing=spacing, width_mm=width_mm)
    union = np.count_nonzero(band_pred | band_ref)
    return float(np.count_nonzero(band_pred & band_ref) / union)
