"""Commands of the registration group: ``register``, ``train-registration``, ``atlas-segment``."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from medseg import api
from medseg.cli.common import print_json
from medseg.registration.atlas import FUSIONS
from medseg.registration.classical import INITS, METRICS
from medseg.registration.fields import LABEL_MODES
from medseg.registration.learned import SIMILARITIES, RegistrationTrainConfig
from medseg.registration.pipeline import ALL_METHODS
from medseg.runtime import PRECISIONS
from medseg.settings import Settings


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add this group's sub-commands to the medseg parser."""
    p = sub.add_parser(
        "register",
        help="register a moving image to a fixed image (transform, warped image/labels, report)",
    )
    p.add_argument("fixed")
    p.add_argument("moving")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--method", choices=ALL_METHODS, default="affine")
    p.add_argument(
        "--metric",
        choices=METRICS,
        default="mattes",
        help="similarity metric (mattes: mutual information, for multi-modal pairs)",
    )
    p.add_argument(
        "--init",
        choices=INITS,
        default="geometry",
        help="centred initialization by image centres or centres of mass",
    )
    p.add_argument("--labels", help="moving label map to warp (nearest neighbour)")
    p.add_argument("--fixed-labels", help="fixed label map: report Dice of the warped labels")
    p.add_argument(
        "--label-interpolation",
        choices=LABEL_MODES,
        default="nearest",
        help="linear: one-hot linear interpolation then arg-max",
    )
    p.add_argument("--fixed-mask", help="restrict the metric to this fixed-image mask")
    p.add_argument("--moving-mask", help="restrict the metric to this moving-image mask")
    p.add_argument("--model", help="model folder for --method learned")
    p.add_argument(
        "--precision",
        choices=[p for p in PRECISIONS if p != "auto"],
        default="fp32",
        help="learned: bf16 runs the network in bfloat16 (faster on CPUs with AMX/AVX-512 BF16)",
    )
    p.add_argument("--no-report", action="store_true", help="skip the PNG/HTML report")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=run_register)

    t = sub.add_parser(
        "train-registration", help="train a learned (VoxelMorph-style) registration model"
    )
    t.add_argument("dataset", help="dataset folder (MSD, nnU-Net v2 or plain 2D)")
    t.add_argument("-o", "--output", required=True, help="model folder")
    t.add_argument("--time-budget", type=float, metavar="MINUTES")
    t.add_argument("--epochs", type=int)
    t.add_argument("--iterations-per-epoch", type=int)
    t.add_argument("--similarity", choices=SIMILARITIES)
    t.add_argument("--smoothness", type=float, help="weight of the smoothness penalty (default 1)")
    t.add_argument(
        "--dice-weight", type=float, help="weight of the label Dice term; 0: unsupervised"
    )
    t.add_argument("--learning-rate", type=float)
    t.add_argument("--device", help="auto, cpu, cuda ...")
    t.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    t.add_argument("--no-resume", action="store_true", help="start over instead of resuming")
    t.set_defaults(handler=run_train_registration)

    a = sub.add_parser("atlas-segment", help="segment an image by registering labelled atlases")
    a.add_argument("target")
    a.add_argument("--atlases", required=True, help="dataset folder of labelled atlases")
    a.add_argument("-o", "--output", required=True, help="output label file or folder")
    a.add_argument("--method", choices=ALL_METHODS, default="demons")
    a.add_argument("--metric", choices=METRICS, default="mattes")
    a.add_argument("--fusion", choices=FUSIONS, default="majority")
    a.add_argument("--max-atlases", type=int, help="use the first N labelled cases")
    a.add_argument("--model", help="model folder for --method learned")
    a.add_argument("--overwrite", action="store_true")
    a.set_defaults(handler=run_atlas_segment)


def run_register(args: argparse.Namespace, settings: Settings, show_progress: bool) -> int:
    summary = api.register(
        args.fixed,
        args.moving,
        args.output,
        method=args.method,
        metric=args.metric,
        init=args.init,
        labels=args.labels,
        fixed_labels=args.fixed_labels,
        label_mode=args.label_interpolation,
        fixed_mask=args.fixed_mask,
        moving_mask=args.moving_mask,
        model_dir=args.model,
        precision=args.precision,
        report=not args.no_report,
        overwrite=args.overwrite,
    )
    print(
        json.dumps({k: v for k, v in summary.items() if k != "linear_part"}, indent=2, default=str)
    )
    return 0


def run_train_registration(
    args: argparse.Namespace, settings: Settings, show_progress: bool
) -> int:
    changes = {
        "time_budget_minutes": args.time_budget,
        "max_epochs": args.epochs,
        "iterations_per_epoch": args.iterations_per_epoch,
        "similarity": args.similarity,
        "smoothness_weight": args.smoothness,
        "dice_weight": args.dice_weight,
        "learning_rate": args.learning_rate,
        "device": args.device,
        "num_threads": args.threads,
    }
    config = replace(
        RegistrationTrainConfig(), **{k: v for k, v in changes.items() if v is not None}
    )
    result = api.train_registration(
        args.dataset,
        args.output,
        config=config,
        resume=not args.no_resume,
        show_progress=show_progress,
    )
    print_json(result)
    return 0


def run_atlas_segment(args: argparse.Namespace, settings: Settings, show_progress: bool) -> int:
    summary = api.atlas_segment(
        args.target,
        args.atlases,
        args.output,
        method=args.method,
        metric=args.metric,
        fusion=args.fusion,
        max_atlases=args.max_atlases,
        model_dir=args.model,
        overwrite=args.overwrite,
        show_progress=show_progress,
    )
    print_json(summary)
    return 0
