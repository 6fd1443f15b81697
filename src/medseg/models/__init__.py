"""Network architectures, created by name from a registry."""

from medseg.models import attention_unet as _attention_unet  # noqa: F401  (registers models)
from medseg.models import fcn as _fcn  # noqa: F401
from medseg.models import late_fusion as _late_fusion  # noqa: F401
from medseg.models import mobile as _mobile  # noqa: F401
from medseg.models import resnet_unet as _resnet_unet  # noqa: F401
from medseg.models import transformer as _transformer  # noqa: F401
from medseg.models import unet as _unet  # noqa: F401
from medseg.models.registry import (
    ModelInfo,
    create_model,
    model_info,
    register_model,
    registered_models,
)

__all__ = ["ModelInfo", "create_model", "model_info", "register_model", "registered_models"]
