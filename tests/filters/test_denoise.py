"""Image filters: physical sizes, noise reduction, N4 on a known bias field, CLAHE, matching, windows."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.filters import step_image

from medseg.filters import (
    anisotropic_diffusion,
    bilateral,
    gaussian,
    median,
    nl_means,
)
from medseg.filters.denoise import noise_sigma
from medseg.io import Image


@pytest.mark.parametrize("spacing", [(0.5, 1.0, 2.0), (2.0, 1.0, 0.5)])
def test_gaussian_sigma_is_in_mm(spacing):
    impulse = np.zeros((41, 41, 41), np.float32)
    impulse[20, 20, 20] = 1.0
    out = gaussian(Image(impulse, spacing), sigma_mm=2.0).array
    assert out.sum() == pytest.approx(1.0, rel=0.02)
    x = np.arange(41) - 20
    for axis, s in enumerate(spacing):
        profile = out.sum(axis=tuple(a for a in range(3) if a != axis))
        std_mm = np.sqrt((profile * x**2).sum() / profile.sum()) * s
        assert std_mm == pytest.approx(2.0, rel=0.1)


def test_denoisers_reduce_noise_and_keep_the_edge():
    rng = np.random.default_rng(0)
    clean, image = step_image((40, 30, 12), (1.0, 1.0, 2.0), rng)
    before = np.abs(image.array - clean).mean()
    results = {
        "gaussian": gaussian(image, sigma_mm=1.0),
        "median": median(image, radius_mm=1.0),
        "bilateral": bilateral(image, domain_sigma_mm=2.0, range_sigma=30.0),
        "diffusion": anisotropic_diffusion(image, iterations=10),
        "nl_means": nl_means(image),
    }
    for name, out in results.items():
        assert out.same_geometry(image) and out.array.dtype == np.float32, name
        assert np.abs(out.array - clean).mean() < 0.75 * before, name
    # Edge-preserving filters keep the step sharper than a Gaussian of similar strength.
    edge = slice(18, 22)
    err = {k: np.abs(v.array[edge] - clean[edge]).mean() for k, v in results.items()}
    assert err["bilateral"] < err["gaussian"] and err["nl_means"] < err["gaussian"]


def test_median_removes_salt_and_pepper_in_2d():
    rng = np.random.default_rng(1)
    clean = np.full((50, 40), 100.0, np.float32)
    noisy = clean.copy()
    spots = rng.random(clean.shape) < 0.05
    noisy[spots] = 255
    out = median(Image(noisy, (0.5, 0.5)), radius_mm=0.5).array
    assert np.abs(out - clean).max() == 0


def test_noise_sigma_estimate():
    rng = np.random.default_rng(2)
    _, image = step_image((60, 60), (1.0, 1.0), rng, noise=7.0)
    assert noise_sigma(image.array) == pytest.approx(7.0, rel=0.1)
