"""Intensity enhancement and normalization: CLAHE, histogram matching, CT windows, rescaling."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from medseg.classical.common import as_image, as_mask, values, window_voxels
from medseg.errors import MedsegError
from medseg.io.files import from_sitk, to_sitk
from medseg.io.image import Image

__all__ = ["CT_WINDOWS", "clahe", "histogram_match", "normalize", "window"]

#: CT display windows as (level, width) in Hounsfield units (common radiology presets).
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "abdomen": (40.0, 400.0),
    "liver": (60.0, 160.0),
    "bone": (400.0, 1800.0),
}


def window(
    image: Image | np.ndarray,
    *,
    preset: str | None = None,
    level: float | None = None,
    width: float | None = None,
    rescale: bool = True,
) -> Image:
    """Clip intensities to a window (a CT preset of :data:`CT_WINDOWS`, or level/width).

    With ``rescale`` the window maps to [0, 1], otherwise the clipped values are kept.
    """
    image = as_image(image)
    if preset is not None:
        if preset not in CT_WINDOWS:
            raise MedsegError(
                f"unknown window preset {preset!r} (choose from {', '.join(CT_WINDOWS)})"
            )
        level, width = CT_WINDOWS[preset]
    if level is None or width is None:
        raise MedsegError("a window needs a preset, or both level and width")
    if width <= 0:
        raise MedsegError(f"window width must be positive (got {width})")
    lo, hi = level - width / 2, level + width / 2
    out = np.clip(np.asarray(image.array, dtype=np.float32), lo, hi)
    if rescale:
        out = (out - lo) / (hi - lo)
    return image.with_array(out.astype(np.float32))


def normalize(
    image: Image | np.ndarray,
    *,
    method: str = "zscore",
    percentiles: tuple[float, float] = (0.5, 99.5),
    mask: Image | np.ndarray | None = None,
) -> Image:
    """Normalize intensities: ``zscore``, ``minmax`` to [0, 1], or ``percentile`` clip and rescale.

    Statistics are taken inside ``mask`` when given (e.g. the body), applied everywhere.
    """
    image = as_image(image)
    data = np.asarray(image.array, dtype=np.float32)
    vals = values(image, as_mask(mask, image))
    if method == "zscore":
        std = float(vals.std())
        out = (data - vals.mean()) / (std if std > 0 else 1.0)
    elif method in ("minmax", "percentile"):
        lo, hi = (
            (vals.min(), vals.max())
            if method == "minmax"
            else tuple(np.percentile(vals, percentiles))
        )
        out = (np.clip(data, lo, hi) - lo) / (hi - lo if hi > lo else 1.0)
    else:
        raise MedsegError(f"unknown normalization {method!r} (choose zscore, minmax or percentile)")
    return image.with_array(out.astype(np.float32))


def clahe(
    image: Image | np.ndarray,
    *,
    kernel_mm: float | Sequence[float] | None = None,
    clip_limit: float = 0.01,
    nbins: int = 256,
) -> Image:
    """Contrast-limited adaptive histogram equalization (scikit-image), 2D or 3D.

    ``kernel_mm`` is the contextual region's size in mm (default: 1/8 of the
    image extent per axis, scikit-image's default). The result is in [0, 1].
    """
    from skimage.exposure import equalize_adapthist

    image = as_image(image)
    if not 0 < clip_limit <= 1:
        raise MedsegError(f"clip_limit must be within (0, 1] (got {clip_limit})")
    data = np.asarray(image.array, dtype=np.float64)
    lo, hi = float(data.min()), float(data.max())
    scaled = (data - lo) / (hi - lo) if hi > lo else np.zeros_like(data)
    kernel = None if kernel_mm is None else window_voxels(kernel_mm, image.spacing)
    out = equalize_adapthist(scaled, kernel_size=kernel, clip_limit=clip_limit, nbins=nbins)
    return image.with_array(out.astype(np.float32))


def histogram_match(
    image: Image | np.ndarray,
    reference: Image | np.ndarray,
    *,
    levels: int = 256,
    match_points: int = 15,
    threshold_at_mean: bool = True,
) -> Image:
    """Map intensities so the histogram matches ``reference``'s (SimpleITK HistogramMatching).

    ``threshold_at_mean`` leaves out voxels below the mean (background) when
    building the histograms, as for MR with large dark backgrounds.
    """
    image = as_image(image)
    reference = as_image(reference, name="reference image")
    if image.ndim != reference.ndim:
        raise MedsegError(f"reference is {reference.ndim}D but the image is {image.ndim}D")
    src = to_sitk(image.with_array(np.asarray(image.array, dtype=np.float32)))
    ref = to_sitk(reference.with_array(np.asarray(reference.array, dtype=np.float32)))
    out = sitk.HistogramMatching(
        src,
        ref,
        numberOfHistogramLevels=levels,
        numberOfMatchPoints=match_points,
        thresholdAtMeanIntensity=threshold_at_mean,
    )
    return image.with_array(from_sitk(out).array.astype(np.float32))
