"""Entropy, mutual information, case scores, probability files and MC-dropout wrappers."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from medseg.inference.uncertainty import (
    MCDropoutForward,
    MemberAccumulator,
    case_scores,
    entropy,
    has_dropout,
    read_probabilities,
    write_probabilities,
)
from medseg.io import Image, write_image


def test_mutual_information_of_disagreeing_members():
    # two confident members that disagree: mean (0.5, 0.5), entropy ln 2, each member ~0
    a = torch.tensor([[20.0], [0.0]])
    b = torch.tensor([[0.0], [20.0]])
    acc = MemberAccumulator()
    acc.add(a)
    acc.add(b)
    assert float(entropy(acc.mean_probabilities())[0]) == pytest.approx(math.log(2), abs=1e-6)
    assert float(acc.mutual_information()[0]) == pytest.approx(math.log(2), abs=1e-6)
    agree = MemberAccumulator()
    agree.add(a)
    agree.add(a.clone())
    assert float(agree.mutual_information()[0]) == pytest.approx(0.0, abs=1e-6)


def test_dice_gap_is_zero_for_certain_probabilities_and_grows_with_doubt():
    label = torch.zeros(10, dtype=torch.long)
    label[:4] = 1
    certain = torch.nn.functional.one_hot(label, 2).T.float()
    assert case_scores(certain, entropy(certain), None)["dice_gap"] == pytest.approx(0.0)
    doubtful = certain * 0.6 + 0.2  # 0.8 for the predicted class
    # expected Dice = 2 * 4 * 0.8 / (4 * 0.8 + 6 * 0.2 + 4) = 6.4 / 8.4
    assert case_scores(doubtful, entropy(doubtful), None)["dice_gap"] == pytest.approx(
        1 - 6.4 / 8.4
    )


def test_probabilities_round_trip_in_the_label_geometry(tmp_path):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=(6, 5, 4)).transpose(3, 0, 1, 2).astype(np.float32)
    ref = Image(np.zeros((6, 5, 4), np.uint8), (1.0, 2.0, 3.0), (10.0, -5.0, 2.0))
    label = write_image(ref, tmp_path / "a.nii.gz")
    nifti = write_probabilities(probs, ref, tmp_path / "a_probabilities.nii.gz")
    npz = write_probabilities(probs, ref, tmp_path / "a_probabilities.npz")
    assert np.abs(read_probabilities(nifti) - probs).max() < 1e-4  # 16-bit
    assert np.abs(read_probabilities(npz) - probs).max() < 1e-3  # float16
    assert nib.load(nifti).get_data_dtype() == np.uint16
    # the same voxel-to-world mapping as the label written by SimpleITK
    assert np.allclose(nib.load(nifti).affine, nib.load(label).affine, atol=1e-5)


def test_mc_dropout_forward_samples_with_dropout_on_only():
    net = nn.Sequential(nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Conv2d(4, 2, 1))
    assert has_dropout(net) and not has_dropout(nn.Sequential(nn.Conv2d(1, 2, 1), nn.Dropout(0.0)))
    net.eval()
    forward = MCDropoutForward(net)
    x = torch.randn(1, 1, 8, 8)
    a, b = forward(x), forward(x)
    assert not torch.allclose(a, b)  # stochastic
    assert not net[1].training and not net[2].training  # back in eval afterwards
