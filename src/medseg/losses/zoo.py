"""More segmentation losses (issue 8): Tversky, focal, generalized Dice, Hausdorff-DT.

All take logits ``(B, K, *S)`` and an integer label ``(B, 1, *S)`` like the core losses,
and score foreground classes only. Definitions follow the papers; where MONAI
implements the same definition the tests use it as the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from medseg.losses.registry import CrossEntropyLoss, SoftDiceLoss, SumLoss, register_loss

CLASS_WEIGHTINGS = ("inverse", "inverse_sqrt", "log")  # schemes of class_weights_from_frequencies


def _probs_onehot(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target[:, 0].long(), logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    return probs, onehot


class TverskyLoss(nn.Module):
    """1 - mean Tversky index TP / (TP + alpha FP + beta FN) over foreground classes.

    ``beta > alpha`` penalizes missed voxels more: better recall of small structures
    (Salehi et al., 2017). alpha = beta = 0.5 is the soft Dice loss.
    """

    def __init__(
        self,
        *,
        alpha: float = 0.3,
        beta: float = 0.7,
        smooth: float = 1e-5,
        batch_dice: bool = True,
    ) -> None:
        super().__init__()
        self.alpha, self.beta, self.smooth, self.batch_dice = alpha, beta, smooth, batch_dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs, onehot = _probs_onehot(logits, target)
        probs, onehot = probs[:, 1:], onehot[:, 1:]
        dims = (0, *range(2, logits.ndim)) if self.batch_dice else tuple(range(2, logits.ndim))
        tp = (probs * onehot).sum(dims)
        fp = (probs * (1 - onehot)).sum(dims)
        fn = ((1 - probs) * onehot).sum(dims)
        index = (tp + self.smooth) / (tp + self.alpha * fp + self.beta * fn + self.smooth)
        return 1 - index.mean()


class FocalLoss(nn.Module):
    """Multi-class focal loss, mean over voxels of -w_t (1 - p_t)^gamma log p_t (Lin et al., 2017).

    ``class_weights`` (one per class, background included) play the role of alpha.
    """

    def __init__(self, *, gamma: float = 2.0, class_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.gamma = gamma
        weight = torch.tensor(list(class_weights), dtype=torch.float32) if class_weights else None
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(logits.float(), dim=1)
        t = target[:, 0].long()
        log_pt = log_p.gather(1, t[:, None])[:, 0]
        loss = -((1 - log_pt.exp()) ** self.gamma) * log_pt
        if self.weight is not None:
            loss = loss * self.weight.to(loss.device)[t]
        return loss.mean()


class GeneralizedDiceLoss(nn.Module):
    """1 - 2 sum_c w_c TP_c / sum_c w_c (P_c + G_c), with w_c = 1 / G_c^2 (Sudre et al., 2017).

    Classes absent from the reference get the largest finite weight (as MONAI does),
    so an empty class does not dominate.
    """

    def __init__(self, *, smooth: float = 1e-5, batch_dice: bool = True) -> None:
        super().__init__()
        self.smooth, self.batch_dice = smooth, batch_dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs, onehot = _probs_onehot(logits, target)
        probs, onehot = probs[:, 1:], onehot[:, 1:]
        dims = (0, *range(2, logits.ndim)) if self.batch_dice else tuple(range(2, logits.ndim))
        tp = (probs * onehot).sum(dims)
        denom = (probs + onehot).sum(dims)
        ref = onehot.sum(dims)
        w = 1.0 / ref.square()
        inf = torch.isinf(w)
        w = torch.where(inf, torch.zeros_like(w), w)
        largest = w.amax(dim=-1, keepdim=True)
        w = torch.where(inf, largest.expand_as(w), w)
        score = (2 * (w * tp).sum(-1) + self.smooth) / ((w * denom).sum(-1) + self.smooth)
        return 1 - score.mean()


def _distance_field(mask: np.ndarray) -> np.ndarray:
    """Distance of every voxel to the mask boundary (inside and outside); 0 when empty or full."""
    if not mask.any() or mask.all():
        return np.zeros(mask.shape, dtype=np.float32)
    return (ndimage.distance_transform_edt(mask) + ndimage.distance_transform_edt(~mask)).astype(
        np.float32
    )


class HausdorffDTLoss(nn.Module):
    """Distance-transform Hausdorff loss (Karimi & Salcudean, 2019).

    mean((p - g)^2 (d_g^alpha + d_p^alpha)) per sample and foreground class, where d_x is
    the distance to the boundary of x (p thresholded at 0.5). Errors far from the
    reference boundary cost quadratically more, which targets the Hausdorff distance.
    Distances come from SciPy's exact EDT on the CPU, in voxel units.
    """

    def __init__(self, *, alpha: float = 2.0) -> None:
        super().__init__()
        self.alpha = alpha

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs, onehot = _probs_onehot(logits, target)
        probs, onehot = probs[:, 1:], onehot[:, 1:]
        p_np = (probs.detach() > 0.5).cpu().numpy()
        g_np = onehot.detach().cpu().numpy() > 0.5
        dist = np.empty(probs.shape, dtype=np.float32)
        for b in range(probs.shape[0]):
            for c in range(probs.shape[1]):
                dist[b, c] = (
                    _distance_field(p_np[b, c]) ** self.alpha
                    + _distance_field(g_np[b, c]) ** self.alpha
                )
        weight = torch.from_numpy(dist).to(probs.device)
        return ((probs - onehot).square() * weight).mean()


@register_loss("tversky")
def tversky(
    *, alpha: float = 0.3, beta: float = 0.7, batch_dice: bool = True, **_: object
) -> nn.Module:
    return TverskyLoss(alpha=alpha, beta=beta, batch_dice=batch_dice)


@register_loss("focal")
def focal(
    *, gamma: float = 2.0, class_weights: Sequence[float] | None = None, **_: object
) -> nn.Module:
    return FocalLoss(gamma=gamma, class_weights=class_weights)


@register_loss("generalized_dice")
def generalized_dice(*, batch_dice: bool = True, **_: object) -> nn.Module:
    return GeneralizedDiceLoss(batch_dice=batch_dice)


class _Weighted(nn.Module):
    def __init__(self, loss: nn.Module, weight: float) -> None:
        super().__init__()
        self.loss, self.weight = loss, weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.weight * self.loss(logits, target)


@register_loss("dice_ce_hausdorff")
def dice_ce_hausdorff(
    *,
    batch_dice: bool = True,
    class_weights: Sequence[float] | None = None,
    hausdorff_weight: float = 0.05,
    **_: object,
) -> nn.Module:
    """Dice + CE + a small weight of the HD-DT loss: the region terms keep training
    stable while the distance term pulls in far-away false positives."""
    return SumLoss(
        SoftDiceLoss(batch_dice=batch_dice),
        CrossEntropyLoss(class_weights=list(class_weights) if class_weights else None),
        _Weighted(HausdorffDTLoss(), hausdorff_weight),
    )


@register_loss("dice_focal")
def dice_focal(
    *, batch_dice: bool = True, class_weights: Sequence[float] | None = None, **_: object
) -> nn.Module:
    return SumLoss(SoftDiceLoss(batch_dice=batch_dice), FocalLoss(class_weights=class_weights))


@register_loss("tversky_ce")
def tversky_ce(
    *, batch_dice: bool = True, class_weights: Sequence[float] | None = None, **_: object
) -> nn.Module:
    return SumLoss(
        TverskyLoss(batch_dice=batch_dice),
        CrossEntropyLoss(class_weights=list(class_weights) if class_weights else None),
    )


def class_frequencies(labels: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Voxel fraction of each class value 0..num_classes-1 over some label maps."""
    counts = np.zeros(num_classes, dtype=np.float64)
    for label in labels:
        counts += np.bincount(np.asarray(label).ravel().astype(np.int64), minlength=num_classes)[
            :num_classes
        ]
    return counts / max(counts.sum(), 1.0)


