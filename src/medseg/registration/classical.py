"""Classical registration on SimpleITK's framework (ImageRegistrationMethod, demons filters).

Methods: ``translation``, ``rigid`` (Euler), ``similarity``, ``affine``, ``bspline``
(free-form deformation after an affine stage) and ``demons`` (diffeomorphic demons
after an affine stage). Metrics: ``mse`` (mean squares), ``ncc`` (normalized
cross-correlation) and ``mattes`` (Mattes mutual information, multi-modal).
Multi-resolution pyramids, centred initialization (``geometry`` or ``moments``)
and optional fixed/moving masks. The result is an ITK transform (fixed -> moving
points) that :func:`write_transform` saves as ``.tfm`` or ``.h5``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medseg.errors import MedsegError
from medseg.imaging.atomic import atomic_path
from medseg.io.files import to_sitk
from medseg.io.image import Image
from medseg.registration.fields import (
    check_overlap,
    check_pair,
    compose,
    resample,
)

METHODS = ("translation", "rigid", "similarity", "affine", "bspline", "demons")
LINEAR = ("translation", "rigid", "similarity", "affine")
METRICS = ("mse", "ncc", "mattes")
INITS = ("geometry", "moments", "none")
TRANSFORM_SUFFIXES = (".tfm", ".txt", ".h5", ".hdf5", ".mat")


@dataclass(frozen=True)
class RegistrationResult:
    """A registration's transform (fixed -> moving points) and how it got there."""

    transform: sitk.Transform
    method: str
    metric: str
    metric_value: float | None
    iterations: int
    seconds: float
    stop_condition: str


def _linear_transform(method: str, ndim: int) -> sitk.Transform:
    if method == "translation":
        return sitk.TranslationTransform(ndim)
    if method == "rigid":
        return sitk.Euler2DTransform() if ndim == 2 else sitk.Euler3DTransform()
    if method == "similarity":
        return sitk.Similarity2DTransform() if ndim == 2 else sitk.Similarity3DTransform()
    return sitk.AffineTransform(ndim)


def _float(image: Image) -> sitk.Image:
    return sitk.Cast(to_sitk(image), sitk.sitkFloat32)


def _mask(mask: Image | None, name: str) -> sitk.Image | None:
    if mask is None:
        return None
    array = np.asarray(mask.array)
    if not np.any(array):
        raise MedsegError(f"{name}: the mask is empty (no nonzero voxel)")
    return to_sitk(mask.with_array((array != 0).astype(np.uint8)))


