"""Loading the fold networks of trained model folders, and their class probabilities."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from medseg.errors import MedsegError
from medseg.inference.predictor import load_networks, select_folds
from medseg.models.sliding_window import sliding_window_logits
from medseg.planning.plan import Plan, read_plan


def model_folder(source: str | os.PathLike) -> Path:
    """A model folder (plan.json + fold_<k>/) from itself or the work folder holding it."""
    path = Path(source)
    if (path / "model" / "plan.json").exists():
        return path / "model"
    if not (path / "plan.json").exists():
        raise MedsegError(f"{path}: not a medseg model folder (no plan.json)")
    return path


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
    folds = select_folds(model_dir, folds, checkpoint)
    models = load_networks(
        model_dir, plan, folds, checkpoint=checkpoint, device=torch.device(device)
    )
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
