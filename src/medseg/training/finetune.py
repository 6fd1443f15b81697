"""Fine-tuning from another medseg model, and checks that a training configuration can run.

Weights are matched by parameter name and shape: layers whose shape changed (the
output heads, when the new dataset has other classes; the first convolution, when it
has other channels) keep their fresh initialization.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from medseg.errors import MedsegError
from medseg.planning.plan import Plan, read_plan
from medseg.training.config import TrainConfig

HEAD_PREFIXES = ("heads.", "scores.", "net.out.", "head.")


def find_checkpoint(source: str | os.PathLike) -> Path:
    """A checkpoint file from a checkpoint path, a fold folder, a model folder or a work folder."""
    path = Path(source)
    if path.is_file():
        return path
    for folder in (path, path / "model"):
        for candidate in (
            folder / "checkpoint_best.pt",
            folder / "checkpoint_last.pt",
            *sorted(folder.glob("fold_*/checkpoint_best.pt")),
            *sorted(folder.glob("fold_*/checkpoint_last.pt")),
        ):
            if candidate.exists():
                return candidate
    raise MedsegError(f"{path}: no medseg checkpoint found (expected fold_<k>/checkpoint_best.pt)")


def load_matching_weights(model: torch.nn.Module, source: str | os.PathLike) -> dict[str, list]:
    """Copy every parameter/buffer of ``source`` whose name and shape match into ``model``.

    Returns ``{"loaded": [...], "skipped": [...]}`` (skipped: new or reshaped tensors,
    which keep their initialization).
    """
    path = find_checkpoint(source)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises several types for unreadable files
        raise MedsegError(f"{path}: cannot read checkpoint ({str(exc)[:120]})") from None
    state = state.get("model", state) if isinstance(state, dict) else state
    own = model.state_dict()
    loaded = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not loaded:
        raise MedsegError(f"{path}: no layer matches the new network (another architecture?)")
    model.load_state_dict(loaded, strict=False)
    return {"loaded": sorted(loaded), "skipped": sorted(set(own) - set(loaded))}


def set_frozen(model: torch.nn.Module, names: set[str], frozen: bool) -> int:
    """Freeze (or unfreeze) the named parameters; returns how many were changed."""
    count = 0
    for name, p in model.named_parameters():
        if name in names:
            p.requires_grad_(not frozen)
            count += 1
    return count


def frozen_names(loaded: list[str], model: torch.nn.Module) -> set[str]:
    """Transferred parameters to freeze first: everything loaded except the output heads."""
    params = {n for n, _ in model.named_parameters()}
    return {n for n in loaded if n in params and not n.startswith(HEAD_PREFIXES)}


def check_train_config(config: TrainConfig, plan: Plan) -> None:
    """Raise :class:`MedsegError` for a configuration that cannot train, before any work starts."""
    from medseg.losses import registered_losses
    from medseg.models import model_info, registered_models
    from medseg.training.config import OPTIMIZERS
    from medseg.training.sampling import CLASS_SAMPLING

    name = config.model or plan.network.name
    known = registered_models(task="segmentation")
    if name not in known:
        raise MedsegError(f"unknown architecture {name!r}; registered: {', '.join(known)}")
    if plan.ndim not in model_info(name).dims:
        raise MedsegError(
            f"architecture {name!r} supports {model_info(name).dims}D, not {plan.ndim}D"
        )
    if config.optimizer not in OPTIMIZERS:
        raise MedsegError(f"unknown optimizer {config.optimizer!r} (use {', '.join(OPTIMIZERS)})")
    if config.loss not in registered_losses():
        raise MedsegError(
            f"unknown loss {config.loss!r}; registered: {', '.join(registered_losses())}"
        )
    if config.class_weighting not in (None, "inverse", "inverse_sqrt", "log"):
        raise MedsegError(
            f"unknown class weighting {config.class_weighting!r} (use inverse, inverse_sqrt or log)"
        )
    if config.class_sampling not in CLASS_SAMPLING:
        raise MedsegError(
            f"unknown class sampling {config.class_sampling!r} (use {', '.join(CLASS_SAMPLING)})"
        )
    if config.class_weights is not None and len(config.class_weights) != plan.num_classes:
        raise MedsegError(
            f"class_weights has {len(config.class_weights)} values, the plan has {plan.num_classes} classes"
        )
    if config.init_from is not None:
        find_checkpoint(config.init_from)
    if config.freeze_epochs < 0:
        raise MedsegError(f"freeze_epochs must be >= 0 (got {config.freeze_epochs})")
    if config.encoder_weights is not None and not Path(config.encoder_weights).is_file():
        raise MedsegError(f"{config.encoder_weights}: encoder weights file not found")
    if config.distill is not None:
        d = config.distill
        if not d.teachers:
            raise MedsegError("distillation needs at least one teacher model folder")
        if d.temperature <= 0 or not 0 <= d.weight <= 1:
            raise MedsegError(
                f"distillation needs temperature > 0 and 0 <= weight <= 1 (got {d.temperature}, {d.weight})"
            )
        if d.teacher_precision not in ("auto", "fp32", "bf16"):
            raise MedsegError(
                f"unknown teacher precision {d.teacher_precision!r} (use auto, fp32 or bf16)"
            )
        if d.feature_weight < 0:
            raise MedsegError(f"feature distillation weight must be >= 0 (got {d.feature_weight})")
        for teacher in d.teachers:
            check_teacher(teacher, plan)


def teacher_model_dir(source: str | os.PathLike) -> Path:
    path = Path(source)
    if (path / "model" / "plan.json").exists():
        return path / "model"
    if not (path / "plan.json").exists():
        raise MedsegError(f"{path}: not a medseg model folder (no plan.json)")
    return path


def check_teacher(source: str | os.PathLike, plan: Plan) -> Plan:
    """A teacher must see the same inputs and predict the same labels as the student."""
    model_dir = teacher_model_dir(source)
    teacher = read_plan(model_dir)
    if tuple(teacher.labels) != tuple(plan.labels):
        raise MedsegError(
            f"{model_dir}: teacher was trained with labels {dict(teacher.labels)}, "
            f"the student's plan has {dict(plan.labels)}"
        )
    for field in ("ndim", "channel_names", "target_spacing", "normalization"):
        if getattr(teacher, field) != getattr(plan, field):
            raise MedsegError(
                f"{model_dir}: teacher plan differs in {field} "
                f"({getattr(teacher, field)} vs {getattr(plan, field)}); it must see the same inputs"
            )
    if not list(model_dir.glob("fold_*/checkpoint_best.pt")):
        raise MedsegError(f"{model_dir}: teacher has no trained fold (fold_<k>/checkpoint_best.pt)")
    return teacher


def read_train_config(fold_dir: str | os.PathLike) -> TrainConfig | None:
    from medseg.serialization import from_jsonable

    path = Path(fold_dir) / "train_config.json"
    if not path.exists():
        return None
    return from_jsonable(TrainConfig, json.loads(path.read_text()))
