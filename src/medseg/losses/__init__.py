"""Segmentation losses, created by name from a registry."""

from medseg.losses.registry import (
    DeepSupervisionLoss,
    create_loss,
    register_loss,
    registered_losses,
)

__all__ = ["DeepSupervisionLoss", "create_loss", "register_loss", "registered_losses"]
