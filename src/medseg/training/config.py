"""Training options: a frozen dataclass that round-trips to JSON."""

from __future__ import annotations

from dataclasses import dataclass, field

from medseg.transforms.augment import AugmentConfig


@dataclass(frozen=True)
class TrainConfig:
    """How to train one fold. A variant is a different config, not a subclass."""

    fold: int = 0
    num_folds: int = 5
    loss: str = "dice_ce"
    optimizer: str = "sgd"  # "sgd" (Nesterov, poly decay) | "adamw" (warmup + cosine)
    learning_rate: float | None = None  # None: 0.01 for SGD, 1e-3 for AdamW
    weight_decay: float = 3e-5
    momentum: float = 0.99
    warmup_fraction: float = 0.05  # AdamW only
    iterations_per_epoch: int = 100
    max_epochs: int = 1000
    time_budget_minutes: float | None = None
    early_stopping_patience: int | None = None  # epochs without a better validation Dice
    max_validation_cases: int = 50
    seed: int = 0
    batch_size: int | None = None  # None: the plan's
    model: str | None = None  # None: the plan's network name
    deep_supervision: bool = True
    class_weights: tuple[float, ...] | None = None
    augmentation: AugmentConfig = field(default_factory=AugmentConfig)
    mirror_validation: bool = False
    amp: bool = True  # CUDA only
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1" ...
    num_threads: int | None = None  # None: the cores this process may use

    def resolved_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 0.01 if self.optimizer == "sgd" else 1e-3
