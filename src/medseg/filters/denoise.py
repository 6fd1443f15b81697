"""Denoising filters on 2D/3D images; every size is in millimetres and uses the spacing.

Gaussian, median, bilateral and curvature anisotropic diffusion come from
SimpleITK (which works in physical units), non-local means from scikit-image.
Outputs are float32 with the input geometry.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from medseg.classical.common import as_image, radius_voxels
from medseg.errors import MedsegError
from medseg.io.files import from_sitk, to_sitk
from medseg.io.image import Image

__all__ = ["anisotropic_diffusion", "bilateral", "gaussian", "median", "nl_means", "noise_sigma"]


def _float_sitk(image: Image) -> sitk.Image:
    return to_sitk(image.with_array(np.asarray(image.array, dtype=np.float32)))


def _back(image: Image, result: sitk.Image) -> Image:
    return image.with_array(from_sitk(sitk.Cast(result, sitk.sitkFloat32)).array)


def gaussian(image: Image | np.ndarray, *, sigma_mm: float = 1.0) -> Image:
    """Gaussian smoothing with a standard deviation of ``sigma_mm`` millimetres (recursive IIR)."""
    image = as_image(image)
    if sigma_mm <= 0:
        raise MedsegError(f"sigma_mm must be positive (got {sigma_mm})")
    return _back(image, sitk.SmoothingRecursiveGaussian(_float_sitk(image), sigma=sigma_mm))


def median(image: Image | np.ndarray, *, radius_mm: float = 1.0) -> Image:
    """Median filter over a box of half-size ``radius_mm`` (at least one voxel per axis)."""
    image = as_image(image)
    radius = radius_voxels(radius_mm, image.spacing)
    return _back(image, sitk.Median(_float_sitk(image), radius=list(radius)))


def bilateral(
    image: Image | np.ndarray, *, domain_sigma_mm: float = 2.0, range_sigma: float | None = None
) -> Image:
    """Edge-preserving bilateral filter.

    ``domain_sigma_mm`` is the spatial Gaussian in mm; ``range_sigma`` the intensity
    Gaussian (default: the intensity standard deviation / 4).
    """
    image = as_image(image)
    if domain_sigma_mm <= 0:
        raise MedsegError(f"domain_sigma_mm must be positive (got {domain_sigma_mm})")
    if range_sigma is None:
        range_sigma = float(np.std(image.array)) / 4 or 1.0
    if range_sigma <= 0:
        raise MedsegError(f"range_sigma must be positive (got {range_sigma})")
    out = sitk.Bilateral(
        _float_sitk(image), domainSigma=domain_sigma_mm, rangeSigma=float(range_sigma)
    )
    return _back(image, out)


def anisotropic_diffusion(
    image: Image | np.ndarray,
    *,
    iterations: int = 5,
    conductance: float = 3.0,
    time_step: float | None = None,
) -> Image:
    """Curvature anisotropic diffusion (smooths within regions, keeps edges).

    ``time_step`` defaults to the stable limit ``min(spacing) / 2^(ndim + 1)``.
    """
    image = as_image(image)
    if iterations < 1 or conductance <= 0:
        raise MedsegError(
            f"iterations must be >= 1 and conductance > 0 (got {iterations}, {conductance})"
        )
    limit = min(image.spacing) / 2 ** (image.ndim + 1)
    step = limit if time_step is None else time_step
    if not 0 < step <= limit * 1.0001:
        raise MedsegError(f"time_step must be within (0, {limit:g}] for this spacing (got {step})")
    out = sitk.CurvatureAnisotropicDiffusion(
        _float_sitk(image),
        timeStep=step,
        conductanceParameter=conductance,
        numberOfIterations=iterations,
    )
    return _back(image, out)


def noise_sigma(data: np.ndarray) -> float:
    """Robust Gaussian noise estimate: MAD of neighbour differences along every axis / sqrt(2).

    Differences cancel the smooth signal; the median ignores the few large ones
    at edges. (scikit-image's wavelet estimate would need PyWavelets.)
    """
    diffs = np.concatenate([np.diff(data, axis=a).ravel() for a in range(data.ndim)])
    mad = np.median(np.abs(diffs - np.median(diffs)))
    return float(1.4826 * mad / np.sqrt(2.0))


def nl_means(
    image: Image | np.ndarray,
    *,
    patch_size: int = 5,
    patch_distance: int = 6,
    h: float | None = None,
) -> Image:
    """Non-local means (scikit-image), patch sizes in voxels.

    The noise level is estimated from the image (:func:`noise_sigma`); ``h``
    defaults to 0.8 times it, as scikit-image recommends with ``fast_mode``.
    """
    from skimage.restoration import denoise_nl_means

    image = as_image(image)
    if patch_size < 1 or patch_distance < 1:
        raise MedsegError(
            f"patch_size and patch_distance must be >= 1 (got {patch_size}, {patch_distance})"
        )
    data = np.asarray(image.array, dtype=np.float32)
    sigma = noise_sigma(data)
    out = denoise_nl_means(
        data,
        patch_size=patch_size,
        patch_distance=patch_distance,
        h=0.8 * sigma if h is None else h,
        sigma=sigma,
        fast_mode=True,
        preserve_range=True,
    )
    return image.with_array(out.astype(np.float32))
