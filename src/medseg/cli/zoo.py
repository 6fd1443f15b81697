"""``medseg ensemble``, ``medseg ensemble-select``, ``medseg distill`` and ``medseg tune``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from medseg import api
from medseg.cli.common import (
    add_train_options,
    comma_floats,
    comma_list,
    parse_folds,
    print_json,
    resolve_folds,
    train_config,
    trained_folds,
    with_default_budget,
)
from medseg.ensembling import METHODS as ENSEMBLE_METHODS
from medseg.errors import MedsegError
from medseg.models import registered_models
from medseg.settings import Settings
from medseg.training import TrainConfig
from medseg.tuning.search import PRUNERS, SAMPLERS


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ensemble", help="predict with several trained models combined")
    p.add_argument("input", help="an image file or a folder of images")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument(
        "--models", type=comma_list, required=True, help="model folders, comma-separated"
    )
    p.add_argument("--method", choices=ENSEMBLE_METHODS, default="mean")
    p.add_argument("--weights", type=comma_floats, help="one weight per model (--method weighted)")
    p.add_argument(
        "--from-selection",
        metavar="JSON",
        help="use the best combination of an `ensemble-select` result instead of --models",
    )
    p.add_argument("--folds", type=parse_folds, help="folds of each model (default: all trained)")
    p.add_argument("--tta", action="store_true", help="mirroring test-time augmentation")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=run_ensemble)

    p = sub.add_parser(
        "ensemble-select",
        help="score models and their combinations on cross-validation; pick the best",
    )
    p.add_argument(
        "--models", type=comma_list, required=True, help="model folders, comma-separated"
    )
    p.add_argument("-o", "--output", required=True, help="selection JSON to write")
    p.add_argument("--methods", type=lambda v: tuple(v.split(",")), default=ENSEMBLE_METHODS)
    p.add_argument("--max-members", type=int, default=3)
    p.add_argument("--folds", type=parse_folds)
    p.add_argument("--tta", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=run_select)

    p = sub.add_parser("distill", help="train a small student on a teacher's soft labels")
    p.add_argument("dataset")
    p.add_argument("-w", "--work-dir", help="the student's work folder")
    p.add_argument(
        "--teacher", type=comma_list, required=True, help="teacher model folder(s), comma-separated"
    )
    p.add_argument(
        "--student",
        default="mobile_unet",
        help="registered architecture: " + ", ".join(registered_models(task="segmentation")),
    )
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--distill-weight", type=float, default=0.5, help="share of the KL term (0..1)")
    p.add_argument(
        "--feature-weight",
        type=float,
        default=0.0,
        help="weight of feature distillation on the decoder levels (0: off)",
    )
    add_train_options(p)
    p.set_defaults(handler=run_distill)

    p = sub.add_parser("tune", help="hyper-parameter search with Optuna")
    p.add_argument("dataset")
    p.add_argument("-w", "--work-dir")
    p.add_argument("--space", required=True, help="search space YAML")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe")
    p.add_argument("--pruner", choices=PRUNERS, default="median")
    p.add_argument("--parallel", type=int, default=1, help="trials at once (threads)")
    p.add_argument("--fold", type=int, default=0, help="the fold every trial trains")
    p.add_argument(
        "--trial-minutes",
        type=float,
        metavar="MINUTES",
        help="each trial trains for this long (its own warmup and schedule) instead of --epochs",
    )
    add_train_options(p)
    p.set_defaults(handler=run_tune)


def run_ensemble(args: argparse.Namespace, settings: Settings, show_progress: bool) -> int:
    models, method, weights = args.models, args.method, args.weights
    if args.from_selection:
        try:
            best = json.loads(Path(args.from_selection).read_text())["best"]
        except (OSError, KeyError, json.JSONDecodeError):
            raise MedsegError(f"{args.from_selection}: not an ensemble-select result") from None
        models = list(best["members"])
        method = "mean" if best["method"] == "single" else best["method"]
        weights = best.get("weights")
    written = api.ensemble(
        models,
        args.input,
        args.output,
        method=method,
        weights=weights,
        folds=trained_folds(args.folds),
        mirror=args.tta,
        overwrite=args.overwrite,
        device=settings.device if settings.device != "auto" else "cpu",
        show_progress=show_progress,
    )
    print(f"{len(written)} case(s) written to {args.output}", file=sys.stderr)
    return 0


def run_select(args: argparse.Namespace, settings: Settings, show_progress: bool) -> int:
    path = api.select_ensemble(
        args.models,
        args.output,
        methods=args.methods,
        max_members=args.max_members,
        folds=trained_folds(args.folds),
        mirror=args.tta,
        overwrite=args.overwrite,
        device=settings.device if settings.device != "auto" else "cpu",
        show_progress=show_progress,
    )
    print(json.dumps(json.loads(path.read_text())["best"], indent=2))
    return 0


def run_distill(args: argparse.Namespace, settings: Settings, show_progress: bool) -> int:
    config = with_default_budget(train_config(args), args)
    results = api.distill(
        args.dataset,
        settings.work_dir,
        teachers=args.teacher,
        student=args.student,
        temperature=args.temperature,
        weight=args.distill_weight,
        feature_weight=args.feature_weight,
        config=config,
        folds=resolve_folds(args.folds, config.num_folds),
        split_file=args.split,
        num_workers=settings.num_workers,
        show_progress=show_progress,
    )
    print_json(results)
    return 0


def run_tune(args: argparse.Namespace, settings: Settings, show_progress: bool) -> int:
    config = train_config(args)
    summary = api.tune(
        args.dataset,
        settings.work_dir,
        space=args.space,
        trials=args.trials,
        time_budget_minutes=config.time_budget_minutes,
        sampler=args.sampler,
        pruner=args.pruner,
        # The budget is the whole search's; each trial trains for --trial-minutes or
        # --epochs (default 50).
        config=_trial_config(config, args),
        fold=args.fold,
        seed=config.seed,
        num_workers=settings.num_workers,
        parallel=args.parallel,
        show_progress=show_progress,
    )
    print_json(summary)
    return 0


def _trial_config(config: TrainConfig, args: argparse.Namespace) -> TrainConfig:
    if args.trial_minutes is not None and args.trial_minutes <= 0:
        raise MedsegError(f"--trial-minutes must be positive (got {args.trial_minutes})")
    return replace(
        config,
        time_budget_minutes=args.trial_minutes,
        # A timed trial keeps the trainer's epoch cap; an untimed one stops at 50 epochs.
        max_epochs=args.epochs or (config.max_epochs if args.trial_minutes else 50),
    )