def initial_transform(
    fixed: Image, moving: Image, *, method: str = "rigid", init: str = "geometry"
) -> sitk.Transform:
    """A ``method``-type transform that aligns the centres (``geometry``) or centres of mass (``moments``).

    Rotation, scale and shear start at the identity, centred on the fixed image.
    """
    if init not in INITS:
        raise MedsegError(f"unknown initialization {init!r} (use one of {', '.join(INITS)})")
    ndim = fixed.ndim
    if init == "none":
        check_overlap(fixed, moving)
        tx = _linear_transform(method, ndim)
        if method != "translation":
            tx.SetCenter(tuple(float(c) for c in _centre_world(fixed)))
        return tx
    mode = (
        sitk.CenteredTransformInitializerFilter.GEOMETRY
        if init == "geometry"
        else sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    if method == "translation":
        # the initializer needs a centred transform; the translation it finds is the one we want
        euler = sitk.Euler2DTransform() if ndim == 2 else sitk.Euler3DTransform()
        euler = sitk.CenteredTransformInitializer(_float(fixed), _float(moving), euler, mode)
        return sitk.TranslationTransform(ndim, euler.GetTranslation())
    tx = _linear_transform(method, ndim)
    return sitk.CenteredTransformInitializer(_float(fixed), _float(moving), tx, mode)


def _centre_world(image: Image) -> np.ndarray:
    return image.index_to_world((np.asarray(image.shape, dtype=float) - 1) / 2)


def _sitk_seed(seed: int) -> int:
    # SimpleITK reads seed 0 as "seed from the wall clock" (sitkWallClock): shift by one
    # so that every seed, 0 included, gives a reproducible sample
    return int(seed) + 1


def _set_metric(reg: sitk.ImageRegistrationMethod, metric: str, bins: int) -> None:
    if metric == "mse":
        reg.SetMetricAsMeanSquares()
    elif metric == "ncc":
        reg.SetMetricAsCorrelation()
    elif metric == "mattes":
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    else:
        raise MedsegError(f"unknown metric {metric!r} (use one of {', '.join(METRICS)})")


def _pyramid(
    reg: sitk.ImageRegistrationMethod, shrink: Sequence[int], sigmas: Sequence[float]
) -> None:
    if len(shrink) != len(sigmas):
        raise MedsegError(
            f"shrink factors {tuple(shrink)} and smoothing sigmas {tuple(sigmas)} differ in length"
        )
    reg.SetShrinkFactorsPerLevel([int(s) for s in shrink])
    reg.SetSmoothingSigmasPerLevel([float(s) for s in sigmas])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()  # sigmas in voxels, like shrink factors


def _pyramid_for(image: Image, shrink: Sequence[int]) -> list[int]:
    """Drop shrink factors that would leave fewer than 8 voxels along an axis."""
    keep = [s for s in shrink if min(image.shape) // int(s) >= 8]
    return keep or [1]


def _run(reg: sitk.ImageRegistrationMethod, fixed: sitk.Image, moving: sitk.Image, what: str):
    try:
        return reg.Execute(fixed, moving)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "Description" in ln), lines[-1] if lines else "")
        raise MedsegError(
            f"moving: {what} registration failed ({detail.removeprefix('Description:').strip()[:160]}); "
            "the images may not overlap"
        ) from None


def _new_registration(
    fixed: Image,
    *,
    metric: str,
    histogram_bins: int,
    sampling_fraction: float | str | None,
    seed: int,
    fixed_mask: Image | None,
    moving_mask: Image | None,
) -> sitk.ImageRegistrationMethod:
    """A registration method with its metric, sampling, masks and linear interpolation set."""
    reg = sitk.ImageRegistrationMethod()
    _set_metric(reg, metric, histogram_bins)
    if sampling_fraction == "auto":
        sampling_fraction = None if fixed.ndim == 2 else 0.25
    if sampling_fraction is None:
        reg.SetMetricSamplingStrategy(reg.NONE)
    else:
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(float(sampling_fraction), _sitk_seed(seed))
    fm, mm = _mask(fixed_mask, "fixed mask"), _mask(moving_mask, "moving mask")
    if fm is not None:
        reg.SetMetricFixedMask(fm)
    if mm is not None:
        reg.SetMetricMovingMask(mm)
    reg.SetInterpolator(sitk.sitkLinear)
    return reg


