"""``medseg pretrain``: self-supervised pretraining of the plan's encoder on unlabelled images."""

from __future__ import annotations

import argparse
import sys

from medseg import api
from medseg.cli.common import print_json
from medseg.pretraining import METHODS, PretrainConfig
from medseg.settings import Settings


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``pretrain`` to the medseg parser."""
    p = sub.add_parser(
        "pretrain",
        help="self-supervised pretraining on unlabelled images (then train --init-from)",
        description="Pretrain the plan's U-Net encoder on unlabelled images; the work "
        "folder's model/ is then given to `medseg train --init-from`.",
    )
    p.add_argument("images", help="a dataset folder (labels ignored) or a folder of images")
    p.add_argument("-w", "--work-dir")
    p.add_argument("--method", choices=METHODS, default="mae", help="default: mae")
    p.add_argument(
        "--plan",
        metavar="PLAN",
        help="the fine-tuning plan (plan.json, or its work or model folder), so that the "
        "encoder fits it exactly (default: plan the images)",
    )
    p.add_argument(
        "--split",
        metavar="JSON",
        help="use only the training cases of a splits JSON (fold --fold)",
    )
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--time-budget", type=float, metavar="MINUTES")
    p.add_argument("--epochs", type=int, help="maximum epochs (default 1000)")
    p.add_argument("--iterations-per-epoch", type=int)
    p.add_argument("--max-steps", type=int, help="stop after this many steps in all")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--mask-ratio", type=float, help="mae: share of cells hidden (0.6)")
    p.add_argument("--temperature", type=float, help="contrastive: InfoNCE temperature (0.2)")
    p.add_argument("--seed", type=int)
    p.add_argument("--no-resume", action="store_true", help="start again")
    p.set_defaults(handler=run_pretrain)


def run_pretrain(args: argparse.Namespace, settings: Settings, show_progress: bool) -> int:
    """Handler of ``medseg pretrain``."""
    changes = {
        "method": args.method,
        "time_budget_minutes": args.time_budget,
        "max_epochs": args.epochs,
        "iterations_per_epoch": args.iterations_per_epoch,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "mask_ratio": args.mask_ratio,
        "temperature": args.temperature,
        "seed": args.seed,
        "device": settings.device,
    }
    config = PretrainConfig(**{k: v for k, v in changes.items() if v is not None})
    if args.time_budget is None and args.epochs is None and args.max_steps is None:
        print(
            "medseg: no --epochs, --max-steps or --time-budget given: pretraining for at most "
            "60 minutes",
            file=sys.stderr,
        )
        config = PretrainConfig(**{**config.__dict__, "time_budget_minutes": 60.0})
    result = api.pretrain(
        args.images,
        settings.work_dir,
        config=config,
        plan=args.plan,
        split_file=args.split,
        fold=args.fold,
        resume=not args.no_resume,
        num_workers=settings.num_workers,
        show_progress=show_progress,
    )
    print_json(result)
    print(
        f"pretrained encoder in {result.model_dir} (use `medseg train DATA --init-from "
        f"{result.model_dir}`)",
        file=sys.stderr,
    )
    return 0
