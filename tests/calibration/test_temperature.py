"""Temperature scaling recovers the temperature that generated the labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.calibration import fit_temperature, negative_log_likelihood
from medseg.errors import MedsegError


def sample(temperature, n=60_000, k=3, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 4.0, size=(n, k)).astype(np.float32)
    t = np.asarray(temperature, dtype=np.float64)
    p = np.exp(logits / t - (logits / t).max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    labels = (rng.random((n, 1)) > np.cumsum(p, 1)).sum(1)  # one draw per voxel from p
    return torch.from_numpy(logits), torch.from_numpy(labels)


def test_global_temperature_is_recovered():
    logits, labels = sample(2.5)
    (t,) = fit_temperature(logits, labels, mode="global")
    assert t == pytest.approx(2.5, rel=0.05)
    assert negative_log_likelihood(logits, labels, t) < negative_log_likelihood(logits, labels)


def test_under_confident_logits_get_a_temperature_below_one():
    logits, labels = sample(0.5, seed=1)
    (t,) = fit_temperature(logits, labels)
    assert t == pytest.approx(0.5, rel=0.05)


def test_per_class_temperatures_are_recovered():
    logits, labels = sample((1.5, 2.5, 4.0), n=120_000, seed=2)
    temps = fit_temperature(logits, labels, mode="per_class")
    assert temps == pytest.approx((1.5, 2.5, 4.0), rel=0.1)


def test_bad_input_is_a_one_line_error():
    with pytest.raises(MedsegError, match="unknown calibration mode"):
        fit_temperature(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), mode="vector")
    with pytest.raises(MedsegError, match=r"\(N, K\) logits"):
        fit_temperature(torch.zeros(4), torch.zeros(4, dtype=torch.long))
