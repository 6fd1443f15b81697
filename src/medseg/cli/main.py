"""``medseg`` command line. Each command calls one function of :mod:`medseg.api` (the ``pacs``
and ``serve`` commands: :mod:`medseg.pacs` and :mod:`medseg.serve`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace

from medseg import __version__, api
from medseg.cli import (
    classical,
    continual,
    deploy,
    evaluation,
    federated,
    hospital,
    pretraining,
    registration,
    trust,
    zoo,
)
from medseg.cli.common import (
    add_scale_options,
    add_train_options,
    comma_list,
    parse_folds,
    print_json,
    resolve_folds,
    train_config,
    with_default_budget,
)
from medseg.errors import MedsegError
from medseg.settings import Settings

# Command groups kept in their own modules; each has ``add_commands(sub)`` and sets
# ``handler(args, settings, show_progress) -> exit code`` on its parsers.
COMMAND_MODULES = (
    evaluation,
    classical,
    registration,
    deploy,
    hospital,
    zoo,
    pretraining,
    continual,
    federated,
    trust,
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
        if name == "preprocess":
            p.add_argument(
                "--coregister",
                nargs="?",
                const="rigid",
                choices=("rigid", "affine", "header"),
                help="first put every channel on channel 0's grid in WORK_DIR/coregistered "
                "(rigid, the default, or affine registration; header: resampling only)",
            )
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
    add_train_options(p)
    add_scale_options(p, command="train")

    p = sub.add_parser(
        "predict", help="predict a file, folder or DICOM series with a trained model"
    )
    p.add_argument("model", help="model folder (or a work folder holding model/)")
    p.add_argument("input")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--folds", type=parse_folds, help="folds to ensemble (default: all trained)")
    p.add_argument("--tta", action="store_true", help="mirroring test-time augmentation")
    p.add_argument(
        "--largest-component", action="store_true", help="keep the largest component per class"
    )
    p.add_argument("--fill-holes", action="store_true", help="fill enclosed holes of each class")
    p.add_argument("--overwrite", action="store_true")
    add_scale_options(p, command="predict")
    p.add_argument(
        "--missing",
        type=comma_list,
        metavar="CHANNELS",
        help="predict without these channels (names or numbers, e.g. T2); needs a model "
        "trained with --modality-dropout",
    )

    p = sub.add_parser("run", help="check, plan, preprocess, train, predict and evaluate")
    p.add_argument("dataset")
    p.add_argument("-w", "--work-dir")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--tta", action="store_true", help="mirroring TTA for the validation predictions"
    )
    p.add_argument("--largest-component", action="store_true")
    p.add_argument("--fill-holes", action="store_true")
    add_train_options(p)

    p = sub.add_parser("demo", help="train and evaluate on built-in phantoms in a few minutes")
    p.add_argument("--dataset", help="run the same on a dataset folder instead")
    p.add_argument("-w", "--work-dir", default="medseg_demo")
    p.add_argument("--time-budget", type=float, default=3.0, metavar="MINUTES")
    p.add_argument("--overwrite", action="store_true")

    for module in COMMAND_MODULES:
        module.add_commands(sub)
    return parser


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
    settings = Settings.from_file(args.settings) if args.settings else Settings()
    settings = settings.with_(device=args.device, work_dir=getattr(args, "work_dir", None))
    show = settings.show_progress and not args.quiet
    handler = getattr(args, "handler", None)
    if handler is not None:
        return handler(args, settings, show)
    if args.command == "check":
        report = api.check(args.dataset, num_workers=settings.num_workers)
        if args.json:
            print_json(report)
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
        print_json(plan)
        print(
            f"plan written to {settings.work_dir}/plan.json (edit it, then `medseg train`)",
            file=sys.stderr,
        )
        return 0
    if args.command == "preprocess":
        out = api.preprocess(
            args.dataset,
            settings.work_dir,
            coregister=args.coregister,
            num_workers=settings.num_workers,
            show_progress=show,
        )
        if args.coregister:
            print(
                f"channels co-registered into {settings.work_dir}/coregistered "
                f"(train on it: medseg train {settings.work_dir}/coregistered -w {settings.work_dir})",
                file=sys.stderr,
            )
        print(out)
        return 0
    if args.command in ("train", "run"):
        config = replace(
            train_config(args), device=settings.device if args.device is None else args.device
        )
        config = with_default_budget(config, args)
        if getattr(args, "threads", None):  # train --threads
            config = replace(config, num_threads=args.threads)
        folds = resolve_folds(args.folds, config.num_folds)
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
                nproc=args.nproc,
            )
            print_json(results)
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
            print_json(summary)
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
        print_json({k: summary[k] for k in summary if k in ("test", "folds", "report")})
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
