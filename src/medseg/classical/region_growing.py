"""Region growing from seeds, automatic seed selection and a region split/merge step.

A grown region is the set of voxels connected to a seed (6/18/26-connectivity in
3D, 4/8 in 2D) through voxels that pass a similarity test:

* ``range``: ``lower <= I <= upper`` (SimpleITK ``ConnectedThreshold`` for 6/26);
* ``confidence``: ``mean +/- multiplier * std``, with the statistics first taken in
  a box around the seeds and then re-estimated from the region, ``iterations``
  times (the definition of SimpleITK ``ConfidenceConnected``);
* ``gradient``: the intensity range, and a gradient magnitude (Gaussian derivative,
  sigma in mm) below ``max_gradient`` so the region stops at edges.

The connected part uses ``cc3d`` labelling of the passing voxels, which gives
the flood fill's result for any connectivity in one pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from medseg.classical.common import as_image, check_connectivity, values
from medseg.classical.thresholds import threshold_value
from medseg.errors import MedsegError
from medseg.imaging.components import component_sizes, label_components
from medseg.io.files import to_sitk
from medseg.io.image import Image

CRITERIA = ("range", "confidence", "gradient")

__all__ = [
    "CRITERIA",
    "auto_seeds",
    "grow_connected",
    "region_grow",
    "seeds_to_index",
    "split_merge",
]


def seeds_to_index(
    image: Image, seeds: Sequence[Sequence[float]], *, units: str = "voxel"
) -> list[tuple[int, ...]]:
    """Seeds as voxel indices ``(x, y[, z])``, checked to lie inside the image.

    Parameters
    ----------
    image
        The image the seeds belong to.
    seeds
        Points as voxel indices (``units="voxel"``) or world LPS coordinates in mm
        (``units="mm"``, mapped with the image's origin, spacing and direction).
    units
        ``"voxel"`` or ``"mm"``.
    """
    if units not in ("voxel", "mm"):
        raise MedsegError(f"seed units must be 'voxel' or 'mm' (got {units!r})")
    points = np.asarray(seeds, dtype=float)
    if points.ndim == 1:
        points = points[None]
    if points.size == 0:
        raise MedsegError("no seed given")
    if points.shape[1] != image.ndim:
        raise MedsegError(
            f"a seed needs {image.ndim} coordinates for a {image.ndim}D image, got {points.shape[1]}"
        )
    if units == "mm":
        # world = origin + D @ (index * spacing)  =>  index = (D^-1 (world - origin)) / spacing
        inv = np.linalg.inv(image.direction_matrix)
        points = ((points - np.asarray(image.origin)) @ inv.T) / np.asarray(image.spacing)
    given = np.asarray(seeds, dtype=float).reshape(len(points), -1)
    index = np.rint(points).astype(int)
    out = []
    for p, g, q in zip(index, given, points, strict=True):
        if np.any(p < 0) or np.any(p >= np.asarray(image.shape)):
            at = f" (voxel {tuple(np.round(q, 1).tolist())})" if units == "mm" else ""
            raise MedsegError(
                f"seed {tuple(g.tolist())} {units}{at} is outside the image of shape {image.shape}"
            )
        out.append(tuple(int(v) for v in p))
    return out


def grow_connected(
    passing: np.ndarray, seeds: Sequence[tuple[int, ...]], *, connectivity: int
) -> np.ndarray:
    """Voxels of ``passing`` connected to a seed (seeds that do not pass grow nothing)."""
    conn = check_connectivity(passing.ndim, connectivity)
    components = label_components(passing, connectivity=conn)
    ids = {int(components[s]) for s in seeds} - {0}
    if not ids:
        return np.zeros(passing.shape, dtype=bool)
    return np.isin(components, np.fromiter(ids, dtype=components.dtype))


def _seed_box_values(
    data: np.ndarray, seeds: Sequence[tuple[int, ...]], radius: int
) -> list[np.ndarray]:
    """Each seed's (2r+1)^D box of intensities; out-of-image offsets repeat the edge voxel."""
    offsets = np.stack(
        np.meshgrid(*[np.arange(-radius, radius + 1)] * data.ndim, indexing="ij"), -1
    ).reshape(-1, data.ndim)
    boxes = []
    for s in seeds:
        idx = np.clip(np.asarray(s) + offsets, 0, np.asarray(data.shape) - 1)
        boxes.append(data[tuple(idx.T)])
    return boxes


def _confidence(
    data: np.ndarray,
    seeds: Sequence[tuple[int, ...]],
    *,
    multiplier: float,
    iterations: int,
    radius: int,
    connectivity: int,
) -> tuple[np.ndarray, float, float]:
    seed_values = np.array([data[s] for s in seeds])
    if radius > 0:
        boxes = _seed_box_values(data, seeds, radius)
        n = sum(b.size for b in boxes)
        mean = float(np.mean([b.mean() for b in boxes]))
        var = (sum(float(np.sum(b**2)) for b in boxes) - mean * mean * n) / (n - 1)
    else:
        mean = float(seed_values.mean())
        var = float(seed_values.var(ddof=1)) if seed_values.size > 1 else 0.0
    lo, hi = seed_values.min(), seed_values.max()
    std = np.sqrt(max(var, 0.0))
    region = grow_connected(
        (data >= min(mean - multiplier * std, lo)) & (data <= max(mean + multiplier * std, hi)),
        seeds,
        connectivity=connectivity,
    )
    for _ in range(iterations):
        inside = data[region]
        mean = float(inside.mean())
        var = float(inside.var(ddof=1)) if inside.size > 1 else 0.0
        if np.isclose(var, 0.0):  # nothing more to learn from a flat region
            break
        std = np.sqrt(var)
        region = grow_connected(
            (data >= min(mean - multiplier * std, lo)) & (data <= max(mean + multiplier * std, hi)),
            seeds,
            connectivity=connectivity,
        )
    return region, mean, float(np.sqrt(max(var, 0.0)))


def region_grow(
    image: Image | np.ndarray,
    seeds: Sequence[Sequence[float]] | None = None,
    *,
    seed_units: str = "voxel",
    criterion: str = "range",
    lower: float | None = None,
    upper: float | None = None,
    tolerance: float | None = None,
    multiplier: float = 2.5,
    iterations: int = 4,
    radius: int = 1,
    max_gradient: float | None = None,
    gradient_sigma_mm: float = 1.0,
    gradient_percentile: float = 90.0,
    connectivity: int = 6,
    auto_seed: str = "threshold",
) -> Image:
    """Grow a region from seeds with an intensity-range, confidence or gradient-aware test.

    Parameters
    ----------
    image
        2D or 3D image.
    seeds
        Points (voxel indices or mm, see ``seed_units``); None chooses one with
        :func:`auto_seeds` (``auto_seed`` is its method).
    seed_units
        ``"voxel"`` or ``"mm"`` (world LPS coordinates).
    criterion
        ``"range"``, ``"confidence"`` or ``"gradient"`` (see the module docstring).
    lower, upper
        Intensity range (``range``/``gradient``). When both are None,
        ``seed mean +/- tolerance`` is used.
    tolerance
        Half-width of the range around the seeds' mean intensity.
    multiplier, iterations, radius
        ``confidence``: the interval's width in standard deviations, the number of
        re-estimations and the half-size in voxels of the initial box around each seed.
    max_gradient
        ``gradient``: largest gradient magnitude (intensity per mm) a region voxel may
        have; default: the ``gradient_percentile``-th percentile of the image's.
    gradient_sigma_mm
        Smoothing of the gradient magnitude, in mm.
    connectivity
        6, 18 or 26 in 3D; 4 or 8 in 2D (6 and 26 are read as 4 and 8 there).

    Returns
    -------
    Image
        uint8 mask (1 = region) with the input geometry.
    """
    image = as_image(image)
    check_connectivity(image.ndim, connectivity)
    if criterion not in CRITERIA:
        raise MedsegError(
            f"unknown region-growing criterion {criterion!r} (choose from {', '.join(CRITERIA)})"
        )
    if seeds is None:
        index = auto_seeds(image, method=auto_seed)
    else:
        index = seeds_to_index(image, seeds, units=seed_units)
    data = np.asarray(image.array, dtype=np.float64)
    if criterion == "confidence":
        if multiplier <= 0 or iterations < 0 or radius < 0:
            raise MedsegError(
                f"confidence needs multiplier > 0, iterations >= 0, radius >= 0 "
                f"(got {multiplier}, {iterations}, {radius})"
            )
        region = _confidence(
            data,
            index,
            multiplier=multiplier,
            iterations=iterations,
            radius=radius,
            connectivity=connectivity,
        )[0]
        return image.with_array(region.astype(np.uint8))
    if lower is None and upper is None:
        if tolerance is None or tolerance < 0:
            raise MedsegError(
                "give lower/upper or a non-negative tolerance around the seeds' intensity"
            )
        centre = float(np.mean([data[s] for s in index]))
        lower, upper = centre - tolerance, centre + tolerance
    lower = -np.inf if lower is None else lower
    upper = np.inf if upper is None else upper
    if lower > upper:
        raise MedsegError(f"lower ({lower}) is above upper ({upper})")
    passing = (data >= lower) & (data <= upper)
    if criterion == "gradient":
        if gradient_sigma_mm <= 0:
            raise MedsegError(f"gradient_sigma_mm must be positive (got {gradient_sigma_mm})")
        grad = sitk.GradientMagnitudeRecursiveGaussian(
            to_sitk(image.with_array(data.astype(np.float32))), sigma=gradient_sigma_mm
        )
        g = sitk.GetArrayViewFromImage(grad).transpose(tuple(range(image.ndim))[::-1])
        if max_gradient is None:
            max_gradient = float(np.percentile(g, gradient_percentile))
        # Seeds always pass the gradient test: a seed on an edge still starts a region.
        edge_ok = g <= max_gradient
        for s in index:
            edge_ok[s] = True
        passing &= edge_ok
    return image.with_array(
        grow_connected(passing, index, connectivity=connectivity).astype(np.uint8)
    )


def _deepest_points(
    mask: np.ndarray, spacing: Sequence[float], count: int
) -> list[tuple[int, ...]]:
    """The voxel farthest (in mm) from the border in each of the ``count`` largest components."""
    components = label_components(mask)
    sizes = component_sizes(components)
    order = [int(i) for i in np.argsort(sizes)[::-1] if sizes[i] > 0][:count]
    out = []
    for comp in order:
        part = components == comp
        dist = ndimage.distance_transform_edt(part, sampling=spacing)
        out.append(tuple(int(v) for v in np.unravel_index(int(np.argmax(dist)), mask.shape)))
    return out


def auto_seeds(
    image: Image | np.ndarray,
    *,
    method: str = "threshold",
    count: int = 1,
    below: bool = False,
    threshold_method: str = "otsu",
    nbins: int = 128,
) -> list[tuple[int, ...]]:
    """Choose seeds automatically, deep inside the largest bright (or dark) structures.

    Parameters
    ----------
    image
        2D or 3D image.
    method
        ``"threshold"``: foreground of a global threshold (``threshold_method``).
        ``"histogram"``: voxels of the brightest (``below``: darkest) peak of the
        smoothed intensity histogram, between the valleys on either side.
    count
        Seeds to return, one per largest component.
    below
        Look for dark structures instead.

    Returns
    -------
    list of tuple
        Voxel indices, deepest point (largest distance in mm to the border) of each component.
    """
    image = as_image(image)
    if count < 1:
        raise MedsegError(f"count must be at least 1 (got {count})")
    data = np.asarray(image.array, dtype=np.float64)
    if data.min() == data.max():
        raise MedsegError("cannot choose seeds in an image of a single intensity")
    if method == "threshold":
        t = threshold_value(image, method=threshold_method)
        fg = data <= t if below else data > t
    elif method == "histogram":
        hist, edges = np.histogram(values(image, None), bins=nbins)
        from scipy import signal  # ~0.7 s to import; only this method needs it

        smooth = ndimage.gaussian_filter1d(hist.astype(float), 1.5)
        peaks, _ = signal.find_peaks(np.pad(smooth, 1), prominence=0.01 * smooth.max())
        peaks = peaks - 1
        if peaks.size == 0:
            peaks = np.array([int(np.argmax(smooth))])
        peak = int(peaks.min() if below else peaks.max())
        lo = peak
        while lo > 0 and smooth[lo - 1] <= smooth[lo]:
            lo -= 1
        hi = peak
        while hi < nbins - 1 and smooth[hi + 1] <= smooth[hi]:
            hi += 1
        fg = (data >= edges[lo]) & (data <= edges[hi + 1])
    else:
        raise MedsegError(f"unknown seed method {method!r} (choose 'threshold' or 'histogram')")
    if not fg.any():
        raise MedsegError("no candidate voxel for an automatic seed")
    return _deepest_points(fg, image.spacing, count)


def split_merge(
    image: Image | np.ndarray,
    labels: Image | np.ndarray,
    *,
    split_std: float | None = None,
    merge_difference: float | None = None,
    min_size: int = 2,
) -> Image:
    """Split inhomogeneous regions and merge similar neighbours of a label map.

    Parameters
    ----------
    image
        The intensities.
    labels
        Region labels (0 = background, never split or merged).
    split_std
        A region whose intensity standard deviation exceeds it is split in two by
        Otsu's threshold of its own intensities, then into connected parts.
    merge_difference
        Face-adjacent regions whose mean intensities differ by less are merged
        (transitively, in one pass on the region adjacency graph).
    min_size
        Split parts smaller than this many voxels stay with their region.

    Returns
    -------
    Image
        Labels ``1..n`` (int32) with the input geometry.
    """
    from skimage.filters import threshold_otsu

    image = as_image(image)
    lab = labels.array if isinstance(labels, Image) else np.asarray(labels)
    if lab.shape != image.shape:
        raise MedsegError(f"labels shape {lab.shape} differs from the image's {image.shape}")
    data = np.asarray(image.array, dtype=np.float64)
    out = np.asarray(lab, dtype=np.int64).copy()
    conn = 4 if image.ndim == 2 else 6
    if split_std is not None:
        if split_std < 0:
            raise MedsegError(f"split_std must not be negative (got {split_std})")
        next_id = int(out.max()) + 1
        for region in [int(v) for v in np.unique(out) if v != 0]:
            mask = out == region
            vals = data[mask]
            if vals.std() <= split_std or vals.min() == vals.max():
                continue
            high = mask & (data > threshold_otsu(vals))
            parts = label_components(high, connectivity=conn)
            for p in range(1, int(parts.max()) + 1):
                part = parts == p
                if part.sum() >= min_size:
                    out[part] = next_id
                    next_id += 1
    if merge_difference is not None:
        ids = np.unique(out)
        ids = ids[ids != 0]
        means = dict(zip(ids.tolist(), ndimage.mean(data, out, ids), strict=True))
        parent = {i: i for i in ids.tolist()}

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for axis in range(out.ndim):
            a = np.moveaxis(out, axis, 0)
            left, right = a[:-1].ravel(), a[1:].ravel()
            touching = (left != right) & (left != 0) & (right != 0)
            for x, y in set(zip(left[touching].tolist(), right[touching].tolist(), strict=True)):
                if abs(means[x] - means[y]) < merge_difference:
                    parent[find(x)] = find(y)
        lut = np.zeros(int(out.max()) + 1, dtype=np.int64)
        for i in ids.tolist():
            lut[i] = find(i)
        out = lut[out]
    # Relabel 1..n in order of first appearance of the label values.
    uniq, inverse = np.unique(out, return_inverse=True)
    relabelled = inverse.reshape(out.shape) + (0 if uniq[0] == 0 else 1)
    return image.with_array(relabelled.astype(np.int32))