def register_linear(
    fixed: Image,
    moving: Image,
    *,
    method: str = "rigid",
    metric: str = "mattes",
    init: str | sitk.Transform = "geometry",
    shrink_factors: Sequence[int] = (4, 2, 1),
    smoothing_sigmas: Sequence[float] = (2.0, 1.0, 0.0),
    iterations: int = 200,
    sampling_fraction: float | str | None = "auto",
    histogram_bins: int = 50,
    fixed_mask: Image | None = None,
    moving_mask: Image | None = None,
    min_step: float = 1e-4,
    seed: int = 0,
) -> RegistrationResult:
    """Translation, rigid, similarity or affine registration (regular-step gradient descent).

    Parameter scales come from physical shifts, so rotations and translations move
    voxels by comparable amounts. ``sampling_fraction=None`` uses every voxel; a
    fraction samples randomly with ``seed``; ``"auto"`` is every pixel in 2D and a
    quarter of the voxels in 3D (same Dice on hippocampus pairs, 4x faster).
    """
    if method not in LINEAR:
        raise MedsegError(f"unknown linear method {method!r} (use one of {', '.join(LINEAR)})")
    check_pair(fixed, moving)
    start = time.perf_counter()
    if isinstance(init, sitk.Transform):
        tx = type(init)(init)  # a copy: the optimizer works in place
    else:
        tx = initial_transform(fixed, moving, method=method, init=init)
    reg = _new_registration(
        fixed,
        metric=metric,
        histogram_bins=histogram_bins,
        sampling_fraction=sampling_fraction,
        seed=seed,
        fixed_mask=fixed_mask,
        moving_mask=moving_mask,
    )
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0,
        minStep=min_step,
        numberOfIterations=int(iterations),
        relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-8,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    shrink = _pyramid_for(fixed, shrink_factors)
    _pyramid(reg, shrink, list(smoothing_sigmas)[-len(shrink) :])
    reg.SetInitialTransform(tx, inPlace=True)
    counter = {"n": 0}
    reg.AddCommand(sitk.sitkIterationEvent, lambda: counter.__setitem__("n", counter["n"] + 1))
    _run(reg, _float(fixed), _float(moving), method)
    return RegistrationResult(
        transform=tx,
        method=method,
        metric=metric,
        metric_value=float(reg.GetMetricValue()),
        iterations=counter["n"],
        seconds=time.perf_counter() - start,
        stop_condition=reg.GetOptimizerStopConditionDescription(),
    )


def register_bspline(
    fixed: Image,
    moving: Image,
    *,
    metric: str = "mattes",
    init: str | sitk.Transform = "geometry",
    grid_spacing_mm: float | None = None,
    shrink_factors: Sequence[int] = (4, 2, 1),
    smoothing_sigmas: Sequence[float] = (2.0, 1.0, 0.0),
    iterations: int = 100,
    sampling_fraction: float | None = 0.2,
    histogram_bins: int = 50,
    fixed_mask: Image | None = None,
    moving_mask: Image | None = None,
    seed: int = 0,
) -> RegistrationResult:
    """Affine registration, then a B-spline free-form deformation on top (L-BFGS).

    The control grid is refined with the pyramid (coarse grid at the coarse level).
    ``grid_spacing_mm`` defaults to an eighth of the largest extent.
    """
    check_pair(fixed, moving)
    start = time.perf_counter()
    if isinstance(init, sitk.Transform):
        pre = init
    else:
        pre = register_linear(
            fixed,
            moving,
            method="affine",
            metric=metric,
            init=init,
            shrink_factors=shrink_factors,
            smoothing_sigmas=smoothing_sigmas,
            sampling_fraction=sampling_fraction,
            histogram_bins=histogram_bins,
            fixed_mask=fixed_mask,
            moving_mask=moving_mask,
            seed=seed,
        ).transform
    extent = np.asarray(fixed.shape) * np.asarray(fixed.spacing)
    spacing = grid_spacing_mm or float(extent.max()) / 8
    shrink = _pyramid_for(fixed, shrink_factors)
    # final mesh from the spacing; the coarse levels use 1/2, 1/4 ... of it
    mesh = [max(1, int(round(e / spacing / 2 ** (len(shrink) - 1)))) for e in extent]
    ffd = sitk.BSplineTransformInitializer(_float(fixed), mesh, order=3)
    reg = _new_registration(
        fixed,
        metric=metric,
        histogram_bins=histogram_bins,
        sampling_fraction=sampling_fraction,
        seed=seed,
        fixed_mask=fixed_mask,
        moving_mask=moving_mask,
    )
    reg.SetOptimizerAsLBFGS2(
        solutionAccuracy=1e-2, numberOfIterations=int(iterations), deltaConvergenceTolerance=0.01
    )
    _pyramid(reg, shrink, list(smoothing_sigmas)[-len(shrink) :])
    reg.SetMovingInitialTransform(pre)
    reg.SetInitialTransformAsBSpline(
        ffd, inPlace=True, scaleFactors=[2**i for i in range(len(shrink))]
    )
    counter = {"n": 0}
    reg.AddCommand(sitk.sitkIterationEvent, lambda: counter.__setitem__("n", counter["n"] + 1))
    _run(reg, _float(fixed), _float(moving), "B-spline")
    return RegistrationResult(
        transform=compose(pre, ffd),
        method="bspline",
        metric=metric,
        metric_value=float(reg.GetMetricValue()),
        iterations=counter["n"],
        seconds=time.perf_counter() - start,
        stop_condition=reg.GetOptimizerStopConditionDescription(),
    )


