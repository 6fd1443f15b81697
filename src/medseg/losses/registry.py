"""Losses by name and task: ``create_loss("dice_ce")``.

Each entry records the ``task`` it is for, as models do (:mod:`medseg.models.registry`):
"segmentation" losses take logits ``(B, K, *S)`` and an integer label ``(B, 1, *S)``;
"registration" losses (:mod:`medseg.losses.registration`) take images or a displacement
field. Every loss of the package is registered when :mod:`medseg.losses` is imported, so
the lists never depend on what else was imported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LOSS_TASKS = ("segmentation", "registration")

_LOSSES: dict[str, Callable[..., nn.Module]] = {}
_INFO: dict[str, LossInfo] = {}


@dataclass(frozen=True)
class LossInfo:
    """What a registered loss is for."""

    name: str
    task: str = "segmentation"


def register_loss(
    name: str, *, task: str = "segmentation"
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a loss factory under ``name`` for ``task`` (one of :data:`LOSS_TASKS`)."""
    if task not in LOSS_TASKS:
        raise ValueError(f"unknown loss task {task!r} (use one of {', '.join(LOSS_TASKS)})")

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        _LOSSES[name] = factory
        _INFO[name] = LossInfo(name=name, task=task)
        return factory

    return decorator


def create_loss(name: str, **kwargs) -> nn.Module:
    """Build a registered loss by name."""
    if name not in _LOSSES:
        raise KeyError(f"unknown loss {name!r}; registered: {', '.join(sorted(_LOSSES))}")
    return _LOSSES[name](**kwargs)


def registered_losses(*, task: str | None = None) -> list[str]:
    """Registered names, optionally only those of one ``task``."""
    return sorted(n for n in _LOSSES if task is None or _INFO[n].task == task)


def loss_info(name: str) -> LossInfo:
    """Tags of a registered loss (its task)."""
    if name not in _INFO:
        raise KeyError(f"unknown loss {name!r}; registered: {', '.join(sorted(_LOSSES))}")
    return _INFO[name]


def _soft_overlap(
    logits: torch.Tensor, target: torch.Tensor, batch: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft intersection, prediction sum and reference sum per class (foreground classes only)."""
    probs = torch.softmax(logits.float(), dim=1)[:, 1:]
    onehot = F.one_hot(target[:, 0].long(), logits.shape[1]).movedim(-1, 1)[:, 1:].to(probs.dtype)
    dims = (0, *range(2, logits.ndim)) if batch else tuple(range(2, logits.ndim))
    return (probs * onehot).sum(dims), probs.sum(dims), onehot.sum(dims)


class SoftDiceLoss(nn.Module):
    """1 - mean soft Dice over foreground classes (batch Dice: sums over the whole batch)."""

    def __init__(self, *, smooth: float = 1e-5, batch_dice: bool = True) -> None:
        super().__init__()
        self.smooth, self.batch_dice = smooth, batch_dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        inter, pred, ref = _soft_overlap(logits, target, self.batch_dice)
        dice = (2 * inter + self.smooth) / (pred + ref + self.smooth).clamp_min(1e-8)
        return 1 - dice.mean()


class SoftJaccardLoss(nn.Module):
    """1 - mean soft Jaccard (IoU) over foreground classes."""

    def __init__(self, *, smooth: float = 1e-5, batch_dice: bool = True) -> None:
        super().__init__()
        self.smooth, self.batch_dice = smooth, batch_dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        inter, pred, ref = _soft_overlap(logits, target, self.batch_dice)
        iou = (inter + self.smooth) / (pred + ref - inter + self.smooth).clamp_min(1e-8)
        return 1 - iou.mean()


class CrossEntropyLoss(nn.Module):
    def __init__(self, *, class_weights: list[float] | None = None) -> None:
        super().__init__()
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target[:, 0].long(), weight=self.weight)


class SumLoss(nn.Module):
    def __init__(self, *parts: nn.Module) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(part(logits, target) for part in self.parts)


@register_loss("dice_ce")
def dice_ce(*, batch_dice: bool = True, class_weights: list[float] | None = None) -> nn.Module:
    return SumLoss(
        SoftDiceLoss(batch_dice=batch_dice), CrossEntropyLoss(class_weights=class_weights)
    )


@register_loss("ce")
def cross_entropy(*, class_weights: list[float] | None = None, **_: object) -> nn.Module:
    return CrossEntropyLoss(class_weights=class_weights)


@register_loss("dice")
def dice(*, batch_dice: bool = True, **_: object) -> nn.Module:
    return SoftDiceLoss(batch_dice=batch_dice)


@register_loss("jaccard")
def jaccard(*, batch_dice: bool = True, **_: object) -> nn.Module:
    return SoftJaccardLoss(batch_dice=batch_dice)


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of a loss over outputs at decreasing resolution (weights 1, 1/2, 1/4, ...).

    The coarsest output gets no weight, as in nnU-Net; targets are downsampled by nearest neighbour.
    """

    def __init__(self, loss: nn.Module, num_outputs: int) -> None:
        super().__init__()
        weights = [0.5**i for i in range(num_outputs)]
        if num_outputs > 1:
            weights[-1] = 0.0
        total = sum(weights)
        self.loss, self.weights = loss, [w / total for w in weights]

    def forward(
        self, outputs: list[torch.Tensor] | torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for weight, out in zip(self.weights, outputs):
            if weight == 0:
                continue
            t = (
                target
                if out.shape[2:] == target.shape[2:]
                else F.interpolate(target.float(), size=out.shape[2:], mode="nearest").long()
            )
            total = total + weight * self.loss(out, t)
        return total
