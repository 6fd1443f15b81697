"""The training task of an extension step: segmentation with a method's supervised loss.

:class:`ExtensionTask` is a :class:`medseg.training.segmentation.SegmentationTask` whose
supervised loss depends on the method (the distillation and regularization terms are
hooks, :mod:`medseg.continual.hooks`):

- ``naive``, ``lwf``, ``rehearsal``, ``ewc``: the plan's loss on the new labels;
- ``mib``: MiB's unbiased cross-entropy + Dice over the classes the new data label;
- ``plop``: cross-entropy + Dice on PLOP's pseudo-labels (old classes filled in by the
  confident old network, uncertain voxels ignored).

Validation scores only the classes the new data label: the old classes appear as
background there, so a score over every class would reward forgetting. For the same
reason every epoch's weights count as the best (the step ends with its last weights).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.continual.heads import GrownNetwork, head_modules
from medseg.continual.hooks import OldModel
from medseg.continual.losses import MaskedDiceCE, UnbiasedDiceCE, pseudo_labels
from medseg.losses import DeepSupervisionLoss
from medseg.model_folder import build_network
from medseg.planning.plan import Plan
from medseg.training.config import TrainConfig
from medseg.training.engine import Validation
from medseg.training.segmentation import SegmentationTask, validate


@dataclass(frozen=True)
class StepLabels:
    """How the labels of an extension step relate.

    Parameters
    ----------
    mode
        ``"class"`` (new classes) or ``"domain"`` (the same classes, new data).
    old_classes
        Output classes of the old network (background included).
    classes
        Output classes after the step.
    labelled
        Foreground classes the new data label (new ones and re-labelled old ones).
    unlabelled_old
        Old foreground classes the new data do not label (background there).
    """

    mode: str
    old_classes: int
    classes: int
    labelled: tuple[int, ...]
    unlabelled_old: tuple[int, ...]

    @property
    def new(self) -> tuple[int, ...]:
        """The classes this step adds."""
        return tuple(range(self.old_classes, self.classes))


class ExtensionTask(SegmentationTask):
    """One extension step on the engine (see the module).

    Parameters
    ----------
    plan, preprocessed_dir, fold_dir, config, train_ids, val_ids
        As for :class:`SegmentationTask` (the plan with the grown label map).
    old_plan
        The old model's plan: in a class-incremental step the network trains as a
        :class:`medseg.continual.heads.GrownNetwork` around the old architecture, so
        the old classes' logits start bit-identical.
    labels
        The step's label relation.
    method
        ``naive``, ``lwf``, ``mib``, ``plop``, ``rehearsal`` or ``ewc``.
    old
        The frozen old network (``mib`` and ``plop`` need it; the hooks share it).
    """

    def __init__(
        self,
        plan: Plan,
        preprocessed_dir: str | os.PathLike,
        fold_dir: str | os.PathLike,
        config: TrainConfig,
        *,
        train_ids: list[str],
        val_ids: list[str],
        labels: StepLabels,
        method: str,
        old_plan: Plan,
        old: OldModel | None = None,
    ) -> None:
        super().__init__(
            plan, preprocessed_dir, fold_dir, config, train_ids=train_ids, val_ids=val_ids
        )
        if method in ("mib", "plop") and old is None:
            raise ValueError(f"method {method!r} needs the old network")
        self.labels, self.method, self.old = labels, method, old
        self.old_plan = old_plan

    def setup(self, device: torch.device) -> nn.Module:
        model = super().setup(device)
        if self.labels.new:  # the old modules as they are, plus heads for the new classes
            base = build_network(
                self.old_plan, name=self.network_name, deep_supervision=self.config.deep_supervision
            )
            heads = head_modules(base.state_dict(), model.state_dict())
            model = GrownNetwork(
                base,
                old_classes=self.labels.old_classes,
                new_classes=self.labels.classes,
                heads=heads,
            )
            model = model.to(device).to(memory_format=self.fmt)
        self.has_validation = False  # the step ends with its last weights (see the module)
        num_outputs = len(self.criterion.weights)
        if self.method == "mib":
            background = (0, *self.labels.unlabelled_old)
            loss = UnbiasedDiceCE(background=background, labelled=self.labels.labelled)
            self.criterion = DeepSupervisionLoss(loss, num_outputs)
        elif self.method == "plop":
            self.criterion = DeepSupervisionLoss(MaskedDiceCE(), num_outputs)
        if self.old is not None:
            self.old.to(device)
        return model

    def forward_loss(
        self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[Any, torch.Tensor]:
        x, y = batch
        outputs = model(x)
        if self.method == "plop" and self.old is not None and self.labels.unlabelled_old:
            y = pseudo_labels(y, self.old(x))
        return outputs, self.criterion(outputs, y)

    def validate(self, model: nn.Module) -> Validation:
        if not self.val_cases:
            return Validation(score=float("nan"))
        with warnings.catch_warnings():  # a class absent from every case: NaN, said once
            warnings.simplefilter("ignore", RuntimeWarning)
            per_class = validate(model, self.val_cases, self.plan, self.device, mirror=False)
        scored = {self.class_names[c]: float(per_class[c - 1]) for c in self.labels.labelled}
        with np.errstate(all="ignore"):
            mean = float(np.nanmean(list(scored.values()))) if scored else float("nan")
        return Validation(
            score=mean,
            columns={"val_dice_new_mean": mean, **{f"val_dice_{k}": v for k, v in scored.items()}},
            details=scored,
        )

    def weights_metadata(self, epoch: int, score: float) -> dict[str, Any]:
        return {**super().weights_metadata(epoch, score), "continual_method": self.method}
