"""Segmentation losses, created by name from a registry."""

from medseg.losses import zoo as _zoo  # noqa: F401  (registers Tversky, focal, GDL, HD)
from medseg.losses.registry import (
    DeepSupervisionLoss,
    create_loss,
    register_loss,
    registered_losses,
)

__all__ = ["DeepSupervisionLoss", "create_loss", "register_loss", "registered_losses"]
