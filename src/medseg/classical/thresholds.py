"""Global, histogram-based and local thresholds on 2D/3D images with spacing.

The threshold values come from scikit-image (Otsu, multi-level Otsu, Li,
triangle, block mean/Gaussian, Sauvola, Niblack). Kittler-Illingworth's
minimum-error threshold is computed here from the histogram: scikit-image has
none, and ITK's filter works on its own fixed histogram without a mask.
Local window sizes are given in millimetres and converted with the spacing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from skimage import filters

from medseg.classical.common import as_image, as_mask, values, window_voxels
from medseg.errors import MedsegError
from medseg.io.image import Image

GLOBAL_METHODS = ("value", "percentile", "otsu", "kittler", "li", "triangle")
LOCAL_METHODS = ("mean", "gaussian", "sauvola", "niblack")
METHODS = GLOBAL_METHODS + LOCAL_METHODS + ("multiotsu",)

__all__ = [
    "GLOBAL_METHODS",
    "LOCAL_METHODS",
    "METHODS",
    "kittler_illingworth_value",
    "local_threshold_map",
    "multi_otsu",
    "threshold",
    "threshold_value",
]


def kittler_illingworth_value(data: np.ndarray, *, nbins: int = 256) -> float:
    """Kittler-Illingworth minimum-error (maximum-likelihood) threshold of intensities.

    The histogram is modelled as two Gaussians; the threshold minimizes
    ``J(t) = P1 ln(s1^2) + P2 ln(s2^2) - 2 (P1 ln P1 + P2 ln P2)``, the
    classification error criterion of Kittler & Illingworth (1986).

    Parameters
    ----------
    data
        Intensities (any shape).
    nbins
        Histogram bins.

    Returns
    -------
    float
        Upper edge of the last bin of the lower class: voxels ``> t`` are the upper class.
    """
    data = np.asarray(data, dtype=np.float64).ravel()
    if data.size == 0:
        raise MedsegError("cannot threshold an empty image")
    hist, edges = np.histogram(data, bins=nbins)
    centres = (edges[:-1] + edges[1:]) / 2
    p = hist / hist.sum()
    w1 = np.cumsum(p)
    m1 = np.cumsum(p * centres)
    q1 = np.cumsum(p * centres**2)
    w2 = 1.0 - w1
    m2 = m1[-1] - m1
    q2 = q1[-1] - q1
    with np.errstate(divide="ignore", invalid="ignore"):
        mu1, mu2 = m1 / w1, m2 / w2
        var1 = q1 / w1 - mu1**2
        var2 = q2 / w2 - mu2**2
        crit = w1 * np.log(var1) + w2 * np.log(var2) - 2 * (w1 * np.log(w1) + w2 * np.log(w2))
    # A class of zero variance (a single bin) makes the criterion -inf: not a valid split.
    valid = (w1 > 0) & (w2 > 0) & (var1 > 1e-12) & (var2 > 1e-12)
    if not valid.any():
        return float(np.mean(edges[nbins // 2 : nbins // 2 + 1]))
    crit = np.where(valid, crit, np.inf)
    return float(edges[int(np.argmin(crit)) + 1])


def threshold_value(
    image: Image | np.ndarray,
    *,
    method: str = "otsu",
    value: float | None = None,
    percentile: float | None = None,
    mask: Image | np.ndarray | None = None,
    nbins: int = 256,
) -> float:
    """A global threshold: given, a percentile, Otsu, Kittler-Illingworth, Li or triangle.

    Parameters
    ----------
    image
        2D or 3D image.
    method
        One of :data:`GLOBAL_METHODS`.
    value
        The threshold for ``method="value"``.
    percentile
        0-100, for ``method="percentile"``.
    mask
        Compute the histogram only inside this mask (e.g. a body mask).
    nbins
        Histogram bins (Otsu, Kittler-Illingworth, triangle).

    Returns
    -------
    float
        Voxels strictly above it are foreground (as scikit-image defines Otsu).
    """
    image = as_image(image)
    data = values(image, as_mask(mask, image))
    if method == "value":
        if value is None:
            raise MedsegError("method 'value' needs value=")
        return float(value)
    if method == "percentile":
        if percentile is None or not 0 <= percentile <= 100:
            raise MedsegError(f"percentile must be within 0-100 (got {percentile})")
        return float(np.percentile(data, percentile))
    if method not in GLOBAL_METHODS:
        raise MedsegError(
            f"unknown global threshold {method!r} (choose from {', '.join(GLOBAL_METHODS)})"
        )
    if nbins < 2:
        raise MedsegError(f"nbins must be at least 2 (got {nbins})")
    if data.min() == data.max():  # one intensity: every threshold method is undefined
        return float(data.max())
    if method == "otsu":
        return float(filters.threshold_otsu(data, nbins=nbins))
    if method == "kittler":
        return kittler_illingworth_value(data, nbins=nbins)
    if method == "li":
        return float(filters.threshold_li(data))
    return float(filters.threshold_triangle(data, nbins=nbins))


def multi_otsu(
    image: Image | np.ndarray,
    *,
    classes: int = 3,
    nbins: int = 256,
    mask: Image | np.ndarray | None = None,
) -> tuple[Image, np.ndarray]:
    """Multi-level Otsu: a label map ``0..classes-1`` (darkest to brightest) and the thresholds.

    Outside ``mask`` the label is 0.
    """
    image = as_image(image)
    if classes < 2:
        raise MedsegError(f"classes must be at least 2 (got {classes})")
    m = as_mask(mask, image)
    data = values(image, m)
    if np.unique(data).size < classes:
        raise MedsegError(f"image has fewer than {classes} distinct intensities")
    thresholds = filters.threshold_multiotsu(data, classes=classes, nbins=nbins)
    labels = np.digitize(image.array, bins=thresholds).astype(np.uint8)
    if m is not None:
        labels[~m] = 0
    return image.with_array(labels), np.asarray(thresholds, dtype=float)


def local_threshold_map(
    image: Image | np.ndarray,
    *,
    method: str = "gaussian",
    window_mm: float | Sequence[float] = 15.0,
    offset: float = 0.0,
    k: float = 0.2,
    r: float | None = None,
) -> np.ndarray:
    """A threshold per voxel from a window of ``window_mm`` millimetres around it.

    ``mean``/``gaussian`` (scikit-image ``threshold_local``: local mean or
    Gaussian-weighted mean minus ``offset``), ``sauvola`` (mean * (1 + k (std / r - 1)))
    and ``niblack`` (mean + k std; note scikit-image's sign: a negative ``k``
    lowers the threshold).
    """
    image = as_image(image)
    window = window_voxels(window_mm, image.spacing)
    data = np.asarray(image.array, dtype=np.float64)
    if method in ("mean", "gaussian"):
        return filters.threshold_local(data, block_size=window, method=method, offset=offset)
    if method == "sauvola":
        return filters.threshold_sauvola(data, window_size=window, k=k, r=r)
    if method == "niblack":
        return filters.threshold_niblack(data, window_size=window, k=k)
    raise MedsegError(
        f"unknown local threshold {method!r} (choose from {', '.join(LOCAL_METHODS)})"
    )


def threshold(
    image: Image | np.ndarray,
    *,
    method: str = "otsu",
    value: float | None = None,
    percentile: float | None = None,
    upper: float | None = None,
    classes: int = 3,
    window_mm: float | Sequence[float] = 15.0,
    offset: float = 0.0,
    k: float = 0.2,
    below: bool = False,
    mask: Image | np.ndarray | None = None,
    nbins: int = 256,
) -> Image:
    """Segment by thresholding; every method of :data:`METHODS` in one call.

    Parameters
    ----------
    image
        2D or 3D image.
    method
        A global method (:data:`GLOBAL_METHODS`), a local one (:data:`LOCAL_METHODS`)
        or ``"multiotsu"`` (a label map of ``classes`` levels).
    value, percentile
        For ``method="value"`` / ``"percentile"``.
    upper
        With a global method, also require ``intensity <= upper`` (a band, e.g. HU range).
    classes
        Levels of ``multiotsu``.
    window_mm, offset, k
        Local methods (see :func:`local_threshold_map`).
    below
        Foreground is the dark side (``intensity <= t``), e.g. air in CT.
    mask
        Histogram computed inside it and output restricted to it.
    nbins
        Histogram bins.

    Returns
    -------
    Image
        uint8 mask (1 = foreground) with the input geometry, or multi-Otsu labels.
    """
    image = as_image(image)
    if method == "multiotsu":
        return multi_otsu(image, classes=classes, nbins=nbins, mask=mask)[0]
    m = as_mask(mask, image)
    data = image.array
    if method in LOCAL_METHODS:
        t: float | np.ndarray = local_threshold_map(
            image, method=method, window_mm=window_mm, offset=offset, k=k
        )
    elif method in GLOBAL_METHODS:
        t = threshold_value(
            image, method=method, value=value, percentile=percentile, mask=mask, nbins=nbins
        )
    else:
        raise MedsegError(f"unknown threshold method {method!r} (choose from {', '.join(METHODS)})")
    fg = data <= t if below else data > t
    if upper is not None:
        fg &= data <= upper
    if m is not None:
        fg &= m
    return image.with_array(fg.astype(np.uint8))
