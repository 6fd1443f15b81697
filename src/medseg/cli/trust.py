"""``medseg calibrate`` and ``medseg explain``, and the trust options of ``medseg predict``
(``--probabilities``, ``--mc-dropout``, ``--qc``, ``--no-calibration``)."""

from __future__ import annotations

import argparse
import sys

from medseg import api
from medseg.calibration import MODES
from medseg.cli.common import parse_folds, predict_option_group, print_json, trained_folds
from medseg.explain import METHODS
from medseg.inference.uncertainty import PROBABILITY_FORMATS
from medseg.settings import Settings


def _voxels(value: str) -> tuple[int, ...]:
    try:
        numbers = tuple(int(v) for v in value.split(",") if v != "")
    except ValueError:
        numbers = ()
    if not numbers or any(n < 1 for n in numbers):
        raise argparse.ArgumentTypeError(f"expected voxel counts like 8 or 8,8,4 (got {value!r})")
    return numbers


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``calibrate`` and ``explain``, and the trust options of ``predict``."""
    p = sub.add_parser(
        "calibrate",
        help="fit temperature scaling and the --qc review threshold on cross-validation predictions",
    )
    p.add_argument("model", help="model folder (or a work folder holding model/)")
    p.add_argument(
        "--mode", choices=MODES, default="global", help="one temperature or one per class"
    )
    p.add_argument(
        "--folds", type=parse_folds, help="folds whose validation cases are used (default: all)"
    )
    p.add_argument("--tta", action="store_true", help="mirroring TTA, as you will predict")
    p.add_argument(
        "--mc-dropout",
        type=int,
        default=0,
        metavar="N",
        help="MC-dropout samples, as you will predict",
    )
    p.add_argument("--max-cases", type=int, help="at most this many validation cases per fold")
    p.add_argument(
        "--fit-region",
        choices=("crop", "bbox"),
        default="crop",
        help="fit on every voxel (crop) or inside the reference-foreground bounding box",
    )
    p.add_argument(
        "--target-recall",
        type=float,
        default=0.8,
        help="share of the failing validation cases the review threshold must flag (default 0.8)",
    )
    p.add_argument(
        "--failure-quantile",
        type=float,
        default=0.1,
        help="a case fails below this quantile of the validation Dice (default 0.1)",
    )
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=run_calibrate)

    p = sub.add_parser("explain", help="attribution map of one class of an image (captum)")
    p.add_argument("model", help="model folder (or a work folder holding model/)")
    p.add_argument("image", nargs="+", help="the image (or its channel files, in order)")
    p.add_argument("-o", "--output", default="explanations", help="output folder")
    p.add_argument("--method", choices=METHODS, default="occlusion")
    p.add_argument("--class", dest="class_value", required=True, help="class name or label value")
    p.add_argument(
        "--region",
        metavar="MASK",
        help="explain inside this mask (default: the class's segmentation)",
    )
    p.add_argument("--fold", type=int, help="the fold whose network is explained (default: first)")
    p.add_argument("--window", type=_voxels, help="occlusion block in voxels, e.g. 8 or 8,8,4")
    p.add_argument("--stride", type=_voxels, help="occlusion stride in voxels (default: the block)")
    p.add_argument("--steps", type=int, default=32, help="integrated-gradients steps")
    p.set_defaults(handler=run_explain)

    g = predict_option_group(sub, "trust (calibration, uncertainty, quality control)")
    if g is not None:
        g.add_argument(
            "--probabilities",
            nargs="?",
            const="nifti",
            choices=PROBABILITY_FORMATS,
            help="also write calibrated class probabilities: <case>_probabilities.nii.gz "
            "(4D, 16-bit; default) or .npz (float16, for many classes)",
        )
        g.add_argument(
            "--mc-dropout",
            type=int,
            default=0,
            metavar="N",
            help="N MC-dropout samples per fold (the network must have dropout)",
        )
        g.add_argument(
            "--qc",
            action="store_true",
            help="write qc.csv: per-case uncertainty score and review flag (needs `medseg calibrate`)",
        )
        g.add_argument(
            "--no-calibration",
            action="store_true",
            help="ignore the model folder's calibration.json temperature",
        )


def run_calibrate(args: argparse.Namespace, settings: Settings, show_progress: bool) -> int:
    record = api.calibrate(
        args.model,
        folds=trained_folds(args.folds),
        mode=args.mode,
        mirror=args.tta,
        mc_samples=args.mc_dropout,
        max_cases=args.max_cases,
        fit_region=args.fit_region,
        target_recall=args.target_recall,
        failure_quantile=args.failure_quantile,
        device=settings.device,
        overwrite=args.overwrite,
        show_progress=show_progress,
    )
    summary = {k: v for k, v in record.items() if k != "qc"}
    summary["qc"] = {k: v for k, v in record["qc"].items() if k != "cases"}
    print_json(summary)
    return 0


def run_explain(args: argparse.Namespace, settings: Settings, show_progress: bool) -> int:
    record = api.explain(
        args.model,
        args.image if len(args.image) > 1 else args.image[0],
        args.output,
        method=args.method,
        class_value=args.class_value,
        region=args.region,
        fold=args.fold,
        window=args.window,
        stride=args.stride,
        steps=args.steps,
        device=settings.device,
    )
    print_json(record)
    print(f"explanation written to {args.output}/report.html", file=sys.stderr)
    return 0
