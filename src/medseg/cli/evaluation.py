"""``medseg evaluate`` and ``medseg evaluate-cv``: metrics of predictions against references;
``medseg measure``: biometry (volumes, fetal head ellipse, HC against a reference)."""

from __future__ import annotations

import argparse

from medseg import api
from medseg.cli.common import predict_option_group, print_json
from medseg.evaluation.evaluate import labels_from_dataset_json
from medseg.evaluation.metrics import EMPTY_POLICIES
from medseg.settings import Settings


def _add_metric_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels", help="label names from a dataset.json (file or folder)")
    p.add_argument(
        "--tolerance",
        type=float,
        default=2.0,
        metavar="MM",
        help="NSD tolerance and boundary IoU band in mm (default 2)",
    )
    p.add_argument(
        "--percentile", type=float, default=95.0, help="robust Hausdorff percentile (default 95)"
    )
    p.add_argument(
        "--empty",
        choices=EMPTY_POLICIES,
        default="nan",
        help="empty-mask policy: nan (nnU-Net, default) or penalty (BraTS-style)",
    )
    p.add_argument(
        "--max-distance",
        type=float,
        metavar="MM",
        help="penalty distance of --empty penalty (default: image diagonal)",
    )
    p.add_argument("--no-distances", action="store_true", help="overlap metrics only (faster)")
    p.add_argument(
        "--lesions", action="store_true", help="lesion-wise TP/FP/FN (connected components)"
    )
    p.add_argument("--overwrite", action="store_true")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="metrics of predictions against references")
    p.add_argument("pred_dir")
    p.add_argument("ref_dir")
    p.add_argument("-o", "--output", help="folder for metrics.csv, summary.json and report.html")
    p.add_argument("--dataset-json", help="label names from a dataset.json")
    p.add_argument("--images", help="folder of the images, for report overlays")
    p.add_argument(
        "--groups", help="CSV: a case column, then one column per grouping (site, sex, ...)"
    )
    p.add_argument(
        "--resample",
        action="store_true",
        help="resample predictions whose grid differs onto the reference (nearest neighbour)",
    )
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help="score the cases that have a prediction, warn about the others",
    )
    _add_metric_options(p)
    p.set_defaults(handler=run_evaluate)

    p = sub.add_parser(
        "evaluate-cv", help="evaluate every fold's validation predictions of a work folder"
    )
    p.add_argument("work_dir")
    p.add_argument("-o", "--output", help="folder for metrics.csv, summary.json and report.html")
    _add_metric_options(p)
    p.set_defaults(handler=run_evaluate_cv)

    p = sub.add_parser(
        "measure",
        help="volumes (mL) or areas (mm^2) per label; with --head the fetal head HC, BPD, OFD",
    )
    p.add_argument("segmentations", help="a label map file or a folder of them")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="folder for measurements.csv, summary.json, report.html",
    )
    add_measure_options(p)
    p.add_argument("--head-label", type=int, help="the head's label (default: any non-zero)")
    p.add_argument("--images", help="folder of the images, for the report's overlays")
    p.add_argument("--labels", help="label names from a dataset.json (file or folder)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=run_measure)

    g = predict_option_group(sub, "measurement (medseg measure on the predictions)")
    if g is not None:
        g.add_argument(
            "--measure",
            action="store_true",
            help="also measure the predictions (volumes in mL or areas in mm^2; with --head "
            "the fetal head's HC, BPD, OFD) into OUTPUT/measurements",
        )
        add_measure_options(g)


def add_measure_options(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The head and pixel-size options of ``medseg measure`` (and ``predict --measure``)."""
    p.add_argument(
        "--head",
        action="store_true",
        help="fit an ellipse to the head outline (2D): HC (Ramanujan), BPD, OFD in mm",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--pixel-size",
        type=float,
        metavar="MM",
        help="pixel size of every 2D image (a PNG has none)",
    )
    size.add_argument(
        "--pixel-size-csv",
        metavar="CSV",
        help="pixel size per file: filename,pixel size(mm)[,...] (HC18) or filename,pixel_size_mm",
    )
    p.add_argument(
        "--reference",
        metavar="CSV",
        help="reference HC per file (HC18 pixel_size_and_HC.csv): errors and Bland-Altman; implies --head",
    )


def _metric_options(args: argparse.Namespace) -> dict:
    return {
        "distances": not args.no_distances,
        "percentile": args.percentile,
        "tolerance_mm": args.tolerance,
        "empty": args.empty,
        "max_distance_mm": args.max_distance,
        "lesions": args.lesions,
    }


def _brief(summary: dict) -> dict:
    """What the terminal shows; summary.json has the per-class, per-group and per-fold details."""
    keep = ("n_cases", "mean_foreground_dice", "mean_over_classes", "n_empty", "warnings")
    brief = {k: summary[k] for k in keep if k in summary}
    if len(summary.get("per_class", {})) <= 8:
        brief["mean_per_class"] = {
            c["name"]: {m: c[m]["mean"] for m in ("dice", "hd95", "nsd") if m in c}
            for c in summary["per_class"].values()
        }
    return brief


def run_evaluate(args: argparse.Namespace, settings: Settings, show_progress: bool) -> int:
    labels = None
    source = args.dataset_json or args.labels
    if source:
        labels = dict(labels_from_dataset_json(source))
    report = api.evaluate(
        args.pred_dir,
        args.ref_dir,
        args.output,
        labels=labels,
        images_dir=args.images,
        overwrite=args.overwrite,
        groups=args.groups,
        resample=args.resample,
        allow_missing=args.allow_missing,
        show_progress=show_progress,
        **_metric_options(args),
    )
    print_json(_brief(report.summary))
    return 0


def run_evaluate_cv(args: argparse.Namespace, settings: Settings, show_progress: bool) -> int:
    report = api.evaluate_cross_validation(
        args.work_dir,
        args.output,
        labels=args.labels,
        overwrite=args.overwrite,
        show_progress=show_progress,
        **_metric_options(args),
    )
    print_json(_brief(report.summary))
    return 0


def run_measure(args: argparse.Namespace, settings: Settings, show_progress: bool) -> int:
    labels = dict(labels_from_dataset_json(args.labels)) if args.labels else None
    report = api.measure(
        args.segmentations,
        args.output,
        head=args.head,
        head_label=args.head_label,
        labels=labels,
        pixel_size=args.pixel_size,
        pixel_size_csv=args.pixel_size_csv,
        reference=args.reference,
        images_dir=args.images,
        overwrite=args.overwrite,
        show_progress=show_progress,
    )
    summary = report.summary
    brief = {k: summary[k] for k in ("n_cases", "measures", "head", "warnings") if k in summary}
    if "reference_hc" in summary:
        brief["reference_hc"] = {
            k: v for k, v in summary["reference_hc"].items() if k not in ("cases", "missing")
        }
    print_json(brief)
    return 0
