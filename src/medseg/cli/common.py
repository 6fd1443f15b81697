"""Helpers shared by every ``medseg`` command module: argument types, the training options
(their choices read from the registries), the training configuration they make, and output."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from medseg import api
from medseg.errors import MedsegError
from medseg.evaluation.biometry import pixel_sizes_for
from medseg.inference.batch import collect_inputs, group_inputs
from medseg.losses import CLASS_WEIGHTINGS, registered_losses
from medseg.models import registered_models
from medseg.runtime import PRECISIONS
from medseg.serialization import to_jsonable
from medseg.training import TrainConfig
from medseg.training.config import OPTIMIZERS
from medseg.training.precision import COMPILE_SETTINGS
from medseg.training.sampling import CLASS_SAMPLING
from medseg.transforms import AugmentConfig

ALL_FOLDS = [-1]  # what ``--folds all`` parses to; see resolve_folds
DEFAULT_BUDGET_MINUTES = 60.0  # training time without --epochs or --time-budget


def parse_folds(value: str | None) -> list[int] | None:
    """``--folds``: ``all`` (:data:`ALL_FOLDS`) or fold numbers like ``0,1,2``."""
    if value is None:
        return None
    if value == "all":
        return list(ALL_FOLDS)
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--folds takes 'all' or numbers like 0,1,2 (got {value!r})"
        ) from None


def resolve_folds(folds: list[int] | None, num_folds: int) -> list[int] | None:
    """``--folds all`` as the fold numbers ``0 .. num_folds - 1``; other values unchanged."""
    if folds == ALL_FOLDS:
        return list(range(num_folds))
    return folds


def trained_folds(folds: list[int] | None) -> list[int] | None:
    """``--folds all`` (or no ``--folds``) as None: every trained fold of a model folder."""
    return None if folds is None or folds == ALL_FOLDS else folds


def comma_list(value: str) -> list[str]:
    """A non-empty comma-separated list (e.g. model folders)."""
    items = [v for v in value.split(",") if v]
    if not items:
        raise argparse.ArgumentTypeError("give at least one folder")
    return items


def comma_floats(value: str) -> list[float]:
    """Comma-separated numbers like ``0.3,0.7``."""
    try:
        return [float(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0.3,0.7 (got {value!r})") from None


def add_scale_options(p: argparse.ArgumentParser, *, command: str) -> None:
    """Scale-out options: ``--nproc``/``--threads`` for ``train``, ``--engine``/``--address``
    for ``predict`` (whose ``--workers`` then counts worker processes or Ray actors)."""
    g = p.add_argument_group("scale out")
    if command == "train":
        g.add_argument(
            "--nproc",
            type=int,
            default=1,
            help="data-parallel ranks on this machine (gloo on CPU, NCCL on GPUs); under "
            "torchrun every process is a rank already",
        )
        g.add_argument(
            "--threads", type=int, help="CPU threads per process (default: cores / ranks)"
        )
    else:
        g.add_argument(
            "--engine",
            choices=("local", "ray"),
            help="fan the cases out over --workers processes on this machine (local) or "
            "Ray actors (ray); default: one process with --workers reader threads",
        )
        g.add_argument(
            "--address", help="with --engine ray: the Ray cluster (default: a local instance)"
        )


def add_train_options(p: argparse.ArgumentParser) -> None:
    """The training options shared by ``train``, ``run``, ``distill`` and ``tune``."""
    g = p.add_argument_group("training")
    g.add_argument("--folds", type=parse_folds, help="folds to train: 0 (default), 0,1 or all")
    g.add_argument("--num-folds", type=int, help="k of the k-fold split (default 5)")
    g.add_argument(
        "--split", help="a splits JSON ({train, val} or a list of them) instead of k-fold"
    )
    g.add_argument(
        "--time-budget",
        type=float,
        metavar="MINUTES",
        help="end training cleanly after this many minutes",
    )
    g.add_argument("--epochs", type=int, help="maximum epochs (default 1000)")
    g.add_argument("--iterations-per-epoch", type=int)
    g.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        help="auto (default): AdamW at 3e-3 with --time-budget, else SGD at 0.01",
    )
    g.add_argument("--learning-rate", type=float)
    g.add_argument("--loss", choices=registered_losses(task="segmentation"))
    g.add_argument(
        "--model",
        help="registered model (default: the plan's): "
        + ", ".join(registered_models(task="segmentation")),
    )
    g.add_argument("--batch-size", type=int)
    g.add_argument(
        "--early-stopping",
        type=int,
        metavar="EPOCHS",
        help="stop after this many epochs without a better validation Dice",
    )
    g.add_argument("--seed", type=int)
    g.add_argument(
        "--init-from",
        metavar="MODEL_DIR",
        help="fine-tune: start from a trained or pretrained medseg model's matching layers "
        "(new head); init_from.json in the fold folder lists loaded and new layers",
    )
    g.add_argument(
        "--freeze-epochs",
        type=int,
        metavar="EPOCHS",
        help="with --init-from: train only the new layers for this many epochs first",
    )
    g.add_argument(
        "--labelled-fraction",
        type=float,
        metavar="F",
        help="train on a reproducible share of the fold's training cases (drawn with --seed)",
    )
    g.add_argument(
        "--labelled-cases",
        type=int,
        metavar="N",
        help="train on N of the fold's training cases (drawn with --seed)",
    )
    g.add_argument(
        "--class-weighting",
        choices=CLASS_WEIGHTINGS,
        help="loss class weights from the training labels' class frequencies",
    )
    g.add_argument(
        "--class-sampling",
        choices=CLASS_SAMPLING,
        help="which class foreground patches are centred on (default rarest_half)",
    )
    g.add_argument(
        "--encoder-weights",
        metavar="FILE",
        help="torchvision-format ResNet state dict for the resnet*_unet models",
    )
    g.add_argument(
        "--modality-dropout",
        type=float,
        metavar="P",
        help="multi-channel data: zero each channel of a training sample with probability P "
        "(never all), so that `medseg predict --missing` works",
    )
    g.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="CPU training: auto (default) uses bfloat16 autocast where the CPU has native "
        "bf16 and a timing probe of the first batch finds it faster; fp32; bf16",
    )
    g.add_argument(
        "--compile",
        choices=COMPILE_SETTINGS,
        help="torch.compile the training step: auto (default) for runs of 10 minutes or more, "
        "kept only if its first steps are faster",
    )
    g.add_argument("--no-augmentation", action="store_true")
    g.add_argument(
        "--no-resume",
        action="store_true",
        help="start again instead of resuming from the last checkpoint",
    )


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of the options of :func:`add_train_options` (unset: defaults)."""
    config = TrainConfig()
    changes = {
        "time_budget_minutes": args.time_budget,
        "max_epochs": args.epochs,
        "iterations_per_epoch": args.iterations_per_epoch,
        "optimizer": args.optimizer,
        "learning_rate": args.learning_rate,
        "loss": args.loss,
        "seed": args.seed,
        "num_folds": args.num_folds,
        "early_stopping_patience": args.early_stopping,
        "batch_size": args.batch_size,
        "model": args.model,
        "device": args.device,
        "init_from": getattr(args, "init_from", None),
        "freeze_epochs": getattr(args, "freeze_epochs", None),
        "labelled_fraction": getattr(args, "labelled_fraction", None),
        "labelled_cases": getattr(args, "labelled_cases", None),
        "class_weighting": getattr(args, "class_weighting", None),
        "class_sampling": getattr(args, "class_sampling", None),
        "encoder_weights": getattr(args, "encoder_weights", None),
        "modality_dropout": getattr(args, "modality_dropout", None),
        "precision": getattr(args, "precision", None),
        "compile": getattr(args, "compile", None),
    }
    config = replace(config, **{k: v for k, v in changes.items() if v is not None})
    if args.no_augmentation:
        config = replace(config, augmentation=AugmentConfig(enabled=False))
    return config


