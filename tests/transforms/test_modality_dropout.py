"""Modality dropout: whole channels zeroed at random, never all of a sample's."""

from __future__ import annotations

import pytest
import torch

from medseg.transforms.modality_dropout import ModalityDropout, dropout_probabilities


def test_channels_are_dropped_whole_at_about_the_rate_and_never_all():
    dropout = ModalityDropout(0.5, 2, seed=0)
    x = torch.rand(4000, 2, 3, 3) + 1.0  # every voxel nonzero
    y = dropout(x)
    zero = (y == 0).flatten(2)
    whole = zero.all(dim=2)
    assert torch.equal(zero.any(dim=2), whole)  # a channel is all kept or all dropped
    assert not whole.all(dim=1).any()  # never both channels of a sample
    kept = ~whole
    assert torch.equal(y[kept], x[kept])
    # P(drop c) = p - P(both drawn) * P(c rescued)/... = 0.5 - 0.25 / 2 = 0.375 per channel
    rate = whole.float().mean(dim=0)
    assert torch.allclose(rate, torch.full((2,), 0.375), atol=0.03)


def test_per_channel_probabilities_and_seeding():
    x = torch.ones(1000, 3, 2, 2)
    dropout = ModalityDropout((0.0, 0.3, 0.6), 3, seed=1)
    dropped = (dropout(x) == 0).flatten(2).all(dim=2).float().mean(dim=0)
    assert dropped[0] == 0
    assert 0.2 < dropped[1] < 0.4 and 0.5 < dropped[2] < 0.7
    a = ModalityDropout(0.5, 3, seed=7)(x)
    b = ModalityDropout(0.5, 3, seed=7)(x)
    assert torch.equal(a, b)


def test_state_round_trip_continues_the_same_stream():
    x = torch.ones(64, 2, 2, 2)
    first = ModalityDropout(0.5, 2, seed=3)
    first(x)
    state = first.state_dict()
    expected = first(x)
    second = ModalityDropout(0.5, 2, seed=99)
    second.load_state_dict(state)
    assert torch.equal(second(x), expected)


def test_one_channel_or_zero_probability_passes_through():
    x = torch.rand(8, 1, 4, 4)
    assert ModalityDropout(0.9, 1, seed=0)(x) is x
    y = torch.rand(8, 2, 4, 4)
    assert ModalityDropout(0.0, 2, seed=0)(y) is y


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        dropout_probabilities(1.0, 2)
    with pytest.raises(ValueError, match="2 probabilities for 3 channels"):
        dropout_probabilities((0.1, 0.2), 3)
    with pytest.raises(ValueError, match="expects"):
        ModalityDropout(0.5, 2)(torch.rand(2, 3, 4, 4))
