"""Registration: classical recovery by construction, fields, quality, labels, transforms, atlases, learned."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.io import Image
from medseg.registration.quality import (
    deformation_quality,
    jacobian_determinant,
    jacobian_of_field,
    jacobian_statistics,
)


def test_jacobian_matches_simpleitk_and_known_scalings():
    grid = Image(np.zeros((20, 22, 18), np.float32), (1.0, 2.0, 1.5))
    scale = sitk.ScaleTransform(3, (1.1, 0.9, 1.2))
    jac = jacobian_determinant(scale, grid)
    assert np.allclose(jac.array, 1.1 * 0.9 * 1.2, atol=1e-5)
    rng = np.random.default_rng(0)
    field = rng.normal(0, 0.3, grid.shape + (3,))
    ours = jacobian_of_field(field, grid)
    f = sitk.GetImageFromArray(field.transpose(2, 1, 0, 3).copy(), isVector=True)
    f.SetSpacing(grid.spacing)
    ref = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(f)).transpose(2, 1, 0)
    inner = (slice(1, -1),) * 3  # borders: one-sided differences differ by convention
    np.testing.assert_allclose(ours[inner], ref[inner], atol=1e-4)
    stats = jacobian_statistics(np.array([-0.5, 0.0, 1.0, 2.0]))
    assert stats["folding_percent"] == 50.0
    assert stats["std_log_jacobian"] == pytest.approx(np.std(np.log([1.0, 2.0])))


def test_jacobian_handles_flipped_directions():
    flipped = Image(
        np.zeros((16, 16, 12), np.float32), (1.0, 1.0, 2.0), direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1)
    )
    t = sitk.AffineTransform(3)
    t.SetMatrix((1.2, 0.1, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.8))
    assert np.allclose(jacobian_determinant(t, flipped).array, 1.2 * 0.8, atol=1e-5)


def test_affine_has_exact_inverse_consistency():
    grid = Image(np.zeros((12, 12), np.float32), (1.0, 1.0))
    t = sitk.Euler2DTransform((5.0, 5.0), 0.3, (1.0, 2.0))
    stats, _ = deformation_quality(t, grid)
    assert stats["inverse_consistency_max_mm"] < 1e-9
    assert stats["folding_percent"] == 0
