"""N4 bias-field correction (SimpleITK), run on a shrunk copy and applied at full resolution."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from medseg.classical.common import as_image, as_mask
from medseg.errors import MedsegError
from medseg.io.files import from_sitk, to_sitk
from medseg.io.image import Image

__all__ = ["n4_bias_correction"]


def n4_bias_correction(
    image: Image | np.ndarray,
    *,
    mask: Image | np.ndarray | None = None,
    shrink: int = 2,
    iterations: tuple[int, ...] = (50, 50, 30),
    control_points: int = 4,
    return_field: bool = False,
) -> Image | tuple[Image, Image]:
    """Remove a smooth multiplicative intensity bias (MR inhomogeneity) with N4.

    Parameters
    ----------
    image
        2D or 3D image with positive intensities inside the mask.
    mask
        Where to fit the field (default: Otsu foreground, as ANTs does).
    shrink
        Fit on an image shrunk by this factor per axis (faster); the field is
        evaluated on the full grid.
    iterations
        Iterations per fitting level (one level per entry).
    control_points
        B-spline control points per axis at the first level (at least 4 for cubic splines).
    return_field
        Also return the estimated bias field.

    Returns
    -------
    Image or (Image, Image)
        The corrected float32 image (``image / field``), and the field when asked.
    """
    image = as_image(image)
    if shrink < 1 or not iterations or min(iterations) < 1 or control_points < 4:
        raise MedsegError(
            f"N4 needs shrink >= 1, iterations >= 1 per level and control_points >= 4 "
            f"(got {shrink}, {iterations}, {control_points})"
        )
    data = np.asarray(image.array, dtype=np.float32)
    fit_mask = as_mask(mask, image)
    full = to_sitk(image.with_array(data))
    if fit_mask is None:
        mask_sitk = sitk.OtsuThreshold(full, 0, 1, 200)
    else:
        mask_sitk = to_sitk(image.with_array(fit_mask.astype(np.uint8)))
    if np.any(data[sitk.GetArrayViewFromImage(mask_sitk).T.astype(bool)] <= 0):
        # N4 works on log intensities; zero or negative voxels inside the mask break it.
        raise MedsegError("N4 needs positive intensities inside the mask (shift or mask the image)")
    factors = [shrink if n // shrink >= 4 else 1 for n in image.shape]
    small = sitk.Shrink(full, factors)
    small_mask = sitk.Shrink(mask_sitk, factors)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations(list(iterations))
    corrector.SetNumberOfControlPoints([control_points] * image.ndim)
    corrector.Execute(small, small_mask)
    log_field = corrector.GetLogBiasFieldAsImage(full)
    field = np.exp(from_sitk(log_field).array).astype(np.float32)
    corrected = image.with_array((data / field).astype(np.float32))
    return (corrected, image.with_array(field)) if return_field else corrected
