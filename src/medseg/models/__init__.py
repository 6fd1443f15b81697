"""Network architectures, created by name from a registry."""

from medseg.models import unet as _unet  # noqa: F401  (registers the U-Nets)
from medseg.models.registry import create_model, register_model, registered_models

__all__ = ["create_model", "register_model", "registered_models"]
