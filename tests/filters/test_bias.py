"""Image filters: physical sizes, noise reduction, N4 on a known bias field, CLAHE, matching, windows."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.filters import (
    n4_bias_correction,
)
from medseg.io import Image


@pytest.mark.parametrize("ndim", [2, 3])
def test_n4_reduces_a_multiplicative_bias_field(ndim):
    rng = np.random.default_rng(3)
    shape = (64, 64) if ndim == 2 else (40, 40, 24)
    spacing = (1.0,) * ndim
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radius = sum(g**2 for g in grids)
    body = radius < 0.7
    tissue = np.where(body, 100.0, 5.0)
    bias = np.exp(0.35 * grids[0] + 0.25 * grids[1])  # smooth, up to ~1.8x across the image
    image = Image((tissue * bias + rng.normal(0, 1, shape)).astype(np.float32), spacing)
    cv = lambda a: a[body].std() / a[body].mean()  # noqa: E731
    corrected, field = n4_bias_correction(image, shrink=2, return_field=True)
    assert cv(image.array) > 0.15
    assert cv(corrected.array) < 0.5 * cv(image.array)
    assert corrected.same_geometry(image) and field.array.shape == shape


def test_n4_rejects_non_positive_intensities():
    data = np.full((20, 20), -5.0, np.float32)
    with pytest.raises(MedsegError, match="positive"):
        n4_bias_correction(data, mask=np.ones((20, 20)))
