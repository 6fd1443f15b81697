"""A small explicit model registry: ``create_model("unet", ...)``.

Each entry records what the model is for: ``task`` ("segmentation" for models that
map images to class logits and follow the plan contract, anything else, e.g.
"registration", for models with their own contract) and the spatial ``dims`` it
supports. The model-zoo contract test reads these tags.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_INFO: dict[str, ModelInfo] = {}


@dataclass(frozen=True)
class ModelInfo:
    name: str
    task: str = "segmentation"
    dims: tuple[int, ...] = (2, 3)
    # Extra factory options that make a tiny instance for contract tests (fixed-size
    # parts such as a pretrained encoder's widths cannot shrink with the plan's features).
    tiny_options: tuple[tuple[str, object], ...] = ()


def register_model(
    name: str,
    *,
    task: str = "segmentation",
    dims: tuple[int, ...] = (2, 3),
    tiny_options: dict | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = factory
        _INFO[name] = ModelInfo(
            name=name, task=task, dims=tuple(dims), tiny_options=tuple((tiny_options or {}).items())
        )
        return factory

    return decorator


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name."""
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(_MODELS))}")
    return _MODELS[name](**kwargs)


def registered_models(*, task: str | None = None) -> list[str]:
    """Registered names, optionally only those of one ``task``."""
    return sorted(n for n in _MODELS if task is None or _INFO[n].task == task)


def model_info(name: str) -> ModelInfo:
    """Tags of a registered model (task, supported dims)."""
    if name not in _INFO:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(_MODELS))}")
    return _INFO[name]
