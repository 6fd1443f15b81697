"""``medseg extend``: add classes or a site to a trained model without forgetting."""

from __future__ import annotations

import argparse
from dataclasses import replace

from medseg import api
from medseg.cli.common import add_train_options, print_json, train_config, with_default_budget
from medseg.continual import METHODS
from medseg.continual.heads import HEAD_INITS
from medseg.errors import MedsegError
from medseg.settings import Settings


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add this group's commands to the medseg parser."""
    p = sub.add_parser(
        "extend",
        help="extend a trained model with new classes or a new site (continual learning)",
        description="Class-incremental when NEW_DATASET labels classes the model does not know "
        "(ids after the old ones; old classes are background there), domain-incremental when "
        "it has the same labels. The extended model folder is WORK/model; WORK/continual/"
        "report.html shows Dice before and after and the forgetting per class.",
    )
    p.add_argument(
        "model_dir",
        metavar="MODEL",
        help="the trained model folder (or a work folder holding model/)",
    )
    p.add_argument("dataset", help="the new dataset")
    p.add_argument("-w", "--work-dir", help="the extended model's work folder")
    p.add_argument("--method", choices=METHODS, default="naive")
    p.add_argument(
        "--exemplars",
        type=int,
        default=5,
        metavar="K",
        help="keep at most K old cases (rehearsal, EWC's Fisher; stored in the new folder)",
    )
    p.add_argument(
        "--old-dataset",
        metavar="DIR",
        help="the old data, if still available: exemplars are chosen from it and "
        "forgetting is measured on its validation cases",
    )
    p.add_argument("--from-fold", type=int, help="the model's fold to extend (default: first)")
    p.add_argument(
        "--method-weight",
        type=float,
        help="weight of the method's extra term (lwf 1, mib 10, plop 0.01, ewc 100)",
    )
    p.add_argument(
        "--head-init",
        choices=HEAD_INITS,
        default="copy",
        help="new classes' head rows: fresh (copy: old rows copied, new ones initialized) "
        "or MiB's copy of the background classifier",
    )
    add_train_options(p)
    p.set_defaults(handler=run_extend)


def run_extend(args: argparse.Namespace, settings: Settings, show_progress: bool) -> int:
    if args.model or args.init_from or args.encoder_weights:
        raise MedsegError(
            "extend trains the model's own architecture from its own weights: "
            "--model, --init-from and --encoder-weights do not apply"
        )
    config = with_default_budget(train_config(args), args)
    if args.folds:
        config = replace(config, fold=args.folds[0])
    result = api.extend(
        args.model_dir,
        args.dataset,
        settings.work_dir,
        method=args.method,
        exemplars=args.exemplars,
        old_dataset=args.old_dataset,
        fold=args.from_fold,
        config=config,
        split_file=args.split,
        weight=args.method_weight,
        head_init=args.head_init,
        num_workers=settings.num_workers,
        show_progress=show_progress,
    )
    print_json(result)
    return 0
