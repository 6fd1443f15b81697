"""Training: configuration, splits, sampling, the engine (one loop) and segmentation on it."""

from medseg.training.config import DistillConfig, TrainConfig
from medseg.training.engine import (
    Engine,
    Hook,
    LoopConfig,
    LoopResult,
    TrainingTask,
    Validation,
    learning_rate,
    make_optimizer,
)
from medseg.training.segmentation import SegmentationTask
from medseg.training.splits import make_folds, read_splits, write_splits
from medseg.training.trainer import TrainResult, train_fold

__all__ = [
    "DistillConfig",
    "Engine",
    "Hook",
    "LoopConfig",
    "LoopResult",
    "SegmentationTask",
    "TrainConfig",
    "TrainResult",
    "TrainingTask",
    "Validation",
    "learning_rate",
    "make_optimizer",
    "make_folds",
    "read_splits",
    "train_fold",
    "write_splits",
]
