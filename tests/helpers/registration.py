"""Helpers shared by the tests in tests/registration/."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from medseg.io import Image
from medseg.io.files import from_sitk, to_sitk


def blobs(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A smooth asymmetric image: a few Gaussian blobs of different sizes and brightness."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij")
    out = np.zeros(shape)
    for _ in range(6):
        c = [rng.uniform(0.25, 0.75) * s for s in shape]
        r = rng.uniform(0.06, 0.15) * min(shape)
        out += rng.uniform(50, 200) * np.exp(
            -sum((g - ci) ** 2 for g, ci in zip(grids, c)) / (2 * r * r)
        )
    return out.astype(np.float32)


def moved(fixed: Image, s: sitk.Transform) -> Image:
    """moving(y) = fixed(S(y)): the registration should find T = S^-1."""
    out = sitk.Resample(to_sitk(fixed), to_sitk(fixed), s, sitk.sitkBSpline, 0.0, sitk.sitkFloat32)
    return from_sitk(out)
