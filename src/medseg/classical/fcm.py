"""Fuzzy C-means, with an optional spatial term (FCM_S1/FCM_S2) against noise, in 2D and 3D.

Plain FCM minimizes ``sum_k sum_i u_ik^m (x_k - v_i)^2`` with memberships ``u``
summing to one per voxel. The spatial variant of Chen & Zhang (2004) adds
``alpha * sum_k sum_i u_ik^m (xbar_k - v_i)^2`` where ``xbar`` is the mean
(FCM_S1) or median (FCM_S2) of each voxel's neighbourhood, computed once; a
voxel whose neighbours disagree with it is pulled towards their class. The
neighbourhood is given in millimetres, so anisotropic voxels get fewer
neighbours along their long axis. Scikit-image, SimpleITK and MONAI have no
FCM, so it is written here (vectorized NumPy, one pass per iteration).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medseg.classical.common import as_image, as_mask, window_voxels
from medseg.errors import MedsegError
from medseg.io.image import Image

__all__ = ["FCMResult", "fuzzy_c_means"]


@dataclass(frozen=True, eq=False)
class FCMResult:
    """Fuzzy C-means output.

    Attributes
    ----------
    memberships
        ``(classes, *image.shape)`` float32, summing to 1 per voxel inside the mask (0 outside).
    labels
        uint8 hard labels ``1..classes`` (class of highest membership, classes
        sorted by increasing centre), 0 outside the mask.
    centers
        Class centres (intensities), increasing.
    iterations
        Iterations run.
    converged
        Whether the centres moved less than the tolerance before ``max_iter``.
    """

    memberships: np.ndarray
    labels: Image
    centers: np.ndarray
    iterations: int
    converged: bool


def _memberships(dist: np.ndarray, m: float) -> np.ndarray:
    """u_ik = 1 / sum_j (d_ik / d_jk)^(1/(m-1)), written with powers of the distances."""
    inv = np.maximum(dist, 1e-12) ** (-1.0 / (m - 1.0))
    return inv / inv.sum(axis=0, keepdims=True)


def fuzzy_c_means(
    image: Image | np.ndarray,
    *,
    classes: int = 3,
    m: float = 2.0,
    max_iter: int = 100,
    tol: float = 1e-5,
    spatial_weight: float = 0.0,
    neighbourhood_mm: float | Sequence[float] | None = None,
    spatial: str = "mean",
    mask: Image | np.ndarray | None = None,
    init: Sequence[float] | None = None,
) -> FCMResult:
    """Cluster intensities into ``classes`` fuzzy classes.

    Parameters
    ----------
    image
        2D or 3D image.
    classes
        Number of classes (at least 2).
    m
        Fuzzifier, > 1 (2 is usual; towards 1 the result approaches k-means).
    max_iter
        Most iterations.
    tol
        Stop when no centre moves more than ``tol`` times the intensity range.
    spatial_weight
        ``alpha`` of the spatial term; 0 is plain FCM.
    neighbourhood_mm
        Neighbourhood size for the spatial term in mm (default: 3 voxels per axis).
    spatial
        ``"mean"`` (FCM_S1) or ``"median"`` (FCM_S2) neighbourhood image.
    mask
        Cluster only these voxels (e.g. a crop's foreground); others get label 0.
    init
        Initial centres; default: the intensity quantiles ``(i + 0.5) / classes``.

    Returns
    -------
    FCMResult
        Memberships, hard labels, sorted centres, iterations and convergence.
    """
    image = as_image(image)
    if m <= 1:
        raise MedsegError(f"the fuzzifier m must be greater than 1 (got {m})")
    if classes < 2:
        raise MedsegError(f"classes must be at least 2 (got {classes})")
    if max_iter < 1 or tol <= 0:
        raise MedsegError(f"max_iter must be >= 1 and tol > 0 (got {max_iter}, {tol})")
    if spatial_weight < 0:
        raise MedsegError(f"spatial_weight must not be negative (got {spatial_weight})")
    if spatial not in ("mean", "median"):
        raise MedsegError(f"spatial must be 'mean' or 'median' (got {spatial!r})")
    inside = as_mask(mask, image)
    data = np.asarray(image.array, dtype=np.float64)
    x = data[inside] if inside is not None else data.ravel()
    if np.unique(x[: min(x.size, 1_000_000)]).size < classes and np.unique(x).size < classes:
        raise MedsegError(f"image has fewer than {classes} distinct intensities")
    scale = float(x.max() - x.min())
    if spatial_weight > 0:
        size = (
            window_voxels(neighbourhood_mm, image.spacing)
            if neighbourhood_mm is not None
            else (3,) * image.ndim
        )
        filt = ndimage.uniform_filter if spatial == "mean" else ndimage.median_filter
        smooth = filt(data, size=size, mode="nearest")
        xbar = smooth[inside] if inside is not None else smooth.ravel()
    else:
        xbar = x
    if init is not None:
        centers = np.sort(np.asarray(init, dtype=np.float64))
        if centers.shape != (classes,):
            raise MedsegError(f"init needs {classes} centres (got {len(centers)})")
    else:
        centers = np.quantile(x, (np.arange(classes) + 0.5) / classes)
    alpha = spatial_weight
    converged = False
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 - the count is reported
        dist = (x[None] - centers[:, None]) ** 2 + alpha * (xbar[None] - centers[:, None]) ** 2
        u = _memberships(dist, m)
        um = u**m
        new = (um @ (x + alpha * xbar)) / ((1 + alpha) * um.sum(axis=1))
        shift = np.max(np.abs(new - centers))
        centers = new
        if shift <= tol * scale:
            converged = True
            break
    dist = (x[None] - centers[:, None]) ** 2 + alpha * (xbar[None] - centers[:, None]) ** 2
    u = _memberships(dist, m)
    order = np.argsort(centers)
    centers, u = centers[order], u[order]
    memberships = np.zeros((classes, *image.shape), dtype=np.float32)
    labels = np.zeros(image.shape, dtype=np.uint8)
    hard = (np.argmax(u, axis=0) + 1).astype(np.uint8)
    if inside is not None:
        memberships[:, inside] = u
        labels[inside] = hard
    else:
        memberships[:] = u.reshape(classes, *image.shape)
        labels[:] = hard.reshape(image.shape)
    return FCMResult(
        memberships=memberships,
        labels=image.with_array(labels),
        centers=centers,
        iterations=iterations,
        converged=converged,
    )
