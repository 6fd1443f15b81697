"""Losses created by name from a registry, tagged by task (segmentation, registration).

Importing this package registers every loss: the core ones (:mod:`medseg.losses.registry`),
the zoo (Tversky, focal, generalized Dice, Hausdorff-DT: :mod:`medseg.losses.zoo`) and the
registration losses (:mod:`medseg.losses.registration`).
"""

from medseg.losses.registration import GradientSmoothness, LocalNCC
from medseg.losses.registry import (
    LOSS_TASKS,
    DeepSupervisionLoss,
    LossInfo,
    create_loss,
    loss_info,
    register_loss,
    registered_losses,
)
from medseg.losses.zoo import CLASS_WEIGHTINGS

__all__ = [
    "CLASS_WEIGHTINGS",
    "LOSS_TASKS",
    "DeepSupervisionLoss",
    "GradientSmoothness",
    "LocalNCC",
    "LossInfo",
    "create_loss",
    "loss_info",
    "register_loss",
    "registered_losses",
]
