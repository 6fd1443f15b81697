"""Classical methods: golden values from scikit-image and SimpleITK, ground truth by construction."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.classical import dice

from medseg.classical import (
    fuzzy_c_means,
)
from medseg.errors import MedsegError
from medseg.io import Image


def three_classes(shape, rng, noise):
    truth = np.zeros(shape, np.uint8)
    truth[shape[0] // 3 : 2 * shape[0] // 3] = 1
    truth[2 * shape[0] // 3 :] = 2
    means = np.array([60.0, 110.0, 160.0])
    return means, truth, means[truth] + rng.normal(0, noise, shape)


@pytest.mark.parametrize("shape", [(60, 60), (30, 30, 18)], ids=["2d", "3d"])
def test_fcm_recovers_known_means_within_one_percent(shape):
    means, truth, data = three_classes(shape, np.random.default_rng(0), noise=5)
    result = fuzzy_c_means(Image(data, (1.0,) * len(shape)), classes=3, m=2.0)
    np.testing.assert_allclose(result.centers, means, rtol=0.01)
    assert result.converged
    np.testing.assert_allclose(result.memberships.sum(axis=0), 1.0, atol=1e-5)
    assert (result.labels.array == truth + 1).mean() > 0.99


@pytest.mark.parametrize("shape", [(64, 64), (32, 32, 24)], ids=["2d", "3d"])
def test_spatial_fcm_beats_plain_fcm_on_noise(shape):
    _, truth, data = three_classes(shape, np.random.default_rng(1), noise=25)
    image = Image(data, (1.0,) * len(shape))
    plain = fuzzy_c_means(image, classes=3).labels.array
    spatial = fuzzy_c_means(image, classes=3, spatial_weight=2.0).labels.array
    d_plain = np.mean([dice(plain == c + 1, truth == c) for c in range(3)])
    d_spatial = np.mean([dice(spatial == c + 1, truth == c) for c in range(3)])
    assert d_spatial > d_plain + 0.05
    assert d_spatial > 0.9


def test_fcm_mask_and_bad_parameters():
    means, truth, data = three_classes((30, 30), np.random.default_rng(2), noise=3)
    mask = np.zeros((30, 30), bool)
    mask[12:] = True  # classes 1 and 2 only
    result = fuzzy_c_means(data, classes=2, mask=mask)
    assert (result.labels.array[~mask] == 0).all()
    np.testing.assert_allclose(result.centers, means[1:], rtol=0.02)
    with pytest.raises(MedsegError, match="m must be greater than 1"):
        fuzzy_c_means(data, m=1.0)
    with pytest.raises(MedsegError, match="classes"):
        fuzzy_c_means(data, classes=1)
    with pytest.raises(MedsegError, match="distinct"):
        fuzzy_c_means(np.ones((5, 5)), classes=3)
    with pytest.raises(MedsegError, match="empty"):
        fuzzy_c_means(np.zeros((0, 0, 0)))
