"""``medseg evaluate``: metrics of predictions against references."""

from __future__ import annotations

import argparse
import json

from medseg.settings import Settings


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="metrics of predictions against references")
    p.add_argument("pred_dir")
    p.add_argument("ref_dir")
    p.add_argument("-o", "--output", help="folder for metrics.csv, summary.json and report.html")
    p.add_argument("--dataset-json", help="label names from a dataset.json")
    p.add_argument("--images", help="folder of the images, for report overlays")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=run_evaluate)


def run_evaluate(args: argparse.Namespace, settings: Settings, show_progress: bool) -> int:
    from medseg import api
    from medseg.serialization import to_jsonable

    labels = None
    if args.dataset_json:
        from medseg.evaluation.evaluate import labels_from_dataset_json

        labels = dict(labels_from_dataset_json(args.dataset_json))
    report = api.evaluate(
        args.pred_dir,
        args.ref_dir,
        args.output,
        labels=labels,
        images_dir=args.images,
        overwrite=args.overwrite,
    )
    print(json.dumps(to_jsonable(report.summary), indent=2))
    return 0
