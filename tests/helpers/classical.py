"""Helpers shared by the tests in tests/classical/."""

from __future__ import annotations

import numpy as np

from medseg.io import Image


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def blob(shape, spacing, radius_mm, rng, *, inside=180.0, outside=100.0, noise=10.0):
    """A noisy bright ball (disk in 2D) of ``radius_mm`` centred in the image."""
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    r2 = sum(((g - (n - 1) / 2) * s) ** 2 for g, n, s in zip(grids, shape, spacing))
    truth = r2 <= radius_mm**2
    data = outside + (inside - outside) * truth + rng.normal(0, noise, shape)
    return Image(data.astype(np.float32), spacing), truth
