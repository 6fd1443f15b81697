"""Helpers shared by the tests in tests/filters/."""

from __future__ import annotations

import numpy as np

from medseg.io import Image


def step_image(shape, spacing, rng, noise=10.0):
    """Two flat halves (100 | 200) along the first axis, plus Gaussian noise."""
    clean = np.full(shape, 100.0)
    clean[shape[0] // 2 :] = 200.0
    return clean, Image((clean + rng.normal(0, noise, shape)).astype(np.float32), spacing)
