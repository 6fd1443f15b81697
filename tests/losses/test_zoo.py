"""Issue-8 losses against MONAI's implementations, and class-imbalance helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medseg.losses import create_loss
from medseg.losses.zoo import HausdorffDTLoss, class_frequencies, class_weights_from_frequencies

monai_losses = pytest.importorskip("monai.losses")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread avoids OpenMP spin-waiting on a shared, loaded CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_case(ndim: int, seed: int = 0, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (2, k, 12, 10) if ndim == 2 else (2, k, 8, 9, 7)
    logits = torch.randn(shape, generator=g) * 2
    target = torch.randint(0, k, (shape[0], 1, *shape[2:]), generator=g)
    target[:, :, :3] = 0  # some background structure
    return logits, target


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("batch", [True, False])
def test_tversky_matches_monai(ndim, batch):
    logits, target = random_case(ndim)
    ours = create_loss("tversky", alpha=0.3, beta=0.7, batch_dice=batch)(logits, target)
    ref = monai_losses.TverskyLoss(
        include_background=False, to_onehot_y=True, softmax=True, alpha=0.3, beta=0.7, batch=batch
    )(logits, target)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("batch", [True, False])
def test_generalized_dice_matches_monai(ndim, batch):
    logits, target = random_case(ndim, seed=1)
    target[0][target[0] == 2] = 0  # an absent class in one sample: weight falls back
    ours = create_loss("generalized_dice", batch_dice=batch)(logits, target)
    ref = monai_losses.GeneralizedDiceLoss(
        include_background=False, to_onehot_y=True, softmax=True, batch=batch
    )(logits, target)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("weights", [None, [0.2, 1.0, 3.0]])
def test_focal_matches_monai(weights):
    logits, target = random_case(3, seed=2)
    ours = create_loss("focal", gamma=2.0, class_weights=weights)(logits, target)
    onehot = F.one_hot(target[:, 0], 3).movedim(-1, 1).float()
    ref = monai_losses.FocalLoss(
        include_background=True, use_softmax=True, gamma=2.0, weight=weights
    )(logits, onehot)
    # MONAI averages over the class axis too; ours sums over classes (one is non-zero).
    assert ours.item() == pytest.approx(3 * ref.item(), rel=1e-5)


def test_focal_with_gamma_zero_is_cross_entropy():
    logits, target = random_case(2, seed=3)
    ours = create_loss("focal", gamma=0.0)(logits, target)
    assert ours.item() == pytest.approx(F.cross_entropy(logits, target[:, 0]).item(), rel=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
def test_hausdorff_dt_matches_monai(ndim):
    logits, target = random_case(ndim, seed=4)
    ours = HausdorffDTLoss()(logits, target)
    ref = monai_losses.HausdorffDTLoss(include_background=False, to_onehot_y=True, softmax=True)(
        logits, target
    )
    assert ours.item() == pytest.approx(ref.item(), rel=1e-4)


def test_hausdorff_dt_punishes_far_errors_more():
    target = torch.zeros(1, 1, 32, 32, dtype=torch.long)
    target[0, 0, 10:20, 10:20] = 1
    near, far = target.clone(), target.clone()
    near[0, 0, 20, 10:14] = 1  # 4 wrong voxels on the boundary
    far[0, 0, 30, 10:14] = 1  # 4 wrong voxels 10 voxels away
    loss = HausdorffDTLoss()
    as_logits = lambda t: F.one_hot(t[:, 0], 2).movedim(-1, 1).float() * 20  # noqa: E731
    assert loss(as_logits(far), target) > 5 * loss(as_logits(near), target)


def test_losses_train_a_tiny_model():
    torch.manual_seed(0)
    target = torch.zeros(2, 1, 16, 16, dtype=torch.long)
    target[:, :, 4:9, 5:12] = 1
    x = target.float() + 0.3 * torch.randn(2, 1, 16, 16)
    for name in (
        "tversky",
        "focal",
        "generalized_dice",
        "dice_focal",
        "tversky_ce",
        "dice_ce_hausdorff",
    ):
        model = torch.nn.Conv2d(1, 2, 3, padding=1)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        loss_fn = create_loss(name)
        first = loss_fn(model(x), target).item()
        for _ in range(30):
            opt.zero_grad()
            loss = loss_fn(model(x), target)
            loss.backward()
            opt.step()
        assert loss.item() < 0.7 * first, name


def test_class_weights_from_frequencies():
    labels = [np.array([0] * 90 + [1] * 9 + [2] * 1)]
    f = class_frequencies(labels, 3)
    assert f == pytest.approx([0.9, 0.09, 0.01])
    w = class_weights_from_frequencies(f, scheme="inverse")
    ratio = np.array(w) / w[0]
    assert ratio == pytest.approx([1, 10, 90]) and np.mean(w) == pytest.approx(1)
    w = class_weights_from_frequencies([0.5, 0.5, 0.0], scheme="inverse_sqrt")
    assert w[2] == pytest.approx(w[0])  # an absent class gets the largest weight
    with pytest.raises(ValueError, match="unknown class weighting"):
        class_weights_from_frequencies(f, scheme="nope")
