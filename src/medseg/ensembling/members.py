"""Loading the fold networks of trained model folders, and their class probabilities."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from medseg.errors import MedsegError
from medseg.models.sliding_window import sliding_window_logits
from medseg.planning.plan import Plan, read_plan
from medseg.training.finetune import read_train_config
from medseg.training.trainer import build_model, memory_format


def model_folder(source: str | os.PathLike) -> Path:
    """A model folder (plan.json + fold_<k>/) from itself or the work folder holding it."""
    path = Path(source)
    if (path / "model" / "plan.json").exists():
        return path / "model"
    if not (path / "plan.json").exists():
        raise MedsegError(f"{path}: not a medseg model folder (no plan.json)")
    return path


def trained_folds(model_dir: Path, checkpoint: str = "best") -> list[int]:
    return sorted(
        int(d.name[5:])
        for d in model_dir.glob("fold_*")
        if d.name[5:].isdigit() and (d / f"checkpoint_{checkpoint}.pt").exists()
    )


def load_fold_models(
    source: str | os.PathLike,
    *,
    folds: list[int] | None = None,
    checkpoint: str = "best",
    device: torch.device | str = "cpu",
) -> tuple[Plan, list[torch.nn.Module]]:
    """The plan and the eval-mode networks of ``folds`` (default: every trained fold)."""
    model_dir = model_folder(source)
    plan = read_plan(model_dir)
    found = trained_folds(model_dir, checkpoint)
    folds = found if folds is None else folds
    missing = [f for f in folds if f not in found]
    if not folds or missing:
        raise MedsegError(f"{model_dir}: no {checkpoint} checkpoint for fold(s) {missing or 'any'}")
    models = []
    for fold in folds:
        fold_dir = model_dir / f"fold_{fold}"
        config = read_train_config(fold_dir)
        model = build_model(plan, name=config.model if config else None, deep_supervision=False)
        state = torch.load(
            fold_dir / f"checkpoint_{checkpoint}.pt", map_location="cpu", weights_only=False
        )
        model.load_state_dict(state["model"])
        model.eval()
        models.append(model.to(device).to(memory_format=memory_format(plan.ndim)))
    return plan, models


def member_probabilities(
    plan: Plan,
    models: list[torch.nn.Module],
    data: np.ndarray,
    *,
    mirror_axes: tuple[int, ...] = (),
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Mean softmax ``(K, *S)`` of a member's fold networks on preprocessed ``(C, *S)`` data."""
    x = torch.from_numpy(np.ascontiguousarray(data))
    total = None
    for model in models:
        logits = sliding_window_logits(
            model,
            x,
            patch_size=plan.patch_size,
            num_classes=plan.num_classes,
            mirror_axes=mirror_axes,
            device=device,
        )
        probs = torch.softmax(logits, dim=0)
        total = probs if total is None else total.add_(probs)
    return total / len(models)