def register_demons(
    fixed: Image,
    moving: Image,
    *,
    metric: str = "mattes",
    init: str | sitk.Transform = "geometry",
    shrink_factors: Sequence[int] = (4, 2, 1),
    iterations: Sequence[int] | int = (100, 60, 30),
    smoothing_sigma: float = 1.5,
    fixed_mask: Image | None = None,
    moving_mask: Image | None = None,
    seed: int = 0,
) -> RegistrationResult:
    """Affine registration (``metric``), then diffeomorphic demons on the affinely resampled image.

    Demons compares intensities directly, so it is mono-modal: the moving image is
    histogram-matched to the fixed one first. The field is refined over a pyramid.
    The transform is ``affine o displacement`` (the field lives on the fixed grid).
    """
    check_pair(fixed, moving)
    start = time.perf_counter()
    if isinstance(init, sitk.Transform):
        pre = init
    else:
        pre = register_linear(
            fixed,
            moving,
            method="affine",
            metric=metric,
            init=init,
            shrink_factors=shrink_factors,
            fixed_mask=fixed_mask,
            moving_mask=moving_mask,
            seed=seed,
        ).transform
    f = _float(fixed)
    m = resample(_float(moving), f, pre, pixel_type=sitk.sitkFloat32)
    m = sitk.HistogramMatching(
        m, f, numberOfHistogramLevels=256, numberOfMatchPoints=15, thresholdAtMeanIntensity=True
    )
    shrink = _pyramid_for(fixed, shrink_factors)
    its = (
        [int(iterations)] * len(shrink)
        if isinstance(iterations, int)
        else list(iterations)[-len(shrink) :]
    )
    field = None
    total = 0
    for factor, n in zip(shrink, its):
        fs = (
            sitk.Shrink(
                sitk.SmoothingRecursiveGaussian(f, 0.5 * factor * min(fixed.spacing)),
                [factor] * fixed.ndim,
            )
            if factor > 1
            else f
        )
        ms = (
            sitk.Shrink(
                sitk.SmoothingRecursiveGaussian(m, 0.5 * factor * min(fixed.spacing)),
                [factor] * fixed.ndim,
            )
            if factor > 1
            else m
        )
        demons = sitk.DiffeomorphicDemonsRegistrationFilter()
        demons.SetNumberOfIterations(n)
        demons.SetStandardDeviations(smoothing_sigma)
        demons.SetSmoothDisplacementField(True)
        if field is None:
            field = demons.Execute(fs, ms)
        else:
            init_field = sitk.Resample(
                field, fs, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID()
            )
            field = demons.Execute(fs, ms, init_field)
        total += demons.GetElapsedIterations()
    if field.GetSize() != f.GetSize():
        field = sitk.Resample(field, f, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID())
    field = sitk.Cast(field, sitk.sitkVectorFloat64)
    disp = sitk.DisplacementFieldTransform(field)
    return RegistrationResult(
        transform=compose(pre, disp),
        method="demons",
        metric=metric,
        metric_value=float(demons.GetMetric()),
        iterations=total,
        seconds=time.perf_counter() - start,
        stop_condition=f"{total} demons iterations over {len(shrink)} level(s)",
    )


