"""Training options: a frozen dataclass that round-trips to JSON."""

from __future__ import annotations

from dataclasses import dataclass, field

from medseg.transforms.augment import AugmentConfig

OPTIMIZERS = ("auto", "sgd", "adamw")


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation: soft labels of a teacher (one or several model folders,
    all their folds averaged) at ``temperature``, mixed with the supervised loss.

    loss = (1 - weight) * supervised + weight * T^2 * KL(teacher_T || student_T)
           + feature_weight * mean MSE(adapter(student decoder level), teacher decoder level)

    ``feature_weight > 0`` adds FitNets-style feature distillation on every decoder level
    (a learned 1x1 convolution maps the student's channels to each teacher network's).
    """

    teachers: tuple[str, ...] = ()
    temperature: float = 2.0
    weight: float = 0.5
    feature_weight: float = 0.0
    # The teacher's forward pass: "auto" runs it under bfloat16 autocast on CPUs with
    # native bf16 (a third of its fp32 time; soft labels at T >= 1 do not need fp32).
    teacher_precision: str = "auto"


@dataclass(frozen=True)
class TrainConfig:
    """How to train one fold. A variant is a different config, not a subclass."""

    fold: int = 0
    num_folds: int = 5
    loss: str = "dice_ce"
    # "sgd" (Nesterov, poly decay), "adamw" (warmup + cosine) or "auto": AdamW when a time
    # budget bounds the run, else SGD. nnU-Net's SGD recipe is made for ~250k iterations; a
    # CPU budget gives a few hundred to a few thousand, where AdamW at 3e-3 learns faster
    # (2-core AMD EPYC, 30 min hippocampus: Dice 0.849 vs 0.834; 3 min demo: 0.93 vs 0.88).
    optimizer: str = "auto"
    learning_rate: float | None = None  # None: 0.01 for SGD, 3e-3 for AdamW
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
    # Loss weights from the training labels' class frequencies when class_weights is None:
    # None (off), "inverse", "inverse_sqrt" or "log" (see medseg.losses.zoo).
    class_weighting: str | None = None
    # Which class a foreground-centred patch is centred on: "rarest_half" (half the draws
    # take the case's rarest class), "uniform" (present classes equally) or
    # "inverse_frequency" (classes drawn by 1/frequency over the training set).
    class_sampling: str = "rarest_half"
    # Fine-tuning: a medseg model folder (or checkpoint) whose matching layers start the
    # network; the output heads are re-initialized when the classes differ. The encoder
    # stays frozen for the first `freeze_epochs` epochs, then everything trains.
    init_from: str | None = None
    freeze_epochs: int = 0
    # Label-efficient training: train on a reproducible subset of the fold's training
    # cases (a fraction, or a number of cases), drawn with `seed`; the choice is written
    # to the fold folder (labelled_subset.json). None: every training case.
    labelled_fraction: float | None = None
    labelled_cases: int | None = None
    # A torchvision-format state dict for pretrained 2D encoders (resnet*_unet models).
    encoder_weights: str | None = None
    distill: DistillConfig | None = None
    augmentation: AugmentConfig = field(default_factory=AugmentConfig)
    # Modality dropout (multi-channel data): each channel of each training sample is zeroed
    # with this probability (never all of a sample's channels), so that the model can
    # predict with channels missing (medseg.transforms.modality_dropout). 0: off.
    modality_dropout: float = 0.0
    mirror_validation: bool = False
    amp: bool = True  # CUDA only
    # CPU: "auto" trains under bfloat16 autocast only where the CPU has native bf16 and a
    # probe of the first batch finds it faster (medseg.training.precision); "fp32", "bf16".
    precision: str = "auto"
    # "auto" torch.compiles the training step of runs of 10 minutes or more (where a C++
    # compiler is present) and keeps it only if its first steps are faster; "on", "off".
    compile: str = "auto"
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1" ...
    num_threads: int | None = None  # None: the cores this process may use

    def resolved_optimizer(self) -> str:
        if self.optimizer != "auto":
            return self.optimizer
        return "adamw" if self.time_budget_minutes else "sgd"

    def resolved_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 0.01 if self.resolved_optimizer() == "sgd" else 3e-3
