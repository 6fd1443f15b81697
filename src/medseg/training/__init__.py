"""Training: configuration, splits, sampling and the loop."""

from medseg.training.config import TrainConfig
from medseg.training.splits import make_folds, read_splits, write_splits
from medseg.training.trainer import TrainResult, build_model, train_fold

__all__ = [
    "TrainConfig",
    "TrainResult",
    "build_model",
    "make_folds",
    "read_splits",
    "train_fold",
    "write_splits",
]
