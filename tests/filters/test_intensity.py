"""Image filters: physical sizes, noise reduction, N4 on a known bias field, CLAHE, matching, windows."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.filters import (
    CT_WINDOWS,
    clahe,
    histogram_match,
    normalize,
    window,
)
from medseg.io import Image


def test_clahe_in_2d_and_3d_with_kernel_in_mm():
    rng = np.random.default_rng(4)
    for shape, spacing in [((64, 48), (0.5, 0.5)), ((32, 32, 16), (1.0, 1.0, 2.0))]:
        low_contrast = 100 + 5 * rng.random(shape)
        out = clahe(Image(low_contrast.astype(np.float32), spacing), kernel_mm=8.0)
        assert out.array.min() >= 0 and out.array.max() <= 1
        assert out.array.std() > (low_contrast - 100).std() / 5  # contrast stretched
    with pytest.raises(MedsegError, match="clip_limit"):
        clahe(np.ones((8, 8)), clip_limit=0)


def test_histogram_matching_maps_quantiles_to_the_reference():
    rng = np.random.default_rng(5)
    source = Image(rng.gamma(2.0, 10.0, (40, 40, 10)).astype(np.float32), (1.0, 1.0, 1.0))
    reference = Image(rng.normal(500, 50, (30, 30, 8)).astype(np.float32), (1.0, 1.0, 2.0))
    out = histogram_match(source, reference, threshold_at_mean=False)
    q = [10, 50, 90]
    np.testing.assert_allclose(
        np.percentile(out.array, q), np.percentile(reference.array, q), rtol=0.03
    )
    assert out.same_geometry(source)


def test_ct_window_presets():
    hu = Image(
        np.array([[-1200, -600, 0, 40, 1300, 3000]], np.float32).T @ np.ones((1, 2), np.float32),
        (1.0, 1.0),
    )
    lung = window(hu, preset="lung").array[:, 0]
    np.testing.assert_allclose(lung, [0.1, 0.5, 0.9, 1390 / 1500, 1, 1], atol=1e-6)
    brain = window(hu, preset="brain", rescale=False).array[:, 0]
    np.testing.assert_allclose(brain, [0, 0, 0, 40, 80, 80])
    assert {"brain", "lung", "abdomen", "bone"} <= set(CT_WINDOWS)
    with pytest.raises(MedsegError, match="unknown window preset"):
        window(hu, preset="heart")


def test_normalize():
    data = np.random.default_rng(6).normal(50, 5, (30, 30)).astype(np.float32)
    z = normalize(data, method="zscore").array
    assert z.mean() == pytest.approx(0, abs=1e-4) and z.std() == pytest.approx(1, rel=1e-3)
    p = normalize(data, method="percentile").array
    assert p.min() == 0 and p.max() == 1
