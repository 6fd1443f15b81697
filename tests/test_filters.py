"""Image filters: physical sizes, noise reduction, N4 on a known bias field, CLAHE, matching, windows."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.cli.main import main
from medseg.errors import MedsegError
from medseg.filters import (
    CT_WINDOWS,
    anisotropic_diffusion,
    apply_filters,
    bilateral,
    clahe,
    gaussian,
    histogram_match,
    median,
    n4_bias_correction,
    nl_means,
    normalize,
    window,
)
from medseg.filters.denoise import noise_sigma
from medseg.io import Image, read_image, write_image


def step_image(shape, spacing, rng, noise=10.0):
    """Two flat halves (100 | 200) along the first axis, plus Gaussian noise."""
    clean = np.full(shape, 100.0)
    clean[shape[0] // 2 :] = 200.0
    return clean, Image((clean + rng.normal(0, noise, shape)).astype(np.float32), spacing)


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


def test_filter_parameters_are_checked():
    image = Image(np.ones((10, 10), np.float32), (1.0, 1.0))
    with pytest.raises(MedsegError, match="sigma_mm"):
        gaussian(image, sigma_mm=0)
    with pytest.raises(MedsegError, match="time_step"):
        anisotropic_diffusion(image, time_step=1.0)
    with pytest.raises(MedsegError, match="empty"):
        gaussian(np.zeros((0, 4)))
    with pytest.raises(MedsegError, match="unknown filter"):
        apply_filters(image, ["sharpen"])
    with pytest.raises(MedsegError, match="unexpected keyword"):
        apply_filters(image, [{"name": "gaussian", "radius": 2}])


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


def test_cli_filter_file_and_folder(tmp_path, capsys):
    rng = np.random.default_rng(7)
    _, image = step_image((30, 20), (0.5, 0.5), rng)
    for name in ("a", "b"):
        write_image(
            image.with_array(np.clip(image.array, 0, 255).astype(np.uint8)),
            tmp_path / "in" / f"{name}.png",
        )
    assert (
        main(
            [
                "filter",
                "median",
                str(tmp_path / "in"),
                "-o",
                str(tmp_path / "out"),
                "--cast",
                "uint8",
            ]
        )
        == 0
    )
    out = read_image(tmp_path / "out" / "a.png")
    assert out.array.dtype == np.uint8 and out.spacing == (0.5, 0.5)
    # Without a cast, float results from PNG inputs go to NIfTI in a folder.
    assert (
        main(
            [
                "filter",
                "gaussian",
                str(tmp_path / "in"),
                "-o",
                str(tmp_path / "f"),
                "-p",
                "sigma_mm=1",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["a.nii.gz", "b.nii.gz"]
    ref = tmp_path / "in" / "b.png"
    target = tmp_path / "m.nii.gz"
    assert (
        main(
            [
                "filter",
                "histogram_match",
                str(tmp_path / "in" / "a.png"),
                "-o",
                str(target),
                "--reference",
                str(ref),
            ]
        )
        == 0
    )
    assert (
        main(["filter", "window", str(tmp_path / "in" / "a.png"), "-o", str(tmp_path / "w.nii.gz")])
        == 2
    )
    assert "preset, or both level and width" in capsys.readouterr().err
