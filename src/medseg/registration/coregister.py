"""Rigid or affine alignment of one channel of a case to its first channel (multi-modal).

:func:`channel_aligner` makes the ``aligner`` that
:func:`medseg.preprocessing.coregister.coregister_dataset` calls for every channel after the
first. It starts from the scanner coordinates (identity: the headers are trusted as a
first guess), registers with Mattes mutual information (the channels are different
contrasts), and keeps the result only when it improves the metric over the identity;
otherwise the channel is resampled through its header alone. This module sits in
``registration``, above ``preprocessing``; :mod:`medseg.workflow` joins the two.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from medseg.errors import MedsegError
from medseg.io.files import to_sitk
from medseg.io.image import Image
from medseg.preprocessing.coregister import Aligner, Alignment, identity
from medseg.registration.classical import initial_transform, linear_parameters, register_linear

#: Alignment methods: a registration model, or "header" (resample through the headers only).
COREGISTRATION_METHODS = ("rigid", "affine", "header")
HISTOGRAM_BINS = 32


def mattes_metric(
    fixed: Image, moving: Image, transform: sitk.Transform, *, bins: int = HISTOGRAM_BINS
) -> float:
    """Mattes mutual information of ``moving`` through ``transform`` on ``fixed`` (lower is better)."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetInitialTransform(transform)
    f = sitk.Cast(to_sitk(fixed), sitk.sitkFloat32)
    m = sitk.Cast(to_sitk(moving), sitk.sitkFloat32)
    try:
        return float(reg.MetricEvaluate(f, m))
    except RuntimeError:  # too few overlapping samples: no alignment can be judged
        return float("inf")


def channel_aligner(
    method: str = "rigid",
    *,
    iterations: int = 200,
    shrink_factors: Sequence[int] = (2, 1),
    smoothing_sigmas: Sequence[float] = (1.0, 0.0),
    seed: int = 0,
) -> Aligner | None:
    """The aligner of ``method`` ("rigid", "affine"), or None for "header" (no registration).

    Parameters
    ----------
    method
        "rigid" (rotation and translation), "affine", or "header".
    iterations
        Optimizer iterations per pyramid level.
    shrink_factors, smoothing_sigmas
        The multi-resolution pyramid (voxels).
    seed
        Seed of the metric sampling.
    """
    if method not in COREGISTRATION_METHODS:
        raise MedsegError(
            f"unknown co-registration {method!r} (use one of {', '.join(COREGISTRATION_METHODS)})"
        )
    if method == "header":
        return None

    def align(fixed: Image, moving: Image) -> Alignment:
        start = initial_transform(fixed, moving, method=method, init="none")
        before = mattes_metric(fixed, moving, start)
        if not np.isfinite(before):
            raise MedsegError(
                "moving: the channel does not overlap channel 0 through its header; "
                "fix the origin or direction before co-registering"
            )
        result = register_linear(
            fixed,
            moving,
            method=method,
            metric="mattes",
            init=start,
            shrink_factors=shrink_factors,
            smoothing_sigmas=smoothing_sigmas,
            iterations=iterations,
            sampling_fraction=None,
            histogram_bins=HISTOGRAM_BINS,
            seed=seed,
        )
        after = mattes_metric(fixed, moving, result.transform)
        accepted = after < before
        return Alignment(
            transform=result.transform if accepted else identity(fixed.ndim),
            method=method,
            accepted=accepted,
            metric_before=before,
            metric_after=after,
            details={
                "registration": linear_parameters(result.transform),
                "iterations": result.iterations,
                "seconds": round(result.seconds, 3),
            },
        )

    return align