def register(
    fixed: Image,
    moving: Image,
    *,
    method: str = "rigid",
    metric: str = "mattes",
    init: str = "geometry",
    fixed_mask: Image | None = None,
    moving_mask: Image | None = None,
    shrink_factors: Sequence[int] = (4, 2, 1),
    seed: int = 0,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` with one of :data:`METHODS` (defaults for the rest)."""
    if method not in METHODS:
        raise MedsegError(f"unknown method {method!r} (use one of {', '.join(METHODS)})")
    common = dict(
        metric=metric,
        init=init,
        fixed_mask=fixed_mask,
        moving_mask=moving_mask,
        shrink_factors=shrink_factors,
        seed=seed,
    )
    if method in LINEAR:
        return register_linear(fixed, moving, method=method, **common)
    if method == "bspline":
        return register_bspline(fixed, moving, **common)
    return register_demons(fixed, moving, **common)


def write_transform(
    transform: sitk.Transform, path: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Save an ITK transform atomically (``.tfm``/``.txt`` text, ``.h5`` HDF5, ``.mat``).

    Displacement fields need ``.h5``. 3D Slicer, ANTs and SimpleITK read these files.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TRANSFORM_SUFFIXES:
        raise MedsegError(
            f"{path}: unknown transform format (use one of {', '.join(TRANSFORM_SUFFIXES)})"
        )
    if path.exists() and not overwrite:
        raise MedsegError(f"{path}: already exists (use --overwrite to replace it)")
    if suffix in (".tfm", ".txt", ".mat") and _has_field(transform):
        raise MedsegError(f"{path}: a displacement-field transform needs an .h5 file")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        sitk.WriteTransform(transform, str(tmp))
    return path


def read_transform(path: str | os.PathLike) -> sitk.Transform:
    """Read an ITK transform file (the result of :func:`write_transform`, or ANTs/Slicer output)."""
    path = Path(path)
    if not path.exists():
        raise MedsegError(f"{path}: file not found")
    try:
        return sitk.ReadTransform(str(path))
    except RuntimeError as exc:
        raise MedsegError(
            f"{path}: cannot read transform ({str(exc).strip().splitlines()[-1][:160]})"
        ) from None


def _has_field(transform: sitk.Transform) -> bool:
    if (
        isinstance(transform, sitk.CompositeTransform)
        or transform.GetName() == "CompositeTransform"
    ):
        composite = sitk.CompositeTransform(transform)
        return any(
            _has_field(composite.GetNthTransform(i))
            for i in range(composite.GetNumberOfTransforms())
        )
    return "DisplacementField" in transform.GetName()


def linear_parameters(transform: sitk.Transform) -> dict:
    """Translation, rotation (degrees, 2D angle or 3D Euler), scale of a linear transform, for reports."""
    t = transform
    if t.GetName() == "CompositeTransform":
        c = sitk.CompositeTransform(t)
        t = c.GetNthTransform(0)
    name = t.GetName()
    out: dict = {"type": name, "parameters": list(t.GetParameters())}
    if name.startswith("Translation"):
        out["translation"] = list(t.GetParameters())
    elif name.startswith(("Euler2D", "Similarity2D")):
        t2 = (
            sitk.Similarity2DTransform(t)
            if name.startswith("Similarity")
            else sitk.Euler2DTransform(t)
        )
        out["rotation_deg"] = float(np.degrees(t2.GetAngle()))
        out["translation"] = list(t2.GetTranslation())
        out["center"] = list(t2.GetCenter())
        if name.startswith("Similarity"):
            out["scale"] = float(t2.GetScale())
    elif name.startswith("Euler3D"):
        t3 = sitk.Euler3DTransform(t)
        out["rotation_deg"] = [
            float(np.degrees(a)) for a in (t3.GetAngleX(), t3.GetAngleY(), t3.GetAngleZ())
        ]
        out["translation"] = list(t3.GetTranslation())
    elif name.startswith(("Affine", "Similarity3D")):
        a = sitk.AffineTransform(t.GetDimension())
        a.SetMatrix(t.GetMatrix())
        out["matrix"] = list(t.GetMatrix())
        out["translation"] = list(t.GetTranslation())
    return out
