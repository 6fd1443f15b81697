"""Marker-based watershed and active contours (morphological Chan-Vese, geodesic) in 2D and 3D."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from medseg.classical.common import as_image, as_mask
from medseg.classical.thresholds import threshold, threshold_value
from medseg.errors import MedsegError
from medseg.imaging.morphology import ball_structure
from medseg.io.files import to_sitk
from medseg.io.image import Image

__all__ = ["auto_markers", "chan_vese", "geodesic_active_contour", "watershed"]


def _gradient(image: Image, sigma_mm: float) -> np.ndarray:
    """Gradient magnitude of a Gaussian-smoothed image, sigma in mm (SimpleITK, uses spacing)."""
    if sigma_mm <= 0:
        raise MedsegError(f"sigma_mm must be positive (got {sigma_mm})")
    g = sitk.GradientMagnitudeRecursiveGaussian(
        to_sitk(image.with_array(np.asarray(image.array, dtype=np.float32))), sigma=sigma_mm
    )
    return sitk.GetArrayFromImage(g).transpose(tuple(range(image.ndim))[::-1])


def auto_markers(image: Image | np.ndarray, *, erode_mm: float = 2.0) -> Image:
    """Markers from Otsu: 1 = surely background, 2 = surely foreground (each eroded by ``erode_mm``)."""
    image = as_image(image)
    t = threshold_value(image, method="otsu")
    fg = image.array > t
    structure = ball_structure(erode_mm, image.spacing)
    markers = np.zeros(image.shape, dtype=np.int32)
    markers[ndimage.binary_erosion(~fg, structure=structure, border_value=1)] = 1
    markers[ndimage.binary_erosion(fg, structure=structure)] = 2
    if not (markers == 2).any():
        markers[fg] = 2
    return image.with_array(markers)


def watershed(
    image: Image | np.ndarray,
    markers: Image | np.ndarray | None = None,
    *,
    sigma_mm: float = 1.0,
    mask: Image | np.ndarray | None = None,
    compactness: float = 0.0,
    full_connectivity: bool = False,
) -> Image:
    """Watershed from markers on the gradient magnitude (scikit-image).

    Parameters
    ----------
    image
        2D or 3D image.
    markers
        Label map of seeds (0 = unlabelled). Default: :func:`auto_markers`, and the
        output is then the foreground mask (1) instead of the label map.
    sigma_mm
        Gaussian scale of the gradient, in mm.
    mask
        Flood only inside it.
    compactness
        > 0 gives more regular regions (compact watershed).
    full_connectivity
        Use the full neighbourhood (8/26) instead of faces (4/6).

    Returns
    -------
    Image
        int32 labels of the markers (uint8 foreground mask with automatic markers).
    """
    from skimage.segmentation import watershed as sk_watershed

    image = as_image(image)
    auto = markers is None
    mark = (
        auto_markers(image).array
        if auto
        else (markers.array if isinstance(markers, Image) else np.asarray(markers))
    )
    if tuple(mark.shape) != image.shape:
        raise MedsegError(
            f"markers shape {tuple(mark.shape)} differs from the image's {image.shape}"
        )
    if not np.any(mark > 0):
        raise MedsegError("markers are empty (no labelled voxel)")
    labels = sk_watershed(
        _gradient(image, sigma_mm),
        markers=np.asarray(mark, dtype=np.int32),
        connectivity=image.ndim if full_connectivity else 1,
        mask=as_mask(mask, image),
        compactness=compactness,
    )
    if auto:
        return image.with_array((labels == 2).astype(np.uint8))
    return image.with_array(labels.astype(np.int32))


def _init_level_set(image: Image, init: Image | np.ndarray | str) -> np.ndarray | str:
    if isinstance(init, str):
        if init not in ("checkerboard", "disk", "otsu"):
            raise MedsegError(
                f"unknown initial level set {init!r} (checkerboard, disk, otsu or a mask)"
            )
        if init == "otsu":
            return threshold(image, method="otsu").array.astype(np.int8)
        if init == "disk" and image.ndim == 3:
            return "ball"
        return init
    arr = init.array if isinstance(init, Image) else np.asarray(init)
    if tuple(arr.shape) != image.shape:
        raise MedsegError(
            f"initial mask shape {tuple(arr.shape)} differs from the image's {image.shape}"
        )
    return (arr > 0).astype(np.int8)


def chan_vese(
    image: Image | np.ndarray,
    *,
    iterations: int = 100,
    smoothing: int = 1,
    lambda1: float = 1.0,
    lambda2: float = 1.0,
    init: Image | np.ndarray | str = "otsu",
    below: bool = False,
) -> Image:
    """Two-phase Chan-Vese active contour without edges (morphological, scikit-image).

    The image is rescaled to [0, 1] so ``lambda1``/``lambda2`` (weights of the
    inside/outside fit) mean the same for CT, MR and US. ``smoothing`` counts
    curvature-smoothing passes per iteration (in voxels: resample strongly
    anisotropic volumes first). The phase with the brighter mean is returned as
    1 (the darker one with ``below``).
    """
    from skimage.segmentation import morphological_chan_vese

    image = as_image(image)
    if iterations < 1 or smoothing < 0 or lambda1 <= 0 or lambda2 <= 0:
        raise MedsegError(
            "chan_vese needs iterations >= 1, smoothing >= 0 and positive lambdas "
            f"(got {iterations}, {smoothing}, {lambda1}, {lambda2})"
        )
    data = np.asarray(image.array, dtype=np.float64)
    lo, hi = data.min(), data.max()
    if hi == lo:
        raise MedsegError("cannot run Chan-Vese on an image of a single intensity")
    scaled = (data - lo) / (hi - lo)
    phase = morphological_chan_vese(
        scaled,
        num_iter=iterations,
        init_level_set=_init_level_set(image, init),
        smoothing=smoothing,
        lambda1=lambda1,
        lambda2=lambda2,
    ).astype(bool)
    if phase.any() and (~phase).any():
        inside_brighter = scaled[phase].mean() >= scaled[~phase].mean()
        if inside_brighter == below:
            phase = ~phase
    return image.with_array(phase.astype(np.uint8))


def geodesic_active_contour(
    image: Image | np.ndarray,
    init: Image | np.ndarray | str = "otsu",
    *,
    iterations: int = 100,
    sigma_mm: float = 1.0,
    balloon: float = 1.0,
    smoothing: int = 1,
) -> Image:
    """Morphological geodesic active contour: an initial mask grows (``balloon`` > 0)
    or shrinks (< 0) and stops at edges (inverse gradient-magnitude, sigma in mm)."""
    from skimage.segmentation import morphological_geodesic_active_contour

    image = as_image(image)
    if iterations < 1:
        raise MedsegError(f"iterations must be >= 1 (got {iterations})")
    grad = _gradient(image, sigma_mm)
    scale = float(np.percentile(grad, 99)) or 1.0
    edge = 1.0 / np.sqrt(1.0 + 100.0 * (grad / scale) ** 2)  # ~1 in flat areas, ~0.1 on edges
    out = morphological_geodesic_active_contour(
        edge,
        num_iter=iterations,
        init_level_set=_init_level_set(image, init),
        smoothing=smoothing,
        balloon=balloon,
        threshold="auto",
    )
    return image.with_array(out.astype(np.uint8))
