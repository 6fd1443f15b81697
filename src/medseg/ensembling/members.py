"""Loading the fold networks of trained model folders, and their class probabilities."""

from __future__ import annotations

import os

import numpy as np
import torch

from medseg.model_folder import ModelFolder
from medseg.models.sliding_window import sliding_window_logits
from medseg.planning.plan import Plan


def load_fold_models(
    source: str | os.PathLike,
    *,
    folds: list[int] | None = None,
    checkpoint: str = "best",
    device: torch.device | str = "cpu",
) -> tuple[Plan, list[torch.nn.Module]]:
    """The plan and the eval-mode networks of ``folds`` (default: every trained fold).

    ``source`` is a model folder or a work folder holding one (see
    :meth:`medseg.model_folder.ModelFolder.open`); ``checkpoint`` is ``"best"`` or ``"last"``.
    """
    folder = ModelFolder.open(source)
    return folder.plan, folder.load_networks(folds, kind=checkpoint, device=device)


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
