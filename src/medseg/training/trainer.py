"""Train one fold of a segmentation dataset: the :class:`SegmentationTask` on the engine."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError
from medseg.planning.plan import Plan
from medseg.serialization import write_json_atomic
from medseg.training.config import TrainConfig
from medseg.training.engine import Engine, Hook
from medseg.training.finetune import check_train_config
from medseg.training.segmentation import SegmentationTask, loop_config

DISTILL_HOOK = "distill"  # the name of the hook that acts on ``TrainConfig.distill``


@dataclass(frozen=True)
class TrainResult:
    fold_dir: str
    epochs: int
    iterations: int
    elapsed_seconds: float
    best_epoch: int
    best_val_dice: float
    best_val_dice_per_class: dict[str, float]
    iterations_per_second: float
    samples_per_second: float
    data_wait_share: float  # share of step time the network waited for a batch
    data_prep_seconds_per_batch: float  # CPU time to sample and augment one batch
    stopped_because: str
    precision: str = "fp32"  # what the steps computed in (CPU "bf16": bfloat16 autocast)


class EpochCallback(Hook):
    """``on_epoch(row) -> bool`` as a hook: True stops training as ``"pruned"``."""

    name = "on_epoch"

    def __init__(self, on_epoch: Callable[[dict[str, Any]], bool]) -> None:
        self.on_epoch = on_epoch

    def on_epoch_end(self, engine: Engine, row: dict[str, Any]) -> str | None:
        return "pruned" if self.on_epoch(row) else None


def train_fold(
    plan: Plan,
    preprocessed_dir: str | os.PathLike,
    fold_dir: str | os.PathLike,
    config: TrainConfig,
    *,
    train_ids: list[str],
    val_ids: list[str],
    resume: bool = True,
    show_progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], bool] | None = None,
    hooks: Sequence[Hook] = (),
) -> TrainResult:
    """Train one fold into ``fold_dir`` (weights, checkpoint, logs, curves); resume from
    its last checkpoint.

    Parameters
    ----------
    plan, preprocessed_dir
        The plan and its preprocessed cases.
    fold_dir
        The fold folder: ``train_config.json``, ``weights_best``/``weights_last``,
        ``checkpoint_last.pt``, ``log.csv``, ``curves.png``, ``train_result.json``.
    config
        The training configuration; ``optimizer="auto"`` and the default rate are
        resolved and recorded in ``train_config.json``.
    train_ids, val_ids
        The fold's cases.
    resume
        Continue from ``checkpoint_last.pt`` when it exists.
    show_progress
        A progress bar per epoch.
    on_epoch
        ``on_epoch(row) -> bool`` sees each epoch's log row after the checkpoint is
        saved; returning True stops training (e.g. a pruned hyper-parameter trial).
    hooks
        Engine hooks (:class:`medseg.training.engine.Hook`). ``config.distill`` needs
        the distillation hook (``medseg.distillation.make_distillation_hook``), which
        the workflow attaches.

    Returns
    -------
    TrainResult
        Also written to ``fold_dir/train_result.json``.
    """
    check_train_config(config, plan)  # a bad configuration fails before any work
    if config.distill is not None and DISTILL_HOOK not in {h.name for h in hooks}:
        raise MedsegError(
            "config.distill is set but no distillation hook was given "
            "(train through medseg.api, or pass medseg.distillation.make_distillation_hook)"
        )
    # The log and train_config.json name the optimizer and rate actually used.
    config = replace(
        config,
        optimizer=config.resolved_optimizer(),
        learning_rate=config.resolved_learning_rate(),
    )
    fold_dir = Path(fold_dir)
    fold_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(config, fold_dir / "train_config.json")
    task = SegmentationTask(
        plan, preprocessed_dir, fold_dir, config, train_ids=train_ids, val_ids=val_ids
    )
    all_hooks = [*hooks, *([EpochCallback(on_epoch)] if on_epoch is not None else [])]
    engine = Engine(
        task,
        fold_dir,
        loop_config(config),
        hooks=all_hooks,
        resume=resume,
        show_progress=show_progress,
    )
    loop = engine.fit()
    result = TrainResult(
        fold_dir=str(fold_dir),
        epochs=loop.epochs,
        iterations=loop.iterations,
        elapsed_seconds=round(loop.elapsed_seconds, 2),
        best_epoch=loop.best_epoch,
        best_val_dice=-1.0 if loop.best_score is None else loop.best_score,
        best_val_dice_per_class=loop.best_details,
        iterations_per_second=round(loop.iterations_per_second, 4),
        samples_per_second=round(loop.samples_per_second, 3),
        data_wait_share=round(loop.data_wait_share, 4),
        data_prep_seconds_per_batch=round(loop.data_prep_seconds_per_batch, 4),
        stopped_because=loop.stopped_because,
        precision=loop.precision,
    )
    if engine.main_process:  # rank 0 of a data-parallel run writes; the others only return
        write_json_atomic(result, fold_dir / "train_result.json")
    return result
