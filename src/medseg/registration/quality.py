"""Deformation quality: Jacobian determinant, folding, std of log|J|, inverse consistency."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from medseg.io.image import Image
from medseg.registration.fields import compose, field_to_transform, transform_to_field


def jacobian_determinant(transform: sitk.Transform, grid: Image) -> Image:
    """The Jacobian determinant of ``transform`` at every voxel of ``grid`` (1 = volume kept).

    Central differences of the displacement in world coordinates, so images with
    any direction matrix are handled (``sitk.DisplacementFieldJacobianDeterminant``
    differentiates along index axes and gives the same values for identity directions;
    the tests compare the two).
    """
    field = transform_to_field(transform, grid)
    return grid.with_array(jacobian_of_field(field, grid).astype(np.float32))


def jacobian_of_field(field: np.ndarray, grid: Image) -> np.ndarray:
    """det(I + dU/dx) of a world-mm displacement field ``(*shape, D)`` on ``grid``."""
    ndim = grid.ndim
    # dU/dy with y = spacing * index along the axes, then dU/dx = dU/dy D^T (x = o + D y)
    grads = np.stack(
        [np.stack(np.gradient(field[..., c], *grid.spacing), axis=-1) for c in range(ndim)],
        axis=-2,
    )  # (*shape, component, axis)
    du_dx = grads @ grid.direction_matrix.T
    return np.linalg.det(np.eye(ndim) + du_dx)


def jacobian_statistics(jacobian: Image | np.ndarray, mask: np.ndarray | None = None) -> dict:
    """Folding percentage (|J| <= 0), std of log|J| (over |J| > 0), min, max, mean of |J|."""
    j = np.asarray(jacobian.array if isinstance(jacobian, Image) else jacobian, dtype=np.float64)
    if mask is not None:
        j = j[np.asarray(mask, dtype=bool)]
    j = j.ravel()
    positive = j[j > 0]
    return {
        "folding_percent": float(100.0 * np.mean(j <= 0)) if j.size else float("nan"),
        "folded_voxels": int(np.sum(j <= 0)),
        "std_log_jacobian": float(np.std(np.log(positive))) if positive.size else float("nan"),
        "jacobian_min": float(j.min()) if j.size else float("nan"),
        "jacobian_max": float(j.max()) if j.size else float("nan"),
        "jacobian_mean": float(j.mean()) if j.size else float("nan"),
    }


def invert_transform(transform: sitk.Transform, *, iterations: int = 50) -> sitk.Transform | None:
    """The inverse transform: exact for linear parts, ``sitk.InvertDisplacementField`` for fields.

    B-spline parts are converted to a displacement field on their own grid first.
    Returns None when a part cannot be inverted.
    """
    name = transform.GetName()
    if name == "CompositeTransform":
        c = sitk.CompositeTransform(transform)
        parts = [
            invert_transform(c.GetNthTransform(i), iterations=iterations)
            for i in range(c.GetNumberOfTransforms())
        ]
        if any(p is None for p in parts):
            return None
        return compose(*parts[::-1])
    if "DisplacementField" in name or "BSpline" in name:
        if "BSpline" in name:
            b = sitk.BSplineTransform(transform)
            coeff = b.GetCoefficientImages()[0]
            ref = sitk.Image(coeff.GetSize(), sitk.sitkFloat32)
            ref.CopyInformation(coeff)
            # a grid of about the image's extent, 2 voxels per control point spacing
            size = [max(8, 2 * s) for s in coeff.GetSize()]
            spacing = [sp * s / z for sp, s, z in zip(coeff.GetSpacing(), coeff.GetSize(), size)]
            field = sitk.TransformToDisplacementField(
                transform,
                sitk.sitkVectorFloat64,
                size,
                coeff.GetOrigin(),
                spacing,
                coeff.GetDirection(),
            )
        else:
            field = sitk.DisplacementFieldTransform(transform).GetDisplacementField()
        inverse = sitk.InvertDisplacementField(
            field,
            maximumNumberOfIterations=iterations,
            maxErrorToleranceThreshold=0.01,
            meanErrorToleranceThreshold=0.0001,
            enforceBoundaryCondition=True,
        )
        return sitk.DisplacementFieldTransform(inverse)
    try:
        return transform.GetInverse()
    except RuntimeError:
        return None


def inverse_consistency(
    forward: sitk.Transform, inverse: sitk.Transform, grid: Image, *, mask: np.ndarray | None = None
) -> dict:
    """How far ``inverse(forward(x))`` lands from ``x`` over ``grid`` (mm): mean, 95th pct, max."""
    residual = transform_to_field(compose(inverse, forward), grid)
    err = np.linalg.norm(residual, axis=-1)
    if mask is not None:
        err = err[np.asarray(mask, dtype=bool)]
    return {
        "inverse_consistency_mean_mm": float(err.mean()),
        "inverse_consistency_p95_mm": float(np.percentile(err, 95)),
        "inverse_consistency_max_mm": float(err.max()),
    }


def deformation_quality(
    transform: sitk.Transform,
    grid: Image,
    *,
    inverse: sitk.Transform | None = None,
    mask: np.ndarray | None = None,
) -> tuple[dict, Image]:
    """Jacobian statistics and inverse consistency (the given inverse, else a numerical one).

    Returns the statistics and the Jacobian determinant map.
    """
    jac = jacobian_determinant(transform, grid)
    stats = jacobian_statistics(jac, mask)
    inv = inverse if inverse is not None else invert_transform(transform)
    if inv is not None:
        stats.update(inverse_consistency(transform, inv, grid, mask=mask))
        stats["inverse"] = "given" if inverse is not None else "numerical"
    return stats, jac


__all__ = [
    "deformation_quality",
    "field_to_transform",
    "inverse_consistency",
    "invert_transform",
    "jacobian_determinant",
    "jacobian_of_field",
    "jacobian_statistics",
]