def class_weights_from_frequencies(
    frequencies: Sequence[float], *, scheme: str = "inverse_sqrt"
) -> tuple[float, ...]:
    """Per-class loss weights from voxel frequencies (e.g. a fingerprint's ``class_voxel_fraction``).

    ``scheme``: "inverse" (1/f), "inverse_sqrt" (1/sqrt(f), gentler) or "log"
    (1/log(1.02 + f), ENet's rule). Weights are scaled to mean 1; a class that never
    occurs gets the largest weight of the others.
    """
    f = np.asarray(frequencies, dtype=np.float64)
    if f.ndim != 1 or f.size < 2 or (f < 0).any():
        raise ValueError(f"class frequencies must be >= 0, one per class (got {list(f)})")
    if scheme == "inverse":
        w = np.where(f > 0, 1.0 / np.maximum(f, 1e-12), np.nan)
    elif scheme == "inverse_sqrt":
        w = np.where(f > 0, 1.0 / np.sqrt(np.maximum(f, 1e-12)), np.nan)
    elif scheme == "log":
        w = np.where(f > 0, 1.0 / np.log(1.02 + f), np.nan)
    else:
        raise ValueError(
            f"unknown class weighting {scheme!r} (use 'inverse', 'inverse_sqrt' or 'log')"
        )
    if np.isnan(w).all():
        return tuple(1.0 for _ in f)
    w = np.where(np.isnan(w), np.nanmax(w), w)
    return tuple(float(v) for v in w / w.mean())
