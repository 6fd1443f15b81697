"""The late-fusion network: one encoder per modality, any non-empty subset of modalities."""

from __future__ import annotations

import itertools

import pytest
import torch

from medseg.models import create_model
from medseg.models.late_fusion import LateFusionUNet, channel_availability


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(in_channels: int = 3, ndim: int = 3) -> LateFusionUNet:
    torch.manual_seed(0)
    return create_model(
        "late_fusion",
        ndim=ndim,
        in_channels=in_channels,
        num_classes=2,
        features=(4, 8),
        strides=[(1,) * ndim, (2,) * ndim],
        kernel_sizes=[(3,) * ndim] * 2,
        deep_supervision=False,
    ).eval()


def subsets(n: int) -> list[tuple[int, ...]]:
    return [s for k in range(1, n + 1) for s in itertools.combinations(range(n), k)]


def test_one_encoder_per_modality():
    model = tiny(3)
    assert len(model.encoders) == 3
    assert model.encoders[0][0][0][0].in_channels == 1


def test_every_non_empty_subset_predicts_and_ignores_the_missing_channels():
    model = tiny(3)
    x = torch.randn(1, 3, 16, 16, 8)
    noise = torch.randn_like(x) * 5
    for subset in subsets(3):
        keep = torch.zeros(1, 3, dtype=torch.bool)
        keep[0, list(subset)] = True
        with torch.no_grad():
            zero_filled = x * keep[:, :, None, None, None]
            out = model(zero_filled)
            # explicit availability: the missing channels' values must not matter
            other = model(torch.where(keep[:, :, None, None, None], x, noise), keep)
        assert out.shape == (1, 2, 16, 16, 8) and torch.isfinite(out).all()
        torch.testing.assert_close(out, other, rtol=1e-5, atol=1e-5)


def test_single_modality_fusion_is_that_modality_with_zero_variance():
    """With one modality the mean is its features and the variance is zero (HeMIS)."""
    model = tiny(2)
    x = torch.randn(1, 2, 16, 16, 8)
    x[:, 1] = 0
    with torch.no_grad():
        fused = model.fused_features(x)
        h = x[:, :1]
        for level, stage in enumerate(model.encoders[0]):
            h = stage(h)
            expected = model.fusion[level](torch.cat((h, torch.zeros_like(h)), dim=1))
            torch.testing.assert_close(fused[level], expected, rtol=1e-5, atol=1e-5)


def test_samples_of_a_batch_fuse_their_own_subsets():
    model = tiny(2)
    a = torch.randn(1, 2, 16, 16, 8)
    b = torch.randn(1, 2, 16, 16, 8)
    b[:, 0] = 0
    with torch.no_grad():
        batch = model(torch.cat((a, b)))
        torch.testing.assert_close(batch[0:1], model(a), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batch[1:2], model(b), rtol=1e-5, atol=1e-5)


def test_availability_and_an_all_zero_input():
    x = torch.randn(2, 2, 8, 8)
    x[1, 0] = 0
    assert channel_availability(x).tolist() == [[True, True], [False, True]]
    model = tiny(2, ndim=2)
    with torch.no_grad():
        out = model(torch.zeros(1, 2, 16, 16))
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="input channels"):
        model(torch.randn(1, 3, 16, 16))
