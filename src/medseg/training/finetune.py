"""Fine-tuning from another medseg model, and checks that a training configuration can run.

Weights are matched by parameter name and shape: output heads whose shape changed (the
new dataset has other classes) keep their fresh initialization; any other layer whose
shape differs is refused with a one-line error naming it and both shapes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

from medseg.errors import MedsegError
from medseg.losses import CLASS_WEIGHTINGS, registered_losses
from medseg.model_folder import (
    WEIGHT_KINDS,
    ModelFolder,
    has_weights,
    read_state_dict_file,
    read_weights,
)
from medseg.models import model_info, registered_models
from medseg.planning.plan import Plan
from medseg.training.config import OPTIMIZERS, TrainConfig
from medseg.training.sampling import CLASS_SAMPLING

HEAD_PREFIXES = ("heads.", "scores.", "net.out.", "head.")


def find_init_weights(source: str | os.PathLike) -> tuple[Path, str | None]:
    """Where ``--init-from`` weights are: ``(file, None)`` or ``(fold folder, kind)``.

    Parameters
    ----------
    source
        A weights file (``.safetensors``, or a ``.pt`` state dict such as a pretrained
        encoder's), a fold folder, a model folder or a work folder. In a model folder
        the first fold with best weights is taken, else the first with last weights.

    Raises
    ------
    MedsegError
        When ``source`` holds no medseg weights.
    """
    path = Path(source)
    if path.is_file():
        return path, None
    for folder in (path, path / "model"):
        for kind in WEIGHT_KINDS:
            if has_weights(folder, kind):
                return folder, kind
    if (path / "plan.json").is_file() or (path / "model" / "plan.json").is_file():
        model = ModelFolder.open(path)
        for kind in WEIGHT_KINDS:
            folds = model.folds(kind)
            if folds:
                return model.fold_dir(folds[0]), kind
    raise MedsegError(
        f"{path}: no medseg checkpoint found (expected fold_<k>/weights_best.safetensors "
        "or a weights file)"
    )


def load_matching_weights(model: torch.nn.Module, source: str | os.PathLike) -> dict[str, list]:
    """Copy every parameter/buffer of ``source`` whose name and shape match into ``model``.

    ``source`` is found with :func:`find_init_weights`; a ``.pt`` file is read with
    ``weights_only=True`` (see :func:`medseg.model_folder.read_state_dict_file`).

    Returns
    -------
    dict
        ``loaded`` (copied bit-exactly), ``new`` (tensors of ``model`` that keep their
        initialization: absent from ``source``, or output heads of another shape),
        ``unused`` (tensors of ``source`` the network has no place for, e.g. a pretraining
        head), ``skipped`` (the same as ``new``, the older name) and ``summary`` (one line).

    Raises
    ------
    MedsegError
        One line naming the first layer whose shape differs (outside the output heads),
        with both shapes, or saying that no layer matches.
    """
    path, kind = find_init_weights(source)
    state = read_state_dict_file(path) if kind is None else read_weights(path, kind)[0]
    own = model.state_dict()
    for k, t in own.items():  # in network order: the first reshaped layer outside the heads
        if k in state and state[k].shape != t.shape and not k.startswith(HEAD_PREFIXES):
            raise MedsegError(
                f"{path}: layer {k} has shape {tuple(state[k].shape)} there but "
                f"{tuple(t.shape)} in the new network (trained with another plan?)"
            )
    loaded = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not loaded:
        raise MedsegError(f"{path}: no layer matches the new network (another architecture?)")
    model.load_state_dict(loaded, strict=False)
    new = sorted(set(own) - set(loaded))
    unused = sorted(set(state) - set(loaded))
    return {
        "source": str(path),
        "loaded": sorted(loaded),
        "new": new,
        "unused": unused,
        "skipped": new,
        "summary": transfer_summary(loaded, new, unused),
    }


def transfer_summary(loaded: Iterable[str], new: Iterable[str], unused: Iterable[str]) -> str:
    """One line: how many tensors were loaded, new and unused, by top-level module."""

    def groups(names: Iterable[str]) -> str:
        counts: dict[str, int] = {}
        for name in names:
            top = name.split(".", 1)[0]
            counts[top] = counts.get(top, 0) + 1
        return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"

    loaded, new, unused = list(loaded), list(new), list(unused)
    return (
        f"loaded {len(loaded)} tensors ({groups(loaded)}); new {len(new)} ({groups(new)}); "
        f"unused {len(unused)} ({groups(unused)})"
    )


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
    if config.loss not in registered_losses(task="segmentation"):
        raise MedsegError(
            f"unknown loss {config.loss!r}; registered: {', '.join(registered_losses(task='segmentation'))}"
        )
    if config.class_weighting not in (None, *CLASS_WEIGHTINGS):
        raise MedsegError(
            f"unknown class weighting {config.class_weighting!r} (use {', '.join(CLASS_WEIGHTINGS)})"
        )
    if config.class_sampling not in CLASS_SAMPLING:
        raise MedsegError(
            f"unknown class sampling {config.class_sampling!r} (use {', '.join(CLASS_SAMPLING)})"
        )
    if config.class_weights is not None and len(config.class_weights) != plan.num_classes:
        raise MedsegError(
            f"class_weights has {len(config.class_weights)} values, the plan has {plan.num_classes} classes"
        )
    if not 0.0 <= config.modality_dropout < 1.0:
        raise MedsegError(f"--modality-dropout must be in [0, 1), got {config.modality_dropout}")
    if config.init_from is not None:
        find_init_weights(config.init_from)
    if config.labelled_fraction is not None and config.labelled_cases is not None:
        raise MedsegError("give labelled_fraction or labelled_cases, not both")
    if config.labelled_fraction is not None and not 0 < config.labelled_fraction <= 1:
        raise MedsegError(f"labelled_fraction must lie in (0, 1] (got {config.labelled_fraction})")
    if config.labelled_cases is not None and config.labelled_cases < 1:
        raise MedsegError(f"labelled_cases must be >= 1 (got {config.labelled_cases})")
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


def check_teacher(source: str | os.PathLike, plan: Plan) -> Plan:
    """A teacher must see the same inputs and predict the same labels as the student.

    ``source`` is a model folder or a work folder holding one; returns the teacher's plan.
    """
    folder = ModelFolder.open(source)
    model_dir, teacher = folder.path, folder.plan
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
    if not folder.folds("best"):
        raise MedsegError(
            f"{model_dir}: teacher has no trained fold (fold_<k>/weights_best.safetensors)"
        )
    return teacher
