"""Contract tests: every registered model and loss, in 2D and 3D."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from medseg.losses import (
    LOSS_TASKS,
    DeepSupervisionLoss,
    create_loss,
    loss_info,
    registered_losses,
)


def perfect_logits(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(target[:, 0], num_classes).movedim(-1, 1).float() * 50


def test_every_loss_has_a_task_and_the_lists_do_not_depend_on_import_order():
    names = registered_losses()
    assert names == sorted(
        registered_losses(task="segmentation") + registered_losses(task="registration")
    )
    assert all(loss_info(n).task in LOSS_TASKS for n in names)
    assert {"lncc", "grad_smoothness"} <= set(registered_losses(task="registration"))
    assert not {"lncc", "grad_smoothness"} & set(registered_losses(task="segmentation"))
    # A fresh interpreter that imports only medseg.losses sees the same registry.
    code = "from medseg.losses import registered_losses; print(','.join(registered_losses()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().split(",") == names


@pytest.mark.parametrize("name", registered_losses(task="segmentation"))
def test_loss_is_near_zero_for_a_perfect_prediction_and_larger_otherwise(name: str):
    target = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    target[:, :, 2:5, 2:6] = 1
    target[:, :, 6:, :2] = 2
    loss = create_loss(name)
    good = loss(perfect_logits(target, 3), target)
    bad = loss(perfect_logits(torch.zeros_like(target), 3), target)
    assert good.item() < 1e-3
    assert bad.item() > 0.3


def _smooth_image(ndim: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    shape = (1, 1, 24, 20) if ndim == 2 else (1, 1, 16, 14, 12)
    x = torch.randn(shape)
    pool = F.avg_pool2d if ndim == 2 else F.avg_pool3d
    return pool(x, 5, stride=1, padding=2)


# Per registration loss: (ideal inputs, worse inputs) in ``ndim`` dimensions.
REGISTRATION_CASES = {
    "lncc": lambda ndim: (
        (_smooth_image(ndim, 0), _smooth_image(ndim, 0)),
        (_smooth_image(ndim, 0), _smooth_image(ndim, 1)),
    ),
    "grad_smoothness": lambda ndim: (
        (torch.full((1, ndim, *_smooth_image(ndim, 0).shape[2:]), 0.7),),
        (_smooth_image(ndim, 2).expand(1, ndim, *_smooth_image(ndim, 0).shape[2:]) * 5,),
    ),
}


def test_every_registration_loss_has_a_contract_case():
    assert set(registered_losses(task="registration")) == set(REGISTRATION_CASES)


@pytest.mark.parametrize("name", registered_losses(task="registration"))
@pytest.mark.parametrize("ndim", [2, 3])
def test_registration_loss_is_lowest_for_the_ideal_input_and_differentiable(name: str, ndim: int):
    ideal, worse = REGISTRATION_CASES[name](ndim)
    loss = create_loss(name)
    best = loss(*ideal)
    inputs = [x.clone().requires_grad_(True) for x in worse]
    value = loss(*inputs)
    assert best.ndim == value.ndim == 0
    assert torch.isfinite(best) and torch.isfinite(value)
    assert best.item() < value.item()
    value.backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in inputs)


def test_dice_loss_value_by_construction():
    # Hard one-hot prediction covering 4 of 8 reference voxels and 4 extra: Dice = 2*4/(8+8) = 0.5.
    target = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    target[0, 0, :2, :] = 1
    pred = torch.zeros_like(target)
    pred[0, 0, 1:3, :] = 1
    loss = create_loss("dice")(perfect_logits(pred, 2), target)
    assert loss.item() == pytest.approx(0.5, abs=1e-4)
    jaccard = create_loss("jaccard")(perfect_logits(pred, 2), target)
    assert jaccard.item() == pytest.approx(1 - 4 / 12, abs=1e-4)


def test_deep_supervision_weights():
    loss = DeepSupervisionLoss(create_loss("ce"), 4)
    assert loss.weights == pytest.approx([4 / 7, 2 / 7, 1 / 7, 0.0])
