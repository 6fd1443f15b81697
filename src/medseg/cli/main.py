"""``medseg`` command line. Every command calls one function of :mod:`medseg.api`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace

from medseg import __version__
from medseg.errors import MedsegError
from medseg.settings import Settings


def _folds(value: str | None) -> list[int] | None:
    if value is None:
        return None
    if value == "all":
        return [-1]
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--folds takes 'all' or numbers like 0,1,2 (got {value!r})"
        ) from None


def _train_config(args: argparse.Namespace):
    from medseg.training import TrainConfig
    from medseg.transforms import AugmentConfig

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
        "class_weighting": getattr(args, "class_weighting", None),
        "class_sampling": getattr(args, "class_sampling", None),
        "encoder_weights": getattr(args, "encoder_weights", None),
    }
    config = replace(config, **{k: v for k, v in changes.items() if v is not None})
    if args.no_augmentation:
        config = replace(config, augmentation=AugmentConfig(enabled=False))
    return config


def _resolve_folds(folds: list[int] | None, num_folds: int) -> list[int] | None:
    if folds == [-1]:
        return list(range(num_folds))
    return folds


def _add_train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--folds", type=_folds, help="folds to train: 0 (default), 0,1 or all")
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
        choices=["auto", "sgd", "adamw"],
        help="auto (default): AdamW at 3e-3 with --time-budget, else SGD at 0.01",
    )
    g.add_argument("--learning-rate", type=float)
    g.add_argument(
        "--loss",
        choices=[
            "dice_ce",
            "ce",
            "dice",
            "jaccard",
            "tversky",
            "tversky_ce",
            "focal",
            "dice_focal",
            "generalized_dice",
            "dice_ce_hausdorff",
        ],
    )
    g.add_argument("--model", help="registered model name (default: the plan's)")
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
        help="fine-tune: start from a trained medseg model's matching layers (new head)",
    )
    g.add_argument(
        "--freeze-epochs",
        type=int,
        metavar="EPOCHS",
        help="with --init-from: train only the new layers for this many epochs first",
    )
    g.add_argument(
        "--class-weighting",
        choices=["inverse", "inverse_sqrt", "log"],
        help="loss class weights from the training labels' class frequencies",
    )
    g.add_argument(
        "--class-sampling",
        choices=["rarest_half", "uniform", "inverse_frequency"],
        help="which class foreground patches are centred on (default rarest_half)",
    )
    g.add_argument(
        "--encoder-weights",
        metavar="FILE",
        help="torchvision-format ResNet state dict for the resnet*_unet models",
    )
    g.add_argument("--no-augmentation", action="store_true")
    g.add_argument(
        "--no-resume",
        action="store_true",
        help="start again instead of resuming from the last checkpoint",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medseg", description="Self-configuring medical image segmentation."
    )
    parser.add_argument("--version", action="version", version=f"medseg {__version__}")
    parser.add_argument(
        "--settings", help="a settings JSON (work_dir, num_workers, device, show_progress)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 ...")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check", help="list every problem of a dataset folder")
    p.add_argument("dataset")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    for name, text in (
        ("plan", "fingerprint the dataset and write plan.json"),
        ("preprocess", "preprocess with the plan (cached)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("dataset")
        p.add_argument("-w", "--work-dir")
        if name == "plan":
            p.add_argument(
                "--gpu",
                action="store_true",
                default=None,
                help="plan for a GPU even if none is present",
            )
            p.add_argument(
                "--cpu", action="store_true", help="plan for a CPU even if a GPU is present"
            )
            p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("train", help="train fold(s) with the work folder's plan")
    p.add_argument("dataset")
    p.add_argument("-w", "--work-dir")
    _add_train_options(p)

    p = sub.add_parser(
        "predict", help="predict a file, folder or DICOM series with a trained model"
    )
    p.add_argument("model", help="model folder (or a work folder holding model/)")
    p.add_argument("input")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--folds", type=_folds, help="folds to ensemble (default: all trained)")
    p.add_argument("--tta", action="store_true", help="mirroring test-time augmentation")
    p.add_argument(
        "--largest-component", action="store_true", help="keep the largest component per class"
    )
    p.add_argument("--fill-holes", action="store_true", help="fill enclosed holes of each class")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("run", help="check, plan, preprocess, train, predict and evaluate")
    p.add_argument("dataset")
    p.add_argument("-w", "--work-dir")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--tta", action="store_true", help="mirroring TTA for the validation predictions"
    )
    p.add_argument("--largest-component", action="store_true")
    p.add_argument("--fill-holes", action="store_true")
    _add_train_options(p)

    p = sub.add_parser("demo", help="train and evaluate on built-in phantoms in a few minutes")
    p.add_argument("--dataset", help="run the same on a dataset folder instead")
    p.add_argument("-w", "--work-dir", default="medseg_demo")
    p.add_argument("--time-budget", type=float, default=3.0, metavar="MINUTES")
    p.add_argument("--overwrite", action="store_true")

    for module in _command_modules():
        module.add_commands(sub)
    return parser


def _command_modules():
    """Command groups kept in their own modules; each has ``add_commands(sub)`` and sets
    ``handler(args, settings, show_progress) -> exit code`` on its parsers."""
    from medseg.cli import classical, deploy, evaluation, hospital, registration, zoo

    return (evaluation, classical, registration, deploy, hospital, zoo)


def _print_json(data) -> None:
    from medseg.serialization import to_jsonable

    print(json.dumps(to_jsonable(data), indent=2))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _dispatch(args)
    except MedsegError as exc:
        print(f"medseg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medseg: interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from medseg import api

    settings = Settings.from_file(args.settings) if args.settings else Settings()
    settings = settings.with_(device=args.device, work_dir=getattr(args, "work_dir", None))
    show = settings.show_progress and not args.quiet
    handler = getattr(args, "handler", None)
    if handler is not None:
        return handler(args, settings, show)
    if args.command == "check":
        report = api.check(args.dataset, num_workers=settings.num_workers)
        if args.json:
            _print_json(report)
        else:
            print(report.format())
        return 0 if report.ok else 1
    if args.command == "plan":
        gpu = False if args.cpu else (True if args.gpu else None)
        plan = api.plan(
            args.dataset,
            settings.work_dir,
            gpu=gpu,
            overwrite=args.overwrite,
            num_workers=settings.num_workers,
            show_progress=show,
        )
        _print_json(plan)
        print(
            f"plan written to {settings.work_dir}/plan.json (edit it, then `medseg train`)",
            file=sys.stderr,
        )
        return 0
    if args.command == "preprocess":
        out = api.preprocess(
            args.dataset, settings.work_dir, num_workers=settings.num_workers, show_progress=show
        )
        print(out)
        return 0
    if args.command in ("train", "run"):
        config = replace(
            _train_config(args), device=settings.device if args.device is None else args.device
        )
        if config.time_budget_minutes is None and args.epochs is None:
            print(
                "medseg: no --epochs or --time-budget given: training for at most 60 minutes",
                file=sys.stderr,
            )
            config = replace(config, time_budget_minutes=60.0)
        folds = _resolve_folds(args.folds, config.num_folds)
        if args.command == "train":
            results = api.train(
                args.dataset,
                settings.work_dir,
                folds=folds,
                config=config,
                split_file=args.split,
                resume=not args.no_resume,
                num_workers=settings.num_workers,
                show_progress=show,
            )
            _print_json(results)
        else:
            summary = api.run(
                args.dataset,
                settings.work_dir,
                folds=folds,
                config=config,
                split_file=args.split,
                mirror=args.tta,
                largest_component=args.largest_component,
                fill_holes=args.fill_holes,
                overwrite=args.overwrite,
                num_workers=settings.num_workers,
                show_progress=show,
            )
            _print_json(summary)
        return 0
    if args.command == "demo":
        summary = api.demo(
            args.work_dir,
            dataset=args.dataset,
            time_budget_minutes=args.time_budget,
            overwrite=args.overwrite,
            show_progress=show,
        )
        print(f"report: {summary['report']}", file=sys.stderr)
        _print_json({k: summary[k] for k in summary if k in ("test", "folds", "report")})
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