def print_json(data: Any) -> None:
    """Print ``data`` (dataclasses, paths, numpy scalars...) as indented JSON on stdout."""
    print(json.dumps(to_jsonable(data), indent=2))


def with_default_budget(config: TrainConfig, args: argparse.Namespace) -> TrainConfig:
    """Without ``--epochs`` or ``--time-budget``, train for at most an hour (said on stderr)."""
    if config.time_budget_minutes is None and args.epochs is None:
        print(
            "medseg: no --epochs or --time-budget given: training for at most 60 minutes",
            file=sys.stderr,
        )
        return replace(config, time_budget_minutes=DEFAULT_BUDGET_MINUTES)
    return config


def predict_option_group(
    sub: argparse._SubParsersAction, title: str
) -> argparse._ArgumentGroup | None:
    """A new option group of ``medseg predict`` (None when that command is not registered)."""
    predict = sub.choices.get("predict")
    return None if predict is None else predict.add_argument_group(title)


def check_measure_inputs(args: argparse.Namespace) -> None:
    """``predict --measure``: refuse before predicting when an input has no pixel size."""
    if not getattr(args, "measure", False):
        for option in ("head", "pixel_size", "pixel_size_csv", "reference"):
            if getattr(args, option, None):
                raise MedsegError(f"--{option.replace('_', '-')} needs --measure")
        return
    if getattr(args, "uncertainty", False) or getattr(args, "probabilities", None):
        raise MedsegError(
            "--measure measures label maps only: predict without --uncertainty/--probabilities, "
            "or run medseg measure on the label maps"
        )
    cases = group_inputs(collect_inputs(args.input), 1)
    if cases:
        files = {case_id: paths[0] for case_id, paths in cases.items()}
        pixel_sizes_for(
            files,
            pixel_size=args.pixel_size,
            pixel_size_csv=args.pixel_size_csv,
            reference_csv=args.reference,
        )


def measure_predictions(args: argparse.Namespace, show_progress: bool) -> None:
    """``predict --measure``: measure OUTPUT's label maps into OUTPUT/measurements."""
    if not getattr(args, "measure", False):
        return
    out = Path(args.output) / "measurements"
    report = api.measure(
        args.output,
        out,
        head=args.head,
        pixel_size=args.pixel_size,
        pixel_size_csv=args.pixel_size_csv,
        reference=args.reference,
        images_dir=args.input if Path(args.input).is_dir() else None,
        overwrite=args.overwrite,
        show_progress=show_progress,
    )
    print(f"{report.summary['n_cases']} case(s) measured into {out}", file=sys.stderr)
